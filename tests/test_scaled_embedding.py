"""LoRA on Gemma's scaled word embeddings (transformers' ``GemmaTextScaledWordEmbedding``, ``Gemma2...``,
``Gemma3...``: ``nn.Embedding``'s lookup times an ``embed_scale`` buffer), against peft 0.21.2, which scales the LoRA
term by the same ``embed_scale`` (peft/tuners/lora/layer.py:1506, 1522-1524; tuners_utils.py:1905-1940) and merges the
unscaled delta (the merged module scales it in its own forward).

The layer alone runs the very same float operations as peft's ``lora.Embedding`` on it: compared bit for bit
(forward, dtype, gradients, merge, mixed batch). On tiny Gemma / Gemma 3 models loaded in 4 bits by transformers the
logits are compared with ``assert_matches`` (tests/test_adapters.py: ours and peft's each within float32 rounding of a
float64 run of the same weights), as in tests/test_embedding_lora.py.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qkernels import adapter_batch, adapters, apply_qlora, merge_and_unload
from qkernels.embedding import QLoRAEmbedding

from .test_adapters import assert_matches, reference64
from .test_architectures import DEC, _exact_bnb
from .test_embedding_lora import IDS, _copy_lora, _lora_tensors, _peft, randomize
from .test_float_base import _load_4bit, _same_adapter_files
from .test_training import LLAMA_TARGETS

peft = pytest.importorskip("peft", reason="peft is the oracle of these tests")
transformers = pytest.importorskip("transformers", reason="the scaled embeddings are transformers classes")

from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding  # noqa: E402
from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding  # noqa: E402
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding  # noqa: E402

SCALED = {"gemma": GemmaTextScaledWordEmbedding, "gemma2": Gemma2TextScaledWordEmbedding,
          "gemma3": Gemma3TextScaledWordEmbedding}
MODELS = {"gemma": ("GemmaConfig", "GemmaForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
          "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM")}
TARGETS = [*LLAMA_TARGETS, "embed_tokens"]


class _Tok(nn.Module):
    def __init__(self, cls: type, dtype: torch.dtype) -> None:
        super().__init__()
        self.emb = cls(50, 24, padding_idx=0, embed_scale=24 ** 0.5).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", list(SCALED))
def test_layer_is_peft_s_lora_on_a_scaled_embedding_bit_for_bit(kind, dtype):
    """Forward (the base lookup times ``embed_scale`` in the weight's dtype, the LoRA term times it in float32),
    gradients, keys (``embed_scale`` is a non-persistent buffer: no key), two adapters in a mixed batch, and the merge
    (the unscaled delta into the weight; the merged module is the Gemma class again, scaling in its forward): all
    equal to peft's."""
    torch.manual_seed(0)
    net = _Tok(SCALED[kind], dtype)
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=["emb"])
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["emb"]))
    ours = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8)
    adapters.add_adapter(ours, "b", r=2, lora_alpha=6, target_modules=["emb"])
    layer = ours.emb
    assert isinstance(layer, QLoRAEmbedding) and layer.embed_scale.dtype == dtype
    for n, seed in (("default", 1), ("b", 2)):
        randomize(theirs, n, seed)
        _copy_lora(theirs, ours, n)
    y, y_peft = ours(IDS), theirs(IDS)
    assert y.dtype == y_peft.dtype == dtype and torch.equal(y, y_peft)
    y.float().square().sum().backward()
    y_peft.float().square().sum().backward()
    for a, b in zip(_lora_tensors(ours, "default"), _lora_tensors(theirs, "default"), strict=True):
        assert a.grad is not None and torch.equal(a.grad, b.grad)
    assert set(ours.state_dict()) == {k.replace("base_layer.", "") for k in theirs.base_model.model.state_dict()}
    ours.eval()
    theirs.eval()
    names = ["b", "__base__"]
    with torch.no_grad():
        with adapter_batch(ours, names):
            mixed = ours(IDS)
        assert torch.equal(mixed, theirs(IDS, adapter_names=names))
    merged, peft_merged = merge_and_unload(ours).emb, theirs.merge_and_unload().emb
    assert type(merged) is SCALED[kind] and torch.equal(merged.weight, peft_merged.weight)
    assert merged.embed_scale is layer.embed_scale
    with torch.no_grad():
        assert torch.equal(merged(IDS), peft_merged(IDS))


def test_the_scale_follows_the_model_s_dtype_and_a_meta_layer_gets_it_at_load():
    """``model.to(bfloat16)`` casts the buffer as it casts the Gemma module's in peft (same outputs); a layer built on
    the meta device gets transformers' initial value (``scalar_embed_scale``, float32) when its weight loads."""
    torch.manual_seed(0)
    net = _Tok(Gemma3TextScaledWordEmbedding, torch.float32)
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=["emb"])
    ours = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8)
    randomize(theirs, "default", 1)
    _copy_lora(theirs, ours)
    ours.to(torch.bfloat16)
    theirs.to(torch.bfloat16)
    assert ours.emb.embed_scale.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(ours(IDS), theirs(IDS))

    with torch.device("meta"):
        meta = _Tok(Gemma3TextScaledWordEmbedding, torch.float32)
    meta = apply_qlora(meta, ["emb"], r=4, lora_alpha=8)
    assert meta.emb.embed_scale.is_meta
    sd = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8).state_dict()
    meta.load_state_dict(sd, assign=True)
    scale = meta.emb.embed_scale
    assert not scale.is_meta and scale.dtype == torch.float32 and scale.item() == net.emb.embed_scale.item()


def test_other_scaled_embeddings_and_a_plain_one_with_a_scale_stay_refused():
    """Only the Gemma classes (their forward read: lookup times embed_scale) are adapted: BART's scaled embedding
    (its own forward), a subclass of a Gemma class, and a plain nn.Embedding with an ``embed_scale`` attribute (which
    peft would apply to the LoRA term only) are refused by name, before any change."""
    from transformers.models.bart.modeling_bart import BartScaledWordEmbedding

    class Sub(Gemma3TextScaledWordEmbedding):
        pass

    plain = nn.Embedding(50, 24)
    plain.embed_scale = 2.0
    for emb, match in ((BartScaledWordEmbedding(50, 24, 0, embed_scale=2.0), "BartScaledWordEmbedding.*own forward"),
                       (Sub(50, 24, 0, embed_scale=2.0), "Sub.*own forward"), (plain, "embed_scale attribute")):
        net = nn.Module()
        net.emb = emb
        with pytest.raises(ValueError, match=rf"'emb'.*{match}"):
            apply_qlora(net, ["emb"], r=4)
        assert net.emb is emb


# ---------------------------------------------------------------------------------------------- tiny Gemma models
def _make(kind: str) -> nn.Module:
    cfg_name, model_name = MODELS[kind]
    torch.manual_seed(0)
    return getattr(transformers, model_name)(getattr(transformers, cfg_name)(**dict(DEC, head_dim=16)))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", list(MODELS))
def test_adapter_files_both_ways_and_merge_with_peft_on_a_4bit_gemma(kind, tmp_path):
    """A peft adapter with LoRA on Gemma's scaled ``embed_tokens`` (every 4-bit layer adapted too) loads here with
    peft's logits (``assert_matches``; the float64 reference is peft on the dequantized model, scale included);
    ``save_adapter`` writes peft's keys and tensors back, which peft loads with identical logits; the merge puts the
    same embedding weight in the same Gemma class as peft's merge."""
    make = functools.partial(_make, kind)
    model_cls = getattr(transformers, MODELS[kind][1])
    load = functools.partial(_load_4bit, model_cls, make, tmp_path / "dense")
    theirs = _peft(_exact_bnb(load()), r=4, lora_alpha=8, target_modules=TARGETS)
    randomize(theirs, seed=3)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = apply_qlora(load(), TARGETS, r=4, lora_alpha=8, compute_dtype=torch.float32)
    emb = ours.model.embed_tokens
    assert isinstance(emb, QLoRAEmbedding) and emb.embed_scale is not None
    adapters.load_adapter(ours, tmp_path / "peft", replace=True)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = reference64(ours, tmp_path / "peft", make)
    assert_matches(_logits(ours, ids), _logits(theirs, ids), _logits(ref, ids))
    with torch.no_grad():
        assert torch.equal(ours.get_input_embeddings()(ids), theirs.get_input_embeddings()(ids))

    adapters.save_adapter(ours, tmp_path / "ours")
    _same_adapter_files(tmp_path / "peft", tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)
    assert not any("embed_scale" in k for k in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    again = peft.PeftModel.from_pretrained(_exact_bnb(load()), str(tmp_path / "ours"))
    assert torch.equal(_logits(again, ids), _logits(theirs, ids))

    peft_emb = theirs.base_model.model.model.embed_tokens
    peft_emb.merge()
    merged = merge_and_unload(ours)
    assert type(merged.model.embed_tokens) is type(peft_emb.base_layer)
    assert torch.equal(merged.model.embed_tokens.weight, peft_emb.base_layer.weight)
    with torch.no_grad():
        assert torch.equal(merged.model.embed_tokens(ids), peft_emb.base_layer(ids))
