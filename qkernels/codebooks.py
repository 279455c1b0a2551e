"""Codebooks (lookup tables) for 4-bit and 8-bit blockwise quantization.

Every table here is bit-for-bit the one bitsandbytes uses, so packed data written by either library
decodes the same in both. Kernels take the 16-entry 4-bit table as an input tensor: any sorted or
unsorted 16-entry lookup codebook works, not only NF4 and FP4.

- ``nf4_codebook()``: NormalFloat4 (QLoRA, Dettmers et al. 2023), built from normal quantiles with
  ``scipy.stats.norm.ppf``. Index = nibble value; the table is sorted ascending; entry 7 is 0.
- ``fp4_codebook()``: bitsandbytes' e2m1 FP4. Index = nibble value in bit-pattern order
  (bit 3 = sign), so the table is NOT sorted; entries 0 and 8 are both +0.0.
- ``dynamic_map()``: the signed 8-bit "dynamic" map (256 entries, sorted) used for the
  double-quantized (nested) absmax scales.
"""

from __future__ import annotations

import functools
from enum import Enum

import torch

__all__ = ["QuantType", "nf4_codebook", "fp4_codebook", "dynamic_map", "get_codebook", "midpoints"]

# QLoRA's outermost quantile: norm.ppf(0.9677083) ~ 1.848 sigma. bitsandbytes and the paper's code
# fix it at this value (chosen so the extreme bins hold as much mass as the inner ones).
NF4_OFFSET = 0.9677083


class QuantType(str, Enum):
    """The 4-bit data types with a bitsandbytes-compatible codebook."""

    NF4 = "nf4"
    FP4 = "fp4"


@functools.cache
def _nf4_cpu() -> torch.Tensor:
    try:
        from scipy.stats import norm
    except ImportError as e:  # scipy is a hard dependency; say so plainly if it is missing.
        raise ImportError("qkernels builds the NF4 codebook with scipy.stats.norm: pip install scipy") from e
    # The quantile points are float32 (torch.linspace), exactly as the QLoRA/bitsandbytes code builds
    # them: ppf of float64 linspace points differs from bitsandbytes' table by 1 ulp in some entries.
    positive = norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].numpy()).tolist()  # 8 values > 0
    negative = (-norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].numpy())).tolist()  # 7 values < 0
    values = torch.tensor(sorted(positive + [0.0] + negative), dtype=torch.float64)
    values = values / values.max()
    return values.to(torch.float32)


def nf4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """The NF4 codebook: float32 ``[16]``, sorted ascending, ``[-1.0, -0.6961928, ..., 0.7229568, 1.0]``.

    Built from normal quantiles (8 positive, 7 negative, and an exact zero at index 7), normalized by
    the maximum. Equal in float32 to bitsandbytes' hard-coded table. Returns a fresh tensor on ``device``
    (default: CPU).
    """
    return _nf4_cpu().to(device=device, copy=True)


@functools.cache
def _fp4_cpu() -> torch.Tensor:
    # e2m1 with exponent bias 2^(e-1) = 2 and one subnormal: magnitudes for bit patterns 000..111 are
    # 0, 0.0625, 8, 12, 4, 6, 2, 3 (bitsandbytes' order); bit 3 is the sign. Normalized by 12.
    magnitudes = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    # Nibble 8 (sign bit, zero magnitude) is +0.0 in bitsandbytes' table (its source writes the int `-0`).
    values = torch.tensor(magnitudes + [-m if m else 0.0 for m in magnitudes], dtype=torch.float32)
    return values / values.abs().max()


def fp4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' FP4 (e2m1) codebook: float32 ``[16]`` indexed by bit pattern (bit 3 = sign).

    Not sorted; nibbles 0 and 8 are both +0.0 (as in bitsandbytes). Returns a fresh tensor on ``device``
    (default: CPU).
    """
    return _fp4_cpu().to(device=device, copy=True)


@functools.cache
def _dynamic_cpu(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    # The "dynamic tree" 8-bit type (Dettmers 2015): a run of leading zero bits is a decimal exponent
    # 10^-(e), the bits after the indicator bit a linear fraction in [0.1, 1]. Built in float32 exactly
    # as bitsandbytes builds it, so the 256 float32 entries match bit for bit.
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        if signed:
            fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        else:
            fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"dynamic map with {max_exponent_bits} exponent bits has {len(data)} entries")
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def dynamic_map(device: torch.device | str | None = None, *, signed: bool = True) -> torch.Tensor:
    """The 8-bit dynamic map: float32 ``[256]``, sorted ascending, max 1.0, one exact zero.

    The signed map (default) quantizes the double-quantized absmax scales (the centered absmax
    values are signed). Equal bit for bit to ``bitsandbytes.functional.create_dynamic_map()``.
    Returns a fresh tensor on ``device`` (default: CPU); ``signed=False`` gives the unsigned map (all >= 0).
    """
    return _dynamic_cpu(signed, 7, 8).to(device=device, copy=True)


def get_codebook(quant_type: str | QuantType, device: torch.device | str | None = None) -> torch.Tensor:
    """Returns the 16-entry float32 codebook for ``quant_type`` (``"nf4"`` or ``"fp4"``, or a ``QuantType``) on
    ``device`` (default: CPU), a fresh tensor. Raises ValueError for any other ``quant_type``."""
    qt = QuantType(quant_type) if quant_type in ("nf4", "fp4") or isinstance(quant_type, QuantType) else None
    if qt is QuantType.NF4:
        return nf4_codebook(device)
    if qt is QuantType.FP4:
        return fp4_codebook(device)
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}{lowercase_hint(quant_type)}")


def lowercase_hint(quant_type: object) -> str:
    """``"; the names are lowercase: 'nf4'"`` when ``quant_type`` is ``"NF4"`` or ``"Fp4"``, else ``""``."""
    if isinstance(quant_type, str) and quant_type.strip().lower() in ("nf4", "fp4"):
        return f"; the names are lowercase: {quant_type.strip().lower()!r}"
    return ""


def midpoints(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the decision boundaries of a lookup codebook ``code`` (any float tensor): ``(bounds, order)``.

    ``order`` sorts the codebook (stable, so of two equal entries the lower index comes first) and
    ``bounds[i] = (sorted[i] + sorted[i + 1]) / 2`` in float32. A normalized value ``v`` maps to
    ``order[j]`` where ``j`` is the number of bounds strictly below ``v`` (``torch.bucketize`` with
    ``right=False``): a value exactly on a midpoint goes to the lower entry. For the sorted NF4 and
    dynamic maps ``order`` is the identity.
    """
    code = code.reshape(-1).to(torch.float32)  # its entries in order, whatever its shape (as the native kernels)
    order = torch.argsort(code, stable=True)
    s = code[order]
    return (s[:-1] + s[1:]) / 2, order
