"""LoftQ initialization (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models").

Goal: LoRA factors ``A [r, K]``, ``B [N, r]`` such that ``dequant(Q) + s * B @ A`` is close to the float weight
``W [N, K]`` in Frobenius norm, so that fine-tuning starts from (nearly) the float model instead of the
quantized one.

Two variants, chosen by ``num_iter``:

- ``num_iter=1`` (default): **Q stays ``quantize_4bit(W)``**, byte for byte what bitsandbytes stores for W.
  For a fixed Q the best rank-r correction is the truncated SVD of the residual ``R = W - dequant(Q)``
  (Eckart-Young), so one SVD is optimal and iterating cannot help:
  ``||W - dequant(Q) - s B A||_F^2 = sum_{i > r} sigma_i(R)^2``. The adapter then stays valid on top of any
  stock 4-bit checkpoint of the same base model (quantized by bitsandbytes or by qkernels), which is why it is
  the default.
- ``num_iter > 1``: LoftQ's alternating minimization: ``Q_t = quantize_4bit(W - s B_{t-1} A_{t-1})``,
  ``(B_t, A_t) = SVD_r(W - dequant(Q_t))``; the iterate with the smallest error is kept (the first iterate is
  the ``num_iter=1`` solution, so this is never worse). **This changes the stored 4-bit weight**: the adapter
  only fits that Q, so the base weight must be saved and shipped with it (a stock checkpoint of the base model
  would be wrong under it).

The scale is split evenly: ``s B A = U_r diag(sigma_r) V_r^T`` with ``B = U_r sqrt(sigma_r / s)``,
``A = sqrt(sigma_r / s) V_r^T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .functional import dequantize_4bit, quantize_4bit
from .quant_state import QuantState

__all__ = ["LoftQResult", "loftq_init", "lowrank_factors"]

# Above this min(N, K) a randomized SVD (torch.svd_lowrank, 2 power iterations, r + 16 columns) replaces the
# exact one: an exact SVD of a 4096x4096 float32 matrix takes ~20 s on a 2-core CPU.
EXACT_SVD_MAX_DIM = 2048


@dataclass
class LoftQResult:
    """What ``loftq_init`` found.

    packed, quant_state: the 4-bit weight (the input ones, unchanged, when ``num_iter == 1`` and they were given).
    lora_A: float32 ``[r, K]``; lora_B: float32 ``[N, r]``.
    errors: ``||W - dequant(Q_t) - s B_t A_t||_F / ||W||_F`` per iteration (float64 norms).
    quant_error: ``||W - dequant(quantize_4bit(W))||_F / ||W||_F``, the error without LoRA.
    """

    packed: torch.Tensor
    quant_state: QuantState
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    errors: list[float]
    quant_error: float


def lowrank_factors(R: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, K], B [N, r])`` float32 with ``scaling * B @ A`` the best rank-``r`` approximation of ``R [N, K]``."""
    R = R.to(torch.float32)
    if min(R.shape) > EXACT_SVD_MAX_DIM:
        U, S, V = torch.svd_lowrank(R, q=min(r + 16, min(R.shape)), niter=2)
        U, S, Vh = U[:, :r], S[:r], V[:, :r].t()
    else:
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    k = S.numel()
    root = torch.sqrt(S / scaling)
    A = torch.zeros(r, R.shape[1], dtype=torch.float32, device=R.device)
    B = torch.zeros(R.shape[0], r, dtype=torch.float32, device=R.device)
    A[:k] = root[:, None] * Vh  # r > min(N, K): the extra rows/columns stay zero
    B[:, :k] = U * root[None, :]
    return A, B


def loftq_init(
    weight: torch.Tensor,
    r: int,
    scaling: float,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    num_iter: int = 1,
    packed: torch.Tensor | None = None,
    quant_state: QuantState | None = None,
) -> LoftQResult:
    """LoftQ LoRA factors for the float weight ``weight [N, K]`` (see the module docstring for the variants).

    Args:
        weight: float32/float16/bfloat16 ``[N, K]``, the weight that will be stored in 4 bits.
        r: the LoRA rank (rows of ``lora_A``).
        scaling: the adapter's scale (``lora_scaling(lora_alpha, r)``): the factors are divided by it so that
            ``scaling * B @ A`` approximates the quantization residual.
        quant_type, blocksize, double_quant, quant_storage: the 4-bit format, as in ``quantize_4bit``.
        num_iter: LoftQ's alternating steps; 1 keeps the weight quantized exactly as ``quantize_4bit(weight)``.
        packed, quant_state: ``quantize_4bit(weight)`` if the caller already has it (saves one quantization);
            with ``num_iter == 1`` they are returned unchanged. Residuals and SVDs run in float32 on weight's device.

    Returns:
        A ``LoftQResult``: ``lora_A [r, K]``, ``lora_B [N, r]`` (float32), the ``packed`` weight and its
        ``quant_state`` (new ones when ``num_iter > 1``), ``errors`` per iteration and ``quant_error`` without LoRA.

    Raises:
        ValueError: ``r`` or ``num_iter`` is not an int >= 1, or ``weight`` is not 2-D (and ``quantize_4bit``'s
            errors for a bad format argument).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:  # r=0 returned empty factors
        raise ValueError(f"r must be a positive int (the LoRA rank), got {r!r}")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"loftq num_iter must be an int >= 1, got {num_iter!r} (1 keeps the quantized weight)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    W = weight.detach().to(torch.float32)
    w_norm = float(torch.linalg.vector_norm(W.double()))
    w_norm = w_norm if w_norm > 0 else 1.0
    if packed is None or quant_state is None:
        packed, quant_state = quantize_4bit(weight.detach().contiguous(), blocksize, quant_type, double_quant,
                                            quant_storage)
    best = None
    errors: list[float] = []
    quant_error = None
    target = W
    for t in range(num_iter):
        if t > 0:  # LoftQ's alternating step: quantize what the adapter does not explain
            packed_t, state_t = quantize_4bit(target.to(weight.dtype).contiguous(), blocksize, quant_type,
                                              double_quant, quant_storage)
        else:
            packed_t, state_t = packed, quant_state
        residual = W - dequantize_4bit(packed_t, state_t, torch.float32)
        if t == 0:
            quant_error = float(torch.linalg.vector_norm(residual.double())) / w_norm
        A, B = lowrank_factors(residual, r, scaling)
        delta = scaling * (B @ A)
        err = float(torch.linalg.vector_norm((residual - delta).double())) / w_norm
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, packed_t, state_t, A, B)
        target = W - delta
    _, packed_b, state_b, A_b, B_b = best
    return LoftQResult(packed_b, state_b, A_b, B_b, errors, quant_error)
