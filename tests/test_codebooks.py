"""Codebooks: bit-equal to bitsandbytes' tables."""

import torch

import qkernels
from qkernels import codebooks

from ._oracle import F


def test_nf4_equals_bitsandbytes_bit_for_bit():
    ours = codebooks.nf4_codebook()
    assert ours.dtype == torch.float32 and ours.shape == (16,)
    assert torch.equal(ours.view(torch.int32), F.get_4bit_type("nf4", device="cpu").view(torch.int32))
    assert ours[7] == 0 and ours[0] == -1 and ours[15] == 1
    assert torch.all(ours[1:] > ours[:-1]), "NF4 is sorted ascending: code index = rank"


def test_nf4_is_built_from_normal_quantiles():
    # Independent rebuild from the definition: 8 positive and 7 negative quantiles of N(0, 1).
    from scipy.stats import norm

    pos = norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(0.9677083, 0.5, 8)[:-1].numpy())
    ref = torch.tensor(sorted([*pos, 0.0, *neg]), dtype=torch.float64)
    assert torch.equal((ref / ref.max()).float(), codebooks.nf4_codebook())


def test_fp4_equals_bitsandbytes():
    ours = codebooks.fp4_codebook()
    assert torch.equal(ours.view(torch.int32), F.get_4bit_type("fp4", device="cpu").view(torch.int32))
    # sign in bit 3: entry 8 + i is the negation of entry i (its zero is +0.0, bit for bit as bitsandbytes)
    assert torch.equal(ours[8:], -ours[:8]) and ours[8].view(torch.int32) == 0


def test_dynamic_map_equals_bitsandbytes():
    ours = codebooks.dynamic_map()
    assert ours.shape == (256,)
    assert torch.equal(ours.view(torch.int32), F.create_dynamic_map().view(torch.int32))
    assert torch.all(ours[1:] > ours[:-1]) and ours[-1] == 1.0


def test_get_codebook_rejects_unknown_type():
    import pytest

    with pytest.raises(ValueError, match="quant_type"):
        qkernels.get_codebook("int4")


def test_codebooks_are_fresh_copies():
    a = codebooks.nf4_codebook()
    a.zero_()
    assert codebooks.nf4_codebook()[0] == -1.0
