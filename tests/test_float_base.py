"""LoRA on a float base (``QLoRALinear(quantize=False)``): where peft on a model loaded in 4 bits by bitsandbytes puts
LoRA on a Linear that bitsandbytes left float (T5's ``wo`` from ``_keep_in_fp32_modules``, ``llm_int8_skip_modules``,
an explicitly targeted ``lm_head``), qkernels keeps that layer float too, so peft's adapters load as they are and give
peft's outputs. Outputs are compared with ``assert_matches`` (tests/test_adapters.py: ours and peft's differ from a
float64 run by float32 rounding only); where both compute the very same float32 operations, bit for bit. Tiny models
built from configs: nothing is downloaded."""

from __future__ import annotations

import copy
import functools
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import qkernels
from qkernels import adapters, apply_qlora, merge_and_unload, merge_into_4bit
from qkernels.integrations import _check_trl_model
from qkernels.nn import QLoRALinear

from .test_adapters import _Embeds, assert_matches, bnb_base, randomize, reference64, run
from .test_model import tiny_model
from .test_training import LLAMA_TARGETS, tiny_llama

peft = pytest.importorskip("peft", reason="peft is the interop target of these tests")
transformers = pytest.importorskip("transformers", reason="the tiny models are transformers models")

make_t5 = functools.partial(tiny_model, "t5")
WO = "encoder.block.0.layer.1.DenseReluDense.wo"


def _bnb_config(**kw) -> transformers.BitsAndBytesConfig:
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32, **kw)


def _load_4bit(cls: type, make, d, **bnb_kw) -> nn.Module:
    """``make()`` saved to ``d`` once, then loaded by transformers in 4 bits (bitsandbytes on the CPU)."""
    if not d.exists():
        make().save_pretrained(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(d, quantization_config=_bnb_config(**bnb_kw), dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------- the layer
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _embeds_logits(model: nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits from ``ids``' embeddings in ``dtype``, fed as a grad-requiring ``inputs_embeds`` (bitsandbytes' exact
    CPU path needs an input that requires grad, as in test_adapters' ``run``)."""
    e = model.get_input_embeddings()(ids).to(dtype).detach().requires_grad_(True)
    with torch.enable_grad():
        return model(inputs_embeds=e).logits.detach()


def _same_adapter_files(want_dir, got_dir) -> dict[str, torch.Tensor]:
    """Assert two adapter directories hold the same tensors under the same keys; return the first's."""
    want, got = (load_file(str(d / "adapter_model.safetensors")) for d in (want_dir, got_dir))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    return want


def _ours_and_peft(net: _Net) -> tuple[QLoRALinear, nn.Module]:
    """A float-base QLoRALinear on a copy of ``net.fc`` and peft's LoRA on a copy of ``net``, with the same (random,
    nonzero) A and B."""
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc"]))
    randomize(theirs, "default", seed=1)
    ours = QLoRALinear.from_linear(copy.deepcopy(net.fc), quantize=False, r=4, lora_alpha=8)
    lora = theirs.base_model.model.fc
    ours.set_lora_weight("default", "lora_A", lora.lora_A["default"].weight)
    ours.set_lora_weight("default", "lora_B", lora.lora_B["default"].weight)
    return ours, theirs


def _assert_same_forward_and_grads(ours, theirs, lora, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Our layer and peft's (``theirs``, its LoRA layer ``lora``) on one input: the same output bits in ``dtype``, and
    the same LoRA gradients bit for bit (the same torch ops in the same order). Returns ``(x, our output)``."""
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == dtype and torch.equal(y_ours, y_theirs)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for which in ("lora_A", "lora_B"):
        assert torch.equal(getattr(ours, which)["default"].weight.grad, getattr(lora, which)["default"].weight.grad)
    return x, y_ours.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_is_peft_lora_linear_on_a_plain_linear(dtype):
    """Forward, gradients, state-dict keys and the merged weight are peft's ``lora.Linear`` on the same nn.Linear, bit
    for bit: the same float operations in the same order (base in the weight's dtype, LoRA in float32)."""
    torch.manual_seed(0)
    net = _Net().to(dtype)
    ours, theirs = _ours_and_peft(net)
    lora = theirs.base_model.model.fc
    assert not ours.quantized and ours.weight.dtype == dtype and not ours.weight.requires_grad
    _assert_same_forward_and_grads(ours, theirs, lora, dtype)
    assert set(ours.state_dict()) == {"weight", "bias", "lora_A.default.weight", "lora_B.default.weight"}
    assert torch.equal(ours.state_dict()["weight"], net.fc.weight)
    merged = merge_and_unload(nn.Sequential(ours))[0]
    assert type(merged) is nn.Linear and merged.weight.dtype == dtype
    assert torch.equal(merged.weight, theirs.merge_and_unload().fc.weight)


def test_layer_moves_loads_and_refuses_like_a_linear():
    """``.half()`` converts the float weight (as nn.Linear's; ``float_dtype`` follows), a meta layer loads its float
    weight with ``assign=True``, and a 4-bit checkpoint, a wrong shape or LoftQ are refused by name."""
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(nn.Linear(64, 32), quantize=False, r=4)
    randomize(nn.Sequential(layer), "default", seed=3)
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    meta = QLoRALinear(64, 32, quantize=False, r=4, device="meta")
    assert meta.weight.is_meta and "weight" in meta._unloaded
    meta.load_state_dict(sd, assign=True)
    assert not meta._unloaded and torch.equal(meta(x), layer(x))
    half = copy.deepcopy(layer).half()
    assert half.weight.dtype == torch.float16 and half.float_dtype == torch.float16
    assert half(x.half()).dtype == torch.float16
    packed = QLoRALinear(64, 32, r=4).state_dict()
    with pytest.raises(ValueError, match=r"4-bit quant state.*keeps its base weight in float"):
        layer.load_state_dict(packed)
    with pytest.raises(ValueError, match=r"size mismatch for 'weight'"):
        layer.load_state_dict({**sd, "weight": torch.zeros(32, 63)})
    assert torch.equal(layer.state_dict()["weight"], sd["weight"])
    with pytest.raises(ValueError, match=r"loftq.*quantize=False"):
        QLoRALinear.from_linear(nn.Linear(64, 32), quantize=False, init_lora_weights="loftq")
    with pytest.raises(ValueError, match=r"quantize must be a bool"):
        QLoRALinear(64, 32, quantize="no")
    with pytest.raises(ValueError, match=r"compute_dtype=torch.bfloat16 .*quantize=False.*compute_dtype=None"):
        QLoRALinear.from_linear(nn.Linear(64, 32), quantize=False, compute_dtype="bfloat16")


# ---------------------------------------------------------------------------------------------- T5, all-linear
def _train(model: nn.Module, steps: int = 3) -> list[float]:
    """A few AdamW steps on one fixed batch (eval mode: no T5 dropout, so the loss falls step by step)."""
    ids = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("base", ["float", "bnb-loaded"])
def test_t5_all_linear_trains_saves_loads_and_merges_as_peft(tmp_path, base):
    """T5 with "all-linear" (wo included, as peft's all-linear on a 4-bit T5): loaded in float (qkernels quantizes)
    or in 4 bits by transformers (wo stays float there): the LoRA on wo trains; the saved adapter gives peft's outputs
    on the bitsandbytes base, reloads here bit for bit, and merge_and_unload keeps the outputs."""
    float_base = base == "float"
    load = functools.partial(_load_4bit, transformers.T5ForConditionalGeneration, make_t5, tmp_path / "t5")
    model = make_t5() if float_base else load()
    if not float_base:
        assert type(model.get_submodule(WO)) is nn.Linear and model.get_submodule(WO).weight.dtype == torch.float32
    torch.manual_seed(1)
    apply_qlora(model, "all-linear", r=4, lora_alpha=8, compute_dtype=torch.float32)
    wo = model.get_submodule(WO)
    assert isinstance(wo, QLoRALinear) and not wo.quantized
    assert model.get_submodule("encoder.block.0.layer.0.SelfAttention.q").quantized
    losses = _train(model)
    assert all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses
    assert wo.lora_B["default"].weight.abs().max() > 0  # B starts at 0: it trained
    adapters.save_adapter(model, tmp_path / "ad")
    assert "wo" in json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["target_modules"]

    emb = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(7))
    theirs = peft.PeftModel.from_pretrained(bnb_base(model, make_t5) if float_base else load(), str(tmp_path / "ad"))
    ref = reference64(model, tmp_path / "ad", make_t5)
    ours_out = run(_Embeds(model), emb)
    assert_matches(ours_out, run(_Embeds(theirs), emb), run(_Embeds(ref), emb.double()))

    fresh = apply_qlora(make_t5() if float_base else load(), "all-linear", r=4, lora_alpha=8,
                        compute_dtype=torch.float32)
    adapters.load_adapter(fresh, tmp_path / "ad", replace=True)
    assert torch.equal(run(_Embeds(fresh), emb), ours_out)

    merged = merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, QLoRALinear) for m in merged.modules())
    assert type(merged.get_submodule(WO)) is nn.Linear and merged.get_submodule(WO).weight.dtype == torch.float32
    assert_matches(run(_Embeds(merged), emb), ours_out, run(_Embeds(ref), emb.double()))


def test_t5_float_base_on_the_meta_device_loads_a_checkpoint(tmp_path):
    """A T5 built on the meta device, after apply_qlora("all-linear"): wo is a meta float base; loading the state dict
    of the same model built for real (``assign=True``) gives its logits bit for bit."""
    real = apply_qlora(make_t5(), "all-linear", r=4)
    randomize(real, "default", seed=5)
    with torch.device("meta"):
        meta = transformers.T5ForConditionalGeneration(make_t5().config)
    apply_qlora(meta, "all-linear", r=4)
    assert meta.get_submodule(WO).weight.is_meta and not meta.get_submodule(WO).quantized
    meta.load_state_dict(real.state_dict(), assign=True)
    meta.eval()
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(meta(input_ids=ids, decoder_input_ids=ids).logits,
                           real(input_ids=ids, decoder_input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------- lm_head, skip modules
def test_float_linears_of_a_4bit_llama_keep_a_float_base_and_give_peft_outputs(tmp_path):
    """A Llama loaded in 4 bits with ``llm_int8_skip_modules=["down_proj", "lm_head"]``: peft puts LoRA on those float
    layers as they are. apply_qlora keeps them float (it quantized them before: outputs off by the quantization error),
    and a peft adapter on them loads with peft's outputs. trl's fused head would skip lm_head's LoRA: refused."""
    load = functools.partial(_load_4bit, transformers.LlamaForCausalLM, tiny_llama, tmp_path / "llama",
                             llm_int8_skip_modules=["down_proj", "lm_head"])
    targets = [*LLAMA_TARGETS, "lm_head"]
    theirs = peft.get_peft_model(load(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize(theirs, "default", seed=6)
    theirs.save_pretrained(str(tmp_path / "ad"))
    base = load()
    head_w, down_w = base.lm_head.weight, base.model.layers[0].mlp.down_proj.weight
    assert type(base.model.layers[0].mlp.down_proj) is nn.Linear
    ours = apply_qlora(base, targets, r=4, lora_alpha=8)
    for name, w in (("lm_head", head_w), ("model.layers.0.mlp.down_proj", down_w)):
        layer = ours.get_submodule(name)
        assert isinstance(layer, QLoRALinear) and not layer.quantized and layer.weight is w
    assert ours.model.layers[0].mlp.up_proj.quantized
    adapters.load_adapter(ours, tmp_path / "ad", replace=True)
    ref = reference64(ours, tmp_path / "ad", tiny_llama)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))

    assert_matches(*(_embeds_logits(m, ids, dt) for m, dt in
                     ((ours, torch.float32), (theirs, torch.float32), (ref, torch.float64))))
    # peft saved lm_head's base weight with the adapter (save_embedding_layers): so does save_adapter, and peft reads it
    adapters.save_adapter(ours, tmp_path / "again")
    assert "base_model.model.lm_head.base_layer.weight" in _same_adapter_files(tmp_path / "ad", tmp_path / "again")
    again = peft.PeftModel.from_pretrained(load(), str(tmp_path / "again"))
    assert torch.equal(_embeds_logits(again, ids, torch.float32), _embeds_logits(theirs, ids, torch.float32))
    with pytest.raises(ValueError, match=r"output embedding 'lm_head'.*float base weight without its LoRA term"):
        _check_trl_model(ours, None)
    q = apply_qlora(tiny_llama(), targets, r=4)  # a float model: lm_head quantized, the packed-bytes reason
    with pytest.raises(ValueError, match=r"output embedding 'lm_head'.*packed 4-bit bytes"):
        _check_trl_model(q, None)


# ---------------------------------------------------------------------------------------------- keep_float_modules
def test_keep_float_modules_opts_targets_out_of_quantization():
    """``keep_float_modules``: those targets get a float base (exactly nn.Linear's output while B = 0), the others are
    quantized; merge_into_4bit leaves a float base float (its merge is exact); bad entries named, nothing changed."""
    model, dense = tiny_llama(), tiny_llama()
    apply_qlora(model, LLAMA_TARGETS, r=4, keep_float_modules=["down_proj"])
    down = model.model.layers[1].mlp.down_proj
    assert not down.quantized and model.model.layers[1].mlp.up_proj.quantized
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(down(x), dense.model.layers[1].mlp.down_proj(x))
    randomize(model, "default", seed=2)
    want = down.weight.detach().float() + down.lora_delta()
    with pytest.warns(UserWarning, match="requantized"):
        errors = merge_into_4bit(model)
    merged = model.model.layers[1].mlp.down_proj
    assert type(merged) is nn.Linear and torch.equal(merged.weight, want)
    assert "model.layers.1.mlp.down_proj" not in errors and "model.layers.1.mlp.up_proj" in errors

    for kw, msg in [(dict(keep_float_modules=["down_prj"]), r"keep_float_modules entry 'down_prj' matches none"),
                    (dict(keep_float_modules=r".*\.nothing"), r"keep_float_modules=.*matches none of the targets"),
                    (dict(keep_float_modules=[3]), r"keep_float_modules must be a regex or a non-empty list"),
                    (dict(keep_float_modules=["down_proj"], init_lora_weights="loftq"), r"loftq.*keep a float base")]:
        fresh = tiny_llama()
        with pytest.raises(ValueError, match=msg):
            apply_qlora(fresh, LLAMA_TARGETS, r=4, **kw)
        assert not any(isinstance(m, QLoRALinear) for m in fresh.modules())


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c = Conv1D(48, 64)  # GPT-2's layout: y = x @ W + b, W [in=64, out=48]
        nn.init.normal_(self.c.bias, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_conv1d_float_base_is_peft_lora_on_that_conv1d(dtype):
    """Bug: a Conv1D could not be a float base (refused, or quantized by apply_qlora). peft wraps a float Conv1D in
    lora.Linear (fan_in_fan_out): a float-base QLoRALinear holds the Conv1D's own [in, out] Parameter and runs
    Conv1D's addmm, so forward, gradients, state dict and merge are peft's bit for bit; a meta layer loads GPT-2's
    [in, out] weight; a transposed one is refused by name."""
    torch.manual_seed(0)
    net = _ConvNet().to(dtype)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c"]))
    randomize(theirs, "default", seed=1)
    lora = theirs.base_model.model.c
    conv = copy.deepcopy(net.c)
    ours = QLoRALinear.from_linear(conv, quantize=False, r=4, lora_alpha=8)
    for which in ("lora_A", "lora_B"):
        ours.set_lora_weight("default", which, getattr(lora, which)["default"].weight)
    assert ours.weight is conv.weight and ours.weight.shape == (64, 48) and ours.is_target_conv_1d_layer
    x, y_ours = _assert_same_forward_and_grads(ours, theirs, lora, dtype)
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    assert sd["weight"].shape == (64, 48) and torch.equal(sd["weight"], net.c.weight)
    assert torch.equal(ours.dequantized_weight(torch.float32), net.c.weight.float().t())
    meta = QLoRALinear(64, 48, quantize=False, r=4, lora_alpha=8, device="meta", _conv1d=True)
    meta.load_state_dict(sd, assign=True)
    assert not meta._unloaded and torch.equal(meta(x), y_ours)
    with pytest.raises(ValueError, match=r"size mismatch for 'weight'.*Conv1D's float base.*\(64, 48\)"):
        ours.load_state_dict({**sd, "weight": sd["weight"].t()})
    merged = merge_and_unload(nn.Sequential(ours))[0]
    assert type(merged).__name__ == "Conv1D" and merged.weight.shape == (64, 48)
    assert torch.equal(merged.weight, theirs.merge_and_unload().c.weight)
    assert torch.equal(merged.bias, net.c.bias)


def _gpt2_4bit(d, skip: list[str]) -> nn.Module:
    from .test_model import tiny_gpt2

    return _load_4bit(transformers.GPT2LMHeadModel, tiny_gpt2, d, llm_int8_skip_modules=skip)


def test_a_conv1d_that_bitsandbytes_left_float_keeps_a_float_base_as_peft(tmp_path):
    """Bug: on a GPT-2 loaded in 4 bits, a Conv1D that bitsandbytes left float (``llm_int8_skip_modules``) was quantized
    by apply_qlora, while peft gives it LoRA as it is (fan_in_fan_out). Now it keeps its float [in, out] weight: the
    layer's outputs are peft's bit for bit, the model's match peft's, the adapter files are interchangeable
    (fan_in_fan_out true), and merge_and_unload gives back the Conv1D with peft's merged weight."""
    from .test_model import tiny_gpt2

    load = functools.partial(_gpt2_4bit, tmp_path / "gpt2", ["c_fc", "lm_head"])
    targets = ["c_attn", "c_proj", "c_fc"]
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        theirs = peft.get_peft_model(load(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize(theirs, "default", seed=6)
    theirs.save_pretrained(str(tmp_path / "ad"))
    base = load()
    fc = base.transformer.h[0].mlp.c_fc
    assert type(fc).__name__ == "Conv1D" and fc.weight.shape == (64, 256)
    w = fc.weight
    ours = apply_qlora(base, targets, r=4, lora_alpha=8)
    layer = ours.transformer.h[0].mlp.c_fc
    assert isinstance(layer, QLoRALinear) and not layer.quantized and layer.weight is w
    assert ours.transformer.h[0].attn.c_attn.quantized
    adapters.load_adapter(ours, tmp_path / "ad", replace=True)
    h = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(layer(h), theirs.base_model.model.transformer.h[0].mlp.c_fc(h))
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = reference64(ours, tmp_path / "ad", tiny_gpt2)

    assert_matches(*(_embeds_logits(m, ids, dt) for m, dt in
                     ((ours, torch.float32), (theirs, torch.float32), (ref, torch.float64))))
    adapters.save_adapter(ours, tmp_path / "again")
    _same_adapter_files(tmp_path / "ad", tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    again = peft.PeftModel.from_pretrained(load(), str(tmp_path / "again"))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, theirs(input_ids=ids).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's merge of the Linear4bit layers warns about rounding
        peft_fc = theirs.merge_and_unload().transformer.h[0].mlp.c_fc
    merged = merge_and_unload(ours).transformer.h[0].mlp.c_fc
    assert type(merged).__name__ == "Conv1D" and merged.weight is w
    assert torch.equal(merged.weight, peft_fc.weight) and torch.equal(merged.bias, peft_fc.bias)


def test_keep_float_modules_keeps_a_conv1d_float():
    """keep_float_modules on GPT-2's Conv1D (was refused): a float base holding the Conv1D's weight, exactly the
    Conv1D's output while B = 0; the other targets quantized."""
    from .test_model import tiny_gpt2

    model, dense = tiny_gpt2(), tiny_gpt2()
    w = model.transformer.h[1].mlp.c_fc.weight
    apply_qlora(model, ["c_attn", "c_fc"], r=4, keep_float_modules=["c_fc"])
    fc = model.transformer.h[1].mlp.c_fc
    assert not fc.quantized and fc.weight is w and model.transformer.h[1].attn.c_attn.quantized
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fc(x), dense.transformer.h[1].mlp.c_fc(x))


def test_trainable_parameters_count_a_float_base_as_peft():
    """peft's count on a T5 all-linear model loaded in 4 bits holds wo's float weight as is: so does ours."""
    model = apply_qlora(make_t5(), "all-linear", r=4)
    theirs = peft.get_peft_model(bnb_base(model, make_t5), peft.LoraConfig(r=4, target_modules="all-linear"))
    assert qkernels.trainable_parameters(model) == theirs.get_nb_trainable_parameters()


def test_peft_saved_base_weight_loads_into_a_float_base_and_is_refused_by_a_4bit_one(tmp_path, monkeypatch):
    """peft loads ``lm_head.base_layer.weight`` from the file into its base layer; so does load_adapter on a float
    base (undone with the adapter if loading fails later). A 4-bit lm_head cannot take a float weight: refused, named,
    nothing loaded."""
    targets = [*LLAMA_TARGETS, "lm_head"]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize(theirs, "default", seed=6)
    with torch.no_grad():
        theirs.base_model.model.lm_head.base_layer.weight.mul_(1.5)  # e.g. a head trained or resized with the adapter
    theirs.save_pretrained(str(tmp_path / "ad"))
    ours = apply_qlora(tiny_llama(), targets, r=4, lora_alpha=8, keep_float_modules=["lm_head"])
    adapters.load_adapter(ours, tmp_path / "ad", replace=True)
    assert torch.equal(ours.lm_head.weight, theirs.base_model.model.lm_head.base_layer.weight)

    before = ours.lm_head.weight.detach().clone()
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    bad = {k: (v[:2].contiguous() if k.endswith("layers.1.mlp.down_proj.lora_A.weight") else v)
           for k, v in sd.items()}
    from safetensors.torch import save_file

    (tmp_path / "bad").mkdir()
    save_file(bad, str(tmp_path / "bad" / "adapter_model.safetensors"))
    (tmp_path / "bad" / "adapter_config.json").write_text((tmp_path / "ad" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match=r"down_proj.lora_A.weight.*shape"):  # checked before any change
        adapters.load_adapter(ours, tmp_path / "bad", adapter_name="other")
    assert torch.equal(ours.lm_head.weight, before) and adapters.adapter_names(ours) == ["default"]
    with torch.no_grad():
        ours.lm_head.weight.mul_(2.0)
    before = ours.lm_head.weight.detach().clone()
    real = QLoRALinear.set_lora_weight

    def fail_late(self, name, which, value):  # a failure after lm_head's base weight was copied (keys load sorted)
        if self is ours.model.layers[1].mlp.down_proj:
            raise RuntimeError("injected")
        real(self, name, which, value)

    monkeypatch.setattr(QLoRALinear, "set_lora_weight", fail_late)
    with pytest.raises(RuntimeError, match="injected"):
        adapters.load_adapter(ours, tmp_path / "ad", adapter_name="other")
    monkeypatch.undo()
    assert torch.equal(ours.lm_head.weight, before) and adapters.adapter_names(ours) == ["default"]

    quantized = apply_qlora(tiny_llama(), targets, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match=r"lm_head.base_layer.weight.*4-bit.*keep_float_modules=\['lm_head'\]"):
        adapters.load_adapter(quantized, tmp_path / "ad", adapter_name="peft")
    assert adapters.adapter_names(quantized) == ["default"]


def tied_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """``tiny_llama`` with ``tie_word_embeddings=True`` (Gemma, Qwen2-0.5B, small Llamas): lm_head holds the input
    embedding's Parameter."""
    from .test_training import _config

    cfg = _config()
    cfg.tie_word_embeddings = True
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


TIED_TARGETS = [*LLAMA_TARGETS, "lm_head"]


def _peft_tied(model: nn.Module, seed: int = 6) -> nn.Module:
    """peft 0.21's LoRA on ``model`` with lm_head targeted: it warns (tuners_utils ``_check_tied_modules``) and wraps
    the float head as it is, still tied."""
    with pytest.warns(UserWarning, match="tie_word_embeddings=True"):
        theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TIED_TARGETS))
    randomize(theirs, "default", seed=seed)
    return theirs


def test_a_tied_head_gets_lora_on_the_shared_float_weight_as_peft(tmp_path):
    """Bug: a head tied to the input embeddings was refused. transformers' bitsandbytes loader never quantizes a tied
    weight and peft wraps the float head, still tied: apply_qlora now keeps it float and SHARED (the same Parameter:
    no copy, the embedding reads the same tensor, the tie survives tie_weights()), trains LoRA on it, counts as peft,
    and gives peft's outputs on the same 4-bit model."""
    model = tied_llama()
    emb = model.model.embed_tokens.weight
    apply_qlora(model, TIED_TARGETS, r=4, lora_alpha=8)
    head = model.lm_head
    assert isinstance(head, QLoRALinear) and not head.quantized and head.weight is emb
    assert model.model.layers[0].mlp.up_proj.quantized
    assert sum(p.numel() for p in model.parameters() if p.dim() == 2 and p.shape[0] == 96) == emb.numel() + 4 * 96
    model.tie_weights()
    assert model.lm_head.weight is emb and model.get_input_embeddings().weight is emb
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = emb.detach().clone()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(emb, before) and head.lora_B["default"].weight.abs().sum() > 0
    assert model.lm_head.weight is model.model.embed_tokens.weight

    load = functools.partial(_load_4bit, transformers.LlamaForCausalLM, tied_llama, tmp_path / "tied")
    base = load()
    assert base.lm_head.weight is base.model.embed_tokens.weight and type(base.lm_head) is nn.Linear
    theirs = _peft_tied(base)
    theirs.save_pretrained(str(tmp_path / "ad"))
    ours = load()
    emb = ours.model.embed_tokens.weight
    apply_qlora(ours, TIED_TARGETS, r=4, lora_alpha=8)
    assert ours.lm_head.weight is emb and not ours.lm_head.quantized
    assert qkernels.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    adapters.load_adapter(ours, tmp_path / "ad", replace=True)
    ref = reference64(ours, tmp_path / "ad", tied_llama)

    assert_matches(*(_embeds_logits(m, ids, dt) for m, dt in
                     ((ours, torch.float32), (theirs, torch.float32), (ref, torch.float64))))
    with torch.no_grad():  # the embedding output reads the shared tensor
        assert torch.equal(ours.get_input_embeddings()(ids), theirs.get_input_embeddings()(ids))


def test_gemma_tied_head_gives_peft_outputs_and_files(tmp_path):
    """Gemma ties its head by default (and scales the embedding output by sqrt(hidden), reading the same weight):
    LoRA on the tied head of a Gemma loaded in 4 bits gives peft's logits, and the adapter files are interchangeable."""
    load = functools.partial(_load_4bit, transformers.GemmaForCausalLM, functools.partial(tiny_model, "gemma"),
                             tmp_path / "gemma")
    targets = TIED_TARGETS
    base = load()
    assert base.config.tie_word_embeddings and base.lm_head.weight is base.model.embed_tokens.weight
    with pytest.warns(UserWarning, match="tie_word_embeddings=True"):
        theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize(theirs, "default", seed=2)
    theirs.save_pretrained(str(tmp_path / "ad"))
    ours = apply_qlora(load(), targets, r=4, lora_alpha=8)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight and not ours.lm_head.quantized
    adapters.load_adapter(ours, tmp_path / "ad", replace=True)
    ref = reference64(ours, tmp_path / "ad", functools.partial(tiny_model, "gemma"))
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))

    assert_matches(*(_embeds_logits(m, ids, dt) for m, dt in
                     ((ours, torch.float32), (theirs, torch.float32), (ref, torch.float64))))
    adapters.save_adapter(ours, tmp_path / "again")
    _same_adapter_files(tmp_path / "ad", tmp_path / "again")
    with pytest.warns(UserWarning, match="tie_word_embeddings=True"):
        again = peft.PeftModel.from_pretrained(load(), str(tmp_path / "again"))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_a_tied_head_saves_and_loads_what_peft_saves_and_loads(tmp_path):
    """peft's save_embedding_layers="auto" writes lm_head's base weight (the shared embedding) beside its LoRA when
    lm_head is targeted: save_adapter writes the same keys and tensors, peft loads our file with identical outputs, and
    load_adapter copies that weight into the shared Parameter (the embeddings change too, as in peft)."""
    load = functools.partial(_load_4bit, transformers.LlamaForCausalLM, tied_llama, tmp_path / "tied")
    theirs = _peft_tied(load())
    theirs.save_pretrained(str(tmp_path / "ad"))
    ours = apply_qlora(load(), TIED_TARGETS, r=4, lora_alpha=8)
    adapters.load_adapter(ours, tmp_path / "ad", replace=True)
    adapters.save_adapter(ours, tmp_path / "again")
    assert "base_model.model.lm_head.base_layer.weight" in _same_adapter_files(tmp_path / "ad", tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(TIED_TARGETS) and cfg["ensure_weight_tying"] is False
    with pytest.warns(UserWarning, match="tie_word_embeddings=True"):
        again = peft.PeftModel.from_pretrained(load(), str(tmp_path / "again"))
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, theirs(input_ids=ids).logits)
    # a file whose head weight differs (trained or resized with the adapter): both write it into the shared weight
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    sd["base_model.model.lm_head.base_layer.weight"] = sd["base_model.model.lm_head.base_layer.weight"] * 1.5
    from safetensors.torch import save_file

    (tmp_path / "scaled").mkdir()
    save_file(sd, str(tmp_path / "scaled" / "adapter_model.safetensors"))
    (tmp_path / "scaled" / "adapter_config.json").write_text((tmp_path / "ad" / "adapter_config.json").read_text())
    with pytest.warns(UserWarning, match="tie_word_embeddings=True"):
        peft_scaled = peft.PeftModel.from_pretrained(load(), str(tmp_path / "scaled"))
    adapters.load_adapter(ours, tmp_path / "scaled", replace=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert torch.equal(ours.model.embed_tokens.weight, peft_scaled.get_input_embeddings().weight)


def test_merging_a_tied_head_changes_the_embeddings_too_as_peft(tmp_path):
    """peft's merge_and_unload writes W + s B A into the tied head's weight in place (lora.Linear.merge), so the input
    embeddings change too and stay tied; it warns (``_check_merge_allowed``). merge_and_unload and merge_into_4bit do
    the same, bit for bit on the float weight, with a warning that names the tie and how to untie first."""
    theirs = _peft_tied(tied_llama())
    theirs.save_pretrained(str(tmp_path / "ad"))
    ours = apply_qlora(tied_llama(), TIED_TARGETS, r=4, lora_alpha=8)
    adapters.load_adapter(ours, tmp_path / "ad", replace=True)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_logits = ours(input_ids=ids).logits
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        peft_merged = theirs.merge_and_unload()
    with pytest.warns(UserWarning, match=r"merging LoRA into 'lm_head', whose weight is tied to "
                                         r"'model\.embed_tokens\.weight'.*changes too.*untie it first"):
        merged = merge_and_unload(copy.deepcopy(ours))
    assert type(merged.lm_head) is nn.Linear and merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.equal(merged.lm_head.weight, peft_merged.lm_head.weight)
    assert torch.equal(merged.model.embed_tokens.weight, peft_merged.model.embed_tokens.weight)
    assert merged.config.tie_word_embeddings and not merged.lm_head.weight.requires_grad
    with torch.no_grad():  # the embeddings now hold W + s B A as well: the merged model is not the adapted one
        assert not torch.allclose(merged(input_ids=ids).logits, want_logits, atol=1e-3)
    with pytest.warns(UserWarning, match="whose weight is tied"):
        errors = merge_into_4bit(ours)
    assert "lm_head" not in errors and ours.lm_head.weight is ours.model.embed_tokens.weight
    assert torch.equal(ours.lm_head.weight, peft_merged.lm_head.weight)


def test_a_meta_tied_model_keeps_the_head_float_and_tie_weights_loads_it(tmp_path):
    """A tied model built under accelerate's init_empty_weights is untied until tie_weights() (accelerate re-registers
    each parameter), yet declares the tie (``all_tied_weights_keys``): apply_qlora keeps the head float there too. Its
    4-bit checkpoint holds the shared weight once, under the embedding; tie_weights() then gives the head that
    Parameter, and the layer counts as loaded (it raised 'never loaded'), its LoRA initialized: the logits of the model
    loaded in 4 bits."""
    accelerate = pytest.importorskip("accelerate", reason="init_empty_weights is accelerate's")
    bnb_model = _load_4bit(transformers.LlamaForCausalLM, tied_llama, tmp_path / "tied")
    sd = {k: v for k, v in bnb_model.state_dict().items() if k != "lm_head.weight"}  # what save_pretrained writes
    with accelerate.init_empty_weights():
        meta = transformers.LlamaForCausalLM(bnb_model.config)
    assert meta.lm_head.weight is not meta.model.embed_tokens.weight
    apply_qlora(meta, TIED_TARGETS, r=4)
    assert not meta.lm_head.quantized and meta.model.layers[0].self_attn.q_proj.quantized
    missing = meta.load_state_dict(sd, assign=True, strict=False).missing_keys
    assert [k for k in missing if ".lora_" not in k] == ["lm_head.weight"]
    meta.tie_weights()
    assert meta.lm_head.weight is meta.model.embed_tokens.weight and not meta.lm_head._unloaded
    ours = apply_qlora(bnb_model, TIED_TARGETS, r=4)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # B = 0: the LoRA terms vanish, the bases are the same bytes and the same float weight
        assert torch.equal(meta.eval()(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_peft_ensure_weight_tying_adapter_is_refused_naming_the_option(tmp_path):
    """peft's ensure_weight_tying=True moves a tied lm_head's LoRA onto the input embedding (lora.Embedding, keys
    lora_embedding_A/B) and runs the head with that LoRA transposed (peft/tuners/lora/model.py:316-322): qkernels'
    embedding LoRA does not tie adapters, so load_adapter refuses it, naming the option and the default that loads;
    nothing is loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tied_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                                   ensure_weight_tying=True))
    assert type(theirs.base_model.model.model.embed_tokens).__name__ == "Embedding"  # peft's lora.Embedding
    theirs.save_pretrained(str(tmp_path / "ad"))
    ours = apply_qlora(tied_llama(), ["q_proj", "lm_head"], r=4)
    with pytest.raises(ValueError, match=r"embed_tokens\.lora_embedding_A.*ensure_weight_tying=True.*"
                                         r"ensure_weight_tying=False"):
        adapters.load_adapter(ours, tmp_path / "ad", adapter_name="tied")
    assert adapters.adapter_names(ours) == ["default"]


def test_quantizing_a_tied_head_stays_refused_and_loftq_names_the_tie(tmp_path):
    """A 4-bit weight cannot be shared with the float embedding (tie_weights() would overwrite it): quantize_checkpoint
    refuses a tied target, naming the tie and the fixes; LoftQ (which needs a 4-bit base) names the float targets."""
    model = tied_llama()
    with pytest.raises(ValueError, match=r"'lm_head'.*keep a float base.*tied to another module"):
        apply_qlora(model, TIED_TARGETS, r=4, init_lora_weights="loftq")
    assert not any(isinstance(m, QLoRALinear) for m in model.modules())
    model.save_pretrained(tmp_path / "tied")
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with 'model\.embed_tokens\.weight'.*4-bit "
                                         r"weight cannot be shared.*exclude_modules=\['lm_head'\]"):
        qkernels.quantize_checkpoint(tmp_path / "tied", tmp_path / "q4", TIED_TARGETS, model=tied_llama())


def test_float_base_under_autocast_returns_what_peft_and_nn_linear_return():
    """Under ``torch.autocast`` a float base is nn.Linear plus LoRA: peft's ``lora.Linear`` returns the autocast dtype
    (the base ``F.linear`` autocasts); the layer cast its result back to the input's float32, unlike both."""
    torch.manual_seed(0)
    net = _Net()
    ours, theirs = _ours_and_peft(net)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, y_theirs, y_linear = ours(x), theirs(x), net.fc(x)
    assert y_ours.dtype == y_theirs.dtype == y_linear.dtype == torch.bfloat16
    assert torch.equal(y_ours, y_theirs)


def test_float_base_loaded_with_assign_takes_the_checkpoint_dtype_and_merges_in_it():
    """``load_state_dict(sd, assign=True)`` gives a float base the checkpoint's tensor, dtype included (as nn.Linear,
    and as transformers loads T5's ``wo`` in float32 in a float16 model): ``float_dtype`` and the merged Linear follow
    it. They kept the dtype the meta layer was built with, so the merge silently rounded ``wo`` to float16."""
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(nn.Linear(64, 32), quantize=False, r=4)
    randomize(nn.Sequential(layer), "default", seed=3)
    meta = QLoRALinear(64, 32, quantize=False, r=4, device="meta", dtype=torch.float16)
    meta.load_state_dict(layer.state_dict(), assign=True)
    assert meta.weight.dtype == meta.float_dtype == torch.float32
    merged = merge_and_unload(nn.Sequential(meta))[0]
    assert merged.weight.dtype == torch.float32
    assert torch.equal(merged.weight, merge_and_unload(nn.Sequential(layer))[0].weight)


def test_a_meta_state_dict_leaves_a_float_base_unloaded():
    """A meta model's state dict holds no values: loaded with ``assign=True`` into a meta float base (nn.Linear takes
    it), the layer still says which tensors never loaded instead of failing inside F.linear on a meta weight."""
    meta = QLoRALinear(64, 32, quantize=False, r=4, device="meta")
    meta.load_state_dict(QLoRALinear(64, 32, quantize=False, r=4, device="meta").state_dict(), assign=True)
    assert meta._unloaded == {"weight", "bias", "lora_A.default.weight", "lora_B.default.weight"}
    with pytest.raises(RuntimeError, match=r"\['bias', 'lora_A.default.weight', 'lora_B.default.weight', 'weight'\] "
                                           r"never loaded"):
        meta(torch.randn(2, 64))
    for quantize in (False, True):  # meta tensors assigned over real ones: unloaded again, by name
        real = QLoRALinear(64, 32, quantize=quantize, r=4)
        real.load_state_dict({"bias": torch.empty(32, device="meta")}, strict=False, assign=True)
        assert real._unloaded == {"bias"}
        with pytest.raises(RuntimeError, match=r"\['bias'\] never loaded"):
            real(torch.randn(2, 64))


def test_keep_float_modules_naming_a_4bit_layer_is_refused_before_any_change(tmp_path):
    """On a model loaded in 4 bits, a keep_float_modules entry naming bitsandbytes 4-bit layers asks for a float weight
    that is gone: refused by name, with the loader option that keeps them float, and nothing replaced. (It failed
    with "linear.weight must be float32/float16/bfloat16 to quantize" after replacing the targets before it.)"""
    model = _load_4bit(transformers.LlamaForCausalLM, tiny_llama, tmp_path / "llama")
    with pytest.raises(ValueError, match=r"up_proj.*bitsandbytes 4-bit layers.*llm_int8_skip_modules"):
        apply_qlora(model, LLAMA_TARGETS, r=4, keep_float_modules=["up_proj"])
    assert not any(isinstance(m, QLoRALinear) for m in model.modules())


def test_t5_float16_4bit_checkpoint_loads_shard_by_shard_into_a_meta_model(tmp_path):
    """quantize_checkpoint(dtype=float16) keeps T5's wo in float32 (as transformers). Loaded one small shard at a time
    (4-bit weights and float bases in the same dicts) into a float16 meta T5 after apply_qlora: every tensor loads,
    wo is float32, the logits are apply_qlora's on transformers' own 4-bit load of the same files bit for bit, and the
    merge keeps wo float32 (it was rounded to the meta model's float16)."""
    from safetensors.torch import load_file

    from qkernels import quantize_checkpoint

    make_t5().save_pretrained(tmp_path / "dense")
    report = quantize_checkpoint(tmp_path / "dense", tmp_path / "q", dtype=torch.float16, max_shard_size="40KB",
                                 verbose=False)
    assert len(report["files"]) > 2 and WO not in report["quantized"]
    with torch.device("meta"):
        meta = transformers.T5ForConditionalGeneration(make_t5().config).half()
    apply_qlora(meta, "all-linear", r=4)
    for f in report["files"]:
        meta.load_state_dict(load_file(str(tmp_path / "q" / f)), strict=False, assign=True)
    meta.tie_weights()  # T5's embeddings are tied to "shared", which the checkpoint holds once
    assert not any(getattr(m, "_unloaded", None) for m in meta.modules())
    assert not any(t.is_meta for t in meta.state_dict().values())
    assert meta.get_submodule(WO).weight.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "q", dtype=torch.float16)
    ref = apply_qlora(loaded, "all-linear", r=4)
    for m in (meta, ref):
        randomize(m, "default", seed=4)
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    meta.eval()
    with torch.no_grad():
        assert torch.equal(meta(input_ids=ids, decoder_input_ids=ids).logits,
                           ref.eval()(input_ids=ids, decoder_input_ids=ids).logits)
    assert merge_and_unload(meta).get_submodule(WO).weight.dtype == torch.float32


@pytest.mark.parametrize("cast", ["half", "to_bf16"])
def test_a_mixed_model_casts_its_float_bases_and_keeps_its_packed_bytes(cast):
    """``model.half()`` / ``model.to(torch.bfloat16)`` on T5 "all-linear": wo's float base converts as nn.Linear's
    weight (its LoRA too, as peft's), each 4-bit layer keeps its bytes and QuantState; the model runs in the new dtype
    and merges to Linears of it."""
    model = apply_qlora(make_t5(), "all-linear", r=4)
    randomize(model, "default", seed=1)
    q = "encoder.block.0.layer.0.SelfAttention.q"
    before = model.get_submodule(q).weight.data.clone(), copy.deepcopy(model.get_submodule(q).weight.quant_state)
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    model = model.half() if cast == "half" else model.to(torch.bfloat16)
    wo, layer = model.get_submodule(WO), model.get_submodule(q)
    assert wo.weight.dtype == wo.float_dtype == wo.lora_A["default"].weight.dtype == dtype
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight.data, before[0])
    assert layer.weight.quant_state.as_dict(packed=True).keys() == before[1].as_dict(packed=True).keys()
    assert all(torch.equal(a, b) for a, b in zip(layer.weight.quant_state.as_dict(packed=True).values(),
                                                 before[1].as_dict(packed=True).values(), strict=True))
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=ids).logits
    assert logits.dtype == dtype and logits.isfinite().all()
    merged = merge_and_unload(model)
    assert {m.weight.dtype for m in merged.modules() if type(m) is nn.Linear} == {dtype}


@pytest.mark.parametrize("dense", ["merge_and_unload", "transformers_dequantize"])
def test_a_4bit_loaded_model_made_dense_is_quantized_again_by_apply_qlora(tmp_path, dense):
    """transformers leaves ``is_loaded_in_4bit`` set on a 4-bit-loaded model made dense (our merge_and_unload, its own
    ``dequantize()``), which dropped the quantization config. apply_qlora read the flag alone and kept every target a
    float base: a second QLoRA stage on the merged model quantized nothing. Only what bitsandbytes left float counts."""
    model = _load_4bit(transformers.LlamaForCausalLM, tiny_llama, tmp_path / "llama")
    if dense == "merge_and_unload":
        merge_and_unload(apply_qlora(model, LLAMA_TARGETS, r=4))
    else:
        model.dequantize()
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())
    apply_qlora(model, LLAMA_TARGETS, r=4)
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    assert len(layers) == 14 and all(m.quantized for m in layers)


def test_float_base_compiles_fullgraph_and_equals_eager():
    """torch.compile(fullgraph=True) of a float-base layer (no graph break): its forward equals eager with the adapter
    on, disabled, and under no_grad; its gradients reach the LoRA weights. Equal to rounding, not bit for bit: the
    compiler may contract ``y + lora * s`` into one fused multiply-add (bit-equal here, measured; not promised)."""

    def same(a: torch.Tensor, b: torch.Tensor) -> None:
        torch.testing.assert_close(a, b, rtol=2 * torch.finfo(a.dtype).eps, atol=2 * torch.finfo(a.dtype).eps)

    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(nn.Linear(64, 32), quantize=False, r=4)
    randomize(nn.Sequential(layer), "default", seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    for disabled in (False, True):
        layer.disable_adapters = disabled
        same(compiled(x), layer(x))
        with torch.no_grad():
            same(compiled(x), layer(x))
    layer.disable_adapters = False
    compiled(x).square().sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_a_checkpoint_that_keeps_a_layer_float_loads_into_a_meta_model_with_keep_float_modules(tmp_path):
    """quantize_checkpoint(exclude_modules=["down_proj"]) leaves down_proj float (transformers loads it float, and
    apply_qlora there gives it a float base). A meta model after a plain apply_qlora has it 4-bit: the load error says
    to keep it float (keep_float_modules); with that, every tensor loads and the logits are apply_qlora's on
    transformers' own load of the same files."""
    from safetensors.torch import load_file

    from qkernels import quantize_checkpoint

    tiny_llama().save_pretrained(tmp_path / "dense")
    quantize_checkpoint(tmp_path / "dense", tmp_path / "q", exclude_modules=["down_proj"], verbose=False)
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(tiny_llama().config)
    apply_qlora(meta, LLAMA_TARGETS, r=4)
    with pytest.raises(ValueError, match=r"down_proj.weight.*float weight.*keep_float_modules=\['down_proj'\]"):
        meta.load_state_dict(sd, strict=False, assign=True)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(tiny_llama().config)
    apply_qlora(meta, LLAMA_TARGETS, r=4, keep_float_modules=["down_proj"])
    meta.load_state_dict(sd, strict=True, assign=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "q")
    ref = apply_qlora(loaded, LLAMA_TARGETS, r=4)
    assert not ref.model.layers[0].mlp.down_proj.quantized
    meta.model.rotary_emb.inv_freq = ref.model.rotary_emb.inv_freq  # a buffer: meta under torch.device("meta")
    for m in (meta, ref):
        randomize(m, "default", seed=4)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(meta.eval()(ids).logits, ref.eval()(ids).logits)


@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["nodrop", "drop"])
def test_a_conv1d_float_base_with_dora_is_peft_dora_on_that_conv1d(dropout):
    """Bug: DoRA on a float Conv1D base (keep_float_modules, a Conv1D bitsandbytes left float) failed at init with a
    size mismatch (the row norm read the [in, out] weight as [out, in]); a square Conv1D (GPT-2's attn.c_proj) would
    have taken column norms silently. peft's DoRA transposes the weight (fan_in_fan_out): the same magnitudes,
    outputs and gradients as peft's lora.Linear on that Conv1D (dropout in training too: both recompute the base on
    the same mask), and peft's merge."""
    torch.manual_seed(0)
    net = _ConvNet()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c"], use_dora=True, lora_dropout=dropout)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        theirs = peft.get_peft_model(copy.deepcopy(net), cfg).train()
    lora = theirs.base_model.model.c
    ours = QLoRALinear.from_linear(copy.deepcopy(net.c), quantize=False, r=4, lora_alpha=8, lora_dropout=dropout,
                                   use_dora=True).train()
    mag = ours.lora_magnitude_vector["default"].weight
    assert mag.shape == (48,)
    torch.testing.assert_close(mag, lora.lora_magnitude_vector["default"].weight, rtol=0, atol=0)
    randomize(theirs, "default", seed=1)
    with torch.no_grad():
        lora.lora_magnitude_vector["default"].weight.mul_(1.25)
    for which in ("lora_A", "lora_B", "lora_magnitude_vector"):
        ours.set_lora_weight("default", which, getattr(lora, which)["default"].weight)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    y_ours = ours(x)
    torch.manual_seed(3)
    y_theirs = theirs(x)
    ulp = torch.finfo(torch.float32).eps * float(y_theirs.detach().abs().max())
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=8 * ulp)  # the same float32 ops, summed in another order
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for which in ("lora_A", "lora_B", "lora_magnitude_vector"):
        g_theirs = getattr(lora, which)["default"].weight.grad
        torch.testing.assert_close(getattr(ours, which)["default"].weight.grad, g_theirs, rtol=1e-5,
                                   atol=1e-5 * float(g_theirs.abs().max()))
    merged = merge_and_unload(nn.Sequential(ours))[0]
    assert type(merged).__name__ == "Conv1D" and merged.weight.shape == (64, 48)
    torch.testing.assert_close(merged.weight, theirs.merge_and_unload().c.weight, rtol=1e-6, atol=1e-6)


def test_a_tied_head_to_save_survives_tie_weights_and_load_checkpoint(tmp_path):
    """Bug: modules_to_save=["lm_head"] on a tied model, then transformers' tie_weights() (load_checkpoint calls it;
    so do resize_token_embeddings and the README's load_state_dict flow) raised KeyError "attribute 'weight' already
    exists" (setattr on the wrapper). The tie goes to the frozen original head; a copy never loaded (meta) starts
    from it, as if wrapped after loading; a copy with values keeps them."""
    import accelerate
    from safetensors.torch import save_file

    from .test_training import _config

    q = apply_qlora(tied_llama(1), LLAMA_TARGETS, r=4)
    sd = {k: v.contiguous() for k, v in q.state_dict().items() if "lora_" not in k and k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))  # the tied head saved once, under the embedding
    cfg = _config()
    cfg.tie_word_embeddings = True
    with accelerate.init_empty_weights():
        meta = transformers.LlamaForCausalLM(cfg)
    apply_qlora(meta, LLAMA_TARGETS, r=4, modules_to_save=["lm_head"])
    assert qkernels.load_checkpoint(meta, tmp_path) == ([], [])
    head = meta.lm_head
    assert head.original_module.weight is meta.model.embed_tokens.weight
    copy_ = head.modules_to_save["default"].weight
    assert copy_ is not head.original_module.weight and torch.equal(copy_, head.original_module.weight)
    assert copy_.requires_grad and not head.original_module.weight.requires_grad
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(meta(input_ids=ids).logits, q(input_ids=ids).logits)
        copy_.add_(0.5)  # trained: a later tie_weights() leaves the copy alone
    meta.tie_weights()
    assert torch.equal(head.modules_to_save["default"].weight, copy_)


def test_a_peft_adapter_loads_into_a_model_transformers_loaded_in_4_bits_without_apply_qlora(tmp_path):
    """PeftModel.from_pretrained(model_4bit, adapter)'s one-call flow: load_adapter wraps the Linear4bit layers the
    file adapts as they are (the 4-bit head transformers kept float gets float LoRA), freezes the rest, and gives
    the logits of apply_qlora + load_adapter(replace=True) bit for bit; the model then saves and trains as one that
    apply_qlora prepared (transformers' is_quantized cleared, save_pretrained works)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_load_4bit(transformers.LlamaForCausalLM, tiny_llama, tmp_path / "m"),
                                     peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj",
                                                                                        "lm_head"]))
    randomize(theirs, "default", seed=2)
    theirs.save_pretrained(str(tmp_path / "ad"))
    ours = _load_4bit(transformers.LlamaForCausalLM, tiny_llama, tmp_path / "m")
    loaded = adapters.load_adapter(ours, tmp_path / "ad")
    assert len(loaded) == 2 * 2 + 1 and not ours.lm_head.quantized and ours.model.layers[0].mlp.down_proj.quantized
    want = _load_4bit(transformers.LlamaForCausalLM, tiny_llama, tmp_path / "m")
    apply_qlora(want, ["q_proj", "down_proj", "lm_head"], r=4, lora_alpha=8)
    adapters.load_adapter(want, tmp_path / "ad", replace=True)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, want(input_ids=ids).logits)
    assert ([n for n, p in ours.named_parameters() if p.requires_grad]
            == [n for n, p in want.named_parameters() if p.requires_grad] != [])
    assert ours.is_quantized is False
    ours.save_pretrained(tmp_path / "saved")
