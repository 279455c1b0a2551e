"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU, by emulation: their real source, compiled with g++.

No GPU has run these kernels yet, so this is what a first GPU run would check, done here: tests/cuda_emu builds the
unmodified kernel sources against a small CUDA emulation (each CTA's threads are std::threads: __syncthreads and warp
shuffles behave as on the GPU; only the ``<<<...>>>`` launch syntax is rewritten). The emulation records what would
fault or silently misbehave on a GPU: a ``__ldg`` or 16-byte vector access outside the test's buffers or misaligned,
a full-mask shuffle after a lane of the warp exited. Writes outside the outputs are caught by guard bytes.

Oracles: bit identity with ``qkernels.reference`` for quantize / dequantize / blockwise (awkward n, every blocksize
class, unaligned storage offsets, each output dtype); the GEMV against float64 with the tolerance of
tests/test_cuda_kernels.py. What it cannot show: speed, the memory model beyond a barrier, FMA contraction by nvcc
(test_exact_kernels_ptx_has_no_fma checks the PTX for that where nvcc exists), real fp16/bf16 conversion instructions
(emulated with the CPU's RNE conversions, which equal them for every non-NaN input).
"""

from __future__ import annotations

import ctypes
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from qkernels import reference
from qkernels.codebooks import dynamic_map, fp4_codebook, midpoints, nf4_codebook

from .test_cuda_kernels import _gemv_check

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
NATIVE_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GUARD = 64  # bytes of sentinel on each side of every output buffer
SENTINEL = 0xA5

_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


@pytest.fixture(scope="module")
def emu():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    from .cuda_emu import build

    lib = ctypes.CDLL(str(build.build()))
    msg = [ctypes.c_char_p, ctypes.c_int]
    sig = {
        "emu_register": [_P, _I64], "emu_reset": [], "emu_errors": msg,
        "emu_dequantize_4bit": [_P, _P, _P, _I64, _I64, _P, ctypes.c_int, *msg],
        "emu_dequantize_4bit_nested": [_P, _P, _P, _P, _F, _I64, _P, _I64, _I64, _P, ctypes.c_int, *msg],
        "emu_quantize_4bit": [_P, ctypes.c_int, _I64, _I64, _P, _P, _P, *msg],
        "emu_quantize_blockwise": [_P, _I64, _I64, _P, _P, _P, *msg],
        "emu_dequantize_blockwise": [_P, _P, _P, _I64, _I64, _P, *msg],
        "emu_gemv_4bit_lora": [_P, ctypes.c_int, _I64, _I64, _P, _P, _P, _P, _P, _F, _I64, _P, _I64, _I64, _P, _P,
                               _I64, _P, _P, *msg],
    }
    for name, args in sig.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib


class Buffers:
    """Inputs registered with the emulation (reads outside them are errors); outputs between guard bytes."""

    def __init__(self, lib):
        self.lib = lib
        self.outs = []
        self.keep = []
        lib.emu_reset()

    def input(self, t: torch.Tensor | None, offset: int = 0) -> int:
        """Registers a copy of ``t`` placed ``offset`` bytes past a 512-byte-aligned address (torch's alignment);
        returns its address (0 for None)."""
        if t is None:
            return 0
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        buf = torch.empty(raw.numel() + offset + 1024, dtype=torch.uint8)
        start = (-buf.data_ptr()) % 512 + offset
        buf[start:start + raw.numel()] = raw
        self.keep.append(buf)
        ptr = buf.data_ptr() + start
        self.lib.emu_register(ptr, raw.numel())
        return ptr

    def output(self, n: int, dtype: torch.dtype, offset: int = 0) -> tuple[int, torch.Tensor]:
        """An output of ``n`` elements ``offset`` bytes past a 512-aligned address, with guard bytes around it."""
        size = n * torch.empty((), dtype=dtype).element_size()
        buf = torch.full((size + offset + 2 * GUARD + 512,), SENTINEL, dtype=torch.uint8)
        start = (-(buf.data_ptr() + GUARD)) % 512 + GUARD + offset
        self.outs.append((buf, start, size))
        ptr = buf.data_ptr() + start
        self.lib.emu_register(ptr, size)
        return ptr, buf[start:start + size].view(dtype)

    def check(self, err: bytes) -> None:
        assert err == b"", err.decode()
        for buf, start, size in self.outs:
            assert (buf[:start] == SENTINEL).all(), "a kernel wrote before its output buffer"
            assert (buf[start + size:] == SENTINEL).all(), "a kernel wrote past its output buffer"
        log = ctypes.create_string_buffer(4096)
        self.lib.emu_errors(log, 4096)
        assert log.value == b"", "emulation errors:\n" + log.value.decode()


def _call(lib, name, *args) -> bytes:
    msg = ctypes.create_string_buffer(512)
    getattr(lib, name)(*args, msg, 512)
    return msg.value


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _data(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, generator=g) * torch.rand(n, generator=g) * 3
    if n > 64:
        A[:64] = 0.0  # an all-zero block at every blocksize <= 64
    if n > 192:
        A[128:192] *= 1e-39  # subnormal values (and at blocksize <= 64 a subnormal absmax, below the 1e-38 floor)
    return A.to(dtype)


def _codes():
    return {"nf4": nf4_codebook(), "fp4": fp4_codebook(),
            "shuffled": nf4_codebook()[torch.randperm(16, generator=torch.Generator().manual_seed(1))].contiguous()}


# n: 1 element, odd / partial bytes, one short of and one past a thread's 32 elements, a CTA's 8192, a partial CTA.
_DQ_N = [1, 2, 31, 33, 64, 95, 8192, 8193, 8192 * 2 + 4097]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("packed_off,out_off", [(0, 0), (1, 0), (0, 2), (16, 32)])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_dequantize_4bit_bit_exact(emu, blocksize, packed_off, out_off, dtype):
    code = _codes()["fp4"]
    for n in _DQ_N:
        packed, absmax = reference.quantize_4bit(_data(n, n), code, blocksize)
        b = Buffers(emu)
        optr, out = b.output(n, dtype, out_off * out_off_bytes(dtype))
        err = _call(emu, "emu_dequantize_4bit", b.input(packed, packed_off), b.input(absmax), b.input(code), n,
                    blocksize, optr, NATIVE_DT[dtype])
        b.check(err)
        want = reference.dequantize_4bit(packed, absmax, code, blocksize, n, dtype)
        assert torch.equal(_bits(out), _bits(want)), f"n={n}"


def out_off_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("nested_bs", [1, 4, 256])
@pytest.mark.parametrize("blocksize", [32, 64, 1024])
def test_dequantize_4bit_nested_bit_exact(emu, blocksize, nested_bs, dtype):
    code, dyn = _codes()["nf4"], dynamic_map()
    for n, packed_off in itertools.product([33, 4095, 8192 * 3 + 1], [0, 3]):
        packed, absmax = reference.quantize_4bit(_data(n, n + 1), code, blocksize)
        offset = absmax.mean()
        q, nested_absmax = reference.quantize_blockwise(absmax - offset, dyn, nested_bs)
        b = Buffers(emu)
        optr, out = b.output(n, dtype)
        err = _call(emu, "emu_dequantize_4bit_nested", b.input(packed, packed_off), b.input(q), b.input(nested_absmax),
                    b.input(dyn), float(offset), nested_bs, b.input(code), n, blocksize, optr, NATIVE_DT[dtype])
        b.check(err)
        scales = reference.decode_nested_absmax(q, nested_absmax, dyn, offset, nested_bs)
        want = reference.dequantize_4bit(packed, scales, code, blocksize, n, dtype)
        assert torch.equal(_bits(out), _bits(want)), f"n={n}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("code_name", ["nf4", "fp4", "shuffled"])
@pytest.mark.parametrize("blocksize", [32, 64, 512, 4096])
def test_quantize_4bit_bit_exact(emu, blocksize, code_name, dtype):
    """blocksize 32 / 64: several quantization blocks per warp; 512: one block over 2 warps (the shared-memory
    reduction); 4096: a 512-thread CTA."""
    code = _codes()[code_name]
    bounds, _ = midpoints(code)
    for n, a_off in [(1, 0), (7, 0), (33, 2), (2047, 0), (2049, 4), (4096 * 2 + 99, 0), (4096 * 2 + 99, 6)]:
        A = _data(n, 3 * n + blocksize, dtype)
        if n > 2 * 64:
            blk = A[64:128]  # values exactly on the midpoints with absmax 1.0: ties go to the lower code
            blk.copy_(bounds[torch.arange(64) % 15].to(dtype))
            blk[0] = 1.0
            A[200] = float("-0.0")
        b = Buffers(emu)
        pptr, packed = b.output((n + 1) // 2, torch.uint8)
        aptr, absmax = b.output(-(-n // blocksize), torch.float32)
        err = _call(emu, "emu_quantize_4bit", b.input(A, a_off * A.element_size()), NATIVE_DT[dtype], n, blocksize,
                    b.input(code), pptr, aptr)
        b.check(err)
        want_p, want_a = reference.quantize_4bit(A, code, blocksize)
        assert torch.equal(_bits(absmax), _bits(want_a)), f"n={n}"
        assert torch.equal(packed, want_p.view(-1)), f"n={n}"


def _maps():
    dyn = dynamic_map()
    ties = dyn.clone()
    ties[100:110] = ties[100]
    return {"dynamic": dyn, "shuffled": dyn[torch.randperm(256, generator=torch.Generator().manual_seed(0))],
            "ties": ties}


@pytest.mark.parametrize("map_name", ["dynamic", "shuffled", "ties"])
@pytest.mark.parametrize("blocksize", [1, 2, 64, 256, 4096])
def test_blockwise_bit_exact(emu, blocksize, map_name):
    code = _maps()[map_name].contiguous()
    # One warp per block: blocksize 1 launches a CTA per 8 elements (each thread a std::thread here), so keep n small.
    for n in [1, 255, 257] + ([3 * 4096 + 5] if blocksize >= 64 else []):
        A = _data(n, n + blocksize) * 10
        b = Buffers(emu)
        qptr, q = b.output(n, torch.uint8)
        aptr, absmax = b.output(-(-n // blocksize), torch.float32)
        b.check(_call(emu, "emu_quantize_blockwise", b.input(A), n, blocksize, b.input(code), qptr, aptr))
        rq, rabsmax = reference.quantize_blockwise(A, code, blocksize)
        assert torch.equal(_bits(absmax), _bits(rabsmax)) and torch.equal(q, rq), f"n={n}"
        b = Buffers(emu)
        optr, out = b.output(n, torch.float32, 4)
        b.check(_call(emu, "emu_dequantize_blockwise", b.input(rq, 1), b.input(rabsmax), b.input(code), n, blocksize,
                      optr))
        assert torch.equal(_bits(out), _bits(reference.dequantize_blockwise(rq, rabsmax, code, blocksize)))


# (N, K): K % 32 == 0 (fast kernel; rows past N in the last warp), K odd / not a multiple of 32 (general kernel),
# blocks straddling rows (96 at blocksize 64; 1024 at 4096: one block over 4 rows), N smaller than one CTA's rows.
_GEMV_SHAPES = [(3, 63), (17, 96), (13, 257), (33, 64), (5, 1024)]
_GEMV_BS = {(3, 63): 32, (17, 96): 64, (13, 257): 4096, (33, 64): 32, (5, 1024): 4096}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("N,K", _GEMV_SHAPES, ids=[f"{n}x{k}" for n, k in _GEMV_SHAPES])
def test_gemv_vs_fp64(emu, N, K, nested, dtype):
    """M in 1..17 (every M-tile template, and two tiles at 17), r in {0, 3, 40} (r > 32), bias or not, x / packed
    aligned or not (fast / general kernel)."""
    g = torch.Generator().manual_seed(N * K)
    bs = _GEMV_BS[(N, K)]
    code, dyn = _codes()["nf4"], dynamic_map()
    W = torch.randn(N * K, generator=g)
    packed, absmax = reference.quantize_4bit(W, code, bs)
    if nested:
        offset = absmax.mean()
        q, nested_absmax = reference.quantize_blockwise(absmax - offset, dyn, 4)  # several nested blocks
        scales = reference.decode_nested_absmax(q, nested_absmax, dyn, offset, 4)
    else:
        scales = absmax
    W64 = reference.dequantize_4bit(packed, scales, code, bs, N * K, torch.float64).view(N, K)
    qs = type("QS", (), {"shape": (N, K)})()
    for M, r, with_bias, x_off, p_off in [(1, 0, False, 0, 0), (2, 3, True, 0, 0), (3, 40, True, 1, 0),
                                          (5, 3, False, 0, 1), (9, 0, True, 0, 0), (16, 3, True, 0, 0),
                                          (17, 40, False, 0, 0)]:
        x = torch.randn(M, K, generator=g).to(dtype)
        t = torch.randn(M, r, generator=g) * 0.5 if r else None
        B = torch.randn(N, r, generator=g) if r else None
        bias = torch.randn(N, generator=g) if with_bias else None
        b = Buffers(emu)
        if nested:
            sc = (0, b.input(q), b.input(nested_absmax), b.input(dyn), float(offset), 4)
        else:
            sc = (b.input(absmax), 0, 0, 0, 0.0, 256)
        optr, out = b.output(M * N, dtype)
        err = _call(emu, "emu_gemv_4bit_lora", b.input(x, x_off * x.element_size()), NATIVE_DT[dtype], M, K,
                    b.input(packed, p_off), *sc, b.input(code), bs, N, b.input(t), b.input(B), r, b.input(bias), optr)
        b.check(err)
        _gemv_check(x, packed, qs, t, B, bias, out.view(M, N).clone(), W64)


def test_launch_rewrite_finds_every_launch():
    """The emulation only rewrites the ``<<<>>>`` syntax: every launch in csrc/cuda must be found (else the
    emulated build would not compile, or would silently test fewer kernels)."""
    from .cuda_emu.build import rewrite_launches

    for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        text = p.read_text()
        new, count = rewrite_launches(text)
        assert count == text.count("<<<") and "<<<" not in new, p.name


# Kernels whose results must match the reference bit for bit: no FMA may appear in them, every float32 multiply,
# add and divide must be the IEEE round-to-nearest form (nvcc contracts a plain a * b + c into an FMA by default),
# and nothing may flush subnormals (-ftz=true / --use_fast_math: tiny scales and outputs are subnormal, format.md §7.8).
_EXACT = {"dequantize.cu": "dequantize_4bit_kernel", "quantize.cu": "quantize_4bit_kernel",
          "blockwise.cu": "blockwise_kernel"}


def test_cuda_build_keeps_ieee_flags():
    """The PTX check below compiles with nvcc's defaults; the project's build must not relax them either."""
    build = (ROOT / "CMakeLists.txt").read_text() + (ROOT / "setup.py").read_text()
    for flag in ("use_fast_math", "ftz=true", "prec-div=false", "prec-sqrt=false"):
        assert flag not in build.replace(" ", ""), flag


@pytest.mark.parametrize("source", sorted(_EXACT))
def test_exact_kernels_ptx_has_no_fma(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    ptx = tmp_path / "k.ptx"
    cmd = ["nice", "-n", "19", nvcc, "-O3", "-std=c++17", "-arch=compute_90", "-ptx", f"-I{ROOT / 'csrc'}",
           str(ROOT / "csrc" / "cuda" / source), "-o", str(ptx)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    text = ptx.read_text()
    # one PTX function per entry: split at ".entry" and keep the exact kernels
    entries = [e for e in re.split(r"\.visible \.entry|\.entry", text)[1:] if _EXACT[source] in e.split("(")[0]]
    assert entries, f"no {_EXACT[source]} entry in the PTX of {source}"
    for body in entries:
        assert not re.search(r"\bfma\.", body), f"{source}: an FMA in a bit-exact kernel"
        assert ".ftz" not in body, f"{source}: a flush-to-zero instruction in a bit-exact kernel"
        for op in re.findall(r"\b(?:mul|add|sub|div)(?:\.[a-z0-9]+)*\.f32\b", body):
            assert ".rn" in op, f"{source}: {op} (not the IEEE round-to-nearest form) in a bit-exact kernel"
