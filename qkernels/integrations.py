"""Training integrations: transformers' ``Trainer`` and trl's ``SFTTrainer`` with peft's adapter-only checkpoints.

transformers' Trainer treats a model after ``apply_qlora`` as a plain ``PreTrainedModel``: every checkpoint and
``trainer.save_model()`` hold the whole model (the packed 4-bit weights included, ~0.5 byte per parameter). That
still works (resuming restores everything), and it is what a plain ``Trainer`` / ``SFTTrainer`` keeps doing. peft's
Trainer integration instead saves only the adapter; the Trainer recognises a ``PeftModel`` by its class
(``transformers.trainer_utils._is_peft_model``), so a qkernels model cannot opt in from the model side, and
resuming from an adapter-only directory goes through ``Trainer._load_from_checkpoint``. Hence a mixin:

- ``QLoRATrainerMixin``: put it before the trainer class (``class T(QLoRATrainerMixin, SFTTrainer)``). When the model
  carries qkernels adapters, every checkpoint and ``save_model()`` write what ``PeftModel.save_pretrained`` writes:
  ``adapter_config.json`` + ``adapter_model.safetensors`` per adapter ("default" in the directory, any other adapter
  in a subdirectory of its name), modules to save included, plus the tokenizer and ``training_args.bin`` as the
  Trainer does. ``resume_from_checkpoint`` and ``load_best_model_at_end`` copy the saved tensors into the live
  adapter weights in place (same ``nn.Parameter`` objects, so the optimizer state the Trainer restores applies to
  them). A model without qkernels adapters, or a checkpoint without adapter files (one written by a plain Trainer),
  takes the Trainer's own path.
- ``QLoRATrainer`` (``transformers.Trainer``) and ``QLoRASFTTrainer`` (``trl.SFTTrainer``): the mixin applied; both
  are created on first access, so importing qkernels imports neither transformers nor trl.
- ``save_adapters(model, path)`` / ``restore_adapters(model, path)``: the two halves, usable without a Trainer.

The saved directory loads with ``peft.PeftModel.from_pretrained(base_model, path)`` (``task_type`` is written from
the model's class, e.g. ``"CAUSAL_LM"`` for a ``LlamaForCausalLM``, none for a classification head: see
``qkernels.adapter_files.task_type_of``) and with ``qkernels.load_adapter``. Under FSDP
or DeepSpeed the mixin keeps the Trainer's own (full) saving and loading: adapter gathering there is not covered.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from torch import nn

from ._compiled import unwrap_compiled
from .adapter_files import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    _plan,
    _read_config,
    _read_weights,
    save_adapter,
    task_type_of,
)
from .adapters import _qlora_modules, _wrappers, adapter_names
from .base_bias import adapter_modes
from .base_bias import bias_tensor as base_bias_tensor

# QLoRATrainer and QLoRASFTTrainer are module attributes built on first access (``__getattr__`` below)
__all__ = ["QLoRATrainerMixin", "restore_adapters", "save_adapters"]

logger = logging.getLogger("qkernels")

DEFAULT_ADAPTER = "default"  # peft saves this one in the directory itself, every other one in a subdirectory
TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer.TRAINING_ARGS_NAME
_CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR + "-<step>"

def has_adapters(model: nn.Module) -> bool:
    """True when ``model`` holds a ``QLoRALinear`` (or ``QLoRAEmbedding``) with at least one adapter."""
    from .adapters import _qlora_class

    return any(isinstance(m, _qlora_class()) and len(m.lora_A) > 0 for m in model.modules())


def _adapter_dir(path: str | os.PathLike, name: str) -> str:
    return str(path) if name == DEFAULT_ADAPTER else os.path.join(path, name)


def _is_adapter_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and (
        os.path.isfile(os.path.join(path, SAFETENSORS_NAME)) or os.path.isfile(os.path.join(path, BIN_NAME)))


def _saved_adapters(path: str | os.PathLike) -> list[str]:
    """The adapters a ``save_adapters`` directory holds: "default" in it, others in subdirectories (peft's layout).

    A Trainer's ``checkpoint-<step>`` subdirectories (``save_model()`` into ``output_dir`` puts the final adapter beside
    them) are checkpoints, not adapters: they are not counted."""
    names = [DEFAULT_ADAPTER] if _is_adapter_dir(path) else []
    if os.path.isdir(path):
        names += sorted(d for d in os.listdir(path) if d != DEFAULT_ADAPTER and not _CHECKPOINT_DIR.fullmatch(d)
                        and _is_adapter_dir(os.path.join(path, d)))
    return names


def is_adapter_checkpoint(path: str | os.PathLike) -> bool:
    """True when directory ``path`` holds at least one adapter saved in peft's layout."""
    return bool(_saved_adapters(path))


def save_adapters(model: nn.Module, path: str | os.PathLike, *, task_type: str | None = None) -> list[str]:
    """Write every adapter of ``model`` to ``path`` as ``PeftModel.save_pretrained`` lays them out.

    Adapter "default" goes to ``path`` itself, any other adapter ``name`` to ``path/name`` (each an
    ``adapter_config.json`` + ``adapter_model.safetensors`` written by ``qkernels.save_adapter``, modules to save
    included). ``task_type`` (None: ``task_type_of(model)``) is written to each config. Returns the adapter names."""
    model = unwrap_compiled(model)  # torch.compile(model): the uncompiled model's class and names
    names = adapter_names(model)
    task_type = task_type if task_type is not None else task_type_of(model)
    for name in names:
        save_adapter(model, _adapter_dir(path, name), adapter_name=name, task_type=task_type)
    return names


def restore_adapters(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Copy the adapters saved in ``path`` (``save_adapters``' layout) into ``model``'s adapters of the same names,
    in place: the same ``nn.Parameter`` objects keep their identity, requires_grad and dtype, so an optimizer built on
    them stays valid (what resuming a Trainer needs). Returns the adapter names restored.

    The checkpoint must hold exactly the model's adapters, each on the same modules with the same rank, alpha,
    use_dora (a DoRA adapter's magnitudes are restored too) and modules to save; any difference raises
    ``ValueError`` before a tensor is copied (to change the adapter's shape, use
    ``qkernels.load_adapter(model, path, replace=True)`` instead)."""
    model = unwrap_compiled(model)
    have, saved = adapter_names(model), _saved_adapters(path)
    if sorted(have) != sorted(saved):
        raise ValueError(
            f"{path} holds adapters {saved} (\"default\" in the directory, others in subdirectories), but the model "
            f"has {have}; resume with the model the checkpoint was saved from (same apply_qlora / add_adapter calls)"
        )
    plans = {name: _plan_in_place(model, _adapter_dir(path, name), name) for name in have}
    with torch.no_grad():
        for name, plan in plans.items():
            for p in plan.lora:
                p.module.set_lora_weight(name, "lora_A", p.A)  # in place (an embedding's A is a bare Parameter)
                p.module.set_lora_weight(name, "lora_B", p.B)
                if p.magnitude is not None:  # a DoRA adapter (its DoRA-ness checked equal in _plan_in_place)
                    p.module.lora_magnitude_vector[name].weight.copy_(p.magnitude)
                if p.lora_B_bias is not None:  # lora_bias (checked equal in _plan_in_place)
                    p.module.set_lora_weight(name, "lora_B.bias", p.lora_B_bias)
            for module, _, t in plan.biases or ():  # base biases (bias "all" / "lora_only"), in place
                base_bias_tensor(module).copy_(t)
            for n, tensors in plan.saved.items():
                model.get_submodule(n).modules_to_save[name].load_state_dict(tensors, strict=True)
            for n, rows in (plan.token_rows or {}).items():  # trainable tokens (checked equal in _plan_in_place)
                model.get_submodule(n).deltas[name].copy_(rows)
    return have


def _plan_in_place(model: nn.Module, d: str, name: str) -> Any:
    """Validate adapter directory ``d`` against ``model``'s live adapter ``name``: same modules, ranks, alphas."""
    cfg = _read_config(d)
    plan = _plan(model, cfg, _read_weights(d), name, replace=True)
    live = {n: m for n, m in _qlora_modules(model) if name in m.lora_A}
    got = {p.name: p for p in plan.lora}
    if got.keys() != live.keys():
        raise ValueError(
            f"{d}: adapter {name!r} has LoRA weights for {sorted(got)}, the model's for {sorted(live)} "
            f"(missing {sorted(live.keys() - got.keys())}, extra {sorted(got.keys() - live.keys())}); resume with the "
            "model the checkpoint was saved from"
        )
    for n, p in got.items():
        m = live[n]
        if (p.r, float(p.alpha), bool(cfg.get("use_rslora", False))) != (
                m.r[name], float(m.lora_alpha[name]), bool(m.use_rslora[name])):
            raise ValueError(
                f"{d}: module {n!r} has r={p.r}, lora_alpha={p.alpha}, use_rslora={cfg.get('use_rslora', False)} "
                f"in the checkpoint but r={m.r[name]}, lora_alpha={m.lora_alpha[name]}, use_rslora="
                f"{m.use_rslora[name]} in the model; resume with the same apply_qlora arguments"
            )
        if (p.lora_B_bias is not None) != bool(getattr(m, "has_lora_bias", lambda _: False)(name)):
            raise ValueError(f"{d}: adapter {name!r} has lora_bias={p.lora_B_bias is not None} in the checkpoint but "
                             f"module {n!r} does not match in the model; resume with the same apply_qlora lora_bias")
        if bool(cfg.get("use_dora", False)) != m.is_dora(name):
            raise ValueError(f"{d}: adapter {name!r} has use_dora={bool(cfg.get('use_dora', False))} in the checkpoint "
                             f"but module {n!r} is{'' if m.is_dora(name) else ' not'} a DoRA adapter in the model; "
                             "resume with the same apply_qlora / add_adapter use_dora")
    mode, live_mode = cfg.get("bias", "none"), adapter_modes(model).get(name, "none")
    if mode != live_mode:
        raise ValueError(f"{d}: adapter {name!r} has bias={mode!r} in the checkpoint but {live_mode!r} in the model; "
                         "resume with the same apply_qlora / add_adapter bias")
    from .trainable_tokens import token_wrappers

    live_tokens = {n: w.token_indices[name] for n, w in token_wrappers(model) if not w.tied and name in w.deltas}
    got_tokens = {n: ids for n, (ids, source) in (plan.tokens or {}).items() if source is None}
    if got_tokens != live_tokens:
        raise ValueError(f"{d}: adapter {name!r} has trainable tokens {got_tokens} in the checkpoint but {live_tokens} "
                         "in the model; resume with the same trainable_token_indices")
    want_saved = {n for n, w in _wrappers(model) if name in w.modules_to_save}
    if set(plan.saved) != want_saved:
        raise ValueError(f"{d}: adapter {name!r} saves modules {sorted(plan.saved)}, the model's adapter has copies "
                         f"of {sorted(want_saved)}; resume with the same modules_to_save")
    return plan


class QLoRATrainerMixin:
    """Adapter-only checkpoints for a transformers ``Trainer`` subclass, as peft's models get (module docstring).

    Use it first in the bases: ``class MyTrainer(QLoRATrainerMixin, Trainer)``; ready-made: ``QLoRATrainer``,
    ``QLoRASFTTrainer``. A plain ``Trainer`` keeps writing full checkpoints (packed weights included)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # trl's trainers compute log-probabilities from ``lm_head.weight`` directly and wrap the model in peft when
        # given a ``peft_config``: both refused up front on a qkernels model (``_check_trl_model``)
        if any(c.__module__.startswith("trl.") for c in type(self).__mro__):
            _check_trl_model(kwargs.get("model", args[0] if args else None), kwargs.get("peft_config"))
        super().__init__(*args, **kwargs)

    def _qkernels_model(self) -> nn.Module | None:
        """The model to save adapters from, or None to leave saving and loading to the Trainer."""
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            return None
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if has_adapters(model) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapters (``save_adapters``), the tokenizer and the training arguments; no model weights."""
        model = self._qkernels_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving qkernels adapters %s to %s", adapter_names(model), output_dir)
        save_adapters(model, output_dir)
        tokenizer = self.processing_class
        if tokenizer is None:  # as Trainer._save: a collator's tokenizer is saved when there is no processing class
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """An adapter checkpoint: ``restore_adapters`` in place; any other checkpoint: the Trainer's loading."""
        live = self._qkernels_model()
        if live is None or not is_adapter_checkpoint(resume_from_checkpoint):
            self._refuse_adapters_without_a_qlora_model(resume_from_checkpoint)
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Restoring qkernels adapters from %s", resume_from_checkpoint)
        restore_adapters(live, resume_from_checkpoint)
        return None

    def _refuse_adapters_without_a_qlora_model(self, path: str) -> None:
        """An adapter-only checkpoint for a model without qkernels adapters: the Trainer would fail with "Can't find a
        checkpoint index (pytorch_model.bin.index.json or model.safetensors.index.json)"; say what is missing."""
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        is_peft = any(c.__module__.startswith("peft.") for c in type(model).__mro__)
        has_weights = any(os.path.isfile(os.path.join(path, f)) for f in (
            "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json"))
        if not is_peft and not has_weights and is_adapter_checkpoint(path):
            raise ValueError(
                f"resume_from_checkpoint={path!r} holds qkernels/peft adapters only, and the model has no qkernels "
                "adapter to restore them into: call qkernels.apply_qlora(model, ...) with the arguments of the run "
                "that wrote the checkpoint before resuming")

    def _load_best_model(self) -> None:
        """``load_best_model_at_end`` with adapter checkpoints: the best checkpoint's adapters, in place."""
        live, best = self._qkernels_model(), self.state.best_model_checkpoint
        if live is None or not is_adapter_checkpoint(best):
            return super()._load_best_model()
        logger.info("Loading the best qkernels adapters from %s (score: %s)", best, self.state.best_metric)
        restore_adapters(live, best)
        return None


def _check_trl_model(model: Any, peft_config: Any) -> None:
    """What trl would do wrong with a model carrying qkernels adapters, as a ValueError naming the fix.

    - ``peft_config`` given: trl calls ``peft.get_peft_model``, which refuses every ``QLoRALinear`` ("Target module
      QLoRALinear(...) is not supported. Currently, only the following modules are supported: `torch.nn.Linear`,
      ...") or, for other targets, stacks a second LoRA of peft's on the model.
    - LoRA on the output embedding (``lm_head`` targeted): trl's fused LM head multiplies the hidden states by
      ``lm_head.weight`` itself, never calling the layer. A 4-bit head's weight is the packed bytes ("mat1 and mat2
      shapes cannot be multiplied (36x64 and 1x3072)" at the first step); a float-base head's (``quantize=False``, as
      apply_qlora keeps an lm_head on a model loaded in 4 bits) is the base weight alone, so the loss ignores the
      adapter and it never trains. Either way it is refused; trl refuses the same on a peft model."""
    if not isinstance(model, nn.Module) or not has_adapters(model):
        return
    if peft_config is not None:
        raise ValueError(
            "peft_config was passed with a model that already carries qkernels LoRA adapters (qkernels.apply_qlora): "
            "trl would wrap it with peft again, and peft cannot wrap a QLoRALinear. Pass no peft_config (the "
            "apply_qlora arguments are the LoRA config), or pass the model without apply_qlora to train with peft")
    from .nn import QLoRALinear

    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, QLoRALinear):
        name = next((n for n, m in model.named_modules() if m is head), "lm_head")
        why = ("here the packed 4-bit bytes), so the adapter would never train and the step fails" if head.quantized
               else "here the float base weight without its LoRA term), so the adapter would never train nor count")
        raise ValueError(
            f"LoRA on the output embedding {name!r} is not supported by trl: its trainers compute log-probabilities "
            f"from {name}.weight directly ({why}. Leave {name!r} out of apply_qlora's target_modules (its default "
            f"'all-linear' does), or train it in full with modules_to_save=[{name!r}]")


_DOCS = {
    "QLoRATrainer": "``transformers.Trainer`` with ``QLoRATrainerMixin``: adapter-only checkpoints and saves for a "
                    "model after ``qkernels.apply_qlora``; resumes from them in place.",
    "QLoRASFTTrainer": "``trl.SFTTrainer`` with ``QLoRATrainerMixin``: adapter-only checkpoints and saves for a model "
                       "after ``qkernels.apply_qlora`` (pass no ``peft_config``); resumes from them in place.",
}


def __getattr__(name: str) -> type:
    """``QLoRATrainer`` / ``QLoRASFTTrainer``, built on first access (transformers and trl are optional)."""
    if name not in _DOCS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name == "QLoRATrainer":
        from transformers import Trainer as base
    else:
        try:
            from trl import SFTTrainer as base
        except ImportError as e:
            raise ImportError(f"qkernels.QLoRASFTTrainer needs trl ({e}); pip install trl") from None
    cls = type(name, (QLoRATrainerMixin, base), {"__module__": __name__, "__doc__": _DOCS[name]})
    globals()[name] = cls
    return cls
