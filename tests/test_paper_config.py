"""configs/paper_camelyon16.yaml: valid through the params schema, a complete replacement for
params.yaml (DVC's `params:` lists name keys that must exist in the file), and holding the
values the paper states for CAMELYON16."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.params import _yaml, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "paper_camelyon16.yaml"


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def test_paper_config_is_complete_and_valid_over_params_yaml():
    base = _yaml().load((ROOT / "params.yaml").read_text())
    paper = _yaml().load(CONFIG.read_text())
    missing = sorted(_keys(base) - _keys(paper))
    assert not missing, (f"{CONFIG.name} lacks keys params.yaml has: {', '.join(missing)}; add "
                         "each with the paper's value or the params.yaml default and a comment")
    extra = sorted(_keys(paper) - _keys(base))
    assert not extra, f"{CONFIG.name} has keys params.yaml lacks: {', '.join(extra)}"
    p = load_params(CONFIG)
    assert parse_params(_dump(_merge(base, paper))) == p  # over params.yaml = the file alone


def _dump(d: dict) -> str:
    import io

    buf = io.StringIO()
    _yaml().dump(d, buf)
    return buf.getvalue()


def test_paper_config_holds_the_papers_camelyon_values():
    p = load_params(CONFIG)
    x, u, e = p.extractor, p.unet, p.e2e
    assert (x.arch, x.pretrained, x.feature_dim, x.crop_px) == ("googlenet", "imagenet", 16, 224)
    assert (x.epochs, x.batch_size, x.balance) == (30, 128, True)
    assert x.lr == pytest.approx(1e-4)
    assert (u.epochs, u.batch_size) == (50, 32) and u.lr == pytest.approx(1e-4)
    assert p.featuremap.size == 512 and p.featuremap.mode == "centered"
    assert not p.featuremap.per_lump
    assert p.featuremap.size % 2**u.depth == 0  # the U-Net can take the canvas
    assert (e.lr_fe, e.lr_seg, e.epochs) == (pytest.approx(1e-9), pytest.approx(1e-7), 5)
    assert e.backprop_fraction == 1.0
    assert (p.tile.size_px, p.tile.min_tissue, p.tile.mpp) == (256, 0.8, 0.25)
    assert (p.label.tumor_min, p.label.normal_min) == (0.2, 0.8)
    assert p.evaluate.threshold == 0.5


def test_every_paper_config_key_is_commented():
    # a value without a comment is a choice nobody explained (the demo generator's keys, unused
    # here, are explained by the section comment)
    section = ""
    for n, line in enumerate(CONFIG.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(("#", "- ")):
            continue
        if not line.startswith(" "):
            section = line.split(":")[0]
        if line.rstrip().endswith(":") and not line.startswith(" "):
            continue  # a section header
        if section != "demo":
            assert "#" in line, f"{CONFIG.name}:{n}: {line.strip()!r} has no comment"
