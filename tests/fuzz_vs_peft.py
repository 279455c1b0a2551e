"""Differential fuzz driver: qkernels against the incumbent, bitsandbytes + peft, on random tiny transformers models.

Not collected by pytest (the file name does not start with ``test_``). Run from the repository root:

    python tests/fuzz_vs_peft.py --cases 300 --seed 0           # child processes, a batch each; summary at the end
    python tests/fuzz_vs_peft.py --cases 50 --arch llama,gpt2    # only these architectures
    python tests/fuzz_vs_peft.py --seed 0 --case 17 -v           # replay one case in this process, with tracebacks
    python tests/fuzz_local.py --seed 0 --case 17 --label "logits[default]"   # triage: each LoRA layer's own error

Each case (``random.Random(f"{seed}:{index}")``, so ``--case`` replays it) draws:

- a tiny model from a random config (``ARCHS``: Llama, Qwen2 (qkv bias), Mistral, Gemma, Gemma 2, Phi-3 (fused qkv),
  GPT-2 (Conv1D), BERT (sequence classification), T5 and BART (encoder-decoder), OPT, Falcon (``FalconLinear``, which
  transformers' bitsandbytes loader leaves float), Qwen3, GPT-NeoX, Mixtral and Qwen3-MoE (3-D expert parameters,
  left float), Gemma 3, Starcoder2, Phi, OLMo 2, Cohere, Llama with attention and MLP biases), hidden 32..128, 1-3
  layers, no dropout, a tied or untied head where the family allows; saved once in float32;
- a 4-bit format: nf4 / fp4, double quantization or not, ``quant_storage`` uint8 / bf16 / fp16 / fp32,
  ``compute_dtype`` fp32 / bf16 / fp16, and the base written either by transformers (``BitsAndBytesConfig``, whose
  blocksize is always 64) or by bitsandbytes' ``Linear4bit`` directly at a blocksize of 32..4096 (saved with a
  ``quantization_config`` naming the float layers, as transformers would);
- one to three peft ``LoraConfig`` adapters: r (1 and odd included), alpha, rsLoRA, dropout, target_modules as a
  list of names, dotted suffixes, full names, a regex string or "all-linear" (plus the head or the input embedding
  now and then), exclude_modules, layers_to_transform / layers_pattern, rank_pattern / alpha_pattern, bias,
  modules_to_save, init_lora_weights (True, False, "gaussian", and the base-modifying "pissa" / "olora"), use_dora,
  lora_bias, trainable_token_indices.

The oracle is peft 0.21 on bitsandbytes 0.50's ``Linear4bit``, then the flows users run are compared:

- ``init``: ``apply_qlora`` with the first config's fields and ``get_peft_model`` under one seed on two transformers
  4-bit loads of the same checkpoint: the same modules adapted, the same trainable parameters, A, B (and the DoRA
  magnitude, lora_B bias, copies to save, token rows) bit for bit;
- ``a``: peft's adapters (``save_pretrained``) and the 4-bit base saved by transformers / bitsandbytes, loaded with
  qkernels (a meta model + ``apply_qlora`` + ``load_checkpoint``, or transformers' 4-bit load + ``apply_qlora``) and
  ``load_adapter``: the same modules adapted, and the same logits;
- ``b``: qkernels' adapters after new random weights, ``save_adapter`` -> ``PeftModel.from_pretrained`` on a
  bitsandbytes base holding the same bytes: the same logits, and peft saving them back writes the same tensors;
- ``d``: ``merge_and_unload`` against peft's ``merge_and_unload`` on the dequantized float32 base: the merged
  weights and the logits;
- ``e``: ``set_adapter``, ``disable_adapters()`` and ``delete_adapter`` (of a random adapter, the active one
  included) step by step on both;
- ``c``: two training steps (train mode, LoRA dropout with both drawing their masks from the same seed in the same
  order, plain SGD so that an update is linear in its gradient): losses and every trainable gradient.

Tolerance (STYLE 12): every compared tensor (logits, losses, gradients, merged weights) is also computed by peft on a
float64 dense base holding the dequantized 4-bit weights (bitsandbytes' own dequantizer), the same function rounded
only at float64. qkernels' error against it must be at most twice peft + bitsandbytes' own error plus 8 float32
ulps at the tensor's scale: ``|ours - ref| <= 2 |peft - ref| + 8 eps(float32) S``, S = max|ref| (a loss:
the largest logit, to which its rounding is relative; a gradient: the step's largest gradient, since one that
cancels to ~0 keeps the rounding of its terms). The slack is a float32 ulp even under a bf16 / fp16 compute dtype:
peft computes the LoRA term and its gradients in float32, and a compute-dtype ulp would hide exactly the rounding a
LoRA path in the compute dtype adds. (``|ours - peft| <= |ours - ref| + |peft - ref|`` always holds, so
comparing the two directly against the sum of their errors could not fail.) In training the reference runs at each
model's own weights (its LoRA weights set to that model's), so the second step measures that step's rounding, not
the drift of the first update; the step's gradients together are held to the 2x rule and each tensor to 4x (two
equally accurate computations' per-tensor maxima differ by more than 2x now and then over ~100 tensors). Where the
two compute the very same operations the results are compared bit for bit instead (init, flow ``b``'s files).
DoRA's initial magnitude is the one exception in ``init``: with a bf16 / fp16 compute dtype peft multiplies B A in
it, so there both are held to float64 (README, DoRA). A training loss may also be off by what its logits' error
explains (a mean cross entropy moves at most 2 max|dz|: up to 4x peft's logits error), the logits being held to 2x.
Merged logits (flow ``d``) are compared where ours is as dense as peft's float base, or computes in float32: 4-bit
layers no adapter targeted stay 4-bit in ours and compute in the compute dtype (the merged weights are compared
always).

Resampling. The largest error of a whole model's output is a noisy statistic where the model amplifies rounding, so
the ratio of two equally accurate computations' errors has a long tail. T5's attention has no 1/sqrt(d) scaling
(scores up to ~540 in ``--seed 2 --case 191``): a softmax near a tie turns a score error of 1e-3 into a context error
30x larger for whichever computation's rounding fell there. Bisected there module by module, every ``QLoRALinear``
given the reference's input was within 0.6-1.3x of peft's error (and over random layers at M 6..200, its forward
and input-gradient errors at or below peft's); the first divergence was encoder block 1's attention context (31x)
from q / k errors 1.4-1.7x. Over 380 T5 / BART cases the ratio was symmetric: the 2x rule failed ours 31 times and,
with the roles swapped, peft 41 times (float32 6 / 2, bf16 / fp16 25 / 39; median log2 ratio 0.0, mean -0.06 to
-0.26). Two changes follow, neither a wider factor:

- a comparison that fails at the case's point is looked at again at ``RESAMPLES`` nearby points (the embedding
  tables of all three models times ``1 + d n``, d = 2^-13 or 4 ulps of a half compute dtype, the same float32 values
  in each, every error against its own float64 reference), and the comparison passes when the rule holds at most of
  the 7 points, each point's two errors compared with each other (a point's conditioning scales both alike): a
  systematic error persists at nearby points (an injected relative error of 4 ulps of the compute dtype on every
  ``QLoRALinear`` output: over 2x at 6 or 7 of the 7 points in float32, 7 of 7 in fp16, still reported), a draw of
  the rounding does not. In a half compute dtype the draw is often a ReLU's kink (T5's ``DenseReluDense``): an input
  within the dtype's rounding of 0 takes the other sign in one computation, and that element's gradient is off by the
  whole upstream gradient however small the forward error (``--seed 5 --case 39``: ours' forward error 3.4e-3, peft's
  4.1e-3, one ``wi`` output at 2.6e-4 in float64 computed -2.2e-4 by ours, a 64x larger gradient error there). A
  nearby point must move such an input by more than that rounding, hence d = 4 ulps of the compute dtype (at 2^-13 the
  same flip recurred at every point). Over the 380 cases, T5 in fp16 had peft's per-tensor gradient error over 2x
  ours' 100 times and ours over 2x peft's 4 times. Where the rule fails at most points but peft's own median error
  exceeds the tensor's scale (a step that diverged, as ``--seed 2 --case 191``'s second step: both errors ~1e9
  against gradients ~1), float32 has no correct digit to hold ours to, and the comparison is logged as not measured;
  so is one where peft's own result is not finite (T5 in float16 overflows: ``--seed 12 --case 13``, both NaN);
- flow ``c``'s second step runs peft at ours' weights (its trainables set to ours' after the update): the
  conditioning differs between points even ulps apart (``--seed 1 --case 101``: peft's own gradient error 4.4e-6 at
  ours' point, 1.5e-6 at its own, 3e-8 away), so errors at the two points compared the points, not the two
  implementations;
- where the rule fails at most points and peft, held to the same rule against ours with the roles swapped, fails it
  at ``SWAPPED_FAILS`` (2) or more of the 7 points, neither computation is the systematically worse one and the
  comparison is logged as ill-conditioned, not measured: ``--seed 32 --case 11`` (GPT-NeoX, float32), where an lr-1
  step on a random B takes the fused qkv output to ~137, the attention's softmax saturates, and ours' qkv output error
  (1.5x peft's) becomes a 93x larger error in the gradient arriving at that layer; ratios ours / peft over the 7
  points 99.8, 7.0, 1.65, 0.20, 563, 1270, 0.00. A systematic error still fails: with the 4-ulp injection above,
  40 cases of ``--seed 33`` (8 families) gave 4 mismatches (at 5-7 of 7 points) and no comparison marked
  ill-conditioned; without it, none of either.

The oracle is run as the tests run it (DESIGN §5, docs/format.md §7): bitsandbytes' exact path
(``support_avx512bf16_for_cpu`` off: its no-grad CPU path keeps bf16 scales), and its PyTorch dequantizer in place
of its CPU C++ one, which indexes blocks per row and decodes rows that are not whole blocks with other blocks'
scales (docs/format.md §7.4: 1.5 off on a [80, 96] weight at bs 64).

Outcomes per flow, and per case the worst:

- ``ok``; ``mismatch`` (a comparison failed); ``crash`` (qkernels raised where peft worked, with an exception type
  that is no refusal or a message naming none of the options involved; or the child process died);
- ``refused``: qkernels refused with a ValueError / TypeError / NotImplementedError naming an option (the summary
  lists each message: a refusal of something peft supports is a finding too);
- ``oracle-fails``: peft, bitsandbytes or transformers itself failed (a config peft refuses: qkernels must refuse it
  too, else ``accepted``, a problem).

The summary lists each distinct problem with its replay command. Exit status 1 when there is a mismatch, crash or
accepted case.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# this checkout's qkernels, not an installed one (the script's own directory is tests/)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _fuzz_batches import run_batches  # noqa: E402 - beside this script (its directory is on sys.path)

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROBLEMS = ("mismatch", "crash", "accepted")
SWAPPED_FAILS = 2  # compare(): peft failing the rule against ours at this many points marks an ill-conditioned one
OUTCOMES = ("ok", "refused", "oracle-fails", *PROBLEMS, "generator-error")
SEVERITY = {o: i for i, o in enumerate(OUTCOMES)}
FLOWS = ("init", "a", "b", "d", "e", "c")
DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                  "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate", "activation_dropout",
                  "classifier_dropout", "summary_first_dropout", "ffn_dropout", "resid_dropout", "embed_dropout")
# words a clear refusal names (LoraConfig fields, apply_qlora / load_adapter arguments)
OPTION_WORDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
                "alpha_pattern", "bias", "modules_to_save", "init_lora_weights", "use_dora", "dora", "lora_bias",
                "trainable_token_indices", "keep_float_modules", "quant_storage", "quant_type", "double_quant",
                "blocksize", "compute_dtype", "fan_in_fan_out", "r=", "lora_alpha", "lora_dropout", "use_rslora",
                "pissa", "olora", "adapter", "llm_int8_skip_modules", "embedding", "tied", "tie")


# ------------------------------------------------------------------------------------------------ outcomes
class Outcome(Exception):
    """Ends a flow with an outcome other than ok."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome, self.detail = outcome, detail


def _short(e: BaseException, n: int = 500) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:n]


@contextlib.contextmanager
def oracle(what: str):
    """A step of peft / bitsandbytes / transformers: an exception there is the oracle failing."""
    try:
        yield
    except Outcome:
        raise
    except Exception as e:  # noqa: BLE001 - classifying every exception is the point
        raise Outcome("oracle-fails", f"{what}: {_short(e)}") from e


@contextlib.contextmanager
def ours(what: str):
    """A step of qkernels: a clear refusal (naming an option) is ``refused``, anything else a ``crash``."""
    try:
        yield
    except Outcome:
        raise
    except Exception as e:  # noqa: BLE001
        text = str(e).lower()
        clear = isinstance(e, (ValueError, TypeError, NotImplementedError)) and any(w in text for w in OPTION_WORDS)
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise Outcome("refused" if clear else "crash",
                      f"{what}: {_short(e)} [{Path(where.filename).name}:{where.lineno}]") from e


# A first-sight failure is looked at again at RESAMPLES nearby points (``nearby``): each point's error against its own
# float64 reference, and the rule must hold at most of the points (module docstring, "Resampling").
RESAMPLES = 6
# Relative size of the embedding-table perturbation that makes a nearby point: 2^-13, or 4 ulps of a half compute
# dtype, so that an activation within that dtype's rounding of a ReLU kink is drawn again (at 2^-13 a bf16 / fp16
# point kept the same sign flip at every nearby point: --seed 5 --case 39).
NEARBY = 2.0 ** -13
NEARBY_ULPS = 4


def _err(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if b.numel() else 0.0


def compare(label: str, got, want, ref, dtype, log: list[str], *, k: float = 8.0, scale: float | None = None,
            ref_want=None, factor: float = 2.0, floor: float = 0.0, any_dtype: bool = False,
            resample=None) -> None:
    """``|got - ref| <= factor |want - ref| + k eps(dtype) S`` (the module docstring), S = max|ref| unless ``scale``
    gives the magnitude the rounding is relative to (a loss: the logits'; a gradient: the largest gradient of the
    step, since a gradient that cancels to ~0 keeps the rounding of its terms); raises a mismatch. ``any_dtype``: the
    two may differ in dtype (a base bias that bitsandbytes cast to the compute dtype; see flow ``c``).

    ``resample(i)``: ``(got, want, ref, ref_want)`` at the i-th nearby point (1..RESAMPLES); when given, a failure
    is decided by the rule holding at most of this point and those (the module docstring, "Resampling")."""
    import torch

    if got.shape != want.shape or got.shape != ref.shape:
        raise Outcome("mismatch", f"{label}: shapes {tuple(got.shape)} / peft {tuple(want.shape)} / ref "
                                  f"{tuple(ref.shape)}")
    if got.dtype != want.dtype and not any_dtype:
        raise Outcome("mismatch", f"{label}: dtype {got.dtype}, peft's {want.dtype}")
    r = ref.detach().double()
    rw = r if ref_want is None else ref_want.detach().double()  # peft's own point (flow c after a step)
    e_ours, e_peft = _err(got, r), _err(want, rw)
    scale = max(r.abs().max().item() if r.numel() else 0.0, scale or 0.0)
    # a float32 ulp: peft's LoRA path is float32; ``floor``: an error the inputs' own (already held) explain
    slack = k * torch.finfo(torch.float32).eps * scale
    bound = max(factor * e_peft, floor) + slack
    log.append(f"{label}: err {e_ours:.3g} peft {e_peft:.3g} bound {bound:.3g}")
    if math.isfinite(e_ours) and e_ours <= bound:
        return
    if not math.isfinite(e_peft):  # peft's own result overflowed (T5 in float16): nothing to hold ours to
        log.append(f"{label}: not measured (peft's result is not finite: {e_peft}; ours {e_ours:.3g})")
        return
    if resample is not None and math.isfinite(e_ours):
        errs = [(e_ours, e_peft)]
        for i in range(1, RESAMPLES + 1):
            g, w, r_i, rw_i = resample(i)
            errs.append((_err(g, r_i), _err(w, r_i if rw_i is None else rw_i)))
        # paired, point by point: each point's conditioning scales both errors alike
        held = sum(math.isfinite(a) and a <= max(factor * b, floor) + slack for a, b in errs)
        ratios = " ".join(f"{a / max(b, 1e-300):.2f}" for a, b in errs)
        log.append(f"{label}: resampled at {RESAMPLES} nearby points: the rule holds at {held} of {len(errs)} "
                   f"(ratios {ratios})")
        if 2 * held > len(errs):
            return
        # the same rule with the roles swapped: peft held to ours' error
        swapped = sum(math.isfinite(a) and b > max(factor * a, floor) + slack for a, b in errs)
        if swapped >= SWAPPED_FAILS:
            log.append(f"{label}: not measured (ill-conditioned: peft's error is over {factor:g}x ours at {swapped} "
                       f"of {len(errs)} points)")
            return
        m_peft = statistics.median(b for _, b in errs)
        if m_peft > scale:  # peft's float32 result has no correct digit here: nothing to hold ours to
            log.append(f"{label}: not measured (peft's own median error {m_peft:.3g} exceeds the scale {scale:.3g})")
            return
        raise Outcome("mismatch", f"{label}: |ours - ref| > {factor:g} |peft - ref| + {k:g} ulp at {len(errs) - held} "
                                  f"of {len(errs)} nearby points (ratios {ratios}; at the point itself {e_ours:.3g} vs "
                                  f"{e_peft:.3g}, bound {bound:.3g}, scale {scale:.3g}, {dtype})")
    raise Outcome("mismatch", f"{label}: |ours - ref| = {e_ours:.3g} > {factor:g} |peft - ref| + {k:g} ulp = "
                              f"{bound:.3g} (|peft - ref| = {e_peft:.3g}, scale {scale:.3g}, {dtype})")


def _embedding_weights(model) -> dict:
    """The embedding tables a model reads its inputs through (token, position; each tied Parameter once), by module
    name without peft's / qkernels' wrapper levels. Every one, not ``get_input_embeddings()``: an untied BART reads
    ``encoder.embed_tokens``, not ``shared``."""
    import torch
    from torch import nn

    out, seen = {}, set()
    for n, mod in core(model).named_modules():
        if not (isinstance(mod, nn.Embedding) or type(mod).__name__ == "QLoRAEmbedding"):
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point() and id(w) not in seen:
            seen.add(id(w))
            out[re.sub(r"\.(base_layer|original_module)(?=\.|$)", "", n)] = w
    return out


@contextlib.contextmanager
def nearby(models: list, i: int, compute_dtype):
    """The i-th nearby point of ``models`` (ours, peft's, the reference): each embedding table (``_embedding_weights``)
    times ``1 + d n`` (n standard normal, seeded by i; d the larger of NEARBY and NEARBY_ULPS ulps of
    ``compute_dtype``), rounded to float32 once, so all hold the same values (the
    float64 reference those float32 values exactly: its error is measured at the very point the others compute);
    restored after. Yields False (nothing changed) when the models' tables differ in names or values."""
    import torch

    tables = [_embedding_weights(m) for m in models]
    if not tables[0] or any(set(t) != set(tables[0]) for t in tables) or any(
            t[k].shape != tables[0][k].shape or not torch.equal(t[k].detach().double(), tables[0][k].detach().double())
            for t in tables for k in t):
        yield False
        return
    saved = [{k: w.detach().clone() for k, w in t.items()} for t in tables]
    g = torch.Generator().manual_seed(i)
    d = max(NEARBY, NEARBY_ULPS * torch.finfo(compute_dtype).eps)
    new = {k: (w.double() * (1 + d * torch.randn(w.shape, generator=g, dtype=torch.float64))).float()
           for k, w in sorted(saved[0].items())}
    try:
        with torch.no_grad():
            for t in tables:
                for k, w in t.items():
                    w.copy_(new[k])
        yield True
    finally:
        with torch.no_grad():
            for t, sv in zip(tables, saved, strict=True):
                for k, w in t.items():
                    w.copy_(sv[k])


def logits_resampler(models: list, inputs: dict, compute_dtype):
    """``resample`` for a logits comparison of (ours, peft's, reference)."""
    def resample(i: int):
        with nearby(models, i, compute_dtype):
            got, want, ref = (logits(m, inputs) for m in models)
        return got, want, ref, None
    return resample


# ------------------------------------------------------------------------------------------------ the oracle's setup
def patch_bitsandbytes() -> None:
    """bitsandbytes' PyTorch dequantizer in place of its CPU C++ one (module docstring: docs/format.md §7.4)."""
    import torch
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # eager: no torch.compile

    def dequantize(A, absmax, blocksize, quant_type, shape, dtype):
        A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        return compute(A.reshape(-1), absmax.float(), _get_4bit_code(quant_type, A.device),
                                        blocksize, shape, dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize)


def exact_bnb(model):
    for m in model.modules():
        if type(m).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
            m.support_avx512bf16_for_cpu = False  # its exact path (DESIGN §5)
    return model


# ------------------------------------------------------------------------------------------------ architectures
def _dims(rng: random.Random) -> dict[str, int]:
    heads = rng.choice([2, 4])
    hidden = rng.choice([h for h in (32, 64, 96, 128) if (h // heads) % 2 == 0 and h // heads >= 8])
    return dict(hidden=hidden, heads=heads, kv=rng.choice([d for d in (1, 2, heads) if heads % d == 0]),
                inter=rng.choice([48, 64, 96, 128, 160, 192]), layers=rng.choice([1, 2, 2, 3]),
                vocab=rng.choice([64, 80, 100]), tie=rng.random() < 0.4)


def _decoder(d: dict, **extra) -> dict:
    kw = dict(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["inter"],
              num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=d["kv"],
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=d["tie"])
    kw.update(extra)
    return kw


def _seq2seq_bart(d: dict) -> dict:
    return dict(vocab_size=d["vocab"], d_model=d["hidden"], encoder_layers=d["layers"], decoder_layers=d["layers"],
                encoder_attention_heads=d["heads"], decoder_attention_heads=d["heads"], encoder_ffn_dim=d["inter"],
                decoder_ffn_dim=d["inter"], max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, tie_word_embeddings=d["tie"])


@dataclass
class Arch:
    config: str
    model: str
    kwargs: Any  # dims -> config kwargs
    kind: str = "causal"  # "causal" | "seq2seq" | "cls"


ARCHS: dict[str, Arch] = {
    "llama": Arch("LlamaConfig", "LlamaForCausalLM", lambda d: _decoder(d)),
    "qwen2": Arch("Qwen2Config", "Qwen2ForCausalLM", lambda d: _decoder(d)),
    "mistral": Arch("MistralConfig", "MistralForCausalLM", lambda d: _decoder(d, head_dim=d["hidden"] // d["heads"])),
    "gemma": Arch("GemmaConfig", "GemmaForCausalLM", lambda d: _decoder(d, head_dim=d["hidden"] // d["heads"])),
    "gemma2": Arch("Gemma2Config", "Gemma2ForCausalLM", lambda d: _decoder(d, head_dim=d["hidden"] // d["heads"])),
    "qwen3": Arch("Qwen3Config", "Qwen3ForCausalLM", lambda d: _decoder(d, head_dim=d["hidden"] // d["heads"])),
    "phi3": Arch("Phi3Config", "Phi3ForCausalLM", lambda d: _decoder(d, num_key_value_heads=d["heads"])),
    "gpt_neox": Arch("GPTNeoXConfig", "GPTNeoXForCausalLM", lambda d: _decoder(d, num_key_value_heads=None)),
    "opt": Arch("OPTConfig", "OPTForCausalLM", lambda d: dict(
        vocab_size=d["vocab"], hidden_size=d["hidden"], ffn_dim=d["inter"], num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"], max_position_embeddings=64, word_embed_proj_dim=d["hidden"], pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=d["tie"])),
    "gpt2": Arch("GPT2Config", "GPT2LMHeadModel", lambda d: dict(
        vocab_size=d["vocab"], n_positions=64, n_embd=d["hidden"], n_layer=d["layers"], n_head=d["heads"],
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=d["tie"])),
    "falcon": Arch("FalconConfig", "FalconForCausalLM", lambda d: dict(
        vocab_size=d["vocab"], hidden_size=d["hidden"], num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=d["tie"])),
    "bert": Arch("BertConfig", "BertForSequenceClassification", lambda d: dict(
        vocab_size=d["vocab"], hidden_size=d["hidden"], num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
        intermediate_size=d["inter"], max_position_embeddings=64, num_labels=3), "cls"),
    "t5": Arch("T5Config", "T5ForConditionalGeneration", lambda d: dict(
        vocab_size=d["vocab"], d_model=d["hidden"], d_kv=d["hidden"] // d["heads"], d_ff=d["inter"],
        num_layers=d["layers"], num_heads=d["heads"], decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        tie_word_embeddings=d["tie"]), "seq2seq"),
    "bart": Arch("BartConfig", "BartForConditionalGeneration", _seq2seq_bart, "seq2seq"),
    # MoE: the experts are 3-D parameters (transformers 5), which neither bitsandbytes nor a LoRA target touches
    "mixtral": Arch("MixtralConfig", "MixtralForCausalLM", lambda d: _decoder(d, num_local_experts=4,
                                                                              num_experts_per_tok=2)),
    "qwen3_moe": Arch("Qwen3MoeConfig", "Qwen3MoeForCausalLM", lambda d: _decoder(
        d, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=d["inter"] // 2,
        head_dim=d["hidden"] // d["heads"])),
    "gemma3": Arch("Gemma3TextConfig", "Gemma3ForCausalLM", lambda d: _decoder(d, head_dim=d["hidden"] // d["heads"])),
    "starcoder2": Arch("Starcoder2Config", "Starcoder2ForCausalLM", lambda d: _decoder(d)),  # biased, GELU MLP
    "phi": Arch("PhiConfig", "PhiForCausalLM", lambda d: _decoder(d)),  # biased, a biased lm_head
    "olmo2": Arch("Olmo2Config", "Olmo2ForCausalLM", lambda d: _decoder(d)),
    "cohere": Arch("CohereConfig", "CohereForCausalLM", lambda d: _decoder(d)),  # logit scale, tied by default
    "llama_bias": Arch("LlamaConfig", "LlamaForCausalLM", lambda d: _decoder(d, attention_bias=True, mlp_bias=True)),
}


def build_float(arch_name: str, dims: dict, seed: int, device: str | None = None):
    import torch
    import transformers

    arch = ARCHS[arch_name]
    cfg = getattr(transformers, arch.config)(**arch.kwargs(dims))
    for k in DROPOUT_FIELDS:
        if isinstance(getattr(cfg, k, None), float):
            setattr(cfg, k, 0.0)
    torch.manual_seed(seed)
    cls = getattr(transformers, arch.model)
    if device == "meta":
        with torch.device("meta"):
            return cls(cfg).eval()
    return cls(cfg).eval()


def model_cls(arch_name: str):
    import transformers

    return getattr(transformers, ARCHS[arch_name].model)


def _is_linear(m) -> bool:
    from torch import nn

    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def describe(model) -> dict[str, Any]:
    """What the LoRA config generator needs: Linear names (not the head), their leaves, layer lists, head, input
    embedding, norms."""
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    emb = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    linears = [n for n, m in model.named_modules() if _is_linear(m) and n != head_name]
    layer_lists = sorted({mt.group(1) for n in linears for mt in [re.search(r"(?:^|\.)([A-Za-z_]+)\.\d+\.", n)] if mt})
    indices = sorted({int(mt.group(1)) for n in linears for mt in [re.search(r"\.(\d+)\.", n)] if mt})
    norms = [n for n, m in model.named_modules()
             if "norm" in type(m).__name__.lower() and "." not in n.split(".", 1)[-1]]
    extra_heads = [n for n in ("classifier", "score") if hasattr(model, n)]
    # a transformers 5 mixture of experts (3-D expert parameters): peft 0.21 resolves a regex target_modules there to
    # the short names it matches (its v4 -> v5 config conversion), so ".*\.1\..*q_proj" adapts every layer's q_proj;
    # apply_qlora keeps the regex's meaning (README, "Differences from peft"), so no layer-index regex is drawn there
    moe = any(p.dim() == 3 and "experts" in n for n, p in model.named_parameters())
    return dict(linears=linears, leaves=sorted({n.rsplit(".", 1)[-1] for n in linears}), head=head_name,
                emb=emb_name, layer_lists=layer_lists, indices=indices, norms=norms, heads=extra_heads,
                vocab=emb.num_embeddings, moe=moe)


# ------------------------------------------------------------------------------------------------ the case spec
def _lora_config(rng: random.Random, info: dict, like: dict | None = None) -> dict:
    """Random ``peft.LoraConfig`` kwargs for the model described by ``info``; ``like``: keep its targets."""
    cfg: dict[str, Any] = dict(r=rng.choice([1, 2, 3, 4, 5, 8, 16]), lora_alpha=rng.choice([1, 3, 8, 16, 32, 0.5]),
                               lora_dropout=rng.choice([0.0, 0.0, 0.1, 0.3]), use_rslora=rng.random() < 0.25)
    leaves = info["leaves"]
    if like is not None:
        for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
            if k in like:
                cfg[k] = copy.deepcopy(like[k])
    else:
        form = rng.choice(["leaves", "leaves", "suffix", "full", "regex", "all-linear"])
        chosen = rng.sample(leaves, rng.randint(1, len(leaves)))
        if form == "leaves":
            targets: Any = list(chosen)
        elif form == "suffix":
            targets = sorted({".".join(n.split(".")[-2:]) for n in info["linears"] if n.rsplit(".", 1)[-1] in chosen})
        elif form == "full":
            targets = rng.sample(info["linears"], rng.randint(1, len(info["linears"])))
        elif form == "regex":
            targets = r".*\.(" + "|".join(re.escape(c) for c in chosen) + ")"
            if rng.random() < 0.3 and info["indices"] and not info["moe"]:
                targets = r".*\." + str(rng.choice(info["indices"])) + r"\..*(" + "|".join(chosen) + ")"
        else:
            targets = "all-linear"
        if isinstance(targets, list):
            if info["head"] and rng.random() < 0.12:
                targets.append(info["head"].rsplit(".", 1)[-1])
            if rng.random() < 0.1:
                targets.append(info["emb"].rsplit(".", 1)[-1])
            if form != "full" and info["indices"] and rng.random() < 0.25:
                idx = rng.sample(info["indices"], rng.randint(1, len(info["indices"])))
                cfg["layers_to_transform"] = idx[0] if len(idx) == 1 and rng.random() < 0.5 else sorted(idx)
                if rng.random() < 0.5 and len(info["layer_lists"]) == 1:
                    cfg["layers_pattern"] = info["layer_lists"][0]
        elif rng.random() < 0.2 and len(leaves) > 1:
            cfg["exclude_modules"] = rng.sample(leaves, rng.randint(1, len(leaves) - 1))
        cfg["target_modules"] = targets
    if rng.random() < 0.25:
        key = rng.choice(leaves)
        if rng.random() < 0.4 and info["indices"]:
            key = rf"{rng.choice(info['indices'])}\..*{key}"
        cfg["rank_pattern"] = {key: rng.choice([1, 2, 3, 6])}
    if rng.random() < 0.2:
        cfg["alpha_pattern"] = {rng.choice(leaves): rng.choice([2, 5, 24])}
    cfg["init_lora_weights"] = rng.choice([True, True, True, False, "gaussian", "gaussian"] + (
        ["pissa", "olora"] if rng.random() < 0.15 else []))
    if rng.random() < 0.2:
        cfg["use_dora"] = True
    elif rng.random() < 0.12 and cfg["init_lora_weights"] in (True, False):
        cfg["lora_bias"] = True
    if rng.random() < 0.15:  # a second adapter with a bias mode is refused by peft (and qkernels): oracle-fails
        cfg["bias"] = rng.choice(["all", "lora_only"])
    targets = cfg.get("target_modules")
    emb_leaf = info["emb"].rsplit(".", 1)[-1]
    if rng.random() < 0.2:
        opts = info["heads"] + ([info["head"].rsplit(".", 1)[-1]] if info["head"] else []) + info["norms"][:1]
        opts = [o for o in opts if not (isinstance(targets, list) and o in targets)]
        if opts:
            cfg["modules_to_save"] = [rng.choice(opts)]
    elif rng.random() < 0.08 and not (isinstance(targets, list) and emb_leaf in targets):
        cfg["trainable_token_indices"] = sorted(rng.sample(range(3, info["vocab"]), rng.randint(1, 3)))
    return cfg


def make_spec(seed: int, index: int, archs: list[str] | None = None) -> dict:
    rng = random.Random(f"{seed}:{index}")
    arch = rng.choice(archs or list(ARCHS))
    dims = _dims(rng)
    if arch == "gpt_neox":
        dims["kv"] = dims["heads"]
    base = rng.choice(["transformers", "transformers", "bitsandbytes"])
    fmt = dict(quant_type=rng.choice(["nf4", "nf4", "fp4"]), double_quant=rng.random() < 0.5,
               blocksize=64 if base == "transformers" else rng.choice([32, 64, 64, 128, 256, 512, 1024, 2048, 4096]),
               quant_storage=rng.choice(["uint8", "uint8", "bfloat16", "float16", "float32"]),
               compute_dtype=rng.choice(["float32", "float32", "bfloat16", "float16"]))
    info = describe(build_float(arch, dims, 0, device="meta"))
    names = rng.choice([["default"], ["default"], ["ad0"], ["default", "other"], ["first", "second"],
                        ["default", "b", "c"]])
    adapters = []
    for i, name in enumerate(names):
        like = adapters[0][1] if i and rng.random() < 0.5 else None
        adapters.append((name, _lora_config(rng, info, like)))
    batch, seq = rng.choice([1, 2, 3]), rng.choice([1, 3, 7, 20, 40])
    return dict(seed=seed, index=index, arch=arch, dims=dims, vocab=info["vocab"], model_seed=rng.randrange(1000),
                base=base, fmt=fmt,
                adapters=adapters, load=rng.choice(["meta", "bnb"]), targets=rng.choice(["config", "names"]),
                batch=batch, seq=seq, lr=rng.choice([0.1, 1.0]), weights_seed=rng.randrange(10**6))


def spec_line(spec: dict) -> str:
    f = spec["fmt"]
    ads = "; ".join(f"{n}: " + ", ".join(f"{k}={v!r}" for k, v in c.items()) for n, c in spec["adapters"])
    d = spec["dims"]
    return (f"{spec['arch']} h{d['hidden']} L{d['layers']}{' tied' if d['tie'] else ''} | base {spec['base']} "
            f"{f['quant_type']} dq={f['double_quant']} bs={f['blocksize']} storage={f['quant_storage']} "
            f"compute={f['compute_dtype']} | load {spec['load']} targets {spec['targets']} | x {spec['batch']}x"
            f"{spec['seq']} | {ads}")


# ------------------------------------------------------------------------------------------------ building models
def _dtype(name: str):
    import torch

    return getattr(torch, name)


def inputs_for(spec: dict, vocab: int, min_seq: int = 1) -> dict:
    import torch

    g = torch.Generator().manual_seed(spec["weights_seed"])
    B, S = spec["batch"], max(spec["seq"], min_seq)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    kind = ARCHS[spec["arch"]].kind
    if kind == "causal":
        return dict(input_ids=ids, labels=ids)
    if kind == "cls":
        return dict(input_ids=ids, labels=torch.randint(0, 3, (B,), generator=g))
    dec = torch.randint(3, vocab, (B, max(1, S // 2)), generator=g)
    return dict(input_ids=ids, decoder_input_ids=dec, labels=dec)


def bnb_config(fmt: dict, skip: list[str] | None = None):
    import transformers

    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=fmt["quant_type"], bnb_4bit_use_double_quant=fmt["double_quant"],
        bnb_4bit_quant_storage=_dtype(fmt["quant_storage"]), bnb_4bit_compute_dtype=_dtype(fmt["compute_dtype"]),
        llm_int8_skip_modules=skip)


def load_4bit(spec: dict, d: Path):
    """transformers' 4-bit load of the checkpoint ``d`` (its config says the format), bitsandbytes' exact path."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return exact_bnb(model_cls(spec["arch"]).from_pretrained(d, dtype=torch.float32).eval())


def write_base(spec: dict, float_dir: Path, q4: Path) -> None:
    """The 4-bit base checkpoint, written by transformers (``BitsAndBytesConfig``: bs 64) or by bitsandbytes'
    ``Linear4bit`` at the spec's blocksize (every ``type(m) is nn.Linear`` but the head and ``_keep_in_fp32_modules``,
    as transformers' loader picks them; GPT-2's Conv1D left float), with the ``quantization_config`` transformers
    writes (``llm_int8_skip_modules``: the layers left float)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    fmt = spec["fmt"]
    cls = model_cls(spec["arch"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec["base"] == "transformers":
            model = cls.from_pretrained(float_dir, quantization_config=bnb_config(fmt), dtype=torch.float32)
            model.save_pretrained(q4)
            return
        model = cls.from_pretrained(float_dir, dtype=torch.float32)
    head = model.get_output_embeddings()
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    skip = []
    for name, m in list(model.named_modules()):
        if not _is_linear(m):
            continue
        if type(m) is not nn.Linear or m is head or any(name == k or name.endswith("." + k) for k in keep):
            skip.append(name)
            continue
        lin = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                compute_dtype=_dtype(fmt["compute_dtype"]), compress_statistics=fmt["double_quant"],
                                quant_type=fmt["quant_type"], quant_storage=_dtype(fmt["quant_storage"]))
        lin.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, blocksize=fmt["blocksize"],
                                       compress_statistics=fmt["double_quant"], quant_type=fmt["quant_type"],
                                       quant_storage=_dtype(fmt["quant_storage"]), module=lin)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.data.clone(), requires_grad=False)
        lin = lin.to("cpu")  # bitsandbytes quantizes on the first move
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    model.save_pretrained(q4)  # transformers' save: a tied weight under the input embedding's name
    model.config.quantization_config = bnb_config(fmt, skip=skip or None).to_dict()
    model.config.save_pretrained(q4)


def quantized_names(sd: dict) -> list[str]:
    return sorted({k.split(".weight.quant_state.")[0] for k in sd if ".weight.quant_state.bitsandbytes__" in k})


def dense_base(spec: dict, float_dir: Path, q4_sd: dict, dtype):
    """The float model with each 4-bit weight replaced by bitsandbytes' dequantization of it, in ``dtype``."""
    import bitsandbytes.functional as bF
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls(spec["arch"]).from_pretrained(float_dir, dtype=torch.float32).eval()
    if model._can_set_experts_implementation():  # a mixture of experts: the default grouped_mm takes no float64
        model.set_experts_implementation("eager")
    with torch.no_grad():
        for name in quantized_names(q4_sd):
            pre = f"{name}.weight."
            qs = bF.QuantState.from_dict({k[len(pre):]: v for k, v in q4_sd.items() if k.startswith(pre)},
                                         device=torch.device("cpu"))
            W = bF.dequantize_4bit(q4_sd[f"{name}.weight"], qs).to(torch.float32)
            lin = model.get_submodule(name)
            lin.weight.data = (W.t() if type(lin).__name__ == "Conv1D" else W).contiguous().clone()
            if f"{name}.bias" in q4_sd:
                lin.bias.data = q4_sd[f"{name}.bias"].to(torch.float32).clone()
    return model.to(dtype)


def peft_model(base, adapters: list[tuple[str, dict]]):
    """get_peft_model with the first adapter, add_adapter for the others (the first stays active)."""
    import peft

    (n0, c0), *rest = adapters
    model = peft.get_peft_model(base, peft.LoraConfig(**c0), adapter_name=n0)
    for n, c in rest:
        model.add_adapter(n, peft.LoraConfig(**c))
    return model


def core(model):
    import peft

    return model.base_model.model if isinstance(model, peft.PeftModel) else model


def lora_modules(model, adapter: str) -> set[str]:
    out = set()
    for n, m in core(model).named_modules():
        for attr in ("lora_A", "lora_embedding_A"):
            d = getattr(m, attr, None)
            if hasattr(d, "keys") and adapter in d.keys():
                out.add(n)
    return out


def randomize(model, adapters: list[str], seed: int) -> None:
    """Nonzero A and B (and lora_B bias, DoRA magnitude, copies to save, token rows) for every adapter: a fresh
    adapter has B = 0 and would hide every mistake in A."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(core(model).named_parameters()):
            parts = n.split(".")
            if not any(a in parts for a in adapters):
                continue
            if any(s in n for s in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                                    "trainable_tokens_delta")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in n or "modules_to_save" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def adapter_dir(root: Path, name: str) -> Path:
    return root if name == "default" else root / name


def logits(model, inputs: dict, dtype=None):
    import torch

    kw = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        out = model(**kw).logits
    return out if dtype is None else out.to(dtype)


def trainables(model) -> dict:
    """The trainable parameters by name; a LoRA layer's base bias (bias "all" / "lora_only") is peft's
    ``<module>.base_layer.bias`` and qkernels' ``<module>.bias``: named the latter way for both."""
    return {n.removesuffix("base_layer.bias") + "bias" if n.endswith(".base_layer.bias") else n: p
            for n, p in core(model).named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ qkernels' side
def qk_apply_kwargs(spec: dict, cfg: dict, name: str) -> dict:
    """apply_qlora arguments from a LoraConfig's fields."""
    kw = {k: cfg[k] for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                              "modules_to_save", "r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights",
                              "use_dora", "lora_bias", "trainable_token_indices", "rank_pattern",
                              "alpha_pattern") if k in cfg}
    if cfg.get("bias", "none") != "none":
        kw["bias"] = cfg["bias"]  # peft's base biases trained with the adapter (qkernels.base_bias)
    kw["adapter_name"] = name
    kw["compute_dtype"] = _dtype(spec["fmt"]["compute_dtype"])
    return kw


def qk_load(spec: dict, q4: Path, dirs: dict[str, Path], wrapped: set[str]):
    """qkernels' model from the 4-bit checkpoint and peft's adapter files, as a user loads them."""
    import accelerate
    import transformers

    import qkernels

    (n0, c0), *rest = spec["adapters"]
    if spec["load"] == "meta":
        config = transformers.AutoConfig.from_pretrained(q4)
        with accelerate.init_empty_weights():
            model = model_cls(spec["arch"])(config)
        sd_names = set(quantized_names(_read(q4)))
        # load_checkpoint refuses a 4-bit layer of the checkpoint that apply_qlora did not target: the config's own
        # targets where they cover them all (all-linear, mostly), else the names of every layer either needs
        if spec["targets"] == "config" and sd_names <= wrapped_by_config(spec, model):
            with ours("apply_qlora(meta, config)"):
                qkernels.apply_qlora(model, **qk_apply_kwargs(spec, c0, n0))
        else:
            with ours("apply_qlora(meta, names)"):
                qkernels.apply_qlora(model, sorted(wrapped | sd_names), adapter_name=n0,
                                     compute_dtype=_dtype(spec["fmt"]["compute_dtype"]))
        with ours("load_checkpoint"):
            qkernels.load_checkpoint(model, q4, verbose=False)
        model.eval()
    else:
        model = load_4bit(spec, q4)
        if spec["targets"] == "config":
            with ours("apply_qlora(4-bit model, config)"):
                qkernels.apply_qlora(model, **qk_apply_kwargs(spec, c0, n0))
        else:
            with ours("apply_qlora(4-bit model, names)"):
                qkernels.apply_qlora(model, sorted(wrapped), adapter_name=n0,
                                     compute_dtype=_dtype(spec["fmt"]["compute_dtype"]))
    with ours(f"load_adapter({n0})"):
        qkernels.load_adapter(model, dirs[n0], adapter_name=n0, replace=True)
    for n, _ in rest:
        with ours(f"load_adapter({n})"):
            qkernels.load_adapter(model, dirs[n], adapter_name=n, set_active=False)
    with ours("set_adapter"):
        qkernels.set_adapter(model, n0)
    return model


def wrapped_by_config(spec: dict, model) -> set[str]:
    """The modules peft's first LoraConfig selects on ``model`` (a meta model: peft's matching, nothing built)."""
    import peft

    n0, c0 = spec["adapters"][0]
    cfg = peft.LoraConfig(**c0)
    tu = peft.tuners.tuners_utils
    cfg = tu._maybe_include_all_linear_layers(cfg, model)
    out = set()
    for k, m in model.named_modules():
        found = tu.check_target_module_exists(cfg, k)
        if found and not isinstance(found, tu._ExcludedModule) and _is_linear(m):
            out.add(k)
    return out


def _read(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ------------------------------------------------------------------------------------------------ the flows
@dataclass
class Ctx:
    spec: dict
    tmp: Path
    log: list[str] = field(default_factory=list)
    results: dict[str, tuple[str, str]] = field(default_factory=dict)


def run_case(spec: dict, tmp: Path, verbose: bool = False) -> Ctx:
    import torch

    ctx = Ctx(spec, tmp)
    fmt, names = spec["fmt"], [n for n, _ in spec["adapters"]]
    cdt = _dtype(fmt["compute_dtype"])
    float_dir, q4, ad_root = tmp / "float", tmp / "q4", tmp / "peft_adapters"

    def flow(name: str, fn) -> bool:
        t0 = time.time()
        try:
            fn()
            ctx.results[name] = ("ok", "")
        except Outcome as o:
            ctx.results[name] = (o.outcome, o.detail)
            if verbose:
                traceback.print_exc()
        except Exception as e:  # noqa: BLE001 - a bug of the driver itself
            ctx.results[name] = ("generator-error", _short(e) + " " + traceback.format_exc()[-400:])
            if verbose:
                traceback.print_exc()
        ctx.log.append(f"[{name}] {ctx.results[name][0]} in {time.time() - t0:.1f}s")
        return ctx.results[name][0] == "ok"

    state: dict[str, Any] = {}

    def setup():
        with oracle("build and save the float model"):
            build_float(spec["arch"], spec["dims"], spec["model_seed"]).save_pretrained(float_dir)
        with oracle("write the 4-bit base"):
            write_base(spec, float_dir, q4)
        state["q4_sd"] = _read(q4)
        with oracle("peft on the bitsandbytes base"):
            base = load_4bit(spec, q4)
            theirs = peft_model(base, spec["adapters"]).eval()
            randomize(theirs, names, spec["weights_seed"])
            for n in names:
                theirs.save_pretrained(ad_root, selected_adapters=[n])
            theirs.set_adapter(names[0])
        state["peft"] = theirs
        state["dirs"] = {n: adapter_dir(ad_root, n) for n in names}
        state["inputs"] = inputs_for(spec, spec["vocab"])
        try:  # without it qkernels' side still runs up to the comparisons (a refusal is still seen)
            state["ref"] = reference(spec, float_dir, state["q4_sd"], state["dirs"], torch.float64)
        except Exception as e:  # noqa: BLE001
            state["ref"] = Outcome("oracle-fails", f"peft on the float64 dense base: {_short(e)}")

    if not flow("setup", setup):
        if ctx.results["setup"][0] == "oracle-fails":
            flow("refuses-too", lambda: _refuses_too(spec, float_dir, ctx))
        return ctx
    theirs, ref, inputs, dirs = state["peft"], state["ref"], state["inputs"], state["dirs"]
    wrapped = set().union(*(lora_modules(theirs, n) for n in names))

    flow("init", lambda: flow_init(spec, q4, ctx))

    def flow_a():
        Q = qk_load(spec, q4, dirs, wrapped)
        state["ours"] = Q
        for n in names:
            mine, peft_set = lora_modules(Q, n), lora_modules(theirs, n)
            if mine != peft_set:
                raise Outcome("mismatch", f"adapter {n}: LoRA on {sorted(mine ^ peft_set)[:6]} in one only "
                                          f"(ours {len(mine)}, peft {len(peft_set)})")
        t_ours, t_peft = set(trainables(Q)), set(trainables(theirs))
        if t_ours != t_peft:
            raise Outcome("mismatch", f"trainable parameters differ: ours only {sorted(t_ours - t_peft)[:4]}, "
                                      f"peft only {sorted(t_peft - t_ours)[:4]}")
        with ours("forward"):
            got = logits(Q, inputs)
        if isinstance(ref, Outcome):
            raise ref
        compare(f"logits[{names[0]}]", got, logits(theirs, inputs), logits(ref, inputs), cdt, ctx.log,
                resample=logits_resampler([Q, theirs, ref], inputs, cdt))

    if not flow("a", flow_a):
        return ctx  # (also when the float64 reference could not be built: flow a raised its failure)
    Q = state["ours"]
    flow("b", lambda: flow_b(spec, Q, q4, float_dir, state["q4_sd"], inputs, tmp, ctx))
    flow("d", lambda: flow_d(spec, Q, float_dir, state["q4_sd"], dirs, inputs, ctx))
    flow("e", lambda: flow_e(spec, Q, theirs, ref, inputs, ctx))
    # a causal LM's loss needs two tokens (one shifted label)
    flow("c", lambda: flow_c(spec, Q, theirs, ref, inputs_for(spec, spec["vocab"], min_seq=2), ctx))
    return ctx


def reference(spec: dict, float_dir: Path, q4_sd: dict, dirs: dict[str, Path], dtype):
    """peft on the dense base (dequantized weights) in ``dtype``, every adapter loaded, the first active."""
    import peft

    (n0, _), *rest = spec["adapters"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(dense_base(spec, float_dir, q4_sd, dtype), str(dirs[n0]),
                                               adapter_name=n0)
        for n, _ in rest:
            model.load_adapter(str(dirs[n]), adapter_name=n)
    model.set_adapter(n0)
    return model.to(dtype).eval()


def _refuses_too(spec: dict, float_dir: Path, ctx: Ctx) -> None:
    """peft refused the config: apply_qlora with the same fields must refuse too."""
    import peft

    import qkernels

    detail = ctx.results["setup"][1]
    if "adapter with bias" in detail:  # peft allows one adapter with bias != "none" per model: so must qkernels
        (n0, c0), *rest = spec["adapters"]
        model = build_float(spec["arch"], spec["dims"], spec["model_seed"])
        try:
            qkernels.apply_qlora(model, **qk_apply_kwargs(spec, c0, n0))
            for n, c in rest:  # every QLoRALinear, this adapter's bias mode: the refusal comes first
                qkernels.add_adapter(model, n, bias=c.get("bias", "none"))
        except ValueError as e:
            raise Outcome("oracle-fails", f"both refuse: peft {detail[:200]} | qkernels {_short(e, 200)}") from e
        except Exception as e:  # noqa: BLE001
            raise Outcome("crash", f"peft refuses ({detail[:200]}); qkernels raised {_short(e)}") from e
        raise Outcome("accepted", f"peft refuses these adapters ({detail[:300]}); qkernels added them all")
    for n, c in spec["adapters"]:  # noqa: B007 - the loop stops at the refused config
        try:
            peft.LoraConfig(**c)
        except Exception:  # noqa: BLE001 - the config peft refuses
            break
    else:
        raise Outcome("oracle-fails", "(peft failed past its config; nothing to compare) " + detail)
    model = build_float(spec["arch"], spec["dims"], spec["model_seed"])
    try:
        qkernels.apply_qlora(model, **qk_apply_kwargs(spec, c, n))
    except (ValueError, TypeError, NotImplementedError) as e:
        raise Outcome("oracle-fails", f"both refuse: peft {detail[:200]} | qkernels {_short(e, 200)}") from e
    except Exception as e:  # noqa: BLE001
        raise Outcome("crash", f"peft refuses ({detail[:200]}); qkernels raised {_short(e)}") from e
    raise Outcome("accepted", f"peft refuses this config ({detail[:300]}), apply_qlora accepted it")


def flow_init(spec: dict, q4: Path, ctx: Ctx) -> None:
    """apply_qlora and get_peft_model under one seed on two loads of the same 4-bit checkpoint: bit for bit."""
    import bitsandbytes.functional as bF
    import peft
    import torch

    import qkernels

    n0, c0 = spec["adapters"][0]
    with oracle("get_peft_model"):
        torch.manual_seed(spec["weights_seed"])
        theirs = peft.get_peft_model(load_4bit(spec, q4), peft.LoraConfig(**c0), adapter_name=n0)
    model = load_4bit(spec, q4)
    torch.manual_seed(spec["weights_seed"])
    with ours("apply_qlora(config)"):
        qkernels.apply_qlora(model, **qk_apply_kwargs(spec, c0, n0))
    mine, peft_set = lora_modules(model, n0), lora_modules(theirs, n0)
    if mine != peft_set:
        raise Outcome("mismatch", f"LoRA on {sorted(mine - peft_set)[:4]} (ours only) / {sorted(peft_set - mine)[:4]} "
                                  "(peft only)")
    t_ours, t_peft = trainables(model), trainables(theirs)
    if set(t_ours) != set(t_peft):
        raise Outcome("mismatch", f"trainable parameters: ours only {sorted(set(t_ours) - set(t_peft))[:4]}, peft only "
                                  f"{sorted(set(t_peft) - set(t_ours))[:4]}")
    magnitudes = []
    for n, p in t_peft.items():
        q = t_ours[n]
        if q.dtype == p.dtype and q.shape == p.shape and "lora_magnitude_vector" in n and not torch.equal(q, p):
            magnitudes.append(n)  # below: against float64
        elif q.dtype != p.dtype or q.shape != p.shape or not torch.equal(q, p):
            how = "dtype" if q.dtype != p.dtype else "shape" if q.shape != p.shape else \
                f"max |diff| {(q.double() - p.double()).abs().max().item():.3g}"
            raise Outcome("mismatch", f"initial {n}: {how} ({q.dtype} {tuple(q.shape)} vs peft {p.dtype} "
                                      f"{tuple(p.shape)})")
    # DoRA's initial magnitude ||W + s B A||_row: peft multiplies B A in a bf16 / fp16 compute dtype at init (its
    # adapter holds that dtype then; README, DoRA), qkernels in float32: both against float64
    for n in magnitudes:
        layer = core(theirs).get_submodule(n.split(".lora_magnitude_vector.")[0])
        base = layer.get_base_layer()
        W = bF.dequantize_4bit(base.weight.data, base.weight.quant_state).double() if hasattr(
            base.weight, "quant_state") else base.weight.detach().double()
        W = W.t() if W.shape != (layer.out_features, layer.in_features) else W
        A, B = (t_ours[n.replace("lora_magnitude_vector", w)].double() for w in ("lora_A", "lora_B"))
        ref = torch.linalg.norm(W + layer.scaling[n0] * B @ A, dim=1)
        compare(f"initial {n}", t_ours[n], t_peft[n], ref, torch.float32, ctx.log)
    ctx.log.append(f"init: {len(t_peft) - len(magnitudes)} trainable tensors bit-equal, {len(magnitudes)} DoRA "
                   "magnitudes within peft's error")


def flow_b(spec: dict, Q, q4: Path, float_dir: Path, q4_sd: dict, inputs: dict, tmp: Path, ctx: Ctx) -> None:
    """save_adapter -> PeftModel.from_pretrained on the bitsandbytes base: same logits; peft saves the same tensors."""
    import peft
    import torch
    from safetensors.torch import load_file

    import qkernels

    names = [n for n, _ in spec["adapters"]]
    cdt = _dtype(spec["fmt"]["compute_dtype"])
    Q = copy.deepcopy(Q)
    randomize(Q, names, spec["weights_seed"] + 1)
    root = tmp / "qk_adapters"
    dirs = {}
    for n in names:
        dirs[n] = root / n
        with ours(f"save_adapter({n})"):
            qkernels.save_adapter(Q, dirs[n], adapter_name=n)
    with oracle("PeftModel.from_pretrained(qkernels' adapter)"):
        theirs = peft.PeftModel.from_pretrained(load_4bit(spec, q4), str(dirs[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            theirs.load_adapter(str(dirs[n]), adapter_name=n)
        theirs.eval()
    with oracle("peft on the float64 dense base"):
        ref = reference(spec, float_dir, q4_sd, dirs, torch.float64)
    for n in names:
        for m in (Q, theirs, ref):
            (qkernels.set_adapter(m, n) if m is Q else m.set_adapter(n))
        compare(f"logits[{n}] (peft loading ours)", logits(Q, inputs), logits(theirs, inputs), logits(ref, inputs),
                cdt, ctx.log, resample=logits_resampler([Q, theirs, ref], inputs, cdt))
        with oracle("peft save_pretrained"):
            theirs.save_pretrained(tmp / "back", selected_adapters=[n])
        back = load_file(adapter_dir(tmp / "back", n) / "adapter_model.safetensors")
        mine = load_file(dirs[n] / "adapter_model.safetensors")
        if set(back) != set(mine):
            raise Outcome("mismatch", f"adapter {n}: peft saves keys {sorted(set(back) ^ set(mine))[:4]} that ours "
                                      "does not, or the reverse")
        for k in mine:
            if back[k].dtype == cdt != mine[k].dtype and k.endswith(".bias") and ".lora_" not in k:
                # a base bias (bias "all" / "lora_only"): bitsandbytes' Linear4bit.forward casts its bias Parameter to
                # the compute dtype in place (bias.data = bias.data.to(x.dtype)), so peft saves it back in that dtype
                # after the logits above; qkernels keeps the model's dtype. The values must agree after that cast.
                mine[k] = mine[k].to(cdt)
            if back[k].dtype != mine[k].dtype or not torch.equal(back[k], mine[k]):
                raise Outcome("mismatch", f"adapter {n}: {k} saved back by peft differs ({mine[k].dtype} vs "
                                          f"{back[k].dtype})")


def flow_d(spec: dict, Q, float_dir: Path, q4_sd: dict, dirs: dict, inputs: dict, ctx: Ctx) -> None:
    """merge_and_unload against peft's merge on the dequantized float32 base (float64: the reference)."""
    import torch

    import qkernels

    n0 = spec["adapters"][0][0]
    mine = copy.deepcopy(Q)
    qkernels.set_adapter(mine, n0)
    try:
        theirs = reference(spec, float_dir, q4_sd, dirs, torch.float32).merge_and_unload().eval()
    except Exception as e:  # noqa: BLE001 - peft refuses this merge: so must qkernels
        try:
            qkernels.merge_and_unload(mine)
        except (ValueError, TypeError, NotImplementedError, type(e)) as mine_e:  # or peft's own exception type
            raise Outcome("oracle-fails", f"both refuse the merge: peft {_short(e, 200)} | qkernels "
                                          f"{_short(mine_e, 200)}") from mine_e
        except Exception as mine_e:  # noqa: BLE001
            raise Outcome("crash", f"peft refuses the merge ({_short(e, 200)}); qkernels raised "
                                   f"{_short(mine_e)}") from mine_e
        raise Outcome("accepted", f"peft refuses the merge ({_short(e, 300)}); qkernels merged") from e
    with oracle("peft merge on the float64 base"):
        ref = reference(spec, float_dir, q4_sd, dirs, torch.float64).merge_and_unload().eval()
    with ours("merge_and_unload"):
        mine = qkernels.merge_and_unload(mine)
    for name in sorted(lora_modules(Q, n0)):
        a, b, r = (m.get_submodule(name).weight for m in (mine, theirs, ref))
        if a.shape != b.shape and a.t().shape == b.shape:
            raise Outcome("mismatch", f"merged {name}: weight {tuple(a.shape)}, peft's {tuple(b.shape)}")
        compare(f"merged {name}", a, b, r, torch.float32, ctx.log)
    # peft's merge here is on the dequantized float32 base, every layer dense; ours keeps the 4-bit layers that no
    # adapter targeted, which compute in the compute dtype: the logits are comparable when that is float32
    left = [n for n, m in mine.named_modules() if type(m).__name__ in ("Linear4bit", "QLoRALinear")]
    if left and spec["fmt"]["compute_dtype"] != "float32":
        ctx.log.append(f"merged logits not compared: {len(left)} untargeted 4-bit layers compute in "
                       f"{spec['fmt']['compute_dtype']} (merged weights compared above)")
        return
    with ours("forward (merged)"):
        got = logits(mine, inputs)
    compare("logits (merged)", got, logits(theirs, inputs), logits(ref, inputs), _dtype(spec["fmt"]["compute_dtype"]),
            ctx.log, resample=logits_resampler([mine, theirs, ref], inputs, _dtype(spec["fmt"]["compute_dtype"])))


def flow_e(spec: dict, Q, theirs, ref, inputs: dict, ctx: Ctx) -> None:
    """set_adapter / disable_adapters / delete_adapter, step by step."""
    import qkernels

    names = [n for n, _ in spec["adapters"]]
    cdt = _dtype(spec["fmt"]["compute_dtype"])
    rng = random.Random(f"{spec['seed']}:{spec['index']}:e")

    def check(label):
        with ours(f"forward ({label})"):
            got = logits(Q, inputs)
        with oracle(f"peft forward ({label})"):
            want, r = logits(theirs, inputs), logits(ref, inputs)
        compare(f"logits ({label})", got, want, r, cdt, ctx.log,
                resample=logits_resampler([Q, theirs, ref], inputs, cdt))

    for n in rng.sample(names, len(names)):
        with ours(f"set_adapter({n})"):
            qkernels.set_adapter(Q, n)
        with oracle(f"peft set_adapter({n})"):
            theirs.set_adapter(n)
            ref.set_adapter(n)
        check(f"set_adapter({n})")
    with ours("disable_adapters"), qkernels.disable_adapters(Q), theirs.disable_adapter(), ref.disable_adapter():
        check("disabled")
    check("enabled again")
    if len(names) > 1:
        gone = rng.choice(names)
        with ours(f"delete_adapter({gone})"):
            qkernels.delete_adapter(Q, gone)
        with oracle("peft delete_adapter"):
            theirs.delete_adapter(gone)
            ref.delete_adapter(gone)
        left = qkernels.adapter_names(Q)
        if sorted(left) != sorted(set(names) - {gone}):
            raise Outcome("mismatch", f"after delete_adapter({gone}) ours has {left}")
        check(f"after delete_adapter({gone}), peft active {theirs.active_adapter}")


def flow_c(spec: dict, Q, theirs, ref, inputs: dict, ctx: Ctx) -> None:
    """Two training steps with the same data and dropout masks; plain SGD. Each step's loss and gradients are held
    against the float64 reference at the model's own point (the reference's LoRA weights set to that model's), so the
    second step measures that step's rounding, not how far the first step's rounding moved the weights (which the
    first step's gradients bound: an SGD update is ``lr`` times them). After ours' update peft's trainable weights
    are set to ours', so that the second step compares both at one point (module docstring, "Resampling")."""
    import torch

    cdt = _dtype(spec["fmt"]["compute_dtype"])
    models = {"ours": Q, "peft": theirs, "ref": ref}
    for m in models.values():
        m.train()

    def step_of(key: str, m, step: int):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(spec["weights_seed"] + step)  # the same dropout masks, drawn in the same order
        with ours(f"training step {step}") if key == "ours" else oracle(f"{key} training step {step}"):
            res = m(**inputs)
            res.loss.backward()
        grads = {n: p.grad for n, p in trainables(m).items()}
        return res.loss.detach(), grads, res.logits.detach()

    def at(params: dict):
        with torch.no_grad():
            for n, p in trainables(ref).items():
                p.copy_(params[n].detach().to(p.dtype))
        return step_of("ref", ref, step)

    def resampler(pick):
        """``resample`` for a comparison of this step: ``pick(result)`` the tensor out of a ``step_of`` result; the
        four steps (ours and peft at their points, the reference at each) are run once per nearby point."""
        def resample(i: int):
            if i not in points:
                grads = [{n: prm.grad for n, prm in trainables(m).items()} for m in (Q, theirs)]
                with nearby([Q, theirs, ref], i, cdt):
                    points[i] = (step_of("ours", Q, step), step_of("peft", theirs, step), at(trainables(Q)),
                                 at(trainables(theirs)))
                for m, saved in zip((Q, theirs), grads, strict=True):  # this step's own gradients make the SGD update
                    for n, prm in trainables(m).items():
                        prm.grad = saved[n]
            return tuple(pick(x) for x in points[i])
        return resample

    def cat_grads(names: list[str]):
        return lambda res: torch.cat([res[1][n].detach().double().reshape(-1) for n in names])

    try:
        for step in range(2):
            points: dict[int, tuple] = {}
            o, p = step_of("ours", Q, step), step_of("peft", theirs, step)
            if set(o[1]) != set(p[1]):
                raise Outcome("mismatch", f"trainable parameters differ: {sorted(set(o[1]) ^ set(p[1]))[:4]}")
            r_o, r_p = at(trainables(Q)), at(trainables(theirs))
            compare(f"logits step {step}", o[2], p[2], r_o[2], cdt, ctx.log, ref_want=r_p[2],
                    resample=resampler(lambda res: res[2]))
            # the mean cross entropy moves at most 2 max|dz| with the logits z: a loss error is explained by the
            # logits' (held to 2x just above) up to 2 x 2 x peft's logits error, whatever peft's own loss error was
            e_logits = (p[2].double() - r_p[2]).abs().max().item()
            compare(f"loss step {step}", o[0].float(), p[0].float(), r_o[0], cdt, ctx.log, ref_want=r_p[0],
                    scale=r_o[2].abs().max().item(), floor=4 * e_logits)
            gscale = max((g.abs().max().item() for g in r_o[1].values() if g is not None), default=0.0)
            names = sorted(n for n in p[1] if p[1][n] is not None and o[1][n] is not None)
            if names:  # the step's gradients together: STYLE 12's 2x
                cat = [cat_grads(names)(res) for res in (o, p, r_o, r_p)]
                compare(f"all gradients step {step}", cat[0], cat[1], cat[2], cdt, ctx.log, scale=gscale,
                        ref_want=cat[3], resample=resampler(cat_grads(names)))
            for n in sorted(p[1]):
                g_o, g_p = o[1][n], p[1][n]
                if g_p is None or g_o is None:
                    if (g_p is None) != (g_o is None):
                        raise Outcome("mismatch", f"step {step} grad {n}: {'peft' if g_p is None else 'ours'} has "
                                                  "none, the other one has")
                    continue
                # a 4-bit layer's base bias (bias "all" / "lora_only"): bitsandbytes' Linear4bit.forward casts its
                # bias Parameter to the compute dtype in place, so peft trains it (and its gradient) in that dtype;
                # qkernels keeps the model's dtype. Each is still held to its own float64 reference.
                base_bias = n.endswith(".bias") and ".lora_" not in n and g_p.dtype == cdt
                compare(f"grad step {step} {n}", g_o, g_p, r_o[1][n], cdt, ctx.log, scale=gscale,
                        ref_want=r_p[1][n], factor=4.0, any_dtype=base_bias,
                        resample=resampler(lambda res, n=n: res[1][n]))
            with torch.no_grad():
                for m in (Q, theirs):
                    for prm in trainables(m).values():
                        if prm.grad is not None:
                            prm.sub_(spec["lr"] * prm.grad)
                # the next step at one point for both: ours' (module docstring, "Resampling")
                mine = trainables(Q)
                for n, prm in trainables(theirs).items():
                    prm.copy_(mine[n])
    finally:
        for m in models.values():
            m.eval()


# ------------------------------------------------------------------------------------------------ processes
def worst(results: dict[str, tuple[str, str]]) -> tuple[str, str, str]:
    flow_, (o, d) = max(results.items(), key=lambda kv: SEVERITY[kv[1][0]])
    return o, flow_, d


def child(seed: int, start: int, stop: int, archs: list[str] | None) -> None:
    import faulthandler

    import torch
    import transformers

    faulthandler.enable()
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    patch_bitsandbytes()
    for i in range(start, stop):
        print(json.dumps({"start": i}), flush=True)
        t0 = time.time()
        try:
            spec = make_spec(seed, i, archs)
        except Exception as e:  # noqa: BLE001 - a generator bug is reported, not fatal
            print(json.dumps({"i": i, "desc": "", "outcome": "generator-error", "flow": "spec",
                              "detail": _short(e), "flows": {}}), flush=True)
            continue
        with tempfile.TemporaryDirectory() as d:
            ctx = run_case(spec, Path(d))
        o, f, detail = worst(ctx.results)
        notes = {k: v[1] for k, v in ctx.results.items() if v[0] in ("refused", "oracle-fails")}
        print(json.dumps({"i": i, "desc": spec_line(spec), "outcome": o, "flow": f, "detail": detail,
                          "flows": {k: v[0] for k, v in ctx.results.items()}, "seconds": round(time.time() - t0, 1),
                          "refusals": notes}), flush=True)


def run_all(seed: int, cases: int, batch: int, archs: list[str] | None, timeout: float) -> list[dict]:
    def record(rec: dict) -> dict:
        print(f"case {rec['i']}: {rec['outcome']} ({rec['flow']}, {rec.get('seconds', '?')}s)", file=sys.stderr,
              flush=True)
        return rec

    def crash(i: int, detail: str) -> dict:
        return {"i": i, "desc": "", "outcome": "crash", "flow": "process", "flows": {}, "detail": detail}

    return run_batches(os.path.abspath(__file__), seed, cases, batch, ["--arch", ",".join(archs)] if archs else [],
                       dict(os.environ, OMP_NUM_THREADS="1"), timeout, record, crash)


def summary(results: list[dict], seed: int, archs: str | None) -> int:
    by = Counter(r["outcome"] for r in results)
    print("outcomes: " + ", ".join(f"{o} {by.get(o, 0)}" for o in OUTCOMES))
    flows = Counter((f, o) for r in results for f, o in r.get("flows", {}).items())
    print(f"{'flow':10s}" + "".join(f"{o:>14s}" for o in OUTCOMES))
    for f in ("setup", "refuses-too", *FLOWS):
        print(f"{f:10s}" + "".join(f"{flows.get((f, o), 0):14d}" for o in OUTCOMES))
    refusals = Counter(re.sub(r"\d+", "N", d)[:160] for r in results for d in r.get("refusals", {}).values())
    if refusals:
        print("\nrefusals and oracle failures (by message):")
        for msg, n in refusals.most_common():
            print(f"  {n:4d}  {msg}")
    problems = [r for r in results if r["outcome"] in PROBLEMS or r["outcome"] == "generator-error"]
    seen = set()
    for r in problems:
        key = (r["outcome"], r["flow"], re.sub(r"[\d.e+-]+", "N", r["detail"])[:80])
        if key in seen:
            continue
        seen.add(key)
        print(f"\n[{r['outcome']}] case {r['i']} flow {r['flow']}: {r['desc']}\n    {r['detail'][:600]}\n    replay: "
              f"python tests/fuzz_vs_peft.py --seed {seed} --case {r['i']}" + (f" --arch {archs}" if archs else ""))
    print(f"\n{len(results)} cases, {len(problems)} problems ({len(seen)} distinct)")
    return int(bool(problems))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default=None, help="comma list of: " + ", ".join(ARCHS))
    ap.add_argument("--batch", type=int, default=25, help="cases per child process")
    ap.add_argument("--case", type=int, default=None, help="replay one case in this process")
    ap.add_argument("-v", "--verbose", action="store_true", help="with --case: tracebacks and every comparison")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    ap.add_argument("--json", default=None, help="write every result here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    archs = args.arch.split(",") if args.arch else None
    if args.child:
        child(args.seed, args.start, args.stop, archs)
        return 0
    if args.case is not None:
        import torch
        import transformers

        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(1)
        patch_bitsandbytes()
        spec = make_spec(args.seed, args.case, archs)
        print(spec_line(spec))
        with tempfile.TemporaryDirectory() as d:
            ctx = run_case(spec, Path(d), verbose=args.verbose)
        if args.verbose:
            print("\n".join(ctx.log))
        for f, (o, detail) in ctx.results.items():
            print(f"{f:12s} {o:14s} {detail}")
        return int(worst(ctx.results)[0] in PROBLEMS)
    results = run_all(args.seed, args.cases, args.batch, archs, args.timeout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return summary(results, args.seed, args.arch)


if __name__ == "__main__":
    sys.exit(main())
