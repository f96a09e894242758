"""Stage `demo-data`: a small synthetic CAMELYON17-style data set, so the pipeline runs end to
end without downloading anything.

Layout written under data/demo/:
  slides/patient_XXX_node_Y.tiff        pyramidal JPEG TIFF, mpp in the resolution tags
  annotations/patient_XXX_node_Y.xml    ASAP XML (tumor: group _0, exclusions: _2); tumor
                                        slides only, negative slides get no file
  manifest.csv                          slide_id, slide_path, annotation_path, patient_id,
                                        split, slide_label (paths relative to the CSV)
  stages.csv                            CAMELYON17-style reference: patient_XXX.zip,<pN stage>
                                        rows, then <slide file>,<slide class> rows

Patients are split train/val/test in patient order (`demo.split_patients`). The first patient of
each split gets a pN1 set of nodes holding every slide class (macro, micro, itc, negative), so
every split has tumor and normal tissue and test has a macro and a negative slide; the other
patients cycle through pN2, pN0, pN1mi, pN0(i+). Each slide is seeded on its own
(SeedSequence(demo.seed, spawn_key=(patient, node))), so a slide does not depend on how many
others are made or in what order.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from pipeline.errors import PipelineError
from pipeline.io import write_text_atomic
from pipeline.log import get_logger, progress
from pipeline.manifest import SLIDE_LABELS, SPLITS, load_manifest
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.synth import SlideSpec, plan_slide, slide_label, write_slide

log = get_logger("pipeline.demo_data")

SLIDE_DIR = "slides"
ANNOTATION_DIR = "annotations"
MANIFEST_NAME = "manifest.csv"
STAGES_NAME = "stages.csv"
MANIFEST_COLUMNS = ("slide_id", "slide_path", "annotation_path", "patient_id", "split",
                    "slide_label")

# Node classes per patient (CAMELYON17: 5 nodes). ANCHOR (pN1) holds every slide class.
ANCHOR_TEMPLATE = ("macro", "negative", "micro", "itc", "negative")
CYCLE_TEMPLATES = (
    ("macro", "micro", "macro", "micro", "negative"),  # pN2: 4 positive nodes, one macro
    ("negative",) * 5,  # pN0
    ("micro", "negative", "negative", "itc", "negative"),  # pN1mi
    ("itc", "negative", "negative", "itc", "negative"),  # pN0(i+)
)


class DemoDataError(PipelineError):
    """The demo params are inconsistent; the message names the key."""


def pn_stage(labels: list[str]) -> str:
    """CAMELYON17 patient stage from its nodes' slide classes (ITC-only nodes are not
    positive): pN0, pN0(i+), pN1mi, pN1 (1-3 positive nodes, >= 1 macro), pN2 (>= 4)."""
    n_pos = sum(lab in ("micro", "macro") for lab in labels)
    if "macro" in labels:
        return "pN1" if n_pos <= 3 else "pN2"
    if "micro" in labels:
        return "pN1mi"
    return "pN0(i+)" if "itc" in labels else "pN0"


def patient_splits(n_patients: int, split_patients: tuple[int, int, int]) -> list[str]:
    """Split of each patient, in patient order."""
    if sum(split_patients) != n_patients:
        raise DemoDataError(
            f"demo.split_patients {list(split_patients)} sums to {sum(split_patients)}, "
            f"but demo.n_patients is {n_patients}"
        )
    return [s for s, n in zip(SPLITS, split_patients, strict=True) for _ in range(n)]


def target_labels(seed: int, n_patients: int, slides_per_patient: int,
                  splits: list[str]) -> list[list[str]]:
    """Wanted slide class per patient and node (node order shuffled per patient)."""
    out, n_cycle = [], 0
    for p in range(n_patients):
        anchor = p == 0 or splits[p] != splits[p - 1]
        if anchor:
            tmpl = ANCHOR_TEMPLATE
        else:
            tmpl = CYCLE_TEMPLATES[n_cycle % len(CYCLE_TEMPLATES)]
            n_cycle += 1
        labels = (list(tmpl) + ["negative"] * slides_per_patient)[:slides_per_patient]
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, p)))
        # truncate before shuffling, so a 2-node anchor still has a macro and a negative slide
        out.append([labels[i] for i in rng.permutation(len(labels))])
    return out


def slide_id(patient: int, node: int) -> str:
    return f"patient_{patient:03d}_node_{node}"


def plan_demo(params: Params) -> list[tuple[str, int, str, SlideSpec]]:
    """(slide_id, patient, split, spec) of every demo slide; cheap (geometry only)."""
    d = params.demo
    splits = patient_splits(d.n_patients, d.split_patients)
    labels = target_labels(d.seed, d.n_patients, d.slides_per_patient, splits)
    plans = []
    for p in range(d.n_patients):
        for n in range(d.slides_per_patient):
            rng = np.random.default_rng(np.random.SeedSequence(d.seed, spawn_key=(2, p, n)))
            spec = plan_slide(labels[p][n], d.slide_mm * 1000.0, d.mpp, rng)
            plans.append((slide_id(p, n), p, splits[p], spec))
    return plans


def _remove_stale(folder: Path, suffix: str, keep: set[str]) -> list[Path]:
    """Delete `*suffix` files not named in `keep`, and temp files left by a killed run."""
    removed = []
    if not folder.is_dir():
        return removed
    for f in sorted(folder.iterdir()):
        stale = f.suffix == suffix and f.name not in keep
        leftover = f.name.startswith(".") and f.name.endswith(".tmp")
        if f.is_file() and (stale or leftover):
            f.unlink()
            removed.append(f)
    return removed


def run(params: Params, paths: Paths) -> dict:
    """Generate the demo slides, annotations, manifest and stage reference; returns a summary."""
    t0 = time.perf_counter()
    d = params.demo
    out = paths.demo
    plans = plan_demo(params)
    log.info("demo-data: %d patients x %d slides, %.1f mm at %.2f um/px (%d px square), seed %d",
             d.n_patients, d.slides_per_patient, d.slide_mm, d.mpp, plans[0][3].width_px, d.seed)
    rows, slide_files, xml_files = [], set(), set()
    for sid, patient, split, spec in progress(plans, desc="demo-data", unit="slide"):
        label = slide_label(spec.tumor, spec.mpp)
        slide_rel = f"{SLIDE_DIR}/{sid}.tiff"
        ann_rel = f"{ANNOTATION_DIR}/{sid}.xml" if spec.tumor else ""
        write_slide(spec, out / slide_rel, out / ann_rel if ann_rel else None, d.jpeg_quality)
        slide_files.add(f"{sid}.tiff")
        if ann_rel:
            xml_files.add(f"{sid}.xml")
        rows.append({"slide_id": sid, "slide_path": slide_rel, "annotation_path": ann_rel,
                     "patient_id": f"patient_{patient:03d}", "split": split, "slide_label": label})
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    manifest = out / MANIFEST_NAME
    write_text_atomic(manifest, df.to_csv(index=False, lineterminator="\n"))

    stage_rows = ["patient,stage"]
    for pid, g in df.groupby("patient_id", sort=True):
        stage_rows.append(f"{pid}.zip,{pn_stage(g['slide_label'].tolist())}")
    stage_rows += [f"{Path(r.slide_path).name},{r.slide_label}" for r in df.itertuples()]
    write_text_atomic(out / STAGES_NAME, "\n".join(stage_rows) + "\n")

    removed = _remove_stale(out / SLIDE_DIR, ".tiff", slide_files)
    removed += _remove_stale(out / ANNOTATION_DIR, ".xml", xml_files)
    load_manifest(manifest)  # self-check: what we wrote must validate
    seconds = time.perf_counter() - t0

    counts = {lab: int((df["slide_label"] == lab).sum()) for lab in SLIDE_LABELS}
    per_split = {s: df.loc[df["split"] == s, "slide_label"].value_counts().to_dict()
                 for s in SPLITS}
    log.info("wrote %d slides to %s, %d annotations to %s, %s; labels %s; %d stale files "
             "removed; %.1f s", len(df), out / SLIDE_DIR, len(xml_files), out / ANNOTATION_DIR,
             manifest, counts, len(removed), seconds)
    return {
        "n_slides": len(df),
        "n_annotations": len(xml_files),
        "slide_labels": counts,
        "splits": per_split,
        "manifest": str(manifest),
        "stages": str(out / STAGES_NAME),
        "removed": [str(p) for p in removed],
        "seconds": round(seconds, 2),
    }


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params",
                                     help="params YAML; its `demo` section is used"),
) -> None:
    """Generate synthetic CAMELYON-style demo slides.

    Reads the `demo` section of params.yaml. Writes data/demo/slides/<slide_id>.tiff (pyramidal
    JPEG TIFF), data/demo/annotations/<slide_id>.xml (ASAP XML, tumor slides only),
    data/demo/manifest.csv and data/demo/stages.csv (CAMELYON17-style pN stages); removes
    stale slides and annotations not in the new manifest.
    """
    run(load_params(params_file), Paths())
