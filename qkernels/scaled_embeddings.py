"""Which transformers scaled word embeddings ``QLoRAEmbedding`` adapts, and in which form (``qkernels.embedding``).

transformers' ``*ScaledWordEmbedding`` classes keep ``nn.Embedding``'s lookup and multiply it by ``embed_scale``; the
two forms below are the forwards they use (read in transformers 5.23). A class is recognized by its own forward's
bytecode, so exactly what ``QLoRAEmbedding``'s base forward computes is accepted, op for op.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = ["SCALE_FORMS", "is_scaled_embedding", "scaled_embedding_form"]


class _BufferScaled(nn.Embedding):
    """The forward of transformers' Gemma-family scaled embeddings (``embed_scale``: a one-element float32 buffer)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class _FloatScaled(nn.Embedding):
    """The forward of transformers' BART-family scaled embeddings (``embed_scale``: a Python float attribute)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


def _code(f: Any) -> tuple:
    c = f.__code__
    return c.co_code, c.co_names, c.co_consts, c.co_argcount, c.co_kwonlyargcount, c.co_freevars


# transformers' ``*ScaledWordEmbedding`` classes (transformers 5.23: 24 of 25 classes, in bart, mbart, plbart, m2m_100,
# nllb_moe, pegasus_x, bigbird_pegasus, blenderbot, biogpt, xglm, trocr, seamless_m4t(_v2), pp_formulanet: "float";
# gemma, gemma2, gemma3, gemma3n, gemma4(_unified), diffusion_gemma, embedding_gemma2, vaultgemma, minicpm3:
# "buffer"; T5Gemma2's also writes an eoi embedding: refused) are recognized by their forward's bytecode, compared
# with the two forms above: the class accepted is exactly what QLoRAEmbedding's base forward computes, op for op, and a
# future transformers that changes a forward is refused rather than computed wrongly.
SCALE_FORMS = {"buffer": _code(_BufferScaled.forward), "float": _code(_FloatScaled.forward)}


def scaled_embedding_form(m: nn.Module) -> str | None:
    """``"buffer"`` / ``"float"`` when ``m``'s class is a transformers ``*ScaledWordEmbedding`` (defined in a
    ``transformers.models`` module under its own name, a direct ``nn.Embedding`` subclass) whose own ``forward`` is
    one of ``SCALE_FORMS``; else None. The class only: ``embed_scale``'s value is checked by ``embedding_refusal``."""
    cls = type(m)
    mod = cls.__module__
    if not (mod.startswith("transformers.models.") and cls.__name__.endswith("ScaledWordEmbedding")):
        return None
    if getattr(sys.modules.get(mod), cls.__qualname__, None) is not cls or cls.__bases__ != (nn.Embedding,):
        return None
    fwd = cls.__dict__.get("forward")
    if not hasattr(fwd, "__code__"):  # not a plain function (absent: the forward is inherited)
        return None
    code = _code(fwd)
    return next((form for form, want in SCALE_FORMS.items() if code == want), None)


def is_scaled_embedding(m: nn.Module) -> bool:
    """True for a transformers scaled embedding that ``QLoRAEmbedding`` adapts: ``scaled_embedding_form`` says which
    form, and its ``embed_scale`` is a one-element float tensor (``"buffer"``) or a Python int / float (``"float"``)."""
    form = scaled_embedding_form(m)
    scale = getattr(m, "embed_scale", None)
    if form == "buffer":
        return isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.dtype.is_floating_point
    return form == "float" and isinstance(scale, (int, float)) and not isinstance(scale, bool)
