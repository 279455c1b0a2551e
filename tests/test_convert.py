"""``quantize_checkpoint``: a float safetensors checkpoint streamed into a bitsandbytes 4-bit one.

The oracle is transformers' own 4-bit save (``from_pretrained(..., BitsAndBytesConfig)`` then ``save_pretrained``):
without double quantization bitsandbytes' CPU path is exact, so the files must hold the same keys and bytes. With double
quantization (bitsandbytes' CPU nested rounding is approximate, DESIGN §5) the oracle is qkernels' ``apply_qlora`` on
the float model.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qkernels
from qkernels import apply_qlora, quantize_checkpoint

from ._oracle import same_bits


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _load_dir(path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _ids() -> torch.Tensor:
    return torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A tiny Llama saved in 4 float32 shards, as a big model is."""
    path = tmp_path_factory.mktemp("dense")
    _llama().save_pretrained(path, max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    (path / "tokenizer_config.json").write_text("{}")
    return path


def test_same_files_as_transformers_and_from_pretrained_loads_them(dense_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    res = quantize_checkpoint(dense_dir, tmp_path / "q", quant_type="fp4", double_quant=False,
                              max_shard_size="60KB", log_every=10)
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=bnb_config, device_map="cpu")
    ref.save_pretrained(tmp_path / "ref")
    want, got = _load_dir(tmp_path / "ref"), _load_dir(tmp_path / "q")
    assert sorted(got) == sorted(want)
    for k in want:
        assert same_bits(got[k], want[k]), k
    assert len(res["quantized"]) == 14 and "lm_head" not in res["quantized"]  # all-linear: not the output embedding
    assert res["tensors"] == len(want) - 14 * 3  # without double quant each weight gains absmax, quant_map, blob
    # several shards, an index naming each key's shard, a weight and its quant state in one shard
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(got) and len(res["files"]) > 1
    for k, f in index["weight_map"].items():
        if k.endswith(".weight.absmax"):
            assert index["weight_map"][k.removesuffix(".absmax")] == f, k
    assert (tmp_path / "q" / "tokenizer_config.json").is_file()
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head"] and qc["bnb_4bit_quant_type"] == "fp4"
    err = capsys.readouterr().err
    assert "quantize_checkpoint: 10/" in err and "14 quantized" in err and "wrote" in err

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")  # config says 4-bit
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, ref(_ids()).logits)


def test_double_quant_bf16_output_equals_apply_qlora_and_loads_into_a_meta_model(dense_dir, tmp_path):
    """nf4, blocksize 128, double quant, bf16 storage, weights cast to bf16: the checkpoint loads into a model built on
    the meta device (from_config + apply_qlora + assign) and into transformers; both give the logits of apply_qlora
    run on the float model loaded in bf16."""
    from transformers import AutoModelForCausalLM

    fmt = dict(quant_type="nf4", blocksize=128, double_quant=True, quant_storage=torch.bfloat16)
    quantize_checkpoint(dense_dir, tmp_path / "q", dtype=torch.bfloat16, verbose=False, **fmt)
    # loaded the way transformers loads in bf16 (its rotary inv_freq stays float32; a .to(bf16) would round it)
    want = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16, device_map="cpu")
    apply_qlora(want, "all-linear", r=4, **fmt).eval()
    base = {k: v for k, v in want.state_dict().items() if "lora_" not in k}
    got = _load_dir(tmp_path / "q")
    assert sorted(got) == sorted(base)
    for k in base:
        assert same_bits(got[k], base[k]), k

    with torch.device("meta"):
        meta = _llama().__class__(_llama().config)
    apply_qlora(meta, "all-linear", r=4)  # the defaults: the checkpoint's format is taken at load
    meta.load_state_dict(got, assign=True, strict=False)
    meta.model.rotary_emb.inv_freq = want.model.rotary_emb.inv_freq  # a buffer: meta under torch.device("meta")
    meta.eval()
    with torch.no_grad():
        assert torch.equal(meta(_ids()).logits, want(_ids()).logits)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["quantization_config"]["bnb_4bit_quant_storage"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    state = loaded.model.layers[1].mlp.down_proj.weight.quant_state
    assert (state.blocksize, state.quant_type, state.nested) == (128, "nf4", True)
    apply_qlora(loaded, "all-linear", r=4).eval()  # wraps the Linear4bit layers as they are
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, want(_ids()).logits)


def test_gpt2_conv1d_weights_are_stored_transposed_as_transformers_does(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        tmp_path / "dense")
    quantize_checkpoint(tmp_path / "dense", tmp_path / "q", quant_type="fp4", double_quant=False, verbose=False)
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=bnb_config, device_map="cpu")
    ref.save_pretrained(tmp_path / "ref")
    want, got = _load_dir(tmp_path / "ref"), _load_dir(tmp_path / "q")
    assert sorted(got) == sorted(want)
    assert all(same_bits(got[k], want[k]) for k in want)
    assert got["transformer.h.0.mlp.c_fc.weight"].shape == (64 * 256 // 2, 1)


def test_a_checkpoint_without_config_needs_names_and_works_with_them(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32), nn.Embedding(10, 64), nn.LayerNorm(64))
    (tmp_path / "src").mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "src" / "model.safetensors")
    with pytest.raises(ValueError, match=r"'all-linear' needs the model's structure.*model=.*list of module names"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "a", verbose=False)
    with pytest.raises(ValueError, match=r"entry 'q' matches no '<module>\.weight' key"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "a", ["q"], verbose=False)
    with pytest.raises(ValueError, match=r"'4\.weight' is F32 \[64\]: only 2-D"):  # a LayerNorm: refused by shape
        quantize_checkpoint(tmp_path / "src", tmp_path / "a", r"[024]", verbose=False)
    res = quantize_checkpoint(tmp_path / "src", tmp_path / "b", r"[02]", verbose=False)
    assert res["quantized"] == ["0", "2"]
    want = apply_qlora(net, ["0", "2"], r=4)
    got = load_file(tmp_path / "b" / "model.safetensors")
    assert sorted(got) == sorted(k for k in want.state_dict() if "lora_" not in k)
    assert all(same_bits(got[k], v) for k, v in want.state_dict().items() if "lora_" not in k)
    # model= gives the structure: all-linear works without a config (the embedding is not Linear)
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32), nn.Embedding(10, 64),
                                 nn.LayerNorm(64))
    res = quantize_checkpoint(tmp_path / "src", tmp_path / "c", model=skeleton, verbose=False)
    assert res["quantized"] == ["0", "2"]
    assert all(same_bits(v, got[k]) for k, v in load_file(tmp_path / "c" / "model.safetensors").items())


def test_refusals_name_the_problem_and_leave_no_files(dense_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors checkpoint.*\.bin"):
        (tmp_path / "bin").mkdir()
        torch.save({}, tmp_path / "bin" / "pytorch_model.bin")
        quantize_checkpoint(tmp_path / "bin", tmp_path / "x", ["q"], verbose=False)
    with pytest.raises(ValueError, match="dst_dir must differ"):
        quantize_checkpoint(dense_dir, dense_dir, verbose=False)
    quantize_checkpoint(dense_dir, tmp_path / "q", verbose=False)
    with pytest.raises(FileExistsError, match="already holds"):
        quantize_checkpoint(dense_dir, tmp_path / "q", verbose=False)
    with pytest.raises(ValueError, match="already a 4-bit checkpoint"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq", verbose=False)
    with pytest.raises(ValueError, match="target_modules entry 'qproj' matches no module"):
        quantize_checkpoint(dense_dir, tmp_path / "y", ["qproj"], verbose=False)
    with pytest.raises(ValueError, match="max_shard_size must be"):
        quantize_checkpoint(dense_dir, tmp_path / "y", max_shard_size="lots", verbose=False)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_checkpoint(dense_dir, tmp_path / "y", blocksize=48, verbose=False)
    # a NaN in a weight: the key is named and no shard (temporary or final) is left behind
    model = _llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan", max_shard_size="100KB")
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*NaN"):
        quantize_checkpoint(tmp_path / "nan", tmp_path / "z", max_shard_size="30KB", verbose=False)
    assert not list((tmp_path / "z").iterdir())


def test_the_config_written_without_transformers_is_the_one_transformers_writes(monkeypatch):
    from qkernels.convert import _quantization_config

    args = ("nf4", True, torch.bfloat16, torch.float16, ["lm_head"])
    want = _quantization_config(*args)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert _quantization_config(*args) == want


def test_peak_buffer_is_one_shard(dense_dir, tmp_path, monkeypatch):
    """Bounded memory: the output shard being filled never passes max_shard_size unless it holds one weight group."""
    from qkernels import convert

    peak = []
    add = convert._ShardWriter.add

    def spy(self, group):
        add(self, group)
        peak.append((self.size, len(self.buffer)))

    monkeypatch.setattr(convert._ShardWriter, "add", spy)
    import safetensors.torch  # a whole-file read would hold a source shard in memory: not used

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("read a whole file"))
    limit = 30_000
    res = quantize_checkpoint(dense_dir, tmp_path / "q", max_shard_size=limit, verbose=False)
    assert len(peak) == res["tensors"]  # one add per source tensor, read one at a time
    assert all(size <= limit or n <= 6 for size, n in peak)  # 6: a weight and its 5 quant-state keys
    assert len(res["files"]) >= res["bytes_out"] // limit
    assert qkernels.quantize_checkpoint is quantize_checkpoint


def test_weights_in_other_formats_are_not_copied(tmp_path, capsys):
    """A hub snapshot often holds pytorch_model.bin (and its index) beside model.safetensors: copying it put the whole
    float model next to the 4-bit one. The tokenizer and other side files are copied; the left-out files are named."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32))
    src = tmp_path / "src"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, src / "model.safetensors")
    torch.save(net.state_dict(), src / "pytorch_model.bin")
    (src / "pytorch_model.bin.index.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    quantize_checkpoint(src, tmp_path / "q", ["0"])
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["model.safetensors", "tokenizer.json"]
    assert "not copied (float weights in another format): ['pytorch_model.bin', 'pytorch_model.bin.index.json']" in \
        capsys.readouterr().err


def test_t5_cast_to_float16_keeps_wo_in_float32_as_transformers_does(tmp_path):
    """dtype=float16 on T5: transformers loads ``_keep_in_fp32_modules`` (``wo``) in float32 from the float source;
    rounding them to float16 here changed the logits. Same files and logits as transformers' own 4-bit load in fp16."""
    from transformers import AutoModelForSeq2SeqLM, BitsAndBytesConfig, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "dense")
    quantize_checkpoint(tmp_path / "dense", tmp_path / "q", quant_type="fp4",  # all-linear: wo left float, as
                        double_quant=False, dtype=torch.float16, verbose=False)  # transformers leaves it
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, bnb_4bit_quant_type="fp4")
    ref = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "dense", dtype=torch.float16, quantization_config=bnb_config,
                                                device_map="cpu")
    ref.save_pretrained(tmp_path / "ref")
    want, got = _load_dir(tmp_path / "ref"), _load_dir(tmp_path / "q")
    assert got["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32
    assert got["encoder.block.0.layer.0.SelfAttention.o.weight.absmax"].dtype == torch.float32
    assert all(same_bits(got[k], want[k]) for k in want)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "q", device_map="cpu")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, decoder_input_ids=ids).logits,
                           ref(input_ids=ids, decoder_input_ids=ids).logits)


def test_a_config_transformers_cannot_build_names_every_other_weight_in_the_skip_list(dense_dir, tmp_path):
    """config.json without ``architectures`` (or a class transformers lacks): no structure, so names. The written
    llm_int8_skip_modules was None, so from_pretrained made every Linear but lm_head 4-bit, the float ones included,
    and the model failed ('FP4 quantization state not initialized'). Now every other 2-D weight is listed."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    src.mkdir()
    for f in dense_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    del cfg["architectures"]
    (src / "config.json").write_text(json.dumps(cfg))
    quantize_checkpoint(src, tmp_path / "q", ["q_proj", "v_proj"], verbose=False)
    skip = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert "model.layers.0.mlp.up_proj" in skip and "lm_head" in skip and "model.layers.0.self_attn.q_proj" not in skip
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert type(loaded.model.layers[0].mlp.up_proj) is nn.Linear
    apply_qlora(loaded, ["q_proj", "v_proj"], r=4).eval()
    want = apply_qlora(_llama(), ["q_proj", "v_proj"], r=4).eval()
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, want(_ids()).logits)


def test_an_error_after_the_last_tensor_leaves_no_shard(dense_dir, tmp_path, monkeypatch):
    """A failure while the side files are written (disk full, permissions) or while shards are renamed: no
    *.safetensors is left to look like a finished checkpoint (a rerun would refuse the directory)."""
    from qkernels import convert

    def fail(*a, **k):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(convert.shutil, "copy2", fail)
        with pytest.raises(OSError, match="disk full"):
            quantize_checkpoint(dense_dir, tmp_path / "a", max_shard_size="60KB", verbose=False)
    assert not list((tmp_path / "a").glob("*.safetensors*"))
    replace, calls = convert.os.replace, []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("rename failed")
        replace(src, dst)

    monkeypatch.setattr(convert.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="rename failed"):
        quantize_checkpoint(dense_dir, tmp_path / "b", max_shard_size="60KB", verbose=False)
    assert len(calls) == 2 and not list((tmp_path / "b").glob("*.safetensors*"))


def test_a_custom_code_config_is_not_run_and_names_still_work(tmp_path):
    """A trust_remote_code model (config.json with auto_map): transformers refused it (or asked on stdin "run the
    custom code? [y/N]") and quantize_checkpoint failed even with explicit names. Now the structure is simply absent:
    names work, and 'all-linear' says why it needs model=."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    src = tmp_path / "src"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"model_type": "mymodel", "architectures": ["MyModel"],
                                                 "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}))
    assert quantize_checkpoint(src, tmp_path / "q", ["0"], verbose=False)["quantized"] == ["0"]
    with pytest.raises(ValueError, match=r"there is none \(transformers cannot build config\.json's model.*model="):
        quantize_checkpoint(src, tmp_path / "a", verbose=False)


def test_an_explicit_list_naming_a_keep_in_fp32_module_is_refused(tmp_path):
    """'all-linear' leaves T5's wo float as transformers does (test above); a list that names it asks for a 4-bit wo,
    which transformers' loader would treat as float: refused, naming exclude_modules, with nothing written."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, decoder_start_token_id=0)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"_keep_in_fp32_modules .*exclude_modules="):
        quantize_checkpoint(tmp_path / "dense", tmp_path / "q", ["q", "wo"], verbose=False)
    assert not (tmp_path / "q").exists() or not list((tmp_path / "q").glob("*.safetensors"))
