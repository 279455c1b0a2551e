"""Benchmark the CUDA fused 4-bit GEMV + LoRA (decode, M = 1..16) against cuBLAS, bitsandbytes and the memory floor.

Rows per weight shape [N, K] (bfloat16 activations, NF4, blocksize 64, double quant, LoRA r = 16) and per M:

- ``qkernels``: ``_C.gemv_4bit_lora_cuda`` = x @ dequant(W)^T + t @ B^T (t = the [M, r] LoRA down-projection, given:
  the kernel's share of the op; the skinny x @ A^T that produces it is not timed here).
- ``torch``: cuBLAS bfloat16 ``x @ W.T`` on the dense weight (no LoRA): what a dense model pays.
- ``bitsandbytes``: ``bnb.matmul_4bit(x, W.t(), quant_state)`` (no LoRA), when bitsandbytes imports with CUDA.

Timing: each implementation is captured in a CUDA graph that calls it ``INNER`` times, cycling through several copies
of the weight whose total exceeds 100 MB (past the 50 MB L2 of an H100), so every call streams its weight from DRAM
and Python / launch overhead is not counted; the graph is replayed and timed with CUDA events (median, p10-p90 of
the per-call time). Falls back to eager launches (noted) when a capture fails.

Floor: bytes each call must move (weight as stored + scales + x + t + B + y) / the device copy bandwidth measured in
the same run (``dst.copy_(src)`` on 256 MiB, read + write). Targets (issue 4) are printed beside the measurements.

Run ``python -m benchmarks.bench_gemv_cuda [--shapes 4096x4096,...] [--m 1,2,4,8,16] [--quick] [--no-save]``.
Without CUDA it prints why and returns 0 (so ``python -m benchmarks.run`` works on a CPU machine).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

import torch

import qkernels
from qkernels import _native

from . import _harness as H

BLOCKSIZE = 64
RANK = 16
DTYPE = torch.bfloat16
DEFAULT_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))  # [N, K]
DEFAULT_M = tuple(range(1, 17))
ROTATE_BYTES = 100 * 1024 * 1024  # total bytes of the weight copies cycled through (> 2x an H100's L2)
TARGETS = {"vs_copy_bandwidth_min": 0.80, "m16_over_m1_max": 1.3, "vs_cublas_m1_min": 2.5}


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def device_copy_bandwidth(nbytes: int = H.COPY_BYTES) -> float:
    """Device memory bandwidth in bytes/s: ``dst.copy_(src)`` on ``nbytes`` of float32, read + write, median."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    stats = time_calls([lambda: dst.copy_(src)], inner=10, reps=10)[0]
    return 2 * nbytes / stats.median


def time_calls(fns: list[Callable[[], Any]], *, inner: int, reps: int) -> tuple[H.Stats, str]:
    """Per-call GPU time of cycling through ``fns`` (``inner`` calls per timed replay, ``reps`` replays)."""
    torch.cuda.synchronize()
    for f in fns:  # warm up (cuBLAS handles, lazy inits) outside the capture
        f()
    torch.cuda.synchronize()
    note = "cuda-graph"
    graph = None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(inner):
                fns[i % len(fns)]()
    except Exception as exc:  # e.g. a library that syncs inside: time eager launches instead
        graph = None
        note = f"eager ({type(exc).__name__})"
        torch.cuda.synchronize()

    def run() -> None:
        if graph is not None:
            graph.replay()
        else:
            for i in range(inner):
                fns[i % len(fns)]()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    first = 0.0
    for rep in range(reps + 1):
        start.record()
        run()
        end.record()
        end.synchronize()
        t = start.elapsed_time(end) / 1e3 / inner
        if rep == 0:
            first = t
        else:
            times.append(t)
    times.sort()
    q = H._percentile
    return H.Stats(q(times, 50), q(times, 10), q(times, 90), len(times), first), note


def bench_shape(N: int, K: int, ms: list[int], bandwidth: float, *, quick: bool) -> tuple[list[H.Result], dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(N, K, device="cuda", generator=g).to(DTYPE)
    packed, qs = qkernels.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True)
    nblocks = qs.absmax.numel()
    q_bytes = packed.numel() + nblocks + 4 * qs.state2.absmax.numel()  # packed + uint8 absmax + nested absmax
    copies = max(2, math.ceil(ROTATE_BYTES / q_bytes))
    qcopies = [(packed.clone(), qs.absmax.clone(), qs.state2.absmax.clone()) for _ in range(copies)]
    dcopies = [W.clone() for _ in range(max(2, math.ceil(ROTATE_BYTES / W.nbytes)))]
    offset = float(qs.offset.item())
    code, ncode = qs.code, qs.state2.code
    B = torch.randn(N, RANK, device="cuda", generator=g) * 0.01
    bnb = _load_bnb()
    bnb_copies = None
    if bnb is not None:
        try:
            bp, bqs = bnb.functional.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
            bnb_copies = [(bp.clone(), bqs) for _ in range(copies)]
        except Exception as exc:
            print(f"bitsandbytes quantize failed, no bitsandbytes rows: {type(exc).__name__}: {exc}")
    inner, reps = (20, 5) if quick else (100, 20)
    rows: list[H.Result] = []
    per_m: dict[int, dict[str, float]] = {}
    for M in ms:
        x = torch.randn(M, K, device="cuda", generator=g).to(DTYPE)
        t = torch.randn(M, RANK, device="cuda", generator=g)
        y = torch.empty(M, N, device="cuda", dtype=DTYPE)
        act_bytes = 2 * M * K + 4 * M * RANK + 4 * N * RANK + 2 * M * N
        shape = (M, N, K)

        def qk_call(c: tuple, x=x, t=t, y=y, M=M) -> Callable[[], None]:
            p, a_q, n_a = c
            return lambda: _native._C.gemv_4bit_lora_cuda(
                x.data_ptr(), 2, M, K, p.data_ptr(), 0, a_q.data_ptr(), n_a.data_ptr(), ncode.data_ptr(), offset,
                256, code.data_ptr(), BLOCKSIZE, N, t.data_ptr(), B.data_ptr(), RANK, 0, y.data_ptr(),
                torch.cuda.current_stream().cuda_stream)

        stats, note = time_calls([qk_call(c) for c in qcopies], inner=inner, reps=reps)
        rows.append(H.Result.from_stats("gemv_4bit_lora", shape, DTYPE, "qkernels", stats, q_bytes + act_bytes,
                                        bandwidth, note=f"{note}; r={RANK}, nested, {copies} weight copies"))
        per_m[M] = {"qkernels_ms": stats.median * 1e3, "qkernels_vs_floor": rows[-1].vs_floor}

        stats, note = time_calls([(lambda w=w, x=x: x @ w.t()) for w in dcopies], inner=inner, reps=reps)
        rows.append(H.Result.from_stats("gemv_4bit_lora", shape, DTYPE, "torch", stats,
                                        W.nbytes + 2 * M * K + 2 * M * N, bandwidth,
                                        note=f"{note}; cuBLAS dense bf16 x @ W.T, no LoRA"))
        per_m[M]["cublas_ms"] = stats.median * 1e3

        if bnb_copies is not None:
            try:
                fns = [(lambda bp=bp, bqs=bqs, x=x: bnb.matmul_4bit(x, bp.t(), quant_state=bqs))
                       for bp, bqs in bnb_copies]
                stats, note = time_calls(fns, inner=inner, reps=reps)
                rows.append(H.Result.from_stats("gemv_4bit_lora", shape, DTYPE, "bitsandbytes", stats,
                                                q_bytes + 2 * M * K + 2 * M * N, bandwidth,
                                                note=f"{note}; matmul_4bit, no LoRA"))
                per_m[M]["bnb_ms"] = stats.median * 1e3
            except Exception as exc:
                print(f"bitsandbytes matmul_4bit failed at M={M}: {type(exc).__name__}: {exc}")
    H.fill_vs_bnb(rows)
    summary: dict[str, Any] = {"shape": [N, K], "per_m": per_m}
    if 1 in per_m:
        summary["qkernels_vs_cublas_m1"] = per_m[1]["cublas_ms"] / per_m[1]["qkernels_ms"]
        if 16 in per_m:
            summary["m16_over_m1"] = per_m[16]["qkernels_ms"] / per_m[1]["qkernels_ms"]
    summary["min_fraction_of_copy_bandwidth"] = min(1.0 / v["qkernels_vs_floor"] for v in per_m.values())
    return rows, summary


def _load_bnb() -> Any:
    try:
        import bitsandbytes as bnb

        return bnb
    except Exception as exc:
        print(f"bitsandbytes unavailable ({type(exc).__name__}: {exc}); no bitsandbytes rows")
        return None


def print_summary(s: dict[str, Any]) -> None:
    t = TARGETS
    n, k = s["shape"]
    parts = [f"{n}x{k}: worst fraction of copy bandwidth {s['min_fraction_of_copy_bandwidth']:.2f} "
             f"(target >= {t['vs_copy_bandwidth_min']:.2f})"]
    if "m16_over_m1" in s:
        parts.append(f"time M=16 / M=1 {s['m16_over_m1']:.2f} (target <= {t['m16_over_m1_max']:g})")
    if "qkernels_vs_cublas_m1" in s:
        parts.append(f"speedup vs cuBLAS at M=1 {s['qkernels_vs_cublas_m1']:.2f}x "
                     f"(target >= {t['vs_cublas_m1_min']:g}x)")
    print("; ".join(parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_gemv_cuda", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in DEFAULT_SHAPES),
                    help="comma-separated weight shapes NxK (default: %(default)s)")
    ap.add_argument("--m", type=parse_ints, default=list(DEFAULT_M), help="comma-separated M values (default 1..16)")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (a smoke test, noisier numbers)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write JSON")
    ap.add_argument("--results-dir", default=None, help="where to write the JSON (default benchmarks/results)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_gemv_cuda: skipped, no CUDA device (torch.cuda.is_available() is False)")
        return 0
    if _native._C is None or not hasattr(_native._C, "gemv_4bit_lora_cuda"):
        why = _native.NATIVE_ERROR or "built without CUDA"
        print(f"bench_gemv_cuda: skipped, qkernels._C has no gemv_4bit_lora_cuda ({why})")
        return 0
    shapes = [tuple(int(d) for d in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()]
    machine = H.machine_info()
    bandwidth = device_copy_bandwidth()
    print(f"device copy bandwidth (read+write, 256 MiB float32 copy_): {bandwidth / 1e9:.0f} GB/s")
    rows: list[H.Result] = []
    summaries = []
    with H.Deadline() as deadline:
        for n, k in shapes:
            r, s = bench_shape(n, k, args.m, bandwidth, quick=args.quick)
            rows += r
            summaries.append(s)
    H.print_results("fused 4-bit GEMV + LoRA (CUDA, NF4, blocksize 64, double quant, bf16, r=16)", rows, machine,
                    bandwidth)
    print()
    for s in summaries:
        print_summary(s)
    if not args.no_save:
        summary = {"quick": args.quick, "targets": TARGETS, "shapes": summaries, "cut_at_deadline": deadline.hit}
        path = H.write_json("gemv_cuda", rows, machine, bandwidth, summary=summary, results_dir=args.results_dir)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
