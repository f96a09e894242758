"""How much tumor/normal signal a timm encoder's features carry at a given input size and crop.

Why: on a CPU the demo chain with a ViT is only affordable with a small encoder input
(`extractor.timm_kwargs.img_size`), and shrinking the 224-px crop (1 um/px) to 64 px makes the
encoder see 3.5 um/px, where the demo's nuclei (the tumor cue) are 2-3 px wide. This probe says
what each (input px, crop px) setting leaves: the encoder (weights from --weights, e.g. a random
state dict) in eval mode, its D-dim features of every train tumor tile and --normal random train
normal tiles, a logistic regression (features z-scored) fitted on them and scored on the test
tumor tiles and 2 x --normal random test normal tiles. PR-AUC is Table 1's (pipeline/metrics.py).
It also prints what the setting costs, one torch thread: tiles/s of the probe's own feature pass
(reading + decoding + model), and model-only tiles/s on a random batch of 64 for a forward pass
and for forward + backward with only the last block and final norm trainable
(`extractor.trainable_blocks: 1`, as in the README's CPU demo command).

Reads, relative to the current directory (a project after `dvc repro label`): params.yaml, the
manifest, data/tiles, data/labels. Prints a table; --out writes it as JSON.

    .venv/bin/python benchmarks/vit_probe.py --weights /tmp/vit_tiny_random.pth \
        --settings 64:224,64:64,112:224,224:224
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.augment import eval_transform
from pipeline.data import PatchDataset, PatchItems, collect_labelled
from pipeline.encoders import build_encoder, encoder_blocks, load_encoder_state, read_weights
from pipeline.io import write_json_atomic
from pipeline.manifest import load_manifest
from pipeline.metrics import patch_metrics
from pipeline.params import load_params
from pipeline.paths import Paths
from pipeline.schema import LABEL_NORMAL, LABEL_TUMOR


def pick(items: PatchItems, n_normal: int, rng: np.random.Generator) -> PatchItems:
    """Every tumor tile and n_normal random normal tiles."""
    tumor = np.flatnonzero(items.labels == LABEL_TUMOR)
    normal = np.flatnonzero(items.labels == LABEL_NORMAL)
    normal = rng.choice(normal, min(n_normal, normal.size), replace=False)
    return items.select(np.concatenate([tumor, np.sort(normal)]))


@torch.no_grad()
def features(net: torch.nn.Module, items: PatchItems, transform, batch: int = 64) -> np.ndarray:
    ds = PatchDataset(items, transform)
    out = [net(torch.stack([ds[j][0] for j in range(s, min(s + batch, len(ds)))]))
           for s in range(0, len(ds), batch)]
    return torch.cat(out).numpy()


def model_rates(net: torch.nn.Module, input_px: int, seconds: float = 5.0) -> tuple[float, float]:
    """Model-only tiles/s: (forward without grad, forward + backward through the last block)."""
    x = torch.randn(64, 3, input_px, input_px)
    last = encoder_blocks(net)[-1]
    for p in net.parameters():
        p.requires_grad_(False)
    for p in [*last.parameters(), *getattr(net, "norm", torch.nn.Identity()).parameters()]:
        p.requires_grad_(True)
    rates = []
    for train in (False, True):
        net.train(train)
        with torch.set_grad_enabled(train):
            net(x[:8])
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                out = net(x)
                if train:
                    out.sum().backward()
                n += x.shape[0]
        rates.append(n / (time.perf_counter() - t0))
    net.eval()
    return rates[0], rates[1]


def probe(arch: str, weights: Path, input_px: int, crop_px: int, train: PatchItems,
          test: PatchItems) -> dict:
    enc = build_encoder(arch, {"img_size": input_px})
    load_encoder_state(enc.module, arch, read_weights(weights), weights)
    enc.module.eval()
    tf = eval_transform(crop_px, enc.preprocess)
    t0 = time.perf_counter()
    x_train, x_test = features(enc.module, train, tf), features(enc.module, test, tf)
    seconds = time.perf_counter() - t0
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(x_train, (train.labels == LABEL_TUMOR).astype(int))
    y = (test.labels == LABEL_TUMOR).astype(int)
    m = patch_metrics(y, clf.predict_proba(x_test)[:, 1])
    fwd, fwd_bwd = model_rates(enc.module, input_px)
    return {"input_px": input_px, "crop_px": crop_px, "um_per_input_px": crop_px / input_px,
            "pr_auc": m["pr_auc"], "roc_auc": m["roc_auc"], "chance_pr_auc": float(y.mean()),
            "tiles_per_s": (len(train) + len(test)) / seconds,
            "model_forward_tiles_per_s": fwd, "model_fwd_bwd_tiles_per_s": fwd_bwd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="timm:vit_tiny_patch16_224")
    ap.add_argument("--weights", type=Path, required=True, help="encoder state dict file")
    ap.add_argument("--settings", default="64:224,64:64,112:224,112:112,224:224",
                    help="comma-separated input_px:crop_px pairs")
    ap.add_argument("--normal", type=int, default=300, help="train normal tiles (test: 2x)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = load_params("params.yaml")
    manifest, paths = load_manifest(params.data.manifest), Paths()
    rng = np.random.default_rng(args.seed)
    train = pick(collect_labelled(manifest, paths, "train"), args.normal, rng)
    test = pick(collect_labelled(manifest, paths, "test"), 2 * args.normal, rng)
    rows = []
    print(f"{args.arch}, weights {args.weights}: {len(train)} train / {len(test)} test tiles")
    print("input px  crop px  um/input px  PR-AUC  ROC-AUC  chance  tiles/s  model fwd/s"
          "  fwd+bwd/s")
    for s in args.settings.split(","):
        input_px, crop_px = (int(v) for v in s.split(":"))
        r = probe(args.arch, args.weights, input_px, crop_px, train, test)
        rows.append(r)
        print(f"{input_px:8d} {crop_px:8d} {r['um_per_input_px']:12.2f} {r['pr_auc']:7.3f} "
              f"{r['roc_auc']:8.3f} {r['chance_pr_auc']:7.3f} {r['tiles_per_s']:8.1f} "
              f"{r['model_forward_tiles_per_s']:12.1f} {r['model_fwd_bwd_tiles_per_s']:10.1f}",
              flush=True)
    if args.out:
        write_json_atomic(args.out, {"arch": args.arch, "weights": str(args.weights),
                                     "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
