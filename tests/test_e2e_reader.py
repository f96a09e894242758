"""e2e-finetune's ChunkReader (one DataLoader, persistent workers, a request per pass) gives
exactly the chunks of a fresh per-pass DataLoader (`loader_chunks`), pass after pass, also
when a pass is abandoned half-way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import DataError
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.stages import label, tile
from pipeline.stages.e2e_finetune import ChunkReader, loader_chunks
from pipeline.tileindex import read_tile_index
from tests.conftest import make_params, make_synthetic_slide

SYNTH = dict(size_px=128, mpp=0.5, mask_mpp=8.0, min_object_um2=2000.0, max_hole_um2=1000.0,
             workers=1)


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_reader")
    # same layout, different sensor noise: a chunk read from the wrong slide differs
    a = make_synthetic_slide(root / "a.tiff", seed=0)
    b = make_synthetic_slide(root / "b.tiff", seed=1)
    manifest = root / "manifest.csv"
    manifest.write_text("slide_id,slide_path,annotation_path,split\n"
                        f"a,{a.path},,train\nb,{b.path},,train\n")
    params = Params.model_validate(make_params(manifest, **SYNTH).model_dump(mode="json"))
    paths = Paths(root)
    tile.run(params, paths)
    label.run(params, paths)
    return [paths.tile_file("a"), paths.tile_file("b")]


def _all(source, indices):
    return [(idx.copy(), px.clone()) for idx, px in source(indices)]


def _assert_same(got, want):
    assert len(got) == len(want) > 0
    for (gi, gp), (wi, wp) in zip(got, want, strict=True):
        assert np.array_equal(gi, wi) and torch.equal(gp, wp)


@pytest.mark.parametrize("workers", [0, 2])
def test_requests_give_the_per_pass_loader_chunks(two_slides, workers):
    chunk = 3
    reader = ChunkReader(two_slides, chunk, workers, [None, None])
    try:
        rng = np.random.default_rng(0)
        for k, tf in [(0, two_slides[0]), (1, two_slides[1]), (0, two_slides[0])]:
            n_tiles = read_tile_index(tf).n
            pass1 = np.arange(n_tiles, dtype=np.int64)
            pass2 = np.sort(rng.choice(n_tiles, size=n_tiles // 2, replace=False))
            for request in (pass1, pass2):
                _assert_same(_all(reader.source(k), request),
                             _all(loader_chunks(tf, chunk, 0, None), request))
        # a pass abandoned after one chunk does not leak its prefetched chunks into the next
        it = reader.source(1)(np.arange(read_tile_index(two_slides[1]).n, dtype=np.int64))
        next(it)
        it.close()
        request = np.arange(2, read_tile_index(two_slides[0]).n - 1, dtype=np.int64)
        _assert_same(_all(reader.source(0), request),
                     _all(loader_chunks(two_slides[0], chunk, 0, None), request))
    finally:
        reader.close()
    with pytest.raises(RuntimeError, match="after close"):
        next(iter(reader.source(0)(np.arange(3))))


def test_a_row_outside_the_slide_is_an_error_not_the_next_slides_tile(two_slides):
    reader = ChunkReader(two_slides, 3, 0, [None, None])
    n_a = read_tile_index(two_slides[0]).n
    with pytest.raises(DataError, match=f"tile index {n_a} out of range"):
        next(iter(reader.source(0)(np.array([0, n_a]))))
