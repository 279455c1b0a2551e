"""Adapter-only checkpoints with transformers' Trainer and trl's SFTTrainer (``qkernels.integrations``): what peft's
Trainer integration gives a PeftModel. Checkpoints and ``save_model()`` hold the adapter in peft's format, resuming
from one gives the uninterrupted run's losses and weights exactly, and the saved adapter loads in peft onto the 4-bit
base with the trained model's outputs (``assert_matches``' bound, see tests/test_adapters.py). Tiny Llamas built from
a LlamaConfig and a word-level tokenizer built in memory: nothing is downloaded."""

from __future__ import annotations

import os

import peft
import pytest
import torch
from safetensors.torch import load_file

import qkernels
from qkernels import apply_qlora
from qkernels.integrations import QLoRATrainer, restore_adapters

from .test_adapters import assert_matches, bnb_base, dense_base
from .test_training import LLAMA_TARGETS, _args, _Batch, _lora, tiny_llama

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
# what Trainer._save_checkpoint adds next to the model files (no tokenizer here: the Trainer got none)
STATE_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


def _qlora_llama(seed: int, **kw):
    model = tiny_llama()
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


def test_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    """QLoRATrainer: each checkpoint is peft's (adapter_config.json + adapter_model.safetensors with the module to
    save, no model weights: a plain Trainer wrote the packed model there); resuming from the step-2 checkpoint into a
    differently initialized model restores the adapter and AdamW's state, so steps 3-4 log the uninterrupted run's
    losses and end on its weights, bit for bit."""
    model = _qlora_llama(1, modules_to_save=["lm_head"])
    trainer = QLoRATrainer(model=model, args=_args(tmp_path / "run", 4), train_dataset=_Batch())
    trainer.train()
    losses, final = _losses(trainer), _trained(model)
    assert len(losses) == 4 and losses[3] < losses[0], losses

    ckpt = tmp_path / "run" / "checkpoint-2"
    assert set(os.listdir(ckpt)) == ADAPTER_FILES | STATE_FILES
    keys = set(load_file(ckpt / "adapter_model.safetensors"))
    assert keys == set(qkernels.adapters.adapter_state_dict(model))
    assert "base_model.model.lm_head.weight" in keys and not any(".original_module." in k for k in keys)

    resumed = _qlora_llama(2, modules_to_save=["lm_head"])
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
