"""Adapters on disk in peft's format: ``save_adapter`` / ``adapter_state_dict`` write, ``load_adapter`` reads.

- ``save_adapter(model, path, adapter_name)`` writes what ``PeftModel.save_pretrained`` writes:
  ``adapter_config.json`` (a ``peft.LoraConfig``) and ``adapter_model.safetensors`` with keys
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (the adapter name removed, as peft's
  ``get_peft_model_state_dict`` does; a DoRA adapter adds ``use_dora`` and ``<module>.lora_magnitude_vector``, a
  ``lora_bias`` adapter ``lora_bias`` and ``<module>.lora_B.bias``, trainable tokens ``trainable_token_indices`` and
  ``<embedding>.token_adapter.trainable_tokens_delta``, an adapter with ``bias`` "all" / "lora_only" the base biases
  it trains, ``<module>.base_layer.bias`` / ``<name>.bias``: ``qkernels.base_bias``), plus
  ``base_model.model.<module>.<key>`` for each module to save
  (``qkernels.modules_to_save``); the config carries ``layers_to_transform`` / ``layers_pattern`` /
  ``modules_to_save``. ``peft.PeftModel.from_pretrained(base, path)`` loads it.
- ``load_adapter(model, path, adapter_name)`` reads such a directory (``adapter_model.safetensors``, else
  ``adapter_model.bin``). Every LoRA key must name a ``QLoRALinear`` of ``model`` (``<module>.lora_embedding_A`` /
  ``_B``, peft's keys for LoRA on an embedding: a ``QLoRAEmbedding``) that the config selects and every
  shape must match the module and the rank the config gives it (``r`` / ``rank_pattern``); modules to save must
  come whole. Any mismatch raises ``ValueError`` naming the key and both shapes, and nothing is loaded: the whole
  file is validated before the model is touched.

The model-level adapter API these build on (walking the ``QLoRALinear`` modules, adding and activating adapters) is
``qkernels.adapters``, which also re-exports the three functions here. Module names are relative to the ``model``
passed in: pass the same model object you would give to ``peft.get_peft_model`` so the names agree with peft's.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import base_bias
from ._compiled import ORIG_MOD, strip_compiled_prefix, unwrap_compiled
from .adapters import (
    _activate,
    _add_to_module,
    _dropout_p,
    _existing_flags,
    _is_lora_layer,
    _qlora_class,
    _qlora_modules,
    _require_adapter,
    _restore_flags,
    _selected,
    _token_wrappers,
    _wrappers,
    adapter_names,
    delete_adapter,
    set_adapter,
)
from .trainable_tokens import DELTA_KEY

__all__ = ["adapter_state_dict", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # peft's prefix of every LoRA key (PeftModel.base_model = LoraModel, .model)
# peft writes ``<module>.lora_A.weight``; a live PeftModel's state dict has ``<module>.lora_A.<adapter>.weight``
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
# LoRA on an embedding (peft's lora.Embedding: ParameterDicts, so no ".weight"): peft writes
# ``<module>.lora_embedding_A`` / ``_B`` (its get_peft_model_state_dict strips the adapter name from the ParameterDict
# key, save_and_load.py:528 reads it back so); a live state dict has ``<module>.lora_embedding_A.<adapter>``
# lora_bias: ``<module>.lora_B.bias`` (a live state dict: ``<module>.lora_B.<adapter>.bias``)
_BIAS_RE = re.compile(r"^(?P<module>.+)\.(?P<which>lora_B)(?:\.(?P<adapter>[^.]+))?\.bias$")
_EMB_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?$")
EMBEDDING_KEYS = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}  # the file keys' suffixes, as peft's
# DoRA's magnitude. peft writes ``<module>.lora_magnitude_vector`` without ".weight" (the key of its older
# ParameterDict: peft/tuners/lora/model.py:1107-1123) and reads that or ``...lora_magnitude_vector.weight``
# (model.py:1126-1136); a live state dict has ``<module>.lora_magnitude_vector.<adapter>.weight``
_MAGNITUDE_RE = re.compile(
    r"^(?P<module>.+)\.(?P<which>lora_magnitude_vector)(?:\.(?P<adapter>[^.]+)\.weight|\.weight)?$")
MAGNITUDE_KEY = "lora_magnitude_vector"  # the file key's suffix, as peft writes it
# peft's save_embedding_layers: with an "embed_tokens" / "lm_head" module targeted, peft also writes the base weight of
# the model's input / output embedding, <module>.base_layer.weight (and .bias), and loads it back into the base layer
_BASE_KEY_RE = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<which>weight|bias)$")
_EMBEDDING_NAME_RE = re.compile(r"(.*\.)?(embed_tokens|lm_head)$")
# peft's trainable tokens (trainable_token_indices): ``<module>.token_adapter.trainable_tokens_delta``, the new rows
# ``[len(indices), embedding_dim]``; a live state dict has ``...trainable_tokens_delta.<adapter>``
_DELTA_RE = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.(?P<adapter>[^.]+))?$")

# LoraConfig fields that change what the adapter computes or what the file holds beyond plain A/B on Linear layers.
# qkernels' QLoRALinear does plain LoRA, DoRA (use_dora, qkernels.dora) and lora_bias, and trainable_token_indices is
# qkernels.trainable_tokens, so an adapter using any of these is
# refused rather than silently mis-applied (with use_dora too: DoRA combined with one of them is refused the same).
_UNSUPPORTED_IF_SET = {
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA (pooled inputs)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "megatron_config": "LoRA on Megatron tensor-parallel layers",
}

# init_lora_weights values for which peft changes the BASE weight (W - s * B0 @ A0) when it creates the adapter, also
# when it loads a saved one (PeftModel.from_pretrained re-runs the init). The saved A, B were trained against that
# residual, which qkernels does not rebuild on a 4-bit base: the outputs would differ from peft's. Other strings
# ("gaussian", "eva", "orthogonal", "lora_ga", "mica", ...) only set the starting A, B, which the file replaces;
# "loftq" trains against the quantized weight, which is what a 4-bit base holds.
_BASE_MODIFYING_INITS = ("pissa", "corda", "olora")

# Every adapter_config.json field of peft 0.21's LoraConfig (and PeftConfig's). Another field comes from a newer peft:
# peft itself drops it with a warning, but it may switch on a LoRA variant (as use_dora, lora_bias, ... did), so a
# set one (not None/False/empty) is refused here and an unset one ignored.
_KNOWN_FIELDS = frozenset(
    "task_type peft_type auto_mapping peft_version base_model_name_or_path revision inference_mode r target_modules "
    "exclude_modules lora_alpha lora_dropout fan_in_fan_out bias use_rslora modules_to_save init_lora_weights "
    "layers_to_transform layers_pattern rank_pattern alpha_pattern megatron_config megatron_core "
    "trainable_token_indices loftq_config eva_config corda_config lora_ga_config use_dora velora_config "
    "alora_invocation_tokens use_qalora qalora_group_size monteclora_config layer_replication runtime_config "
    "lora_bias target_parameters use_bdlora arrow_config kasa_config ensure_weight_tying".split()
)


def _check_variant_fields(cfg: dict[str, Any], cfg_path: str) -> None:
    """Refuse a config whose adapter computes something other than plain LoRA on the unchanged 4-bit base."""
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise ValueError(
            f"{cfg_path}: init_lora_weights={init!r} trains against a modified base weight (W - B0 @ A0), which peft "
            "rebuilds from the float base when it loads the adapter; qkernels cannot. Convert it to a plain LoRA "
            "adapter with peft (save_pretrained(..., path_initial_model_for_weight_conversion=<the initial adapter>), "
            "which writes init_lora_weights=true) and load that; or, if this base already is the saved residual model, "
            "set init_lora_weights to true in the file (peft's PiSSA / OLoRA examples do so before saving)"
        )
    unknown = {k: v for k, v in cfg.items() if k not in _KNOWN_FIELDS and v not in (None, False, "", [], {})}
    if unknown:
        raise ValueError(
            f"{cfg_path}: field(s) {unknown} are not LoraConfig fields that qkernels knows (written by a newer peft?) "
            "and may change what the adapter computes; if they do not (bookkeeping only), remove them from the file"
        )


# ---------------------------------------------------------------------------------------------- describing one adapter
@dataclass
class _ModuleAdapter:
    name: str  # module name in the model
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    conv1d: bool  # built from a transformers Conv1D (peft's is_target_conv_1d_layer)
    use_dora: bool = False
    lora_bias: bool = False
    bias: str = "none"  # peft's LoraConfig.bias: the base biases trained with the adapter (qkernels.base_bias)


def _describe(name: str, m: nn.Module, adapter: str) -> _ModuleAdapter:
    r, alpha, scaling = int(m.r[adapter]), m.lora_alpha[adapter], float(m.scaling[adapter])
    use_rslora = bool(m.use_rslora[adapter])
    expected = alpha / math.sqrt(r) if use_rslora else alpha / r
    if not math.isclose(scaling, expected, rel_tol=1e-6):  # the scaling was changed by hand: no LoraConfig says it
        raise ValueError(
            f"{name}: adapter {adapter!r} has scaling {scaling}, not lora_alpha / {'sqrt(r)' if use_rslora else 'r'}"
            f" = {expected}; peft's LoraConfig cannot represent it"
        )
    return _ModuleAdapter(name, r, alpha, _dropout_p(m.lora_dropout[adapter]), use_rslora,
                          bool(getattr(m, "is_target_conv_1d_layer", False)), m.is_dora(adapter),
                          bool(getattr(m, "has_lora_bias", lambda _: False)(adapter)),
                          base_bias.layer_mode(m, adapter))


def _short_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _target_spec(model: nn.Module, names: list[str], modules_to_save: list[str] | None) -> dict[str, Any]:
    """peft ``target_modules`` / ``layers_to_transform`` / ``layers_pattern`` selecting exactly ``names`` among all the
    model's modules (any type: peft wraps, or refuses, whatever a target name matches), under peft's rules
    (``qkernels.model.match_target_modules``).

    Tried in order, the first that selects exactly ``names`` wins: the short names (``["query", "value"]``); the
    short names with ``layers_to_transform`` = the layer indices of ``names`` (peft's default layer pattern, then
    the layer list's name as ``layers_pattern``); the same with the last two name parts (``["attn.c_proj"]``); the
    full names; the full names with an ``embed_tokens`` / ``lm_head`` by its short name; else a regex string matching
    exactly these names (peft full-matches a string against module names). A list must name ``embed_tokens`` /
    ``lm_head`` as such exactly when such a module is adapted: peft's ``save_embedding_layers="auto"`` checks the list's
    elements, and ``adapter_state_dict`` writes that module's base weight as peft then does.
    """
    from .model import layer_index, match_target_modules

    cls = _qlora_class()
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, cls))  # their lora_A / lora_B
    inside += tuple(f"{n}." for n, _ in _wrappers(model))  # a module to save's original and copies
    inside += tuple(f"{n}." for n, _ in _token_wrappers(model))  # a trainable-tokens embedding's base layer
    # every module peft would try to wrap counts, whatever its type: GPT-2's Conv1D c_proj beside a targeted c_proj,
    # or an Embedding / LayerNorm sharing a target's short name (peft wraps or refuses those; never skips them)
    visible = {n for n, _ in model.named_modules() if n and not n.startswith(inside)}
    short = sorted({_short_name(n) for n in names})
    candidates: list[dict[str, Any]] = [dict(layers_to_transform=None, layers_pattern=None)]
    indices = [layer_index(n) for n in names]
    if None not in indices:
        candidates.append(dict(layers_to_transform=sorted(set(indices)), layers_pattern=None))
    lists = [m["list"] for n in names if (m := re.match(r".*?(?:^|\.)(?P<list>[^.]+)\.\d+\.", n))]
    if len(lists) == len(names):
        pattern = [re.escape(p) for p in sorted(set(lists))]
        pattern = pattern[0] if len(pattern) == 1 else pattern
        indices = [layer_index(n, pattern) for n in names]
        if None not in indices:
            candidates.append(dict(layers_to_transform=sorted(set(indices)), layers_pattern=pattern))
    two = sorted({".".join(n.split(".")[-2:]) for n in names})  # ["attn.c_proj"]: not GPT-2's mlp.c_proj
    # the full names last: not a regex, which peft (0.21) turns into the short names it matches on a transformers 5
    # mixture of experts (its v4 -> v5 config conversion), so "layer 0's q_proj" would load as every layer's
    # peft's save_embedding_layers="auto" reads a list's elements: "embed_tokens" / "lm_head" must be one of them
    # exactly when such a module is adapted, as adapter_state_dict writes its base weight then
    embedding = any(_EMBEDDING_NAME_RE.fullmatch(n) for n in names)
    full = sorted(names)
    mixed = sorted({_short_name(n) if _EMBEDDING_NAME_RE.fullmatch(n) else n for n in names})  # "lm_head" + full
    for targets in (short, two, full, mixed):
        if any(e in targets for e in ("embed_tokens", "lm_head")) != embedding:
            continue
        for c in candidates[:1] if targets in (full, mixed) else candidates:
            chosen = set(match_target_modules(model, targets, modules_to_save=modules_to_save, **c)) & visible
            if chosen == set(names):
                return dict(target_modules=targets, **c)
    regex = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    return dict(target_modules=regex, layers_to_transform=None, layers_pattern=None)


def _save_names(model: nn.Module, adapter: str) -> list[str]:
    """Names of the modules to save that hold a copy for ``adapter``, in definition order."""
    return [n for n, w in _wrappers(model) if adapter in w.modules_to_save]


def _most_common(values: list[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _token_spec(model: nn.Module, adapter: str) -> list[int] | dict[str, list[int]] | None:
    """peft's ``trainable_token_indices`` for ``adapter``: a list when only the input embedding has rows (how users
    write it; peft applies a list there), else ``{full module name: ids}`` (peft matches a key as a name suffix)."""
    own = [(n, t) for n, t in _token_wrappers(model) if not t.tied and adapter in t.deltas]
    if not own:
        return None
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if len(own) == 1 and own[0][1] is emb:
        return list(own[0][1].token_indices[adapter])
    return {n: list(t.token_indices[adapter]) for n, t in own}


# peft task types and the transformers auto-class mappings whose classes they describe, most specific first
_TASK_MAPPINGS = (
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"),
)
# the tasks whose peft class changes what the adapter covers: PeftModelForSequenceClassification & co. add their
# head ("classifier", "score", "qa_outputs") to modules_to_save, which qkernels' "all-linear" gives LoRA (peft's
# all-linear skips it for these tasks only): peft then wraps a 4-bit head and fails ("only Tensors of floating point
# dtype can require gradients"), or trains a copy the file does not hold. Such a model's adapter gets no task_type.
_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def task_type_of(model: nn.Module) -> str | None:
    """peft's ``task_type`` for a transformers model class (``LlamaForCausalLM`` -> ``"CAUSAL_LM"``), else None.

    Read from transformers' auto-class mappings; None when transformers is not installed, the class is in none of
    them, or its task is a classification / question-answering head (``_HEAD_TASKS``: peft's class for it would
    add the head to the adapter's modules to save). ``PeftModel.from_pretrained`` then builds a plain ``PeftModel``,
    which computes the same outputs, and peft's ``AutoPeftModelFor...`` classes read ``auto_mapping`` instead."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return None
    cls = type(model).__name__
    for task, mapping_name in _TASK_MAPPINGS:
        for v in getattr(modeling_auto, mapping_name, {}).values():
            if cls == v or (isinstance(v, (tuple, list)) and cls in v):
                return None if task in _HEAD_TASKS else task
    return None


def _config_fields(model: nn.Module, infos: list[_ModuleAdapter], task_type: str | None,
                   base_model_name_or_path: str | None, modules_to_save: list[str] | None,
                   trainable_token_indices: list[int] | dict[str, list[int]] | None = None) -> dict[str, Any]:
    """The LoraConfig arguments describing ``infos``, with ``rank_pattern`` / ``alpha_pattern`` for the outliers."""
    if len({i.use_rslora for i in infos}) > 1:
        raise ValueError("modules mix rsLoRA and plain LoRA scaling in one adapter; peft's use_rslora is global")
    if len({i.use_dora for i in infos}) > 1:
        dora = [i.name for i in infos if i.use_dora][:3]
        raise ValueError(f"adapter mixes DoRA modules (e.g. {dora}) with plain LoRA ones; peft's use_dora is global "
                         "to an adapter: give every module of it use_dora=True (or none)")
    if len({i.lora_bias for i in infos}) > 1:
        some = [i.name for i in infos if i.lora_bias][:3]
        raise ValueError(f"adapter mixes modules with a lora_B bias (e.g. {some}) and modules without; peft's "
                         "lora_bias is global to an adapter: give every module of it lora_bias=True (or none)")
    if len({i.bias for i in infos}) > 1:
        raise ValueError(f"adapter's modules record different bias modes {sorted({i.bias for i in infos})}; peft's "
                         "bias is global to an adapter (qkernels.base_bias)")
    r, alpha = _most_common([i.r for i in infos]), _most_common([i.alpha for i in infos])
    # peft's get_pattern_key matches a pattern p as re.match(rf"(.*\.)?({p})$", module_name): an escaped full name
    # selects that module and every module whose name ends in "." + it (a top-level "up" also selects "layers.0.up");
    # then "^" anchors it: after the optional prefix "^" cannot match, so only the name itself is left.
    names = [i.name for i in infos]

    def key(name: str) -> str:
        return ("^" if any(n.endswith("." + name) for n in names) else "") + re.escape(name)

    rank_pattern = {key(i.name): i.r for i in infos if i.r != r}
    alpha_pattern = {key(i.name): i.alpha for i in infos if i.alpha != alpha}
    if base_model_name_or_path is None:
        cfg = getattr(model, "config", None)
        base_model_name_or_path = getattr(model, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or None
    return dict(
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        r=r,
        lora_alpha=alpha,
        lora_dropout=max(i.dropout for i in infos),  # dropout does not change a saved adapter's outputs
        use_rslora=infos[0].use_rslora,
        use_dora=infos[0].use_dora,
        lora_bias=infos[0].lora_bias,
        **_target_spec(model, [i.name for i in infos], modules_to_save),
        modules_to_save=modules_to_save,
        trainable_token_indices=trainable_token_indices,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias=infos[0].bias,
        # what peft writes for an adapter on GPT-2's Conv1D layers; it changes nothing but the direction of a merge
        # into a Conv1D weight (peft forces it off on nn.Linear and bitsandbytes layers), so True only when every
        # layer was one
        fan_in_fan_out=all(i.conv1d for i in infos),
        inference_mode=True,  # what PeftModel.save_pretrained writes
        # without a task type peft writes the model's class, which its AutoPeftModelFor... classes then build
        auto_mapping=None if task_type is not None else {"base_model_class": type(model).__name__,
                                                         "parent_library": type(model).__module__},
    )


def _config_json(fields: dict[str, Any]) -> str:
    """adapter_config.json text: ``peft.LoraConfig(**fields)`` serialized as peft does; the same keys without peft."""
    try:
        import peft
    except ImportError:
        peft = None
    if peft is not None:
        d = peft.LoraConfig(**fields).to_dict()
    else:  # the LoraConfig fields peft needs to rebuild this adapter; the others take their defaults when read
        d = dict(dict(use_dora=False, lora_bias=False), **fields, peft_type="LORA", init_lora_weights=True,
                 exclude_modules=None, revision=None)
    d = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}  # as PeftConfigMixin.save_pretrained
    return json.dumps(d, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------- save
def _saved(state_dict: dict[str, torch.Tensor] | None, key: str, t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the tensor to save for the model's state-dict key ``key``: ``state_dict[key]`` when a state dict
    is given (peft's ``save_pretrained(state_dict=...)``: e.g. gathered from FSDP's shards), else the module's ``t``."""
    if state_dict is not None:
        if key not in state_dict:
            raise ValueError(f"state_dict has no {key!r}: pass the model's state dict with this adapter's weights "
                             "(under FSDP: get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, "
                             "cpu_offload=True)) from torch.distributed.checkpoint.state_dict, on every rank)")
        t = state_dict[key]
    elif type(t).__name__ == "DTensor":  # FSDP2's shard: this rank's part only
        raise ValueError(f"{key!r} is sharded by FSDP (a DTensor): gather the adapter on every rank, sd = "
                         "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, "
                         "ignore_frozen_params=True)) (torch.distributed.checkpoint.state_dict), then on rank 0 "
                         "save_adapter(model, path, state_dict=sd)")
    return t.detach().to("cpu", copy=True).contiguous()


def adapter_state_dict(model: nn.Module, adapter_name: str = "default", *,
                       state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """peft's ``get_peft_model_state_dict`` for one adapter: ``base_model.model.<module>.lora_{A,B}.weight`` (a DoRA
    adapter also ``base_model.model.<module>.lora_magnitude_vector``, without ".weight" as peft writes it), and
    for each module to save with a copy for the adapter that copy's state dict as ``base_model.model.<module>.<key>``
    (e.g. ``base_model.model.score.weight``: the adapter name and ``modules_to_save`` removed, as peft does). An
    adapter with ``bias`` "all" / "lora_only" adds the base biases peft's ``_get_learnable_bias_state_dict`` selects,
    under its keys (``base_model.model.<module>.base_layer.bias`` for a LoRA layer; ``qkernels.base_bias``).

    ``state_dict``: the tensors by the model's own state-dict keys (``<module>.lora_A.<adapter>.weight``...), read
    instead of the modules' (as peft's ``get_peft_model_state_dict(model, state_dict)``): the full tensors gathered
    from FSDP's shards, whose modules hold one rank's part.

    Returns that dict (CPU copies) for adapter ``adapter_name`` of ``model``; raises ValueError if no module has it,
    or if ``state_dict`` lacks one of its tensors (or none is given and a tensor is an FSDP2 shard). A
    ``torch.compile(model)`` gives ``model``'s keys (``qkernels._compiled``); a compiled submodule put in the tree
    (its names hold ``_orig_mod``) is a ValueError: its keys would not be peft's.
    """
    from .embedding import QLoRAEmbedding

    model, state_dict = _uncompiled(model, state_dict)
    out = {}
    for name, m in _require_adapter(model, adapter_name):
        if isinstance(m, QLoRAEmbedding):  # peft's keys: <module>.lora_embedding_A / _B, no ".weight"
            if m._unloaded - {"weight"}:
                m._raise_unloaded()
            for which, suffix in EMBEDDING_KEYS.items():
                t = getattr(m, which)[adapter_name]
                out[f"{PEFT_PREFIX}{name}.{suffix}"] = t.detach().to("cpu", copy=True).contiguous()
            if m.is_dora(adapter_name):  # peft's DoraEmbeddingVariant: the same key as a Linear's magnitude
                t = m.lora_magnitude_vector[adapter_name].weight
                out[f"{PEFT_PREFIX}{name}.{MAGNITUDE_KEY}"] = t.detach().to("cpu", copy=True).contiguous()
            continue
        for which in ("lora_A", "lora_B", "lora_magnitude_vector")[:3 if m.is_dora(adapter_name) else 2]:
            if f"{which}.{adapter_name}.weight" in m._unloaded:  # meta, or to_empty memory: no values to save
                m._raise_unloaded()
            w = getattr(m, which)[adapter_name].weight
            key = f"{PEFT_PREFIX}{name}.{which}" + ("" if which == MAGNITUDE_KEY else ".weight")
            out[key] = _saved(state_dict, f"{name}.{which}.{adapter_name}.weight", w)
        if m.has_lora_bias(adapter_name):  # peft's key for lora_bias: <module>.lora_B.bias
            out[f"{PEFT_PREFIX}{name}.lora_B.bias"] = _saved(state_dict, f"{name}.lora_B.{adapter_name}.bias",
                                                             m.lora_B[adapter_name].bias)
    for name, w in _wrappers(model):
        if adapter_name in w._unloaded_copies:
            raise RuntimeError(f"the copy of module to save {name!r} for adapter {adapter_name!r} was never loaded "
                               "(made on the meta device): load the base checkpoint or the adapter before saving it")
        if adapter_name in w.modules_to_save:
            for k, v in w.modules_to_save[adapter_name].state_dict().items():
                out[f"{PEFT_PREFIX}{name}.{k}"] = _saved(state_dict, f"{name}.modules_to_save.{adapter_name}.{k}", v)
    for name, t in _token_wrappers(model):  # peft's TrainableTokensWrapper.adapter_state_dict: tied heads write none
        if not t.tied and adapter_name in t.deltas:
            out[f"{PEFT_PREFIX}{name}.{DELTA_KEY}"] = _saved(state_dict, f"{name}.{DELTA_KEY}.{adapter_name}",
                                                          t.deltas[adapter_name])
    out.update(_base_biases(model, adapter_name, state_dict))
    out.update(_embedding_base_weights(model, adapter_name, state_dict))
    return out


def _base_biases(model: nn.Module, adapter_name: str,
                 state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The base biases peft saves for an adapter with ``bias`` "all" / "lora_only" (``qkernels.base_bias``)."""
    mode = base_bias.adapter_modes(model).get(adapter_name, "none")
    if mode == "none":
        return {}
    others = [n for n in adapter_names(model) if n != adapter_name]
    keys = base_bias.file_keys(model, adapter_name, mode, others, None if state_dict is None else list(state_dict))
    tensors = dict(base_bias._state_bias_keys(model)) if state_dict is None else {}
    return {f"{PEFT_PREFIX}{k}": _saved(state_dict, qk, tensors.get(qk)) for k, qk in keys.items()}


def _uncompiled(model: nn.Module, state_dict: dict[str, torch.Tensor] | None
                ) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """The model (and its state dict) a file is written from: ``torch.compile``'s wrapper seen through, so that the
    keys are the uncompiled model's (peft loaded ``_orig_mod.`` keys as missing ones: the adapter silently lost).

    Raises:
        ValueError: a module with the adapter sits under a compiled submodule (``layers[0] = torch.compile(...)``):
            ``_orig_mod`` in the middle of its name, which peft's names do not have.
    """
    inner = unwrap_compiled(model)
    if inner is not model and state_dict is not None:
        state_dict = strip_compiled_prefix(state_dict)
    nested = next((n for n, _ in inner.named_modules() if ORIG_MOD in n.split(".")), None)
    if nested is not None:
        raise ValueError(f"module {nested!r} is inside a torch.compile wrapper put into the model (a submodule "
                         "replaced by torch.compile(submodule)): its adapter keys would hold '_orig_mod' and peft "
                         "would load none of them. Compile submodules in place with submodule.compile() (same "
                         "speed, names unchanged), or save from the uncompiled module")
    return inner, state_dict


def _embedding_base_weights(model: nn.Module, adapter_name: str,
                            state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """What peft's ``save_embedding_layers="auto"`` adds: when a module named ``embed_tokens`` / ``lm_head`` carries
    the adapter, the base weight (and bias) of the model's input / output embedding if it is a LoRA layer on a float
    base (any adapter's: peft checks for a base layer, not for this adapter), as ``<module>.base_layer.weight``. (A
    4-bit layer's base is the checkpoint's, never written.)"""
    layers = _require_adapter(model, adapter_name)
    if not any(_EMBEDDING_NAME_RE.fullmatch(n) for n, _ in layers):
        return {}
    embeddings = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        embeddings.append(get() if callable(get) else None)
    out = {}
    for name, m in _qlora_modules(model):
        if _is_lora_layer(m) and not m.quantized and any(m is e for e in embeddings):
            if "weight" in m._unloaded:
                m._raise_unloaded()
            out[f"{PEFT_PREFIX}{name}.base_layer.weight"] = _saved(state_dict, f"{name}.weight", m.weight)
            if m.bias is not None:
                out[f"{PEFT_PREFIX}{name}.base_layer.bias"] = _saved(state_dict, f"{name}.bias", m.bias)
    return out


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write adapter ``adapter_name`` to directory ``path`` in peft's format (created if needed).

    Files: ``adapter_config.json`` (a ``peft.LoraConfig``: r, lora_alpha, lora_dropout, use_rslora, target_modules
    as short names, with ``layers_to_transform`` / ``layers_pattern`` when the adapter covers only some layers (a
    regex of the full names when neither selects exactly its modules), ``modules_to_save`` (the full names of the
    modules to save holding a copy for this adapter), rank_pattern / alpha_pattern for modules whose rank / alpha
    differ from the most common, bias (the adapter's ``bias`` mode: "none", or "all" / "lora_only" with the base
    biases in the file, ``qkernels.base_bias``), inference_mode true, use_dora for a DoRA adapter) and
    ``adapter_model.safetensors`` (tensors in their parameter dtype; see ``adapter_state_dict``).
    ``task_type`` (e.g. ``"CAUSAL_LM"``; None: ``task_type_of(model)``, from the transformers model class, so that
    ``PeftModel.from_pretrained`` builds the task's class; none for a classification head, see ``task_type_of``;
    without one ``auto_mapping`` names the model's class, as peft writes it: either way peft's
    ``AutoPeftModelForCausalLM`` & co. read the directory) and ``base_model_name_or_path`` (None:
    ``model.config._name_or_path``) are written when given or known. ``state_dict``: the tensors to write by the
    model's state-dict keys, instead of the modules' (peft's ``save_pretrained(state_dict=...)``; see
    ``adapter_state_dict``): under FSDP, gather on every rank with torch's ``get_model_state_dict(model,
    options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))`` and save on rank 0
    with it.

    Raises:
        ValueError: ``model`` has no QLoRALinear, or no adapter ``adapter_name``; ``path`` is an existing file; the
            adapter is DoRA on some modules and plain LoRA on others (peft's ``use_dora`` is one flag).
    """
    from safetensors.torch import save_file

    model, state_dict = _uncompiled(model, state_dict)
    if os.path.isfile(path):  # was FileExistsError from makedirs, which reads as "the directory exists"
        raise ValueError(f"path {os.fspath(path)!r} is a file; save_adapter writes a directory (adapter_config.json "
                         "and adapter_model.safetensors): pass a directory path")
    mods = _require_adapter(model, adapter_name)
    infos = [_describe(n, m, adapter_name) for n, m in mods]
    task_type = task_type if task_type is not None else task_type_of(model)
    text = _config_json(_config_fields(model, infos, task_type, base_model_name_or_path,
                                       _save_names(model, adapter_name) or None, _token_spec(model, adapter_name)))
    tensors = adapter_state_dict(model, adapter_name, state_dict=state_dict)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(text)
    save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})  # peft's metadata


# ---------------------------------------------------------------------------------------------- load
def _read_config(path: str | os.PathLike) -> dict[str, Any]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path (str or os.PathLike), got {type(path).__name__}")
    if os.path.isfile(path):
        raise ValueError(f"path {os.fspath(path)!r} is a file; pass the adapter directory that holds it and "
                         f"{CONFIG_NAME}: {os.path.dirname(os.path.abspath(path))!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter directory {os.fspath(path)!r} does not exist. qkernels reads local "
                                "directories only: for a Hub adapter, download it first (e.g. "
                                "huggingface_hub.snapshot_download(repo_id)) and pass the local path")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: a peft adapter directory holds {CONFIG_NAME}")
    with open(cfg_path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e}); the file is truncated or corrupted") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object (a peft LoraConfig), got a {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters ('LORA') load")
    _check_variant_fields(cfg, cfg_path)
    for key, what in _UNSUPPORTED_IF_SET.items():
        if cfg.get(key):
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} ({what}) is not supported by qkernels' QLoRALinear, "
                             "which runs plain LoRA, DoRA (use_dora) and lora_bias adapters: run this adapter with "
                             "peft (or merge it into the base there with merge_and_unload), or train a plain LoRA / "
                             "DoRA adapter")
    if not isinstance(cfg.get("use_dora", False), bool):
        raise ValueError(f"{cfg_path}: use_dora must be true or false, got {cfg['use_dora']!r}")
    if not isinstance(cfg.get("lora_bias", False), bool):
        raise ValueError(f"{cfg_path}: lora_bias must be true or false, got {cfg['lora_bias']!r}")
    if cfg.get("lora_bias") and cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: lora_bias=true with use_dora=true, which peft refuses (\"The argument "
                         "lora_bias=True is not supported for DoRA\"): the file was not written by peft")
    try:  # "all" / "lora_only": the base biases peft trained, saved beside the LoRA weights (qkernels.base_bias)
        base_bias.check_bias(cfg.get("bias", "none"), "bias")
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    # fan_in_fan_out (peft sets it for GPT-2's Conv1D targets) is not checked: lora_A [r, in], lora_B [out, r] and
    # the LoRA forward are the same either way in peft (tuners/lora/layer.py); it only transposes B @ A when peft
    # merges into a Conv1D weight [in, out], and qkernels' merge_and_unload handles Conv1D layers itself
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
        raise ValueError(f"{cfg_path}: r must be a positive integer, got {cfg.get('r')!r}")
    from .model import _check_layer_args
    from .modules_to_save import check_modules_to_save

    try:
        _check_layer_args(cfg.get("target_modules"), cfg.get("layers_to_transform"), cfg.get("layers_pattern"))
        check_modules_to_save(cfg.get("modules_to_save"))
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    return cfg


def _read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    st, bn = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st)
        except SafetensorError as e:
            raise ValueError(f"{st} cannot be read ({e}); the file is truncated or corrupted") from None
    if os.path.isfile(bn):
        try:  # weights_only: a pickle that needs more than tensors is refused, never executed
            sd = torch.load(bn, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, EOFError, RuntimeError... depending on the damage
            raise ValueError(f"{bn} cannot be read as a torch pickle of tensors ({type(e).__name__}): it is corrupted "
                             "or holds other objects (not unpickled: that could run code); re-save the adapter as "
                             "safetensors") from None
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)] if isinstance(sd, dict) else None
        if bad is None or bad:
            raise ValueError(f"{bn} must hold a dict of tensors (peft's adapter state dict); "
                             f"{'got a ' + type(sd).__name__ if bad is None else f'entries {bad[:5]} are not tensors'}")
        return sd
    raise FileNotFoundError(f"neither {SAFETENSORS_NAME} nor {BIN_NAME} in {path}")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key`` + lookup: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for p, v in patterns.items():
        try:
            if re.match(rf"(.*\.)?({p})$", module):
                return v
        except re.error as e:
            raise ValueError(f"rank_pattern / alpha_pattern key {p!r} is not a valid regular expression ({e}); peft "
                             "matches each key as a regex against the end of the module name") from None
    return default


@dataclass
class _Planned:
    name: str
    module: nn.Module
    r: int
    alpha: float
    A: torch.Tensor
    B: torch.Tensor
    base: dict[str, torch.Tensor] | None = None  # a float base's "weight" / "bias" from the file (peft's embeddings)
    magnitude: torch.Tensor | None = None  # a DoRA adapter's lora_magnitude_vector [out_features]
    lora_B_bias: torch.Tensor | None = None  # lora_bias: lora_B's bias [out_features]


@dataclass
class _Plan:
    lora: list[_Planned]
    saved: dict[str, dict[str, torch.Tensor]]  # module to save -> its state dict from the file
    # trainable_token_indices: {module: (indices, tied source or None)} and the file's rows per untied module
    tokens: dict[str, tuple[list[int], str | None]] | None = None
    token_rows: dict[str, torch.Tensor] | None = None
    # the base biases from the file: (module, "bias", tensor) (qkernels.base_bias.plan_load)
    biases: list[tuple[nn.Module, str, torch.Tensor]] | None = None
    # float base weights of LoRA layers this adapter does not adapt: (module, {"weight": tensor}) (_plan)
    bases: list[tuple[nn.Module, dict[str, torch.Tensor]]] | None = None


def _config_targets(model: nn.Module, cfg: dict[str, Any]) -> set[str] | None:
    """The modules peft would give LoRA under the config (None: the config names no target_modules)."""
    from .model import match_target_modules

    if cfg.get("target_modules") is None:
        return None
    return set(match_target_modules(model, cfg["target_modules"], cfg.get("exclude_modules"),
                                    layers_to_transform=cfg.get("layers_to_transform"),
                                    layers_pattern=cfg.get("layers_pattern"),
                                    modules_to_save=cfg.get("modules_to_save")))


def _split_keys(model: nn.Module, cfg: dict[str, Any], sd: dict[str, torch.Tensor]
                ) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], dict[str, dict[str, torch.Tensor]],
                           list[tuple[str, str, torch.Tensor]]]:
    """File keys -> ``{module: {"lora_A"|"lora_B"|"base.weight": (key, tensor)}}``, ``{module to save: {key:
    tensor}}`` and the base biases ``[(key, key without the prefix, tensor)]`` (``<module>.base_layer.bias``, and
    under bias "all" any other ``<name>.bias``: ``qkernels.base_bias``)."""
    from .modules_to_save import match_modules_to_save

    save_names = match_modules_to_save(model, cfg.get("modules_to_save") or [])
    all_biases = cfg.get("bias", "none") == "all"
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    biases: list[tuple[str, str, torch.Tensor]] = []
    names_in_keys: dict[str | None, str] = {}  # adapter name segment (None: peft's file format) -> first key with it
    for key, t in sd.items():
        stripped = key.removeprefix(PEFT_PREFIX)
        owner = [n for n in save_names if stripped.startswith(n + ".")]
        if owner:  # the longest name: a module to save may not hold another (plan_modules_to_save)
            name = max(owner, key=len)
            sub = stripped[len(name) + 1:]
            if all_biases and sub.startswith(("original_module.", "modules_to_save.")) and sub.endswith("bias"):
                continue  # peft's "all" also writes the wrapper's own bias keys; its load takes <module>.bias
            saved.setdefault(name, {})[sub] = t
            continue
        delta = _DELTA_RE.match(stripped)
        if delta is not None:  # trainable tokens: checked against the config's trainable_token_indices in _plan
            pairs.setdefault(delta["module"], {})["tokens"] = (key, t)
            continue
        base = _BASE_KEY_RE.match(stripped)
        if base is not None and base["which"] == "bias":  # a LoRA layer's base bias: bias != "none", or an embedding's
            biases.append((key, stripped, t))
            continue
        if base is not None:  # a float base weight that peft saved with the adapter (save_embedding_layers)
            pairs.setdefault(base["module"], {})["base." + base["which"]] = (key, t)
            continue
        match = _KEY_RE.match(stripped) or _MAGNITUDE_RE.match(stripped) or _BIAS_RE.match(stripped)
        emb = _EMB_KEY_RE.match(stripped) if match is None else None
        if emb is not None and cfg.get("ensure_weight_tying"):
            # peft then also gives the tied lm_head a LoRA whose A, B are the embedding's B^T, A^T (lora/model.py:
            # 316-322), saved nowhere as such: loaded here, the head would run without it
            raise ValueError(
                f"adapter key {key!r} is LoRA on an embedding of an adapter saved with ensure_weight_tying=True, for "
                "which peft also runs the tied lm_head with that LoRA transposed; qkernels does not tie adapters. "
                "Train the adapter with LoraConfig(ensure_weight_tying=False) (peft's default: LoRA on the tied "
                "lm_head itself, which loads)"
            )
        if emb is not None:
            match = emb
            which = "lora_" + emb["which"]
        elif match is not None:
            which = match["which"] + (".bias" if stripped.endswith(".bias") else "")
        if match is None and all_biases and (stripped == "bias" or stripped.endswith(".bias")):
            biases.append((key, stripped, t))  # a base bias of a module without LoRA (peft's bias "all")
            continue
        if match is None:
            raise ValueError(
                f"adapter key {key!r} is not a LoRA weight '{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' "
                "nor LoRA on an embedding ('.lora_embedding_A' / '_B') nor a DoRA magnitude "
                "('.lora_magnitude_vector') nor a lora_bias ('.lora_B.bias') nor trainable tokens "
                "('.token_adapter.trainable_tokens_delta') nor a "
                "tensor of a module to save (the "
                f"config's modules_to_save={cfg.get('modules_to_save')!r} selects {save_names} here); other "
                "tensors are not supported"
            )
        names_in_keys.setdefault(match["adapter"], key)
        if len(names_in_keys) > 1:
            raise ValueError(
                f"adapter keys {sorted(names_in_keys.values())} disagree on the adapter name between lora_A/lora_B "
                "and weight; a file holds one adapter, in peft's format without the name (<module>.lora_A.weight)"
            )
        pairs.setdefault(match["module"], {})[which] = (key, t)
    return pairs, saved, biases


def _check_saved(model: nn.Module, cfg: dict[str, Any], saved: dict[str, dict[str, torch.Tensor]],
                 adapter_name: str, replace: bool) -> None:
    """Each module to save of the config has every state-dict key of the module, with its shape and dtype kind."""
    from .modules_to_save import ModulesToSaveWrapper, match_modules_to_save, plan_modules_to_save

    entries = cfg.get("modules_to_save") or []
    if not entries:
        return
    names = match_modules_to_save(model, entries)
    plan_modules_to_save(model, entries, adapter_name, allow_existing=replace)  # entries match; no LoRA, no nesting
    for n in names:
        m = model.get_submodule(n)
        ref = (m.original_module if isinstance(m, ModulesToSaveWrapper) else m).state_dict()
        got = saved.get(n, {})
        missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        if missing or extra:
            raise ValueError(
                f"module to save {n!r}: the adapter file has {sorted(got)}, the module's state dict has {sorted(ref)}"
                f" (missing {missing}, unexpected {extra}); a peft adapter stores every tensor of a module to save "
                f"as '{PEFT_PREFIX}{n}.<key>'"
            )
        for k, v in got.items():
            if tuple(v.shape) != tuple(ref[k].shape) or v.is_floating_point() != ref[k].is_floating_point():
                raise ValueError(f"adapter key '{PEFT_PREFIX}{n}.{k}': {tuple(v.shape)} {v.dtype} in the file, but "
                                 f"module {n!r} has {tuple(ref[k].shape)} {ref[k].dtype}")


def _plan(model: nn.Module, cfg: dict[str, Any], sd: dict[str, torch.Tensor], adapter_name: str = "default",
          replace: bool = False) -> _Plan:
    """Check every key of ``sd`` against ``model`` and ``cfg``; return what to load. Raises before any change."""
    cls = _qlora_class()
    modules = dict(model.named_modules())
    qlora_names = [n for n, m in modules.items() if isinstance(m, cls)]
    pairs, saved, bias_keys = _split_keys(model, cfg, sd)
    tokens, token_rows = _planned_tokens(model, cfg, pairs, adapter_name)
    if not pairs:
        raise ValueError("the adapter file holds no LoRA weights")
    _check_saved(model, cfg, saved, adapter_name, replace)
    targets = _config_targets(model, cfg)
    plan, bases = [], []
    r0, a0 = cfg["r"], cfg.get("lora_alpha", 8)
    for name, ab in pairs.items():
        m = modules.get(name)
        if all(k.startswith("base.") for k in ab) and (targets is None or name not in targets):
            # peft's save_embedding_layers writes the base weight of the model's input and output embeddings when
            # they are LoRA layers, also into the file of an adapter that does not adapt them (another adapter of the
            # saving model did). peft's load puts it into that module's base layer if the module is a LoRA layer
            # then, and drops the key otherwise (strict=False); so do we
            if isinstance(m, cls) and _is_lora_layer(m):
                bases.append((m, _planned_base(name, m, ab)))
            continue
        if m is not None and targets is not None and name not in targets:
            fields = {k: cfg.get(k) for k in ("target_modules", "exclude_modules", "layers_to_transform",
                                              "layers_pattern", "modules_to_save") if cfg.get(k) is not None}
            raise ValueError(
                f"adapter key {next(iter(ab.values()))[0]!r}: module {name!r} is not selected by the adapter's config "
                f"{fields} (peft would not load it there); the config and the weights disagree"
            )
        if not isinstance(m, cls):  # _add_lora_layers gave every Linear / Conv1D / Embedding of the file a LoRA layer
            what = ("does not exist" if m is None else f"is a {type(m).__name__}, which takes no LoRA here (nn.Linear, "
                    "transformers' Conv1D, nn.Embedding and bitsandbytes' Linear4bit do)")
            shown = qlora_names[:12] + (["..."] if len(qlora_names) > 12 else [])
            from .checkpoint import _renamer

            converted = m is None and _renamer(model)(f"{name}.weight")[1] is not None
            why = "" if not converted else (
                "; transformers 5 stores it merged into a 3-D parameter (a mixture of experts' per-expert Linear "
                "layers of transformers 4), which peft adapts as target_parameters (LoRA on nn.Parameter) and "
                "qkernels does not: run this adapter with peft, or train one on the other layers")
            raise ValueError(
                f"adapter key {next(iter(ab.values()))[0]!r}: module {name!r} {what} in {type(model).__name__}"
                f"{why}; its {len(qlora_names)} QLoRA modules are {shown}"
            )
        _check_kind(name, m, ab, bool(cfg.get("use_dora", False)))
        magnitude = _planned_magnitude(name, m, ab, bool(cfg.get("use_dora", False)))
        lora_B_bias = _planned_lora_bias(name, m, ab, bool(cfg.get("lora_bias", False)))
        base = _planned_base(name, m, ab)
        r = _pattern_value(cfg.get("rank_pattern") or {}, name, r0)
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, a0)
        (ka, A), (kb, B) = ab["lora_A"], ab["lora_B"]
        for key, t, want in ((ka, A, (r, m.in_features)), (kb, B, (m.out_features, r))):
            if tuple(t.shape) != want:
                raise ValueError(
                    f"adapter key {key!r}: shape {tuple(t.shape)} in the file, but module {name!r} "
                    f"(in_features={m.in_features}, out_features={m.out_features}) with the config's r={r} "
                    f"needs {want}"
                )
            if not t.is_floating_point():
                raise ValueError(f"adapter key {key!r}: dtype {t.dtype} is not a floating-point type")
        plan.append(_Planned(name, m, int(r), alpha, A, B, base, magnitude, lora_B_bias))
    uncovered = sorted(n for n in targets or () if n not in pairs and isinstance(modules.get(n), cls))
    if uncovered:  # as peft's "Found missing adapter keys while loading the checkpoint"
        warnings.warn(
            f"adapter {adapter_name!r}: its config selects {len(uncovered)} LoRA module(s) of {type(model).__name__} "
            f"that the file holds no weights for (e.g. {uncovered[:4]}); they get no adapter {adapter_name!r}, which "
            "computes what peft does with them (it warns of missing adapter keys and leaves their B at zero). Was the "
            "adapter saved for another model (fewer layers?), or is the file incomplete?", UserWarning, stacklevel=3)
    return _Plan(plan, saved, tokens, token_rows, base_bias.plan_load(model, bias_keys), bases)


def _planned_tokens(model: nn.Module, cfg: dict[str, Any], pairs: dict[str, dict[str, tuple[str, torch.Tensor]]],
                    adapter_name: str) -> tuple[dict[str, tuple[list[int], str | None]], dict[str, torch.Tensor]]:
    """Take the trainable-token rows out of ``pairs``; check them against the config's ``trainable_token_indices``
    (``qkernels.trainable_tokens.plan_trainable_tokens``): one ``[len(indices), embedding_dim]`` float tensor per
    wrapped embedding (a tied head has none), none without the config field."""
    from .trainable_tokens import plan_trainable_tokens

    found = {n: ab.pop("tokens") for n, ab in list(pairs.items()) if "tokens" in ab}
    for n in [n for n, ab in pairs.items() if not ab]:
        del pairs[n]
    spec = cfg.get("trainable_token_indices")
    if spec is None:
        if found:
            key = next(iter(found.values()))[0]
            raise ValueError(f"adapter key {key!r} holds trainable tokens, but the config has no "
                             "trainable_token_indices: the config and the weights disagree")
        return {}, {}
    plan = plan_trainable_tokens(model, spec, adapter_name, cfg.get("modules_to_save"),
                                 arg="adapter config trainable_token_indices")
    lora = [n for n in plan if n in pairs]
    if lora:
        raise ValueError(f"adapter config trainable_token_indices selects {lora[0]!r}, which the file also gives LoRA; "
                         "peft refuses trainable tokens on a LoRA embedding, so peft did not write this file")
    rows = {}
    for n, (indices, source) in plan.items():
        if source is not None:
            continue
        if n not in found:
            raise ValueError(f"module {n!r}: the config's trainable_token_indices selects it but the adapter has no "
                             f"rows for it ({PEFT_PREFIX}{n}.{DELTA_KEY})")
        key, t = found.pop(n)
        m = model.get_submodule(n)
        dim = (m.base_layer if hasattr(m, "token_adapter") else m).embedding_dim
        if tuple(t.shape) != (len(indices), dim) or not t.is_floating_point():
            raise ValueError(f"adapter key {key!r}: {tuple(t.shape)} {t.dtype} in the file, but module {n!r} with the "
                             f"config's {len(indices)} token indices needs a float ({len(indices)}, {dim})")
        rows[n] = t
    if found:
        key = next(iter(found.values()))[0]
        raise ValueError(f"adapter key {key!r}: trainable tokens for a module that the config's "
                         f"trainable_token_indices={spec!r} does not select here")
    return plan, rows


def _check_kind(name: str, m: nn.Module, ab: dict[str, tuple[str, torch.Tensor]], use_dora: bool) -> None:
    """The file's LoRA keys for module ``name`` are of its kind: ``lora_embedding_A`` / ``_B`` for an embedding
    (``QLoRAEmbedding``), ``lora_A.weight`` / ``lora_B.weight`` for a linear layer, both present (a DoRA magnitude,
    ``<module>.lora_magnitude_vector``, is checked by ``_planned_magnitude``)."""
    from .embedding import QLoRAEmbedding

    emb = isinstance(m, QLoRAEmbedding)
    for which in ("lora_A", "lora_B"):
        want = f"{name}.{EMBEDDING_KEYS[which]}" if emb else f"{name}.{which}.weight"
        if which not in ab:
            raise ValueError(f"module {name!r}: the adapter has no {which} weight ({want})")
        key = ab[which][0]
        if (".lora_embedding_" in key) != emb:
            what = "an nn.Embedding (QLoRAEmbedding)" if emb else f"a {type(m).__name__}"
            raise ValueError(f"adapter key {key!r}: module {name!r} is {what} here, whose LoRA key is {want!r}; the "
                             "adapter was trained on a model where that module is of another kind")


def _planned_magnitude(name: str, m: nn.Module, ab: dict[str, tuple[str, torch.Tensor]],
                       use_dora: bool) -> torch.Tensor | None:
    """The DoRA magnitude of module ``name`` from the file: present, ``[out_features]`` and float when the config says
    ``use_dora``, absent otherwise (peft would neither write nor read it on a plain adapter)."""
    key = f"{PEFT_PREFIX}{name}.{MAGNITUDE_KEY}"
    if not use_dora:
        if "lora_magnitude_vector" in ab:
            raise ValueError(f"adapter key {ab['lora_magnitude_vector'][0]!r} is a DoRA magnitude, but the config has "
                             "use_dora false: the config and the weights disagree (set use_dora to true if the adapter "
                             "was trained with DoRA)")
        return None
    if "lora_magnitude_vector" not in ab:
        raise ValueError(f"module {name!r}: the config has use_dora true but the adapter has no DoRA magnitude "
                         f"{key!r}; a peft DoRA adapter saves one per module")
    k, t = ab["lora_magnitude_vector"]
    if tuple(t.shape) != (m.out_features,) or not t.is_floating_point():
        raise ValueError(f"adapter key {k!r}: DoRA magnitude {tuple(t.shape)} {t.dtype} in the file, but module "
                         f"{name!r} (out_features={m.out_features}) needs a float ({m.out_features},)")
    return t


def _planned_lora_bias(name: str, m: nn.Module, ab: dict[str, tuple[str, torch.Tensor]],
                       lora_bias: bool) -> torch.Tensor | None:
    """The ``lora_B`` bias of module ``name`` from the file (``<module>.lora_B.bias``): a float ``[out_features]`` when
    the config says ``lora_bias``, absent otherwise; never on an embedding (peft's lora.Embedding refuses it)."""
    from .embedding import QLoRAEmbedding

    key = f"{PEFT_PREFIX}{name}.lora_B.bias"
    if lora_bias and isinstance(m, QLoRAEmbedding):
        raise ValueError(f"module {name!r}: the config has lora_bias true, which peft's lora.Embedding refuses "
                         "(\"lora_bias=True is not supported for Embedding\"); the file was not written by peft")
    if not lora_bias:
        if "lora_B.bias" in ab:
            raise ValueError(f"adapter key {ab['lora_B.bias'][0]!r} is a lora_B bias, but the config has lora_bias "
                             "false: the config and the weights disagree (set lora_bias to true if the adapter was "
                             "trained with it)")
        return None
    if "lora_B.bias" not in ab:
        raise ValueError(f"module {name!r}: the config has lora_bias true but the adapter has no lora_B bias {key!r}; "
                         "a peft lora_bias adapter saves one per module")
    k, t = ab["lora_B.bias"]
    if tuple(t.shape) != (m.out_features,) or not t.is_floating_point():
        raise ValueError(f"adapter key {k!r}: lora_B bias {tuple(t.shape)} {t.dtype} in the file, but module "
                         f"{name!r} (out_features={m.out_features}) needs a float ({m.out_features},)")
    return t


def _planned_base(name: str, m: nn.Module, ab: dict[str, tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The base ``weight`` / ``bias`` peft saved for module ``name`` (``<name>.base_layer.*``), checked for ``m``."""
    base = {k.removeprefix("base."): kt for k, kt in ab.items() if k.startswith("base.")}
    if not base:
        return {}
    key = base[next(iter(base))][0]
    if m.quantized:
        raise ValueError(
            f"adapter key {key!r}: peft saved the float base weight of {name!r} with the adapter (its "
            "save_embedding_layers, when lm_head / embed_tokens is targeted), but here that layer is 4-bit. peft keeps "
            f"it float on a model loaded in 4 bits: load the model so (transformers never quantizes lm_head) before "
            f"apply_qlora, or pass apply_qlora(..., keep_float_modules=[{name.rpartition('.')[2]!r}])")
    from .embedding import QLoRAEmbedding

    w_shape = tuple(m.weight.shape) if isinstance(m, QLoRAEmbedding) else (m.out_features, m.in_features)
    want = {"weight": w_shape, "bias": None if m.bias is None else (m.out_features,)}
    out = {}
    for which, (k, t) in base.items():
        if want[which] is None or tuple(t.shape) != want[which] or not t.is_floating_point():
            have = "no bias" if want[which] is None else f"{want[which]} float"
            raise ValueError(f"adapter key {k!r}: {tuple(t.shape)} {t.dtype} in the file, but module {name!r}'s base "
                             f"{which} is {have}")
        out[which] = t
    return out


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    replace: bool = False,
    set_active: bool = True,
) -> list[str]:
    """Load a peft LoRA adapter directory into ``model`` as ``adapter_name``, as ``PeftModel.from_pretrained`` does.

    The file's LoRA weights go into the model's QLoRALinear / QLoRAEmbedding modules (``apply_qlora``'s). A module
    the file adapts that has no LoRA layer yet gets one first, as peft gives it one: a bitsandbytes ``Linear4bit`` (a
    model transformers loaded in 4 bits) is wrapped as it is (its packed bytes, no requantization), a float
    ``nn.Linear`` / ``Conv1D`` gets LoRA beside its float weight (nothing is quantized: call ``apply_qlora`` first
    for that), an ``nn.Embedding`` peft's embedding LoRA. So ``load_adapter`` works on a model with no QLoRA layer
    at all, and then freezes every parameter but the adapter's, as ``apply_qlora`` does. Should the load fail, those
    modules are put back as they were.

    ``path``: a local adapter directory (what ``save_adapter`` or ``PeftModel.save_pretrained`` wrote; download a
    Hub adapter first). It holds ``adapter_config.json`` and ``adapter_model.safetensors`` (else peft's older
    ``adapter_model.bin``, read with ``torch.load(weights_only=True)``). Per module the
    rank and alpha are the config's ``r`` / ``lora_alpha`` unless ``rank_pattern`` / ``alpha_pattern`` match it
    (peft's rule); scaling is ``alpha / r`` or ``alpha / sqrt(r)`` with ``use_rslora``. Keys may also carry the
    adapter name (``<module>.lora_A.<name>.weight``, as in a live PeftModel's state dict; one name per file).
    ``init_lora_weights`` does not matter (the file's A, B replace the init), except the inits for which peft
    modifies the base weight ("pissa...", "corda", "olora"): those are refused, as are config fields that
    qkernels does not know (a newer peft) when set.

    The config's ``target_modules`` / ``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern`` are
    honoured as peft does: every LoRA key must name a module they select; a LoRA module they select that the file
    has no weights for (an adapter of a shallower model) gets no adapter, with a ``UserWarning`` naming it (peft warns
    of missing adapter keys and leaves its B at zero: the same outputs). ``modules_to_save``: each selected module
    (peft's suffix rule) gets a copy for ``adapter_name`` holding the file's tensors
    (``base_model.model.<module>.<key>``, all of the module's state-dict keys), wrapped in a
    ``ModulesToSaveWrapper`` if it is not one yet. ``<module>.base_layer.weight`` / ``.bias`` (peft's
    ``save_embedding_layers`` writes them when ``lm_head`` / ``embed_tokens`` is targeted) are copied into that
    module's float base, as peft loads them into its base layer: the base is shared, so every adapter of the model
    sees the new weight. A 4-bit module refuses them (its float weight is gone).

    Everything is validated before the model changes: a key naming no QLoRALinear (the error lists the modules
    that exist) or a module the config does not select, an A without its B, a shape that is not
    ``[r, in_features]`` / ``[out_features, r]``, a module to save whose tensors are missing or misshapen, an
    unsupported config (Megatron, layer replication, ...) each raise ``ValueError`` and load nothing. A DoRA adapter
    (``use_dora: true``) needs one magnitude per module (``<module>.lora_magnitude_vector``, peft's key, or with
    ``.weight``), a float ``[out_features]``: missing, misshapen, or present without ``use_dora`` is such an error;
    likewise a ``lora_bias`` adapter's ``<module>.lora_B.bias`` (float ``[out_features]``, with ``lora_bias: true``
    only). ``trainable_token_indices`` (``qkernels.trainable_tokens``) wraps the embedding(s) it names, with a tied
    head, and loads ``<embedding>.token_adapter.trainable_tokens_delta`` (``[len(indices), embedding_dim]``) into them.
    ``bias`` "all" / "lora_only" (peft trained the base biases; ``qkernels.base_bias``): the file's biases
    (``<module>.base_layer.bias``, and under "all" ``<name>.bias`` of any module) are copied into the model's, which
    every adapter shares, as peft loads them (a misshapen one is such an error; one naming no bias of the model is
    skipped with a ``UserWarning``, as peft drops it); when the loaded adapter is the model's only one, its mode sets
    which base biases train (as ``PeftModel.from_pretrained``); a second adapter with a mode other than "none" is a
    ``ValueError`` (peft allows one).

    ``replace``: if ``adapter_name`` already exists, delete it first (otherwise that is an error).
    ``set_active``: make the loaded adapter active (``PeftModel.from_pretrained`` does; ``load_adapter`` in peft
    does not — pass ``False`` for that; a LoRA layer added at this load then follows the model's active adapter, so
    the outputs do not change). Returns the module names loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist, or lacks ``adapter_config.json`` or both weight files.
        TypeError: ``path`` is not a str / ``os.PathLike``.
        ValueError: ``path`` is a file, the adapter exists (without ``replace``), or the files do not fit the model
            (see above); the model is unchanged then.
    """
    model = unwrap_compiled(model)  # the uncompiled model's names (qkernels._compiled)
    cfg = _read_config(path)
    qlora = [m for m in model.modules() if isinstance(m, _qlora_class())]  # none: a model peft's way (below)
    existing = bool(qlora) and adapter_name in adapter_names(model)
    if existing and not replace:
        n = sum(adapter_name in m.lora_A for _, m in _qlora_modules(model))
        raise ValueError(
            f"adapter {adapter_name!r} already exists on {n} modules; choose another adapter_name, "
            "delete it first, or pass replace=True"
        )
    base_bias.check_single(model, adapter_name, cfg.get("bias", "none"), replacing=existing)
    sd = _read_weights(path)
    active = next((_selected(m) for m in qlora if _is_lora_layer(m)), None)  # peft's model-level active adapter
    flags = _existing_flags(model)
    added, undo = _add_lora_layers(model, cfg, sd)
    try:
        whole = _plan(model, cfg, sd, adapter_name, replace)
        if existing:
            delete_adapter(model, adapter_name, _keep_layers=False)  # a fresh load: no layer kept for "lora_only"
        _apply_plan(model, cfg, whole, adapter_name)
    except BaseException:
        undo()
        raise
    _restore_flags(flags)  # peft: every parameter present before keeps its flag (a module to save wrapped now too)
    if not set_active:  # as peft: a LoRA layer added now follows the model's active adapter, which it may lack
        for n in added:
            _activate(model.get_submodule(n), active)
    if set_active:
        set_adapter(model, adapter_name)
    if adapter_names(model) == [adapter_name]:  # the only adapter: its bias mode picks the trainable biases, as
        base_bias.mark_trainable(model)  # PeftModel.from_pretrained; beside others the flags stay, as its load_adapter
    return [p.name for p in whole.lora]


def _add_lora_layers(model: nn.Module, cfg: dict[str, Any], sd: dict[str, torch.Tensor]
                     ) -> tuple[list[str], Callable[[], None]]:
    """Give the modules the file adapts that have no LoRA layer yet one, as ``PeftModel.from_pretrained`` does, with
    ``apply_qlora`` on exactly those modules: a bitsandbytes ``Linear4bit`` (a model transformers loaded in 4 bits)
    wrapped as it is, a float ``nn.Linear`` / ``Conv1D`` with LoRA on its float weight (no quantization: peft adds
    a float LoRA layer there), an ``nn.Embedding`` peft's embedding LoRA. Only modules the adapter's config selects
    (the others are ``_plan``'s error). In a model that has LoRA layers already every parameter keeps its
    ``requires_grad``; in one without, all but LoRA are frozen (``apply_qlora``'s rule). Returns the modules given a
    layer and a function that puts the model back as it was (the original modules, every parameter's
    ``requires_grad``, transformers' ``is_quantized`` flags)."""
    from .model import _is_bnb_4bit, _is_linear, _replace, apply_qlora, is_embedding

    cls = _qlora_class()
    modules = dict(model.named_modules())
    targets = _config_targets(model, cfg)
    pairs, _, _ = _split_keys(model, cfg, sd)
    names = [n for n, ab in pairs.items()
             if ("lora_A" in ab or "lora_B" in ab) and n in modules and not isinstance(modules[n], cls)
             and (targets is None or n in targets) and (_is_linear(modules[n]) or is_embedding(modules[n]))]
    if not names:
        return [], lambda: None
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    had_lora = any(isinstance(m, cls) for m in modules.values())
    quantized = {m: m.__dict__["is_quantized"] for m in model.modules() if "is_quantized" in m.__dict__}
    originals = {n: modules[n] for n in names}
    float_names = [n for n in names if not _is_bnb_4bit(modules[n]) and not is_embedding(modules[n])]

    def restore_flags() -> None:
        params = dict(model.named_parameters())
        for n, flag in flags.items():
            if n in params:
                params[n].requires_grad_(flag)

    def undo() -> None:
        for n, m in originals.items():
            _replace(model, n, m)
        restore_flags()
        for m, flag in quantized.items():
            m.is_quantized = flag

    tmp = "__qkernels_load__"
    try:
        with warnings.catch_warnings():  # a base without a bias etc.: the adapter's own warnings come at load
            warnings.simplefilter("ignore", UserWarning)
            # a plain placeholder adapter, deleted below: the file's own (DoRA, lora_bias, ...) comes in _apply_plan
            apply_qlora(model, "^(?:" + "|".join(re.escape(n) for n in names) + ")$", r=1,
                        init_lora_weights=False, keep_float_modules=float_names or None, adapter_name=tmp,
                        verbose=False)
        for n in names:
            model.get_submodule(n).delete_adapter(tmp)
        if had_lora:  # a model with adapters keeps its parameters' flags (peft's load_adapter leaves them)
            restore_flags()
    except BaseException:
        undo()
        raise
    logging.getLogger("qkernels").info("load_adapter: added LoRA layers to %d modules the adapter adapts (%s)",
                                       len(names), ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""))
    return names, undo


def _apply_plan(model: nn.Module, cfg: dict[str, Any], whole: _Plan, adapter_name: str) -> None:
    """Create and fill the adapter's LoRA weights and module-to-save copies; on any error undo all of it."""
    from .modules_to_save import ModulesToSaveWrapper, wrap_modules_to_save
    from .trainable_tokens import TrainableTokensWrapper, add_trainable_tokens

    dropout, rslora = float(cfg.get("lora_dropout", 0.0)), bool(cfg.get("use_rslora", False))
    dora = bool(cfg.get("use_dora", False))
    done: list[_Planned] = []
    originals = {n: model.get_submodule(n) for n in whole.saved}
    bases: list[tuple[nn.Module, str, nn.Parameter, torch.Tensor]] = []  # (module, name, Parameter, old value)
    try:
        for p in whole.lora:
            # init False: the file's A, B replace any init; a DoRA adapter's initial magnitude (one dequantization and
            # row norm per module) is replaced by the file's too
            with warnings.catch_warnings():  # a base without a bias: peft warns at load too; loading is what was asked
                warnings.simplefilter("ignore", UserWarning)
                _add_to_module(p.module, adapter_name, p.r, p.alpha, dropout, rslora, False, dora,
                               p.lora_B_bias is not None, cfg.get("bias", "none"))
            done.append(p)
            with torch.no_grad():
                for which, t in (("lora_A", p.A), ("lora_B", p.B), ("lora_magnitude_vector", p.magnitude),
                                 ("lora_B.bias", p.lora_B_bias)):
                    if t is not None:
                        p.module.set_lora_weight(adapter_name, which, t)
        for module, base in [(p.module, p.base) for p in whole.lora] + list(whole.bases or ()):
            with torch.no_grad():
                for which, t in (base or {}).items():  # peft loads these into its base layer: so do we
                    param = getattr(module, which)
                    bases.append((module, which, param, param.detach().clone()))
                    if param.is_meta:
                        setattr(module, which, nn.Parameter(t.to(param.dtype, copy=True), requires_grad=False))
                        module._unloaded = module._unloaded - {which}
                    else:
                        param.copy_(t)
        with torch.no_grad():
            for module, which, t in whole.biases or ():  # the base biases peft trained (shared by every adapter)
                param = base_bias.bias_tensor(module)
                bases.append((module, which, param, param.detach().clone()))
                param.copy_(t)
        if whole.saved:
            wrap_modules_to_save(model, cfg["modules_to_save"], adapter_name, activate=False)
            for n, tensors in whole.saved.items():
                model.get_submodule(n).load_copy(adapter_name, tensors)
        if whole.tokens:
            originals.update({n: model.get_submodule(n) for n in whole.tokens})
            add_trainable_tokens(model, whole.tokens, adapter_name, activate=False)
            with torch.no_grad():
                for n, t in whole.token_rows.items():
                    model.get_submodule(n).deltas[adapter_name].copy_(t)
    except Exception:
        for p in done:  # leave no half-loaded adapter behind
            p.module.delete_adapter(adapter_name)
        with torch.no_grad():
            for module, which, param, old in bases[::-1]:
                if param.is_meta:
                    setattr(module, which, param)
                    module._track_meta()
                else:
                    param.copy_(old)
        for n, orig in originals.items():
            now = model.get_submodule(n)
            if isinstance(orig, (ModulesToSaveWrapper, TrainableTokensWrapper)):
                if isinstance(orig, TrainableTokensWrapper) or adapter_name in orig.modules_to_save:
                    orig.delete_adapter(adapter_name)
            elif now is not orig:
                parent, _, leaf = n.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, orig)
        raise
