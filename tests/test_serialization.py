"""QuantState serialization both ways with bitsandbytes, and clear errors for corrupted state dicts."""

import json

import pytest
import torch

import qkernels
from qkernels import QuantState, _linear

from ._oracle import F, bnb, same_bits


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_as_dict_matches_bitsandbytes_keys_and_blob(quant_type, double_quant):
    A = torch.randn(130, 70, dtype=torch.bfloat16)
    p, s = qkernels.quantize_4bit(A, 64, quant_type, double_quant)
    pb, sb = F.quantize_4bit(A, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    ours, theirs = s.as_dict(packed=True), sb.as_dict(packed=True)
    assert list(ours) == list(theirs), "same keys in the same order"
    blob = f"quant_state.bitsandbytes__{quant_type}"
    # the JSON blob is byte-identical (same fields, order, float repr of the offset)
    assert torch.equal(ours[blob], theirs[blob])
    meta = json.loads(bytes(ours[blob].tolist()))
    assert meta["shape"] == [130, 70] and meta["dtype"] == "bfloat16" and meta["blocksize"] == 64
    assert torch.equal(ours["quant_map"], theirs["quant_map"])
    unpacked = s.as_dict(packed=False)
    assert unpacked["quant_type"] == quant_type and unpacked["shape"] == (130, 70)


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_ours_to_bitsandbytes_from_dict(double_quant):
    A = torch.randn(257, 129)
    p, s = qkernels.quantize_4bit(A, 128, "nf4", double_quant)
    sb = F.QuantState.from_dict(s.as_dict(packed=True), device=torch.device("cpu"))
    assert same_bits(F.dequantize_4bit(p, sb), qkernels.dequantize_4bit(p, s))


def test_bitsandbytes_linear4bit_state_dict_to_ours():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 80, bias=True)
    q = bnb.nn.Linear4bit(128, 80, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(
        lin.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    q.bias = torch.nn.Parameter(lin.bias.data.clone())
    q = q.to("cpu")  # bitsandbytes quantizes on the first device move
    sd = q.state_dict()
    assert "weight.quant_state.bitsandbytes__nf4" in sd and sd["weight.absmax"].dtype == torch.uint8
    quant_keys = {k: v for k, v in sd.items() if k.startswith("weight.")}
    s = QuantState.from_dict(quant_keys, device="cpu")
    assert s.shape == (80, 128) and s.nested and s.blocksize == 64
    ours = qkernels.dequantize_4bit(sd["weight"], s)
    theirs = F.dequantize_4bit(q.weight.data, q.weight.quant_state)
    assert same_bits(ours, theirs)
    # and the round trip back: our dict -> the same keys and tensors as bitsandbytes saved
    back = s.as_dict(packed=True)
    for k, v in back.items():
        assert torch.equal(v, sd["weight." + k]), k


def test_round_trip_preserves_state_exactly():
    p, s = qkernels.quantize_4bit(torch.randn(33, 65, dtype=torch.float16), 32, "fp4", True)
    s2 = QuantState.from_dict(s.as_dict(packed=True))
    assert s2 == s
    assert torch.equal(qkernels.dequantize_4bit(p, s2), qkernels.dequantize_4bit(p, s))
    s3 = QuantState.from_dict({"prefix.weight." + k: v for k, v in s.as_dict(packed=True).items()})
    assert s3 == s


def _packed_dict():
    _, s = qkernels.quantize_4bit(torch.randn(64, 64), 64, "nf4", True)
    return s.as_dict(packed=True)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda d: d.pop("absmax"), "missing key 'absmax'"),
        (lambda d: d.pop("nested_absmax"), "missing key 'nested_absmax'"),
        (lambda d: d.pop("quant_state.bitsandbytes__nf4"), "neither"),
        (lambda d: d.__setitem__("quant_state.bitsandbytes__nf4", torch.tensor([1, 2, 255], dtype=torch.uint8)),
         "corrupted"),
        (lambda d: d.__setitem__("absmax", d["absmax"][:-1]), "one entry per block"),
        (lambda d: d.__setitem__("quant_map", torch.zeros(8)), "16 entries"),
        (lambda d: d.__setitem__("bogus", torch.zeros(1)), "unexpected quant state key"),
        (lambda d: d.__setitem__("nested_absmax", d["nested_absmax"].half()), "nested_absmax must be float32"),
        (lambda d: d.__setitem__("quant_state.bitsandbytes__nf4", _blob({"quant_type": "nf4", "blocksize": 48,
                                                                        "dtype": "float32", "shape": [64, 64]})),
         "blocksize"),
        (lambda d: d.__setitem__("quant_state.bitsandbytes__nf4", _blob({"quant_type": "nf4", "blocksize": 64,
                                                                        "dtype": "int8", "shape": [64, 64]})),
         "dtype"),
        # 16 float32 entries, but not NF4's: bitsandbytes would decode with its NF4 table regardless, we with this one
        (lambda d: d.__setitem__("quant_map", qkernels.codebooks.get_codebook("fp4")), "not the standard nf4"),
        (lambda d: d.__setitem__("quant_map", d["quant_map"] * 2), "not the standard nf4"),
        (lambda d: d.__setitem__("quant_state.bitsandbytes__nf4", _blob({"quant_type": "nf4", "blocksize": 64,
                                                                        "dtype": "float32", "shape": [64, 64]},
                                                                       offset=float("nan"))),
         "'nested_offset' must be a finite number"),
        (lambda d: d["nested_absmax"].__setitem__(0, float("inf")), "'nested_absmax' holds NaN or inf"),
        # found by tests/fuzz_public_api.py: a NaN in the nested map was decoded into whole NaN blocks
        (lambda d: d["nested_quant_map"].__setitem__(7, float("nan")),
         r"'nested_quant_map' holds NaN or inf \(first at index 7\)"),
        # 2**40 made the reference decode allocate 2**40 floats per nested block (4 TiB); past 2**63 the native binding
        # raised "Overflow when unpacking long long"
        (lambda d: d.__setitem__("quant_state.bitsandbytes__nf4", _blob(_META, nested_blocksize=2**40)),
         "nested_blocksize must be a power of two from 1 to 4096"),
        (lambda d: d.__setitem__("quant_state.bitsandbytes__nf4", _blob(_META, nested_blocksize=2**64)),
         "nested_blocksize must be a power of two from 1 to 4096"),
        # an int past float's range: "OverflowError: int too large to convert to float" from math.isfinite
        (lambda d: d.__setitem__("quant_state.bitsandbytes__nf4", _blob(_META, offset=10**400)),
         "'nested_offset' must be a finite number"),
        # bitsandbytes decodes the nested scales in nested_dtype: float16 would differ from our float32 decode
        (lambda d: d.__setitem__("quant_state.bitsandbytes__nf4", _blob(_META, nested_dtype="float16")),
         "'nested_dtype' must be 'float32'"),
    ],
    ids=["no-absmax", "no-nested-absmax", "no-blob", "bad-json", "short-absmax", "bad-quant-map", "extra-key",
         "half-nested", "bad-blocksize", "bad-dtype", "fp4-map-for-nf4", "scaled-map", "nan-offset", "inf-nested",
         "nan-nested-map", "huge-nested-blocksize", "nested-blocksize-2**64", "huge-int-offset", "half-nested-dtype"],
)
def test_corrupted_state_dict_raises_value_error(corrupt, match):
    d = _packed_dict()
    corrupt(d)
    with pytest.raises(ValueError, match=match):
        QuantState.from_dict(d)


_META = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 64]}


def _blob(meta, offset=0.5, nested_blocksize=256, nested_dtype="float32"):
    d = dict(meta)
    # NaN: json writes NaN
    d.update({"nested_blocksize": nested_blocksize, "nested_dtype": nested_dtype, "nested_offset": offset})
    return torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)


def test_mismatched_state_and_packed_raise():
    p, s = qkernels.quantize_4bit(torch.randn(64, 64), 64)
    p_small, _ = qkernels.quantize_4bit(torch.randn(8, 8), 64)
    with pytest.raises(ValueError, match="packed holds"):
        qkernels.dequantize_4bit(p_small, s)
    with pytest.raises(TypeError, match="quant_state"):
        qkernels.dequantize_4bit(p, {"absmax": s.absmax})


def test_nan_absmax_without_nesting_raises():
    _, s = qkernels.quantize_4bit(torch.randn(64, 64), 64, "fp4", False)
    d = s.as_dict(packed=True)
    d["absmax"][5] = float("nan")
    with pytest.raises(ValueError, match=r"'absmax' holds NaN or inf \(first at index 5\)"):
        QuantState.from_dict(d)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_cpu_inference_layout_loads_in_block_order(quant_type):
    """bitsandbytes 0.50.2 on a CPU with AVX512-BF16 repacks a Linear4bit at its first eval forward, absmax to bf16
    [K/bs, N]; saving then (without double quantization) writes that tensor as ``weight.absmax``. Built here with
    bitsandbytes' own conversion functions, so it runs on any CPU. It must decode with the bf16 scales in block
    order: bit for bit what the repacked model computed with (the bf16 -> float32 widening is exact)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, _convert_weight_packed_for_cpu_inverse

    torch.manual_seed(0)
    W = torch.randn(64, 256)  # N = 64 (a multiple of bitsandbytes' 32-row tiles), K = 256: 4 blocks per row
    packed, sb = F.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type=quant_type)
    want_absmax = sb.absmax.clone().to(torch.bfloat16).float()
    packed2, sb2 = _convert_weight_packed_for_cpu_inverse(*_convert_weight_packed_for_cpu(packed.clone(), sb))
    d = sb2.as_dict(packed=True)
    assert d["absmax"].dtype == torch.bfloat16 and d["absmax"].shape == (4, 64), "the layout this test is about"
    assert torch.equal(packed2, packed)
    s = QuantState.from_dict(d)
    assert s.absmax.dtype == torch.float32 and torch.equal(s.absmax, want_absmax)
    expect = QuantState(want_absmax, W.shape, s.code, 64, quant_type, torch.float32)
    assert same_bits(qkernels.dequantize_4bit(packed2, s), qkernels.dequantize_4bit(packed, expect))
    d["absmax"] = d["absmax"].t().contiguous()  # [N, K/bs] is no known layout: still an error
    with pytest.raises(ValueError, match="one entry per block"):
        QuantState.from_dict(d)


# ------------------------------------------------------------------------------------------ transformers checkpoints
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # hidden 128: two 64-blocks per row, so a block-order mistake shows
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    return tmp_path / "dense", cfg


def _logits(model, ids):
    model.train()  # no dropout in this Llama; train mode keeps bitsandbytes off its bf16-scale CPU inference path
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("quant_type, double_quant, storage",
                         [("nf4", True, torch.uint8), ("fp4", False, torch.bfloat16)], ids=["nf4-dq-uint8", "fp4-bf16"])
def test_transformers_4bit_checkpoint_loads_into_qkernels_and_back(tmp_path, monkeypatch, quant_type, double_quant,
                                                                    storage):
    """A tiny Llama loaded by transformers with BitsAndBytesConfig and saved with save_pretrained loads with
    load_state_dict into the dense architecture after apply_qlora, whatever format apply_qlora was given (the
    checkpoint's wins); and our state dict with the bitsandbytes quantization_config loads with from_pretrained.
    2 x 40 tokens per forward, past the GEMV's row limit (held at 16 here: on an AVX-512 CPU float32 takes the GEMV
    to 2048 rows, which sums in another order): every layer takes qkernels' dequantize + BLAS path, bit for bit
    bitsandbytes' exact path, so the logits are equal."""
    from safetensors.torch import load_file, save_file
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    monkeypatch.setattr(_linear, "gemv_max_m", lambda x: _linear.GEMV_MAX_M)

    dense_dir, cfg = _tiny_llama_dir(tmp_path)
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_quant_storage=storage,
                                 bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    theirs = LlamaForCausalLM.from_pretrained(dense_dir, quantization_config=bnb_cfg, dtype=torch.float32)
    theirs.save_pretrained(tmp_path / "bnb")
    # 2 x 40 = 80 tokens: more rows than the CPU GEMV takes (16, held above), so every layer runs qkernels'
    # dequantize + BLAS path, bit for bit bitsandbytes' (the GEMV sums in another order)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    want = _logits(theirs, ids)

    ours = LlamaForCausalLM(cfg)
    qkernels.apply_qlora(ours, target_modules=LLAMA_LINEARS, r=4, quant_type="fp4" if quant_type == "nf4" else "nf4",
                         double_quant=not double_quant, blocksize=256, compute_dtype=torch.float32)
    result = ours.load_state_dict(load_file(tmp_path / "bnb" / "model.safetensors"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    q = ours.model.layers[0].self_attn.q_proj.weight
    assert (q.quant_type, q.compress_statistics, q.blocksize, q.dtype) == (quant_type, double_quant, 64, storage)
    assert torch.equal(_logits(ours, ids), want)

    # back: weights quantized by qkernels (blocksize 128, which the config does not say) + transformers' config with
    # the quantization_config -> from_pretrained (bitsandbytes adopts each layer's quant state, as we do)
    mine = qkernels.apply_qlora(LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32), LLAMA_LINEARS, r=4,
                                quant_type=quant_type, double_quant=double_quant, blocksize=128, quant_storage=storage,
                                compute_dtype=torch.float32)
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "config.json").write_text((tmp_path / "bnb" / "config.json").read_text())
    mine_sd = {k: v.contiguous() for k, v in mine.state_dict().items() if ".lora_" not in k}
    save_file(mine_sd, tmp_path / "back" / "model.safetensors", metadata={"format": "pt"})
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    assert back.model.layers[0].mlp.down_proj.weight.quant_state.blocksize == 128
    assert torch.equal(_logits(back, ids), _logits(mine, ids))


def test_a_model_loaded_from_a_4bit_checkpoint_saves_after_apply_qlora(tmp_path):
    """transformers 5 records the bitsandbytes deserialization it ran when loading a 4-bit checkpoint and tries to
    reverse it in save_pretrained, which raised NotImplementedError: a plain Trainer's first checkpoint crashed, and
    so did save_pretrained after merge_and_unload, which the README says works. apply_qlora drops that record (its
    reverse is the identity): the 4-bit save keeps the checkpoint's bytes and reloads; the merge reloads in float."""
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    dense_dir, _ = _tiny_llama_dir(tmp_path)
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
    LlamaForCausalLM.from_pretrained(dense_dir, quantization_config=bnb_cfg).save_pretrained(tmp_path / "q4")
    model = qkernels.apply_qlora(LlamaForCausalLM.from_pretrained(tmp_path / "q4"), "all-linear", r=4)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    want = _logits(model, ids)
    model.save_pretrained(tmp_path / "q4-lora")
    before = load_file(tmp_path / "q4" / "model.safetensors")
    after = load_file(tmp_path / "q4-lora" / "model.safetensors")
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the 4-bit weights as they were loaded
    reloaded = qkernels.apply_qlora(LlamaForCausalLM.from_pretrained(tmp_path / "q4-lora"), "all-linear", r=4)
    reloaded.load_state_dict({k: v for k, v in after.items() if ".lora_" in k}, strict=False)
    assert torch.equal(_logits(reloaded, ids), want)
    merged = qkernels.merge_and_unload(model)
    merged.save_pretrained(tmp_path / "merged")
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(dense.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert torch.equal(_logits(dense, ids), _logits(merged, ids))
