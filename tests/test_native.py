"""Tests of the native build (qkernels._C) and of the native dequantize routine.

The native module MUST be built: a missing ``qkernels._C`` fails these tests unless QKERNELS_NO_NATIVE=1 is set
(then only the pure-Python fallback behaviour is checked).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from qkernels import _native

NO_NATIVE = os.environ.get("QKERNELS_NO_NATIVE", "").strip().lower() in ("1", "true", "yes", "on")
# Without the native module only test_native_module_imports runs (and FAILS unless QKERNELS_NO_NATIVE=1), so a
# missing build shows up as one clear failure instead of a hundred AttributeErrors.
needs_native = pytest.mark.skipif(
    not _native.native_available(),
    reason="QKERNELS_NO_NATIVE=1: native module intentionally absent"
    if NO_NATIVE
    else "qkernels._C is missing: see test_native_module_imports",
)

NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype])


def _make_inputs(n: int, blocksize: int, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    nbytes = (n + 1) // 2
    nblocks = -(-n // blocksize)
    packed = torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)
    # Scales spanning fp16/bf16 subnormals (< 6e-5 / ~1e-38) up to fp16 overflow (> 65504) and bf16 overflow.
    absmax = torch.pow(10.0, torch.empty(nblocks).uniform_(-9.0, 7.0, generator=g)).float()
    specials = torch.tensor([1e38, 3.4e38, 1e-40, 0.0, 65504.0, 65520.0, 6.1e-5, 1e-45, -3.5], dtype=torch.float32)
    pick = torch.randint(0, nblocks, (min(nblocks, 3 * len(specials)),), generator=g)
    absmax[pick] = specials.repeat(3)[: len(pick)]
    if nblocks >= 1:
        absmax[-1] = specials[(seed + n) % len(specials)]
    code = torch.tensor(NF4, dtype=torch.float32)
    if seed % 2:  # a random codebook exercises arbitrary mantissas (rounding ties, etc.)
        code = torch.empty(16).uniform_(-1.0, 1.0, generator=g).float()
        code[0], code[15] = 1.0, -1.0
    return packed.to(device), absmax.to(device), code.to(device)


def _reference(packed, absmax, code, n, blocksize, dtype):
    nibbles = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)[:n].long()
    return (code[nibbles].float() * absmax.repeat_interleave(blocksize)[:n]).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Build / import
# ---------------------------------------------------------------------------------------------------------------------


def test_native_module_imports():
    if NO_NATIVE:
        pytest.skip("QKERNELS_NO_NATIVE=1: the native module may be absent")
    assert _native.native_available(), (
        f"qkernels._C failed to import ({_native.NATIVE_ERROR}); the native module must be built "
        "(pip install --no-build-isolation --no-deps -e .) or set QKERNELS_NO_NATIVE=1"
    )
    import qkernels._C as C

    assert C.version() == "0.1.0"


@needs_native
def test_capabilities():
    C = _native._C
    caps = C.capabilities()
    assert set(caps) >= {"cuda_compiled", "cuda_archs", "openmp", "cpu_isa", "compiler"}
    assert isinstance(caps["cuda_compiled"], bool)
    assert isinstance(caps["openmp"], bool)
    assert isinstance(caps["cuda_archs"], str)
    assert caps["cpu_isa"] in ("avx512", "avx2", "scalar")
    assert isinstance(caps["compiler"], str) and caps["compiler"]
    if shutil.which("nvcc") and os.environ.get("QKERNELS_CUDA", "").strip() != "0":
        assert caps["cuda_compiled"], "nvcc is on PATH but the CUDA part of qkernels._C was not compiled"
    if caps["cuda_compiled"]:
        assert caps["cuda_archs"]
        assert hasattr(C, "dequantize_4bit_cuda")
        count = C.cuda_device_count()
        assert isinstance(count, int) and count >= 0
        if not torch.cuda.is_available():
            assert count == 0
    else:
        assert not hasattr(C, "dequantize_4bit_cuda")
        assert not hasattr(C, "cuda_device_count")
    info = _native.native_info()
    assert info["native"] is True and info["cuda_compiled"] == caps["cuda_compiled"]


@needs_native
def test_dtype_enum():
    C = _native._C
    assert int(C.DType.float32) == 0 and int(C.DType.float16) == 1 and int(C.DType.bfloat16) == 2


def test_no_native_fallback_import():
    """With QKERNELS_NO_NATIVE=1 the loader never fails and reports why."""
    code = (
        "import qkernels._native as n, torch\n"
        "assert not n.native_available() and n._C is None and 'QKERNELS_NO_NATIVE' in n.NATIVE_ERROR\n"
        "assert n.native_info() == {'native': False, 'reason': n.NATIVE_ERROR}\n"
        "try:\n"
        "    n.dequantize_4bit_native(torch.zeros(1, dtype=torch.uint8), torch.ones(1), torch.zeros(16), 2, 64,"
        " torch.float32)\n"
        "except RuntimeError as e:\n"
        "    assert 'not available' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError')\n"
    )
    env = dict(os.environ, QKERNELS_NO_NATIVE="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------------------------------
# dequantize_4bit_cpu: bit-exact vs torch
# ---------------------------------------------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("n", [1, 2, 63, 65, 4095 * 7 + 1, 200001])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_dequantize_cpu_bit_exact(n, blocksize, dtype):
    packed, absmax, code = _make_inputs(n, blocksize, seed=n * 7919 + blocksize + DTYPES.index(dtype))
    out = _native.dequantize_4bit_native(packed, absmax, code, n, blocksize, dtype)
    ref = _reference(packed, absmax, code, n, blocksize, dtype)
    assert out.shape == (n,) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(_bits(out), _bits(ref))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_dequantize_cpu_raw_binding(dtype):
    """Call _C directly, with the DType enum and with its int value."""
    C = _native._C
    n, bs = 1001, 64
    packed, absmax, code = _make_inputs(n, bs, seed=5)
    ref = _reference(packed, absmax, code, n, bs, dtype)
    enum = {torch.float32: C.DType.float32, torch.float16: C.DType.float16, torch.bfloat16: C.DType.bfloat16}[dtype]
    for out_dtype in (enum, int(enum)):
        out = torch.full((n,), float("nan"), dtype=dtype)
        C.dequantize_4bit_cpu(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, bs, out.data_ptr(), out_dtype)
        assert torch.equal(_bits(out), _bits(ref))


@needs_native
def test_dequantize_cpu_exhaustive_conversion():
    """Every float32 product pattern near fp16/bf16 boundaries converts like torch's .to(dtype)."""
    # absmax sweeps 2^-30 .. 2^20 with odd mantissas; code = all 16 NF4 values -> ties, subnormals, overflow.
    g = torch.Generator().manual_seed(1)
    n, bs = 64 * 4096, 64
    absmax = (torch.rand(n // bs, generator=g) + 1.0) * torch.pow(2.0, torch.randint(-30, 21, (n // bs,), generator=g))
    absmax = absmax.float()
    packed = torch.randint(0, 256, (n // 2,), generator=g, dtype=torch.uint8)
    code = torch.tensor(NF4, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        out = _native.dequantize_4bit_native(packed, absmax, code, n, bs, dtype)
        assert torch.equal(_bits(out), _bits(_reference(packed, absmax, code, n, bs, dtype)))


@needs_native
@pytest.mark.parametrize("storage", [torch.float32, torch.int32, torch.bfloat16, torch.int8])
def test_dequantize_cpu_quant_storage(storage):
    n, bs = 4096, 64
    packed, absmax, code = _make_inputs(n, bs, seed=11)
    viewed = packed.view(storage)
    out = _native.dequantize_4bit_native(viewed, absmax, code, n, bs, torch.bfloat16)
    assert torch.equal(_bits(out), _bits(_reference(packed, absmax, code, n, bs, torch.bfloat16)))


@needs_native
def test_dequantize_cpu_packed_2d_and_extra_bytes():
    n, bs = 1000, 128
    packed, absmax, code = _make_inputs(n, bs, seed=3)
    padded = torch.cat([packed, torch.full((24,), 0xFF, dtype=torch.uint8)]).reshape(-1, 1)
    out = _native.dequantize_4bit_native(padded, absmax, code, n, bs, torch.float16)
    assert torch.equal(_bits(out), _bits(_reference(packed, absmax, code, n, bs, torch.float16)))


# ---------------------------------------------------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------------------------------------------------


def _good(n=256, bs=64):
    packed, absmax, code = _make_inputs(n, bs, seed=0)
    return dict(packed=packed, absmax=absmax, code=code, n=n, blocksize=bs, dtype=torch.float32)


@needs_native
@pytest.mark.parametrize(
    "change, exc, argname",
    [
        (dict(blocksize=48), ValueError, "blocksize"),
        (dict(blocksize=16), ValueError, "blocksize"),
        (dict(blocksize=8192), ValueError, "blocksize"),
        (dict(n=0), ValueError, "'n'"),
        (dict(n=-5), ValueError, "'n'"),
        (dict(absmax=torch.ones(3)), ValueError, "absmax"),
        (dict(absmax=torch.ones(4, dtype=torch.float16)), TypeError, "absmax"),
        (dict(absmax=torch.ones(8)[::2]), ValueError, "absmax"),
        (dict(code=torch.zeros(16, dtype=torch.float64)), TypeError, "code"),
        (dict(code=torch.zeros(15)), ValueError, "code"),
        (dict(packed=torch.zeros(100, dtype=torch.uint8)), ValueError, "packed"),
        (dict(packed=torch.zeros(256, dtype=torch.uint8)[::2]), ValueError, "packed"),
        (dict(packed=[0] * 128), TypeError, "packed"),
        (dict(dtype=torch.float64), TypeError, "dtype"),
        (dict(dtype=torch.int8), TypeError, "dtype"),
    ],
)
def test_bad_arguments_wrapper(change, exc, argname):
    kwargs = _good()
    kwargs.update(change)
    with pytest.raises(exc, match=argname):
        _native.dequantize_4bit_native(**kwargs)


@needs_native
def test_bad_arguments_binding():
    C = _native._C
    packed, absmax, code = _make_inputs(256, 64, seed=0)
    out = torch.empty(256)
    p, a, c, o = packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), out.data_ptr()
    cases = [
        ((p, a, c, 256, 48, o, 0), "blocksize"),
        ((p, a, c, 0, 64, o, 0), "'n'"),
        ((0, a, c, 256, 64, o, 0), "packed_ptr"),
        ((p, 0, c, 256, 64, o, 0), "absmax_ptr"),
        ((p, a, 0, 256, 64, o, 0), "code_ptr"),
        ((p, a, c, 256, 64, 0, 0), "out_ptr"),
        ((p, a, c, 256, 64, o, 3), "out_dtype"),
    ]
    for args, argname in cases:
        with pytest.raises(ValueError, match=argname):
            C.dequantize_4bit_cpu(*args)


@needs_native
def test_device_mismatch_and_cuda_without_support():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; this machine has none")
    kwargs = _good()
    kwargs["absmax"] = kwargs["absmax"].cuda()
    with pytest.raises(ValueError, match="absmax"):
        _native.dequantize_4bit_native(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("n", [1, 63, 4095 * 7 + 1, 200001])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_dequantize_cuda_bit_exact(n, blocksize, dtype):
    if not hasattr(_native._C, "dequantize_4bit_cuda"):
        pytest.skip("qkernels._C was built without the CUDA part (no nvcc or QKERNELS_CUDA=0)")
    packed, absmax, code = _make_inputs(n, blocksize, seed=n + blocksize)
    ref = _reference(packed, absmax, code, n, blocksize, dtype)
    out = _native.dequantize_4bit_native(packed.cuda(), absmax.cuda(), code.cuda(), n, blocksize, dtype)
    torch.cuda.synchronize()
    assert out.device.type == "cuda"
    assert torch.equal(_bits(out.cpu()), _bits(ref))
    # On a side stream too (stream handle plumbing).
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out2 = _native.dequantize_4bit_native(packed.cuda(), absmax.cuda(), code.cuda(), n, blocksize, dtype)
    s.synchronize()
    assert torch.equal(_bits(out2.cpu()), _bits(ref))
