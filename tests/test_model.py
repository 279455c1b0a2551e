"""Model level: apply_qlora's target matching against peft's, parameter counts, merging, and training a tiny Llama
(built from a LlamaConfig with tiny sizes: nothing is downloaded)."""

from __future__ import annotations

import copy
import logging
import math

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import qkernels
from qkernels import QLoRALinear, apply_qlora, merge_and_unload, merge_into_4bit, trainable_parameters
from qkernels.model import match_target_modules
from qkernels.modules_to_save import ModulesToSaveWrapper

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.xq = (nn.Linear(16, 16) for _ in range(4))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()
        self.out = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)


class Net(nn.Module):
    """Names chosen to exercise the matching rules: ``layers.N.attn.q`` (suffix), ``layers.N.attn.xq`` (ends with
    "q" but not ".q"), a top-level ``q`` (equality), and a head."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(2)])
        self.q = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)


def _peft_targets(model: nn.Module, **config) -> list[str]:
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, **config))
    return [n.removeprefix("base_model.model.") for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)]


@pytest.mark.parametrize(
    "config",
    [dict(target_modules=["q", "v"]), dict(target_modules=["attn.q"]), dict(target_modules=r".*\.(q|v)"),
     dict(target_modules=["q", "k", "v", "out"], exclude_modules=["layers.0.attn.q", "out"]),
     dict(target_modules=["q", "xq", "head"], exclude_modules=r"layers\.1\..*")],
    ids=["list", "dotted-suffix", "regex", "exclude-list", "exclude-regex"],
)
def test_target_matching_equals_peft(config):
    model = Net()
    want = _peft_targets(model, **config)
    assert match_target_modules(model, config["target_modules"], config.get("exclude_modules")) == want
    apply_qlora(model, config["target_modules"], exclude_modules=config.get("exclude_modules"), r=4)
    assert [n for n, m in model.named_modules() if isinstance(m, QLoRALinear)] == want


def test_all_linear_equals_peft_on_tiny_llama_and_skips_the_head():
    model = tiny_llama()
    want = sorted(_peft_targets(model, target_modules="all-linear"))
    assert "lm_head" not in want and len(want) == 2 * 7
    apply_qlora(model, "all-linear", r=4)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, QLoRALinear)) == want
    assert isinstance(model.lm_head, nn.Linear) and not model.lm_head.weight.requires_grad


def tiny_bert(seed: int = 0, classifier: bool = False) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32, num_labels=3)
    return (BertForSequenceClassification(cfg) if classifier else BertModel(cfg)).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """GPT-2 (transformers Conv1D layers, weight [in, out]); every in_features a multiple of 64 (bitsandbytes' CPU
    dequantizer mis-scales rows that are not whole blocks, docs/format.md section 7.4)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_model(kind: str, seed: int = 0) -> nn.Module:
    """A tiny transformers model of one family (2 layers, bert 3; random weights, nothing downloaded): "llama", "bert",
    "bert-cls" (hidden 32), "bert64-cls", "gpt2" (Conv1D), "opt", "mistral", "qwen2", "phi3" (fused qkv_proj /
    gate_up_proj), "gemma", "t5" (encoder-decoder). Every in_features is 64 or 128 (whole bitsandbytes blocks per row)
    but bert's and bert-cls's 32."""
    import transformers as tf

    if kind == "llama":
        return tiny_llama(seed)
    if kind in ("bert", "bert-cls"):
        return tiny_bert(seed, classifier=kind == "bert-cls")
    if kind == "gpt2":
        return tiny_gpt2(seed)
    torch.manual_seed(seed)
    if kind == "bert64-cls":  # tiny_bert's hidden 32 is half a bitsandbytes block: no bnb oracle on the CPU
        return tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=32, num_labels=3)).eval()
    dec = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                               num_attention_heads=4, max_position_embeddings=64,
                                               word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
                                               eos_token_id=2))
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(head_dim=16, **dec))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**dec))
    elif kind == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**dict(dec, num_key_value_heads=4)))
    elif kind == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=16, **dec))
    elif kind == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                          num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                                          eos_token_id=1))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return model.eval()


def _peft_wrapped(model: nn.Module, **config) -> tuple[set[str], set[str]]:
    """(LoRA layers, modules to save) that peft's get_peft_model creates, by module name in ``model``."""
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, **config))
    named = [(n.removeprefix("base_model.model."), m) for n, m in pm.named_modules()]
    return ({n for n, m in named if isinstance(m, peft.tuners.lora.LoraLayer)},
            {n for n, m in named if isinstance(m, peft.utils.other.ModulesToSaveWrapper)})


LAYER_CONFIGS = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1)),
    ("llama", dict(target_modules=LLAMA_TARGETS, layers_to_transform=[0])),
    ("llama", dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("llama", dict(target_modules=["k_proj"], layers_to_transform=[0, 1], layers_pattern=["h", "layers"])),
    # a full module name ignores layers_to_transform in peft; the suffix entry does not
    ("llama", dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=[], layers_pattern=[])),  # empty: every layer
    ("bert", dict(target_modules=["query", "value"])),
    ("bert", dict(target_modules="all-linear")),
    ("bert", dict(target_modules=["query", "dense"], layers_to_transform=[0, 2])),
    ("bert", dict(target_modules=["key", "dense"], layers_to_transform=2, layers_pattern="layer")),
    ("bert-cls", dict(target_modules="all-linear", modules_to_save=["classifier"])),
    ("bert-cls", dict(target_modules=["query", "dense"], modules_to_save=["pooler"], layers_to_transform=[1])),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"])),
    ("gpt2", dict(target_modules=["attn.c_proj", "c_fc"], layers_to_transform=[1])),
    ("opt", dict(target_modules="all-linear")),
    ("opt", dict(target_modules=["q_proj", "out_proj", "fc1"])),
    ("mistral", dict(target_modules="all-linear")),
    ("qwen2", dict(target_modules="all-linear")),
    ("qwen2", dict(target_modules=["k_proj", "down_proj"], layers_to_transform=[0])),
    ("phi3", dict(target_modules="all-linear")),
    ("phi3", dict(target_modules=["qkv_proj", "gate_up_proj"])),
    ("gemma", dict(target_modules="all-linear")),
    ("t5", dict(target_modules="all-linear", exclude_modules=["wo"])),
    ("t5", dict(target_modules="all-linear")),  # wo: LoRA on a float base (test_t5_wo_gets_lora_on_a_float_base)
    ("t5", dict(target_modules=["q", "v", "wi"], layers_to_transform=[1])),
]


@pytest.mark.parametrize("kind, config", LAYER_CONFIGS,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(LAYER_CONFIGS)])
def test_layers_and_modules_to_save_select_what_peft_wraps(kind, config):
    model = tiny_model(kind)
    want_lora, want_save = _peft_wrapped(model, **config)
    assert want_lora
    kw = {k: v for k, v in config.items() if k != "target_modules"}
    apply_qlora(model, config["target_modules"], r=4, **kw)
    assert {n for n, m in model.named_modules() if isinstance(m, QLoRALinear)} == want_lora
    assert {n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)} == want_save


@pytest.mark.parametrize("loaded, compute", [("float", torch.float32), ("float", torch.bfloat16),
                                             ("bitsandbytes", torch.float32), ("bitsandbytes", torch.bfloat16),
                                             ("bitsandbytes", torch.float16)])
@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_same_seed_gives_peft_initial_lora_on_layers_with_a_bias(loaded, compute, init, tmp_path):
    """Bugs (tests/fuzz_vs_peft.py, flow init): under one seed apply_qlora drew other initial A (and B for init False)
    than peft's get_peft_model wherever the replaced Linear had a bias (Qwen2's q/k/v, GPT-NeoX, OPT, ...): the
    layer drew nn.Linear's bias init before the LoRA init, then overwrote it with the linear's bias. The bias is now
    taken as it is. And with a bf16 / fp16 compute dtype peft's initial A and B hold values rounded to it (peft moves
    a new adapter to the bitsandbytes layer's compute_dtype, then casts it back to float32); qkernels' were unrounded,
    0.05% apart (as on a bf16 model, where peft's LoRA is in the weight's dtype). Now the same seed gives peft's LoRA
    weights bit for bit, from a float model (quantized here) and from a bitsandbytes 4-bit load (wrapped)."""
    from transformers import BitsAndBytesConfig, Qwen2ForCausalLM

    tiny_model("qwen2").save_pretrained(tmp_path)

    def load():
        if loaded == "float":  # a bf16 model: peft's LoRA in bf16 (then float32), ours quantized, computing in bf16
            return Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=compute)
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute)
        return Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=config)

    targets = ["q_proj", "v_proj", "o_proj", "up_proj"]  # q / v with a bias, o / up without
    torch.manual_seed(3)
    theirs = peft.get_peft_model(load(), peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=init))
    torch.manual_seed(3)
    ours = apply_qlora(load(), targets, r=4, init_lora_weights=init)
    want = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if p.requires_grad}
    got = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and len(got) == 2 * 2 * len(targets)
    assert all(got[n].dtype == torch.float32 and torch.equal(got[n], want[n]) for n in want)
    assert torch.equal(ours.model.layers[0].self_attn.q_proj.bias, load().model.layers[0].self_attn.q_proj.bias)
    A = got["model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert torch.equal(A, A.to(compute).float())  # peft's rounding


def test_rank_and_alpha_patterns_are_peft_s():
    """peft's LoraConfig rank_pattern / alpha_pattern (a regex matched at the end of the module name, the first match
    winning) in apply_qlora and add_adapter: apply_qlora had no such argument, so a LoraConfig's fields could not be
    passed on (tests/fuzz_vs_peft.py, flow init). Ranks, alphas and scalings are peft's module by module."""
    config = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                  rank_pattern={r"1\.self_attn\.q_proj": 2, "down_proj": 6, "q_proj": 3},
                  alpha_pattern={"v_proj": 5, r"layers\.0\..*": 32})
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config)).base_model.model
    ours = apply_qlora(tiny_llama(), **config)
    qkernels.add_adapter(ours, "second", **{k: v for k, v in config.items() if k != "target_modules"})
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, QLoRALinear)}
    assert layers.keys() == {n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    for n, m in layers.items():
        p = theirs.get_submodule(n)
        for adapter in ("default", "second"):
            assert (m.r[adapter], m.lora_alpha[adapter]) == (p.r["default"], p.lora_alpha["default"]), n
            assert m.scaling[adapter] == p.scaling["default"] and m.lora_A[adapter].weight.shape[0] == p.r["default"]
    assert {m.r["default"] for m in layers.values()} == {2, 3, 4, 6}
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\] must be a positive int rank, got 0"):
        apply_qlora(tiny_llama(), ["q_proj"], rank_pattern={"q_proj": 0})
    with pytest.raises(ValueError, match=r"alpha_pattern key '\(' is not a valid regular expression"):
        apply_qlora(tiny_llama(), ["q_proj"], alpha_pattern={"(": 2})
    with pytest.raises(TypeError, match="rank_pattern must be a dict"):
        qkernels.add_adapter(ours, "third", rank_pattern=[("q_proj", 2)])
    assert "third" not in qkernels.adapter_names(ours)


@pytest.mark.parametrize("targets", ["all-linear", ["q", "wo"]], ids=["all-linear", "list"])
def test_t5_wo_gets_lora_on_a_float_base(targets):
    """T5's feed-forward casts its input to ``wo.weight.dtype`` (uint8 for a 4-bit weight: with wo quantized the logits
    were silently wrong, 4.2 off on a model like this one), and transformers never quantizes wo
    (``_keep_in_fp32_modules``); peft puts LoRA on it as it is. So apply_qlora gives wo LoRA on its float weight (the
    same Parameter, untouched) and quantizes the rest: with B = 0 the logits are bit for bit those of the model with
    wo left out, and its LoRA term is peft's."""
    model, without = tiny_model("t5"), tiny_model("t5")
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo.weight
    apply_qlora(model, targets, r=4)
    layer = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(layer, QLoRALinear) and not layer.quantized and layer.weight is wo
    assert wo.dtype == torch.float32 and not wo.requires_grad
    assert isinstance(model.encoder.block[0].layer[0].SelfAttention.q, QLoRALinear)
    assert model.encoder.block[0].layer[0].SelfAttention.q.quantized
    apply_qlora(without, targets, r=4, exclude_modules=["wo"])
    assert type(without.encoder.block[0].layer[1].DenseReluDense.wo) is nn.Linear
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits,
                           without(input_ids=ids, decoder_input_ids=ids).logits)


def test_layer_arguments_are_checked_like_peft():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"layers_to_transform=\[5\] selects none of the 4 modules.*"
                                         r"indices under the default layer pattern are \[0, 1\].*\['layers'\]"):
        apply_qlora(model, ["q_proj", "v_proj"], layers_to_transform=[5])
    with pytest.raises(ValueError, match=r"layers_pattern='blocks' are none"):
        apply_qlora(model, ["q_proj"], layers_to_transform=0, layers_pattern="blocks")
    with pytest.raises(ValueError, match="layers_to_transform cannot be used when target_modules is a str"):
        apply_qlora(model, "all-linear", layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_pattern cannot be used when target_modules is a str"):
        apply_qlora(model, r".*q_proj", layers_pattern="layers")
    with pytest.raises(ValueError, match="layers_pattern is given but layers_to_transform is not"):
        apply_qlora(model, ["q_proj"], layers_pattern="layers")
    for bad in ("0", [0, "1"], True, 1.0):
        with pytest.raises(ValueError, match="layers_to_transform must be an int or a list of ints"):
            apply_qlora(model, ["q_proj"], layers_to_transform=bad)
    with pytest.raises(ValueError, match="layers_pattern must be a str or a list of str"):
        apply_qlora(model, ["q_proj"], layers_to_transform=0, layers_pattern=3)
    with pytest.raises(ValueError, match="modules_to_save entry 'scorer' matches no module"):
        apply_qlora(model, ["q_proj"], modules_to_save=["scorer"])
    with pytest.raises(ValueError, match="modules_to_save must be a list"):
        apply_qlora(model, ["q_proj"], modules_to_save="lm_head")
    with pytest.raises(ValueError, match="is a module to save"):
        apply_qlora(model, ["lm_head"], modules_to_save=["lm_head"])
    assert not any(isinstance(m, (QLoRALinear, ModulesToSaveWrapper)) for m in model.modules()), "nothing changed"
    # peft's default pattern needs a segment before the layer list: 'layers.0.attn.q' has no index
    assert qkernels.model.layer_index("layers.0.attn.q") is None
    assert qkernels.model.layer_index("layers.0.attn.q", "layers") == 0
    assert qkernels.model.layer_index("model.layers.3.mlp.experts.7.up") == 3


def test_gpt2_conv1d_layers_are_targeted_like_peft_and_transposed():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=1, n_head=2)).eval()
    want = sorted(_peft_targets(model, target_modules="all-linear"))
    assert want == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                    "transformer.h.0.mlp.c_proj"]
    conv = model.transformer.h[0].attn.c_attn  # Conv1D: y = x @ W + b, W [in, out]
    layer = QLoRALinear.from_linear(conv, r=4)
    assert (layer.in_features, layer.out_features) == (64, 192)
    packed, _ = qkernels.quantize_4bit(conv.weight.detach().t().contiguous())
    assert torch.equal(layer.weight.data, packed), "stored [out, in], as transformers' bitsandbytes integration"
    apply_qlora(model, "all-linear", r=4)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, QLoRALinear)) == want
    x = torch.randn(2, 64)
    with torch.no_grad():  # B == 0: the layer is x @ dequant(W)^T + b; two float32 evaluations, gamma_{K+1} each
        W = layer.dequantized_weight()
        want_y = x @ W.t() + conv.bias
        bound = 2 * (64 + 1) * U32 * (x.abs() @ W.abs().t() + conv.bias.abs())
        assert ((layer(x) - want_y).abs() <= bound).all()


def test_freezes_all_but_lora_and_counts_like_peft(capsys):
    model = tiny_llama()
    n_embed = model.model.embed_tokens.weight.numel()
    apply_qlora(model, LLAMA_TARGETS, r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert not model.model.embed_tokens.weight.requires_grad
    counts = trainable_parameters(model)
    # peft's own counting function, run on our model: the packed weight counts numel * 2 * element_size
    assert counts == peft.PeftModel.get_nb_trainable_parameters(model)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QLoRALinear))
    dense = sum(p.numel() for p in model.parameters() if type(p).__name__ != "Params4bit")
    assert counts == (lora, dense + quantized) and n_embed < dense
    qkernels.print_trainable_parameters(model)
    line = capsys.readouterr().out.strip()
    assert line == f"trainable params: {lora:,d} || all params: {dense + quantized:,d} || " \
                   f"trainable%: {100 * lora / (dense + quantized):.4f}"


def test_bad_targets_raise_listing_the_linear_layers():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"'qproj' matches no module.*q_proj"):
        apply_qlora(model, ["q_proj", "qproj"])
    with pytest.raises(ValueError, match="'model.layers.0.self_attn' is a LlamaAttention, not an nn.Linear"):
        apply_qlora(model, ["self_attn"])
    with pytest.raises(ValueError, match="r must be a positive int"):
        apply_qlora(model, ["q_proj"], r=0)
    with pytest.raises(ValueError, match="matches no module"):
        apply_qlora(model, r"nothing\..*")
    with pytest.raises(ValueError, match="is excluded by exclude_modules"):
        apply_qlora(model, ["q_proj"], exclude_modules=r".*q_proj")
    assert not any(isinstance(m, QLoRALinear) for m in model.modules()), "errors are raised before any replacement"
    apply_qlora(model, ["q_proj"])
    with pytest.raises(ValueError, match="already a QLoRALinear"):
        apply_qlora(model, ["q_proj"])


def test_progress_is_logged_and_printed_for_large_models(caplog, capsys):
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="qkernels"):
        apply_qlora(model, LLAMA_TARGETS, log_every=5)  # 14 layers >= 2 * 5: a "large" model, printed too
    lines = [r.getMessage() for r in caplog.records if r.name == "qkernels"]
    assert [ln.split(" layers")[0] for ln in lines] == ["apply_qlora: 5/14", "apply_qlora: 10/14", "apply_qlora: 14/14"]
    assert capsys.readouterr().err.splitlines() == lines
    apply_qlora(tiny_llama(), LLAMA_TARGETS)  # 14 < 2 * 50: quiet
    assert capsys.readouterr().err == ""


def test_model_state_dict_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = apply_qlora(tiny_llama(0), LLAMA_TARGETS, r=4)
    _randomize_lora(model)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    other = apply_qlora(tiny_llama(1), LLAMA_TARGETS, r=4)  # different weights everywhere
    result = other.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ids = torch.randint(3, 96, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, other(ids).logits)


# ---------------------------------------------------------------------------------------------- merging
def _randomize_lora(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QLoRALinear):
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.05)


def test_merge_and_unload_layer_within_rounding_bound():
    """|y_qlora - y_merged| <= 3 (K + r + 2) u (|x| (|W| + s|B||A|)^T + |b|): both are float32 evaluations of the
    same sum of K + r products (gamma_{K+r+2} each), plus the float32 rounding of the merged weight."""
    torch.manual_seed(0)
    layer = QLoRALinear(192, 72, r=6, lora_alpha=12)
    model = nn.Sequential(layer)
    _randomize_lora(model)
    x = torch.randn(9, 192)
    with torch.no_grad():
        y = layer(x)
        A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        mag = x.abs() @ (layer.dequantized_weight().abs() + s * B.abs() @ A.abs()).t() + layer.bias.abs()
    merge_and_unload(model)
    dense = model[0]
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32 and not dense.weight.requires_grad
    with torch.no_grad():
        ym = dense(x)
    bound = 3 * (192 + 6 + 2) * U32 * mag
    assert ((y - ym).abs() <= bound).all()


def test_merge_and_unload_follows_the_models_last_dtype():
    model = nn.Sequential(QLoRALinear(64, 32, r=2, dtype=torch.bfloat16))
    model.half()  # the packed weight and quant_state.dtype (the checkpoint's) are untouched; the merge is fp16
    assert model[0].weight.quant_state.dtype == torch.bfloat16 and model[0].float_dtype == torch.float16
    merge_and_unload(model)
    assert model[0].weight.dtype == torch.float16 and model[0].bias.dtype == torch.float16
    # compute_dtype is the precision of the layer's own matmul, not the dtype of the activations around it: the
    # float32 layer below takes float32 input (and returns float32), so its merge must too
    compute = nn.Sequential(QLoRALinear(64, 32, r=2, compute_dtype=torch.bfloat16))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert compute(x).dtype == torch.float32
        assert merge_and_unload(compute)[0].weight.dtype == torch.float32 and compute(x).dtype == torch.float32


def test_merge_and_unload_tiny_llama_keeps_outputs():
    model = tiny_llama()
    apply_qlora(model, LLAMA_TARGETS, r=4)
    _randomize_lora(model)
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    merge_and_unload(model)
    assert not any(isinstance(m, QLoRALinear) for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    with torch.no_grad():
        after = model(ids).logits
        exact = copy.deepcopy(model).double()(ids).logits  # the merged model evaluated in float64
    # DESIGN §3 rule: the QLoRA model's float32 error is at most twice that of the plain float32 dense model
    # (measured here: 6.1 vs 4.9 ulps of the largest logit)
    err_dense = (after.double() - exact).abs().max()
    assert (before.double() - exact).abs().max() <= 2 * err_dense
    model_plain = tiny_llama()
    apply_qlora(model_plain, LLAMA_TARGETS, r=4)
    with torch.no_grad():
        # and the check has teeth: dropping the adapters moves the logits by far more than that
        assert (model_plain(ids).logits - after).abs().max() > 100 * (after - before).abs().max()


def test_merge_and_unload_gives_gpt2_its_conv1d_back_and_the_checkpoint_reloads(tmp_path):
    """GPT-2 stores c_attn / c_proj / c_fc as transformers Conv1D (weight [in, out]). A merged nn.Linear there is saved
    [out, in]: from_pretrained then refuses c_attn / c_fc (shape) and loads the square c_proj transposed. peft's
    merge_and_unload gives back a Conv1D; so must ours."""
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    apply_qlora(model, "all-linear", r=4)
    assert all(m.is_target_conv_1d_layer for m in model.modules() if isinstance(m, QLoRALinear))
    _randomize_lora(model)
    ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    merge_and_unload(model)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        layer = model.transformer.h[0].get_submodule(name)
        assert type(layer) is Conv1D and layer.weight.shape == (layer.nx, layer.nf), name
    with torch.no_grad():
        after = model(ids).logits
        exact = copy.deepcopy(model).double()(ids).logits
    # the same rule as the Llama merge: QLoRA's float32 error at most twice the merged dense model's
    assert (before.double() - exact).abs().max() <= 2 * (after.double() - exact).abs().max()
    model.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, after)  # same weights, same code: bit-equal


def test_a_layer_pickled_before_the_conv1d_flag_still_merges_and_prints():
    """A QLoRALinear unpickled from an older qkernels has no ``is_target_conv_1d_layer``: it merges to nn.Linear (what
    that version gave) instead of raising AttributeError."""
    model = nn.Sequential(QLoRALinear(64, 32, r=2))
    del model[0].is_target_conv_1d_layer  # what torch.load of such a pickle gives
    assert "from Conv1D" not in repr(model)
    assert type(merge_and_unload(model)[0]) is nn.Linear


def test_merge_into_4bit_warns_and_reports_the_error():
    torch.manual_seed(0)
    layer = QLoRALinear(128, 64, r=4)
    model = nn.Sequential(layer)
    _randomize_lora(model)
    M = layer.dequantized_weight() + layer.lora_delta()
    with pytest.warns(UserWarning, match="requantized 1 layers"):
        errors = merge_into_4bit(model)
    new = layer.dequantized_weight()
    assert errors["0"] == pytest.approx(float((new - M).norm() / M.norm()), rel=1e-6) and errors["0"] > 0
    assert "0.delta_lost" in errors
    assert layer.active_adapter is None and not layer.lora_A
    packed, _ = qkernels.quantize_4bit(M)
    assert torch.equal(layer.weight.data, packed)
    x = torch.randn(3, 128)
    want = qkernels.matmul_4bit_lora(x, layer.weight.data, layer.weight.quant_state, None, None, 0.0, layer.bias)
    assert torch.equal(layer(x), want)


def test_loftq_through_apply_qlora_moves_the_model_toward_float():
    ref = tiny_llama()
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        want = ref(ids).logits
    errs = {}
    for init in (True, "loftq"):
        model = apply_qlora(tiny_llama(), LLAMA_TARGETS, r=8, init_lora_weights=init)
        with torch.no_grad():
            errs[init] = float((model(ids).logits - want).norm())
    assert errs["loftq"] < errs[True]


# ---------------------------------------------------------------------------------------------- training
def _lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_lowers_the_loss_and_generate_works():
    model = apply_qlora(tiny_llama(), LLAMA_TARGETS, r=8, lora_alpha=16, lora_dropout=0.05)
    model.train()
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (4, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    packed = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for n, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            assert torch.equal(m.weight.data, packed[n]), "the 4-bit weight never changes"
    model.eval()
    out = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], ids[:1, :4])


@pytest.mark.parametrize("use_reentrant", [None, True, False], ids=["default", "reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_lora_gradients(use_reentrant):
    """With LoRA dropout on: checkpointing restores the RNG state for the recomputation, so the fused op draws the
    same masks and the gradients match the ones without checkpointing, with torch's reentrant checkpoint (which needs
    the inputs to require grad: transformers hooks the embeddings) and the non-reentrant one."""
    model = apply_qlora(tiny_llama(), LLAMA_TARGETS, r=4, lora_dropout=0.1)
    _randomize_lora(model)
    model.train()
    ids = torch.randint(3, 96, (2, 10))
    torch.manual_seed(5)
    plain = _lora_grads(model, ids)
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.model.layers[0].gradient_checkpointing
    torch.manual_seed(5)
    ckpt = _lora_grads(model, ids)
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 2 * 7
    for n in plain:
        assert ckpt[n].abs().sum() > 0, n
        scale = plain[n].abs().max().item()
        assert (ckpt[n] - plain[n]).abs().max().item() <= 64 * U32 * max(scale, math.ulp(1.0)), n


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_enabled_before_apply_qlora(use_reentrant):
    """``model.gradient_checkpointing_enable()`` on the float model, then apply_qlora (the order of peft's
    prepare_model_for_kbit_training): the checkpointed layers and transformers' input-grad hook survive the layer
    swap, and the LoRA gradients are those of the same model without checkpointing (dropout masks included)."""

    def make(checkpointing: bool):
        model = tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        torch.manual_seed(4)
        apply_qlora(model, LLAMA_TARGETS, r=4, lora_dropout=0.1)
        _randomize_lora(model)
        return model.train()

    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = make(checkpointing)
        assert model.model.layers[0].gradient_checkpointing == checkpointing
        torch.manual_seed(5)
        grads.append(_lora_grads(model, ids))
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 2 * 7
    for n in plain:
        assert ckpt[n].abs().sum() > 0, n
        scale = plain[n].abs().max().item()
        assert (ckpt[n] - plain[n]).abs().max().item() <= 64 * U32 * max(scale, math.ulp(1.0)), n


# ---------------------------------------------------------------------------------------------- modules to save
def test_modules_to_save_train_copy_and_merge_to_it(tmp_path):
    """BERT with a classification head: LoRA on the encoder, the head trained in full as a per-adapter copy; the
    original head never changes; merge_and_unload keeps the trained copy; the model pickles and deep-copies."""
    model = apply_qlora(tiny_bert(classifier=True), ["query", "value"], r=4, modules_to_save=["classifier"])
    head = model.classifier
    assert isinstance(head, ModulesToSaveWrapper) and head.out_features == 3  # attributes read through
    original = head.original_module.weight.detach().clone()
    ids, labels = torch.randint(3, 64, (4, 8)), torch.tensor([0, 1, 2, 1])
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    assert torch.equal(head.original_module.weight, original)
    assert not torch.equal(head.modules_to_save["default"].weight, original)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.equal(copy.deepcopy(model)(input_ids=ids).logits, want)
        torch.save(model, tmp_path / "m.pt")
        assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False)(input_ids=ids).logits, want)
        with qkernels.disable_adapters(model):
            base = model(input_ids=ids).logits
        assert not torch.equal(base, want)
    merge_and_unload(model)
    assert type(model.classifier) is nn.Linear
    assert torch.equal(model.classifier.weight, head.modules_to_save["default"].weight)
    with torch.no_grad():  # the same function up to float32 rounding; the original head would be far off
        err = (model(input_ids=ids).logits - want).abs().max()
        assert err <= 1e-3 * (base - want).abs().max(), err


def test_modules_to_save_overlapping_a_target_is_refused_before_any_change():
    model = tiny_llama()
    # peft's modules_to_save rule is a plain suffix: "_proj" selects every projection, which are LoRA targets
    with pytest.raises(ValueError, match=r"is a LoRA target and module .* a module to save; they overlap"):
        apply_qlora(model, ["q_proj"], modules_to_save=["_proj"])
    assert not any(isinstance(m, (QLoRALinear, ModulesToSaveWrapper)) for m in model.modules())


def _bnb_4bit_net(seed: int = 0) -> nn.Module:
    """``Net`` with its attention projections loaded in 4 bits by bitsandbytes (as ``BitsAndBytesConfig`` does),
    fp4 / blocksize 128 / no double quant so that wrapping (not requantizing with the defaults) is visible."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    net = Net()
    for block in net.layers:
        for name in ("q", "k", "v"):
            lin = getattr(block.attn, name)
            q = bnb.nn.Linear4bit(16, 16, bias=True, compute_dtype=torch.float32, quant_type="fp4",
                                  compress_statistics=False)
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="fp4",
                                         compress_statistics=False, blocksize=128)
            q.bias = nn.Parameter(lin.bias.data.clone())
            setattr(block.attn, name, q.to("cpu"))  # bitsandbytes quantizes on the first move
    return net.eval()


def test_a_model_loaded_in_4_bits_by_bitsandbytes_is_wrapped_not_requantized():
    from qkernels import QuantState

    net = _bnb_4bit_net()
    want = _peft_targets(net, target_modules=["q", "k", "v"])
    bnb_layers = {n: m for n, m in net.named_modules() if type(m).__name__ == "Linear4bit"}
    saved = {n: (m.weight.data.clone(), QuantState.from_dict(m.weight.quant_state.as_dict(packed=True)))
             for n, m in bnb_layers.items()}
    apply_qlora(net, ["q", "k", "v"], r=4, lora_alpha=8)  # defaults nf4 / bs 64 / double quant do not apply
    assert sorted(n for n, m in net.named_modules() if isinstance(m, QLoRALinear)) == sorted(want)
    x = torch.randn(3, 16)
    for n, (data, state) in saved.items():
        layer = net.get_submodule(n)
        assert torch.equal(layer.weight.data, data), f"{n}: the bitsandbytes bytes, not a requantization"
        assert layer.weight.quant_state == state, n
        assert (state.quant_type, state.blocksize, state.nested) == ("fp4", 128, False), n
        with torch.no_grad():  # B == 0: x @ dequant(W)^T + b; two float32 evaluations, gamma_{K+1} each
            W = layer.dequantized_weight()
            want_y = x @ W.t() + layer.bias
            bound = 2 * (16 + 1) * U32 * (x.abs() @ W.abs().t() + layer.bias.abs())
            assert ((layer(x) - want_y).abs() <= bound).all(), n
    assert trainable_parameters(net)[0] == 7 * 4 * (16 + 16)  # 6 wrapped + the float top-level q, quantized


def test_a_4bit_layer_refuses_loftq_and_an_8bit_one_is_named():
    import bitsandbytes as bnb

    with pytest.raises(ValueError, match="loftq"):
        apply_qlora(_bnb_4bit_net(), ["q"], r=4, init_lora_weights="loftq")
    net = Net()
    net.q = bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False)
    net.q.load_state_dict(nn.Linear(16, 16).state_dict())
    net.q = net.q.to("cpu")
    if net.q.weight.dtype.is_floating_point:
        pytest.skip("this bitsandbytes keeps 8-bit weights in float until a device move that quantizes them")
    with pytest.raises(ValueError, match="'q'.*int8"):
        apply_qlora(net, ["q"], r=4)


def test_gpt2_loaded_in_4_bits_by_transformers_merges_to_a_checkpoint_that_reloads(tmp_path):
    """transformers' bitsandbytes loader: GPT-2's Conv1D layers become Linear4bit (weight [out, in], ``source_cls``
    Conv1D) and ``config.quantization_config`` is set. After merge_and_unload the layers must be Conv1D again and
    the config unquantized (as ``model.dequantize()`` leaves it): before, from_pretrained of the saved merge failed
    (bitsandbytes asserted on float weights under a 4-bit config)."""
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    tiny_gpt2().save_pretrained(tmp_path / "dense")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "dense", quantization_config=bnb_config, device_map="cpu")
    apply_qlora(model, "all-linear", r=4)
    assert all(m.is_target_conv_1d_layer for m in model.modules() if isinstance(m, QLoRALinear))
    _randomize_lora(model)
    merge_and_unload(model)
    assert type(model.transformer.h[1].mlp.c_fc) is Conv1D and model.transformer.h[1].mlp.c_fc.weight.shape == (64, 256)
    assert getattr(model.config, "quantization_config", None) is None and not model.is_quantized
    partial = GPT2LMHeadModel.from_pretrained(tmp_path / "dense", quantization_config=bnb_config, device_map="cpu")
    merge_and_unload(apply_qlora(partial, ["c_attn"], r=4))  # c_fc / c_proj are still 4-bit: the config stays
    assert partial.config.quantization_config is not None and partial.is_quantized
    other = apply_qlora(tiny_gpt2(), ["c_attn"], r=4)  # another method's config (its layers never replaced): kept
    other.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    assert merge_and_unload(other).config.quantization_config == {"quant_method": "gptq", "bits": 4}
    ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        merged = model(ids).logits
    model.save_pretrained(tmp_path / "merged")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, merged)  # same weights, same code: bit-equal


class _TorchEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def test_linears_that_torch_reads_directly_are_refused_before_any_change():
    """nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward, and nn.TransformerEncoderLayer's
    eval fast path passes linear1/linear2.weight to a fused kernel: with a 4-bit layer there the forward crashed inside
    torch ("self and mat2 must have the same dtype"). Refused with the exclusion to pass."""
    torch.manual_seed(0)
    model = _TorchEncoder().eval()
    assert "encoder.layers.0.self_attn.out_proj" in _peft_targets(model, target_modules="all-linear")  # peft wraps it
    with pytest.raises(ValueError, match=r"MultiheadAttention.*TransformerEncoderLayer.*weight directly.*"
                                         r"exclude_modules=\['linear1', 'linear2', 'self_attn.out_proj'\]"):
        apply_qlora(model, "all-linear", r=4)
    assert not any(isinstance(m, QLoRALinear) for m in model.modules())
    with pytest.raises(ValueError, match=r"\['encoder.layers.0.self_attn.out_proj'.*"
                                         r"exclude_modules=\['self_attn.out_proj'\]"):
        apply_qlora(model, ["out_proj"], r=4)
    apply_qlora(model, "all-linear", r=4, exclude_modules=["linear1", "linear2", "self_attn.out_proj"])
    assert [n for n, m in model.named_modules() if isinstance(m, QLoRALinear)] == ["head"]
    with torch.no_grad():
        assert model(torch.randn(2, 5, 64)).shape == (2, 5, 8)  # the fast path runs on the float layers


@pytest.mark.parametrize("hide_peft", [False, True], ids=["peft", "no-peft"])
def test_all_linear_on_a_mixture_of_experts_is_refused_naming_the_list(monkeypatch, hide_peft):
    """transformers 5 keeps Mixtral's experts as 3-D parameters; peft's all-linear adapts them (target_parameters), so
    apply_qlora's all-linear silently left them float without LoRA (most of the model) while claiming peft's
    selection. Refused, naming the Linear list, which then works and matches peft's."""
    import builtins

    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = tf.MixtralForCausalLM(cfg).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules="all-linear"))
    assert pm.peft_config["default"].target_parameters  # what peft adds
    if hide_peft:  # the structural rule used without peft
        real = builtins.__import__
        monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                            if name.startswith("peft") else real(name, *a, **k))
    with pytest.raises(ValueError, match=r"all-linear.*expert parameters \[.*gate_up_proj.*"
                                         r"target_modules=\['k_proj', 'o_proj', 'q_proj', 'v_proj'\]"):
        apply_qlora(model, "all-linear", r=4)
    monkeypatch.undo()
    assert not any(isinstance(m, QLoRALinear) for m in model.modules())
    apply_qlora(model, ["k_proj", "o_proj", "q_proj", "v_proj"], r=4)
    want = _peft_targets(tf.MixtralForCausalLM(cfg), target_modules=["k_proj", "o_proj", "q_proj", "v_proj"])
    assert sorted(n for n, m in model.named_modules() if isinstance(m, QLoRALinear)) == sorted(want)


class _Router(nn.Linear):
    """A router as Llama 4's / PhiMoE's: an nn.Linear whose forward returns (logits, top-k indices)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = super().forward(x)
        return logits, logits.topk(2, dim=-1).indices


class _Scaled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class _Plain(nn.Linear):
    """Falcon's FalconLinear: the plain product written out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


def _net_with_subclasses() -> Net:
    net = Net()
    net.layers[0].attn.q, net.layers[0].out, net.layers[1].attn.k = _Router(16, 16), _Scaled(16, 16), _Plain(16, 16)
    return net


def test_linear_subclasses_whose_forward_is_not_the_product_are_refused():
    """peft's all-linear selects every nn.Linear subclass; replacing one whose forward does more than x @ W^T + b by
    a QLoRALinear changed the model: a router's tuple became a tensor (Llama 4's / PhiMoE's MoE block then fails to
    unpack it) and a scaled output lost its scale, silently. Refused before any change, naming the modules and the
    exclusion; a subclass computing the plain product (Falcon's FalconLinear) is quantized as before."""
    torch.manual_seed(0)
    net = _net_with_subclasses()
    with pytest.raises(ValueError, match=r"\['layers.0.attn.q', 'layers.0.out'\] subclass nn.Linear.*'layers.0.attn.q' "
                                         r"is a _Router: its forward returns tuple.*exclude_modules=\['out', 'q'\]"):
        apply_qlora(net, "all-linear", r=4)
    assert not any(isinstance(m, QLoRALinear) for m in net.modules())
    with pytest.raises(ValueError, match=r"'layers.0.out' is a _Scaled: its forward differs from x @ W\^T \+ b by up"):
        apply_qlora(net, ["out"], r=4)
    apply_qlora(net, "all-linear", r=4, exclude_modules=["out", "q"])
    assert isinstance(net.layers[1].attn.k, QLoRALinear) and net.layers[1].attn.k.quantized


def test_linear_subclasses_on_the_meta_device_are_checked_by_output_type_and_shape():
    """On meta no value can be compared: the router (a tuple) is refused, the scaled one cannot be told apart."""
    with torch.device("meta"):
        net = _net_with_subclasses()
    with pytest.raises(ValueError, match=r"\['layers.0.attn.q'\] subclass nn.Linear.*exclude_modules=\['q'\]"):
        apply_qlora(net, "all-linear", r=4)
    apply_qlora(net, "all-linear", r=4, exclude_modules=["q"])
    assert isinstance(net.layers[0].out, QLoRALinear)
