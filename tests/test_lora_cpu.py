"""Tests of the CPU LoRA product kernels (``_native.lora_down_cpu`` / ``lora_gram_cpu`` / ``lora_up_add_cpu``,
csrc/cpu/lora.h) and of their use in ``matmul_4bit_lora``'s CPU training path.

Oracle: the same products in float64 on the same inputs (x widened exactly, the dropout factor applied in float64).
Tolerance basis (STYLE 12): a product's max error is at most twice the max error of torch computing it the way the
Python path does (x cast to float32, a float32 GEMM), plus 8 float32 ulps of the largest |term| sum (a sum of n
float32 terms is off by up to ~n/2 ulps of the sum of |terms| in the worst case; both summation orders are blocked,
so a few ulps is the observed scale, and torch's own error can by chance be near zero on a small case). The
in-place update rounds once: it is the float64 sum rounded to the dtype, up to one ulp of the dtype where the float32
sum lands on the other side of a rounding boundary.

Every case runs on each CPU path this machine has (``QKERNELS_CPU_ISA``).
"""

from __future__ import annotations

import pytest
import torch

import qkernels
from qkernels import _linear, _native

pytestmark = pytest.mark.skipif(
    _native._C is None or not hasattr(_native._C, "lora_down_cpu"),
    reason=f"qkernels._C (with the CPU LoRA kernels) is not available: {_native.NATIVE_ERROR or 'stale build'}",
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (M, K, r): single elements; K below one vector; K one past a vector / a wide chunk (scalar column tails); r past a
# tile (the 2- and 1-rank remainder tiles); M odd (the 2- and 1-row remainder tiles); M past the 256-row sum block;
# a real layer's row length with peft's default ranks.
SHAPES = [(1, 1, 1), (3, 7, 5), (5, 17, 8), (7, 33, 3), (113, 130, 17), (300, 48, 2), (9, 4096, 16), (2, 1027, 64)]


def _isas() -> list[str]:
    return _native._C.cpu_isa_available() if _native._C is not None else ["scalar"]


@pytest.fixture(params=_isas())
def isa(request, monkeypatch):
    monkeypatch.setenv("QKERNELS_CPU_ISA", request.param)
    return request.param


def _inputs(M, K, r, dtype, p, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    mask = torch.rand(M, K, generator=g) >= p if p > 0 else None
    ms = 1.0 / (1.0 - p)
    xd64 = x.double() if mask is None else x.double() * mask.double() * ms
    xd32 = x.float() if mask is None else x.float() * mask.float() * ms
    return g, x, mask, ms, xd64, xd32


def _tol(torch_err: float, abs_terms: torch.Tensor) -> float:
    return 2 * torch_err + 8 * 2.0**-24 * float(abs_terms.max())


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nomask", "mask"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("M,K,r", SHAPES, ids=[f"M{m}-K{k}-r{r}" for m, k, r in SHAPES])
def test_down_and_gram_match_float64(isa, M, K, r, dname, p):
    dtype = DTYPES[dname]
    g, x, mask, ms, xd64, xd32 = _inputs(M, K, r, dtype, p, M * 1000 + K + r)
    A = torch.randn(r, K, generator=g)
    u = torch.randn(M, r, generator=g)

    t = _native.lora_down_cpu(x, A, 0.5, mask, ms)
    ref = 0.5 * xd64 @ A.double().t()
    err = (t.double() - ref).abs().max().item()
    torch_err = (0.5 * (xd32 @ A.t()).double() - ref).abs().max().item()
    assert t.dtype == torch.float32 and t.shape == (M, r)
    assert err <= _tol(torch_err, 0.5 * xd64.abs() @ A.double().abs().t()), (err, torch_err)

    G = _native.lora_gram_cpu(u, x, mask, ms)
    ref = u.double().t() @ xd64
    err = (G.double() - ref).abs().max().item()
    torch_err = ((u.t() @ xd32).double() - ref).abs().max().item()
    assert G.dtype == torch.float32 and G.shape == (r, K)
    assert err <= _tol(torch_err, u.double().abs().t() @ xd64.abs()), (err, torch_err)


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nomask", "mask"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("M,K,r", SHAPES, ids=[f"M{m}-K{k}-r{r}" for m, k, r in SHAPES])
def test_gram_scaled_and_transposed_gives_the_bits_of_torch_scaling_it(isa, M, K, r, dname, p):
    """``lora_gram_raw(..., out_scale=s, transposed=True)`` (dB of the training step, written ``[K, r]``) is, bit for
    bit, ``G.t() * s`` of the plain gram: the same sums, then one float32 multiply; ``out_scale`` 1 and the plain
    layout are the plain gram. Every column tail (vector chunks, single vectors, scalar columns) and rank tile."""
    g, x, mask, ms, _, _ = _inputs(M, K, r, DTYPES[dname], p, 31 * M + K + r)
    u = torch.randn(M, r, generator=g)
    dt = _native._DTYPE_TO_NATIVE[x.dtype]
    mp = 0 if mask is None else mask.data_ptr()
    G = _native.lora_gram_cpu(u, x, mask, ms)
    s = 1.7  # not a power of two: the multiply rounds
    Gt = _native.lora_gram_raw(u, x, dt, mp, ms, s, True)
    assert Gt.shape == (K, r) and Gt.is_contiguous()
    assert torch.equal(Gt, G.t() * s)
    assert torch.equal(_native.lora_gram_raw(u, x, dt, mp, ms, s, False), G * s)
    assert torch.equal(_native.lora_gram_raw(u, x, dt, mp, ms, 1.0, True), G.t())


def _ulp(y: torch.Tensor) -> torch.Tensor:
    """One ulp of each element of a float tensor in its dtype, as float64 (the subnormal spacing below the smallest
    normal)."""
    info = torch.finfo(y.dtype)
    a = y.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(a))) * info.eps


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nomask", "mask"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("M,K,r", SHAPES, ids=[f"M{m}-K{k}-r{r}" for m, k, r in SHAPES])
def test_up_add_rounds_once(isa, M, K, r, dname, p):
    dtype = DTYPES[dname]
    g, y, mask, ms, _, _ = _inputs(M, K, r, dtype, p, M * 7 + K + r)
    u = torch.randn(M, r, generator=g)
    A = torch.randn(r, K, generator=g) * 0.1
    lora64 = u.double() @ A.double()
    if mask is not None:
        lora64 = lora64 * mask.double() * ms
    exact = y.double() + lora64
    y0 = y.clone()
    out = _native.lora_up_add_cpu(y, u, A, mask, ms)
    assert out is y  # in place
    want = exact.to(dtype)
    diff = (y.double() - want.double()).abs()
    # The float32 sum's own error (a few float32 ulps of sum |u_j A_j|), and where it makes the sum fall on the other
    # side of a rounding boundary of the dtype, one ulp of the dtype: never more.
    terms = u.double().abs() @ A.double().abs()
    bound = _ulp(want) + 8 * 2.0**-24 * terms
    assert bool((diff <= bound).all()), float((diff / bound).max())
    if dtype != torch.float32:
        # Rounded once: the float32 sum is off by a few 2^-24 relative, so it lands across a rounding boundary of the
        # dtype (spacing 2^-8 bf16, 2^-11 fp16, relative) for about that fraction of elements: ~2^-14 and ~2^-11
        # times a few. 5% of elements differing would mean a second rounding (half of all ties, or worse).
        assert (diff > 0).float().mean().item() <= 0.05
    if mask is not None:  # dropped elements keep their value exactly
        assert torch.equal(y[~mask], y0[~mask])


def test_up_add_keeps_nan_and_inf(isa):
    for dtype in DTYPES.values():
        y = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0] * 8], dtype=dtype)
        u = torch.ones(1, 2)
        A = torch.ones(2, 32)
        _native.lora_up_add_cpu(y, u, A)
        assert torch.isnan(y[0, 0::4]).all() and (y[0, 1::4] == float("inf")).all()
        assert (y[0, 2::4] == -float("inf")).all() and (y[0, 3::4] == 3.0).all()


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 8)
    A = torch.randn(2, 8)
    with pytest.raises(ValueError, match="x must be contiguous"):
        _native.lora_down_cpu(x.t().contiguous().t(), A)
    with pytest.raises(ValueError, match="mask must be a contiguous bool"):
        _native.lora_down_cpu(x, A, mask=torch.ones(4, 8))
    with pytest.raises(ValueError, match=r"A must be a float CPU tensor of shape \(2, 8\)|A must be"):
        _native.lora_down_cpu(x, torch.randn(2, 9))
    with pytest.raises(ValueError, match="u must be a float CPU tensor"):
        _native.lora_gram_cpu(torch.randn(5, 2), x)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        _native.lora_up_add_cpu(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 2), A)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("M,K,r", [(3, 7, 5), (113, 130, 17), (9, 1027, 16)], ids=["small", "tails", "layer"])
def test_transposed_factor_read_in_place_gives_the_same_bits(isa, M, K, r, dname):
    """A factor passed as ``lora_B.t()`` (a transposed view of a dense float32 ``[K, r]`` tensor, as the training
    step passes B^T) is read without a torch copy; the results are bit-identical to passing a dense float32 copy, in
    lora_down and the up-add; a bfloat16 factor, dense or transposed, is widened by the binding (exactly) and gives
    the bits of its float32 copy too."""
    g, x, mask, ms, _, _ = _inputs(M, K, r, DTYPES[dname], 0.25, 7 * M + K)
    Bt = torch.randn(K, r, generator=g).t()  # [r, K] view of a [K, r] tensor
    assert not Bt.is_contiguous() and Bt.t().is_contiguous()
    u = torch.randn(M, r, generator=g)
    for factor in (Bt, Bt.to(torch.bfloat16), Bt.to(torch.bfloat16).contiguous()):
        dense = factor.to(torch.float32).contiguous()
        t1, t2 = (_native.lora_down_cpu(x, f, 0.5, mask, ms) for f in (factor, dense))
        assert torch.equal(t1, t2)
        y1, y2 = x.clone(), x.clone()
        _native.lora_up_add_cpu(y1, u, factor, mask, ms)
        _native.lora_up_add_cpu(y2, u, dense, mask, ms)
        assert torch.equal(y1, y2)
        assert not torch.equal(y1, x)  # the update happened


def test_bindings_refuse_a_factor_dtype_they_do_not_widen():
    """The bindings read a float32 or bfloat16 factor; any other dtype code is a ValueError naming a_dtype (the Python
    wrappers convert float16 factors to float32 before calling)."""
    x = torch.randn(2, 8)
    A = torch.randn(3, 8).half()
    t = torch.empty(2, 3)
    fp16 = _native._DTYPE_TO_NATIVE[torch.float16]
    with pytest.raises(ValueError, match="a_dtype"):
        _native._C.lora_down_cpu(x.data_ptr(), _native._DTYPE_TO_NATIVE[x.dtype], 2, 8, 0, 1.0, A.data_ptr(), 3, 1.0,
                                 t.data_ptr(), False, fp16)
    with pytest.raises(ValueError, match="a_dtype"):
        _native._C.lora_up_add_cpu(x.data_ptr(), _native._DTYPE_TO_NATIVE[x.dtype], 2, 8, t.data_ptr(), 3,
                                   A.data_ptr(), 0, 1.0, False, fp16)
    assert torch.equal(_native.lora_down_cpu(x, A), _native.lora_down_cpu(x, A.float()))  # the wrapper converts


def test_training_step_uses_the_kernels_and_matches_the_torch_path(monkeypatch):
    """matmul_4bit_lora's CPU training path (M past the GEMV) runs its LoRA products in these kernels, with dropout,
    and its gradients agree with the same step with the kernels switched off (torch matmuls in float32)."""
    M, K, N, r = 72, 96, 80, 8
    monkeypatch.setattr(_linear, "gemv_max_m", lambda x: _linear.GEMV_MAX_M)  # the forward takes the matmul, on
    assert M > _linear.gemv_max_m(torch.empty(1, K, dtype=torch.bfloat16))  # every CPU
    g = torch.Generator().manual_seed(3)
    W = torch.randn(N, K, generator=g) * 0.05
    packed, state = qkernels.quantize_4bit(W.to(torch.bfloat16), 64, "nf4", double_quant=True)
    x0 = torch.randn(M, K, generator=g).to(torch.bfloat16)
    A0 = torch.randn(r, K, generator=g) * 0.1
    B0 = torch.randn(N, r, generator=g) * 0.1
    dy = torch.randn(M, N, generator=g).to(torch.bfloat16)
    calls = {"down": 0, "gram": 0, "up": 0}
    # the step calls the kernels through the unchecked entry points (its arguments are validated once, up front)
    real = (_native.lora_down_raw, _native.lora_gram_raw, _native.lora_up_add_raw)

    def counted(name, fn):
        def wrap(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrap

    db_strides = []

    def step():
        x, A, B = (t.clone().requires_grad_() for t in (x0, A0, B0))
        B.register_hook(lambda grad: db_strides.append(grad.stride()))  # dB as the Function returned it
        torch.manual_seed(11)  # the same dropout mask in both runs
        y = qkernels.matmul_4bit_lora(x, packed, state, A, B, 2.0, dropout_p=0.25)
        y.backward(dy)
        return y.detach(), x.grad, A.grad, B.grad

    monkeypatch.setattr(_native, "lora_down_raw", counted("down", real[0]))
    monkeypatch.setattr(_native, "lora_gram_raw", counted("gram", real[1]))
    monkeypatch.setattr(_native, "lora_up_add_raw", counted("up", real[2]))
    fast = step()
    assert calls == {"down": 2, "gram": 2, "up": 2}, calls  # T and u; dA and dB; y and dX
    assert db_strides == [(r, 1)]  # dB came out of the kernel in lora_B's layout (no transposing copy after)

    from qkernels import _backend

    ops = _backend.native_ops(torch.device("cpu"))
    monkeypatch.setitem(_backend._native_ops_cache, "cpu", (_native._C, ops - {"lora_products"}))
    calls.update(down=0, gram=0, up=0)
    slow = step()
    assert calls == {"down": 0, "gram": 0, "up": 0}
    for a, b, name in zip(fast, slow, ("y", "dx", "dA", "dB"), strict=True):
        # the two paths differ in float32 summation order and in where bf16 rounding happens: a few bf16 ulps
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 2 * 2.0**-8 * scale + 1e-6, name


def _op_args():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 70, generator=g).to(torch.bfloat16)
    mask = torch.rand(37, 70, generator=g) >= 0.2
    A = torch.randn(6, 70, generator=g)
    u = torch.randn(37, 6, generator=g)
    return x, mask, A, u


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_opcheck_lora_ops(masked):
    """torch.library.opcheck (schema, fake tensor, autograd registration, AOT dispatch) of the two LoRA ops."""
    x, mask, A, u = _op_args()
    m = mask if masked else None
    torch.library.opcheck(torch.ops.qkernels.lora_down.default, (x, A, 0.5, m, 1.25))
    torch.library.opcheck(torch.ops.qkernels.lora_gram.default, (u, x, m, 1.25))


def test_lora_ops_fallback_matches_the_kernels(monkeypatch):
    """Without the CPU kernels the ops compute the same products with float32 torch matmuls."""
    from qkernels import _backend, _ops

    x, mask, A, u = _op_args()
    fast = (_ops.lora_down_impl(x, A, 0.5, mask, 1.25), _ops.lora_gram_impl(u, x, mask, 1.25))
    ops = _backend.native_ops(torch.device("cpu"))
    monkeypatch.setitem(_backend._native_ops_cache, "cpu", (_native._C, ops - {"lora_products"}))
    slow = (_ops.lora_down_impl(x, A, 0.5, mask, 1.25), _ops.lora_gram_impl(u, x, mask, 1.25))
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_linear_4bit_dx_takes_a_bool_mask_with_its_scale():
    """The backward op's dropout mask as bool + 1 / (1 - p) (what the CPU kernel reads) equals the float mask."""
    g = torch.Generator().manual_seed(9)
    W = torch.randn(40, 70, generator=g) * 0.05
    packed, state = qkernels.quantize_4bit(W, 64, "nf4", double_quant=False)
    gy = torch.randn(37, 40, generator=g)
    x, mask, A, u = _op_args()
    args = (gy, packed, state.absmax, state.code, 64, 70, None, None, None, 256, u, A)
    with_bool = torch.ops.qkernels.linear_4bit_dx(*args, mask, 1.25)
    with_float = torch.ops.qkernels.linear_4bit_dx(*args, mask.float() * 1.25)
    torch.testing.assert_close(with_bool, with_float, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.qkernels.linear_4bit_dx.default, (*args, mask, 1.25))
