"""Benchmark one QLoRA layer's training step (forward + backward) against peft + bitsandbytes and peft on dense bf16.

One ``[M, K] -> [M, N]`` projection with a frozen 4-bit weight (NF4, blocksize 64, double quant) and a LoRA adapter
(r = 16, alpha = 32, no dropout), bfloat16 activations (``--dtype float16`` / ``float32`` for the others); the
step is ``y = layer(x); y.backward(dy)`` with x requiring grad (every layer but the first of a network needs dX), so
the backward computes dX, dA, dB.

Rows per shape:

- ``qkernels``: ``qkernels.matmul_4bit_lora`` (default backend: the native dequantize into a reused buffer + BLAS on
  the CPU, see ``qkernels._linear``).
- ``bitsandbytes``: peft's LoRA layer on a ``bitsandbytes.nn.Linear4bit`` (what QLoRA users run today).
- ``torch``: peft's LoRA layer on a dense bf16 ``nn.Linear`` (the 16-bit LoRA baseline), and the dense layer without
  LoRA (``x @ W.T`` forward + dX backward: the matmul work every implementation must do).

Floor: the matmul work, ``2 * 2MNK`` flops (forward and dX) plus the LoRA products, at the matmul rate measured in
the same run in the activations' dtype (``torch.matmul`` of 4096^3); the weight traffic is far below it. float16 /
bfloat16 on a CPU without a GEMM for them: at the float32 rate (what qkernels multiplies in there; torch's rate in
that dtype on such a CPU is no floor).

Run ``python -m benchmarks.bench_train [--shapes 4096x4096] [--rows 512] [--dtype bfloat16] [--quick] [--no-save]``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import qkernels

from . import _harness as H
from .bench_quant import backend_note, parse_shapes

R, ALPHA, BLOCKSIZE = 16, 32, 64
DTYPE = torch.bfloat16  # default; --dtype changes it
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CPU_DEFAULT = {"shapes": [(4096, 4096)], "rows": [512]}
GPU_DEFAULT = {"shapes": [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)], "rows": [4096, 16384]}
# Targets of issue 4, printed beside the measured ratios.
TARGETS = {"cpu_vs_peft_bnb_min": 1.3, "cpu_vs_peft_dense_min": 1.0, "gpu_vs_dense_fwd_bwd_min": 0.9}


def measure_matmul_rate(device: torch.device, dtype: torch.dtype = DTYPE, n: int = 4096) -> float:
    """bf16 matmul rate of this machine in flop/s: ``a @ b`` for ``n x n`` operands, median time."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    stats = H.measure(lambda: a @ b, warmup=2, min_runs=5, min_time_s=0.5)
    return 2 * n**3 / stats.median


def _peft_layer(base: torch.nn.Module, **lora_config: Any) -> torch.nn.Module:
    """``base`` wrapped by peft's LoRA (r = R, alpha = ALPHA, no dropout; ``lora_config`` adds LoraConfig fields,
    e.g. ``use_dora=True`` for bench_dora)."""
    from peft import LoraConfig, get_peft_model

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = base

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"], bias="none", **lora_config)
    model = get_peft_model(Wrap(), cfg)
    return model


def _bnb_linear(W: torch.Tensor) -> torch.nn.Module | None:
    """peft's usual base: a bitsandbytes NF4 Linear4bit (double quant) holding W, computing in W's dtype."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # the oracle, not a dependency
        print(f"bitsandbytes unavailable, its rows are skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    N, K = W.shape
    lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=W.dtype, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(W.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                   blocksize=BLOCKSIZE)
    return lin.to(W.device)  # the first device move quantizes (DESIGN §5)


def _step(fn: Any, x: torch.Tensor, dy: torch.Tensor) -> Any:
    def run() -> None:
        xg = x.detach().requires_grad_()
        fn(xg).backward(dy)

    return run


def bench_shape(shape: tuple[int, int], M: int, rate: float, bandwidth: float, *, quick: bool,
                dtype: torch.dtype = DTYPE) -> tuple[list, dict]:
    """Time a training step of every implementation at one (weight shape, rows); return rows and a summary."""
    dname = str(dtype).removeprefix("torch.")
    kw = dict(warmup=1, min_runs=3, min_time_s=0.2) if quick else dict(warmup=2, min_runs=5, min_time_s=1.0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    N, K = shape
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(N, K, generator=g) * 0.02).to(dtype).to(device)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    dy = torch.randn(M, N, generator=g).to(dtype).to(device)
    packed, state = qkernels.quantize_4bit(W, BLOCKSIZE, "nf4", double_quant=True)
    A = (torch.randn(R, K, generator=g) / K**0.5).to(device).requires_grad_()
    B = (torch.randn(N, R, generator=g) * 0.01).to(device).requires_grad_()
    s = ALPHA / R
    flops = 2 * (2 * M * N * K) + 3 * 2 * M * R * (N + K)
    floor_s = flops / rate
    nbytes = packed.numel() + state.nbytes() + 2 * (M * K + M * N) * 2  # weight once + x, y, dy, dx
    # (key, impl, step, note), timed round-robin (H.measure_interleaved): one step of each per round, so every row
    # sees the same stretch of the shared machine's state (timed one after the other, the baselines moved by 20 % and
    # more between processes)
    entries: list[tuple[str, str, Any, str]] = []
    backend, note = backend_note("linear_4bit", device)
    entries.append(("qkernels", "qkernels", lambda xg: qkernels.matmul_4bit_lora(xg, packed, state, A, B, s),
                    f"matmul_4bit_lora, {note}"))
    bnb_lin = _bnb_linear(W)
    if bnb_lin is not None:
        entries.append(("peft_bnb", "bitsandbytes", _peft_layer(bnb_lin), "peft LoRA on bitsandbytes Linear4bit"))
    dense = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(W)
    dense.weight.requires_grad_(False)
    entries.append(("peft_dense", "torch", _peft_layer(dense), f"peft LoRA on dense {dname} nn.Linear"))
    entries.append(("plain", "torch", lambda xg: xg @ W.t(), "dense x @ W.T, no LoRA (the matmul work alone)"))
    stats = H.measure_interleaved({key: _step(fn, x, dy) for key, _, fn, _ in entries}, **kw)
    rows: list[H.Result] = []
    by: dict[str, H.Result] = {}
    for key, impl, _, rnote in entries:
        st = stats[key]
        by[key] = H.Result(op="train_step", shape=f"{M}x{K}->{N}", dtype=dname, impl=impl, median_ms=st.median * 1e3,
                           p10_ms=st.p10 * 1e3, p90_ms=st.p90 * 1e3, runs=st.runs, nbytes=nbytes,
                           gbps=nbytes / st.median / 1e9, floor_ms=floor_s * 1e3, vs_floor=st.median / floor_s,
                           first_call_ms=st.first * 1e3, note=rnote + "; timed round-robin with the others")
        rows.append(by[key])
    qk, peft_bnb, peft_dense, plain = by["qkernels"], by.get("peft_bnb"), by["peft_dense"], by["plain"]
    H.fill_vs_bnb(rows)
    summary = {
        "shape": f"{M}x{K}->{N}",
        "dtype": dname,
        "backend": backend,
        "matmul_rate_tflops": rate / 1e12,
        "qkernels_vs_peft_bnb": None if peft_bnb is None else peft_bnb.median_ms / qk.median_ms,
        "qkernels_vs_peft_dense": peft_dense.median_ms / qk.median_ms,
        "qkernels_vs_dense_no_lora": plain.median_ms / qk.median_ms,
        "qkernels_vs_floor": qk.vs_floor,
        "targets": TARGETS,
    }
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: time every shape, print the table and ratios, save the JSON."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", type=parse_shapes, default=None, help="weight shapes NxK, e.g. 4096x4096,11008x4096")
    ap.add_argument("--rows", default=None, help="comma-separated M (tokens), default 512 CPU / 4096,16384 GPU")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="activations' dtype (default bfloat16)")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (a smoke test, noisier numbers)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    ap.add_argument("--results-dir", default=None, help="where to write the JSON (default benchmarks/results)")
    args = ap.parse_args(argv)
    defaults = GPU_DEFAULT if torch.cuda.is_available() else CPU_DEFAULT
    shapes = args.shapes or defaults["shapes"]
    rows_m = [int(m) for m in args.rows.split(",")] if args.rows else defaults["rows"]
    if args.quick and not args.shapes and not torch.cuda.is_available():
        shapes, rows_m = [(1024, 1024)], [128]

    machine = H.machine_info()
    load = H.ForeignLoad().start()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bandwidth = H.copy_bandwidth(device.type)  # the device's: the floor of a GPU run is its HBM
    dtype = DTYPES[args.dtype]
    from qkernels import _linear

    # what qkernels multiplies in at this M on this device (float32 for float16 / bfloat16 on a CPU without their GEMM)
    rate_dtype = _linear.cpu_matmul_dtype(dtype) if device.type == "cpu" else dtype
    rate = measure_matmul_rate(device, rate_dtype)
    results, summaries = [], []
    for shape in shapes:
        for M in rows_m:
            r, s = bench_shape(tuple(shape), M, rate, bandwidth, quick=args.quick, dtype=dtype)
            results += r
            summaries.append(s)
    foreign = load.stop()
    H.print_results(f"QLoRA training step, one layer (r={R}, NF4 bs {BLOCKSIZE} + double quant, {args.dtype})",
                    results, machine, bandwidth)
    rate_name = str(rate_dtype).removeprefix("torch.")
    print(f"{rate_name} matmul rate: {rate / 1e12:.3f} TFLOP/s (floor = flops / this rate)")
    if foreign is not None:
        warn = "  WARNING: other processes shared the cores; the times are suspect" if foreign > 0.1 else ""
        print(f"other processes used {foreign:.2f} cores on average during the timings{warn}")
    for s in summaries:
        bnb = "n/a" if s["qkernels_vs_peft_bnb"] is None else f"{s['qkernels_vs_peft_bnb']:.2f}x"
        print(f"{s['shape']}: qkernels vs peft+bitsandbytes {bnb} (target >= {TARGETS['cpu_vs_peft_bnb_min']}x on "
              f"the CPU), vs peft dense {s['dtype']} {s['qkernels_vs_peft_dense']:.2f}x, vs dense without LoRA "
              f"{s['qkernels_vs_dense_no_lora']:.2f}x, time/floor {s['qkernels_vs_floor']:.2f}x")
    if not args.no_save:
        summary = {"per_shape": summaries, "foreign_load_cores": foreign}
        path = H.write_json("train", results, machine, bandwidth, summary=summary, results_dir=args.results_dir)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
