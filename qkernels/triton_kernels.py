"""Triton kernels for the large-M (training) path: the 4-bit weight is dequantized tile by tile inside the GEMM's
K loop, and the LoRA term (and bias) is added in the epilogue, so the output is written once (DESIGN §2).

- ``matmul_4bit_lora_fwd``: ``y = x @ W^T + lora_t @ lora_B^T + bias``
- ``matmul_4bit_lora_dx``:  ``dx = grad_y @ W + (lora_u @ lora_A) * lora_mask``

``W = dequant(packed, state)`` ``[N, K]`` in bitsandbytes' layout (docs/format.md): flat row-major index
``i = n * K + k``, byte ``i // 2`` (high nibble when ``i`` is even), scale block ``i // blocksize`` over the flat
index, so blocks straddle rows when ``K % blocksize != 0``. Each W element is ``code[nibble] * scale`` in float32
(the scale decoded inline when double-quantized), rounded once to the activation dtype, then fed to ``tl.dot``
with float32 accumulation: the same W a plain ``dequantize_4bit(..., dtype=x.dtype)`` produces.

Interpreter vs compiled. Triton decides at *decoration* time whether ``@triton.jit`` builds a compiled
``JITFunction`` or an ``InterpretedFunction`` (it reads ``TRITON_INTERPRET`` then), so a module decorated under one
setting cannot run under the other, and the answer would depend on import order. Here the kernel bodies are plain
functions, and ``_kernels(interpret)`` builds each flavour on first use, each in its own copy of this module's
namespace (so a kernel's call to the ``_dequant_tile`` helper resolves to the helper of the same flavour). A launch
uses the interpreter when the tensors are not on CUDA or ``TRITON_INTERPRET=1`` is set at call time; nothing
depends on the environment at import. On CPU the interpreter is slow (numpy per program instance): it exists for
tests at small shapes; ``triton_available`` says whether a dispatcher should pick Triton at all.

torch.compile (STYLE 7): each launcher goes through a ``torch.library.triton_op`` (``qkernels::triton_*``) whose
body launches with ``wrap_triton``, so torch.compile / make_fx trace the kernels as graph nodes. The schemas live
here rather than in ``_ops.py`` because ``triton_op`` must wrap the launching function itself. Interpreted kernels
are not traceable (torch's ``wrap_triton`` hands them back unwrapped): compile on CUDA tensors.

Known difference from the reference: on the GPU the nested-scale decode ``code2[q] * nested_absmax + offset`` may be
contracted into one FMA by Triton's default fp fusion (``enable_fp_fusion`` cannot be passed through
``wrap_triton``): at most 1 float32 ulp in a scale, far below the bf16/fp16 rounding of W.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
from dataclasses import dataclass

import torch

from .quant_state import FLOAT_DTYPES, QuantState

try:  # import never fails because triton is missing (STYLE 10): the launchers raise, triton_available is False
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - triton is a dev dependency
    triton = tl = None
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["matmul_4bit_lora_fwd", "matmul_4bit_lora_dx", "triton_available", "interpreter_unusable_reason"]

# The epilogue's LoRA operands are [BLOCK_M, R_PAD] and [BLOCK_out, R_PAD] tiles staged in shared memory. At R_PAD 256
# with float32 operands (peft keeps adapters in float32) that is 256 KiB: over the 227 KiB a block may have on an
# H100 in 4 of the 6 forward and 2 of the 6 dX tilings (triton 3.6 for sm_90a, compiled on the CPU machine), which
# the autotuner then drops after compiling them (~10 s each). At 128 every tiling fits (<= 128 KiB); larger ranks
# take the separate addmm path of qkernels._linear.
MAX_LORA_RANK = 128


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernels can serve ``device``: triton imports, and the device is CUDA, or
    ``TRITON_INTERPRET=1`` asks for the (slow, CPU) interpreter and it can run them here
    (``interpreter_unusable_reason``). The launchers themselves also run CPU tensors through the interpreter without
    the variable; this is the switch a dispatcher should read.
    """
    if _TRITON_IMPORT_ERROR is not None:
        return False
    return torch.device(device).type == "cuda" or (_interpret_env() and interpreter_unusable_reason() is None)


def _probe_kernel(out_ptr, n):
    """16 lanes counting the trips of a loop bounded by a scalar argument, as the kernels' K loops are."""
    acc = tl.full((16,), 0, tl.int32)
    for _ in range(0, n, 1):
        acc += 1
    tl.store(out_ptr + tl.arange(0, 16), acc)


@functools.cache
def interpreter_unusable_reason() -> str | None:
    """Why Triton's CPU interpreter cannot run these kernels in this process, or None (it can, or triton is not
    installed: ``triton_available`` says that).

    Found by running a 16-lane probe kernel once. The known case: triton 3.6's interpreter holds a scalar argument as a
    1-element numpy array and turns it into a loop bound with ``int(array)``, which numpy 2.4 and later refuse ("only
    0-dimensional arrays can be converted to Python scalars"); newer triton releases squeeze the array first. The
    compiled (GPU) kernels are not affected.
    """
    if _TRITON_IMPORT_ERROR is not None:
        return None
    import numpy as np
    from triton.runtime.interpreter import InterpretedFunction

    out = torch.zeros(16, dtype=torch.int32)
    versions = f"triton {triton.__version__}, numpy {np.__version__}"
    try:
        InterpretedFunction(_probe_kernel)[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - any failure of the interpreter itself is the answer
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        return (f"Triton's interpreter fails on a loop bounded by a kernel argument here ({versions}: "
                f"{type(cause).__name__}: {cause})")
    if not bool((out == 3).all()):
        return f"Triton's interpreter miscounted a probe kernel's loop here ({versions})"
    return None


# ------------------------------------------------------------------------------------------------------ kernels
# Plain functions, made into JITFunction / InterpretedFunction by _kernels(). Annotations are strings under
# `from __future__ import annotations`; triton reads "tl.constexpr" as a compile-time constant in both flavours.
# Only builtins of triton.language are used (tl.full, not tl.zeros; `(a + b - 1) // b`, not tl.cdiv): the
# @jit helpers of triton.language.standard were fixed to one flavour when triton was imported, and calling a
# JITFunction from an interpreted kernel raises "Cannot call @triton.jit'd outside of the scope of a kernel".


def _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, mask,
                 NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """float32 scale of quantization block(s) ``blk`` (any shape); 0 (plain) or finite (nested) where masked."""
    # One return: the compiler type-checks the statements after a constexpr-if's return too (uint8 vs float32).
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = s + tl.load(offset_ptr)  # two float32 roundings, as reference.decode_nested_absmax
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return scale


def _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                  offs_n, k0, N, K,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                  NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ROW_ALIGNED: tl.constexpr):
    """``W[offs_n, k0:k0 + BLOCK_K]`` as float32 ``[BLOCK_N, BLOCK_K]``, finite everywhere (callers mask the other
    dot operand, so out-of-range rows/columns contribute 0).

    ROW_ALIGNED (``K % BLOCKSIZE == 0``, so K is even): row n is ``K / 2`` whole bytes and ``K / BLOCKSIZE`` whole
    scale blocks; bytes load as a ``[BLOCK_N, BLOCK_K / 2]`` tile and split into nibbles, and the scale is one value
    per row (BLOCK_K divides BLOCKSIZE) or ``BLOCK_K / BLOCKSIZE`` per row. Otherwise every element computes its
    flat index: correct for any K (blocks straddling rows, odd K), ~2x the integer work.
    """
    n_mask = offs_n < N
    if ROW_ALIGNED:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        row = offs_n.to(tl.int64) * (K // 2)
        byte = tl.load(packed_ptr + row[:, None] + offs_b[None, :],
                       mask=n_mask[:, None] & (offs_b < K // 2)[None, :], other=0).to(tl.int32)
        nib = tl.join(byte >> 4, byte & 0xF).reshape(BLOCK_N, BLOCK_K)  # high nibble = even k
        vals = tl.load(code_ptr + nib)
        blocks_per_row = K // BLOCKSIZE
        if BLOCK_K <= BLOCKSIZE:
            blk = offs_n.to(tl.int64) * blocks_per_row + k0 // BLOCKSIZE
            scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, n_mask,
                                 NESTED_BLOCKSIZE, NESTED)
            w = vals * scale[:, None]
        else:
            SUB: tl.constexpr = BLOCK_K // BLOCKSIZE
            offs_s = k0 // BLOCKSIZE + tl.arange(0, SUB)
            blk = offs_n.to(tl.int64)[:, None] * blocks_per_row + offs_s[None, :]
            smask = n_mask[:, None] & (offs_s < blocks_per_row)[None, :]
            scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, smask,
                                 NESTED_BLOCKSIZE, NESTED)
            w = (vals.reshape(BLOCK_N, SUB, BLOCKSIZE) * scale[:, :, None]).reshape(BLOCK_N, BLOCK_K)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (offs_k < K)[None, :]
        idx = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
        shift = (4 - 4 * (idx & 1)).to(tl.int32)  # even flat index: high nibble
        vals = tl.load(code_ptr + ((byte >> shift) & 0xF))
        scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, idx // BLOCKSIZE, mask,
                             NESTED_BLOCKSIZE, NESTED)
        w = vals * scale
    return w


def _grouped_pid(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP row tiles at a time so their W tiles stay in L2."""
    in_group = GROUP * num_cols
    first = (pid // in_group) * GROUP
    size = tl.minimum(num_rows - first, GROUP)
    return first + (pid % in_group) % size, (pid % in_group) // size


def _matmul_4bit_lora_fwd_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
    lora_t_ptr, lora_b_ptr, bias_ptr, y_ptr,
    M, N, K, R, M_KEY,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ W[N, K]^T (+ lora_t[M, R] @ lora_b[N, R]^T) (+ bias[N])``, all row-major contiguous.
    ``M_KEY`` is read by the autotuner only (see ``_m_key``)."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N,
                                  GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
        w = _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                          offs_n, k0, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED, ROW_ALIGNED)
        acc = tl.dot(xt, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        r_mask = offs_r < R
        t = tl.load(lora_t_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(lora_b_ptr + offs_n.to(tl.int64)[:, None] * R + offs_r[None, :],
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(t, tl.trans(b.to(lora_t_ptr.dtype.element_ty)), acc, input_precision=LORA_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _matmul_4bit_lora_dx_kernel(
    g_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
    lora_u_ptr, lora_a_ptr, mask_ptr, dx_ptr,
    M, N, K, R, M_KEY,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``dx[M, K] = g[M, N] @ W[N, K] (+ (lora_u[M, R] @ lora_a[R, K]) * mask[M, K])``; BLOCK_K tiles the output
    columns, BLOCK_N the reduction. The W tile is ``[BLOCK_N, BLOCK_K]``, the same orientation as in the forward."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), (M + BLOCK_M - 1) // BLOCK_M, (K + BLOCK_K - 1) // BLOCK_K,
                                  GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    offs_n = tl.arange(0, BLOCK_N)
    g_ptrs = g_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        gt = tl.load(g_ptrs, mask=m_mask[:, None] & (n0 + offs_n < N)[None, :], other=0.0)
        w = _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                          n0 + offs_n, k0, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED, ROW_ALIGNED)
        acc = tl.dot(gt, w.to(g_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_N
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        r_mask = offs_r < R
        u = tl.load(lora_u_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        a = tl.load(lora_a_ptr + offs_r.to(tl.int64)[:, None] * K + offs_k[None, :],
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        lora = tl.dot(u, a.to(lora_u_ptr.dtype.element_ty), input_precision=LORA_PRECISION)
        if HAS_MASK:
            lora *= tl.load(mask_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :],
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += lora
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


# ------------------------------------------------------------------------------------------- kernel flavours
# H100 tilings (BLOCK_M, BLOCK_out, BLOCK_red, num_warps, num_stages), chosen by register use: the dequantized W
# tile, its gather addresses and the accumulator share the 255 registers a thread may have. ptxas (sm_90a, triton
# 3.9, compiled on the CPU machine) reports no spills for these forward tilings at blocksize 32 and 64; 128x256 and
# 256x128 spill 200-1200 bytes per thread at 8 warps and 16 warps caps a thread at 128 registers, so they are out.
# dX spills ~200 bytes at 128x128 in its masked-LoRA epilogue only (0 without LoRA); autotuning on the GPU decides.
_FWD_TILES = ((128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 2),
              (128, 64, 32, 4, 4), (64, 64, 64, 4, 3))
_DX_TILES = ((128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4),
             (64, 64, 64, 4, 3), (64, 64, 64, 4, 4))
# Exact float32 dots ("ieee": float32 activations while torch disallows TF32, its default) run as CUDA-core FMA loops,
# not tensor-core MMAs, and hold whole accumulator tiles in registers: the tilings above then compiled (triton 3.6,
# sm_90a) to 32 registers with 13-35 KiB of spills per thread and took 20-100 s each to compile. These smaller ones
# compile in 1-6 s with at most ~2 KiB of spills (in the r = 128 epilogue; < 400 bytes at r = 16).
_FMA_TILES = ((64, 64, 16, 4, 3), (64, 64, 16, 4, 4), (64, 32, 32, 4, 3), (32, 64, 32, 4, 3))


def _gpu_configs(tiles, tile_m: str, tile_out: str, tile_red: str) -> list:
    """``triton.Config`` list of ``tiles`` with GROUP_M 8 (row tiles that share W tiles run together, for L2)."""
    return [triton.Config({tile_m: bm, tile_out: bo, tile_red: br, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bo, br, w, s in tiles]


# One small tiling in the interpreter (autotuning there costs minutes). BLOCK_K 64 exercises both scale paths of
# _dequant_tile at the tested block sizes: 64 <= 64 (one scale per row) and 64 > 32 (two per row).
_INTERPRET_FWD = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2}
_INTERPRET_DX = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2}


@dataclass(frozen=True)
class _Kernels:
    fwd: object  # triton Autotuner over a JITFunction or an InterpretedFunction
    dx: object
    fwd_fma: object  # the same kernels over _FMA_TILES, for exact float32 dots (the interpreter: fwd / dx again)
    dx_fma: object


@functools.cache
def _kernels(interpret: bool) -> _Kernels:
    """Build the kernels of one flavour (see the module docstring), each flavour in its own namespace."""
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"the Triton kernels need triton, which failed to import: {_TRITON_IMPORT_ERROR}")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    make = InterpretedFunction if interpret else JITFunction
    ns = dict(globals())

    def build(fn):
        ns[fn.__name__] = make(types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__, fn.__closure__))
        return ns[fn.__name__]

    for helper in (_block_scale, _dequant_tile, _grouped_pid):
        build(helper)
    if interpret:
        fwd_cfg, dx_cfg = [triton.Config(_INTERPRET_FWD)], [triton.Config(_INTERPRET_DX)]
        fwd_fma_cfg, dx_fma_cfg = fwd_cfg, dx_cfg
    else:
        fwd_cfg = _gpu_configs(_FWD_TILES, "BLOCK_M", "BLOCK_N", "BLOCK_K")
        dx_cfg = _gpu_configs(_DX_TILES, "BLOCK_M", "BLOCK_K", "BLOCK_N")
        fwd_fma_cfg = _gpu_configs(_FMA_TILES, "BLOCK_M", "BLOCK_N", "BLOCK_K")
        dx_fma_cfg = _gpu_configs(_FMA_TILES, "BLOCK_M", "BLOCK_K", "BLOCK_N")
    # What changes the best tiling: the shape (M bucketed, see _m_key) and the constexprs that change a tile's work
    # (scale decoding, the row-aligned byte path, the epilogue). The autotuner adds every tensor's dtype itself.
    # (triton >= 3.9 rejects a key that names no argument, so each kernel names its own epilogue switch.)
    key = ["M_KEY", "N", "K", "R", "BLOCKSIZE", "NESTED", "ROW_ALIGNED", "HAS_LORA"]
    fwd, dx = build(_matmul_4bit_lora_fwd_kernel), build(_matmul_4bit_lora_dx_kernel)
    return _Kernels(
        fwd=triton.autotune(configs=fwd_cfg, key=[*key, "HAS_BIAS"])(fwd),
        dx=triton.autotune(configs=dx_cfg, key=[*key, "HAS_MASK"])(dx),
        fwd_fma=triton.autotune(configs=fwd_fma_cfg, key=[*key, "HAS_BIAS"])(fwd),
        dx_fma=triton.autotune(configs=dx_fma_cfg, key=[*key, "HAS_MASK"])(dx),
    )


def _use_interpreter(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" or _interpret_env()


def _is_fake(t: torch.Tensor) -> bool:
    """A tensor without data (fake / meta), also when wrapped for functionalization as torch.compile traces."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t) or t.device.type == "meta"


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 operands: exact ("ieee") unless torch itself allows TF32 for matmuls, as plain torch would do."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for 16-bit operands


def _lora_precision(act_dtype: torch.dtype) -> str:
    """The epilogue's LoRA product: float32 operands (float32 adapters) with 16-bit activations use TF32 tensor cores.

    TF32 keeps 10 mantissa bits, more than the bf16 x and W of the base product (7), so the output, rounded to 16 bits,
    loses nothing measurable; "ieee" there is a CUDA-core FMA loop that, compiled for sm_90a (triton 3.6), spilled
    1.6 KiB per thread at r = 64, 3.5 KiB at r = 128, and took ~40 s per tiling to compile. float32 activations keep
    torch's rule (``_dot_precision``)."""
    return "tf32" if act_dtype in (torch.float16, torch.bfloat16) else _dot_precision(act_dtype)


def _m_key(m):
    """The autotuner's view of M: the next power of two, at least 16. Tuning on the exact M re-benchmarked all six
    tilings (each ~0.1 s of do_bench, after compiling) for every new number of tokens, i.e. on most steps of a
    training run without sequence packing; one bucket's best tiling is within noise of its neighbours'. Traced
    (a SymInt under torch.compile) M is passed as it is: Inductor autotunes user kernels itself, and reading the
    value would specialize the graph on it."""
    if isinstance(m, int):
        return max(16, 1 << (max(m, 1) - 1).bit_length())
    return m


def _r_pad(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())  # tl.dot needs every dimension >= 16


def _launch(kernel_name: str, a: torch.Tensor, packed, absmax, code, blocksize, n, nested_absmax, nested_code,
            offset, nested_blocksize, lora_1, lora_2, extra, out, *, has_extra: bool, grid_cols: int, m: int, k: int,
            extra_name: str) -> None:
    """Shared launch of either kernel. ``a`` is x (fwd) or grad_y (dx), 2-D contiguous; ``extra`` is bias / mask."""
    interpret = _use_interpreter(a)
    if interpret and _is_fake(a):
        return  # shape propagation only (fake tensors): the interpreter cannot run, and nothing needs to
    if isinstance(m, int) and m == 0:
        # Nothing to write. Launched, the autotuner would time six empty grids (do_bench sizes its repeats by the
        # measured ~0 ms: seconds of Python launches) and file the winner of that noise under M's bucket 16.
        return
    if interpret and (why := interpreter_unusable_reason()) is not None:
        raise RuntimeError(f"the Triton kernels cannot run on {a.device.type} tensors in this process: {why}. "
                           "Upgrade triton (or use numpy < 2.4) for the interpreter, run on a CUDA GPU, or use "
                           "backend='cpu' or 'reference'")
    kernels = _kernels(interpret)
    precision = _dot_precision(a.dtype)
    if precision == "ieee":  # CUDA-core FMA dots: their own tilings (see _FMA_TILES)
        kernel = kernels.fwd_fma if kernel_name == "fwd" else kernels.dx_fma
    else:
        kernel = kernels.fwd if kernel_name == "fwd" else kernels.dx
    nested = nested_absmax is not None
    has_lora = lora_1 is not None
    r = int(lora_1.shape[1]) if has_lora else 0
    dummy = absmax  # any tensor on the device for pointer arguments a kernel never reads
    cols_key = "BLOCK_N" if kernel_name == "fwd" else "BLOCK_K"

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(grid_cols, meta[cols_key]),)

    launcher = torch.library.wrap_triton(kernel)[grid]
    # Triton launches on the *current* CUDA device and its current stream, not on the tensors' device: with x on
    # cuda:1 while cuda:0 is current (a model split over GPUs) the kernel would run on cuda:0 and fault on cuda:1's
    # pointers. Fake tensors (torch.compile tracing) need no guard: the compiled wrapper sets the device itself.
    guard = contextlib.nullcontext() if interpret or _is_fake(a) else torch.cuda.device(a.device)
    with guard:
        launcher(
            a, packed, absmax,
            nested_absmax if nested else dummy, nested_code if nested else dummy, offset if nested else dummy, code,
            lora_1 if has_lora else dummy, lora_2 if has_lora else dummy, extra if has_extra else dummy, out,
            m, int(n), int(k), int(r), _m_key(m),
            BLOCKSIZE=int(blocksize), NESTED_BLOCKSIZE=int(nested_blocksize), NESTED=bool(nested),
            ROW_ALIGNED=bool(k % blocksize == 0), HAS_LORA=bool(has_lora), **{extra_name: bool(has_extra)},
            R_PAD=_r_pad(r), DOT_PRECISION=precision,
            LORA_PRECISION=_lora_precision(a.dtype),
        )


# ----------------------------------------------------------------------------------------------- checks
def _check_weight(packed, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset, nested_blocksize, like):
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8 bytes, got {packed.dtype}")
    torch._check(packed.numel() >= (n * k + 1) // 2,
                 lambda: f"packed has {packed.numel()} bytes; a [{n}, {k}] weight needs {(n * k + 1) // 2}")
    torch._check(blocksize >= 32 and blocksize & (blocksize - 1) == 0 and blocksize <= 4096,
                 lambda: f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    nblocks = -(-(n * k) // blocksize)
    torch._check(absmax.numel() == nblocks, lambda: f"absmax must have {nblocks} entries, got {absmax.numel()}")
    torch._check(code.dtype == torch.float32 and code.numel() == 16, lambda: "code must be float32 with 16 entries")
    if nested_absmax is None:
        torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    else:
        torch._check(absmax.dtype == torch.uint8, lambda: f"absmax must be uint8 codes when nested, got {absmax.dtype}")
        torch._check(nested_code is not None and nested_code.numel() == 256 and nested_code.dtype == torch.float32,
                     lambda: "nested_code must be float32 with 256 entries")
        torch._check(offset is not None and offset.numel() == 1, lambda: "offset must be one float32 value")
        n2 = -(-nblocks // nested_blocksize)
        torch._check(nested_absmax.numel() == n2 and nested_absmax.dtype == torch.float32,
                     lambda: f"nested_absmax must be float32 with {n2} entries (one per nested block)")
        torch._check(nested_blocksize > 0 and nested_blocksize & (nested_blocksize - 1) == 0,
                     lambda: f"nested_blocksize must be a positive power of two, got {nested_blocksize}")
    for name, t in (("packed", packed), ("absmax", absmax), ("code", code), ("nested_absmax", nested_absmax),
                    ("nested_code", nested_code), ("offset", offset)):
        if t is not None:
            torch._check(t.device == like.device, lambda name=name, t=t: f"{name} is on {t.device}, not {like.device}")
            torch._check(t.is_contiguous(), lambda name=name: f"{name} must be contiguous")


def _check_2d(t: torch.Tensor, name: str, rows: int, cols: int, like: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    torch._check(t.dim() == 2 and t.shape[0] == rows and t.shape[1] == cols,
                 lambda: f"{name} must have shape [{rows}, {cols}], got {list(t.shape)}")
    torch._check(t.dtype in dtypes, lambda: f"{name} must be one of {dtypes}, got {t.dtype}")
    torch._check(t.device == like.device, lambda: f"{name} is on {t.device}, not {like.device}")
    torch._check(t.is_contiguous(), lambda: f"{name} must be contiguous")


def _check_lora(lora_1, lora_2, names, m: int, r_rows: bool, other: int, like: torch.Tensor) -> None:
    """lora_t/lora_u [m, r] in like.dtype or float32; lora_B [other, r] or lora_A [r, other] (r_rows)."""
    torch._check((lora_1 is None) == (lora_2 is None), lambda: f"pass both {names[0]} and {names[1]}, or neither")
    if lora_1 is None:
        return
    r = lora_1.shape[-1] if lora_1.dim() == 2 else 0
    torch._check(0 < r <= MAX_LORA_RANK, lambda: f"{names[0]} must be [M, r] with 0 < r <= {MAX_LORA_RANK}")
    _check_2d(lora_1, names[0], m, r, like, (like.dtype, torch.float32))
    _check_2d(lora_2, names[1], r if r_rows else other, other if r_rows else r, like)


# ------------------------------------------------------------------------------------------------- the ops
def _fwd_impl(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
    nested_blocksize: int, lora_t: torch.Tensor | None, lora_B: torch.Tensor | None, bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """``out[M, n] = x[M, K] @ W^T (+ lora_t @ lora_B^T) (+ bias)``; W's packed tensors as in ``dequantize_4bit``."""
    m, k = x.shape
    torch._check(x.dtype in FLOAT_DTYPES and x.is_contiguous(), lambda: "x must be contiguous float32/16/bf16")
    _check_weight(packed, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset, nested_blocksize, x)
    _check_lora(lora_t, lora_B, ("lora_t", "lora_B"), m, False, n, x)
    if bias is not None:
        torch._check(bias.shape == (n,) and bias.device == x.device and bias.is_contiguous(),
                     lambda: f"bias must be a contiguous [{n}] tensor on {x.device}")
    _check_2d(out, "out", m, n, x, (x.dtype,))
    _launch("fwd", x, packed, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nested_blocksize,
            lora_t, lora_B, bias, out, has_extra=bias is not None, grid_cols=n, m=m, k=k, extra_name="HAS_BIAS")


@torch.library.triton_op("qkernels::triton_matmul_4bit_lora_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
    nested_blocksize: int, lora_t: torch.Tensor | None, lora_B: torch.Tensor | None, bias: torch.Tensor | None,
) -> torch.Tensor:
    """Functional form of ``triton_matmul_4bit_lora_fwd_out``: returns a new ``[M, n]`` tensor of x's dtype."""
    out = x.new_empty((x.shape[0], n))
    _fwd_impl(x, packed, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nested_blocksize,
              lora_t, lora_B, bias, out)
    return out


@torch.library.triton_op("qkernels::triton_matmul_4bit_lora_fwd_out", mutates_args={"out"})
def _fwd_out_op(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
    nested_blocksize: int, lora_t: torch.Tensor | None, lora_B: torch.Tensor | None, bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """``triton_matmul_4bit_lora_fwd`` into a caller's contiguous ``[M, n]`` buffer of x's dtype."""
    _fwd_impl(x, packed, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nested_blocksize,
              lora_t, lora_B, bias, out)


def _dx_impl(
    grad_y: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, k: int,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
    nested_blocksize: int, lora_u: torch.Tensor | None, lora_A: torch.Tensor | None, lora_mask: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """``out[M, k] = grad_y[M, N] @ W (+ (lora_u @ lora_A) * lora_mask)``."""
    m, n = grad_y.shape
    torch._check(grad_y.dtype in FLOAT_DTYPES and grad_y.is_contiguous(),
                 lambda: "grad_y must be contiguous float32/16/bf16")
    _check_weight(packed, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset, nested_blocksize, grad_y)
    _check_lora(lora_u, lora_A, ("lora_u", "lora_A"), m, True, k, grad_y)
    if lora_mask is not None:
        torch._check(lora_u is not None, lambda: "lora_mask applies to the LoRA term: pass lora_u and lora_A")
        _check_2d(lora_mask, "lora_mask", m, k, grad_y)
    _check_2d(out, "out", m, k, grad_y, (grad_y.dtype,))
    _launch("dx", grad_y, packed, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nested_blocksize,
            lora_u, lora_A, lora_mask, out, has_extra=lora_mask is not None, grid_cols=k, m=m, k=k,
            extra_name="HAS_MASK")


@torch.library.triton_op("qkernels::triton_matmul_4bit_lora_dx", mutates_args=())
def _dx_op(
    grad_y: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, k: int,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
    nested_blocksize: int, lora_u: torch.Tensor | None, lora_A: torch.Tensor | None, lora_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Functional form of ``triton_matmul_4bit_lora_dx_out``: returns a new ``[M, k]`` tensor of grad_y's dtype."""
    out = grad_y.new_empty((grad_y.shape[0], k))
    _dx_impl(grad_y, packed, absmax, code, blocksize, k, nested_absmax, nested_code, offset, nested_blocksize,
             lora_u, lora_A, lora_mask, out)
    return out


@torch.library.triton_op("qkernels::triton_matmul_4bit_lora_dx_out", mutates_args={"out"})
def _dx_out_op(
    grad_y: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, k: int,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
    nested_blocksize: int, lora_u: torch.Tensor | None, lora_A: torch.Tensor | None, lora_mask: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """``triton_matmul_4bit_lora_dx`` into a caller's contiguous ``[M, k]`` buffer of grad_y's dtype."""
    _dx_impl(grad_y, packed, absmax, code, blocksize, k, nested_absmax, nested_code, offset, nested_blocksize,
             lora_u, lora_A, lora_mask, out)


# ---------------------------------------------------------------------------------------------- launchers
def _weight_args(packed: torch.Tensor, state: QuantState) -> tuple:
    """(bytes, absmax, code, blocksize, nested_absmax, nested_code, offset, nested_blocksize) for the ops."""
    torch._check(isinstance(state, QuantState) and state.shape is not None and len(state.shape) == 2,
                 lambda: "state must be the QuantState of a 2-D [N, K] weight")
    torch._check(packed.is_contiguous(), lambda: "packed must be contiguous (its bytes are read in order)")
    raw = packed if packed.dtype == torch.uint8 else packed.reshape(-1).view(torch.uint8)  # quant_storage views
    if state.nested:
        nested = (state.state2.absmax, state.state2.code, state.offset.reshape(1), int(state.state2.blocksize))
    else:
        nested = (None, None, None, 256)
    return raw, state.absmax, state.code, int(state.blocksize), *nested


def _rows(t: torch.Tensor | None, cols: int | None = None) -> torch.Tensor | None:
    """Flatten leading dims and make contiguous (a no-op for the usual contiguous [M, C] input)."""
    if t is None:
        return None
    return t.reshape(-1, t.shape[-1] if cols is None else cols).contiguous()


def matmul_4bit_lora_fwd(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora_t: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``y = x @ dequant(W)^T + lora_t @ lora_B^T + bias``, one store of y.

    Args:
        x: ``[..., K]`` float32/float16/bfloat16 activations.
        packed, state: the 4-bit weight, ``state.shape == [N, K]`` (uint8 or a float ``quant_storage`` view;
            plain or double-quantized scales, any blocksize, any N and K).
        lora_t: ``[..., r]`` (x's leading dims), x's dtype or float32: the LoRA down-projection already scaled,
            ``s * dropout(x) @ A^T``. ``0 < r <= MAX_LORA_RANK`` (128).
        lora_B: ``[N, r]`` (peft's ``lora_B.weight``), any float dtype: converted in-kernel to lora_t's dtype.
        bias: ``[N]``, any float dtype, added in float32.
        out: optional contiguous ``[..., N]`` tensor of x's dtype to write into.

    Returns:
        ``y [..., N]`` in x's dtype (``out`` when given). Accumulation is float32; W is rounded to x's dtype
        before the dot product (as ``dequantize_4bit(..., dtype=x.dtype)`` would), the LoRA product is taken in
        lora_t's dtype (float32 lora_t with 16-bit x: TF32, see ``_lora_precision``); float32 x uses exact float32
        products unless ``torch.backends.cuda.matmul.allow_tf32``.
    """
    raw, absmax, code, bs, n_abs, n_code, off, nbs = _weight_args(packed, state)
    n, k = state.shape
    torch._check(x.shape[-1] == k, lambda: f"x [..., {x.shape[-1]}] does not match the weight [{n}, {k}]")
    lead = x.shape[:-1]
    args = (_rows(x), raw, absmax, code, bs, n, n_abs, n_code, off, nbs, _rows(lora_t), lora_B, bias)
    if out is None:
        return torch.ops.qkernels.triton_matmul_4bit_lora_fwd(*args).reshape(*lead, n)
    torch._check(out.shape == (*lead, n) and out.is_contiguous(), lambda: f"out must be contiguous [..., {n}]")
    torch.ops.qkernels.triton_matmul_4bit_lora_fwd_out(*args, out.view(-1, n))
    return out


def matmul_4bit_lora_dx(
    grad_y: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora_u: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    lora_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused input gradient ``dx = grad_y @ dequant(W) + (lora_u @ lora_A) * lora_mask``, one store of dx.

    Args:
        grad_y: ``[..., N]`` float32/float16/bfloat16.
        packed, state: the 4-bit weight, ``state.shape == [N, K]``.
        lora_u: ``[..., r]``, grad_y's dtype or float32: ``s * grad_y @ lora_B`` (the caller computes it; it also
            feeds dA). ``0 < r <= MAX_LORA_RANK`` (128).
        lora_A: ``[r, K]`` (peft's ``lora_A.weight``), any float dtype: converted in-kernel to lora_u's dtype.
        lora_mask: optional ``[..., K]`` in grad_y's dtype, the dropout mask already divided by ``1 - p``; it
            multiplies the LoRA term only (the base path saw undropped x).
        out: optional contiguous ``[..., K]`` tensor of grad_y's dtype to write into.

    Returns:
        ``dx [..., K]`` in grad_y's dtype (``out`` when given). Same precision rules as ``matmul_4bit_lora_fwd``.
    """
    raw, absmax, code, bs, n_abs, n_code, off, nbs = _weight_args(packed, state)
    n, k = state.shape
    torch._check(grad_y.shape[-1] == n,
                 lambda: f"grad_y [..., {grad_y.shape[-1]}] does not match the weight [{n}, {k}]")
    lead = grad_y.shape[:-1]
    args = (_rows(grad_y), raw, absmax, code, bs, k, n_abs, n_code, off, nbs, _rows(lora_u), lora_A,
            _rows(lora_mask, k))
    if out is None:
        return torch.ops.qkernels.triton_matmul_4bit_lora_dx(*args).reshape(*lead, k)
    torch._check(out.shape == (*lead, k) and out.is_contiguous(), lambda: f"out must be contiguous [..., {k}]")
    torch.ops.qkernels.triton_matmul_4bit_lora_dx_out(*args, out.view(-1, k))
    return out

