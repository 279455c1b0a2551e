"""DoRA ("QDoRA", peft's ``LoraConfig(use_dora=True)``) against peft 0.21.2 + bitsandbytes on the same 4-bit bytes.

The toy and the helpers are tests/test_adapters.py's (four Linear layers per block, two blocks, in_features multiples
of 64: bitsandbytes' CPU dequantizer needs whole-block rows). peft's DoRA layer on bitsandbytes' ``Linear4bit``
computes the same function as ours in float32 with different summation orders (ours: one fused base + LoRA product
scaled per row; peft: base, then ``(g - 1) * base + g * s * lora`` added), so the tolerance is test_adapters'
``assert_matches``: |ours - peft| at most twice the sum of each one's error against a float64 run of the same
weights (peft on a float64 dense base), plus 8 float32 ulps of the magnitude (STYLE 12). Gradients are held to the
same rule against the float64 run's gradients.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qkernels
from qkernels import adapters
from qkernels.model import apply_qlora, merge_and_unload, merge_into_4bit
from qkernels.nn import QLoRALinear

from ._oracle import bnb
from .test_adapters import IN, assert_matches, bnb_base, dense_base, dense_toy, randomize

peft = pytest.importorskip("peft", reason="peft is the DoRA reference")  # installed by make venv
from peft.tuners.lora.variants import DoraLinearVariant  # noqa: E402

R, ALPHA = 4, 8


def dora_toy(lora_dropout: float = 0.0, **kw) -> nn.Module:
    return apply_qlora(dense_toy(), "all-linear", r=R, lora_alpha=ALPHA, lora_dropout=lora_dropout,
                       compute_dtype=torch.float32, use_dora=True, **kw)


def randomize_dora(model: nn.Module, adapter: str, seed: int) -> None:
    """Nonzero A, B (test_adapters.randomize) and magnitudes away from their initial row norms (x U(0.5, 1.5))."""
    randomize(model, adapter, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, QLoRALinear) and m.is_dora(adapter):
                w = m.lora_magnitude_vector[adapter].weight
                w.mul_(0.5 + torch.rand(w.shape, generator=g))


def qlora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}


def copy_into_peft(ours: nn.Module, peft_model: nn.Module, adapter: str = "default") -> None:
    with torch.no_grad():
        for name, m in qlora_layers(ours).items():
            layer = peft_model.base_model.model.get_submodule(name)
            for which in ("lora_A", "lora_B", "lora_magnitude_vector"):
                getattr(layer, which)[adapter].weight.copy_(getattr(m, which)[adapter].weight)


def peft_pair(ours: nn.Module, lora_dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """peft DoRA on bitsandbytes' Linear4bit with our bytes, and on a float64 dense base: our A, B, m copied in."""
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=lora_dropout, target_modules="all-linear",
                          use_dora=True)
    theirs = peft.get_peft_model(bnb_base(ours), cfg)
    ref = peft.get_peft_model(dense_base(ours, torch.float64), copy.deepcopy(cfg)).double()
    for other in (theirs, ref):
        copy_into_peft(ours, other)
    return theirs, ref


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    core = model.base_model.model if isinstance(model, peft.PeftModel) else model
    return {n: p for n, p in core.named_parameters() if p.requires_grad}


def forward_backward(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, seed: int | None = None):
    """(output, {x and every trainable parameter: its gradient}); ``seed`` seeds the dropout masks."""
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)  # bitsandbytes' exact path: the input requires grad (DESIGN §5)
    if seed is not None:
        torch.manual_seed(seed)
    y = model(xi)
    y.backward(dy.to(y.dtype))
    grads = {"x": xi.grad.detach()}
    grads.update({n: p.grad.detach() for n, p in trainable(model).items() if p.grad is not None})
    return y.detach(), grads


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------- the layer vs peft
def test_magnitude_initialized_as_peft_on_the_same_4bit_weight():
    """peft's DoraLinearLayer.update_layer: ||dequant(W) + s B A||_row, bit for bit: with B = 0 (init True: peft's
    own init on the same bytes) and with the random A, B of init_lora_weights=False (ours copied into peft, whose
    DoRA init is then re-run)."""
    ours = dora_toy()
    fresh = peft.get_peft_model(bnb_base(ours), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                                use_dora=True))
    for name, m in qlora_layers(ours).items():
        mine = m.lora_magnitude_vector["default"].weight
        assert mine.dtype == torch.float32 and mine.shape == (m.out_features,) and mine.requires_grad
        assert torch.equal(mine, fresh.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight)
    ours = dora_toy(init_lora_weights=False)
    theirs, _ = peft_pair(ours)
    for name, m in qlora_layers(ours).items():
        layer = theirs.base_model.model.get_submodule(name)
        DoraLinearVariant.init(layer, adapter_name="default")
        assert torch.equal(m.lora_magnitude_vector["default"].weight, layer.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize(
    "dropout, mode",
    [(0.0, "train"), (0.3, "eval"), (0.3, "train")],
    ids=["no-dropout", "dropout-eval", "dropout-train-same-masks"],
)
def test_forward_and_gradients_match_peft_on_bitsandbytes(x, dropout, mode):
    """Output and the gradients of x, A, B and the magnitude: ours vs peft's DoRA on bitsandbytes' Linear4bit holding
    the same bytes, against peft on a float64 dense base. With dropout in training peft recomputes the base on
    dropout(x): both draw their masks from the same seed in the same order (one per layer, x's shape)."""
    ours = dora_toy(lora_dropout=dropout)
    randomize_dora(ours, "default", seed=1)
    theirs, ref = peft_pair(ours, dropout)
    for model in (ours, theirs, ref):
        model.train(mode == "train")
    dy = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(8))
    seed = 5 if mode == "train" else None
    y_o, g_o = forward_backward(ours, x, dy, seed)
    y_t, g_t = forward_backward(theirs, x, dy, seed)
    y_r, g_r = forward_backward(ref, x.double(), dy, seed)
    assert_matches(y_o, y_t, y_r)
    assert set(g_o) == set(g_t) == set(g_r)
    assert any("lora_magnitude_vector" in n for n in g_o)
    for n in g_o:
        assert_matches(g_o[n], g_t[n], g_r[n])
    if dropout:  # the masks matter: without dropout the output differs
        ours.eval()
        assert (forward_backward(ours, x, dy)[0] - y_o).abs().max() > 1e-3 or mode == "eval"


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout-train-same-masks"])
def test_bf16_compute_errors_are_peft_bitsandbytes_bf16_errors(x, dropout):
    """compute_dtype=bfloat16 (the base product in bf16, the LoRA term and the DoRA scaling in the adapters' float32,
    as peft's bnb layer with compute_dtype bf16): against the float64 run, our output and every gradient are at most
    twice peft + bitsandbytes' own bf16 error on the same weights, plus 8 float32 ulps (STYLE 12)."""
    ours = apply_qlora(dense_toy(), "all-linear", r=R, lora_alpha=ALPHA, lora_dropout=dropout,
                       compute_dtype=torch.bfloat16, use_dora=True)
    randomize_dora(ours, "default", seed=1)
    theirs, ref = peft_pair(ours, dropout)
    for m in theirs.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.bfloat16
    for model in (ours, theirs, ref):
        model.train()
    dy = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(8))
    y_o, g_o = forward_backward(ours, x, dy, 5)
    y_t, g_t = forward_backward(theirs, x, dy, 5)
    y_r, g_r = forward_backward(ref, x.double(), dy, 5)
    g_o["y"], g_t["y"], g_r["y"] = y_o, y_t, y_r
    for n in g_o:
        e_ours, e_theirs = ((t.double() - g_r[n]).abs().max() for t in (g_o[n], g_t[n]))
        ulp = torch.finfo(torch.float32).eps * g_r[n].abs().max()
        assert e_ours <= 2 * e_theirs + 8 * ulp, (n, float(e_ours), float(e_theirs))


def test_forward_keeps_no_dequantized_weight_for_backward(x):
    """The DoRA norm's dequantized [out, in] temporary is not saved for backward: the saved tensors of one layer's
    forward are no larger than the plain LoRA layer's plus the [out] norm and a few [M, out] activations."""
    m = qlora_layers(dora_toy(lora_dropout=0.1))["layers.0.up"]
    m.train()
    xi = torch.randn(7, m.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        m(xi).sum().backward()
    assert saved and max(saved) < m.in_features * m.out_features


def test_float_base_dora_matches_peft_lora_linear(x):
    """quantize=False (a float base) with DoRA: peft's lora.Linear DoRA on the same nn.Linear, outputs and grads."""
    torch.manual_seed(0)
    lin = nn.Linear(IN, 48)
    ours = QLoRALinear.from_linear(copy.deepcopy(lin), quantize=False, r=R, lora_alpha=ALPHA, use_dora=True,
                                   lora_dropout=0.2)
    ours.bias.requires_grad_(False)  # frozen, as apply_qlora and peft leave it

    class Wrap(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.lin = inner

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.lin(t)

    ours_m = Wrap(ours)
    randomize_dora(ours_m, "default", seed=2)
    theirs = peft.get_peft_model(Wrap(copy.deepcopy(lin)), peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.2,
                                                                            target_modules=["lin"], use_dora=True))
    ref = peft.get_peft_model(Wrap(copy.deepcopy(lin)).double(),
                              peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.2, target_modules=["lin"],
                                              use_dora=True)).double()
    for other in (theirs, ref):
        copy_into_peft(ours_m, other)
    dy = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(9))
    for mode in (False, True):
        for model in (ours_m, theirs, ref):
            model.train(mode)
        y_o, g_o = forward_backward(ours_m, x, dy, 4)
        y_t, g_t = forward_backward(theirs, x, dy, 4)
        y_r, g_r = forward_backward(ref, x.double(), dy, 4)
        assert_matches(y_o, y_t, y_r)
        for n in g_o:
            assert_matches(g_o[n], g_t[n], g_r[n])


# ---------------------------------------------------------------------------------------------- files, both ways
def test_saved_dora_adapter_loads_in_peft_with_our_outputs(tmp_path, x):
    ours = dora_toy()
    randomize_dora(ours, "default", seed=1)
    adapters.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    theirs, ref = peft_pair(ours)
    peft_keys = set(peft.get_peft_model_state_dict(theirs))
    assert set(sd) == peft_keys
    assert "base_model.model.layers.0.up.lora_magnitude_vector" in sd
    loaded = peft.PeftModel.from_pretrained(bnb_base(ours), str(tmp_path))
    for model in (ours, loaded, ref):
        model.eval()
    dy = torch.ones(3, 5, IN)
    assert_matches(forward_backward(ours, x, dy)[0], forward_backward(loaded, x, dy)[0],
                   forward_backward(ref, x.double(), dy)[0])
    other = dora_toy()  # and back into qkernels: bit-identical
    adapters.load_adapter(other, tmp_path, replace=True)
    other.eval()
    assert torch.equal(forward_backward(other, x, dy)[0], forward_backward(ours, x, dy)[0])


def test_peft_dora_adapter_loads_here_with_peft_outputs(tmp_path, x):
    base_model = apply_qlora(dense_toy(), "all-linear", r=2, compute_dtype=torch.float32)  # a plain adapter too
    theirs, ref = peft_pair(dora_toy())
    randomize_dora(theirs.base_model.model, "default", seed=4)
    theirs.save_pretrained(str(tmp_path))
    names = adapters.load_adapter(base_model, tmp_path, adapter_name="dora")
    assert len(names) == 8 and all(m.is_dora("dora") and not m.is_dora("default")
                                   for m in qlora_layers(base_model).values())
    copy_back = peft.PeftModel.from_pretrained(dense_base(base_model, torch.float64), str(tmp_path)).double()
    for model in (base_model, theirs, copy_back):
        model.eval()
    dy = torch.ones(3, 5, IN)
    assert_matches(forward_backward(base_model, x, dy)[0], forward_backward(theirs, x, dy)[0],
                   forward_backward(copy_back, x.double(), dy)[0])


def _rewrite(path, edit) -> None:
    f = path / "adapter_model.safetensors"
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def _edit_config(path, **fields) -> None:
    f = path / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(fields)
    f.write_text(json.dumps(cfg))


MAG = "base_model.model.layers.1.down.lora_magnitude_vector"  # peft's file key: no ".weight" (lora/model.py:1107)


@pytest.mark.parametrize(
    "case, edit, fields, message",
    [
        ("shape", lambda sd: sd.update({MAG: torch.ones(5)}), {},
         r"'base_model\.model\.layers\.1\.down\.lora_magnitude_vector': DoRA magnitude \(5,\).*needs a float "
         r"\(128,\)"),
        ("missing", lambda sd: sd.pop(MAG), {},
         r"module 'layers\.1\.down'.*use_dora true but the adapter has no DoRA magnitude "
         r"'base_model\.model\.layers\.1\.down\.lora_magnitude_vector'"),
        ("not-dora", None, {"use_dora": False}, r"is a DoRA magnitude, but the config has use_dora false"),
        ("dora-and-bias", None, {"lora_bias": True}, r"lora_bias=true with use_dora=true, which peft refuses"),
        ("not-bool", None, {"use_dora": "yes"}, r"use_dora must be true or false"),
    ],
)
def test_bad_dora_files_raise_naming_the_key_and_load_nothing(tmp_path, case, edit, fields, message):
    src = dora_toy()
    randomize_dora(src, "default", seed=1)
    adapters.save_adapter(src, tmp_path)
    if edit is not None:
        _rewrite(tmp_path, edit)
    if fields:
        _edit_config(tmp_path, **fields)
    target = dora_toy()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        adapters.load_adapter(target, tmp_path, adapter_name="new")
    with pytest.raises(ValueError, match=message):
        adapters.load_adapter(target, tmp_path, adapter_name="default", replace=True)
    after = target.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert adapters.adapter_names(target) == ["default"]


# ---------------------------------------------------------------------------------------------- merging
def test_merge_and_unload_is_peft_dora_merge(x):
    """Each merged weight is peft's DoraLinearVariant.merge_safe on the bnb layer (m / ||W + sBA|| * (W + sBA), from
    the weight bitsandbytes dequantizes), and the merged model computes what the adapter did."""
    ours = dora_toy()
    randomize_dora(ours, "default", seed=1)
    theirs, ref = peft_pair(ours)
    ours.eval()
    dy = torch.ones(3, 5, IN)
    y_adapter = forward_backward(ours, x, dy)[0]
    layers = qlora_layers(ours)
    merged = merge_and_unload(copy.deepcopy(ours))
    for name in layers:
        layer = theirs.base_model.model.get_submodule(name)
        w = layer.get_base_layer().weight
        expected = DoraLinearVariant.merge_safe(layer, "default", qkernels.dequantize_4bit(
            w.data, qkernels.QuantState.from_dict(w.quant_state.as_dict(packed=True)), torch.float32))
        got = merged.get_submodule(name).weight
        assert isinstance(merged.get_submodule(name), nn.Linear) and not got.requires_grad
        ulp = torch.finfo(torch.float32).eps * float(expected.abs().max())
        torch.testing.assert_close(got.detach(), expected, rtol=0, atol=4 * ulp)
    ref.eval()
    assert_matches(forward_backward(merged, x, dy)[0], y_adapter, forward_backward(ref, x.double(), dy)[0])


def test_merge_into_4bit_requantizes_the_dora_weight():
    ours = dora_toy()
    randomize_dora(ours, "default", seed=1)
    from qkernels.model import _merged_weight

    expected = {n: _merged_weight(m) for n, m in qlora_layers(ours).items()}
    with pytest.warns(UserWarning, match="requantized"):
        errors = merge_into_4bit(ours)
    for name, m in qlora_layers(ours).items():
        assert not m.lora_A and not m.lora_magnitude_vector and f"{name}.delta_lost" in errors
        st = m.weight.quant_state
        M = expected[name]
        packed, state = qkernels.quantize_4bit(M.contiguous(), st.blocksize, st.quant_type, st.nested)
        assert torch.equal(m.dequantized_weight(), qkernels.dequantize_4bit(packed, state, torch.float32))


# ---------------------------------------------------------------------------------------------- several adapters
def test_several_adapters_with_dora_switch_as_peft(tmp_path, x):
    ours = apply_qlora(dense_toy(), "all-linear", r=R, lora_alpha=ALPHA, compute_dtype=torch.float32)
    adapters.add_adapter(ours, "d", r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "down"])
    for name, seed in (("default", 11), ("d", 12)):
        randomize_dora(ours, name, seed)
        adapters.save_adapter(ours, tmp_path / name, adapter_name=name)
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text())["use_dora"] is True
    assert json.loads((tmp_path / "default" / "adapter_config.json").read_text())["use_dora"] is False
    theirs = peft.PeftModel.from_pretrained(bnb_base(ours), str(tmp_path / "default"), is_trainable=True)
    theirs.load_adapter(str(tmp_path / "d"), adapter_name="d", is_trainable=True)
    ref = {n: peft.PeftModel.from_pretrained(dense_base(ours, torch.float64), str(tmp_path / n)).double()
           for n in ("default", "d")}
    dy = torch.ones(3, 5, IN)
    for model in (ours, theirs, *ref.values()):
        model.eval()

    def check(active: str) -> None:
        assert_matches(forward_backward(ours, x, dy)[0], forward_backward(theirs, x, dy)[0],
                       forward_backward(ref[active], x.double(), dy)[0])
        assert set(trainable(ours)) == set(trainable(theirs))

    for name in ("d", "default", "d"):
        adapters.set_adapter(ours, name)
        theirs.set_adapter(name)
        check(name)
    assert any("lora_magnitude_vector.d" in n for n in trainable(ours))
    with adapters.disable_adapters(ours), theirs.disable_adapter(), ref["d"].disable_adapter():
        assert_matches(forward_backward(ours, x, dy)[0], forward_backward(theirs, x, dy)[0],
                       forward_backward(ref["d"], x.double(), dy)[0])
    adapters.delete_adapter(ours, "d")
    assert not any(m.lora_magnitude_vector for m in qlora_layers(ours).values())
    assert not any("lora_magnitude_vector" in k for k in ours.state_dict())


def test_state_dict_holds_the_magnitudes_and_loads_them_together(x):
    src = dora_toy()
    randomize_dora(src, "default", seed=1)
    sd = src.state_dict()
    assert "layers.0.q_proj.lora_magnitude_vector.default.weight" in sd  # peft's live key
    dst = dora_toy()
    dst.load_state_dict(sd)
    src.eval()
    dst.eval()
    dy = torch.ones(3, 5, IN)
    assert torch.equal(forward_backward(src, x, dy)[0], forward_backward(dst, x, dy)[0])
    partial = {k: v for k, v in sd.items() if k != "layers.0.q_proj.lora_magnitude_vector.default.weight"}
    with pytest.raises(RuntimeError, match=r"lora_magnitude_vector\.default\.weight"):
        dora_toy().load_state_dict(partial)
    bad = dict(sd, **{"layers.0.q_proj.lora_magnitude_vector.default.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"size mismatch for 'layers\.0\.q_proj\.lora_magnitude_vector"):
        dora_toy().load_state_dict(bad)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "nonstrict"])
def test_a_dora_state_dict_into_a_plain_adapter_is_refused_naming_the_key(strict):
    """Bug: a DoRA model's state dict (qkernels' own checkpoint) loaded into a model whose adapter of that name is
    plain (a meta model, which cannot take use_dora=True) loaded A and B and dropped the magnitudes as unexpected:
    with strict=False silently plain LoRA on DoRA's A and B, another function. Now a ValueError naming the key and
    the fix, and that layer unchanged."""
    src = dora_toy()
    randomize_dora(src, "default", seed=1)
    plain = apply_qlora(dense_toy(), "all-linear", r=R, lora_alpha=ALPHA, compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in plain.get_submodule("layers.0.q_proj").state_dict().items()}
    with pytest.raises(ValueError, match=r"'layers\.0\.q_proj\.lora_magnitude_vector\.default\.weight': the "
                                         r"checkpoint's adapter 'default' is a DoRA adapter .* use_dora=True"):
        plain.load_state_dict(src.state_dict(), strict=strict)
    after = plain.get_submodule("layers.0.q_proj").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_base_only_checkpoint_gives_initial_magnitudes_the_new_weights_row_norms(x):
    """Bug: apply_qlora(use_dora=True) on a model built with other weights (from_config on the CPU), then a base-only
    4-bit checkpoint loaded, kept the magnitudes of the old weights: every row of the loaded model rescaled (0.03 off
    the base here) where a DoRA adapter at init is the base model. Magnitudes still at their initial value now follow
    the new weight, a 4-bit one or a float base (the same Parameter); a trained magnitude stays, as in peft."""
    src = apply_qlora(dense_toy(1), "all-linear", r=R, lora_alpha=ALPHA, compute_dtype=torch.float32,
                      keep_float_modules=["up"])
    base_only = {k: v for k, v in src.state_dict().items() if "lora_" not in k}
    dst = dora_toy(keep_float_modules=["up"])
    mag = dst.get_submodule("layers.0.up").lora_magnitude_vector["default"].weight
    trained = dst.get_submodule("layers.1.down").lora_magnitude_vector["default"].weight
    with torch.no_grad():
        trained.mul_(1.5)
    kept = trained.detach().clone()
    dst.load_state_dict(base_only, strict=True)
    assert dst.get_submodule("layers.0.up").lora_magnitude_vector["default"].weight is mag
    assert torch.equal(trained, kept)
    with torch.no_grad():
        trained.copy_(dst.get_submodule("layers.1.down").dequantized_weight().norm(dim=1))
        assert torch.equal(dst(x), src(x))  # B = 0: the base model's output, bit for bit
    shards = dora_toy(keep_float_modules=["up"])  # a weight split over two shards (transformers' sharded save can)
    second = {k: v for k, v in base_only.items() if k.startswith("layers.0.q_proj.weight.quant")}
    shards.load_state_dict({k: v for k, v in base_only.items() if k not in second}, strict=False)
    shards.load_state_dict(second, strict=False)
    with torch.no_grad():
        shards.get_submodule("layers.1.down").lora_magnitude_vector["default"].weight.copy_(trained)
        assert torch.equal(shards(x), src(x))
    cast = dora_toy(keep_float_modules=["up"]).to(torch.bfloat16)  # cast since: the float32 norms rounded
    cast.load_state_dict(base_only)
    for name, layer in qlora_layers(cast).items():
        want = layer.dequantized_weight().norm(dim=1)  # the new weight's row norms (B = 0); the old ones are ~0.1 off
        got = layer.lora_magnitude_vector["default"].weight.float()
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0, msg=name)  # two bfloat16 ulps: the norm rounded
    fresh = dora_toy(keep_float_modules=["up"])
    fresh.load_state_dict(dst.state_dict())  # a checkpoint holding the magnitudes: they load as they are
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), dst.state_dict().values(), strict=True))


# ---------------------------------------------------------------------------------------------- refusals
def test_refusals_name_the_fix():
    with torch.device("meta"):  # on meta the magnitude is computed at load (test_accelerate_load.py); after
        meta = apply_qlora(dense_toy(), "all-linear")  # to_empty the weight holds no values and is not meta
    meta.to_empty(device="cpu")
    with pytest.raises(ValueError, match=r"use_dora=True initializes the DoRA magnitude.*load the base checkpoint"):
        adapters.add_adapter(meta, "d", use_dora=True)
    model = apply_qlora(dense_toy(), "all-linear", r=R)
    with pytest.raises(ValueError, match="use_dora must be a bool"):
        adapters.add_adapter(model, "d", use_dora=1)
    adapters.add_adapter(model, "d", use_dora=True)
    model.get_submodule("layers.0.up").delete_adapter("d")
    adapters.add_adapter(model, "d_plain", target_modules=["up"])
    # one adapter mixing DoRA and plain modules has no LoraConfig
    model.get_submodule("layers.0.up").update_layer("d", R, ALPHA)
    with pytest.raises(ValueError, match=r"mixes DoRA modules .* with plain LoRA ones"):
        adapters.save_adapter(model, "/tmp/never-written", adapter_name="d")
    with pytest.raises(ValueError, match="not a DoRA adapter"):
        model.get_submodule("layers.0.up").set_lora_weight("default", "lora_magnitude_vector", torch.ones(320))


def test_dora_on_a_zero_row_is_refused_naming_the_module():
    """Bug: DoRA on a tied head whose embedding has a zero padding-token row (Llama's padding_idx) gave NaN logits and
    a NaN loss from the first step, m / ||W + s B A|| being 0/0 there (peft's too). apply_qlora and add_adapter refuse
    it naming the module and the fix, before any change."""
    from .test_float_base import TIED_TARGETS, tied_llama

    model = tied_llama()
    assert float(model.model.embed_tokens.weight[0].abs().max()) == 0.0  # padding_idx 0
    with pytest.raises(ValueError, match=r"module 'lm_head': use_dora=True: output row\(s\) \[0\] .* 0/0 .*exclude"):
        apply_qlora(model, TIED_TARGETS, r=R, lora_alpha=ALPHA, use_dora=True)
    assert not any(isinstance(m, QLoRALinear) for m in model.modules())
    apply_qlora(model, TIED_TARGETS, r=R, lora_alpha=ALPHA)
    with pytest.raises(ValueError, match=r"module 'lm_head': use_dora=True: output row\(s\) \[0\]"):
        adapters.add_adapter(model, "d", use_dora=True)
    assert all("d" not in m.lora_A for m in model.modules() if isinstance(m, QLoRALinear))
    adapters.add_adapter(model, "d", use_dora=True, target_modules=TIED_TARGETS[:-1])  # the fix the message names
    adapters.set_adapter(model, "d")
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_a_tied_dora_head_follows_the_checkpoint_embedding_after_tie_weights(tmp_path):
    """Bug: a tied head with DoRA on a model built with other weights, then load_checkpoint (the checkpoint holds the
    embedding only; tie_weights() assigns it to the head): the head's magnitudes kept the old embedding's row norms,
    logits 0.18 off the loaded model at B = 0. They follow the new weight, as a checkpoint load does."""
    from safetensors.torch import save_file

    from .test_float_base import TIED_TARGETS, tied_llama

    def no_zero_row(seed, fill):  # DoRA refuses the zero padding row (test above)
        model = tied_llama(seed)
        with torch.no_grad():
            model.model.embed_tokens.weight[0].fill_(fill)
        return model

    src = apply_qlora(no_zero_row(1, 0.02), TIED_TARGETS, r=R, lora_alpha=ALPHA)
    sd = {k: v.contiguous() for k, v in src.state_dict().items() if "lora_" not in k and k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    dst = apply_qlora(no_zero_row(0, 0.01), TIED_TARGETS, r=R, lora_alpha=ALPHA, use_dora=True)
    qkernels.load_checkpoint(dst, tmp_path)
    assert dst.lm_head.weight is dst.model.embed_tokens.weight
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(dst(input_ids=ids).logits, src(input_ids=ids).logits)


def test_a_float_base_weight_assigned_takes_new_norms_and_another_shape_is_left_to_forward():
    """A float base's weight assigned (what tie_weights does): magnitudes at init follow it; one of another shape
    (resize_token_embeddings on a tied head) does not fail the assignment on the norm (it failed with a size
    mismatch inside __setattr__): forward names the shape problem as before."""
    layer = QLoRALinear.from_linear(nn.Linear(16, 8), quantize=False, r=2, use_dora=True)
    layer.weight = nn.Parameter(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, layer.weight.norm(dim=1))
    layer.weight = nn.Parameter(torch.randn(10, 16))
    assert layer.lora_magnitude_vector["default"].weight.shape == (8,)


# ---------------------------------------------------------------------------------------------- training
def test_qdora_training_lowers_the_loss_on_a_tiny_llama():
    from .test_model import tiny_llama

    model = apply_qlora(tiny_llama(), "all-linear", r=4, lora_alpha=8, use_dora=True, compute_dtype=torch.float32)
    model.train()
    params = trainable(model)
    mags = {n: p.detach().clone() for n, p in params.items() if "lora_magnitude_vector" in n}
    assert mags and all(("lora_" in n) for n in params)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses
    assert all(not torch.equal(p.detach(), mags[n]) for n, p in params.items() if n in mags)


def test_trainer_resume_restores_the_magnitudes_in_place(tmp_path):
    """restore_adapters (QLoRATrainer's resume) copies a DoRA adapter's magnitudes into the same Parameters, and
    refuses a checkpoint whose use_dora differs from the model's."""
    from qkernels.integrations import restore_adapters, save_adapters

    src = dora_toy()
    randomize_dora(src, "default", seed=1)
    save_adapters(src, tmp_path / "ck")
    dst = dora_toy()
    mag = dst.get_submodule("layers.0.up").lora_magnitude_vector["default"].weight
    restore_adapters(dst, tmp_path / "ck")
    assert dst.get_submodule("layers.0.up").lora_magnitude_vector["default"].weight is mag
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    plain = apply_qlora(dense_toy(), "all-linear", r=R, lora_alpha=ALPHA, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="use_dora=True in the checkpoint but module .* is not a DoRA adapter"):
        restore_adapters(plain, tmp_path / "ck")


@pytest.mark.parametrize("base_kind", ["bnb4bit", "dense-conv1d"])
def test_gpt2_conv1d_dora_adapter_loads_in_peft_and_merges_to_conv1d(tmp_path, base_kind):
    """GPT-2's Conv1D layers: our DoRA adapter (fan_in_fan_out, as peft writes for them) gives our outputs in peft on
    a bitsandbytes GPT-2 and on the dense Conv1D one (peft's DoRA norm transposes the [in, out] weight: the same rows),
    and merge_and_unload gives Conv1D layers computing the same."""
    from .test_adapters import _Embeds, run
    from .test_model import tiny_gpt2

    ours = apply_qlora(tiny_gpt2(), "all-linear", r=R, lora_alpha=ALPHA, compute_dtype=torch.float32, use_dora=True)
    randomize_dora(ours, "default", seed=2)
    adapters.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    base = bnb_base(ours, tiny_gpt2) if base_kind == "bnb4bit" else dense_base(ours, torch.float32, tiny_gpt2)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path))
    ref = peft.PeftModel.from_pretrained(dense_base(ours, torch.float64, tiny_gpt2), str(tmp_path)).double()
    emb = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(7))
    y_ref = run(_Embeds(ref), emb.double())
    y_ours = run(_Embeds(ours), emb)
    assert_matches(y_ours, run(_Embeds(theirs), emb), y_ref)
    merged = merge_and_unload(ours)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert_matches(run(_Embeds(merged), emb), y_ours, y_ref)


def test_bnb_loaded_model_meta_model_and_compile(tmp_path, x):
    """apply_qlora(use_dora=True) on a model whose layers bitsandbytes already quantized wraps them as they are (the
    magnitudes of the same bytes, peft's trainable count); a meta model takes a DoRA adapter file before its base
    checkpoint (the trained magnitudes kept) and runs as the model that saved it; a DoRA layer compiles with
    fullgraph=True to the eager result."""
    ours = dora_toy()
    randomize_dora(ours, "default", seed=1)
    wrapped = apply_qlora(bnb_base(ours), "all-linear", r=R, lora_alpha=ALPHA, use_dora=True)
    for (name, a), b in zip(qlora_layers(wrapped).items(), qlora_layers(dora_toy()).values(), strict=True):
        assert torch.equal(a.lora_magnitude_vector["default"].weight, b.lora_magnitude_vector["default"].weight), name
    theirs, _ = peft_pair(ours)
    assert qkernels.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    adapters.save_adapter(ours, tmp_path)
    with torch.device("meta"):
        meta = apply_qlora(dense_toy(), "all-linear", r=R, lora_alpha=ALPHA)
    adapters.load_adapter(meta, tmp_path, adapter_name="d")
    meta.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" not in k}, assign=True)
    adapters.set_adapter(meta, "d")
    for name, layer in qlora_layers(meta).items():
        layer.compute_dtype = torch.float32  # as dora_toy's
        assert torch.equal(layer.lora_magnitude_vector["d"].weight,
                           ours.get_submodule(name).lora_magnitude_vector["default"].weight), name
    with torch.no_grad():
        assert torch.equal(meta(x), ours(x))
    layer = ours.get_submodule("layers.0.up").eval()
    xi = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager, compiled = layer(xi), torch.compile(layer, fullgraph=True)(xi)
    ulp = torch.finfo(torch.float32).eps * float(eager.abs().max())
    torch.testing.assert_close(compiled, eager, rtol=0, atol=8 * ulp)  # inductor may reorder the elementwise ops


@pytest.mark.parametrize("N,K,nested,dtype,storage", [
    (96, 128, True, torch.float32, torch.uint8),    # nested blocks of 256 x 64 weights: slabs of 128 rows, then 2
    (200, 96, False, torch.bfloat16, torch.uint8),  # plain scales: slabs of 2 rows
    (130, 64, True, torch.float16, torch.bfloat16),  # a float quant_storage holding the bytes
    (37, 33, True, torch.float32, torch.uint8),     # rows never start on a nested block: one slab, the whole weight
])
def test_dora_weight_norm_4bit_is_the_whole_matrix_norm(N, K, nested, dtype, storage):
    """The slab-by-slab row norm the DoRA forward uses is peft's whole-matrix arithmetic (dequantize to the state's
    dtype, cast to A's, B A, s * B A + W, norm), however the rows are cut: the same decoded weights, the same
    operations; only the BLAS product's and the norm's summation order may change with a slab's row count (a few
    float32 ulps: rtol 8 ulps of float32, on norms that sum K positive terms)."""
    from qkernels.dora import dora_weight_norm, dora_weight_norm_4bit

    g = torch.Generator().manual_seed(N + K)
    W = (torch.randn(N, K, generator=g) * 0.05).to(dtype)
    packed, state = qkernels.quantize_4bit(W, 64, "nf4", double_quant=nested, quant_storage=storage)
    A = torch.randn(8, K, generator=g) * 0.1
    B = torch.randn(N, 8, generator=g) * 0.1
    whole = dora_weight_norm(qkernels.dequantize_4bit(packed, state, state.dtype).to(A.dtype), A, B, 2.0)
    for chunk in (1, 1000, 1 << 20):
        got = dora_weight_norm_4bit(packed, state, A, B, 2.0, chunk_weights=chunk)
        torch.testing.assert_close(got, whole, rtol=8 * 2.0**-24, atol=0.0)
