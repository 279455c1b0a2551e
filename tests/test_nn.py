"""QLoRALinear: forward/backward against the reference, dtype/device moves, bitsandbytes state-dict interop,
adapters, LoftQ, and clear errors.

Tolerances (STYLE 12): the layer's float32 output may differ from a float64 evaluation of the same formula by at
most twice what plain PyTorch float32 (``reference.matmul_4bit_lora`` on float32 tensors) differs by, plus a few
ulps of the output's magnitude for the case where plain PyTorch happens to be exact.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import qkernels
from qkernels import QLoRALinear, QuantState, _linear, reference
from qkernels.loftq import loftq_init

from ._oracle import bnb

EPS32 = torch.finfo(torch.float32).eps


def _randomize_lora(layer: QLoRALinear, seed: int = 1) -> None:
    """B is zero after the default init, which would hide the LoRA path: give both factors random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in layer.lora_A:
            layer.lora_A[name].weight.copy_(torch.randn(layer.lora_A[name].weight.shape, generator=g) * 0.1)
            layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=g) * 0.1)


def _oracle(layer: QLoRALinear, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """``reference.matmul_4bit_lora`` of the layer's tensors in ``dtype`` (no dropout)."""
    name = layer.active_adapter
    A = layer.lora_A[name].weight.detach().to(dtype)
    B = layer.lora_B[name].weight.detach().to(dtype)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    return reference.matmul_4bit_lora(x.detach().to(dtype), layer.weight.data, layer.weight.quant_state, A, B,
                                      layer.scaling[name], bias, training=False)


def _check_close_to_oracle(y: torch.Tensor, layer: QLoRALinear, x: torch.Tensor) -> None:
    y64 = _oracle(layer, x, torch.float64)
    plain = (_oracle(layer, x, torch.float32).double() - y64).abs().max().item()
    ours = (y.double() - y64).abs().max().item()
    assert ours <= 2 * plain + 4 * EPS32 * y64.abs().max().item(), (ours, plain)


# ---------------------------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    "quant_type, double_quant, blocksize, shape",
    [("nf4", True, 64, (113, 37)), ("fp4", False, 128, (96, 80)), ("nf4", False, 32, (33, 1)),
     ("nf4", True, 256, (1023, 5))],
    ids=["nf4-dq-113x37", "fp4-96x80", "nf4-33x1", "nf4-dq-1023x5"],
)
def test_forward_matches_float64_reference(quant_type, double_quant, blocksize, shape, bias):
    torch.manual_seed(0)
    in_f, out_f = shape
    layer = QLoRALinear(in_f, out_f, bias=bias, r=3, lora_alpha=5, quant_type=quant_type,
                        double_quant=double_quant, blocksize=blocksize)
    _randomize_lora(layer)
    for lead in [(1,), (3, 7)]:
        x = torch.randn(*lead, in_f)
        y = layer(x)
        assert y.shape == (*lead, out_f) and y.dtype == torch.float32
        _check_close_to_oracle(y, layer, x)


def test_rslora_scaling_and_extra_repr():
    layer = QLoRALinear(64, 32, r=16, lora_alpha=8, use_rslora=True)
    assert layer.scaling["default"] == 8 / math.sqrt(16)
    assert QLoRALinear(64, 32, r=16, lora_alpha=8).scaling["default"] == 8 / 16
    rep = repr(layer)
    assert "in_features=64" in rep and "out_features=32" in rep and "nf4" in rep and "r=16" in rep


def test_gradients_flow_to_lora_and_bias_only_and_match_reference():
    torch.manual_seed(0)
    layer = QLoRALinear(96, 40, r=4, lora_alpha=8)
    _randomize_lora(layer)
    packed_before = layer.weight.data.clone()
    x = torch.randn(5, 96, dtype=torch.float64)
    x32 = x.float().requires_grad_(True)
    g = torch.randn(5, 40)
    layer(x32).backward(g)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert torch.equal(layer.weight.data, packed_before)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dx, dA, dB, dbias = reference.matmul_4bit_lora_backward(
        g.double(), x, layer.weight.data, layer.weight.quant_state, A.detach().double(), B.detach().double(),
        layer.scaling["default"])
    dx32, dA32, dB32, _ = reference.matmul_4bit_lora_backward(
        g, x.float(), layer.weight.data, layer.weight.quant_state, A.detach(), B.detach(), layer.scaling["default"])
    for got, want, plain in [(x32.grad, dx, dx32), (A.grad, dA, dA32), (B.grad, dB, dB32)]:
        err = (got.double() - want).abs().max().item()
        assert err <= 2 * (plain.double() - want).abs().max().item() + 4 * EPS32 * want.abs().max().item()
    assert torch.allclose(layer.bias.grad.double(), dbias, rtol=0, atol=8 * EPS32 * dbias.abs().max().item())


def test_dropout_applies_to_the_lora_branch_only():
    torch.manual_seed(0)
    layer = QLoRALinear(64, 48, r=4, lora_dropout=0.5)
    x = torch.randn(16, 64)
    layer.train()
    with torch.no_grad():  # B == 0 after default init: the output is the base linear, whatever dropout draws
        assert torch.equal(layer(x), layer.eval()(x))
    _randomize_lora(layer)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2), "training with p=0.5 draws a fresh mask per call"
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    _check_close_to_oracle(layer(x), layer, x)


def test_compute_dtype_casts_the_input_and_returns_its_dtype():
    torch.manual_seed(0)
    layer = QLoRALinear(128, 64, r=4, compute_dtype=torch.bfloat16)
    _randomize_lora(layer)
    x = torch.randn(3, 128)
    y = layer(x)
    assert y.dtype == torch.float32
    # the formula (peft's bitsandbytes layer): the base product on x cast to bf16, cast back to x's dtype, plus the
    # LoRA term on x itself in the adapters' float32 (fused on the cast x, the LoRA gradients carried bf16 rounding);
    # the float32 bias added in float32 (bitsandbytes rounds it to bf16: test below)
    base = qkernels.matmul_4bit_lora(x.bfloat16(), layer.weight.data, layer.weight.quant_state, None, None, 0.0,
                                     None, training=False)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * layer.scaling["default"]
    assert torch.equal(y, base.float() + layer.bias + lora)
    xb = x.bfloat16()  # an input in the compute dtype: one fused matmul, as before
    fused = qkernels.matmul_4bit_lora(xb, layer.weight.data, layer.weight.quant_state, A, B, layer.scaling["default"],
                                      layer.bias, training=False)
    assert torch.equal(layer(xb), fused)


@pytest.mark.parametrize("cdt", [torch.bfloat16, torch.float16])
def test_a_wider_bias_is_added_in_the_input_dtype_not_rounded_to_the_compute_dtype(cdt):
    """A float32 layer with a bf16 / fp16 compute dtype: its float32 bias is added after the product is cast back, so a
    bias value the compute dtype cannot hold comes out exact (a zero weight: the output is the bias), with an adapter,
    without one, in training; bitsandbytes rounds it (its Linear4bit casts the bias to the compute dtype), a per-column
    error shared by every row that a sum over rows accumulates (fuzz_vs_peft seed 52 case 67: a LayerNorm bias's
    gradient 5x peft's error)."""
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.linspace(0.1, 3.0, 32) + 3e-5)
    assert not torch.equal(lin.bias.to(cdt).float(), lin.bias)
    layer = QLoRALinear.from_linear(lin, r=2, compute_dtype=cdt)  # B = 0: the LoRA term is zero
    x = torch.randn(5, 64)
    for train in (False, True):
        layer.train(train)
        assert torch.equal(layer(x), lin.bias.expand(5, 32))
        with qkernels.disable_adapters(layer):
            assert torch.equal(layer(x), lin.bias.expand(5, 32))
    layer.bias.requires_grad_(True)  # (peft's bias="all"): its gradient is the float32 column sum
    layer(x).sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((32,), 5.0))


# ---------------------------------------------------------------------------------------------- adapters
def test_adapters_add_switch_disable_delete():
    torch.manual_seed(0)
    layer = QLoRALinear(64, 32, r=4)
    _randomize_lora(layer, 1)
    layer.update_layer("other", 2, 4, 0.0, "gaussian", False)
    assert layer.active_adapter == "default" and layer.r == {"default": 4, "other": 2}
    assert not layer.lora_A["other"].weight.requires_grad, "a newly added adapter is inactive and frozen (peft)"
    with torch.no_grad():
        layer.lora_B["other"].weight.normal_()
    x = torch.randn(4, 64)
    y_default = layer(x)
    layer.set_adapter("other")
    assert layer.lora_A["other"].weight.requires_grad and not layer.lora_A["default"].weight.requires_grad
    y_other = layer(x)
    assert not torch.equal(y_default, y_other)
    _check_close_to_oracle(y_other, layer, x)
    layer.disable_adapters = True
    base = qkernels.matmul_4bit_lora(x, layer.weight.data, layer.weight.quant_state, None, None, 0.0, layer.bias)
    assert torch.equal(layer(x), base)
    layer.disable_adapters = False
    layer.delete_adapter("other")
    assert layer.active_adapter == "default" and list(layer.lora_A) == ["default"]
    assert torch.equal(layer(x), y_default)
    layer.delete_adapter("default")
    assert layer.active_adapter is None and torch.equal(layer(x), base)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        layer.set_adapter("nope")


def test_init_modes_follow_peft():
    torch.manual_seed(0)
    default = QLoRALinear(256, 64, r=8)
    assert torch.count_nonzero(default.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform_(a=sqrt(5)) on fan_in 256
    a = default.lora_A["default"].weight
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    gauss = QLoRALinear(256, 64, r=8, init_lora_weights="gaussian")
    std = gauss.lora_A["default"].weight.std().item()
    assert abs(std - 1 / 8) < 4 * (1 / 8) / math.sqrt(2 * 8 * 256)  # 4 sigma of a sample std over 2048 draws
    assert torch.count_nonzero(gauss.lora_B["default"].weight) == 0
    off = QLoRALinear(256, 64, r=8, init_lora_weights=False)
    assert torch.count_nonzero(off.lora_B["default"].weight) > 0
    assert default.lora_A["default"].weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- dtype / device moves
def _snapshot(layer: QLoRALinear):
    return layer.weight.data.reshape(-1).view(torch.uint8).clone(), copy.deepcopy(layer.weight.quant_state)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32],
                         ids=["uint8", "bf16", "fp16", "fp32"])
def test_dtype_moves_never_touch_the_packed_bytes(storage):
    torch.manual_seed(0)
    layer = QLoRALinear(130, 70, r=4, quant_storage=storage)
    _randomize_lora(layer)
    x = torch.randn(2, 130)
    y = layer(x)
    raw, state = _snapshot(layer)
    float_params = {k: v.detach().clone() for k, v in layer.named_parameters() if k != "weight"}
    model = torch.nn.Sequential(layer)
    for move in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.to(torch.float64),
                 lambda m: m.to("cpu", torch.float16), lambda m: m.float(), lambda m: m.cpu(), lambda m: m.double()):
        move(model)
        assert layer.weight.dtype == storage and isinstance(layer.weight, qkernels.Params4bit)
        assert torch.equal(layer.weight.data.reshape(-1).view(torch.uint8), raw)
        assert layer.weight.quant_state == state, "absmax / nested absmax / offset keep their dtypes and bits"
    model.float()
    assert layer.bias.dtype == torch.float32 and layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():  # bias and LoRA went through fp16/bf16 (lossy, as for nn.Linear): restore them
        for k, v in layer.named_parameters():
            if k != "weight":
                v.copy_(float_params[k])
    assert torch.equal(layer(x), y), "the 4-bit weight decodes to the same values after all the moves"


@pytest.mark.cuda
def test_cuda_move_takes_weight_and_quant_state_along():
    torch.manual_seed(0)
    layer = QLoRALinear(128, 64, r=4)
    _randomize_lora(layer)
    x = torch.randn(3, 128)
    raw, state = _snapshot(layer)
    layer.cuda()
    assert layer.weight.device.type == "cuda" and layer.weight.quant_state.absmax.device.type == "cuda"
    assert layer.weight.quant_state.state2.absmax.device.type == "cuda" and layer.weight.quant_state.offset.is_cuda
    y = layer(x.cuda())
    _check_close_to_oracle(y.cpu(), layer.cpu(), x)
    assert torch.equal(layer.weight.data.view(torch.uint8).reshape(-1), raw) and layer.weight.quant_state == state


def test_deepcopy_and_pickle_keep_the_format():
    torch.manual_seed(0)
    layer = QLoRALinear(64, 32, r=2, quant_storage=torch.bfloat16)
    x = torch.randn(2, 64)
    twin = copy.deepcopy(layer)
    assert twin.weight.quant_state is not layer.weight.quant_state
    assert twin.weight.quant_state == layer.weight.quant_state
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert isinstance(other.weight, qkernels.Params4bit) and torch.equal(other(x), layer(x))


# ---------------------------------------------------------------------------------------------- state dict
def _bnb_layer(lin: torch.nn.Linear, quant_type: str, double_quant: bool, blocksize: int = 64):
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32,
                          quant_type=quant_type, compress_statistics=double_quant)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=double_quant, blocksize=blocksize)
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.data.clone())
    return q.to("cpu")  # bitsandbytes quantizes on the first device move (DESIGN §5)


# in_features a multiple of the blocksize: bitsandbytes' CPU C++ dequantizer mis-indexes blocks of rows that are not
# whole blocks (docs/format.md, exceptions 4), and these tests compare its forward with ours.
CONFIGS = [("nf4", True, True), ("nf4", False, False), ("fp4", True, False)]
CONFIG_IDS = ["nf4-dq-bias", "nf4-nobias", "fp4-dq"]


def _assert_matches_bitsandbytes(ours, theirs, in_features):
    """Outputs of a QLoRALinear and a bitsandbytes Linear4bit holding the same 4-bit weight (LoRA B == 0 or off).

    More rows than the CPU GEMV takes (16 to 2048 by CPU and dtype: qkernels._linear.gemv_max_m) take qkernels'
    dequantize + BLAS path: the same dequantized bits and the same torch matmul as bitsandbytes' exact path, so bit
    for bit. Fewer rows take the fused GEMV: the same products summed in another order, so equal within the float32
    rounding of a K-term sum (K * eps * sum_k |x_k w_k|, per output).
    """
    rows = _linear.gemv_max_m(torch.empty(1, in_features)) + 1
    x = torch.randn(rows, in_features, requires_grad=True)  # grad on: bitsandbytes' exact dequantize path (DESIGN §5)
    assert torch.equal(ours(x), theirs(x)), "dequantize + BLAS path: bit for bit"
    x = torch.randn(3, in_features, requires_grad=True)
    W = ours.dequantized_weight(torch.float32)
    bound = in_features * torch.finfo(torch.float32).eps * (x.detach().abs() @ W.abs().t())
    assert ((ours(x) - theirs(x)).abs() <= bound).all(), "fused GEMV path: within a K-term sum's rounding"


@pytest.mark.parametrize("quant_type, double_quant, bias", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_keys_and_tensors_equal_bitsandbytes(quant_type, double_quant, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 80, bias=bias)
    ours = QLoRALinear.from_linear(lin, r=4, quant_type=quant_type, double_quant=double_quant)
    theirs = _bnb_layer(lin, quant_type, double_quant).state_dict()
    sd = ours.state_dict()
    lora_keys = ["lora_A.default.weight", "lora_B.default.weight"]
    assert list(sd) == list(theirs) + lora_keys, "bitsandbytes' keys, in its order, then peft's LoRA keys"
    for k, v in theirs.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
    assert torch.equal(sd["weight"], theirs["weight"])
    assert torch.equal(sd["weight.quant_map"], theirs["weight.quant_map"])
    if not double_quant:  # nested codes: bitsandbytes' CPU path is approximate (DESIGN §5), so only without nesting
        assert torch.equal(sd["weight.absmax"], theirs["weight.absmax"])


@pytest.mark.parametrize("quant_type, double_quant, bias", CONFIGS, ids=CONFIG_IDS)
def test_bitsandbytes_state_dict_loads_with_identical_outputs(quant_type, double_quant, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 80, bias=bias)
    q = _bnb_layer(lin, quant_type, double_quant)
    layer = QLoRALinear(128, 80, bias=bias, r=4, quant_type="fp4" if quant_type == "nf4" else "nf4")
    lora = {k: v.clone() for k, v in layer.state_dict().items() if k.startswith("lora_")}
    result = layer.load_state_dict(q.state_dict())  # strict: a base-only checkpoint has none of the LoRA keys
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in lora.items()), "LoRA weights keep their values"
    assert layer.weight.quant_state.quant_type == quant_type, "the checkpoint's format wins over the constructor's"
    _assert_matches_bitsandbytes(layer, q, 128)  # B == 0: the adapter adds exactly 0
    layer.disable_adapters = True
    _assert_matches_bitsandbytes(layer, q, 128)


@pytest.mark.parametrize("quant_type, double_quant, bias", CONFIGS, ids=CONFIG_IDS)
def test_our_state_dict_loads_into_bitsandbytes(quant_type, double_quant, bias):
    torch.manual_seed(0)
    layer = QLoRALinear(128, 80, bias=bias, r=4, quant_type=quant_type, double_quant=double_quant)
    sd = layer.state_dict()
    q = bnb.nn.Linear4bit(128, 80, bias=bias, compute_dtype=torch.float32, quant_type=quant_type,
                          compress_statistics=double_quant)
    quant = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    q.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], quant, device="cpu", module=q)
    if bias:
        q.bias = torch.nn.Parameter(sd["bias"].clone())
    _assert_matches_bitsandbytes(layer, q, 128)
    for k, v in q.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_from_bnb_wraps_without_requantizing():
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 64)
    q = _bnb_layer(lin, "nf4", True)
    layer = QLoRALinear.from_bnb(q, r=4, lora_alpha=8)
    assert torch.equal(layer.weight.data, q.weight.data) and layer.weight.data.data_ptr() != q.weight.data.data_ptr()
    assert layer.weight.quant_state == QuantState.from_dict(q.weight.quant_state.as_dict(packed=True))
    assert layer.weight.quant_state.absmax.data_ptr() != q.weight.quant_state.absmax.data_ptr(), "no aliasing"
    _assert_matches_bitsandbytes(layer, q, 192)
    assert layer.compute_dtype == torch.float32 and layer.scaling["default"] == 2.0
    with pytest.raises(ValueError, match="Linear4bit"):
        QLoRALinear.from_bnb(lin)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_from_bnb_of_a_layer_in_cpu_inference_layout_leaves_it_intact(double_quant):
    """bitsandbytes repacks a Linear4bit for CPU inference at its first eval forward (on AVX512-BF16 CPUs; done here
    with its own conversion function, so on any CPU): scales become bf16. from_bnb undoes that on a copy; the bnb
    layer keeps its repacked bytes and state, and our weight decodes with the scales it ran with."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    q = _bnb_layer(torch.nn.Linear(256, 64), "nf4", double_quant)
    plain = QLoRALinear.from_bnb(q, r=4)
    q.weight.data, q.weight.quant_state = _convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    data, absmax = q.weight.data.clone(), q.weight.quant_state.absmax.clone()
    layer = QLoRALinear.from_bnb(q, r=4)
    qs = q.weight.quant_state
    assert torch.equal(q.weight.data, data) and torch.equal(qs.absmax, absmax) and qs.packing_format_for_cpu
    assert qs.absmax.dtype == torch.bfloat16 and not qs.nested, "the bnb layer's inference state is untouched"
    assert torch.equal(layer.weight.data, plain.weight.data), "the format's packed bytes"
    if not double_quant:  # the bf16 scales exactly (with nesting bitsandbytes re-quantizes them on the way back)
        want = plain.weight.quant_state.absmax.to(torch.bfloat16).float()
        assert torch.equal(layer.weight.quant_state.absmax, want)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16"])
def test_state_dict_round_trip_is_bit_exact(storage):
    torch.manual_seed(0)
    src = QLoRALinear(100, 30, r=3, quant_storage=storage, quant_type="fp4", blocksize=32)
    _randomize_lora(src)
    dst = QLoRALinear(100, 30, r=3)
    assert not dst.load_state_dict(src.state_dict()).missing_keys
    for (k, a), (k2, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        # bytes, not values: a bf16 view of packed codes can hold NaN patterns (NaN != NaN)
        assert k == k2 and a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), k
    x = torch.randn(4, 100)
    assert torch.equal(src(x), dst(x))


def _corrupt_cases():
    def drop(key):
        return lambda sd: sd.pop(key)

    def put(key, fn):
        return lambda sd: sd.__setitem__(key, fn(sd[key]))

    return [
        (put("weight.quant_state.bitsandbytes__nf4", lambda v: v[:-3]), "corrupted"),
        (put("weight", lambda v: v[:-1]), "size mismatch for 'weight'"),
        (put("weight.absmax", lambda v: v[:-1]), "one entry per block"),
        (put("bias", lambda v: v[:-1]), "size mismatch for 'bias'"),
        (put("lora_A.default.weight", lambda v: v[:2]), r"size mismatch for 'lora_A.default.weight'.*rank"),
        (put("weight", lambda v: v.float()), "size mismatch for 'weight'"),
        (put("weight", lambda v: v.to(torch.int32)), "must be uint8"),
        (put("weight.quant_map", lambda v: v.flip(0)), "'quant_map' is not the standard nf4 codebook"),
        (put("weight.nested_absmax", lambda v: v * float("nan")), "'nested_absmax' holds NaN"),
    ]


@pytest.mark.parametrize("corrupt, match", _corrupt_cases(),
                         ids=["bad-json", "short-weight", "short-absmax",
                              "short-bias", "wrong-rank", "float-weight", "int-weight", "tampered-quant-map",
                              "nan-nested-absmax"])
def test_corrupted_state_dict_raises_and_loads_nothing(corrupt, match):
    torch.manual_seed(0)
    src = QLoRALinear(96, 40, r=4)
    dst = QLoRALinear(96, 40, r=4)
    _randomize_lora(dst, 7)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = src.state_dict()
    corrupt(sd)
    with pytest.raises(ValueError, match=match):
        dst.load_state_dict(sd, strict=False)
    after = dst.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("key", ["weight", "weight.absmax", "weight.quant_state.bitsandbytes__nf4",
                                 "weight.nested_quant_map"], ids=["weight", "absmax", "blob", "nested-map"])
def test_a_weight_key_missing_is_reported_and_the_rest_completes_the_weight_later(key):
    """A packed weight without all of its quant-state keys (or the keys without the weight) is part of a weight: a
    sharded 4-bit checkpoint splits them across shards. strict=True names the missing key; the weight and its quant
    state do not change (the bias and LoRA weights load, as torch loads what is there) and the layer refuses to run
    until the rest arrives; loading the missing key then completes the weight."""
    torch.manual_seed(0)
    src, dst = QLoRALinear(96, 40, r=4), QLoRALinear(96, 40, r=4)
    before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("weight")}
    sd = src.state_dict()
    rest = {key: sd.pop(key)}
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\) in state_dict: \"{key}\""):
        dst.load_state_dict(sd)
    after = dst.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(RuntimeError, match=rf"partly loaded.*but not \['{key}'\]"):
        dst(torch.randn(2, 96))
    assert dst.load_state_dict(rest, strict=False).missing_keys == ["bias"]  # only the bias is not in `rest`
    x = torch.randn(3, 96)
    assert torch.equal(dst(x), src(x))


def test_shape_mismatch_names_the_key_and_the_fix():
    sd = QLoRALinear(96, 40, r=4).state_dict()
    layer = QLoRALinear(96, 48, r=4)
    with pytest.raises(ValueError, match=r"size mismatch for 'weight'.*\(40, 96\).*\(48, 96\)"):
        layer.load_state_dict(sd)
    nested = torch.nn.Sequential(torch.nn.Linear(2, 2), QLoRALinear(96, 48, r=4))
    with pytest.raises(ValueError, match=r"'1\.weight'"):
        nested.load_state_dict({"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2),
                                **{"1." + k: v for k, v in sd.items()}})


def test_float_checkpoint_is_refused_with_the_fix():
    layer = QLoRALinear(96, 40, r=4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"'weight' is a float weight \(40, 96\) \(an unquantized checkpoint, or one "
                                         r"that keeps this layer float\).*before apply_qlora.*quantize=False"):
        layer.load_state_dict(torch.nn.Linear(96, 40).state_dict(), strict=False)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())


def test_base_only_checkpoint_loads_strict_and_missing_base_keys_are_still_reported():
    torch.manual_seed(0)
    src, dst = QLoRALinear(96, 40, r=4), QLoRALinear(96, 40, r=4)
    dst.update_layer("other", 2, 4)
    _randomize_lora(dst, 7)
    dst.lora_A["other"].weight.data.normal_()
    lora = {k: v for k, v in dst.named_parameters() if k.startswith("lora_")}
    want = {k: v.detach().clone() for k, v in lora.items()}
    base = {k: v for k, v in src.state_dict().items() if not k.startswith("lora_")}
    result = dst.load_state_dict(base, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(dst.weight.data, src.weight.data) and torch.equal(dst.bias, src.bias)
    dst.load_state_dict(base, assign=True)
    for k, p in dst.named_parameters():  # the same Parameter objects (an optimizer keeps them), same values
        if k.startswith("lora_"):
            assert p is lora[k] and torch.equal(p, want[k]), k
    nested = torch.nn.Sequential(QLoRALinear(96, 40, r=4), QLoRALinear(96, 40, r=4))
    nested.load_state_dict({f"{i}.{k}": v for i in range(2) for k, v in base.items()})  # strict, in a model too
    no_bias = {k: v for k, v in base.items() if k != "bias"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"bias\""):
        dst.load_state_dict(no_bias)
    assert dst.load_state_dict(no_bias, strict=False).missing_keys == ["bias"]
    no_weight = {k: v for k, v in base.items() if not k.startswith("weight")}
    assert dst.load_state_dict(no_weight, strict=False).missing_keys == ["weight"]


@pytest.mark.parametrize("strict", [True, False])
def test_some_lora_keys_missing_is_reported_and_loads_nothing(strict):
    torch.manual_seed(0)
    src, dst = QLoRALinear(96, 40, r=4), QLoRALinear(96, 40, r=4)
    src.update_layer("other", 2, 4)
    dst.update_layer("other", 2, 4)
    _randomize_lora(src, 3)
    _randomize_lora(dst, 7)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = src.state_dict()
    del sd["lora_B.other.weight"]  # "default" complete, "other" half there
    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\) in state_dict: \"lora_B\.other\.weight\".*"
                                           r"has LoRA key\(s\) \[.*'lora_A\.other\.weight'\] but not "
                                           r"\['lora_B\.other\.weight'\].*Nothing of this layer was loaded"
                                           if strict else r"but not \['lora_B\.other\.weight'\]"):
        dst.load_state_dict(sd, strict=strict)
    after = dst.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_strict_load_reports_unexpected_keys():
    sd = QLoRALinear(64, 32, r=4).state_dict()
    sd["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        QLoRALinear(64, 32, r=4).load_state_dict(sd)


# ---------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive int"),
        (dict(r=-2), "r must be a positive int"),
        (dict(r=2.5), "r must be a positive int"),
        (dict(lora_dropout=1.0), r"lora_dropout must be a probability in \[0, 1\)"),
        (dict(lora_dropout=-0.1), r"lora_dropout must be a probability in \[0, 1\)"),
        (dict(blocksize=48), "blocksize must be one of"),
        (dict(quant_type="int4"), "quant_type must be 'nf4' or 'fp4'"),
        (dict(quant_storage=torch.int8), "quant_storage must be one of"),
        (dict(compute_dtype=torch.float64), "compute_dtype must be None"),
        (dict(init_lora_weights="pissa"), "init_lora_weights must be one of"),
        (dict(adapter_name="a.b"), "adapter_name must be a non-empty str without '.'"),
        (dict(lora_alpha=float("nan")), "lora_alpha must be a finite number"),
    ],
    ids=["r0", "r-neg", "r-float", "dropout-1", "dropout-neg", "blocksize", "quant_type", "storage",
         "compute_dtype", "init", "adapter-name", "alpha-nan"],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QLoRALinear(64, 32, **kwargs)


def test_from_linear_dtype_is_the_quantized_and_bias_dtype():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    layer = QLoRALinear.from_linear(lin, dtype=torch.bfloat16)
    assert layer.weight.quant_state.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.weight.data, qkernels.quantize_4bit(lin.weight.detach().bfloat16())[0])
    same = QLoRALinear.from_linear(lin)
    assert same.weight.quant_state.dtype == torch.float32 and torch.equal(same.bias, lin.bias)
    assert same.bias.data_ptr() != lin.bias.data_ptr()


def test_bad_adapter_and_loftq_use_raise():
    layer = QLoRALinear(64, 32)
    with pytest.raises(ValueError, match="r must be a positive int"):
        layer.update_layer("x", 0, 16, 0.0, True, False)
    with pytest.raises(ValueError, match="loftq.*needs the original float weight"):
        layer.update_layer("x", 4, 16, 0.0, "loftq", False)
    loft = QLoRALinear(64, 32, init_lora_weights="loftq", loftq_iter=3)
    assert loft.r == {"default": 8}
    with pytest.raises(ValueError, match="replaces the 4-bit weight"):
        loft.update_layer("x", 4, 16, 0.0, "loftq", False, original_weight=torch.randn(32, 64), loftq_iter=2)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        QLoRALinear(0, 32)
    with pytest.raises(TypeError, match="nn.Linear"):
        QLoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))


# ---------------------------------------------------------------------------------------------- LoftQ
def test_loftq_gain_matches_the_residual_spectrum():
    """Q fixed (num_iter=1): the best rank-r correction leaves exactly the tail of the residual's spectrum
    (Eckart-Young), so ||W - dequant - sBA|| / ||W - dequant|| = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)."""
    torch.manual_seed(0)
    r = 8
    lin = torch.nn.Linear(256, 192)
    with torch.no_grad():  # a weight with a few strong directions, like trained LLM weights, so LoRA has work
        lin.weight += 0.05 * torch.randn(192, 4) @ torch.randn(4, 256) / 4
    W = lin.weight.detach().double()
    plain = QLoRALinear.from_linear(lin, r=r)
    loft = QLoRALinear.from_linear(lin, r=r, init_lora_weights="loftq")
    assert torch.equal(loft.weight.data, plain.weight.data), "num_iter=1 keeps W quantized as quantize_4bit(W)"
    deq = loft.dequantized_weight().double()
    R = W - deq
    S = torch.linalg.svdvals(R)
    bound = math.sqrt(float((S[r:] ** 2).sum() / (S**2).sum()))
    measured = float(torch.linalg.norm(W - deq - loft.lora_delta().double()) / torch.linalg.norm(R))
    assert measured < 1.0
    # optimal up to float32 rounding of A, B (relative 1e-6 of ||R||, far below the gain)
    assert bound - 1e-5 <= measured <= bound + 1e-5, (measured, bound)
    x = torch.randn(32, 256)
    err_plain = (plain(x) - lin(x)).norm()
    err_loft = (loft(x) - lin(x)).norm()
    assert err_loft < err_plain


def test_loftq_alternating_variant_changes_q_and_is_never_worse():
    torch.manual_seed(0)
    W = torch.randn(128, 256) * 0.02
    one = loftq_init(W, 8, 2.0, num_iter=1)
    alt = loftq_init(W, 8, 2.0, num_iter=4)
    assert alt.errors[0] == pytest.approx(one.errors[0], rel=1e-6)
    assert min(alt.errors) <= one.errors[0] < one.quant_error
    p0, _ = qkernels.quantize_4bit(W)
    assert torch.equal(one.packed, p0)
    if min(alt.errors[1:]) < alt.errors[0]:
        assert not torch.equal(alt.packed, p0), "the alternating variant stores a different 4-bit weight"
    with pytest.raises(ValueError, match="num_iter"):
        loftq_init(W, 8, 2.0, num_iter=0)


def test_loftq_randomized_svd_for_large_layers_still_gains(monkeypatch):
    """Above EXACT_SVD_MAX_DIM a randomized SVD is used: never better than Eckart-Young's optimum, still a gain."""
    import qkernels.loftq as lq

    monkeypatch.setattr(lq, "EXACT_SVD_MAX_DIM", 64)
    torch.manual_seed(0)
    W = torch.randn(128, 256) * 0.02 + 0.01 * torch.randn(128, 4) @ torch.randn(4, 256)
    res = loftq_init(W, 8, 2.0)
    deq = qkernels.dequantize_4bit(res.packed, res.quant_state, torch.float32).double()
    R = W.double() - deq
    S = torch.linalg.svdvals(R)
    optimum = math.sqrt(float((S[8:] ** 2).sum() / (S**2).sum()))
    measured = float(torch.linalg.norm(R - 2.0 * res.lora_B.double() @ res.lora_A.double()) / torch.linalg.norm(R))
    assert optimum - 1e-5 <= measured < 1.0
