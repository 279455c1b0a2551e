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

import contextlib
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


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0-rows", "2x0-rows"])
def test_no_rows_launches_nothing(lead, monkeypatch):
    """M = 0 returns empty results without reaching a kernel: on the GPU the autotuner would have timed six empty
    grids and kept the winner of that noise for every M up to 16 (the same bucket)."""
    from qkernels import triton_kernels as tk

    packed, state = _weight(48, 96, 64, "nf4", True)

    def no_kernels(interpret):
        raise AssertionError("a kernel was built for an empty input")

    monkeypatch.setattr(tk, "_kernels", no_kernels)
    t, B = torch.randn(*lead, 4), torch.randn(48, 4)
    assert matmul_4bit_lora_fwd(torch.randn(*lead, 96), packed, state, t, B).shape == (*lead, 48)
    assert matmul_4bit_lora_dx(torch.randn(*lead, 48), packed, state, t, torch.randn(4, 96)).shape == (*lead, 96)


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


def _compile(op: str, dtype: str, nested: bool, row_aligned: bool, blocksize: int, *, cfg=None, r_pad: int = 16,
             lora_dtype: str | None = None, arch: int = 90):
    """Compile one kernel variant to a cubin for ``sm_<arch>`` without a GPU (what the interpreter cannot check: the
    compiler's typing of constexpr branches, dot shapes, layouts, shared memory), with the precisions ``_launch``
    picks for ``dtype`` activations. ``cfg``: a ``triton.Config`` (default: the first of the set ``_launch`` uses)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qkernels import triton_kernels as tk

    act = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    precision = tk._dot_precision(act)
    tuner = getattr(tk._kernels(False), f"{op}_fma" if precision == "ieee" else op)
    cfg = cfg or tuner.configs[0]
    consts = dict(BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=256, NESTED=nested, ROW_ALIGNED=row_aligned, HAS_LORA=True,
                  R_PAD=r_pad, DOT_PRECISION=precision, LORA_PRECISION=tk._lora_precision(act), **cfg.kwargs,
                  **{"HAS_BIAS" if op == "fwd" else "HAS_MASK": True})
    u8_or_f32 = "*u8" if nested else "*fp32"
    lora = "*" + (lora_dtype or dtype)
    types = {"packed_ptr": "*u8", "absmax_ptr": u8_or_f32, "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
             "offset_ptr": "*fp32", "code_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
             "M_KEY": "i32", "lora_t_ptr": lora, "lora_u_ptr": lora}
    signature = {a: "constexpr" if a in consts else types.get(a, "*" + dtype) for a in tuner.fn.arg_names}
    return triton.compile(ASTSource(tuner.fn, signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _compile_for_sm90(op: str, dtype: str, nested: bool, row_aligned: bool, blocksize: int):
    return _compile(op, dtype, nested, row_aligned, blocksize).asm["ptx"]


def _needs_nvidia_backend():
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")


@pytest.mark.parametrize("op", ["fwd", "dx"])
@pytest.mark.parametrize("variant", [("bf16", True, True, 64), ("bf16", True, True, 32), ("fp16", False, False, 64),
                                     ("bf16", False, True, 4096), ("fp16", True, False, 128)],
                         ids=["bf16-dq-aligned-bs64", "bf16-dq-aligned-bs32", "fp16-plain-general-bs64",
                              "bf16-plain-aligned-bs4096", "fp16-dq-general-bs128"])
def test_kernels_compile_for_h100_without_a_gpu(op, variant):
    _needs_nvidia_backend()
    ptx = _compile_for_sm90(op, *variant)
    assert "wgmma" in ptx  # Hopper tensor-core MMA: the in-loop dequantization did not force a slower dot path


H100_SMEM_PER_BLOCK = 232448  # 227 KiB: the most shared memory one block may opt into on sm_90 (H100 and H200)


def _cubin_stack_bytes(cubin: bytes, tmp_path) -> int:
    """Per-thread local memory (spills + stack) of the kernel in ``cubin``, read with triton's bundled cuobjdump."""
    import re
    import subprocess

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("triton's NVIDIA backend ships no cuobjdump here")
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", out).group(1))


@pytest.mark.parametrize("kernel_set", ["fwd", "dx", "fwd_fma", "dx_fma"])
def test_every_autotune_config_fits_an_h100_at_the_rank_limit(kernel_set):
    """Every tiling the autotuner may pick compiles for sm_90a with its shared memory within a block's 227 KiB at
    the largest epilogue: r = MAX_LORA_RANK with float32 LoRA operands (peft's float32 adapters). A tiling over the
    limit is dropped by the autotuner at run time, but only after compiling it; at r = 256 four of the six forward
    tilings were over (256 KiB). The FMA set (float32 activations, exact dots) at its own worst case, float32
    everywhere."""
    _needs_nvidia_backend()
    from qkernels import triton_kernels as tk

    op = kernel_set.split("_")[0]
    fma = kernel_set.endswith("fma")
    r_pad = tk._r_pad(tk.MAX_LORA_RANK)
    for cfg in getattr(tk._kernels(False), kernel_set).configs:
        compiled = _compile(op, "fp32" if fma else "bf16", True, False, 32, cfg=cfg, r_pad=r_pad, lora_dtype="fp32")
        what = f"{kernel_set} {cfg}"
        assert compiled.metadata.shared <= H100_SMEM_PER_BLOCK, f"{what}: {compiled.metadata.shared} bytes of smem"
        assert fma or "wgmma" in compiled.asm["ptx"], f"{what}: no tensor-core MMA"


@pytest.mark.parametrize("op", ["fwd", "dx"])
def test_exact_float32_tilings_do_not_spill(op, tmp_path):
    """float32 activations with exact dots run on CUDA cores (FMA loops). On the tensor-core tilings that compiled to
    32 registers and a 6.8 KiB stack (13-35 KiB of spill stores per thread) and 20-100 s per tiling; the FMA set
    must keep its K loop in registers (r = 16: the epilogue small)."""
    _needs_nvidia_backend()
    from qkernels import triton_kernels as tk

    for cfg in getattr(tk._kernels(False), f"{op}_fma").configs:
        compiled = _compile(op, "fp32", True, True, 64, cfg=cfg)
        assert _cubin_stack_bytes(compiled.asm["cubin"], tmp_path) <= 1024, f"{op}_fma {cfg}: spills"


def test_kernels_compile_for_a100():
    """The CUDA build targets sm_80 too (QKERNELS_CUDA_ARCHS): the kernels must lower to Ampere's mma.sync."""
    _needs_nvidia_backend()
    ptx = _compile("fwd", "bf16", True, True, 64, arch=80).asm["ptx"]
    assert "mma.sync" in ptx and "wgmma" not in ptx


def test_lora_precision_uses_tensor_cores_for_float32_adapters():
    """float32 LoRA operands with 16-bit activations: TF32 (tensor cores); float32 activations follow torch's rule."""
    pytest.importorskip("triton")
    from qkernels import triton_kernels as tk

    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert tk._lora_precision(torch.bfloat16) == tk._lora_precision(torch.float16) == "tf32"
        assert tk._lora_precision(torch.float32) == tk._dot_precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert tk._lora_precision(torch.float32) == "tf32"
    finally:
        matmul.allow_tf32 = saved


def test_autotune_key_buckets_m_and_names_the_constexprs():
    """The tuning is keyed on M's power-of-two bucket (keyed on M itself, every new token count re-benchmarked six
    tilings) and on the constexprs that change a tile's work; triton adds the dtypes itself."""
    pytest.importorskip("triton")
    from qkernels import triton_kernels as tk

    assert [tk._m_key(m) for m in (0, 1, 16, 17, 300, 512, 513, 4096)] == [16, 16, 16, 32, 512, 512, 1024, 4096]
    kernels = tk._kernels(False)
    for name, extra in (("fwd", "HAS_BIAS"), ("dx", "HAS_MASK"), ("fwd_fma", "HAS_BIAS"), ("dx_fma", "HAS_MASK")):
        tuner = getattr(kernels, name)
        assert "M" not in tuner.keys
        assert {"M_KEY", "N", "K", "R", "BLOCKSIZE", "NESTED", "ROW_ALIGNED", "HAS_LORA", extra} <= set(tuner.keys)
        assert set(tuner.keys) <= set(tuner.arg_names)


@pytest.mark.parametrize("op", ["fwd", "dx"])
def test_traced_ops_keep_m_symbolic(op):
    """Traced with a symbolic number of rows (torch.compile's dynamic shapes), the launcher must pass M on as a
    SymInt: ``int(M)`` there added the guard ``M == 128``, i.e. a recompilation for every new batch size."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    packed, state = _weight(48, 96, 64, "nf4", True)
    real = [packed, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset.reshape(1)]
    env = ShapeEnv()
    m = env.create_symintnode(env.create_symbol(128, ConstantSource("M"), dynamic_dim=DimDynamic.DYNAMIC), hint=128)
    rows, lead = (96, 48) if op == "fwd" else (48, 96)
    with FakeTensorMode(shape_env=env):
        fake = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in real]
        a = torch.empty(m, rows, dtype=torch.bfloat16, device="cuda")
        l1 = torch.empty(m, 16, dtype=torch.bfloat16, device="cuda")
        l2 = torch.empty(*((48, 16) if op == "fwd" else (16, 96)), dtype=torch.bfloat16, device="cuda")
    fn = getattr(torch.ops.qkernels, f"triton_matmul_4bit_lora_{op}")
    gm = make_fx(dispatch_functionalize(
        lambda *t: fn(t[0], t[1], t[2], t[3], 64, lead, t[4], t[5], t[6], 256, t[7], t[8], None)
    ), tracing_mode="symbolic")(a, *fake, l1, l2)
    assert "triton_kernel_wrapper_functional" in gm.code
    assert "'M': sym_size" in gm.code, "M was passed as a constant"
    assert not env.guards, f"tracing specialized on {[str(g.expr) for g in env.guards]}"


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


@contextlib.contextmanager
def _one_tiling(i: int):
    """Run with only the ``i``-th tiling (modulo the set's size) of each kernel set. Autotuning every awkward case
    compiled all six tilings of each of its ~64 constexpr variants in each xdist worker and timed them (~7 s a
    case): past the GPU session's test budget. One tiling per case, round-robin over the cases, runs every tiling
    at awkward shapes for a sixth of the compiles and no timing."""
    from qkernels import triton_kernels as tk

    kernels = tk._kernels(False)
    saved = {name: getattr(kernels, name).configs for name in ("fwd", "dx", "fwd_fma", "dx_fma")}
    try:
        for name, configs in saved.items():
            getattr(kernels, name).configs = [configs[i % len(configs)]]
        yield
    finally:
        for name, configs in saved.items():
            getattr(kernels, name).configs = configs


_AWKWARD = [c for c in _all_cases() if c.dtype == torch.float16 and c.qtype == "nf4" and c.r == 8 and c.M in (17, 113)]


def test_awkward_gpu_cases_run_every_tiling():
    """The round-robin of test_gpu_awkward_shapes reaches every tiling of both kernels, and restores the sets."""
    pytest.importorskip("triton")
    from qkernels import triton_kernels as tk

    kernels = tk._kernels(False)
    before = {name: list(getattr(kernels, name).configs) for name in ("fwd", "dx")}
    seen = {"fwd": set(), "dx": set()}
    for i, case in enumerate(_AWKWARD):
        for j in (i, i + 3):
            with _one_tiling(j):
                assert len(kernels.fwd.configs) == len(kernels.dx_fma.configs) == 1
                seen[case.op].add(str(getattr(kernels, case.op).configs[0]))
    assert {name: list(getattr(kernels, name).configs) for name in ("fwd", "dx")} == before
    assert {name: len(s) for name, s in seen.items()} == {name: len(c) for name, c in before.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("i", range(len(_AWKWARD)), ids=[c.id for c in _AWKWARD])
def test_gpu_awkward_shapes(i):
    """The compiled kernels (every tiling, round-robin) at the interpreter's awkward shapes, and bf16."""
    case = _AWKWARD[i]
    with _one_tiling(i):
        _check_case(case, device="cuda")
    with _one_tiling(i + 3):
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


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["fwd", "dx"])
@pytest.mark.parametrize("r", [64, 128])
def test_gpu_float32_lora_operands_at_the_rank_limit(op, r):
    """peft's float32 adapters with bf16 activations up to the largest fused rank: the TF32 epilogue (compiled, never
    run before) within the 2x-torch bound, and every tiling the autotuner tries launches (none over shared memory)."""
    _check_case(_gpu_case(op, 300, 384, 512, torch.bfloat16, r=r), device="cuda", lora_dtype=torch.float32)


@pytest.mark.cuda
def test_gpu_autotune_reused_within_an_m_bucket():
    """M = 300, 400 and 512 share the bucket 512: one tuning, not three."""
    from qkernels import triton_kernels as tk

    tuner = tk._kernels(False).fwd
    packed, state = _weight(320, 640, 64, "nf4", True, "cuda")
    before = set(tuner.cache)
    for m in (300, 400, 512):
        x = torch.randn(m, 640, device="cuda", dtype=torch.bfloat16)
        matmul_4bit_lora_fwd(x, packed, state)
    new = set(tuner.cache) - before
    assert len(new) <= 1 and all(key[0] == 512 for key in new), new
