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

The row norm ``||W + s B A||`` needs the weight in float: peft dequantizes all of it on every forward (dora.py:141).
``dora_weight_norm_4bit`` does the same arithmetic a slab of rows at a time (about a million weights: decoded into
a reused buffer, ``B_rows @ A`` into another, the sum and its norm), under ``torch.no_grad``: the same arithmetic
as the whole-matrix computation (only the BLAS product's and the norm's summation order may depend on a slab's row
count: float32 rounding), without three fresh ``[out, in]`` float tensors per forward (their page faults made a
4096 x 4096 DoRA layer's decode step ~150 ms on one CPU core; ~26 ms this way). Nothing
``[out, in]`` is saved for backward: the base products save the packed weight (peft's recomputed base on
``dropout(x)`` is an ``F.linear`` with the dequantized weight, which autograd keeps; ours does not). The norm is
detached (dora.py:146-152), so ``A`` and ``B`` get gradients through the LoRA term only, ``m`` through ``g``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .lora import matmul_4bit_lora
from .quant_state import QuantState

__all__ = ["DoraMagnitude", "dora_embedding_init_norm", "dora_embedding_merged_weight", "dora_embedding_norm",
           "dora_forward_4bit", "dora_forward_float", "dora_merged_weight", "dora_weight_norm", "dora_weight_norm_4bit"]


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


def dora_weight_norm_4bit(packed: torch.Tensor, state: QuantState, A: torch.Tensor, B: torch.Tensor, scaling: float,
                          chunk_weights: int = 1 << 20) -> torch.Tensor:
    """``||dequant(W) + scaling * B @ A||`` per row for a 4-bit weight: ``dora_weight_norm(W, A, B, scaling)`` with
    ``W`` dequantized to the quant state's dtype and cast to A's (peft's bnb DoRA: integrations.py:116-123,
    dora.py:141-142), computed a slab of rows at a time (module docstring; equal up to float32 summation order).

    Args:
        packed, state: the 4-bit weight ``[out, in]`` and its ``QuantState`` (plain or double-quantized scales).
        A: ``[r, in]``; B: ``[out, r]``, of one float dtype (the norm's).
        scaling: the LoRA scale ``s``.
        chunk_weights: about how many weights a slab holds (slabs start on a scale block, and on a nested block for
            double-quantized scales; when rows cannot be cut there, the whole weight is one slab).

    Returns:
        ``[out]`` in A's dtype, no gradient.
    """
    from . import _ops
    from .functional import dequantize_4bit

    N, K = (int(v) for v in state.shape)
    dtype = A.dtype
    bs = int(state.blocksize)
    nb = int(state.state2.blocksize) if state.nested else 1
    unit = bs * nb  # a slab starts where a (nested) scale block starts
    step = unit // math.gcd(unit, K)  # rows per slab: rows * K a multiple of unit
    rows = max(step, (chunk_weights // max(K, 1)) // step * step)
    with torch.no_grad():
        A_, B_ = A.detach(), B.detach()
        if rows >= N:
            return dora_weight_norm(dequantize_4bit(packed, state, state.dtype).to(dtype), A_, B_, scaling)
        raw = packed.reshape(-1).view(torch.uint8)
        out = torch.empty(N, dtype=dtype, device=packed.device)
        wbuf = torch.empty((rows, K), dtype=state.dtype, device=packed.device)
        lbuf = torch.empty((rows, K), dtype=dtype, device=packed.device)
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            e0, e1 = n0 * K, n1 * K
            b0, b1 = e0 // bs, -(-e1 // bs)
            nested = (state.state2.absmax[b0 // nb: -(-b1 // nb)], state.state2.code, state.offset) if state.nested \
                else (None, None, None)
            W = _ops.dequantize_4bit_impl(raw[e0 // 2: (e1 + 1) // 2], state.absmax[b0:b1], state.code, bs,
                                          [n1 - n0, K], state.dtype, *nested, nb if state.nested else 256, None,
                                          out=wbuf[: n1 - n0])
            L = torch.mm(B_[n0:n1], A_, out=lbuf[: n1 - n0])  # dora_weight_norm's B A, s * (B A), then + W:
            L.mul_(scaling).add_(W if W.dtype == dtype else W.to(dtype))  # the same roundings (a + b == b + a)
            out[n0:n1] = torch.linalg.norm(L, dim=1)
        return out


def dora_forward_4bit(x: torch.Tensor, xc: torch.Tensor, packed: torch.Tensor, state: QuantState,
                      A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                      bias: torch.Tensor | None, dropout: nn.Module, training: bool) -> torch.Tensor:
    """DoRA on a 4-bit base (module docstring). ``x [..., in]`` the layer's input and ``xc`` the same in the compute
    dtype (the base product's input, as bitsandbytes casts to its compute_dtype); the LoRA branch reads ``x`` in the
    adapters' dtype (peft's bnb.py:544-546). ``magnitude [out]``. Returns ``[..., out]`` in the promoted dtype of xc
    and the adapters (the caller casts back, as peft's bnb.py:562-563)."""
    g = magnitude / dora_weight_norm_4bit(packed, state, A, B, scaling)  # dora.py:152-153: the norm is detached
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


# ---------------------------------------------------------------------------------------------- DoRA on an embedding
# peft's DoraEmbeddingVariant / DoraEmbeddingLayer (variants.py:260-365, dora.py:173-202): the magnitude m has one entry
# per embedding dimension, the norm is taken over the vocabulary (column norms of W [num_embeddings, embedding_dim]:
# ``transpose(W, fan_in_fan_out=True)`` rows), and the output is ``g * E[x] + g * s * (A^T)[x] @ B^T`` with
# ``g = m / ||W + s (B A)^T||_col`` (detached). Each helper below is peft's sequence of torch ops, so the bits match.


def dora_embedding_init_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The initial magnitude, as peft's ``DoraLinearLayer.update_layer`` (dora.py:101-130) computes it for an
    embedding: the adapter then still holds the embedding's dtype when that is float16 / bfloat16 (peft moves it to
    the base layer's dtype before the variant's init, layer.py:1267-1271, tuners_utils.py:2168-2212; float16 is
    multiplied in float32 and rounded back), ``B @ A`` ``[embedding_dim, num_embeddings]``, plus ``W^T``, norms of its
    rows in the sum's dtype.

    Args: ``weight [num_embeddings, embedding_dim]``; ``A [r, num_embeddings]``, ``B [embedding_dim, r]`` (float32
    holding values already rounded through a half weight dtype, as ``QLoRAEmbedding.update_layer`` draws them).
    Returns ``[embedding_dim]`` in the weight's dtype (float32 for a float32 weight), no gradient.
    """
    with torch.no_grad():
        adt = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else A.dtype
        A_, B_ = A.detach().to(adt), B.detach().to(adt)
        if adt == torch.float16:  # dora.py:103-106, 122-123
            A_, B_ = A_.float(), B_.float()
        lora_weight = B_ @ A_
        if adt == torch.float16:
            lora_weight = lora_weight.half()
        w = weight.detach().T + scaling * lora_weight  # get_weight_norm: transpose(weight, fan_in_fan_out=True)
        return torch.linalg.norm(w, dim=1).to(w.dtype)


def dora_embedding_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W^T + s (A^T @ B^T)^T||`` per embedding dimension, as peft's ``DoraEmbeddingLayer.forward`` forms it
    (dora.py:183-195: ``lora_weight = (lora_A @ lora_B).T`` with ``lora_A = A^T``, ``lora_B = B^T``). ``weight
    [num_embeddings, embedding_dim]`` in its own dtype, ``A [r, num_embeddings]``, ``B [embedding_dim, r]``.
    Returns ``[embedding_dim]`` in the sum's dtype, no gradient (peft detaches it)."""
    with torch.no_grad():
        lora_weight = (A.detach().T @ B.detach().T).T
        w = weight.detach().T + scaling * lora_weight
        return torch.linalg.norm(w, dim=1).to(w.dtype)


def dora_embedding_merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """peft's ``DoraEmbeddingVariant.merge_unsafe`` (variants.py:304-323): with ``delta = get_delta_weight()``
    (``(B A)^T s``, ``[num_embeddings, embedding_dim]``), the norm ``||W^T + 1 * delta^T||`` per embedding dimension
    of the unmerged weight, then ``(m / norm).view(1, -1) * (W + delta)`` cast to W's dtype. No gradient."""
    with torch.no_grad():
        w = weight.detach()
        s = w.T + 1 * delta.T  # get_weight_norm(base_weight, delta_weight.T, scaling=1)
        norm = torch.linalg.norm(s, dim=1).to(s.dtype)
        factor = (magnitude.detach() / norm).view(1, -1)
        return (factor * (w + delta)).to(w.dtype)
