"""Implementations of the ``qkernels::linear_4bit`` / ``linear_4bit_dx`` ops, and the choice between them.

``linear_4bit``:    ``y [M, N]  = x [M, K] @ W^T + lora_t [M, r] @ lora_B [N, r]^T + bias [N]``
``linear_4bit_dx``: ``dx [M, K] = g [M, N] @ W  + (lora_u [M, r] @ lora_A [r, K]) * lora_mask [M, K]``

with ``W = dequant(packed)`` of shape ``[N, K]`` (docs/format.md). Paths, chosen per call by ``_backend.resolve``
and the number of rows ``M`` (DESIGN §2):

- ``reference``: dequantize W (pure torch) to x's dtype, then torch matmuls. The definition of correct.
- ``cpu`` / ``cuda``, ``M <= gemv_max_m(x)`` (decode: 16 rows; on an AVX-512 CPU with K % 32 == 0, for bf16 x
  with AVX512-BF16 96 rows when K % 128 == 0 and 64 otherwise (16 with AMX), and 2048 for float32 / float16 x (16
  for float16 with AMX-FP16); on an AVX2 CPU 128; none on AVX2 / AVX-512 when K % 32 != 0, where the GEMV's
  scalar path lost to dequantize + matmul at every M; where the CPU kernel was measured faster than the next path):
  the native fused GEMV reads the packed weight once, decodes both scale levels per block and adds the LoRA term
  and bias per output element (csrc/cpu/gemv.cpp, csrc/cuda/gemv.cu). Used when this build has it.
- ``cpu`` / ``cuda``, larger M (training): one native dequantize into a reused per-thread buffer (no allocation,
  no page faults: a fresh 32 MiB tensor costs ~8 ms of faults on the CPU machine), then the BLAS matmul, with
  the bias folded into ``addmm`` and the LoRA product accumulated into the same output (``addmm_``). On a CPU
  without AMX-FP16, float16 has no fast GEMM (torch's fp16 matmul ran 2.6x slower than float32 at M = 128 on the
  Zen 4 machine, its ``g @ W`` ~200x), nor bfloat16 without AVX512-BF16 / AMX: there the weight is dequantized to
  float32 and the matmuls run in float32, the result rounded once to x's dtype (at least as accurate).
- ``triton``: the fused dequant-in-the-K-loop kernels of ``qkernels.triton_kernels`` (GPU, or the CPU
  interpreter with ``TRITON_INTERPRET=1``). Forced with ``backend="triton"``; the default on CUDA stays
  dequantize + cuBLAS until the GPU benchmark shows the fused kernel ahead at a shape.
"""

from __future__ import annotations

import functools
import math
import threading

import torch

from . import _backend, _native, _ops
from .quant_state import QuantState

__all__ = ["GEMV_MAX_M", "gemv_max_m", "linear_4bit_impl", "linear_4bit_dx_impl", "clear_workspace", "workspace_bytes"]

# Rows up to which the fused GEMV beats dequantize + matmul: the GEMV streams the packed weight once per call
# and keeps up to 16 rows of x in registers / shared memory; past that, a GEMM's reuse wins (DESIGN §2). The CUDA
# kernel's limit and every CPU path's floor; the CPU kernel reports a larger one where it measured faster
# (gemv_max_m).
GEMV_MAX_M = 16

_local = threading.local()


def _workspace(device: torch.device, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A reused buffer for a dequantized weight: one per (thread, device, CUDA stream, dtype, element count), viewed
    as ``shape`` (a weight ``[N, K]``, its transpose ``[K, N]`` and a ``[K, N]`` layer's weight share one).

    Safe because the buffer only lives inside one op call, and ops on one stream run in order. The buffers stay
    allocated (the point is to avoid re-faulting them); ``clear_workspace()`` frees them.
    """
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    numel = math.prod(shape)
    key = (device, stream, dtype, numel)
    buf = cache.get(key)
    if buf is None:
        buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf.view(shape)


def clear_workspace() -> None:
    """Free this thread's reused dequantization buffers (they are re-created on the next large-M call)."""
    getattr(_local, "buffers", {}).clear()


def workspace_bytes() -> int:
    """Bytes held by this thread's reused dequantization buffers."""
    return sum(b.numel() * b.element_size() for b in getattr(_local, "buffers", {}).values())


def _state(scales, code: torch.Tensor, blocksize: int, shape: list[int], dtype: torch.dtype) -> QuantState:
    """A QuantState view of the op's flat arguments (for the kernels that take one). The kernels read ``code``,
    never ``quant_type``, so the label is only there to satisfy ``QuantState.validate``."""
    # The Triton kernels read every tensor through its base pointer: dense copies of strided views (a few bytes each).
    absmax, nested_absmax, nested_code, offset, nested_blocksize = (
        t.contiguous() if isinstance(t, torch.Tensor) else t for t in scales)
    code = code.contiguous()
    state2 = None
    if nested_absmax is not None:
        state2 = QuantState(absmax=nested_absmax, code=nested_code, blocksize=nested_blocksize, dtype=torch.float32)
    return QuantState(absmax=absmax, shape=shape, code=code, blocksize=blocksize, quant_type="nf4", dtype=dtype,
                      offset=offset, state2=state2)


def _dequantize(packed, scales, code, blocksize, shape, dtype, impl: str) -> torch.Tensor:
    absmax, nested_absmax, nested_code, offset, nested_blocksize = scales
    if impl == "reference":
        return _ops.dequantize_4bit_impl(packed, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code,
                                         offset, nested_blocksize, "reference")
    out = _workspace(packed.device, dtype, shape)
    if impl == "cpu":  # every caller validated the state against packed (matmul_4bit_lora, or the ops' checks)
        nested = None if nested_absmax is None else (absmax, nested_absmax, nested_code, offset, nested_blocksize)
        return _native.dequantize_4bit_cpu_into(packed, absmax, code, blocksize, out, nested)
    return _ops.dequantize_4bit_impl(packed, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, offset,
                                     nested_blocksize, impl, out=out)


# The CPU backward's g @ W with W dequantized transposed, [K, N] (qkernels._native.dequantize_4bit_cpu_t_into), and
# multiplied as g @ Wt.t(): torch's CPU bf16 matmul is faster with the reduction dimension contiguous in its second
# operand, as in the forward's x @ W.t(). 512 rows, alternating in one process on the 2-core Zen 4: the matmul alone
# 44.6 -> 41.2 ms (4096 x 4096), 121 -> 114 ms (11008 x 4096); with the dequantize and the caches flushed before each
# call (as inside a network) 44.0 -> 42.6, 120.5 -> 119.0, 116.7 -> 115.5 ms (4096 x 11008): ~1 %, the transposing
# dequantize costing ~0.7 ms more than the row-major one; a whole 4096 x 4096 layer step 89.2 -> 88.2 ms. The same
# bits on this machine (not promised: the matmul's summation order may differ). Where the transposing kernel is not
# vectorized (not AVX-512, not bfloat16, K % 128 != 0, ...) the row-major layout stays. False: always row-major.
# Re-measured (ninth session, layer steps alternating the two layouts): 256 rows of 1024-2816 wide layers 2-9 % slower
# in one run, level in another; 512-1024 rows within +-1.5 %; the bench_block step level (58.0 vs 57.7 ms). No
# measured win either way at these sizes; kept for the large-layer gain above.
# Fourteenth session: the transposing kernel now runs ~1.1-1.5x the row-major one (was 2.3-3.8x: see
# csrc/cpu/dequantize_t.cpp), and the matmuls alone, alternating with the caches flushed, show where the layout pays:
# by N, the reduction dimension of g @ W: N 1024 0.97-1.02x (M 256-1024, K 1024-4096), N 1536 1.03x, 2048 1.04-1.10x,
# 2816 1.05x, 4096 1.08-1.10x, 11008 1.15x. Below CPU_DX_TRANSPOSED_MIN_N the row-major layout stays (its dequantize is
# the cheaper one and the matmul no slower).
# Fifteenth session: whole layer steps (forward + backward, r 16, caches flushed, the two layouts alternating, 55 steps
# each), which count the transposing dequantize's extra cost too, showed that K matters as well: with K 1024 the
# transposed layout lost at M 256 for every N tried (2048: 6 %, 2816: 7 % / 7 % in two runs, 4096: 5 % / 6 %; 11008
# level), at M 512-1024 level; with K >= 2048 it won (2048 x 4096: 1.4-4.5 %, 2048 x 5632: 3 %, 3072 x 8192: 3.5 %,
# 4096 x 1536: 2 %, 4096 x 4096: 2-5.5 %, 4096 x 11008: 4-5 %, 4096 x 14336: 7 %; K 1536 x N 4096 level; 2048 x 2048
# level in one run, 4 % slower in another). So it also needs K >= CPU_DX_TRANSPOSED_MIN_K. In the bench_block step
# (gate / up, K 1024) alternating: 27.63 -> 27.44 ms.
CPU_DX_TRANSPOSED = True
CPU_DX_TRANSPOSED_MIN_N = 1536
CPU_DX_TRANSPOSED_MIN_K = 2048

# The CPU backward's dX = g @ W where it multiplies in float32 (float32 g; float16 / bfloat16 g on a CPU without a fast
# GEMM in them): the fused kernel (csrc/cpu/gemv_simd.cpp, dx_strips: W decoded per 64-column strip, float32 FMAs,
# no [N, K] buffer) where it applies (AVX-512 or AVX2, K % 64 == 0), else dequantize + matmul. Thirteenth session,
# 4096 x 4096, float32: M 128 9.4 ms, M 512 35.6 ms (AVX2: 18.5 / 69.5) against torch's float32 matmul alone 23.6 /
# 81.3 ms (~0.2 TFLOP/s here). False: always dequantize + matmul.
CPU_DX_FUSED = True


def _dequantize_t(packed, scales, code, blocksize, N: int, K: int, dtype) -> torch.Tensor | None:
    """W [N, K] dequantized into the workspace as its transpose [K, N], where the CPU kernel is vectorized for it and N
    and K are large enough for the layout to pay (CPU_DX_TRANSPOSED_MIN_N / _MIN_K); else None (the caller dequantizes
    row-major)."""
    if not CPU_DX_TRANSPOSED or N < CPU_DX_TRANSPOSED_MIN_N or K < CPU_DX_TRANSPOSED_MIN_K:
        return None
    probe = getattr(_native._C, "dequantize_4bit_t_cpu_vectorized", None)
    if probe is None or not probe(N, K, blocksize, _native._DTYPE_TO_NATIVE[dtype]):
        return None
    out = _workspace(packed.device, dtype, [K, N])
    return _native.dequantize_4bit_cpu_t_into(packed, scales, code, blocksize, N, K, out)


def _matmul_dtype(t: torch.Tensor, impl: str) -> torch.dtype:
    """The dtype the large-M native path multiplies in: t's, except on a CPU without a fast GEMM for it (float32).

    float16 needs AMX-FP16, bfloat16 AVX512-BF16 (or AMX); without them torch's CPU matmul in that dtype is slower than
    float32 and the ``g @ W`` of the backward pathologically so (4096 x 4096, 128 rows on the Zen 4 machine: float16
    14.5 s; bfloat16 with oneDNN held to AVX2 17.9 s; float32 0.07-0.11 s)."""
    if t.device.type != "cpu" or impl != "cpu":
        return t.dtype
    return cpu_matmul_dtype(t.dtype)


def cpu_matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype``, or float32 where this CPU has no fast torch GEMM in it (float16 without AMX-FP16, bfloat16
    without AVX512-BF16 / AMX). Shared by the large-M path here and the LoRA products of ``qkernels.lora``."""
    if (dtype == torch.float16 and not _cpu_fp16_gemm()) or (dtype == torch.bfloat16 and not _cpu_bf16_gemm()):
        return torch.float32
    return dtype


@functools.cache
def _cpu_probe(name: str) -> bool:
    probe = getattr(getattr(torch, "cpu", None), name, None)
    return bool(probe()) if callable(probe) else False


def _cpu_fp16_gemm() -> bool:
    """Whether torch's CPU matmul has a fast float16 path here (AMX-FP16)."""
    return _cpu_probe("_is_amx_fp16_supported")


def _cpu_bf16_gemm() -> bool:
    """Whether torch's CPU matmul has a fast bfloat16 path here (AVX512-BF16 or AMX)."""
    return _cpu_probe("_is_avx512_bf16_supported") or _cpu_probe("_is_amx_tile_supported")


def gemv_max_m(x: torch.Tensor) -> int:
    """Rows up to which the fused GEMV runs for ``x [M, K]`` (where this build has it): GEMV_MAX_M, or on the CPU
    what the kernel reports for x's dtype and K on the active ISA path (``_C.gemv_cpu_max_m``; 0 where dequantize +
    matmul wins at every M: K % 32 != 0 on AVX2 / AVX-512, whose GEMV would take the scalar path)."""
    if x.device.type == "cpu":
        probe = getattr(_native._C, "gemv_cpu_max_m", None)
        limit = GEMV_MAX_M if probe is None else probe(_native._DTYPE_TO_NATIVE[x.dtype], x.shape[-1])
        if (x.dtype == torch.bfloat16 and _cpu_probe("_is_amx_tile_supported")) or (
                x.dtype == torch.float16 and _cpu_fp16_gemm()):
            # The kernel's limits were measured against AVX512-BF16 / float32 matmuls; torch's AMX bfloat16 /
            # float16 matmuls run several times faster, so past GEMV_MAX_M rows the dequantize + matmul is expected
            # to win there (not measured: no AMX machine). Up to GEMV_MAX_M the GEMV's single pass over the packed
            # weight costs about what the dequantize alone does, so it keeps those rows.
            limit = min(limit, GEMV_MAX_M)
        return limit
    return GEMV_MAX_M


def _has_gemv(device: torch.device) -> bool:
    return "gemv_4bit_lora" in _backend.native_ops(device)


def linear_4bit_impl(x, packed, scales, code, blocksize, N, lora_t, lora_B, bias, backend: str | None):
    """Body of ``qkernels::linear_4bit`` with an explicit backend (``None``: the fastest available)."""
    impl = _backend.resolve("linear_4bit", x.device, backend)
    return linear_4bit_resolved(x, packed, scales, code, blocksize, N, lora_t, lora_B, bias, impl)


def linear_4bit_resolved(x, packed, scales, code, blocksize, N, lora_t, lora_B, bias, impl: str, lora_A=None,
                         lora_scale: float = 1.0):
    """``linear_4bit_impl`` with the backend already resolved (``_backend.resolve("linear_4bit", ...)``'s answer),
    for ``qkernels.lora``, which resolves it once per call for the LoRA products and the matmul.

    On the native CPU path ``lora_A`` (with ``lora_t`` None) asks for the LoRA down-projection here,
    ``lora_t = lora_scale * x @ lora_A^T`` by the CPU LoRA kernel: inside the GEMV's binding where the GEMV runs
    (one call per decode step instead of two), else just before the matmul."""
    M, K = x.shape
    gemv = impl in ("cpu", "cuda") and _has_gemv(x.device) and M <= gemv_max_m(x)
    if lora_A is not None and not (impl == "cpu" and gemv and lora_A.dtype in (torch.float32, torch.bfloat16)
                                   and lora_A.is_contiguous()):
        lora_t = _native.lora_down_raw(x, _native._DTYPE_TO_NATIVE[x.dtype], 0, lora_A, lora_scale, 1.0)
        lora_A = None
    if M == 0:
        return x.new_empty((0, N))
    if impl == "triton":
        from . import triton_kernels

        state = _state(scales, code, blocksize, [N, K], x.dtype)
        fused = _triton_rank_ok(lora_t, triton_kernels)
        y = triton_kernels.matmul_4bit_lora_fwd(x, packed, state, lora_t=_dense(lora_t if fused else None),
                                                lora_B=_dense(lora_B if fused else None), bias=_dense(bias))
        if lora_t is not None and not fused:
            y.addmm_(lora_t.to(x.dtype), lora_B.to(x.dtype).t())
        return y
    if gemv:
        # The op's checks (or matmul_4bit_lora's) have run and packed is uint8: call the kernel without re-validating
        # (one check per layer boundary; a decode step is ~0.3 ms, gemv_4bit_lora_native's checks ~30 us).
        absmax, nested_absmax, nested_code, offset, nested_blocksize = scales
        t = lora_t if lora_t is None or lora_t.dtype == torch.float32 else lora_t.to(torch.float32)
        return _native.gemv_4bit_lora_raw(x.contiguous(), packed, absmax, code, blocksize, N, nested_absmax,
                                          nested_code, offset, nested_blocksize, t, lora_B, bias, lora_A=lora_A,
                                          lora_scale=lora_scale)
    dt = _matmul_dtype(x, impl)
    W = _dequantize(packed, scales, code, blocksize, [N, K], dt, impl)
    xc = _as(x, dt)
    if bias is not None:
        y = torch.addmm(bias.to(dt), xc, W.t())
    else:
        y = xc @ W.t()
    if lora_t is not None:
        if _cpu_lora(y, impl):  # float32 sums, one rounding: faster than addmm_ and more accurate (no half casts)
            # y: the matmul's fresh dense output; B^T: a view of lora_B, read without a copy
            _native.lora_up_add_raw(y, _native._DTYPE_TO_NATIVE[y.dtype], _dense_f32(lora_t), lora_B.t(), 0, 1.0)
        else:
            y.addmm_(lora_t.to(dt), lora_B.to(dt).t())
    return _as(y, x.dtype)


def linear_4bit_dx_impl(g, packed, scales, code, blocksize, K, lora_u, lora_A, lora_mask, backend: str | None,
                        lora_mask_scale: float = 1.0):
    """Body of ``qkernels::linear_4bit_dx`` with an explicit backend (``None``: the fastest available). A bool
    ``lora_mask`` is scaled by ``lora_mask_scale``."""
    impl = _backend.resolve("linear_4bit_dx", g.device, backend)
    return linear_4bit_dx_resolved(g, packed, scales, code, blocksize, K, lora_u, lora_A, lora_mask, impl,
                                   lora_mask_scale)


def linear_4bit_dx_resolved(g, packed, scales, code, blocksize, K, lora_u, lora_A, lora_mask, impl: str,
                            lora_mask_scale: float = 1.0):
    """``linear_4bit_dx_impl`` with the backend already resolved (see ``linear_4bit_resolved``)."""
    M, N = g.shape
    if M == 0:
        return g.new_empty((0, K))
    if impl == "triton":
        from . import triton_kernels

        state = _state(scales, code, blocksize, [N, K], g.dtype)
        if lora_mask is not None and lora_mask.dtype == torch.bool:
            lora_mask = lora_mask.to(g.dtype) * lora_mask_scale
        fused = _triton_rank_ok(lora_u, triton_kernels)
        dx = triton_kernels.matmul_4bit_lora_dx(g, packed, state, lora_u=_dense(lora_u if fused else None),
                                                lora_A=_dense(lora_A if fused else None),
                                                lora_mask=_dense(lora_mask if fused else None))
        if lora_u is not None and not fused:
            _add_lora_dx(dx, lora_u, lora_A, lora_mask)
        return dx
    dt = _matmul_dtype(g, impl)
    if impl == "cpu" and dt == torch.float32 and CPU_DX_FUSED:
        dx = _native.gemm_dx_raw(g.contiguous(), packed, scales, code, blocksize, K)
        if dx is not None:  # the fused kernel ran (see CPU_DX_FUSED)
            if lora_u is not None:
                _add_lora_dx(dx, lora_u, lora_A, lora_mask, impl, lora_mask_scale)
            return _as(dx, g.dtype)
    Wt = _dequantize_t(packed, scales, code, blocksize, N, K, dt) if impl == "cpu" else None
    if Wt is not None:
        dx = _as(g, dt) @ Wt.t()  # see CPU_DX_TRANSPOSED
    else:
        W = _dequantize(packed, scales, code, blocksize, [N, K], dt, impl)
        dx = _as(g, dt) @ W
    if lora_u is not None:
        _add_lora_dx(dx, lora_u, lora_A, lora_mask, impl, lora_mask_scale)
    return _as(dx, g.dtype)


def _cpu_lora(y: torch.Tensor, impl: str) -> bool:
    """Whether the CPU LoRA kernels (csrc/cpu/lora.h) add the LoRA term into ``y``: the native CPU path with a build
    that has them (y is a fresh contiguous matmul output)."""
    return impl == "cpu" and _ops.native_lora(y.device)


def _add_lora_dx(dx, lora_u, lora_A, lora_mask, impl: str = "reference", lora_mask_scale: float = 1.0) -> None:
    """``dx += (lora_u @ lora_A) * lora_mask`` (a bool mask times ``lora_mask_scale``): float32 sums and one rounding
    on the native CPU path (no mask or a bool one), else in dx's dtype."""
    boolean = lora_mask is not None and lora_mask.dtype == torch.bool
    if (lora_mask is None or boolean) and _cpu_lora(dx, impl):
        # The dense mask is held in a name until the kernel has read it: a strided mask's contiguous() copy, freed
        # right after data_ptr() was taken, was overwritten by the next allocation (the float32 copy of a float16
        # lora_A, same byte count) and the kernel read garbage. Its shape: checked by the callers.
        mask = lora_mask.contiguous() if boolean else None
        _native.lora_up_add_raw(dx, _native._DTYPE_TO_NATIVE[dx.dtype], _dense_f32(lora_u), lora_A,
                                0 if mask is None else mask.data_ptr(), lora_mask_scale)
        return
    lora = lora_u.to(dx.dtype) @ lora_A.to(dx.dtype)
    if lora_mask is not None:
        lora.mul_(lora_mask.to(dx.dtype) * lora_mask_scale if boolean else lora_mask.to(dx.dtype))
    dx.add_(lora)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the dispatch (~1 us) when it already is: a training step and a decode step make
    several such calls (also qkernels.lora's ``_to``)."""
    return t if t.dtype == dtype else t.to(dtype)


def _dense_f32(t: torch.Tensor) -> torch.Tensor:
    """t as a dense float32 tensor (itself when it is one)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _triton_rank_ok(lora_left: torch.Tensor | None, triton_kernels) -> bool:
    """Whether the Triton epilogue takes this LoRA term: its padded rank lives in registers and shared memory,
    0 < r <= ``triton_kernels.MAX_LORA_RANK`` (128). Other ranks (r = 0 tensors, or larger) are added by a separate
    matmul into the kernel's output."""
    return lora_left is not None and 0 < lora_left.shape[1] <= triton_kernels.MAX_LORA_RANK

