"""The params loader: one typed schema, YAML 1.2 numbers, unknown keys and wrong types named."""

from pathlib import Path

import pytest

from pipeline.params import Params, ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_loads_and_matches_schema_defaults_for_paper_keys():
    p = load_params(ROOT / "params.yaml")
    assert p.tile.size_px == 256
    assert p.tile.min_tissue == pytest.approx(0.8)
    assert p.label.tumor_min == pytest.approx(0.2)
    assert p.extractor.feature_dim == 16
    assert p.e2e.lr_fe == pytest.approx(1e-9)
    assert p.e2e.lr_seg == pytest.approx(1e-7)


def test_dvc_exp_run_float_text_is_a_float():
    # `dvc exp run -S e2e.lr_fe=1e-9` rewrites params.yaml with exactly this text; PyYAML's
    # safe_load returns the string '1e-09' for it. We must get the float.
    text = "e2e:\n  lr_fe: 1e-09\n  lr_seg: 1e-07\n"
    import yaml  # PyYAML is installed with dvc; shows the trap is real

    assert yaml.safe_load(text)["e2e"]["lr_fe"] == "1e-09"
    p = parse_params(text)
    assert isinstance(p.e2e.lr_fe, float) and p.e2e.lr_fe == 1e-9
    assert isinstance(p.e2e.lr_seg, float) and p.e2e.lr_seg == 1e-7


def test_dvc_exp_run_rewrite_of_whole_file(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("lr_fe: 1.0e-9", "lr_fe: 1e-08")
    assert "lr_fe: 1e-08" in text
    f = tmp_path / "params.yaml"
    f.write_text(text)
    assert load_params(f).e2e.lr_fe == 1e-8


def test_unknown_key_is_named():
    with pytest.raises(ParamsError, match=r"e2e\.lr_fee: unknown key"):
        parse_params("e2e:\n  lr_fee: 1e-9\n")
    with pytest.raises(ParamsError, match=r"tiles: unknown key"):
        parse_params("tiles:\n  size_px: 256\n")


def test_wrong_type_is_named():
    with pytest.raises(ParamsError, match=r"tile\.size_px"):
        parse_params("tile:\n  size_px: big\n")
    with pytest.raises(ParamsError, match=r"extractor\.arch"):
        parse_params("extractor:\n  arch: vgg99\n")
    with pytest.raises(ParamsError, match=r"tile\.min_tissue"):
        parse_params("tile:\n  min_tissue: 1.5\n")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("tile: [unclosed\n")
    with pytest.raises(ParamsError, match=str(bad)):
        load_params(bad)


def test_section_hash_changes_only_with_that_section():
    a = Params()
    b = a.model_copy(update={"e2e": a.e2e.model_copy(update={"lr_fe": 1e-8})})
    assert a.section_hash("tile") == b.section_hash("tile")
    assert a.section_hash("e2e") != b.section_hash("e2e")


def test_runtime_keys_do_not_change_the_output_hash():
    a = Params()
    more_workers = a.model_copy(update={"tile": a.tile.model_copy(update={"workers": 8,
                                                                         "cache_pixels": True})})
    assert a.section_hash("tile", "label") == more_workers.section_hash("tile", "label")
    other_mpp = a.model_copy(update={"tile": a.tile.model_copy(update={"mpp": 0.5})})
    assert a.section_hash("tile") != other_mpp.section_hash("tile")
