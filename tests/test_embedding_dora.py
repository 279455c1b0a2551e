"""DoRA on an embedding (``use_dora=True`` with an ``nn.Embedding`` target): peft 0.21.2's ``DoraEmbeddingVariant`` /
``DoraEmbeddingLayer`` (peft/tuners/lora/variants.py:260-365, dora.py:173-202) on ``QLoRAEmbedding``.

The layer runs peft's very torch operations in the same order (``qkernels.dora``'s embedding helpers): the initial
magnitude, the forward, every gradient (A, B and the magnitude) and the merge are compared with ``torch.equal``, for
float32 / bfloat16 / float16 embeddings, a padding index, and scaled embeddings (Gemma's buffer, BART's float). On a
tiny Llama loaded in 4 bits the logits go through qkernels' 4-bit DoRA layers too and are compared with
``assert_matches`` (tests/test_adapters.py: ours and peft's each within float32 rounding of a float64 run); the
embedding's output itself is compared bit for bit.
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
from .test_embedding_lora import EMB_KEY, IDS, _bnb_llama, _copy_lora, _lora_tensors, _peft, randomize
from .test_float_base import _embeds_logits, _same_adapter_files
from .test_training import LLAMA_TARGETS, tiny_llama

peft = pytest.importorskip("peft", reason="peft is the oracle of these tests")
transformers = pytest.importorskip("transformers", reason="the scaled embeddings are transformers classes")

from transformers.models.bart.modeling_bart import BartScaledWordEmbedding  # noqa: E402
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding  # noqa: E402

MAG_KEY = "base_model.model.model.embed_tokens.lora_magnitude_vector"


class _Tok(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "plain":
            self.emb = nn.Embedding(50, 24)
        elif kind == "padding_idx":
            self.emb = nn.Embedding(50, 24, padding_idx=3)
        else:
            cls = {"gemma3": Gemma3TextScaledWordEmbedding, "bart": BartScaledWordEmbedding}[kind]
            self.emb = cls(50, 24, 0, embed_scale=24 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x)


def _magnitudes(model: nn.Module, adapter: str = "default") -> list[torch.Tensor]:
    return [m.lora_magnitude_vector[adapter].weight for m in model.modules()
            if isinstance(getattr(m, "lora_magnitude_vector", None), nn.ModuleDict) and adapter in
            m.lora_magnitude_vector]


def _perturb_magnitudes(theirs: nn.Module, ours: nn.Module, adapter: str = "default", seed: int = 0) -> None:
    """Give both models the same magnitudes, away from their initial norms (where g = 1 hides a wrong norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in zip(_magnitudes(theirs, adapter), _magnitudes(ours, adapter), strict=True):
            a.mul_(1 + 0.2 * torch.rand(a.shape, generator=g))
            b.copy_(a)


@pytest.mark.parametrize("init", [True, False], ids=["init-true", "init-false"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", ["plain", "padding_idx", "gemma3", "bart"])
def test_layer_is_peft_s_dora_embedding_bit_for_bit(kind, dtype, init):
    """Same seed: the same A, B and initial magnitude (peft computes it while the adapter still holds a half
    embedding's dtype); then with nonzero A, B and moved magnitudes the forward (dtype included), the gradients of A,
    B and the magnitude, the state-dict keys (``lora_magnitude_vector.default.weight``) and the merged weight (peft's
    merge_unsafe) are peft's, bit for bit; the merged module gives the adapted output within its rounding."""
    net = _Tok(kind).to(dtype)
    torch.manual_seed(5)
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=["emb"], use_dora=True,
                   init_lora_weights=init)
    torch.manual_seed(5)
    ours = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8, use_dora=True, init_lora_weights=init)
    layer = ours.emb
    assert isinstance(layer, QLoRAEmbedding) and layer.is_dora("default")
    (m_ours,), (m_theirs,) = _magnitudes(ours), _magnitudes(theirs)
    assert m_ours.shape == (24,) and m_ours.dtype == m_theirs.dtype == torch.float32 and m_ours.requires_grad
    for a, b in zip(_lora_tensors(ours, "default"), _lora_tensors(theirs, "default"), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(m_ours, m_theirs)
    with torch.no_grad():  # at init, DoRA is the base embedding only up to the norm's rounding
        assert torch.equal(ours(IDS), theirs(IDS))
    randomize(theirs, seed=1)
    _copy_lora(theirs, ours)
    _perturb_magnitudes(theirs, ours, seed=2)
    y, y_peft = ours(IDS), theirs(IDS)
    assert y.dtype == y_peft.dtype == dtype and torch.equal(y, y_peft)
    y.float().square().sum().backward()
    y_peft.float().square().sum().backward()
    for a, b in zip([*_lora_tensors(ours, "default"), m_ours], [*_lora_tensors(theirs, "default"), m_theirs],
                    strict=True):
        assert a.grad is not None and a.grad.abs().sum() > 0 and torch.equal(a.grad, b.grad)
    want = {k.replace("base_layer.", "") for k in theirs.base_model.model.state_dict()}
    assert set(ours.state_dict()) == want and "emb.lora_magnitude_vector.default.weight" in want
    with torch.no_grad():
        y = ours(IDS)
    merged, peft_merged = merge_and_unload(ours).emb, theirs.merge_and_unload().emb
    assert type(merged) is type(net.emb) and torch.equal(merged.weight, peft_merged.weight)
    with torch.no_grad():
        # the merged weight rounds (m / norm) * (W + delta) once to the weight's dtype, the unmerged output rounds
        # g * E[x] + g * s * lora once: both within a few units of the dtype's rounding of the same value
        eps = torch.finfo(dtype).eps
        assert torch.allclose(merged(IDS).float(), y.float(), rtol=4 * eps, atol=4 * eps * y.float().abs().max())


def test_dora_adapter_files_both_ways_with_peft_on_a_4bit_llama(tmp_path):
    """A peft DoRA adapter with the embedding targeted (keys ``...embed_tokens.lora_embedding_A`` / ``_B`` and
    ``...embed_tokens.lora_magnitude_vector``, ``use_dora`` true) loads here: the embedding's output is peft's bit for
    bit, the logits (4-bit DoRA layers too) within ``assert_matches``; ``save_adapter`` writes the same keys and
    tensors, which peft loads with identical logits."""
    load = functools.partial(_bnb_llama, tmp_path / "dense")
    targets = [*LLAMA_TARGETS, "embed_tokens"]  # every 4-bit layer adapted: reference64 dequantizes them all
    theirs = _peft(load(), r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    randomize(theirs, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in _magnitudes(theirs):
            m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g))
    theirs.save_pretrained(str(tmp_path / "peft"))
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {EMB_KEY.format("A"), EMB_KEY.format("B"), MAG_KEY} <= set(keys) and keys[MAG_KEY].shape == (64,)
    ours = apply_qlora(load(), targets, r=4, lora_alpha=8, use_dora=True)
    adapters.load_adapter(ours, tmp_path / "peft", replace=True)
    emb = ours.model.embed_tokens
    assert emb.is_dora("default") and torch.equal(emb.lora_magnitude_vector["default"].weight, keys[MAG_KEY])
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours.get_input_embeddings()(ids), theirs.get_input_embeddings()(ids))
    ref = reference64(ours, tmp_path / "peft", tiny_llama)
    assert_matches(*(_embeds_logits(m, ids, dt) for m, dt in
                     ((ours, torch.float32), (theirs, torch.float32), (ref, torch.float64))))

    adapters.save_adapter(ours, tmp_path / "ours")
    _same_adapter_files(tmp_path / "peft", tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and sorted(cfg["target_modules"]) == sorted(targets)
    again = peft.PeftModel.from_pretrained(load(), str(tmp_path / "ours"))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_dora_and_plain_adapters_switch_disable_delete_and_refuse_a_mixed_batch_as_peft():
    """A DoRA adapter and a plain one on the embedding: ``set_adapter``, ``disable_adapters`` and ``delete_adapter``
    give peft's outputs (bit for bit) and trainable flags (the magnitude frozen with its adapter); a mixed batch with
    the DoRA adapter active is refused as peft refuses it."""
    net = _Tok("padding_idx")
    torch.manual_seed(0)
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=["emb"], use_dora=True)
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["emb"]))
    torch.manual_seed(0)
    ours = apply_qlora(copy.deepcopy(net), ["emb"], r=4, lora_alpha=8, use_dora=True)
    adapters.add_adapter(ours, "b", r=2, lora_alpha=6, target_modules=["emb"])
    for name, seed in (("default", 1), ("b", 2)):
        randomize(theirs, name, seed)
        _copy_lora(theirs, ours, name)
    _perturb_magnitudes(theirs, ours, seed=3)
    assert ours.emb.is_dora("default") and not ours.emb.is_dora("b") and "dora" in repr(ours.emb)

    def same() -> None:
        with torch.no_grad():
            assert torch.equal(ours(IDS), theirs(IDS))
        flags = [t.requires_grad for n in ("default", "b") for t in [*_lora_tensors(ours, n), *_magnitudes(ours, n)]]
        assert flags == [t.requires_grad for n in ("default", "b")
                         for t in [*_lora_tensors(theirs, n), *_magnitudes(theirs, n)]]

    same()
    adapters.set_adapter(ours, "b")
    theirs.set_adapter("b")
    same()
    assert not _magnitudes(ours)[0].requires_grad
    adapters.set_adapter(ours, "default")
    theirs.set_adapter("default")
    same()
    with adapters.disable_adapters(ours), theirs.disable_adapter():
        with torch.no_grad():
            assert torch.equal(ours(IDS), theirs(IDS)) and torch.equal(ours(IDS), net(IDS))
    ours.eval()
    theirs.eval()
    with pytest.raises(ValueError, match="DoRA"):  # on a copy: peft leaves its adapter_names hooks behind then
        copy.deepcopy(theirs)(IDS, adapter_names=["default", "b"])
    with pytest.raises(ValueError, match="DoRA"), adapter_batch(ours, ["default", "b"]):
        ours(IDS)
    adapters.delete_adapter(ours, "default")
    theirs.delete_adapter("default")
    assert list(ours.emb.lora_magnitude_vector) == [] and "lora_magnitude_vector" not in str(ours.state_dict())
    theirs.set_adapter("b")
    ours.emb.set_adapter("b")
    same()


def test_dora_on_an_embedding_refuses_a_meta_weight_a_zero_column_and_bad_magnitudes():
    """Refused naming the module and the fix, before any change: DoRA on a meta embedding (its magnitude needs the
    weight), an embedding dimension that is zero for every token (DoRA's scale 0/0: NaN, as in peft); and
    ``set_lora_weight`` of a magnitude of the wrong shape or on a plain adapter."""
    with torch.device("meta"):
        meta = _Tok("plain")
    with pytest.raises(ValueError, match=r"'emb' is an nn\.Embedding on the meta device and use_dora=True.*Load the "
                                         r"base checkpoint first"):
        apply_qlora(meta, ["emb"], r=4, use_dora=True)
    assert type(meta.emb) is nn.Embedding
    net = _Tok("plain")
    with torch.no_grad():
        net.emb.weight[:, 5] = 0
    with pytest.raises(ValueError, match=r"'emb'.*embedding dimension\(s\) \[5\].*0/0"):
        apply_qlora(net, ["emb"], r=4, use_dora=True)
    assert type(net.emb) is nn.Embedding
    ours = apply_qlora(_Tok("plain"), ["emb"], r=4, use_dora=True)
    adapters.add_adapter(ours, "plain", r=4, target_modules=["emb"])
    with pytest.raises(ValueError, match=r"lora_magnitude_vector\.default has shape \(24,\), got \(23,\)"):
        ours.emb.set_lora_weight("default", "lora_magnitude_vector", torch.ones(23))
    with pytest.raises(ValueError, match="'plain' is not a DoRA adapter"):
        ours.emb.set_lora_weight("plain", "lora_magnitude_vector", torch.ones(24))


def test_a_dora_embedding_s_state_dict_and_trainer_checkpoint_round_trip_and_it_trains(tmp_path):
    """``state_dict()`` (magnitude included) loads into a fresh model, and the Trainer's adapter-only checkpoint
    (``save_adapters`` / ``restore_adapters``) restores the magnitude in place: equal outputs; a few AdamW steps on a
    tiny Llama with DoRA on the embedding lower the loss and move the embedding's magnitude."""
    from qkernels.integrations import restore_adapters, save_adapters

    targets = ["q_proj", "v_proj", "embed_tokens"]
    ours = apply_qlora(tiny_llama(), targets, r=4, use_dora=True)
    randomize(ours, seed=7)
    with torch.no_grad():
        ours.model.embed_tokens.lora_magnitude_vector["default"].weight.mul_(1.1)
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    assert "model.embed_tokens.lora_magnitude_vector.default.weight" in sd
    fresh = apply_qlora(tiny_llama(seed=1), targets, r=4, use_dora=True)
    fresh.load_state_dict(sd)
    save_adapters(ours, tmp_path / "ckpt")
    again = apply_qlora(tiny_llama(), targets, r=4, use_dora=True)
    mag = again.model.embed_tokens.lora_magnitude_vector["default"].weight
    restore_adapters(again, tmp_path / "ckpt")
    assert again.model.embed_tokens.lora_magnitude_vector["default"].weight is mag
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        assert torch.equal(fresh(input_ids=ids).logits, want) and torch.equal(again(input_ids=ids).logits, want)
    mag = ours.model.embed_tokens.lora_magnitude_vector["default"].weight
    before = mag.detach().clone()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ours.train()
    losses = []
    for _ in range(4):
        loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False)), losses
    assert not torch.equal(mag, before)
