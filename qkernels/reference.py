"""The reference backend: pure PyTorch, any device. It defines what "correct" means for every kernel.

Each function is written to be read, not to be fast: plain tensor ops in the order the format
specifies (docs/format.md), float32 throughout, one rounding to the output dtype at the end. The
native (C++/CUDA) and Triton kernels are tested bit-for-bit (quantize/dequantize) or against a float64
run of these functions (matmuls).

Rules, identical to bitsandbytes' PyTorch backend:
- ``absmax[b] = max(|x|)`` over block ``b`` (float32); normalized ``v = clamp(x * (1 / max(absmax, 1e-38)),
  -1, 1)`` in float32. The 1e-38 floor makes an all-zero block encode as the codebook's zero entry
  (NF4 code 7) with absmax 0, instead of 0 * inf = NaN.
- code = nearest codebook entry by float32 midpoints; a value exactly on a midpoint takes the lower entry.
- Packing: element ``2j`` in the high nibble of byte ``j``, element ``2j+1`` in the low nibble.
- Dequantization: ``code[nibble] * absmax`` in float32, rounded once to the output dtype.
"""

from __future__ import annotations

import math
import numbers

import torch

from .codebooks import midpoints

__all__ = [
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "absmax_of",
    "matmul_4bit_lora",
    "matmul_4bit_lora_backward",
    "lora_scaling",
]

# bitsandbytes' floor on the absmax before taking its reciprocal (1 / 1e-38 is still finite in float32).
ABSMAX_FLOOR = 1e-38


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """View a flat float32 tensor as ``[nblocks, blocksize]``, zero-padding the partial last block."""
    n = flat.numel()
    pad = -n % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


def _encode(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax + nearest-code encoding of a flat tensor: ``(codes int64 [n], absmax float32 [nblocks])``."""
    n = flat.numel()
    blocks = _blocks(flat.to(torch.float32), blocksize)  # zero padding never raises a block's absmax
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax.clamp(min=ABSMAX_FLOOR)
    normalized = torch.clamp(blocks * inv[:, None], -1.0, 1.0).reshape(-1)[:n]
    bounds, order = midpoints(code.to(flat.device))
    codes = order[torch.bucketize(normalized, bounds, right=False)]
    return codes, absmax


def absmax_of(A: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Returns the per-block ``max |x|`` of ``A`` flattened row-major: float32 ``[ceil(numel / blocksize)]``."""
    return _blocks(A.reshape(-1).to(torch.float32), blocksize).abs().amax(dim=1)


def quantize_4bit(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of ``A`` (any shape, float) against a 16-entry ``code``.

    Returns ``(packed, absmax)``: packed uint8 ``[(n + 1) // 2, 1]`` (element ``2j`` in the high nibble;
    for odd ``n`` the last low nibble is the code of 0.0), absmax float32 ``[ceil(n / blocksize)]``.
    No argument checking: ``qkernels.quantize_4bit`` validates before calling a backend.
    """
    codes, absmax = _encode(A.reshape(-1), code, blocksize)
    if codes.numel() % 2:
        # The pad nibble is the code of a normalized 0.0 (what bitsandbytes writes), never read back.
        codes = torch.cat([codes, _encode(torch.zeros(1, device=A.device), code, 32)[0]])
    c = codes.to(torch.uint8)
    packed = (c[0::2] << 4) | c[1::2]
    return packed.unsqueeze(1), absmax


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Decode ``n`` elements: ``code[nibble] * absmax[i // blocksize]`` in float32, then ``.to(dtype)``.

    ``packed``: uint8 bytes (any shape, at least ``ceil(n / 2)`` of them); ``absmax`` float32 decoded
    scales. Returns a flat tensor ``[n]`` of ``dtype`` (float64 allowed, for oracles).
    """
    b = packed.reshape(-1)[: (n + 1) // 2]
    nibbles = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()
    values = code.reshape(-1).to(torch.float32)[nibbles]  # a [4, 4] codebook is 16 entries, as for the native kernels
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization (used for the nested absmax): ``(codes uint8 [n], absmax float32 [nblocks])``.

    Same rule as the 4-bit path against a 256-entry ``code`` (the dynamic map), one code per byte: ``A`` (any
    shape, float) flattened into blocks of ``blocksize``. Returns ``(codes, absmax)``. No argument checking
    (``qkernels.quantize_blockwise`` validates).
    """
    codes, absmax = _encode(A.reshape(-1), code, blocksize)
    return codes.to(torch.uint8), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: returns ``code[q] * absmax[i // blocksize]`` in float32, flat ``[n]``."""
    n = q.numel()
    scale = absmax.reshape(-1).to(torch.float32).repeat_interleave(blocksize)[:n]
    return code.reshape(-1).to(torch.float32)[q.reshape(-1).long()] * scale


def decode_nested_absmax(
    absmax_q: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor,
    nested_blocksize: int,
) -> torch.Tensor:
    """float32 per-block scales from double-quantized ones: ``nested_code[q] * nested_absmax[i // nbs] + offset``.

    Two float32 roundings (product, then sum), never fused: the same bits as bitsandbytes.
    """
    return dequantize_blockwise(absmax_q, nested_absmax, nested_code, nested_blocksize) + offset.to(torch.float32)


# ---------------------------------------------------------------------------------------------- LoRA
def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """Returns LoRA's output scale: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``
    (rsLoRA, Kalajdzievic 2023), as a float. Raises ValueError unless ``r`` is a positive integer."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:  # 2.5 gave a scale; no layer has it
        raise ValueError(f"r must be a positive integer (the LoRA rank), got {r!r}")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _dequantized_weight(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    from .functional import dequantize_4bit as _dq  # validated public entry, reference backend

    return _dq(packed, state, dtype=dtype, backend="reference")


def matmul_4bit_lora(
    x: torch.Tensor,
    packed: torch.Tensor,
    state,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    dropout_mask: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """``Y = X @ dequant(W)^T + scaling * (dropout(X) @ A^T) @ B^T + bias``, differentiable by autograd.

    Shapes: ``x [..., K]``; ``W`` is ``state.shape == [N, K]``; ``lora_A [r, K]`` and ``lora_B [N, r]``
    (peft's ``lora_A.weight`` / ``lora_B.weight`` layouts), or both None for the plain 4-bit linear (as
    ``qkernels.matmul_4bit_lora``); ``bias [N]``; result ``[..., N]`` in x.dtype.
    Computed in ``x.dtype`` (pass float64 tensors for an oracle); W is dequantized to that dtype and gets
    no gradient. Dropout: if ``dropout_mask`` (bool or 0/1, broadcastable to x) is given it is used as is,
    scaled by ``1 / (1 - dropout_p)``; otherwise a fresh mask is drawn when ``training`` and ``dropout_p > 0``.
    ``packed`` / ``state``: the 4-bit weight and its ``QuantState`` (``qkernels.quantize_4bit``'s results).

    Returns ``Y``. Raises ValueError when x's last dimension is not the weight's ``K``, or only one of lora_A /
    lora_B is given (and ``qkernels.dequantize_4bit``'s errors for a state that does not fit ``packed``).
    """
    if len(state.shape) != 2 or x.shape[-1] != state.shape[1]:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match the quantized weight of shape {tuple(state.shape)}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must both be tensors or both be None")
    W = _dequantized_weight(packed, state, x.dtype)
    x_drop = _apply_dropout(x, dropout_p, dropout_mask, training)
    y = x @ W.t()
    if lora_A is not None:
        y = y + scaling * ((x_drop @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t())
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def _apply_dropout(x: torch.Tensor, p: float, mask: torch.Tensor | None, training: bool) -> torch.Tensor:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p!r}")
    if mask is not None:
        return x * mask.to(x.dtype) / (1.0 - p)
    if training and p > 0:
        return torch.nn.functional.dropout(x, p, training=True)
    return x


def matmul_4bit_lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    state,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward formulas of ``matmul_4bit_lora`` (DESIGN §2), written out: ``(dX, dA, dB, dbias)``.

    With ``Xd = dropout(X)`` (same mask as forward) and ``T = Xd A^T``:
    ``dX = dY W + s * ((dY B) A) * mask / (1 - p)``, ``dA = s * (dY B)^T Xd``, ``dB = s * dY^T T``,
    ``dbias = sum(dY)`` over the leading dims. Leading dims of x/grad_y are flattened. No gradient for W.
    ``packed``, ``state``, ``lora_A``, ``lora_B``, ``scaling``, ``dropout_p``: the forward's arguments;
    ``dropout_mask``: the forward's mask (None: no dropout). Returns the four gradients, in x's dtype.
    """
    K = x.shape[-1]
    N = grad_y.shape[-1]
    x2 = x.reshape(-1, K)
    g2 = grad_y.reshape(-1, N)
    W = _dequantized_weight(packed, state, x.dtype)
    A = lora_A.to(x.dtype)
    B = lora_B.to(x.dtype)
    if dropout_mask is not None:
        m2 = dropout_mask.to(x.dtype).expand_as(x).reshape(-1, K) / (1.0 - dropout_p)
    else:
        m2 = torch.ones_like(x2)
    xd = x2 * m2
    gB = g2 @ B  # [M, r]
    dx = g2 @ W + scaling * (gB @ A) * m2
    dA = scaling * gB.t() @ xd
    dB = scaling * g2.t() @ (xd @ A.t())
    dbias = g2.sum(0)
    return dx.reshape(x.shape), dA, dB, dbias
