"""GPU tests of the CUDA kernels in csrc/cuda: fused GEMV + LoRA, nested-scale dequantize, 8-bit blockwise.

All GPU cases are ``@pytest.mark.cuda`` (skipped with a reason by tests/conftest.py when there is no GPU); the few
binding tests at the end run anywhere the CUDA part is compiled (they check arguments before any launch).

Oracles:
- dequantize / blockwise: bit identity with ``qkernels.reference`` (computed on the CPU from the same bytes).
- GEMV: a float64 oracle ``x64 @ W64.T + t64 @ B64.T + bias64`` with ``W64 = reference.dequantize_4bit(..., float64)``
  (the exact float32 weights widened).  Tolerance basis (DESIGN §3, STYLE 12): the kernel's max error must be at
  most 2x the max error of plain PyTorch doing the same computation in the same dtype (W dequantized to that dtype,
  ``x @ W.T + t @ B.T + bias``), plus one unit in the last place of the dtype at the largest |y| (a floor: at tiny K
  torch's error can be ~0 while both round the output once).
- bitsandbytes' CUDA kernels where bitsandbytes imports with CUDA support (skipped with the reason otherwise).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import qkernels
from qkernels import _backend, _native, reference
from qkernels.codebooks import dynamic_map, midpoints

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
NATIVE_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _needs(name: str) -> None:
    if _native._C is None:
        pytest.skip(f"qkernels._C is missing ({_native.NATIVE_ERROR})")
    if not hasattr(_native._C, name):
        pytest.skip(f"qkernels._C has no {name} (built without the CUDA part: no nvcc or QKERNELS_CUDA=0)")


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _quantize_cpu(W: torch.Tensor, blocksize: int, quant_type: str, nested: bool):
    """Quantize on the CPU (so the GEMV tests do not depend on the CUDA quantize kernels), move to CUDA."""
    packed, qs = qkernels.quantize_4bit(W.cpu(), blocksize=blocksize, quant_type=quant_type, double_quant=nested)
    return packed.cuda(), qs.to("cuda")


def _decoded_scales(qs) -> torch.Tensor:
    if qs.nested:
        return reference.decode_nested_absmax(qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset,
                                              qs.state2.blocksize)
    return qs.absmax


# ---------------------------------------------------------------------------------------------------------------------
# fused GEMV + LoRA
# ---------------------------------------------------------------------------------------------------------------------
def gemv_cuda(x, packed, qs, t=None, B=None, bias=None, out=None):
    """Call _C.gemv_4bit_lora_cuda on CUDA tensors (x [M, K], quantized W [N, K]); returns out [M, N] of x.dtype."""
    M, K = x.shape
    N = qs.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if qs.nested:
        scales = (0, qs.absmax.data_ptr(), qs.state2.absmax.data_ptr(), qs.state2.code.data_ptr(),
                  float(qs.offset.item()), qs.state2.blocksize)
    else:
        scales = (qs.absmax.data_ptr(), 0, 0, 0, 0.0, 256)
    r = 0 if t is None else t.shape[1]
    _native._C.gemv_4bit_lora_cuda(
        x.data_ptr(), NATIVE_DT[x.dtype], M, K, packed.data_ptr(), *scales, qs.code.data_ptr(), qs.blocksize, N,
        0 if t is None else t.data_ptr(), 0 if B is None else B.data_ptr(), r,
        0 if bias is None else bias.data_ptr(), out.data_ptr(), _stream())
    return out


def _weight64(packed, qs) -> torch.Tensor:
    """The float32 weights of the reference dequantization, widened to float64: [N, K]."""
    N, K = qs.shape
    return reference.dequantize_4bit(packed, _decoded_scales(qs), qs.code, qs.blocksize, N * K,
                                     torch.float64).view(N, K)


def _gemv_check(x, packed, qs, t, B, bias, out, W64=None):
    """Assert |out - fp64| <= 2 * |torch_same_dtype - fp64| + ulp(dtype) * max|y| (see the module docstring)."""
    N, K = qs.shape
    if W64 is None:
        W64 = _weight64(packed, qs)
    y64 = x.double() @ W64.t()
    dt = x.dtype
    Wd = W64.to(torch.float32).to(dt).view(N, K)  # W64 holds the float32 weights exactly
    y_t = x @ Wd.t()
    if t is not None:
        y64 = y64 + t.double() @ B.double().t()
        y_t = y_t + t.to(dt) @ B.to(dt).t()
    if bias is not None:
        y64 = y64 + bias.double()
        y_t = y_t + bias.to(dt)
    err = (out.double() - y64).abs().max().item()
    err_torch = (y_t.double() - y64).abs().max().item()
    ulp = torch.finfo(dt).eps * y64.abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= 2 * err_torch + ulp, f"kernel error {err:.3g} > 2 x torch {err_torch:.3g} + ulp {ulp:.3g}"


_GEMV_SHAPES = [(3, 63), (65, 96), (113, 257), (64, 256), (4096, 4096)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("N,K", _GEMV_SHAPES, ids=[f"{n}x{k}" for n, k in _GEMV_SHAPES])
@pytest.mark.parametrize("M", [1, 2, 3, 16, 17])
def test_gemv_vs_fp64(M, N, K, blocksize, dtype):
    """Every (nested, nf4/fp4, r in {0, 1, 8}, bias or not) combination per parametrized case (one weight each)."""
    _needs("gemv_4bit_lora_cuda")
    g = torch.Generator().manual_seed(1000 * M + N + K + blocksize)
    W = torch.randn(N, K, generator=g)
    x = torch.randn(M, K, generator=g).to(dtype).cuda()
    for nested, qt in itertools.product((False, True), ("nf4", "fp4")):
        packed, qs = _quantize_cpu(W, blocksize, qt, nested)
        W64 = _weight64(packed, qs)
        for r, with_bias in itertools.product((0, 1, 8), (False, True)):
            t = (torch.randn(M, r, generator=g) * 0.5).cuda() if r else None
            B = torch.randn(N, r, generator=g).cuda() if r else None
            bias = torch.randn(N, generator=g).cuda() if with_bias else None
            out = gemv_cuda(x, packed, qs, t, B, bias)
            torch.cuda.synchronize()
            _gemv_check(x, packed, qs, t, B, bias, out, W64)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("x_offset,packed_offset", [(1, 0), (0, 1), (3, 5)])
def test_gemv_unaligned_storage_takes_general_path(dtype, x_offset, packed_offset):
    """x / packed at odd storage offsets (not 16-byte aligned): the general kernel, same answer."""
    _needs("gemv_4bit_lora_cuda")
    M, N, K, bs = 5, 96, 256, 64
    g = torch.Generator().manual_seed(7)
    packed, qs = _quantize_cpu(torch.randn(N, K, generator=g), bs, "nf4", True)
    xbuf = torch.empty(M * K + x_offset, dtype=dtype, device="cuda")
    x = xbuf[x_offset:].view(M, K)
    x.copy_(torch.randn(M, K, generator=g).to(dtype))
    pbuf = torch.empty(packed.numel() + packed_offset, dtype=torch.uint8, device="cuda")
    p = pbuf[packed_offset:]
    p.copy_(packed.view(-1))
    t, B = torch.randn(M, 4, generator=g).cuda(), torch.randn(N, 4, generator=g).cuda()
    out = gemv_cuda(x, p, qs, t, B)
    aligned = gemv_cuda(x.clone(), packed, qs, t, B)
    torch.cuda.synchronize()
    _gemv_check(x, packed, qs, t, B, None, out)
    _gemv_check(x, packed, qs, t, B, None, aligned)


@pytest.mark.cuda
def test_gemv_side_stream_and_large_m():
    """Launch on a non-default stream; M = 100 (7 M-tiles of 16) is still exact to tolerance."""
    _needs("gemv_4bit_lora_cuda")
    g = torch.Generator().manual_seed(3)
    N, K = 257, 512
    packed, qs = _quantize_cpu(torch.randn(N, K, generator=g), 64, "nf4", True)
    x = torch.randn(100, K, generator=g).to(torch.bfloat16).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())  # the inputs were written on the default stream
    with torch.cuda.stream(s):
        out = gemv_cuda(x, packed, qs)
    s.synchronize()
    _gemv_check(x, packed, qs, None, None, None, out)


@pytest.mark.cuda
def test_gemv_vs_bitsandbytes():
    """Against bitsandbytes' CUDA matmul_4bit at one token, on bitsandbytes' own packed weight and nested state."""
    _needs("gemv_4bit_lora_cuda")
    bnb = _bnb_cuda_or_skip()
    g = torch.Generator().manual_seed(11)
    N, K = 1024, 4096
    W = torch.randn(N, K, generator=g).to(torch.bfloat16).cuda()
    packed, qs = bnb.functional.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    x = torch.randn(1, K, generator=g).to(torch.bfloat16).cuda()
    y_bnb = bnb.matmul_4bit(x, packed.t(), quant_state=qs)
    out = gemv_cuda(x, packed, qs)
    torch.cuda.synchronize()
    _gemv_check(x, packed, qs, None, None, None, out)
    y64 = x.double() @ _weight64(packed, qs).t()
    err, err_bnb = (out.double() - y64).abs().max().item(), (y_bnb.double() - y64).abs().max().item()
    assert err <= 2 * err_bnb + torch.finfo(torch.bfloat16).eps * y64.abs().max().item()


# ---------------------------------------------------------------------------------------------------------------------
# dequantize with nested scales inline: bit identity
# ---------------------------------------------------------------------------------------------------------------------
def _nested_inputs(n: int, blocksize: int, quant_type: str = "nf4"):
    g = torch.Generator().manual_seed(n + blocksize)
    A = torch.randn(n, generator=g) * torch.rand(n, generator=g) * 3  # varied block scales
    packed, qs = qkernels.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, double_quant=True)
    return packed, qs


def _reference_dequant(packed, qs, n, dtype):
    return reference.dequantize_4bit(packed, _decoded_scales(qs), qs.code, qs.blocksize, n, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("n", [1, 63, 65, 4095 * 7 + 1, 200001, 4095 * 4097])
def test_dequantize_nested_cuda_bit_exact(n, blocksize, dtype):
    _needs("dequantize_4bit_nested_cuda")
    packed, qs = _nested_inputs(n, blocksize)
    ref = _reference_dequant(packed, qs, n, dtype)
    q = qs.to("cuda")
    nested = (q.absmax, q.state2.absmax, q.state2.code, q.offset, q.state2.blocksize)
    out = _native.dequantize_4bit_native(packed.cuda(), q.absmax, q.code, n, blocksize, dtype, nested=nested)
    torch.cuda.synchronize()
    assert torch.equal(_bits(out), _bits(ref))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("packed_offset,out_offset", [(1, 0), (0, 1), (7, 3), (15, 5)])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_dequantize_cuda_unaligned_storage(nested, packed_offset, out_offset, dtype):
    """Buffers at storage offsets that break 16-byte alignment take the scalar path: same bits."""
    _needs("dequantize_4bit_nested_cuda")
    n, bs = 4097 * 3, 64
    packed, qs = _nested_inputs(n, bs, "fp4")
    ref = _reference_dequant(packed, qs, n, dtype)
    q = qs.to("cuda")
    pbuf = torch.zeros(packed.numel() + packed_offset, dtype=torch.uint8, device="cuda")
    p = pbuf[packed_offset:]
    p.copy_(packed.view(-1))
    obuf = torch.empty(n + out_offset, dtype=dtype, device="cuda")
    out = obuf[out_offset:]
    if nested:
        nest = (q.absmax, q.state2.absmax, q.state2.code, q.offset, q.state2.blocksize)
        res = _native.dequantize_4bit_native(p, q.absmax, q.code, n, bs, dtype, nested=nest, out=out)
    else:
        res = _native.dequantize_4bit_native(p, _decoded_scales(q), q.code, n, bs, dtype, out=out)
    torch.cuda.synchronize()
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(_bits(out), _bits(ref))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_dequantize_op_nested_cuda_matches_reference_backend(dtype):
    """The registered op on CUDA (native, one launch) vs the reference backend on the same device."""
    _needs("dequantize_4bit_nested_cuda")
    assert "dequantize_4bit_nested" in _backend.native_ops(torch.device("cuda"))
    A = torch.randn(113, 257, device="cuda")
    packed, qs = qkernels.quantize_4bit(A, blocksize=64, double_quant=True)
    got = qkernels.dequantize_4bit(packed, qs, dtype=dtype)
    want = qkernels.dequantize_4bit(packed, qs, dtype=dtype, backend="reference")
    assert got.shape == want.shape == A.shape
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.cuda
def test_dequantize_nested_vs_bitsandbytes():
    bnb = _bnb_cuda_or_skip()
    _needs("dequantize_4bit_nested_cuda")
    W = torch.randn(4096, 1000, device="cuda").to(torch.bfloat16)
    packed, qs = bnb.functional.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    want = bnb.functional.dequantize_4bit(packed, qs)
    n = W.numel()
    nested = (qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, qs.state2.blocksize)
    got = _native.dequantize_4bit_native(packed, qs.absmax, qs.code, n, 64, torch.bfloat16, nested=nested)
    torch.cuda.synchronize()
    assert torch.equal(_bits(got), _bits(want.reshape(-1)))


# ---------------------------------------------------------------------------------------------------------------------
# 8-bit blockwise (nested scales)
# ---------------------------------------------------------------------------------------------------------------------
def _maps():
    dyn = dynamic_map()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    ties = dyn.clone()
    ties[100:110] = ties[100]  # equal entries: the stable order keeps the lowest index
    return {"dynamic": dyn, "shuffled": dyn[perm].contiguous(), "ties": ties}


@pytest.mark.cuda
@pytest.mark.parametrize("map_name", ["dynamic", "shuffled", "ties"])
@pytest.mark.parametrize("blocksize", [1, 2, 64, 256, 4096])
@pytest.mark.parametrize("n", [1, 255, 257, 100003])
def test_quantize_blockwise_cuda_bit_exact(n, blocksize, map_name):
    _needs("quantize_blockwise_cuda")
    code = _maps()[map_name]
    g = torch.Generator().manual_seed(n * 7 + blocksize)
    A = torch.randn(n, generator=g) * 10
    A[: min(n, 2 * blocksize)] = 0.0  # all-zero blocks (absmax 0 -> the map's zero entry)
    if blocksize >= 16 and n >= 3 * blocksize:
        # Block 2 holds values exactly on the float32 midpoints of the sorted map, with absmax exactly 1.0 (so the
        # normalized value is the midpoint itself): a tie goes to the lower entry.
        bounds, _ = midpoints(code)
        blk = A[2 * blocksize: 3 * blocksize]
        blk.copy_(bounds[torch.arange(blocksize) % 255])
        blk[0] = 1.0
    q, absmax = _native.quantize_blockwise_native(A.cuda(), code.cuda(), blocksize)
    rq, rabsmax = reference.quantize_blockwise(A, code, blocksize)
    torch.cuda.synchronize()
    assert torch.equal(absmax.cpu().view(torch.int32), rabsmax.view(torch.int32))
    assert torch.equal(q.cpu(), rq)
    # and the inverse
    dq = _native.dequantize_blockwise_native(q, absmax, code.cuda(), blocksize)
    torch.cuda.synchronize()
    assert torch.equal(_bits(dq), _bits(reference.dequantize_blockwise(rq, rabsmax, code, blocksize)))


@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_double_quant_runs_on_device(quant_type):
    """qkernels.quantize_4bit(double_quant=True) on CUDA: native 4-bit + native nested, same bytes as the reference."""
    _needs("quantize_blockwise_cuda")
    assert "quantize_blockwise" in _backend.native_ops(torch.device("cuda"))
    A = torch.randn(1031, 77, device="cuda").to(torch.bfloat16)
    packed, qs = qkernels.quantize_4bit(A, blocksize=64, quant_type=quant_type, double_quant=True)
    rpacked, rqs = qkernels.quantize_4bit(A, blocksize=64, quant_type=quant_type, double_quant=True,
                                          backend="reference")
    assert qs.absmax.device.type == "cuda" and qs.state2.absmax.device.type == "cuda"
    assert torch.equal(packed, rpacked)
    assert torch.equal(qs.offset.view(1).view(torch.int32), rqs.offset.view(1).view(torch.int32))
    assert torch.equal(qs.absmax, rqs.absmax)
    assert torch.equal(qs.state2.absmax.view(torch.int32), rqs.state2.absmax.view(torch.int32))


@pytest.mark.cuda
def test_blockwise_public_functions_run_on_device():
    """qkernels.quantize_blockwise / dequantize_blockwise on CUDA tensors dispatch to the CUDA kernels (the op
    used to run the reference for dequantize everywhere) and give the reference's bits; backend= forces either."""
    _needs("dequantize_blockwise_cuda")
    dev = torch.device("cuda")
    assert {"quantize_blockwise", "dequantize_blockwise"} <= _backend.native_ops(dev)
    assert _backend.resolve("dequantize_blockwise", dev, None) == "cuda"
    A = torch.randn(333, 77, generator=torch.Generator().manual_seed(5)).cuda()
    q, absmax = qkernels.quantize_blockwise(A, blocksize=64)
    rq, rabsmax = qkernels.quantize_blockwise(A, blocksize=64, backend="reference")
    assert q.shape == A.shape and q.device.type == "cuda"
    assert torch.equal(q, rq) and torch.equal(_bits(absmax), _bits(rabsmax))
    out = qkernels.dequantize_blockwise(q, absmax, blocksize=64)
    ref = qkernels.dequantize_blockwise(q, absmax, blocksize=64, backend="reference")
    assert out.shape == A.shape and out.device.type == "cuda"
    assert torch.equal(_bits(out), _bits(ref))
    torch.library.opcheck(torch.ops.qkernels.dequantize_blockwise.default,
                          (q.reshape(-1), absmax, qkernels.dynamic_map(dev), 64))


@pytest.mark.cuda
def test_quantize_blockwise_vs_bitsandbytes():
    bnb = _bnb_cuda_or_skip()
    _needs("quantize_blockwise_cuda")
    n = 70000
    A = torch.randn(n, generator=torch.Generator().manual_seed(13)).cuda()
    qb, state = bnb.functional.quantize_blockwise(A, blocksize=256)
    code = state.code.to("cuda", torch.float32)
    q, absmax = _native.quantize_blockwise_native(A, code, 256)
    torch.cuda.synchronize()
    assert torch.equal(absmax.view(torch.int32), state.absmax.view(torch.int32))
    # bitsandbytes' dQuantize (binary search, then one midpoint compare) sends a value lying exactly on a midpoint to
    # the upper entry when the search stopped above it; qkernels always takes the lower one (docs/format.md §2).
    # Any other difference is a bug. (Exact ties are rare but not negligible at this n: ~1 ulp / entry spacing.)
    diff = (q != qb).nonzero().flatten()
    if diff.numel():
        v = A * (1.0 / absmax.clamp(min=1e-38)).repeat_interleave(256)[:n]
        bounds, _ = midpoints(code)
        assert torch.isin(v[diff], bounds).all(), f"{diff.numel()} codes differ off the midpoints"
        assert ((q[diff].int() - qb[diff].int()).abs() == 1).all()


# ---------------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_tensor_with_cpu_scales_is_a_clear_error():
    _needs("dequantize_4bit_nested_cuda")
    n, bs = 1000, 64
    packed, qs = _nested_inputs(n, bs)
    with pytest.raises(ValueError, match="absmax"):
        _native.dequantize_4bit_native(packed.cuda(), _decoded_scales(qs), qs.code.cuda(), n, bs, torch.float32)
    nested = (qs.absmax.cuda(), qs.state2.absmax, qs.state2.code.cuda(), qs.offset, 256)  # nested_absmax on CPU
    with pytest.raises(ValueError, match="nested_absmax"):
        _native.dequantize_4bit_native(packed.cuda(), qs.absmax.cuda(), qs.code.cuda(), n, bs, torch.float32,
                                       nested=nested)
    with pytest.raises(ValueError, match="code"):
        _native.quantize_blockwise_native(torch.randn(10, device="cuda"), dynamic_map(), 4)
    with pytest.raises(ValueError, match="absmax"):
        _native.dequantize_blockwise_native(torch.zeros(10, dtype=torch.uint8, device="cuda"), torch.ones(3),
                                            dynamic_map("cuda"), 4)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (tensors on cuda:1, cuda:0 current)")
def test_kernels_on_a_device_that_is_not_current():
    """The raw launches run on the runtime's current device: _native must switch to the tensors' device (and take
    that device's stream) or these launches run on cuda:0 with cuda:1's pointers."""
    _needs("gemv_4bit_lora_cuda")
    dev = torch.device("cuda:1")
    g = torch.Generator().manual_seed(5)
    W = torch.randn(96, 256, generator=g)
    x = torch.randn(3, 256, generator=g).to(torch.bfloat16)
    with torch.cuda.device(0):
        packed, qs = qkernels.quantize_4bit(W.to(dev), blocksize=64, double_quant=True)
        # the reference on the same device (torch's mean, hence the nested offset, is device-specific)
        rpacked, rqs = qkernels.quantize_4bit(W.to(dev), blocksize=64, double_quant=True, backend="reference")
        got = qkernels.dequantize_4bit(packed, qs, dtype=torch.bfloat16)
        out = _native.gemv_4bit_lora_native(x.to(dev), packed, qs, None, None, None)
        torch.cuda.synchronize(dev)
        assert torch.equal(packed, rpacked)
        assert torch.equal(qs.absmax, rqs.absmax)
        want = qkernels.dequantize_4bit(rpacked, rqs, dtype=torch.bfloat16, backend="reference")
        assert torch.equal(_bits(got), _bits(want))
        _gemv_check(x.to(dev), packed, qs, None, None, None, out)


def _bnb_cuda_or_skip():
    try:
        import bitsandbytes as bnb

        bnb.functional.quantize_4bit(torch.ones(64, device="cuda"), blocksize=64)
    except Exception as exc:  # not installed, or no CUDA library for this GPU
        pytest.skip(f"bitsandbytes with CUDA is not usable here: {type(exc).__name__}: {exc}")
    return bnb


# ---------------------------------------------------------------------------------------------------------------------
# bindings: present iff CUDA is compiled; argument checks raise before any launch (no GPU needed)
# ---------------------------------------------------------------------------------------------------------------------
_EXTRA = ("gemv_4bit_lora_cuda", "dequantize_4bit_nested_cuda", "quantize_blockwise_cuda", "dequantize_blockwise_cuda")


def test_cuda_extra_bindings_present_iff_compiled():
    if _native._C is None:
        pytest.skip(f"qkernels._C is missing ({_native.NATIVE_ERROR})")
    compiled = _native._C.capabilities()["cuda_compiled"]
    for name in _EXTRA:
        assert hasattr(_native._C, name) == compiled, name


def _gemv_args(**over):
    args = dict(x_ptr=16, dtype=2, M=1, K=64, packed_ptr=16, absmax_ptr=16, absmax_q_ptr=0, nested_absmax_ptr=0,
                nested_code_ptr=0, offset=0.0, nested_blocksize=256, code_ptr=16, blocksize=64, N=8, lora_t_ptr=0,
                lora_B_ptr=0, r=0, bias_ptr=0, out_ptr=16, stream=0)
    args.update(over)
    return args


@pytest.mark.parametrize("over,arg", [
    ({"x_ptr": 0}, "x_ptr"), ({"dtype": 3}, "dtype"), ({"M": 0}, "M"), ({"K": 0}, "K"), ({"N": -1}, "N"),
    ({"blocksize": 48}, "blocksize"), ({"code_ptr": 0}, "code_ptr"), ({"out_ptr": 0}, "out_ptr"),
    ({"r": -1}, "r"), ({"r": 4}, "lora_t_ptr"), ({"r": 4, "lora_t_ptr": 16}, "lora_B_ptr"),
    ({"absmax_ptr": 0}, "absmax_q_ptr"), ({"absmax_ptr": 0, "absmax_q_ptr": 16}, "nested_absmax_ptr"),
    ({"absmax_ptr": 0, "absmax_q_ptr": 16, "nested_absmax_ptr": 16}, "nested_code_ptr"),
    ({"absmax_ptr": 0, "absmax_q_ptr": 16, "nested_absmax_ptr": 16, "nested_code_ptr": 16, "nested_blocksize": 3},
     "nested_blocksize"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_gemv_binding_checks(over, arg):
    _needs("gemv_4bit_lora_cuda")
    with pytest.raises(ValueError, match=f"gemv_4bit_lora_cuda: argument '{arg}'"):
        _native._C.gemv_4bit_lora_cuda(**_gemv_args(**over))


def test_blockwise_and_nested_binding_checks():
    _needs("quantize_blockwise_cuda")
    C = _native._C
    with pytest.raises(ValueError, match="argument 'blocksize'"):
        C.quantize_blockwise_cuda(16, 10, 3, 16, 16, 16, 0)
    with pytest.raises(ValueError, match="argument 'A_ptr'"):
        C.quantize_blockwise_cuda(0, 10, 4, 16, 16, 16, 0)
    with pytest.raises(ValueError, match="argument 'n'"):
        C.dequantize_blockwise_cuda(16, 16, 16, 0, 4, 16, 0)
    with pytest.raises(ValueError, match="argument 'q_ptr'"):
        C.dequantize_blockwise_cuda(0, 16, 16, 10, 4, 16, 0)
    with pytest.raises(ValueError, match="argument 'nested_blocksize'"):
        C.dequantize_4bit_nested_cuda(16, 16, 16, 16, 0.0, 6, 16, 10, 64, 16, 0, 0)
    with pytest.raises(ValueError, match="argument 'out_dtype'"):
        C.dequantize_4bit_nested_cuda(16, 16, 16, 16, 0.0, 256, 16, 10, 64, 16, 7, 0)
    with pytest.raises(ValueError, match="argument 'blocksize'"):
        C.dequantize_4bit_nested_cuda(16, 16, 16, 16, 0.0, 256, 16, 10, 16, 16, 0, 0)


@pytest.mark.parametrize("count", [0, 1])
def test_cuda_ops_fall_back_when_the_native_runtime_sees_no_gpu(monkeypatch, count):
    """_C's static CUDA runtime sees no device when the driver is older than the toolkit _C was built with (a CUDA 13
    build on a 12.x driver, where torch still runs): the CUDA ops must then resolve to the reference path and a forced
    backend='cuda' must say why, instead of every launch failing with cudaErrorInsufficientDriver."""
    info = {"native": True, "cuda_compiled": True, "cuda_device_count": count}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # torch's own runtime sees the GPU
    monkeypatch.setattr(_native, "native_available", lambda: True)
    monkeypatch.setattr(_native, "native_info", lambda: dict(info))
    monkeypatch.setattr(_backend, "_native_ops_cache", {})
    dev = torch.device("cuda")
    if count == 0:
        assert _backend.native_ops(dev) == frozenset()
        assert _backend.resolve("dequantize_4bit", dev, None) == "reference"
        with pytest.raises(ValueError, match="runtime sees no GPU"):
            _backend.resolve("dequantize_4bit", dev, "cuda")
    else:
        assert "dequantize_4bit" in _backend.native_ops(dev)
        assert _backend.resolve("dequantize_4bit", dev, None) == "cuda"


def test_cuda_ops_stay_registered_where_no_gpu_exists(monkeypatch):
    """A CUDA build on a machine without any GPU (CI): _C's runtime and torch both see none, so there is no CUDA
    tensor to fall back for; the CUDA ops stay registered (the bindings exist and validate, as on a GPU machine)."""
    info = {"native": True, "cuda_compiled": True, "cuda_device_count": 0}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(_native, "native_available", lambda: True)
    monkeypatch.setattr(_native, "native_info", lambda: dict(info))
    monkeypatch.setattr(_backend, "_native_ops_cache", {})
    assert _backend.cuda_unusable_reason() is None
    assert "dequantize_4bit" in _backend.native_ops(torch.device("cuda"))


def test_every_cuda_launch_is_guarded_on_the_tensors_device():
    """A source-level check of what the two-GPU tests above check at run time (the GPU machine has one GPU): the raw
    launches run on the runtime's current device and on the stream they are handed, so every ``_C.*_cuda`` call in
    qkernels must sit inside ``with torch.cuda.device(<the tensors' device>)`` and pass that device's current stream
    (``torch.cuda.current_stream(device)``, not the current device's)."""
    import ast
    from pathlib import Path

    calls = 0
    for path in sorted((Path(qkernels.__file__).parent).glob("*.py")):
        tree = ast.parse(path.read_text())
        guarded: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and any(
                    ast.unparse(item.context_expr).startswith("torch.cuda.device(") for item in node.items):
                device = ast.unparse(node.items[0].context_expr)[len("torch.cuda.device("):-1]
                for inner in ast.walk(node):
                    guarded.add(id(inner))
                    if isinstance(inner, ast.Call) and ast.unparse(inner.func) == "torch.cuda.current_stream":
                        assert [ast.unparse(a) for a in inner.args] == [device], (
                            f"{path.name}:{inner.lineno}: the stream of another device than the guard's")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and ast.unparse(node.func.value) == "_C" and node.func.attr.endswith("_cuda")):
                calls += 1
                assert id(node) in guarded, f"{path.name}:{node.lineno}: _C.{node.func.attr} outside a device guard"
                text = ast.unparse(node)
                stream_args = [a for a in ast.walk(node) if isinstance(a, ast.Name) and a.id == "stream"]
                assert "current_stream(device)" in text or stream_args, f"{path.name}:{node.lineno}: no stream"
    assert calls >= 6  # dequantize (plain, nested), quantize, blockwise quantize / dequantize, GEMV
