"""apply_qlora on a meta model built from a 4-bit checkpoint's config.json takes the format from its
``quantization_config``.

``AutoConfig.from_pretrained(ckpt)`` -> ``init_empty_weights`` + ``from_config`` -> ``apply_qlora(model, targets)``
with no format argument -> accelerate's loader. Each result is compared with the same meta model built with the
format passed explicitly and loaded the same way (state dict bit for bit, logits ``torch.equal``), or with transformers'
own 4-bit load of the checkpoint plus ``apply_qlora``. Checkpoints come from transformers' ``save_pretrained`` of a
model bitsandbytes quantized (``BitsAndBytesConfig``) and from ``qkernels.quantize_checkpoint``, which writes
transformers' config.
"""

from __future__ import annotations

import inspect
import logging

import accelerate
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import qkernels
from qkernels import QLoRALinear, apply_qlora
from qkernels._bnb_config import transformers_skip

from ._oracle import same_bits

CFG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
           tie_word_embeddings=False)
IDS = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (quant_type, double_quant, quant_storage, compute_dtype, writer): every value of each format field at least twice;
# compute_dtype differs from apply_qlora's default (None) where the other three are its defaults, so every case
# fails if the config is ignored
FORMATS = {
    "nf4-dq-uint8-bf16compute-qkernels": ("nf4", True, torch.uint8, torch.bfloat16, "qkernels"),
    "nf4-uint8-qkernels": ("nf4", False, torch.uint8, torch.float32, "qkernels"),
    "fp4-dq-bf16storage-qkernels": ("fp4", True, torch.bfloat16, torch.float32, "qkernels"),
    "fp4-fp16storage-qkernels": ("fp4", False, torch.float16, torch.float32, "qkernels"),
    "nf4-dq-bf16storage-transformers": ("nf4", True, torch.bfloat16, torch.float32, "transformers"),
    "fp4-uint8-transformers": ("fp4", False, torch.uint8, torch.float32, "transformers"),
}


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CFG)).save_pretrained(root)
    return root


def _bnb_config(quant_type: str, double_quant: bool, storage: torch.dtype, compute: torch.dtype,
                **kw) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_quant_storage=storage, bnb_4bit_compute_dtype=compute, **kw)


def _transformers_4bit(dense_dir, dst, bnb_config: BitsAndBytesConfig):
    """transformers' save_pretrained of the model bitsandbytes quantized at load: the checkpoint users have."""
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=bnb_config, device_map="cpu")
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def checkpoints(dense_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("q4")
    out = {}
    for name, (qt, dq, storage, compute, writer) in FORMATS.items():
        if writer == "qkernels":
            qkernels.quantize_checkpoint(dense_dir, root / name, quant_type=qt, double_quant=dq, quant_storage=storage,
                                         compute_dtype=compute, verbose=False)
        else:
            _transformers_4bit(dense_dir, root / name, _bnb_config(qt, dq, storage, compute))
        out[name] = root / name
    return out


def _meta_model(ckpt, target_modules=TARGETS, **kw) -> torch.nn.Module:
    """The model of ``ckpt/config.json`` on the meta device, with apply_qlora (``kw``: its other arguments)."""
    config = AutoConfig.from_pretrained(ckpt)
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return apply_qlora(model, target_modules, r=4, **kw)


def _load(model: torch.nn.Module, ckpt) -> torch.nn.Module:
    return accelerate.load_checkpoint_and_dispatch(model, str(ckpt), device_map={"": "cpu"}).eval()


def _assert_same(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Every tensor bit for bit but LoRA A (random in both; B = 0: the checkpoints have no LoRA), equal logits."""
    sa, sb = model.state_dict(), ref.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if "lora_A" not in k:
            assert same_bits(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)


def _no_layer_replaced(model: torch.nn.Module) -> bool:
    return not any(isinstance(m, QLoRALinear) for m in model.modules())


# ---------------------------------------------------------------------------------------------- the format is taken
@pytest.mark.parametrize("name", list(FORMATS))
def test_a_meta_model_built_from_the_config_loads_its_checkpoint_without_format_arguments(checkpoints, name):
    qt, dq, storage, compute, _ = FORMATS[name]
    model = _meta_model(checkpoints[name])
    layer = model.model.layers[1].mlp.down_proj
    st = layer.weight.quant_state
    assert (st.quant_type, st.nested, layer.weight.dtype, layer.compute_dtype) == (qt, dq, storage, compute)
    model = _load(model, checkpoints[name])
    ref = _load(_meta_model(checkpoints[name], quant_type=qt, double_quant=dq, quant_storage=storage,
                            compute_dtype=compute), checkpoints[name])
    _assert_same(model, ref)
    st = model.model.layers[1].mlp.down_proj.weight.quant_state
    assert (st.quant_type, st.nested, st.blocksize) == (qt, dq, 64) and not st.absmax.is_meta


def test_transformers_config_object_is_read_like_the_dict(checkpoints):
    """A config holding transformers' BitsAndBytesConfig object (as on a model transformers loaded) rather than
    config.json's dict."""
    ckpt = checkpoints["fp4-dq-bf16storage-qkernels"]
    config = AutoConfig.from_pretrained(ckpt)
    config.quantization_config = _bnb_config("fp4", True, torch.bfloat16, torch.float16)
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    apply_qlora(model, TARGETS, r=4)
    layer = model.model.layers[0].self_attn.q_proj
    assert (layer.weight.quant_state.quant_type, layer.weight.quant_state.nested, layer.weight.dtype,
            layer.compute_dtype) == ("fp4", True, torch.bfloat16, torch.float16)


def test_matching_explicit_arguments_are_accepted(checkpoints):
    ckpt = checkpoints["fp4-dq-bf16storage-qkernels"]
    model = _load(_meta_model(ckpt, quant_type="fp4", double_quant=True, quant_storage="bfloat16", blocksize=64,
                              compute_dtype="float32"), ckpt)
    _assert_same(model, _load(_meta_model(ckpt), ckpt))


@pytest.mark.parametrize("arg,value,pattern", [
    ("quant_type", "nf4", r"quant_type='nf4' contradicts .*bnb_4bit_quant_type='fp4'.*pass quant_type='fp4'"),
    ("double_quant", False, r"double_quant=False contradicts .*bnb_4bit_use_double_quant=True.*pass double_quant=True"),
    ("quant_storage", torch.uint8, r"quant_storage=torch\.uint8 contradicts .*bnb_4bit_quant_storage=torch\.bfloat16"
                                   r".*Leave quant_storage out.*pass quant_storage=torch\.bfloat16"),
], ids=["quant_type", "double_quant", "quant_storage"])
def test_a_contradicting_explicit_argument_is_refused_naming_it_before_any_change(checkpoints, arg, value, pattern):
    config = AutoConfig.from_pretrained(checkpoints["fp4-dq-bf16storage-qkernels"])
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=pattern):
        apply_qlora(model, TARGETS, r=4, **{arg: value})
    assert _no_layer_replaced(model)
    with pytest.raises(ValueError, match=r"quant_type must be 'nf4' or 'fp4', got 'FP4'; the names are lowercase"):
        apply_qlora(model, TARGETS, r=4, quant_type="FP4")  # a bad value is named as such, not as a contradiction


def test_compute_dtype_and_blocksize_are_not_refused_they_are_not_in_the_stored_format(checkpoints, dense_dir,
                                                                                        tmp_path):
    """compute_dtype passed wins over the config's (as over a bitsandbytes layer's own in from_bnb): it is the matmul's
    precision, not stored. The config has no blocksize: a passed one is kept, and each layer takes its checkpoint's
    at load; quantize_checkpoint writes the same config for blocksize 128, which loads with the defaults."""
    ckpt = checkpoints["nf4-dq-uint8-bf16compute-qkernels"]
    model = _meta_model(ckpt, compute_dtype=torch.float16, blocksize=128)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.compute_dtype == torch.float16 and layer.weight.quant_state.blocksize == 128
    _load(model, ckpt)
    assert layer.weight.quant_state.blocksize == 64  # the checkpoint's
    qkernels.quantize_checkpoint(dense_dir, tmp_path / "bs128", blocksize=128, verbose=False)
    model = _load(_meta_model(tmp_path / "bs128"), tmp_path / "bs128")
    assert model.model.layers[0].mlp.up_proj.weight.quant_state.blocksize == 128
    _assert_same(model, _load(_meta_model(tmp_path / "bs128", blocksize=128, compute_dtype=torch.float32),
                              tmp_path / "bs128"))


def test_the_format_taken_is_logged(checkpoints, caplog, capsys):
    ckpt = checkpoints["fp4-dq-bf16storage-qkernels"]
    with caplog.at_level(logging.INFO, logger="qkernels"):
        _meta_model(ckpt, compute_dtype=torch.bfloat16, verbose=True)
    line = next(r.getMessage() for r in caplog.records if "quantization_config" in r.getMessage())
    assert ("format from model.config.quantization_config (bitsandbytes 4-bit): quant_type='fp4', double_quant=True, "
            "quant_storage=torch.bfloat16, compute_dtype=torch.float32; passed: compute_dtype=torch.bfloat16") in line
    assert line in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qkernels"):
        apply_qlora(LlamaForCausalLM(AutoConfig.from_pretrained(ckpt)), TARGETS, r=4)  # not meta: no such line
    assert caplog.records and not any("quantization_config" in r.getMessage() for r in caplog.records)


def test_the_signature_still_shows_the_documented_defaults():
    sig = str(inspect.signature(apply_qlora))
    for want in ("quant_type: 'str' = 'nf4'", "double_quant: 'bool' = True", "blocksize: 'int' = 64",
                 "compute_dtype: 'torch.dtype | None' = None", "quant_storage: 'torch.dtype' = torch.uint8"):
        assert want in sig, want


# ---------------------------------------------------------------------------------------------- float modules
def test_llm_int8_skip_modules_get_a_float_base_and_load(dense_dir, tmp_path):
    """transformers' rule: "o_proj" matches every ``...self_attn.o_proj`` as a suffix; those weights are float in the
    checkpoint. Compared with transformers' own 4-bit load of it plus apply_qlora (o_proj float there too). With a
    skip list transformers quantizes lm_head: targeted, it is 4-bit here as well."""
    ckpt = _transformers_4bit(dense_dir, tmp_path / "q4", _bnb_config("nf4", True, torch.uint8, torch.float32,
                                                                     llm_int8_skip_modules=["o_proj"]))
    targets = [*TARGETS, "lm_head"]
    model = _meta_model(ckpt, targets)
    kinds = {n: m.quantized for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    assert not any(q for n, q in kinds.items() if n.endswith("o_proj")) and sum(kinds.values()) == len(kinds) - 2
    model = _load(model, ckpt)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu")
    assert type(ref.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    apply_qlora(ref, targets, r=4).eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)


def test_without_a_skip_list_transformers_default_skips_keep_the_head_float(dense_dir, tmp_path):
    """llm_int8_skip_modules None: transformers keeps the output embedding (and the last module) float."""
    ckpt = _transformers_4bit(dense_dir, tmp_path / "q4", _bnb_config("fp4", False, torch.uint8, torch.float32))
    targets = [*TARGETS, "lm_head"]  # every 4-bit weight of the checkpoint needs a 4-bit layer
    model = _meta_model(ckpt, targets)
    assert model.model.layers[0].self_attn.q_proj.quantized and not model.lm_head.quantized
    model = _load(model, ckpt)
    ref = apply_qlora(AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu"), targets, r=4).eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)


def test_a_linear_subclass_is_stored_float_and_gets_a_float_base(checkpoints):
    """transformers converts only ``type(m) is nn.Linear`` (and Conv1D): Falcon's FalconLinear stays float."""

    class PlainSubclass(torch.nn.Linear):
        pass

    config = AutoConfig.from_pretrained(checkpoints["nf4-uint8-qkernels"])
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
        model.model.layers[0].mlp.up_proj = PlainSubclass(64, 128, bias=False)
    apply_qlora(model, TARGETS, r=4)
    assert not model.model.layers[0].mlp.up_proj.quantized and model.model.layers[1].mlp.up_proj.quantized


@pytest.mark.parametrize("name,patterns", [
    ("model.layers.0.self_attn.o_proj", ["o_proj"]), ("model.layers.11.mlp", ["model.layers.1"]),
    ("model.layers.1.mlp.up_proj", ["model.layers.1"]), ("model.layers.0.mlp.gate_proj", ["model.layers.0.mlp.gate"]),
    ("model.layers.0.mlp.gate", ["model.layers.0.mlp.gate"]), ("model.layers.3.mlp.up_proj", [r"model\.layers\.\d+"]),
    ("model.layers.0.mlp.up_proj", ["mlp"]), ("lm_head", ["lm_head", "o_proj"]), ("model.lm_head", ["lm_head"]),
])
def test_the_skip_rule_is_transformers_own(name, patterns):
    from transformers.quantizers.quantizers_utils import should_convert_module

    assert (transformers_skip(name, patterns) is not None) == (not should_convert_module(name, patterns))


# transformers 5.23's rule, which transformers_skip follows where transformers has no should_convert_module: a pattern
# stops at a "." boundary or matches as a suffix (5.17's plain regex prefix also skipped layers.11 for "layers.1")
@pytest.mark.parametrize("name,patterns,hit", [
    ("model.layers.0.self_attn.o_proj", ["o_proj"], "o_proj"), ("model.layers.11.mlp", ["model.layers.1"], None),
    ("model.layers.1.mlp.up_proj", ["model.layers.1"], "model.layers.1"),
    ("model.layers.0.mlp.gate_proj", ["model.layers.0.mlp.gate"], None),
    ("model.layers.0.mlp.gate", ["model.layers.0.mlp.gate"], "model.layers.0.mlp.gate"),
    ("model.layers.3.mlp.up_proj", [r"model\.layers\.\d+"], r"model\.layers\.\d+"),
    ("model.layers.0.mlp.up_proj", ["mlp"], None), ("lm_head", ["o_proj", "lm_head"], "lm_head"),
    ("model.lm_head", ["lm_head"], "lm_head"), ("model.layers.0.mlp", ["", 3, "mlp"], "mlp"),
])
def test_the_skip_rule_without_transformers_function_is_5_23s(name, patterns, hit, monkeypatch):
    from qkernels import _bnb_config

    monkeypatch.setattr(_bnb_config, "_transformers_should_convert", lambda: None)
    assert transformers_skip(name, patterns) == hit


# ---------------------------------------------------------------------------------------------- ignored, refused
def test_a_model_with_real_weights_ignores_the_config_for_its_format():
    """The user quantizes fresh weights: the arguments (or their defaults) decide, as before; skip modules too."""
    cfg = LlamaConfig(**CFG)
    cfg.quantization_config = _bnb_config("fp4", False, torch.bfloat16, torch.float16,
                                          llm_int8_skip_modules=["o_proj"]).to_dict()
    torch.manual_seed(1)
    model = apply_qlora(LlamaForCausalLM(cfg), TARGETS, r=4)
    torch.manual_seed(1)
    plain = apply_qlora(LlamaForCausalLM(LlamaConfig(**CFG)), TARGETS, r=4)
    o_proj = model.model.layers[0].self_attn.o_proj
    st = o_proj.weight.quant_state
    assert o_proj.quantized and (st.quant_type, st.nested, o_proj.weight.dtype, o_proj.compute_dtype) == (
        "nf4", True, torch.uint8, None)
    sa, sb = model.state_dict(), plain.state_dict()
    assert list(sa) == list(sb) and all(same_bits(sa[k], sb[k]) for k in sa)
    # arguments that the config contradicts are not refused either, and another method's config is no matter
    apply_qlora(LlamaForCausalLM(cfg), TARGETS, r=4, quant_type="nf4", double_quant=True)
    cfg.quantization_config = {"quant_method": "gptq", "bits": 4}
    assert apply_qlora(LlamaForCausalLM(cfg), TARGETS, r=4).model.layers[0].mlp.up_proj.quantized


@pytest.mark.parametrize("qc,what", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, r"quant_method='gptq'"),
    (BitsAndBytesConfig(load_in_8bit=True).to_dict(), r"bitsandbytes 8-bit \(load_in_8bit\)"),
    (BitsAndBytesConfig(load_in_8bit=True), r"bitsandbytes 8-bit \(load_in_8bit\)"),
], ids=["gptq", "bnb-8bit-dict", "bnb-8bit-object"])
def test_another_quantization_on_a_meta_model_is_refused_clearly(qc, what):
    cfg = LlamaConfig(**CFG)
    cfg.quantization_config = qc
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=rf"quantization_config is {what}.*qkernels reads bitsandbytes 4-bit "
                                         r"checkpoints only"):
        apply_qlora(model, TARGETS, r=4)
    assert _no_layer_replaced(model)


def test_a_meta_model_without_a_quantization_config_keeps_the_defaults():
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(LlamaConfig(**CFG))
    apply_qlora(model, TARGETS, r=4)
    layer = model.model.layers[0].mlp.up_proj
    assert (layer.weight.quant_state.quant_type, layer.weight.quant_state.nested, layer.weight.dtype,
            layer.compute_dtype) == ("nf4", True, torch.uint8, None)
