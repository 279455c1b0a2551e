"""Triton fused dequant-GEMM + LoRA kernels (qkernels.triton_kernels) against a float64 reference.

On a CPU machine the kernels run in Triton's interpreter. No environment variable is needed for that, and none is
set here: the launchers build interpreter kernels for CPU tensors on first use (see the triton_kernels docstring),
so this module cannot change how any other test module sees triton.

Tolerance (STYLE 12): ``err(kernel) <= 2 * err(torch) + ulp``, errors as max |. - ref| against the float64
reference ``ref`` computed from the same inputs and ``W64`` (the float32 dequantized weight, exact in float64).
``torch`` is the same computation in plain PyTorch in the same dtype (W dequantized to the dtype, then matmuls);
``ulp = finfo(dtype).eps * max|ref|``, one rounding of the output, which a single-store kernel pays even when its
accumulation is exact (it keeps the bound meaningful when torch happens to be nearly exact at tiny K).

The default run takes every combination of the axes that pick a code path in the kernel (shape class x blocksize
x nested scales x forward/dx) and cycles the other axes through them; ``QKERNELS_FULL_TRITON_SWEEP=1`` runs the
full cartesian product (~2.5k cases, tens of minutes here).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

import qkernels  # noqa: E402
from qkernels import reference  # noqa: E402
from qkernels.triton_kernels import matmul_4bit_lora_dx, matmul_4bit_lora_fwd, triton_available  # noqa: E402

MS = (1, 3, 16, 17, 113)
NKS = ((32, 64), (48, 96), (65, 130), (33, 63))  # aligned; aligned, K % 64 != 0; blocks straddle rows; odd K
BLOCKSIZES = (32, 64)
QTYPES = ("nf4", "fp4")
DTYPES = (torch.float16, torch.float32)  # bf16 is wrong in the interpreter (DESIGN §3): GPU tests below
RANKS = (1, 8)


@dataclass(frozen=True)
class Case:
    op: str  # "fwd" or "dx"
    M: int
    N: int
    K: int
    blocksize: int
    nested: bool
    qtype: str
    dtype: torch.dtype
    r: int  # 0: no LoRA term
    extra: bool  # bias (fwd) or dropout mask (dx)

    @property
    def id(self) -> str:
        extra = ("bias" if self.op == "fwd" else "mask") if self.extra else "plain"
        return (f"{self.op}-M{self.M}-N{self.N}-K{self.K}-bs{self.blocksize}-{'dq' if self.nested else 'fp32abs'}-"
                f"{self.qtype}-{str(self.dtype)[6:]}-r{self.r}-{extra}")


def _all_cases() -> list[Case]:
    return [Case(op, M, N, K, bs, nested, qt, dt, r, extra)
            for op, M, (N, K), bs, nested, qt, dt, r, extra in itertools.product(
                ("fwd", "dx"), MS, NKS, BLOCKSIZES, (False, True), QTYPES, DTYPES, RANKS, (False, True))]


def _default_cases() -> list[Case]:
    """Every (op, shape, blocksize, nested) combination; the other axes cycled with a stride coprime to their
    product (80), so each value of each axis appears and the pairs differ from one combination to the next."""
    rest = list(itertools.product(MS, QTYPES, DTYPES, RANKS, (False, True)))
    cases = []
    for i, (op, (N, K), bs, nested) in enumerate(itertools.product(("fwd", "dx"), NKS, BLOCKSIZES, (False, True))):
        M, qt, dt, r, extra = rest[(i * 37) % len(rest)]
        cases.append(Case(op, M, N, K, bs, nested, qt, dt, r, extra))
    return cases


# ------------------------------------------------------------------------------------------------ helpers
def _weight(N: int, K: int, blocksize: int, qtype: str, nested: bool, device="cpu", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) * 0.05).to(device)
    packed, state = qkernels.quantize_4bit(W, blocksize, qtype, double_quant=nested, **kw)
    return packed, state


def _w64(packed: torch.Tensor, state) -> torch.Tensor:
    """The dequantized weight in float64 (each element the float32 product code * scale, exactly)."""
    scales = state.absmax
    if state.nested:
        scales = reference.decode_nested_absmax(state.absmax, state.state2.absmax, state.state2.code, state.offset,
                                                state.state2.blocksize)
    raw = packed.reshape(-1).view(torch.uint8)
    return reference.dequantize_4bit(raw, scales, state.code, state.blocksize, state.numel, torch.float64).view(
        state.shape)


def _assert_within_2x_torch(got: torch.Tensor, plain: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == plain.dtype and got.shape == ref.shape
    err = (got.double() - ref).abs().max().item()
    err_torch = (plain.double() - ref).abs().max().item()
    ulp = torch.finfo(got.dtype).eps * ref.abs().max().item()
    assert err <= 2 * err_torch + ulp, f"{what}: error {err:.3g} > 2 x torch's {err_torch:.3g} + ulp {ulp:.3g}"


def _inputs(case: Case, device="cpu", lora_dtype=None):
    g = torch.Generator().manual_seed(1)
    rows, cols = (case.K, case.N) if case.op == "fwd" else (case.N, case.K)

    def rnd(*shape, scale=1.0, dtype=case.dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    a = rnd(case.M, rows)
    lora_dtype = lora_dtype or case.dtype
    lora_1 = rnd(case.M, case.r, scale=0.3, dtype=lora_dtype) if case.r else None
    lora_2 = None
    if case.r:
        lora_2 = rnd(case.N, case.r, scale=0.3) if case.op == "fwd" else rnd(case.r, case.K, scale=0.3)
    extra = None
    if case.extra and case.op == "fwd":
        extra = rnd(case.N)
    elif case.extra:
        keep = torch.rand(case.M, cols, generator=g) >= 0.25
        extra = (keep / 0.75).to(device, case.dtype)
    return a, lora_1, lora_2, extra


def _check_case(case: Case, device="cpu", lora_dtype=None) -> None:
    packed, state = _weight(case.N, case.K, case.blocksize, case.qtype, case.nested, device)
    a, l1, l2, extra = _inputs(case, device, lora_dtype)
    fn = matmul_4bit_lora_fwd if case.op == "fwd" else matmul_4bit_lora_dx
    _check_result(case, fn(a, packed, state, l1, l2, extra), packed, state, a, l1, l2, extra)


def _check_result(case: Case, got, packed, state, a, l1, l2, extra) -> None:
    """``got`` (the op's output on these inputs) against the float64 reference, within 2x plain torch's error."""
    W64 = _w64(packed, state)
    Wd = qkernels.dequantize_4bit(packed, state, dtype=case.dtype)
    d = case.dtype
    if case.op == "fwd":
        ref, plain = a.double() @ W64.T, a @ Wd.T
        if l1 is not None:
            ref, plain = ref + l1.double() @ l2.double().T, plain + l1.to(d) @ l2.T
        if extra is not None:
            ref, plain = ref + extra.double(), plain + extra
    else:
        ref, plain = a.double() @ W64, a @ Wd
        if l1 is not None:
            lo64, lo = l1.double() @ l2.double(), l1.to(d) @ l2
            if extra is not None:
                lo64, lo = lo64 * extra.double(), lo * extra
            ref, plain = ref + lo64, plain + lo
    _assert_within_2x_torch(got, plain, ref, case.id)


# ------------------------------------------------------------------------------------------ CPU (interpreter)
@pytest.mark.parametrize("case", _default_cases(), ids=lambda c: c.id)
def test_matches_fp64_reference(case, triton_interpreter):
    _check_case(case)


FULL_SWEEP = os.environ.get("QKERNELS_FULL_TRITON_SWEEP") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not FULL_SWEEP, reason="the full sweep takes tens of minutes in the interpreter: "
                    "set QKERNELS_FULL_TRITON_SWEEP=1")
@pytest.mark.parametrize("case", _all_cases() if FULL_SWEEP else [None], ids=lambda c: c.id if c else "all")
def test_full_sweep(case, triton_interpreter):
    _check_case(case)


@pytest.mark.parametrize("op", ["fwd", "dx"])
def test_float32_lora_operands_with_fp16_activations(op, triton_interpreter):
    _check_case(Case(op, 17, 65, 130, 64, True, "nf4", torch.float16, 8, True), lora_dtype=torch.float32)


@pytest.mark.parametrize("op", ["fwd", "dx"])
def test_no_lora_term_rank_16_and_large_M(op, triton_interpreter):
    _check_case(Case(op, 113, 48, 96, 32, True, "nf4", torch.float16, 0, False))
    _check_case(Case(op, 40, 33, 63, 64, False, "fp4", torch.float32, 16, True))


def test_quant_storage_out_and_leading_dims(triton_interpreter):
    """A bf16 quant_storage view of the bytes, x with two leading dims, and writing into out= buffers."""
    packed, state = _weight(48, 96, 64, "nf4", True, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    ref_packed, _ = _weight(48, 96, 64, "nf4", True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 96, generator=g, dtype=torch.float32)
    t, B, b = torch.randn(2, 5, 4, generator=g), torch.randn(48, 4, generator=g), torch.randn(48, generator=g)
    y = matmul_4bit_lora_fwd(x, packed, state, t, B, b)
    out = torch.full((2, 5, 48), float("nan"))
    assert matmul_4bit_lora_fwd(x, packed, state, t, B, b, out=out) is out
    expected = matmul_4bit_lora_fwd(x.reshape(10, 96), ref_packed, state, t.reshape(10, 4), B, b)
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y.reshape(10, 48), expected, rtol=0, atol=0)  # same bytes, same kernel
    torch.testing.assert_close(out, y, rtol=0, atol=0)
    gy = torch.randn(2, 5, 48, generator=g)
    u, A = torch.randn(2, 5, 4, generator=g), torch.randn(4, 96, generator=g)
    mask = (torch.rand(2, 5, 96, generator=g) > 0.5).float() * 2
    dx = matmul_4bit_lora_dx(gy, packed, state, u, A, mask)
    out = torch.full((2, 5, 96), float("nan"))
    assert matmul_4bit_lora_dx(gy, packed, state, u, A, mask, out=out) is out
    torch.testing.assert_close(out, dx, rtol=0, atol=0)
    W64 = _w64(ref_packed, state)
    ref = gy.double() @ W64 + (u.double() @ A.double()) * mask.double()
    plain = gy @ qkernels.dequantize_4bit(ref_packed, state, dtype=torch.float32) + (u @ A) * mask
    _assert_within_2x_torch(dx, plain, ref, "dx with leading dims")


def test_argument_errors_name_the_argument():
    packed, state = _weight(32, 64, 64, "nf4", True)
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="does not match the weight"):
        matmul_4bit_lora_fwd(torch.randn(3, 63), packed, state)
    with pytest.raises(RuntimeError, match="lora_B"):
        matmul_4bit_lora_fwd(x, packed, state, torch.randn(3, 4), torch.randn(31, 4))
    with pytest.raises(RuntimeError, match="pass both"):
        matmul_4bit_lora_fwd(x, packed, state, torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="lora_t must be one of"):
        matmul_4bit_lora_fwd(x.half(), packed, state, torch.randn(3, 4, dtype=torch.float64), torch.randn(32, 4))
    with pytest.raises(RuntimeError, match="bias"):
        matmul_4bit_lora_fwd(x, packed, state, bias=torch.randn(33))
    with pytest.raises(RuntimeError, match="lora_mask applies to the LoRA term"):
        matmul_4bit_lora_dx(torch.randn(3, 32), packed, state, lora_mask=torch.ones(3, 64))
    with pytest.raises(RuntimeError, match="out"):
        matmul_4bit_lora_dx(torch.randn(3, 32), packed, state, out=torch.empty(3, 64, dtype=torch.float16))


def test_ops_pass_opcheck_schema_and_fake(triton_interpreter):
    """Schema (mutation declared for out=) and fake-tensor shape propagation. The compile-path checks of opcheck
    need a traceable (compiled) kernel: GPU only, below."""
    packed, state = _weight(48, 96, 64, "nf4", True)
    x, t, B, b = torch.randn(5, 96), torch.randn(5, 4), torch.randn(48, 4), torch.randn(48)
    w = (packed, state.absmax, state.code, 64, 48, state.state2.absmax, state.state2.code, state.offset.reshape(1),
         256)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.qkernels.triton_matmul_4bit_lora_fwd.default, (x, *w, t, B, b), test_utils=utils)
    torch.library.opcheck(torch.ops.qkernels.triton_matmul_4bit_lora_fwd_out.default,
                          (x, *w, t, B, b, torch.empty(5, 48)), test_utils=utils)


@pytest.mark.parametrize("op", ["fwd", "dx"])
def test_ops_trace_to_triton_kernel_nodes(op):
    """STYLE 7 without a GPU: traced with fake CUDA tensors and functionalized (what torch.compile's AOT stage does),
    each op decomposes into a ``triton_kernel_wrapper_functional`` node holding the compiled kernel and its
    autotuning grid, not an opaque call. (Triton's mutation analysis needs a GPU driver; without one torch logs a
    warning and conservatively clones every tensor argument.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    packed, state = _weight(48, 96, 64, "nf4", True)
    real = [packed, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset.reshape(1)]
    rows, lead = (96, 48) if op == "fwd" else (48, 96)
    with FakeTensorMode():
        fake = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in real]
        a = torch.empty(128, rows, dtype=torch.bfloat16, device="cuda")
        l1 = torch.empty(128, 16, dtype=torch.bfloat16, device="cuda")
        l2 = torch.empty(*((48, 16) if op == "fwd" else (16, 96)), dtype=torch.bfloat16, device="cuda")
        extra = torch.empty(*((48,) if op == "fwd" else (128, 96)), dtype=torch.bfloat16, device="cuda")
        p, absmax, code, nabs, ncode, off = fake
        fn = getattr(torch.ops.qkernels, f"triton_matmul_4bit_lora_{op}")
        gm = make_fx(dispatch_functionalize(
            lambda *t: fn(t[0], t[1], t[2], t[3], 64, lead, t[4], t[5], t[6], 256, t[7], t[8], t[9])
        ))(a, p, absmax, code, nabs, ncode, off, l1, l2, extra)
    assert "triton_kernel_wrapper_functional" in gm.code
    assert f"'HAS_LORA': True, '{'HAS_BIAS' if op == 'fwd' else 'HAS_MASK'}': True" in gm.code


def _compile_for_sm90(op: str, dtype: str, nested: bool, row_aligned: bool, blocksize: int):
    """Compile one kernel variant with the first H100 tiling to PTX, no GPU needed: what the interpreter cannot
    check (the compiler's typing of constexpr branches, dot shapes, layouts)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qkernels import triton_kernels as tk

    kernel = getattr(tk._kernels(False), op).fn
    cfg = getattr(tk._kernels(False), op).configs[0]
    precision = "ieee" if dtype == "fp32" else "tf32"
    consts = dict(BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=256, NESTED=nested, ROW_ALIGNED=row_aligned, HAS_LORA=True,
                  R_PAD=16, DOT_PRECISION=precision, LORA_PRECISION=precision, **cfg.kwargs,
                  **{"HAS_BIAS" if op == "fwd" else "HAS_MASK": True})
    u8_or_f32 = "*u8" if nested else "*fp32"
    types = {"packed_ptr": "*u8", "absmax_ptr": u8_or_f32, "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
             "offset_ptr": "*fp32", "code_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "R": "i32"}
    signature = {a: "constexpr" if a in consts else types.get(a, "*" + dtype) for a in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return compiled.asm["ptx"]


@pytest.mark.parametrize("op", ["fwd", "dx"])
@pytest.mark.parametrize("variant", [("bf16", True, True, 64), ("bf16", True, True, 32), ("fp16", False, False, 64)],
                         ids=["bf16-dq-aligned-bs64", "bf16-dq-aligned-bs32", "fp16-plain-general-bs64"])
def test_kernels_compile_for_h100_without_a_gpu(op, variant):
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    ptx = _compile_for_sm90(op, *variant)
    assert "wgmma" in ptx  # Hopper tensor-core MMA: the in-loop dequantization did not force a slower dot path


def test_triton_available(monkeypatch):
    from qkernels.triton_kernels import interpreter_unusable_reason

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_available("cuda") and not triton_available("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available("cpu") == (interpreter_unusable_reason() is None)


def test_the_pinned_triton_interprets_the_kernels():
    """The interpreter tests skip where the interpreter cannot run the kernels (triton 3.6 with numpy >= 2.4); with
    the triton the project pins (Makefile: 3.9) they must run, or CI would skip them all without anyone noticing."""
    import triton
    from packaging.version import Version

    from qkernels.triton_kernels import interpreter_unusable_reason

    if Version(triton.__version__) < Version("3.9"):
        pytest.skip(f"triton {triton.__version__} is older than the pinned 3.9: the probe may rightly refuse it")
    assert interpreter_unusable_reason() is None


def test_an_interpreter_that_cannot_run_the_kernels_is_refused_saying_why(monkeypatch):
    """triton 3.6's interpreter with numpy >= 2.4 fails inside the kernels' K loop with a bare numpy TypeError; the
    probe's reason is what a caller sees instead, from the launcher and from matmul_4bit_lora's dispatch."""
    from qkernels import triton_kernels

    why = "Triton's interpreter fails on a loop bounded by a kernel argument here (a test's reason)"
    monkeypatch.setattr(triton_kernels, "interpreter_unusable_reason", lambda: why)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_available("cpu") and triton_available("cuda")
    packed, state = _weight(32, 64, 64, "nf4", True)
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match=r"a test's reason\)\. Upgrade triton .* backend='cpu' or 'reference'"):
        matmul_4bit_lora_fwd(x, packed, state)
    with pytest.raises(ValueError, match=r"Triton cannot run on cpu here: .*a test's reason"):
        qkernels.matmul_4bit_lora(x, packed, state, None, None, 1.0, backend="triton")


# ------------------------------------------------------------------------------------------------------ GPU
def _gpu_case(op, M, N, K, dtype, nested=True, bs=64, r=16, extra=True, qtype="nf4"):
    return Case(op, M, N, K, bs, nested, qtype, dtype, r, extra)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("op", ["fwd", "dx"])
def test_gpu_real_shape(op, dtype):
    _check_case(_gpu_case(op, 512, 4096, 4096, dtype), device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("case", [c for c in _all_cases() if c.dtype == torch.float16 and c.qtype == "nf4"
                                  and c.r == 8 and c.M in (17, 113)], ids=lambda c: c.id)
def test_gpu_awkward_shapes(case):
    """The compiled kernels (autotuned tilings, BLOCK_K up to 128) at the interpreter's awkward shapes, and bf16."""
    _check_case(case, device="cuda")
    _check_case(dataclasses.replace(case, dtype=torch.bfloat16), device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (tensors on cuda:1, cuda:0 current)")
@pytest.mark.parametrize("op", ["fwd", "dx"])
def test_gpu_tensors_on_a_device_that_is_not_current(op):
    """Triton launches on the current device: without a device guard in the launcher this case runs on cuda:0 with
    cuda:1's pointers (an illegal address, or wrong results)."""
    with torch.cuda.device(0):
        _check_case(_gpu_case(op, 64, 96, 128, torch.float16), device="cuda:1")
        _check_case(_gpu_case(op, 17, 65, 130, torch.bfloat16, nested=False), device="cuda:1")


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["fwd", "dx"])
def test_gpu_torch_compile_fullgraph(op):
    case = _gpu_case(op, 256, 384, 512, torch.bfloat16)
    packed, state = _weight(case.N, case.K, 64, "nf4", True, "cuda")
    a, l1, l2, extra = _inputs(case, "cuda")
    fn = matmul_4bit_lora_fwd if op == "fwd" else matmul_4bit_lora_dx
    compiled = torch.compile(lambda a, l1, l2, e: fn(a, packed, state, l1, l2, e) * 2, fullgraph=True)
    # Inductor autotunes a user Triton kernel again on its own (triton_heuristics.user_autotune over the same
    # configs), so it may pick another tiling than eager did: another accumulation order, other last bits. Both are
    # held to the fp64 bound instead of to each other; "* 2" (exact) checks the op sits inside the compiled graph.
    _check_result(case, compiled(a, l1, l2, extra) / 2, packed, state, a, l1, l2, extra)
    _check_result(case, fn(a, packed, state, l1, l2, extra), packed, state, a, l1, l2, extra)


@pytest.mark.cuda
def test_gpu_opcheck():
    packed, state = _weight(256, 512, 64, "nf4", True, "cuda")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(64, 512, generator=g).cuda().bfloat16(), torch.randn(64, 16, generator=g).cuda().bfloat16()
    B, b = torch.randn(256, 16, generator=g).cuda().bfloat16(), torch.randn(256, generator=g).cuda().bfloat16()
    w = (packed, state.absmax, state.code, 64, 256, state.state2.absmax, state.state2.code, state.offset.reshape(1),
         256)
    torch.library.opcheck(torch.ops.qkernels.triton_matmul_4bit_lora_fwd.default, (x, *w, t, B, b))
    gy = torch.randn(64, 256, generator=g).cuda().bfloat16()
    A = torch.randn(16, 512, generator=g).cuda().bfloat16()
    w_dx = (*w[:4], 512, *w[5:])
    torch.library.opcheck(torch.ops.qkernels.triton_matmul_4bit_lora_dx.default, (gy, *w_dx, t, A, None))
