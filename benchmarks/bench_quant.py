"""Benchmark NF4 quantize / dequantize (blocksize 64, double quant) against bitsandbytes and the memory floor.

Rows per shape (bfloat16 weight):

- ``dequantize_4bit``: qkernels (default backend: the native kernel when built), qkernels-reference (pure PyTorch),
  bitsandbytes, and torch = ``W.clone()`` (a copy of the dense weight: what a dense model pays to read W), plus
  ``out.copy_(W)`` into a preallocated ``out`` (the same copy without allocating a fresh output).
- ``quantize_4bit``: qkernels (default backend), qkernels-reference and bitsandbytes (``compress_statistics=True``).

Each qkernels row's note names the backend that ran (``qkernels._backend.resolve``) and the CPU SIMD path.

Floors: dequantize moves packed n/2 + scales (uint8 absmax, nested float32 absmax, offset) + output 2n bytes;
quantize moves input 2n + packed n/2 + scales; the clone moves 2n + 2n. Floor time = bytes / copy bandwidth.

Run ``python -m benchmarks.bench_quant [--shapes 4096x4096,11008x4096] [--quick] [--no-save]``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import qkernels
from qkernels import _backend, _native

from . import _harness as H

BLOCKSIZE = 64
QUANT_TYPE = "nf4"
DTYPE = torch.bfloat16
DEFAULT_SHAPES = ((4096, 4096),)
# Targets of the next issue (vectorized kernels), printed beside the measured ratios.
TARGETS = {"dequantize_vs_bnb_min": 15.0, "dequantize_vs_floor_max": 1.3, "quantize_vs_bnb_min": 100.0}


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """Parse ``"4096x4096,11008x4096"`` into a list of shape tuples (positive ints)."""
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            dims = tuple(int(d) for d in part.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {part!r}: expected e.g. 4096x4096") from None
        if not dims or any(d <= 0 for d in dims):
            raise argparse.ArgumentTypeError(f"bad shape {part!r}: dimensions must be positive")
        shapes.append(dims)
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def _load_bnb() -> Any:
    try:
        import bitsandbytes.functional as bnb_f
    except Exception as exc:  # bitsandbytes is the oracle, not a dependency: its rows are skipped without it
        print(f"bitsandbytes unavailable, its rows are skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return bnb_f


def backend_note(op: str, device: torch.device) -> tuple[str, str]:
    """The backend ``op`` runs on by default here, and a note naming it (with the CPU SIMD path and OpenMP)."""
    backend = _backend.resolve(op, device, None)
    if backend == "reference":
        return backend, "reference path (pure PyTorch)"
    if backend == "cpu":
        C = _native._C
        isa = C.cpu_isa_active() if hasattr(C, "cpu_isa_active") else "scalar"
        omp = ", OpenMP" if qkernels.native_info().get("openmp") else ""
        return backend, f"native CPU kernel ({isa}{omp})"
    return backend, f"native {backend} kernel"


def bench_shape(
    shape: tuple[int, ...], bandwidth: float, *, quick: bool = False, device: str = "cpu"
) -> tuple[list[H.Result], dict[str, Any]]:
    """Time every implementation for one weight shape on ``device``; return the rows and a summary of ratios and
    checks."""
    fast = dict(warmup=1, min_runs=3, min_time_s=0.1) if quick else dict(warmup=2, min_runs=5, min_time_s=0.5)
    slow = dict(warmup=1, min_runs=3, min_time_s=0.1) if quick else dict(warmup=1, min_runs=3, min_time_s=0.5)
    torch.manual_seed(0)
    W = torch.randn(*shape, dtype=DTYPE).to(device)
    n = W.numel()
    bnb_f = _load_bnb()

    packed, state = qkernels.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, double_quant=True)
    packed_bytes = packed.numel() * packed.element_size()
    scale_bytes = state.nbytes()
    deq_bytes = packed_bytes + scale_bytes + n * W.element_size()
    quant_bytes = n * W.element_size() + packed_bytes + scale_bytes
    clone_bytes = 2 * n * W.element_size()
    deq_backend, deq_note = backend_note("dequantize_4bit", W.device)
    q_backend, q_note = backend_note("quantize_4bit", W.device)

    rows: list[H.Result] = []

    def row(op: str, impl: str, fn: Any, nbytes: int, note: str = "", **kw: Any) -> H.Result:
        r = H.Result.from_stats(op, shape, DTYPE, impl, H.measure(fn, **kw), nbytes, bandwidth, note)
        rows.append(r)
        return r

    # --- dequantize
    qk = row(
        "dequantize_4bit", "qkernels", lambda: qkernels.dequantize_4bit(packed, state), deq_bytes, deq_note, **fast
    )
    row(
        "dequantize_4bit",
        "qkernels-reference",
        lambda: qkernels.dequantize_4bit(packed, state, backend="reference"),
        deq_bytes,
        "pure PyTorch",
        **fast,
    )
    checks: dict[str, Any] = {
        "default_equals_reference": torch.equal(
            qkernels.dequantize_4bit(packed, state), qkernels.dequantize_4bit(packed, state, backend="reference")
        ),
    }
    bnb_deq = bnb_q = None
    if bnb_f is not None:
        bpacked, bstate = bnb_f.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, compress_statistics=True)
        checks["packed_equals_bitsandbytes"] = torch.equal(packed.view(torch.uint8), bpacked.view(torch.uint8))
        # The first call may compile (torch.compile in bitsandbytes' default path): warmup absorbs it and
        # first_call_ms records it.
        bnb_deq = row(
            "dequantize_4bit",
            "bitsandbytes",
            lambda: bnb_f.dequantize_4bit(bpacked, bstate),
            deq_bytes,
            "bitsandbytes.functional.dequantize_4bit",
            **fast,
        )
    # Into a preallocated output (what a layer with a reused weight buffer does). bitsandbytes 0.50.2 has no CPU
    # kernel for `out=` (NotImplementedError), so on the CPU its row above, which allocates, is what its users get.
    qk_out_buf = torch.empty_like(W)
    qk_out = row(
        "dequantize_4bit", "qkernels", lambda: qkernels.dequantize_4bit(packed, state, out=qk_out_buf),
        deq_bytes, deq_note + "; out= preallocated", **fast,
    )
    ref_out = qkernels.dequantize_4bit(packed, state, backend="reference")
    checks["out_equals_reference"] = torch.equal(qk_out_buf, ref_out)
    dense = row("dequantize_4bit", "torch", lambda: W.clone(), clone_bytes, "dense baseline: W.clone()", **fast)
    # The same copy into a preallocated tensor: the difference is what a fresh output allocation (page faults on
    # first touch) costs here; every row above returns a fresh tensor too, the floor assumes none.
    dst = torch.empty_like(W).copy_(W)
    prealloc = row(
        "dequantize_4bit", "torch", lambda: dst.copy_(W), clone_bytes, "out.copy_(W), out preallocated", **fast
    )

    # --- quantize
    qq = row(
        "quantize_4bit",
        "qkernels",
        lambda: qkernels.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, double_quant=True),
        quant_bytes,
        q_note,
        **(fast if q_backend != "reference" else slow),
    )
    if q_backend != "reference":
        row(
            "quantize_4bit",
            "qkernels-reference",
            lambda: qkernels.quantize_4bit(
                W, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, double_quant=True, backend="reference"
            ),
            quant_bytes,
            "pure PyTorch",
            **slow,
        )
        ref_packed, ref_state = qkernels.quantize_4bit(
            W, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, double_quant=True, backend="reference"
        )
        checks["quantize_default_equals_reference"] = torch.equal(packed, ref_packed) and ref_state == state
    if bnb_f is not None:
        bnb_q = row(
            "quantize_4bit",
            "bitsandbytes",
            lambda: bnb_f.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, compress_statistics=True),
            quant_bytes,
            "bitsandbytes.functional.quantize_4bit(compress_statistics=True)",
            **slow,
        )

    H.fill_vs_bnb(rows)
    summary: dict[str, Any] = {
        "shape": qk.shape,
        "dequantize_backend": deq_backend,
        "quantize_backend": q_backend,
        "dequantize_qkernels_vs_bnb": None if bnb_deq is None else bnb_deq.median_ms / qk.median_ms,
        "dequantize_qkernels_vs_floor": qk.vs_floor,
        "dequantize_qkernels_vs_dense_clone": qk.median_ms / dense.median_ms,
        "dequantize_out_qkernels_vs_bnb": None if bnb_deq is None else bnb_deq.median_ms / qk_out.median_ms,
        "dequantize_out_qkernels_vs_floor": qk_out.vs_floor,
        "dense_clone_ms": dense.median_ms,
        "dense_copy_preallocated_ms": prealloc.median_ms,
        "quantize_qkernels_vs_bnb": None if bnb_q is None else bnb_q.median_ms / qq.median_ms,
        "quantize_qkernels_vs_floor": qq.vs_floor,
        "checks": checks,
        "targets_next_issue": TARGETS,
    }
    return rows, summary


def print_summary(summary: dict[str, Any]) -> None:
    """Print the headline ratios of one shape next to the next issue's targets."""

    def x(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"

    t = summary["targets_next_issue"]
    print(
        f"\n{summary['shape']}: dequantize ({summary['dequantize_backend']}) "
        f"speedup vs bitsandbytes {x(summary['dequantize_qkernels_vs_bnb'])} "
        f"(target >= {t['dequantize_vs_bnb_min']:g}x), "
        f"time/floor {x(summary['dequantize_qkernels_vs_floor'])} (target <= {t['dequantize_vs_floor_max']:g}x), "
        f"time / dense W.clone() {x(summary['dequantize_qkernels_vs_dense_clone'])}"
    )
    print(
        f"{summary['shape']}: dequantize into a preallocated out: speedup vs bitsandbytes (allocating) "
        f"{x(summary['dequantize_out_qkernels_vs_bnb'])}, time/floor {x(summary['dequantize_out_qkernels_vs_floor'])}"
    )
    print(
        f"{summary['shape']}: quantize ({summary['quantize_backend']}) speedup vs bitsandbytes "
        f"{x(summary['quantize_qkernels_vs_bnb'])} (target >= {t['quantize_vs_bnb_min']:g}x), "
        f"time/floor {x(summary['quantize_qkernels_vs_floor'])}"
    )
    print(f"{summary['shape']}: checks {summary['checks']}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: time all shapes, print the table and summaries, save the JSON."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_quant", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--shapes",
        type=parse_shapes,
        default=list(DEFAULT_SHAPES),
        help="comma-separated weight shapes, e.g. 4096x4096,11008x4096 (default 4096x4096)",
    )
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (a smoke test, noisier numbers)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    ap.add_argument("--results-dir", default=None, help="where to write the JSON (default benchmarks/results)")
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"),
                    help="where the weight lives (default: cuda when available, else cpu)")
    args = ap.parse_args(argv)

    # On a GPU machine the GPU: the results file is named after the GPU (H.machine_tag), so CPU figures there were
    # filed as the GPU's, and the CPU reference quantize spent the GPU session's minutes.
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    machine = H.machine_info()
    machine["bench_device"] = device
    load = H.ForeignLoad().start()  # covers the bandwidth measurement when it is not cached yet
    bandwidth = H.copy_bandwidth(device)
    rows: list[H.Result] = []
    summaries = []
    for shape in args.shapes:
        r, s = bench_shape(tuple(shape), bandwidth, quick=args.quick, device=device)
        rows += r
        summaries.append(s)
    foreign = load.stop()
    H.print_results("quantize / dequantize (NF4, blocksize 64, double quant)", rows, machine, bandwidth)
    if foreign is not None:
        warn = "  WARNING: other processes shared the cores; the times are suspect" if foreign > 0.1 else ""
        print(f"\nother processes used {foreign:.2f} cores on average during the timings{warn}")
    for s in summaries:
        print_summary(s)
    if not args.no_save:
        summary = {"quick": args.quick, "other_processes_cores": foreign, "shapes": summaries}
        path = H.write_json("quant", rows, machine, bandwidth, summary=summary, results_dir=args.results_dir)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
