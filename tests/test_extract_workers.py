"""Extraction loader workers: each slide is assigned to one DataLoader worker (a contiguous run
of the batch plan per worker), so a worker opens each of its slides once and no slide is opened
by every worker; the features (and the feature files, byte for byte) are those of workers=0.

Opens are counted with the handle-open log (pipeline.data.OPEN_LOG_ENV), which the forked
workers inherit through the environment."""

from __future__ import annotations

import itertools
import os
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline import extraction
from pipeline.data import OPEN_LOG_ENV, read_open_log
from pipeline.models import build_extractor, save_checkpoint
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.stages import extract_features, label, tile
from tests.conftest import make_params

SYNTH = dict(size_px=128, mpp=0.5, mask_mpp=8.0, min_object_um2=2000.0, max_hole_um2=1000.0,
             workers=1)
CROP = 112
BATCH = 4  # several batches per slide, so the old round-robin dealing touched every slide


@pytest.mark.parametrize("sizes,batch,workers", [
    ([5, 0, 9, 3], 4, 3), ([10], 4, 2), ([1, 1, 1], 4, 5), ([8, 8, 8, 8], 4, 2), ([], 4, 2),
    ([7, 12, 2, 30, 0, 5], 3, 4),
])
def test_worker_runs_cut_the_plan_into_contiguous_even_pieces(sizes, batch, workers):
    plan = list(extraction.plan_batches(sizes, batch))
    assert len(plan) == extraction.n_batches(sizes, batch)
    # one slide's batches, cut at its end: the batches of one DataLoader per slide
    for k, n in enumerate(sizes):
        assert [(a, b) for kk, a, b in plan if kk == k] == [
            (a, min(a + batch, n)) for a in range(0, n, batch)]
    runs = [list(extraction.worker_batches(sizes, batch, w, workers)) for w in range(workers)]
    assert list(itertools.chain(*runs)) == plan  # every batch once, in plan order
    lengths = [len(r) for r in runs]
    assert max(lengths) - min(lengths) <= 1
    owners = Counter(k for r in runs for k in {kk for kk, _, _ in r})
    assert sum(n - 1 for n in owners.values()) <= workers - 1  # shared only at the cuts


@pytest.fixture(scope="module")
def four_slides(tmp_path_factory, synthetic_slide_factory) -> tuple[Params, Paths]:
    """Four manifest slides (copies of one synthetic slide: distinct files to open; a symlink
    would resolve to the same file and handle), tiled, labelled, a random small_cnn."""
    root = tmp_path_factory.mktemp("workers")
    src = synthetic_slide_factory().path
    rows = []
    for k in range(4):
        link = root / f"s{k}.tiff"
        shutil.copyfile(src, link)
        rows.append(f"s{k},{link},,train")
    manifest = root / "manifest.csv"
    manifest.write_text("slide_id,slide_path,annotation_path,split\n" + "\n".join(rows) + "\n")
    raw = make_params(manifest, **SYNTH).model_dump(mode="json")
    raw["extractor"].update(crop_px=CROP, workers=0)
    params = Params.model_validate(raw)
    paths = Paths(root=root)
    tile.run(params, paths)
    label.run(params, paths)
    torch.manual_seed(0)
    save_checkpoint(paths.models / "extractor.pt", build_extractor("small_cnn", 16),
                    {"params_json": params.section_json("seed", "extractor", "tile")})
    return params, paths


def _opens(log_file: Path, slide_files: list[Path]) -> dict[str, Counter]:
    """slide file name -> Counter(pid -> handle opens of that slide by the process)."""
    out: dict[str, Counter] = {f.name: Counter() for f in slide_files}
    for pid, key in read_open_log(log_file):
        parts = key.split("|")  # [jpeg|]path|inode|mtime|size
        path = parts[1] if parts[0] == "jpeg" else parts[0]
        out[Path(path).name][pid] += 1
    return out


@pytest.mark.parametrize("n_slides", [4, 3])
@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_each_slide_is_opened_by_one_worker_once(four_slides, tmp_path, monkeypatch, n_slides,
                                                 decode):
    """workers=2: with 4 equal slides the two runs are slides 0-1 and 2-3, each opened by its
    one worker once (the old loader dealt batches in turn, so both workers opened every slide);
    with 3 the cut falls inside slide 1, the only slide two workers open. decode="device" opens
    a compressed-tile reader per slide and the slide itself (its self-check), in that worker."""
    params, paths = four_slides
    sids = [f"s{k}" for k in range(n_slides)]
    files = [paths.tile_file(s) for s in sids]
    log_file = tmp_path / "opens.tsv"
    monkeypatch.setenv(OPEN_LOG_ENV, str(log_file))
    loader = extraction.slides_loader(files, CROP, workers=2, batch_size=BATCH, decode=decode)
    sizes = loader.dataset.sizes
    assert min(sizes) > BATCH  # each slide spans batches
    seen = Counter()
    for batch in loader:
        seen[batch.slide] += len(batch.rows)
    assert [seen[k] for k in range(n_slides)] == sizes
    opens = _opens(log_file, [Path(f"s{k}.tiff") for k in range(n_slides)])
    per_open = 2 if decode == "device" else 1  # handles per slide and process
    assert os.getpid() not in {p for c in opens.values() for p in c}  # the workers open
    assert all(n == per_open for c in opens.values() for n in c.values()), opens
    owners = [len(opens[f"s{k}.tiff"]) for k in range(n_slides)]
    assert owners == ([1, 1, 1, 1] if n_slides == 4 else [1, 2, 1]), opens
    assert len({p for c in opens.values() for p in c}) == 2  # both workers did work


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_workers_2_writes_the_feature_files_of_workers_0_byte_for_byte(
    four_slides, monkeypatch, decode
):
    params, paths = four_slides
    monkeypatch.setattr(extraction, "BATCH_SIZE", BATCH)  # runs cut inside slides too

    def run(workers: int) -> dict[str, bytes]:
        raw = params.model_dump(mode="json")
        raw["extractor"].update(workers=workers, decode=decode)
        for k in range(4):
            paths.feature_file(f"s{k}").unlink(missing_ok=True)
        summary = extract_features.run(Params.model_validate(raw), paths)
        assert summary["n_extracted"] == 4
        return {f"s{k}": paths.feature_file(f"s{k}").read_bytes() for k in range(4)}

    one = run(0)
    assert run(2) == one
    assert len(set(one.values())) == 4  # per-slide files (slide ids differ), not one copied


def test_compiled_extraction_compiles_one_batch_shape_and_gives_the_same_features(
    four_slides, monkeypatch
):
    """extractor.compile: the stage's forward goes through torch.compile, every batch padded
    to one shape, so one graph serves all slides (their last batches are partial); the
    features are the uncompiled ones (up to float rounding) and the files say "-compile".
    torch.compile's tracing is real; the backend records the graphs and runs them eagerly
    (inductor's C++ compile takes ~40 s on this CPU; its speed is for benchmarks/gpu_suite.sh)."""
    params, paths = four_slides
    graphs: list[list[tuple[int, ...]]] = []

    def recording(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    monkeypatch.setattr(extraction, "COMPILE_BACKEND", recording)
    monkeypatch.setattr(extraction, "BATCH_SIZE", BATCH)

    def run(compiled: bool) -> dict[str, tuple]:
        raw = params.model_dump(mode="json")
        raw["extractor"].update(workers=0, compile=compiled)
        for k in range(4):
            paths.feature_file(f"s{k}").unlink(missing_ok=True)
        extract_features.run(Params.model_validate(raw), paths)
        out = {}
        for k in range(4):
            with h5py.File(paths.feature_file(f"s{k}"), "r") as f:
                out[f"s{k}"] = (f["features"][...], f["tumor_prob"][...],
                                str(f.attrs["params_hash"]))
        return out

    torch._dynamo.reset()
    try:
        plain = run(False)
        assert not graphs
        comp = run(True)
    finally:
        torch._dynamo.reset()
    n = len(plain["s0"][0])
    assert n % BATCH != 0  # every slide ends in a partial batch
    assert len(graphs) == 1 and (BATCH, 3, CROP, CROP) in graphs[0], graphs
    for sid, (feats, probs, phash) in comp.items():
        np.testing.assert_allclose(feats, plain[sid][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probs, plain[sid][1], rtol=1e-5, atol=1e-6)
        assert phash == plain[sid][2] + "-compile"
