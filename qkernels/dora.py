"""DoRA ("QDoRA" on a 4-bit base): peft's ``LoraConfig(use_dora=True)`` for ``QLoRALinear``, mirroring peft 0.21.2.

DoRA adds a learned magnitude ``m [out_features]`` per adapter (peft's ``lora_magnitude_vector[name].weight``) and
rescales each output row by ``m / ||W + s B A||_row``:

    y = x W^T + bias + (g - 1) * (x W^T) + g * s * B A dropout(x),   g = m / ||W + s B A||_row (detached)

(peft/tuners/lora/dora.py:132-165, variants.py:230-257). With dropout off (or the layer in eval mode) that is
``g * (x W^T + s B A x) + bias``: one call to qkernels' fused ``matmul_4bit_lora`` scaled per row (with a compute
dtype narrower than the adapters', e.g. bf16, the base product alone in it and the LoRA term on x in the adapters'
dtype, as peft's bitsandbytes layer keeps it). With dropout
active in training peft computes the base a second time on ``dropout(x)`` (variants.py:242-245, dora.py:158-162):
so do we, with qkernels' 4-bit matmul both times.

The row norm ``||W + s B A||`` needs the weight in float: it is dequantized into a temporary ``[out, in]`` tensor
under ``torch.no_grad`` on every forward (peft dequantizes too, dora.py:141), used for the norm and freed. Nothing
``[out, in]`` is saved for backward: the base products save the packed weight (peft's recomputed base on
``dropout(x)`` is an ``F.linear`` with the dequantized weight, which autograd keeps; ours does not). The norm is
detached (dora.py:146-152), so ``A`` and ``B`` get gradients through the LoRA term only, ``m`` through ``g``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import matmul_4bit_lora
from .quant_state import QuantState

__all__ = ["DoraMagnitude", "dora_forward_4bit", "dora_forward_float", "dora_merged_weight", "dora_weight_norm"]


class DoraMagnitude(nn.Module):
    """Holds one adapter's DoRA magnitude ``weight [out_features]`` (float32, trainable), where peft's
    ``DoraLinearLayer`` holds it, so the state-dict key is peft's ``lora_magnitude_vector.<adapter>.weight``.

    Args:
        weight: the initial magnitude, ``[out_features]``; copied into a new Parameter.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=True)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


def dora_weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W + scaling * B @ A||`` per row (``[out]``), no gradient, as peft's ``get_weight_norm``.

    peft/tuners/lora/dora.py:86-91: ``weight + scaling * lora_weight``, ``torch.linalg.norm(dim=1)``, cast to the
    sum's dtype. ``W`` is the float base weight ``[out, in]`` already in the LoRA weights' dtype (peft casts it to
    ``x.dtype``, which is the adapters' float32 outside autocast: bnb.py:544-546, dora.py:142), ``A [r, in]``,
    ``B [out, r]``.

    Returns: float ``[out]``, detached.
    """
    with torch.no_grad():
        lora_weight = (B.detach() @ A.detach()).to(W.dtype)  # dora.py:97-98 forms B A through the layers: same product
        weight = W + scaling * lora_weight
        return torch.linalg.norm(weight, dim=1).to(weight.dtype)


def _dropout_recomputes(dropout: nn.Module, training: bool) -> bool:
    """peft/tuners/lora/variants.py:242-245: the base is recomputed on dropout(x) unless the dropout is an
    ``nn.Identity`` (p == 0) or the layer is in eval mode."""
    return training and not isinstance(dropout, nn.Identity)


def dora_forward_4bit(x: torch.Tensor, xc: torch.Tensor, packed: torch.Tensor, state: QuantState, W: torch.Tensor,
                      A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                      bias: torch.Tensor | None, dropout: nn.Module, training: bool) -> torch.Tensor:
    """DoRA on a 4-bit base (module docstring). ``x [..., in]`` the layer's input and ``xc`` the same in the compute
    dtype (the base product's input, as bitsandbytes casts to its compute_dtype); the LoRA branch reads ``x`` in the
    adapters' dtype (peft's bnb.py:544-546). ``W`` the dequantized weight in the adapters' dtype (for the norm only);
    ``magnitude [out]``. Returns ``[..., out]`` in the promoted dtype of xc and the adapters (the caller casts back,
    as peft's bnb.py:562-563)."""
    g = magnitude / dora_weight_norm(W, A, B, scaling)  # dora.py:152-153: the norm is detached, m is not
    xl = x if x.dtype == A.dtype else x.to(A.dtype)
    if not _dropout_recomputes(dropout, training):
        # peft: result + (g - 1) * (result - bias) + g * s * lora(x) = g * (x W^T + s * lora(x)) + bias
        if xc.dtype == A.dtype and x.dtype == A.dtype:  # one fused product, in the adapters' dtype as peft's sum
            y = g * matmul_4bit_lora(xc, packed, state, A, B, scaling, None, 0.0, training=training)
        else:  # a narrower compute dtype: the LoRA term (and its gradients) stay in the adapters' dtype, as peft's
            base = matmul_4bit_lora(xc, packed, state, None, None, 0.0, None, training=training)
            y = g * (base + F.linear(F.linear(xl, A), B) * scaling)
        return y if bias is None else y + bias
    base = matmul_4bit_lora(xc, packed, state, None, None, 0.0, bias, training=training)  # result, with bias
    xd = dropout(xl)  # variants.py:245
    # peft's recomputed base is F.linear(dropout(x), W) in the adapters' dtype (dora.py:162): the same with our matmul
    base_d = matmul_4bit_lora(xd, packed, state, None, None, 0.0, None, training=training)
    lora = F.linear(F.linear(xd, A), B)
    return base + ((g - 1) * base_d + g * lora * scaling)  # dora.py:164


def dora_forward_float(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       magnitude: torch.Tensor, scaling: float, bias: torch.Tensor | None, dropout: nn.Module,
                       training: bool) -> torch.Tensor:
    """DoRA on a float base, peft's ``lora.Linear`` step for step (layer.py:1088-1113, variants.py:230-257,
    dora.py:132-165): ``x`` has the weight's dtype; returns ``[..., out]`` in the base result's dtype."""
    result = F.linear(x, weight, bias)
    xl = x.to(A.dtype)
    W = weight.to(xl.dtype)
    g = magnitude / dora_weight_norm(W, A, B, scaling)
    if _dropout_recomputes(dropout, training):
        xl = dropout(xl)
        base = F.linear(xl, W)
    else:
        base = result if bias is None else result - bias
    out = result + ((g - 1) * base + g * F.linear(F.linear(xl, A), B) * scaling)
    return out.to(result.dtype)


def dora_merged_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """``(m / ||W + s B A||_row) * (W + s B A)``: peft's ``DoraLinearVariant.merge_safe`` (variants.py:170-194).

    ``W [out, in]`` the base weight as peft's merge sees it (a 4-bit weight dequantized to its quant-state dtype,
    bnb.py:384), promoted with the float32 delta ``s B A`` (``get_delta_weight``, bnb.py:449-456).
    Returns the merged ``[out, in]`` in the promoted dtype, no gradient.
    """
    with torch.no_grad():
        delta = (B.detach() @ A.detach()) * scaling
        weight = W + delta
        norm = torch.linalg.norm(weight, dim=1).to(weight.dtype)  # get_weight_norm(W, delta, scaling=1)
        return (magnitude.detach() / norm).view(-1, 1) * weight
