"""Peak memory and time of one End-to-End step: two-block method vs one autograd graph.

    python benchmarks/e2e_memory.py [--arch small_cnn --patch-px 64 --chunk 32
                                     --ns 256,1024,4096 --device auto]
    python benchmarks/e2e_memory.py --arch timm:vit_tiny_patch16_224 --patch-px 64 \
        --ns 64,256,1024 --out reports/bench/e2e_memory_vit.json      # the ViT row

--arch timm:<name> builds a timm model (random init, img_size = --patch-px, drop-path 0.1)
under the paper's feature/head Linears, as pipeline.models.PatchClassifier wraps any backbone.

For each slide size N (patches on one map), in a FRESH subprocess per (method, N):
- two_block: pipeline.e2e.e2e_slide_step (memory ~ chunk r, not N) — peak memory of the first
             step; then, interleaved in the same process, the time of an e2e step and of a
             plain classification forward+backward over the same N patches (one batch while it
             fits in memory, and in chunks of r) — the time a step "should" take;
- naive:     pipeline.e2e.one_graph_grads (one graph over all N patches) — peak memory.
Peak memory: torch.cuda.max_memory_allocated on a GPU; peak RSS (getrusage ru_maxrss) of the
subprocess on CPU (it includes the interpreter and torch, reported separately as baseline).
Out-of-memory is caught and recorded. Patches are synthetic: chunks taken from a fixed pool of
random chunks on the device, so pixel storage is not O(N) for the chunked methods and pixel
generation is not timed.

Prints a table and writes reports/bench/e2e_memory.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.e2e import chunk_indices, e2e_slide_step, one_graph_grads
from pipeline.featuremap import build_layouts
from pipeline.io import write_json_atomic
from pipeline.models import ARCHS, PatchClassifier, build_extractor
from pipeline.schema import LABEL_NOLABEL, LABEL_NORMAL, LABEL_TUMOR
from pipeline.unet import UNet

METHODS = ("two_block", "naive")
UNET_DEPTH = 3
MIB = 2**20


def _rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


def _build_extractor(arch: str, patch_px: int) -> torch.nn.Module:
    if not arch.startswith("timm:"):
        return build_extractor(arch, feature_dim=16)
    import timm

    name = arch.split(":", 1)[1]
    backbone = timm.create_model(name, pretrained=False, num_classes=0, img_size=patch_px,
                                 drop_path_rate=0.1)
    return PatchClassifier(backbone, backbone.num_features, 16, arch)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _slide(n: int, seed: int):
    """N tiles on a square-ish block, one map (mode full: nothing dropped), mixed labels."""
    side = math.ceil(math.sqrt(n))
    grid = np.stack(np.divmod(np.arange(n), side), axis=1)
    layouts = build_layouts(grid, np.ones(n), size=8, mode="full", per_lump=False,
                            depth=UNET_DEPTH)
    rng = np.random.default_rng(seed)
    labels = rng.choice([LABEL_TUMOR, LABEL_NORMAL, LABEL_NOLABEL], size=n).astype(np.int8)
    return layouts, labels


POOL = 4


def _chunk_source(patch_px: int, chunk: int, device: torch.device):
    """Chunks drawn from a fixed pool of POOL random chunks already on the device: memory stays
    O(r), and pixel generation/I/O is not what is timed (the e2e step reads every patch twice;
    the pipeline's DataLoader workers overlap that with compute)."""
    gen = torch.Generator(device=device).manual_seed(0)
    pool = torch.randn(POOL, chunk, 3, patch_px, patch_px, device=device, generator=gen)

    def chunks(indices):
        for part in chunk_indices(indices, chunk):
            # a fresh tensor per chunk, like a DataLoader batch (a graph that keeps its input
            # then really holds N patches of pixels)
            yield part, pool[(int(part[0]) // chunk) % POOL, : len(part)].clone()

    return chunks


def _plain_step(extractor, chunks, indices, labels, chunk, one_batch: bool) -> None:
    """Classification forward+backward over the patches (CE on the head's logits)."""
    device = next(extractor.parameters()).device
    target = torch.from_numpy((labels[indices] == LABEL_TUMOR).astype(np.int64)).to(device)
    if one_batch:
        px = torch.cat([p for _, p in chunks(indices)])
        torch.nn.functional.cross_entropy(extractor(px), target).backward()
        return
    pos = 0
    for idx, px in chunks(indices):
        t = target[pos : pos + len(idx)]
        (torch.nn.functional.cross_entropy(extractor(px), t, reduction="sum") / len(indices)
         ).backward()
        pos += len(idx)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return _rss_mib()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def worker(args: argparse.Namespace) -> dict:
    """One (method, N) point, in this (fresh) process. Returns the measurements.

    two_block: peak memory of one e2e step (measured first, before anything else runs at this
    N), then `repeats` rounds timing, interleaved: e2e step, plain one-batch fwd+bwd (dropped
    once it runs out of memory), plain chunked fwd+bwd. Interleaving keeps the ratios fair on a
    machine whose load changes. naive: peak memory (and time) of one one-graph step."""
    device = _resolve_device(args.device)
    torch.manual_seed(0)
    extractor = _build_extractor(args.arch, args.patch_px).to(device).train()
    unet = UNet(in_channels=16, n_classes=2, depth=UNET_DEPTH, width=32).to(device).train()
    n = args.n
    layouts, labels = _slide(n, seed=0)
    chunks = _chunk_source(args.patch_px, args.chunk, device)
    indices = layouts[0].tile_index
    out: dict = {"method": args.method, "n": n, "device": str(device), "status": "ok"}

    # Warm-up at a small size: library init, cuDNN heuristics, allocator pools.
    w_layouts, w_labels = _slide(min(n, 2 * args.chunk), seed=1)
    e2e_slide_step(extractor, unet, chunks, w_layouts, w_labels, args.chunk, seed=0)
    extractor.zero_grad(set_to_none=False)
    unet.zero_grad(set_to_none=False)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        out["baseline_mib"] = torch.cuda.memory_allocated(device) / MIB
    else:
        out["baseline_mib"] = _rss_mib()

    def e2e() -> None:
        e2e_slide_step(extractor, unet, chunks, layouts, labels, args.chunk, seed=1)

    def naive() -> None:
        one_graph_grads(extractor, unet, chunks, layouts, labels, args.chunk, seed=1)

    def plain_one_batch() -> None:
        _plain_step(extractor, chunks, indices, labels, args.chunk, True)

    def plain_chunked() -> None:
        _plain_step(extractor, chunks, indices, labels, args.chunk, False)

    try:
        out["first_time_s"] = _timed(e2e if args.method == "two_block" else naive, device)
    except Exception as exc:
        if not _is_oom(exc):
            raise
        out["status"] = "oom"
        out["error"] = str(exc).splitlines()[0][:200]
    out["peak_mib"] = _peak_mib(device)
    out["peak_over_baseline_mib"] = out["peak_mib"] - out["baseline_mib"]
    if args.method == "naive" or out["status"] != "ok":
        return out

    times: dict[str, list[float]] = {"e2e": [], "plain_one_batch": [], "plain_chunked": []}
    one_batch_fits = True
    for _ in range(args.repeats):
        times["e2e"].append(_timed(e2e, device))
        if one_batch_fits:
            try:
                times["plain_one_batch"].append(_timed(plain_one_batch, device))
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                one_batch_fits = False
                out["plain_one_batch_error"] = str(exc).splitlines()[0][:200]
                extractor.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        times["plain_chunked"].append(_timed(plain_chunked, device))
    out["times_s"] = times
    out["time_s"] = min(times["e2e"])
    out["plain_chunked_s"] = min(times["plain_chunked"])
    if one_batch_fits:
        out["plain_one_batch_s"] = min(times["plain_one_batch"])
    # plain = one-graph fwd+bwd when it fits, else chunked (the brief's definition)
    out["plain_s"] = out.get("plain_one_batch_s", out["plain_chunked_s"])
    out["plain_mode"] = "one_batch" if one_batch_fits else f"chunked_r{args.chunk}"
    return out


def _run_point(args: argparse.Namespace, method: str, n: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", method, "--n", str(n), "--arch", args.arch,
        "--patch-px", str(args.patch_px), "--chunk", str(args.chunk), "--device", args.device,
        "--repeats", str(args.repeats),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    # SIGKILL: on CPU, the kernel's OOM killer.
    status = "killed (likely OOM)" if proc.returncode in (-9, 137) else "error"
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
    return {"method": method, "n": n, "status": status, "returncode": proc.returncode,
            "error": tail}


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="small_cnn",
                   help=f"one of {', '.join(ARCHS)}, or timm:<model name> (e.g. a ViT)")
    p.add_argument("--patch-px", type=int, default=64)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--ns", default="256,1024,4096")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (min is reported)")
    p.add_argument("--out", default="reports/bench/e2e_memory.json")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.arch not in ARCHS and not args.arch.startswith("timm:"):
        p.error(f"--arch {args.arch!r}: expected one of {', '.join(ARCHS)} or timm:<name>")

    if args.worker:
        args.method = args.worker
        print(json.dumps(worker(args)))
        return 0

    device = _resolve_device(args.device)
    ns = [int(s) for s in args.ns.split(",")]
    points = []
    for n in ns:
        for method in METHODS:
            t0 = time.perf_counter()
            pt = _run_point(args, method, n)
            pt["wall_s"] = time.perf_counter() - t0
            points.append(pt)
            print(f"  {method:9s} N={n:6d} {pt['status']:>6s} "
                  f"peak={_fmt(pt.get('peak_mib'), '.0f')} MiB "
                  f"time={_fmt(pt.get('time_s'), '.3f')} s", file=sys.stderr, flush=True)

    def get(method: str, n: int) -> dict:
        return next(pt for pt in points if pt["method"] == method and pt["n"] == n)

    def ratio(a, b):
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    lo, hi = ns[0], ns[-1]
    summary = {
        "two_block_peak_ratio": ratio(get("two_block", hi).get("peak_mib"),
                                      get("two_block", lo).get("peak_mib")),
        "naive_peak_ratio": ratio(get("naive", hi).get("peak_mib"),
                                  get("naive", lo).get("peak_mib")),
        "two_block_increment_ratio": ratio(get("two_block", hi).get("peak_over_baseline_mib"),
                                           get("two_block", lo).get("peak_over_baseline_mib")),
        "naive_increment_ratio": ratio(get("naive", hi).get("peak_over_baseline_mib"),
                                       get("naive", lo).get("peak_over_baseline_mib")),
        "e2e_over_plain_time": {
            str(n): ratio(get("two_block", n).get("time_s"), get("two_block", n).get("plain_s"))
            for n in ns
        },
        "e2e_over_plain_chunked_time": {
            str(n): ratio(get("two_block", n).get("time_s"),
                          get("two_block", n).get("plain_chunked_s"))
            for n in ns
        },
        "targets": {"two_block_peak_ratio_max": 1.2, "e2e_over_plain_time_max": 1.4},
    }
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        memory_kind = "cuda_max_memory_allocated"
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, " \
                      f"{torch.get_num_threads()} threads)"
        memory_kind = "peak_rss_fresh_subprocess"
    report = {
        "config": {"arch": args.arch, "patch_px": args.patch_px, "chunk": args.chunk, "ns": ns,
                   "unet": {"depth": UNET_DEPTH, "width": 32}, "feature_dim": 16,
                   "repeats": args.repeats},
        "device": device_name,
        "memory": memory_kind,
        "torch": torch.__version__,
        "points": points,
        "summary": summary,
    }
    out = Path(args.out)
    write_json_atomic(out, report)

    print(f"\n{args.arch} {args.patch_px}px, r={args.chunk}, {device_name}, memory={memory_kind}")
    print(f"{'N':>6} | {'two-block MiB':>13} | {'naive MiB':>10} | {'e2e step s':>10} | "
          f"{'plain s':>8} | {'e2e/plain':>9} | {'plain chunked s':>15} | {'e2e/chunked':>11}"
          f" | plain mode")
    for n in ns:
        tb, nv = get("two_block", n), get("naive", n)
        naive_mem = _fmt(nv.get("peak_mib"), ".0f") if nv["status"] == "ok" else nv["status"]
        print(f"{n:>6} | {_fmt(tb.get('peak_mib'), '13.0f')} | {naive_mem:>10} | "
              f"{_fmt(tb.get('time_s'), '10.3f')} | {_fmt(tb.get('plain_s'), '8.3f')} | "
              f"{_fmt(summary['e2e_over_plain_time'][str(n)], '9.2f')} | "
              f"{_fmt(tb.get('plain_chunked_s'), '15.3f')} | "
              f"{_fmt(summary['e2e_over_plain_chunked_time'][str(n)], '11.2f')} | "
              f"{tb.get('plain_mode', tb['status'])}")
    incr = {m: [_fmt(get(m, n).get("peak_over_baseline_mib"), ".1f") for n in ns]
            for m in ("two_block", "naive")}
    base = _fmt(get("two_block", lo).get("baseline_mib"), ".0f")
    print(f"baseline before the step (N={lo}): {base} MiB; peak minus baseline, MiB, per N: "
          f"two-block {incr['two_block']}, naive {incr['naive']}")
    print(f"two-block peak({hi})/peak({lo}) = {_fmt(summary['two_block_peak_ratio'], '.3f')} "
          f"(target <= 1.2); naive = {_fmt(summary['naive_peak_ratio'], '.3f')}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
