"""Bad input gets a clear TypeError/ValueError naming the argument; never a crash or a silent wrong answer."""

import pytest
import torch

import qkernels


@pytest.mark.parametrize(
    "A",
    [torch.ones(64, dtype=torch.int32), torch.ones(64, dtype=torch.uint8), torch.ones(64, dtype=torch.bool),
     torch.ones(64, dtype=torch.complex64), torch.ones(64, dtype=torch.float64)],
    ids=["int32", "uint8", "bool", "complex64", "float64"],
)
def test_non_float_input_is_a_type_error(A):
    with pytest.raises(TypeError, match="A must be float32, float16 or bfloat16"):
        qkernels.quantize_4bit(A)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        qkernels.quantize_4bit([1.0, 2.0])


def test_empty_tensor():
    with pytest.raises(ValueError, match="A is empty"):
        qkernels.quantize_4bit(torch.empty(0, 16))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, 64.0, True, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        qkernels.quantize_4bit(torch.randn(128), blocksize=blocksize)


def test_bad_quant_type_and_storage():
    with pytest.raises(ValueError, match="quant_type"):
        qkernels.quantize_4bit(torch.randn(128), quant_type="int4")
    with pytest.raises(ValueError, match="quant_storage"):
        qkernels.quantize_4bit(torch.randn(128), quant_storage=torch.int8)
    with pytest.raises(TypeError, match="double_quant"):
        qkernels.quantize_4bit(torch.randn(128), double_quant="yes")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_input_raises_and_names_the_block(bad):
    """Documented behaviour: NaN/inf raise ValueError naming the first bad block. bitsandbytes would write a
    NaN absmax (or inf, zeroing the block), silently corrupting every value in that block."""
    A = torch.randn(4, 64)
    A[2, 5] = bad
    with pytest.raises(ValueError, match=r"A contains NaN or inf \(first in block 2, elements \[128, 192\)"):
        qkernels.quantize_4bit(A, 64)


def test_bad_dequantize_dtype():
    p, s = qkernels.quantize_4bit(torch.randn(64))
    with pytest.raises(TypeError, match="dtype"):
        qkernels.dequantize_4bit(p, s, dtype=torch.int8)


def test_non_contiguous_packed():
    p, s = qkernels.quantize_4bit(torch.randn(256))
    wide = torch.cat([p, p], 1)[:, :1]
    assert not wide.is_contiguous()
    with pytest.raises(ValueError, match="packed must be contiguous"):
        qkernels.dequantize_4bit(wide, s)


def test_forced_backend_errors():
    p, s = qkernels.quantize_4bit(torch.randn(256))
    with pytest.raises(ValueError, match="backend must be one of"):
        qkernels.dequantize_4bit(p, s, backend="fast")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        qkernels.dequantize_4bit(p, s, backend="cuda")


def test_lora_scaling_rejects_bad_rank():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        qkernels.reference.lora_scaling(16, 0)


def test_numpy_integer_blocksize_is_an_int():
    """A NumPy integer blocksize (a config read with NumPy) is the same int; it was refused with "blocksize must be
    one of (32, 64, ...), got np.int64(64)". Floats, strings and bools stay refused (test_bad_blocksize)."""
    np = pytest.importorskip("numpy")
    A = torch.randn(200)
    p, s = qkernels.quantize_4bit(A, np.int64(64))
    p2, s2 = qkernels.quantize_4bit(A, 64)
    assert type(s.blocksize) is int and s.blocksize == 64
    assert torch.equal(p, p2) and torch.equal(s.absmax, s2.absmax)
    q, absmax = qkernels.quantize_blockwise(A, blocksize=np.int32(128))
    assert torch.equal(q, qkernels.quantize_blockwise(A, blocksize=128)[0])
    assert torch.equal(qkernels.dequantize_blockwise(q, absmax, blocksize=np.int64(128)),
                       qkernels.dequantize_blockwise(q, absmax, blocksize=128))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_out_that_requires_grad(backend):
    """out= is written in place outside autograd: a buffer that requires grad is refused while grad mode is on (as
    torch's out= functions do). The native backend wrote into it silently, the reference one raised a RuntimeError
    from deep inside. Under no_grad it is an ordinary buffer."""
    p, s = qkernels.quantize_4bit(torch.randn(8, 64))
    out = torch.empty(8, 64, requires_grad=True)
    with pytest.raises(ValueError, match="out requires grad"):
        qkernels.dequantize_4bit(p, s, out=out, backend=backend)
    with torch.no_grad():
        qkernels.dequantize_4bit(p, s, out=out, backend=backend)
    assert torch.equal(out.detach(), qkernels.dequantize_4bit(p, s, backend=backend))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
def test_strided_absmax_view(double_quant, backend):
    """A state whose absmax is a strided view decodes like its dense copy on every backend (the native one raised
    "absmax must be contiguous" where the reference accepted it)."""
    import copy

    p, s = qkernels.quantize_4bit(torch.randn(20, 64), 64, double_quant=double_quant)
    strided = copy.copy(s)
    strided.absmax = torch.stack([s.absmax, torch.zeros_like(s.absmax)], 1).reshape(-1)[::2]
    assert not strided.absmax.is_contiguous()
    want = qkernels.dequantize_4bit(p, s, backend=backend)
    assert torch.equal(qkernels.dequantize_4bit(p, strided, backend=backend), want)
    out = torch.empty_like(want)
    assert torch.equal(qkernels.dequantize_4bit(p, strided, out=out, backend=backend), want)
