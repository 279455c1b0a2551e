"""LoRA on transformers' scaled word embeddings (``nn.Embedding``'s lookup times ``embed_scale``): Gemma's form
(``GemmaTextScaledWordEmbedding``, ``Gemma2...``, ``Gemma3...``: a float32 buffer, cast to the weight's dtype) and
BART's (``BartScaledWordEmbedding``, ``M2M100...``, ``MBart...``: a Python float), against peft 0.21.2, which scales
the LoRA term by the same ``embed_scale`` (a float made a tensor of the weight's dtype first; peft/tuners/lora/
layer.py:1506, 1522-1524; tuners_utils.py:1905-1940) and merges the unscaled delta (the merged module scales it in its
own forward).

The layer alone runs the very same float operations as peft's ``lora.Embedding`` on it: compared bit for bit
(forward, dtype, gradients, merge, mixed batch). On tiny Gemma / Gemma 2 / Gemma 3 / BART / M2M100 models loaded in 4
bits by transformers the logits are compared with ``assert_matches`` (tests/test_adapters.py: ours and peft's each
within float32 rounding of a float64 run of the same weights), as in tests/test_embedding_lora.py.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import pathlib
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qkernels import adapter_batch, adapters, apply_qlora, merge_and_unload
from qkernels.embedding import QLoRAEmbedding

from .test_adapters import assert_matches, reference64
from .test_architectures import BART, DEC, _exact_bnb
from .test_embedding_lora import IDS, _copy_lora, _lora_tensors, _peft, randomize
from .test_float_base import _load_4bit, _same_adapter_files
from .test_training import LLAMA_TARGETS

peft = pytest.importorskip("peft", reason="peft is the oracle of these tests")
transformers = pytest.importorskip("transformers", reason="the scaled embeddings are transformers classes")

from transformers.models.bart.modeling_bart import BartScaledWordEmbedding  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding  # noqa: E402
from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding  # noqa: E402
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding  # noqa: E402
from transformers.models.m2m_100.modeling_m2m_100 import M2M100ScaledWordEmbedding  # noqa: E402
from transformers.models.mbart.modeling_mbart import MBartScaledWordEmbedding  # noqa: E402

SCALED = {"gemma": GemmaTextScaledWordEmbedding, "gemma2": Gemma2TextScaledWordEmbedding,
          "gemma3": Gemma3TextScaledWordEmbedding, "bart": BartScaledWordEmbedding,
          "m2m_100": M2M100ScaledWordEmbedding, "mbart": MBartScaledWordEmbedding}
# (config, model, config kwargs, the Linear targets): every 4-bit layer adapted (reference64 dequantizes them all)
SEQ2SEQ_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
MODELS = {"gemma": ("GemmaConfig", "GemmaForCausalLM", dict(DEC, head_dim=16), LLAMA_TARGETS),
          "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(DEC, head_dim=16), LLAMA_TARGETS),
          "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(DEC, head_dim=16), LLAMA_TARGETS),
          "bart": ("BartConfig", "BartForConditionalGeneration", dict(BART, scale_embedding=True), SEQ2SEQ_TARGETS),
          "m2m_100": ("M2M100Config", "M2M100ForConditionalGeneration", BART, SEQ2SEQ_TARGETS)}


class _Tok(nn.Module):
    def __init__(self, cls: type, dtype: torch.dtype) -> None:
        super().__init__()
        self.emb = cls(50, 24, padding_idx=0, embed_scale=24 ** 0.5).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", list(SCALED))
def test_layer_is_peft_s_lora_on_a_scaled_embedding_bit_for_bit(kind, dtype):
    """Forward (the base lookup times ``embed_scale`` as its class does, the LoRA term times it in float32: Gemma's
    buffer, or BART's float rounded to the weight's dtype as peft's ``_get_embed_scale`` makes it), gradients, keys
    (``embed_scale`` is a non-persistent buffer or a plain float: no key), two adapters in a mixed batch, and the merge
    (the unscaled delta into the weight; the merged module is the original class again, scaling in its forward): all
    equal to peft's."""
    torch.manual_seed(0)
    net = _Tok(SCALED[kind], dtype)
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=["emb"])
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["emb"]))
    ours = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8)
    adapters.add_adapter(ours, "b", r=2, lora_alpha=6, target_modules=["emb"])
    layer = ours.emb
    assert isinstance(layer, QLoRAEmbedding)
    if kind.startswith("gemma"):
        assert layer.embed_scale.dtype == dtype
    else:  # the float attribute, as the module holds it
        assert type(layer.embed_scale) is float and layer.embed_scale == 24 ** 0.5
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
    assert merged.embed_scale is layer.embed_scale or merged.embed_scale == layer.embed_scale == 24 ** 0.5
    with torch.no_grad():
        assert torch.equal(merged(IDS), peft_merged(IDS))


@pytest.mark.parametrize("kind", ["gemma3", "bart"])
def test_the_scale_follows_the_model_s_dtype_and_a_meta_layer_gets_it_at_load(kind):
    """``model.to(bfloat16)`` casts Gemma's buffer as it casts the Gemma module's in peft, and BART's float stays a
    float (peft rounds it to the new weight dtype for the LoRA term, as we do): same outputs. A layer built on the meta
    device gets transformers' initial value when its weight loads (Gemma: ``scalar_embed_scale``, float32; BART: the
    float it always held)."""
    torch.manual_seed(0)
    net = _Tok(SCALED[kind], torch.float32)
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=["emb"])
    ours = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8)
    randomize(theirs, "default", 1)
    _copy_lora(theirs, ours)
    ours.to(torch.bfloat16)
    theirs.to(torch.bfloat16)
    scale = ours.emb.embed_scale
    assert scale.dtype == torch.bfloat16 if kind == "gemma3" else scale == 24 ** 0.5
    with torch.no_grad():
        assert torch.equal(ours(IDS), theirs(IDS))

    with torch.device("meta"):
        meta = _Tok(SCALED[kind], torch.float32)
    meta = apply_qlora(meta, ["emb"], r=4, lora_alpha=8)
    assert meta.emb.embed_scale.is_meta if kind == "gemma3" else meta.emb.embed_scale == 24 ** 0.5
    trained = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8)
    randomize(trained, "default", 2)
    meta.load_state_dict(trained.state_dict(), assign=True)
    scale = meta.emb.embed_scale
    if kind == "gemma3":
        assert not scale.is_meta and scale.dtype == torch.float32 and scale.item() == net.emb.embed_scale.item()
    with torch.no_grad():
        assert torch.equal(meta(IDS), trained(IDS))


def _scaled_classes() -> dict[str, type]:
    """Every ``*ScaledWordEmbedding`` class that transformers' ``modeling_*.py`` files define, by name."""
    root = pathlib.Path(transformers.__file__).parent / "models"
    out = {}
    for f in sorted(root.glob("*/modeling_*.py")):
        for name in re.findall(r"^class (\w+ScaledWordEmbedding)\(nn\.Embedding\):", f.read_text(), re.M):
            try:
                mod = importlib.import_module(f"transformers.models.{f.parent.name}.{f.stem}")
            except ImportError:  # a model needing an optional dependency
                continue
            out[name] = getattr(mod, name)
    return out


# the two forwards, as their source reads (whitespace-normalized): a check independent of qkernels' bytecode test
SOURCE_FORMS = {"return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)": "buffer",
                "return super().forward(input_ids) * self.embed_scale": "float"}


def test_every_transformers_scaled_embedding_whose_forward_is_lookup_times_scale_is_adapted():
    """Each transformers ``*ScaledWordEmbedding`` whose forward's source is exactly ``super().forward(x) *
    embed_scale`` (Gemma's ``.to(weight.dtype)`` form or BART's float form) is adapted, with its forward computed bit
    for bit (fp32 and bf16); any other (T5Gemma2's writes an eoi embedding too) is refused naming it. Guards the list
    against a transformers upgrade."""
    classes = _scaled_classes()
    assert {"BartScaledWordEmbedding", "GemmaTextScaledWordEmbedding", "T5Gemma2TextScaledWordEmbedding"} <= set(
        classes) and len(classes) >= 20
    forms = {}
    for name, cls in classes.items():
        body = inspect.getsource(cls.forward).split("\n", 1)[1]
        forms[name] = SOURCE_FORMS.get(" ".join(body.split()))
        emb = cls(50, 24, 0, embed_scale=24 ** 0.5)
        net = nn.Module()
        net.emb = emb
        if forms[name] is None:
            with pytest.raises(ValueError, match=rf"'emb'.*{name}.*own forward"):
                apply_qlora(net, ["emb"], r=4)
            continue
        for dtype in (torch.float32, torch.bfloat16):
            ours = apply_qlora(copy.deepcopy(net).to(dtype), ["emb"], r=4)
            with torch.no_grad():
                assert torch.equal(ours.emb(IDS), emb.to(dtype)(IDS)), name  # B = 0 at init: the base forward alone
    assert forms["T5Gemma2TextScaledWordEmbedding"] is None
    assert sum(f == "buffer" for f in forms.values()) >= 8 and sum(f == "float" for f in forms.values()) >= 10


def test_other_scaled_embeddings_and_a_plain_one_with_a_scale_stay_refused():
    """A subclass of a transformers scaled embedding (its forward inherited: an unknown class), a BART one whose
    ``embed_scale`` is None (its own forward cannot run) or a tensor (not the float its forward was read with), and a
    plain nn.Embedding with an ``embed_scale`` attribute (which peft would apply to the LoRA term only) are refused by
    name, before any change."""

    class Sub(Gemma3TextScaledWordEmbedding):
        pass

    class SubBart(BartScaledWordEmbedding):
        pass

    plain = nn.Embedding(50, 24)
    plain.embed_scale = 2.0
    for emb, match in ((Sub(50, 24, 0, embed_scale=2.0), "Sub.*own forward"),
                       (SubBart(50, 24, 0, embed_scale=2.0), "SubBart.*own forward"),
                       (BartScaledWordEmbedding(50, 24, 0, embed_scale=None), "embed_scale is None, not a Python "
                                                                              "float.*Set embed_scale"),
                       (BartScaledWordEmbedding(50, 24, 0, embed_scale=torch.tensor(2.0)), "embed_scale is tensor"),
                       (plain, "embed_scale attribute")):
        net = nn.Module()
        net.emb = emb
        with pytest.raises(ValueError, match=rf"'emb'.*{match}"):
            apply_qlora(net, ["emb"], r=4)
        assert net.emb is emb


# ---------------------------------------------------------------------------------------------- tiny 4-bit models
def _make(kind: str) -> nn.Module:
    cfg_name, model_name, kw, _ = MODELS[kind]
    torch.manual_seed(0)
    return getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    kw = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = ids.flip(-1)
    with torch.no_grad():
        return model(**kw).logits


def _embedding_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA embedding layers (ours or peft's) by name without peft's prefix."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, (QLoRAEmbedding, peft.tuners.lora.Embedding))}


@pytest.mark.parametrize("kind", list(MODELS))
def test_adapter_files_both_ways_and_merge_with_peft_on_a_4bit_model(kind, tmp_path):
    """A peft adapter with LoRA on the scaled ``embed_tokens`` (Gemma's one; BART's / M2M100's encoder and decoder
    ones, which share the weight of ``model.shared``; every 4-bit layer adapted too) loads here with peft's logits
    (``assert_matches``; the float64 reference is peft on the dequantized model, scale included); ``save_adapter``
    writes peft's keys and tensors back, which peft loads with identical logits; the merge puts the same embedding
    weight in the same class as peft's merge (both BART deltas into the one shared weight, in module order)."""
    make = functools.partial(_make, kind)
    model_cls = getattr(transformers, MODELS[kind][1])
    targets = [*MODELS[kind][3], "embed_tokens"]
    load = functools.partial(_load_4bit, model_cls, make, tmp_path / "dense")
    theirs = _peft(_exact_bnb(load()), r=4, lora_alpha=8, target_modules=targets)
    randomize(theirs, seed=3)
    theirs.save_pretrained(str(tmp_path / "peft"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BART: the embeddings' weight is tied to model.shared's and lm_head's
        ours = apply_qlora(load(), targets, r=4, lora_alpha=8, compute_dtype=torch.float32)
    embs = _embedding_layers(ours)
    assert len(embs) == (1 if kind.startswith("gemma") else 2)
    assert all(e.embed_scale is not None for e in embs.values())
    adapters.load_adapter(ours, tmp_path / "peft", replace=True)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = reference64(ours, tmp_path / "peft", make)
    assert_matches(_logits(ours, ids), _logits(theirs, ids), _logits(ref, ids))
    peft_embs = _embedding_layers(theirs)
    with torch.no_grad():
        for n, e in embs.items():
            assert torch.equal(e(ids), peft_embs[n](ids)), n

    adapters.save_adapter(ours, tmp_path / "ours")
    _same_adapter_files(tmp_path / "peft", tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(targets)
    assert not any("embed_scale" in k for k in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    again = peft.PeftModel.from_pretrained(_exact_bnb(load()), str(tmp_path / "ours"))
    assert torch.equal(_logits(again, ids), _logits(theirs, ids))

    for e in peft_embs.values():
        e.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied-weight merge warning
        merged = merge_and_unload(ours)
    for n, e in peft_embs.items():
        mine = merged.get_submodule(n)
        assert type(mine) is type(e.base_layer) and torch.equal(mine.weight, e.base_layer.weight)
        with torch.no_grad():
            assert torch.equal(mine(ids), e.base_layer(ids))
