"""Compressed-tile reads for device-side JPEG decoding (pipeline/jpegtiles.py).

Everything but the CUDA decode call runs here: byte extraction (tables merged, Aperio's
RGB-coded streams marked), the stitching geometry of patches that straddle TIFF tile borders
or leave the level, batching (a stream shared by several patches decoded once, mixed batches),
and the self-check. With torchvision's CPU decoder the stitched patches equal Slide.read_rgb
bit for bit; on a machine with CUDA the nvJPEG decode is compared with it too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import jpegtiles as jt
from pipeline.slide import Slide
from pipeline.tiff import write_pyramidal_tiff

CPU = torch.device("cpu")


def _blocky_slide(path, side=(900, 1000), tile_px=256) -> Slide:
    rng = np.random.default_rng(0)
    img = np.kron(rng.integers(0, 255, (side[1] // 10, side[0] // 10, 3)),
                  np.ones((10, 10, 1))).astype(np.uint8)
    write_pyramidal_tiff(path, img, 0.5, n_levels=2, tile_px=tile_px)
    return Slide(path)


def _reader(slide: Slide) -> jt.CompressedReader:
    reader = jt.CompressedReader.open(slide.path, slide.vendor, slide.level_dimensions)
    assert reader is not None
    return reader


def _regions(w: int, h: int, rng) -> list[tuple[int, int, int]]:
    fixed = [(0, 0, 256), (256, 256, 256), (100, 77, 300), (w - 50, h - 60, 128),
             (-30, -40, 100), (w + 5, 0, 64)]
    rand = [(int(rng.integers(-50, w)), int(rng.integers(-50, h)), int(rng.integers(16, 400)))
            for _ in range(12)]
    return fixed + rand


@pytest.mark.parametrize("level", [0, 1])
def test_stitched_cpu_decode_equals_slide_reads_bit_for_bit(tmp_path, level):
    slide = _blocky_slide(tmp_path / "s.tif")
    reader = _reader(slide)
    decode = jt.torchvision_decoder(CPU)
    w, h = slide.level_dimensions[level]
    ds = int(slide.level_downsamples[level])
    for x, y, n in _regions(w, h, np.random.default_rng(level)):
        patch = reader.read(level, x, y, n)
        got = jt.assemble([patch], CPU, decode)[0].permute(1, 2, 0).numpy()
        want = slide.read_rgb(x * ds, y * ds, level, n)
        assert np.array_equal(got, want), (level, x, y, n)


def test_real_aperio_rgb_coded_jpeg_equals_slide_reads(cmu_svs):
    """Aperio writes RGB-coded JPEG (photometric RGB): without the Adobe marker a standalone
    decoder would convert YCbCr->RGB and be off by ~50 grey levels."""
    slide = Slide(cmu_svs)
    reader = _reader(slide)
    assert reader.serves(0)
    decode = jt.torchvision_decoder(CPU)
    for x, y, n in [(0, 0, 240), (100, 77, 300), (2170, 2907, 128), (500, 500, 256)]:
        got = jt.assemble([reader.read(0, x, y, n)], CPU, decode)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(got, slide.read_rgb(x, y, 0, n)), (x, y, n)
    # the marker is what makes it right: the same bytes without it decode differently
    patch = reader.read(0, 500, 500, 240)
    key = patch.pieces[0].key
    patch.streams[key] = patch.streams[key].replace(jt.ADOBE_RGB, b"", 1)
    off = jt.assemble([patch], CPU, decode)[0].permute(1, 2, 0).numpy()
    assert np.abs(off.astype(int) - slide.read_rgb(500, 500, 0, 240)).mean() > 10


def test_merge_tables():
    tables = b"\xff\xd8" + b"\xff\xdbQT" + b"\xff\xd9"
    tile = b"\xff\xd8" + b"\xff\xdaSCAN" + b"\xff\xd9"
    assert jt.merge_tables(tables, tile) == b"\xff\xd8\xff\xdbQT\xff\xdaSCAN\xff\xd9"
    assert jt.merge_tables(None, tile) == tile
    marked = jt.merge_tables(tables, tile, rgb=True)
    assert marked.startswith(b"\xff\xd8" + jt.ADOBE_RGB + b"\xff\xdb")
    with pytest.raises(ValueError):
        jt.merge_tables(tables, b"\xff\xdaSCAN")
    with pytest.raises(ValueError):
        jt.merge_tables(b"\xff\xdbQT", tile)


def test_plan_pieces_tile_the_patch_exactly_once():
    rng = np.random.default_rng(1)
    W, H, TW, TH = 1000, 700, 256, 128
    across = -(-W // TW)
    level = rng.integers(0, 255, (H, W), dtype=np.int32)
    for _ in range(200):
        x, y, n = int(rng.integers(-300, W + 50)), int(rng.integers(-300, H + 50)), \
            int(rng.integers(1, 600))
        out = np.full((n, n), -1, np.int32)
        for p in jt.plan_pieces(3, W, H, TW, TH, across, x, y, n):
            assert p.key[0] == 3
            ty, tx = divmod(p.key[1], across)
            tile = level[ty * TH:(ty + 1) * TH, tx * TW:(tx + 1) * TW]
            region = out[p.dst_y:p.dst_y + p.y1 - p.y0, p.dst_x:p.dst_x + p.x1 - p.x0]
            assert (region == -1).all(), "two pieces write the same pixel"
            region[...] = tile[p.y0:p.y1, p.x0:p.x1]
        want = np.full((n, n), -1, np.int32)
        ya, xa = max(y, 0), max(x, 0)
        yb, xb = min(y + n, H), min(x + n, W)
        if ya < yb and xa < xb:
            want[ya - y:yb - y, xa - x:xb - x] = level[ya:yb, xa:xb]
        assert np.array_equal(out, want), (x, y, n)


def test_a_stream_shared_by_patches_is_decoded_once_and_batches_may_mix(tmp_path):
    slide = _blocky_slide(tmp_path / "s.tif", tile_px=512)
    reader = _reader(slide)
    calls: list[int] = []
    cpu = jt.torchvision_decoder(CPU)

    def counting(streams):
        calls.append(len(streams))
        return cpu(streams)

    patches = [reader.read(0, x, y, 256) for x, y in [(0, 0), (256, 0), (0, 256), (256, 256)]]
    host = slide.read_rgb(600, 0, 0, 256)
    batch = jt.assemble([*patches, host], CPU, counting)
    assert calls == [1]  # four 256-px patches inside one 512-px TIFF tile: one decode
    assert torch.equal(batch[4].permute(1, 2, 0), torch.from_numpy(host))
    for b, (x, y) in enumerate([(0, 0), (256, 0), (0, 256), (256, 256)]):
        assert np.array_equal(batch[b].permute(1, 2, 0).numpy(), slide.read_rgb(x, y, 0, 256))
    with pytest.raises(ValueError, match="mixes patch sizes"):
        jt.assemble([patches[0], reader.read(0, 0, 0, 128)], CPU, cpu)


def test_missing_or_damaged_tiles_go_to_the_host(tmp_path):
    slide = _blocky_slide(tmp_path / "s.tif")
    reader = _reader(slide)
    lv = reader._levels.levels[0]
    lv.bytecounts = lv.bytecounts.copy()
    lv.bytecounts[0] = 0
    assert reader.read(0, 0, 0, 64) is None
    assert reader.read(0, 300, 0, 64) is not None
    lv.bytecounts[1] -= 1  # cut short: no end-of-image marker
    assert reader.read(0, 300, 0, 64) is None


def test_self_check_rejects_a_decoder_that_disagrees(tmp_path):
    slide = _blocky_slide(tmp_path / "s.tif")
    reader = _reader(slide)
    cpu = jt.torchvision_decoder(CPU)

    def shifted(by: int):
        return lambda streams: [(d.int() + by).clamp(0, 255).to(torch.uint8) for d in cpu(streams)]

    patch = reader.read(0, 100, 100, 200)
    patch.reference = slide.read_rgb(100, 100, 0, 200)
    jt.assemble([patch], CPU, shifted(1))  # within tolerance
    with pytest.raises(jt.DecodeMismatchError, match="s.tif.*extractor.decode: cpu"):
        jt.assemble([patch], CPU, shifted(40))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_decode_is_close_to_libjpeg_turbo(tmp_path):  # pragma: no cover - GPU only
    slide = _blocky_slide(tmp_path / "s.tif")
    reader = _reader(slide)
    dev = torch.device("cuda")
    patches = [reader.read(0, x, y, 224) for x, y in [(0, 0), (100, 77), (600, 700)]]
    got = jt.assemble(patches, dev, jt.torchvision_decoder(dev)).cpu()
    want = jt.assemble(patches, CPU, jt.torchvision_decoder(CPU))
    assert (got.int() - want.int()).abs().float().mean() <= jt.DEVICE_MEAN_ABS_TOLERANCE


def test_extraction_with_device_decode_equals_cpu_decode_on_cpu(
    tmp_path, write_manifest, synthetic_slide_factory
):
    """The whole extract-features path with decode=device (compressed tiles, CPU libjpeg-turbo
    in the main process) gives the cpu path's features bit for bit, and really serves tiles."""
    from pipeline.extraction import infer_slides, slides_loader
    from pipeline.models import build_extractor
    from pipeline.params import Params
    from pipeline.paths import Paths
    from pipeline.stages import label, tile
    from tests.conftest import make_params

    slide = synthetic_slide_factory()
    raw = make_params(write_manifest([("s1", slide.path)]), size_px=128, mpp=0.5, mask_mpp=8.0,
                      min_object_um2=2000.0, max_hole_um2=1000.0, workers=1
                      ).model_dump(mode="json")
    params = Params.model_validate(raw)
    paths = Paths(root=tmp_path)
    tile.run(params, paths)
    label.run(params, paths)
    tf = paths.tile_file("s1")
    patches = next(iter(slides_loader([tf], 112, 0, batch_size=8, decode="device"))).x
    assert sum(isinstance(p, jt.CompressedPatch) for p in patches) == 8
    torch.manual_seed(0)
    model = build_extractor("small_cnn", 16)
    (_, f_cpu, p_cpu), = infer_slides(model, [tf], 112, CPU, 0)
    (_, f_dev, p_dev), = infer_slides(model, [tf], 112, CPU, 0, decode="device")
    assert np.array_equal(f_cpu, f_dev) and np.array_equal(p_cpu, p_dev) and len(f_cpu) > 8
