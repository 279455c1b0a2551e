"""Shared helpers for tests that use bitsandbytes as the oracle."""

import bitsandbytes as bnb  # the oracle; CI installs bitsandbytes==0.50.2. Missing it fails, never skips.
import bitsandbytes.functional as F
import torch

__all__ = ["bnb", "F", "exact_codes", "same_bits", "unpack_nibbles"]


def exact_codes(normalized: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Nearest entry of ``code`` for each value, by brute force over float32 midpoints; ties to the lower value.

    Independent of qkernels' bucketize implementation: for each value counts the sorted midpoints strictly
    below it.
    """
    order = torch.argsort(code, stable=True)
    s = code[order]
    mids = (s[:-1] + s[1:]) / 2
    idx = (normalized.reshape(-1, 1) > mids.reshape(1, -1)).sum(1)
    return order[idx]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack([b >> 4, b & 0xF], 1).reshape(-1)[:n].long()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality of two tensors' values in row-major order (bitsandbytes returns 1-D shapes as [1, n])."""
    return a.dtype == b.dtype and a.numel() == b.numel() and torch.equal(
        a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)
    )
