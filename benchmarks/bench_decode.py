"""Benchmark greedy decoding of a whole causal LM, one token at a time: qkernels vs peft + bitsandbytes vs dense bf16.

What a user sees after fine-tuning (``generate()`` to evaluate), where every layer call is a GEMV and the glue between
kernels counts: a 0.5B-class Llama (Qwen2-0.5B's proportions: hidden 896, intermediate 4864, 24 layers, 14 heads,
2 KV heads, embeddings tied to the head), bfloat16, its seven projections per layer with LoRA r = 16, alpha = 32:

- ``qkernels``: ``qkernels.apply_qlora`` (NF4, blocksize 64, double quant, compute in bf16), ``eval()``.
- ``bitsandbytes``: the projections as ``bitsandbytes.nn.Linear4bit`` (same format), then ``peft.get_peft_model``.
- ``torch``: ``peft.get_peft_model`` on the dense bf16 model.

A timed call decodes ``--new-tokens`` tokens (8) from the same 16-token prompt's KV cache (cropped back to the prompt
first), under ``torch.inference_mode``; the three models are stepped round-robin (``_harness.measure_interleaved``),
so the ratios compare calls taken in the same stretch of the shared machine. Reported: milliseconds per token.

Floor: every weight byte is read once per token (the tied embedding is the head, read whole for the logits), so the
floor is the model's state-dict bytes / the measured copy bandwidth; attention over the short cache is not counted.

Run ``python -m benchmarks.bench_decode [--hidden 896 --intermediate 4864 --layers 24 --heads 14 --kv-heads 2]
[--new-tokens 8] [--quick] [--no-save]``. JSON goes to ``$OUT`` when set, else ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import _harness as H

# The same three builds as the block benchmark (same projections, LoRA r / alpha, format), put in eval mode here.
from .bench_block import DTYPE, R, build_bnb, build_dense, build_qkernels, state_bytes

DEFAULT = dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=32000)
PROMPT = 16


def dense_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The bf16 Llama, weights drawn at a trained LLM's scale (nn.Linear's default init is wider)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model.to(device, DTYPE).eval().requires_grad_(False)


def make_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], list[int]]:
    """A callable decoding ``new_tokens`` greedy tokens after ``prompt`` (its KV cache computed once here, cropped
    back to it at the start of each call)."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
    cache, first = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def decode() -> list[int]:
        with torch.inference_mode():
            extra = cache.get_seq_length() - prompt.shape[1]
            if extra:  # a negative count removes that many tokens (transformers' crop, old and new)
                cache.crop(-extra)
            tok, toks = first, []
            for _ in range(new_tokens):
                logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits
                tok = logits[:, -1].argmax(-1, keepdim=True)
                toks.append(int(tok))
        return toks

    return decode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_decode", description=__doc__.split("\n")[0])
    for k, v in DEFAULT.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens decoded per timed call")
    ap.add_argument("--impls", default="qkernels,bitsandbytes,torch", help="which implementations, in this order")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (a smoke test, noisier numbers)")
    ap.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    ap.add_argument("--results-dir", default=None, help="where to write the JSON (default $OUT or benchmarks/results)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kw = dict(warmup=1, min_runs=2, min_time_s=0.2) if args.quick else dict(warmup=1, min_runs=5, min_time_s=3.0)

    machine = H.machine_info()
    load = H.ForeignLoad().start()
    bandwidth = H.copy_bandwidth(device.type)  # the device's: the floor of a GPU run is its HBM
    dense = dense_model(args, device)
    prompt = torch.randint(3, args.vocab, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)
    shape = f"{args.layers}x{args.hidden}->{args.intermediate}"
    builders: list[tuple[str, Callable[[nn.Module], nn.Module], str]] = [
        ("qkernels", build_qkernels, "apply_qlora (NF4 bs64 double quant)"),
        ("bitsandbytes", build_bnb, "peft LoRA on bitsandbytes Linear4bit"),
        ("torch", build_dense, "peft LoRA on the dense bf16 model"),
    ]
    wanted = args.impls.split(",")
    builders = sorted((b for b in builders if b[0] in wanted), key=lambda b: wanted.index(b[0]))
    calls, notes, nbytes = {}, {}, {}
    for impl, build, note in builders:
        try:
            model = build(dense).eval()
        except ImportError as exc:
            print(f"{impl} skipped: {exc}", file=sys.stderr)
            continue
        nbytes[impl] = state_bytes(model)
        calls[impl] = make_decode(model, prompt, args.new_tokens)
        notes[impl] = note
    del dense
    gc.collect()
    stats = H.measure_interleaved(calls, **kw)
    tokens = {impl: fn() for impl, fn in calls.items()}  # the greedy tokens, for the agreement line below
    foreign = load.stop()
    rows = []
    for impl in calls:
        st, n = stats[impl], args.new_tokens
        floor_s = nbytes[impl] / bandwidth
        rows.append(H.Result(op="decode_token", shape=shape, dtype="bfloat16", impl=impl,
                             median_ms=st.median / n * 1e3, p10_ms=st.p10 / n * 1e3, p90_ms=st.p90 / n * 1e3,
                             runs=st.runs, nbytes=nbytes[impl], gbps=nbytes[impl] * n / st.median / 1e9,
                             floor_ms=floor_s * 1e3, vs_floor=st.median / n / floor_s,
                             first_call_ms=st.first / n * 1e3,
                             note=f"{notes[impl]}; weights {nbytes[impl] / 2**20:.0f} MiB; per token, "
                                  f"{n} tokens per call, timed round-robin with the others"))
    H.fill_vs_bnb(rows)
    H.print_results(f"Greedy decode, Llama {args.layers} layers (hidden {args.hidden}, intermediate "
                    f"{args.intermediate}, {args.heads} heads / {args.kv_heads} KV), LoRA r={R} on all 7 projections, "
                    f"{PROMPT}-token prompt", rows, machine, bandwidth)
    if foreign is not None:
        warn = "  WARNING: other processes shared the cores; the times are suspect" if foreign > 0.1 else ""
        print(f"other processes used {foreign:.2f} cores on average during the timings{warn}")
    summary: dict[str, Any] = {"shape": shape, **{k: getattr(args, k) for k in DEFAULT}, "new_tokens":
                               args.new_tokens, "r": R, "weights_bytes": nbytes, "foreign_load_cores": foreign}
    by = {r.impl: r for r in rows}
    if "qkernels" in by:
        ref = tokens["qkernels"]
        for other, label in (("bitsandbytes", "peft_bnb"), ("torch", "peft_dense")):
            if other in by:
                summary[f"time_qkernels_vs_{label}"] = by[other].median_ms / by["qkernels"].median_ms
                same = sum(a == b for a, b in zip(ref, tokens[other], strict=True))
                summary[f"same_tokens_as_{label}"] = f"{same}/{len(ref)}"
                print(f"qkernels vs {label}: {summary[f'time_qkernels_vs_{label}']:.2f}x faster per token (median); "
                      f"greedy tokens equal: {same}/{len(ref)}")
    if not args.no_save:
        out_dir = args.results_dir or os.environ.get("OUT") or None
        path = H.write_json("decode", rows, machine, bandwidth, summary=summary, results_dir=out_dir)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
