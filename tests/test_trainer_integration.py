"""Adapter-only checkpoints with transformers' Trainer and trl's SFTTrainer (``qkernels.integrations``): what peft's
Trainer integration gives a PeftModel. Checkpoints and ``save_model()`` hold the adapter in peft's format, resuming
from one gives the uninterrupted run's losses and weights exactly, and the saved adapter loads in peft onto the 4-bit
base with the trained model's outputs (``assert_matches``' bound, see tests/test_adapters.py). Tiny Llamas built from
a LlamaConfig and a word-level tokenizer built in memory: nothing is downloaded."""

from __future__ import annotations

import importlib.util
import os

import peft
import pytest
import torch
from safetensors.torch import load_file

import qkernels
from qkernels import apply_qlora
from qkernels.integrations import QLoRATrainer, restore_adapters

from .test_adapters import assert_matches, bnb_base, dense_base
from .test_training import LLAMA_TARGETS, _args, _Batch, _lora, bnb_llama, tiny_llama

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
# what Trainer._save_checkpoint adds next to the model files (no tokenizer here: the Trainer got none)
STATE_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


def _qlora_llama(seed: int, bnb_dir=None, **kw):
    """A tiny Llama after apply_qlora; ``bnb_dir``: the one transformers loaded in 4 bits (``bnb_llama``) instead."""
    model = tiny_llama() if bnb_dir is None else bnb_llama(bnb_dir)
    torch.manual_seed(seed)  # LoRA A's init: a resumed model starts elsewhere
    return apply_qlora(model, LLAMA_TARGETS, r=4, lora_alpha=8, **kw)


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _losses(trainer, after: int = 0) -> list[float]:
    """The logged training losses of the steps after ``after`` (a resumed run's history starts with the
    checkpoint's)."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > after]


def _logits_in_float32_and_float64(model, theirs, ref64, ids):
    """Logits of our model, peft's on the bitsandbytes base and peft's on the float64 dequantized base. The inputs
    enter as embeddings that require grad, so bitsandbytes runs its exact dequantize path (DESIGN §5)."""

    def run(m, dtype):
        emb = m.get_input_embeddings()(ids).to(dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            return m(inputs_embeds=emb).logits.detach()

    return run(model, torch.float32), run(theirs, torch.float32), run(ref64, torch.float64)


@pytest.mark.parametrize("base", ["float", "bnb-4bit"])
def test_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path, base):
    """QLoRATrainer: each checkpoint is peft's (adapter_config.json + adapter_model.safetensors with the module to
    save, no model weights: a plain Trainer wrote the packed model there); resuming from the step-2 checkpoint into a
    differently initialized model restores the adapter and AdamW's state, so steps 3-4 log the uninterrupted run's
    losses and end on its weights, bit for bit."""
    bnb_dir = tmp_path if base == "bnb-4bit" else None
    model = _qlora_llama(1, bnb_dir, modules_to_save=["lm_head"])
    trainer = QLoRATrainer(model=model, args=_args(tmp_path / "run", 4), train_dataset=_Batch())
    trainer.train()
    losses, final = _losses(trainer), _trained(model)
    assert len(losses) == 4 and losses[3] < losses[0], losses

    ckpt = tmp_path / "run" / "checkpoint-2"
    assert set(os.listdir(ckpt)) == ADAPTER_FILES | STATE_FILES
    keys = set(load_file(ckpt / "adapter_model.safetensors"))
    assert keys == set(qkernels.adapters.adapter_state_dict(model))
    assert "base_model.model.lm_head.weight" in keys and not any(".original_module." in k for k in keys)

    resumed = _qlora_llama(2, bnb_dir, modules_to_save=["lm_head"])
    assert any(not torch.equal(v, final[k]) for k, v in _lora(resumed).items())
    params = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    again = QLoRATrainer(model=resumed, args=_args(tmp_path / "run", 4), train_dataset=_Batch())
    again.train(resume_from_checkpoint=str(ckpt))
    assert _losses(again, after=2) == losses[2:]
    got = _trained(resumed)
    assert got.keys() == final.keys() and all(torch.equal(got[k], final[k]) for k in final)
    assert all(p is params[n] for n, p in resumed.named_parameters() if p.requires_grad)  # restored in place


def test_save_model_writes_an_adapter_peft_loads_on_the_4bit_base(tmp_path):
    """``trainer.save_model()`` writes the adapter only (task_type CAUSAL_LM); ``PeftModel.from_pretrained`` on the
    same 4-bit base (bitsandbytes layers holding qkernels' bytes) computes the trained model's logits."""
    model = _qlora_llama(1, modules_to_save=["lm_head"])
    trainer = QLoRATrainer(model=model, args=_args(tmp_path / "run", 2, save_strategy="no"), train_dataset=_Batch())
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert set(os.listdir(out)) == ADAPTER_FILES | {"training_args.bin"}
    assert peft.PeftConfig.from_pretrained(str(out)).task_type == "CAUSAL_LM"

    model.eval()
    theirs = peft.PeftModel.from_pretrained(bnb_base(model, tiny_llama), str(out)).eval()
    assert isinstance(theirs, peft.PeftModelForCausalLM)
    ref64 = peft.PeftModel.from_pretrained(dense_base(model, torch.float64, tiny_llama), str(out)).double().eval()
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    assert_matches(*_logits_in_float32_and_float64(model, theirs, ref64, ids))


def test_a_plain_trainer_checkpoint_still_resumes_in_qlora_trainer(tmp_path):
    """Full checkpoints stay available (a plain Trainer writes them) and QLoRATrainer resumes from one through the
    Trainer's own loading: same final weights as the uninterrupted run."""
    from transformers import Trainer

    model = _qlora_llama(1)
    Trainer(model=model, args=_args(tmp_path / "run", 4), train_dataset=_Batch()).train()
    assert "model.safetensors" in os.listdir(tmp_path / "run" / "checkpoint-2")
    resumed = _qlora_llama(2)
    QLoRATrainer(model=resumed, args=_args(tmp_path / "run", 4), train_dataset=_Batch()).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    want, got = _trained(model), _trained(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_t5_with_a_float_base_wo_resumes_exactly(tmp_path):
    """T5 "all-linear" puts LoRA on wo's float base (transformers keeps wo float). Trained in train mode (T5's dropout
    on: the RNG state is restored too), the run resumed from checkpoint-2 into a differently initialized model logs the
    uninterrupted run's losses at steps 3-4 and ends on its weights, wo's LoRA included, bit for bit."""
    from .test_model import tiny_model

    wo = "encoder.block.0.layer.1.DenseReluDense.wo"

    def t5(seed: int):
        model = tiny_model("t5").train()
        torch.manual_seed(seed)
        return apply_qlora(model, "all-linear", r=4, lora_alpha=8)

    model = t5(1)
    assert not model.get_submodule(wo).quantized
    trainer = QLoRATrainer(model=model, args=_args(tmp_path / "run", 4), train_dataset=_Batch(4, 12, low=2, vocab=64))
    trainer.train()
    losses, final = _losses(trainer), _trained(model)
    assert len(losses) == 4 and any(f"{wo}.lora_B.default.weight" == k for k in final)
    resumed = t5(2)
    again = QLoRATrainer(model=resumed, args=_args(tmp_path / "run", 4), train_dataset=_Batch(4, 12, low=2, vocab=64))
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert _losses(again, after=2) == losses[2:]
    got = _trained(resumed)
    assert got.keys() == final.keys() and all(torch.equal(got[k], final[k]) for k in final)


def test_resume_mid_epoch_with_accumulation_rotation_and_two_adapters(tmp_path):
    """The usual long-run settings together: gradient accumulation, a linear schedule with warmup, save_total_limit,
    two epochs resumed mid-way through the second (step 6 of 8) from the newest checkpoint kept, with a second
    adapter and a module to save. Same later losses and final weights as the uninterrupted run."""
    from transformers import TrainingArguments

    def args():
        return TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="linear",
                                 warmup_steps=1, save_steps=3, save_total_limit=2, logging_steps=1, report_to=[],
                                 use_cpu=True, disable_tqdm=True, seed=0)

    def model(seed):
        m = _qlora_llama(seed, modules_to_save=["lm_head"])
        qkernels.add_adapter(m, "second", r=2, lora_alpha=4, modules_to_save=["lm_head"])
        qkernels.set_adapter(m, "default")
        return m

    first = model(1)
    trainer = QLoRATrainer(model=first, args=args(), train_dataset=_Batch(16, 12))
    trainer.train()
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-6", "checkpoint-8"]
    resumed = model(2)
    again = QLoRATrainer(model=resumed, args=args(), train_dataset=_Batch(16, 12))
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert _losses(again, after=6) == _losses(trainer)[6:]
    want, got = _trained(first), _trained(resumed)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    second = {n: p for n, p in first.named_parameters() if ".second." in n}
    assert second and all(torch.equal(p, second[n]) for n, p in resumed.named_parameters() if ".second." in n)


def test_load_best_model_at_end_restores_the_best_adapter_and_the_other_adapters_round_trip(tmp_path):
    """``load_best_model_at_end`` with adapter checkpoints: the model ends on the best checkpoint's adapter (here the
    step-2 one: the metric is the eval loss with greater_is_better, so the earlier, higher loss wins). A second
    adapter is saved in its own subdirectory, as peft lays them out, and restored with the first."""
    model = _qlora_llama(1)
    qkernels.add_adapter(model, "second", r=2, lora_alpha=4)
    second = {n: p.detach().clone() for n, p in model.named_parameters() if ".second." in n}
    qkernels.set_adapter(model, "default")
    args = _args(tmp_path / "run", 4, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="loss", greater_is_better=True)
    trainer = QLoRATrainer(model=model, args=args, train_dataset=_Batch(), eval_dataset=_Batch())
    trainer.train()
    best = tmp_path / "run" / "checkpoint-2"
    assert trainer.state.best_model_checkpoint == str(best)
    assert ADAPTER_FILES <= set(os.listdir(best)) and ADAPTER_FILES == set(os.listdir(best / "second"))
    saved = load_file(best / "adapter_model.safetensors")
    live = qkernels.adapters.adapter_state_dict(model)
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    assert all(torch.equal(p, second[n]) for n, p in model.named_parameters() if ".second." in n)
    assert peft.PeftConfig.from_pretrained(str(best / "second")).r == 2


def test_resuming_an_adapter_checkpoint_without_apply_qlora_names_the_fix(tmp_path):
    """The Trainer's own message was "Can't find a checkpoint index (pytorch_model.bin.index.json ...)"."""
    QLoRATrainer(model=_qlora_llama(1), args=_args(tmp_path / "run", 2), train_dataset=_Batch()).train()
    trainer = QLoRATrainer(model=tiny_llama(), args=_args(tmp_path / "run", 2), train_dataset=_Batch())
    with pytest.raises(ValueError, match=r"holds qkernels/peft adapters only.*call qkernels.apply_qlora"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


def test_restore_adapters_from_an_output_dir_ignores_its_checkpoint_subdirectories(tmp_path):
    """save_model() into output_dir puts the final adapter beside the Trainer's checkpoint-<step> directories, which
    hold adapters too: restore_adapters(model, output_dir) counted each as an adapter named "checkpoint-2" and refused
    ("holds adapters ['checkpoint-2', 'default']")."""
    model = _qlora_llama(1)
    trainer = QLoRATrainer(model=model, args=_args(tmp_path / "run", 2), train_dataset=_Batch())
    trainer.train()
    trainer.save_model()
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_config.json").is_file()
    fresh = _qlora_llama(1)
    assert restore_adapters(fresh, tmp_path / "run") == ["default"]
    want = _trained(model)
    assert all(torch.equal(_trained(fresh)[k], v) for k, v in want.items())


def test_restore_adapters_refuses_another_adapter_before_copying(tmp_path):
    """A checkpoint from a different adapter (another rank, or another set of adapters) is a ValueError naming the
    difference, and nothing is copied."""
    qkernels.save_adapters(_qlora_llama(1), tmp_path / "r4")
    other = apply_qlora(tiny_llama(), LLAMA_TARGETS, r=2, lora_alpha=8)
    before = _trained(other)
    with pytest.raises(ValueError, match=r"r=4, lora_alpha=8.*in the checkpoint but r=2"):
        restore_adapters(other, tmp_path / "r4")
    qkernels.add_adapter(other, "second", r=2)
    with pytest.raises(ValueError, match=r"holds adapters \['default'\].*model has \['default', 'second'\]"):
        restore_adapters(other, tmp_path / "r4")
    after = _trained(other)
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ---------------------------------------------------------------------------------------------- trl's SFTTrainer
# trl and datasets are test dependencies (Makefile DEPS: make test and CI install them, so these run there); the
# offline GPU image has neither, and its run of the rest of the suite should report these as skipped, not failed
needs_trl = pytest.mark.skipif(
    importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None,
    reason="needs trl and datasets (installed by `make test` / CI; missing on this machine)")
WORDS = "the cat sat on a mat dog ran to park and big small red blue".split()
TEXTS = ["the cat sat on a mat", "the dog ran to the park", "a big red dog and a small blue cat",
         "the cat ran to a mat"]


def _tokenizer():
    """A word-level tokenizer over WORDS, ids below the tiny Llama's vocabulary of 96 (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _sft(trainer_cls, model, out, max_steps: int = 4, **kw):
    from datasets import Dataset
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
                     lr_scheduler_type="constant", logging_steps=1, save_steps=2, report_to=[], use_cpu=True,
                     disable_tqdm=True, seed=0)  # trl's defaults kept: bf16 autocast, gradient checkpointing
    return trainer_cls(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                       processing_class=_tokenizer(), **kw)


@needs_trl
@pytest.mark.parametrize("base", ["float", "bnb-4bit"])
def test_sft_trainer_trains_saves_the_adapter_and_it_reloads(tmp_path, base):
    """QLoRASFTTrainer (no peft_config) on a model after apply_qlora: trl keeps the model (no peft wrapping), the
    loss falls step by step under trl's defaults (bf16 autocast, gradient checkpointing; on a model transformers
    loaded in 4 bits trl also casts the trainable weights to bfloat16), the module to save trains through trl's fused
    LM head, checkpoints hold the adapter, and the saved adapter reloads: in qkernels with the trained model's logits
    bit for bit, and (float base) in peft onto the 4-bit base within assert_matches' bound."""
    float_base = base == "float"
    model = tiny_llama() if float_base else bnb_llama(tmp_path)
    # no module to save on the 4-bit base: trl casts its copy to bfloat16 too, and a bfloat16 nn.Linear head fails on
    # float32 hidden states outside autocast (so does peft's under trl)
    apply_qlora(model, LLAMA_TARGETS, r=4, lora_alpha=8, modules_to_save=["lm_head"] if float_base else None)
    head = model.lm_head.modules_to_save["default"].weight.detach().clone() if float_base else None
    trainer = _sft(qkernels.QLoRASFTTrainer, model, tmp_path / "run")
    assert trainer.model is model and not isinstance(trainer.model, peft.PeftModel)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 4 and all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses
    if float_base:
        assert not torch.equal(model.lm_head.modules_to_save["default"].weight, head)
    want_dtype = torch.float32 if float_base else torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {want_dtype}
    assert ADAPTER_FILES <= set(os.listdir(tmp_path / "run" / "checkpoint-2"))
    assert "model.safetensors" not in os.listdir(tmp_path / "run" / "checkpoint-2")

    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert ADAPTER_FILES <= set(os.listdir(out)) and "model.safetensors" not in os.listdir(out)
    model.eval()
    fresh = apply_qlora(tiny_llama() if float_base else bnb_llama(tmp_path), LLAMA_TARGETS, r=4, lora_alpha=8)
    qkernels.load_adapter(fresh, out, replace=True)
    fresh.eval()
    for p in fresh.parameters():
        if p.requires_grad:  # the trained weights' dtype, as trl set it
            p.data = p.data.to(want_dtype)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    # accelerate left the trained model's forward wrapped in bfloat16 autocast (trl's bf16=True; a peft model keeps
    # it too): unwrapped, it runs the reloaded model's computation
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    if float_base:
        theirs = peft.PeftModel.from_pretrained(bnb_base(fresh, tiny_llama), str(out)).eval()
        ref64 = peft.PeftModel.from_pretrained(dense_base(fresh, torch.float64, tiny_llama), str(out)).double()
        assert_matches(*_logits_in_float32_and_float64(fresh, theirs, ref64.eval(), ids))


@needs_trl
def test_plain_sft_trainer_trains_a_qlora_model_with_full_checkpoints(tmp_path):
    """trl's own SFTTrainer takes the model as it is (no peft wrapping, no quantization complaint) and trains it;
    its checkpoints are the Trainer's full ones (the packed weights included), as with transformers' Trainer."""
    from trl import SFTTrainer

    model = _qlora_llama(1)
    trainer = _sft(SFTTrainer, model, tmp_path / "run", max_steps=2)
    trainer.train()
    losses = _losses(trainer)
    assert type(trainer.model) is type(tiny_llama()) and losses[1] < losses[0], losses
    assert "model.safetensors" in os.listdir(tmp_path / "run" / "checkpoint-2")


@needs_trl
def test_sft_trainer_refuses_what_trl_would_get_wrong(tmp_path):
    """Named up front instead of peft's "Target module QLoRALinear(...) is not supported" (a peft_config as well) or
    a shape error at the first step (LoRA on lm_head: trl's fused LM head multiplies by lm_head.weight itself)."""
    with pytest.raises(ValueError, match=r"peft_config was passed.*Pass no peft_config"):
        _sft(qkernels.QLoRASFTTrainer, _qlora_llama(1), tmp_path, peft_config=peft.LoraConfig(r=4))
    model = apply_qlora(tiny_llama(), LLAMA_TARGETS + ["lm_head"], r=4)
    with pytest.raises(ValueError, match=r"output embedding 'lm_head'.*modules_to_save=\['lm_head'\]"):
        _sft(qkernels.QLoRASFTTrainer, model, tmp_path)
