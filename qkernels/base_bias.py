"""peft's ``LoraConfig(bias=...)``: the base model's biases trained beside an adapter.

Not to be confused with ``lora_bias`` (a bias on each ``lora_B``, ``qkernels.nn``). Here the *frozen model's own*
biases train, as peft 0.21 does it (peft/tuners/tuners_utils.py ``_mark_only_adapters_as_trainable``,
``_get_learnable_bias_state_dict``; peft/utils/save_and_load.py):

- ``"none"``: no bias trains (the default);
- ``"all"``: every parameter named ``bias`` of the model (LayerNorms, heads and untargeted Linears included), except
  those of the LoRA weights and inside a module to save, which manage their own;
- ``"lora_only"``: the biases of the LoRA layers, i.e. of the ``QLoRALinear`` layers holding an adapter or emptied by
  ``delete_adapter`` (peft's LoRA layers: every layer an adapter targeted, kept when its adapters are deleted; an
  ``nn.Embedding`` has no bias).

When: as peft, the selection is applied when a model gets its first adapter (peft's ``get_peft_model`` /
``PeftModel.from_pretrained``): ``apply_qlora``, and ``add_adapter`` / ``load_adapter`` when the new adapter is the
model's only one (e.g. ``load_adapter(..., replace=True)`` of the adapter ``apply_qlora`` made); ``"none"`` then
freezes every base bias. Beside other adapters, ``add_adapter`` / ``load_adapter`` leave every bias's flag as it is
(peft 0.21's ``inject_adapter`` restores the flags of all parameters already present), and so do ``set_adapter``,
``disable_adapters`` and ``delete_adapter``. A base bias is one tensor shared by every adapter, not part of an
adapter: its trained values stay when adapters are switched, disabled or deleted, so disabling adapters does not give
the base model's outputs (peft warns; so does qkernels). As peft, at most one adapter of a model may have a mode other
than "none".

Each adapter layer records its adapters' modes in ``config_bias`` (``{adapter: mode}``; absent: "none"), so the mode
travels with the layer as ``r`` and ``lora_alpha`` do and ``save_adapter`` writes it into ``adapter_config.json``.

On disk (``save_adapter`` / ``load_adapter``) the biases are peft's keys: a LoRA layer's bias as
``base_model.model.<module>.base_layer.bias``, any other as ``base_model.model.<name>`` (its state-dict key); under
"all" peft also writes a module to save's ``original_module.bias`` and ``modules_to_save.bias`` (its copy's bias with
the adapter name removed), which qkernels writes too and ignores when loading (the copy's own ``<module>.bias`` is
what loads, as in peft).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

BIAS_MODES = ("none", "all", "lora_only")
_LORA_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B", "lora_dropout",
               "token_adapter")


def check_bias(bias: object, arg: str = "bias") -> str:
    """``bias`` if it is one of peft's values, else ValueError naming ``arg`` and the values allowed."""
    if not isinstance(bias, str) or bias not in BIAS_MODES:
        raise ValueError(f"{arg} must be one of {list(BIAS_MODES)} (peft's LoraConfig.bias: which of the base "
                         f"model's biases train beside the adapter), got {bias!r}")
    return bias


def layer_mode(m: nn.Module, adapter: str) -> str:
    """The mode recorded for ``adapter`` on adapter layer ``m`` ("none" when none is)."""
    return getattr(m, "config_bias", {}).get(adapter, "none")


def record(m: nn.Module, adapter: str, mode: str) -> None:
    """Record ``mode`` for ``adapter`` on adapter layer ``m`` (``forget`` removes it)."""
    m.config_bias = {**getattr(m, "config_bias", {}), adapter: mode}


def forget(m: nn.Module, adapter: str) -> None:
    m.config_bias = {k: v for k, v in getattr(m, "config_bias", {}).items() if k != adapter}


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .adapters import _qlora_class

    cls = _qlora_class()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def adapter_modes(model: nn.Module) -> dict[str, str]:
    """``{adapter: mode}`` for every adapter with a LoRA layer in ``model``."""
    out: dict[str, str] = {}
    for _, m in _layers(model):
        for a in m.lora_A:
            mode = layer_mode(m, a)
            if out.get(a, "none") == "none":
                out[a] = mode
    return out


def check_single(model: nn.Module, adapter: str, mode: str, replacing: bool = False) -> None:
    """peft's rule (``BaseTuner._check_new_adapter_config``): at most one adapter per model has a bias mode other than
    "none". ValueError naming the other adapter, before any change; ``replacing``: ``adapter`` itself is replaced."""
    if mode == "none":
        return
    others = {a: m for a, m in adapter_modes(model).items() if m != "none" and not (replacing and a == adapter)}
    if others:
        a, m = next(iter(others.items()))
        raise ValueError(f"adapter {adapter!r} has bias={mode!r}, and adapter {a!r} already has bias={m!r}: a model "
                         "supports only 1 adapter with bias (peft: \"LoraModel supports only 1 adapter with bias. When "
                         "using multiple adapters, set bias to 'none' for all adapters.\"); delete that adapter "
                         "or pass bias='none'")


def _excluded_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes whose biases the modes never touch: modules to save (the wrapper sets its copies' flags)."""
    from .modules_to_save import wrapper_modules

    return tuple(f"{n}." for n, _ in wrapper_modules(model))


def _is_lora_name(name: str) -> bool:
    return any(p in _LORA_PARTS for p in name.split("."))


def base_biases(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """``(bias name, owner module name, Parameter)`` for every base bias: a parameter named ``bias`` outside the LoRA
    weights and the modules to save, each Parameter once (``named_modules`` order)."""
    skip = _excluded_prefixes(model)
    seen: set[int] = set()
    for mname, m in model.named_modules():
        p = m._parameters.get("bias")
        if p is None or id(p) in seen:
            continue
        name = f"{mname}.bias" if mname else "bias"
        if _is_lora_name(mname) or name.startswith(skip):
            continue
        seen.add(id(p))
        yield name, mname, p


def _lora_layer_names(model: nn.Module) -> set[str]:
    """peft's LoRA layers (its tuner layers): the adapter layers holding an adapter, and those whose adapters
    ``delete_adapter`` removed (peft keeps such a layer, and its bias counts for "lora_only":
    ``_mark_only_adapters_as_trainable``, ``_get_learnable_bias_state_dict``). A layer ``apply_qlora`` made whose
    adapter ``load_adapter(replace=True)`` dropped is none: peft, loading the file afresh, would not have made it."""
    return {n for n, m in _layers(model) if len(m.lora_A) or getattr(m, "_emptied_by_delete", False)}


def selected(model: nn.Module, mode: str) -> set[str]:
    """The names of the base biases ``mode`` trains."""
    if mode == "none":
        return set()
    lora = _lora_layer_names(model) if mode == "lora_only" else None
    return {n for n, owner, _ in base_biases(model) if lora is None or owner in lora}


def mark_trainable(model: nn.Module) -> None:
    """peft's ``_mark_only_adapters_as_trainable`` for the biases: the base biases that the active adapters' modes
    select train, every other base bias is frozen (run for a model's first adapter, as in peft)."""
    active = {m.active_adapter for _, m in _layers(model)} - {None}
    modes = adapter_modes(model)
    want: set[str] = set()
    for a in active:
        want |= selected(model, modes.get(a, "none"))
    for name, _, p in base_biases(model):
        if p.is_floating_point():
            p.requires_grad_(name in want)


def warn_if_disabled_with_bias(model: nn.Module) -> None:
    """peft's warning in ``disable_adapter_layers``: trained base biases stay, so the outputs are not the base's."""
    active = {m.active_adapter for _, m in _layers(model)} - {None}
    modes = adapter_modes(model)
    for a in sorted(active):
        if modes.get(a, "none") != "none":
            warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{modes[a]}' does not "
                          "produce the same output as the base model would without adaption (adapter "
                          f"{a!r} trained the base biases, which are shared and stay; peft warns the same)",
                          UserWarning, stacklevel=4)


# ---------------------------------------------------------------------------------------------- files
def _peft_name_removed(key: str, adapter: str) -> str:
    """peft's ``_remove_adapter_name_from_state_dict_key`` (tuners_utils.py): the adapter name taken out of a key."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter}"):
        return key.removesuffix(f".{adapter}")
    head, _, suffix = key.rpartition(".")
    head = re.sub(re.escape(f".{adapter}") + r"$", "", head)
    return f"{head}.{suffix}"


def _state_bias_keys(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every state-dict key of ``model`` whose last part is ``bias`` (parameters and persistent buffers), with its
    tensor: what peft's ``"all"`` selects from ``model.state_dict()``."""
    for mname, m in model.named_modules():
        pre = f"{mname}." if mname else ""
        p = m._parameters.get("bias")
        if p is not None:
            yield pre + "bias", p
        b = m._buffers.get("bias")
        if b is not None and "bias" not in m._non_persistent_buffers_set:
            yield pre + "bias", b


def file_keys(model: nn.Module, adapter: str, mode: str, others: list[str],
              state_keys: list[str] | None = None) -> dict[str, str]:
    """``{file key without "base_model.model.": model state-dict key}`` of the biases peft's ``save_pretrained``
    writes for ``adapter`` under ``mode`` (``_get_learnable_bias_state_dict``, after its filter of the ``others``
    adapters' keys and its removal of the adapter name). ``state_keys``: the keys of a given state dict (FSDP's
    gathered one), else the model's own. A LoRA layer's ``bias`` is peft's ``<module>.base_layer.bias``."""
    if mode == "none":
        return {}
    lora = _lora_layer_names(model)
    keys = state_keys if state_keys is not None else [k for k, _ in _state_bias_keys(model)]
    out = {}
    for k in keys:
        if not (k == "bias" or k.endswith(".bias")):
            continue
        owner = k.removesuffix("bias").removesuffix(".")
        if mode == "lora_only" and owner not in lora:
            continue
        peft_key = (f"{owner}.base_layer.bias" if owner else "base_layer.bias") if owner in lora else k
        full = "base_model.model." + peft_key  # peft filters its model's keys, which carry this prefix
        if any(f".{o}." in full or full.endswith(f".{o}") for o in others):
            continue
        out[_peft_name_removed(peft_key, adapter)] = k
    return out


def plan_load(model: nn.Module, entries: list[tuple[str, str, torch.Tensor]]
              ) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Where each bias of an adapter file goes, checked before anything changes: ``entries`` are ``(file key, key
    without "base_model.model.", tensor)``; returns ``(module, "bias", tensor)`` to copy into ``module``'s bias.

    ``<module>.base_layer.bias`` goes to an adapter layer's bias; any other ``<name>.bias`` (bias "all") to the
    model's tensor of that state-dict key. A key naming nothing of the model is skipped with one ``UserWarning``
    listing them: peft loads with ``strict=False`` and drops such keys too (a ``base_layer.bias`` of a module that is
    no LoRA layer here: peft's own fresh load drops it the same way).

    Raises:
        ValueError: a shape or dtype that does not fit (naming the key, as peft's load fails on a size mismatch), a
            bias for a module without one, or a bias on the meta device (load the base checkpoint first: it would
            overwrite the adapter's biases).
    """
    from .adapters import _qlora_class

    cls = _qlora_class()
    modules = dict(model.named_modules())
    out, dropped = [], []
    for key, stripped, t in entries:
        base = stripped.endswith("base_layer.bias")
        owner = stripped.removesuffix("base_layer.bias" if base else "bias").removesuffix(".")
        m = modules.get(owner)
        if m is None or (base and not isinstance(m, cls)):
            dropped.append(key)
            continue
        cur = m._parameters.get("bias")
        if cur is None and "bias" not in m._non_persistent_buffers_set:
            cur = m._buffers.get("bias")
        if cur is None:
            if base:
                raise ValueError(f"adapter key {key!r}: module {owner!r} has no bias here; the adapter was trained on "
                                 "a model whose layer has one")
            dropped.append(key)
            continue
        if tuple(t.shape) != tuple(cur.shape) or not t.is_floating_point():
            raise ValueError(f"adapter key {key!r}: {tuple(t.shape)} {t.dtype} in the file, but the model's bias of "
                             f"{owner or type(model).__name__!r} is {tuple(cur.shape)} {cur.dtype}")
        if cur.is_meta:
            raise ValueError(f"adapter key {key!r}: the model's bias of {owner!r} is on the meta device; the adapter "
                             "trained the base biases (bias != 'none'), which a base checkpoint loaded afterwards "
                             "would overwrite: load the base checkpoint first, then the adapter")
        out.append((m, "bias", t))
    if dropped:
        warnings.warn(f"{len(dropped)} bias key(s) of the adapter name no bias of {type(model).__name__} (e.g. "
                      f"{dropped[:3]}) and are not loaded, as peft's load (strict=False) drops them", UserWarning,
                      stacklevel=4)
    return out


def bias_tensor(m: nn.Module) -> torch.Tensor:
    """The bias tensor of ``m`` that ``plan_load`` chose (a parameter, else a persistent buffer)."""
    p = m._parameters.get("bias")
    return p if p is not None else m._buffers["bias"]
