"""CAMELYON16 FROC / slide AUC and CAMELYON17 slide class, pN-stage, kappa, submission CSV,
checked against values derived by hand (or by an independent re-derivation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from pipeline.camelyon import (
    PN_STAGES,
    detections_from_grid,
    evaluation_mask,
    froc,
    pn_kappa,
    pn_stage,
    read_camelyon17_submission,
    slide_auc,
    slide_class_from_mask,
    write_camelyon17_submission,
)
from pipeline.metrics import MetricsError

# ---------------------------------------------------------------------------- slide class


def _row(n: int, shape=(5, 20)) -> np.ndarray:
    g = np.zeros(shape, bool)
    g[2, 1 : 1 + n] = True
    return g


@pytest.mark.parametrize(
    "n_tiles, pitch_um, expected_cls, expected_um",
    [
        (10, 200.0, "micro", 2000.0),  # exactly 2000 um is not > 2000
        (11, 200.0, "macro", 2200.0),
        (10, 200.001, "macro", 2000.01),  # just above
        (1, 200.0, "itc", 200.0),  # exactly 200 um is not > 200
        (1, 200.5, "micro", 200.5),
        (2, 50.0, "itc", 100.0),
    ],
)
def test_slide_class_boundaries(n_tiles, pitch_um, expected_cls, expected_um):
    cls, d_um = slide_class_from_mask(_row(n_tiles), pitch_um)
    assert cls == expected_cls
    assert d_um == pytest.approx(expected_um)


def test_slide_class_negative_and_diagonal_and_largest_by_diameter():
    assert slide_class_from_mask(np.zeros((4, 4), bool), 100.0) == ("negative", 0.0)
    # two diagonal tiles are one lesion: centres sqrt(2) apart, + 1 tile
    g = np.zeros((6, 6), bool)
    g[1, 1] = g[2, 2] = True
    assert slide_class_from_mask(g, 100.0)[1] == pytest.approx((math.sqrt(2) + 1) * 100)
    # a 3x3 block (diameter 2*sqrt(2)+1 = 3.83 tiles, 9 tiles) vs a 5-tile line (5 tiles):
    # the line is the largest lesion even though it has fewer tiles.
    g = np.zeros((10, 12), bool)
    g[0:3, 0:3] = True
    g[8, 3:8] = True
    assert slide_class_from_mask(g, 100.0)[1] == pytest.approx(500.0)
    # a vertical/diagonal extent through an L shape: corners (0,0) and (4,3) -> 5 + 1 tiles
    g = np.zeros((6, 6), bool)
    g[0:5, 0] = True
    g[4, 0:4] = True
    assert slide_class_from_mask(g, 10.0)[1] == pytest.approx(60.0)


# ---------------------------------------------------------------------------- pN stage


@pytest.mark.parametrize(
    "classes, stage",
    [
        (["negative"] * 5, "pN0"),
        (["itc", "negative", "itc", "negative", "negative"], "pN0(i+)"),  # ITC only
        (["micro", "negative", "itc", "negative", "negative"], "pN1mi"),
        (["micro"] * 4 + ["negative"], "pN1mi"),  # 4 micro, no macro
        (["micro"] * 5, "pN1mi"),
        (["macro", "negative", "negative", "negative", "negative"], "pN1"),
        (["macro", "itc", "itc", "itc", "itc"], "pN1"),  # ITC + macro: ITC nodes not positive
        (["macro", "micro", "micro", "negative", "itc"], "pN1"),  # exactly 3 positive
        (["macro", "micro", "micro", "micro", "itc"], "pN2"),  # exactly 4 positive
        (["macro", "macro", "macro", "macro", "negative"], "pN2"),
        (["MACRO"] * 5, "pN2"),
    ],
)
def test_pn_stage_rules(classes, stage):
    assert pn_stage(classes) == stage


def test_pn_stage_rejects_unknown_or_empty():
    with pytest.raises(MetricsError):
        pn_stage(["tumor"])
    with pytest.raises(MetricsError):
        pn_stage([])


# ---------------------------------------------------------------------------- kappa


def test_kappa_tiny_hand_computed():
    # ranks: true (0, 3), pred (0, 4). sum w*O = (3-4)^2 = 1. Chance table: each of the
    # pairs (0,0) (0,4) (3,0) (3,4) with weight 1/2: 0 + 16/2 + 9/2 + 1/2 = 13.
    assert pn_kappa(["pN0", "pN1"], ["pN0", "pN2"]) == pytest.approx(1 - 1 / 13)
    # compared lower-cased
    assert pn_kappa(["PN0", "pn1"], ["pn0", "PN2"]) == pytest.approx(12 / 13)
    assert pn_kappa(list(PN_STAGES), list(PN_STAGES)) == pytest.approx(1.0)


def test_kappa_known_table_matches_formula_and_sklearn():
    # rows = true stage, cols = predicted stage (ordered pN0 .. pN2)
    table = np.array(
        [
            [10, 2, 1, 0, 0],
            [3, 4, 1, 0, 0],
            [1, 1, 5, 2, 0],
            [0, 0, 2, 6, 1],
            [0, 0, 0, 2, 4],
        ]
    )
    true, pred = [], []
    for i in range(5):
        for j in range(5):
            true += [PN_STAGES[i]] * table[i, j]
            pred += [PN_STAGES[j]] * table[i, j]
    k = np.arange(5)
    w = (k[:, None] - k[None, :]) ** 2
    expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
    kappa_formula = 1 - (w * table).sum() / (w * expected).sum()
    got = pn_kappa(true, pred)
    assert got == pytest.approx(kappa_formula)
    assert got == pytest.approx(
        cohen_kappa_score(true, pred, labels=list(PN_STAGES), weights="quadratic")
    )
    # stages missing from the data still count in the label set (labels= fixed)
    assert pn_kappa(["pN0", "pN2"], ["pN0", "pN2"]) == pytest.approx(1.0)


def test_kappa_rejects_bad_stage_and_length():
    with pytest.raises(MetricsError):
        pn_kappa(["pN3"], ["pN0"])
    with pytest.raises(MetricsError):
        pn_kappa(["pN0"], ["pN0", "pN1"])


# ---------------------------------------------------------------------------- submission


def test_submission_round_trip_and_exact_lines(tmp_path):
    path = tmp_path / "sub" / "submission.csv"
    stages = {"patient_004": "pn1", "patient_000.zip": "pN0(I+)"}
    slides = {
        "patient_004": {"patient_004_node_2": "MACRO", "patient_004_node_0.tif": "negative"},
        "patient_000.zip": {"patient_000_node_1": "itc"},
    }
    write_camelyon17_submission(path, stages, slides)
    assert path.read_text().splitlines() == [
        "patient,stage",
        "patient_000.zip,pN0(i+)",
        "patient_000_node_1.tif,itc",
        "patient_004.zip,pN1",
        "patient_004_node_0.tif,negative",
        "patient_004_node_2.tif,macro",
    ]
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temp left over
    assert read_camelyon17_submission(path) == {"patient_000": "pn0(i+)", "patient_004": "pn1"}


def test_reader_mimics_official_scorer(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text(
        "patient,stage\npatient_010.zip, PN2\npatient_010_node_0.tif,macro\n"
        "\npatient_011.ZIP,pN0\n"
    )
    assert read_camelyon17_submission(path) == {"patient_010": "pn2", "patient_011": "pn0"}
    path.write_text("patient_1.zip,pN0\npatient_1.zip,pN1\n")
    with pytest.raises(MetricsError, match="twice"):
        read_camelyon17_submission(path)
    with pytest.raises(MetricsError, match="not found"):
        read_camelyon17_submission(tmp_path / "missing.csv")


def test_submission_rejects_bad_values(tmp_path):
    with pytest.raises(MetricsError):
        write_camelyon17_submission(tmp_path / "a.csv", {"p": "pN9"}, {})
    with pytest.raises(MetricsError):
        write_camelyon17_submission(tmp_path / "a.csv", {"p": "pN0"}, {"q": {"s": "itc"}})
    assert not (tmp_path / "a.csv").exists()


# ---------------------------------------------------------------------------- slide AUC


def test_slide_auc():
    # pairs (tumor, normal) ranked right: .9>.3 .9>.5 .4>.3 -> 3 of 4
    assert slide_auc([1, 0, 1, 0], [0.9, 0.3, 0.4, 0.5]) == pytest.approx(0.75)
    assert math.isnan(slide_auc([1, 1], [0.2, 0.3]))


# ---------------------------------------------------------------------------- evaluation mask


def test_evaluation_mask_dilation_radius_and_merging():
    # pixel 10 um, radius 37.5 um = 3.75 px: each block grows by 3 px per side, so two blocks
    # merge (8-connected) when the gap between them is <= 6 px.
    for gap, n_lesions in ((6, 1), (7, 2)):
        t = np.zeros((40, 60), bool)
        t[15:25, 5:15] = True
        t[15:25, 15 + gap : 25 + gap] = True
        labels, _ = evaluation_mask(t, pixel_um=10.0)
        assert labels.max() == n_lesions, gap
    # strict "<": radius exactly 4 px keeps lattice points with i^2 + j^2 < 16 -> 45 pixels
    t = np.zeros((21, 21), bool)
    t[10, 10] = True
    labels, _ = evaluation_mask(t, pixel_um=10.0, dilation_radius_um=40.0)
    assert (labels == 1).sum() == 45


def test_evaluation_mask_lesions_are_8_connected():
    t = np.zeros((6, 6), bool)
    t[1, 1] = t[2, 2] = True  # diagonal neighbours, no dilation: one lesion
    t[4, 4] = True
    labels, _ = evaluation_mask(t, pixel_um=1.0, dilation_radius_um=0.0)
    assert labels.max() == 2 and labels[1, 1] == labels[2, 2] != labels[4, 4]


def test_evaluation_mask_fills_holes_and_flags_itc():
    t = np.zeros((80, 80), bool)
    rr, cc = np.mgrid[:80, :80]
    r = np.hypot(rr - 40, cc - 40)
    t[(r >= 20) & (r < 25)] = True  # a ring with a hole far wider than the dilation
    t[5, 5] = True  # a lone tumor pixel
    labels, itc = evaluation_mask(t, pixel_um=10.0)
    ring = labels[40, 40 - 22]
    assert ring > 0 and labels[40, 40] == ring  # hole filled
    lone = labels[5, 5]
    assert itc == {int(lone)}  # ~75 um across -> ITC; the ring (~500 um) is not


def test_evaluation_mask_itc_limit_on_major_axis():
    # a 1 x 10 px line with no dilation: variance along it (10^2 - 1) / 12, major axis
    # 4 * sqrt(var) = 11.489 px = 114.89 um at 10 um/px.
    t = np.zeros((5, 20), bool)
    t[2, 3:13] = True
    axis_um = 4 * math.sqrt(99 / 12) * 10.0
    _, itc = evaluation_mask(t, 10.0, dilation_radius_um=0.0, itc_major_axis_um=axis_um - 0.01)
    assert itc == set()
    _, itc = evaluation_mask(t, 10.0, dilation_radius_um=0.0, itc_major_axis_um=axis_um + 0.01)
    assert itc == {1}


# ---------------------------------------------------------------------------- FROC


def _froc_case():
    """Slide A: macro lesion 1 (hit twice), ITC lesion 2 (hit), macro lesion 3 (missed), one FP.
    Slide B: one lesion hit at 0.4. Slide C (normal): detections at 0.4 and 0.2."""
    a = np.zeros((20, 20), np.int32)
    a[2:6, 2:6] = 1
    a[15, 15] = 2
    a[10:13, 2:5] = 3
    b = np.zeros((20, 20), np.int32)
    b[5:9, 5:9] = 1
    masks = {"A": (a, {2}), "B": (b, set()), "C": None}
    dets = {
        "A": np.array(
            [[3.5, 3.2, 0.9], [4.0, 4.0, 0.6], [15.5, 15.5, 0.95], [10.0, 18.0, 0.7]]
        ),
        "B": np.array([[6.0, 6.0, 0.4]]),
        "C": np.array([[1.0, 1.0, 0.4], [2.0, 2.0, 0.2]]),
    }
    return dets, masks


def test_froc_hand_derived():
    dets, masks = _froc_case()
    # scored: TP A1 .9, TP B1 .4; FP A .7, C .4, C .2 (A1's .6 hit and the ITC .95 ignored).
    # 3 slides, 3 non-ITC lesions (A1, A3, B1).
    r = froc(dets, masks)
    np.testing.assert_allclose(r["thresholds"], [np.inf, 0.9, 0.7, 0.4, 0.2])
    np.testing.assert_allclose(r["fps_per_slide"], [0, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(r["sensitivity"], [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert (r["n_slides"], r["n_lesions"], r["n_itc_lesions"]) == (3, 3, 1)
    assert (r["n_fp_total"], r["n_detected_lesions"]) == (3, 2)
    # linear (official np.interp): at 0.5 FP/slide, halfway between (1/3, 1/3) and (2/3, 2/3)
    np.testing.assert_allclose(r["sensitivity_at_fp_rates"], [1 / 3, 1 / 2] + [2 / 3] * 4)
    assert r["score"] == pytest.approx(7 / 12)
    s = froc(dets, masks, interpolation="step")
    np.testing.assert_allclose(s["sensitivity_at_fp_rates"], [1 / 3, 1 / 3] + [2 / 3] * 4)
    assert s["score"] == pytest.approx(5 / 9)


def _official_style_score(dets, masks):
    """Independent re-derivation of the official computation (`_official_curve`: per lesion a
    TP prob, 0 when missed; thresholds = distinct values except the lowest; (0, 0) appended),
    then np.interp at the challenge's FP rates on the increasing curve."""
    fp_rate, sens = _official_curve(dets, masks)
    return float(np.mean(np.interp([0.25, 0.5, 1, 2, 4, 8], fp_rate, sens)))


def test_froc_matches_official_style_on_random_cases():
    rng = np.random.default_rng(1)
    seen_itc, scores = 0, []
    for _ in range(5):
        masks, dets = {}, {}
        for s in range(6):
            if s < 4:
                t = np.zeros((60, 60), bool)
                for _ in range(rng.integers(1, 4)):
                    r0, c0 = rng.integers(2, 50, 2)
                    h, w = rng.integers(1, 9, 2)
                    t[r0 : r0 + h, c0 : c0 + w] = True
                masks[f"s{s}"] = evaluation_mask(t, pixel_um=30.0)
            else:
                masks[f"s{s}"] = None
            k = rng.integers(0, 8)
            xy = rng.uniform(0, 60, (k, 2))
            if masks[f"s{s}"] is not None:  # plus hits on lesion pixels (ITC ones included)
                rr, cc = np.nonzero(masks[f"s{s}"][0])
                pick = rng.integers(0, rr.size, rng.integers(0, 6))
                xy = np.vstack([xy, np.column_stack([cc[pick] + 0.5, rr[pick] + 0.5])])
            # few distinct probabilities, so TPs and FPs tie (where the interpolation matters)
            probs = rng.choice([0.3, 0.5, 0.7, 0.9], len(xy))
            dets[f"s{s}"] = np.column_stack([xy, probs])
        r = froc(dets, masks)
        seen_itc += r["n_itc_lesions"]
        scores.append(r["score"])
        # a missed or ITC lesion puts a 0 among the official's values, so its "drop the lowest
        # value" only drops 0 and the two definitions coincide
        assert r["n_lesions"] > r["n_detected_lesions"] or r["n_itc_lesions"] > 0
        assert r["score"] == pytest.approx(_official_style_score(dets, masks))
    assert seen_itc > 0 and len(set(scores)) == len(scores) and 0 < min(scores)


def test_froc_errors():
    dets, masks = _froc_case()
    with pytest.raises(MetricsError, match="outside"):
        froc({"A": np.array([[25.0, 1.0, 0.5]])}, masks)
    with pytest.raises(MetricsError, match="no mask"):
        froc({"Z": np.zeros((0, 3))}, masks)
    with pytest.raises(MetricsError):
        froc(dets, {})
    r = froc({}, {"C": None})  # no lesions at all: sensitivity undefined
    assert math.isnan(r["score"])


# ---------------------------------------------------------------------------- detections


def test_detections_from_grid():
    g = np.array(
        [
            [0.9, 0.1, 0.0, 0.0],
            [0.1, 0.6, 0.0, np.nan],
            [0.0, 0.0, 0.0, 0.7],
            [0.0, 0.0, 0.5, 0.7],
        ]
    )
    d = detections_from_grid(g, 0.5)
    # component 1: (0,0) and (1,1), diagonal -> one detection at (0,0) with 0.9.
    # component 2: (2,3) (3,2) (3,3): max 0.7 tied at (2,3) and (3,3): row-major first (2,3).
    np.testing.assert_allclose(d, [[0.5, 0.5, 0.9], [3.5, 2.5, 0.7]])
    assert detections_from_grid(g, 0.95).shape == (0, 3)
    # round trip into froc on the same grid: int(x), int(y) index the grid
    labels = np.zeros((4, 4), np.int32)
    labels[2:, 2:] = 1
    assert froc({"s": d}, {"s": (labels, set())})["n_detected_lesions"] == 1


# ------------------------------------------------------- FROC: the official script's corners
# Both examples are issue 11's; `_official_style_score` above re-implements the official
# Python/Evaluation_FROC.py from its description (lesion scores start at 0, strict >, sweep over
# all distinct values but the lowest, (0, 0) appended, np.interp on the reversed curve).


def test_froc_drops_the_lowest_threshold_like_the_official_script():
    # tumor slide: 2 non-ITC lesions hit at 0.9 and 0.2; normal slide: FPs at 0.5, 0.6, 0.7.
    # Official thresholds 0.5, 0.6, 0.7, 0.9 (0.2 dropped): sensitivity 1/2 at every FP rate.
    labels = np.zeros((10, 10), np.int32)
    labels[1:3, 1:3] = 1
    labels[6:8, 6:8] = 2
    masks = {"tumor": (labels, set()), "normal": None}
    dets = {"tumor": np.array([[1.5, 1.5, 0.9], [6.5, 6.5, 0.2]]),
            "normal": np.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.6], [2.5, 0.5, 0.7]])}
    r = froc(dets, masks)
    assert r["score"] == pytest.approx(0.5)  # keeping 0.2 gave 0.75
    assert r["score"] == pytest.approx(_official_style_score(dets, masks))
    np.testing.assert_allclose(r["thresholds"], [np.inf, 0.9, 0.7, 0.6, 0.5])
    np.testing.assert_allclose(r["fps_per_slide"], [0, 0, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(r["sensitivity"], [0, 0.5, 0.5, 0.5, 0.5])
    assert r["n_detected_lesions"] == 2 and r["n_fp_total"] == 3


def test_froc_lesion_hit_only_at_probability_zero_is_not_detected():
    labels = np.zeros((10, 10), np.int32)
    labels[1:3, 1:3] = 1
    labels[6:8, 6:8] = 2
    masks = {"tumor": (labels, set()), "normal": None}
    # lesion 1 hit only at p = 0 (twice), lesion 2 at 0.8; one FP at 0.3
    dets = {"tumor": np.array([[1.5, 1.5, 0.0], [2.5, 2.5, 0.0], [6.5, 6.5, 0.8]]),
            "normal": np.array([[0.5, 0.5, 0.3]])}
    r = froc(dets, masks)
    assert r["n_detected_lesions"] == 1
    assert max(r["sensitivity"]) == pytest.approx(0.5)  # counting the 0 hit reached 1.0
    assert r["score"] == pytest.approx(0.5)
    assert r["score"] == pytest.approx(_official_style_score(dets, masks))
    with pytest.raises(MetricsError, match="negative probability"):
        froc({"tumor": np.array([[1.5, 1.5, -0.1]])}, masks)


def _official_curve(dets, masks):
    """(FP rate, sensitivity) of the official computeFROC, reversed to increasing FP rate."""
    fps, tps, n_tumors = [], [], 0
    for slide, mask in masks.items():
        d = dets.get(slide, np.zeros((0, 3)))
        if mask is None:
            fps += list(d[:, 2])
            continue
        labels, itc = mask
        best = [0.0] * int(labels.max())
        for x, y, p in d:
            lab = int(labels[int(y), int(x)])
            if lab == 0:
                fps.append(p)
            elif lab not in itc and p > best[lab - 1]:
                best[lab - 1] = p
        tps += best
        n_tumors += int(labels.max()) - len(itc)
    probs = sorted(set(fps + tps))
    tot_fp = [sum(f >= t for f in fps) for t in probs[1:]] + [0]
    tot_tp = [sum(v >= t for v in tps) for t in probs[1:]] + [0]
    return (np.array(tot_fp) / len(masks))[::-1], (np.array(tot_tp) / n_tumors)[::-1]


def _lesions_hit_only_at_zero(det, mask) -> bool:
    labels, itc = mask
    best: dict[int, float] = {}
    for x, y, p in det:
        lab = int(labels[int(y), int(x)])
        if lab and lab not in itc:
            best[lab] = max(best.get(lab, 0.0), p)
    hit = {int(labels[int(y), int(x)]) for x, y, _ in det} - {0} - set(itc)
    return any(best[lab] == 0 for lab in hit)


def test_froc_equals_the_official_algorithm_on_random_cases():
    rng = np.random.default_rng(11)
    n_all_found_no_itc = n_zero_only = 0
    for _ in range(200):
        masks, dets = {}, {}
        for s in range(int(rng.integers(1, 5))):
            if s == 0 or rng.random() < 0.6:  # at least one tumor slide
                labels = np.zeros((30, 30), np.int32)
                n = int(rng.integers(1, 4))
                for k in range(n):  # disjoint lesions in separate 10-px bands
                    r0, c0 = 10 * k + int(rng.integers(0, 5)), int(rng.integers(0, 25))
                    labels[r0:r0 + 4, c0:c0 + 4] = k + 1
                itc = {k + 1 for k in range(n) if rng.random() < 0.2}
                masks[f"s{s}"] = (labels, itc)
                rr, cc = np.nonzero(labels)
                pick = rng.integers(0, rr.size, int(rng.integers(0, 6)))
                xy = np.column_stack([cc[pick] + 0.5, rr[pick] + 0.5])
            else:
                masks[f"s{s}"] = None
                xy = np.zeros((0, 2))
            xy = np.vstack([xy, rng.uniform(0, 30, (int(rng.integers(0, 5)), 2))])
            # ties and zeros on purpose, plus continuous values
            p = np.where(rng.random(len(xy)) < 0.6,
                         rng.choice([0.0, 0.2, 0.5, 0.9], len(xy)), rng.random(len(xy)))
            dets[f"s{s}"] = np.column_stack([xy, p])
        r = froc(dets, masks)
        if r["n_lesions"] == 0:
            assert math.isnan(r["score"])
            continue
        ref_fp, ref_sens = _official_curve(dets, masks)
        np.testing.assert_allclose(r["fps_per_slide"], ref_fp)
        np.testing.assert_allclose(r["sensitivity"], ref_sens)
        assert r["score"] == pytest.approx(_official_style_score(dets, masks), abs=1e-12)
        n_all_found_no_itc += (r["n_detected_lesions"] == r["n_lesions"]
                               and r["n_itc_lesions"] == 0)
        n_zero_only += any(_lesions_hit_only_at_zero(dets.get(sl, np.zeros((0, 3))), m)
                           for sl, m in masks.items() if m is not None)
    # both corners occurred (each changed the score before the fix)
    assert n_all_found_no_itc >= 10 and n_zero_only >= 10
