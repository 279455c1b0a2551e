"""peft's ``lora_bias=True`` (a trainable bias on ``lora_B``) on ``QLoRALinear``, against peft 0.21.2.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * s``: lora_B's bias is scaled with the LoRA term. A float base
runs that very sequence of float operations here, so it is compared bit for bit. A 4-bit layer hands the fused op one
effective bias ``bias + s * b_B`` (float32, differentiable): the sum is peft's up to the order of the float32 additions
(``(xW + s xA^TB^T) + (b + s b_B)`` against ``(xW + b) + s (xA^TB^T + b_B)``), so, as in tests/test_adapters.py,
each side must lie within float32 rounding of a float64 run of the same function and the two within twice the sum of
those errors (``assert_matches``). With a bfloat16 compute dtype peft rounds the base product and the LoRA term to
bfloat16 separately and adds them in bfloat16, qkernels rounds once: there ours must be no further from the float64
run than twice peft's own distance (STYLE 12) plus one bfloat16 ulp of the output's magnitude.

The toy (tests/test_adapters.py): ``q_proj``, ``v_proj``, ``up`` have a bias, ``down`` has none.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qkernels
from qkernels import QLoRALinear, adapters, apply_qlora, merge_and_unload

from .test_adapters import IN, assert_matches, bnb_base, dense_base, dense_toy, reference64, run

peft = pytest.importorskip("peft", reason="peft is the interop target of these tests")

BIASED = ["q_proj", "v_proj", "up"]  # the toy's Linear layers that have a bias


def randomize(model: nn.Module, adapter: str = "default", seed: int = 1) -> None:
    """Random A, B and b_B (fresh ones are B = 0, b_B = 0: they would hide a missing or unscaled bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in model.named_modules():
            if adapter in getattr(m, "lora_A", {}):
                for t in (m.lora_A[adapter].weight, m.lora_B[adapter].weight, m.lora_B[adapter].bias):
                    if t is not None:
                        t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def qk_toy(targets=BIASED, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the no-bias warning, tested on its own
        m = apply_qlora(dense_toy(), targets, r=4, lora_alpha=8, compute_dtype=torch.float32, lora_bias=True, **kw)
    randomize(m)
    return m


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(7))


def _bias_grads(model: nn.Module) -> list[torch.Tensor]:
    return [m.lora_B[a].bias.grad for _, m in model.named_modules() if isinstance(getattr(m, "lora_B", None),
            nn.ModuleDict) for a in m.lora_B if m.lora_B[a].bias is not None]


# ---------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_float_base_layer_is_peft_lora_bias_bit_for_bit(dtype):
    """A float base (``quantize=False``) with lora_bias: peft's lora.Linear forward, gradients (A, B, b_B, x), state
    dict keys and merged bias, bit for bit."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(dtype)
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(lin)), peft.LoraConfig(r=4, lora_alpha=8,
                                                                                     target_modules=["0"],
                                                                                     lora_bias=True))
    ours = QLoRALinear.from_linear(copy.deepcopy(lin), quantize=False, r=4, lora_alpha=8, lora_bias=True)
    layer = theirs.base_model.model[0]
    randomize(theirs)
    for which, t in (("lora_A", layer.lora_A["default"].weight), ("lora_B", layer.lora_B["default"].weight),
                     ("lora_B.bias", layer.lora_B["default"].bias)):
        ours.set_lora_weight("default", which, t)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y_ours, y_theirs = ours(xs[0]), theirs(xs[1])
    assert y_ours.dtype == dtype and torch.equal(y_ours, y_theirs)
    y_ours.float().square().sum().backward()
    y_theirs.float().square().sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)
    for a, b in ((ours.lora_B["default"].bias, layer.lora_B["default"].bias),
                 (ours.lora_A["default"].weight, layer.lora_A["default"].weight)):
        assert a.grad is not None and torch.equal(a.grad, b.grad)
    assert "lora_B.default.bias" in ours.state_dict() and ours.lora_bias == {"default": True}
    merged = merge_and_unload(nn.Sequential(ours))[0]
    peft_merged = theirs.merge_and_unload()[0]
    assert torch.equal(merged.bias, peft_merged.bias) and torch.equal(merged.weight, peft_merged.weight)


# ---------------------------------------------------------------------------------------------- 4-bit, files both ways
def test_4bit_outputs_gradients_and_files_both_ways_as_peft(tmp_path, x):
    """The 4-bit toy with lora_bias on its biased layers: peft on bitsandbytes Linear4bit holding the same bytes gives
    the same outputs (``assert_matches`` against peft on the float64 dense base) and the same gradients of b_B
    (``s * sum(dY)`` on both sides: float32 sums in another order, rtol 1e-5); ``save_adapter`` writes peft's keys
    (``<module>.lora_B.bias``) and ``lora_bias: true``, which peft loads; peft's own file loads back here to the same
    outputs and is re-saved identically."""
    ours = qk_toy()
    adapters.save_adapter(ours, tmp_path / "ours")
    sd = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {k for k in sd if k.endswith("lora_B.bias")} == {f"base_model.model.layers.{i}.{n}.lora_B.bias"
                                                          for i in (0, 1) for n in BIASED}
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["lora_bias"] is True
    theirs = peft.PeftModel.from_pretrained(bnb_base(ours), str(tmp_path / "ours"), is_trainable=True)
    ref = run(reference64(ours, tmp_path / "ours"), x.double())
    y_ours, y_theirs = run(ours, x), run(theirs, x)
    assert_matches(y_ours, y_theirs, ref)
    with qkernels.disable_adapters(ours):  # without the adapter the bias term is gone: the test sees it
        assert (run(ours, x) - y_ours).abs().max() > 1e-2
    for m in (ours, theirs):
        with torch.enable_grad():
            m(x).square().sum().backward()
    g_ours, g_theirs = _bias_grads(ours), _bias_grads(theirs)
    assert len(g_ours) == len(g_theirs) == 6
    for a, b in zip(g_ours, g_theirs, strict=True):
        assert a is not None and torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max())
    theirs.save_pretrained(tmp_path / "peft")
    back = apply_qlora(dense_toy(), BIASED, r=4, lora_alpha=8, compute_dtype=torch.float32)
    adapters.load_adapter(back, tmp_path / "peft", replace=True)
    assert_matches(run(back, x), y_theirs, ref)
    adapters.save_adapter(back, tmp_path / "again")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("again", "peft"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_compute_stays_within_twice_peft_s_own_error(tmp_path, x):
    """compute_dtype bfloat16 on both sides (module docstring): ours no further from the float64 run than twice
    peft + bitsandbytes' bf16 error plus one bf16 ulp of the output."""
    ours = qk_toy()
    adapters.save_adapter(ours, tmp_path)
    ref = run(reference64(ours, tmp_path), x.double())
    for m in ours.modules():
        if isinstance(m, QLoRALinear):
            m.compute_dtype = torch.bfloat16
    base = bnb_base(ours)
    for m in base.modules():
        if type(m).__name__ == "Linear4bit":
            m.compute_dtype = torch.bfloat16
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path), is_trainable=True)
    e_ours = (run(ours, x).double() - ref).abs().max()
    e_theirs = (run(theirs, x).double() - ref).abs().max()
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs().max()
    assert e_ours <= 2 * e_theirs + ulp, f"{e_ours:.3g} > 2 * {e_theirs:.3g} + {ulp:.3g}"


# ---------------------------------------------------------------------------------------------- merge
def test_merge_adds_the_scaled_bias_as_peft_s_float_merge(tmp_path, x):
    """merge_and_unload: ``bias + s * b_B`` in the bias's dtype, peft's merge of the same adapter on the float base
    bit for bit (peft's bitsandbytes 4-bit merge adds b_B unscaled, unlike its own forward: not followed), outputs
    those of the unmerged model; merge_into_4bit adds it too."""
    ours = qk_toy()
    adapters.save_adapter(ours, tmp_path)
    before = run(ours, x)
    peft_merged = peft.PeftModel.from_pretrained(dense_base(ours, torch.float32), str(tmp_path)).merge_and_unload()
    four = copy.deepcopy(ours)
    merged = merge_and_unload(ours)
    for i in (0, 1):
        for n in BIASED:
            a, b = merged.layers[i].get_submodule(n), peft_merged.layers[i].get_submodule(n)
            assert type(a) is nn.Linear and torch.equal(a.bias, b.bias)
    after = run(merged, x)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the requantization warning
        qkernels.merge_into_4bit(four)
    assert torch.equal(four.layers[0].q_proj.bias, merged.layers[0].q_proj.bias)


def test_merging_lora_bias_into_a_layer_without_bias_is_refused_before_any_change(x):
    """peft: RuntimeError "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias."; the
    forward works (peft warned at creation), and the model is left as it was."""
    with pytest.warns(UserWarning, match="has no bias.*merging LoRA weights won't be possible"):
        model = apply_qlora(dense_toy(), "all-linear", r=4, lora_bias=True, compute_dtype=torch.float32)
    randomize(model)
    y = run(model, x)
    with pytest.raises(RuntimeError, match=r"Impossible to merge LoRA with `lora_bias=True`.*'layers\.0\.down'"):
        merge_and_unload(model)
    assert sum(isinstance(m, QLoRALinear) for m in model.modules()) == 8 and torch.equal(run(model, x), y)


# ---------------------------------------------------------------------------------------------- several adapters
def test_a_bias_adapter_beside_a_plain_one_switches_and_saves_its_own_flag(tmp_path, x):
    """add_adapter(lora_bias=True) beside a plain adapter: set_adapter switches (the plain one has no b_B), each saves
    its own lora_bias flag and keys, and peft loads both with the same outputs; a state dict round trip keeps b_B."""
    model = apply_qlora(dense_toy(), BIASED, r=4, lora_alpha=8, compute_dtype=torch.float32)
    adapters.add_adapter(model, "b", r=4, lora_alpha=8, target_modules=BIASED, lora_bias=True)
    randomize(model, "default", 1)
    randomize(model, "b", 2)
    for name in ("default", "b"):
        adapters.save_adapter(model, tmp_path / name, name)
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert cfg["lora_bias"] is (name == "b")
        adapters.set_adapter(model, name)
        theirs = peft.PeftModel.from_pretrained(bnb_base(model), str(tmp_path / name), is_trainable=True)
        assert_matches(run(model, x), run(theirs, x), run(reference64(model, tmp_path / name), x.double()))
    q = model.layers[0].q_proj
    assert q.lora_B["b"].bias.requires_grad and not q.lora_B["default"].weight.requires_grad
    fresh = apply_qlora(dense_toy(), BIASED, r=4, lora_alpha=8, compute_dtype=torch.float32)
    adapters.add_adapter(fresh, "b", r=4, lora_alpha=8, target_modules=BIASED, lora_bias=True)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.layers[0].q_proj.lora_B["b"].bias, q.lora_B["b"].bias)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kw, match", [
    ({"use_dora": True}, r"lora_bias=True is not supported with DoRA.*use_dora=False or lora_bias=False"),
    ({"init_lora_weights": "gaussian"}, r"lora_bias=True is only supported with init_lora_weights=True or False"),
    ({"target_modules": ["q_proj", "emb"]}, r"lora_bias=True on embedding target 'emb'"),
    ({"lora_bias": "yes"}, r"lora_bias must be a bool"),
], ids=["dora", "gaussian", "embedding", "not_bool"])
def test_unsupported_combinations_are_refused_by_name_before_any_change(kw, match):
    class WithEmb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.q_proj = nn.Embedding(10, IN), nn.Linear(IN, 8)

    model = WithEmb()
    args = {"target_modules": ["q_proj"], "lora_bias": True, **kw}
    with pytest.raises(ValueError, match=match):
        apply_qlora(model, **args)
    assert not any(isinstance(m, QLoRALinear) for m in model.modules())
    if "use_dora" in kw:  # peft's LoraConfig refuses the same
        with pytest.raises(ValueError, match="not supported for DoRA"):
            peft.LoraConfig(lora_bias=True, use_dora=True)


def test_bad_lora_bias_files_are_refused_and_load_nothing(tmp_path):
    """A b_B of the wrong shape, b_B keys under a config without lora_bias: ValueErrors naming the key; nothing
    loaded."""
    adapters.save_adapter(qk_toy(), tmp_path / "good")
    cfg = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    sd = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))
    key = "base_model.model.layers.1.up.lora_B.bias"
    cases = {"shape": ({**sd, key: torch.zeros(3)}, cfg, r"up\.lora_B\.bias'?: lora_B bias \(3,\).*needs a float"),
             "no_flag": (sd, {**cfg, "lora_bias": False}, r"is a lora_B bias, but the config has lora_bias false")}
    target = apply_qlora(dense_toy(), BIASED, r=4, lora_alpha=8)
    for name, (tensors, config, match) in cases.items():
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=match):
            adapters.load_adapter(target, d, "x")
        assert adapters.adapter_names(target) == ["default"], name


def test_mixed_batch_rows_get_their_adapter_s_scaled_bias(x):
    """adapter_batch (peft's adapter_names): each sample's output is that of its adapter run alone, b_B included
    (peft's mixed batch calls lora_B, bias and all, on the rows), within float32 rounding of the LoRA term."""
    model = qk_toy().eval()
    adapters.add_adapter(model, "plain", r=4, lora_alpha=8, target_modules=BIASED)
    randomize(model, "plain", 3)
    names = ["default", "plain", "__base__"]
    with torch.no_grad(), qkernels.adapter_batch(model, names):
        mixed = model(x)
    for i, name in enumerate(names):
        with torch.no_grad():
            if name == "__base__":
                with qkernels.disable_adapters(model):
                    alone = model(x[i:i + 1])
            else:
                adapters.set_adapter(model, name)
                alone = model(x[i:i + 1])
        assert (mixed[i:i + 1] - alone).abs().max() <= 1e-5 * alone.abs().max(), name


def test_a_meta_model_gets_b_b_from_its_adapter_or_at_init(tmp_path):
    """On the meta device b_B is one more unloaded key: a base-only checkpoint initializes it (zeros, init True), an
    adapter loaded before the checkpoint keeps its b_B; both give the float model's outputs."""
    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))

    torch.manual_seed(0)
    q = apply_qlora(net(), ["0", "2"], r=4, lora_bias=True)
    base = {k: v for k, v in q.state_dict().items() if "lora" not in k}
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    for with_adapter in (False, True):
        if with_adapter:
            randomize(q)
            adapters.save_adapter(q, tmp_path)
        with torch.device("meta"):
            m = net()
        m = apply_qlora(m, ["0", "2"], r=4, lora_bias=True)
        assert "lora_B.default.bias" in m[0]._unloaded
        if with_adapter:
            adapters.load_adapter(m, tmp_path, replace=True)
        m.load_state_dict(base, assign=True, strict=False)
        assert not m[0]._unloaded and torch.equal(m[0].lora_B["default"].bias, q[0].lora_B["default"].bias)
        assert torch.equal(m(x), q(x))


def test_a_trainer_checkpoint_restores_b_b_in_place(tmp_path):
    """save_adapters / restore_adapters (the Trainer's resume): b_B comes back into the same Parameter; a model
    without lora_bias is refused before any copy."""
    model = qk_toy()
    b = model.layers[0].q_proj.lora_B["default"].bias
    want = b.detach().clone()
    qkernels.save_adapters(model, tmp_path)
    with torch.no_grad():
        b.zero_()
    qkernels.restore_adapters(model, tmp_path)
    assert model.layers[0].q_proj.lora_B["default"].bias is b and torch.equal(b, want)
    plain = apply_qlora(dense_toy(), BIASED, r=4, lora_alpha=8, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="same apply_qlora lora_bias"):
        qkernels.restore_adapters(plain, tmp_path)
