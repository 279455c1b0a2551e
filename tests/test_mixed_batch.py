"""Mixed-adapter batches (``qkernels.adapter_batch``): peft 0.21.2's ``model(x, adapter_names=[...])``.

Where both sides run the very same float operations (a float-base ``QLoRALinear`` against peft's ``lora.Linear``, a
``QLoRAEmbedding`` against peft's ``lora.Embedding``, a module to save against peft's wrapper) the comparison is bit
for bit. On a 4-bit model a sample of the mixed batch runs the same base product as that sample run alone (bit for
bit: ``"__base__"`` rows are equal), but its LoRA term is added after the base product instead of in the fused
kernel's epilogue (the CPU LoRA kernels there), so the two differ by float32 rounding of the LoRA term only:
held to ``assert_matches`` (tests/test_adapters.py) against a float64 run of the same weights, and measured here at
<= 4 ulps of the logits' magnitude. Against peft + bitsandbytes the rule is the same ``assert_matches``.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import qkernels
from qkernels import QLoRALinear, adapter_batch, adapters, apply_qlora

from .test_adapters import assert_matches, reference64
from .test_architectures import _exact_bnb
from .test_embedding_lora import IDS, _copy_lora, _lora_tensors, _peft, _Tok, randomize
from .test_float_base import _load_4bit
from .test_training import LLAMA_TARGETS, tiny_llama

peft = pytest.importorskip("peft", reason="peft is the oracle of these tests")
transformers = pytest.importorskip("transformers", reason="the tiny models are transformers models")

TARGETS = [*LLAMA_TARGETS, "embed_tokens"]  # every 4-bit layer adapted (reference64 dequantizes them all)
B_TARGETS = ["q_proj", "down_proj", "embed_tokens"]
NAMES = ["default", "b", "__base__", "b"]


def _ids(n: int = 4, t: int = 10) -> torch.Tensor:
    return torch.randint(3, 96, (n, t), generator=torch.Generator().manual_seed(1))


def _two_adapters(model: nn.Module) -> nn.Module:
    """``apply_qlora`` (adapter "default", r 4) plus adapter "b" (r 2, rsLoRA, fewer modules), both nonzero."""
    ours = apply_qlora(model, TARGETS, r=4, lora_alpha=8, compute_dtype=torch.float32)
    adapters.add_adapter(ours, "b", r=2, lora_alpha=6, use_rslora=True, target_modules=B_TARGETS)
    randomize(ours, "default", 1)
    randomize(ours, "b", 2)
    return ours.eval()


def _alone(model: nn.Module, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Row ``i``: the logits of the whole batch run with ``names[i]`` set (or adapters disabled), row ``i``."""
    runs = {}
    active = model.model.layers[0].self_attn.q_proj.active_adapter
    with torch.no_grad():
        for n in dict.fromkeys(names):
            if n == "__base__":
                with adapters.disable_adapters(model):
                    runs[n] = model(ids).logits
            else:
                adapters.set_adapter(model, n)
                runs[n] = model(ids).logits
    adapters.set_adapter(model, active)
    return torch.stack([runs[n][i] for i, n in enumerate(names)])


# ---------------------------------------------------------------------------------------------- the model
def test_each_sample_gets_its_adapter_s_logits_on_a_4bit_llama():
    """Each row of the mixed batch equals that row run with its adapter set (``"__base__"``: adapters disabled) within
    the rounding of the LoRA term (module docstring), the base rows bit for bit; the model's own state is untouched
    (active adapter, trainable flags), and outside the context it runs its active adapter again, bit for bit."""
    ours = _two_adapters(tiny_llama())
    ids = _ids()
    with torch.no_grad():
        before = ours(ids).logits
    flags = {n: p.requires_grad for n, p in ours.named_parameters()}
    with torch.no_grad(), adapter_batch(ours, NAMES) as m:
        assert m is ours
        mixed = ours(ids).logits
    want = _alone(ours, ids, NAMES)
    assert torch.equal(mixed[2], want[2])  # the base product is the same one
    ulp = torch.finfo(torch.float32).eps * want.abs().max()
    assert (mixed - want).abs().max() <= 8 * ulp
    assert not torch.equal(mixed[0], mixed[2]) and not torch.equal(mixed[1], mixed[0])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, before)  # hooks removed
    assert flags == {n: p.requires_grad for n, p in ours.named_parameters()}
    # generate keeps the batch size: each row continues with its own adapter (greedy: the same tokens as alone)
    with torch.no_grad(), adapter_batch(ours, ["b", "__base__"]):
        out = ours.generate(ids[:2], max_new_tokens=4, do_sample=False)
    adapters.set_adapter(ours, "b")
    with torch.no_grad():
        alone_b = ours.generate(ids[:1], max_new_tokens=4, do_sample=False)
        with adapters.disable_adapters(ours):
            alone_base = ours.generate(ids[1:2], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, torch.cat([alone_b, alone_base]))


def test_mixed_batch_equals_peft_s_on_a_bitsandbytes_base(tmp_path):
    """Two peft adapters (LoRA on embed_tokens too) saved by peft and loaded here: the mixed batch's logits match
    peft's mixed batch on the transformers-4-bit-loaded model within ``assert_matches`` of a float64 run (row by row
    the adapter's float64 peft model, the base rows with its adapters disabled), and ours run alone too; beam search
    in a mixed batch gives peft's tokens."""
    load = functools.partial(_load_4bit, transformers.LlamaForCausalLM, tiny_llama, tmp_path / "dense")
    theirs = _peft(_exact_bnb(load()), r=4, lora_alpha=8, target_modules=TARGETS)
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=B_TARGETS))
    randomize(theirs, "default", 1)
    randomize(theirs, "b", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(str(tmp_path / "peft"))
    ours = apply_qlora(load(), TARGETS, r=4, lora_alpha=8, compute_dtype=torch.float32).eval()
    adapters.load_adapter(ours, tmp_path / "peft", replace=True)
    adapters.load_adapter(ours, tmp_path / "peft" / "b", adapter_name="b", set_active=False)
    theirs.eval()
    ids = _ids()
    with torch.no_grad():
        with adapter_batch(ours, NAMES):
            mixed = ours(ids).logits
        peft_mixed = theirs(input_ids=ids, adapter_names=NAMES).logits
    refs = {n: reference64(ours, tmp_path / "peft" / ("b" if n == "b" else ""), tiny_llama) for n in ("default", "b")}
    rows = []
    with torch.no_grad():
        for i, n in enumerate(NAMES):
            ref = refs["default" if n == "__base__" else n]
            if n == "__base__":
                with ref.disable_adapter():
                    rows.append(ref(input_ids=ids).logits[i])
            else:
                rows.append(ref(input_ids=ids).logits[i])
    ref_rows = torch.stack(rows)
    assert_matches(mixed, peft_mixed, ref_rows)
    assert_matches(mixed, _alone(ours, ids, NAMES), ref_rows)
    # generate with beam search: peft repeats the names per beam from num_beams, adapter_batch from its argument
    kw = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    with torch.no_grad():
        with adapter_batch(ours, NAMES, num_beams=2):
            out = ours.generate(ids, **kw)
        assert torch.equal(out, theirs.generate(input_ids=ids, adapter_names=NAMES, **kw))


# ---------------------------------------------------------------------------------------------- the layers
def _peft_two(net: nn.Module, targets: list[str]) -> nn.Module:
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=targets)
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=targets))
    randomize(theirs, "default", 1)
    randomize(theirs, "b", 2)
    return theirs.eval()


def _ours_two(net: nn.Module, theirs: nn.Module, targets: list[str], **kw) -> nn.Module:
    ours = apply_qlora(copy.deepcopy(net), targets, r=4, lora_alpha=8, **kw)
    adapters.add_adapter(ours, "b", r=2, lora_alpha=6, use_rslora=True, target_modules=targets)
    for n in ("default", "b"):
        _copy_lora(theirs, ours, n)
    return ours.eval()


class _Fc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_float_base_and_embedding_layers_are_peft_s_mixed_batch_bit_for_bit(dtype):
    """A float-base QLoRALinear is peft's ``lora.Linear._mixed_batch_forward`` (layer.py:853-898) and a QLoRAEmbedding
    peft's ``Embedding._mixed_batch_forward`` (layer.py:1424-1462), op for op: equal outputs, dtype included."""
    torch.manual_seed(0)
    names = ["b", "__base__", "default", "b", "default"]
    net = _Fc().to(dtype)
    theirs = _peft_two(net, ["fc"])
    ours = _ours_two(net, theirs, ["fc"], keep_float_modules=["fc"])
    assert isinstance(ours.fc, QLoRALinear) and not ours.fc.quantized
    x = torch.randn(5, 3, 64).to(dtype)
    with torch.no_grad():
        with adapter_batch(ours, names):
            y = ours(x)
        y_peft = theirs(x, adapter_names=names)
        assert y.dtype == y_peft.dtype == dtype and torch.equal(y, y_peft)
        assert torch.equal(ours.fc(x, adapter_names=names), y)  # the layer takes the keyword itself, as peft's

    net = _Tok(padding_idx=0).to(dtype)
    theirs = _peft_two(net, ["emb"])
    ours = _ours_two(net, theirs, ["emb"])
    ids = torch.cat([IDS, IDS.flip(1), IDS[:1]])
    with torch.no_grad():
        with adapter_batch(ours, names):
            y = ours(ids)
        y_peft = theirs(ids, adapter_names=names)
    assert y.dtype == y_peft.dtype == dtype and torch.equal(y, y_peft)


def test_a_quantized_layer_runs_the_base_once_and_each_adapter_on_its_rows(monkeypatch):
    """The 4-bit product runs once for the whole batch; each adapter's lora_A runs once, on its rows only."""
    torch.manual_seed(0)
    ours = _ours_two(_Fc(), _peft_two(_Fc(), ["fc"]), ["fc"], compute_dtype=torch.float32)
    calls = []
    real = qkernels.nn.matmul_4bit_lora
    monkeypatch.setattr(qkernels.nn, "matmul_4bit_lora", lambda x, *a, **k: calls.append(("base", len(x))) or
                        real(x, *a, **k))
    for n in ("default", "b"):
        ours.fc.lora_A[n].register_forward_pre_hook(lambda m, a, n=n: calls.append((n, len(a[0]))))
    x = torch.randn(5, 3, 64)
    with torch.no_grad(), adapter_batch(ours, ["b", "__base__", "b", "b", "__base__"]):
        ours(x)
    assert sorted(calls) == [("b", 3), ("base", 5)]


def test_modules_to_save_run_each_sample_s_copy_as_peft():
    """A module to save runs each sample's adapter copy (the original for ``"__base__"``), as peft's wrapper
    (peft/utils/other.py:465-508): bit for bit; a module to save that is not row-wise (a LayerNorm) is refused as
    peft refuses it."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(64, 64), nn.Linear(64, 8)

        def forward(self, x):
            return self.head(self.fc(x))

    torch.manual_seed(0)
    net = Net()
    theirs = _peft(copy.deepcopy(net), r=4, lora_alpha=8, target_modules=["fc"], modules_to_save=["head"])
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["fc"], modules_to_save=["head"]))
    ours = apply_qlora(copy.deepcopy(net), ["fc"], r=4, lora_alpha=8, keep_float_modules=["fc"],
                       modules_to_save=["head"])
    adapters.add_adapter(ours, "b", r=2, lora_alpha=6, target_modules=["fc"], modules_to_save=["head"])
    with torch.no_grad():
        for n, seed in (("default", 1), ("b", 2)):
            randomize(theirs, n, seed)
            _copy_lora(theirs, ours, n)
            g = torch.Generator().manual_seed(seed)
            for p_theirs, p_ours in zip(theirs.base_model.model.head.modules_to_save[n].parameters(),
                                        ours.head.modules_to_save[n].parameters(), strict=True):
                p_theirs.copy_(torch.randn(p_theirs.shape, generator=g))
                p_ours.copy_(p_theirs)
    theirs.eval()
    ours.eval()
    names = ["b", "default", "__base__", "b"]
    x = torch.randn(4, 2, 64)
    with torch.no_grad():
        with adapter_batch(ours, names):
            y = ours(x)
        assert torch.equal(y, theirs(x, adapter_names=names))

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm = nn.Linear(64, 64), nn.LayerNorm(64)

        def forward(self, x):
            return self.norm(self.fc(x))

    ours = apply_qlora(Normed(), ["fc"], r=4, keep_float_modules=["fc"], modules_to_save=["norm"]).eval()
    with pytest.raises(TypeError, match="Mixed batching is only supported for the following modules"), \
            adapter_batch(ours, ["default", "__base__"]):
        ours(torch.randn(2, 64))


# ---------------------------------------------------------------------------------------------- refusals
def test_refusals_are_peft_s():
    """Training mode, an unknown name (the message names the model's adapters), a length other than the batch size
    and a DoRA adapter are refused with peft's messages; a lone str is a TypeError. A failed forward leaves no hook
    behind (peft's context manager would: it removes its hooks without a ``finally``)."""
    ours = _two_adapters(tiny_llama())
    ids = _ids(2, 6)
    with torch.no_grad():
        want = ours(ids).logits
    ours.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        with adapter_batch(ours, ["b", "b"]):
            pass
    ours.eval()
    with pytest.raises(ValueError, match=r"non-existing adapter\(s\): c, x; the model has adapters \['default', 'b'\]"):
        with adapter_batch(ours, ["x", "c"]):
            pass
    with pytest.raises(TypeError, match="list of str"):
        with adapter_batch(ours, "default"):
            pass
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, but "
                                         "got 3 and 2 respectively"):
        with torch.no_grad(), adapter_batch(ours, ["b", "b", "default"]):
            ours(ids)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, want)  # no hook left after the error

    adapters.add_adapter(ours, "d", r=2, target_modules=["v_proj"], use_dora=True)
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        with torch.no_grad(), adapter_batch(ours, ["d", "b"]):
            ours(ids)
    with torch.no_grad(), adapter_batch(ours, ["default", "b"]):  # a DoRA adapter not named: fine, as in peft
        ours(ids)
    layer = ours.model.layers[0].self_attn.q_proj
    layer.merged = True  # qkernels never merges in place; peft's check is kept for a layer marked merged
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        layer(torch.randn(2, 3, layer.in_features), adapter_names=["b", "b"])


def test_disabled_adapters_ignore_the_names_as_peft():
    """With adapters disabled peft installs no hook (``has_active_enabled_adapter`` is False): every sample gets the
    base output and the names are not even checked."""
    ours = _two_adapters(tiny_llama())
    ids = _ids(2, 6)
    with torch.no_grad(), adapters.disable_adapters(ours):
        base = ours(ids).logits
        with adapter_batch(ours, ["b", "b", "unknown"]):
            assert torch.equal(ours(ids).logits, base)


def test_samples_of_one_adapter_alone_are_that_adapter_s_rows_in_a_batch():
    """All samples on one adapter is ``set_adapter`` to it (rounding of the LoRA term aside); all ``"__base__"`` is the
    base model bit for bit."""
    ours = _two_adapters(tiny_llama())
    ids = _ids(3, 5)
    with torch.no_grad():
        with adapter_batch(ours, ["__base__"] * 3):
            base = ours(ids).logits
        with adapters.disable_adapters(ours):
            assert torch.equal(base, ours(ids).logits)
        with adapter_batch(ours, ["b"] * 3):
            only_b = ours(ids).logits
    want = _alone(ours, ids, ["b"] * 3)
    assert (only_b - want).abs().max() <= 8 * torch.finfo(torch.float32).eps * want.abs().max()
    assert _lora_tensors(ours, "b")  # "b" exists on the layers it targets


def _generate_alone(model: nn.Module, ids: torch.Tensor, names: list[str], **kw) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for i, n in enumerate(names):
            if n == "__base__":
                with adapters.disable_adapters(model):
                    out.append(model.generate(ids[i:i + 1], **kw))
            else:
                adapters.set_adapter(model, n)
                out.append(model.generate(ids[i:i + 1], **kw))
    return out


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_beam_search_repeats_each_name_per_beam_and_not_for_the_encoder(kind):
    """``num_beams=k``: each name covers its sample's ``k`` beams (peft repeats them from generate's ``num_beams``,
    model.py:651-677); an encoder-decoder's encoder runs on the samples themselves and keeps one name each. Each
    sample's beams then give the tokens that sample gets alone with its adapter; without ``num_beams`` the layers
    refuse the batch size."""
    from .test_architectures import BART

    if kind == "llama":
        ours = _two_adapters(tiny_llama())
    else:
        torch.manual_seed(0)
        ours = apply_qlora(transformers.BartForConditionalGeneration(transformers.BartConfig(**BART)), "all-linear",
                           r=4, lora_alpha=8, compute_dtype=torch.float32)
        adapters.add_adapter(ours, "b", r=2, lora_alpha=6)
        randomize(ours, "default", 1)
        randomize(ours, "b", 2)
        ours.eval()
    ids = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    names = ["b", "__base__", "default"]
    kw = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    with torch.no_grad(), adapter_batch(ours, names, num_beams=2):
        out = ours.generate(ids, **kw)
    for row, want in zip(out, _generate_alone(ours, ids, names, **kw), strict=True):
        assert torch.equal(row[:want.shape[1]], want[0])
    with pytest.raises(ValueError, match="Length of `adapter_names`"), torch.no_grad(), adapter_batch(ours, names):
        ours.generate(ids, **kw)
    with pytest.raises(TypeError, match="num_beams must be a positive int"), adapter_batch(ours, names, num_beams=0):
        pass
