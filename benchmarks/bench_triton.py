"""Benchmark the large-M QLoRA path on the GPU: fused Triton dequant-GEMM + LoRA vs dequantize + cuBLAS.

For each Llama weight shape ``[N, K]`` (NF4, blocksize 64, double quant), bf16 activations ``x [M, K]`` and LoRA rank
16, three ways to compute the forward ``y = x W^T + s (x A^T) B^T`` and the input gradient
``dx = dy W + s (dy B) A``, each timed in the same process:

- ``fused-triton`` (qkernels): ``qkernels.triton_kernels`` with the LoRA down-projection (``x A^T`` / ``dy B``, a
  skinny cuBLAS GEMM) computed first and added in the kernel's epilogue.
- ``dequant+cublas`` (qkernels): ``dequantize_4bit(out=buf)`` into a reused bf16 buffer, ``torch.matmul(out=)``
  (cuBLAS), then the LoRA term with ``addmm_`` (beta=1) into the same output (DESIGN §2, strategy b).
- ``dense-cublas`` (torch): the base product alone with a dense bf16 weight, what an unquantized model pays.

Floor: ``max(2 M N K / dense matmul rate, bytes / copy bandwidth)``, both measured here on the GPU (the rate on a
8192^3 bf16 cuBLAS GEMM; bytes = activations in + packed weight + scales + output out). ``time/floor`` is 1.0 at the
floor. Each row's note has the fused result's max |difference| from the dequant+cuBLAS one, relative to its max
|value| (bf16 rounds at ~4e-3).

GPU only: without CUDA it prints why and exits 0. Run ``python -m benchmarks.bench_triton [--shapes 4096x4096]
[--ms 512,4096] [--quick] [--no-save] [--results-dir DIR]``; JSON goes to ``$OUT`` when set, else benchmarks/results.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

import qkernels
from qkernels import _backend

from . import _harness as H
from .bench_quant import parse_shapes

BLOCKSIZE = 64
RANK = 16
SCALING = 2.0  # alpha 32 / r 16
DTYPE = torch.bfloat16
DEFAULT_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))  # [N, K]: q/o, up/gate, down, 8B up
DEFAULT_MS = (512, 4096, 16384)
MIN_CALL_S = 2e-3  # calls are batched to >= 2 ms per timed sample, so the per-sample sync (~10 us) is noise


def _measure(fn: Callable[[], object], quick: bool) -> H.Stats:
    """``H.measure`` of ``fn``, batching enough calls per sample that one sample lasts >= MIN_CALL_S."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    reps = max(1, int(MIN_CALL_S / max(start.elapsed_time(end) * 1e-3, 1e-6)))

    def batch() -> None:
        for _ in range(reps):
            fn()

    s = H.measure(batch, warmup=1, min_runs=3 if quick else 7, min_time_s=0.05 if quick else 0.3)
    return H.Stats(s.median / reps, s.p10 / reps, s.p90 / reps, s.runs, s.first / reps)


def gpu_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s: ``dst.copy_(src)`` of ``nbytes`` on the GPU, read + write."""
    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    stats = H.measure(lambda: dst.copy_(src), warmup=2, min_runs=10, min_time_s=0.2)
    return 2 * nbytes / stats.median


def dense_matmul_rate(n: int = 8192) -> float:
    """bf16 cuBLAS GEMM rate in flop/s on an ``n^3`` problem (the compute side of the floor)."""
    a = torch.randn(n, n, device="cuda", dtype=DTYPE)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE)
    c = torch.empty_like(a)
    stats = _measure(lambda: torch.matmul(a, b, out=c), quick=False)
    return 2 * n**3 / stats.median


def _row(op: str, shape: tuple[int, int, int], impl: str, stats: H.Stats, nbytes: int, flops: int,
         bandwidth: float, rate: float, note: str) -> H.Result:
    """A harness row whose floor is the larger of the memory and the compute floor."""
    r = H.Result.from_stats(op, shape, DTYPE, impl, stats, nbytes, bandwidth, note=note)
    floor_s = max(nbytes / bandwidth, flops / rate)
    bound = "compute" if flops / rate >= nbytes / bandwidth else "memory"
    r.floor_ms = floor_s * 1e3
    r.vs_floor = stats.median / floor_s
    r.note = f"{note}; {2 * shape[0] * shape[1] * shape[2] / stats.median / 1e12:.0f} TFLOP/s, {bound} floor"
    return r


def bench_case(N: int, K: int, M: int, bandwidth: float, rate: float, quick: bool) -> list[H.Result]:
    """All rows for one weight shape and one M (forward and dx)."""
    from qkernels.triton_kernels import matmul_4bit_lora_dx, matmul_4bit_lora_fwd

    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(N, K, device="cuda", dtype=DTYPE, generator=g) * 0.02
    packed, state = qkernels.quantize_4bit(W, BLOCKSIZE, "nf4", double_quant=True)
    A = torch.randn(RANK, K, device="cuda", dtype=DTYPE, generator=g) * 0.02
    B = torch.randn(N, RANK, device="cuda", dtype=DTYPE, generator=g) * 0.02
    x = torch.randn(M, K, device="cuda", dtype=DTYPE, generator=g)
    dy = torch.randn(M, N, device="cuda", dtype=DTYPE, generator=g)
    buf = torch.empty(N, K, device="cuda", dtype=DTYPE)
    y, dx = torch.empty(M, N, device="cuda", dtype=DTYPE), torch.empty(M, K, device="cuda", dtype=DTYPE)
    dq_backend = _backend.resolve("dequantize_4bit", x.device, None)
    scale_bytes = state.nbytes()
    w_bytes = packed.numel() * packed.element_size() + scale_bytes
    flops = 2 * M * N * K

    def fwd_fused():
        return matmul_4bit_lora_fwd(x, packed, state, (x @ A.T).mul_(SCALING), B, out=y)

    def fwd_unfused():
        qkernels.dequantize_4bit(packed, state, out=buf)
        torch.matmul(x, buf.T, out=y)
        return y.addmm_((x @ A.T).mul_(SCALING), B.T)

    def dx_fused():
        return matmul_4bit_lora_dx(dy, packed, state, (dy @ B).mul_(SCALING), A, out=dx)

    def dx_unfused():
        qkernels.dequantize_4bit(packed, state, out=buf)
        torch.matmul(dy, buf, out=dx)
        return dx.addmm_((dy @ B).mul_(SCALING), A)

    rows = []
    for op, fused, unfused, dense, a_in, out_n in (
        ("lora_fwd", fwd_fused, fwd_unfused, lambda: torch.matmul(x, W.T, out=y), x, N),
        ("lora_dx", dx_fused, dx_unfused, lambda: torch.matmul(dy, W, out=dx), dy, K),
    ):
        got = fused().float()  # .float() copies: both write the same output buffer
        want = unfused().float()
        diff = (got - want).abs().max().item() / want.abs().max().item()
        io = a_in.numel() * 2 + M * out_n * 2
        rows.append(_row(f"{op}/fused-triton", (M, N, K), "qkernels", _measure(fused, quick), io + w_bytes, flops,
                         bandwidth, rate, f"rel diff vs dequant+cublas {diff:.1e}"))
        rows.append(_row(f"{op}/dequant+cublas", (M, N, K), "qkernels", _measure(unfused, quick),
                         io + w_bytes + 2 * N * K * 2, flops, bandwidth, rate, f"dequantize backend {dq_backend}"))
        rows.append(_row(f"{op}/dense-cublas", (M, N, K), "torch", _measure(dense, quick), io + N * K * 2, flops,
                         bandwidth, rate, "base product only, dense bf16 W"))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: time every shape and M, print the table, save the JSON."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_triton", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", type=parse_shapes, default=list(DEFAULT_SHAPES),
                    help="comma-separated weight shapes N x K (default: the Llama shapes)")
    ap.add_argument("--ms", default=",".join(map(str, DEFAULT_MS)), help="comma-separated M (tokens) values")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (a smoke test, noisier numbers)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write the JSON")
    ap.add_argument("--results-dir", default=os.environ.get("OUT") or None,
                    help="where to write the JSON (default $OUT if set, else benchmarks/results)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: skipped, it needs a CUDA GPU (the Triton kernels run only in the slow interpreter on "
              "CPU; tests/test_triton.py covers their correctness there)")
        return 0
    from qkernels.triton_kernels import triton_available

    if not triton_available("cuda"):
        print("bench_triton: skipped, triton does not import here")
        return 0
    ms = [int(m) for m in args.ms.split(",") if m.strip()]
    machine = H.machine_info()
    bandwidth, rate = gpu_copy_bandwidth(), dense_matmul_rate()
    rows: list[H.Result] = []
    with H.Deadline() as deadline:
        for N, K in args.shapes:
            for M in ms:
                rows += bench_case(N, K, M, bandwidth, rate, args.quick)
                torch.cuda.empty_cache()
    H.print_results(f"QLoRA large-M path (NF4 bs{BLOCKSIZE} double quant, bf16, r={RANK})", rows, machine, bandwidth)
    print(f"dense bf16 matmul rate (8192^3): {rate / 1e12:.0f} TFLOP/s")
    summary = {"quick": args.quick, "matmul_rate_tflops": rate / 1e12, "gpu_copy_gbps": bandwidth / 1e9,
               "fused_speedup_vs_dequant_cublas": {}, "cut_at_deadline": deadline.hit}
    by_key = {(r.op, r.shape): r for r in rows}
    for (op, shape), r in by_key.items():
        if op.endswith("/fused-triton"):
            base = by_key[(op.replace("fused-triton", "dequant+cublas"), shape)]
            summary["fused_speedup_vs_dequant_cublas"][f"{op.split('/')[0]} {shape}"] = base.median_ms / r.median_ms
    for k, v in summary["fused_speedup_vs_dequant_cublas"].items():
        print(f"{k}: fused is {v:.2f}x the speed of dequant+cuBLAS")
    if not args.no_save:
        path = H.write_json("triton", rows, machine, bandwidth, summary=summary, results_dir=args.results_dir)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

