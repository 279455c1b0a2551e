"""Triage for a ``tests/fuzz_vs_peft.py`` mismatch: is one of qkernels' LoRA layers less accurate, or does the model
amplify rounding? Replays a case and, at the comparison named, runs every LoRA layer of ours, of peft and of the
float64 reference on the reference's own input to that layer (captured by a forward hook), and prints each layer's
output error against the reference layer's for ours and for peft.

    python tests/fuzz_local.py --seed 45 --case 133 --label "logits[ad0]"

Each layer within ~2x peft's error given the same input, with the model's output off by more, points at the model
(a saturated softmax, an unscaled attention: the module docstring of fuzz_vs_peft.py, "Resampling"); a layer far off
is a qkernels bug to bisect.

A gradient comparison of a training step (flow ``c``, a label ``grad step S <parameter>``) is triaged the same way
backwards: the reference's step is rerun with hooks that capture, at every LoRA layer, its input and the gradient
arriving at its output; then every layer of ours, of peft and of the reference runs forward and backward on those
two (the same dropout seed for the three: the flows draw their masks identically), and each LoRA parameter's gradient
error is printed for ours and for peft, the compared parameter's layer first (``all gradients step S``: every layer).

    python tests/fuzz_local.py --seed 55 --case 42 --label "grad step 1 model.decoder.layers.0.self_attn.v_proj"
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_vs_peft as F  # noqa: E402 - beside this script


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--case", type=int, required=True)
    ap.add_argument("--arch", default=None, help="as given to fuzz_vs_peft.py")
    ap.add_argument("--label", required=True, help="the comparison's label (its start), e.g. 'logits[default]'")
    args = ap.parse_args(argv)
    import torch
    import transformers

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    F.patch_bitsandbytes()
    seen: list = []  # the models logits() ran, in order: a comparison's ours, peft, reference are the last three
    inputs: dict = {}
    logits, compare, flow_c = F.logits, F.compare, F.flow_c
    training: dict = {}

    def flow_c_spy(spec, Q, theirs, ref, inputs_, ctx):
        training.update(models=[Q, theirs, ref], inputs=inputs_, seed=spec["weights_seed"])
        return flow_c(spec, Q, theirs, ref, inputs_, ctx)

    def logits_spy(model, x, dtype=None):
        seen.append(model)
        inputs["x"] = x
        return logits(model, x, dtype)

    done: set = set()

    def local(label, *a, **kw):
        grad = label.startswith("grad step ") or label.startswith("all gradients step ")
        if label.startswith(args.label) and grad and training and label not in done:
            done.add(label)
            words = label.split()
            step, name = (words[2], words[3]) if words[0] == "grad" else (words[3], "")
            report_grads(training["models"], training["inputs"], training["seed"] + int(step), name)
        elif label.startswith(args.label) and len(seen) >= 3:
            report(seen[-3:], inputs["x"])
        return compare(label, *a, **kw)

    F.logits, F.compare, F.flow_c = logits_spy, local, flow_c_spy
    spec = F.make_spec(args.seed, args.case, args.arch.split(",") if args.arch else None)
    print(F.spec_line(spec))
    with tempfile.TemporaryDirectory() as d:
        ctx = F.run_case(spec, Path(d))
    F.logits, F.compare, F.flow_c = logits, compare, flow_c
    for f, (o, detail) in ctx.results.items():
        print(f"{f:12s} {o:14s} {detail}")
    return 0


def report(models: list, x: dict) -> None:
    import torch

    layers: dict[str, dict] = {}
    hooks = []
    for key, m in zip(("ours", "peft", "ref"), models, strict=True):
        for name, mod in m.named_modules():
            if name and ("lora_A" in dict(mod.named_children()) or "lora_embedding_A" in dict(mod.named_children())):
                short = name.removeprefix("base_model.model.")

                def hook(mm, inp, out, key=key, short=short):
                    layers.setdefault(short, {})[key] = (inp[0].detach().clone(), mm)

                hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for m in models:
            m(**x)
    for h in hooks:
        h.remove()
    print(f"each LoRA layer on the reference's input (x {tuple(next(iter(x.values())).shape)}):")
    for short, d in layers.items():
        if len(d) < 3:
            continue
        x_ref = d["ref"][0]
        with torch.no_grad():
            ys = {k: d[k][1](x_ref.to(d[k][0].dtype) if x_ref.is_floating_point() else x_ref).double() for k in d}
        e_o, e_p = ((ys[k] - ys["ref"]).abs().max().item() for k in ("ours", "peft"))
        print(f"  {short}: ours {e_o:.3g}  peft {e_p:.3g}  ratio {e_o / max(e_p, 1e-300):.2f}  "
              f"scale {ys['ref'].abs().max().item():.3g}")


def _lora_layers(model) -> dict:
    """Short name -> module, for every LoRA layer of ``model``."""
    out = {}
    for name, mod in model.named_modules():
        if name and ("lora_A" in dict(mod.named_children()) or "lora_embedding_A" in dict(mod.named_children())):
            out[name.removeprefix("base_model.model.")] = mod
    return out


def report_grads(models: list, batch: dict, seed: int, param: str) -> None:
    """Each LoRA layer's parameter gradients given the reference's input and output gradient (module docstring)."""
    import torch

    ours, peft, ref = models
    captured: dict[str, dict] = {}
    hooks = []
    for short, mod in _lora_layers(ref).items():
        def fwd(mm, inp, out, short=short):
            captured.setdefault(short, {})["x"] = inp[0].detach().clone()

        def bwd(mm, gin, gout, short=short):
            captured.setdefault(short, {})["g"] = gout[0].detach().clone()

        hooks += [mod.register_forward_hook(fwd), mod.register_full_backward_hook(bwd)]
    grads_before = {n: p.grad for n, p in ref.named_parameters()}
    torch.manual_seed(seed)
    ref(**batch).loss.backward()
    for h in hooks:
        h.remove()
    for n, p in ref.named_parameters():
        p.grad = grads_before[n]
    layers = [_lora_layers(m) for m in models]
    dtypes: list[dict] = [{}, {}]  # each layer's input dtype in ours' and peft's own forward

    def seen_dtype(d: dict, short: str):
        def hook(mm, inp, out):  # returns None: the output stays
            d.setdefault(short, inp[0].dtype)
        return hook

    hooks = [mod.register_forward_hook(seen_dtype(d, short))
             for ls, d in zip(layers[:2], dtypes, strict=True) for short, mod in ls.items()]
    with torch.no_grad():
        for m in models[:2]:
            torch.manual_seed(seed)
            m(**batch)
    for h in hooks:
        h.remove()
    order = sorted(captured, key=lambda s: (not param.startswith(s + "."), s))
    print(f"each LoRA layer's gradients on the reference's input and output gradient ({param or 'all'}):")
    for short in order:
        d = captured[short]
        if "x" not in d or "g" not in d or not d["x"].is_floating_point() or any(short not in ls for ls in layers):
            continue
        got = []
        for j, ls in enumerate(layers):
            mod = ls[short]
            dt = dtypes[j].get(short, d["x"].dtype) if j < 2 else d["x"].dtype
            saved = {n: p.grad for n, p in mod.named_parameters()}
            for p in mod.parameters():
                p.grad = None
            torch.manual_seed(seed)
            y = mod(d["x"].to(dt))
            if y.requires_grad:  # else no active adapter trains here
                y.backward(d["g"].to(y.dtype))
            got.append({n: p.grad.detach().double().clone() for n, p in mod.named_parameters() if p.grad is not None})
            got[-1]["(output)"] = y.detach().double()
            for n, p in mod.named_parameters():
                p.grad = saved[n]
        for n in sorted(got[2]):
            if n not in got[0] or n not in got[1]:
                continue
            e_o, e_p = ((g[n] - got[2][n]).abs().max().item() for g in got[:2])
            print(f"  {short}.{n}: ours {e_o:.3g}  peft {e_p:.3g}  ratio {e_o / max(e_p, 1e-300):.2f}  "
                  f"scale {got[2][n].abs().max().item():.3g}")


if __name__ == "__main__":
    sys.exit(main())
