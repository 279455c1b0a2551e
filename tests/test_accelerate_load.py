"""accelerate's big-model loaders on a meta model whose Linear layers are ``QLoRALinear``.

``init_empty_weights`` -> ``apply_qlora`` -> ``accelerate.load_checkpoint_in_model(model, ckpt, device_map=...)`` or
``load_checkpoint_and_dispatch``: accelerate sets each checkpoint key on its own (``set_module_tensor_to_device``),
quant-state keys included, by attribute path (see ``qkernels/_accelerate.py``). Each result is compared with the same
model built normally on the CPU and loaded with ``load_state_dict``: every state-dict tensor bit for bit and the logits
with ``torch.equal``.
"""

from __future__ import annotations

import json

import accelerate
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import qkernels
from qkernels import apply_qlora

from ._oracle import same_bits

CFG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
           tie_word_embeddings=False)
FP4 = dict(quant_type="fp4", double_quant=True)  # transformers' BitsAndBytesConfig default type, with double quant
IDS = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def _cfg() -> LlamaConfig:
    return LlamaConfig(**CFG)


def _meta_model(**kw) -> torch.nn.Module:
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(_cfg())
    return apply_qlora(model, kw.pop("target_modules", "all-linear"), r=4, **kw)


def _normal_model(sd: dict[str, torch.Tensor], **kw) -> torch.nn.Module:
    """Built on the CPU (float weights quantized, then replaced) and loaded with load_state_dict."""
    torch.manual_seed(11)
    model = apply_qlora(LlamaForCausalLM(_cfg()), kw.pop("target_modules", "all-linear"), r=4, **kw)
    model.load_state_dict(sd)
    return model.eval()


def _assert_same(model: torch.nn.Module, ref: torch.nn.Module, lora_from_checkpoint: bool = True) -> None:
    """Same tensors bit for bit (LoRA A aside when the checkpoint had none: both random, B = 0) and equal logits."""
    sa, sb = model.state_dict(), ref.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if lora_from_checkpoint or "lora_A" not in k:
            assert same_bits(sa[k], sb[k]), k
    assert all(not p.is_meta for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)


def _load(how: str, model: torch.nn.Module, ckpt) -> torch.nn.Module:
    if how == "load_checkpoint_in_model":
        accelerate.load_checkpoint_in_model(model, str(ckpt), device_map={"": "cpu"})
        return model
    device_map = {"": "cpu"} if how == "dispatch_cpu" else "auto"  # "auto" on a machine without GPU: all on the CPU
    return accelerate.load_checkpoint_and_dispatch(model, str(ckpt), device_map=device_map)


HOWS = ["load_checkpoint_in_model", "dispatch_cpu", "dispatch_auto"]


@pytest.fixture(scope="module")
def transformers_4bit(tmp_path_factory) -> dict:
    """transformers' save_pretrained of a BitsAndBytesConfig model (fp4, double quant): one file and 30 KB shards."""
    root = tmp_path_factory.mktemp("q4")
    torch.manual_seed(0)
    LlamaForCausalLM(_cfg()).save_pretrained(root / "dense")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                    bnb_4bit_use_double_quant=True)
    loaded = AutoModelForCausalLM.from_pretrained(root / "dense", quantization_config=bnb_config, device_map="cpu")
    loaded.save_pretrained(root / "q4")
    loaded.save_pretrained(root / "q4s", max_shard_size="30KB")
    sd = load_file(root / "q4" / "model.safetensors")
    return {"dir": root / "q4", "sharded": root / "q4s", "sd": sd, "ref": _normal_model(sd, **FP4)}


# ---------------------------------------------------------------------------------------------- what works
@pytest.mark.parametrize("how", HOWS)
def test_a_transformers_4bit_checkpoint(transformers_4bit, how):
    model = _load(how, _meta_model(**FP4), transformers_4bit["dir"])
    _assert_same(model, transformers_4bit["ref"], lora_from_checkpoint=False)
    B = model.model.layers[0].mlp.up_proj.lora_B.default.weight  # LoRA absent from the checkpoint: initialized
    assert torch.equal(B, torch.zeros_like(B))
    st = model.model.layers[1].self_attn.o_proj.weight.quant_state
    assert (st.quant_type, st.nested, st.blocksize) == ("fp4", True, 64)


@pytest.mark.parametrize("how", ["load_checkpoint_in_model", "dispatch_cpu"])
def test_lora_on_the_embedding_absent_from_a_base_checkpoint_is_initialized(transformers_4bit, how):
    """accelerate assigns the embedding's weight directly: its meta LoRA is initialized (peft's embedding init: A = 0,
    B normal) before dispatch_model moves the model, or at the first forward after load_checkpoint_in_model."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
    model = _load(how, _meta_model(target_modules=targets, **FP4), transformers_4bit["dir"])
    ref = _normal_model(transformers_4bit["sd"], target_modules=targets, **FP4)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    A, B = model.model.embed_tokens.lora_embedding_A["default"], model.model.embed_tokens.lora_embedding_B["default"]
    assert torch.equal(A, torch.zeros_like(A)) and not B.is_meta and bool(B.abs().sum() > 0)


@pytest.mark.parametrize("how", ["load_checkpoint_in_model", "dispatch_auto"])
def test_a_transformers_sharded_checkpoint_with_quant_states_split_from_their_weights(transformers_4bit, how):
    index = json.loads((transformers_4bit["sharded"] / "model.safetensors.index.json").read_text())["weight_map"]
    split = [k for k in index if ".weight." in k and index[k] != index[k.rpartition(".weight.")[0] + ".weight"]]
    assert split  # what the test is about: some quant-state keys live in another shard than their weight
    model = _load(how, _meta_model(**FP4), transformers_4bit["sharded"])
    _assert_same(model, transformers_4bit["ref"], lora_from_checkpoint=False)


def _own_checkpoint(**kw) -> dict[str, torch.Tensor]:
    """qkernels' own state dict (nf4, double quant, bs 64 unless told), LoRA randomized (B != 0: a LoRA weight that
    did not load would show in the logits)."""
    torch.manual_seed(3)
    model = apply_qlora(LlamaForCausalLM(_cfg()), "all-linear", r=4, **kw)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("fmt", [dict(), dict(quant_type="fp4", double_quant=False, blocksize=128),
                                 dict(quant_storage=torch.bfloat16, blocksize=32)],
                         ids=["nf4-dq", "fp4-bs128", "nf4-bf16storage"])
def test_qkernels_own_safetensors_checkpoint(tmp_path, how, fmt):
    sd = _own_checkpoint(**fmt)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    # the format must be the checkpoint's (quant_type, double quant, storage); the blocksize may differ
    build = {k: v for k, v in fmt.items() if k != "blocksize"}
    model = _load(how, _meta_model(**build), tmp_path)
    _assert_same(model, _normal_model(sd, **fmt))


@pytest.mark.parametrize("weight_first", [True, False], ids=["weight-first", "quant-state-first"])
def test_an_index_json_checkpoint_with_a_weight_and_its_quant_state_in_different_shards(tmp_path, weight_first):
    """Shards are loaded in file-name order: the packed weight arrives before or after its absmax / quant_map, and
    while a layer's weight is incomplete it refuses to run, naming the keys it waits for."""
    sd = _own_checkpoint()
    layer = "model.layers.0.self_attn.q_proj.weight"
    early = {k for k in sd if k == layer} if weight_first else {f"{layer}.absmax", f"{layer}.quant_map"}
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in sd.items() if k in early},
              "model-00002-of-00002.safetensors": {k: v for k, v in sd.items() if k not in early}}
    index = {"metadata": {}, "weight_map": {}}
    for f, part in shards.items():
        save_file(part, tmp_path / f, metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(part, f))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    model = _meta_model()
    accelerate.load_checkpoint_in_model(model, str(tmp_path / "model-00001-of-00002.safetensors"),
                                        device_map={"": "cpu"})
    with pytest.raises(RuntimeError, match=r"its weight is partly loaded.*but not \["):
        model.model.layers[0].self_attn.q_proj(torch.randn(2, 64))
    accelerate.load_checkpoint_in_model(model, str(tmp_path / "model-00002-of-00002.safetensors"),
                                        device_map={"": "cpu"})
    ref = _normal_model(sd)
    _assert_same(model, ref)
    # the index json itself, and its folder
    for ckpt in (tmp_path / "model.safetensors.index.json", tmp_path):
        model = _meta_model()
        accelerate.load_checkpoint_in_model(model, str(ckpt), device_map={"": "cpu"})
        _assert_same(model, ref)


@pytest.mark.parametrize("device_map", [{"": "cpu"}, None], ids=["cpu", "none"])
def test_a_model_built_on_the_cpu_reloads_through_accelerate(tmp_path, device_map):
    """Not only meta models: accelerate's loader replaces a real layer's weight and quant state too, key by key with
    a device_map, and through torch's set_model_state_dict (load_state_dict) without one."""
    sd = _own_checkpoint()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    torch.manual_seed(99)
    model = apply_qlora(LlamaForCausalLM(_cfg()), "all-linear", r=4)
    accelerate.load_checkpoint_in_model(model, str(tmp_path), device_map=device_map)
    _assert_same(model, _normal_model(sd))


@pytest.mark.parametrize("lora", ["trained", "base-only"])
@pytest.mark.parametrize("case", ["embedding-lora", "tied-head", "keep-float", "modules-to-save"])
def test_other_layer_kinds_load_through_accelerate(tmp_path, case, lora):
    """LoRA on the input embedding, a head tied to it (float base sharing the embedding's Parameter: as for any
    transformers model built under init_empty_weights, call tie_weights() before accelerate loads, so accelerate sees
    the tie), a Linear kept float, and a module to save (qkernels' own state dict: its keys are the wrapper's).
    base-only: no LoRA keys in the checkpoint (the source's LoRA at its init, B = 0 / embedding A = 0): the meta
    model's LoRA is initialized at load and adds nothing either."""
    if case == "modules-to-save" and lora == "base-only":
        pytest.skip("a base checkpoint's 'score.weight' is no key of the wrapped model: accelerate drops it (README)")
    from transformers import LlamaForSequenceClassification

    cls, cfg_kw, kw = LlamaForCausalLM, {}, dict(target_modules="all-linear")
    if case == "embedding-lora":
        kw = dict(target_modules=["q_proj", "v_proj", "embed_tokens"])
    elif case == "tied-head":
        cfg_kw, kw = {"tie_word_embeddings": True}, dict(target_modules=["q_proj", "lm_head"])
    elif case == "keep-float":
        kw = dict(target_modules="all-linear", keep_float_modules=["o_proj"])
    else:
        cls, cfg_kw, kw = LlamaForSequenceClassification, {"num_labels": 3}, dict(modules_to_save=["score"])
    cfg = LlamaConfig(**{**CFG, **cfg_kw})
    torch.manual_seed(5)
    src = apply_qlora(cls(cfg), r=4, **kw).eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_" in n and lora == "trained":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    sd = {k: v.detach().clone().contiguous() for k, v in src.state_dict().items()
          if lora == "trained" or "lora_" not in k}
    if case == "tied-head":
        del sd["lm_head.weight"]  # saved once, under the embedding
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with accelerate.init_empty_weights():
        model = cls(cfg)
    apply_qlora(model, r=4, **kw)
    model.tie_weights()
    model = accelerate.load_checkpoint_and_dispatch(model, str(tmp_path), device_map={"": "cpu"}).eval()
    assert all(not p.is_meta for p in model.parameters())
    if case == "tied-head":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, src(IDS).logits)


def test_cast_to_bfloat16_after_loading_keeps_the_4bit_weights(transformers_4bit):
    """The fix the dtype= refusal names: load, then model.to(torch.bfloat16)."""
    model = _load("dispatch_cpu", _meta_model(**FP4), transformers_4bit["dir"]).to(torch.bfloat16)
    ref = _normal_model(transformers_4bit["sd"], **FP4).to(torch.bfloat16)
    _assert_same(model, ref, lora_from_checkpoint=False)
    assert model.model.layers[0].mlp.down_proj.weight.quant_state.absmax.dtype == torch.uint8


# ---------------------------------------------------------------------------------------------- what is refused
def _layer_unloaded(model: torch.nn.Module) -> None:
    with pytest.raises(RuntimeError, match="never loaded|partly loaded"):
        model(IDS)


@pytest.mark.parametrize("how", ["load_checkpoint_in_model", "dispatch_cpu"])
def test_dtype_casting_the_quant_state_is_refused_naming_the_key_and_the_fix(transformers_4bit, how):
    model = _meta_model(**FP4)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight\.nested_absmax' arrived as "
                                         r"torch\.bfloat16.*float32.*dtype=.*model\.to\(dtype\)"):
        if how == "load_checkpoint_in_model":
            accelerate.load_checkpoint_in_model(model, str(transformers_4bit["dir"]), device_map={"": "cpu"},
                                                dtype=torch.bfloat16)
        else:
            accelerate.load_checkpoint_and_dispatch(model, str(transformers_4bit["dir"]), device_map={"": "cpu"},
                                                    dtype="bfloat16")
    down = model.model.layers[0].mlp.down_proj
    assert "weight" in down._unloaded and all(v.dtype != torch.bfloat16 for v in down._pending_weight.values())
    _layer_unloaded(model)


def test_a_float_stored_packed_weight_cast_by_dtype_is_refused(tmp_path):
    sd = _own_checkpoint(quant_storage=torch.float32)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = _meta_model(quant_storage=torch.float32)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' arrived as torch\.float16.*"
                                         r"torch\.float32 \(this layer's quant_storage\)"):
        accelerate.load_checkpoint_in_model(model, str(tmp_path), device_map={"": "cpu"}, dtype=torch.float16)


@pytest.mark.parametrize("strict", [False, True])
def test_a_checkpoint_in_another_format_names_the_apply_qlora_argument(transformers_4bit, tmp_path, strict):
    """accelerate loads only keys the model's state dict has (strict=False drops the others) and casts each to the
    model tensor's dtype: a model built nf4 for an fp4 checkpoint, or without double quant, is refused at load."""
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight\.(quant_map|quant_state\.bitsandb"
                                         r"ytes__fp4)'.*fp4.*apply_qlora\(\.\.\., quant_type='fp4'\)"):
        accelerate.load_checkpoint_in_model(_meta_model(), str(transformers_4bit["dir"]), device_map={"": "cpu"},
                                            strict=strict)
    with pytest.raises(ValueError, match=r"down_proj\.weight\.(nested_absmax|quant_state\.bitsandbytes__fp4)'.*"
                                         r"double-quantized.*apply_qlora\(\.\.\., double_quant=True\)"):
        accelerate.load_checkpoint_in_model(_meta_model(quant_type="fp4", double_quant=False),
                                            str(transformers_4bit["dir"]), device_map={"": "cpu"}, strict=strict)
    save_file(_own_checkpoint(double_quant=False), tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not double-quantized \(float32\).*cast it to uint8.*double_quant=False"):
        accelerate.load_checkpoint_in_model(_meta_model(), str(tmp_path), device_map={"": "cpu"}, strict=strict)


@pytest.mark.parametrize("corrupt", ["absmax-shape", "blob-json", "blob-shape", "nan-scale"])
def test_a_corrupted_quant_state_names_the_key_and_loads_nothing_of_the_layer(tmp_path, corrupt):
    sd = _own_checkpoint()
    key = "model.layers.1.self_attn.v_proj.weight"
    blob = f"{key}.quant_state.bitsandbytes__nf4"
    if corrupt == "absmax-shape":
        sd[f"{key}.absmax"] = sd[f"{key}.absmax"][:-1].clone()
        match = r"absmax must have one entry per block"
    elif corrupt == "blob-json":
        sd[blob] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
        match = r"not valid JSON"
    elif corrupt == "blob-shape":
        meta = json.loads(bytes(sd[blob].tolist()))
        meta["shape"] = [64, 64]
        sd[blob] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        match = r"shape \(64, 64\) at blocksize 64 has 64 blocks, but absmax has shape \(32,\)"
    else:
        sd[f"{key}.nested_absmax"] = torch.full_like(sd[f"{key}.nested_absmax"], float("nan"))
        match = r"nested_absmax.*NaN"
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = _meta_model()
    with pytest.raises(ValueError, match=rf"{key.replace('.', '[.]')}.*{match}"):
        accelerate.load_checkpoint_in_model(model, str(tmp_path), device_map={"": "cpu"})
    v_proj = model.model.layers[1].self_attn.v_proj
    assert v_proj.weight.is_meta or "weight" in v_proj._unloaded
    with pytest.raises(RuntimeError, match="partly loaded|never loaded"):
        v_proj(torch.randn(1, 64))


def test_disk_offload_is_refused_naming_the_fix(transformers_4bit, tmp_path):
    """A device_map 'disk' entry: accelerate moves the packed weight to meta without its quant state (and its hook
    would put back only the weight before each forward): refused at load, naming the device maps that work."""
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with pytest.raises(ValueError, match=r"offload.*device_map=\{'': 'cpu'\}"):
        accelerate.load_checkpoint_and_dispatch(_meta_model(**FP4), str(transformers_4bit["dir"]),
                                                device_map=device_map, offload_folder=str(tmp_path / "offload"))


def test_without_a_device_map_accelerate_fails_on_any_meta_model(transformers_4bit):
    """load_checkpoint_in_model without device_map goes through torch.distributed.checkpoint's set_model_state_dict,
    which on a model whose every saved tensor is meta asks for a process group (accelerate 1.15, torch 2.13): a plain
    Llama fails the same way. The fix is a device_map (above). If this starts passing, README's note is stale."""
    with accelerate.init_empty_weights():
        plain = AutoModelForCausalLM.from_config(_cfg())
    with pytest.raises(ValueError, match="process group"):
        accelerate.load_checkpoint_in_model(plain, str(transformers_4bit["dir"]))
    with pytest.raises(ValueError, match="process group"):
        accelerate.load_checkpoint_in_model(_meta_model(**FP4), str(transformers_4bit["dir"]))


def test_meta_pieces_link_survives_deepcopy_and_pickle(transformers_4bit):
    """The weak link from a weight to its layer (how accelerate's keys reach the layer) is rebuilt, never copied."""
    import copy
    import pickle

    model = _meta_model(**FP4)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        w = clone.model.layers[0].mlp.up_proj.weight
        assert qkernels._accelerate.owner(w) is clone.model.layers[0].mlp.up_proj
        assert qkernels._accelerate.owner(w.quant_state) is clone.model.layers[0].mlp.up_proj
        accelerate.load_checkpoint_in_model(clone, str(transformers_4bit["dir"]), device_map={"": "cpu"})
        _assert_same(clone, transformers_4bit["ref"], lora_from_checkpoint=False)


# ---------------------------------------------------------------------------------------------- DoRA on meta
@pytest.mark.parametrize("how", ["load_state_dict", "load_checkpoint_in_model", "dispatch_auto"])
def test_dora_added_on_meta_takes_peft_s_initial_magnitude_when_the_weight_arrives(transformers_4bit, how):
    """peft sets a DoRA magnitude to the row norms of W + s B A when the adapter is added; on meta there is no W,
    so the layer computes it when the weight is loaded (a base-only checkpoint: B = 0, the norms of W), equal to the
    model built on the CPU with DoRA and loaded normally."""
    model = _meta_model(use_dora=True, **FP4)
    up = model.model.layers[0].mlp.up_proj
    assert up.lora_magnitude_vector["default"].weight.is_meta
    if how == "load_state_dict":
        model.load_state_dict(transformers_4bit["sd"], assign=True)
    else:
        model = _load(how, model, transformers_4bit["dir"])
    ref = _normal_model(transformers_4bit["sd"], use_dora=True, **FP4)
    _assert_same(model, ref, lora_from_checkpoint=False)
    mag = up.lora_magnitude_vector["default"].weight
    assert mag.requires_grad and mag.dtype == torch.float32
    torch.testing.assert_close(mag, torch.linalg.vector_norm(up.dequantized_weight(), dim=1), rtol=2e-6, atol=0)


@pytest.mark.parametrize("how", HOWS)
def test_a_dora_checkpoint_loads_its_trained_magnitudes_into_a_meta_model(tmp_path, how):
    sd = _own_checkpoint(use_dora=True)  # magnitudes randomized too
    assert any("lora_magnitude_vector" in k for k in sd)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = _load(how, _meta_model(use_dora=True), tmp_path)
    _assert_same(model, _normal_model(sd, use_dora=True))


def test_bitsandbytes_linear4bit_fails_under_the_same_calls(transformers_4bit):
    """What README says of the incumbent: a meta bitsandbytes Linear4bit has no quant-state keys in its state dict,
    so accelerate drops the checkpoint's, bitsandbytes quantizes the packed bytes as if they were the float weight
    ([n/2, 1] uint8 -> a weight of that shape), and the forward fails on the shapes. If this starts passing, README's
    comparison is stale."""
    import bitsandbytes as bnb

    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(_cfg())
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and name != "lm_head":
                    setattr(parent, name, bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                                            compute_dtype=torch.float32, quant_type="fp4"))
    accelerate.load_checkpoint_in_model(model, str(transformers_4bit["dir"]), device_map={"": "cpu"})
    assert tuple(model.model.layers[0].mlp.up_proj.weight.quant_state.shape) != (128, 64)  # the bytes' shape
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        model(IDS)
