"""Adapters in peft's format: qkernels saves what peft loads (on a bitsandbytes 4-bit base and on a dense base),
loads what peft saves, refuses mismatches without touching the model, and handles several adapters as peft does.

Tolerance (``assert_matches``): ours and peft compute the same function in float32 with different summation
orders (qkernels' base GEMM vs bitsandbytes' dequantize + F.linear, and the LoRA term added separately), so each
differs from a float64 run of the same weights by rounding only. Our error against that run must be at most twice
peft's (STYLE 12), plus 8 float32 ulps of the output's magnitude for outputs that land exactly, and both errors
within 32 ulps (float32 rounding; measured at most 3).
bitsandbytes runs its exact dequantize path: the input requires grad (its no-grad CPU path keeps bf16 scales,
DESIGN §5).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qkernels
from qkernels import adapters
from qkernels.model import apply_qlora
from qkernels.nn import QLoRALinear, is_conv1d

from ._oracle import bnb

peft = pytest.importorskip("peft", reason="peft is the interop target of these tests")  # installed by make venv

# Every in_features is a multiple of 64: bitsandbytes 0.50.2's CPU dequantizer decodes weights whose rows are not whole
# blocks (e.g. [80, 96]) with the wrong scales (docs/format.md §7.4), which would put the oracle 0.02-0.15 off here.
# Awkward shapes are covered by the format tests. 192 * 128 = 384 blocks: one full nested block and a partial one.
IN, HID, MID = 128, 192, 320
SHORT = ["q_proj", "v_proj", "up", "down"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(IN, HID), nn.Linear(IN, HID)
        self.up, self.down = nn.Linear(HID, MID), nn.Linear(MID, IN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q_proj(x) * torch.sigmoid(self.v_proj(x))
        return x + self.down(torch.nn.functional.gelu(self.up(h)))


class Toy(nn.Module):
    """Two blocks: module names ``layers.{0,1}.{q_proj,v_proj,up,down}`` like a transformer's."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def dense_toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


def qk_toy(r: int = 4, lora_alpha: float = 8, seed: int = 0, **kw) -> Toy:
    """The dense toy quantized by qkernels, every Linear a QLoRALinear with adapter "default" (B = 0)."""
    return apply_qlora(dense_toy(seed), target_modules="all-linear", r=r, lora_alpha=lora_alpha,
                       compute_dtype=torch.float32, **kw)


def randomize(model: nn.Module, adapter: str, seed: int) -> None:
    """Nonzero A and B (a freshly initialized adapter has B = 0 and would hide every mistake in A)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in model.named_modules():
            if adapter in getattr(m, "lora_A", {}):
                for which in (m.lora_A[adapter], m.lora_B[adapter]):
                    which.weight.copy_(torch.randn(which.weight.shape, generator=g) * 0.1)


def quantized_weights(qk_model: nn.Module) -> dict[str, tuple[torch.Tensor, dict, torch.Tensor | None]]:
    """Per 4-bit QLoRALinear: (packed weight, bitsandbytes quant-state dict, bias), read from its state dict only. A
    float-base layer (``quantized`` False) holds the model's own float weight: the bases below keep ``make()``'s."""
    sd = qk_model.state_dict()
    out = {}
    for name, m in qk_model.named_modules():
        if isinstance(m, QLoRALinear) and m.quantized:
            pre = f"{name}.weight."
            stats = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
            out[name] = (sd[f"{name}.weight"], stats, sd.get(f"{name}.bias"))
    return out


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def bnb_base(qk_model: nn.Module, make=None) -> nn.Module:
    """The same toy (``make()``, default ``dense_toy()``) with bitsandbytes Linear4bit layers holding qkernels'
    packed bytes and scales."""
    base = (make or dense_toy)()
    for name, (packed, stats, bias) in quantized_weights(qk_model).items():
        dense = qk_model.get_submodule(name)  # its [out, in] (a Conv1D becomes a Linear4bit, as in transformers)
        lin = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=bias is not None,
                                compute_dtype=torch.float32, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit.from_prequantized(packed, stats, requires_grad=False, device="cpu", module=lin)
        if bias is not None:
            lin.bias = nn.Parameter(bias.clone(), requires_grad=False)
        _swap(base, name, lin)
    base.is_loaded_in_4bit = True  # what transformers sets; peft then wraps Linear4bit in its bnb LoRA layer
    return base


def dense_base(qk_model: nn.Module, dtype: torch.dtype, make=None) -> nn.Module:
    """The same toy with nn.Linear layers holding the dequantized weights in ``dtype`` (float64: the reference)."""
    base = (make or dense_toy)().to(dtype)
    with torch.no_grad():
        for name, (packed, stats, bias) in quantized_weights(qk_model).items():
            state = qkernels.QuantState.from_dict(stats)
            lin = base.get_submodule(name)
            W = qkernels.dequantize_4bit(packed, state, dtype=dtype, backend="reference")
            lin.weight.copy_(W.t() if is_conv1d(lin) else W)  # a GPT-2 Conv1D holds [in, out]
            if bias is not None:
                lin.bias.copy_(bias)
    return base


def reference64(qk_model: nn.Module, adapter_dir, make=None) -> nn.Module:
    """peft on the float64 dense base: the same function as ours, rounded only at float64."""
    return peft.PeftModel.from_pretrained(dense_base(qk_model, torch.float64, make), str(adapter_dir)).double()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        return model(x.detach().clone().requires_grad_(True)).detach()


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor) -> None:
    """``|ours - ref| <= 2 |theirs - ref| + 8 ulp``, and both within float32 rounding of ``ref`` (module docstring)."""
    ref = ref.to(torch.float64)
    e_ours, e_theirs = (ours.double() - ref).abs().max(), (theirs.double() - ref).abs().max()
    diff = (ours.double() - theirs.double()).abs().max()
    ulp = torch.finfo(torch.float32).eps * ref.abs().max()
    # (|ours - theirs| <= e_ours + e_theirs always holds, so the bound is on our error against peft's)
    bound = 2 * e_theirs + 8 * ulp
    assert e_ours <= bound, (f"error vs fp64 {e_ours:.3g} > 2x peft's ({e_theirs:.3g}) + 8 ulp; max |ours - peft| = "
                             f"{diff:.3g}")
    # and neither is more than float32 rounding away from the float64 run (measured here: at most 3 ulps)
    assert e_ours <= 32 * ulp and e_theirs <= 32 * ulp, f"errors vs fp64: {e_ours:.3g}, {e_theirs:.3g}, ulp {ulp:.3g}"


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def trained(tmp_path):
    """A qkernels toy with a nonzero adapter "default" (r=4, alpha=8, one module at r=6 and alpha=3), saved."""
    model = qk_toy()
    adapters.delete_adapter(model, "default")
    adapters.add_adapter(model, "default", r=4, lora_alpha=8)
    m = model.get_submodule("layers.1.up")
    m.delete_adapter("default")
    m.update_layer("default", 6, 3, 0.0, True, False)
    m.set_adapter("default")
    randomize(model, "default", seed=1)
    adapters.save_adapter(model, tmp_path / "ad")
    return model, tmp_path / "ad"


# ---------------------------------------------------------------------------------------------- format
def test_saved_files_are_peft_format(trained):
    model, path = trained
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["bias"] == "none"
    assert sorted(cfg["target_modules"]) == sorted(SHORT) and cfg["use_rslora"] is False
    assert cfg["rank_pattern"] == {r"layers\.1\.up": 6} and cfg["alpha_pattern"] == {r"layers\.1\.up": 3}
    assert cfg["inference_mode"] is True and cfg["fan_in_fan_out"] is False
    peft.LoraConfig.from_pretrained(str(path))  # peft parses it
    sd = load_file(str(path / "adapter_model.safetensors"))
    names = [f"layers.{i}.{s}" for i in range(2) for s in SHORT]
    assert set(sd) == {f"base_model.model.{n}.lora_{w}.weight" for n in names for w in "AB"}
    assert sd["base_model.model.layers.1.up.lora_A.weight"].shape == (6, HID)
    assert torch.equal(sd["base_model.model.layers.0.q_proj.lora_B.weight"],
                       model.get_submodule("layers.0.q_proj").lora_B["default"].weight)


def test_config_without_peft_has_the_same_meaning(trained, monkeypatch, x):
    """The fallback writer (peft not importable) produces a config peft reads to the same adapter."""
    model, path = trained
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *a, **k):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("peft hidden by the test")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    adapters.save_adapter(model, path / "nopeft")
    monkeypatch.undo()
    a = peft.LoraConfig.from_pretrained(str(path))
    b = peft.LoraConfig.from_pretrained(str(path / "nopeft"))
    for field in ("r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "bias",
                  "fan_in_fan_out", "init_lora_weights", "use_dora", "inference_mode", "layers_to_transform",
                  "layers_pattern", "modules_to_save"):
        assert getattr(a, field) == getattr(b, field), field
    assert set(a.target_modules) == set(b.target_modules)


# ---------------------------------------------------------------------------------------------- round trips
def test_save_load_round_trip_identical(trained, x):
    model, path = trained
    fresh = qk_toy(r=2, lora_alpha=16)  # same packed weights (deterministic quantization), different adapter
    randomize(fresh, "default", seed=99)
    loaded = adapters.load_adapter(fresh, path, replace=True)
    assert len(loaded) == 8
    assert torch.equal(run(fresh, x), run(model, x))
    for name, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            f = fresh.get_submodule(name)
            assert f.r["default"] == m.r["default"] and f.scaling["default"] == m.scaling["default"], name


@pytest.mark.parametrize("base_kind", ["bnb4bit", "dense-fp32"])
def test_our_adapter_loads_in_peft(trained, x, base_kind):
    model, path = trained
    base = bnb_base(model) if base_kind == "bnb4bit" else dense_base(model, torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(path))
    if base_kind == "bnb4bit":
        assert type(theirs.base_model.model.layers[0].q_proj).__module__ == "peft.tuners.lora.bnb"
    assert theirs.base_model.model.layers[1].up.r["default"] == 6
    assert_matches(run(model, x), run(theirs, x), run(reference64(model, path), x.double()))


@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_peft_adapter_loads_in_ours(tmp_path, x, serialization):
    """An adapter made by peft (rsLoRA, a rank_pattern, nonzero B) on a bnb base gives our model peft's outputs."""
    ours = qk_toy()
    base = bnb_base(ours)
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "up", "down"], use_rslora=True,
                          rank_pattern={"layers.0.up": 2}, lora_dropout=0.1)
    theirs = peft.get_peft_model(base, cfg)
    randomize(theirs, "default", seed=3)
    theirs.save_pretrained(str(tmp_path), safe_serialization=serialization == "safetensors")
    assert (tmp_path / ("adapter_model.bin" if serialization == "bin" else "adapter_model.safetensors")).exists()
    adapters.load_adapter(ours, tmp_path, adapter_name="peft")
    up0 = ours.get_submodule("layers.0.up")
    assert up0.r["peft"] == 2 and math.isclose(up0.scaling["peft"], 12 / math.sqrt(2))
    assert "peft" not in ours.get_submodule("layers.0.v_proj").lora_A  # not a target: base output only
    theirs.eval()
    ours.eval()
    assert_matches(run(ours, x), run(theirs, x), run(reference64(ours, tmp_path), x.double()))


def _add_adapter_name(path) -> None:
    """Keys as in a live PeftModel's state dict: ``<module>.lora_A.default.weight``."""
    sd = load_file(str(path / "adapter_model.safetensors"))
    named = {k.replace(".weight", ".default.weight"): v for k, v in sd.items()}
    save_file(named, str(path / "adapter_model.safetensors"))


def _set_config(**fields):
    def edit(path) -> None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update(fields)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    return edit


# Configs peft writes (get_peft_model + save_pretrained), some then edited as a user's file may be: each must load here
# with the ranks and alphas peft gives each module and peft's outputs. Pattern keys follow peft's get_pattern_key:
# the first key k (in file order) with re.match(rf"(.*\.)?({k})$", module name).
@pytest.mark.parametrize(
    "config, edit",
    [
        (dict(target_modules=r".*\.(q_proj|up)"), None),
        (dict(target_modules=SHORT, rank_pattern={r"layers\.[01]\.q_proj": 6, "0.up": 2, "q_proj|down": 3},
              alpha_pattern={r".*_proj": 5, "down": 3}), None),
        # "proj" is no key for q_proj (no '.' before it); "own" matches no suffix; the first matching key wins. (peft
        # writes the keys sorted, so a file keeps the order only when it is sorted, as here: peft then cannot reload
        # its own adapter either, and qkernels reports the shape mismatch)
        (dict(target_modules=SHORT, rank_pattern={"layers.1.v_proj": 2, "own": 7, "proj": 5, "v_proj": 3}), None),
        (dict(target_modules=SHORT, exclude_modules=r".*0\.down", layers_to_transform=[0], layers_pattern="layers"),
         None),
        (dict(target_modules=SHORT, init_lora_weights="gaussian", lora_dropout=0.2), None),
        (dict(target_modules=SHORT), _set_config(init_lora_weights="orthogonal", ensure_weight_tying=True)),
        (dict(target_modules=SHORT), _set_config(init_lora_weights="lora_ga", some_future_field=None)),
        (dict(target_modules=SHORT), _add_adapter_name),
    ],
    ids=["regex-target", "regex-pattern-keys", "pattern-key-order", "exclude-layers", "gaussian-dropout",
         "orthogonal-init", "lora-ga-init-unset-new-field", "keys-with-adapter-name"],
)
def test_peft_config_variants_load_with_peft_outputs(tmp_path, x, config, edit):
    ours = qk_toy()
    theirs = peft.get_peft_model(bnb_base(ours), peft.LoraConfig(r=4, lora_alpha=8, **config))
    randomize(theirs, "default", seed=3)
    theirs.save_pretrained(str(tmp_path))
    if edit is not None:
        edit(tmp_path)
    if edit is _add_adapter_name:  # peft reads such keys too
        theirs = peft.PeftModel.from_pretrained(bnb_base(ours), str(tmp_path))
    # (the init edits: peft cannot create "orthogonal" on a 4-bit base; the file's A, B are what both compute with)
    loaded = adapters.load_adapter(ours, tmp_path, adapter_name="peft")
    lora_theirs = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if "default" in getattr(m, "lora_A", {})}
    assert sorted(loaded) == sorted(lora_theirs)
    for name, m in lora_theirs.items():
        mine = ours.get_submodule(name)
        assert (mine.r["peft"], mine.lora_alpha["peft"]) == (m.r["default"], m.lora_alpha["default"]), name
    theirs.eval()
    ours.eval()
    assert_matches(run(ours, x), run(theirs, x), run(reference64(ours, tmp_path), x.double()))


class TopUp(Toy):
    """The toy plus a top-level ``up``: its name is also the end of ``layers.0.up`` and ``layers.1.up``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(IN, IN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(super().forward(x))


def top_up() -> TopUp:
    torch.manual_seed(0)
    return TopUp()


def test_rank_of_a_module_whose_name_ends_others_is_saved_for_it_alone(tmp_path, x):
    """peft matches a rank_pattern key against the end of a name, so the key "up" of a top-level module at r=6 gave
    every "*.up" r=6 too: the saved adapter loaded neither here nor in peft (shape mismatch)."""
    model = apply_qlora(top_up(), target_modules=["up", "down"], r=4, lora_alpha=8, compute_dtype=torch.float32)
    top = model.get_submodule("up")
    top.delete_adapter("default")
    top.update_layer("default", 6, 3, 0.0, True, False)
    top.set_adapter("default")
    randomize(model, "default", seed=1)
    adapters.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"^up": 6} and cfg["alpha_pattern"] == {"^up": 3}
    fresh = apply_qlora(top_up(), target_modules=["up", "down"], r=2, lora_alpha=8, compute_dtype=torch.float32)
    adapters.load_adapter(fresh, tmp_path, replace=True)
    assert fresh.get_submodule("layers.0.up").r["default"] == 4 and fresh.get_submodule("up").r["default"] == 6
    assert torch.equal(run(fresh, x), run(model, x))
    theirs = peft.PeftModel.from_pretrained(bnb_base(model, top_up), str(tmp_path))
    assert theirs.base_model.model.up.r["default"] == 6 and theirs.base_model.model.layers[0].up.r["default"] == 4
    assert_matches(run(model, x), run(theirs, x), run(reference64(model, tmp_path, top_up), x.double()))


# ---------------------------------------------------------------------------------------------- refusals
def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], names: list[str]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert adapters.adapter_names(model) == names


def _rewrite(path, edit_tensors=None, edit_config=None) -> None:
    if edit_tensors:
        sd = load_file(str(path / "adapter_model.safetensors"))
        edit_tensors(sd)
        save_file(sd, str(path / "adapter_model.safetensors"))
    if edit_config:
        cfg = json.loads((path / "adapter_config.json").read_text())
        edit_config(cfg)
        (path / "adapter_config.json").write_text(json.dumps(cfg))


LAST = "base_model.model.layers.1.v_proj"  # sorts last: an eager loader would have loaded 7 modules first


@pytest.mark.parametrize(
    "case, edit_tensors, edit_config, message",
    [
        ("rank", None, lambda c: c.update(r=3), r"lora_A\.weight'?: shape \(4, \d+\) in the file.*needs \(3, \d+\)"),
        ("shape", lambda sd: sd.update({f"{LAST}.lora_A.weight": torch.zeros(4, IN + 1)}), None,
         r"layers\.1\.v_proj\.lora_A\.weight'?: shape \(4, 129\).*needs \(4, 128\)"),
        ("B-rank", lambda sd: sd.update({f"{LAST}.lora_B.weight": torch.zeros(HID, 5)}), None,
         r"layers\.1\.v_proj\.lora_B\.weight'?: shape \(192, 5\).*needs \(192, 4\)"),
        ("key", lambda sd: sd.update({f"{LAST}x.lora_A.weight": sd.pop(f"{LAST}.lora_A.weight"),
                                      f"{LAST}x.lora_B.weight": sd.pop(f"{LAST}.lora_B.weight")}), None,
         r"'layers\.1\.v_projx' does not exist.*QLoRA modules are \['layers\.0\.q_proj'"),
        ("missing-B", lambda sd: sd.pop(f"{LAST}.lora_B.weight"), None, r"layers\.1\.v_proj.*no lora_B"),
        # a DoRA config needs a magnitude per module (tests/test_dora.py covers DoRA files in full)
        ("dora", None, lambda c: c.update(use_dora=True), r"use_dora true but the adapter has no DoRA magnitude"),
        # lora_bias loads (tests/test_lora_bias.py); a config saying it without the biases in the file does not
        ("lora-bias", None, lambda c: c.update(lora_bias=True), r"lora_bias true but the adapter has no lora_B bias"),
        ("peft-type", None, lambda c: c.update(peft_type="IA3"), r"peft_type is 'IA3'"),
        # bias "all" / "lora_only" load (tests/test_peft_bias.py); another value is refused naming the field and
        # the values (peft's "_only" test would read "boft_only" as "lora_only")
        ("bias-boft-only", None, lambda c: c.update(bias="boft_only"),
         r"bias must be one of \['none', 'all', 'lora_only'\].*got 'boft_only'"),
        ("bias-none-object", None, lambda c: c.update(bias=None), r"bias must be one of .*got None"),
        # peft re-derives the base residual W - B0 A0 of these inits when it loads the adapter (olora on this 4-bit
        # toy: outputs 0.54 off the plain LoRA ones); qkernels cannot, so it must not load them as plain LoRA
        ("olora", None, lambda c: c.update(init_lora_weights="olora"), r"init_lora_weights='olora' trains against"),
        ("pissa", None, lambda c: c.update(init_lora_weights="pissa_niter_4"), r"'pissa_niter_4' trains against"),
        ("megatron", None, lambda c: c.update(megatron_config={"tensor_model_parallel_size": 2}),
         r"megatron_config=.*Megatron"),
        ("new-field", None, lambda c: c.update(use_newvariant=True), r"\{'use_newvariant': True\} are not LoraConfig"),
        ("bad-regex", None, lambda c: c.update(rank_pattern={"up(": 2}), r"key 'up\(' is not a valid regular expr"),
        ("two-names", lambda sd: sd.update({f"{LAST}.lora_B.other.weight": sd.pop(f"{LAST}.lora_B.weight")}), None,
         r"disagree on the adapter name"),
    ],
)
def test_mismatch_raises_and_loads_nothing(trained, case, edit_tensors, edit_config, message):
    model, path = trained
    if case == "rank":
        _rewrite(path, edit_config=lambda c: c.update(rank_pattern={}, alpha_pattern={}))
    _rewrite(path, edit_tensors, edit_config)
    target = qk_toy()
    before = _snapshot(target)
    with pytest.raises(ValueError, match=message):
        adapters.load_adapter(target, path, adapter_name="new")
    _assert_unchanged(target, before, ["default"])
    with pytest.raises(ValueError, match=message):  # also when it would replace an existing adapter
        adapters.load_adapter(target, path, adapter_name="default", replace=True)
    _assert_unchanged(target, before, ["default"])


def _truncate(name):
    def edit(path) -> None:
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: len(data) // 2])
    return edit


def _as_bin(content):
    def edit(path) -> None:
        (path / "adapter_model.safetensors").unlink()
        if isinstance(content, bytes):
            (path / "adapter_model.bin").write_bytes(content)
        else:
            torch.save(content, path / "adapter_model.bin")
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_truncate("adapter_model.safetensors"), r"adapter_model\.safetensors cannot be read .*truncated or corrupted"),
        (_truncate("adapter_config.json"), r"adapter_config\.json is not valid JSON"),
        (lambda path: (path / "adapter_config.json").write_text("[4]"), r"adapter_config\.json must hold a JSON obj"),
        (_as_bin(b"not a pickle"), r"adapter_model\.bin cannot be read as a torch pickle of tensors"),
        (_as_bin({"base_model.model.layers.0.up.lora_A.weight": 1.0}), r"adapter_model\.bin must hold a dict of tens"),
    ],
    ids=["truncated-safetensors", "truncated-config", "config-not-object", "bin-garbage", "bin-not-tensors"],
)
def test_damaged_files_raise_value_error_naming_the_file(trained, edit, message):
    _, path = trained
    edit(path)
    target = qk_toy()
    before = _snapshot(target)
    with pytest.raises(ValueError, match=message):
        adapters.load_adapter(target, path, adapter_name="new")
    _assert_unchanged(target, before, ["default"])


def test_existing_name_is_refused(trained):
    _, path = trained
    with pytest.raises(ValueError, match=r"adapter 'default' already exists on 8 modules.*replace=True"):
        adapters.load_adapter(qk_toy(), path)


def test_modules_without_a_lora_layer_get_one_as_peft_from_pretrained_gives_them(trained, x):
    """A module the file adapts that apply_qlora left alone gets a LoRA layer, as ``PeftModel.from_pretrained``
    gives it one: a float Linear keeps its float weight (LoRA beside it, no quantization), a model with no QLoRA
    layer at all loads too; the outputs are peft's on the same base."""
    _, path = trained
    partial = apply_qlora(dense_toy(), target_modules=["q_proj", "v_proj", "down"], r=4, lora_alpha=8,
                          compute_dtype=torch.float32)
    loaded = adapters.load_adapter(partial, path, adapter_name="x")
    assert len(loaded) == 8 and "layers.0.up" in loaded
    up = partial.get_submodule("layers.0.up")
    assert isinstance(up, QLoRALinear) and not up.quantized and up.active_adapter == "x"
    assert up.lora_A["x"].weight.requires_grad and not up.weight.requires_grad
    theirs = peft.PeftModel.from_pretrained(bnb_base(partial), str(path))
    assert_matches(run(partial, x), run(theirs, x), run(reference64(partial, path), x.double()))

    dense = dense_toy()
    adapters.load_adapter(dense, path)  # no QLoRA layer at all: every module of the file, on its float weight
    assert all(isinstance(m, QLoRALinear) and not m.quantized for n, m in dense.named_modules() if n in loaded)
    theirs = peft.PeftModel.from_pretrained(dense_toy(), str(path))
    assert torch.equal(run(dense, x), run(theirs, x))
    assert [n for n, p in dense.named_parameters() if p.requires_grad] == [
        n for n, p in theirs.base_model.model.named_parameters() if ".lora_" in n]


def test_a_dora_adapter_loads_into_a_model_with_no_lora_layer_as_peft(tmp_path, x):
    """The layers added at load carry the file's own kind of adapter (here DoRA, its magnitudes from the file)."""
    theirs = peft.get_peft_model(dense_toy(), peft.LoraConfig(r=4, target_modules=["q_proj", "up"], use_dora=True))
    randomize(theirs, "default", seed=3)
    theirs.save_pretrained(str(tmp_path))
    ours = dense_toy()
    adapters.load_adapter(ours, tmp_path)
    assert ours.get_submodule("layers.0.q_proj").is_dora("default")
    assert torch.equal(run(ours, x), run(theirs, x))


def test_a_model_loaded_in_4_bits_takes_an_adapter_without_apply_qlora(trained, x):
    """bitsandbytes Linear4bit layers (transformers' 4-bit load) are wrapped as they are, as apply_qlora wraps them:
    the same packed bytes, and bit for bit the outputs of apply_qlora + load_adapter(replace=True)."""
    model, path = trained
    four = bnb_base(model)
    adapters.load_adapter(four, path)
    want = bnb_base(model)
    apply_qlora(want, "all-linear", r=4, compute_dtype=torch.float32)
    adapters.load_adapter(want, path, replace=True)
    assert torch.equal(run(four, x), run(want, x)) and torch.equal(run(four, x), run(model, x))
    for name, (packed, _, _) in quantized_weights(model).items():
        assert torch.equal(four.get_submodule(name).state_dict()["weight"], packed)
    assert [n for n, p in four.named_parameters() if p.requires_grad] == [
        n for n, p in want.named_parameters() if p.requires_grad]


def test_a_layer_added_at_load_changes_no_other_parameter_s_flag(trained):
    """In a model with adapters already (here one whose q_proj biases train), adding LoRA layers at load leaves every
    existing parameter's requires_grad as it was, as peft's load_adapter does."""
    _, path = trained
    partial = apply_qlora(dense_toy(), target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, bias="lora_only",
                          compute_dtype=torch.float32)
    flags = {n: p.requires_grad for n, p in partial.named_parameters()}
    assert flags["layers.0.q_proj.bias"] and not flags["layers.0.up.bias"]
    adapters.load_adapter(partial, path, adapter_name="x", set_active=False)
    after = {n: p.requires_grad for n, p in partial.named_parameters()}
    assert {n: after[n] for n in flags} == flags


def test_a_file_that_does_not_fit_leaves_the_modules_it_would_have_adapted_as_they_were(trained):
    _, path = trained
    key = "base_model.model.layers.1.down.lora_A.weight"
    _rewrite(path, edit_tensors=lambda sd: sd.update({key: sd[key][:, :7].contiguous()}))
    partial = apply_qlora(dense_toy(), target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                          compute_dtype=torch.float32)
    modules = dict(partial.named_modules())
    flags = {n: p.requires_grad for n, p in partial.named_parameters()}
    before = _snapshot(partial)
    with pytest.raises(ValueError, match=r"layers\.1\.down\.lora_A.*\(4, 7\)"):
        adapters.load_adapter(partial, path, adapter_name="x")
    _assert_unchanged(partial, before, ["default"])
    assert dict(partial.named_modules()).keys() == modules.keys()
    assert all(partial.get_submodule(n) is m for n, m in modules.items() if n)
    assert {n: p.requires_grad for n, p in partial.named_parameters()} == flags
    dense = dense_toy()
    flags = {n: p.requires_grad for n, p in dense.named_parameters()}
    with pytest.raises(ValueError, match=r"layers\.1\.down\.lora_A"):
        adapters.load_adapter(dense, path)
    assert not any(isinstance(m, QLoRALinear) for m in dense.modules())
    assert {n: p.requires_grad for n, p in dense.named_parameters()} == flags


def test_set_active_false_leaves_the_model_computing_as_before(trained, x):
    """A LoRA layer added at load follows the model's active adapter (here "default", which it lacks: base only),
    so that set_active=False changes no output."""
    _, path = trained
    partial = apply_qlora(dense_toy(), target_modules=["q_proj", "v_proj", "down"], r=4, lora_alpha=8,
                          compute_dtype=torch.float32)
    randomize(partial, "default", seed=5)
    y = run(partial, x)
    adapters.load_adapter(partial, path, adapter_name="x", set_active=False)
    assert torch.equal(run(partial, x), y)
    up = partial.get_submodule("layers.0.up")
    assert up.active_adapter is None and not up.lora_A["x"].weight.requires_grad
    adapters.set_adapter(partial, "x")
    assert up.active_adapter == "x" and not torch.equal(run(partial, x), y)


# ---------------------------------------------------------------------------------------------- several adapters
def test_multiple_adapters_behave_as_peft(tmp_path, x):
    ours = qk_toy()
    adapters.add_adapter(ours, "b", r=2, lora_alpha=4, target_modules=["q_proj", "down"])
    adapters.add_adapter(ours, "c", r=8, lora_alpha=8, use_rslora=True, target_modules=r"layers\.1\..*")
    with pytest.raises(ValueError, match="already exists"):
        adapters.add_adapter(ours, "b")
    for name, seed in (("default", 11), ("b", 12), ("c", 13)):
        randomize(ours, name, seed)
        adapters.save_adapter(ours, tmp_path / name, adapter_name=name)
    assert adapters.adapter_names(ours) == ["default", "b", "c"]
    theirs = peft.PeftModel.from_pretrained(bnb_base(ours), str(tmp_path / "default"), is_trainable=True)
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b", is_trainable=True)
    theirs.load_adapter(str(tmp_path / "c"), adapter_name="c", is_trainable=True)
    ref = {n: reference64(ours, tmp_path / n) for n in ("default", "b", "c")}
    x64 = x.double()

    def check(active: str, trainable: bool = True) -> None:
        assert_matches(run(ours, x), run(theirs, x), run(ref[active], x64))
        if not trainable:
            return
        # after set_adapter, the same LoRA weights are trainable (the active adapter's, where a module has it)
        mine = {n for n, p in ours.named_parameters() if p.requires_grad}
        peft_trainable = {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
        assert mine == peft_trainable and mine, (active, sorted(mine ^ peft_trainable))

    # add_adapter did not change the active adapter (as peft). peft's load_adapter(is_trainable=True) leaves the
    # inactive adapters it loaded trainable; set_adapter aligns both below.
    check("default", trainable=False)
    for name in ("b", "c", "default", "b"):
        adapters.set_adapter(ours, name)
        theirs.set_adapter(name)
        check(name)
    y_b = run(ours, x)
    with adapters.disable_adapters(ours), theirs.disable_adapter(), ref["b"].disable_adapter():
        y_off = run(ours, x)
        assert_matches(y_off, run(theirs, x), run(ref["b"], x64))  # the base alone
        assert not torch.equal(y_off, y_b)
    assert torch.equal(run(ours, x), y_b)  # flags restored
    adapters.delete_adapter(ours, "default")
    theirs.delete_adapter("default")
    assert adapters.adapter_names(ours) == ["b", "c"]
    check("b")
    with pytest.raises(ValueError, match=r"adapter 'default' not found; the model has adapters \['b', 'c'\]"):
        adapters.set_adapter(ours, "default")
    with pytest.raises(ValueError, match="not found"):
        adapters.delete_adapter(ours, "default")
    # the model still saves what it holds; a copy of it reloads identically
    adapters.save_adapter(ours, tmp_path / "c2", adapter_name="c")
    other = copy.deepcopy(ours)
    adapters.delete_adapter(other, "c")
    adapters.load_adapter(other, tmp_path / "c2", adapter_name="c")
    adapters.set_adapter(ours, "c")
    assert torch.equal(run(other, x), run(ours, x))


# ---------------------------------------------------------------------------------------------- layers_to_transform
def test_layers_to_transform_saved_loaded_and_read_by_peft(tmp_path, x):
    """Only layer 1 (the toy's layer list is 'layers' at the top: peft's default pattern finds no index there, so the
    pattern is named). The config carries both fields; peft wraps the same modules and computes the same outputs."""
    model = apply_qlora(dense_toy(), ["q_proj", "up"], r=4, lora_alpha=8, compute_dtype=torch.float32,
                        layers_to_transform=[1], layers_pattern="layers")
    assert sorted(n for n, m in model.named_modules() if isinstance(m, QLoRALinear)) == ["layers.1.q_proj",
                                                                                          "layers.1.up"]
    randomize(model, "default", seed=4)
    adapters.save_adapter(model, tmp_path / "l1")
    cfg = json.loads((tmp_path / "l1" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "up"]
    assert cfg["layers_to_transform"] == [1] and cfg["layers_pattern"] == "layers" and cfg["modules_to_save"] is None
    theirs = peft.PeftModel.from_pretrained(bnb_base(model), str(tmp_path / "l1"))
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == {"layers.1.q_proj", "layers.1.up"}
    assert_matches(run(model, x), run(theirs, x), run(reference64(model, tmp_path / "l1"), x.double()))
    # and it loads back here, onto a model quantized everywhere: only the layer-1 modules get it
    other = qk_toy()
    assert sorted(adapters.load_adapter(other, tmp_path / "l1", adapter_name="l1")) == ["layers.1.q_proj",
                                                                                        "layers.1.up"]
    for name, m in other.named_modules():
        if isinstance(m, QLoRALinear):
            assert ("l1" in m.lora_A) == (name in ("layers.1.q_proj", "layers.1.up")), name
            if "l1" in m.lora_A:
                src = model.get_submodule(name)
                assert torch.equal(m.lora_A["l1"].weight, src.lora_A["default"].weight)
                assert torch.equal(m.lora_B["l1"].weight, src.lora_B["default"].weight)


def test_add_adapter_with_layers_to_transform(tmp_path):
    model = qk_toy()
    got = adapters.add_adapter(model, "l0", target_modules=["q_proj", "down"], layers_to_transform=0,
                               layers_pattern="layers")
    assert got == ["layers.0.q_proj", "layers.0.down"]
    adapters.save_adapter(model, tmp_path, adapter_name="l0")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [0] and cfg["layers_pattern"] == "layers"
    with pytest.raises(ValueError, match="layers_to_transform cannot be used when target_modules is a str"):
        adapters.add_adapter(model, "x", layers_to_transform=[0])
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\].*matches no QLoRALinear"):
        adapters.add_adapter(model, "x", target_modules=["q_proj"], layers_to_transform=[7], layers_pattern="layers")
    assert adapters.adapter_names(model) == ["default", "l0"]


def test_saved_layer_fields_reproduce_the_modules_on_a_llama(tmp_path):
    from .test_model import tiny_llama

    model = apply_qlora(tiny_llama(), ["q_proj", "v_proj"], r=4, layers_to_transform=1)
    adapters.save_adapter(model, tmp_path)
    cfg = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert cfg.layers_to_transform == [1] and cfg.layers_pattern is None and cfg.target_modules == {"q_proj", "v_proj"}
    pm = peft.get_peft_model(tiny_llama(), cfg)
    assert {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)} == {"model.layers.1.self_attn.q_proj",
                                                              "model.layers.1.self_attn.v_proj"}


def test_save_adapter_writes_what_peft_auto_classes_need(tmp_path, trained):
    """save_adapter wrote task_type null and no auto_mapping, so peft's
    ``AutoPeftModelForCausalLM.from_pretrained(dir)`` refused the directory ("Cannot infer the auto class from the
    config"). A language model's adapter now gets its task (``PeftModelForCausalLM``); a classification model's
    gets none (peft's class for it would add the head to the modules to save, and fail on a 4-bit head with LoRA)
    but peft's ``auto_mapping``, as peft writes it without a task, which ``peft.AutoPeftModel`` reads; an explicit
    task_type wins."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    from .test_model import tiny_llama

    def config(path):
        return json.loads((path / "adapter_config.json").read_text())

    tiny_llama().save_pretrained(tmp_path / "base")
    model = apply_qlora(tiny_llama(), ["q_proj", "v_proj"], r=4)
    model.config._name_or_path = str(tmp_path / "base")
    adapters.save_adapter(model, tmp_path / "llama")
    assert config(tmp_path / "llama")["task_type"] == "CAUSAL_LM"
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "llama"))
    assert type(auto).__name__ == "PeftModelForCausalLM"
    adapters.save_adapter(model, tmp_path / "explicit", task_type="FEATURE_EXTRACTION")
    assert config(tmp_path / "explicit")["task_type"] == "FEATURE_EXTRACTION"

    torch.manual_seed(0)
    bert = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=3))
    bert.save_pretrained(tmp_path / "bert")
    bert.config._name_or_path = str(tmp_path / "bert")  # as from_pretrained(tmp_path / "bert") sets it
    bert = apply_qlora(bert, "all-linear", r=2)  # the classifier too: a 4-bit head with LoRA
    qkernels.integrations.save_adapters(bert, tmp_path / "cls")  # the Trainer's writer wrote SEQ_CLS
    assert config(tmp_path / "cls")["task_type"] is None
    assert config(tmp_path / "cls")["auto_mapping"] == {
        "base_model_class": "BertForSequenceClassification",
        "parent_library": "transformers.models.bert.modeling_bert"}
    theirs = peft.AutoPeftModel.from_pretrained(str(tmp_path / "cls"))
    assert type(theirs.base_model.model).__name__ == "BertForSequenceClassification"
    _, plain = trained  # a plain nn.Module: no task, its class as peft names it
    assert config(plain)["task_type"] is None and config(plain)["auto_mapping"]["base_model_class"] == "Toy"


def test_an_adapter_of_a_shallower_model_loads_with_a_warning_naming_the_uncovered_modules(tmp_path):
    """An adapter saved for a 2-layer Llama loaded into a 3-layer one: its config selects layer 2's q_proj / v_proj,
    which the file has no weights for. peft warns ("Found missing adapter keys"); qkernels loaded it silently. Now a
    UserWarning names them; they get no adapter (peft's get B = 0: the same outputs)."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(layers):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                            num_key_value_heads=2, num_hidden_layers=layers))

    model = apply_qlora(llama(2), ["q_proj", "v_proj"], r=4, init_lora_weights=False)
    adapters.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model it was saved for: no warning
        adapters.load_adapter(apply_qlora(llama(2), ["q_proj", "v_proj"], r=4), tmp_path, replace=True)
    deeper = apply_qlora(llama(3), ["q_proj", "v_proj"], r=4)
    with pytest.warns(UserWarning, match=r"selects 2 LoRA module\(s\) of LlamaForCausalLM that the file holds no "
                                         r"weights for \(e\.g\. \['model\.layers\.2\.self_attn\.q_proj'"):
        adapters.load_adapter(deeper, tmp_path, replace=True)
    layers = deeper.model.layers
    assert "default" not in layers[2].self_attn.q_proj.lora_A
    assert torch.equal(layers[1].self_attn.v_proj.lora_B["default"].weight,
                       model.model.layers[1].self_attn.v_proj.lora_B["default"].weight)


def test_config_that_does_not_select_a_saved_module_is_refused(trained):
    """load_adapter honours the config's layer fields: weights for a module the config leaves out are an error."""
    _, path = trained
    _rewrite(path, edit_config=lambda c: c.update(layers_to_transform=[0], layers_pattern="layers"))
    target = qk_toy()
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"module 'layers\.1\.\w+' is not selected by the adapter's config.*"
                                         r"'layers_to_transform': \[0\]"):
        adapters.load_adapter(target, path, adapter_name="new")
    _assert_unchanged(target, before, ["default"])
    _rewrite(path, edit_config=lambda c: c.update(layers_pattern=3))
    with pytest.raises(ValueError, match="adapter_config.json: layers_pattern must be a str or a list of str"):
        adapters.load_adapter(target, path, adapter_name="new")


# ---------------------------------------------------------------------------------------------- modules_to_save
class HeadToy(Toy):
    """The toy with a classification head ``score`` and a final norm: the modules to save."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(IN)
        self.score = nn.Linear(IN, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.norm(super().forward(x)))


def head_toy(seed: int = 0) -> HeadToy:
    torch.manual_seed(seed)
    return HeadToy()


def perturb(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def qk_head(**kw) -> HeadToy:
    """The head toy with its blocks' Linear layers quantized (the head stays a dense nn.Linear)."""
    return apply_qlora(head_toy(), SHORT, r=4, lora_alpha=8, compute_dtype=torch.float32, **kw)


def test_modules_to_save_round_trip_and_peft_reads_them(tmp_path, x):
    from qkernels.modules_to_save import ModulesToSaveWrapper

    # all-linear: as in peft, a module to save is no LoRA target (score stays an nn.Linear inside the wrapper)
    model = apply_qlora(head_toy(), "all-linear", r=4, lora_alpha=8, compute_dtype=torch.float32,
                        modules_to_save=["score", "norm"])
    assert isinstance(model.score, ModulesToSaveWrapper) and isinstance(model.score.original_module, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"score.modules_to_save.default.weight", "score.modules_to_save.default.bias",
            "norm.modules_to_save.default.weight"} <= trainable
    assert not any("original_module" in n for n in trainable) and model.score.weight is \
        model.score.modules_to_save["default"].weight  # attributes read through, as peft's wrapper
    randomize(model, "default", seed=5)
    perturb(model.score.modules_to_save["default"], 6)
    perturb(model.norm.modules_to_save["default"], 7)
    adapters.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["norm", "score"] and sorted(cfg["target_modules"]) == sorted(SHORT)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k for k in sd if "lora_" not in k} == {"base_model.model.score.weight", "base_model.model.score.bias",
                                                   "base_model.model.norm.weight", "base_model.model.norm.bias"}
    assert torch.equal(sd["base_model.model.score.weight"], model.score.modules_to_save["default"].weight)
    theirs = peft.PeftModel.from_pretrained(bnb_base(model, head_toy), str(tmp_path))
    assert isinstance(theirs.base_model.model.score, peft.utils.other.ModulesToSaveWrapper)
    ref = reference64(model, tmp_path, head_toy)
    assert_matches(run(model, x), run(theirs, x), run(ref, x.double()))
    with adapters.disable_adapters(model), theirs.disable_adapter(), ref.disable_adapter():  # the original head
        assert_matches(run(model, x), run(theirs, x), run(ref, x.double()))
    # round trip: a model quantized the same way without modules to save gets them wrapped by load_adapter
    fresh = qk_head()
    randomize(fresh, "default", seed=99)
    adapters.load_adapter(fresh, tmp_path, replace=True)
    assert isinstance(fresh.score, ModulesToSaveWrapper) and fresh.score.active_adapter == "default"
    assert torch.equal(run(fresh, x), run(model, x))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == trainable


def test_peft_saved_modules_to_save_load_here(tmp_path, x):
    ours = qk_head()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up"], modules_to_save=["score"],
                          layers_to_transform=[1], layers_pattern="layers")
    theirs = peft.get_peft_model(bnb_base(ours, head_toy), cfg)
    randomize(theirs, "default", seed=8)
    perturb(theirs.base_model.model.score.modules_to_save["default"], 9)
    theirs.save_pretrained(str(tmp_path))
    loaded = adapters.load_adapter(ours, tmp_path, adapter_name="peft")
    assert sorted(loaded) == ["layers.1.q_proj", "layers.1.up"]
    assert ours.score.active_adapter == "peft"
    theirs.eval()
    assert_matches(run(ours, x), run(theirs, x), run(reference64(ours, tmp_path, head_toy), x.double()))


def test_modules_to_save_with_several_adapters_behave_as_peft(tmp_path, x):
    """default and c have their own score copy, b has none: set_adapter / disable / delete switch the head as
    peft's ModulesToSaveWrapper does (b, and no adapter, run the original head)."""
    ours = qk_head(modules_to_save=["score"])
    adapters.add_adapter(ours, "b", r=2, lora_alpha=4, target_modules=["q_proj"])
    adapters.add_adapter(ours, "c", r=4, lora_alpha=8, target_modules=["up", "down"], modules_to_save=["score"])
    assert ours.score.active_adapter == "default" and list(ours.score.modules_to_save) == ["default", "c"]
    for name, seed in (("default", 21), ("b", 22), ("c", 23)):
        randomize(ours, name, seed)
        if name != "b":
            perturb(ours.score.modules_to_save[name], seed + 10)
        adapters.save_adapter(ours, tmp_path / name, adapter_name=name)
    theirs = peft.PeftModel.from_pretrained(bnb_base(ours, head_toy), str(tmp_path / "default"), is_trainable=True)
    for name in ("b", "c"):
        theirs.load_adapter(str(tmp_path / name), adapter_name=name, is_trainable=True)
    ref = {n: reference64(ours, tmp_path / n, head_toy) for n in ("default", "b", "c")}

    def check(active: str) -> None:
        assert_matches(run(ours, x), run(theirs, x), run(ref[active], x.double()))
        mine = {n for n, p in ours.named_parameters() if p.requires_grad}
        peft_trainable = {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
        assert mine == peft_trainable, (active, sorted(mine ^ peft_trainable))

    for name in ("c", "b", "default", "c"):
        adapters.set_adapter(ours, name)
        theirs.set_adapter(name)
        check(name)
        assert ours.score.active_adapter == (None if name == "b" else name)
    with adapters.disable_adapters(ours), theirs.disable_adapter(), ref["b"].disable_adapter():
        assert_matches(run(ours, x), run(theirs, x), run(ref["b"], x.double()))
    adapters.delete_adapter(ours, "c")
    theirs.delete_adapter("c")
    assert list(ours.score.modules_to_save) == ["default"] and ours.score.active_adapter is None
    # peft: each layer that ran c now runs its alphabetically first adapter (b where it has one, else default); the
    # model's active adapter is the first layer's (b), which has no score copy: the original head runs
    assert theirs.active_adapter == "b" and theirs.base_model.model.score.active_adapters == []
    for name, m in ours.named_modules():
        if isinstance(m, QLoRALinear):
            assert [m.active_adapter] == theirs.base_model.model.get_submodule(name).active_adapters, name
    # the float64 reference in the same mixed state: peft on the dense base, the same loads, set and delete
    ref_all = reference64(ours, tmp_path / "default", head_toy)
    for name in ("b", "c"):
        ref_all.load_adapter(str(tmp_path / name), adapter_name=name)
    ref_all.set_adapter("c")
    ref_all.delete_adapter("c")
    assert_matches(run(ours, x), run(theirs, x), run(ref_all, x.double()))
    with pytest.raises(ValueError, match="modules_to_save entry 'scor3' matches no module"):
        adapters.add_adapter(ours, "d", target_modules=["q_proj"], modules_to_save=["scor3"])
    assert "d" not in adapters.adapter_names(ours), "validated before any change"


def test_deleting_an_adapter_leaves_the_modules_to_save_on_peft_s_choice(tmp_path, x):
    """peft hands the modules to save the first LoRA layer's active adapter after a deletion. That layer is not
    simply the first QLoRALinear: (1) a 4-bit layer a replacing load left bare holds no LoRA (peft has a plain
    Linear4bit there; found by tests/fuzz_vs_peft.py seed 14 case 9, where the head fell back to its original module
    and froze the active copy); (2) a LoRA layer that lacks the active adapter keeps that name as its active one in
    peft (ours runs none); (3) so does one the deletion emptied."""
    src = qk_head(modules_to_save=["score"])
    adapters.add_adapter(src, "b", r=2, lora_alpha=4, target_modules=["up"], modules_to_save=["score"])
    adapters.add_adapter(src, "c", r=2, lora_alpha=4, target_modules=["q_proj"])
    for name, seed in (("default", 41), ("b", 42), ("c", 43)):
        randomize(src, name, seed)
        if name != "c":
            perturb(src.score.modules_to_save[name], seed + 10)
        adapters.save_adapter(src, tmp_path / name, adapter_name=name)
    # "default" as a file that adapts only up / down: the q_proj / v_proj layers apply_qlora made are left bare
    _rewrite(tmp_path / "default", edit_config=lambda c: c.update(target_modules=["up", "down"]),
             edit_tensors=lambda sd: [sd.pop(k) for k in list(sd) if "q_proj" in k or "v_proj" in k])

    def case(others: list[str], active: str, gone: str, first: str) -> None:
        ours = qk_head(modules_to_save=["score"])
        adapters.load_adapter(ours, tmp_path / "default", replace=True)
        theirs = peft.PeftModel.from_pretrained(bnb_base(ours, head_toy), str(tmp_path / "default"),
                                                is_trainable=True)
        ref = reference64(ours, tmp_path / "default", head_toy)
        for name in others:
            adapters.load_adapter(ours, tmp_path / name, adapter_name=name, set_active=False)
            theirs.load_adapter(str(tmp_path / name), adapter_name=name, is_trainable=True)
            ref.load_adapter(str(tmp_path / name), adapter_name=name)
        first_lora = next(n for n, m in ours.named_modules() if isinstance(m, QLoRALinear) and len(m.lora_A))
        assert first_lora == first and not len(ours.layers[0].v_proj.lora_A)
        for m in (theirs, ref):
            m.set_adapter(active)
        adapters.set_adapter(ours, active)
        adapters.delete_adapter(ours, gone)
        theirs.delete_adapter(gone)
        ref.delete_adapter(gone)
        assert theirs.active_adapter == active and theirs.base_model.model.score.active_adapters == [active]
        assert ours.score.active_adapter == active
        assert_matches(run(ours, x), run(theirs, x), run(ref, x.double()))
        mine = {n for n, p in ours.named_parameters() if p.requires_grad}
        peft_trainable = {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
        assert f"score.modules_to_save.{active}.weight" in mine
        assert mine == peft_trainable, sorted(mine ^ peft_trainable)

    case(["b"], active="default", gone="b", first="layers.0.up")  # (1): layers.0.q_proj comes first, bare
    case(["b", "c"], active="default", gone="b", first="layers.0.q_proj")  # (2): q_proj holds c only
    case(["b", "c"], active="b", gone="c", first="layers.0.q_proj")  # (3): q_proj emptied, set to b


def test_bad_modules_to_save_in_a_file_load_nothing(tmp_path):
    model = qk_head(modules_to_save=["score"])
    adapters.save_adapter(model, tmp_path)
    _rewrite(tmp_path, edit_tensors=lambda sd: sd.pop("base_model.model.score.bias"))
    target = qk_head()
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"module to save 'score'.*missing \['bias'\]"):
        adapters.load_adapter(target, tmp_path, adapter_name="new")
    _rewrite(tmp_path, edit_tensors=lambda sd: sd.update({"base_model.model.score.bias": torch.zeros(4)}))
    with pytest.raises(ValueError, match=r"base_model\.model\.score\.bias': \(4,\).*has \(5,\)"):
        adapters.load_adapter(target, tmp_path, adapter_name="new")
    _rewrite(tmp_path, edit_config=lambda c: c.update(modules_to_save=None))
    with pytest.raises(ValueError, match=r"'base_model\.model\.score\.(weight|bias)' is not a LoRA weight.*"
                                         r"modules_to_save"):
        adapters.load_adapter(target, tmp_path, adapter_name="new")
    _assert_unchanged(target, before, ["default"])
    assert isinstance(target.score, nn.Linear)


# ---------------------------------------------------------------------------------------------- GPT-2 (Conv1D)
def _gpt2_qk(targets="all-linear") -> nn.Module:
    from .test_model import tiny_gpt2

    model = apply_qlora(tiny_gpt2(), targets, r=4, lora_alpha=8, compute_dtype=torch.float32)
    randomize(model, "default", seed=2)
    return model


class _Embeds(nn.Module):
    """Calls an LM on float inputs_embeds, so ``run`` can make the input require grad (bitsandbytes' exact path)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm.config.is_encoder_decoder:  # the decoder's own layers see a grad-requiring input too
            return self.lm(inputs_embeds=x, decoder_inputs_embeds=x).logits
        return self.lm(inputs_embeds=x).logits


@pytest.fixture
def emb() -> torch.Tensor:
    return torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("base_kind", ["bnb4bit", "dense-fp32"])
def test_gpt2_adapter_loads_in_peft_on_conv1d_and_4bit_bases(tmp_path, emb, base_kind):
    """Our adapter on GPT-2's Conv1D layers: the config says fan_in_fan_out (as peft writes for them) and names
    attn.c_proj apart from mlp.c_proj; peft reads it on a dense GPT-2 (Conv1D) and a bitsandbytes one (Linear4bit)."""
    from .test_model import tiny_gpt2

    ours = _gpt2_qk()
    adapters.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    base = bnb_base(ours, tiny_gpt2) if base_kind == "bnb4bit" else dense_base(ours, torch.float32, tiny_gpt2)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path))
    ref = reference64(ours, tmp_path, tiny_gpt2)
    assert_matches(run(_Embeds(ours), emb), run(_Embeds(theirs), emb), run(_Embeds(ref), emb.double()))


def test_gpt2_adapter_on_some_c_proj_layers_names_only_those(tmp_path):
    """'c_proj' is both attn.c_proj and mlp.c_proj in GPT-2: a config saying target_modules=['c_proj'] for an adapter
    on attn.c_proj only would make peft add LoRA layers to mlp.c_proj too."""
    from .test_model import tiny_gpt2

    ours = _gpt2_qk(["attn.c_proj"])
    adapters.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path))
    assert {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)} == {f"transformer.h.{i}.attn.c_proj" for i in range(2)}


def test_peft_adapter_on_dense_gpt2_loads_here(tmp_path, emb):
    """peft sets fan_in_fan_out=True for Conv1D targets; A [r, in], B [out, r] and the forward do not depend on it."""
    from .test_model import tiny_gpt2

    ours = _gpt2_qk()
    theirs = peft.get_peft_model(dense_base(ours, torch.float32, tiny_gpt2),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    randomize(theirs, "default", seed=5)
    theirs.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    adapters.load_adapter(ours, tmp_path, adapter_name="peft")
    assert ours.transformer.h[1].mlp.c_fc.lora_A["peft"].weight.shape == (4, 64)
    ref = reference64(ours, tmp_path, tiny_gpt2)
    assert_matches(run(_Embeds(ours), emb), run(_Embeds(theirs), emb), run(_Embeds(ref), emb.double()))


# ---------------------------------------------------------------------------------------------- other families
FAMILIES = ["opt", "mistral", "qwen2", "phi3", "gemma", "t5", "bert64-cls"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_adapters_both_ways_with_peft_on_a_4bit_base(tmp_path, emb, kind):
    """Per model family (fused qkv_proj / gate_up_proj in Phi-3, an encoder-decoder in T5, a 3-way head in BERT):
    our all-linear adapter in peft on a bitsandbytes base holding our packed weights, and a peft adapter (other rank,
    a subset of layers) here, give the same outputs (``assert_matches``)."""
    import functools

    from .test_model import tiny_model

    make = functools.partial(tiny_model, kind)
    ours = apply_qlora(make(), "all-linear", r=4, lora_alpha=8, compute_dtype=torch.float32)  # T5's wo: a float base
    randomize(ours, "default", seed=2)
    adapters.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(bnb_base(ours, make), str(tmp_path / "ours"))
    ref = reference64(ours, tmp_path / "ours", make)
    assert_matches(run(_Embeds(ours), emb), run(_Embeds(theirs), emb), run(_Embeds(ref), emb.double()))

    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if isinstance(m, QLoRALinear)})
    cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=leaves[::2])
    theirs = peft.get_peft_model(bnb_base(ours, make), cfg)
    randomize(theirs, "default", seed=4)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = adapters.load_adapter(ours, tmp_path / "theirs", adapter_name="peft")
    assert set(loaded) == {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                           if isinstance(m, peft.tuners.lora.LoraLayer)}
    ref = reference64(ours, tmp_path / "theirs", make)
    assert_matches(run(_Embeds(ours), emb), run(_Embeds(theirs), emb), run(_Embeds(ref), emb.double()))


def test_peft_t5_adapter_with_lora_on_wo_loads_with_peft_outputs(tmp_path, emb):
    """peft's all-linear on a 4-bit T5 puts LoRA on wo, which transformers keeps float. It loads here (apply_qlora
    gave wo a float base) with peft's outputs on the bitsandbytes base; saved again, it is the file peft wrote (same
    keys, tensors, and the config's target modules)."""
    from .test_model import tiny_model

    ours = apply_qlora(tiny_model("t5"), "all-linear", r=2, compute_dtype=torch.float32)
    base = bnb_base(ours, lambda: tiny_model("t5"))
    assert type(base.encoder.block[0].layer[1].DenseReluDense.wo) is nn.Linear  # float, as transformers keeps it
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=6, target_modules="all-linear"))
    randomize(theirs, "default", seed=3)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = adapters.load_adapter(ours, tmp_path / "theirs", adapter_name="peft")
    assert "encoder.block.0.layer.1.DenseReluDense.wo" in loaded
    ref = reference64(ours, tmp_path / "theirs", lambda: tiny_model("t5"))
    assert_matches(run(_Embeds(ours), emb), run(_Embeds(theirs), emb), run(_Embeds(ref), emb.double()))

    adapters.save_adapter(ours, tmp_path / "again", adapter_name="peft")
    want, got = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "theirs", tmp_path / "again"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    cfg_want, cfg_got = (json.loads((d / "adapter_config.json").read_text()) for d in (tmp_path / "theirs",
                                                                                     tmp_path / "again"))
    assert set(cfg_got["target_modules"]) == set(cfg_want["target_modules"]) and "wo" in cfg_got["target_modules"]
    # and peft reads our file to the same model
    again = peft.PeftModel.from_pretrained(bnb_base(ours, lambda: tiny_model("t5")), str(tmp_path / "again"))
    assert torch.equal(run(_Embeds(again), emb), run(_Embeds(theirs), emb))


def test_peft_t5_adapter_on_wo_without_a_wo_target_loads_with_peft_outputs(tmp_path, emb):
    """wo left out of apply_qlora (exclude_modules) is a plain float Linear: an adapter with LoRA there gives it a LoRA
    layer on its float weight at load, as peft's from_pretrained does, with peft's outputs."""
    from .test_model import tiny_model

    ours = apply_qlora(tiny_model("t5"), "all-linear", r=2, exclude_modules=["wo"], compute_dtype=torch.float32)
    theirs = peft.get_peft_model(bnb_base(ours, lambda: tiny_model("t5")),
                                 peft.LoraConfig(r=2, lora_alpha=6, target_modules="all-linear"))
    randomize(theirs, "default", seed=3)
    theirs.save_pretrained(str(tmp_path))
    loaded = adapters.load_adapter(ours, tmp_path, adapter_name="peft")
    wo = ours.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo")
    assert "encoder.block.0.layer.1.DenseReluDense.wo" in loaded and isinstance(wo, QLoRALinear) and not wo.quantized
    ref = reference64(ours, tmp_path, lambda: tiny_model("t5"))
    assert_matches(run(_Embeds(ours), emb), run(_Embeds(theirs), emb), run(_Embeds(ref), emb.double()))


class _OneLayer(nn.Module):
    """One Linear: its input and its output gradient are exact, so the LoRA gradients show the layer's own rounding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(IN, HID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("compute", [torch.float16, torch.bfloat16])
def test_half_compute_dtype_keeps_the_lora_term_and_its_gradients_in_float32_as_peft(tmp_path, x, compute):
    """Bug (tests/fuzz_vs_peft.py, flow c: a float32 BART with compute_dtype float16): with a compute dtype narrower
    than the input's, the fused matmul ran the LoRA term on the input cast to it, so the LoRA gradients carried its
    rounding of x and of the output gradient; peft's bitsandbytes layer computes only the base in the compute dtype and
    the LoRA term on x in float32 (on BART, A and B gradients 4x (median) to 60x peft's error against float64; on
    this one layer, whose input and output gradient are exact, the gradients of A and B were off by the compute
    dtype's rounding). Now the output (the base's rounding, in both) and every gradient are within twice peft's
    error plus 8 float32 ulps at the tensor's scale (a compute-dtype ulp would hide the bug: it is that rounding)."""
    ours = apply_qlora(_OneLayer(), "all-linear", r=4, lora_alpha=8, compute_dtype=compute, lora_dropout=0.2)
    randomize(ours, "default", seed=1)
    adapters.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(bnb_base(ours, _OneLayer), str(tmp_path), is_trainable=True)
    for m in theirs.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = compute
            m.support_avx512bf16_for_cpu = False  # its exact path (DESIGN §5)
    ref = peft.PeftModel.from_pretrained(dense_base(ours, torch.float64, _OneLayer), str(tmp_path),
                                         is_trainable=True).double()
    dy = torch.randn(*x.shape[:-1], HID, generator=torch.Generator().manual_seed(9))
    results = []
    for model, inp in ((ours, x), (theirs, x), (ref, x.double())):
        model.train()  # the same dropout mask, drawn from one seed
        torch.manual_seed(5)
        xi = inp.detach().clone().requires_grad_(True)
        y = model(xi)
        y.backward(dy.to(y.dtype))
        core = model.base_model.model if isinstance(model, peft.PeftModel) else model
        grads = {n: p.grad for n, p in core.named_parameters() if p.requires_grad}
        results.append((y.detach(), {"x": xi.grad, **grads}))
    (y_o, g_o), (y_t, g_t), (y_r, g_r) = results
    assert y_o.dtype == y_t.dtype == torch.float32 and g_o.keys() == g_t.keys() == g_r.keys() and len(g_r) == 3
    eps = torch.finfo(torch.float32).eps
    for name, o, t, r in [("y", y_o, y_t, y_r)] + [(n, g_o[n], g_t[n], g_r[n]) for n in g_r]:
        e_o, e_t = (o.double() - r).abs().max(), (t.double() - r).abs().max()
        assert e_o <= 2 * e_t + 8 * eps * r.abs().max(), f"{name}: ours {e_o:.3g}, peft {e_t:.3g}"


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_targets_no_short_name_selects_are_saved_as_full_names_which_peft_loads_exactly(tmp_path, arch):
    """Layer 0's q_proj and layer 1's up_proj: neither short names nor layers_to_transform select exactly these, so the
    config lists their full names, not a regex: peft 0.21 turns a regex on a transformers 5 mixture of experts into the
    short names it matches (every layer's; fuzz_vs_peft seed 41). An adapted ``lm_head`` on a float base is named
    ``"lm_head"``, so that peft's save_embedding_layers writes its base weight, as ours does: peft loading the file and
    saving it again writes the same tensors."""
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False)
    make = {"llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)),
            "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
                **kw, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48))}[arch]
    up = "model.layers.1.mlp.up_proj" if arch == "llama" else "model.layers.1.self_attn.v_proj"
    for names, float_head in ((["model.layers.0.self_attn.q_proj", up], False),
                              (["lm_head", "model.layers.0.self_attn.q_proj", up], True)):
        torch.manual_seed(0)
        model = apply_qlora(make(), names, r=4, lora_alpha=8, compute_dtype=torch.float32,
                            keep_float_modules=["lm_head"] if float_head else None)
        randomize(model, "default", seed=3)
        path = tmp_path / f"{arch}{len(names)}"
        adapters.save_adapter(model, path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["target_modules"] == sorted(names) and cfg["layers_to_transform"] is None
        ours = load_file(str(path / "adapter_model.safetensors"))
        assert ("base_model.model.lm_head.base_layer.weight" in ours) == float_head
        torch.manual_seed(0)
        theirs = peft.PeftModel.from_pretrained(make(), str(path))
        wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
        assert wrapped == set(names)
        theirs.save_pretrained(str(tmp_path / "again"))
        again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
        assert again.keys() == ours.keys()
        for k, v in ours.items():
            assert torch.equal(again[k], v), k
