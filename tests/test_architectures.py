"""The user-facing integration across transformers architectures, against peft + bitsandbytes on the CPU.

For each architecture, a tiny seeded model (hidden 64, 2 layers, vocab 64; nothing downloaded), saved once, then:

1. transformers loads it in 4 bits (``BitsAndBytesConfig``, bitsandbytes quantizing): ``apply_qlora(model,
   "all-linear")`` adapts the modules peft's ``LoraConfig(target_modules="all-linear")`` adapts there, and with the
   same (nonzero) A and B the logits agree with peft's. qkernels quantizing the same float weights gives the same
   packed bytes and scales wherever bitsandbytes quantized, and then the same logits bit for bit.
2. ``save_adapter`` loads in peft (``PeftModel.from_pretrained`` on the bitsandbytes base) with the same logits, and
   peft's saved adapter loads with ``load_adapter``.
3. transformers' 4-bit checkpoint (``save_pretrained`` of the bitsandbytes model) loads into a meta-device model
   after ``apply_qlora`` with ``load_checkpoint`` (the README's flow), bit-identical to the wrapped bitsandbytes model.
4. ``merge_and_unload`` keeps the logits; three AdamW steps lower the loss; ``generate()`` runs.

Also: mixtures of experts, an ``nn.Linear`` subclass that is a router (PhiMoE), ``load_checkpoint``'s renames, ties
and shards, ``quantize_checkpoint`` against transformers' own 4-bit save, and bfloat16 merges.

No double quantization in this file: bitsandbytes' CPU path rounds nested scales approximately (±1 code in ~0.2% of
scales, docs/format.md), so only without it do both quantizers give the same bytes and the comparison isolate the
integration (the nested format is covered in tests/test_serialization.py and tests/test_minilm.py).

Tolerance (``assert_matches`` of tests/test_adapters.py): qkernels and peft compute the same float32 function in
different summation orders; the float64 reference is the float model with each adapted weight replaced by
``dequant(W) + s B A`` in float64. Their difference is at most twice the sum of their errors against it plus 8 ulps
(STYLE 12). bitsandbytes runs its exact path (``support_avx512bf16_for_cpu`` off: its no-grad CPU path keeps bf16
scales, DESIGN §5).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qkernels
from qkernels import QLoRALinear, apply_qlora, merge_and_unload

from .test_adapters import assert_matches, randomize

peft = pytest.importorskip("peft", reason="peft is the oracle of these tests")
transformers = pytest.importorskip("transformers", reason="the models are transformers models")

R, ALPHA = 4, 8
# decoder-only kwargs shared by the Llama-like configs: every in_features 64 or 128 (whole bitsandbytes blocks per row:
# its CPU dequantizer mis-scales partial rows, docs/format.md §7.4)
DEC = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
           tie_word_embeddings=False)


@dataclass
class Arch:
    config: str  # transformers config class name
    model: str  # model class name
    kwargs: dict = field(default_factory=dict)
    kind: str = "causal"  # "causal" | "seq2seq" | "speech"


BART = dict(vocab_size=64, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
ARCHS = {
    "gemma2": Arch("Gemma2Config", "Gemma2ForCausalLM", dict(DEC, head_dim=16)),
    "gemma3": Arch("Gemma3TextConfig", "Gemma3ForCausalLM", dict(DEC, head_dim=16)),
    "qwen3": Arch("Qwen3Config", "Qwen3ForCausalLM", dict(DEC, head_dim=16)),
    "falcon": Arch("FalconConfig", "FalconForCausalLM",
                   dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)),
    "gpt_neox": Arch("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(DEC, num_key_value_heads=None)),
    "bloom": Arch("BloomConfig", "BloomForCausalLM",
                  dict(vocab_size=64, hidden_size=64, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)),
    "gptj": Arch("GPTJConfig", "GPTJForCausalLM",
                 dict(vocab_size=64, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
    "phi": Arch("PhiConfig", "PhiForCausalLM", dict(DEC, num_key_value_heads=4)),
    "starcoder2": Arch("Starcoder2Config", "Starcoder2ForCausalLM", DEC),
    "olmo2": Arch("Olmo2Config", "Olmo2ForCausalLM", DEC),
    "cohere": Arch("CohereConfig", "CohereForCausalLM", DEC),
    "granite": Arch("GraniteConfig", "GraniteForCausalLM", DEC),
    "bart": Arch("BartConfig", "BartForConditionalGeneration", BART, "seq2seq"),
    "whisper": Arch("WhisperConfig", "WhisperForConditionalGeneration",
                    dict(BART, num_mel_bins=64, max_source_positions=16, max_target_positions=64,
                         max_position_embeddings=None, begin_suppress_tokens=None, suppress_tokens=None), "speech"),
}


MOE = dict(DEC, num_experts_per_tok=2)
MOES = {
    "mixtral": Arch("MixtralConfig", "MixtralForCausalLM", dict(MOE, num_local_experts=4)),
    "qwen2_moe": Arch("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                      dict(MOE, num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=128)),
    "qwen3_moe": Arch("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(MOE, head_dim=16, num_experts=4, moe_intermediate_size=64)),
}
PHIMOE = Arch("PhimoeConfig", "PhimoeForCausalLM", dict(MOE, num_local_experts=4))
ALL = {**ARCHS, **MOES, "phimoe": PHIMOE}


def _classes(arch: Arch) -> tuple[type, type]:
    cfg_cls, model_cls = getattr(transformers, arch.config, None), getattr(transformers, arch.model, None)
    if cfg_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {arch.config} / {arch.model}")
    return cfg_cls, model_cls


def _inputs(arch: Arch, model: nn.Module) -> dict[str, torch.Tensor]:
    """2 x 40 tokens: 80 rows, past the CPU GEMV's 64, so every 4-bit layer runs dequantize + BLAS."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 40), generator=g)
    if arch.kind == "causal":
        return {"input_ids": ids}
    dec = torch.randint(3, 64, (2, 40), generator=g)
    if arch.kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": dec}
    n = model.config.num_mel_bins
    return {"input_features": torch.randn(2, n, 2 * model.config.max_source_positions, generator=g),
            "decoder_input_ids": dec}


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    with torch.no_grad():
        return model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}).logits.detach()


def _exact_bnb(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            m.support_avx512bf16_for_cpu = False  # its exact dequantize path (module docstring)
    return model


def _lora_names(model: nn.Module) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if isinstance(m, (QLoRALinear, peft.tuners.lora.LoraLayer))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: directory of the float model}, written on first use."""
    root, made = tmp_path_factory.mktemp("archs"), {}

    def get(kind: str):
        if kind not in made:
            cfg_cls, model_cls = _classes(ALL[kind])
            torch.manual_seed(0)
            model_cls(cfg_cls(**ALL[kind].kwargs)).save_pretrained(root / kind)
            made[kind] = root / kind
        return made[kind]

    return get


def _load(kind: str, d, four_bit: bool) -> nn.Module:
    _, model_cls = _classes(ALL[kind])
    kw = {}
    if four_bit:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
            bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _exact_bnb(model_cls.from_pretrained(d, dtype=torch.float32, **kw).eval())


def _reference64(kind: str, d, ours: nn.Module) -> nn.Module:
    """The float model in float64 with each adapted weight ``dequant(W) + s B A`` (float64)."""
    ref = _load(kind, d, four_bit=False).double()
    if hasattr(ref, "set_experts_implementation") and getattr(ref.config, "_experts_implementation", None):
        ref.set_experts_implementation("eager")  # torch's grouped_mm has no float64
    with torch.no_grad():
        for n, m in ours.named_modules():
            if isinstance(m, QLoRALinear):
                W = m.dequantized_weight(torch.float32).double() + m.lora_delta().double()
                target = ref.get_submodule(n)
                target.weight.copy_(W.t() if target.weight.shape != W.shape else W)
    return ref


def _copy_lora(src: nn.Module, dst: nn.Module) -> None:
    """The A and B of every QLoRALinear of ``src`` into the same module of ``dst`` (a peft model or a qkernels one)."""
    core = dst.base_model.model if isinstance(dst, peft.PeftModel) else dst
    with torch.no_grad():
        for n, m in src.named_modules():
            if isinstance(m, QLoRALinear):
                for which in ("lora_A", "lora_B"):
                    getattr(core.get_submodule(n), which)["default"].weight.copy_(getattr(m, which)["default"].weight)


def _within_rounding(out: torch.Tensor, ref: torch.Tensor) -> None:
    """``assert_matches``'s second rule alone: float32 rounding away from the float64 run (32 ulps of its magnitude)."""
    ulp = torch.finfo(torch.float32).eps * ref.abs().max()
    err = (out.double() - ref).abs().max()
    assert err <= 32 * ulp, f"error vs fp64 {err:.3g} > 32 ulp ({ulp:.3g})"


def _apply(model: nn.Module, **kw) -> nn.Module:
    return apply_qlora(model, "all-linear", r=R, lora_alpha=ALPHA, compute_dtype=torch.float32, **kw)


@pytest.mark.parametrize("kind", list(ARCHS))
def test_architecture_matches_peft_and_bitsandbytes(kind, saved, tmp_path):
    arch, d = ALL[kind], saved(kind)
    # 1a. the model transformers loaded in 4 bits: apply_qlora wraps it as peft does, with peft's outputs
    theirs = peft.get_peft_model(_load(kind, d, four_bit=True), peft.LoraConfig(target_modules="all-linear", r=R,
                                                                                 lora_alpha=ALPHA))
    inputs = _inputs(arch, theirs)
    ours_bnb = _apply(_load(kind, d, four_bit=True))
    assert _lora_names(ours_bnb) == _lora_names(theirs) and _lora_names(theirs)
    randomize(ours_bnb, "default", seed=2)
    _copy_lora(ours_bnb, theirs)
    want = _logits(ours_bnb, inputs)
    ref = _logits(_reference64(kind, d, ours_bnb), inputs)
    assert_matches(want, _logits(theirs, inputs), ref)

    # 1b. the float model quantized by qkernels: the same targets, and bitsandbytes' bytes where it quantized
    ours = _apply(_load(kind, d, four_bit=False), double_quant=False)
    assert _lora_names(ours) == _lora_names(theirs)
    for n, m in ours.named_modules():
        if isinstance(m, QLoRALinear) and ours_bnb.get_submodule(n).quantized:
            other = ours_bnb.get_submodule(n).weight
            assert torch.equal(m.weight.data, other.data) and torch.equal(m.weight.absmax, other.absmax), n
    _copy_lora(ours_bnb, ours)
    out = _logits(ours, inputs)
    ref_ours = _logits(_reference64(kind, d, ours), inputs)
    if all(m.quantized for m in ours_bnb.modules() if isinstance(m, QLoRALinear)):
        assert torch.equal(out, want)  # same bytes, same LoRA, same code
    else:  # bitsandbytes left some targets float (transformers quantizes `type(m) is nn.Linear` only)
        _within_rounding(out, ref_ours)

    # 2. adapters both ways
    qkernels.save_adapter(ours_bnb, tmp_path / "ours")
    peft_loaded = peft.PeftModel.from_pretrained(_load(kind, d, four_bit=True), str(tmp_path / "ours"))
    assert_matches(want, _logits(peft_loaded, inputs), ref)
    theirs.save_pretrained(tmp_path / "peft")
    again = _apply(_load(kind, d, four_bit=True))
    qkernels.load_adapter(again, tmp_path / "peft", replace=True)
    assert torch.equal(_logits(again, inputs), want)

    # 3. transformers' 4-bit checkpoint into a meta-device model (README); layers it holds float stay float (the
    # fix its error names)
    _load(kind, d, four_bit=True).save_pretrained(tmp_path / "q4")
    sd = load_file(tmp_path / "q4" / "model.safetensors")
    kept = [n for n in _lora_names(theirs) if f"{n}.weight.quant_map" not in sd]
    import accelerate

    with accelerate.init_empty_weights():
        meta = _classes(arch)[1](ours.config)
    _apply(meta, keep_float_modules=kept or None)
    qkernels.load_checkpoint(meta, tmp_path / "q4")  # strict
    assert not [k for k, v in meta.state_dict(keep_vars=True).items() if v.is_meta]
    meta.eval()
    with qkernels.disable_adapters(ours_bnb):
        assert torch.equal(_logits(meta, inputs), _logits(ours_bnb, inputs))

    # 4. merge, train, generate
    merged = merge_and_unload(copy.deepcopy(ours))
    assert not any(isinstance(m, QLoRALinear) for m in merged.modules())
    assert_matches(_logits(merged, inputs), out, ref_ours)
    # in eval mode: the configs' own dropout (BART's 0.1) made three losses on one batch noisy; LoRA trains all the same
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    labels = inputs.get("decoder_input_ids", inputs.get("input_ids"))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = ours(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    gen_in = {k: v[:, :5] if k != "input_features" else v for k, v in inputs.items() if k != "decoder_input_ids"}
    assert ours.generate(**gen_in, max_new_tokens=3, do_sample=False).shape[0] == 2



@pytest.mark.parametrize("kind", list(MOES))
def test_mixture_of_experts_against_peft_and_its_checkpoint_loaded_as_transformers_does(kind, saved, tmp_path):
    """transformers 5 stores the experts as 3-D parameters, which bitsandbytes leaves float. Where peft's all-linear
    adapts them (``target_parameters``, from transformers' conversion mapping: Mixtral, Qwen3-MoE) apply_qlora refuses
    all-linear naming the Linear list (it cannot adapt them); where peft does not (Qwen2-MoE) all-linear is peft's.
    Either way apply_qlora wraps what peft wraps, with peft's outputs. transformers' 4-bit checkpoint stores the experts
    one by one; load_checkpoint merges them with transformers' own converters, as from_pretrained does, also when a
    layer's experts are spread over several shards: the same experts, bit for bit, and the same logits."""
    arch, d = ALL[kind], saved(kind)
    targets = "all-linear"
    experts = peft.get_peft_model(_load(kind, d, four_bit=True), peft.LoraConfig(target_modules=targets))
    if experts.peft_config["default"].target_parameters:
        with pytest.raises(ValueError, match=r"all-linear.*expert parameters.*Pass the Linear layers explicitly"):
            _apply(_load(kind, d, four_bit=True))
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in _load(kind, d, four_bit=True).named_modules()
                          if isinstance(m, nn.Linear) and n != "lm_head"})
    ours = apply_qlora(_load(kind, d, four_bit=True), targets, r=R, lora_alpha=ALPHA)
    theirs = peft.get_peft_model(_load(kind, d, four_bit=True), peft.LoraConfig(target_modules=targets, r=R,
                                                                                 lora_alpha=ALPHA))
    assert _lora_names(ours) == _lora_names(theirs) and _lora_names(theirs)
    assert not theirs.peft_config["default"].target_parameters
    randomize(ours, "default", seed=2)
    _copy_lora(ours, theirs)
    inputs = _inputs(arch, ours)
    assert_matches(_logits(ours, inputs), _logits(theirs, inputs), _logits(_reference64(kind, d, ours), inputs))
    _load(kind, d, four_bit=True).save_pretrained(tmp_path / "q4")
    import accelerate

    with accelerate.init_empty_weights():
        meta = _classes(arch)[1](ours.config)
        sharded = _classes(arch)[1](ours.config)
    _load(kind, d, four_bit=True).save_pretrained(tmp_path / "shards", max_shard_size="40KB")
    lora = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    want = {k: v for k, v in ours.state_dict().items() if "experts" in k}
    assert want and all(v.dim() == 3 for v in want.values())
    for model, path in ((meta, tmp_path / "q4"), (sharded, tmp_path / "shards")):
        apply_qlora(model, targets, r=R, lora_alpha=ALPHA, compute_dtype=torch.float32)
        assert qkernels.load_checkpoint(model, path) == ([], [])
        model.load_state_dict(lora, strict=False)
        got = model.state_dict()
        for k, v in want.items():
            assert torch.equal(got[k], v), k
        assert torch.equal(_logits(model.eval(), inputs), _logits(ours, inputs))
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({f for k, f in index.items() if ".layers.0." in k and ".experts." in k}) > 1  # one layer, 2+ shards
    # an expert stored in 4 bits (a converter would merge packed bytes): refused before anything loads
    sd = load_file(str(tmp_path / "q4" / "model.safetensors"))
    key = next(k for k in sd if ".experts.0." in k)
    sd[key] = torch.zeros(sd[key].numel() // 2, 1, dtype=torch.uint8)
    sd[key + ".quant_state.bitsandbytes__nf4"] = torch.zeros(8, dtype=torch.uint8)
    (tmp_path / "packed").mkdir()
    save_file(sd, str(tmp_path / "packed" / "model.safetensors"))
    with accelerate.init_empty_weights():
        packed = _classes(arch)[1](ours.config)
    apply_qlora(packed, targets, r=R, lora_alpha=ALPHA)
    with pytest.raises(ValueError, match=r"1 tensors that transformers merges at load are 4-bit.*nothing was loaded"):
        qkernels.load_checkpoint(packed, tmp_path / "packed")
    assert all(p.is_meta for p in packed.parameters())


def _meta_qlora(kind: str, d) -> nn.Module:
    import accelerate

    with accelerate.init_empty_weights():
        meta = _classes(ALL[kind])[1](transformers.AutoConfig.from_pretrained(d))
    return _apply(meta)


def test_load_checkpoint_renames_ties_shards_and_reports_what_is_missing(saved, tmp_path):
    """GPT-NeoX's checkpoint says ``embed_out`` where the model says ``lm_head`` (transformers renames it at load), so
    a plain ``load_state_dict`` refuses it; Bloom's leaves out the tied ``lm_head``. load_checkpoint reads both as
    from_pretrained does, from one file or from shards with the same result, and names what is really missing."""
    d = saved("gpt_neox")
    _load("gpt_neox", d, four_bit=True).save_pretrained(tmp_path / "neox")
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"embed_out.weight\""):
        _meta_qlora("gpt_neox", d).load_state_dict(load_file(tmp_path / "neox" / "model.safetensors"), assign=True)
    neox = _meta_qlora("gpt_neox", d)
    assert qkernels.load_checkpoint(neox, tmp_path / "neox") == ([], [])
    assert torch.equal(neox.lm_head.weight, load_file(tmp_path / "neox" / "model.safetensors")["embed_out.weight"])

    d = saved("bloom")
    bloom = _load("bloom", d, four_bit=True)
    bloom.save_pretrained(tmp_path / "one")
    bloom.save_pretrained(tmp_path / "shards", max_shard_size="40KB")
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 2
    inputs = _inputs(ALL["bloom"], bloom)
    one, shards = _meta_qlora("bloom", d), _meta_qlora("bloom", d)
    qkernels.load_checkpoint(one, tmp_path / "one")
    qkernels.load_checkpoint(shards, tmp_path / "shards")
    assert one.lm_head.weight is one.transformer.word_embeddings.weight  # tied, not missing
    assert torch.equal(_logits(one.eval(), inputs), _logits(shards.eval(), inputs))

    sd = load_file(tmp_path / "one" / "model.safetensors")
    del sd["transformer.ln_f.bias"]
    sd["extra.weight"] = torch.zeros(1)
    (tmp_path / "bad").mkdir()
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(RuntimeError, match=r"missing keys \['transformer.ln_f.bias'\].*unexpected keys "
                                           r"\['extra.weight'\]; pass strict=False"):
        qkernels.load_checkpoint(_meta_qlora("bloom", d), tmp_path / "bad")
    assert qkernels.load_checkpoint(_meta_qlora("bloom", d), tmp_path / "bad" / "model.safetensors",
                                    strict=False) == (["transformer.ln_f.bias"], ["extra.weight"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qkernels.load_checkpoint(bloom, tmp_path / "nowhere")
    # an index naming a shard that is gone: refused before anything loads (quantize_checkpoint's shard listing)
    next(f for f in sorted((tmp_path / "shards").glob("*.safetensors"))).unlink()
    with pytest.raises(FileNotFoundError, match="names shards that do not exist"):
        qkernels.load_checkpoint(_meta_qlora("bloom", d), tmp_path / "shards")


def test_a_router_that_subclasses_linear_is_refused_and_the_rest_matches_peft(saved):
    """PhiMoE's router is an nn.Linear subclass returning (logits, weights, experts): peft's all-linear wraps it and
    its forward then fails (``'tuple' object has no attribute 'dtype'``); apply_qlora refuses it by name, and with the
    exclusion it names wraps what peft wraps, with peft's outputs."""
    arch, d = ALL["phimoe"], saved("phimoe")
    theirs = peft.get_peft_model(_load("phimoe", d, four_bit=True), peft.LoraConfig(target_modules="all-linear"))
    inputs = _inputs(arch, theirs)
    with pytest.raises(AttributeError, match="'tuple' object has no attribute"):
        _logits(theirs, inputs)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.router' is a PhimoeTopKRouter: its forward returns "
                                         r"tuple.*exclude_modules=\['router'\]"):
        _apply(_load("phimoe", d, four_bit=True))
    ours = _apply(_load("phimoe", d, four_bit=True), exclude_modules=["router"])
    theirs = peft.get_peft_model(_load("phimoe", d, four_bit=True), peft.LoraConfig(
        target_modules="all-linear", exclude_modules=["router"], r=R, lora_alpha=ALPHA))
    assert _lora_names(ours) == _lora_names(theirs) and _lora_names(theirs)
    randomize(ours, "default", seed=2)
    _copy_lora(ours, theirs)
    assert_matches(_logits(ours, inputs), _logits(theirs, inputs), _logits(_reference64("phimoe", d, ours), inputs))


class _NanoTied(nn.Module):
    """nanoGPT's tie without transformers: ``wte.weight = lm_head.weight``, and no ``tie_weights``."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.fc = nn.Embedding(96, 64), nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 96, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.fc(self.wte(ids))))


def test_load_checkpoint_reties_a_model_without_tie_weights(tmp_path):
    """Bug: a model that shares a Parameter without transformers' tie_weights (nanoGPT) failed load_checkpoint with
    "missing keys ['wte.weight'] (... not tied to a key that is)": safetensors saves the shared weight once and
    assign=True gave only that name the new Parameter, the other kept the meta one. The model's ties are restored."""
    from safetensors.torch import save_model

    torch.manual_seed(0)
    src = apply_qlora(_NanoTied(), ["fc", "lm_head"], r=4)
    save_model(src, str(tmp_path / "model.safetensors"))  # keeps one name of the shared weight
    with torch.device("meta"):
        dst = _NanoTied()
    apply_qlora(dst, ["fc", "lm_head"], r=4)
    assert qkernels.load_checkpoint(dst, tmp_path) == ([], [])
    assert dst.lm_head.weight is dst.wte.weight and not dst.lm_head.weight.is_meta
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(dst(ids), src(ids))


@pytest.mark.parametrize("head", ["untargeted", "targeted"])
def test_load_checkpoint_ties_towards_the_weight_the_checkpoint_holds(head, tmp_path):
    """Bug (tests/fuzz_vs_peft.py, flow a): safetensors' ``save_model`` keeps one name of a shared tensor, for a tied
    OPT the head's (``lm_head.weight``). transformers' ``tie_weights()`` then pointed the loaded head back at the
    embedding, still on meta: load_checkpoint reported nothing missing and the forward failed with "Tensor on device
    cpu is not on the expected device meta". ``from_pretrained`` ties such a checkpoint towards the loaded weight, and
    so does load_checkpoint now: the tie kept, nothing meta, the source model's logits bit for bit."""
    import accelerate
    from safetensors.torch import save_model

    config = transformers.OPTConfig(vocab_size=64, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                    num_attention_heads=4, word_embed_proj_dim=64, tie_word_embeddings=True)
    targets = "all-linear" if head == "untargeted" else ["q_proj", "v_proj", "fc1", "k_proj", "out_proj", "fc2",
                                                          "lm_head"]
    torch.manual_seed(0)
    src = apply_qlora(transformers.OPTForCausalLM(config).eval(), targets, r=4)
    randomize(src, "default", seed=1)
    save_model(src, str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    assert "model.decoder.embed_tokens.weight" not in load_file(tmp_path / "model.safetensors")
    with accelerate.init_empty_weights():
        dst = transformers.OPTForCausalLM(config)
    apply_qlora(dst, targets, r=4)
    assert qkernels.load_checkpoint(dst, tmp_path) == ([], [])
    assert not [n for n, p in dst.named_parameters(remove_duplicate=False) if p.is_meta]
    assert dst.lm_head.weight is dst.model.decoder.embed_tokens.weight
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(dst.eval()(ids).logits, src(ids).logits)


def test_quantize_checkpoint_leaves_linear_subclasses_float_as_transformers_loader(saved, tmp_path):
    """transformers' bitsandbytes loader converts ``type(m) is nn.Linear`` only: quantize_checkpoint wrote Falcon's
    FalconLinear layers 4-bit, and ``from_pretrained`` of the result failed on a size mismatch; on PhiMoE it took the
    router (``PhimoeTopKRouter``) for a target and failed on its key. 'all-linear' now leaves them float (PhiMoE's
    files equal transformers' own 4-bit save, tensor for tensor, and load); a list naming one is refused, and a model
    whose every Linear is a subclass (Falcon) is refused, saying to use apply_qlora."""
    d = saved("phimoe")
    qkernels.quantize_checkpoint(d, tmp_path / "q", target_modules="all-linear", double_quant=False)
    _load("phimoe", d, four_bit=True).save_pretrained(tmp_path / "t")
    ours, theirs = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "t" / "model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = _exact_bnb(transformers.PhimoeForCausalLM.from_pretrained(tmp_path / "q").eval())
    inputs = _inputs(ALL["phimoe"], loaded)
    assert torch.equal(_logits(loaded, inputs), _logits(_load("phimoe", tmp_path / "t", four_bit=False), inputs))
    with pytest.raises(ValueError, match=r"PhimoeTopKRouter.*subclass nn.Linear.*exclude_modules=\['router'\]"):
        qkernels.quantize_checkpoint(d, tmp_path / "q2", target_modules=["q_proj", "router"])
    with pytest.raises(ValueError, match=r"every target is one of \['FalconLinear'\].*apply_qlora"):
        qkernels.quantize_checkpoint(saved("falcon"), tmp_path / "q3", target_modules="all-linear")
    assert not (tmp_path / "q2").exists() or not any((tmp_path / "q2").iterdir())


@pytest.mark.parametrize("kind", [k for k in ALL if k != "falcon"])  # falcon: refused (the test above)
def test_quantize_checkpoint_equals_transformers_own_4bit_save(kind, saved, tmp_path):
    """Without double quantization, quantize_checkpoint's file is transformers' 4-bit save_pretrained, tensor for
    tensor (the experts of a mixture of experts, 3-D in the model, stay float per expert in both)."""
    d = saved(kind)
    qkernels.quantize_checkpoint(d, tmp_path / "q", target_modules="all-linear", double_quant=False)
    _load(kind, d, four_bit=True).save_pretrained(tmp_path / "t")
    ours, theirs = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "t" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


@pytest.mark.parametrize("kind", ["gemma2", "olmo2", "bart"])
def test_bfloat16_model_and_its_merge_are_within_bfloat16_rounding(kind, saved):
    """A bfloat16 model after apply_qlora (nonzero B), and its merge_and_unload, against the same function in float64
    (each adapted weight ``dequant(W) + s B A``, every other weight the bfloat16 model's): each within twice the error
    of the plain bfloat16 network on those very weights (STYLE 12; measured here: about 1x, 1-3% of the largest logit,
    which is bfloat16 through two layers), plus 4 bfloat16 ulps of the output's magnitude."""
    arch, d = ALL[kind], saved(kind)
    base = _load(kind, d, four_bit=False).to(torch.bfloat16)
    ours = apply_qlora(copy.deepcopy(base), "all-linear", r=R, lora_alpha=ALPHA)
    randomize(ours, "default", seed=2)
    ref = base.double()  # base's bfloat16 values, in float64
    with torch.no_grad():
        for n, m in ours.named_modules():
            if isinstance(m, QLoRALinear):
                W = m.dequantized_weight(torch.float32).double() + m.lora_delta().double()
                ref.get_submodule(n).weight.copy_(W)
    plain = copy.deepcopy(ref).to(torch.bfloat16)
    inputs = _inputs(arch, ours)
    want = _logits(ref, inputs)
    tol = 2 * (_logits(plain, inputs).double() - want).abs().max() + 4 * 2**-8 * want.abs().max()
    for label, model in (("qkernels", ours), ("merged", merge_and_unload(copy.deepcopy(ours)))):
        err = (_logits(model, inputs).double() - want).abs().max()
        assert err <= tol, f"{label}: {err:.3g} > {tol:.3g}"


def test_reentrant_checkpointing_enabled_before_apply_qlora_trains_whisper_as_peft(saved):
    """peft's get_peft_model makes the input embeddings' output require grad when the model already checkpoints;
    transformers does it itself only for ``input_ids`` models. On Whisper (``input_features``) torch's reentrant
    checkpoint then got no input requiring grad: "element 0 of tensors does not require grad" where peft trained. Now
    the LoRA gradients equal those without checkpointing (Whisper's dropouts are 0 by default)."""
    arch, d = ALL["whisper"], saved("whisper")
    grads = {}
    for checkpointing in (False, True):
        model = _load("whisper", d, four_bit=False)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        _apply(model)
        randomize(model, "default", seed=2)
        model.train()
        inputs = _inputs(arch, model)
        model(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and all(g is not None for g in grads[True].values())
    for n, g in grads[False].items():
        assert torch.allclose(grads[True][n], g, rtol=1e-5, atol=1e-7), n  # recomputed in the same order: ~equal


def test_a_transformers_4_moe_adapter_on_expert_linears_is_refused_naming_why(tmp_path):
    """A peft adapter trained under transformers 4 on Mixtral's per-expert Linear layers (``w1``): transformers 5 holds
    those experts as one 3-D parameter, which peft then adapts as ``target_parameters``; qkernels cannot, and says so
    (not only that the module does not exist), loading nothing."""
    cfg_cls, model_cls = _classes(MOES["mixtral"])
    make = lambda: model_cls(cfg_cls(**MOES["mixtral"].kwargs))  # noqa: E731
    model = apply_qlora(make(), ["q_proj"], r=R, lora_alpha=ALPHA, compute_dtype=torch.float32)
    qkernels.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "w1"]}))
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    w1 = "base_model.model.model.layers.0.block_sparse_moe.experts.0.w1"
    sd[f"{w1}.lora_A.weight"], sd[f"{w1}.lora_B.weight"] = torch.zeros(R, 8), torch.zeros(8, R)
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    target = apply_qlora(make(), ["q_proj"], r=R, lora_alpha=ALPHA, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"experts\.0\.w1' does not exist in MixtralForCausalLM; transformers 5 stores "
                                         r"it merged into a 3-D parameter.*target_parameters"):
        qkernels.load_adapter(target, tmp_path, adapter_name="v4")
    assert "v4" not in qkernels.adapter_names(target)
