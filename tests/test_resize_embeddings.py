"""``model.resize_token_embeddings(n)`` (transformers) on a model whose input embedding has LoRA (``qkernels.resize``).

peft 0.21.2 cannot do it: transformers refuses its ``lora.Embedding`` (``TypeError: Old embeddings are of type ...``);
peft's advice is to resize first, then add LoRA. Here the resize works after ``apply_qlora`` and gives the model that
"resize, then apply_qlora, then copy the adapter (A's new columns zero)" gives: compared bit for bit (the same base
weights from the same random draws, the same LoRA weights, so the same float and 4-bit operations), and against peft
on the embedding layer itself (peft's ``lora.Embedding`` on the resized embedding, bit for bit).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from qkernels import adapters, apply_qlora, merge_and_unload
from qkernels.embedding import QLoRAEmbedding

from .test_architectures import BART
from .test_embedding_lora import EMB_TARGETS, _lora_tensors, _peft, randomize
from .test_float_base import tied_llama
from .test_training import tiny_llama

peft = pytest.importorskip("peft", reason="peft is the reference of these tests")
transformers = pytest.importorskip("transformers", reason="resize_token_embeddings is a transformers method")

MAKERS = {"untied": tiny_llama, "tied": tied_llama}


def _pad_columns(A: torch.Tensor, n: int) -> torch.Tensor:
    """A ``[r, old]`` with zero columns up to ``n`` (or cut to ``n``)."""
    out = A.new_zeros((A.shape[0], n))
    k = min(n, A.shape[1])
    out[:, :k] = A[:, :k]
    return out


def _resized(make, n: int, seed: int = 11) -> nn.Module:
    """The plain model resized to ``n`` tokens, with the RNG at ``seed`` (transformers draws the new rows)."""
    model = make()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.resize_token_embeddings(n)
    return model


def _copy_adapter(src: nn.Module, dst: nn.Module, n: int) -> None:
    """``src``'s LoRA weights into ``dst`` (an embedding A padded / cut to ``n`` columns)."""
    with torch.no_grad():
        for s, d in zip(_lora_tensors(src, "default"), _lora_tensors(dst, "default"), strict=True):
            d.copy_(_pad_columns(s, n) if s.shape != d.shape else s)


@pytest.mark.parametrize("n", [131, 80], ids=["grow", "shrink"])
@pytest.mark.parametrize("tie", list(MAKERS))
def test_resize_after_apply_qlora_is_resize_before_it(tie, n):
    """peft's LoRA model refuses the resize (transformers' TypeError). Ours: the embedding stays a QLoRAEmbedding on
    the resized shared weight (a tied head still tied), ``config.vocab_size`` follows, A grows zero columns (or
    loses the cut ones); the base weights (embedding, untied head) are those of the plain model resized with the same
    draws; the old tokens' embeddings are the same bits as before; the logits and embedding outputs are those of
    ``apply_qlora`` on the resized plain model with the adapter copied, and the embedding layer is peft's
    ``lora.Embedding`` on it, bit for bit."""
    make = MAKERS[tie]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _peft(make(), r=4, lora_alpha=8, target_modules=EMB_TARGETS)
        with pytest.raises(TypeError, match="Old embeddings are of type.*lora"):
            theirs.resize_token_embeddings(n)
        ours = apply_qlora(make(), EMB_TARGETS, r=4, lora_alpha=8)
    randomize(ours, seed=1)
    before = _lora_tensors(ours, "default")
    old_ids = torch.randint(3, 80, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        old_out = ours.get_input_embeddings()(old_ids)
    torch.manual_seed(11)
    emb = ours.resize_token_embeddings(n)
    layer = ours.model.embed_tokens
    assert emb is layer and isinstance(layer, QLoRAEmbedding) and layer.weight.shape == (n, 64)
    assert layer.num_embeddings == n and ours.config.vocab_size == n and ours.lm_head.weight.shape == (n, 64)
    assert (ours.lm_head.weight is layer.weight) == (tie == "tied") and not layer.weight.requires_grad
    A = layer.lora_embedding_A["default"]
    assert A is before[0] and A.shape == (4, n) and A.requires_grad  # in place: the same Parameter
    if n > 96:
        assert A[:, 96:].abs().sum() == 0

    plain = _resized(make, n)
    assert torch.equal(layer.weight, plain.model.embed_tokens.weight)
    assert torch.equal(ours.lm_head.weight, plain.lm_head.weight)
    ids = torch.randint(0, n, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours.get_input_embeddings()(old_ids), old_out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            after = apply_qlora(copy.deepcopy(plain), EMB_TARGETS, r=4, lora_alpha=8)
        _copy_adapter(ours, after, n)
        assert torch.equal(ours(input_ids=ids).logits, after(input_ids=ids).logits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_emb = _peft(copy.deepcopy(plain), r=4, lora_alpha=8, target_modules=["embed_tokens"])
        peft_layer = peft_emb.base_model.model.model.embed_tokens
        for which in ("lora_embedding_A", "lora_embedding_B"):
            getattr(peft_layer, which)["default"].copy_(getattr(layer, which)["default"])
        assert torch.equal(ours.get_input_embeddings()(ids), peft_emb.get_input_embeddings()(ids))
    ours.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    assert A.grad.shape == (4, n) and A.grad.abs().sum() > 0


def test_resize_keeps_bart_s_lora_on_the_shared_embedding():
    """BART: transformers' resize writes ``model.shared`` into the encoder and decoder (``set_input_embeddings``),
    which would drop their LoRA layers; here both stay QLoRAEmbeddings on the one resized shared weight (the head still
    tied to it), with the adapter's outputs on old tokens unchanged and the logits of "resize, then apply_qlora" (on a
    BART whose encoder / decoder embeddings are modules of their own, as one built at the new size)."""
    def make():  # a fresh config each time: the resize writes vocab_size into the model's config
        torch.manual_seed(0)
        return transformers.BartForConditionalGeneration(transformers.BartConfig(**BART, scale_embedding=True)).eval()

    targets = ["q_proj", "v_proj", "embed_tokens"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = apply_qlora(make(), targets, r=4, lora_alpha=8)
    randomize(ours, seed=1)
    old_ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        old_out = ours.model.encoder.embed_tokens(old_ids)
    torch.manual_seed(11)
    ours.resize_token_embeddings(70)
    enc, dec, shared = ours.model.encoder.embed_tokens, ours.model.decoder.embed_tokens, ours.model.shared
    assert isinstance(enc, QLoRAEmbedding) and isinstance(dec, QLoRAEmbedding) and type(shared) is not QLoRAEmbedding
    assert enc.weight is shared.weight is dec.weight is ours.lm_head.weight and shared.weight.shape == (70, 64)
    assert enc.lora_embedding_A["default"].shape == (4, 70) and ours.final_logits_bias.shape == (1, 70)
    plain = _resized(make, 70)
    assert torch.equal(shared.weight, plain.model.shared.weight)
    assert plain.model.encoder.embed_tokens is plain.model.shared  # what transformers' resize does to the modules
    # "resize, then apply_qlora" on a model whose encoder / decoder embeddings are their own modules again, as a
    # BART built at 70 tokens has them
    fresh = transformers.BartForConditionalGeneration(
        transformers.BartConfig(**dict(BART, vocab_size=70), scale_embedding=True)).eval()
    fresh.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(enc(old_ids), old_out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            after = apply_qlora(fresh, targets, r=4, lora_alpha=8)
        _copy_adapter(ours, after, 70)
        ids = torch.randint(3, 70, (2, 9), generator=torch.Generator().manual_seed(3))
        kw = {"input_ids": ids, "decoder_input_ids": ids.flip(-1)}
        assert torch.equal(ours(**kw).logits, after(**kw).logits)


def test_what_cannot_be_resized_is_refused_naming_the_fix_and_nothing_changes():
    """A DoRA adapter on the embedding (its magnitude is a norm over the vocabulary) and LoRA on the output embedding
    (a 4-bit head, or a float one tied to the embedding) are refused naming the module and the fix (resize first),
    leaving the model as it was."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = {
            r"'model\.embed_tokens' has DoRA adapter\(s\) \['default'\].*Resize the plain model first":
                apply_qlora(tiny_llama(), EMB_TARGETS, r=4, use_dora=True),
            r"'lm_head' \(the output embedding\) has LoRA \(a QLoRALinear, 4-bit\).*Resize the plain model first":
                apply_qlora(tiny_llama(), [*EMB_TARGETS, "lm_head"], r=4),
            r"'lm_head' \(the output embedding\) has LoRA \(a QLoRALinear, float base\)":
                apply_qlora(tied_llama(), [*EMB_TARGETS, "lm_head"], r=4),
        }
    for match, model in cases.items():
        emb = model.model.embed_tokens
        with pytest.raises(ValueError, match=match):
            model.resize_token_embeddings(120)
        assert model.model.embed_tokens is emb and emb.weight.shape == (96, 64) and model.config.vocab_size == 96
        assert model.lm_head.out_features == 96


def test_pad_to_multiple_of_no_op_calls_copies_pickles_and_merge():
    """``pad_to_multiple_of`` rounds up as transformers does; ``resize_token_embeddings()`` returns the layer; a deep
    copy and a pickled model resize themselves only; after ``merge_and_unload`` the call is transformers' own again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = apply_qlora(tiny_llama(), EMB_TARGETS, r=4)
    assert ours.resize_token_embeddings() is ours.model.embed_tokens
    twin = copy.deepcopy(ours)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ours.resize_token_embeddings(100, pad_to_multiple_of=64)
    assert ours.model.embed_tokens.weight.shape == (128, 64) and ours.config.vocab_size == 128
    for m in (twin, loaded):
        assert m.model.embed_tokens.weight.shape == (96, 64)
        m.resize_token_embeddings(110)
        assert m.model.embed_tokens.weight.shape == (110, 64) and m.config.vocab_size == 110
        assert isinstance(m.model.embed_tokens, QLoRAEmbedding) and m.model.embed_tokens.num_embeddings == 110
    assert ours.model.embed_tokens.weight.shape == (128, 64)
    merged = merge_and_unload(ours)
    assert type(merged.model.embed_tokens) is nn.Embedding and merged.model.embed_tokens.num_embeddings == 128
    merged.resize_token_embeddings(130)
    assert merged.model.embed_tokens.weight.shape == (130, 64)


def test_an_adapter_saved_after_the_resize_loads_in_peft_on_the_resized_model(tmp_path):
    """The adapter file holds the resized A (``[r, n]``) and peft's ``embed_tokens.base_layer.weight`` at ``n`` rows;
    peft loads it onto the plain model resized the same way, with our embedding outputs bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = apply_qlora(tiny_llama(), EMB_TARGETS, r=4, lora_alpha=8)
    randomize(ours, seed=1)
    torch.manual_seed(11)
    ours.resize_token_embeddings(120)
    adapters.save_adapter(ours, tmp_path / "ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_resized(tiny_llama, 120), str(tmp_path / "ad"))
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours.get_input_embeddings()(ids), theirs.get_input_embeddings()(ids))
