"""Benchmark the CPU fused 4-bit GEMV + LoRA + bias (small M) against bitsandbytes, dense torch and the floors.

Per weight shape [N, K] (bfloat16, NF4, blocksize 64, double quant) and per M (tokens), bfloat16 x, LoRA rank 16:

- ``qkernels``: ``_native.gemv_4bit_lora_native(x, packed, state, t, B, bias)``, the whole
  ``y = x @ W^T + t @ B^T + bias`` (``t = s * x @ A^T``, float32 [M, r], is the caller's and is built outside the
  timing; its cost is M*K*r flops, ~0.1% of the GEMV).
- ``bitsandbytes``: ``bnb.matmul_4bit(x, W_packed.t(), quant_state, bias=bias) + t_bf16 @ B_bf16^T`` under
  ``torch.no_grad()``, what a decode step calls. Its CPU no-grad path may repack the weight on the first call
  (DESIGN §5); warmup absorbs it and ``first_call_ms`` records it. A second row times ``matmul_4bit`` alone.
- ``torch``: dense bfloat16 ``x @ W^T`` (W already dequantized: what a dense model pays), alone and with the same
  LoRA + bias terms added.

Floors: memory = (packed codes + scales + x + out + t, B, bias) / measured copy bandwidth; compute = 2*M*N*K flops /
the measured dense bfloat16 matmul rate (a [256, K] x [K, N] matmul). The larger is the floor of the row; the rows'
``floor_ms`` / ``vs_floor`` are the memory floor, the summary gives both.

Run ``python -m benchmarks.bench_gemv [--shapes 4096x4096,11008x4096] [--ms 1,16] [--quick] [--no-save]``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import qkernels
from qkernels import _native, reference

from . import _harness as H
from .bench_quant import parse_shapes

BLOCKSIZE = 64
QUANT_TYPE = "nf4"
DTYPE = torch.bfloat16
RANK = 16
DEFAULT_SHAPES = ((4096, 4096),)
DEFAULT_MS = (1, 16)
# Issue 4's targets, printed beside the measured ratios.
TARGETS = {
    1: {"vs_bnb_min": 20.0, "vs_dense_min": 3.0},
    16: {"vs_bnb_min": 8.0, "vs_dense_min": 1.0},
}


def parse_ms(text: str) -> list[int]:
    """Parse ``"1,16"`` into a list of positive ints."""
    try:
        ms = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad M list {text!r}: expected e.g. 1,16") from None
    if not ms or any(m <= 0 for m in ms):
        raise argparse.ArgumentTypeError(f"bad M list {text!r}: values must be positive")
    return ms


def _load_bnb() -> Any:
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_f
    except Exception as exc:  # the oracle, not a dependency: its rows are skipped without it
        print(f"bitsandbytes unavailable, its rows are skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None, None
    return bnb, bnb_f


def matmul_rate(K: int, N: int) -> float:
    """Dense bfloat16 matmul rate of this machine in flop/s: ``[256, K] @ [K, N]``, median of a few runs."""
    a = torch.randn(256, K, dtype=DTYPE)
    b = torch.randn(N, K, dtype=DTYPE)
    stats = H.measure(lambda: a @ b.t(), warmup=1, min_runs=3, min_time_s=0.3)
    return 2 * 256 * K * N / stats.median


def _note_native() -> str:
    C = _native._C
    isa = C.cpu_isa_active() if C is not None else "none"
    omp = ", OpenMP" if qkernels.native_info().get("openmp") else ""
    return f"native CPU GEMV ({isa}{omp}), fused LoRA + bias"


def bench_shape(
    shape: tuple[int, int], ms: list[int], bandwidth: float, flops: float, *, quick: bool = False
) -> tuple[list[H.Result], list[dict[str, Any]]]:
    """Time every implementation at one weight shape for each M; return the rows and one summary per M."""
    N, K = shape
    torch.manual_seed(0)
    W = torch.randn(N, K, dtype=DTYPE)
    packed, state = qkernels.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, double_quant=True)
    weights = {
        "packed": packed,
        "state": state,
        "W_deq": qkernels.dequantize_4bit(packed, state),  # bf16 [N, K]: what a dense model holds
        "W64": reference.dequantize_4bit(packed, _decoded_scales(state), state.code, BLOCKSIZE, N * K,
                                         torch.float64).view(N, K),
    }
    bnb, bnb_f = _load_bnb()
    if bnb is not None:
        weights["bnb"] = bnb
        weights["bpacked"], weights["bstate"] = bnb_f.quantize_4bit(
            W, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, compress_statistics=True
        )
    rows: list[H.Result] = []
    summaries = [bench_m(M, N, K, weights, bandwidth, flops, rows, quick=quick) for M in ms]
    H.fill_vs_bnb([r for r in rows if "alone" not in r.note])
    return rows, summaries


def bench_m(
    M: int, N: int, K: int, w: dict[str, Any], bandwidth: float, flops: float, rows: list[H.Result], *, quick: bool
) -> dict[str, Any]:
    """Time every implementation at one M (rows appended to ``rows``); return the summary of ratios and errors."""
    kw = dict(warmup=1, min_runs=5, min_time_s=0.1) if quick else dict(warmup=3, min_runs=20, min_time_s=1.0)
    slow = dict(warmup=1, min_runs=3, min_time_s=0.1) if quick else dict(warmup=2, min_runs=5, min_time_s=1.0)
    packed, state, W_deq = w["packed"], w["state"], w["W_deq"]
    x = torch.randn(M, K, dtype=DTYPE)
    A = torch.randn(RANK, K, dtype=DTYPE) / K**0.5
    B = torch.randn(N, RANK, dtype=torch.float32) / RANK**0.5
    bias = torch.randn(N, dtype=torch.float32)
    t = 2.0 * (x.float() @ A.float().t())  # the caller's s * x @ A^T, float32 [M, r]
    t_bf, B_bf, bias_bf = t.to(DTYPE), B.to(DTYPE), bias.to(DTYPE)
    weight_bytes = packed.numel() * packed.element_size() + state.nbytes()
    io_bytes = 2 * M * K + 2 * M * N + 4 * (M * RANK + N * RANK + N)
    nbytes = weight_bytes + io_bytes

    def row(impl: str, fn: Any, note: str, nb: int = nbytes, timing: dict | None = None) -> H.Result:
        stats = H.measure(fn, **(timing or kw))
        r = H.Result.from_stats("gemv_4bit_lora", (M, N, K), DTYPE, impl, stats, nb, bandwidth, note)
        rows.append(r)
        return r

    def qk_call() -> torch.Tensor:
        return _native.gemv_4bit_lora_native(x, packed, state, t, B, bias)

    def dense_full() -> torch.Tensor:
        return x @ W_deq.t() + t_bf @ B_bf.t() + bias_bf

    qk = row("qkernels", qk_call, _note_native())
    A32 = A.float()

    def api_call() -> torch.Tensor:  # what a user's decode step calls: LoRA down-projection included, all checks
        with torch.no_grad():
            return qkernels.matmul_4bit_lora(x, packed, state, A32, B, 2.0, bias)

    api = row("qkernels", api_call, "qkernels.matmul_4bit_lora (public API: checks, x @ A^T, fused GEMV), no_grad")
    outs = {"qkernels": qk_call(), "qkernels_api": api_call(), "dense_bf16": dense_full()}
    bnb_row = bnb_bare = None
    if "bnb" in w:
        bnb, bpacked, bstate = w["bnb"], w["bpacked"], w["bstate"]

        def bnb_call() -> torch.Tensor:
            return bnb.matmul_4bit(x, bpacked.t(), bstate, bias=bias_bf) + t_bf @ B_bf.t()

        with torch.no_grad():
            bnb_row = row("bitsandbytes", bnb_call, "bnb.matmul_4bit(x, W.t(), state, bias) + t @ B^T, no_grad",
                          timing=slow)
            bnb_bare = row("bitsandbytes", lambda: bnb.matmul_4bit(x, bpacked.t(), bstate),
                           "bnb.matmul_4bit(x, W.t(), state) alone, no_grad", nb=weight_bytes + 2 * M * (K + N),
                           timing=slow)
            outs["bitsandbytes"] = bnb_call()
    dense = row("torch", lambda: x @ W_deq.t(), "dense bf16 x @ W^T (W dequantized beforehand)",
                nb=2 * N * K + 2 * M * (K + N))
    dense_lora = row("torch", dense_full, "dense bf16 x @ W^T + t @ B^T + bias", nb=2 * N * K + io_bytes)
    # Accuracy of each against a float64 oracle with the same W: max |error| / max |y|.
    y64 = x.double() @ w["W64"].t() + t.double() @ B.double().t() + bias.double()
    scale = y64.abs().max().item()
    errors = {f"{k}_rel_err": (y.double() - y64).abs().max().item() / scale for k, y in outs.items()}
    compute_floor_ms = 2 * M * N * K / flops * 1e3
    return {
        "shape": f"{M}x{N}x{K}",
        "M": M,
        "qkernels_ms": qk.median_ms,
        "qkernels_vs_bnb": None if bnb_row is None else bnb_row.median_ms / qk.median_ms,
        "api_ms": api.median_ms,
        "api_vs_bnb": None if bnb_row is None else bnb_row.median_ms / api.median_ms,
        "api_vs_dense": dense.median_ms / api.median_ms,
        "qkernels_vs_bnb_bare_matmul": None if bnb_bare is None else bnb_bare.median_ms / qk.median_ms,
        "qkernels_vs_dense": dense.median_ms / qk.median_ms,
        "qkernels_vs_dense_with_lora": dense_lora.median_ms / qk.median_ms,
        "memory_floor_ms": qk.floor_ms,
        "compute_floor_ms": compute_floor_ms,
        "qkernels_vs_floor": qk.median_ms / max(qk.floor_ms, compute_floor_ms),
        "checks": errors,
        "targets": TARGETS.get(M),
    }


def _decoded_scales(state: Any) -> torch.Tensor:
    if not state.nested:
        return state.absmax
    s2 = state.state2
    return reference.decode_nested_absmax(state.absmax, s2.absmax, s2.code, state.offset, s2.blocksize)


def print_summary(s: dict[str, Any]) -> None:
    """Print one M's headline ratios beside issue 4's targets."""

    def x(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"

    t = s["targets"] or {}
    tb = f" (target >= {t['vs_bnb_min']:g}x)" if t else ""
    td = f" (target >= {t['vs_dense_min']:g}x)" if t else ""
    print(
        f"\n{s['shape']} (MxNxK): qkernels {s['qkernels_ms']:.3f} ms; speedup vs bitsandbytes {x(s['qkernels_vs_bnb'])}"
        f"{tb}; vs dense bf16 x @ W^T {x(s['qkernels_vs_dense'])}{td}; vs dense with LoRA + bias "
        f"{x(s['qkernels_vs_dense_with_lora'])}; floors: memory {s['memory_floor_ms']:.3f} ms, compute "
        f"{s['compute_floor_ms']:.3f} ms, time / floor {s['qkernels_vs_floor']:.2f}x"
    )
    print(f"{s['shape']}: through qkernels.matmul_4bit_lora {s['api_ms']:.3f} ms: vs bitsandbytes "
          f"{x(s['api_vs_bnb'])}, vs dense bf16 {x(s['api_vs_dense'])}")
    print(f"{s['shape']}: max |error| / max |y| vs float64: {s['checks']}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: time all shapes and Ms, print the table and summaries, save the JSON."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_gemv", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", type=parse_shapes, default=list(DEFAULT_SHAPES),
                    help="comma-separated weight shapes NxK, e.g. 4096x4096,11008x4096 (default 4096x4096)")
    ap.add_argument("--ms", type=parse_ms, default=list(DEFAULT_MS), help="comma-separated M values (default 1,16)")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (a smoke test, noisier numbers)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    ap.add_argument("--results-dir", default=None, help="where to write the JSON (default benchmarks/results)")
    args = ap.parse_args(argv)
    if _native._C is None or not hasattr(_native._C, "gemv_4bit_lora_cpu"):
        print(f"qkernels native GEMV unavailable ({_native.NATIVE_ERROR or 'stale build'}): nothing to time")
        return 1
    for shape in args.shapes:
        if len(shape) != 2:
            ap.error(f"shapes must be NxK, got {shape}")

    machine = H.machine_info()
    load = H.ForeignLoad().start()
    bandwidth = H.copy_bandwidth()
    rows: list[H.Result] = []
    summaries = []
    for shape in args.shapes:
        flops = matmul_rate(shape[1], shape[0])
        r, s = bench_shape(tuple(shape), args.ms, bandwidth, flops, quick=args.quick)
        rows += r
        for si in s:
            si["dense_bf16_matmul_tflops"] = flops / 1e12
        summaries += s
    foreign = load.stop()
    H.print_results(f"fused GEMV + LoRA (r={RANK}) + bias (NF4, blocksize 64, double quant, bf16)", rows, machine,
                    bandwidth)
    if foreign is not None:
        warn = "  WARNING: other processes shared the cores; the times are suspect" if foreign > 0.1 else ""
        print(f"\nother processes used {foreign:.2f} cores on average during the timings{warn}")
    for s in summaries:
        print_summary(s)
    if not args.no_save:
        summary = {"quick": args.quick, "other_processes_cores": foreign, "rank": RANK, "per_m": summaries}
        path = H.write_json("gemv", rows, machine, bandwidth, summary=summary, results_dir=args.results_dir)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
