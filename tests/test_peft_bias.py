"""peft's ``LoraConfig(bias="none" | "all" | "lora_only")`` (the base model's own biases trained beside the adapter;
not ``lora_bias``, tests/test_lora_bias.py), against peft 0.21.2 on bitsandbytes 0.50.2 holding the same bytes.

The model: the adapter tests' two-block toy (tests/test_adapters.py; ``q_proj``, ``v_proj``, ``up`` have a bias,
``down`` has none) under a LayerNorm and a Linear head, so "all" reaches biases of modules without LoRA and of a
non-Linear. LoRA on ``q_proj`` and ``up`` unless a test says otherwise.

Tolerances: outputs as tests/test_adapters.py's ``assert_matches`` (each side within float32 rounding of peft on
the float64 dense base; ours at most twice peft's error plus 8 ulps). Training (plain SGD): at each step the
float64 reference is run at each model's own weights, and the step's gradients together are held to the same rule
(STYLE 12), so a step measures its own rounding, not the drift of the previous updates (tests/fuzz_vs_peft.py's
flow ``c``). Trainable sets, file keys and the loaded bias values are compared exactly.
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
from qkernels import adapters, apply_qlora, merge_and_unload, trainable_parameters

from .test_adapters import IN, assert_matches, bnb_base, dense_base, dense_toy, reference64, run

peft = pytest.importorskip("peft", reason="peft is the interop target of these tests")

TARGETS = ["q_proj", "up"]
MODES = ["none", "all", "lora_only"]


class Headed(nn.Module):
    """The adapter tests' toy, then a LayerNorm and a head (``inner.layers.{0,1}.{q_proj,v_proj,up,down}``,
    ``norm``, ``head``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = dense_toy()
        self.norm = nn.LayerNorm(IN)
        self.head = nn.Linear(IN, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.inner(x)))


def headed() -> Headed:
    torch.manual_seed(0)
    m = Headed()
    with torch.no_grad():  # LayerNorm starts at bias 0: a nonzero one shows a bias that did not load
        m.norm.bias.uniform_(-0.5, 0.5)
    return m


def qk(targets=TARGETS, seed: int = 1, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return apply_qlora(headed(), targets, r=4, lora_alpha=8, compute_dtype=torch.float32, **kw)


def bnb(qk_model: nn.Module) -> nn.Module:
    return bnb_base(qk_model, headed)


def peft_names(model: nn.Module) -> set[str]:
    """peft's trainable parameter names in qkernels' naming (prefix and ``base_layer.`` dropped)."""
    return {n.removeprefix("base_model.model.").replace(".base_layer.", ".") for n, p in model.named_parameters()
            if p.requires_grad}


def ours_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def base_bias_names(model: nn.Module) -> set[str]:
    return {n for n in ours_names(model) if n.endswith(".bias") and "lora_" not in n and "modules_to_save" not in n}


def perturb(model: nn.Module, seed: int) -> None:
    """Every trainable tensor moved (B is 0 and most biases round at init: they would hide a bias that is not saved
    or loaded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------- what trains
@pytest.mark.parametrize("save", [None, ["head"]], ids=["plain", "head-to-save"])
@pytest.mark.parametrize("mode", MODES)
def test_trainable_parameters_are_peft_s(mode, save):
    """apply_qlora(bias=...) trains exactly what get_peft_model(LoraConfig(bias=...)) trains (a module to save keeps
    its copy's flags: its original's bias does not train under "all", as in peft), and counts them as peft does."""
    ours = qk(bias=mode, modules_to_save=save)
    theirs = peft.get_peft_model(bnb(ours), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, bias=mode,
                                                            modules_to_save=save))
    assert ours_names(ours) == peft_names(theirs)
    expected = {"none": set(), "lora_only": {f"inner.layers.{i}.{n}.bias" for i in (0, 1) for n in TARGETS},
                "all": {f"inner.layers.{i}.{n}.bias" for i in (0, 1) for n in ("q_proj", "v_proj", "up")}
                | {"norm.bias"} | (set() if save else {"head.bias"})}[mode]
    assert base_bias_names(ours) == expected
    assert trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


def test_bias_is_not_lora_bias_and_both_combine():
    """``bias`` (base biases) and ``lora_bias`` (a bias on lora_B) are separate: together, both train, as in peft."""
    ours = qk(bias="lora_only", lora_bias=True)
    theirs = peft.get_peft_model(bnb(ours), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                            bias="lora_only", lora_bias=True))
    assert ours_names(ours) == peft_names(theirs)
    assert {n for n in ours_names(ours) if "lora_B" in n and n.endswith("bias")}
    assert base_bias_names(ours)


# ---------------------------------------------------------------------------------------------- training
def _step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = (model(x) - target).square().mean()
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _norm(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@pytest.mark.parametrize("mode", ["all", "lora_only"])
def test_training_steps_match_peft(tmp_path, x, mode):
    """Three SGD steps: the losses and every gradient (LoRA and base biases) against peft's, held to twice peft's
    own error against the float64 reference at each model's own weights (module docstring); the trained biases
    end where peft's do."""
    ours = qk(bias=mode)
    perturb(ours, 3)
    adapters.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(bnb(ours), str(tmp_path), is_trainable=True)
    ref = reference64(ours, tmp_path, headed)
    assert ours_names(ours) == peft_names(theirs)
    names = sorted(ours_names(ours))
    for p in ref.parameters():
        p.requires_grad_(False)
    ref_params = {_norm(n): p for n, p in ref.named_parameters()}
    for n in names:
        ref_params[n].requires_grad_(True)
    target = torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(11))

    def at(params: dict[str, torch.Tensor]):
        with torch.no_grad():
            for n in names:
                ref_params[n].copy_(params[n])
        loss, g = _step(ref, x.double(), target.double())
        return loss, {_norm(k): v for k, v in g.items()}

    for _ in range(3):
        (l_o, g_o), (l_p, g_p) = _step(ours, x, target), _step(theirs, x, target)
        g_p = {_norm(k): v for k, v in g_p.items()}
        p_o = dict(ours.named_parameters())
        p_p = {_norm(n): p for n, p in theirs.named_parameters()}
        (r_lo, r_go), (r_lp, r_gp) = at(p_o), at(p_p)
        cat = [torch.cat([g[n].double().reshape(-1) for n in names]) for g in (g_o, g_p, r_go, r_gp)]
        e_ours, e_peft = (cat[0] - cat[2]).abs().max(), (cat[1] - cat[3]).abs().max()
        ulp = torch.finfo(torch.float32).eps * cat[2].abs().max()
        assert e_ours <= 2 * e_peft + 8 * ulp, f"gradient error {e_ours:.3g} > 2x peft's {e_peft:.3g} + 8 ulp"
        assert abs(l_o.double() - r_lo) <= 2 * abs(l_p.double() - r_lp) + 8 * torch.finfo(torch.float32).eps * r_lo
        with torch.no_grad():
            for n in names:
                p_o[n].sub_(0.1 * g_o[n])
                p_p[n].sub_(0.1 * g_p[n])
    p_p = {_norm(n): p for n, p in theirs.named_parameters()}
    for n in base_bias_names(ours):
        a, b = dict(ours.named_parameters())[n], p_p[n]
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), n  # three steps of float32-rounded gradients apart


# ---------------------------------------------------------------------------------------------- files both ways
@pytest.mark.parametrize("save", [None, ["head"]], ids=["plain", "head-to-save"])
@pytest.mark.parametrize("mode", ["all", "lora_only"])
def test_saved_adapter_is_peft_s_and_peft_loads_it(tmp_path, x, mode, save):
    """save_adapter writes the biases under peft's keys (a LoRA layer's as ``<module>.base_layer.bias``; under "all"
    every other bias as its state-dict key, and a module to save's ``original_module.bias`` /
    ``modules_to_save.bias`` as peft does) and ``"bias"`` in the config: PeftModel.from_pretrained on the bitsandbytes
    base gives our logits, and peft saving it back writes the very same tensors."""
    ours = qk(bias=mode, modules_to_save=save)
    perturb(ours, 5)
    adapters.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == mode
    sd = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    lora_biases = {f"base_model.model.inner.layers.{i}.{n}.base_layer.bias" for i in (0, 1) for n in TARGETS}
    biases = {k for k in sd if k.endswith("bias")}
    if mode == "lora_only":
        assert biases == lora_biases | ({"base_model.model.head.bias"} if save else set())
    else:
        assert {f"base_model.model.inner.layers.{i}.v_proj.bias" for i in (0, 1)} | {"base_model.model.norm.bias"} \
            | lora_biases <= biases
    assert torch.equal(sd["base_model.model.inner.layers.0.q_proj.base_layer.bias"],
                       ours.get_submodule("inner.layers.0.q_proj").bias)
    theirs = peft.PeftModel.from_pretrained(bnb(ours), str(tmp_path / "ours"))
    assert_matches(run(ours, x), run(theirs, x), run(reference64(ours, tmp_path / "ours", headed), x.double()))
    theirs.save_pretrained(str(tmp_path / "back"))
    back = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("save", [None, ["head"]], ids=["plain", "head-to-save"])
@pytest.mark.parametrize("mode", ["all", "lora_only"])
def test_peft_trained_adapter_loads_here_with_peft_s_logits(tmp_path, x, mode, save):
    """An adapter peft trained with bias=... (biases moved, also of modules without LoRA under "all") loads into a
    model made with plain apply_qlora: peft's logits, peft's trainable set (PeftModel.from_pretrained(...,
    is_trainable=True)), and save_adapter writes peft's file back."""
    ours = qk()
    theirs = peft.get_peft_model(bnb(ours), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, bias=mode,
                                                            modules_to_save=save))
    perturb(theirs, 9)
    theirs.save_pretrained(str(tmp_path / "peft"))
    adapters.load_adapter(ours, tmp_path / "peft", replace=True)
    theirs.eval()
    assert_matches(run(ours, x), run(theirs, x), run(reference64(ours, tmp_path / "peft", headed), x.double()))
    again = peft.PeftModel.from_pretrained(bnb(qk()), str(tmp_path / "peft"), is_trainable=True)
    assert ours_names(ours) == peft_names(again)
    adapters.save_adapter(ours, tmp_path / "ours")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "peft"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bias_file_loads_atomically_and_drops_keys_peft_drops(tmp_path):
    """A misshapen bias is a ValueError naming its key and nothing changes (the biases neither); a bias key naming
    no module of the model is skipped with a warning, as peft's strict=False load drops it."""
    src = qk(bias="all")
    perturb(src, 4)
    adapters.save_adapter(src, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(str(path))
    target = qk()
    before = {k: v.clone() for k, v in target.state_dict().items() if k.endswith("bias")}
    bad = dict(sd, **{"base_model.model.norm.bias": torch.zeros(IN + 1)})
    save_file(bad, str(path))
    with pytest.raises(ValueError, match=r"'base_model.model.norm.bias': \(129,\).*\(128,\)"):
        adapters.load_adapter(target, tmp_path, replace=True)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())
    save_file(dict(sd, **{"base_model.model.gone.bias": torch.zeros(3)}), str(path))
    with pytest.warns(UserWarning, match=r"1 bias key.*'base_model.model.gone.bias'.*strict=False"):
        adapters.load_adapter(target, tmp_path, replace=True)
    assert torch.equal(target.norm.bias, src.norm.bias)


# ---------------------------------------------------------------------------------------------- several adapters
def test_a_second_adapter_with_bias_is_refused_as_peft_does(tmp_path):
    """peft: "supports only 1 adapter with bias"; add_adapter and load_adapter refuse it before any change, a plain
    adapter beside it is fine, and replacing the bias adapter itself is too."""
    ours = qk(bias="all")
    theirs = peft.get_peft_model(bnb(ours), peft.LoraConfig(r=4, target_modules=TARGETS, bias="all"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        theirs.add_adapter("b", peft.LoraConfig(r=4, target_modules=TARGETS, bias="lora_only"))
    with pytest.raises(ValueError, match=r"adapter 'b' has bias='lora_only', and adapter 'default' already has "
                                         r"bias='all'.*supports only 1 adapter with bias"):
        adapters.add_adapter(ours, "b", target_modules=TARGETS, bias="lora_only")
    assert adapters.adapter_names(ours) == ["default"]
    adapters.save_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        adapters.load_adapter(ours, tmp_path, adapter_name="copy")
    assert adapters.adapter_names(ours) == ["default"]
    adapters.load_adapter(ours, tmp_path, replace=True)  # the bias adapter itself: fine
    adapters.add_adapter(ours, "plain", target_modules=TARGETS)  # bias "none" beside it: fine


@pytest.mark.parametrize("first, second", [("all", "none"), ("none", "lora_only"), ("lora_only", "none")])
def test_flags_follow_peft_through_add_set_disable_delete(x, first, second):
    """The biases' flags are set by the model's first adapter and left alone by add_adapter (peft 0.21 restores every
    existing parameter's flag), set_adapter and delete_adapter; disabling adapters with a bias adapter active warns
    as peft does and keeps the trained biases (both give the same, non-base, outputs)."""
    ours = qk(TARGETS + ["v_proj"], bias=first)
    theirs = peft.get_peft_model(bnb(ours), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS + ["v_proj"],
                                                            bias=first))
    perturb(ours, 2)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if _norm(n) in mine:
                p.copy_(mine[_norm(n)])

    def disabled() -> None:  # the trained biases stay; a warning iff the active adapter has a bias mode
        with warnings.catch_warnings(record=True) as w_peft:
            warnings.simplefilter("always")
            with theirs.disable_adapter():
                y_peft = run(theirs, x)
        with warnings.catch_warnings(record=True) as w_ours:
            warnings.simplefilter("always")
            with qkernels.disable_adapters(ours):
                y_ours = run(ours, x)
        said = [[str(w.message) for w in ws if "Careful, disabling" in str(w.message)] for ws in (w_ours, w_peft)]
        assert bool(said[0]) == bool(said[1]) == (second != "none"), said
        torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-5)

    steps = [
        (lambda: adapters.add_adapter(ours, "b", target_modules=["v_proj"], bias=second),
         lambda: theirs.add_adapter("b", peft.LoraConfig(r=4, target_modules=["v_proj"], bias=second))),
        (lambda: adapters.set_adapter(ours, "b"), lambda: theirs.set_adapter("b")),
        (disabled, lambda: None),
        (lambda: adapters.delete_adapter(ours, "default"), lambda: theirs.delete_adapter("default")),
        (lambda: adapters.add_adapter(ours, "c", target_modules=["up"]),
         lambda: theirs.add_adapter("c", peft.LoraConfig(r=4, target_modules=["up"]))),
    ]
    for i, (step_ours, step_peft) in enumerate(steps):
        step_ours()
        step_peft()
        assert base_bias_names(ours) == {n for n in peft_names(theirs) if n.endswith(".bias") and "lora_" not in n}, i


@pytest.mark.parametrize("how", ["add_adapter", "load_adapter"])
def test_a_module_to_save_wrapped_beside_a_bias_all_adapter_keeps_its_trained_bias(tmp_path, how):
    """peft 0.21 restores every existing parameter's flag after adding an adapter, by identity: a module a later
    adapter wraps as a module to save keeps its bias trainable under an active "all" adapter, now named
    ``norm.original_module.bias`` (fuzz_vs_peft seed 44 case 102, Falcon's ``ln_f``). Ours froze it."""
    ours = qk(TARGETS + ["v_proj"], bias="all")
    theirs = peft.get_peft_model(bnb(ours), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS + ["v_proj"],
                                                            bias="all"))
    assert "norm.bias" in ours_names(ours) and ours_names(ours) == peft_names(theirs)
    if how == "add_adapter":
        adapters.add_adapter(ours, "b", r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["norm"])
        theirs.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["norm"]))
    else:
        src = qk(["v_proj"], modules_to_save=["norm"])
        adapters.save_adapter(src, tmp_path)
        adapters.load_adapter(ours, tmp_path, adapter_name="b", set_active=False)
        theirs.load_adapter(str(tmp_path), adapter_name="b", is_trainable=True)
    # (peft's load_adapter(is_trainable=True) also leaves the inactive adapter's own weights trainable; those aside)
    mine, peft_s = ({n for n in names if how == "add_adapter" or ".b." not in n}
                    for names in (ours_names(ours), peft_names(theirs)))
    assert "norm.original_module.bias" in peft_s
    assert mine == peft_s, sorted(mine ^ peft_s)


# ---------------------------------------------------------------------------------------------- merge, checkpoints
@pytest.mark.parametrize("mode", ["all", "lora_only"])
def test_merge_keeps_the_trained_biases(x, mode):
    """merge_and_unload: the trained bias simply stays in the merged layer (still trainable, as peft's base layer's
    Parameter); the merged model's outputs are the adapted ones."""
    ours = qk(bias=mode)
    perturb(ours, 6)
    y = run(ours, x)
    trained = {n: p.detach().clone() for n, p in ours.named_parameters() if n in base_bias_names(ours)}
    merged = merge_and_unload(copy.deepcopy(ours))
    params = dict(merged.named_parameters())
    for n, b in trained.items():
        assert torch.equal(params[n], b) and params[n].requires_grad, n
    torch.testing.assert_close(run(merged, x), y, rtol=0, atol=1e-4)  # W + s B A rounded to float32 once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # merge_into_4bit's requantization report
        qkernels.merge_into_4bit(ours)  # requantizes in place: the bias Parameters are kept as they are
    params = dict(ours.named_parameters())
    for n, b in trained.items():
        assert torch.equal(params[n], b) and params[n].requires_grad, n


def test_state_dict_and_trainer_checkpoints_keep_the_biases(tmp_path):
    """The trained biases are the model's own tensors: its state dict carries them into a fresh apply_qlora model;
    save_adapters / restore_adapters (the Trainer's adapter-only checkpoints) restore them in place (the same
    Parameter objects), and refuse a checkpoint whose bias mode differs."""
    from qkernels.integrations import restore_adapters, save_adapters

    ours = qk(bias="all")
    perturb(ours, 7)
    fresh = qk(bias="all")
    fresh.load_state_dict(ours.state_dict())
    assert torch.equal(fresh.norm.bias, ours.norm.bias)
    assert torch.equal(fresh.inner.layers[0].q_proj.bias, ours.inner.layers[0].q_proj.bias)
    save_adapters(ours, tmp_path)
    want = ours.norm.bias.detach().clone()
    param = ours.norm.bias
    with torch.no_grad():
        ours.norm.bias.zero_()
    restore_adapters(ours, tmp_path)
    assert ours.norm.bias is param and torch.equal(param, want) and param.requires_grad
    with pytest.raises(ValueError, match=r"bias='all' in the checkpoint but 'none' in the model"):
        restore_adapters(qk(), tmp_path)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("bad", ["lora", "boft_only", True, None, "ALL"])
def test_bad_bias_values_are_refused_naming_the_argument(bad):
    """apply_qlora / add_adapter: any value but the three is a ValueError naming ``bias`` and the values allowed
    (peft's LoraConfig accepts anything and fails later, or reads "boft_only" as "lora_only"); nothing changes."""
    allowed = r"bias must be one of \['none', 'all', 'lora_only'\]"
    model = headed()
    with pytest.raises(ValueError, match=allowed):
        apply_qlora(model, TARGETS, bias=bad)
    assert type(model.inner.layers[0].q_proj) is nn.Linear
    ours = qk()
    with pytest.raises(ValueError, match=allowed):
        adapters.add_adapter(ours, "b", target_modules=TARGETS, bias=bad)
    assert adapters.adapter_names(ours) == ["default"]


def test_meta_model_refuses_bias_before_its_checkpoint(tmp_path):
    """An adapter with trained base biases loaded into a meta model before its checkpoint would be overwritten by the
    checkpoint's biases: refused, saying to load the checkpoint first."""
    src = qk(bias="lora_only")
    perturb(src, 8)
    adapters.save_adapter(src, tmp_path)
    with torch.device("meta"):
        meta = Headed()
    apply_qlora(meta, TARGETS, r=4, lora_alpha=8, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"meta device.*load the base checkpoint first, then the adapter"):
        adapters.load_adapter(meta, tmp_path, replace=True)


def test_dense_base_too(tmp_path, x):
    """The same files on peft's float32 dense base (peft's lora.Linear): our 4-bit model's logits."""
    ours = qk(bias="all")
    perturb(ours, 10)
    adapters.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(dense_base(ours, torch.float32, headed), str(tmp_path))
    assert_matches(run(ours, x), run(theirs, x), run(reference64(ours, tmp_path, headed), x.double()))


@pytest.mark.parametrize("mode", ["all", "lora_only"])
def test_a_bias_adapter_loads_into_a_float_model_with_no_lora_layer_as_peft_from_pretrained(tmp_path, x, mode):
    """load_adapter adds the LoRA layers itself (PeftModel.from_pretrained's flow): the file's biases, LoRA weights
    and trainable set are peft's (is_trainable=True), the outputs bit for bit peft's on the same float model."""
    theirs = peft.get_peft_model(headed(), peft.LoraConfig(r=4, target_modules=["q_proj", "up"], bias=mode,
                                                           init_lora_weights=False))
    perturb(theirs, 3)
    theirs.save_pretrained(str(tmp_path))
    ours = headed()
    adapters.load_adapter(ours, tmp_path)
    again = peft.PeftModel.from_pretrained(headed(), str(tmp_path), is_trainable=True)
    assert torch.equal(run(ours, x), run(again, x)) and torch.equal(run(ours, x), run(theirs, x))
    assert ours_names(ours) == peft_names(again)


def test_lora_only_counts_a_layer_whose_adapters_were_deleted_as_peft_does(tmp_path):
    """peft keeps a LoRA layer whose adapters were all deleted, and "lora_only" still covers its bias (trainable set
    and saved keys): adapter "a" on q_proj and up, "b" (lora_only) on q_proj, "a" deleted."""
    a_cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "up"])
    theirs = peft.get_peft_model(headed(), peft.LoraConfig(**a_cfg, bias="lora_only"), adapter_name="b")
    theirs.add_adapter("a", peft.LoraConfig(**a_cfg))
    theirs.delete_adapter("b")
    theirs.add_adapter("c", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], bias="lora_only"))
    theirs.delete_adapter("a")
    theirs.save_pretrained(str(tmp_path / "theirs"), selected_adapters=["c"])
    ours = apply_qlora(headed(), ["q_proj", "up"], r=4, lora_alpha=8, bias="lora_only", adapter_name="b",
                       compute_dtype=torch.float32)
    adapters.add_adapter(ours, "a", r=4, lora_alpha=8, target_modules=["q_proj", "up"])
    adapters.delete_adapter(ours, "b")
    adapters.add_adapter(ours, "c", r=4, lora_alpha=8, target_modules=["q_proj"], bias="lora_only")
    adapters.delete_adapter(ours, "a")
    adapters.save_adapter(ours, tmp_path / "ours", adapter_name="c")
    # peft writes a non-"default" adapter into a subdirectory of its name
    keys = [set(load_file(str(tmp_path / d / "adapter_model.safetensors"))) for d in ("theirs/c", "ours")]
    assert keys[0] == keys[1] and "base_model.model.inner.layers.0.up.base_layer.bias" in keys[1]
    assert ours_names(ours) == peft_names(theirs)


def test_lora_only_after_apply_qlora_on_the_union_and_a_replacing_load_is_peft_s(tmp_path):
    """The README's flow (apply_qlora on every adapter's targets, then load_adapter(replace=True)): a layer whose
    adapter the replacing load dropped is no LoRA layer of the file's, as peft loading it afresh would not make one,
    so "lora_only" leaves its bias frozen (the union's up layers here); a layer delete_adapter empties counts
    (the test above)."""
    theirs = peft.get_peft_model(headed(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                           bias="lora_only"))
    theirs.save_pretrained(str(tmp_path))
    ours = apply_qlora(headed(), ["q_proj", "up"], r=4, lora_alpha=8, compute_dtype=torch.float32)
    adapters.load_adapter(ours, tmp_path, replace=True)
    again = peft.PeftModel.from_pretrained(headed(), str(tmp_path), is_trainable=True)
    assert base_bias_names(ours) == {n for n in peft_names(again) if n.endswith(".bias")} != set()
    assert "inner.layers.0.up.bias" not in ours_names(ours)
