"""Tests of the CPU fused 4-bit GEMV + LoRA + bias (``_native.gemv_4bit_lora_native``, ``_C.gemv_4bit_lora_cpu``).

Oracle: float64 ``x @ W^T + t @ B^T + bias`` with W the exact float32 dequantized weight (``reference.dequantize_4bit``
with decoded scales) widened to float64. Tolerance basis (STYLE 12): the kernel's max error against that oracle is at
most twice the max error of plain torch computing the same expression in x's dtype (W dequantized to that dtype), plus
half an ulp of the largest output in that dtype -- the one rounding of the output no implementation avoids; for a single
output element torch's error can by chance be smaller than that.

Each case runs on every CPU path this machine has (``QKERNELS_CPU_ISA``), and bfloat16 on AVX-512 also with the
vdpbf16ps path turned off (``QKERNELS_CPU_GEMV_BF16=0``) so the float32 AVX-512 path is covered for it.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

import qkernels
from qkernels import _native, reference

pytestmark = pytest.mark.skipif(
    _native._C is None or not hasattr(_native._C, "gemv_4bit_lora_cpu"),
    reason=f"qkernels._C (with gemv_4bit_lora_cpu) is not available: {_native.NATIVE_ERROR or 'stale build'}",
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# (N, K): one output row; odd K (rows starting in a low nibble); K % 32 != 0; blocks straddling rows with K % 32 == 0
# (the SIMD path across block boundaries inside a row); K odd and not a multiple of anything; a real row length;
# N % 4 == 2 and 3 (the in-register tiles' last group of rows) and N % 6 == 0 and 1 (the bf16 multi-tile path's)
# with K one 32-column chunk past its 2048-column span.
SHAPES = [(1, 64), (3, 63), (7, 130), (65, 96), (113, 257), (256, 4096), (66, 2080), (67, 2080)]
MS = [1, 2, 3, 16, 17]
# The quantization variants and epilogue variants rotate across the (shape, dtype, M) grid so that every shape meets
# every blocksize, both scale formats, both codebooks, every rank and bias / no bias, without the full product.
QUANTS = list(itertools.product([32, 64, 256], [True, False], ["nf4", "fp4"]))  # blocksize, nested, quant_type
EPILOGUES = list(itertools.product([0, 1, 8], [True, False]))  # r, bias


def _paths() -> list[tuple[str, str]]:
    """(QKERNELS_CPU_ISA, QKERNELS_CPU_GEMV_BF16) pairs to run; the second matters only for bf16 on avx512."""
    isas = _native._C.cpu_isa_available() if _native._C is not None else ["scalar"]
    paths = [(isa, "1") for isa in isas]
    if "avx512" in isas:
        paths.append(("avx512", "0"))
    return paths


def _cases() -> list[pytest.param]:
    cases = []
    for si, (N, K) in enumerate(SHAPES):
        for di, dname in enumerate(DTYPES):
            for mi, M in enumerate(MS):
                i = si * 15 + di * 5 + mi
                bs, nested, qt = QUANTS[(i * 5 + si) % len(QUANTS)]
                r, bias = EPILOGUES[(i * 7 + di) % len(EPILOGUES)]
                scales, epi = "dq" if nested else "plain", "bias" if bias else "nobias"
                cid = f"M{M}-{N}x{K}-bs{bs}-{qt}-{scales}-{dname}-r{r}-{epi}"
                cases.append(pytest.param(M, N, K, bs, nested, qt, dname, r, bias, id=cid))
    return cases


@functools.cache
def _weight(N: int, K: int, bs: int, nested: bool, qt: str, dname: str):
    """Quantized W (from a weight in the case's dtype), its exact dequantized float32 values as float64 [N, K]."""
    g = torch.Generator().manual_seed(1000 * N + K)
    W = torch.randn(N, K, generator=g).to(DTYPES[dname])
    packed, st = qkernels.quantize_4bit(W, blocksize=bs, quant_type=qt, double_quant=nested)
    if st.nested:
        scales = reference.decode_nested_absmax(st.absmax, st.state2.absmax, st.state2.code, st.offset,
                                                st.state2.blocksize)
    else:
        scales = st.absmax
    W64 = reference.dequantize_4bit(packed, scales, st.code, bs, N * K, torch.float64).view(N, K)
    return packed, st, W64


@functools.cache
def _case(M, N, K, bs, nested, qt, dname, r, bias):
    dt = DTYPES[dname]
    packed, st, W64 = _weight(N, K, bs, nested, qt, dname)
    g = torch.Generator().manual_seed(7 * M + r + 3 * bias)
    x = torch.randn(M, K, generator=g).to(dt)
    t = torch.randn(M, r, generator=g) if r else None
    B = torch.randn(N, r, generator=g) if r else None
    b = torch.randn(N, generator=g) if bias else None
    y64 = x.double() @ W64.T
    y_torch = x @ W64.to(dt).T  # plain torch in x's dtype: dequantize to dt, matmul, add the terms in dt
    if r:
        y64 = y64 + t.double() @ B.double().T
        y_torch = y_torch + t.to(dt) @ B.to(dt).T
    if bias:
        y64 = y64 + b.double()
        y_torch = y_torch + b.to(dt)
    torch_err = (y_torch.double() - y64).abs().max().item()
    tol = 2 * torch_err + UNIT_ROUNDOFF[dt] * y64.abs().max().item()
    return packed, st, x, t, B, b, y64, tol


def _cases_on_paths() -> list[pytest.param]:
    out = []
    for case in _cases():
        for isa, bf in _paths():
            if bf == "0" and case.values[6] != "bf16":
                continue  # QKERNELS_CPU_GEMV_BF16=0 only changes the bfloat16 path
            path = isa if bf == "1" else f"{isa}-nobf16dot"
            out.append(pytest.param(isa, bf, *case.values, id=f"{path}-{case.id}"))
    return out


@pytest.mark.parametrize("isa,bf16dot,M,N,K,bs,nested,qt,dname,r,bias", _cases_on_paths())
def test_gemv_matches_fp64(monkeypatch, isa, bf16dot, M, N, K, bs, nested, qt, dname, r, bias):
    monkeypatch.setenv("QKERNELS_CPU_ISA", isa)
    monkeypatch.setenv("QKERNELS_CPU_GEMV_BF16", bf16dot)
    assert _native._C.cpu_isa_active() == isa
    packed, st, x, t, B, b, y64, tol = _case(M, N, K, bs, nested, qt, dname, r, bias)
    y = _native.gemv_4bit_lora_native(x, packed, st, t, B, b)
    assert y.dtype == x.dtype and y.shape == (M, N)
    err = (y.double() - y64).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g} (path {isa}, bf16dot={bf16dot})"


# The constant-table bf16 tile (M <= 4, K % 64 == 0, blocksize >= 64): 128 weights per step, x packed in the
# decode's order, two block scales per step (blocksize 64), one (>= 128), blocks spanning rows (256 > K = 128),
# N % 4 != 0, the M tiles' edges, both scale formats and codebooks, LoRA and bias on and off; K % 128 == 64 (a half
# group ending each row: K 64 is only that, 192 / 4544 after whole groups; blocks of 128 / 4096 spanning the rows'
# halves), the last row's half group at the end of the packed bytes.
CONST_CASES = [
    (M, N, K, bs, nested, qt, r, bias)
    for (M, N, K, bs, nested, qt, r, bias) in [
        (1, 7, 128, 64, True, "nf4", 0, False), (2, 66, 384, 64, False, "fp4", 8, True),
        (3, 33, 128, 256, True, "nf4", 1, True), (4, 64, 1024, 128, False, "nf4", 8, False),
        (1, 256, 4096, 64, True, "nf4", 16, True), (4, 67, 256, 4096, True, "fp4", 0, True),
        (5, 40, 384, 64, True, "nf4", 8, True),  # past the path's M: the per-block tables again
        (1, 7, 64, 64, True, "nf4", 0, False), (2, 9, 192, 64, False, "fp4", 8, True),
        (3, 5, 192, 128, True, "nf4", 1, True), (4, 33, 4544, 64, True, "nf4", 16, True),
        (1, 6, 320, 4096, False, "nf4", 0, True),
    ]
]


def _check_bf16_on_avx512(monkeypatch, M, N, K, bs, nested, qt, r, bias):
    """The bf16 case on the AVX-512 path against float64 (the module's tolerance); returns its inputs."""
    if "avx512" not in _native._C.cpu_isa_available():
        pytest.skip("this CPU has no AVX-512: the bf16 dot-product tiles are not compiled in for it")
    monkeypatch.setenv("QKERNELS_CPU_ISA", "avx512")
    packed, st, x, t, B, b, y64, tol = _case(M, N, K, bs, nested, qt, "bf16", r, bias)
    y = _native.gemv_4bit_lora_native(x, packed, st, t, B, b)
    err = (y.double() - y64).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"
    return packed, st, x, t, B, b, y64, tol


@pytest.mark.parametrize("M,N,K,bs,nested,qt,r,bias", CONST_CASES,
                         ids=[f"M{c[0]}-{c[1]}x{c[2]}-bs{c[3]}-{c[5]}-{'dq' if c[4] else 'plain'}-r{c[6]}"
                              for c in CONST_CASES])
def test_bf16_constant_table_path(monkeypatch, M, N, K, bs, nested, qt, r, bias):
    packed, st, x, t, B, b, y64, tol = _check_bf16_on_avx512(monkeypatch, M, N, K, bs, nested, qt, r, bias)
    monkeypatch.setenv("QKERNELS_CPU_GEMV_BF16", "0")  # the float32 tiles (constant table at M 1) agree too
    y32 = _native.gemv_4bit_lora_native(x, packed, st, t, B, b)
    assert (y32.double() - y64).abs().max().item() <= tol


# bf16 with K % 128 == 0 and blocksize >= 64 past the constant-table tile's 4 rows: the word-order decode (two
# 64-blocks per 128-weight step, one table for both), x packed to match; M 5-6 in registers (one M tile; N 9 leaves a
# single-row remainder), from 7 rows into a buffer per group of 6 rows read by M tiles of 4 (run_bf16_multi): N mod 6
# from 0 to 5 (N 3 and 4: one short group), M mod 4 from 0 to 3 (M 7, 9 / 17 / 25, 10 / 14, 8 / 16). K 1152 is one
# partial 2048-column span, 2048 exactly one, 2176 and 4224 a partial 128-column span past full ones; blocksize 4096 >
# K spans rows; blocksize 32 (and K % 128 != 0: K 2080, and the SHAPES) keep the per-32 decode.
WORDS_CASES = [
    (5, 7, 1152, 64, True, "nf4", 8, True), (8, 6, 256, 4096, False, "fp4", 0, False),
    (6, 9, 384, 128, True, "nf4", 1, True), (7, 3, 128, 64, False, "nf4", 16, True),
    (9, 5, 1152, 64, True, "nf4", 8, True), (16, 6, 1152, 64, False, "fp4", 0, False),
    (17, 7, 1152, 4096, True, "nf4", 1, True), (16, 67, 256, 128, False, "nf4", 16, False),
    (25, 33, 384, 256, True, "fp4", 8, True), (32, 4, 2048, 64, True, "nf4", 0, True),
    (16, 5, 1152, 32, True, "nf4", 8, True), (48, 9, 384, 64, True, "nf4", 8, True),
    (10, 8, 2176, 64, True, "nf4", 8, True), (14, 11, 4224, 128, False, "fp4", 1, False),
    (12, 14, 2080, 32, True, "nf4", 8, True), (96, 10, 2176, 64, True, "nf4", 16, True),
]


@pytest.mark.parametrize("M,N,K,bs,nested,qt,r,bias", WORDS_CASES,
                         ids=[f"M{c[0]}-{c[1]}x{c[2]}-bs{c[3]}-{c[5]}-{'dq' if c[4] else 'plain'}-r{c[6]}"
                              for c in WORDS_CASES])
def test_bf16_multi_tile_word_order_decode(monkeypatch, M, N, K, bs, nested, qt, r, bias):
    _check_bf16_on_avx512(monkeypatch, M, N, K, bs, nested, qt, r, bias)


@pytest.mark.parametrize("dname", ["fp32", "fp16"])
@pytest.mark.parametrize("M,N,K,bs,nested,qt,r,bias", [c for c in CONST_CASES if c[0] <= 2],
                         ids=[f"M{c[0]}-{c[1]}x{c[2]}-bs{c[3]}-{c[5]}" for c in CONST_CASES if c[0] <= 2])
def test_float_constant_table_path(monkeypatch, dname, M, N, K, bs, nested, qt, r, bias):
    """float32 / float16 x at M 1 (K % 128 == 0, blocksize >= 64): the vpermps constant-table tile; M 2: the other."""
    if "avx512" not in _native._C.cpu_isa_available():
        pytest.skip("this CPU has no AVX-512: the float32 constant-table tile is not compiled in for it")
    monkeypatch.setenv("QKERNELS_CPU_ISA", "avx512")
    packed, st, x, t, B, b, y64, tol = _case(M, N, K, bs, nested, qt, dname, r, bias)
    y = _native.gemv_4bit_lora_native(x, packed, st, t, B, b)
    err = (y.double() - y64).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"


def test_out_storage_and_layout_conversions():
    """out= is written in place; a bf16 quant_storage view of packed, a transposed float16 lora_B and a float16 bias
    give the same result as the plain uint8 / float32 inputs."""
    packed, st, x, t, B, b, y64, tol = _case(3, 65, 96, 32, True, "nf4", "bf16", 8, True)
    ref = _native.gemv_4bit_lora_native(x, packed, st, t, B, b)
    out = torch.full((3, 65), float("nan"), dtype=torch.bfloat16)
    got = _native.gemv_4bit_lora_native(x, packed, st, t, B, b, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    raw = packed.reshape(-1)
    padded = torch.cat([raw, raw.new_zeros(-raw.numel() % 2)])
    storage_view = padded.view(torch.bfloat16).unsqueeze(1)
    B_t = B.to(torch.float16).float().T.contiguous().T  # non-contiguous, values exactly representable
    b16 = b.to(torch.float16)
    y1 = _native.gemv_4bit_lora_native(x, storage_view, st, t, B_t, b16.float())
    y2 = _native.gemv_4bit_lora_native(x, packed, st, t, B.to(torch.float16).float(), b16)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_all_paths_agree_closely():
    """Every path computes the same sum up to float32 reassociation: fp32 outputs agree to ~1e-5 relative."""
    packed, st, x, t, B, b, y64, tol = _case(17, 256, 4096, 64, True, "nf4", "fp32", 8, True)
    outs = {}
    mp = pytest.MonkeyPatch()
    try:
        for isa, bf in _paths():
            mp.setenv("QKERNELS_CPU_ISA", isa)
            mp.setenv("QKERNELS_CPU_GEMV_BF16", bf)
            outs[(isa, bf)] = _native.gemv_4bit_lora_native(x, packed, st, t, B, b)
    finally:
        mp.undo()
    scale = y64.abs().max().item()
    for key, y in outs.items():
        assert (y.double() - y64).abs().max().item() <= 1e-5 * scale, key


# ------------------------------------------------------------------------------------------------ bad arguments
def _small():
    packed, st, x, t, B, b, _, _ = _case(2, 7, 130, 64, True, "nf4", "fp32", 8, True)
    return packed, st, x, t, B, b


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: a.update(x=a["x"][:, :129].contiguous()), ValueError, "argument 'x' has K = 129"),
        (lambda a: a.update(x=a["x"].double()), TypeError, "argument 'x' must be torch.float32"),
        (lambda a: a.update(x=a["x"][0]), ValueError, "argument 'x' must be 2-D"),
        (lambda a: a.update(x=torch.randn(130, 2).T), ValueError, "argument 'x' must be contiguous"),
        (lambda a: a.update(x=torch.empty(2, 130, device="meta")), ValueError, "unsupported device"),
        (lambda a: a.update(lora_B=None), ValueError, "'lora_t' and 'lora_B' must both"),
        (lambda a: a.update(lora_t=a["lora_t"].double()), TypeError, "argument 'lora_t' must be torch.float32"),
        (lambda a: a.update(lora_t=a["lora_t"][:1]), ValueError, "argument 'lora_t' must be \\[M, r\\]"),
        (lambda a: a.update(lora_B=a["lora_B"][:, :4]), ValueError, "argument 'lora_B' must be \\[N, r\\]"),
        (lambda a: a.update(bias=a["bias"][:6]), ValueError, "argument 'bias' must be \\[N\\]"),
        (lambda a: a.update(out=torch.empty(2, 7, dtype=torch.float16)), TypeError, "argument 'out' must have"),
        (lambda a: a.update(out=torch.empty(7, 2)), ValueError, "argument 'out' must be a contiguous \\[2, 7\\]"),
        (lambda a: a.update(packed=a["packed"][:100]), ValueError, "packed holds 100 bytes"),
        (lambda a: a.update(state="nope"), TypeError, "argument 'state' must be a qkernels.QuantState"),
    ],
    ids=["wrong-K", "x-float64", "x-1d", "x-noncontiguous", "x-meta", "lora-half-missing", "lora_t-float64",
         "lora_t-rows", "lora_B-shape", "bias-shape", "out-dtype", "out-shape", "packed-short", "state-type"],
)
def test_wrapper_rejects_bad_arguments(change, exc, match):
    packed, st, x, t, B, b = _small()
    args = dict(x=x, packed=packed, state=st, lora_t=t, lora_B=B, bias=b, out=None)
    change(args)
    with pytest.raises(exc, match=match):
        _native.gemv_4bit_lora_native(**args)


def _raw_args(**over):
    packed, st, x, t, B, b = _small()
    out = torch.empty(2, 7)
    keep = (packed, st, x, t, B, b, out)  # the caller holds these alive while the pointers are used
    args = dict(
        x_ptr=x.data_ptr(), dtype=0, M=2, K=130, packed_ptr=packed.data_ptr(), absmax_ptr=0,
        absmax_q_ptr=st.absmax.data_ptr(), nested_absmax_ptr=st.state2.absmax.data_ptr(),
        nested_code_ptr=st.state2.code.data_ptr(), offset=float(st.offset), nested_blocksize=256,
        code_ptr=st.code.data_ptr(), blocksize=64, N=7, lora_t_ptr=t.data_ptr(), lora_B_ptr=B.data_ptr(), r=8,
        bias_ptr=b.data_ptr(), out_ptr=out.data_ptr(),
    )
    args.update(over)
    return args, keep


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(x_ptr=0), "argument 'x_ptr' must be a non-null pointer"),
        (dict(packed_ptr=0), "argument 'packed_ptr' must be a non-null pointer"),
        (dict(absmax_q_ptr=0), "argument 'absmax_q_ptr' must be a non-null pointer"),
        (dict(nested_absmax_ptr=0), "argument 'nested_absmax_ptr' must be a non-null pointer"),
        (dict(code_ptr=0), "argument 'code_ptr' must be a non-null pointer"),
        (dict(lora_t_ptr=0), "argument 'lora_t_ptr / lora_A_ptr' exactly one must be given"),
        (dict(lora_A_ptr=1), "argument 'lora_t_ptr / lora_A_ptr' exactly one must be given"),
        (dict(lora_t_ptr=0, lora_A_ptr=1, lora_A_dtype=_native._DTYPE_TO_NATIVE[torch.float16]),
         "argument 'lora_A_dtype' must be float32 or "),
        (dict(lora_B_ptr=0), "argument 'lora_B_ptr' must be a non-null pointer"),
        (dict(out_ptr=0), "argument 'out_ptr' must be a non-null pointer"),
        (dict(blocksize=48), "argument 'blocksize' must be a power of two"),
        (dict(nested_blocksize=100), r"argument 'nested_blocksize' must be a power of two in \[1, 1073741824\]"),
        (dict(nested_blocksize=2**31), r"argument 'nested_blocksize' must be a power of two in \[1, 1073741824\]"),
        (dict(dtype=7), "argument 'dtype' must be a qkernels._C.DType"),
        (dict(M=0), "argument 'M' must be > 0"),
        (dict(K=-1), "argument 'K' must be > 0"),
        (dict(r=-1), "argument 'r' must be >= 0"),
        (dict(lora_B_dtype=_native._DTYPE_TO_NATIVE[torch.float16]), "argument 'lora_B_dtype' must be float32 or "),
        (dict(bias_dtype=_native._DTYPE_TO_NATIVE[torch.float16]), "argument 'bias_dtype' must be float32 or "),
    ],
    ids=lambda o: next(iter(o)) if isinstance(o, dict) else None,
)
def test_binding_rejects_bad_arguments(over, match):
    args, _keep = _raw_args(**over)
    with pytest.raises(ValueError, match=match):
        _native._C.gemv_4bit_lora_cpu(**args)


def test_binding_accepts_null_lora_when_rank_zero_and_null_bias():
    args, keep = _raw_args(lora_t_ptr=0, lora_B_ptr=0, r=0, bias_ptr=0)
    _native._C.gemv_4bit_lora_cpu(**args)
    packed, st, x, *_rest, out = keep
    y = _native.gemv_4bit_lora_native(x, packed, st, None, None, None)
    torch.testing.assert_close(out, y, rtol=0, atol=0)


@pytest.mark.parametrize("M", [1, 3, 16])
def test_bfloat16_lora_B_and_bias_give_the_bits_of_their_float32_copies(M):
    """lora_B and bias in bfloat16 are widened by the binding (exact) instead of a torch copy per call: the output is
    bit-identical to passing float32 copies, on the GEMV's tiles for M 1 (constant table), 3 and 16 (several M tiles),
    through the raw entry point the inference path calls."""
    N, K, r = 67, 256, 16
    packed, st, x, t, B, b, _, _ = _case(M, N, K, 64, True, "nf4", "bf16", r, True)
    B16, b16 = B.to(torch.bfloat16), b.to(torch.bfloat16)
    raw = packed.view(torch.uint8)

    def run(B_, b_):
        return _native.gemv_4bit_lora_raw(x, raw, st.absmax, st.code, 64, N, st.state2.absmax, st.state2.code,
                                          st.offset, st.state2.blocksize, t, B_, b_)

    y = run(B16, b16)
    assert torch.equal(y, run(B16.float(), b16.float()))
    assert torch.equal(run(B16.t().contiguous().t(), b16), run(B16.float(), b16.float()))  # strided: made dense


def test_bad_isa_env_raises(monkeypatch):
    monkeypatch.setenv("QKERNELS_CPU_ISA", "sse9")
    packed, st, x, t, B, b = _small()
    with pytest.raises(ValueError, match="QKERNELS_CPU_ISA"):
        _native.gemv_4bit_lora_native(x, packed, st, t, B, b)


# Rows past 16 (qkernels._linear.gemv_max_m: 96 / 64 for bf16 with vdpbf16ps, 2048 for float32 / float16 on
# AVX-512): several M tiles with a partial last one, on every path and dtype; 130 rows are three of the float32
# path's 64-row passes (the last of 2 rows: x, T and y offset per pass), N 67 = 11 groups of 6 and one row, K 1056
# one 32-column chunk past a 1024-column span.
WIDE_M_CASES = [(33, 67, 1056, 64, True, "nf4", 8, True), (61, 65, 96, 32, False, "fp4", 0, False),
                (64, 7, 256, 256, True, "nf4", 1, True), (130, 67, 1056, 64, False, "fp4", 8, True)]


def _wide_m_params() -> list[pytest.param]:
    out = []
    for isa, bf in _paths():
        for dname in DTYPES:
            if bf == "0" and dname != "bf16":
                continue  # QKERNELS_CPU_GEMV_BF16=0 only changes the bfloat16 path
            for case in WIDE_M_CASES:
                path = isa if bf == "1" else f"{isa}-nobf16dot"
                out.append(pytest.param(isa, bf, dname, *case, id=f"{path}-{dname}-M{case[0]}-{case[1]}x{case[2]}"))
    return out


@pytest.mark.parametrize("isa,bf16dot,dname,M,N,K,bs,nested,qt,r,bias", _wide_m_params())
def test_gemv_wide_m_matches_fp64(monkeypatch, isa, bf16dot, dname, M, N, K, bs, nested, qt, r, bias):
    monkeypatch.setenv("QKERNELS_CPU_ISA", isa)
    monkeypatch.setenv("QKERNELS_CPU_GEMV_BF16", bf16dot)
    packed, st, x, t, B, b, y64, tol = _case(M, N, K, bs, nested, qt, dname, r, bias)
    y = _native.gemv_4bit_lora_native(x, packed, st, t, B, b)
    assert y.dtype == x.dtype and y.shape == (M, N)
    err = (y.double() - y64).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g} (path {isa}, bf16dot={bf16dot})"


@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_lora_A_given_to_the_gemv_equals_its_down_projection_given(M, a_dtype):
    """The binding's own down-projection (lora_A instead of lora_t, qkernels.lora's inference path) runs the CPU LoRA
    kernel that lora_down_raw runs: the same t, so the same bits, with a scale that is not a power of two."""
    torch.manual_seed(M)
    N, K, r, s = 96, 256, 16, 1.7
    packed, st = qkernels.quantize_4bit(torch.randn(N, K) * 0.05, 64, double_quant=True)
    x = torch.randn(M, K).to(torch.bfloat16)
    A, B, b = (torch.randn(r, K) * 0.1).to(a_dtype), torch.randn(N, r) * 0.1, torch.randn(N)
    args = (x, packed, st.absmax, st.code, 64, N, st.state2.absmax, st.state2.code, st.offset, st.state2.blocksize)
    t = _native.lora_down_raw(x, _native._DTYPE_TO_NATIVE[x.dtype], 0, A, s, 1.0)
    want = _native.gemv_4bit_lora_raw(*args, t, B, b)
    got = _native.gemv_4bit_lora_raw(*args, None, B, b, lora_A=A, lora_scale=s)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert not torch.equal(got, _native.gemv_4bit_lora_raw(*args, None, B, b, lora_A=A, lora_scale=2 * s))


# The CPU backward's fused dX = g @ W (_native.gemm_dx_raw, csrc/cpu/gemv_simd.cpp dx_strips / dx_strips_avx2):
# float32 out, any g dtype; N past the 256-row chunk (and not a multiple of it), M not a multiple of the 6-row tile, K
# several 64-column strips; blocksize 32 (two blocks per strip), 4096 > K (blocks across rows); both scale formats
# and codebooks. Tolerance (the module's basis, for a float32 result): twice the error of torch's float32 matmul of the
# same g and exact W against float64, plus one float32 ulp (2^-24 relative) of the largest output.
DX_CASES = [(1, 1, 64, 64, True, "nf4"), (7, 300, 192, 32, False, "fp4"), (13, 513, 128, 4096, True, "nf4"),
            (64, 67, 256, 128, False, "nf4"), (6, 257, 64, 256, True, "fp4")]


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("dname", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M,N,K,bs,nested,qt", DX_CASES, ids=[f"M{c[0]}-{c[1]}x{c[2]}-bs{c[3]}" for c in DX_CASES])
def test_fused_dx_matches_fp64(monkeypatch, M, N, K, bs, nested, qt, dname, isa):
    if isa not in _native._C.cpu_isa_available():
        pytest.skip(f"this CPU has no {isa}: the fused dX kernel's {isa} path cannot run here")
    monkeypatch.setenv("QKERNELS_CPU_ISA", isa)
    packed, st, W64 = _weight(N, K, bs, nested, qt, dname)
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(M + N)).to(DTYPES[dname])
    scales = (st.absmax, st.state2.absmax, st.state2.code, st.offset, st.state2.blocksize) if st.nested else (
        st.absmax, None, None, None, None)
    dx = _native.gemm_dx_raw(g, packed.view(torch.uint8), scales, st.code, bs, K)
    assert dx is not None and dx.dtype == torch.float32 and dx.shape == (M, K)
    ref = g.double() @ W64
    plain_err = ((g.float() @ W64.float()).double() - ref).abs().max().item()  # torch's float32 matmul
    err = (dx.double() - ref).abs().max().item()
    assert err <= 2 * plain_err + 2.0**-24 * ref.abs().max().item(), (err, plain_err)


def test_fused_dx_declines_where_it_does_not_apply(monkeypatch):
    """K % 64 != 0, or the scalar CPU path: None (nothing written), and the backward dequantizes instead."""
    packed, st, _ = _weight(5, 96, 32, False, "nf4", "fp32")
    g = torch.randn(3, 5)
    scales = (st.absmax, None, None, None, None)
    assert _native.gemm_dx_raw(g, packed.view(torch.uint8), scales, st.code, 32, 96) is None
    packed, st, _ = _weight(5, 128, 64, False, "nf4", "fp32")
    monkeypatch.setenv("QKERNELS_CPU_ISA", "scalar")
    assert _native.gemm_dx_raw(g, packed.view(torch.uint8), (st.absmax, None, None, None, None), st.code, 64,
                               128) is None
