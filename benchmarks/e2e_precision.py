"""End-to-End step in bf16 autocast vs float32: time, peak memory and gradient error.

For one synthetic slide of N patches (one map, mixed labels) and each chunk size r, runs the
two-block step (`pipeline.e2e.e2e_slide_step`) with the models in float32, once plain and once
under `torch.autocast(dtype=bfloat16)`, and compares both gradients with the float64 one-graph
reference (`one_graph_grads` on float64 copies of the same models, same seeds, same pixels, same
chunking, since dropout masks are drawn per chunk):
relative L2 error ||g - g_ref|| / ||g_ref|| and cosine similarity, per model. Peak memory is
torch.cuda.max_memory_allocated on CUDA (RSS on CPU, which only grows: read CPU rows as upper
bounds). Times are the median of --repeats after one warm-up step.

    python benchmarks/e2e_precision.py --device cuda --arch googlenet --n 1024 \
        --chunks 32,64,128,256,512 --out docs/bench/e2e_precision_gpu.json
    python benchmarks/e2e_precision.py            # CPU smoke run: small_cnn, 64-px patches
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.e2e import e2e_slide_step, one_graph_grads, tensor_chunk_source
from pipeline.featuremap import build_layouts
from pipeline.models import build_extractor
from pipeline.schema import LABEL_NOLABEL, LABEL_NORMAL, LABEL_TUMOR
from pipeline.unet import UNet

UNET_DEPTH = 3
MIB = 1 << 20


def _slide(n: int):
    side = math.ceil(math.sqrt(n))
    grid = np.stack(np.divmod(np.arange(n), side), axis=1)
    layouts = build_layouts(grid, np.ones(n), size=8, mode="full", per_lump=False,
                            depth=UNET_DEPTH)
    rng = np.random.default_rng(0)
    labels = rng.choice([LABEL_TUMOR, LABEL_NORMAL, LABEL_NOLABEL], size=n).astype(np.int8)
    return layouts, labels


def _grads(models) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().reshape(-1).cpu()
                      for m in models for p in m.parameters() if p.grad is not None])


def _zero(models) -> None:
    for m in models:
        m.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _compare(g: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for name in ref:
        d = (g[name] - ref[name]).norm() / ref[name].norm()
        cos = torch.nn.functional.cosine_similarity(g[name], ref[name], dim=0)
        out[f"{name}_rel_l2"] = float(d)
        out[f"{name}_cosine"] = float(cos)
    return out


def _reference(extractor, unet, pixels, layouts, labels, chunk) -> dict[str, torch.Tensor]:
    ext64, unet64 = copy.deepcopy(extractor).double(), copy.deepcopy(unet).double()
    chunks = tensor_chunk_source(pixels.double(), chunk)
    one_graph_grads(ext64, unet64, chunks, layouts, labels, chunk, seed=1)
    return {"extractor": _grads([ext64]), "unet": _grads([unet64])}


def _point(extractor, unet, pixels, layouts, labels, chunk, bf16, device, repeats, ref) -> dict:
    chunks = tensor_chunk_source(pixels, chunk)
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
           else contextlib.nullcontext())

    def step() -> None:
        _zero([extractor, unet])
        with ctx:
            e2e_slide_step(extractor, unet, chunks, layouts, labels, chunk, seed=1)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    got = {"extractor": _grads([extractor]), "unet": _grads([unet])}
    return {"chunk": chunk, "precision": "bf16" if bf16 else "fp32",
            "time_s": statistics.median(times), "peak_mib": _peak_mib(device),
            **_compare(got, ref)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--n", type=int, default=256, help="patches on the slide's map")
    ap.add_argument("--patch-px", type=int, default=None, help="default 224 (cuda) / 64 (cpu)")
    ap.add_argument("--chunks", default="32,64,128")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("reports/bench/e2e_precision.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    px = args.patch_px or (224 if device.type == "cuda" else 64)
    torch.manual_seed(0)
    extractor = build_extractor(args.arch, feature_dim=16).to(device)
    unet = UNet(in_channels=16, n_classes=2, depth=UNET_DEPTH, width=32).to(device)
    pixels = torch.randn(args.n, 3, px, px, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device)
    layouts, labels = _slide(args.n)
    chunk_sizes = [int(c) for c in args.chunks.split(",")]
    rows = []
    print(f"{'chunk':>6} {'prec':>5} {'time s':>8} {'peak MiB':>9} {'ext rel':>9} "
          f"{'unet rel':>9} {'ext cos':>8}")
    for chunk in chunk_sizes:
        # dropout masks are drawn per chunk: the reference must cut the slide the same way
        ref = _reference(extractor, unet, pixels, layouts, labels, chunk)
        for bf16 in (False, True):
            r = _point(extractor, unet, pixels, layouts, labels, chunk, bf16, device,
                       args.repeats, ref)
            rows.append(r)
            print(f"{chunk:>6} {r['precision']:>5} {r['time_s']:>8.3f} {r['peak_mib']:>9.0f} "
                  f"{r['extractor_rel_l2']:>9.2e} {r['unet_rel_l2']:>9.2e} "
                  f"{r['extractor_cosine']:>8.5f}")
    result = {"device": str(device), "device_name": (torch.cuda.get_device_name(device)
                                                     if device.type == "cuda"
                                                     else platform.processor() or "cpu"),
              "torch": torch.__version__, "arch": args.arch, "n": args.n, "patch_px": px,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
