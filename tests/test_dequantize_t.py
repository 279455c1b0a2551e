"""The CPU transposing dequantize (``_native.dequantize_4bit_cpu_t_into``, ``_C.dequantize_4bit_t_cpu``) and the
backward's use of it (``qkernels._linear.CPU_DX_TRANSPOSED``).

Oracle: the row-major CPU dequantize of the same weight (itself bit-identical to the reference, test_native), so the
transposed buffer must equal its transpose bit for bit, on the vectorized path and on the portable one, for blocks
whose scales take the vcvtneps2bf16 conversion and for blocks that must not (tiny, zero, NaN, infinite scales).
"""

from __future__ import annotations

import pytest
import torch

import qkernels
from qkernels import _linear, _native

pytestmark = pytest.mark.skipif(
    _native._C is None or not hasattr(_native._C, "dequantize_4bit_t_cpu"),
    reason=f"qkernels._C (with dequantize_4bit_t_cpu) is not available: {_native.NATIVE_ERROR or 'stale build'}",
)


def _scales(st):
    if st.nested:
        return (st.absmax, st.state2.absmax, st.state2.code, st.offset, st.state2.blocksize)
    return (st.absmax, None, None, 0.0, 256)


def _both(packed, st, N, K, bs, dtype):
    """(row-major dequantize [N, K], transposed dequantize [K, N]) on the CPU, into fresh buffers."""
    scales = _scales(st)
    rm = torch.empty(N, K, dtype=dtype)
    nested = None if not st.nested else (st.absmax, *scales[1:])
    _native.dequantize_4bit_cpu_into(packed.view(torch.uint8), st.absmax, st.code, bs, rm, nested)
    t = torch.full((K, N), float("nan"), dtype=dtype)
    _native.dequantize_4bit_cpu_t_into(packed.view(torch.uint8), scales, st.code, bs, N, K, t)
    return rm, t


def _isas() -> list[str]:
    return list(_native._C.cpu_isa_available())


# (N, K, blocksize): whole 32-row tiles and a remainder, 128-column chunks with 4 / 2 / 1 / a fraction of a block,
# K 1152 (nine chunks), and shapes off the vectorized path (K % 128 != 0, blocks spanning rows, fewer than 32 rows).
# N >= 128: passes of four tiles (the kernel's kGroup) then single tiles and rows (200: one pass, two tiles, 8 rows;
# 288: two passes and a tile; 1024: a power of two, every pass whole).
SHAPES = [(32, 128, 64), (67, 256, 32), (96, 1152, 64), (40, 512, 128), (33, 256, 256), (64, 384, 64),
          (37, 96, 32), (40, 128, 4096), (31, 256, 64), (128, 256, 64), (200, 384, 32), (288, 256, 128),
          (1024, 128, 64)]


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("N,K,bs", SHAPES, ids=[f"{n}x{k}-bs{b}" for n, k, b in SHAPES])
@pytest.mark.parametrize("nested,qt", [(True, "nf4"), (False, "fp4")], ids=["nf4-dq", "fp4-plain"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_transpose_of_the_row_major_dequantize_bit_for_bit(monkeypatch, isa, N, K, bs, nested, qt, dtype):
    monkeypatch.setenv("QKERNELS_CPU_ISA", isa)
    g = torch.Generator().manual_seed(N * 1000 + K + bs)
    W = torch.randn(N, K, generator=g)
    packed, st = qkernels.quantize_4bit(W, blocksize=bs, quant_type=qt, double_quant=nested)
    rm, t = _both(packed, st, N, K, bs, dtype)
    assert torch.equal(t, rm.t()), f"max diff {(t.float() - rm.t().float()).abs().max().item()}"
    fast = _native._C.dequantize_4bit_t_cpu_vectorized(N, K, bs, _native._DTYPE_TO_NATIVE[dtype])
    want = isa == "avx512" and dtype == torch.bfloat16 and K % 128 == 0 and K % bs == 0 and N >= 32
    assert fast == want


def test_streamed_output_bit_for_bit():
    """An output of 16 MiB and more takes the streaming (non-temporal) stores: still the row-major bits, with passes of
    four tiles and a single tile after them (N 4128 = 129 tiles)."""
    N, K, bs = 4128, 2048, 64
    assert N * K * 2 >= 16 << 20
    g = torch.Generator().manual_seed(11)
    packed, st = qkernels.quantize_4bit(torch.randn(N, K, generator=g), blocksize=bs, quant_type="nf4",
                                        double_quant=True)
    rm, t = _both(packed, st, N, K, bs, torch.bfloat16)
    assert torch.equal(t, rm.t())


@pytest.mark.parametrize("isa", _isas())
def test_scales_that_need_the_exact_rounding(monkeypatch, isa):
    """Blocks whose products are subnormal (a tiny absmax), zero, NaN or infinite take the integer rounding on the
    vectorized path (vcvtneps2bf16 would flush or re-encode them): still the row-major bits, each block, including a
    subnormal-producing codebook entry."""
    monkeypatch.setenv("QKERNELS_CPU_ISA", isa)
    N, K, bs = 64, 256, 64
    g = torch.Generator().manual_seed(5)
    packed, st = qkernels.quantize_4bit(torch.randn(N, K, generator=g), blocksize=bs, quant_type="nf4",
                                        double_quant=False)
    absmax = st.absmax.clone()
    absmax[3] = 1e-39  # subnormal products
    absmax[10] = 3e-38  # products near the normal range's edge
    absmax[17] = 0.0
    absmax[20] = -0.0
    absmax[33] = float("nan")
    absmax[40] = float("inf")
    absmax[47] = 3.0e38  # products overflow for |code| > 1.13
    st.absmax = absmax
    for code in (st.code, st.code * torch.tensor([1e-30] + [1.0] * 15)):  # a code entry that makes every product tiny
        st.code = code
        rm, t = _both(packed, st, N, K, bs, torch.bfloat16)
        assert torch.equal(t.view(torch.int16), rm.t().contiguous().view(torch.int16))  # NaN payloads too


def test_binding_refuses_bad_arguments():
    C = _native._C
    p = torch.zeros(64, dtype=torch.uint8)
    a = torch.ones(2)
    code = torch.zeros(16)
    out = torch.empty(8, 16, dtype=torch.bfloat16)
    args = dict(packed_ptr=p.data_ptr(), absmax_ptr=a.data_ptr(), absmax_q_ptr=0, nested_absmax_ptr=0,
                nested_code_ptr=0, offset=0.0, nested_blocksize=256, code_ptr=code.data_ptr(), N=16, K=8,
                blocksize=64, out_ptr=out.data_ptr(), out_dtype=_native._DTYPE_TO_NATIVE[torch.bfloat16])
    for over, match in ((dict(N=0), "'N'"), (dict(packed_ptr=0), "packed_ptr"), (dict(blocksize=48), "blocksize"),
                        (dict(out_dtype=_native._DTYPE_TO_NATIVE[torch.float16]), "out_dtype"),
                        (dict(absmax_ptr=0), "absmax_ptr"), (dict(absmax_ptr=0, absmax_q_ptr=a.data_ptr()),
                                                             "nested_absmax_ptr")):
        with pytest.raises(ValueError, match=match):
            C.dequantize_4bit_t_cpu(**{**args, **over})


@pytest.mark.parametrize("M,N,K", [(100, 96, 256), (130, 64, 1152)])
def test_backward_dx_the_same_with_either_layout(monkeypatch, M, N, K):
    """matmul_4bit_lora's CPU backward with the transposed weight (the default where the kernel is vectorized) and
    with the row-major one: dX within the float64 reference's tolerance either way (twice torch's bf16 error plus an
    ulp of the largest value), dA and dB the same bits."""
    if not _native._C.dequantize_4bit_t_cpu_vectorized(N, K, 64, _native._DTYPE_TO_NATIVE[torch.bfloat16]):
        pytest.skip("the transposing dequantize is not vectorized on this CPU (no AVX-512): the backward keeps the "
                    "row-major layout, which every other CPU test covers")
    g = torch.Generator().manual_seed(M + N)
    W = torch.randn(N, K, generator=g) * 0.05
    packed, st = qkernels.quantize_4bit(W.to(torch.bfloat16), 64, "nf4", double_quant=True)
    x0 = torch.randn(M, K, generator=g).to(torch.bfloat16)
    A0 = torch.randn(8, K, generator=g) * 0.1
    B0 = torch.randn(N, 8, generator=g) * 0.1
    dy = torch.randn(M, N, generator=g).to(torch.bfloat16)
    monkeypatch.setattr(_linear, "gemv_max_m", lambda x: _linear.GEMV_MAX_M)  # the large-M path on every CPU
    assert M > _linear.gemv_max_m(x0)

    monkeypatch.setattr(_linear, "CPU_DX_TRANSPOSED_MIN_N", 0)  # these small layers take it too
    monkeypatch.setattr(_linear, "CPU_DX_TRANSPOSED_MIN_K", 0)

    def grads(transposed: bool):
        monkeypatch.setattr(_linear, "CPU_DX_TRANSPOSED", transposed)
        x, A, B = (t.clone().requires_grad_() for t in (x0, A0, B0))
        qkernels.matmul_4bit_lora(x, packed, st, A, B, 2.0).backward(dy)
        return x.grad, A.grad, B.grad

    calls = []
    real = _native.dequantize_4bit_cpu_t_into
    monkeypatch.setattr(_native, "dequantize_4bit_cpu_t_into", lambda *a: calls.append(1) or real(*a))
    t_grads = grads(True)
    assert calls, "the transposed layout was not used"
    r_grads = grads(False)
    assert len(calls) == 1
    Wd = qkernels.dequantize_4bit(packed, st).double()
    dx64 = dy.double() @ Wd + (2.0 * (dy.double() @ B0.double())) @ A0.double()
    dx_torch = (dy @ Wd.to(torch.bfloat16)).double()
    tol = 2 * (dx_torch - dx64).abs().max().item() + 2.0**-8 * dx64.abs().max().item()
    for name, a, b in zip(("dA", "dB"), t_grads[1:], r_grads[1:], strict=True):  # not from W: the same either way
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs between the layouts")
    for dx in (t_grads[0], r_grads[0]):  # the matmul's summation order may differ between the layouts
        assert (dx.double() - dx64).abs().max().item() <= tol


@pytest.mark.parametrize("N,K", [(1024, 2048), (2048, 1024), (2048, 2048)])
def test_backward_layout_follows_the_measured_shapes(monkeypatch, N, K):
    """The backward takes the transposed layout only where a layer's step was measured faster with it (N, the
    reduction dimension of g @ W, at least CPU_DX_TRANSPOSED_MIN_N, and K at least CPU_DX_TRANSPOSED_MIN_K); elsewhere
    the row-major dequantize, the cheaper one."""
    if not _native._C.dequantize_4bit_t_cpu_vectorized(N, K, 64, _native._DTYPE_TO_NATIVE[torch.bfloat16]):
        pytest.skip("the transposing dequantize is not vectorized on this CPU (no AVX-512): the backward keeps the "
                    "row-major layout at every N")
    monkeypatch.setattr(_linear, "gemv_max_m", lambda x: _linear.GEMV_MAX_M)  # the large-M path on every CPU
    g = torch.Generator().manual_seed(N)
    packed, st = qkernels.quantize_4bit(torch.randn(N, K, generator=g).to(torch.bfloat16), 64, "nf4")
    calls = []
    real = _native.dequantize_4bit_cpu_t_into
    monkeypatch.setattr(_native, "dequantize_4bit_cpu_t_into", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(64, K, generator=g).to(torch.bfloat16).requires_grad_()
    qkernels.matmul_4bit_lora(x, packed, st, None, None, 1.0).sum().backward()
    assert bool(calls) == (N >= _linear.CPU_DX_TRANSPOSED_MIN_N and K >= _linear.CPU_DX_TRANSPOSED_MIN_K)
    assert bool(calls) == ((N, K) == (2048, 2048))  # the thresholds are the measured ones (1536, 2048)
    assert x.grad is not None
