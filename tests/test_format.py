"""The 4-bit format, bit for bit against bitsandbytes 0.50.2 (its CPU path) and against the exact rule."""

import math

import pytest
import torch

import qkernels
from qkernels import codebooks

from ._oracle import F, exact_codes, same_bits, unpack_nibbles

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 1024, 4096]
# awkward sizes: 1 element, one partial block, just past a block, odd numels, a non-power-of-two matrix
SHAPES = [(1,), (3,), (63,), (65,), (127, 33), (300, 301), (1023, 17)]


def _data(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).mul(3).exp()  # mixed scales per block
    flat = A.reshape(-1)
    if flat.numel() > 600:
        flat[100:400] = 0.0  # an all-zero stretch: whole zero blocks at the small blocksizes
    return A.to(dtype)


def assert_nested_codes_close_to_bitsandbytes(A, s, sb):
    """bitsandbytes' CPU path approximates the nested 8-bit rounding with a lookup table; qkernels applies the
    exact rule (tested separately). Measured on MiniLM's 36 weights + randn matrices (535k scales): 99.81%
    identical, 0.19% one code off (0.6% on a randn * 0.02 matrix), 13 scales two to four codes off, all with
    |centered / nested_absmax| < 1e-5,
    where the dynamic map's entries are ~1e-6 apart; bitsandbytes' extra decoding error was at most 3e-5 of
    the nested scale. The bounds below are those measurements with 2-3x headroom. Nested blocks whose
    centered absmax are all 0 are the documented exception (test_double_quant_single_nested_block_exception).
    """
    dyn = codebooks.dynamic_map()
    ours, theirs = s.absmax.long(), sb.absmax.long()
    nested_scale = s.state2.absmax.repeat_interleave(256)[: ours.numel()]
    live = nested_scale > 0
    v = (qkernels.reference.absmax_of(A, s.blocksize) - s.offset)[live] / nested_scale[live]
    ours, theirs = ours[live], theirs[live]
    d = (ours - theirs).abs()
    assert int(d.gt(0).sum()) <= max(5, 0.01 * d.numel()), "0.2-0.6% measured; a handful allowed on tiny tensors"
    assert torch.all(v[d > 1].abs() < 1e-5), "codes more than one apart only where the map's entries are ~1e-6 apart"
    excess = (dyn[theirs] - v).abs() - (dyn[ours] - v).abs()
    if excess.numel() == 0:
        return
    assert excess.min() >= 0, "the exact rule is never farther from the value than bitsandbytes' code"
    assert excess.max() <= 1e-4


def _ids(v):
    return str(v).replace("torch.", "") if not isinstance(v, tuple) else "x".join(map(str, v))


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("blocksize", BLOCKSIZES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_nf4_matches_bitsandbytes_bit_for_bit(dtype, blocksize, shape):
    A = _data(shape, dtype, seed=blocksize + len(shape))
    p, s = qkernels.quantize_4bit(A, blocksize, "nf4", double_quant=False)
    pb, sb = F.quantize_4bit(A, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    assert torch.equal(p, pb), "packed bytes differ"
    assert torch.equal(s.absmax.view(torch.int32), sb.absmax.view(torch.int32)), "absmax differs"
    assert s.shape == sb.shape and s.dtype == sb.dtype and s.blocksize == sb.blocksize
    # dequantization: same bits from both libraries on the same data and state
    ours, theirs = qkernels.dequantize_4bit(p, s), F.dequantize_4bit(pb, sb)
    assert ours.dtype == dtype and ours.shape == A.shape
    assert same_bits(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_codes_follow_the_exact_midpoint_rule(dtype, shape):
    A = _data(shape, dtype, seed=7)
    for qt in ("nf4", "fp4"):
        p, s = qkernels.quantize_4bit(A, 64, qt, double_quant=False)
        n = A.numel()
        scale = s.absmax.clamp(min=1e-38).reciprocal().repeat_interleave(64)[:n]
        normalized = (A.reshape(-1).float() * scale).clamp(-1, 1)
        expected = exact_codes(normalized, codebooks.get_codebook(qt))
        assert torch.equal(unpack_nibbles(p, n), expected), qt
        if n % 2:  # the pad nibble is the code of 0.0, as bitsandbytes writes it
            assert int(p.reshape(-1)[-1]) & 0xF == int(exact_codes(torch.zeros(1), codebooks.get_codebook(qt))[0])


@pytest.mark.parametrize("shape", [(1023, 17), (300, 301), (4096, 33)], ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_fp4_against_bitsandbytes_cpu(dtype, shape):
    """FP4: bitsandbytes' CPU quantizer takes its midpoints from an FP4 table rounded to 4 decimals
    (backends/utils.py: 0.0052, 0.1667, 0.6667, ...), while its stored quant_map and every dequantizer use
    the exact table. qkernels uses the exact table throughout. So codes may differ only for values lying
    between an exact midpoint and bitsandbytes' rounded one; everywhere else they are identical."""
    A = _data(shape, dtype, seed=3)
    p, s = qkernels.quantize_4bit(A, 64, "fp4", double_quant=False)
    pb, sb = F.quantize_4bit(A, blocksize=64, compress_statistics=False, quant_type="fp4")
    assert torch.equal(s.absmax, sb.absmax)
    n = A.numel()
    ours, theirs = unpack_nibbles(p, n), unpack_nibbles(pb, n)
    differ = ours != theirs
    normalized = (A.reshape(-1).float() * s.absmax.clamp(min=1e-38).reciprocal().repeat_interleave(64)[:n]).clamp(-1, 1)
    rounded = torch.tensor([0.0, 0.0052, 0.6667, 1.0, 0.3333, 0.5, 0.1667, 0.25])
    rounded = torch.cat([rounded, -rounded])
    theirs_rule = exact_codes(normalized, rounded)
    code = codebooks.fp4_codebook()
    # where they differ, bitsandbytes followed its rounded table and both codes are the two neighbours
    assert torch.equal(theirs[differ], theirs_rule[differ])
    v = normalized[differ]
    assert torch.all((code[ours[differ]] - v).abs() <= (code[theirs[differ]] - v).abs())
    assert differ.float().mean() < 1e-3, "only values within ~1e-4 of a midpoint can differ"
    # same packed data decodes to the same bits in both libraries
    assert same_bits(qkernels.dequantize_4bit(p, s), F.dequantize_4bit(p, s))


@pytest.mark.parametrize("shape", [(1023, 17), (300, 301), (2048, 129), (65,)], ids=_ids)
@pytest.mark.parametrize("blocksize", [32, 64, 256], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_double_quant_against_bitsandbytes(dtype, blocksize, shape):
    A = _data(shape, dtype, seed=11)
    p, s = qkernels.quantize_4bit(A, blocksize, "nf4", double_quant=True)
    pb, sb = F.quantize_4bit(A, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    assert torch.equal(p, pb)
    assert s.nested and s.absmax.dtype == torch.uint8 and s.state2.blocksize == 256
    assert torch.equal(s.offset.view(torch.int32), sb.offset.view(torch.int32)), "offset = mean(absmax), same bits"
    assert torch.equal(s.state2.absmax.view(torch.int32), sb.state2.absmax.view(torch.int32))
    assert torch.equal(s.state2.code, sb.state2.code)
    # exact rule for the nested codes: nearest dynamic-map entry of (absmax - offset) / nested_absmax
    absmax32 = qkernels.reference.absmax_of(A, blocksize)
    centered = absmax32 - s.offset
    nested_scale = s.state2.absmax.clamp(min=1e-38).reciprocal().repeat_interleave(256)[: centered.numel()]
    expected = exact_codes((centered * nested_scale).clamp(-1, 1), codebooks.dynamic_map())
    assert torch.equal(s.absmax.long(), expected)
    assert_nested_codes_close_to_bitsandbytes(A, s, sb)
    # both libraries decode both states to the same values
    assert same_bits(qkernels.dequantize_4bit(p, s), F.dequantize_4bit(p, s))
    assert same_bits(qkernels.dequantize_4bit(pb, qkernels.QuantState.from_dict(sb.as_dict(packed=True))),
                     F.dequantize_4bit(pb, sb))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_double_quant_randn_within_one_code(dtype):
    """Normally distributed weights: packed bytes, nested absmax and offset bit-identical; nested codes as
    close to bitsandbytes' CPU path as measured (see assert_nested_codes_close_to_bitsandbytes)."""
    A = torch.randn(2048, 1024, generator=torch.Generator().manual_seed(5)).mul(0.02).to(dtype)
    p, s = qkernels.quantize_4bit(A, 64, "nf4", double_quant=True)
    pb, sb = F.quantize_4bit(A, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(p, pb) and torch.equal(s.state2.absmax, sb.state2.absmax) and torch.equal(s.offset, sb.offset)
    assert_nested_codes_close_to_bitsandbytes(A, s, sb)


def test_double_quant_single_nested_block_exception():
    """Documented exception: when every centered absmax of a nested block is 0 (e.g. a tensor of one block,
    where absmax == offset), bitsandbytes' CPU path writes nested code 0 (it divides 0 by 0) and qkernels the
    code of 0.0 (127). Both decode to exactly the offset."""
    A = torch.randn(64)
    p, s = qkernels.quantize_4bit(A, 64, "nf4", double_quant=True)
    pb, sb = F.quantize_4bit(A, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert s.state2.absmax.item() == 0.0 and sb.state2.absmax.item() == 0.0
    assert int(s.absmax[0]) == 127 and codebooks.dynamic_map()[127] == 0.0
    assert int(sb.absmax[0]) == 0
    assert same_bits(qkernels.dequantize_4bit(p, s), F.dequantize_4bit(pb, sb))


def test_all_zero_blocks():
    """An all-zero block has absmax 0 and encodes as the codebook's zero (NF4 code 7, FP4 code 0), as
    bitsandbytes' PyTorch/CPU path does (its CUDA path writes code 0; both decode to 0)."""
    A = torch.zeros(4, 64)
    A[1] = torch.randn(64)
    for qt, zero_code in (("nf4", 7), ("fp4", 0)):
        p, s = qkernels.quantize_4bit(A, 64, qt, double_quant=False)
        assert s.absmax[0] == 0 and s.absmax[2] == 0
        codes = unpack_nibbles(p, A.numel()).view(4, 64)
        assert torch.all(codes[0] == zero_code) and torch.all(codes[3] == zero_code)
        out = qkernels.dequantize_4bit(p, s)
        assert torch.all(out[0] == 0) and torch.all(out[2] == 0)
        pb, _ = F.quantize_4bit(A, blocksize=64, quant_type=qt)
        assert torch.equal(p, pb)


def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_double_quant_is_the_same_at_any_thread_count():
    """The nested offset is absmax.mean() as torch computes it on one thread, so quantize_4bit gives the same bits at 1
    and 2 threads (docs/format.md §7.9). torch's own float32 mean of these 131072 scales differs in the last bit
    between 1 and 2 threads (asserted, so the case is live; torch 2.13); bitsandbytes, which takes it at the current
    thread count, equals qkernels when run with one thread."""
    g = torch.Generator().manual_seed(1)
    n = 131072 * 32
    A = (torch.randn(n, generator=g) * torch.rand(n, generator=g).mul(4).exp()).bfloat16()
    absmax = qkernels.reference.absmax_of(A, 32)
    assert _with_threads(1, absmax.mean).item() != _with_threads(2, absmax.mean).item(), "pick data where they differ"
    one = _with_threads(1, lambda: qkernels.quantize_4bit(A, 32, "nf4", double_quant=True))
    two = _with_threads(2, lambda: qkernels.quantize_4bit(A, 32, "nf4", double_quant=True))
    assert same_bits(one[1].offset, two[1].offset)
    assert torch.equal(one[1].absmax, two[1].absmax) and same_bits(one[1].state2.absmax, two[1].state2.absmax)
    assert same_bits(qkernels.dequantize_4bit(*one), qkernels.dequantize_4bit(*two))
    sb = _with_threads(1, lambda: F.quantize_4bit(A, blocksize=32, quant_type="nf4", compress_statistics=True)[1])
    assert same_bits(one[1].offset, sb.offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("tail", [1, 36, 63])
def test_bitsandbytes_cpu_exception_all_zero_partial_block(tail, dtype):
    """Documented exception (docs/format.md §7.6): an all-zero partial last block gets absmax 1e-38 (its floor) from
    bitsandbytes' CPU path and max |x| = 0 from qkernels. Same bytes, both decode it to +0.0."""
    A = torch.cat([torch.randn(64, generator=torch.Generator().manual_seed(tail)), torch.zeros(tail)]).to(dtype)
    p, s = qkernels.quantize_4bit(A, 64, "nf4", double_quant=False)
    pb, sb = F.quantize_4bit(A, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(p, pb) and s.absmax[0] == sb.absmax[0]
    assert s.absmax[1].item() == 0.0
    assert sb.absmax[1].item() == torch.tensor(1e-38).item(), "bitsandbytes changed its floor: update docs/format.md"
    ours = qkernels.dequantize_4bit(p, s)
    assert same_bits(ours, F.dequantize_4bit(pb, sb)) and not torch.signbit(ours[64:]).any()


def test_bitsandbytes_cpu_exception_fp4_nibble_8_is_negative_zero():
    """Documented exception (§7.7): FP4 nibble 8 (its second +0 entry) is -0.0 from bitsandbytes' CPU C++ dequantizer
    and +0.0 from its quant_map, its PyTorch path and qkernels."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    # 0.001 is in (0, 0.0026]: nibble 8; -0.001 and 0: nibble 0. A last dimension of 1000 (measured: not 64, 128, 1024
    # or 4096, which give +0.0) takes the C++ code that writes -0.0.
    A = torch.tensor([1.0, 0.001, -0.001, 0.0] * 250)
    p, s = qkernels.quantize_4bit(A, 64, "fp4", double_quant=False)
    pb, sb = F.quantize_4bit(A, blocksize=64, compress_statistics=False, quant_type="fp4")
    assert torch.equal(p, pb)
    nibbles = unpack_nibbles(p, A.numel())
    assert torch.all(nibbles[1::4] == 8) and torch.all(nibbles[2::4] == 0)
    ours, theirs = qkernels.dequantize_4bit(p, s), F.dequantize_4bit(pb, sb).reshape(-1)
    flat_rule = _dequantize_4bit_compute(p.reshape(-1), s.absmax, s.code, 64, (A.numel(),), torch.float32)
    assert same_bits(ours, flat_rule) and not torch.signbit(ours[1::4]).any()
    assert torch.equal(ours, theirs)
    assert torch.signbit(theirs[1::4]).all(), "bitsandbytes now writes +0.0 for nibble 8: drop this exception"


def test_bitsandbytes_cpu_exception_tiny_bf16_outputs_flushed():
    """Documented exception (§7.8): bitsandbytes' CPU C++ dequantizer flushes bf16 results below the smallest normal
    to +-0; qkernels rounds code * absmax to the nearest bf16 (subnormals included), as its PyTorch path does."""
    tiny = torch.finfo(torch.bfloat16).tiny
    A = (torch.randn(128, generator=torch.Generator().manual_seed(0)) * tiny * 2).bfloat16()
    p, s = qkernels.quantize_4bit(A, 64, "nf4", double_quant=False)
    pb, sb = F.quantize_4bit(A, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(p, pb) and torch.equal(s.absmax, sb.absmax)
    exact = (s.code[unpack_nibbles(p, 128)] * s.absmax.repeat_interleave(64)).bfloat16()  # one RNE rounding
    ours, theirs = qkernels.dequantize_4bit(p, s), F.dequantize_4bit(pb, sb).reshape(-1)
    assert same_bits(ours, exact)
    subnormal = (exact != 0) & (exact.abs() < tiny)
    assert subnormal.sum() > 10
    assert torch.all(theirs[subnormal] == 0), "bitsandbytes keeps bf16 subnormals now: drop this exception"
    assert same_bits(ours[~subnormal], theirs[~subnormal])


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32], ids=_ids)
def test_quant_storage_reinterprets_the_same_bytes(storage):
    A = torch.randn(96, 80)
    p8, s8 = qkernels.quantize_4bit(A, 64)
    p, s = qkernels.quantize_4bit(A, 64, quant_storage=storage)
    assert p.dtype == storage and p.dim() == 2 and p.shape[1] == 1
    assert torch.equal(p.reshape(-1).view(torch.uint8), p8.reshape(-1))
    pb, _ = F.quantize_4bit(A, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=storage)
    assert torch.equal(p.view(torch.uint8), pb.view(torch.uint8))
    assert torch.equal(qkernels.dequantize_4bit(p, s), qkernels.dequantize_4bit(p8, s8))
    # an odd byte count is zero-padded to a whole storage element; decoding reads only the real bytes
    x = torch.randn(5)
    p_odd, s_odd = qkernels.quantize_4bit(x, 32, quant_storage=storage)
    p_u8, s_u8 = qkernels.quantize_4bit(x, 32)
    assert p_odd.numel() * p_odd.element_size() == -(-3 // p_odd.element_size()) * p_odd.element_size()
    assert torch.equal(p_odd.reshape(-1).view(torch.uint8)[:3], p_u8.reshape(-1))
    assert torch.equal(qkernels.dequantize_4bit(p_odd, s_odd), qkernels.dequantize_4bit(p_u8, s_u8))


def test_quantization_error_matches_the_paper():
    """NF4, bs 64, standard normal data: mean |error| ~0.0728 and mean relative error ~0.203 (bitsandbytes'
    test_4bit_quant figures). Basis for the tolerance: over 4 M samples the standard error of the mean is
    ~3e-5 (|err| std 0.056 / 2048), and block-level correlation widens it; seeds vary by ~1e-4. We allow
    1e-3 on the absolute and 5e-3 on the heavier-tailed relative error: about 10x the seed-to-seed spread,
    and far below what a wrong codebook or rounding rule costs (fp4 gives ~0.087)."""
    A = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
    p, s = qkernels.quantize_4bit(A, 64, "nf4", double_quant=False)
    err = (A - qkernels.dequantize_4bit(p, s)).abs()
    assert abs(err.mean().item() - 0.0728) < 1e-3
    assert abs((err / (A.abs() + 1e-8)).mean().item() - 0.203) < 5e-3
    # double quantization adds almost nothing (the 8-bit scales are nearly exact)
    p2, s2 = qkernels.quantize_4bit(A, 64, "nf4", double_quant=True)
    err2 = (A - qkernels.dequantize_4bit(p2, s2)).abs()
    assert err2.mean().item() - err.mean().item() < 2e-4


def test_storage_bits_per_parameter():
    A = torch.randn(4096, 4096, dtype=torch.bfloat16)
    p, s = qkernels.quantize_4bit(A, 64, double_quant=True)
    # 4 (codes) + 8/64 (uint8 absmax) + 32/(64*256) (float32 nested absmax) + the 4-byte offset
    assert math.isclose(qkernels.bits_per_parameter(p, s), 4 + 8 / 64 + 32 / (64 * 256) + 32 / A.numel(), rel_tol=1e-12)
    assert abs(qkernels.bits_per_parameter(p, s) - 4.127) < 1e-3
    p, s = qkernels.quantize_4bit(A, 64, double_quant=False)
    assert qkernels.bits_per_parameter(p, s) == 4.5


@pytest.mark.parametrize("shape", [(80, 96), (7, 32), (5, 160)], ids=_ids)
def test_bitsandbytes_cpu_dequantizer_exception_rows_not_whole_blocks(shape):
    """Documented exception in the oracle: bitsandbytes 0.50.2's CPU C++ dequantizer (taken when the last dim is
    even) decodes some shapes whose rows are not a whole number of blocks with the wrong block scales. Its
    PyTorch path and its CUDA kernel follow the flat-block format (block b = elements [b*bs, (b+1)*bs) of the
    flattened tensor), and so does qkernels: we match them bit for bit."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    A = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    p, s = qkernels.quantize_4bit(A, 64, "nf4", double_quant=False)
    ours = qkernels.dequantize_4bit(p, s)
    flat_rule = _dequantize_4bit_compute(p.reshape(-1), s.absmax, qkernels.nf4_codebook(), 64, shape, torch.float32)
    assert same_bits(ours, flat_rule)
    assert not same_bits(ours, F.dequantize_4bit(p, s)), "bitsandbytes fixed its CPU path: drop this exception"
    # the quantized data itself is the same in both libraries
    pb, sb = F.quantize_4bit(A, blocksize=64, quant_type="nf4")
    assert torch.equal(p, pb) and torch.equal(s.absmax, sb.absmax)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_every_available_backend_decodes_the_same_bits(dtype, double_quant):
    """The default dispatch (the native CPU kernel when _C is built) and the reference backend agree bit for bit."""
    from qkernels import _backend

    A = _data((1023, 17), dtype, seed=2)
    p, s = qkernels.quantize_4bit(A, 64, "nf4", double_quant)
    ref = qkernels.dequantize_4bit(p, s, backend="reference")
    backends = ["cpu"] if "dequantize_4bit" in _backend.native_ops(torch.device("cpu")) else []
    for b in backends + [None]:
        assert same_bits(qkernels.dequantize_4bit(p, s, backend=b), ref), b


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_on_cuda_tensors_matches_cpu_and_bitsandbytes_cuda(dtype, quant_type):
    """The reference path runs on any device: on CUDA tensors it writes the same bytes as on the CPU. Against
    bitsandbytes' CUDA kernels (no all-zero blocks here, docs/format.md §7.5): NF4 packed bytes and the nested
    codes (its CUDA path uses the exact rule) are identical; both libraries decode either state identically."""
    A = torch.randn(1023, 17, generator=torch.Generator().manual_seed(4)).to(dtype)
    p_cpu, s_cpu = qkernels.quantize_4bit(A, 64, quant_type, True)
    p, s = qkernels.quantize_4bit(A.cuda(), 64, quant_type, True, backend="reference")
    assert torch.equal(p.cpu(), p_cpu) and torch.equal(s.absmax.cpu(), s_cpu.absmax)
    assert same_bits(qkernels.dequantize_4bit(p, s).cpu(), qkernels.dequantize_4bit(p_cpu, s_cpu))
    pb, sb = F.quantize_4bit(A.cuda(), blocksize=64, compress_statistics=True, quant_type=quant_type)
    if quant_type == "nf4":
        assert torch.equal(pb.cpu(), p_cpu)
        assert torch.equal(sb.absmax.cpu(), s_cpu.absmax)
    assert same_bits(F.dequantize_4bit(p, s).cpu(), qkernels.dequantize_4bit(p_cpu, s_cpu))
    assert same_bits(F.dequantize_4bit(pb, sb).cpu(), qkernels.dequantize_4bit(pb, sb).cpu())


@pytest.mark.parametrize("backend", [None, "reference"], ids=["default", "reference"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_dequantize_into_out(backend, double_quant):
    """``out=`` writes the same bits into a caller's buffer (a reused weight buffer: no allocation)."""
    A = _data((300, 301), torch.bfloat16, seed=9)
    p, s = qkernels.quantize_4bit(A, 64, "nf4", double_quant)
    for dtype in DTYPES:
        out = torch.full(A.shape, float("nan"), dtype=dtype)
        res = qkernels.dequantize_4bit(p, s, out=out, backend=backend)
        assert res is out
        assert same_bits(out, qkernels.dequantize_4bit(p, s, dtype=dtype, backend="reference"))
    with pytest.raises(ValueError, match="out must be a contiguous tensor of shape"):
        qkernels.dequantize_4bit(p, s, out=torch.empty(301, 300))
    with pytest.raises(TypeError, match="does not match out.dtype"):
        qkernels.dequantize_4bit(p, s, dtype=torch.float16, out=torch.empty(300, 301))
