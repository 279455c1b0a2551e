"""Big-model workflows: QLoRA layers built on the meta device, then loaded from a 4-bit checkpoint.

A 70B model cannot be materialized in float to be quantized. So ``QLoRALinear(device="meta")`` and ``apply_qlora`` on a
model whose Linear layers are meta (``torch.device("meta")``, accelerate's ``init_empty_weights``, transformers'
``from_config`` under it) build layers that know their shapes and format and compute nothing; the values come from
``load_state_dict(sd, assign=True)`` (or ``to_empty`` + ``load_state_dict``), and a layer that was never loaded refuses
to run instead of running on meta or uninitialized memory.
"""

from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import torch
from torch import nn

import qkernels
from qkernels import QLoRALinear, apply_qlora

from ._oracle import bnb, same_bits

IN, HID, OUT = 128, 200, 72  # 200 * 128 = 25600 values: 400 blocks at bs 64, two nested blocks (the last partial)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT, bias=False))


def _meta_net(**kw) -> nn.Module:
    with torch.device("meta"):
        net = _net()
    return apply_qlora(net, "all-linear", r=4, lora_alpha=8, **kw)


def _built_normally(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return apply_qlora(_net(), "all-linear", r=4, lora_alpha=8, **kw)


def _randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Nonzero A and B: a fresh adapter has B = 0 and would hide a LoRA weight that did not load."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _x(seed: int = 3) -> torch.Tensor:
    return torch.randn(5, IN, generator=torch.Generator().manual_seed(seed))


def _bnb_checkpoint(quant_type: str = "fp4", blocksize: int = 128, compress_statistics: bool = False,
                    quant_storage: torch.dtype = torch.uint8) -> dict[str, torch.Tensor]:
    """A bitsandbytes ``Linear4bit`` model's state dict (base only: no LoRA keys) with the same module names."""
    torch.manual_seed(7)
    dense = _net()
    model = _net()
    for i in (0, 2):
        lin = dense[i]
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=compress_statistics, quant_storage=quant_storage)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=compress_statistics, blocksize=blocksize,
                                     quant_storage=quant_storage)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone())
        model[i] = q.to("cpu")  # bitsandbytes quantizes on the first move
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- building on meta
FORMATS = [
    dict(quant_type="nf4", blocksize=64, double_quant=True, quant_storage=torch.uint8),
    dict(quant_type="fp4", blocksize=128, double_quant=False, quant_storage=torch.uint8),
    dict(quant_type="nf4", blocksize=32, double_quant=True, quant_storage=torch.bfloat16),
    dict(quant_type="nf4", blocksize=4096, double_quant=True, quant_storage=torch.float32),
]


def _fmt_id(f: dict) -> str:
    return f"{f['quant_type']}-bs{f['blocksize']}-dq{int(f['double_quant'])}-{str(f['quant_storage'])[6:]}"


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("shape", [(113, 37), (64, 256)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_meta_layer_has_the_shapes_of_its_format_and_computes_nothing(monkeypatch, fmt, shape):
    """Every tensor (packed weight, absmax, codebooks, offset, nested absmax, bias, LoRA) has the shape and dtype a real
    layer of that format has, on the meta device, and no quantization ran."""
    real = QLoRALinear(*shape, r=3, dtype=torch.bfloat16, **fmt)
    monkeypatch.setattr(qkernels.nn, "quantize_4bit", lambda *a, **k: pytest.fail("a meta layer quantized"))
    meta = QLoRALinear(*shape, r=3, dtype=torch.bfloat16, device="meta", **fmt)
    sd_real, sd_meta = real.state_dict(), meta.state_dict()
    assert list(sd_meta) == list(sd_real)
    blob = f"weight.quant_state.bitsandbytes__{fmt['quant_type']}"  # JSON bytes: their length depends on the offset
    for k, v in sd_meta.items():
        assert v.is_meta, k
        assert v.dtype == sd_real[k].dtype, k
        assert k == blob or v.shape == sd_real[k].shape, k
    st, st_real = meta.weight.quant_state, real.weight.quant_state
    assert (st.shape, st.blocksize, st.quant_type, st.nested, st.dtype) == (
        st_real.shape, st_real.blocksize, st_real.quant_type, st_real.nested, torch.bfloat16)
    assert meta.weight.dtype == fmt["quant_storage"] and meta.weight.shape == real.weight.shape
    assert meta.extra_repr() == real.extra_repr()
    assert qkernels.trainable_parameters(meta) == qkernels.trainable_parameters(real)


def test_apply_qlora_on_meta_models_under_torch_device_and_accelerate():
    from accelerate import init_empty_weights

    with torch.device("meta"):
        a = _net()
    with init_empty_weights():
        b = _net()
    with init_empty_weights():  # apply_qlora inside the context: each new parameter is moved to meta as registered
        c = apply_qlora(_net(), "all-linear", r=4)
        d = QLoRALinear(IN, HID, r=4)
    with torch.device("meta"):
        e = QLoRALinear(IN, HID, r=4)
    layers = [apply_qlora(a, "all-linear", r=4)[0], apply_qlora(b, "all-linear", r=4)[0], c[0], d, e]
    for layer in layers:
        st = layer.weight.quant_state
        assert isinstance(layer, QLoRALinear) and type(layer.weight).__name__ == "Params4bit"
        tensors = [layer.weight, st.absmax, st.code, st.offset, st.state2.absmax, st.state2.code, *layer.parameters()]
        assert all(t.is_meta for t in tensors)
        assert st.absmax.shape == (IN * HID // 64,) and layer.weight.shape == (IN * HID // 2, 1)
        with pytest.raises(RuntimeError, match=r"\['bias', 'lora_A.default.weight', 'lora_B.default.weight', "
                                               r"'weight'\] never loaded.*meta device.*assign=True"):
            layer(torch.randn(2, IN))


def test_loftq_on_meta_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="loftq.*meta device.*real device"):
        QLoRALinear(IN, HID, device="meta", init_lora_weights="loftq")
    with torch.device("meta"):
        net = _net()
    with pytest.raises(ValueError, match="loftq.*meta device"):
        apply_qlora(net, "all-linear", init_lora_weights="loftq")


# ---------------------------------------------------------------------------------------------- loading
def _assert_same_model(a: nn.Module, b: nn.Module) -> None:
    """Same packed bytes, quant states, float tensors (values and dtypes), and bit-identical outputs."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:  # bits: a bf16 / fp16 quant_storage view of packed bytes holds NaN patterns
        assert same_bits(sa[k], sb[k]), k
    x = _x()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("how", ["assign", "to_empty"])
def test_a_meta_model_loads_our_checkpoint_and_runs_bit_identically(how):
    """LoRA included (randomized, so a LoRA weight that did not load would show)."""
    ref = _built_normally()
    _randomize_lora(ref)
    sd = ref.state_dict()
    normal = _built_normally(seed=5)
    normal.load_state_dict(sd)
    meta = _meta_net()
    if how == "assign":
        assert meta.load_state_dict(sd, assign=True) is not None
    else:
        meta.to_empty(device="cpu")
        meta.load_state_dict(sd)
    _assert_same_model(meta, normal)
    _assert_same_model(meta, ref)
    assert all(p.requires_grad == ("lora_" in n) for n, p in meta.named_parameters())
    assert all(p.device.type == "cpu" for p in meta.parameters())


@pytest.mark.parametrize("how", ["assign", "to_empty"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16"])
def test_a_meta_model_adopts_a_bitsandbytes_checkpoint_in_another_format(how, storage):
    """Built nf4 / bs 64 / double quant, loaded from bitsandbytes fp4 / bs 128 / no double quant: the layers take the
    checkpoint's format as a whole (as a layer built normally does) and run exactly like one loaded normally. The
    checkpoint has no LoRA keys: the meta LoRA weights are initialized at load (B = 0, A kaiming-uniform)."""
    sd = _bnb_checkpoint(quant_storage=storage)
    normal = _built_normally()
    normal.load_state_dict(sd)
    meta = _meta_net()
    if how == "assign":
        meta.load_state_dict(sd, assign=True)
    else:
        meta.to_empty(device="cpu")
        meta.load_state_dict(sd)
    for i in (0, 2):
        st = meta[i].weight.quant_state
        assert (st.quant_type, st.blocksize, st.nested, meta[i].weight.dtype) == ("fp4", 128, False, storage)
        assert "quant_type=fp4, blocksize=128, double_quant=False" in meta[i].extra_repr()
        B, A = meta[i].lora_B.default.weight, meta[i].lora_A.default.weight
        assert torch.equal(B, torch.zeros_like(B)) and A.device.type == "cpu"
        bound = 1 / A.shape[1] ** 0.5  # kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
        assert A.abs().max() <= bound and A.std() > bound / 4
    # LoRA differs (both random A, B = 0), all else is the checkpoint's: compare the base and the outputs
    base = {k: v for k, v in meta.state_dict().items() if "lora_" not in k}
    assert all(same_bits(v, normal.state_dict()[k]) for k, v in base.items())
    x = _x()
    with torch.no_grad():
        assert torch.equal(meta(x), normal(x))


@pytest.mark.parametrize("init", [True, "gaussian", False], ids=["true", "gaussian", "false"])
def test_lora_weights_absent_from_the_checkpoint_are_initialized_per_init_lora_weights(init):
    sd = _bnb_checkpoint()
    meta = _meta_net(init_lora_weights=init)
    meta.load_state_dict(sd, assign=True)
    B = meta[0].lora_B.default.weight
    assert torch.isfinite(B).all() and (bool(B.abs().sum() > 0) if init is False else torch.equal(B, 0 * B))
    assert meta[0].lora_A.default.weight.abs().sum() > 0
    meta(_x())  # runs: everything loaded


def test_transformers_from_config_under_init_empty_weights_loads_a_4bit_save_pretrained(tmp_path):
    """The 70B workflow at toy size: config -> empty model -> apply_qlora -> the 4-bit checkpoint transformers wrote
    (BitsAndBytesConfig, its default fp4) -> logits bit-identical to loading it with transformers + apply_qlora."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                    bnb_4bit_use_double_quant=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=bnb_config,
                                                  device_map="cpu")
    loaded.save_pretrained(tmp_path / "q4")
    loaded.save_pretrained(tmp_path / "q4s", max_shard_size="30KB")
    ref = apply_qlora(loaded, "all-linear", r=4).eval()

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    apply_qlora(model, "all-linear", r=4)
    assert model.model.layers[0].mlp.up_proj.weight.is_meta
    result = model.load_state_dict(load_file(tmp_path / "q4" / "model.safetensors"), assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    q = model.model.layers[1].self_attn.q_proj.weight.quant_state
    assert (q.quant_type, q.nested) == ("fp4", True)

    # the same checkpoint sharded by transformers, loaded one shard at a time: some weights' quant states are split
    index = json.loads((tmp_path / "q4s" / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(f != index[k.rpartition(".weight.")[0] + ".weight"] for k, f in index.items() if ".weight." in k)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    apply_qlora(model, "all-linear", r=4)
    for shard in sorted(set(index.values())):
        model.load_state_dict(load_file(tmp_path / "q4s" / shard), assign=True, strict=False)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_load_checkpoint_reports_progress_per_shard_of_a_sharded_checkpoint(tmp_path, capsys):
    """A big model's shards take minutes to read and load_checkpoint printed nothing meanwhile; it now prints a line
    per shard to stderr for a sharded checkpoint (verbose=None), none for one file unless asked."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _built_normally().state_dict().items()}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    (tmp_path / "sharded").mkdir()
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / "sharded" / name)
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    qkernels.load_checkpoint(_meta_net(), tmp_path / "sharded")
    err = capsys.readouterr().err
    assert "load_checkpoint: shard 1/2 loaded (model-00001-of-00002.safetensors" in err
    assert "load_checkpoint: shard 2/2 loaded" in err
    save_file(sd, tmp_path / "one.safetensors")
    qkernels.load_checkpoint(_meta_net(), tmp_path / "one.safetensors")
    assert capsys.readouterr().err == ""
    qkernels.load_checkpoint(_meta_net(), tmp_path / "one.safetensors", verbose=True)
    assert "load_checkpoint: shard 1/1 loaded (one.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- what must fail
def test_load_checkpoint_refuses_4bit_layers_that_apply_qlora_did_not_target(tmp_path):
    """A 4-bit checkpoint loaded into a meta model given LoRA on some layers only: the others are plain meta Linear
    layers, which cannot take a packed weight. Before, torch's "size mismatch ... [1024, 1] ... [32, 64]" came after
    the rest had loaded; now a ValueError names the layers and the target_modules to pass, and nothing loads."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    full = apply_qlora(LlamaForCausalLM(cfg), "all-linear", r=4)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, tmp_path / "model.safetensors")
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    apply_qlora(model, ["q_proj", "v_proj"], r=4)
    with pytest.raises(ValueError, match=r"5 layers in 4 bits that are plain Linear.*'all-linear'.*"
                                         r"\['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'up_proj'\]"):
        qkernels.load_checkpoint(model, tmp_path)
    assert model.model.layers[0].self_attn.q_proj.weight.is_meta and model.lm_head.weight.is_meta  # nothing loaded
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    apply_qlora(model, "all-linear", r=4)
    qkernels.load_checkpoint(model, tmp_path)  # every 4-bit layer targeted: loads
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, full(ids).logits)


def test_a_checkpoint_of_another_shape_or_rank_is_an_error_naming_the_key():
    meta = _meta_net()
    wrong = QLoRALinear(IN, HID + 1, r=4).state_dict()
    with pytest.raises(ValueError, match=r"size mismatch for '0\.weight'.*\(201, 128\).*\(200, 128\)"):
        meta.load_state_dict({f"0.{k}": v for k, v in wrong.items()}, strict=False, assign=True)
    sd = _built_normally().state_dict()
    other_rank = apply_qlora(_net(), "all-linear", r=8).state_dict()
    sd["0.lora_A.default.weight"] = other_rank["0.lora_A.default.weight"]
    sd["0.lora_B.default.weight"] = other_rank["0.lora_B.default.weight"]
    with pytest.raises(ValueError, match=r"size mismatch for '0\.lora_A\.default\.weight'.*LoRA rank"):
        meta.load_state_dict(sd, assign=True)
    assert all(t.is_meta for t in meta[0].parameters())  # nothing of the layer changed
    with pytest.raises(RuntimeError, match="never loaded"):
        meta(_x())


def test_a_partially_loaded_meta_model_refuses_to_run_and_names_what_is_missing():
    sd = _built_normally().state_dict()
    del sd["0.bias"]
    meta = _meta_net()
    result = meta.load_state_dict(sd, assign=True, strict=False)
    assert result.missing_keys == ["0.bias"]
    assert meta[0].bias.is_meta and not meta[2].weight.is_meta
    with pytest.raises(RuntimeError, match=r"in_features=128, out_features=200\): \['bias'\] never loaded"):
        meta(_x())
    with torch.no_grad():  # the other layer is complete
        meta[2](torch.randn(3, HID))
    meta.load_state_dict({"0.bias": torch.zeros(HID)}, assign=True, strict=False)  # the missing key, later
    meta(_x())

    # to_empty gives memory, not values: still refused, and said so
    meta = _meta_net()
    meta.to_empty(device="cpu")
    sd = _built_normally().state_dict()
    meta.load_state_dict({k: v for k, v in sd.items() if not k.startswith("2.")}, strict=False)
    with pytest.raises(RuntimeError, match=r"out_features=72\): \['lora_A.default.weight', 'lora_B.default.weight', "
                                           r"'weight'\] never loaded.*to_empty\(\) gave them memory but no values"):
        meta(_x())
    with pytest.raises(RuntimeError, match="never loaded"):
        qkernels.merge_and_unload(meta)
    with pytest.raises(RuntimeError, match="never loaded"):
        meta[2].dequantized_weight()


def test_loading_into_meta_without_assign_leaves_the_float_tensors_unloaded_and_says_so():
    """torch copies into a meta parameter as a no-op (with a warning); the packed weight (replaced whole) and the LoRA
    weights (initialized on the weight's device) do load, the bias does not: forward names it."""
    meta = _meta_net()
    with pytest.warns(UserWarning, match="meta"):
        meta.load_state_dict(_bnb_checkpoint())
    assert not meta[0].weight.is_meta and meta[0].bias.is_meta
    with pytest.raises(RuntimeError, match=r"\['bias'\] never loaded.*assign=True"):
        meta(_x())
    meta[2](torch.randn(2, HID))  # no bias: complete


def test_a_weight_split_across_shards_loads_shard_by_shard():
    """transformers' sharded 4-bit save puts a weight's absmax and its quant_map / blob in different shards (seen at
    max_shard_size 30KB). Loading shard by shard keeps the first part until the rest comes, in either order; the
    model runs bit-identically to one full load, and refuses to run (naming the keys) while a part is missing."""
    sd = _built_normally().state_dict()
    first = {k: v for k, v in sd.items() if k in ("0.weight", "0.weight.absmax", "0.bias") or k.startswith("2.")}
    second = {k: v for k, v in sd.items() if k not in first}
    full = _meta_net()
    full.load_state_dict(sd, assign=True)
    for shards in ([first, second], [second, first]):
        meta = _meta_net()
        result = meta.load_state_dict(shards[0], strict=False, assign=True)
        if shards[0] is first:  # the rest is missing (which nested keys, the blob will say)
            assert result.missing_keys == ["0.weight.quant_map", "0.weight.quant_state.bitsandbytes__nf4"]
        with pytest.raises(RuntimeError, match=r"out_features=200\): its weight is partly loaded.*but not \['"):
            meta(_x())
        meta.load_state_dict(shards[1], strict=False, assign=True)
        assert torch.equal(meta(_x()), full(_x()))
    with pytest.raises(ValueError, match=r"meta tensor in the state dict"):
        _meta_net().load_state_dict(_meta_net().state_dict(), assign=True)
    # a shard refused (a bad bias) keeps nothing of its part of the weight, as the load's errors promise: it kept it
    meta = _meta_net()
    with pytest.raises(ValueError, match=r"size mismatch for '0.bias'"):
        meta.load_state_dict({**first, "0.bias": torch.zeros(3)}, strict=False, assign=True)
    assert not meta[0]._pending_weight


def test_a_loaded_model_moved_to_meta_refuses_to_run():
    model = _built_normally()
    model(_x())
    model.to("meta")
    assert model[0].weight.quant_state.absmax.is_meta
    with pytest.raises(RuntimeError, match="never loaded"):
        model(_x())


# ---------------------------------------------------------------------------------------------- copies
def test_meta_and_loaded_models_deepcopy_and_pickle():
    meta = _meta_net()
    for other in (copy.deepcopy(meta), pickle.loads(pickle.dumps(meta))):
        assert other[0].weight.is_meta and other[0]._unloaded == meta[0]._unloaded
        with pytest.raises(RuntimeError, match="never loaded"):
            other(_x())
    ref = _built_normally()
    _randomize_lora(ref)
    copy.deepcopy(meta).load_state_dict(ref.state_dict(), assign=True)  # the copy loads; the original stays meta
    assert meta[0].weight.is_meta
    meta.load_state_dict(ref.state_dict(), assign=True)
    buf = io.BytesIO()
    torch.save(meta, buf)
    buf.seek(0)
    for other in (copy.deepcopy(meta), pickle.loads(pickle.dumps(meta)), torch.load(buf, weights_only=False)):
        _assert_same_model(other, meta)


def test_a_layer_pickled_by_an_older_qkernels_runs():
    """Before meta support a layer had no ``_unloaded`` / ``_lora_init``: the class defaults stand in."""
    layer = QLoRALinear(IN, HID, r=4)
    y = layer(_x())
    for attr in ("_unloaded", "_lora_init"):
        del layer.__dict__[attr]
    assert torch.equal(layer(_x()), y)
    layer.update_layer("second", 2, 4)
    assert torch.equal(layer(_x()), y)


# ---------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("order", ["adapter_first", "base_first"])
def test_a_peft_adapter_loads_into_a_meta_model_in_either_order(tmp_path, order):
    """Before: load_adapter copied into the meta LoRA weights (a no-op) and the base load then initialized them:
    the adapter was silently lost. Now its values stay, whichever comes first."""
    normal = _built_normally()
    _randomize_lora(normal)
    qkernels.save_adapter(normal, tmp_path / "ad", adapter_name="default")
    base = {k: v for k, v in normal.state_dict().items() if "lora_" not in k}
    meta = _meta_net()
    if order == "adapter_first":
        qkernels.load_adapter(meta, tmp_path / "ad", "trained")
        assert meta[0].lora_A.trained.weight.device.type == "cpu" and meta[0].lora_A.default.weight.is_meta
        meta.load_state_dict(base, assign=True)
    else:
        meta.load_state_dict(base, assign=True)
        qkernels.load_adapter(meta, tmp_path / "ad", "trained")
    x = _x()
    with torch.no_grad():
        assert torch.equal(meta(x), normal(x))


@pytest.mark.parametrize("order", ["adapter_first", "base_first"])
@pytest.mark.parametrize("wrapped", ["at_apply", "by_adapter"])
def test_an_adapter_with_modules_to_save_loads_into_a_meta_model_in_either_order(tmp_path, order, wrapped):
    """The adapter's copy of a module to save (peft's modules_to_save) keeps its values: load_adapter copied them into
    the meta copy in place (a no-op, with a warning), and the copy then stayed meta or took the base weight."""
    torch.manual_seed(0)
    normal = apply_qlora(_net(), ["0"], r=4, lora_alpha=8, modules_to_save=["2"])
    _randomize_lora(normal)
    with torch.no_grad():
        normal[2].modules_to_save["default"].weight.add_(1.0)
    qkernels.save_adapter(normal, tmp_path / "ad")
    base = {k.replace("original_module.", ""): v for k, v in normal.state_dict().items()
            if "lora_" not in k and "modules_to_save." not in k}  # the checkpoint of the model before wrapping
    with torch.device("meta"):
        meta = _net()
    apply_qlora(meta, ["0"], r=4, lora_alpha=8, modules_to_save=["2"] if wrapped == "at_apply" else None)
    if order == "adapter_first":
        qkernels.load_adapter(meta, tmp_path / "ad", replace=True)
        meta.load_state_dict(base, assign=True)
    else:
        meta.load_state_dict(base, assign=True)
        qkernels.load_adapter(meta, tmp_path / "ad", replace=True)
    with torch.no_grad():
        assert torch.equal(meta(_x()), normal(_x()))
    with torch.device("meta"):
        meta = _net()
    apply_qlora(meta, ["0"], r=4, lora_alpha=8, modules_to_save=["2"])
    meta.load_state_dict({k: v for k, v in base.items() if not k.startswith("2.")}, assign=True, strict=False)
    with pytest.raises(RuntimeError, match=r"module to save '2' for adapter 'default' was never loaded"):
        qkernels.save_adapter(meta, tmp_path / "ad2")


def test_save_adapter_of_lora_weights_never_loaded_is_refused(tmp_path):
    meta = _meta_net()
    meta.to_empty(device="cpu")  # memory, no values: saving it would write garbage
    with pytest.raises(RuntimeError, match="never loaded"):
        qkernels.save_adapter(meta, tmp_path / "ad")


def test_set_lora_weight_names_bad_arguments():
    layer = QLoRALinear(IN, HID, r=4)
    with pytest.raises(ValueError, match="which must be 'lora_A', 'lora_B', 'lora_B.bias' or 'lora_magnitude_vector'"):
        layer.set_lora_weight("default", "lora_C", torch.zeros(4, IN))
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        layer.set_lora_weight("other", "lora_A", torch.zeros(4, IN))
    with pytest.raises(ValueError, match=r"lora_A\.default\.weight has shape \(4, 128\), got \(3, 128\)"):
        layer.set_lora_weight("default", "lora_A", torch.zeros(3, IN))
    A = layer.lora_A.default.weight
    layer.set_lora_weight("default", "lora_A", torch.ones(4, IN, dtype=torch.float64))
    assert layer.lora_A.default.weight is A and torch.equal(A, torch.ones(4, IN))  # in place, cast


@pytest.mark.parametrize("how", ["assign", "to_empty"])
def test_modules_to_save_wrapped_on_meta_take_the_base_checkpoint(how):
    """apply_qlora(modules_to_save=...) on a meta model, then a base checkpoint (``2.weight``, as the model had it
    before wrapping): the original and the copy both start from it, as when wrapping after loading. It was
    'unexpected' and both stayed meta (forward returned meta logits). The copy trains without moving the original."""
    torch.manual_seed(0)
    base = apply_qlora(_net(), ["0"], r=4, lora_alpha=8)
    sd = {k: v for k, v in base.state_dict().items() if "lora_" not in k}
    want = apply_qlora(_net(), ["0"], r=4, lora_alpha=8, modules_to_save=["2"])
    want.load_state_dict({**sd, **{f"2.{w}.weight": sd["2.weight"] for w in ("original_module",
                                                                             "modules_to_save.default")}})
    with torch.device("meta"):
        meta = _net()
    apply_qlora(meta, ["0"], r=4, lora_alpha=8, modules_to_save=["2"])
    with pytest.raises(RuntimeError, match=r"copy of this module to save for adapter 'default' was never loaded"):
        meta[2](torch.randn(2, HID))
    if how == "to_empty":
        meta.to_empty(device="cpu")
    result = meta.load_state_dict(sd, assign=how == "assign")
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(meta(_x()), want(_x()))
    original = meta[2].original_module.weight.detach().clone()
    meta(_x()).square().sum().backward()
    torch.optim.SGD([p for p in meta.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.equal(meta[2].modules_to_save["default"].weight, original)
    assert torch.equal(meta[2].original_module.weight, original)
