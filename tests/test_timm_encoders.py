"""timm encoders as the patch extractor (issue 14): built from params, weights from a local file
(.bin via torch.save, .safetensors) or hf-hub (faked: no download in tests), the encoder's own
preprocessing recorded in the checkpoint, native feature width, training modes.

Small timm architectures with random init stand in for the foundation models (UNI is a
vit_large_patch16_224 with other kwargs; the loading path is the same).
"""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.augment import Preprocess, eval_transform, normalize_only
from pipeline.encoders import encoder_blocks, fetch_weights
from pipeline.errors import PipelineError
from pipeline.models import (
    ChannelAffine,
    ModelError,
    build_extractor,
    load_extractor,
    save_checkpoint,
)
from pipeline.params import Params
from pipeline.stages import train_frozen

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIT = "timm:vit_tiny_patch16_224"
KW = {"img_size": 32}  # 2 x 2 patches: fast on CPU, and exercises a params-set input size


def _reference(name: str = "vit_tiny_patch16_224", seed: int = 3, **kw) -> torch.nn.Module:
    """A timm model as a published checkpoint holds it: random weights, its 1000-class head."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kw).eval()


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_vit_weights_from_a_local_file_load_exactly(tmp_path, suffix):
    ref = _reference(**KW)
    path = tmp_path / f"pytorch_model{suffix}"
    state = ref.state_dict()
    torch.save(state, path) if suffix == ".bin" else save_file(state, str(path))
    m = build_extractor(VIT, 16, str(path), timm_kwargs=KW).eval()
    assert m.backbone_dim == 192 and m.feature.in_features == 192
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the encoder is the reference minus its classifier: pooled tokens
        torch.testing.assert_close(m.backbone(x), ref.forward_head(ref.forward_features(x),
                                                                   pre_logits=True))
    # the same file through the pipeline's tracked copy (fetch-weights -> models/pretrained)
    out = tmp_path / "pretrained"
    fetch_weights(VIT, str(path), out)
    m2 = build_extractor(VIT, 16, str(path), timm_kwargs=KW, weights_dir=out)
    assert all(torch.equal(a, b) for a, b in zip(m.backbone.state_dict().values(),
                                                 m2.backbone.state_dict().values(), strict=True))



def test_a_224_px_checkpoint_loads_into_a_smaller_input_size(tmp_path):
    """The README's CPU run: a published 224-px ViT file (14 x 14 position embeddings) under
    timm_kwargs img_size=32 (2 x 2) loads through timm's checkpoint filter, which resamples
    the grid embeddings; the class token's embedding and every block are the file's."""
    from timm.layers import resample_abs_pos_embed

    ref = _reference()  # the file as published: img_size 224, 1000-class head
    path = tmp_path / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    m = build_extractor(VIT, 16, str(path), timm_kwargs=KW).eval()
    pos = m.backbone.pos_embed
    assert tuple(pos.shape) == (1, 1 + 2 * 2, 192) and tuple(ref.pos_embed.shape) == (1, 197, 192)
    assert torch.equal(pos[:, :1], ref.pos_embed[:, :1])
    want = resample_abs_pos_embed(ref.pos_embed, new_size=(2, 2), num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=True)
    torch.testing.assert_close(pos, want)
    assert torch.equal(m.backbone.blocks[5].attn.qkv.weight, ref.blocks[5].attn.qkv.weight)
    assert torch.equal(m.backbone.patch_embed.proj.weight, ref.patch_embed.proj.weight)
    assert m.preprocess.input_px == 32
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 2)

def test_convnext_safetensors_and_preprocessing_from_timm_config(tmp_path):
    ref = _reference("convnext_atto")
    path = tmp_path / "model.safetensors"
    save_file(ref.state_dict(), str(path))
    m = build_extractor("timm:convnext_atto", 8, str(path))
    assert torch.equal(m.backbone.stages[3].blocks[1].conv_dw.weight,
                       ref.stages[3].blocks[1].conv_dw.weight)
    cfg = timm.data.resolve_model_data_config(ref)
    assert m.preprocess.mean == pytest.approx(cfg["mean"])
    assert m.preprocess.std == pytest.approx(cfg["std"])
    assert m.preprocess.input_px == cfg["input_size"][-1]
    assert m.preprocess.interpolation == cfg["interpolation"]


def test_preprocessing_overlay_and_input_size_come_from_the_kwargs():
    """UNI-style weights need ImageNet mean/std on an arch whose default tag says otherwise:
    timm's pretrained_cfg_overlay; img_size sets the input tiles are resized to."""
    mean, std = [0.707223, 0.578729, 0.703617], [0.211883, 0.230117, 0.177517]
    m = build_extractor(VIT, 16, timm_kwargs={**KW, "pretrained_cfg_overlay": {
        "mean": mean, "std": std}})
    assert m.preprocess == Preprocess(mean=tuple(mean), std=tuple(std), input_px=32,
                                      interpolation="bicubic", source=m.preprocess.source)
    # tiles: centre crop to crop_px, then resized to the encoder's input, normalised with ITS stats
    x = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    y = eval_transform(40, m.preprocess)(x)
    assert y.shape == (3, 32, 32)
    flat = torch.full((1, 3, 40, 40), 255, dtype=torch.uint8)  # white: (1 - mean) / std
    got = normalize_only(m.preprocess)(flat)[0, :, 0, 0]
    torch.testing.assert_close(got, (1 - torch.tensor(mean)) / torch.tensor(std))


def test_checkpoint_records_encoder_and_preprocessing_and_rebuilds_it(tmp_path):
    kw = {**KW, "pretrained_cfg_overlay": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}
    m = build_extractor(VIT, "native", timm_kwargs=kw)
    m.set_trainable_blocks(2)
    path = tmp_path / "extractor.pt"
    save_checkpoint(path, m, {"params_json": "{}"})
    m2, meta = load_extractor(path)
    enc = meta["encoder"]
    assert meta["arch"] == VIT and meta["feature_dim"] == 192 and enc["feature_head"] == "native"
    assert enc["timm_kwargs"] == kw and enc["trainable_blocks"] == 2
    assert enc["preprocess"]["mean"] == [0.1, 0.2, 0.3] and enc["preprocess"]["input_px"] == 32
    assert m2.preprocess == m.preprocess and m2.native and m2.trainable_blocks == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.eval().features(x), m2.eval().features(x))


def test_old_checkpoints_without_encoder_meta_get_imagenet_preprocessing(tmp_path):
    m = build_extractor("small_cnn", 4)
    path = tmp_path / "old.pt"
    save_checkpoint(path, m)
    obj = torch.load(path, weights_only=True)
    del obj["meta"]["encoder"]  # as written before timm encoders
    torch.save(obj, path)
    m2, _ = load_extractor(path)
    assert m2.preprocess == Preprocess() and not m2.native and m2.trainable_blocks is None


def test_native_feature_width_goes_to_the_unet_and_standardisation_folds_into_it():
    m = build_extractor(VIT, "native", timm_kwargs=KW).eval()
    assert m.feature_dim == 192 and isinstance(m.feature, ChannelAffine)
    assert m.head.in_features == 192
    x = torch.randn(5, 3, 32, 32)
    mean, std = torch.randn(192), torch.rand(192) + 0.5
    with torch.no_grad():
        raw = m.features(x)
        torch.testing.assert_close(raw, m.backbone(x))  # identity until standardised
        train_frozen.fold_standardization(m, mean, std)
        torch.testing.assert_close(m.features(x), (raw - mean) / std, rtol=1e-5, atol=1e-5)


def test_trainable_blocks_frozen_last_k_and_full():
    m = build_extractor(VIT, 16, timm_kwargs={**KW, "drop_path_rate": 0.1})
    blocks = encoder_blocks(m.backbone)
    assert len(blocks) == 12
    m.set_trainable_blocks(0)  # frozen encoder: only the two Linears train
    assert {n.split(".")[0] for n, q in m.named_parameters() if q.requires_grad} == {
        "feature", "head"}
    m.train()
    assert not any(mod.training for mod in m.backbone.modules()) and m.head.training
    m.set_trainable_blocks(2)  # last two blocks and the final norm
    names = {n for n, q in m.named_parameters() if q.requires_grad}
    assert "backbone.blocks.11.attn.qkv.weight" in names and "backbone.norm.weight" in names
    assert "backbone.blocks.9.attn.qkv.weight" not in names
    assert not {"backbone.cls_token", "backbone.pos_embed",
                "backbone.patch_embed.proj.weight"} & names
    m.train()
    assert blocks[11].drop_path1.training and not blocks[9].drop_path1.training
    # one step moves only what trains
    before = {n: q.detach().clone() for n, q in m.named_parameters()}
    opt = torch.optim.Adam([q for q in m.parameters() if q.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1] * 2))
    loss.backward()
    opt.step()
    for n, q in m.named_parameters():
        assert (not torch.equal(q, before[n])) == (n in names or n.startswith(
            ("feature.", "head."))), n
    m.set_trainable_blocks("all")
    assert all(q.requires_grad for q in m.parameters())
    with pytest.raises(ModelError, match="only 12 blocks"):
        m.set_trainable_blocks(13)


def test_missing_file_names_the_model_and_where_weights_go(tmp_path):
    with pytest.raises(PipelineError) as err:
        build_extractor(VIT, 16, str(tmp_path / "uni" / "pytorch_model.bin"), timm_kwargs=KW)
    msg = str(err.value)
    assert str(tmp_path / "uni" / "pytorch_model.bin") in msg and VIT in msg
    assert "\n" not in msg


def test_wrong_weights_file_is_refused_by_name(tmp_path):
    path = tmp_path / "convnext.pth"
    torch.save(_reference("convnext_atto").state_dict(), path)
    with pytest.raises(ModelError) as err:
        build_extractor(VIT, 16, str(path), timm_kwargs=KW)
    assert str(path) in str(err.value) and "do not fit" in str(err.value)


def test_hf_hub_weights_through_the_hub_client(tmp_path, monkeypatch):
    import huggingface_hub

    ref = _reference(**KW)
    cached = tmp_path / "hf" / "model.safetensors"
    cached.parent.mkdir()
    save_file(ref.state_dict(), str(cached))
    calls = []

    def fake_download(repo, filename, local_files_only=False):
        calls.append((repo, filename, local_files_only))
        if filename != "model.safetensors":
            raise FileNotFoundError(filename)
        return str(cached)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    out = tmp_path / "pretrained"
    info = fetch_weights(VIT, "hf-hub:someone/tiny-vit", out)
    assert info["file"] == "someone--tiny-vit--model.safetensors"
    assert calls[0] == ("someone/tiny-vit", "model.safetensors", True)  # cache first
    m = build_extractor(VIT, 16, "hf-hub:someone/tiny-vit", timm_kwargs=KW, weights_dir=out)
    assert torch.equal(m.backbone.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)

    def offline(repo, filename, local_files_only=False):
        raise OSError("offline (HF_HUB_OFFLINE)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelError) as err:
        build_extractor(VIT, 16, "hf-hub:MahmoodLab/UNI", timm_kwargs=KW)
    msg = str(err.value)
    assert "https://huggingface.co/MahmoodLab/UNI" in msg and VIT in msg and "\n" not in msg


def test_params_accept_timm_archs_and_refuse_bad_kwargs():
    raw = Params().model_dump(mode="json")
    raw["extractor"].update(arch=VIT, timm_kwargs={"init_values": 1e-5}, feature_dim="native",
                            trainable_blocks=2)
    p = Params.model_validate(raw).extractor
    assert p.arch == VIT and p.feature_dim == "native" and p.trainable_blocks == 2
    with pytest.raises(ModelError, match="no model"):
        build_extractor("timm:not_a_model_xyz")
    with pytest.raises(ModelError, match="timm_kwargs.num_classes"):
        build_extractor(VIT, timm_kwargs={"num_classes": 3})
    with pytest.raises(ModelError, match="only for timm"):
        build_extractor("small_cnn", timm_kwargs={"img_size": 32})


def test_named_layer_kwargs_resolve_to_timm_classes():
    """Virchow/H-optimus style kwargs from YAML: mlp_layer: SwiGLUPacked, act_layer: silu."""
    m = build_extractor(VIT, 4, timm_kwargs={**KW, "mlp_layer": "SwiGLUPacked",
                                             "act_layer": "silu", "mlp_ratio": 5.3375})
    mlp = m.backbone.blocks[0].mlp  # timm's SwiGLUPacked is a GluMlp partial
    assert type(mlp).__name__ == "GluMlp" and isinstance(mlp.act, torch.nn.SiLU)


def test_e2e_pixels_follow_the_encoders_preprocessing():
    """e2e-finetune's batched pixel path gives what extraction's eval_transform gives: the
    encoder's crop, resize and mean/std (not a global ImageNet normalisation)."""
    from pipeline.stages.e2e_finetune import pixel_fn

    prep = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), input_px=32,
                      interpolation="bicubic")
    px = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    got = pixel_fn(40, False, prep)(px.float())
    want = torch.stack([eval_transform(40, prep)(p) for p in px])
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
