"""Load a safetensors checkpoint (a transformers 4-bit one, qkernels' own) into a model after ``apply_qlora``, reading
its keys as transformers' ``from_pretrained`` does.

``model.load_state_dict(load_file(path), assign=True)`` is enough for a model whose checkpoint keys are its own
state-dict keys. transformers 5 models are not all like that: ``save_pretrained`` writes the checkpoint's original
names, which ``from_pretrained`` renames at load (GPT-NeoX's ``embed_out`` is the model's ``lm_head``:
``transformers.conversion_mapping``), and it leaves out tied weights (Bloom's ``lm_head``, BART's ``embed_tokens``),
which ``tie_weights()`` restores. ``load_checkpoint`` does both, shard by shard, and reports (or raises for) only what
is really missing or unexpected. Checkpoint tensors that transformers converts at load, not just renames (a mixture
of experts' per-expert weights merged into one 3-D parameter), go through a copy of transformers' own
``WeightConverter``, fed as ``from_pretrained`` feeds it (``_Conversions``).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ._compiled import unwrap_compiled

__all__ = ["load_checkpoint"]

logger = logging.getLogger("qkernels")


def _files(checkpoint: Path) -> list[Path]:
    """A ``.safetensors`` file, or a directory's shards (those its index names) or its ``*.safetensors`` files."""
    if checkpoint.is_file():
        return [checkpoint]
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist (a directory holding model.safetensors "
                                "or shards with model.safetensors.index.json, or one .safetensors file)")
    from .convert import _source_files

    return _source_files(checkpoint, "checkpoint")  # the same shard listing as quantize_checkpoint reads


def _keys(f: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(f, framework="pt", device="cpu") as sf:
        return list(sf.keys())  # noqa: SIM118 - safe_open is not a dict


def _transforms(model: nn.Module) -> tuple[list[Any], list[Any]] | None:
    """transformers' conversion mapping for ``model``: ``(renamings, WeightConverters)``; None for a model that is not
    a transformers one, or without transformers / its conversion mappings (4.x: keys are the model's own)."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if not isinstance(t, WeightConverter)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _natural(key: str) -> tuple:
    """transformers' ``dot_natural_key``: ``experts.10`` after ``experts.9``, the order a converter stacks them in."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in key.split("."))


class _Conversions:
    """The checkpoint tensors transformers converts at load (a mixture of experts' per-expert weights, merged into one
    3-D parameter), converted as ``from_pretrained`` converts them: each target's sources are gathered across shards
    and handed, in transformers' key order, to a copy of its ``WeightConverter`` once the last one is read, so at most
    the targets a shard leaves incomplete wait in memory."""

    def __init__(self, model: nn.Module, groups: dict[str, list[tuple[str, str]]]) -> None:
        converters = (_transforms(model) or ([], []))[1]
        self.model, self.by_pattern = model, {p: t for t in converters for p in t.source_patterns}
        self.need = {target: {k for k, _ in srcs} for target, srcs in groups.items()}
        self.pattern = {k: p for srcs in groups.values() for k, p in srcs}
        self.target = {k: target for target, srcs in groups.items() for k, _ in srcs}
        self.got: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Take checkpoint tensor ``key``; returns the model tensors its target's conversion made (``{}`` until the
        target's last source arrives)."""
        target = self.target[key]
        have = self.got.setdefault(target, {})
        have[key] = tensor
        if set(have) != self.need[target]:
            return {}
        del self.got[target]
        conv = copy.deepcopy(self.by_pattern[self.pattern[key]])
        for k in sorted(have, key=_natural):
            conv.add_tensor(target, k, self.pattern[k], have[k])
        out = conv.convert(target, model=self.model, config=getattr(self.model, "config", None))
        return {name: (t[0] if isinstance(t, list) else t) for name, t in out.items()}


def _renamer(model: nn.Module) -> Callable[[str], tuple[str, str | None]]:
    """``key -> (model key, the pattern of a transformers converter that would change the tensor, or None)``: the
    renamings transformers' ``from_pretrained`` applies to this model's checkpoint keys (its conversion mapping, and
    adding / removing ``base_model_prefix``). The identity for a model that is not a transformers one."""
    transforms = _transforms(model)
    if transforms is None:
        return lambda k: (k, None)
    from transformers.core_model_loading import rename_source_key

    renamings, converters = transforms
    own = dict.fromkeys(model.state_dict(), True)
    prefix = getattr(model, "base_model_prefix", None) or None
    return lambda k: rename_source_key(k, renamings, converters, prefix, own)


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """The names of each Parameter the model holds under several names (a head tied to the embeddings)."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return [names for names in by_id.values() if len(names) > 1]


def _retie(model: nn.Module, tied: list[list[str]], loaded: set[str]) -> None:
    """Tie again what the model tied before loading: ``assign=True`` gives the name the checkpoint holds a new
    Parameter, and a checkpoint saves a shared weight once (safetensors' ``save_model``, transformers), so the other
    names would keep the old (meta) one. A model without ``tie_weights`` (nanoGPT's ``wte.weight = lm_head.weight``)
    had no other way back; a transformers model's ``tie_weights()`` runs after this."""
    for names in tied:
        got = [n for n in names if n in loaded]
        if not got:
            continue
        param = model.get_parameter(got[0])
        for n in names:
            if n not in loaded:
                owner, _, leaf = n.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, leaf, param)


def _tie_towards_loaded(model: nn.Module, loaded: dict[str, torch.Tensor]) -> None:
    """Undo a ``tie_weights()`` that pointed a loaded key at a Parameter the checkpoint did not fill: transformers
    ties ``lm_head.weight`` to the input embedding's, and a checkpoint that saved the shared weight under the head's
    name (safetensors' ``save_model`` keeps one name of a shared tensor, here the head's) left the embedding on meta,
    which ``tie_weights()`` then gave the head too: both meta, no key reported missing, and the forward failed on
    "Tensor on device meta is not on the expected device cpu". ``from_pretrained`` ties such a checkpoint towards the
    loaded weight; so does this: every name of that meta Parameter gets the loaded one."""
    state = model.state_dict(keep_vars=True)
    for key, value in loaded.items():
        now = state.get(key)
        if not isinstance(now, nn.Parameter) or not now.is_meta or value.is_meta or now is value:
            continue
        for name, t in state.items():
            if t is now:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, leaf, value)
        state = model.state_dict(keep_vars=True)


# a 4-bit weight's quant-state key in bitsandbytes' format: what is left of the key is the layer's name
_QUANT_STATE_KEY = re.compile(r"\.weight\.quant_state\.bitsandbytes__(?:nf4|fp4)$")


def _check_4bit_layers_targeted(model: nn.Module, packed: set[str], checkpoint: str | os.PathLike) -> None:
    """Refuse, before anything loads, a checkpoint whose 4-bit layers are plain float Linear layers in ``model``
    (``apply_qlora`` did not target them): ``load_state_dict`` would fail on a size mismatch (the packed
    ``[n/2, 1]`` weight against ``[out, in]``) after loading the other tensors, and name neither cause nor fix."""
    from .model import _is_bnb_layer, _is_linear  # QLoRALinear is no nn.Linear; a bitsandbytes Linear4bit is one

    plain = []
    for name in sorted(packed):
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue  # not a module of this model: reported as unexpected keys
        if _is_linear(m) and not _is_bnb_layer(m):
            plain.append(name)
    if plain:
        short = sorted({n.rpartition(".")[2] for n in plain})
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} holds {len(plain)} layers in 4 bits that are plain "
            f"{type(model.get_submodule(plain[0])).__name__} layers in the model, not QLoRALinear (e.g. "
            f"{plain[:3]}): apply_qlora did not target them, so their packed weights cannot load. Give "
            f"apply_qlora every 4-bit layer of the checkpoint, e.g. apply_qlora(model, 'all-linear', ...) or add "
            f"{short} to target_modules; nothing was loaded")


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike, *, strict: bool = True,
                    verbose: bool | None = None) -> _IncompatibleKeys:
    """Load ``checkpoint`` into ``model`` in place, shard by shard (``load_state_dict(shard, assign=True,
    strict=False)``), with the key names transformers' ``from_pretrained`` would use; then the Parameters the model
    shared before loading (a tied head) are shared again, and ``model.tie_weights()`` runs where the model has it.

    For a model built on the meta device and given ``apply_qlora`` (README): each ``QLoRALinear`` takes the
    checkpoint's 4-bit format, and LoRA weights the checkpoint lacks are initialized. Tensors transformers converts
    at load (a mixture of experts' per-expert weights) are converted by its own converters, as ``from_pretrained``
    does. Peak memory: one shard, plus the converted tensors whose sources a shard leaves incomplete.

    Args:
        model: the model (e.g. ``AutoModelForCausalLM.from_config(config)`` under ``init_empty_weights``, then
            ``apply_qlora``).
        checkpoint: a directory with ``model.safetensors`` or shards named by ``model.safetensors.index.json``, or one
            ``.safetensors`` file.
        strict: raise if a model tensor got no value (not in the checkpoint and not tied to one that is) or a
            checkpoint key matches nothing.
        verbose: print ``"load_checkpoint: shard i/n loaded (t s)"`` to stderr after each shard (always logged to the
            ``qkernels`` logger at INFO). None (default): print only for a sharded checkpoint (two files or more: a
            big model, whose shards take minutes to read).

    Returns:
        ``(missing_keys, unexpected_keys)`` as ``load_state_dict`` returns them, tied keys left out of the missing.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: 4-bit checkpoint tensors that transformers would convert at load (a mixture of experts'
            per-expert weights stored in 4 bits: no converter merges packed bytes); or 4-bit layers of the
            checkpoint that are plain Linear layers in ``model`` (not targeted by ``apply_qlora``), named with the
            ``target_modules`` to add; nothing is loaded then.
        RuntimeError: ``strict`` and keys missing or unexpected (the tensors found were loaded).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = unwrap_compiled(model)  # torch.compile(model): the checkpoint's keys are the uncompiled model's
    from safetensors.torch import load_file

    files = _files(Path(checkpoint))
    rename = _renamer(model)
    groups: dict[str, list[tuple[str, str]]] = {}  # converted: model key -> its checkpoint (key, source pattern)s
    packed: set[str] = set()  # the 4-bit layers, by model name
    packed_keys: set[str] = set()  # their weights, by checkpoint key
    own = model.state_dict(keep_vars=True)
    for f in files:
        for k in _keys(f):
            key, pattern = rename(k)
            if pattern is not None and key in own:  # (a converted key the model lacks is reported unexpected)
                groups.setdefault(key, []).append((k, pattern))
            if _QUANT_STATE_KEY.search(key):
                packed.add(_QUANT_STATE_KEY.sub("", key))
            if _QUANT_STATE_KEY.search(k):
                packed_keys.add(_QUANT_STATE_KEY.sub(".weight", k))
    quantized = sorted(k for srcs in groups.values() for k, _ in srcs if k in packed_keys)
    if quantized:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r}: {len(quantized)} tensors that transformers merges at load are 4-bit "
            f"(e.g. {quantized[:2]}: {type(model).__name__} stores them merged, e.g. a mixture of experts' 3-D "
            "expert weights, which stay float in a 4-bit model); merging packed 4-bit tensors is not supported. "
            "Write the checkpoint again from the float model (qkernels.quantize_checkpoint or transformers' "
            "BitsAndBytesConfig leave the experts float); nothing was loaded")
    _check_4bit_layers_targeted(model, packed, checkpoint)
    conversions = _Conversions(model, groups)
    missing: set[str] | None = None
    unexpected: list[str] = []
    loaded: set[str] = set()
    tied = _tied_groups(model)
    before = own  # the Parameters now: one replaced by a tie below is not missing
    show = verbose if verbose is not None else len(files) > 1
    t0 = time.perf_counter()
    for i, f in enumerate(files, 1):
        sd = {}
        for k, v in load_file(f).items():
            key, pattern = rename(k)
            if pattern is not None and key in groups:
                sd.update(conversions.add(k, v))
            else:
                sd[key] = v
        result = model.load_state_dict(sd, strict=False, assign=True)
        unexpected += result.unexpected_keys
        loaded |= set(sd) - set(result.unexpected_keys)
        missing = set(result.missing_keys) if missing is None else missing & set(result.missing_keys)
        line = f"load_checkpoint: shard {i}/{len(files)} loaded ({f.name}, {time.perf_counter() - t0:.1f} s)"
        logger.info(line)
        if show:
            print(line, file=sys.stderr, flush=True)
    _retie(model, tied, loaded)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        got = model.state_dict(keep_vars=True)
        tie()
        _tie_towards_loaded(model, {k: got[k] for k in loaded if k in got})
    state = model.state_dict(keep_vars=True)
    filled = {id(state[k]) for k in loaded if k in state}
    still = sorted(k for k in missing or () if isinstance(state.get(k), torch.Tensor) and id(state[k]) not in filled
                   and not (isinstance(state[k], nn.Parameter) and state[k] is not before.get(k)
                            and not state[k].is_meta))
    if strict and (still or unexpected):
        raise RuntimeError(f"load_checkpoint({str(checkpoint)!r}) into {type(model).__name__}: missing keys "
                           f"{still[:8]}{' ...' if len(still) > 8 else ''} (neither in the checkpoint nor tied to a "
                           f"key that is), unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; "
                           "pass strict=False to keep what was loaded")
    return _IncompatibleKeys(still, unexpected)
