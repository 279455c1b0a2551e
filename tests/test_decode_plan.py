"""QLoRALinear's decode plan (``QLoRALinear._planned_forward``): in eval without grad on the CPU, a layer calls the
fused GEMV with arguments it validated once, keyed by everything they came from. Its output must be the full forward's,
bit for bit (the same kernel, the same arguments), and every change the full forward would see must reach it too:
adapters switched, disabled, added, deleted; weights, biases and scales replaced or changed in place; a state made
invalid (refused, as by the full forward); a forced backend; a dtype change. ``nn.DECODE_PLANS = False`` gives the
full forward to compare with.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import qkernels
from qkernels import _native
from qkernels import nn as qnn

pytestmark = pytest.mark.skipif(not _native.native_available(),
                                reason="this build has no native CPU kernels (see qkernels.native_info()): the layer "
                                       "has no GEMV to plan, and the full forward runs (covered by every other test)")


def _layer(K: int = 64, N: int = 48, *, r: int = 4, bias: bool = True, dtype=torch.bfloat16, seed: int = 0,
           **kw) -> qkernels.QLoRALinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias).to(dtype)
    layer = qkernels.QLoRALinear.from_linear(lin, r=r, lora_alpha=2 * r, **kw).eval()
    _randomize(layer)
    return layer


def _randomize(layer) -> None:
    """Nonzero LoRA weights (every adapter's: peft's init leaves B zero, which would hide a stale plan)."""
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)


def _full(layer, x, monkeypatch) -> torch.Tensor:
    """The full forward's output (no plan)."""
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(qnn, "DECODE_PLANS", False)
        return layer(x)


def _planned(layer, x) -> torch.Tensor:
    with torch.no_grad():
        return layer(x)


def _assert_same(layer, x, monkeypatch) -> torch.Tensor:
    y = _planned(layer, x)
    ref = _full(layer, x, monkeypatch)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert torch.equal(y, ref), f"plan differs from the full forward by {(y.float() - ref.float()).abs().max():.3g}"
    return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(64,), (1, 64), (3, 64), (2, 1, 64), (2, 3, 64)], ids=str)
@pytest.mark.parametrize("bias,r", [(True, 4), (False, 4), (True, 0)], ids=["bias", "nobias", "nolora"])
def test_plan_is_the_full_forward_bit_for_bit(monkeypatch, dtype, shape, bias, r):
    layer = _layer(bias=bias, dtype=dtype)
    layer.disable_adapters = not r
    x = torch.randn(shape, dtype=dtype)
    calls = []
    real = qnn.QLoRALinear._build_plan
    monkeypatch.setattr(qnn.QLoRALinear, "_build_plan", lambda self, x: calls.append(1) or real(self, x))
    _assert_same(layer, x, monkeypatch)
    _assert_same(layer, x, monkeypatch)
    assert len(calls) == 1, "the plan was not kept between calls"
    assert qnn._DECODE_PLANS[layer][1] is not None, "no plan was made for a plain layer"


def test_rows_past_the_gemv_limit_and_other_modes_take_the_full_forward(monkeypatch):
    layer = _layer()
    limit = qkernels._linear.gemv_max_m(torch.empty(1, 64, dtype=torch.bfloat16))
    _assert_same(layer, torch.randn(limit + 1, 64, dtype=torch.bfloat16), monkeypatch)  # dequantize + matmul
    _assert_same(layer, torch.randn(0, 64, dtype=torch.bfloat16), monkeypatch)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same(layer, x.float(), monkeypatch)
    layer.train()  # training mode (dropout): never planned
    qnn._DECODE_PLANS.pop(layer, None)
    _planned(layer, x)
    assert layer not in qnn._DECODE_PLANS
    layer.eval()
    with torch.enable_grad():  # grad mode: the autograd Function, never the plan
        y = layer(x)
    assert y.requires_grad and layer not in qnn._DECODE_PLANS


def test_every_change_reaches_the_plan(monkeypatch):
    layer = _layer()
    layer.update_layer("second", r=8, lora_alpha=4)
    _randomize(layer)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    outs = [_assert_same(layer, x, monkeypatch)]

    def step(change, changes_output: bool = True) -> None:
        change()
        y = _assert_same(layer, x, monkeypatch)
        if changes_output:
            assert not torch.equal(y, outs[-1]), "the change did not change the output (a stale plan would pass)"
        outs.append(y)

    step(lambda: layer.set_adapter("second"))  # another adapter, another rank
    step(lambda: setattr(layer, "disable_adapters", True))
    step(lambda: setattr(layer, "disable_adapters", False))
    step(lambda: layer.set_adapter("default"))
    with torch.no_grad():
        step(lambda: layer.lora_B["default"].weight.mul_(2.0))  # in place: same tensor, new values
        step(lambda: setattr(layer.lora_A["default"].weight, "data", torch.randn(4, 64) * 0.1))  # new storage
        step(lambda: setattr(layer.lora_A["default"].weight, "data", torch.randn(4, 64).bfloat16()))  # other dtype
        step(lambda: setattr(layer.lora_A["default"], "weight", torch.nn.Parameter(torch.randn(4, 64) * 0.1)))
        step(lambda: layer.scaling.__setitem__("default", 5.0))
        step(lambda: layer.bias.add_(1.0))
        step(lambda: setattr(layer, "bias", torch.nn.Parameter(torch.randn(48, dtype=torch.bfloat16))))
        step(lambda: setattr(layer, "bias", None))
        other = _layer(seed=3, bias=False)  # another packed weight and state, loaded in place
        step(lambda: layer.load_state_dict({k: v for k, v in other.state_dict().items() if k.startswith("weight")},
                                           strict=False))
        third = _layer(seed=4, bias=False)  # new bytes under the same Parameter (the same scales' shapes)
        step(lambda: setattr(layer.weight, "data", third.weight.data.clone()))
    step(lambda: layer.delete_adapter("default"))  # the active adapter deleted: the other one runs, as in peft
    assert layer.active_adapter == "second"
    # the full forward casts: no plan (the same bits where the bf16 GEMV sums in float32 anyway: AVX2, scalar)
    step(lambda: setattr(layer, "compute_dtype", torch.float32), changes_output=False)
    assert qnn._DECODE_PLANS[layer][1] is None
    layer.compute_dtype = None
    _assert_same(layer, x.float(), monkeypatch)  # another x dtype


def test_a_state_made_invalid_after_the_plan_is_refused(monkeypatch):
    layer = _layer()
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    _planned(layer, x)
    state = layer.weight.quant_state
    with pytest.raises(ValueError, match="absmax"):  # absmax cut short in place: the same object, a new shape
        state.absmax.data = state.absmax.data[:-1]
        _planned(layer, x)
    layer = _layer()
    _planned(layer, x)
    with pytest.raises(ValueError, match="lora_A"):  # a rank that no longer matches B: the full forward's error
        layer.lora_A["default"].weight.data = torch.randn(3, 64)
        _planned(layer, x)


def test_a_forced_backend_is_honoured(monkeypatch):
    layer = _layer()
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    y = _planned(layer, x)
    monkeypatch.setenv("QKERNELS_BACKEND", "reference")
    calls = []
    real = _native.gemv_4bit_lora_raw
    monkeypatch.setattr(_native, "gemv_4bit_lora_raw", lambda *a, **k: calls.append(1) or real(*a, **k))
    y_ref = _planned(layer, x)
    assert not calls, "the GEMV ran although QKERNELS_BACKEND=reference"
    # the reference path rounds the decoded weight to bf16 and sums in another order: the two outputs, each rounded
    # to bf16 (2^-8 relative), are held to two bf16 ulps of the largest output
    torch.testing.assert_close(y_ref.float(), y.float(), rtol=2**-7, atol=2**-7 * y.abs().max().item())


def test_copies_and_pickles_carry_no_plan(monkeypatch):
    layer = _layer()
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = _planned(layer, x)
    twin = copy.deepcopy(layer)
    assert torch.equal(_assert_same(twin, x, monkeypatch), y)
    with torch.no_grad():
        twin.lora_B["default"].weight.add_(1.0)  # the copy's own weights, not the original's
    assert not torch.equal(_planned(twin, x), y)
    assert torch.equal(_planned(layer, x), y)
    buf = io.BytesIO()
    torch.save(layer, buf)  # a plan holds a closure, which would not pickle
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(_assert_same(loaded, x, monkeypatch), y)


def test_a_foreign_quant_state_gets_the_full_forwards_error():
    """A quant_state that is not qkernels' (a bitsandbytes one assigned over it, anything else): no plan, the full
    forward's TypeError."""
    layer = _layer()
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    _planned(layer, x)
    layer.weight.quant_state = object()
    with pytest.raises(TypeError, match="quant_state"):
        _planned(layer, x)
