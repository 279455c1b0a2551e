"""Benchmark DoRA ("QDoRA") on one 4-bit layer: qkernels vs peft's DoRA on a bitsandbytes ``Linear4bit``.

A ``[K] -> [N]`` projection with a frozen NF4 weight (blocksize 64, double quant, bf16 compute), a DoRA adapter
(``use_dora=True``, r = 16, alpha = 32, no dropout), bfloat16 activations:

- ``decode``: one token (M = 1) under ``torch.no_grad``, the layer in eval mode (a ``generate`` step);
- ``train``: ``y = layer(x); y.backward(dy)`` with M rows and x requiring grad (dX, dA, dB and the magnitude's
  gradient).

Rows: qkernels' ``QLoRALinear(use_dora=True)`` and, as the cost of DoRA itself, the same layer with a plain LoRA
adapter; peft's DoRA layer on bitsandbytes' ``Linear4bit`` (what QDoRA users run today). Both implementations
recompute ``||W + s B A||`` on every forward, as DoRA defines it; qkernels computes it a slab of rows at a time in
reused buffers (``qkernels.dora.dora_weight_norm_4bit``), peft over whole ``[N, K]`` temporaries.

Floor (decode): the packed weight's bytes at the measured copy bandwidth (the norm's extra work is not counted, so it
is a lower bound; plain LoRA's row shows what DoRA adds to it).

Run ``python -m benchmarks.bench_dora [--shape 4096x4096] [--rows 256] [--quick] [--no-save]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

import qkernels

from . import _harness as H
from .bench_train import ALPHA, BLOCKSIZE, R, _bnb_linear, _peft_layer  # the same layer and LoRA

DTYPE = torch.bfloat16


def _qkernels_layer(W: torch.Tensor, use_dora: bool) -> torch.nn.Module:
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W.float())
    return qkernels.QLoRALinear.from_linear(lin, r=R, lora_alpha=ALPHA, use_dora=use_dora, compute_dtype=DTYPE,
                                            init_lora_weights="gaussian")


def _peft_bnb_layer(W: torch.Tensor) -> torch.nn.Module | None:
    """peft's DoRA on bitsandbytes' Linear4bit holding W (bench_train's layers, with use_dora)."""
    base = _bnb_linear(W)
    if base is None:
        return None
    return _peft_layer(base, use_dora=True, init_lora_weights="gaussian")


def _decode(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    layer.eval()

    def run() -> None:
        with torch.no_grad():
            layer(x)

    return run


def _train(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    layer.train()

    def run() -> None:
        xg = x.detach().requires_grad_()
        layer(xg).backward(dy)

    return run


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: time decode and a training step of each implementation, print and save."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_dora", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default=None, help="weight NxK (default 4096x4096; 1024x1024 with --quick)")
    ap.add_argument("--rows", type=int, default=None, help="M of the training step (default 256; 64 with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (a smoke test, noisier numbers)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    ap.add_argument("--results-dir", default=None, help="where to write the JSON (default benchmarks/results)")
    args = ap.parse_args(argv)
    shape = args.shape or ("1024x1024" if args.quick else "4096x4096")
    N, K = (int(v) for v in shape.lower().split("x"))
    M = args.rows or (64 if args.quick else 256)
    kw = dict(warmup=1, min_runs=3, min_time_s=0.2) if args.quick else dict(warmup=2, min_runs=5, min_time_s=1.0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    machine = H.machine_info()
    load = H.ForeignLoad().start()
    bandwidth = H.copy_bandwidth()
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(N, K, generator=g) * 0.02).to(DTYPE).to(device)
    x1 = torch.randn(1, K, generator=g).to(DTYPE).to(device)
    xm = torch.randn(M, K, generator=g).to(DTYPE).to(device)
    dy = torch.randn(M, N, generator=g).to(DTYPE).to(device)
    packed_bytes = N * K // 2 + N * K // BLOCKSIZE  # NF4 codes + 8-bit scales (the nested level is negligible)

    layers: list[tuple[str, str, torch.nn.Module | None]] = [
        ("qkernels", "QLoRALinear, DoRA", _qkernels_layer(W, True).to(device)),
        ("qkernels", "QLoRALinear, plain LoRA (what DoRA adds)", _qkernels_layer(W, False).to(device)),
        ("bitsandbytes", "peft DoRA on bitsandbytes Linear4bit", _peft_bnb_layer(W)),
    ]
    rows: list[H.Result] = []
    for phase in ("decode", "train"):
        phase_rows = []
        for impl, note, layer in layers:
            if layer is None:
                continue
            fn = _decode(layer, x1) if phase == "decode" else _train(layer, xm, dy)
            st = H.measure(fn, **kw)
            m = 1 if phase == "decode" else M
            phase_rows.append(H.Result.from_stats(f"dora_{phase}", (m, K, N), DTYPE, impl, st, packed_bytes,
                                                  bandwidth, note=note))
        H.fill_vs_bnb(phase_rows)
        rows += phase_rows
    foreign = load.stop()
    H.print_results(f"DoRA on one 4-bit layer {N}x{K} (r={R}, NF4 bs {BLOCKSIZE} + double quant, bf16)", rows,
                    machine, bandwidth)
    if foreign is not None:
        warn = "  WARNING: other processes shared the cores; the times are suspect" if foreign > 0.1 else ""
        print(f"other processes used {foreign:.2f} cores on average during the timings{warn}")
    summary: dict[str, Any] = {"shape": f"{N}x{K}", "rows": M, "r": R, "foreign_load_cores": foreign}
    for phase in ("decode", "train"):
        by = {(r.impl, "plain LoRA" not in r.note): r for r in rows if r.op == f"dora_{phase}"}
        dora, lora, bnb = by.get(("qkernels", True)), by.get(("qkernels", False)), by.get(("bitsandbytes", True))
        if dora is not None and bnb is not None:
            summary[f"{phase}_qkernels_vs_peft_bnb"] = bnb.median_ms / dora.median_ms
        if dora is not None and lora is not None:
            summary[f"{phase}_dora_over_lora"] = dora.median_ms / lora.median_ms
        print(f"{phase}: " + ", ".join(f"{k.split('_', 1)[1]} {v:.2f}x" for k, v in summary.items()
                                         if k.startswith(phase)))
    if not args.no_save:
        path = H.write_json("dora", rows, machine, bandwidth, summary=summary, results_dir=args.results_dir)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
