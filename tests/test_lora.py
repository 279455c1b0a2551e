"""matmul_4bit_lora / QLoRAFunction: forward and every gradient against a float64 reference, on each backend.

Tolerance basis (STYLE 12, DESIGN §3): for each output (y, dx, dA, dB, dbias) the error of qkernels against the float64
reference must be at most twice the error of plain PyTorch doing the same computation in the same dtype
(``reference.matmul_4bit_lora`` run in that dtype, differentiated by autograd), plus two ulps of the largest reference
value (where plain PyTorch happens to be exact, a different but equally valid summation order is not).
"""

import copy
import math

import pytest
import torch

import qkernels
from qkernels import _linear, _native, reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_BACKENDS = ["cpu", "reference"]


def _problem(M, N, K, r, dtype, *, bias=True, seed=0, lead=(), blocksize=64, quant_type="nf4", double_quant=True,
             device="cpu"):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) * 0.05).to(device)
    packed, state = qkernels.quantize_4bit(W, blocksize, quant_type, double_quant)
    x = torch.randn(*lead, M, K, generator=g).to(dtype).to(device)
    A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device) if r else None
    B = (torch.randn(N, r, generator=g) * 0.1).to(device) if r else None
    b = (torch.randn(N, generator=g) * 0.1).to(device) if bias else None
    gy = torch.randn(*lead, M, N, generator=g).to(dtype).to(device)
    return packed, state, x, A, B, b, gy


def _grads(fn, x, A, B, b, gy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, A, B, b)]
    y = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, wanted, gy))
    return [y.detach()] + [next(grads) if t is not None else None for t in leaves]


def _assert_close_to_fp64(ours, plain, ref, names):
    for name, o, p, r in zip(names, ours, plain, ref, strict=True):
        if r is None:
            assert o is None, name
            continue
        assert o.dtype == p.dtype, f"{name}: dtype {o.dtype}, plain torch gives {p.dtype}"
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        err = (o.double() - r).abs().max().item()
        err_plain = (p.double() - r).abs().max().item()
        ulp = torch.finfo(o.dtype).eps * r.abs().max().item()
        assert err <= 2 * err_plain + 2 * ulp, f"{name}: error {err:.3g} > 2 x plain torch {err_plain:.3g} + 2 ulp"


def _check(M, N, K, r, dtype, backend, *, bias=True, dropout_p=0.0, rslora=False, lead=(), **qkw):
    """Forward + every gradient of matmul_4bit_lora on ``backend`` against float64, plain torch as the yardstick."""
    packed, state, x, A, B, b, gy = _problem(M, N, K, r, dtype, bias=bias, lead=lead, **qkw)
    s = reference.lora_scaling(16.0, r, rslora) if r else 1.0
    seed = 1234

    def ours(x_, A_, B_, b_):
        torch.manual_seed(seed)
        return qkernels.matmul_4bit_lora(x_, packed, state, A_, B_, s, b_, dropout_p, backend=backend)

    # The mask the Function draws: the same generator state, the same draw (bool [M*, K] Bernoulli(1 - p)).
    torch.manual_seed(seed)
    mask = None
    if dropout_p > 0 and r:
        flat = torch.empty(x.reshape(-1, K).shape, dtype=torch.bool, device=x.device)
        mask = flat.bernoulli_(1.0 - dropout_p).reshape(x.shape)

    def plain(x_, A_, B_, b_, dt=dtype):
        cast = [None if t is None else t.to(dt) for t in (A_, B_, b_)]
        if A_ is None:
            W = qkernels.dequantize_4bit(packed, state, dt if dt != torch.float64 else torch.float32).to(dt)
            y = x_.to(dt) @ W.t()
            return y if b_ is None else y + cast[2]
        return reference.matmul_4bit_lora(x_.to(dt), packed, state, cast[0], cast[1], s, cast[2], dropout_p,
                                          dropout_mask=mask)

    names = ["y", "dx", "dA", "dB", "dbias"]
    got = _grads(ours, x, A, B, b, gy)
    base = _grads(plain, x, A, B, b, gy)
    ref = _grads(lambda *t: plain(*t, dt=torch.float64), x, A, B, b, gy.double())
    # Gradients come back in each leaf's dtype; plain torch computed the LoRA grads in x's dtype.
    base = [None if t is None else t.to(o.dtype) for t, o in zip(base, got, strict=True)]
    _assert_close_to_fp64(got, base, ref, names)
    return got


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("M", [1, 2, 3, 16, 17, 113])
def test_rows_dtypes(M, dtype, backend):
    _check(M, 65, 130, 8, dtype, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "N,K,blocksize",
    [(1, 64, 64), (33, 63, 64), (7, 33, 32), (96, 200, 128), (130, 257, 64), (48, 1000, 256)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("M", [1, 17])
def test_awkward_shapes(M, N, K, blocksize, backend):
    """K not a multiple of the blocksize or even of 2 (rows start mid-byte), partial last blocks."""
    _check(M, N, K, 8, torch.float32, backend, blocksize=blocksize)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lora_variants(r, dropout_p, bias, rslora, backend):
    _check(16, 96, 160, r, torch.float32, backend, bias=bias, dropout_p=dropout_p, rslora=rslora)
    _check(3, 96, 160, r, torch.bfloat16, backend, bias=bias, dropout_p=dropout_p, rslora=rslora)


@pytest.mark.parametrize("isa", _native._C.cpu_isa_available() if _native._C is not None else [])
@pytest.mark.parametrize("r", [1, 64])
def test_lora_with_dropout_on_every_cpu_path(monkeypatch, isa, r):
    """The native CPU path forced onto each ISA this machine has (QKERNELS_CPU_ISA; non-x86 machines run the scalar
    one): the LoRA kernels' sums stay within the same tolerance (the scalar path once summed K in one float, in order,
    and failed the float32 cases without bias here)."""
    if "lora_products" not in qkernels._backend.native_ops(torch.device("cpu")):
        pytest.skip("this build has no CPU LoRA kernels (see qkernels.native_info())")
    monkeypatch.setenv("QKERNELS_CPU_ISA", isa)
    for bias, rslora in ((False, False), (False, True), (True, False)):
        _check(16, 96, 160, r, torch.float32, "cpu", bias=bias, dropout_p=0.25, rslora=rslora)
        _check(3, 96, 160, r, torch.bfloat16, "cpu", bias=bias, dropout_p=0.25, rslora=rslora)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("quant", ["nf4-plain", "fp4-nested", "fp4-plain"])
def test_quant_types(quant, backend):
    quant_type, nesting = quant.split("-")
    _check(5, 70, 128, 4, torch.float32, backend, quant_type=quant_type, double_quant=nesting == "nested")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_lora_and_leading_dims(backend):
    _check(4, 40, 96, 0, torch.float32, backend)  # lora_A = lora_B = None: the plain 4-bit linear
    y = _check(5, 40, 96, 8, torch.bfloat16, backend, lead=(2, 3))[0]
    assert y.shape == (2, 3, 5, 40)


def test_dropout_mask_is_the_same_in_forward_and_backward():
    """With dropout, dA = s (dY B)^T (X * mask / (1-p)): it only matches the reference if backward reused the mask."""
    torch.manual_seed(0)
    got = _check(64, 32, 96, 8, torch.float32, "cpu", dropout_p=0.5)
    assert got[2].abs().sum() > 0


def _hvp(fn, leaves, gy, vs):
    """Second derivatives: the gradient of ``<grad(y . gy), v>`` for every leaf (a Hessian-vector product)."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    first = torch.autograd.grad((fn(*leaves) * gy).sum(), leaves, create_graph=True)
    h = sum((g * v.to(g.dtype)).sum() for g, v in zip(first, vs, strict=True))
    return list(torch.autograd.grad(h, leaves, allow_unused=True, materialize_grads=True))  # d2bias is 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("M", [3, 17], ids=["gemv", "blas"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
def test_double_backward(dropout_p, M, backend):
    """create_graph=True then a second derivative (gradient penalties, Hessian-vector products) agrees with float64,
    within 2x plain torch's error. The backward used to keep T = dropout(x) A^T without its graph: the second
    derivatives through dB were ~50% off, silently."""
    packed, state, x, A, B, b, gy = _problem(M, 24, 40, 4, torch.float32)
    g = torch.Generator().manual_seed(5)
    vs = [torch.randn(t.shape, generator=g) for t in (x, A, B, b)]
    mask = torch.rand(x.shape, generator=g) > dropout_p if dropout_p else None

    def ours(*leaves):
        torch.manual_seed(7)
        return qkernels.matmul_4bit_lora(leaves[0], packed, state, *leaves[1:3], 2.0, leaves[3], dropout_p,
                                         backend=backend)

    torch.manual_seed(7)  # the mask the Function draws (see _check)
    if dropout_p:
        mask = torch.empty(x.shape, dtype=torch.bool).bernoulli_(1.0 - dropout_p)

    def plain(*leaves):
        return reference.matmul_4bit_lora(leaves[0], packed, state, *leaves[1:3], 2.0, leaves[3], dropout_p,
                                          dropout_mask=mask)

    got = _hvp(ours, (x, A, B, b), gy, vs)
    base = _hvp(plain, (x, A, B, b), gy, vs)
    ref = _hvp(plain, [t.double() for t in (x, A, B, b)], gy.double(), vs)
    _assert_close_to_fp64(got, base, ref, ["d2x", "d2A", "d2B", "d2bias"])


def test_dropout_off_in_eval():
    packed, state, x, A, B, b, _ = _problem(8, 32, 64, 4, torch.float32)
    y1 = qkernels.matmul_4bit_lora(x, packed, state, A, B, 2.0, b, 0.9, training=False)
    y2 = qkernels.matmul_4bit_lora(x, packed, state, A, B, 2.0, b, 0.0)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("M", [1, 16, 33])
def test_inference_path_equals_the_autograd_forward(M, backend):
    """No grad wanted (no_grad, inference_mode, or frozen inputs) skips the autograd Function: same bits, no graph."""
    packed, state, x, A, B, b, _ = _problem(M, 40, 96, 8, torch.bfloat16)
    S = 1.7  # not a power of two: the inference path scales T inside the kernel, the Function scales it after
    Ag = A.clone().requires_grad_()
    want = qkernels.matmul_4bit_lora(x, packed, state, Ag, B, S, b, backend=backend)
    assert want.grad_fn is not None
    with torch.no_grad():
        got = qkernels.matmul_4bit_lora(x, packed, state, Ag, B, S, b, backend=backend)
    assert got.grad_fn is None
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    with torch.inference_mode():
        got = qkernels.matmul_4bit_lora(x, packed, state, A, B, S, b, backend=backend)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    got = qkernels.matmul_4bit_lora(x, packed, state, A, B, S, b, backend=backend)  # nothing requires grad
    assert got.grad_fn is None
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    torch.manual_seed(3)  # dropout in training mode still applies on the inference path
    with torch.no_grad():
        d1 = qkernels.matmul_4bit_lora(x, packed, state, A, B, S, b, 0.5, backend=backend)
    torch.manual_seed(3)
    d2 = qkernels.matmul_4bit_lora(x, packed, state, Ag, B, S, b, 0.5, backend=backend)
    torch.testing.assert_close(d1, d2.detach(), rtol=0, atol=0)
    assert not torch.equal(d1, want.detach())


def test_quant_storage_view():
    W = torch.randn(48, 64) * 0.05
    packed, state = qkernels.quantize_4bit(W, 64, quant_storage=torch.bfloat16)
    packed8, state8 = qkernels.quantize_4bit(W, 64)
    x = torch.randn(3, 64)
    A, B = torch.randn(4, 64), torch.randn(48, 4)
    torch.testing.assert_close(qkernels.matmul_4bit_lora(x, packed, state, A, B, 0.5),
                               qkernels.matmul_4bit_lora(x, packed8, state8, A, B, 0.5), rtol=0, atol=0)


def test_forward_saves_no_dequantized_weight():
    """The Function saves the packed weight (uint8) and skinny LoRA tensors, never a float tensor of N x K."""
    N, K, M, r = 256, 320, 4, 8
    packed, state, x, A, B, b, _ = _problem(M, N, K, r, torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    leaves = [t.requires_grad_() for t in (x, A, B)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = qkernels.matmul_4bit_lora(*leaves[:1], packed, state, *leaves[1:], 2.0, b, dropout_p=0.1)
    y.sum().backward()
    assert saved, "nothing was saved: the hook did not see the Function"
    big_float = [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() >= N * K]
    assert not big_float, f"forward saved float tensors of >= N*K elements: {big_float}"
    assert any(t.dtype == torch.uint8 and t.numel() == N * K // 2 for t in saved), "the packed weight is not saved"


def test_autocast_cpu_bf16():
    packed, state, x, A, B, b, _ = _problem(6, 40, 96, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = qkernels.matmul_4bit_lora(x.requires_grad_(), packed, state, A, B, 2.0, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    ref = qkernels.matmul_4bit_lora(x.detach().bfloat16(), packed, state, A, B, 2.0, b)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_cpu_gemv_limit_dispatch(dtype):
    """The CPU takes the fused GEMV up to the row count its kernel reports (more than 16 on AVX2 / AVX-512 when
    K % 32 == 0; none there when K % 32 != 0, whose GEMV is the scalar path) and dequantize + matmul past it; both
    sides of the limit are checked against float64 (forward and gradients)."""
    if "gemv_4bit_lora" not in qkernels._backend.native_ops(torch.device("cpu")):
        pytest.skip("this build has no native CPU GEMV (see qkernels.native_info())")
    vector_isa = _native._C.cpu_isa_active() in ("avx2", "avx512")
    for K in (128, 129):
        limit = _linear.gemv_max_m(torch.empty(1, K, dtype=dtype))
        if K % 32 == 0:
            assert limit >= _linear.GEMV_MAX_M
        else:  # the portable path: the vectorized dequantize + matmul wins on AVX2 / AVX-512 from one row
            assert limit == (0 if vector_isa else _linear.GEMV_MAX_M)
        for M, fused in ((limit, True), (limit + 1, False)):
            if M == 0:
                continue
            _check(M, 40, K, 8, dtype, "cpu", dropout_p=0.1)
            packed, state, x, A, B, b, _ = _problem(M, 40, K, 8, dtype)
            _linear.clear_workspace()
            with torch.no_grad():  # the forward alone (the backward's dx always dequantizes into the workspace)
                qkernels.matmul_4bit_lora(x, packed, state, A, B, 2.0, b, backend="cpu")
            path = "GEMV" if fused else "matmul"
            assert (_linear.workspace_bytes() == 0) == fused, f"K {K} M {M}: expected the {path} path"
    _linear.clear_workspace()


def test_workspace_is_reused():
    _linear.clear_workspace()
    M = _linear.gemv_max_m(torch.empty(1, 64)) + 1  # past the GEMV's limit: the dequantize + matmul path
    packed, state, x, A, B, b, _ = _problem(M, 48, 64, 4, torch.float32)
    qkernels.matmul_4bit_lora(x, packed, state, A, B, 2.0, b, backend="cpu")
    held = _linear.workspace_bytes()
    assert held == 48 * 64 * 4
    qkernels.matmul_4bit_lora(x, packed, state, A, B, 2.0, b, backend="cpu")
    assert _linear.workspace_bytes() == held
    _linear.clear_workspace()
    assert _linear.workspace_bytes() == 0


@pytest.mark.skipif(_linear._cpu_fp16_gemm(), reason="this CPU has AMX-FP16: float16 matmuls stay in float16 here")
def test_cpu_float16_large_m_multiplies_in_float32(monkeypatch):
    """Without a native float16 GEMM (torch's CPU fp16 matmul took seconds per training step at M 32), the large-M
    path dequantizes to float32 and multiplies there, forward and dx; the result is float16 and at least as close
    to float64 as plain float16 torch (the same 2x yardstick as every other case). The path held: the GEMV's limit
    at 16 rows and the fused float32 dX kernel off (both take float16 on the CPUs that have them)."""
    monkeypatch.setattr(_linear, "gemv_max_m", lambda x: _linear.GEMV_MAX_M)
    monkeypatch.setattr(_linear, "CPU_DX_FUSED", False)
    _linear.clear_workspace()
    _check(70, 48, 64, 4, torch.float16, "cpu", dropout_p=0.1)  # 70 rows: past the CPU GEMV's limit
    held = {k[2] for k in _linear._local.buffers}
    assert held == {torch.float32}, f"workspace dtypes {held}: the float16 matmuls did not run in float32"
    _linear.clear_workspace()
    monkeypatch.setattr(_linear, "_cpu_fp16_gemm", lambda: True)  # a CPU with AMX-FP16 keeps float16
    _check(70, 48, 64, 4, torch.float16, "cpu")
    assert {k[2] for k in _linear._local.buffers} == {torch.float16}
    _linear.clear_workspace()


@pytest.mark.skipif(_linear._cpu_fp16_gemm(), reason="this CPU has AMX-FP16: float16 matmuls stay in float16 here")
def test_cpu_float16_adapters_multiply_in_float32():
    """float16 x with float16 adapters (a model .half()'d after apply_qlora): the skinny LoRA products run in float32
    on a CPU without a float16 GEMM (the saved T = dropout(x) A^T is float32), and the gradients come back float16."""
    packed, state, x, A, B, b, gy = _problem(20, 48, 64, 4, torch.float16)
    A, B = A.half().requires_grad_(), B.half().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qkernels.matmul_4bit_lora(x.requires_grad_(), packed, state, A, B, 2.0, b)
    y.backward(gy)
    assert any(t.shape == (20, 4) and t.dtype == torch.float32 for t in saved), [(t.shape, t.dtype) for t in saved]
    assert A.grad.dtype == B.grad.dtype == x.grad.dtype == torch.float16
    _check(20, 48, 64, 4, torch.float16, "cpu")


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["avx512bf16", "no-bf16-gemm"])
def test_cpu_bfloat16_large_m_multiplies_in_float32_without_bf16_gemm(monkeypatch, fast_bf16):
    """bfloat16 keeps its own GEMM where the CPU has one (AVX512-BF16 / AMX); elsewhere (AVX2 machines: torch's bf16
    g @ W took ~18 s at 4096 x 4096, 128 rows, with oneDNN held to AVX2) the large-M path multiplies in float32.
    Either way forward and gradients are within the 2x-of-plain-bf16-torch bound against float64. The path held: the
    GEMV's limit at 16 rows and the fused float32 dX kernel off (the workspace's dtype tells the matmuls')."""
    monkeypatch.setattr(_linear, "_cpu_bf16_gemm", lambda: fast_bf16)
    monkeypatch.setattr(_linear, "gemv_max_m", lambda x: _linear.GEMV_MAX_M)
    monkeypatch.setattr(_linear, "CPU_DX_FUSED", False)
    _linear.clear_workspace()
    _check(70, 48, 64, 4, torch.bfloat16, "cpu", dropout_p=0.1)  # 70 rows: past the CPU GEMV's limit
    held = {k[2] for k in _linear._local.buffers}
    assert held == {torch.bfloat16 if fast_bf16 else torch.float32}, f"workspace dtypes {held}"
    _linear.clear_workspace()


# ------------------------------------------------------------------------ Triton, in the CPU interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])  # interpreter: no bf16 dot
@pytest.mark.parametrize("M,N,K,dropout_p", [(3, 48, 96, 0.0), (17, 33, 63, 0.25)], ids=["even", "odd-K-drop"])
def test_triton_backend_in_the_interpreter(M, N, K, dropout_p, dtype, monkeypatch, triton_interpreter):
    """The whole Function on the Triton kernels (fused dequant-GEMM forward, dX with the LoRA term and mask)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _check(M, N, K, 8, dtype, "triton", dropout_p=dropout_p)


def test_double_backward_triton_in_the_interpreter(monkeypatch, triton_interpreter):
    """The Triton forward, then a double backward (the differentiable torch path), against float64."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    test_double_backward(0.25, 3, "triton")


@pytest.mark.parametrize("r", [0, 4, 300], ids=["r0", "r4", "r300"])
def test_triton_backend_takes_what_the_others_take(r, monkeypatch, triton_interpreter):
    """Strided views of the LoRA weights, the bias and the absmax, and LoRA ranks the fused epilogue does not hold
    (empty r = 0 factors, r > MAX_LORA_RANK), run on the Triton backend as on the others; they were RuntimeErrors there
    ("lora_B must be contiguous", "lora_t must be [M, r] with 0 < r <= 256")."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    M, N, K = 5, 24, 40
    packed, state, x, _, _, b, gy = _problem(M, N, K, 0, torch.float32)
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(r, K, generator=g) / math.sqrt(K), torch.randn(N, r, generator=g) * 0.1
    strided = copy.copy(state)
    strided.absmax = torch.stack([state.absmax, torch.zeros_like(state.absmax)], 1).reshape(-1)[::2]

    def views(x_, A_, B_, b_):  # the same values, laid out as a transposed or every-other-element view
        return x_, A_.t().contiguous().t(), B_.t().contiguous().t(), torch.stack([b_, b_], 1)[:, 0]

    def ours(*leaves):
        return qkernels.matmul_4bit_lora(*views(*leaves)[:1], packed, strided, *views(*leaves)[1:3], 2.0,
                                         views(*leaves)[3], backend="triton")

    def plain(x_, A_, B_, b_, dt=torch.float32):
        return reference.matmul_4bit_lora(x_.to(dt), packed, state, A_.to(dt), B_.to(dt), 2.0, b_.to(dt))

    got = _grads(ours, x, A, B, b, gy)
    base = _grads(plain, x, A, B, b, gy)
    ref = _grads(lambda *t: plain(*t, dt=torch.float64), x, A, B, b, gy.double())
    keep = [i for i, t in enumerate(ref) if t.numel()]  # r = 0: dA and dB are empty
    _assert_close_to_fp64(*([t[i] for i in keep] for t in (got, base, ref, ["y", "dx", "dA", "dB", "dbias"])))


def test_triton_backend_refused_without_a_device(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    packed, state, x, A, B, b, _ = _problem(2, 32, 64, 4, torch.float32)
    with pytest.raises(ValueError, match="triton"):
        qkernels.matmul_4bit_lora(x, packed, state, A, B, 1.0, backend="triton")


# ----------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", None], ids=["cuda", "triton", "default"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("M", [1, 3, 16, 17, 113, 512])
def test_cuda_backends(M, dtype, backend):
    """On a GPU: the fused GEMV (M <= 16), dequantize + cuBLAS, and the Triton kernels, bf16 included."""
    _check(M, 96, 160, 8, dtype, backend, device="cuda")
    _check(M, 130, 257, 8, dtype, backend, device="cuda", dropout_p=0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("M", [1, 16, 1024])
def test_cuda_llama_shape(M, backend):
    _check(M, 4096, 4096, 16, torch.bfloat16, backend, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", None], ids=["cuda", "triton", "default"])
@pytest.mark.parametrize("M", [3, 130])
def test_autocast_cuda_bf16_with_float32_adapters(M, backend):
    """``torch.autocast("cuda", bfloat16)`` on float32 x with peft's float32 adapters (the QLoRA training setup): the
    matmuls run in bf16 (the GEMV at 3 rows, dequantize + cuBLAS or Triton at 130), y is bf16, the gradients come
    back float32 to x and the adapters, and the forward equals the call with x already in bf16."""
    packed, state, x, A, B, b, _ = _problem(M, 40, 96, 4, torch.float32, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = qkernels.matmul_4bit_lora(leaves[0], packed, state, leaves[1], leaves[2], 2.0, b, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert [t.grad.dtype for t in leaves] == [torch.float32] * 3
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    ref = qkernels.matmul_4bit_lora(x.bfloat16(), packed, state, A, B, 2.0, b, backend=backend)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    packed, state, x, A, B, b, _ = _problem(4, 32, 64, 4, torch.float32)
    f = qkernels.matmul_4bit_lora
    with pytest.raises(ValueError, match="last dim must be 64"):
        f(torch.randn(4, 63), packed, state, A, B, 1.0)
    with pytest.raises(ValueError, match=r"lora_A must be \[r, 64\]"):
        f(x, packed, state, A.t(), B, 1.0)
    with pytest.raises(ValueError, match="rank"):
        f(x, packed, state, A, torch.randn(32, 5), 1.0)
    with pytest.raises(ValueError, match="both"):
        f(x, packed, state, A, None, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        f(x, packed, state, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="bias"):
        f(x, packed, state, A, B, 1.0, torch.randn(31))
    with pytest.raises(TypeError, match="x must be"):
        f(x.long(), packed, state, A, B, 1.0)
    with pytest.raises(TypeError, match="quant_state"):
        f(x, packed, {"absmax": 1}, A, B, 1.0)
    with pytest.raises(ValueError, match="backend"):
        f(x, packed, state, A, B, 1.0, backend="tpu")
    wrong_state = qkernels.quantize_4bit(torch.randn(16, 64))[1]
    with pytest.raises(ValueError, match="does not belong|last dim"):
        f(x, packed[:10], wrong_state, A, B, 1.0)


def test_bad_input_types():
    """Non-tensor LoRA weights or bias, and an integer bias, are TypeErrors naming the argument (an AttributeError
    from deep inside before; an integer bias was silently cast, where nn.Linear refuses it)."""
    packed, state, x, A, B, b, _ = _problem(4, 32, 64, 4, torch.float32)
    f = qkernels.matmul_4bit_lora
    with pytest.raises(TypeError, match="lora_A must be a torch.Tensor"):
        f(x, packed, state, A.tolist(), B, 1.0)
    with pytest.raises(TypeError, match="lora_B must be a torch.Tensor"):
        f(x, packed, state, A, B.tolist(), 1.0)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        f(x, packed, state, A, B, 1.0, b.tolist())
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        f(x, packed, state, A, B, 1.0, torch.ones(32, dtype=torch.int64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_numpy_scalars_are_numbers(backend):
    """``scaling`` / ``dropout_p`` as NumPy scalars (what a config read with NumPy gives) act as the same Python
    floats; they were refused with a message saying 0.1 is not "a float in [0, 1)"."""
    np = pytest.importorskip("numpy")
    packed, state, x, A, B, b, _ = _problem(3, 32, 64, 4, torch.float32)
    torch.manual_seed(0)
    want = qkernels.matmul_4bit_lora(x, packed, state, A, B, 0.5, b, 0.25, backend=backend)
    torch.manual_seed(0)
    got = qkernels.matmul_4bit_lora(x, packed, state, A, B, np.float32(0.5), b, np.float64(0.25), backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("M", [1, 17], ids=["gemv", "blas"])
def test_non_contiguous_packed_is_refused(M, backend):
    """A strided view of the packed bytes is a ValueError on every path, as in dequantize_4bit. The fused GEMV
    (M <= 16) read such a view through its raw pointer, in storage order: a wrong answer and no error."""
    packed, state, x, A, B, b, _ = _problem(M, 32, 64, 4, torch.float32)
    strided = torch.cat([packed, torch.full_like(packed, 0x77)], 1)[:, :1]
    assert torch.equal(strided, packed) and not strided.is_contiguous()
    with pytest.raises(ValueError, match="packed must be contiguous"):
        qkernels.matmul_4bit_lora(x, strided, state, A, B, 1.0, b, backend=backend)
    nested = (state.state2.absmax, state.state2.code, state.offset, 256)
    with pytest.raises(RuntimeError, match="packed must be contiguous"):  # the op checks it too
        torch.ops.qkernels.linear_4bit(x, strided, state.absmax, state.code, 64, 32, *nested)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("M", [1, 17], ids=["gemv", "blas"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
def test_strided_scales(double_quant, M, backend):
    """A state whose absmax is a strided view (e.g. every other entry of a larger buffer) gives the same output as
    its dense copy. The native dequantize refused it, so a layer decoded (GEMV, M <= 16) but could not train."""
    packed, state, x, A, B, b, _ = _problem(M, 32, 64, 4, torch.float32, double_quant=double_quant)
    want = qkernels.matmul_4bit_lora(x, packed, state, A, B, 1.0, b, backend=backend)
    strided = copy.copy(state)
    strided.absmax = torch.stack([state.absmax, torch.zeros_like(state.absmax)], 1).reshape(-1)[::2]
    assert not strided.absmax.is_contiguous()
    got = qkernels.matmul_4bit_lora(x, packed, strided, A, B, 1.0, b, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- ops, compile
def _op_cases():
    packed, state, x, A, B, b, gy = _problem(5, 48, 96, 4, torch.float32)
    nested = (state.state2.absmax, state.state2.code, state.offset, 256)
    t = x @ A.t()
    ops = torch.ops.qkernels
    mask = (torch.rand(5, 96) > 0.3).float()
    return {
        "linear_4bit": (ops.linear_4bit.default, (x, packed, state.absmax, state.code, 64, 48, *nested, t, B, b)),
        "linear_4bit-bf16-large-M": (
            ops.linear_4bit.default,
            (torch.randn(40, 96).bfloat16(), packed, state.absmax, state.code, 64, 48, *nested),
        ),
        "linear_4bit_dx": (
            ops.linear_4bit_dx.default,
            (gy, packed, state.absmax, state.code, 64, 96, *nested, gy @ B, A, mask),
        ),
    }


@pytest.mark.parametrize("case", ["linear_4bit", "linear_4bit-bf16-large-M", "linear_4bit_dx"])
def test_opcheck(case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a non-contiguous view (every other element of a doubled buffer; a 2-D t: a transpose)."""
    if t.dim() == 2:
        return t.t().contiguous().t()
    return torch.stack([t, torch.zeros_like(t)], 1)[:, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ops_take_strided_arguments(dtype):
    """The ops give the same bits for strided arguments as for dense ones: torch.compile passes the ops whatever
    strides the graph produced, and opcheck only feeds dense tensors. Regression: the native path took the pointer of
    a strided bool mask's (and nested scales') contiguous() copy, which was freed before the kernel ran; with a float16
    lora_A the next allocation (its float32 copy, the same byte count) overwrote it (dx off by ~2500)."""
    N, K, r, M = 256, 512, 8, 4 * 8  # M * K mask bytes == r * K float32 bytes: the freed copy is reused at once
    packed, state, _, _, _, _, _ = _problem(1, N, K, r, torch.float32)
    g = torch.Generator().manual_seed(3)
    gy, x = torch.randn(M, N, generator=g).to(dtype), torch.randn(80, K, generator=g).to(dtype)  # 80 rows: no GEMV
    A, u = torch.randn(r, K, generator=g).half(), torch.randn(M, r, generator=g)
    mask = torch.rand(M, K, generator=g) > 0.5
    n2 = state.state2.absmax.numel()
    assert n2 >= 8, "want several nested blocks"
    ops = torch.ops.qkernels

    def dx(m, nested_absmax, nested_code):
        return ops.linear_4bit_dx(gy, packed, state.absmax, state.code, 64, K, nested_absmax, nested_code,
                                  state.offset, 256, u, A, m, 2.0)

    def y(nested_absmax, nested_code):
        return ops.linear_4bit(x, packed, state.absmax, state.code, 64, N, nested_absmax, nested_code, state.offset)

    dense = (state.state2.absmax, state.state2.code)
    strided = (_strided(state.state2.absmax), _strided(state.state2.code))
    assert not (mask.t().contiguous().t().is_contiguous() or strided[0].is_contiguous())
    assert torch.equal(dx(_strided(mask), *dense), dx(mask, *dense))
    assert torch.equal(dx(mask, *strided), dx(mask, *dense))
    assert torch.equal(y(*strided), y(*dense))


def test_compile_training_step_matches_eager():
    """fullgraph: forward and (through AOTAutograd) backward of the Function compile without graph breaks."""
    packed, state, x, A, B, b, _ = _problem(24, 48, 96, 8, torch.float32)

    def loss_fn(x, A, B, b):
        y = qkernels.matmul_4bit_lora(x, packed, state, A, B, 2.0, b)
        return (y.float() ** 2).mean()

    def step(fn):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, b)]
        fn(*leaves).backward()
        return [t.grad for t in leaves]

    eager = step(loss_fn)
    compiled = step(torch.compile(loss_fn, fullgraph=True))
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
