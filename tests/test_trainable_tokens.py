"""peft's ``trainable_token_indices`` (``qkernels.trainable_tokens``): chosen rows of the input embedding train beside
LoRA, on a tiny Llama (hidden 64, 2 layers, vocab 128) whose Linear layers bitsandbytes loaded in 4 bits, against
peft 0.21.2 on the same model.

The embedding lookup is the same float operation on both sides (``W.index_copy(0, ids, rows)`` then
``F.embedding``), so embeddings, their gradients, files and merged weights are compared bit for bit. Logits pass the
4-bit layers (qkernels' kernels against bitsandbytes' dequantize + matmul): ``assert_matches``' bound is not needed
because both sides run the same bitsandbytes-packed weights in float32 and differ only in summation order; they are
held to 32 float32 ulps of the logits' magnitude (measured: under 4). bitsandbytes runs its exact path when the
input requires grad (DESIGN §5), so logits are taken from grad-requiring ``inputs_embeds`` made by the model's own
(wrapped) embedding.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qkernels
from qkernels import TrainableTokensWrapper, apply_qlora, merge_and_unload
from qkernels.nn import QLoRALinear

peft = pytest.importorskip("peft", reason="peft is the interop target of these tests")
transformers = pytest.importorskip("transformers", reason="the tiny models are transformers models")

TARGETS = ["q_proj", "v_proj"]
TOKENS = [3, 7, 100]
IDS = torch.tensor([[3, 5, 7, 9, 1], [7, 7, 2, 3, 100], [1, 2, 4, 6, 8]])  # the last sample has no trainable token
DELTA = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def _config(tie: bool) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    out = {}
    for tie in (False, True):
        d = tmp_path_factory.mktemp(f"dense_tied{tie}")
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(_config(tie)).save_pretrained(d)
        out[tie] = d
    return out


def load4(d) -> nn.Module:
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM.from_pretrained(d, quantization_config=cfg, dtype=torch.float32).eval()


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Every trainable tensor (LoRA A, B and the token rows) random: a fresh adapter's B = 0 and rows equal to the
    base rows would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_model(d, spec=TOKENS, seed: int = 1, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = peft.get_peft_model(load4(d), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                          trainable_token_indices=spec, **kw))
    randomize(m, seed)
    return m


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    e = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.enable_grad():
        return model(inputs_embeds=e).logits.detach()


def assert_close_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    ulp = torch.finfo(torch.float32).eps * b.abs().max()
    assert (a - b).abs().max() <= 32 * ulp, f"{(a - b).abs().max():.3g} > 32 ulp ({ulp:.3g})"


def ours_from(d, adapter_dir, **kw) -> nn.Module:
    m = apply_qlora(load4(d), TARGETS, r=4, lora_alpha=8)
    qkernels.load_adapter(m, adapter_dir, replace=True, **kw)
    return m


# ---------------------------------------------------------------------------------------------- files, both ways
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied_head"])
def test_peft_file_loads_and_runs_as_peft_and_peft_loads_ours(tmp_path, dense_dirs, tie):
    """A peft adapter with trainable tokens loads here: the same embeddings (bit for bit, the chosen rows replaced),
    the same logits (a tied lm_head sees the replaced rows too, as peft's tied TrainableTokensLayer), the same
    gradient of the rows; ``save_adapter`` writes peft's very file (config field and tensor), which peft loads to the
    same logits."""
    theirs = peft_model(dense_dirs[tie])
    theirs.save_pretrained(tmp_path / "peft")
    ours = ours_from(dense_dirs[tie], tmp_path / "peft")
    emb = ours.get_input_embeddings()
    assert isinstance(emb, TrainableTokensWrapper) and isinstance(ours.lm_head, TrainableTokensWrapper) == tie
    assert torch.equal(emb(IDS), theirs.get_input_embeddings()(IDS))
    assert not torch.equal(emb(IDS), emb.base_layer(IDS))  # the rows are not the base rows
    want = logits(theirs)
    assert_close_logits(logits(ours), want)
    if tie:  # the head's rows 3, 7, 100 are the new ones: against the base head they differ there only
        h = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
        diff = (ours.lm_head(h) - h @ ours.lm_head.base_layer.weight.T).abs().amax(0)
        assert set(torch.nonzero(diff).flatten().tolist()) == set(TOKENS)
    # gradient of the rows through the whole 4-bit model
    grads = []
    for m in (ours, theirs):
        with torch.enable_grad():
            m(IDS).logits.square().sum().backward()
        grads.append(m.get_input_embeddings().token_adapter.trainable_tokens_delta["default"].grad)
    assert grads[0] is not None and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6 * grads[1].abs().max())
    qkernels.save_adapter(ours, tmp_path / "ours")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "peft"))
    assert DELTA in a and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == TOKENS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(load4(dense_dirs[tie]), str(tmp_path / "ours"))
    assert_close_logits(logits(again), want)


def test_dict_form_and_apply_qlora_give_peft_layout_and_training(tmp_path, dense_dirs):
    """``apply_qlora(trainable_token_indices={"embed_tokens": ids})``: peft's parameter layout and trainable set
    (the rows and LoRA; the embedding frozen), rows started from the base rows; a step of training moves the chosen
    rows only, and the saved file is what peft writes for the same values."""
    ours = apply_qlora(load4(dense_dirs[False]), TARGETS, r=4, lora_alpha=8,
                       trainable_token_indices={"embed_tokens": TOKENS})
    theirs = peft_model(dense_dirs[False], {"embed_tokens": TOKENS})
    ours_train = {n for n, p in ours.named_parameters() if p.requires_grad}
    want = {n.removeprefix("base_model.model.").replace(".base_layer", "") for n, p in theirs.named_parameters()
            if p.requires_grad}
    assert ours_train == want and "model.embed_tokens.token_adapter.trainable_tokens_delta.default" in ours_train
    emb = ours.get_input_embeddings()
    rows = emb.token_adapter.trainable_tokens_delta["default"]
    assert rows.dtype == emb.base_layer.weight.dtype and torch.equal(rows, emb.base_layer.weight[TOKENS])
    base = emb.base_layer.weight.detach().clone()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    with torch.enable_grad():
        ours(IDS).logits.square().mean().backward()  # with labels, token 100 (last) gets no gradient
    opt.step()
    assert torch.equal(emb.base_layer.weight, base)  # the embedding itself never changes
    after = emb.weight.detach()  # peft's wrapper .weight: the merged weight
    moved = torch.nonzero((after - base).abs().amax(1)).flatten().tolist()
    assert moved == TOKENS
    # the same values in peft give the same file
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(ours.get_parameter(n.removeprefix("base_model.model.").replace(".base_layer", "")))
    theirs.save_pretrained(tmp_path / "peft")
    qkernels.save_adapter(ours, tmp_path / "ours")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "peft"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- several adapters
def test_two_adapters_set_disable_delete_and_mixed_batch_as_peft(tmp_path, dense_dirs):
    """Two adapters with different rows: ``set_adapter`` switches rows and LoRA, ``disable_adapters`` gives the
    plain embedding, a mixed batch gives each sample its adapter's rows (``"__base__"``: the plain embedding), as
    peft's TrainableTokensWrapper; a tied head follows. ``delete_adapter`` drops an adapter's rows."""
    d = dense_dirs[True]
    peft_model(d, TOKENS, seed=1).save_pretrained(tmp_path / "a")
    peft_model(d, [5, 6], seed=2).save_pretrained(tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load4(d), str(tmp_path / "a"), adapter_name="a")
        theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    ours = apply_qlora(load4(d), TARGETS, r=4, lora_alpha=8)
    qkernels.delete_adapter(ours, "default")
    qkernels.load_adapter(ours, tmp_path / "a", "a")
    qkernels.load_adapter(ours, tmp_path / "b", "b", set_active=False)
    assert qkernels.adapter_names(ours) == ["a", "b"]
    for name in ("a", "b"):
        qkernels.set_adapter(ours, name)
        theirs.set_adapter(name)
        assert torch.equal(ours.get_input_embeddings()(IDS), theirs.get_input_embeddings()(IDS))
        assert_close_logits(logits(ours), logits(theirs))
    with qkernels.disable_adapters(ours), theirs.disable_adapter():
        assert torch.equal(ours.get_input_embeddings()(IDS), ours.get_input_embeddings().base_layer(IDS))
        assert_close_logits(logits(ours), logits(theirs))
    names = ["a", "__base__", "b"]
    h = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4))
    with qkernels.adapter_batch(ours, names):
        got_e, got_h = ours.get_input_embeddings()(IDS), ours.lm_head(h)
    want_e = theirs.get_input_embeddings()(IDS, adapter_names=names)
    assert torch.equal(got_e, want_e) and torch.equal(got_h, theirs.base_model.model.lm_head(h, adapter_names=names))
    qkernels.set_adapter(ours, "a")
    qkernels.delete_adapter(ours, "a")
    emb = ours.get_input_embeddings()
    assert list(emb.deltas) == ["b"] and emb.active_adapter == "b" and ours.lm_head.active_adapter == "b"


# ---------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied_head"])
def test_merge_and_unload_writes_the_rows_as_peft(tmp_path, dense_dirs, tie):
    """The merged embedding is peft's merge bit for bit (the rows written in); a tied head keeps sharing it."""
    theirs = peft_model(dense_dirs[tie])
    theirs.save_pretrained(tmp_path / "peft")
    ours = ours_from(dense_dirs[tie], tmp_path / "peft")
    before = logits(ours)
    mo, mt = merge_and_unload(ours), theirs.merge_and_unload()
    assert type(mo.model.embed_tokens) is nn.Embedding and type(mo.lm_head) is nn.Linear
    assert torch.equal(mo.model.embed_tokens.weight, mt.model.embed_tokens.weight)
    assert (mo.lm_head.weight is mo.model.embed_tokens.weight) == tie
    assert not any(isinstance(m, (QLoRALinear, TrainableTokensWrapper)) for m in mo.modules())
    assert_close_logits(logits(mo), before)


# ---------------------------------------------------------------------------------------------- refusals
def _unchanged(model: nn.Module) -> bool:
    return not any(isinstance(m, (QLoRALinear, TrainableTokensWrapper)) for m in model.modules())


@pytest.mark.parametrize("spec, match", [
    ([3, 128], r"out of range .*128 rows"),
    ([3, -1], r"out of range"),
    ([3, 7, 3], r"\[3\] .* more than once"),
    ([], r"non-empty list of ints"),
    ("3", r"list of token ids"),
    ([3.0, 4], r"non-empty list of ints"),
    ([True], r"non-empty list of ints"),
    ({"nope": [3]}, r"'nope' matches no module"),
    ({"lm_head": [3]}, r"not an nn.Embedding"),
], ids=["past_end", "negative", "duplicate", "empty", "str", "float", "bool", "no_module", "not_embedding"])
def test_bad_indices_are_refused_naming_the_argument_before_any_change(dense_dirs, spec, match):
    model = load4(dense_dirs[False])
    with pytest.raises(ValueError, match=match) as e:
        apply_qlora(model, TARGETS, trainable_token_indices=spec)
    assert "trainable_token_indices" in str(e.value) and _unchanged(model)


def test_tokens_on_a_lora_embedding_or_a_module_to_save_are_refused_as_peft(dense_dirs):
    """peft: ``TypeError: trainable_token_indices cannot be applied to modules of type lora.Embedding`` and "already
    marked to be trained fully" for a module to save; here ValueErrors naming both arguments, nothing changed."""
    model = load4(dense_dirs[False])
    with pytest.raises(TypeError, match="cannot be applied"):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=[*TARGETS, "embed_tokens"],
                                                                  trainable_token_indices=TOKENS))
    with pytest.raises(ValueError, match="trainable_token_indices: module 'model.embed_tokens' is also a LoRA target"):
        apply_qlora(model, [*TARGETS, "embed_tokens"], trainable_token_indices=TOKENS)
    with pytest.raises(ValueError, match="already marked to be trained fully"):
        apply_qlora(model, TARGETS, modules_to_save=["embed_tokens"], trainable_token_indices={"embed_tokens": [3]})
    assert _unchanged(model)
    tied = load4(dense_dirs[True])
    with pytest.raises(ValueError, match="'lm_head', tied to 'model.embed_tokens', is also a LoRA target"):
        apply_qlora(tied, [*TARGETS, "lm_head"], trainable_token_indices=TOKENS)
    assert _unchanged(tied)


def test_bad_token_files_are_refused_and_load_nothing(tmp_path, dense_dirs):
    """Rows of the wrong shape, rows without the config field, the field without rows, indices past the vocabulary:
    each a ValueError naming the key or field; the model keeps its adapters and gets no wrapper."""
    theirs = peft_model(dense_dirs[False])
    theirs.save_pretrained(tmp_path / "good")
    cfg = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    sd = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))

    def write(name, cfg_change=None, sd_change=None):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **(cfg_change or {})}))
        save_file({**sd, **(sd_change or {})}, str(d / "adapter_model.safetensors"))
        return d

    bad = {
        "shape": (write("shape", sd_change={DELTA: torch.zeros(2, 64)}), r"\(2, 64\) .* needs a float \(3, 64\)"),
        "no_field": (write("no_field", cfg_change={"trainable_token_indices": None}), "no trainable_token_indices"),
        "range": (write("range", cfg_change={"trainable_token_indices": [3, 7, 500]}), "out of range"),
    }
    d = tmp_path / "no_rows"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in sd.items() if k != DELTA}, str(d / "adapter_model.safetensors"))
    bad["no_rows"] = (d, "has no rows")
    model = apply_qlora(load4(dense_dirs[False]), TARGETS, r=4, lora_alpha=8)
    for what, (path, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            qkernels.load_adapter(model, path, "x")
        assert qkernels.adapter_names(model) == ["default"], what
        assert not any(isinstance(m, TrainableTokensWrapper) for m in model.modules()), what


def test_a_trainer_checkpoint_restores_the_rows_in_place(tmp_path, dense_dirs):
    """``save_adapters`` / ``restore_adapters`` (the Trainer's resume) carry the rows back into the same Parameter;
    a checkpoint with other indices is refused."""
    ours = apply_qlora(load4(dense_dirs[True]), TARGETS, r=4, lora_alpha=8, trainable_token_indices=TOKENS)
    randomize(ours)
    rows = ours.get_input_embeddings().deltas["default"]
    want = rows.detach().clone()
    qkernels.save_adapters(ours, tmp_path / "ckpt")
    with torch.no_grad():
        rows.zero_()
    qkernels.restore_adapters(ours, tmp_path / "ckpt")
    assert ours.get_input_embeddings().deltas["default"] is rows and torch.equal(rows, want)
    other = apply_qlora(load4(dense_dirs[True]), TARGETS, r=4, lora_alpha=8, trainable_token_indices=[3, 7])
    with pytest.raises(ValueError, match="same trainable_token_indices"):
        qkernels.restore_adapters(other, tmp_path / "ckpt")


def test_add_adapter_with_tokens_is_inactive_until_set(dense_dirs):
    """``add_adapter(..., trainable_token_indices=...)`` adds frozen rows (peft's add_adapter does not activate);
    ``set_adapter`` runs and trains them, the other adapter's rows frozen."""
    ours = apply_qlora(load4(dense_dirs[False]), TARGETS, r=4, lora_alpha=8, trainable_token_indices=TOKENS)
    qkernels.add_adapter(ours, "b", r=4, target_modules=TARGETS, trainable_token_indices=[5])
    emb = ours.get_input_embeddings()
    assert emb.active_adapter == "default" and not emb.deltas["b"].requires_grad and emb.deltas["default"].requires_grad
    qkernels.set_adapter(ours, "b")
    assert emb.active_adapter == "b" and emb.deltas["b"].requires_grad and not emb.deltas["default"].requires_grad
    with pytest.raises(ValueError, match="out of range"):
        qkernels.add_adapter(ours, "c", target_modules=TARGETS, trainable_token_indices=[1000])
    assert qkernels.adapter_names(ours) == ["default", "b"]


def test_the_model_saves_loads_and_pickles_with_the_base_keys_it_had(tmp_path, dense_dirs):
    """The wrapper keeps the embedding's (and a tied head's) state-dict keys (``model.embed_tokens.weight``), as
    QLoRALinear keeps its: transformers' save_pretrained finds the tie it knows (with peft's live layout,
    ``token_adapter.base_layer.weight``, it raised on shared tensors) and the plain model loads the checkpoint; a
    state dict round trip restores the rows; a deep copy runs the same."""
    ours = apply_qlora(load4(dense_dirs[True]), TARGETS, r=4, lora_alpha=8, trainable_token_indices=TOKENS)
    randomize(ours)
    sd = ours.state_dict()
    assert "model.embed_tokens.weight" in sd and "model.embed_tokens.token_adapter.trainable_tokens_delta.default" in sd
    assert not any("base_layer" in k for k in sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.save_pretrained(tmp_path / "full")
    saved = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert torch.equal(saved["model.embed_tokens.weight"], ours.get_input_embeddings().base_layer.weight)
    assert "lm_head.weight" not in saved and not any("base_layer" in k for k in saved)  # the tie, as transformers
    again = apply_qlora(load4(dense_dirs[True]), TARGETS, r=4, lora_alpha=8, trainable_token_indices=TOKENS)
    emb_sd = {k.removeprefix("model.embed_tokens."): v for k, v in sd.items() if k.startswith("model.embed_tokens.")}
    again.get_input_embeddings().load_state_dict(emb_sd)  # (the bitsandbytes layers' own keys do not reload strictly)
    assert torch.equal(again.get_input_embeddings()(IDS), ours.get_input_embeddings()(IDS))
    assert torch.equal(copy.deepcopy(ours).get_input_embeddings()(IDS), ours.get_input_embeddings()(IDS))


class _EmbNet(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16, padding_idx=3).to(dtype)
        self.fc = nn.Linear(16, 8).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_wrapper_is_peft_s_bit_for_bit_in_each_dtype(dtype):
    """On a plain embedding of ``dtype`` (padding_idx among the rows): rows float32 (peft's autocast_adapter_dtype
    upcasts half-precision adapters), forward (in ``dtype``) and the rows' gradient equal to peft's
    TrainableTokensWrapper, bit for bit."""
    torch.manual_seed(0)
    net = _EmbNet(dtype)
    ids = torch.tensor([[3, 5, 7, 0], [39, 3, 1, 5]])
    spec = {"emb": [3, 5, 39]}
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, target_modules=["fc"],
                                                                     trainable_token_indices=spec))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours = apply_qlora(copy.deepcopy(net), ["fc"], r=2, trainable_token_indices=spec)
    rows_t = theirs.base_model.model.emb.token_adapter.trainable_tokens_delta["default"]
    rows_o = ours.emb.deltas["default"]
    assert rows_o.dtype == rows_t.dtype == torch.float32 and torch.equal(rows_o, rows_t)
    with torch.no_grad():
        rows_t.copy_(torch.randn(rows_t.shape, generator=torch.Generator().manual_seed(1)))
        rows_o.copy_(rows_t)
    e_o, e_t = ours.emb(ids), theirs.base_model.model.emb(ids)
    assert e_o.dtype == dtype and torch.equal(e_o, e_t)
    e_o.float().square().sum().backward()
    e_t.float().square().sum().backward()
    assert torch.equal(rows_o.grad, rows_t.grad)


def test_gemma_scaled_tied_embedding_is_peft_s_bit_for_bit():
    """Gemma 3's scaled word embedding (``embed_scale``, peft's ``_get_embed_scale``) with its tied head: the
    embeddings and the head's logits equal peft's wrappers, bit for bit."""
    cfg = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    net = transformers.Gemma3ForCausalLM(cfg).eval()
    assert cfg.tie_word_embeddings and hasattr(net.model.embed_tokens, "embed_scale")
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                     trainable_token_indices=[3, 9]))
    ours = apply_qlora(copy.deepcopy(net), ["q_proj"], r=4, trainable_token_indices=[3, 9])
    rows = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs.get_input_embeddings().token_adapter.trainable_tokens_delta["default"].copy_(rows)
        ours.get_input_embeddings().deltas["default"].copy_(rows)
    ids = torch.tensor([[3, 4, 9, 1]])
    assert torch.equal(ours.get_input_embeddings()(ids), theirs.get_input_embeddings()(ids))
    h = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(2))
    assert isinstance(ours.lm_head, TrainableTokensWrapper)
    assert torch.equal(ours.lm_head(h), theirs.base_model.model.lm_head(h))


def test_resizing_after_adding_tokens_says_to_resize_first(dense_dirs):
    """transformers' resize refuses the wrapper (a TypeError about old embeddings, as with peft's); qkernels says
    what to do, and the model is unchanged."""
    ours = apply_qlora(load4(dense_dirs[False]), TARGETS, r=4, trainable_token_indices=TOKENS)
    with pytest.raises(ValueError, match=r"Resize the plain model first .*trainable_token_indices naming the new"):
        ours.resize_token_embeddings(130)
    assert ours.get_input_embeddings().base_layer.num_embeddings == 128 and ours.config.vocab_size == 128
    ours.resize_token_embeddings()  # a no-op call still passes through
