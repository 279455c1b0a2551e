"""Benchmark a training step of a whole Llama decoder block: qkernels vs peft + bitsandbytes vs peft on dense bf16.

The block is transformers' ``LlamaDecoderLayer`` (RMSNorm, attention with RoPE via SDPA, causal, SwiGLU MLP) in
bfloat16. Its seven projections (q/k/v/o, gate/up/down) get LoRA r = 16, alpha = 32, no dropout:

- ``qkernels``: ``qkernels.apply_qlora`` (NF4, blocksize 64, double quant, compute in bf16).
- ``bitsandbytes``: the projections as ``bitsandbytes.nn.Linear4bit`` (same format, quantized by bitsandbytes), then
  ``peft.get_peft_model`` (peft's bnb LoRA layer): what QLoRA users run today.
- ``torch``: ``peft.get_peft_model`` on the dense bf16 block (16-bit LoRA, no quantization).

A step is ``y = block(x); y.backward(dy)`` with x requiring grad (a block inside a network needs dX); gradients of the
LoRA weights are set to None between steps. The optimizer update (AdamW over 2 * 7 LoRA matrices) is left out: it is
the same small work for all three.

Timing: the three models are stepped round-robin (``_harness.measure_interleaved``: one step of each per round), so
every implementation sees the same stretch of the shared VM's state (timed one after the other, the baselines' medians
moved by 20-35 % between processes, and the ratio with them), and each step starts with the caches the other two left,
as a layer's step does inside a network (its weights and saved activations cold): the times are higher than a lone
model stepped in a loop.

Memory, per implementation: ``weights`` = bytes of the block's state dict (packed weights, scales, LoRA, norms);
``step peak`` = the most memory in use during the first two steps above what was in use before them (activations
saved for backward, gradients, workspaces). On a GPU: ``torch.cuda.max_memory_allocated`` (reset before). On the
CPU: the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident size
before the steps (tracemalloc does not see torch's allocations).

Floor: the projections' matmul work, ``2 * 2 M N K`` summed over the seven (forward and dX), at the bf16 matmul rate
measured in the same run; attention, norms and the LoRA products are not counted, so the floor is a lower bound.

Sizes: the real Llama-2-7B block (hidden 4096, intermediate 11008, 32 heads) is the GPU default (``--llama7b``);
the CPU default is hidden 1024, intermediate 2816, 8 heads, 256 tokens (the same proportions; a step of the 7B block
takes seconds per implementation on a 2-core CPU).

Run ``python -m benchmarks.bench_block [--hidden 1024 --intermediate 2816 --heads 8 --tokens 256] [--kv-heads 2]
[--llama7b] [--quick] [--no-save]``. JSON goes to ``$OUT`` when set, else ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import qkernels

from . import _harness as H
from .bench_train import measure_matmul_rate

R, ALPHA, BLOCKSIZE = 16, 32, 64
DTYPE = torch.bfloat16
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CPU_DEFAULT = dict(hidden=1024, intermediate=2816, heads=8, tokens=256)
GPU_DEFAULT = dict(hidden=4096, intermediate=11008, heads=32, tokens=4096)


class Block(nn.Module):
    """One ``LlamaDecoderLayer`` with its rotary embedding precomputed for ``tokens`` positions."""

    def __init__(self, hidden: int, intermediate: int, heads: int, tokens: int, device: torch.device,
                 kv_heads: int | None = None) -> None:
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                          num_key_value_heads=kv_heads or heads, max_position_embeddings=max(tokens, 2048))
        cfg._attn_implementation = "sdpa"
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        pos = torch.arange(tokens, device=device)[None]
        cos, sin = LlamaRotaryEmbedding(cfg).to(device)(torch.zeros(1, dtype=DTYPE, device=device), pos)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x, position_embeddings=(self.cos, self.sin))
        return out[0] if isinstance(out, tuple) else out


def dense_block(args: argparse.Namespace, device: torch.device) -> Block:
    torch.manual_seed(0)
    block = Block(args.hidden, args.intermediate, args.heads, args.tokens, device,
                  getattr(args, "kv_heads", None)).to(device, DTYPE)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.02)  # a trained LLM's scale; nn.Linear's default init is wider
    block.requires_grad_(False)
    return block


def build_qkernels(dense: Block) -> nn.Module:
    return qkernels.apply_qlora(copy.deepcopy(dense), target_modules=PROJ, r=R, lora_alpha=ALPHA,
                                compute_dtype=DTYPE, blocksize=BLOCKSIZE, double_quant=True, log_every=100)


def _peft(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PROJ))


def build_bnb(dense: Block) -> nn.Module:
    import bitsandbytes as bnb

    model = copy.deepcopy(dense)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in PROJ:
            lin = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False, compute_dtype=DTYPE,
                                    compress_statistics=True, quant_type="nf4")
            lin.weight = bnb.nn.Params4bit(m.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                           compress_statistics=True, blocksize=BLOCKSIZE)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, lin.to(m.weight.device))  # first move quantizes (DESIGN §5)
    model.is_loaded_in_4bit = True  # peft then uses its bitsandbytes LoRA layer
    return _peft(model)


def build_dense(dense: Block) -> nn.Module:
    return _peft(copy.deepcopy(dense))


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict (packed weights and quantization state included), each storage once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _proc_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def step_peak_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory above the resting state over two calls of ``step`` (see the module docstring), or None."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        _malloc_trim()  # give memory freed by earlier builds back to the OS, or the steps would reuse it unseen
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
        before = _proc_kib("VmRSS")
        step()
        step()
        return (_proc_kib("VmHWM") - before) * 1024
    except OSError:
        return None


def make_step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * len(PROJ), f"expected {2 * len(PROJ)} LoRA matrices, found {len(params)} trainable"

    def step() -> None:
        for p in params:
            p.grad = None
        model(x.detach().requires_grad_()).backward(dy)

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_block", description=__doc__.split("\n")[0])
    for k in ("hidden", "intermediate", "heads", "tokens"):
        ap.add_argument(f"--{k}", type=int, default=None)
    ap.add_argument("--kv-heads", type=int, default=None,
                    help="key / value heads (grouped-query attention, as Llama 3 / Qwen / Mistral); default: --heads")
    ap.add_argument("--llama7b", action="store_true", help="the real Llama-2-7B block size (the GPU default)")
    ap.add_argument("--impls", default="qkernels,bitsandbytes,torch", help="which implementations, in this order")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (a smoke test, noisier numbers)")
    ap.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    ap.add_argument("--results-dir", default=None, help="where to write the JSON (default $OUT or benchmarks/results)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = GPU_DEFAULT if (args.llama7b or device.type == "cuda") else CPU_DEFAULT
    for k, v in size.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    kw = dict(warmup=1, min_runs=3, min_time_s=0.2) if args.quick else dict(warmup=2, min_runs=7, min_time_s=2.0)

    machine = H.machine_info()
    load = H.ForeignLoad().start()
    bandwidth = H.copy_bandwidth(device.type)  # the device's: the floor of a GPU run is its HBM
    rate = measure_matmul_rate(device)
    dense = dense_block(args, device)
    g = torch.Generator().manual_seed(1)
    M, d = args.tokens, args.hidden
    x = torch.randn(1, M, d, generator=g).to(device, DTYPE)
    dy = torch.randn(1, M, d, generator=g).to(device, DTYPE)
    nk = sum(m.in_features * m.out_features for n, m in dense.named_modules() if n.rsplit(".", 1)[-1] in PROJ)
    flops = 2 * 2 * M * nk
    floor_s = flops / rate
    shape = f"{M}x{d}->{args.intermediate}" + (f"-kv{args.kv_heads}" if args.kv_heads else "")

    builders: list[tuple[str, Callable[[Block], nn.Module], str]] = [
        ("qkernels", build_qkernels, "apply_qlora (NF4 bs64 double quant)"),
        ("bitsandbytes", build_bnb, "peft LoRA on bitsandbytes Linear4bit"),
        ("torch", build_dense, "peft LoRA on the dense bf16 block"),
    ]
    wanted = args.impls.split(",")
    builders = sorted((b for b in builders if b[0] in wanted), key=lambda b: wanted.index(b[0]))
    # One throwaway step of each first: one-time costs (thread pools, BLAS and SDPA workspaces, bitsandbytes' and
    # peft's lazy setup) would otherwise land in the memory peak of whichever implementation runs first.
    for _, build, _ in builders:
        warm = build(dense)
        make_step(warm, x, dy)()
        del warm
    gc.collect()
    # Memory first, one implementation at a time (each model built alone, its peak over two steps); then the
    # timing, all models alive and stepped round-robin (H.measure_interleaved): the ratios compare steps taken in the
    # same stretch of the machine's state.
    mem, notes, built = {}, {}, []
    for impl, build, note in builders:
        try:
            model = build(dense)
        except ImportError as exc:
            print(f"{impl} skipped: {exc}", file=sys.stderr)
            continue
        peak = step_peak_bytes(make_step(model, x, dy), device)
        mem[impl] = {"weights_bytes": state_bytes(model), "step_peak_bytes": peak}
        notes[impl] = note
        built.append(impl)
        del model
        gc.collect()
    steps = {}
    for impl in built:
        build = next(b[1] for b in builders if b[0] == impl)
        steps[impl] = make_step(build(dense), x, dy)
    stats = H.measure_interleaved(steps, **kw)
    rows = []
    for impl in built:
        st, weights, peak = stats[impl], mem[impl]["weights_bytes"], mem[impl]["step_peak_bytes"]
        peak_txt = "n/a" if peak is None else f"{peak / 2**20:.1f}"
        rows.append(H.Result(op="block_train_step", shape=shape, dtype="bfloat16", impl=impl,
                             median_ms=st.median * 1e3, p10_ms=st.p10 * 1e3, p90_ms=st.p90 * 1e3, runs=st.runs,
                             nbytes=weights, gbps=weights / st.median / 1e9, floor_ms=floor_s * 1e3,
                             vs_floor=st.median / floor_s, first_call_ms=st.first * 1e3,
                             note=f"{notes[impl]}; weights {weights / 2**20:.1f} MiB, step peak {peak_txt} MiB; "
                                  "timed round-robin with the others"))
    del steps
    gc.collect()
    foreign = load.stop()
    H.fill_vs_bnb(rows)
    kv = f" ({args.kv_heads} key / value)" if args.kv_heads else ""
    H.print_results(f"Llama block training step (hidden {d}, intermediate {args.intermediate}, {args.heads} heads{kv}, "
                    f"{M} tokens, LoRA r={R} on all 7 projections)", rows, machine, bandwidth)
    print(f"bf16 matmul rate: {rate / 1e12:.3f} TFLOP/s; floor = projections' forward + dX flops / this rate")
    if foreign is not None:
        warn = "  WARNING: other processes shared the cores; the times are suspect" if foreign > 0.1 else ""
        print(f"other processes used {foreign:.2f} cores on average during the timings{warn}")
    by = {r.impl: r for r in rows}
    summary: dict[str, Any] = {"shape": shape, "hidden": d, "intermediate": args.intermediate, "heads": args.heads,
                               "kv_heads": args.kv_heads or args.heads,
                               "tokens": M, "r": R, "memory": mem, "foreign_load_cores": foreign,
                               "matmul_rate_tflops": rate / 1e12}
    if "qkernels" in by:
        qk = by["qkernels"]
        for other, label in (("bitsandbytes", "peft_bnb"), ("torch", "peft_dense")):
            if other in by:
                summary[f"time_qkernels_vs_{label}"] = by[other].median_ms / qk.median_ms  # > 1: qkernels faster
                o, q = mem[other], mem["qkernels"]
                summary[f"weights_{label}_over_qkernels"] = o["weights_bytes"] / q["weights_bytes"]
                if o["step_peak_bytes"] and q["step_peak_bytes"]:
                    summary[f"step_peak_{label}_over_qkernels"] = o["step_peak_bytes"] / q["step_peak_bytes"]
                print(f"qkernels vs {label}: {summary[f'time_qkernels_vs_{label}']:.2f}x faster (median), weights "
                      f"{summary[f'weights_{label}_over_qkernels']:.2f}x smaller, step peak "
                      + (f"{summary[f'step_peak_{label}_over_qkernels']:.2f}x smaller"
                         if f"step_peak_{label}_over_qkernels" in summary else "n/a"))
    if not args.no_save:
        out_dir = args.results_dir or os.environ.get("OUT") or None
        path = H.write_json("block", rows, machine, bandwidth, summary=summary, results_dir=out_dir)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
