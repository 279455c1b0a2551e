"""Triage for a ``tests/fuzz_vs_peft.py`` mismatch: is one of qkernels' LoRA layers less accurate, or does the model
amplify rounding? Replays a case and, at the comparison named, runs every LoRA layer of ours, of peft and of the
float64 reference on the reference's own input to that layer (captured by a forward hook), and prints each layer's
output error against the reference layer's for ours and for peft.

    python tests/fuzz_local.py --seed 45 --case 133 --label "logits[ad0]"

Each layer within ~2x peft's error given the same input, with the model's output off by more, points at the model
(a saturated softmax, an unscaled attention: the module docstring of fuzz_vs_peft.py, "Resampling"); a layer far off
is a qkernels bug to bisect. Forward only, in eval mode: a comparison of a training step (flow ``c``) needs the
gradients at each layer too (run the case with ``-v`` and hook ``register_full_backward_hook`` the same way).
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
    logits, compare = F.logits, F.compare

    def logits_spy(model, x, dtype=None):
        seen.append(model)
        inputs["x"] = x
        return logits(model, x, dtype)

    def local(label, *a, **kw):
        if label.startswith(args.label) and len(seen) >= 3:
            report(seen[-3:], inputs["x"])
        return compare(label, *a, **kw)

    F.logits, F.compare = logits_spy, local
    spec = F.make_spec(args.seed, args.case, args.arch.split(",") if args.arch else None)
    print(F.spec_line(spec))
    with tempfile.TemporaryDirectory() as d:
        ctx = F.run_case(spec, Path(d))
    F.logits, F.compare = logits, compare
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


if __name__ == "__main__":
    sys.exit(main())
