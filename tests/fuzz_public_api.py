"""Fuzz driver: random and adversarial calls to qkernels' public surface, every outcome classified.

Not collected by pytest (the file name does not start with ``test_``). Run from the repository root:

    python tests/fuzz_public_api.py --cases 2000 --seed 0            # every CPU path: default, avx2, scalar
    python tests/fuzz_public_api.py --cases 300 --isa default --only matmul
    python tests/fuzz_public_api.py --seed 0 --case 117 --isa scalar  # replay one case in this process

Surfaces: ``quantize_4bit``, ``dequantize_4bit`` (with and without ``out=``), ``quantize_blockwise`` /
``dequantize_blockwise``, ``matmul_4bit_lora`` (forward and backward), ``QuantState`` (``as_dict`` /
``from_dict`` / ``validate``, mutated dicts and JSON blobs), ``QLoRALinear`` (construction, forward, backward,
``load_state_dict`` of the layer and of an ``apply_qlora``'d model with mutated state dicts) and the ops
``torch.ops.qkernels.*`` called directly; each with ``backend`` None / "cpu" / "reference" where it takes one. The
CPU SIMD path is picked by ``QKERNELS_CPU_ISA``, read by the kernels: each ISA runs in its own child processes.

Each case is built from ``random.Random(f"{seed}:{index}")``, so ``--case`` replays it. Cases run in child
processes, a batch each; a child that dies (a signal: segfault, abort) is reported as a crash of the case it had
started, and the batch resumes after it. Outcomes:

- ``ok``: a valid input gave the result of the reference (bit for bit where the format says so, else within a
  dtype tolerance); ``clean``: an invalid input raised TypeError / ValueError (or a torch._check RuntimeError from
  an op) whose message names the argument;
- ``crash``, ``wrong`` (a valid input, a different result), ``unhelpful`` (an invalid input raised an exception
  of an unhelpful type, IndexError, AttributeError, ZeroDivisionError, ..., or one whose message names none of the
  culprit's names), ``accepted`` (an invalid input returned a result), ``refused`` (a valid input raised).

The last five are problems; the summary lists each with its replay command. Exit status 1 when there is one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# this checkout's qkernels, not an installed one (the script's own directory is tests/)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _fuzz_batches import run_batches  # noqa: E402 - beside this script (its directory is on sys.path)

PROBLEMS = ("crash", "wrong", "unhelpful", "accepted", "refused")
ISAS = ("default", "avx2", "scalar")


# ------------------------------------------------------------------------------------------------ a case
@dataclass
class Case:
    """One call: ``run()`` does it and returns the result; ``expect()`` (valid inputs) the reference's result."""

    surface: str
    desc: str
    run: Callable[[], Any]
    valid: bool
    names: tuple[str, ...] = ()  # for an invalid input: words one of which the error message must contain
    expect: Callable[[], Any] | None = None
    exact: bool = True  # compare bit for bit (else within a dtype tolerance)
    tol: float | None = None  # relative tolerance when not exact (default: by the result's dtype)
    extra: dict = field(default_factory=dict)


def _tolerances() -> dict:
    import torch

    return {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 8e-2}


def _pick(rng: random.Random, options):
    return options[rng.randrange(len(options))]


# ------------------------------------------------------------------------------------------------ comparisons
def _same(got, want, exact: bool, tol: float | None = None) -> str | None:
    """None when ``got`` matches ``want`` (tensors, or tuples/lists of them), else what differs."""
    import torch

    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"expected a sequence of {len(want)}, got {type(got).__name__}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            why = _same(g, w, exact, tol)
            if why:
                return f"[{i}] {why}"
        return None
    if want is None:
        return None if got is None else f"expected None, got {type(got).__name__}"
    if not isinstance(want, torch.Tensor):
        return None if got == want else f"expected {want!r}, got {got!r}"
    if not isinstance(got, torch.Tensor):
        return f"expected a tensor, got {type(got).__name__}"
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != {want.dtype}"
    if exact:
        if torch.equal(got, want) or (got.is_floating_point() and torch.equal(got.isnan(), want.isnan())
                                      and torch.equal(got.nan_to_num(), want.nan_to_num())):
            return None
        return f"not bit-equal (max |diff| {(got.double() - want.double()).abs().max().item():.3g})"
    g, w = got.double(), want.double()
    bad = ~torch.isfinite(w)
    if bad.any():  # overflow in a half dtype: both must be non-finite there
        if not bool((~torch.isfinite(g))[bad].all()):
            return "the reference overflowed where this result is finite"
        g, w = g.masked_fill(bad, 0), w.masked_fill(bad, 0)
    tol = tol or _tolerances().get(want.dtype, 1e-4)
    scale = w.abs().max().item() if w.numel() else 0.0
    err = (g - w).abs().max().item() if w.numel() else 0.0
    if not math.isfinite(err) or err > tol * max(scale, 1.0):
        return f"max |diff| {err:.3g} > {tol} * {max(scale, 1.0):.3g}"
    return None


_UNHELPFUL_TYPES = (IndexError, KeyError, AttributeError, ZeroDivisionError, OverflowError, AssertionError,
                    UnboundLocalError, NameError, StopIteration, MemoryError)


def classify(case: Case) -> tuple[str, str]:
    """Run ``case``; return ``(outcome, detail)``."""
    import torch

    try:
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            got = case.run()
    except Exception as e:  # noqa: BLE001 - classifying every exception is the point
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:400]
        if case.valid:
            return "refused", msg + " | " + traceback.format_exc().strip().splitlines()[-3].strip()[:200]
        if isinstance(e, _UNHELPFUL_TYPES) or not isinstance(e, (TypeError, ValueError, RuntimeError)):
            return "unhelpful", msg
        text = str(e).lower()
        if case.names and not any(n.lower() in text for n in case.names):
            return "unhelpful", f"{msg} (names none of {case.names})"
        if isinstance(e, RuntimeError) and ("enforce fail" in text or "can't allocate" in text):
            return "unhelpful", msg
        return "clean", msg
    if not case.valid:
        return "accepted", f"returned {type(got).__name__} for an invalid input"
    if case.expect is None:
        return "ok", ""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        want = case.expect()
    why = _same(got, want, case.exact, case.tol)
    return ("wrong", why) if why else ("ok", "")


# ------------------------------------------------------------------------------------------------ building inputs
def _tensor(rng: random.Random, shape, dtype=None, layout: str = "dense", scale: float | None = None):
    """A random float tensor of ``shape``: dense, or a non-contiguous view with the same values."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    base = torch.randn(tuple(shape), generator=g) * (rng.choice([1.0, 0.01, 100.0]) if scale is None else scale)
    if not dtype.is_floating_point:
        base = (base * 10).to(dtype) if dtype != torch.bool else base > 0
    else:
        base = base.to(dtype)
    if layout == "transposed" and len(shape) == 2:
        return base.t().contiguous().t()
    if layout == "strided":
        return torch.stack([base, torch.zeros_like(base)], -1)[..., 0]
    return base


def _weight(rng: random.Random, *, matrix: bool = True):
    """A random quantized weight: ``(W, packed, state, info)``."""
    import torch

    import qkernels

    bs = _pick(rng, [32, 64, 64, 128, 256, 4096])
    if matrix:
        N = _pick(rng, [1, 3, 16, 32, 33, 64])
        K = _pick(rng, [1, 31, 64, 65, 96, 128, 200])
        shape = (N, K)
    else:
        shape = _pick(rng, [(1,), (7,), (64,), (3, 5, 7), (130,), (2, 300), (1025,)])
    dt = _pick(rng, [torch.float32, torch.float16, torch.bfloat16])
    W = _tensor(rng, shape, dt)
    qt = _pick(rng, ["nf4", "fp4"])
    dq = rng.random() < 0.6
    storage = _pick(rng, [torch.uint8, torch.uint8, torch.bfloat16, torch.float16, torch.float32])
    p, s = qkernels.quantize_4bit(W, bs, qt, dq, storage, backend="reference")
    return W, p, s, dict(bs=bs, shape=shape, dtype=dt, qt=qt, dq=dq, storage=storage)


def _u8(p):
    import torch

    return p if p.dtype == torch.uint8 else p.reshape(-1).view(torch.uint8)


# ------------------------------------------------------------------------------------------------ generators
def gen_quantize(rng: random.Random) -> Case:
    import torch

    import qkernels

    shape = _pick(rng, [(64,), (1,), (7,), (3, 5), (33, 65), (2, 3, 40), (4097,), (), (0,), (0, 16)])
    dtype = _pick(rng, [torch.float32] * 6 + [torch.float16, torch.bfloat16] * 2 + [torch.float64, torch.int32,
                                                                                    torch.bool, torch.complex64])
    layout = _pick(rng, ["dense", "dense", "transposed", "strided"])
    A = _tensor(rng, shape, dtype if dtype != torch.complex64 else torch.float32, layout)
    if dtype == torch.complex64:
        A = A.to(torch.complex64)
    special = rng.random()
    names: tuple[str, ...] = ()
    valid = dtype in (torch.float32, torch.float16, torch.bfloat16) and A.numel() > 0
    if not valid:
        names = ("A",)
    if valid and special < 0.1:
        A = A.clone()  # keeps A's layout; A.reshape(-1) of a strided A is a copy, so index A itself
        at = torch.unravel_index(torch.tensor(rng.randrange(A.numel())), A.shape)
        A[tuple(int(i) for i in at)] = _pick(rng, [float("nan"), float("inf"), -float("inf")])
        valid, names = False, ("nan",)
    elif valid and special < 0.15:
        A = torch.zeros_like(A)
    clean = rng.random() < 0.5  # half the calls with valid arguments (A may still be bad)
    bs = _pick(rng, [32, 64, 128, 4096, 64, 64] + ([] if clean else [0, -64, 48, 16, 8192, 2**40, 64.0, "64", True,
                                                                       None]))
    qt = _pick(rng, ["nf4", "fp4", "nf4"] + ([] if clean else ["NF4", "int4", None]))
    dq = _pick(rng, [True, False, True] + ([] if clean else [1, None]))
    storage = _pick(rng, [torch.uint8, torch.uint8, torch.bfloat16, torch.float32] + (
        [] if clean else [torch.int8, torch.float64, "uint8"]))
    backend = _pick(rng, [None, "cpu", "reference"])
    if type(bs) is not int or bs not in (32, 64, 128, 4096):
        valid, names = False, (*names, "blocksize")
    if qt not in ("nf4", "fp4"):
        valid, names = False, (*names, "quant_type")
    if not isinstance(dq, bool):
        valid, names = False, (*names, "double_quant")
    if storage not in (torch.uint8, torch.bfloat16, torch.float32):
        valid, names = False, (*names, "quant_storage")

    def run():
        p, s = qkernels.quantize_4bit(A, bs, qt, dq, storage, backend=backend)
        return p, _state_tensors(s)

    def expect():
        p, s = qkernels.quantize_4bit(A.contiguous(), bs, qt, dq, storage, backend="reference")
        return p, _state_tensors(s)

    desc = f"quantize_4bit(A={dtype} {tuple(shape)} {layout}, bs={bs!r}, {qt!r}, dq={dq!r}, {storage}, {backend})"
    return Case("quantize_4bit", desc, run, valid, names, expect)


def _state_tensors(s):
    out = [s.absmax, s.code]
    if s.nested:
        out += [s.state2.absmax, s.state2.code, s.offset.reshape(())]
    return out


# Mutations of a valid (packed, state): (name, valid after it, words the error must contain, function(p, s) -> p, s)
def _state_mutations():
    import torch

    def setattr_(path, value):
        def f(p, s):
            s = copy.deepcopy(s)
            obj = s
            *head, last = path.split(".")
            for h in head:
                obj = getattr(obj, h)
            if obj is None or (path.startswith(("state2", "offset")) and s.state2 is None):
                raise _Skip()
            setattr(obj, last, value(getattr(obj, last), s) if callable(value) else value)
            return p, s
        return f

    def packed(fn):
        return lambda p, s: (fn(p, s), s)

    M = [
        ("none", True, (), lambda p, s: (p, s)),
        ("absmax truncated", False, ("absmax",), setattr_("absmax", lambda a, s: a[:-1])),
        ("absmax extended", False, ("absmax",), setattr_("absmax", lambda a, s: torch.cat([a, a[:1]]))),
        ("absmax float16", False, ("absmax",), setattr_("absmax", lambda a, s: a.to(torch.float16))),
        ("absmax float64", False, ("absmax",), setattr_("absmax", lambda a, s: a.to(torch.float64))),
        ("absmax int32", False, ("absmax",), setattr_("absmax", lambda a, s: a.to(torch.int32))),
        ("absmax 2-D", False, ("absmax",), setattr_("absmax", lambda a, s: a.reshape(1, -1))),
        ("absmax 0-dim", False, ("absmax",), setattr_("absmax", lambda a, s: a[0])),
        ("absmax strided view", True, (), setattr_(
            "absmax", lambda a, s: torch.stack([a, torch.zeros_like(a)], 1).reshape(-1)[::2])),
        ("absmax on meta", False, ("absmax", "meta"), setattr_("absmax", lambda a, s: a.to("meta"))),
        ("absmax None", False, ("absmax",), setattr_("absmax", None)),
        ("code 15 entries", False, ("code", "quant_map"), setattr_("code", lambda c, s: c[:15])),
        ("code float64", False, ("code", "quant_map"), setattr_("code", lambda c, s: c.double())),
        ("code [4, 4]", True, (), setattr_("code", lambda c, s: c.reshape(4, 4))),
        ("code strided", True, (), setattr_("code", lambda c, s: c.repeat_interleave(2)[::2])),
        ("code on meta", False, ("code", "quant_map"), setattr_("code", lambda c, s: c.to("meta"))),
        ("shape bigger", False, ("shape", "packed", "absmax"), setattr_(
            "shape", lambda sh, s: torch.Size([*sh[:-1], sh[-1] + s.blocksize]))),
        ("shape smaller", False, ("absmax", "shape"), setattr_(
            "shape", lambda sh, s: torch.Size([max(1, math.prod(sh) - 2 * s.blocksize)]))),
        ("shape same numel", True, (), setattr_("shape", lambda sh, s: torch.Size([math.prod(sh)]))),
        ("shape negative", False, ("shape",), setattr_("shape", lambda sh, s: torch.Size([-1, -math.prod(sh)]))),
        ("shape zero", False, ("shape",), setattr_("shape", torch.Size([0, 4]))),
        ("shape 0-dim", False, ("absmax", "shape", "2-d", "[n, k]"), setattr_("shape", torch.Size([]))),
        ("blocksize other", False, ("absmax", "blocksize"), setattr_(
            "blocksize", lambda b, s: 128 if b == 64 else 64)),
        ("blocksize 0", False, ("blocksize",), setattr_("blocksize", 0)),
        ("blocksize -64", False, ("blocksize",), setattr_("blocksize", -64)),
        ("blocksize 48", False, ("blocksize",), setattr_("blocksize", 48)),
        ("blocksize 2**40", False, ("blocksize",), setattr_("blocksize", 2**40)),
        ("blocksize 64.0", False, ("blocksize",), setattr_("blocksize", 64.0)),
        ("blocksize None", False, ("blocksize",), setattr_("blocksize", None)),
        ("quant_type bad", False, ("quant_type",), setattr_("quant_type", "int4")),
        ("dtype float64", False, ("dtype",), setattr_("dtype", torch.float64)),
        ("dtype None", False, ("dtype",), setattr_("dtype", None)),
        ("nested_absmax truncated", False, ("nested_absmax",), setattr_("state2.absmax", lambda a, s: a[:0])),
        ("nested_absmax extended", False, ("nested_absmax",), setattr_(
            "state2.absmax", lambda a, s: torch.cat([a, a]))),
        ("nested_absmax float16", False, ("nested_absmax",), setattr_(
            "state2.absmax", lambda a, s: a.to(torch.float16))),
        ("nested_absmax on meta", False, ("nested_absmax", "meta"), setattr_(
            "state2.absmax", lambda a, s: a.to("meta"))),
        ("nested_absmax 2-D", False, ("nested_absmax",), setattr_("state2.absmax", lambda a, s: a.reshape(1, -1))),
        ("nested code 255", False, ("nested_quant_map", "nested_code"), setattr_(
            "state2.code", lambda c, s: c[:255])),
        ("nested code on meta", False, ("nested_quant_map", "nested_code"), setattr_(
            "state2.code", lambda c, s: c.to("meta"))),
        ("nested_blocksize 0", False, ("nested_blocksize",), setattr_("state2.blocksize", 0)),
        ("nested_blocksize -256", False, ("nested_blocksize",), setattr_("state2.blocksize", -256)),
        ("nested_blocksize 100", False, ("nested_blocksize",), setattr_("state2.blocksize", 100)),
        ("nested_blocksize 2**40", False, ("nested_blocksize",), setattr_("state2.blocksize", 2**40)),
        ("nested_blocksize 2**62", False, ("nested_blocksize",), setattr_("state2.blocksize", 2**62)),
        ("nested_blocksize 256.0", False, ("nested_blocksize",), setattr_("state2.blocksize", 256.0)),
        ("offset None", False, ("offset",), setattr_("offset", None)),
        ("offset 2 entries", False, ("offset",), setattr_("offset", lambda o, s: torch.stack([o, o]))),
        ("offset on meta", False, ("offset", "meta"), setattr_("offset", lambda o, s: o.to("meta"))),
        ("offset float", False, ("offset",), setattr_("offset", lambda o, s: float(o))),
        ("offset float64", True, (), setattr_("offset", lambda o, s: o.double())),
        ("offset [1]", True, (), setattr_("offset", lambda o, s: o.reshape(1))),
        ("absmax uint8 without state2", False, ("absmax",), setattr_("state2", None)),
        ("packed truncated", False, ("packed",), packed(lambda p, s: _u8(p)[: (s.numel + 1) // 2 - 1])),
        ("packed extended", True, (), packed(lambda p, s: torch.cat([_u8(p).reshape(-1), _u8(p).reshape(-1)[:3]]))),
        ("packed non-contiguous", False, ("packed", "contiguous"), packed(
            lambda p, s: torch.stack([_u8(p).reshape(-1), _u8(p).reshape(-1)], 1)[:, 0])),
        ("packed int8", False, ("packed",), packed(lambda p, s: _u8(p).view(torch.int8))),
        ("packed float64", False, ("packed",), packed(lambda p, s: torch.zeros(len(_u8(p)), dtype=torch.float64))),
        ("packed int32", False, ("packed",), packed(lambda p, s: _u8(p).to(torch.int32))),
        ("packed bool", False, ("packed",), packed(lambda p, s: _u8(p).bool())),
        ("packed empty", False, ("packed",), packed(lambda p, s: _u8(p)[:0])),
        ("packed on meta", False, ("packed", "meta"), packed(lambda p, s: p.to("meta"))),
        ("packed 0-dim", False, ("packed",), packed(lambda p, s: _u8(p).reshape(-1)[0])),
        ("packed a list", False, ("packed",), packed(lambda p, s: _u8(p).tolist())),
        ("state None", False, ("quant_state",), lambda p, s: (p, None)),
        ("state a dict", False, ("quant_state",), lambda p, s: (p, s.as_dict())),
    ]
    return M


class _Skip(Exception):
    """The mutation does not apply to this state (e.g. a nested field of a plain state)."""


def _mutated_state(rng, matrix: bool):
    """``(name, valid, names, W, p0, s0, p, s)``: a valid weight and a mutation of it."""
    while True:
        W, p0, s0, info = _weight(rng, matrix=matrix)
        muts = _state_mutations()
        name, valid, names, fn = muts[0] if rng.random() < 0.35 else _pick(rng, muts)
        try:
            p, s = fn(p0, s0)
        except _Skip:
            continue
        return name, valid, names, W, p0, s0, p, s, info


def consistent(p, s) -> bool:
    """Whether ``(p, s)`` is a state the format allows, judged here independently of ``QuantState.validate``."""
    import torch

    import qkernels

    cpu = torch.device("cpu")
    ok = isinstance(s, qkernels.QuantState) and s.quant_type in ("nf4", "fp4") and type(s.blocksize) is int
    ok = ok and s.blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096) and s.dtype in _floats()
    ok = ok and s.shape is not None and all(d >= 0 for d in s.shape) and math.prod(s.shape) > 0
    ok = ok and isinstance(s.code, torch.Tensor) and s.code.dtype == torch.float32 and s.code.numel() == 16
    ok = ok and isinstance(s.absmax, torch.Tensor) and s.absmax.dim() == 1
    if not ok or s.code.device != cpu or s.absmax.device != cpu:
        return False
    nblocks = -(-math.prod(s.shape) // s.blocksize)
    if s.absmax.numel() != nblocks or s.absmax.dtype != (torch.uint8 if s.nested else torch.float32):
        return False
    if s.nested:
        s2 = s.state2
        nbs = s2.blocksize
        if type(nbs) is not int or not 0 < nbs <= 4096 or nbs & (nbs - 1):
            return False
        if not isinstance(s2.absmax, torch.Tensor) or s2.absmax.shape != (-(-nblocks // nbs),):
            return False
        if s2.absmax.dtype != torch.float32 or s2.absmax.device != cpu:
            return False
        if not isinstance(s2.code, torch.Tensor) or s2.code.dtype != torch.float32 or s2.code.numel() != 256:
            return False
        if s2.code.device != cpu or not isinstance(s.offset, torch.Tensor) or s.offset.numel() != 1:
            return False
        if s.offset.device != cpu:
            return False
    if not isinstance(p, torch.Tensor) or p.dtype not in (torch.uint8, torch.bfloat16, torch.float16, torch.float32):
        return False
    return p.device == cpu and p.is_contiguous() and p.numel() * p.element_size() >= (math.prod(s.shape) + 1) // 2


def _floats():
    import torch

    return (torch.float32, torch.float16, torch.bfloat16)


def decode_independently(p, s, dtype):
    """``p`` decoded from the raw reference functions on dense copies (not through the public API)."""
    from qkernels import reference

    n = math.prod(s.shape)
    absmax = s.absmax.contiguous()
    if s.nested:
        absmax = reference.decode_nested_absmax(absmax, s.state2.absmax.contiguous(),
                                                s.state2.code.reshape(-1).contiguous(),
                                                s.offset.float().reshape(()), s.state2.blocksize)
    return reference.dequantize_4bit(_u8(p).reshape(-1).contiguous(), absmax, s.code.reshape(-1).contiguous(),
                                     s.blocksize, n, dtype).reshape(s.shape)


def gen_dequantize(rng: random.Random) -> Case:
    import torch

    import qkernels

    name, valid, names, W, p0, s0, p, s, info = _mutated_state(rng, matrix=rng.random() < 0.5)
    valid = consistent(p, s)
    backend = _pick(rng, [None, "cpu", "reference"])
    dtype = _pick(rng, [None, None, None, torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                        "x"])
    f64_ok = dtype == torch.float64 and backend == "reference"
    if dtype not in (None, torch.float32, torch.float16, torch.bfloat16) and not f64_ok:
        valid, names = False, (*names, "dtype")
    use_out = rng.random() < 0.4
    out_kind = _pick(rng, ["ok"] * 5 + ["shape", "noncontig", "grad", "meta", "dtype"]) if use_out else None
    state_dtype = s.dtype if isinstance(s, qkernels.QuantState) and s.dtype in _floats() else s0.dtype
    want_dtype = dtype if dtype in (*_floats(), torch.float64) else state_dtype
    if use_out:
        if out_kind == "dtype" and dtype is None:
            out_kind = "ok"
        if out_kind != "ok":
            names = (*names, "out", "dtype")

    def make_out():
        shape = tuple(s.shape) if valid else tuple(s0.shape)
        dt = want_dtype
        if out_kind == "shape":
            return torch.empty(math.prod(shape) + 1, dtype=dt)
        if out_kind == "noncontig":
            return torch.empty(*shape, 2, dtype=dt)[..., 0] if shape else torch.empty(2, dtype=dt)[0:1]
        if out_kind == "grad":
            return torch.empty(shape, dtype=dt, requires_grad=True)
        if out_kind == "meta":
            return torch.empty(shape, dtype=dt, device="meta")
        if out_kind == "dtype":
            return torch.empty(shape, dtype=torch.float32 if dt != torch.float32 else torch.float16)
        return torch.full(shape, float("nan"), dtype=dt)

    if use_out:
        o = make_out()
        if o.shape != (s.shape if valid else s0.shape) or not o.is_contiguous() or o.requires_grad or o.is_meta or (
                dtype is not None and o.dtype != dtype):
            valid = False
        want_dtype = o.dtype if valid else want_dtype

    def run():
        if use_out:
            out = make_out()
            r = qkernels.dequantize_4bit(p, s, dtype, out=out, backend=backend)
            if r is not out:
                return "dequantize_4bit(out=) did not return out"
            return r
        return qkernels.dequantize_4bit(p, s, dtype, backend=backend)

    def expect():
        return decode_independently(p, s, want_dtype)

    desc = (f"dequantize_4bit[{name}] ({_desc(info)}, dtype={dtype}, out={out_kind}, backend={backend})")
    return Case("dequantize_4bit", desc, run, valid, names, expect)


def _desc(info: dict) -> str:
    return (f"W {info['dtype']} {info['shape']} bs={info['bs']} {info['qt']} dq={info['dq']} "
            f"storage={info['storage']}")


def gen_blockwise(rng: random.Random) -> Case:
    import torch

    import qkernels

    n = _pick(rng, [1, 5, 256, 257, 1000])
    bs = _pick(rng, [1, 2, 64, 256, 4096, 256, 0, -256, 100, 8192, 2**40, 256.0, None])
    A = _tensor(rng, (n,), _pick(rng, [torch.float32, torch.bfloat16, torch.float16]))
    backend = _pick(rng, [None, "cpu", "reference"])
    ok_bs = type(bs) is int and bs in (1, 2, 64, 256, 4096)
    if rng.random() < 0.5:
        code = _pick(rng, [None, None, qkernels.dynamic_map(), qkernels.dynamic_map()[:255], torch.zeros(256, 1),
                           qkernels.dynamic_map().double(), torch.arange(256)])
        code_ok = code is None or (code.numel() == 256 and code.is_floating_point())
        valid = ok_bs and code_ok
        names = ("blocksize", "code")

        def run():
            q, a = qkernels.quantize_blockwise(A, code, bs, backend=backend)
            return q, a

        def expect():
            return qkernels.quantize_blockwise(A, code, bs, backend="reference")

        return Case("quantize_blockwise", f"quantize_blockwise(n={n}, {A.dtype}, bs={bs!r}, code="
                    f"{None if code is None else (code.dtype, tuple(code.shape))}, {backend})", run, valid, names,
                    expect)
    real_bs = bs if ok_bs else 256
    q, absmax = qkernels.quantize_blockwise(A.float(), None, real_bs)
    mut = _pick(rng, ["none", "none", "absmax short", "absmax long", "absmax f16", "absmax f64", "absmax int",
                      "q int8", "q float", "q strided", "q 2-D", "q empty", "absmax meta", "absmax 2-D", "q 0-dim"])
    valid_mut = mut in ("none", "absmax f16", "q strided", "q 2-D", "absmax 2-D") or (
        mut == "q 0-dim" and absmax.numel() == 1)
    qq, aa = q, absmax
    if mut == "absmax short":
        aa = absmax[:-1]
    elif mut == "absmax long":
        aa = torch.cat([absmax, absmax[:1]])
    elif mut == "absmax f16":
        aa = absmax.to(torch.float16)
    elif mut == "absmax f64":
        aa = absmax.double()
    elif mut == "absmax int":
        aa = absmax.int()
    elif mut == "q int8":
        qq = q.view(torch.int8)
    elif mut == "q float":
        qq = q.float()
    elif mut == "q strided":
        qq = torch.stack([q, q], 1)[:, 0]
    elif mut == "q 2-D":
        qq = q.reshape(1, -1)
    elif mut == "q empty":
        qq = q[:0]
    elif mut == "absmax meta":
        aa = absmax.to("meta")
    elif mut == "absmax 2-D":
        aa = absmax.reshape(-1, 1)
    elif mut == "q 0-dim":
        qq = q[0]
    valid = valid_mut and ok_bs
    names = ("blocksize", "q", "absmax")

    def run():
        return qkernels.dequantize_blockwise(qq, aa, None, bs, backend=backend)

    def expect():
        return qkernels.reference.dequantize_blockwise(
            qq.contiguous(), aa.float().reshape(-1), qkernels.dynamic_map(), real_bs).reshape(qq.shape)

    return Case("dequantize_blockwise", f"dequantize_blockwise[{mut}](n={n}, bs={bs!r}, {backend})", run, valid,
                names, expect)


# ------------------------------------------------------------------------------------------------ matmul
def gen_matmul(rng: random.Random) -> Case:
    import torch

    import qkernels

    W, p, s, info = _weight(rng)
    N, K = info["shape"]
    xdt = _pick(rng, [torch.float32, torch.float32, torch.float16, torch.bfloat16])
    lead = _pick(rng, [(3,), (1,), (0,), (2, 5), (17,), (70,), ()])
    x = _tensor(rng, (*lead, K), xdt, _pick(rng, ["dense", "dense", "transposed", "strided"]), scale=1.0)
    r = _pick(rng, [4, 8, 1, 0, None])
    adt = _pick(rng, [torch.float32, xdt, torch.bfloat16, torch.float16])
    bdt = _pick(rng, [adt, adt, torch.float32, torch.bfloat16])
    A = B = None
    if r is not None:
        A = _tensor(rng, (r, K), adt, _pick(rng, ["dense", "transposed"])) * 0.1
        B = _tensor(rng, (N, r), bdt, _pick(rng, ["dense", "transposed"])) * 0.1
    bias = _tensor(rng, (N,), _pick(rng, [torch.float32, xdt, torch.bfloat16])) if rng.random() < 0.5 else None
    scaling = _pick(rng, [2.0, 0.5, 1, 16 / 8])
    dropout_p, training = _pick(rng, [(0.0, True), (0.1, True), (0.5, False), (0.0, False)])
    backend = _pick(rng, [None, "cpu", "reference"])
    grad = rng.random() < 0.4 and x.dim() >= 1
    mut = _pick(rng, ["none"] * 18 + ["x K+1", "x float64", "x int", "x 0-dim", "A wrong K", "B wrong N",
                                     "rank mismatch", "A only", "A float64", "B int", "bias wrong", "bias int",
                                     "bias 2-D", "dropout 1.0", "dropout -0.1", "dropout nan", "scaling str",
                                     "scaling None", "A on meta", "bias on meta", "x on meta", "A a list",
                                     "packed transposed", "state 3-D"])
    names: tuple[str, ...] = ()
    valid = True
    if mut != "none":
        valid = False
    if mut == "x K+1":
        x, names = _tensor(rng, (*lead, K + 1), xdt), ("x",)
    elif mut == "x float64":
        x, names = x.double(), ("x", "float64")
    elif mut == "x int":
        x, names = x.to(torch.int32), ("x",)
    elif mut == "x 0-dim":
        x, names = x.reshape(-1)[:1].reshape(()) if x.numel() else torch.tensor(1.0), ("x",)
    elif mut == "A wrong K" and A is not None:
        A, names = _tensor(rng, (A.shape[0], K + 1), adt), ("lora_a",)
    elif mut == "B wrong N" and B is not None:
        B, names = _tensor(rng, (N + 1, B.shape[1]), bdt), ("lora_b",)
    elif mut == "rank mismatch" and A is not None:
        A, names = _tensor(rng, (A.shape[0] + 1, K), adt), ("rank", "lora_a")
    elif mut == "A only" and A is not None:
        B, names = None, ("lora_a", "lora_b")
    elif mut == "A float64" and A is not None:
        A, names = A.double(), ("lora_a",)
    elif mut == "B int" and B is not None:
        B, names = B.to(torch.int32), ("lora_b",)
    elif mut == "bias wrong":
        bias, names = torch.zeros(N + 1), ("bias",)
    elif mut == "bias int":
        bias, names = torch.zeros(N, dtype=torch.int32), ("bias",)
    elif mut == "bias 2-D":
        bias, names = torch.zeros(1, N), ("bias",)
    elif mut == "dropout 1.0":
        dropout_p, names = 1.0, ("dropout",)
    elif mut == "dropout -0.1":
        dropout_p, names = -0.1, ("dropout",)
    elif mut == "dropout nan":
        dropout_p, names = float("nan"), ("dropout",)
    elif mut == "scaling str":
        scaling, names = "2", ("scaling",)
    elif mut == "scaling None":
        scaling, names = None, ("scaling",)
    elif mut == "A on meta" and A is not None:
        A, names = A.to("meta"), ("lora_a", "device")
    elif mut == "bias on meta":
        bias, names = torch.zeros(N, device="meta"), ("bias",)
    elif mut == "x on meta":
        x, names = x.to("meta"), ("x", "device")
    elif mut == "A a list" and A is not None:
        A, names = A.tolist(), ("lora_a",)
    elif mut == "packed transposed":
        p2 = _u8(p).reshape(-1)
        if p2.numel() < 2:
            valid = True
        else:
            p, names = torch.stack([p2, p2], 1)[:, 0], ("packed", "contiguous")
    elif mut == "state 3-D":
        s = copy.deepcopy(s)
        s.shape = torch.Size([1, N, K])
        names = ("2-d", "[n, k]", "shape")
    else:
        valid = True
        mut = "none"
    if grad and valid:
        x = x.detach().clone().requires_grad_()
        for t in (A, B, bias):
            if t is not None:
                t.requires_grad_()

    def call(be):
        y = qkernels.matmul_4bit_lora(x, p, s, A, B, scaling, bias, dropout_p, training=training, backend=be)
        if not grad:
            return y
        leaves = [t for t in (x, A, B, bias) if t is not None and t.requires_grad]
        g = torch.autograd.grad(y, leaves, _tensor(random.Random(7), tuple(y.shape), y.dtype), allow_unused=True)
        return [y.detach(), *g]

    desc = (f"matmul_4bit_lora[{mut}] ({_desc(info)}, x {xdt} lead={lead}, r={r}, A {adt}, B {bdt}, bias="
            f"{None if bias is None else getattr(bias, 'dtype', type(bias).__name__)}, p={dropout_p}, "
            f"training={training}, grad={grad}, backend={backend})")
    # the tolerance of the least precise input, not of each result's dtype: a float32 lora_A's gradient is computed
    # from bf16 x and dY, and the reference backend rounds those products in x's dtype (seed 23 case 94: its dA off
    # the float64 value by 1.2e-3 relative, the native path's by 7e-8)
    tol = max(_tolerances().get(getattr(t, "dtype", None), 1e-4) for t in (x, A, B))
    return Case("matmul_4bit_lora", desc, lambda: call(backend), valid, names, lambda: call("reference"),
                exact=False, tol=tol)


# ------------------------------------------------------------------------------------------------ ops, directly
def gen_ops(rng: random.Random) -> Case:
    import torch

    import qkernels
    from qkernels import _ops

    ops = torch.ops.qkernels
    W, p, s, info = _weight(rng)
    N, K = info["shape"]
    raw = _u8(p)
    nested = (s.state2.absmax, s.state2.code, s.offset, s.state2.blocksize) if s.nested else (None, None, None, 256)
    which = _pick(rng, ["dequantize_4bit", "dequantize_4bit_out", "quantize_4bit", "linear_4bit", "linear_4bit_dx",
                        "lora_down", "lora_gram", "quantize_blockwise", "dequantize_blockwise"])
    mut = "none"
    M = _pick(rng, [1, 3, 0, 20, 70])
    dt = _pick(rng, [torch.float32, torch.bfloat16, torch.float16])
    if which in ("dequantize_4bit", "dequantize_4bit_out"):
        args = dict(packed=raw, absmax=s.absmax, code=s.code, blocksize=s.blocksize, shape=[N, K], dtype=dt,
                    nested_absmax=nested[0], nested_code=nested[1], offset=nested[2], nested_blocksize=nested[3])
        muts = {"none": (True, ()), "shape bigger": (False, ("packed", "absmax")),
                "shape negative": (False, ("shape",)), "shape empty list": (False, ("absmax", "shape")),
                "blocksize 16": (False, ("blocksize",)), "absmax short": (False, ("absmax",)),
                "code 8": (False, ("code",)), "packed int8": (False, ("packed",)),
                "packed strided": (False, ("packed",)), "dtype float64": (False, ("dtype",)),
                "nested_blocksize 0": (False, ("nested_blocksize",)),
                "nested_blocksize 2**40": (False, ("nested_blocksize",)),
                "nested_absmax meta": (False, ("nested_absmax",)), "offset meta": (False, ("offset",)),
                "nested_absmax float64": (False, ("nested_absmax",)), "offset 2": (False, ("offset",)),
                "nested_code None": (False, ("nested_code",))}
        mut = _pick(rng, list(muts))
        valid, names = muts[mut]
        if mut.startswith(("nested", "offset")) and not s.nested:
            mut, valid, names = "none", True, ()
        a = dict(args)
        if mut == "shape bigger":
            a["shape"] = [N + 64, K]
        elif mut == "shape negative":
            a["shape"] = [-N, -K]
        elif mut == "shape empty list":
            a["shape"] = []
            valid = s.absmax.numel() == 1  # one element: a valid decode of the first value
        elif mut == "blocksize 16":
            a["blocksize"] = 16
        elif mut == "absmax short":
            a["absmax"] = s.absmax[:-1]
        elif mut == "code 8":
            a["code"] = s.code[:8]
        elif mut == "packed int8":
            a["packed"] = raw.view(torch.int8)
        elif mut == "packed strided":
            r1 = raw.reshape(-1)
            a["packed"] = torch.stack([r1, r1], 1)[:, 0]
            if r1.numel() < 2:
                mut, valid, names = "none", True, ()
        elif mut == "dtype float64":
            a["dtype"] = torch.float64
        elif mut == "nested_blocksize 0":
            a["nested_blocksize"] = 0
        elif mut == "nested_blocksize 2**40":
            a["nested_blocksize"] = 2**40
        elif mut == "nested_absmax meta":
            a["nested_absmax"] = a["nested_absmax"].to("meta")
        elif mut == "offset meta":
            a["offset"] = a["offset"].to("meta")
        elif mut == "nested_absmax float64":
            a["nested_absmax"] = a["nested_absmax"].double()
        elif mut == "offset 2":
            a["offset"] = torch.zeros(2)
        elif mut == "nested_code None":
            a["nested_code"] = None

        def run():
            if which == "dequantize_4bit":
                return ops.dequantize_4bit(**a)
            out = torch.empty(a["shape"], dtype=a["dtype"]) if all(d >= 0 for d in a["shape"]) else torch.empty(0)
            b = {k: v for k, v in a.items() if k not in ("shape", "dtype")}
            ops.dequantize_4bit_out(out=out, **b)
            return out

        def expect():
            return qkernels.dequantize_4bit(p, s, dt, backend="reference").reshape(-1)[:math.prod(a["shape"])].reshape(
                a["shape"])
        return Case("op." + which, f"ops.{which}[{mut}] ({_desc(info)}, {dt})", run, valid, names, expect)

    if which in ("quantize_4bit", "quantize_blockwise"):
        n16 = which == "quantize_4bit"
        code = s.code if n16 else qkernels.dynamic_map()
        A = W
        mut = _pick(rng, ["none", "none", "blocksize 0", "blocksize 2**40", "code short", "code float64", "A int",
                          "A empty", "A strided", "A 0-dim", "code meta", "A float64"])
        valid = mut in ("none", "A strided", "A 0-dim")
        names = {"blocksize 0": ("blocksize",), "blocksize 2**40": ("blocksize",), "code short": ("code",),
                 "code float64": ("code",), "A int": ("A",), "A empty": ("A",), "code meta": ("code",),
                 "A float64": ("A",)}.get(mut, ())
        bs = info["bs"]
        if mut == "blocksize 0":
            bs = 0
        elif mut == "blocksize 2**40":
            bs = 2**40
        elif mut == "code short":
            code = code[:-1]
        elif mut == "code float64":
            code = code.double()
        elif mut == "code meta":
            code = code.to("meta")
        elif mut == "A int":
            A = A.to(torch.int32)
        elif mut == "A empty":
            A = A[:0]
        elif mut == "A strided":
            A = W.t()
        elif mut == "A 0-dim":
            A = W.reshape(-1)[0]
        elif mut == "A float64":
            A = W.double()
        fn = ops.quantize_4bit if n16 else ops.quantize_blockwise
        ref = qkernels.reference.quantize_4bit if n16 else qkernels.reference.quantize_blockwise
        return Case("op." + which, f"ops.{which}[{mut}] ({_desc(info)})", lambda: fn(A, code, bs), valid, names,
                    lambda: ref(A.contiguous(), code, bs))

    if which == "dequantize_blockwise":
        A = _tensor(rng, (_pick(rng, [1, 100, 513]),))
        bs = _pick(rng, [1, 64, 256])
        q, a = qkernels.quantize_blockwise(A, None, bs)
        code = qkernels.dynamic_map()
        mut = _pick(rng, ["none", "absmax long", "q strided", "absmax f16", "code 255", "bs 0", "absmax meta",
                          "q 2-D"])
        valid = mut in ("none", "q strided", "q 2-D")
        names = {"absmax long": ("absmax",), "absmax f16": ("absmax",), "code 255": ("code",), "bs 0": ("blocksize",),
                 "absmax meta": ("absmax",)}.get(mut, ())
        qq, aa, cc, bb = q, a, code, bs
        if mut == "absmax long":
            aa = torch.cat([a, a])
        elif mut == "q strided":
            qq = torch.stack([q, q], 1)[:, 0]
        elif mut == "absmax f16":
            aa = a.half()
        elif mut == "code 255":
            cc = code[:255]
        elif mut == "bs 0":
            bb = 0
        elif mut == "absmax meta":
            aa = a.to("meta")
        elif mut == "q 2-D":
            qq = q.reshape(1, -1)
        return Case("op." + which, f"ops.dequantize_blockwise[{mut}] (n={q.numel()}, bs={bs})",
                    lambda: ops.dequantize_blockwise(qq, aa, cc, bb), valid, names,
                    lambda: qkernels.reference.dequantize_blockwise(qq.contiguous(), a, code, bs))

    if which in ("lora_down", "lora_gram"):
        r = _pick(rng, [1, 4, 16, 0])
        x = _tensor(rng, (M, K), dt, _pick(rng, ["dense", "transposed"]))
        A = _tensor(rng, (r, K), _pick(rng, [torch.float32, torch.bfloat16, torch.float16]),
                    _pick(rng, ["dense", "transposed"]))
        u = _tensor(rng, (M, r), _pick(rng, [torch.float32, torch.bfloat16]), _pick(rng, ["dense", "transposed"]))
        mask = (torch.rand(M, K) > 0.3) if rng.random() < 0.5 else None
        mut = _pick(rng, ["none", "none", "A wrong K", "u wrong M", "mask shape", "mask float", "x 1-D", "x int",
                          "A float64", "mask strided", "x 3-D", "A meta", "u 1-D"])
        if (which == "lora_down" and mut in ("u wrong M", "u 1-D")) or (which == "lora_gram" and mut in (
                "A wrong K", "A float64", "A meta")):
            mut = "none"
        valid = mut in ("none", "mask strided")
        names = {"A wrong K": ("A",), "u wrong M": ("u",), "mask shape": ("mask",), "mask float": ("mask",),
                 "x 1-D": ("x",), "x int": ("x",), "A float64": ("A",), "x 3-D": ("x",), "A meta": ("A",),
                 "u 1-D": ("u",)}.get(mut, ())
        if mut == "A wrong K":
            A = _tensor(rng, (r, K + 1))
        elif mut == "u wrong M":
            u = _tensor(rng, (M + 1, r))
        elif mut == "mask shape":
            mask = torch.ones(M, K + 1, dtype=torch.bool)
        elif mut == "mask float":
            mask = torch.ones(M, K)
        elif mut == "x 1-D":
            x = x.reshape(-1)
        elif mut == "x int":
            x = x.to(torch.int32)
        elif mut == "A float64":
            A = A.double()
        elif mut == "mask strided":
            mask = torch.stack([torch.rand(M, K) > 0.3] * 2, -1)[..., 0]
        elif mut == "x 3-D":
            x = x.reshape(1, M, K)
        elif mut == "A meta":
            A = A.to("meta")
        elif mut == "u 1-D":
            u = u.reshape(-1)
        if which == "lora_down":
            return Case("op.lora_down", f"ops.lora_down[{mut}] (M={M}, K={K}, r={r}, x {dt})",
                        lambda: ops.lora_down(x, A, 0.5, mask, 2.0), valid, names,
                        lambda: _ops._dropped(x, mask, 2.0) @ A.float().t() * 0.5, exact=False)
        return Case("op.lora_gram", f"ops.lora_gram[{mut}] (M={M}, K={K}, r={r}, x {dt})",
                    lambda: ops.lora_gram(u, x, mask, 2.0), valid, names,
                    lambda: u.float().t() @ _ops._dropped(x, mask, 2.0), exact=False)

    # linear_4bit / linear_4bit_dx
    r = _pick(rng, [2, 8, 0])
    fwd = which == "linear_4bit"
    inp = _tensor(rng, (M, K if fwd else N), dt, _pick(rng, ["dense", "transposed"]))
    left = _tensor(rng, (M, r), _pick(rng, [torch.float32, dt])) * 0.1 if rng.random() < 0.7 else None
    right = (_tensor(rng, (N, r) if fwd else (r, K), _pick(rng, [torch.float32, dt, torch.bfloat16])) * 0.1
             if left is not None else None)
    bias = _tensor(rng, (N,), _pick(rng, [torch.float32, dt])) if fwd and rng.random() < 0.5 else None
    mask = (torch.rand(M, K) > 0.3) if not fwd and left is not None and rng.random() < 0.5 else None
    mut = _pick(rng, ["none", "none", "none", "right wrong rows", "right wrong cols", "right 1x1", "left wrong M",
                      "left 1-D", "right only", "bias wrong", "bias int", "mask wrong", "mask int", "absmax short",
                      "x 1-D", "nested_blocksize 0", "left int", "right int"])
    valid, names = mut == "none", ()
    if mut == "right wrong rows" and right is not None:
        right, names = torch.zeros(right.shape[0] + 1, right.shape[1]), ("lora",)
    elif mut == "right wrong cols" and right is not None:
        right, names = torch.zeros(right.shape[0], right.shape[1] + 1), ("lora",)
    elif mut == "right 1x1" and right is not None:
        right, names = torch.zeros(1, 1), ("lora",)
    elif mut == "left wrong M" and left is not None:
        left, names = torch.zeros(M + 1, r), ("lora",)
    elif mut == "left 1-D" and left is not None:
        left, names = left.reshape(-1), ("lora",)
    elif mut == "right only" and right is not None:
        left, names = None, ("lora",)
    elif mut == "bias wrong" and fwd:
        bias, names = torch.zeros(N + 1), ("bias",)
    elif mut == "bias int" and fwd:
        bias, names = torch.zeros(N, dtype=torch.int32), ("bias",)
    elif mut == "mask wrong" and mask is not None:
        mask, names = torch.ones(M, K + 1, dtype=torch.bool), ("mask",)
    elif mut == "mask int" and mask is not None:
        mask, names = torch.ones(M, K, dtype=torch.int32), ("mask",)
    elif mut == "absmax short":
        s = copy.copy(s)
        s.absmax, names = s.absmax[:-1], ("absmax",)
    elif mut == "x 1-D":
        inp, names = inp.reshape(-1), ("x",)
    elif mut == "nested_blocksize 0" and s.nested:
        nested, names = (*nested[:3], 0), ("nested_blocksize",)
    elif mut == "left int" and left is not None:
        left, names = left.to(torch.int32), ("lora",)
    elif mut == "right int" and right is not None:
        right, names = right.to(torch.int32), ("lora",)
    else:
        mut, valid = "none", True

    def run():
        if fwd:
            return ops.linear_4bit(inp, raw, s.absmax, s.code, s.blocksize, N, *nested, left, right, bias)
        return ops.linear_4bit_dx(inp, raw, s.absmax, s.code, s.blocksize, K, *nested, left, right, mask, 2.0)

    def expect():
        Wd = qkernels.dequantize_4bit(p, s, torch.float64, backend="reference")
        xi = inp.double()
        if fwd:
            y = xi @ Wd.t()
            if left is not None:
                y = y + left.double() @ right.double().t()
            if bias is not None:
                y = y + bias.double()
        else:
            y = xi @ Wd
            if left is not None:
                lo = left.double() @ right.double()
                y = y + (lo if mask is None else lo * mask.double() * 2.0)
        return y.to(inp.dtype)

    desc = (f"ops.{which}[{mut}] ({_desc(info)}, M={M}, {dt}, r={r}, lora={left is not None}, bias={bias is not None}"
            f", mask={mask is not None})")
    return Case("op." + which, desc, run, valid, names, expect, exact=False)


# ------------------------------------------------------------------------------------------------ QuantState dicts
def _blob_key(d):
    return next(k for k in d if "bitsandbytes__" in k)


def _blob_mutations():
    """(name, valid, names, fn(meta dict) -> meta dict or raw bytes)"""
    def setk(k, v):
        return lambda m, s: {**m, k: v(m, s) if callable(v) else v}

    def delk(k):
        return lambda m, s: {kk: vv for kk, vv in m.items() if kk != k}

    return [
        ("blocksize 0", False, ("blocksize",), setk("blocksize", 0)),
        ("blocksize -64", False, ("blocksize",), setk("blocksize", -64)),
        ("blocksize 48", False, ("blocksize",), setk("blocksize", 48)),
        ("blocksize 2**40", False, ("blocksize",), setk("blocksize", 2**40)),
        ("blocksize 2**70", False, ("blocksize",), setk("blocksize", 2**70)),
        ("blocksize '64'", False, ("blocksize",), setk("blocksize", "64")),
        ("blocksize 64.0", False, ("blocksize",), setk("blocksize", 64.0)),
        ("blocksize null", False, ("blocksize",), setk("blocksize", None)),
        ("blocksize true", False, ("blocksize",), setk("blocksize", True)),
        ("blocksize other", None, ("absmax", "blocksize"), setk("blocksize", lambda m, s: 128 if s.blocksize == 64
                                                                  else 64)),
        ("nested_blocksize 0", False, ("nested_blocksize",), setk("nested_blocksize", 0)),
        ("nested_blocksize -256", False, ("nested_blocksize",), setk("nested_blocksize", -256)),
        ("nested_blocksize 100", False, ("nested_blocksize",), setk("nested_blocksize", 100)),
        ("nested_blocksize 2**40", False, ("nested_blocksize",), setk("nested_blocksize", 2**40)),
        ("nested_blocksize 2**64", False, ("nested_blocksize",), setk("nested_blocksize", 2**64)),
        ("nested_blocksize '256'", False, ("nested_blocksize",), setk("nested_blocksize", "256")),
        ("shape string", False, ("shape",), setk("shape", lambda m, s: str(list(s.shape)))),
        ("shape negative", False, ("shape",), setk("shape", lambda m, s: [-x for x in s.shape])),
        ("shape one negative", False, ("shape",), setk("shape", lambda m, s: [-1, *s.shape[1:]])),
        ("shape floats", False, ("shape",), setk("shape", lambda m, s: [float(x) for x in s.shape])),
        ("shape bools", False, ("shape",), setk("shape", [True, True])),
        ("shape nested list", False, ("shape",), setk("shape", lambda m, s: [list(s.shape)])),
        ("shape empty", None, ("shape", "absmax"), setk("shape", [])),
        ("shape zero", False, ("shape",), setk("shape", lambda m, s: [0, *s.shape[1:]])),
        ("shape huge", False, ("shape", "absmax"), setk("shape", [2**40, 2**40])),
        ("shape 2**70", False, ("shape", "absmax"), setk("shape", [2**70])),
        ("shape bigger", False, ("shape", "absmax"), setk("shape", lambda m, s: [s.shape[0] + 64, *s.shape[1:]])),
        ("shape same numel", True, (), setk("shape", lambda m, s: [math.prod(s.shape)])),
        ("shape null", False, ("shape",), setk("shape", None)),
        ("dtype float64", False, ("dtype",), setk("dtype", "float64")),
        ("dtype torch.float16", False, ("dtype",), setk("dtype", "torch.float16")),
        ("dtype 5", False, ("dtype",), setk("dtype", 5)),
        ("dtype missing", False, ("dtype",), delk("dtype")),
        ("quant_type other", False, ("quant_type",), setk("quant_type", lambda m, s: "fp4" if s.quant_type == "nf4"
                                                          else "nf4")),
        ("quant_type int4", False, ("quant_type",), setk("quant_type", "int4")),
        ("nested_offset NaN", False, ("nested_offset",), setk("nested_offset", float("nan"))),
        ("nested_offset inf", False, ("nested_offset",), setk("nested_offset", float("inf"))),
        ("nested_offset string", False, ("nested_offset",), setk("nested_offset", "0.1")),
        ("nested_offset null", False, ("nested_offset",), setk("nested_offset", None)),
        ("nested_offset list", False, ("nested_offset",), setk("nested_offset", [0.1, 0.2])),
        ("nested_offset huge int", False, ("nested_offset",), setk("nested_offset", 10**400)),
        ("nested_dtype float16", False, ("nested_dtype",), setk("nested_dtype", "float16")),
        ("nested_dtype bad", False, ("nested_dtype",), setk("nested_dtype", "int8")),
        ("unknown field", False, ("field",), setk("foo", 1)),
        ("missing blocksize", False, ("blocksize",), delk("blocksize")),
        ("missing shape", False, ("shape",), delk("shape")),
        ("missing nested_offset", False, ("nested_offset",), delk("nested_offset")),
        ("json list", False, ("json", "object"), lambda m, s: [m]),
        ("json truncated", False, ("json",), lambda m, s: json.dumps(m).encode()[:-3]),
        ("json garbage", False, ("json",), lambda m, s: b"\xff\xfe\x00garbage"),
        ("json empty", False, ("json",), lambda m, s: b""),
        ("json trailing", False, ("json",), lambda m, s: json.dumps(m).encode() + b"}"),
        ("json flipped byte", None, ("json", "quant state"), lambda m, s: "flip"),
    ]


def _dict_mutations():
    """(name, valid, names, fn(d, s) -> d) on ``as_dict(packed=True)`` (keys without a prefix)."""
    import torch

    def setk(k, v, need=True):
        def f(d, s):
            if k not in d:
                if need:
                    raise _Skip()
            return {**d, k: v(d[k], s) if callable(v) else v}
        return f

    def delk(k):
        def f(d, s):
            if k not in d:
                raise _Skip()
            return {kk: vv for kk, vv in d.items() if kk != k}
        return f

    def swap(a, b):
        def f(d, s):
            if a not in d or b not in d:
                raise _Skip()
            return {**d, a: d[b], b: d[a]}
        return f

    return [
        ("none", True, (), lambda d, s: d),
        ("absmax truncated", False, ("absmax",), setk("absmax", lambda t, s: t[:-1])),
        ("absmax extended", False, ("absmax",), setk("absmax", lambda t, s: torch.cat([t, t[:1]]))),
        ("absmax float64", False, ("absmax",), setk("absmax", lambda t, s: t.double())),
        ("absmax float16", False, ("absmax",), setk("absmax", lambda t, s: t.half())),
        ("absmax int64", False, ("absmax",), setk("absmax", lambda t, s: t.long())),
        ("absmax 2-D", False, ("absmax",), setk("absmax", lambda t, s: t.reshape(1, -1))),
        ("absmax NaN", None, ("absmax",), setk("absmax", lambda t, s: t.float().fill_(float("nan")).to(t.dtype))),
        ("absmax a list", False, ("absmax",), setk("absmax", lambda t, s: t.tolist())),
        ("absmax None", False, ("absmax",), setk("absmax", None)),
        ("swap absmax/nested_absmax", False, ("absmax",), swap("absmax", "nested_absmax")),
        ("swap quant maps", False, ("quant_map",), swap("quant_map", "nested_quant_map")),
        ("quant_map fp4 table", False, ("quant_map",), setk("quant_map", lambda t, s: __import__(
            "qkernels").get_codebook("fp4" if s.quant_type == "nf4" else "nf4"))),
        ("quant_map 15", False, ("quant_map",), setk("quant_map", lambda t, s: t[:15])),
        ("quant_map float16", False, ("quant_map",), setk("quant_map", lambda t, s: t.half())),
        ("nested_absmax truncated", False, ("nested_absmax",), setk("nested_absmax", lambda t, s: t[:0])),
        ("nested_absmax extended", False, ("nested_absmax",), setk("nested_absmax", lambda t, s: torch.cat([t, t]))),
        ("nested_absmax int", False, ("nested_absmax",), setk("nested_absmax", lambda t, s: t.int())),
        ("nested_absmax NaN", False, ("nested_absmax",), setk("nested_absmax", lambda t, s: t * float("nan"))),
        ("nested_quant_map 255", False, ("nested_quant_map",), setk("nested_quant_map", lambda t, s: t[:255])),
        ("nested_quant_map NaN", False, ("nested_quant_map",), setk("nested_quant_map",
                                                                    lambda t, s: t * float("nan"))),
        ("missing absmax", False, ("absmax",), delk("absmax")),
        ("missing quant_map", False, ("quant_map",), delk("quant_map")),
        ("missing nested_absmax", False, ("nested_absmax",), delk("nested_absmax")),
        ("missing nested_quant_map", False, ("nested_quant_map",), delk("nested_quant_map")),
        ("missing blob", False, ("quant_state", "quant_type"), lambda d, s: {k: v for k, v in d.items()
                                                                          if "bitsandbytes__" not in k}),
        ("blob int8", False, ("quant_state",), lambda d, s: {**d, _blob_key(d): d[_blob_key(d)].view(torch.int8)}),
        ("blob 2-D", False, ("quant_state",), lambda d, s: {**d, _blob_key(d): d[_blob_key(d)].reshape(1, -1)}),
        ("blob a str", False, ("quant_state",), lambda d, s: {**d, _blob_key(d): "x"}),
        ("blob renamed int4", False, ("bitsandbytes__", "quant_state"), lambda d, s: {
            **{k: v for k, v in d.items() if "bitsandbytes__" not in k},
            "quant_state.bitsandbytes__int4": d[_blob_key(d)]}),
        ("two blobs", False, ("bitsandbytes__",), lambda d, s: {**d, "quant_state.bitsandbytes__fp4"
                                                                if s.quant_type == "nf4"
                                                                else "quant_state.bitsandbytes__nf4":
                                                                d[_blob_key(d)]}),
        ("extra key", False, ("unexpected", "foo"), lambda d, s: {**d, "foo": torch.zeros(1)}),
    ]


def _apply_blob(d, s, fn):
    import torch

    k = _blob_key(d)
    meta = json.loads(bytes(d[k].tolist()).decode())
    new = fn(meta, s)
    if new == "flip":
        raw = bytearray(json.dumps(meta).encode())
        i = random.Random(len(raw)).randrange(len(raw))
        raw[i] ^= 0x5A
        data = bytes(raw)
    elif isinstance(new, bytes):
        data = new
    else:
        data = json.dumps(new).encode()
    return {**d, k: torch.tensor(list(data), dtype=torch.uint8)}


def _mutated_dict(rng):
    """``(name, valid, names, p, s, d)``: a state's ``as_dict(packed=True)`` with one mutation."""
    while True:
        W, p, s, info = _weight(rng)
        d = s.as_dict(packed=True)
        if rng.random() < 0.45:
            name, valid, names, fn = _pick(rng, _blob_mutations())
            if (name.startswith("nested") or name == "missing nested_offset") and not s.nested:
                continue
            return f"blob: {name}", valid, names, p, s, _apply_blob(d, s, fn), info
        muts = _dict_mutations()
        name, valid, names, fn = muts[0] if rng.random() < 0.3 else _pick(rng, muts)
        try:
            return name, valid, names, p, s, fn(d, s), info
        except _Skip:
            continue


def gen_from_dict(rng: random.Random) -> Case:
    import torch

    import qkernels

    name, valid, names, p, s, d, info = _mutated_dict(rng)
    prefix = _pick(rng, ["", "", "model.layers.0.q_proj.weight."])
    d = {prefix + k: v for k, v in d.items()}
    backend = _pick(rng, [None, "cpu", "reference"])

    def run():
        s2 = qkernels.QuantState.from_dict(d, device="cpu")
        return qkernels.dequantize_4bit(p, s2, backend=backend).reshape(-1)

    case = Case("QuantState.from_dict", f"from_dict[{name}] prefix={prefix!r} ({_desc(info)}, {backend})", run,
                bool(valid), names, lambda: qkernels.dequantize_4bit(p, s, backend="reference").reshape(-1))
    if valid is None:  # may or may not be caught: a result must then be the reference's of what was loaded
        case.valid = True
        case.extra["either"] = True

        def run_either():
            try:
                s2 = qkernels.QuantState.from_dict(d, device="cpu")
            except (TypeError, ValueError):
                return "agree"  # refused cleanly (classify's rules for the message do not apply here)
            a = qkernels.dequantize_4bit(p, s2, backend=backend)
            b = qkernels.dequantize_4bit(p, s2, backend="reference")
            return "agree" if torch.equal(a.nan_to_num(), b.nan_to_num()) else "disagree"
        case.run = run_either
        case.expect = lambda: "agree"
    return case


# ------------------------------------------------------------------------------------------------ modules
def gen_module(rng: random.Random) -> Case:
    import torch


    kw: dict[str, Any] = {}
    if rng.random() < 0.5:  # valid arguments, random x
        return _module_case(rng, _pick(rng, [64, 33, 1, 128]), _pick(rng, [32, 5, 1]), {
            "r": _pick(rng, [8, 4, 1, 16]), "lora_alpha": _pick(rng, [16, 0.5, 32]),
            "lora_dropout": _pick(rng, [0.0, 0.1]), "blocksize": _pick(rng, [64, 32, 4096]),
            "quant_type": _pick(rng, ["nf4", "fp4"]),
            "compute_dtype": _pick(rng, [None, None, torch.bfloat16, torch.float16, torch.float32]),
            "quant_storage": _pick(rng, [torch.uint8, torch.bfloat16, torch.float32]),
            "double_quant": _pick(rng, [True, False])}, _pick(rng, [True, False]), True, (), "ok")
    in_f = _pick(rng, [64, 64, 33, 1, 0, -8, 64.0, True])
    out_f = _pick(rng, [32, 32, 5, 1, 0, -1, "32"])
    kw["r"] = _pick(rng, [8, 8, 4, 1, 0, -2, 2.5, True, "8"])
    kw["lora_alpha"] = _pick(rng, [16, 16, 0.5, float("nan"), "16", None])
    kw["lora_dropout"] = _pick(rng, [0.0, 0.0, 0.1, 1.0, -0.5, "0.1"])
    kw["blocksize"] = _pick(rng, [64, 64, 32, 4096, 48, 0, 2**40])
    kw["quant_type"] = _pick(rng, ["nf4", "nf4", "fp4", "NF4", None])
    kw["compute_dtype"] = _pick(rng, [None, None, torch.bfloat16, torch.float16, torch.float64, torch.int8])
    kw["quant_storage"] = _pick(rng, [torch.uint8, torch.uint8, torch.bfloat16, torch.float32, torch.int32])
    kw["double_quant"] = _pick(rng, [True, False])
    bias = _pick(rng, [True, False])
    good = {"in": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
            "out": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
            "r": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
            "lora_alpha": lambda v: isinstance(v, (int, float)) and math.isfinite(v),
            "lora_dropout": lambda v: isinstance(v, float) and 0 <= v < 1,
            "blocksize": lambda v: v in (32, 64, 128, 256, 512, 1024, 2048, 4096),
            "quant_type": lambda v: v in ("nf4", "fp4"),
            "compute_dtype": lambda v: v in (None, torch.float32, torch.float16, torch.bfloat16),
            "quant_storage": lambda v: v in (torch.uint8, torch.bfloat16, torch.float16, torch.float32)}
    values = {"in": in_f, "out": out_f, **kw}
    bad = [k for k, ok in good.items() if k in values and not ok(values[k])]
    names = tuple({"in": "in_features", "out": "out_features"}.get(k, k) for k in bad)
    valid = not bad
    x_kind = _pick(rng, ["ok", "ok", "ok", "K+1", "int", "float64", "0-dim"])
    return _module_case(rng, in_f, out_f, kw, bias, valid, names, x_kind)


def _module_case(rng, in_f, out_f, kw, bias, valid, names, x_kind) -> Case:
    import torch

    import qkernels

    xdt = _pick(rng, [torch.float32, torch.bfloat16, torch.float16])
    lead = _pick(rng, [(3,), (0,), (2, 4), (1,), (40,)])
    if x_kind == "float64" and kw["compute_dtype"] is not None:
        x_kind = "ok_f64"  # cast to compute_dtype first, as bitsandbytes' Linear4bit does: valid
    if x_kind not in ("ok", "ok_f64"):
        valid, names = False, (*names, "x", "float64", "dtype", "shape")
    backward = rng.random() < 0.5

    def build():
        torch.manual_seed(5)
        m = qkernels.QLoRALinear(in_f, out_f, bias, **kw)
        with torch.no_grad():
            for name, prm in m.named_parameters():
                if "lora_B" in name:
                    prm.normal_(0, 0.1)
        return m

    def x_for(K):
        if x_kind == "K+1":
            return _tensor(random.Random(3), (*lead, K + 1), xdt)
        if x_kind == "int":
            return torch.ones(*lead, K, dtype=torch.int64)
        if x_kind in ("float64", "ok_f64"):
            return _tensor(random.Random(3), (*lead, K), torch.float64)
        if x_kind == "0-dim":
            return torch.tensor(1.0)
        return _tensor(random.Random(3), (*lead, K), xdt)

    def go(backend_env):
        m = build()
        x = x_for(in_f)
        if backward and x.is_floating_point():
            x.requires_grad_()
        old = os.environ.get("QKERNELS_BACKEND")
        if backend_env:
            os.environ["QKERNELS_BACKEND"] = backend_env
        try:
            y = m(x)
            if not backward:
                return y.detach()
            y.backward(torch.ones_like(y))
            grads = [x.grad] + [prm.grad for n, prm in sorted(m.named_parameters()) if prm.requires_grad]
            return [y.detach(), *grads]
        finally:
            if backend_env:
                if old is None:
                    del os.environ["QKERNELS_BACKEND"]
                else:
                    os.environ["QKERNELS_BACKEND"] = old

    backend = _pick(rng, [None, "cpu"])
    desc = (f"QLoRALinear({in_f!r}, {out_f!r}, bias={bias}, {kw}) x {xdt} {lead} [{x_kind}], backward={backward}, "
            f"QKERNELS_BACKEND={backend}")
    # computed in the lowest precision of x and compute_dtype, whatever the result's dtype
    low = {xdt, kw.get("compute_dtype") or xdt}
    tol = 8e-2 if torch.bfloat16 in low else 3e-2 if torch.float16 in low else None
    return Case("QLoRALinear", desc, lambda: go(backend), valid, names, lambda: go("reference"), exact=False, tol=tol)


def gen_load_state_dict(rng: random.Random) -> Case:
    import torch

    import qkernels

    N, K = _pick(rng, [(32, 64), (5, 33), (64, 128)])
    bs = _pick(rng, [32, 64, 128])
    dq = _pick(rng, [True, False])
    qt = _pick(rng, ["nf4", "fp4"])
    whole_model = rng.random() < 0.5

    def make(seed):
        torch.manual_seed(seed)
        if whole_model:
            model = torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.ReLU(), torch.nn.Linear(N, 8))
            qkernels.apply_qlora(model, target_modules=["0", "2"], r=4, blocksize=bs, double_quant=dq, quant_type=qt)
        else:
            model = qkernels.QLoRALinear.from_linear(torch.nn.Linear(K, N), r=4, blocksize=bs, double_quant=dq,
                                                     quant_type=qt)
        with torch.no_grad():
            for n, prm in model.named_parameters():
                if "lora_B" in n:
                    prm.normal_(0, 0.1)
        return model

    src = make(1)
    sd = src.state_dict()
    prefix = "0.weight." if whole_model else "weight."
    qs_keys = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    s = src[0].weight.quant_state if whole_model else src.weight.quant_state
    kind = rng.random()
    if kind < 0.2:
        name, valid, names, new = "none", True, (), dict(qs_keys)
    elif kind < 0.45:
        name, valid, names, fn = _pick(rng, _blob_mutations())
        if (name.startswith("nested") or name == "missing nested_offset") and not dq:
            name, valid, names, fn = "blocksize 0", False, ("blocksize",), _blob_mutations()[0][3]
        new = _apply_blob(qs_keys, s, fn)
        if name.startswith("shape"):  # the layer's own shape: any other is a mismatch
            valid, names = False, ("shape", "size mismatch")
        name = "blob: " + name
    elif kind < 0.8:
        while True:
            name, valid, names, fn = _pick(rng, _dict_mutations())
            try:
                new = fn(qs_keys, s)
                break
            except _Skip:
                continue
    else:
        lora_a = next(k for k in sd if "lora_A" in k)
        lora_b = next(k for k in sd if "lora_B" in k)
        bkey = "0.bias" if whole_model else "bias"
        wkey = prefix[:-1]
        opts = [
            ("lora_A wrong shape", False, ("lora_a", "shape", "size"), {lora_a: torch.zeros(4, K + 1)}),
            ("lora_B wrong shape", False, ("lora_b", "shape", "size"), {lora_b: torch.zeros(N, 5)}),
            ("lora_A float64", True, (), {lora_a: sd[lora_a].double()}),
            ("lora_A int", None, ("lora_a",), {lora_a: sd[lora_a].int()}),
            ("lora_A 1-D", False, ("lora_a", "shape", "size"), {lora_a: sd[lora_a].reshape(-1)}),
            ("bias wrong", False, ("bias", "size", "shape"), {bkey: torch.zeros(N + 1)}),
            ("bias int", None, ("bias",), {bkey: torch.zeros(N, dtype=torch.int32)}),
            ("weight truncated", False, ("weight", "packed", "bytes"), {wkey: sd[wkey][:-1]}),
            ("weight extended", False, ("weight", "packed", "bytes"), {wkey: torch.cat([sd[wkey], sd[wkey]])}),
            ("weight float32 values", False, ("weight",), {wkey: torch.randn(N, K)}),
            ("weight int8", False, ("weight",), {wkey: sd[wkey].view(torch.int8)}),
            ("weight 1-D", True, (), {wkey: sd[wkey].reshape(-1)}),
            ("weight non-contiguous", None, ("weight", "contiguous"),
             {wkey: torch.stack([sd[wkey].reshape(-1)] * 2, 1)[:, :1]}),
            ("weight missing", False, ("weight", "missing"), {wkey: None}),
        ]
        name, valid, names, upd = _pick(rng, opts)
        full = dict(sd)
        for k, v in upd.items():
            if v is None:
                del full[k]
            else:
                full[k] = v
        new = None
    if new is not None:
        full = {k: v for k, v in sd.items() if not k.startswith(prefix)}
        full.update({prefix + k: v for k, v in new.items()})
    strict = _pick(rng, [True, True, False])
    xdt = _pick(rng, [torch.float32, torch.bfloat16])
    x = _tensor(rng, (_pick(rng, [2, 30]), K), xdt)

    def load_and_run(backend_env):
        dst = make(2)
        dst.load_state_dict(copy.copy(full), strict=strict)
        old = os.environ.get("QKERNELS_BACKEND")
        os.environ["QKERNELS_BACKEND"] = backend_env or ""
        try:
            with torch.no_grad():
                return dst(x)
        finally:
            if old is None:
                os.environ.pop("QKERNELS_BACKEND", None)
            else:
                os.environ["QKERNELS_BACKEND"] = old

    def expect():
        with torch.no_grad():
            old = os.environ.get("QKERNELS_BACKEND")
            os.environ["QKERNELS_BACKEND"] = "reference"
            try:
                return src(x)
            finally:
                if old is None:
                    os.environ.pop("QKERNELS_BACKEND", None)
                else:
                    os.environ["QKERNELS_BACKEND"] = old

    backend = _pick(rng, [None, "cpu"])
    what = "apply_qlora model" if whole_model else "QLoRALinear"
    desc = f"load_state_dict[{name}] ({what} [{N}, {K}] bs={bs} dq={dq} {qt}, strict={strict}, x {xdt}, {backend})"
    names = tuple(names) + ("state_dict", "quant state") if names else names
    case = Case("load_state_dict", desc, lambda: load_and_run(backend), bool(valid), names, expect, exact=False)
    if valid is None:  # either refused cleanly, or loaded and then the native and reference paths agree
        def run_either():
            try:
                a = load_and_run(backend)
            except (TypeError, ValueError, RuntimeError) as e:
                text = str(e).lower()
                if not any(n in text for n in names):
                    raise
                return "agree"
            b = load_and_run("reference")
            return "agree" if _same(a, b, False) is None else f"disagree: {_same(a, b, False)}"
        case.valid, case.run, case.expect = True, run_either, (lambda: "agree")
    return case


GENERATORS: dict[str, Callable[[random.Random], Case]] = {
    "quantize": gen_quantize,
    "dequantize": gen_dequantize,
    "blockwise": gen_blockwise,
    "matmul": gen_matmul,
    "ops": gen_ops,
    "from_dict": gen_from_dict,
    "module": gen_module,
    "load_state_dict": gen_load_state_dict,
}


def build_case(seed: int, index: int, only: list[str] | None) -> Case:
    rng = random.Random(f"{seed}:{index}")
    names = only or list(GENERATORS)
    gen = GENERATORS[names[rng.randrange(len(names))]]
    return gen(rng)


# ------------------------------------------------------------------------------------------------ processes
def child(seed: int, start: int, stop: int, only: list[str] | None) -> None:
    """Run cases [start, stop), one JSON line each; a "start" line first, so a crash names its case."""
    import faulthandler
    import warnings

    import torch

    faulthandler.enable()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    for i in range(start, stop):
        print(json.dumps({"start": i}), flush=True)
        try:
            case = build_case(seed, i, only)
        except Exception as e:  # noqa: BLE001 - a generator bug is reported, not fatal
            print(json.dumps({"i": i, "surface": "generator", "desc": "", "outcome": "generator-error",
                              "detail": f"{type(e).__name__}: {e} {traceback.format_exc()[-300:]}"}), flush=True)
            continue
        outcome, detail = classify(case)
        print(json.dumps({"i": i, "surface": case.surface, "desc": case.desc, "outcome": outcome,
                          "detail": detail}), flush=True)


def run_isa(isa: str, seed: int, cases: int, batch: int, only: list[str] | None, timeout: float) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("QKERNELS_CPU_ISA", None)
    env.pop("QKERNELS_BACKEND", None)
    if isa != "default":
        env["QKERNELS_CPU_ISA"] = isa
    return run_batches(os.path.abspath(__file__), seed, cases, batch, ["--only", ",".join(only)] if only else [], env,
                       timeout, lambda rec: {**rec, "isa": isa},
                       lambda i, detail: {"i": i, "isa": isa, "surface": "?", "desc": "", "outcome": "crash",
                                          "detail": detail})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=500, help="cases per ISA")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--isa", default="all", help="all, or a comma list of " + ", ".join(ISAS))
    ap.add_argument("--batch", type=int, default=150, help="cases per child process")
    ap.add_argument("--only", default=None, help="comma list of surfaces: " + ", ".join(GENERATORS))
    ap.add_argument("--case", type=int, default=None, help="replay one case in this process, with its traceback")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    ap.add_argument("--json", default=None, help="write every result here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    only = args.only.split(",") if args.only else None
    if args.child:
        child(args.seed, args.start, args.stop, only)
        return 0
    if args.case is not None:
        if args.isa not in ("all", "default"):
            os.environ["QKERNELS_CPU_ISA"] = args.isa
        case = build_case(args.seed, args.case, only)
        print(case.desc)
        outcome, detail = classify(case)
        print(outcome, detail)
        if outcome in PROBLEMS or outcome == "clean":
            try:
                case.run()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        return int(outcome in PROBLEMS)
    isas = ISAS if args.isa == "all" else tuple(args.isa.split(","))
    results = []
    for isa in isas:
        results += run_isa(isa, args.seed, args.cases, args.batch, only, args.timeout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    by = Counter((r["surface"], r["outcome"]) for r in results)
    surfaces = sorted({s for s, _ in by})
    outcomes = ["ok", "clean", *PROBLEMS, "generator-error"]
    print(f"{'surface':28s}" + "".join(f"{o:>11s}" for o in outcomes))
    for s in surfaces:
        print(f"{s:28s}" + "".join(f"{by.get((s, o), 0):11d}" for o in outcomes))
    problems = [r for r in results if r["outcome"] in PROBLEMS or r["outcome"] == "generator-error"]
    seen = set()
    for r in problems:
        key = (r["outcome"], r["desc"].split("(")[0], r["detail"][:60])
        if key in seen:
            continue
        seen.add(key)
        print(f"\n[{r['outcome']}] isa={r['isa']} case {r['i']}: {r['desc']}\n    {r['detail'][:500]}\n    replay: "
              f"python tests/fuzz_public_api.py --seed {args.seed} --case {r['i']} --isa {r['isa']}"
              + (f" --only {args.only}" if args.only else ""))
    print(f"\n{len(results)} cases, {len(problems)} problems ({len(seen)} distinct)")
    return int(bool(problems))


if __name__ == "__main__":
    sys.exit(main())
