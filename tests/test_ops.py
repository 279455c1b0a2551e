"""The qkernels:: op registry: torch.library.opcheck on every op and device, torch.compile, argument checks."""

import pytest
import torch

import qkernels
from qkernels import _ops  # noqa: F401  (registers the ops)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _cases(device):
    A = torch.randn(130, 70, generator=torch.Generator().manual_seed(0)).to(device)
    p, s = qkernels.quantize_4bit(A, 64, double_quant=True)
    p1, s1 = qkernels.quantize_4bit(A.half(), 32, "fp4", double_quant=False)
    ops = torch.ops.qkernels
    return {
        "quantize_4bit": (ops.quantize_4bit.default, (A.bfloat16(), qkernels.nf4_codebook(device), 64)),
        "dequantize_4bit-nested": (
            ops.dequantize_4bit.default,
            (p, s.absmax, s.code, 64, [130, 70], torch.bfloat16, s.state2.absmax, s.state2.code, s.offset, 256),
        ),
        "dequantize_4bit": (ops.dequantize_4bit.default, (p1, s1.absmax, s1.code, 32, [130, 70], torch.float16)),
        "dequantize_4bit_out-nested": (
            ops.dequantize_4bit_out.default,
            (p, s.absmax, s.code, 64, torch.empty(130, 70, dtype=torch.bfloat16, device=device), s.state2.absmax,
             s.state2.code, s.offset, 256),
        ),
        "dequantize_4bit_out": (
            ops.dequantize_4bit_out.default, (p1, s1.absmax, s1.code, 32, torch.empty(130, 70, device=device))
        ),
        "quantize_blockwise": (
            ops.quantize_blockwise.default, (A.reshape(-1)[:999], qkernels.dynamic_map(device), 256)
        ),
        "dequantize_blockwise": (
            ops.dequantize_blockwise.default, (s.absmax, s.state2.absmax, s.state2.code, 256)
        ),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    ["quantize_4bit", "dequantize_4bit-nested", "dequantize_4bit", "dequantize_4bit_out-nested", "dequantize_4bit_out",
     "quantize_blockwise", "dequantize_blockwise"],
)
def test_opcheck(device, case):
    op, args = _cases(device)[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_dequantize_matmul_matches_eager():
    W = torch.randn(96, 160) * 0.05
    packed, state = qkernels.quantize_4bit(W, 64, double_quant=True)
    x = torch.randn(5, 160)

    def f(x):
        return x @ qkernels.dequantize_4bit(packed, state, dtype=torch.float32).t()

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True)(x)
    # Inductor may pick another float32 matmul kernel (different summation order): K = 160 products of O(1) terms
    # differ by a few ulps, so 1e-5 relative is ~100 float32 ulps of headroom; a wrong dequantization differs at 1e-1.
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    # the dequantized weight itself is bit-identical inside the graph
    g = torch.compile(lambda: qkernels.dequantize_4bit(packed, state), fullgraph=True)
    assert torch.equal(g(), qkernels.dequantize_4bit(packed, state))


def _op_events(fn) -> set[str]:
    """The qkernels:: ops dispatched while ``fn`` runs (from the profiler's op events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("qkernels::")}


def test_eager_quantize_dequantize_skip_the_op_dispatch_with_the_same_bits():
    """Eager calls run the ops' bodies directly (their checks are the public functions' own; the dispatch and
    torch._check calls cost ~40-60 us per call, several times a small weight's kernel), with the bits of the ops."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(70, 130, generator=g).to(torch.bfloat16)
    ops = torch.ops.qkernels
    for dq in (False, True):
        assert _op_events(lambda dq=dq: qkernels.quantize_4bit(A, 64, double_quant=dq)) == set()
        packed, st = qkernels.quantize_4bit(A, 64, double_quant=dq)
        p_op, a_op = ops.quantize_4bit(A, st.code, 64)
        assert torch.equal(packed, p_op)
        if dq:
            q_op, n_op = ops.quantize_blockwise(a_op - st.offset, st.state2.code, 256)
            assert torch.equal(st.absmax, q_op) and torch.equal(st.state2.absmax, n_op)
        else:
            assert torch.equal(st.absmax, a_op)
        nested = (st.state2.absmax, st.state2.code, st.offset, 256) if dq else ()
        want = ops.dequantize_4bit(packed, st.absmax, st.code, 64, [70, 130], torch.bfloat16, *nested)
        out = torch.empty(70, 130, dtype=torch.bfloat16)
        assert _op_events(lambda p=packed, s=st: qkernels.dequantize_4bit(p, s)) == set()
        assert _op_events(lambda p=packed, s=st, o=out: qkernels.dequantize_4bit(p, s, out=o)) == set()
        assert torch.equal(qkernels.dequantize_4bit(packed, st), want) and torch.equal(out, want)
    flat = A.float().reshape(-1)[:999]
    dyn = qkernels.dynamic_map()
    assert _op_events(lambda: qkernels.quantize_blockwise(flat, blocksize=256)) == set()
    q, am = qkernels.quantize_blockwise(flat, blocksize=256)
    q_op, am_op = ops.quantize_blockwise(flat, dyn, 256)
    assert torch.equal(q, q_op) and torch.equal(am, am_op)
    assert _op_events(lambda: qkernels.dequantize_blockwise(q, am, blocksize=256)) == set()
    assert torch.equal(qkernels.dequantize_blockwise(q, am, blocksize=256), ops.dequantize_blockwise(q, am, dyn, 256))
    # the profiler does see the ops when they are dispatched (the check above can fail)
    assert _op_events(lambda: ops.quantize_4bit(A, st.code, 64)) == {"qkernels::quantize_4bit"}


def test_jit_trace_of_quantize_dequantize_records_the_ops():
    """Under torch.jit.trace both functions go through the registered ops (the tracer records torch ops only; the
    eager shortcut to the kernels would have been recorded as the outputs' bare ``aten::empty``): a traced function
    gives eager's bits on new inputs. A forced native backend is refused there, naming the fix."""
    import warnings

    g = torch.Generator().manual_seed(2)
    A0, A1 = (torch.randn(40, 96, generator=g) for _ in range(2))
    p0, st = qkernels.quantize_4bit(A0, 64, double_quant=True)
    p1, _ = qkernels.quantize_4bit(A1, 64, double_quant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
        deq = torch.jit.trace(lambda p: qkernels.dequantize_4bit(p, st), (p0,), check_trace=False)
        quant = torch.jit.trace(lambda a: qkernels.quantize_4bit(a, 64)[0], (A0,), check_trace=False)
        bq = torch.jit.trace(lambda a: qkernels.quantize_blockwise(a)[0], (A0,), check_trace=False)
        q0, am0 = qkernels.quantize_blockwise(A0)
        bdq = torch.jit.trace(lambda q: qkernels.dequantize_blockwise(q, am0), (q0,), check_trace=False)
    assert torch.equal(deq(p1), qkernels.dequantize_4bit(p1, st))
    assert torch.equal(quant(A1), qkernels.quantize_4bit(A1, 64)[0])
    q1 = qkernels.quantize_blockwise(A1)[0]
    assert torch.equal(bq(A1), q1)
    assert torch.equal(bdq(q1), qkernels.dequantize_blockwise(q1, am0))
    with pytest.raises(ValueError, match="backend='cpu' cannot be traced"):
        torch.jit.trace(lambda p: qkernels.dequantize_4bit(p, st, backend="cpu"), (p0,))
    with pytest.raises(ValueError, match="backend='cpu' cannot be traced"):
        torch.jit.trace(lambda a: qkernels.quantize_4bit(a, 64, backend="cpu")[0], (A0,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.jit.trace(lambda p: qkernels.dequantize_4bit(p, st, backend="reference"), (p0,), check_trace=False)
    assert torch.equal(ref(p1), qkernels.dequantize_4bit(p1, st))


def test_dequantize_into_out_bumps_its_version_as_the_op_did():
    """Bug (the eager shortcut): writing ``out`` through the kernel left its version counter as it was, so a graph that
    saved the buffer (W = dequantize_4bit(..., out=buf) used in a matmul, then buf refilled for the next layer)
    computed gradients from the new values instead of raising, as the op's declared mutation makes autograd do."""
    g = torch.Generator().manual_seed(3)
    p1, s1 = qkernels.quantize_4bit(torch.randn(8, 64, generator=g), 64)
    p2, s2 = qkernels.quantize_4bit(torch.randn(8, 64, generator=g), 64)
    buf = torch.empty(8, 64)
    x = torch.randn(3, 64, generator=g, requires_grad=True)
    for backend in (None, "cpu", "reference"):
        v = buf._version
        W = qkernels.dequantize_4bit(p1, s1, out=buf, backend=backend)
        assert buf._version > v
        y = (x @ W.t()).sum()
        qkernels.dequantize_4bit(p2, s2, out=buf, backend=backend)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


def test_dispatch_modes_and_transforms_go_through_the_ops():
    """Bug (the eager shortcut): make_fx recorded only the output's allocation (the kernel writes through a raw
    pointer), fake tensors reached the kernels without storage, and vmap had no storage to read. Under a dispatch mode,
    a functorch transform or with a wrapper subclass the public functions and matmul_4bit_lora call the registered
    ops, which those handle: a make_fx graph gives eager's bits on new inputs, fake tensors get fake results, vmap
    gives the per-sample results."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(4)
    p0, st = qkernels.quantize_4bit(torch.randn(40, 96, generator=g), 64, double_quant=True)
    p1, _ = qkernels.quantize_4bit(torch.randn(40, 96, generator=g), 64, double_quant=True)
    gm = make_fx(lambda p: qkernels.dequantize_4bit(p, st))(p0)
    assert "qkernels.dequantize_4bit" in gm.code
    assert torch.equal(gm(p1), qkernels.dequantize_4bit(p1, st))
    q0, am = qkernels.quantize_blockwise(torch.randn(3, 300, generator=g))
    gq = make_fx(lambda q: qkernels.dequantize_blockwise(q, am))(q0)
    assert "qkernels.dequantize_blockwise" in gq.code
    q1 = qkernels.quantize_blockwise(torch.randn(3, 300, generator=g))[0]
    assert torch.equal(gq(q1), qkernels.dequantize_blockwise(q1, am))
    A, B = torch.randn(4, 96, generator=g) * 0.1, torch.randn(40, 4, generator=g) * 0.1
    for m in (1, 40):  # both sides of the GEMV switch
        x0, x1 = (torch.randn(m, 96, generator=g) for _ in range(2))
        gl = make_fx(lambda x: qkernels.matmul_4bit_lora(x, p0, st, A, B, 2.0))(x0)
        with torch.no_grad():
            assert torch.equal(gl(x1), qkernels.matmul_4bit_lora(x1, p0, st, A, B, 2.0)), m

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the state's tables stay real tensors
        out = qkernels.dequantize_4bit(mode.from_tensor(p0), st)
        assert out.shape == (40, 96) and type(out).__name__ == "FakeTensor"

    qs = torch.stack([q0.reshape(-1)[:256], q1.reshape(-1)[:256]])
    ams = torch.stack([am[:1], am[:1]])
    got = torch.vmap(lambda q, a: qkernels.dequantize_blockwise(q, a))(qs, ams)
    want = torch.stack([qkernels.dequantize_blockwise(q, a) for q, a in zip(qs, ams, strict=True)])
    assert torch.equal(got, want)


def test_op_argument_checks():
    p, s = qkernels.quantize_4bit(torch.randn(64, 64), 64, double_quant=False)
    ops = torch.ops.qkernels
    with pytest.raises(RuntimeError, match="absmax must have 64 entries"):
        ops.dequantize_4bit(p, s.absmax[:-1], s.code, 64, [64, 64], torch.float32)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        ops.dequantize_4bit(p, s.absmax, s.code, 48, [64, 64], torch.float32)
    with pytest.raises(RuntimeError, match="packed has 2048 bytes"):
        ops.dequantize_4bit(p, s.absmax[:1], s.code, 4096, [64, 65], torch.float32)
    with pytest.raises(RuntimeError, match="code must have 16 entries"):
        ops.quantize_4bit(torch.randn(64), torch.zeros(8), 64)
    with pytest.raises(RuntimeError, match="A must be float32, float16 or bfloat16"):
        ops.quantize_4bit(torch.ones(64, dtype=torch.int32), qkernels.nf4_codebook(), 64)
    with pytest.raises(RuntimeError, match="absmax must be uint8 codes when nested"):
        ops.dequantize_4bit(p, s.absmax, s.code, 64, [64, 64], torch.float32, s.absmax, qkernels.dynamic_map(),
                            torch.tensor(0.0), 256)


def test_op_lora_right_factor_shape_is_checked():
    """The kernels read the right LoRA factor through a raw pointer with the left factor's r: a lora_B (linear_4bit)
    or lora_A (linear_4bit_dx) of another shape was accepted and read past its end (a wrong result, or a crash)."""
    torch.manual_seed(0)
    p, s = qkernels.quantize_4bit(torch.randn(32, 64), 64)
    ops = torch.ops.qkernels
    nested = (s.state2.absmax, s.state2.code, s.offset, 256)
    x, g, t = torch.randn(3, 64), torch.randn(3, 32), torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=r"LoRA right factor must be \[32, 8\] .* got shape \(1, 1\)"):
        ops.linear_4bit(x, p, s.absmax, s.code, 64, 32, *nested, t, torch.randn(1, 1), None)
    with pytest.raises(RuntimeError, match=r"LoRA right factor must be \[32, 8\] .* got shape \(32, 2\)"):
        ops.linear_4bit(x, p, s.absmax, s.code, 64, 32, *nested, t, torch.randn(32, 2), None)
    with pytest.raises(RuntimeError, match=r"LoRA right factor must be \[8, 64\] .* got shape \(8, 1\)"):
        ops.linear_4bit_dx(g, p, s.absmax, s.code, 64, 64, *nested, t, torch.randn(8, 1), None, 1.0)
    with pytest.raises(RuntimeError, match=r"bias must be a floating-point tensor, got torch.int32"):
        ops.linear_4bit(x, p, s.absmax, s.code, 64, 32, *nested, None, None, torch.zeros(32, dtype=torch.int32))
    B = torch.randn(32, 8)  # the right shapes still run, and agree with the reference
    want = x @ qkernels.dequantize_4bit(p, s).t() + t @ B.t()
    torch.testing.assert_close(ops.linear_4bit(x, p, s.absmax, s.code, 64, 32, *nested, t, B, None), want)


def test_op_nested_arguments_are_checked():
    """nested_blocksize 0 raised ZeroDivisionError inside the check; 2**40 passed it (the reference decode then
    allocated 2**40 floats; past 2**63 the binding overflowed); a nested_absmax or offset on another device (meta) was
    read through its pointer as garbage; a shape of two negative sizes passed the element count check."""
    torch.manual_seed(0)
    p, s = qkernels.quantize_4bit(torch.randn(32, 64), 64)
    ops = torch.ops.qkernels

    def dq(nested_absmax=s.state2.absmax, offset=s.offset, nested_blocksize=256, shape=(32, 64)):
        return ops.dequantize_4bit(p, s.absmax, s.code, 64, list(shape), torch.float32, nested_absmax, s.state2.code,
                                   offset, nested_blocksize)

    for bad in (0, 3, 2**13, 2**40):
        with pytest.raises(RuntimeError, match=rf"nested_blocksize must be a power of two from 1 to 4096, got {bad}"):
            dq(nested_blocksize=bad)
    with pytest.raises(RuntimeError, match="nested_absmax is on meta, packed on cpu"):
        dq(nested_absmax=s.state2.absmax.to("meta"))
    with pytest.raises(RuntimeError, match="offset is on meta, packed on cpu"):
        dq(offset=s.offset.to("meta"))
    with pytest.raises(RuntimeError, match=r"shape \[-32, -64\] has a negative size"):
        dq(shape=(-32, -64))
    assert torch.equal(dq(), qkernels.dequantize_4bit(p, s))
