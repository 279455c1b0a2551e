"""qkernels against the incumbent (bitsandbytes + peft) on the real pretrained all-MiniLM-L6-v2: same outputs before
training, same losses over 5 AdamW steps.

Setup, like for like:
- ours: ``qkernels.apply_qlora`` on every Linear of the BertModel (NF4, double quant, blocksize 64), r=8, alpha=16,
  float32 compute.
- theirs: the same BertModel with bitsandbytes ``Linear4bit`` layers (nf4, double quant, bs 64) holding the bytes of
  our state dict (``Params4bit.from_prequantized``: the checkpoint format is bitsandbytes', so this is also a
  check that it loads there), then ``peft.get_peft_model`` with the same LoraConfig; our A/B copied into peft's.
  The quantizers themselves agree byte for byte on these weights except bitsandbytes' approximate CPU nested codes
  (tests/test_minilm.py, docs/format.md §7), which is why both sides hold the same bytes here.
- reference: the same BertModel in float64 with the dequantized weights and peft's LoRA on top: the same function,
  rounded at float64 only.
bitsandbytes runs its exact path (inputs require grad; its no-grad CPU path keeps bf16 scales: DESIGN §5), BERT's
own dropout is off (eval mode) and lora_dropout is 0, so the runs differ by float32 summation order only.

Tolerances, derived (STYLE 12): a fourth run, plain PyTorch float32 on the same dequantized weights with peft's LoRA
(``dense fp32``), measures what float32 rounding alone does to this network (LayerNorm, softmax and GELU included).
Ours and theirs must each be within twice that of the float64 run, plus 4 ulps of the magnitude: for the last hidden
state before training (measured: 1.5e-6 for all three), and for the relative loss gap over 5 AdamW steps (lr 1e-3,
loss 0.092 -> 0.017; measured: ours 2.0e-7, bitsandbytes 1.8e-7 = dense fp32). Both within the bound of the float64
run means they track each other step by step to that precision.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qkernels
from qkernels.model import apply_qlora
from qkernels.nn import QLoRALinear

from ._oracle import bnb

peft = pytest.importorskip("peft", reason="peft is the incumbent these tests compare with")  # installed by make venv

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantizing neural network weights to four bits saves a lot of memory.",
    "I would like to book a table for two at seven o'clock tonight.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
]
R, ALPHA, LR, STEPS = 8, 16, 1e-3, 5
ULP = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def minilm():
    from qkernels.demo import default_model_path, load_model

    model, tok = load_model(default_model_path())  # offline, float32, eval mode
    # 12 tokens per sentence keeps the four runs (float64 included) near 30 s on 2 shared cores
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=12, return_tensors="pt")
    return model, batch


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _quantized(ours: nn.Module):
    sd = ours.state_dict()
    for name, m in ours.named_modules():
        if isinstance(m, QLoRALinear):
            pre = f"{name}.weight."
            yield name, m, sd[f"{name}.weight"], {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}


def build(minilm):
    """(ours, theirs on bitsandbytes, float64 reference, its float32 copy): same weights and LoRA A/B, eval mode."""
    base, _ = minilm
    torch.manual_seed(0)
    ours = apply_qlora(copy.deepcopy(base), "all-linear", r=R, lora_alpha=ALPHA, compute_dtype=torch.float32)
    targets = [n for n, _, _, _ in _quantized(ours)]
    bnb_model, ref = copy.deepcopy(base), copy.deepcopy(base).double()
    for name, m, packed, stats in _quantized(ours):
        lin = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=torch.float32,
                                quant_type="nf4")
        lin.weight = bnb.nn.Params4bit.from_prequantized(packed, stats, requires_grad=False, device="cpu", module=lin)
        lin.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        _swap(bnb_model, name, lin)
        with torch.no_grad():
            state = qkernels.QuantState.from_dict(stats)
            W = qkernels.dequantize_4bit(packed, state, torch.float64, backend="reference")
            ref.get_submodule(name).weight.copy_(W.reshape(m.out_features, m.in_features))
            ref.get_submodule(name).bias.copy_(m.bias.detach())
    bnb_model.is_loaded_in_4bit = True
    cfg = dict(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets)
    theirs = peft.get_peft_model(bnb_model, peft.LoraConfig(**cfg))
    ref = peft.get_peft_model(ref, peft.LoraConfig(**cfg)).double()
    assert type(theirs.base_model.model.encoder.layer[0].attention.self.query).__module__ == "peft.tuners.lora.bnb"
    with torch.no_grad():
        for name, m, _, _ in _quantized(ours):
            for other in (theirs, ref):
                layer = other.base_model.model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(m.lora_A["default"].weight)
                layer.lora_B["default"].weight.copy_(m.lora_B["default"].weight)
    dense32 = copy.deepcopy(ref).float()  # plain PyTorch float32 on the same weights: the yardstick (STYLE 12)
    for model in (ours, theirs, ref, dense32):
        model.eval()  # BERT's hidden/attention dropout off: the runs must see the same function
    return ours, theirs, ref, dense32


def embed(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state, mean-pooled embedding); the embedding output requires grad (bitsandbytes' exact path)."""
    core = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    hook = core.embeddings.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    try:
        hidden = model(**batch).last_hidden_state
    finally:
        hook.remove()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return hidden, (hidden * mask).sum(1) / mask.sum(1)


def _train(model: nn.Module, batch, target: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """``STEPS`` AdamW steps on MSE(mean-pooled embedding, target): (last hidden state before training, losses)."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * 37  # A and B of the 36 encoder Linears + the pooler
    opt = torch.optim.AdamW(params, lr=LR)
    losses, first = [], None
    for _ in range(STEPS):
        opt.zero_grad()
        hidden, pooled = embed(model, batch)
        first = hidden.detach().double() if first is None else first
        loss = torch.nn.functional.mse_loss(pooled, target.to(pooled.dtype))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return first, losses


@pytest.fixture(scope="module")
def runs(minilm):
    """Each model built once and trained once (about 30 s on 2 cores); the step-0 forward is the untrained output."""
    _, batch = minilm
    target = torch.randn(len(SENTENCES), 384, generator=torch.Generator().manual_seed(5)) * 0.1
    labels = ("qkernels", "bitsandbytes+peft", "fp64", "dense fp32")
    return {label: _train(m, batch, target) for label, m in zip(labels, build(minilm), strict=True)}


def test_outputs_match_before_training(runs):
    h_ref = runs["fp64"][0]
    err = {label: float((h - h_ref).abs().max()) for label, (h, _) in runs.items() if label != "fp64"}
    print(f"\nmax |last_hidden_state - fp64| before training: {err}")
    for label in ("qkernels", "bitsandbytes+peft"):
        assert err[label] <= 2 * err["dense fp32"] + 4 * ULP * float(h_ref.abs().max()), f"{label}: {err}"


def test_training_losses_track(runs):
    ref = torch.tensor(runs["fp64"][1], dtype=torch.float64)
    assert ref[-1] < 0.9 * ref[0], f"training did not move the loss: {ref.tolist()}"
    gap = {label: float(((torch.tensor(losses, dtype=torch.float64) - ref).abs() / ref).max())
           for label, (_, losses) in runs.items() if label != "fp64"}
    print(f"\nlosses fp64 {ref.tolist()}\nmax relative gap to fp64 over {STEPS} steps: {gap}")
    for label in ("qkernels", "bitsandbytes+peft"):
        assert gap[label] <= 2 * gap["dense fp32"] + 4 * ULP, f"{label}: {gap}"
