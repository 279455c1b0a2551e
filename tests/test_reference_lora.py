"""reference.matmul_4bit_lora: the oracle for the fused kernels. Forward against an explicit dense
computation, autograd gradients against the written-out backward formulas (DESIGN §2), in float64."""

import pytest
import torch

import qkernels
from qkernels import reference


def _setup(M, K, N, r, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    packed, state = qkernels.quantize_4bit(W, 64, "nf4", double_quant=True)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    A = (torch.randn(r, K, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    B = (torch.randn(N, r, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    b = torch.randn(N, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    return packed, state, x, A, B, b


@pytest.mark.parametrize("M,K,N,r", [(1, 64, 32, 1), (3, 130, 67, 8), (17, 257, 129, 16)])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_forward_matches_dense_computation(M, K, N, r, rslora):
    packed, state, x, A, B, b = _setup(M, K, N, r)
    s = reference.lora_scaling(16, r, use_rslora=rslora)
    assert s == (16 / r**0.5 if rslora else 16 / r)
    y = reference.matmul_4bit_lora(x, packed, state, A, B, s, bias=b)
    W = qkernels.dequantize_4bit(packed, state, dtype=torch.float32).double()
    expected = x @ W.T + s * (x @ A.T) @ B.T + b
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)  # float64, same ops: only summation order differs


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_autograd_equals_explicit_backward(dropout_p, bias):
    packed, state, x, A, B, b = _setup(5, 130, 70, 8, bias=bias)
    x = x.reshape(1, 5, 130).requires_grad_()  # a leading batch dim
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) >= dropout_p).double()
    s = 2.0
    y = reference.matmul_4bit_lora(x, packed, state, A, B, s, bias=b, dropout_p=dropout_p, dropout_mask=mask)
    gy = torch.randn_like(y)
    y.backward(gy)
    dx, dA, dB, db = reference.matmul_4bit_lora_backward(gy, x.detach(), packed, state, A.detach(), B.detach(), s,
                                                         dropout_p=dropout_p, dropout_mask=mask)
    torch.testing.assert_close(x.grad, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.grad, dA, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(B.grad, dB, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(b.grad, db, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    packed, state, x, A, B, b = _setup(2, 40, 24, 2)
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, A, B, b: reference.matmul_4bit_lora(x, packed, state, A, B, 0.5, bias=b), (x, A, B, b)
    )


def test_dropout_mask_is_used_and_weight_gets_no_gradient():
    packed, state, x, A, B, _ = _setup(4, 64, 16, 4)
    zero_mask = torch.zeros_like(x)
    y0 = reference.matmul_4bit_lora(x, packed, state, A, B, 1.0, dropout_p=0.5, dropout_mask=zero_mask)
    base = reference.matmul_4bit_lora(x, packed, state, A * 0, B, 1.0)
    torch.testing.assert_close(y0, base)  # all inputs dropped: the LoRA term vanishes
    assert not packed.requires_grad and packed.dtype == torch.uint8
    with pytest.raises(ValueError, match="dropout_p"):
        reference.matmul_4bit_lora(x, packed, state, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="does not match the quantized weight"):
        reference.matmul_4bit_lora(x[:, :10], packed, state, A, B, 1.0)


def test_without_lora_is_the_plain_4bit_linear():
    """lora_A = lora_B = None is the plain 4-bit linear, as in qkernels.matmul_4bit_lora (it was an AttributeError);
    passing only one of them is a ValueError."""
    packed, state, x, A, B, b = _setup(3, 130, 67, 4)
    y = reference.matmul_4bit_lora(x, packed, state, None, None, 2.0, bias=b)
    W = qkernels.dequantize_4bit(packed, state, dtype=torch.float32).double()
    torch.testing.assert_close(y, x @ W.T + b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="both"):
        reference.matmul_4bit_lora(x, packed, state, A, None, 2.0)
