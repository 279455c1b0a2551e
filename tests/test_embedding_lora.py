"""LoRA on ``nn.Embedding`` (``QLoRAEmbedding``): peft 0.21.2's ``lora.Embedding`` on the float embedding of a model
whose Linear layers are 4-bit, as peft + bitsandbytes run it.

Where both sides compute the very same float operations (the embedding layer alone, merges on a float model) the
comparison is bit for bit. Where the 4-bit Linear layers run (qkernels' kernels against bitsandbytes' dequantize +
matmul), outputs are compared with ``assert_matches`` (tests/test_adapters.py: ours and peft's each within float32
rounding of a float64 run of the same function). Tiny models built from configs: nothing is downloaded.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

import qkernels
from qkernels import adapters, apply_qlora, merge_and_unload, merge_into_4bit
from qkernels.embedding import QLoRAEmbedding
from qkernels.nn import QLoRALinear

from .test_adapters import assert_matches, reference64
from .test_float_base import _embeds_logits, _load_4bit, _same_adapter_files, tied_llama
from .test_training import LLAMA_TARGETS, tiny_llama

peft = pytest.importorskip("peft", reason="peft is the interop target of these tests")
transformers = pytest.importorskip("transformers", reason="the tiny models are transformers models")

EMB_TARGETS = ["q_proj", "v_proj", "embed_tokens"]
EMB_KEY = "base_model.model.model.embed_tokens.lora_embedding_{}"


def _lora_tensors(model: nn.Module, adapter: str) -> list[torch.Tensor]:
    """Every LoRA weight of ``adapter`` (Linear: ``lora_A[adapter].weight``; embedding: ``lora_embedding_A[adapter]``),
    each once (QLoRAEmbedding's ``lora_A`` is its ``lora_embedding_A``), in module order."""
    out: dict[int, torch.Tensor] = {}
    for _, m in model.named_modules():
        for which in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            d = getattr(m, which, None)
            if isinstance(d, (nn.ModuleDict, nn.ParameterDict)) and adapter in d:
                t = d[adapter]
                t = t.weight if isinstance(t, nn.Module) else t
                out.setdefault(id(t), t)
    return list(out.values())


def randomize(model: nn.Module, adapter: str = "default", seed: int = 0) -> None:
    """Nonzero A and B everywhere (a fresh adapter's zero A (embeddings) or B (Linear) hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in _lora_tensors(model, adapter):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)


class _Tok(nn.Module):
    """One embedding, 50 x 24, with ``nn.Embedding``'s keyword arguments."""

    def __init__(self, **kw) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 24, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x)


def _peft(model: nn.Module, **cfg) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's "save_embedding_layers" / tied-embedding notes
        return peft.get_peft_model(model, peft.LoraConfig(**cfg))


def _copy_lora(src: nn.Module, dst: nn.Module, adapter: str = "default") -> None:
    with torch.no_grad():
        for s, d in zip(_lora_tensors(src, adapter), _lora_tensors(dst, adapter), strict=True):
            d.copy_(s)


IDS = torch.tensor([[3, 0, 7, 49, 3, 12], [5, 5, 3, 1, 30, 2]])  # token 3 repeats (scale_grad_by_freq, padding_idx)
EMB_KW = {"plain": {}, "padding_idx": {"padding_idx": 3}, "max_norm": {"max_norm": 0.5},
          "scale_grad_by_freq": {"scale_grad_by_freq": True}}


# ---------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", list(EMB_KW))
def test_layer_is_peft_lora_embedding_bit_for_bit(kind, dtype, use_rslora):
    """Forward (dtype included), the LoRA gradients, the state-dict keys and the merged embedding are peft's
    ``lora.Embedding`` on the same embedding, bit for bit: the base lookup in the weight's dtype,
    ``F.embedding(x, A^T, <the base's padding_idx, max_norm, ...>) @ B^T * s`` in float32, the sum cast back
    (peft/tuners/lora/layer.py:1487-1538); the merge ``W += ((B A)^T s).to(W.dtype)`` (layer.py:1364-1422)."""
    torch.manual_seed(0)
    net = _Tok(**EMB_KW[kind]).to(dtype)
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=["emb"], use_rslora=use_rslora)
    ours = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8, use_rslora=use_rslora)
    layer = ours.emb
    assert isinstance(layer, QLoRAEmbedding) and layer.weight.dtype == dtype and not layer.weight.requires_grad
    assert layer.scaling["default"] == (8 / math.sqrt(4) if use_rslora else 2.0)
    randomize(theirs, seed=1)
    _copy_lora(theirs, ours)
    y_ours, y_theirs = ours(IDS), theirs(IDS)
    assert y_ours.dtype == y_theirs.dtype == dtype and torch.equal(y_ours, y_theirs)
    y_ours.float().square().sum().backward()
    y_theirs.float().square().sum().backward()
    for a, b in zip(_lora_tensors(ours, "default"), _lora_tensors(theirs, "default"), strict=True):
        assert a.grad is not None and torch.equal(a.grad, b.grad)
    if kind == "padding_idx":  # no gradient through the padding row of A^T (column 3 of A)
        assert layer.lora_embedding_A["default"].grad[:, 3].abs().sum() == 0
    want = {k.replace("base_layer.", "") for k in theirs.base_model.model.state_dict()}
    assert set(ours.state_dict()) == want == {"emb.weight", "emb.lora_embedding_A.default",
                                              "emb.lora_embedding_B.default"}
    merged, peft_merged = merge_and_unload(ours).emb, theirs.merge_and_unload().emb
    assert type(merged) is nn.Embedding and merged.weight.dtype == dtype
    assert torch.equal(merged.weight, peft_merged.weight)
    assert (merged.padding_idx, merged.max_norm, merged.scale_grad_by_freq) == (
        peft_merged.padding_idx, peft_merged.max_norm, peft_merged.scale_grad_by_freq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("init", [True, "gaussian", False], ids=["true", "gaussian", "false"])
def test_init_is_peft_s(init, dtype):
    """peft draws A and B with torch.randn, then for init True / "gaussian" sets A = 0 and B ~ N(0, 1) (the other way
    round from Linear layers; layer.py:1241-1242 and 346-350), for False keeps both draws; a bf16 embedding rounds them
    through bf16 (the adapter is moved to the base's dtype, then autocast back to float32). Same seed, same tensors."""
    net = _Tok().to(dtype)
    torch.manual_seed(3)
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=["emb"], init_lora_weights=init)
    torch.manual_seed(3)
    ours = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8, init_lora_weights=init)
    for a, b in zip(_lora_tensors(ours, "default"), _lora_tensors(theirs, "default"), strict=True):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    A = ours.emb.lora_embedding_A["default"]
    assert (A.abs().sum() == 0) == (init is not False)
    with torch.no_grad():
        assert torch.equal(ours(IDS), theirs(IDS))


def test_several_adapters_switch_disable_and_delete_as_peft():
    """Two adapters on the embedding: the active one runs and trains, the other is frozen; ``set_adapter``,
    ``disable_adapters`` and ``delete_adapter`` give peft's outputs (bit for bit) and trainable flags."""
    torch.manual_seed(0)
    net = _Tok(padding_idx=0)
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=["emb"])
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["emb"]))
    ours = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8)
    assert adapters.add_adapter(ours, "b", r=2, lora_alpha=6, use_rslora=True, target_modules=["emb"]) == ["emb"]
    for name, seed in (("default", 1), ("b", 2)):
        randomize(theirs, name, seed)
        _copy_lora(theirs, ours, name)

    def same() -> None:
        with torch.no_grad():
            assert torch.equal(ours(IDS), theirs(IDS))
        flags = [t.requires_grad for n in ("default", "b") for t in _lora_tensors(ours, n)]
        assert flags == [t.requires_grad for n in ("default", "b") for t in _lora_tensors(theirs, n)]

    same()
    adapters.set_adapter(ours, "b")
    theirs.set_adapter("b")
    same()
    with adapters.disable_adapters(ours), theirs.disable_adapter():
        with torch.no_grad():
            assert torch.equal(ours(IDS), theirs(IDS)) and torch.equal(ours(IDS), net(IDS))
    same()
    adapters.delete_adapter(ours, "b")
    theirs.delete_adapter("b")
    assert adapters.adapter_names(ours) == ["default"] and ours.emb.active_adapter == "default"
    theirs.set_adapter("default")
    same()


def test_dropout_is_not_applied_to_embedding_lora_as_in_peft():
    """peft creates ``lora_dropout`` for an embedding adapter but its forward never calls it (layer.py:1518-1529): in
    training mode with lora_dropout=0.5 both return the same deterministic output; the config keeps the value."""
    torch.manual_seed(0)
    net = _Tok()
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=["emb"], lora_dropout=0.5)
    ours = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8, lora_dropout=0.5)
    randomize(theirs)
    _copy_lora(theirs, ours)
    ours.train()
    theirs.train()
    assert isinstance(ours.emb.lora_dropout["default"], nn.Dropout)
    assert torch.equal(ours(IDS), ours(IDS)) and torch.equal(ours(IDS), theirs(IDS))


# ---------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("targets", [["q_proj", "embed_tokens"], ["q_proj", "model.embed_tokens"],
                                     r".*\.(q_proj|embed_tokens)"], ids=["suffix", "full-name", "regex"])
def test_explicit_targets_adapt_the_embedding_and_count_as_peft(targets):
    """An explicit target naming an nn.Embedding (peft's rules: a name, a dotted suffix, or a full-match regex) gives
    it LoRA on its float weight; the Linear targets are 4-bit. Trainable / total counts equal peft's."""
    ours = apply_qlora(tiny_llama(), targets, r=4)
    assert isinstance(ours.model.embed_tokens, QLoRAEmbedding) and ours.model.layers[0].self_attn.q_proj.quantized
    theirs = _peft(tiny_llama(), r=4, target_modules=targets)
    assert type(theirs.base_model.model.model.embed_tokens).__name__ == "Embedding"
    assert qkernels.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n.replace("base_model.model.", "", 1) for n, p in theirs.named_parameters() if p.requires_grad}


def test_all_linear_leaves_the_embedding_alone_as_peft():
    """peft's "all-linear" takes Linear layers only; ``add_adapter`` with no target list does not reach the embedding
    either (it must be named)."""
    ours = apply_qlora(tiny_llama(), "all-linear", r=4)
    assert type(ours.model.embed_tokens) is nn.Embedding
    ours = apply_qlora(tiny_llama(), EMB_TARGETS, r=4)
    added = adapters.add_adapter(ours, "other")
    assert "model.embed_tokens" not in added and "other" not in ours.model.embed_tokens.lora_embedding_A
    assert "model.embed_tokens" in adapters.add_adapter(ours, "third", target_modules=["embed_tokens"])


def _bnb_llama(d) -> nn.Module:
    return _load_4bit(transformers.LlamaForCausalLM, tiny_llama, d)


def test_adapter_files_both_ways_with_peft_on_a_4bit_llama(tmp_path):
    """A peft adapter with LoRA on embed_tokens (keys ``...embed_tokens.lora_embedding_A`` / ``_B``, no ``.weight``;
    save_embedding_layers adds ``embed_tokens.base_layer.weight``) loads here with peft's logits; ``save_adapter``
    writes the same keys and tensors, which peft loads with identical logits."""
    load = functools.partial(_bnb_llama, tmp_path / "dense")
    targets = [*LLAMA_TARGETS, "embed_tokens"]  # every 4-bit layer adapted: reference64 dequantizes them all
    theirs = _peft(load(), r=4, lora_alpha=8, target_modules=targets)
    randomize(theirs, seed=3)
    theirs.save_pretrained(str(tmp_path / "peft"))
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {EMB_KEY.format("A"), EMB_KEY.format("B"), "base_model.model.model.embed_tokens.base_layer.weight"} <= set(
        keys)
    ours = apply_qlora(load(), targets, r=4, lora_alpha=8)
    adapters.load_adapter(ours, tmp_path / "peft", replace=True)
    assert torch.equal(ours.model.embed_tokens.lora_embedding_B["default"], keys[EMB_KEY.format("B")])
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = reference64(ours, tmp_path / "peft", tiny_llama)
    assert_matches(*(_embeds_logits(m, ids, dt) for m, dt in
                     ((ours, torch.float32), (theirs, torch.float32), (ref, torch.float64))))
    with torch.no_grad():
        assert torch.equal(ours.get_input_embeddings()(ids), theirs.get_input_embeddings()(ids))

    adapters.save_adapter(ours, tmp_path / "ours")
    _same_adapter_files(tmp_path / "peft", tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(load(), str(tmp_path / "ours"))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, theirs(input_ids=ids).logits)


def _edited(src, dst, edit) -> None:
    sd = load_file(str(src / "adapter_model.safetensors"))
    edit(sd)
    dst.mkdir()
    save_file(sd, str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())


def test_mismatched_embedding_adapter_files_name_the_key_and_load_nothing(tmp_path):
    """A rank that is not the config's, a B of the wrong width, an A without its B, and embedding keys for a module
    that is not adapted here each raise ValueError naming the key; the model keeps only its adapter."""
    ours = apply_qlora(tiny_llama(), EMB_TARGETS, r=4, lora_alpha=8)
    randomize(ours)
    adapters.save_adapter(ours, tmp_path / "ok")
    A, B = EMB_KEY.format("A"), EMB_KEY.format("B")
    cases = {
        "rank": (lambda sd: sd.update({A: sd[A][:3]}), r"lora_embedding_A'.*\(3, 96\).*r=4.*\(4, 96\)"),
        "width": (lambda sd: sd.update({B: sd[B][:10]}), r"lora_embedding_B'.*\(10, 4\).*needs \(64, 4\)"),
        "no B": (lambda sd: sd.pop(B), r"'model\.embed_tokens'.*no lora_B.*embed_tokens\.lora_embedding_B"),
    }
    for case, (edit, message) in cases.items():
        _edited(tmp_path / "ok", tmp_path / case, edit)
        with pytest.raises(ValueError, match=message):
            adapters.load_adapter(ours, tmp_path / case, adapter_name="x")
        assert adapters.adapter_names(ours) == ["default"]
    # an embedding apply_qlora left alone gets peft's embedding LoRA at load (PeftModel.from_pretrained's rule); a
    # file that does not fit leaves it the plain embedding it was
    plain = apply_qlora(tiny_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    emb = plain.model.embed_tokens
    with pytest.raises(ValueError, match=r"lora_embedding_A'.*\(3, 96\)"):
        adapters.load_adapter(plain, tmp_path / "rank", adapter_name="x")
    assert plain.model.embed_tokens is emb and adapters.adapter_names(plain) == ["default"]
    adapters.load_adapter(plain, tmp_path / "ok", adapter_name="x")
    sd = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
    assert isinstance(plain.model.embed_tokens, QLoRAEmbedding)
    assert torch.equal(plain.model.embed_tokens.lora_embedding_A["x"], sd[A])


def test_merge_and_unload_is_peft_s_merge_into_the_embedding():
    """``W += ((B @ A)^T * s).to(W.dtype)`` in place (peft's get_delta_weight, layer.py:1394-1422): the merged model
    holds an nn.Embedding (padding_idx kept) whose weight equals peft's merged one bit for bit; merge_into_4bit merges
    it the same way (it stays float)."""
    theirs = _peft(tiny_llama(), r=4, lora_alpha=8, target_modules=EMB_TARGETS)
    randomize(theirs, seed=4)
    ours = apply_qlora(tiny_llama(), EMB_TARGETS, r=4, lora_alpha=8)
    _copy_lora(theirs, ours)
    delta = ours.model.embed_tokens.get_delta_weight()
    assert delta.shape == (96, 64) and torch.equal(delta, theirs.base_model.model.model.embed_tokens.get_delta_weight(
        "default"))
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours.get_input_embeddings()(ids)
    peft_merged = theirs.merge_and_unload()
    merged = merge_and_unload(copy.deepcopy(ours))
    emb = merged.model.embed_tokens
    assert type(emb) is nn.Embedding and emb.padding_idx == 0 and not emb.weight.requires_grad
    assert torch.equal(emb.weight, peft_merged.model.embed_tokens.weight)
    with torch.no_grad():
        assert torch.allclose(emb(ids), want, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge_into_4bit(ours)
    assert type(ours.model.embed_tokens) is nn.Embedding
    assert torch.equal(ours.model.embed_tokens.weight, peft_merged.model.embed_tokens.weight)


def test_tied_embedding_warns_trains_the_input_side_and_merges_as_peft():
    """With tie_word_embeddings, LoRA on embed_tokens changes the input embeddings only (the head keeps reading the
    shared plain weight), as peft with ensure_weight_tying=False: both warn when the adapter is added and when it is
    merged; the merge writes into the shared weight, so the head changes too and stays tied, bit for bit as peft."""
    with pytest.warns(UserWarning, match="tie_word_embeddings=True"):
        theirs = peft.get_peft_model(tied_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=EMB_TARGETS))
    randomize(theirs, seed=5)
    with pytest.warns(UserWarning, match=r"embedding 'model\.embed_tokens', whose weight is tied to 'lm_head\.weight'"):
        ours = apply_qlora(tied_llama(), EMB_TARGETS, r=4, lora_alpha=8)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight and type(ours.lm_head) is nn.Linear
    _copy_lora(theirs, ours)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the input side has the LoRA term; the head reads the plain shared weight in both
        assert torch.equal(ours.get_input_embeddings()(ids), theirs.get_input_embeddings()(ids))
        h = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
        assert torch.equal(ours.lm_head(h), theirs.get_output_embeddings()(h))
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        peft_merged = theirs.merge_and_unload()
    with pytest.warns(UserWarning, match=r"merging LoRA into 'model\.embed_tokens', whose weight is tied to "
                                         r"'lm_head\.weight'.*changes too"):
        merged = merge_and_unload(ours)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.equal(merged.lm_head.weight, peft_merged.lm_head.weight)


def test_tied_embedding_and_head_both_targeted_merge_both_deltas_in_peft_s_order():
    """embed_tokens and the tied lm_head both adapted: both merges write into the one shared weight, embedding first
    (``named_modules`` order, as peft's unload walks it), bit for bit as peft."""
    targets = ["q_proj", "embed_tokens", "lm_head"]
    theirs = _peft(tied_llama(), r=4, lora_alpha=8, target_modules=targets)
    randomize(theirs, seed=5)
    with pytest.warns(UserWarning, match="tied"):
        ours = apply_qlora(tied_llama(), targets, r=4, lora_alpha=8)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight and isinstance(ours.lm_head, QLoRALinear)
    _copy_lora(theirs, ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = theirs.merge_and_unload()
        merged = merge_and_unload(ours)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.equal(merged.lm_head.weight, peft_merged.lm_head.weight)


# ---------------------------------------------------------------------------------------------- training
def _train(model: nn.Module, ids: torch.Tensor, steps: int) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        e = model.get_input_embeddings()(ids)  # grad-requiring input: bitsandbytes' exact CPU path (DESIGN §5)
        loss = model(inputs_embeds=e, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_tracks_peft_and_bitsandbytes_step_by_step(tmp_path):
    """Five AdamW steps (lr 1e-2) of LoRA on q_proj / v_proj / embed_tokens of a tiny Llama loaded in 4 bits: ours
    and peft + bitsandbytes start from the same A, B and lower the loss at every step. Tolerance: the two differ only
    by float32 summation order in the 4-bit matmuls (the embedding LoRA is the same operations in both), which Adam's
    first steps (update ~ lr * sign(g)) carry into the weights; measured here: relative loss gap 0 at four steps and
    1.1e-7 (one float32 ulp of the loss) at one, held to 1e-5 (~100 ulps: room for the order to differ on other
    CPUs, far below the 5% the loss moves)."""
    load = functools.partial(_bnb_llama, tmp_path / "dense")
    theirs = _peft(load(), r=4, lora_alpha=8, target_modules=EMB_TARGETS)
    randomize(theirs, seed=6)
    ours = apply_qlora(load(), EMB_TARGETS, r=4, lora_alpha=8)
    _copy_lora(theirs, ours)
    ids = torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(2))
    a, b = _train(ours, ids, 5), _train(theirs, ids, 5)
    assert all(x > y for x, y in zip(a, a[1:], strict=False)), a
    gaps = [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]
    assert max(gaps) <= 1e-5, (a, b, gaps)


def test_state_dict_round_trip_is_bit_exact():
    """``state_dict()`` of a trained model loads into a fresh one (another seed) with every tensor and logit equal."""
    ours = apply_qlora(tiny_llama(), EMB_TARGETS, r=4)
    randomize(ours, seed=7)
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    assert {"model.embed_tokens.lora_embedding_A.default", "model.embed_tokens.lora_embedding_B.default"} <= set(sd)
    fresh = apply_qlora(tiny_llama(seed=1), EMB_TARGETS, r=4)
    fresh.load_state_dict(sd)
    assert all(torch.equal(v, sd[k]) for k, v in fresh.state_dict().items())
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, ours(input_ids=ids).logits)
    bad = dict(sd, **{"model.embed_tokens.lora_embedding_A.default": torch.zeros(2, 96)})
    with pytest.raises(ValueError, match=r"size mismatch for 'model\.embed_tokens\.lora_embedding_A\.default'.*rank"):
        fresh.load_state_dict(bad)


def test_trainer_checkpoints_and_pickles_keep_the_embedding_adapter(tmp_path):
    """``save_adapters`` / ``restore_adapters`` (the Trainer's adapter-only checkpoints) restore the embedding's LoRA
    in place, and ``torch.save`` of the whole model round-trips: the same logits."""
    import io

    from qkernels.integrations import restore_adapters, save_adapters

    ours = apply_qlora(tiny_llama(), EMB_TARGETS, r=4)
    randomize(ours, seed=10)
    save_adapters(ours, tmp_path / "ckpt")
    again = apply_qlora(tiny_llama(), EMB_TARGETS, r=4)
    A = again.model.embed_tokens.lora_embedding_A["default"]
    restore_adapters(again, tmp_path / "ckpt")
    assert again.model.embed_tokens.lora_embedding_A["default"] is A  # in place: an optimizer keeps its Parameter
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        assert torch.equal(again(input_ids=ids).logits, want) and torch.equal(loaded(input_ids=ids).logits, want)
    assert type(merge_and_unload(loaded).model.embed_tokens) is nn.Embedding


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_embedding_lora_gradients(use_reentrant):
    """Checkpointed layers recompute the same float operations (no dropout here), so every LoRA gradient, the
    embedding's (outside the checkpointed layers) included, is the same bit for bit."""
    model = apply_qlora(tiny_llama(), EMB_TARGETS, r=4)
    randomize(model, seed=8)
    model.train()
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [t.grad.clone() for t in _lora_tensors(model, "default")]

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ckpt = grads()
    for g, h in zip(plain, ckpt, strict=True):
        assert h.abs().sum() > 0 and torch.equal(g, h)


# ---------------------------------------------------------------------------------------------- refusals, meta
def test_embeddings_that_cannot_be_adapted_are_refused_by_name():
    """An embedding with its own forward (not one of transformers' scaled embeddings) or an integer weight, and LoftQ
    on an embedding, are refused before any change, naming the module (DoRA on an embedding: test_embedding_dora.py)."""

    class Scaled(nn.Embedding):
        def forward(self, x):
            return super().forward(x) * 2.0

    class Net(nn.Module):
        def __init__(self, emb):
            super().__init__()
            self.emb, self.fc = emb, nn.Linear(24, 8)

    with pytest.raises(ValueError, match=r"'emb'.*Scaled.*own forward"):
        apply_qlora(Net(Scaled(50, 24)), ["emb", "fc"], r=4)
    net = Net(nn.Embedding(50, 24))
    with pytest.raises(ValueError, match=r"'emb' is an nn\.Embedding.*loftq"):
        apply_qlora(net, ["emb", "fc"], r=4, init_lora_weights="loftq")
    assert type(net.emb) is nn.Embedding and type(net.fc) is nn.Linear


class _LM(nn.Module):
    """An embedding (padding_idx 0) and a Linear head: every tensor in the state dict (no non-persistent buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 64, padding_idx=0)
        self.head = nn.Linear(64, 50)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed_tokens(x))


def test_a_sparse_embedding_runs_without_grad_and_names_the_fix_with_grad():
    """``sparse=True``: peft's backward fails inside torch (a sparse gradient of A^T cannot be transposed to A); here
    the forward with grad says so and what to do, and without grad the output is peft's."""
    torch.manual_seed(0)
    net = _Tok(sparse=True)
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=["emb"])
    ours = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8)
    randomize(theirs, seed=1)
    _copy_lora(theirs, ours)
    with pytest.raises(RuntimeError, match="permute"):
        theirs(IDS).square().sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse=True.*Set layer\.sparse = False to train"):
        ours(IDS)
    with torch.no_grad():
        assert torch.equal(ours(IDS), theirs(IDS))
    ours.emb.sparse = False
    ours(IDS).square().sum().backward()
    assert ours.emb.lora_embedding_A["default"].grad.abs().sum() > 0


def test_a_meta_model_gets_its_embedding_lora_when_the_checkpoint_loads():
    """On a model built on the meta device the embedding layer holds shapes only and refuses to run, naming the
    weight; ``load_state_dict(sd, assign=True)`` of a checkpoint with the LoRA keys gives the saved model's outputs,
    and of a base-only one initializes the embedding LoRA as peft does (A = 0, B ~ N(0, 1), trainable)."""
    torch.manual_seed(0)
    ours = apply_qlora(_LM(), ["embed_tokens", "head"], r=4)
    randomize(ours, seed=9)
    sd = ours.state_dict()
    with torch.device("meta"):
        meta = _LM()
    apply_qlora(meta, ["embed_tokens", "head"], r=4)
    assert meta.embed_tokens.weight.is_meta and "weight" in meta.embed_tokens._unloaded
    with pytest.raises(RuntimeError, match=r"\['lora_embedding_A\.default', 'lora_embedding_B\.default', 'weight'\] "
                                           r"never loaded.*assign=True"):
        meta.embed_tokens(torch.tensor([1]))
    meta.load_state_dict(sd, assign=True)
    with torch.no_grad():
        assert torch.equal(meta(IDS), ours(IDS))
    base_only = {k: v for k, v in sd.items() if "lora_" not in k}
    with torch.device("meta"):
        meta = _LM()
    apply_qlora(meta, ["embed_tokens", "head"], r=4)
    missing = meta.load_state_dict(base_only, assign=True, strict=False).missing_keys
    assert not [k for k in missing if "embed_tokens" in k]
    emb = meta.embed_tokens
    assert not emb._unloaded and emb.lora_embedding_A["default"].abs().sum() == 0
    assert emb.lora_embedding_A["default"].requires_grad and emb.lora_embedding_B["default"].std() > 0.5
    with torch.no_grad():
        assert torch.equal(emb(IDS), F.embedding(IDS, sd["embed_tokens.weight"], padding_idx=0))


@pytest.mark.parametrize("order", [("first", "second"), ("second", "first")])
def test_an_embedding_base_another_adapter_made_a_lora_layer_is_saved_and_loaded_as_peft_does(tmp_path, order):
    """peft's save_embedding_layers writes the base weight of every input / output embedding that is a LoRA layer into
    the file of an adapter targeting ``embed_tokens`` / ``lm_head``, also one this adapter does not adapt: "first"
    (embed_tokens) gets lm_head's base because "second" made lm_head a LoRA layer. Loading "first" into a model where
    lm_head is no LoRA layer drops that key, as peft's load (strict=False) does; where it is one, it loads into its
    base (fuzz_vs_peft seed 43 case 32 was refused: "module 'lm_head' is not selected by the adapter's config").
    And ours saves the same keys (and values) as peft."""
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               target_modules=["q_proj", "embed_tokens"]), "first")
    theirs.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                 target_modules=["v_proj", "lm_head"]))
    for name in ("first", "second"):
        theirs.save_pretrained(str(tmp_path / "peft"), selected_adapters=[name])
    files = {"first": tmp_path / "peft" / "first", "second": tmp_path / "peft" / "second"}
    assert "base_model.model.lm_head.base_layer.weight" in load_file(str(files["first"] / "adapter_model.safetensors"))
    ours = tiny_llama()
    for i, name in enumerate(order):
        adapters.load_adapter(ours, files[name], adapter_name=name, set_active=i == 0)
    for name in ("first", "second"):
        adapters.set_adapter(ours, name)
        theirs.set_adapter(name)
        x = torch.randint(3, 90, (2, 7))
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, rtol=1e-5, atol=1e-5)
        adapters.save_adapter(ours, tmp_path / "ours" / name, adapter_name=name)
        _same_adapter_files(files[name], tmp_path / "ours" / name)
