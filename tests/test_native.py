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


def test_unbuilt_native_module_reason(tmp_path):
    """A package without a compiled _C (a checkout never built, a pure-Python copy) imports, runs the reference path,
    and native_info() says the module is not built and how to build it. It said "cannot import name '_C' from
    partially initialized module 'qkernels' (most likely due to a circular import)", which sent users hunting for a
    circular import."""
    import qkernels

    pkg = tmp_path / "qkernels"
    shutil.copytree(os.path.dirname(qkernels.__file__), pkg,
                    ignore=lambda d, names: {n for n in names if n.startswith("_C") or n == "__pycache__"})
    code = (
        # a setuptools editable install of qkernels elsewhere (a developer venv) resolves qkernels._C through its own
        # meta-path finder, whatever qkernels.__path__ says: take it out, as a plain install has none
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import qkernels, torch\n"
        f"assert qkernels.__file__.startswith({str(tmp_path)!r}), qkernels.__file__\n"
        "info = qkernels.native_info()\n"
        "assert info['native'] is False, info\n"
        "print(info['reason'])\n"
        "p, s = qkernels.quantize_4bit(torch.randn(64, 64))\n"
        "assert qkernels.dequantize_4bit(p, s).shape == (64, 64)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("QKERNELS_NO_NATIVE", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    reason = r.stdout.strip().splitlines()[-1]
    assert "qkernels._C is not built" in reason and "build_ext --inplace" in reason, reason
    assert "circular" not in reason, reason


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


# ---------------------------------------------------------------------------------------------------------------------
# quantize_4bit_cpu and the per-ISA CPU paths: bit-exact vs qkernels.reference
# ---------------------------------------------------------------------------------------------------------------------

ISAS = ["scalar", "avx2", "avx512"]


def _isa_available(isa: str) -> bool:
    return _native.native_available() and isa in _native._C.cpu_isa_available()


@pytest.fixture(params=ISAS)
def cpu_isa(request, monkeypatch):
    """Force one CPU path through QKERNELS_CPU_ISA (read by the kernels on every call)."""
    isa = request.param
    if not _native.native_available():
        pytest.skip("qkernels._C is missing")
    if not _isa_available(isa):
        pytest.skip(f"this CPU cannot run the {isa} path (available: {_native._C.cpu_isa_available()})")
    monkeypatch.setenv("QKERNELS_CPU_ISA", isa)
    assert _native._C.cpu_isa_active() == isa
    return isa


def _quant_inputs(n: int, blocksize: int, dtype: torch.dtype, code: torch.Tensor, seed: int) -> torch.Tensor:
    """Random blocks with per-block scales, plus zero blocks, exact midpoints, subnormals, huge values, -0.0."""
    from qkernels.codebooks import midpoints

    g = torch.Generator().manual_seed(seed)
    nblocks = -(-n // blocksize)
    scale = torch.pow(10.0, torch.empty(nblocks).uniform_(-3.0, 3.0, generator=g)).repeat_interleave(blocksize)[:n]
    x = torch.randn(n, generator=g) * scale
    bounds, _ = midpoints(code)
    tiny = {torch.float32: 1e-40, torch.float16: 3e-6, torch.bfloat16: 1e-39}[dtype]
    huge = {torch.float32: 3e38, torch.float16: 65504.0, torch.bfloat16: 3e38}[dtype]
    for b in range(nblocks):
        lo, hi = b * blocksize, min(n, (b + 1) * blocksize)
        kind = (b + seed) % 6
        if kind == 0:  # all zeros (absmax 0 -> code of 0.0), with a -0.0
            x[lo:hi] = 0.0
            x[lo] = -0.0
        elif kind == 1:  # exact midpoints: absmax is a power of two, so v = x * (1/absmax) is exact
            p = 2.0 ** int(torch.randint(-8, 9, (1,), generator=g))
            vals = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)),
                              torch.nextafter(bounds, torch.tensor(-2.0)), -bounds, torch.tensor([1.0, -1.0])])
            m = hi - lo
            x[lo:hi] = vals.repeat(-(-m // len(vals)))[:m] * p
            x[lo] = p
        elif kind == 2:  # subnormals of the input dtype
            x[lo:hi] = torch.randn(hi - lo, generator=g) * tiny
        elif kind == 3:  # huge values
            x[lo:hi] = (torch.rand(hi - lo, generator=g) * 2 - 1) * huge
            x[lo] = -huge
    x = x.to(dtype)
    assert torch.isfinite(x).all()
    return x


@needs_native
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("n", [1, 2, 63, 65, 4095 * 37, 200001])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_quantize_cpu_bit_exact(cpu_isa, dtype, blocksize, n, quant_type):
    from qkernels import reference
    from qkernels.codebooks import get_codebook

    code = get_codebook(quant_type)
    A = _quant_inputs(n, blocksize, dtype, code, seed=n * 31 + blocksize + DTYPES.index(dtype))
    packed, absmax = _native.quantize_4bit_native(A, code, blocksize)
    ref_packed, ref_absmax = reference.quantize_4bit(A, code, blocksize)
    assert packed.shape == ref_packed.shape and packed.dtype == torch.uint8
    assert absmax.shape == ref_absmax.shape and absmax.dtype == torch.float32
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax.view(torch.int32), ref_absmax.view(torch.int32))


@needs_native
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_cpu_shuffled_codebook_and_2d(cpu_isa, quant_type):
    """Unsorted / random codebooks (exercise the order permutation) and a non-contiguous 2-D input."""
    from qkernels import reference
    from qkernels.codebooks import get_codebook

    g = torch.Generator().manual_seed(7)
    for code in (get_codebook(quant_type)[torch.randperm(16, generator=g)],
                 torch.empty(16).uniform_(-1.0, 1.0, generator=g)):
        A = _quant_inputs(300 * 70, 64, torch.bfloat16, code, seed=3).reshape(300, 70).t()
        packed, absmax = _native.quantize_4bit_native(A, code, 64)
        ref_packed, ref_absmax = reference.quantize_4bit(A, code, 64)
        assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "book",
    ["cell_edges", "crowded", "beyond_one", "shuffled_cell_edges"],
)
def test_quantize_cpu_cell_lookup_edges(cpu_isa, dtype, book):
    """The AVX-512 path finds the code through 32 cells of [-1, 1] (trunc(v * 16 + 15.5)); these codebooks put every
    midpoint exactly on a cell edge, crowd 6 midpoints into one cell, or put midpoints beyond 1 (the last two fall
    back to the binary search).  The inputs include the exact midpoints and their float neighbours."""
    from qkernels import reference

    i = torch.arange(16, dtype=torch.float32)
    code = {
        "cell_edges": (4 * i - 29) / 32,  # midpoints (4i - 27) / 32: m * 16 + 15.5 = 2i + 2 exactly
        "crowded": torch.cat([torch.linspace(-0.01, 0.01, 7), torch.linspace(-1.0, 1.0, 9)]),
        "beyond_one": torch.linspace(-1.0, 2.0, 16),
        "shuffled_cell_edges": ((4 * i - 29) / 32)[torch.randperm(16, generator=torch.Generator().manual_seed(1))],
    }[book]
    for n, bs in ((64 * 40 + 17, 64), (32 * 16 * 3, 32), (4096 * 2 + 1, 4096)):
        A = _quant_inputs(n, bs, dtype, code, seed=n + bs)
        packed, absmax = _native.quantize_4bit_native(A, code, bs)
        ref_packed, ref_absmax = reference.quantize_4bit(A, code, bs)
        assert torch.equal(packed, ref_packed)
        assert torch.equal(absmax.view(torch.int32), ref_absmax.view(torch.int32))


@needs_native
def test_quantize_cpu_nonfinite_does_not_crash(cpu_isa):
    from qkernels.codebooks import get_codebook

    A = torch.randn(1000)
    A[5], A[300], A[700] = float("nan"), float("inf"), float("-inf")
    _, absmax = _native.quantize_4bit_native(A, get_codebook("nf4"), 64)
    assert not torch.isfinite(absmax[0]) and not torch.isfinite(absmax[4]) and not torch.isfinite(absmax[10])
    assert torch.isfinite(absmax[1])


@needs_native
@pytest.mark.parametrize("n", [1, 63, 4095 * 37, 200001])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_dequantize_cpu_bit_exact_per_isa(cpu_isa, dtype, blocksize, n):
    from qkernels import reference

    packed, absmax, code = _make_inputs(n, blocksize, seed=n * 13 + blocksize + DTYPES.index(dtype))
    out = _native.dequantize_4bit_native(packed, absmax, code, n, blocksize, dtype)
    ref = reference.dequantize_4bit(packed, absmax, code, blocksize, n, dtype)
    assert torch.equal(_bits(out), _bits(ref))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_dequantize_cpu_streaming_outputs_bit_exact_per_isa(cpu_isa, dtype):
    """Outputs of 16 MiB and more take non-temporal stores on the AVX-512 path (dequantize.cpp kStreamMinBytes): the
    same bits as the reference, plain and nested scales, a partial last block, into a fresh output, an aligned out=
    buffer and a misaligned one (a view one element into a buffer: normal stores). Every path runs the sizes."""
    import qkernels
    from qkernels import reference

    n = (16 << 20) // torch.empty(0, dtype=dtype).element_size() + 37  # just past the threshold, not a block multiple
    packed, absmax, code = _make_inputs(n, 64, seed=11 + DTYPES.index(dtype))
    ref = reference.dequantize_4bit(packed, absmax, code, 64, n, dtype)
    buf = torch.empty(n + 64, dtype=dtype)
    aligned = buf[(-buf.data_ptr() % 64) // buf.element_size():][:n]
    misaligned = buf[1:n + 1] if buf[1:].data_ptr() % 64 else buf[2:n + 2]
    assert aligned.data_ptr() % 64 == 0 and misaligned.data_ptr() % 64 != 0
    for out in (None, aligned, misaligned):
        got = _native.dequantize_4bit_native(packed, absmax, code, n, 64, dtype, out=out)
        assert torch.equal(_bits(got), _bits(ref))
    W = (torch.randn(n - 37, generator=torch.Generator().manual_seed(5)) * 0.02).to(dtype).reshape(-1, 64)
    wp, st = qkernels.quantize_4bit(W, blocksize=64, double_quant=True)
    assert torch.equal(_bits(qkernels.dequantize_4bit(wp, st)), _bits(qkernels.dequantize_4bit(wp, st,
                                                                                              backend="reference")))


def test_cpu_isa_env_validation(monkeypatch):
    if not _native.native_available():
        pytest.skip("qkernels._C is missing")
    C = _native._C
    avail = C.cpu_isa_available()
    assert avail[0] == "scalar" and set(avail) <= set(ISAS)
    monkeypatch.delenv("QKERNELS_CPU_ISA", raising=False)
    assert C.cpu_isa_active() == avail[-1] == C.capabilities()["cpu_isa"]
    monkeypatch.setenv("QKERNELS_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="QKERNELS_CPU_ISA"):
        _native.quantize_4bit_native(torch.ones(64), torch.zeros(16), 64)


@needs_native
@pytest.mark.parametrize(
    "kwargs, exc, argname",
    [
        (dict(A=torch.ones(64, dtype=torch.float64)), TypeError, "'A'"),
        (dict(A=torch.ones(0)), ValueError, "'A'"),
        (dict(A=[1.0] * 64), TypeError, "'A'"),
        (dict(code=torch.zeros(16, dtype=torch.float64)), TypeError, "'code'"),
        (dict(code=torch.zeros(15)), ValueError, "'code'"),
        (dict(blocksize=48), ValueError, "blocksize"),
        (dict(blocksize=64.0), TypeError, "blocksize"),
    ],
)
def test_quantize_bad_arguments(kwargs, exc, argname):
    args = dict(A=torch.ones(64), code=torch.zeros(16), blocksize=64)
    args.update(kwargs)
    with pytest.raises(exc, match=argname):
        _native.quantize_4bit_native(**args)


@needs_native
def test_quantize_bad_arguments_binding():
    C = _native._C
    A, code, packed, absmax = torch.ones(64), torch.zeros(16), torch.empty(32, dtype=torch.uint8), torch.empty(1)
    a, c, p, m = A.data_ptr(), code.data_ptr(), packed.data_ptr(), absmax.data_ptr()
    cases = [
        ((0, 0, 64, 64, c, p, m), "A_ptr"),
        ((a, 3, 64, 64, c, p, m), "in_dtype"),
        ((a, 0, 0, 64, c, p, m), "'n'"),
        ((a, 0, 64, 48, c, p, m), "blocksize"),
        ((a, 0, 64, 64, 0, p, m), "code_ptr"),
        ((a, 0, 64, 64, c, 0, m), "packed_ptr"),
        ((a, 0, 64, 64, c, p, 0), "absmax_ptr"),
    ]
    for args, argname in cases:
        with pytest.raises(ValueError, match=argname):
            C.quantize_4bit_cpu(*args)


@needs_native
@pytest.mark.parametrize("bs", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_dequantize_cpu_conversion_bit_patterns_per_isa(cpu_isa, dtype, bs):
    """code = 1.0 everywhere, absmax = random float32 bit patterns (subnormals, overflow, inf, NaN): every path
    converts exactly like the scalar path, and like torch for all non-NaN values. Blocksizes 64 and 128 take the
    AVX-512 VBMI 128-element path (two blocks' tables in one register; vcvtne2ps2bf16 only where it rounds as the
    integer path: its guard sees every kind of scale here)."""
    from qkernels import reference

    g = torch.Generator().manual_seed(17 + bs)
    n = 32 * 20000
    bits = torch.randint(-(2**31), 2**31 - 1, (n // bs,), generator=g, dtype=torch.int64).to(torch.int32)
    absmax = bits.view(torch.float32).clone()
    packed = torch.randint(0, 256, (n // 2,), generator=g, dtype=torch.uint8)
    code = torch.ones(16)
    code[3] = -1.0
    out = _native.dequantize_4bit_native(packed, absmax, code, n, bs, dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QKERNELS_CPU_ISA", "scalar")
        scalar = _native.dequantize_4bit_native(packed, absmax, code, n, bs, dtype)
    assert torch.equal(_bits(out), _bits(scalar))
    finite = ~torch.isnan(absmax).repeat_interleave(bs)
    ref = reference.dequantize_4bit(packed, absmax, code, bs, n, dtype)
    assert torch.equal(_bits(out)[finite], _bits(ref)[finite])


# ---------------------------------------------------------------------------------------------------------------------
# quantize_4bit_cuda: bit-exact vs qkernels.reference (CPU copies) and vs bitsandbytes' CUDA kernel
# ---------------------------------------------------------------------------------------------------------------------


def _needs_quantize_cuda():
    if not hasattr(_native._C, "quantize_4bit_cuda"):
        pytest.skip("qkernels._C was built without the CUDA part (no nvcc or QKERNELS_CUDA=0)")


def _assert_same_quant(packed, absmax, ref_packed, ref_absmax):
    assert packed.device.type == "cuda" and absmax.device.type == "cuda"
    assert packed.shape == ref_packed.shape and packed.dtype == torch.uint8
    assert absmax.shape == ref_absmax.shape and absmax.dtype == torch.float32
    assert torch.equal(packed.cpu(), ref_packed), "packed bytes differ"
    assert torch.equal(absmax.cpu().view(torch.int32), ref_absmax.view(torch.int32)), "absmax differs"


@needs_native
def test_quantize_cuda_binding_presence_and_checks():
    """Runs without a GPU: the binding exists iff the CUDA part is compiled, and validates before launching."""
    C = _native._C
    if not C.capabilities()["cuda_compiled"]:
        assert not hasattr(C, "quantize_4bit_cuda")
        return
    assert hasattr(C, "quantize_4bit_cuda")
    from qkernels import _backend

    assert "quantize_4bit" in _backend.native_ops(torch.device("cuda"))
    a, c, p, m = 16, 32, 48, 64  # never dereferenced: every case fails validation first
    cases = [
        ((0, 0, 64, 64, c, p, m, 0), "A_ptr"),
        ((a, 3, 64, 64, c, p, m, 0), "in_dtype"),
        ((a, 0, 0, 64, c, p, m, 0), "'n'"),
        ((a, 0, 64, 48, c, p, m, 0), "blocksize"),
        ((a, 0, 64, 8192, c, p, m, 0), "blocksize"),
        ((a, 0, 64, 64, 0, p, m, 0), "code_ptr"),
        ((a, 0, 64, 64, c, 0, m, 0), "packed_ptr"),
        ((a, 0, 64, 64, c, p, 0, 0), "absmax_ptr"),
    ]
    for args, argname in cases:
        with pytest.raises(ValueError, match=argname):
            C.quantize_4bit_cuda(*args)


@needs_native
def test_quantize_native_unsupported_device():
    from qkernels.codebooks import get_codebook

    with pytest.raises(ValueError, match="'A'"):
        _native.quantize_4bit_native(torch.ones(64, device="meta"), get_codebook("nf4"), 64)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("n", [1, 2, 63, 65, 4095 * 37, 200001])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_quantize_cuda_bit_exact(dtype, blocksize, n, quant_type):
    """Zero blocks, exact midpoints, subnormals, huge values, partial last block, odd n (see _quant_inputs)."""
    from qkernels import reference
    from qkernels.codebooks import get_codebook

    _needs_quantize_cuda()
    code = get_codebook(quant_type)
    A = _quant_inputs(n, blocksize, dtype, code, seed=n * 31 + blocksize + DTYPES.index(dtype))
    ref_packed, ref_absmax = reference.quantize_4bit(A, code, blocksize)
    packed, absmax = _native.quantize_4bit_native(A.cuda(), code.cuda(), blocksize)
    torch.cuda.synchronize()
    _assert_same_quant(packed, absmax, ref_packed, ref_absmax)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_quantize_cuda_unaligned_noncontiguous_stream_and_codebooks(dtype):
    """A misaligned input (scalar-load path), a transposed input, a side stream, shuffled / random codebooks."""
    from qkernels import reference
    from qkernels.codebooks import get_codebook

    _needs_quantize_cuda()
    g = torch.Generator().manual_seed(11)
    codes = [get_codebook("nf4"), get_codebook("fp4")[torch.randperm(16, generator=g)],
             torch.empty(16).uniform_(-1.0, 1.0, generator=g)]
    for code in codes:
        base = _quant_inputs(4096 * 5 + 3, 64, dtype, code, seed=5)
        for A_cpu, A_gpu in (
            (base[1:], base.cuda()[1:]),                                    # data_ptr not 16-byte aligned
            (base[3:].reshape(64, -1).t(), base.cuda()[3:].reshape(64, -1).t()),  # non-contiguous
        ):
            ref_packed, ref_absmax = reference.quantize_4bit(A_cpu, code, 64)
            packed, absmax = _native.quantize_4bit_native(A_gpu, code.cuda(), 64)
            torch.cuda.synchronize()
            _assert_same_quant(packed, absmax, ref_packed, ref_absmax)
        ref_packed, ref_absmax = reference.quantize_4bit(base, code, 256)
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            A_gpu = base.cuda()
            packed, absmax = _native.quantize_4bit_native(A_gpu, code.cuda(), 256)
        s.synchronize()
        _assert_same_quant(packed, absmax, ref_packed, ref_absmax)


@pytest.mark.cuda
@needs_native
def test_quantize_cuda_nonfinite_does_not_crash():
    from qkernels.codebooks import get_codebook

    _needs_quantize_cuda()
    A = torch.randn(1000)
    A[5], A[300], A[700] = float("nan"), float("inf"), float("-inf")
    _, absmax = _native.quantize_4bit_native(A.cuda(), get_codebook("nf4", "cuda"), 64)
    absmax = absmax.cpu()
    assert torch.isnan(absmax[0]) and torch.isinf(absmax[4]) and torch.isinf(absmax[10])
    assert torch.isfinite(absmax[1])


@pytest.mark.cuda
@needs_native
def test_quantize_cuda_device_mismatch():
    """A CPU tensor on the CUDA path (or the reverse) is a clear ValueError naming the argument, never a crash."""
    from qkernels.codebooks import get_codebook

    _needs_quantize_cuda()
    with pytest.raises(ValueError, match="'code' is on cpu"):
        _native.quantize_4bit_native(torch.randn(256, device="cuda"), get_codebook("nf4"), 64)
    with pytest.raises(ValueError, match="'code' is on cuda"):
        _native.quantize_4bit_native(torch.randn(256), get_codebook("nf4", "cuda"), 64)


@pytest.mark.cuda
@needs_native
@pytest.mark.parametrize("shape", [(1023, 17), (4096, 3), (64 * 37 + 2,)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("blocksize", [64, 128, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_quantize_cuda_matches_bitsandbytes_cuda_nf4(dtype, blocksize, shape):
    """NF4 on randn data (no all-zero blocks, docs/format.md §7.5): same packed bytes and absmax as bitsandbytes'
    CUDA kernel; the default dispatch (qkernels.quantize_4bit) picks this kernel for CUDA tensors."""
    F = pytest.importorskip("bitsandbytes.functional")
    import qkernels
    from qkernels import _backend
    from qkernels.codebooks import get_codebook

    _needs_quantize_cuda()
    A = torch.randn(shape, generator=torch.Generator().manual_seed(blocksize + len(shape))).to(dtype).cuda()
    pb, sb = F.quantize_4bit(A, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    packed, absmax = _native.quantize_4bit_native(A, get_codebook("nf4", "cuda"), blocksize)
    torch.cuda.synchronize()
    assert torch.equal(packed, pb), "packed bytes differ"
    assert torch.equal(absmax.view(torch.int32), sb.absmax.view(torch.int32)), "absmax differs"
    assert _backend.resolve("quantize_4bit", A.device, None) == "cuda"
    p, s = qkernels.quantize_4bit(A, blocksize, "nf4", double_quant=False)
    assert torch.equal(p, pb) and torch.equal(s.absmax.view(torch.int32), sb.absmax.view(torch.int32))


# ---------------------------------------------------------------------------------------------------------------------
# Double-quantized (nested) scales decoded inline by the CPU dequantize; native 8-bit blockwise quantize
# ---------------------------------------------------------------------------------------------------------------------

NESTED_SHAPES = [(1,), (65,), (1023, 17), (300, 301), (2048, 520)]  # the last: > 256 blocks, several nested blocks


@needs_native
@pytest.mark.parametrize("shape", NESTED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_dequantize_cpu_nested_bit_exact_per_isa(cpu_isa, dtype, blocksize, shape):
    import qkernels
    from qkernels import _backend

    g = torch.Generator().manual_seed(sum(shape) * 7 + blocksize + DTYPES.index(dtype))
    W = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(3) * 4).to(dtype)
    packed, state = qkernels.quantize_4bit(W, blocksize=blocksize, double_quant=True)
    assert state.nested and state.absmax.dtype == torch.uint8
    assert _backend.resolve("dequantize_4bit", packed.device, None) == "cpu"
    ref = qkernels.dequantize_4bit(packed, state, backend="reference")
    for out in (qkernels.dequantize_4bit(packed, state), qkernels.dequantize_4bit(packed, state, backend="cpu")):
        assert out.dtype == dtype and out.shape == W.shape
        assert torch.equal(_bits(out), _bits(ref))


@needs_native
@pytest.mark.parametrize("nested_blocksize", [1, 2, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_dequantize_cpu_nested_random_state_per_isa(cpu_isa, dtype, nested_blocksize):
    """Arbitrary uint8 codes, nested scales, offset and 256-entry map (unsorted): same bits as decode + dequantize."""
    from qkernels import reference

    n, blocksize = 64 * 1000 + 37, 64
    packed, _, code = _make_inputs(n, blocksize, seed=nested_blocksize)
    g = torch.Generator().manual_seed(nested_blocksize + 11)
    nblocks = -(-n // blocksize)
    absmax_q = torch.randint(0, 256, (nblocks,), dtype=torch.uint8, generator=g)
    nested_absmax = torch.rand(-(-nblocks // nested_blocksize), generator=g) * 3
    nested_code = torch.randn(256, generator=g)
    offset = torch.tensor(0.123456789, dtype=torch.float32)
    out = _native.dequantize_4bit_native(packed, absmax_q, code, n, blocksize, dtype,
                                         nested=(absmax_q, nested_absmax, nested_code, offset, nested_blocksize))
    scales = reference.dequantize_blockwise(absmax_q, nested_absmax, nested_code, nested_blocksize) + offset
    ref = reference.dequantize_4bit(packed, scales, code, blocksize, n, dtype)
    assert torch.equal(_bits(out), _bits(ref))


@needs_native
def test_dequantize_cpu_nested_bad_arguments():
    n, blocksize = 256, 64
    packed, _, code = _make_inputs(n, blocksize, seed=1)
    q = torch.zeros(4, dtype=torch.uint8)
    nested_code = torch.zeros(256)
    for nbs in (0, 3, -4):
        with pytest.raises(ValueError, match="nested_blocksize"):
            _native.dequantize_4bit_native(packed, q, code, n, blocksize, torch.float32,
                                           nested=(q, torch.ones(1), nested_code, 0.0, nbs))
        with pytest.raises(ValueError, match="nested_blocksize"):
            _native._C.dequantize_4bit_nested_cpu(packed.data_ptr(), q.data_ptr(), nested_code.data_ptr(),
                                                  nested_code.data_ptr(), 0.0, nbs, code.data_ptr(), n, blocksize,
                                                  nested_code.data_ptr(), 0)
    with pytest.raises(ValueError, match=r"nested_blocksize' must be a power of two in \[1, 1073741824\]"):
        _native._C.dequantize_4bit_nested_cpu(packed.data_ptr(), q.data_ptr(), nested_code.data_ptr(),
                                              nested_code.data_ptr(), 0.0, 2**31, code.data_ptr(), n, blocksize,
                                              nested_code.data_ptr(), 0)  # the GEMV bindings' rule (common.h)
    with pytest.raises(ValueError, match="nested_absmax"):
        _native.dequantize_4bit_native(packed, q, code, n, blocksize, torch.float32,
                                       nested=(q, torch.ones(2), nested_code, 0.0, 256))
    with pytest.raises(TypeError, match="absmax_q"):
        _native.dequantize_4bit_native(packed, q.float(), code, n, blocksize, torch.float32,
                                       nested=(q.float(), torch.ones(1), nested_code, 0.0, 256))


def _assert_same_blockwise(A, code, blocksize):
    from qkernels import reference

    q, absmax = _native.quantize_blockwise_native(A, code, blocksize)
    rq, rabsmax = reference.quantize_blockwise(A, code, blocksize)
    assert torch.equal(q, rq), "codes differ"
    assert torch.equal(absmax.view(torch.int32), rabsmax.view(torch.int32)), "absmax differs"


@needs_native
@pytest.mark.parametrize("n", [1, 255, 256, 257, 4096 * 3 + 5, 262144])
@pytest.mark.parametrize("blocksize", [1, 2, 64, 256, 4096])
def test_quantize_blockwise_cpu_bit_exact(n, blocksize):
    from qkernels.codebooks import dynamic_map

    g = torch.Generator().manual_seed(n + blocksize)
    A = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * 10
    if n > 100:
        A[10:50] = 0.0
        A[60] = -0.0
        A[70:80] = 1e-40  # subnormals
    _assert_same_blockwise(A, dynamic_map(torch.device("cpu")), blocksize)


@needs_native
@pytest.mark.parametrize("blocksize", [1, 64, 256])
def test_quantize_blockwise_cpu_edge_values(blocksize):
    from qkernels.codebooks import dynamic_map, midpoints

    code = dynamic_map(torch.device("cpu"))
    _assert_same_blockwise(torch.full((1000,), 0.37), code, blocksize)
    centered = torch.full((1000,), 0.5) - torch.full((1000,), 0.5).mean()  # the nested case: all 0
    assert torch.equal(centered, torch.zeros(1000))
    _assert_same_blockwise(centered, code, blocksize)
    # Values exactly on the float32 midpoints (absmax 1.0 per block so the normalized value is the value itself).
    bounds, _ = midpoints(code)
    vals = torch.cat([bounds, -bounds, torch.nextafter(bounds, torch.full_like(bounds, 2.0))])
    A = torch.stack([torch.ones_like(vals), vals], dim=1).reshape(-1)  # each pair has a 1.0
    for bs in (2, 256):
        _assert_same_blockwise(A, code, bs)
    # Random unsorted 256-entry map, with ties, and the 2-D / half-precision input path.
    g = torch.Generator().manual_seed(blocksize)
    rcode = torch.randn(256, generator=g).clamp(-1, 1)
    rcode[100:110] = rcode[5]
    X = torch.randn(77, 33, generator=g)
    _assert_same_blockwise(X, rcode, blocksize)
    _assert_same_blockwise(X.to(torch.bfloat16), rcode, blocksize)


@needs_native
@pytest.mark.parametrize("n", [1, 15, 17, 255, 256, 257, 4096 * 3 + 5, 262144])
@pytest.mark.parametrize("blocksize", [1, 2, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_quantize_blockwise_cpu_isa_paths(cpu_isa, n, blocksize):
    """Every CPU path (scalar / AVX2 / AVX-512) equals the reference: sorted map (order skipped) and unsorted map."""
    from qkernels.codebooks import dynamic_map

    g = torch.Generator().manual_seed(7 * n + blocksize)
    A = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * 10
    if n > 100:
        A[10:50] = 0.0
        A[60] = -0.0
        A[70:80] = 1e-40  # subnormals
    code = dynamic_map(torch.device("cpu"))
    _assert_same_blockwise(A, code, blocksize)
    perm = torch.randperm(256, generator=g)
    _assert_same_blockwise(A, code[perm].contiguous(), blocksize)  # unsorted: order is a real permutation


@needs_native
@pytest.mark.parametrize("blocksize", [1, 16, 64, 256, 4096])
def test_quantize_blockwise_cpu_isa_nonfinite_matches_scalar(cpu_isa, blocksize, monkeypatch):
    """NaN / inf inputs and a map with NaN entries and ties: every path gives the scalar path's bits."""
    g = torch.Generator().manual_seed(blocksize)
    n = 5000 + 13
    A = torch.randn(n, generator=g)
    A[3] = float("nan")
    A[700] = float("inf")
    A[1900] = float("-inf")
    A[2500:2600] = float("nan")
    code = torch.randn(256, generator=g).clamp(-1, 1)
    code[100:110] = code[5]
    code[200] = float("nan")
    code[17] = float("inf")
    for c in (code, torch.sort(code).values.contiguous()):
        q, absmax = _native.quantize_blockwise_native(A, c, blocksize)
        monkeypatch.setenv("QKERNELS_CPU_ISA", "scalar")
        sq, sabsmax = _native.quantize_blockwise_native(A, c, blocksize)
        monkeypatch.setenv("QKERNELS_CPU_ISA", cpu_isa)
        assert torch.equal(q, sq), "codes differ from the scalar path"
        assert torch.equal(absmax.view(torch.int32), sabsmax.view(torch.int32)), "absmax differs from the scalar path"
        finite = torch.isfinite(absmax).repeat_interleave(blocksize)[:n]
        from qkernels import reference
        rq, _ = reference.quantize_blockwise(A, c, blocksize)
        assert torch.equal(q[finite], rq[finite])


@needs_native
def test_quantize_blockwise_backend_wiring():
    import qkernels
    from qkernels import _backend

    assert "quantize_blockwise" in _backend.native_ops(torch.device("cpu"))
    assert _backend.resolve("quantize_blockwise", torch.device("cpu"), None) == "cpu"
    W = torch.randn(300, 301)
    p1, s1 = qkernels.quantize_4bit(W, blocksize=64, double_quant=True)
    p2, s2 = qkernels.quantize_4bit(W, blocksize=64, double_quant=True, backend="reference")
    assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax)
    assert torch.equal(s1.state2.absmax.view(torch.int32), s2.state2.absmax.view(torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        _native._C.quantize_blockwise_cpu(W.data_ptr(), 10, 3, W.data_ptr(), W.data_ptr(), W.data_ptr())


@needs_native
@pytest.mark.parametrize("n", [1, 15, 17, 255, 257, 4096 * 3 + 5, 262144 + 3])
@pytest.mark.parametrize("blocksize", [1, 2, 16, 64, 256, 4096])
def test_dequantize_blockwise_cpu_isa_paths(cpu_isa, n, blocksize):
    """Every CPU path (scalar / AVX2 gathers / AVX-512 gathers) gives the reference's bits, partial last block
    included; the codes cover all 256 entries (random map with NaN / inf / -0.0 entries, so a wrong index shows)."""
    from qkernels import reference

    g = torch.Generator().manual_seed(11 * n + blocksize)
    q = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    code = torch.randn(256, generator=g)
    code[3], code[200], code[255], code[0] = float("nan"), float("inf"), -0.0, 1e-40
    absmax = torch.rand(-(-n // blocksize), generator=g) * 4
    absmax[0] = 0.0
    out = _native.dequantize_blockwise_native(q, absmax, code, blocksize)
    ref = reference.dequantize_blockwise(q, absmax, code, blocksize)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


@needs_native
def test_dequantize_blockwise_backend_wiring():
    """The op and the public function run the CPU kernel by default; backend= forces either; same bits, q's shape."""
    import qkernels
    from qkernels import _backend, _ops

    assert "dequantize_blockwise" in _backend.native_ops(torch.device("cpu"))
    assert _backend.resolve("dequantize_blockwise", torch.device("cpu"), None) == "cpu"
    A = torch.randn(37, 300)
    q, absmax = qkernels.quantize_blockwise(A, blocksize=64)
    assert q.shape == A.shape and absmax.shape == (-(-A.numel() // 64),)
    outs = [qkernels.dequantize_blockwise(q, absmax, blocksize=64, backend=b) for b in (None, "cpu", "reference")]
    for o in outs:
        assert o.shape == A.shape and torch.equal(o.view(torch.int32), outs[-1].view(torch.int32))
    assert (outs[0] - A).abs().max() <= absmax.max() * 0.05  # the dynamic map's coarsest step is < 5% of absmax
    op_out = torch.ops.qkernels.dequantize_blockwise(q.reshape(-1), absmax, qkernels.dynamic_map(), 64)
    assert torch.equal(op_out.view(torch.int32), outs[-1].reshape(-1).view(torch.int32))
    q2, a2 = qkernels.quantize_blockwise(A, blocksize=64, backend="reference")
    assert torch.equal(q2, q) and torch.equal(a2, absmax)
    forced = _ops.dequantize_blockwise_impl(q.reshape(-1), absmax, qkernels.dynamic_map(), 64, "cpu")
    assert torch.equal(forced, op_out)
    with pytest.raises(ValueError, match="blocksize"):
        _native._C.dequantize_blockwise_cpu(q.data_ptr(), absmax.data_ptr(), A.data_ptr(), 10, 3, A.data_ptr())
    with pytest.raises(ValueError, match="n"):
        _native._C.dequantize_blockwise_cpu(q.data_ptr(), absmax.data_ptr(), A.data_ptr(), 0, 4, A.data_ptr())


def test_blockwise_public_argument_errors():
    """Bad arguments to the public 8-bit functions are clear errors naming the argument, never a crash."""
    import qkernels

    A = torch.randn(1000)
    q, absmax = qkernels.quantize_blockwise(A)
    for bad in (0, 3, -256, 8192, 256.0, True):
        with pytest.raises(ValueError, match="blocksize"):
            qkernels.dequantize_blockwise(q, absmax, blocksize=bad)
        with pytest.raises(ValueError, match="blocksize"):
            qkernels.quantize_blockwise(A, blocksize=bad)
    with pytest.raises(ValueError, match="absmax must hold 4"):
        qkernels.dequantize_blockwise(q, absmax[:3])
    with pytest.raises(ValueError, match="absmax must hold"):
        qkernels.dequantize_blockwise(q, absmax.to(torch.int32))
    with pytest.raises(TypeError, match="q must be a uint8"):
        qkernels.dequantize_blockwise(q.float(), absmax)
    with pytest.raises(ValueError, match="q is empty"):
        qkernels.dequantize_blockwise(q[:0], absmax[:0])
    with pytest.raises(ValueError, match="code must be"):
        qkernels.dequantize_blockwise(q, absmax, code=torch.zeros(16))
    with pytest.raises(ValueError, match="code must be"):
        qkernels.quantize_blockwise(A, code=torch.zeros(256, dtype=torch.int64))
    with pytest.raises(ValueError, match="first in block 1"):
        qkernels.quantize_blockwise(torch.cat([torch.zeros(256), torch.tensor([float("nan")])]))
    # float16 / bfloat16 scales are widened exactly
    out = qkernels.dequantize_blockwise(q, absmax.to(torch.bfloat16))
    ref = qkernels.dequantize_blockwise(q, absmax.to(torch.bfloat16).float())
    assert torch.equal(out, ref)
