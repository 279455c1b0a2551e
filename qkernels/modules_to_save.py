"""peft's ``modules_to_save``: named non-LoRA modules (a classifier head, ``score``, a norm) trained in full.

Each such module is replaced by a ``ModulesToSaveWrapper`` holding the frozen ``original_module`` and one trainable
copy per adapter in ``modules_to_save`` (an ``nn.ModuleDict`` keyed by adapter name): the layout, state-dict keys
(``<name>.original_module.weight``, ``<name>.modules_to_save.<adapter>.weight``) and behaviour of peft's wrapper of
the same name:

- the active adapter's copy runs and trains; with no active copy (the adapter has none here) or with adapters
  disabled, the original module runs (frozen);
- ``set_adapter(name)``: that adapter's copy becomes active and trainable, the others frozen; a wrapper without a
  copy for ``name`` falls back to its original module;
- ``delete_adapter(name)``: drops that copy.

Attributes the wrapper does not have are read from the module that runs (``model.score.weight`` is the active copy's
weight), as in peft. Matching is peft's (``_set_trainable``): an entry ``e`` selects every module whose full name
ends with ``e`` (a plain string suffix, no ``.`` required).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["ModulesToSaveWrapper", "wrap_modules_to_save"]


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full per adapter: frozen ``original_module`` + ``modules_to_save[adapter]`` copies.

    Args:
        module: the module to wrap (any ``nn.Module`` but a ``QLoRALinear`` or another wrapper).
        adapter_name: the first adapter; it gets a copy of ``module`` and becomes active (trainable).
    """

    # adapters whose copy holds no value: made from a meta original (a model built on the meta device, wrapped before
    # its checkpoint is loaded). Class-level default: a wrapper pickled by an older qkernels has none.
    _unloaded_copies: frozenset[str] = frozenset()

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        from .nn import QLoRALinear

        if isinstance(module, (ModulesToSaveWrapper, QLoRALinear)):
            raise ValueError(f"cannot wrap a {type(module).__name__} as a module to save; modules_to_save names "
                             "plain modules (e.g. a classifier head), not LoRA layers")
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        module.requires_grad_(False)
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    def update(self, adapter_name: str) -> None:
        """Add a copy of ``original_module`` for ``adapter_name``, frozen (``set_adapter`` activates it).

        Raises ValueError if ``adapter_name`` is not a non-empty str without '.', or already has a copy."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty str without '.', got {adapter_name!r}")
        if adapter_name in self.modules_to_save:
            raise ValueError(f"adapter {adapter_name!r} already has a copy of this module to save")
        new = copy.deepcopy(self.original_module)
        new.requires_grad_(False)
        self.modules_to_save[adapter_name] = new
        if any(t.is_meta for t in new.state_dict().values()):
            self._unloaded_copies = self._unloaded_copies | {adapter_name}

    def load_copy(self, adapter_name: str, tensors: dict[str, Any]) -> None:
        """Load ``adapter_name``'s copy from ``tensors`` (its state dict, strict). A copy made on the meta device takes
        the tensors themselves (``assign``: copying into meta is a no-op) and counts as loaded from then on, so a base
        checkpoint loaded later does not overwrite it."""
        copy_ = self.modules_to_save[adapter_name]
        copy_.load_state_dict(tensors, strict=True,
                              assign=any(t.is_meta for t in copy_.state_dict().values()))
        self._unloaded_copies = self._unloaded_copies - {adapter_name}

    def set_adapter(self, adapter_name: str | None) -> None:
        """Run and train ``adapter_name``'s copy; freeze the others. An adapter without a copy here (or None): the
        frozen original module runs, as peft's wrapper does."""
        for m in self.modules_to_save.values():
            m.requires_grad_(False)
        if adapter_name is not None and adapter_name in self.modules_to_save:
            self.modules_to_save[adapter_name].requires_grad_(True)
            self.active_adapter = adapter_name
        else:
            self.active_adapter = None

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s copy; if it was active, the original module runs until ``set_adapter``.

        Raises ValueError if there is no copy for ``adapter_name``."""
        if adapter_name not in self.modules_to_save:
            raise ValueError(f"no adapter named {adapter_name!r}; this module has {list(self.modules_to_save)}")
        del self.modules_to_save[adapter_name]
        self._unloaded_copies = self._unloaded_copies - {adapter_name}
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def enable_adapters(self, enabled: bool) -> None:
        """peft's toggle: ``enabled=False`` runs the original module, ``True`` the active copy again."""
        self.disable_adapters = not enabled

    @property
    def active_adapters(self) -> list[str]:
        """peft's list of the adapters that run: ``[active_adapter]``, or ``[]`` when none is set."""
        return [] if self.active_adapter is None else [self.active_adapter]

    def running_module(self) -> nn.Module:
        """Returns the module ``forward`` calls now: the active copy, else (none active, or adapters disabled) the
        original."""
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Returns ``running_module()(*args, **kwargs)``: the wrapped module's own output.

        ``adapter_names`` (a keyword, peft's mixed batch): one adapter per sample, each sample run by that adapter's
        copy (the original module for ``"__base__"`` or an adapter without a copy; ``qkernels.mixed_batch``).

        Raises RuntimeError if the active copy was made on the meta device and never loaded."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            from .mixed_batch import wrapper_mixed_batch

            return wrapper_mixed_batch(self, args, kwargs, adapter_names)
        if self.active_adapter in self._unloaded_copies and not self.disable_adapters:
            copy_ = self.modules_to_save[self.active_adapter]
            if not any(t.is_meta for t in copy_.state_dict().values()):  # assigned directly (accelerate's loaders)
                self._unloaded_copies = self._unloaded_copies - {self.active_adapter}
            else:
                raise RuntimeError(
                    f"the copy of this module to save for adapter {self.active_adapter!r} was never loaded: it was "
                    "made from a module on the meta device. Load a checkpoint that holds the module (its base "
                    "weights, e.g. 'lm_head.weight', give the copies their starting value) with "
                    "load_state_dict(sd, assign=True) or qkernels.load_checkpoint (accelerate's loaders skip a base "
                    "checkpoint's 'lm_head.weight': the wrapper's keys are original_module.* and modules_to_save.*)")
        return self.running_module()(*args, **kwargs)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        """Also read the base checkpoint's keys of the wrapped module (``<name>.weight``, as the model had before
        wrapping: a transformers or bitsandbytes checkpoint) into ``original_module``, and into each copy that holds
        no value yet (wrapped on the meta device: as a copy made after loading would start); a copy that has values
        keeps them and is not reported missing (as a QLoRALinear's LoRA weights with a base-only checkpoint). A
        copy's own keys (``modules_to_save.<adapter>.*``) win. The children load after this, from the same dict."""
        own = list(self.original_module.state_dict(keep_vars=True))
        base = {k: state_dict.pop(prefix + k) for k in own if prefix + k in state_dict}
        for k, v in base.items():
            state_dict.setdefault(f"{prefix}original_module.{k}", v)
            for name, copy_ in self.modules_to_save.items():
                # an unloaded copy gets a clone: training it must not move the original (assign=True would share);
                # a loaded one its own tensor (a no-op load, the same Parameter under assign=True)
                v_copy = v.clone() if name in self._unloaded_copies else copy_.state_dict(keep_vars=True)[k]
                state_dict.setdefault(f"{prefix}modules_to_save.{name}.{k}", v_copy)
        assign = local_metadata.get("assign_to_params_buffers", False)  # a meta copy takes a value only so
        loaded = {name for name in self._unloaded_copies
                  if all(f"{prefix}modules_to_save.{name}.{k}" in state_dict for k in own)
                  and (assign or not any(t.is_meta for t in self.modules_to_save[name].state_dict().values()))}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._unloaded_copies = self._unloaded_copies - loaded

    def __setattr__(self, name: str, value: Any) -> None:
        """``nn.Module``'s, plus: a tensor assigned to a parameter name of the wrapped module (transformers'
        ``tie_weights()`` sets a tied head's ``weight`` to the input embedding's) goes to ``original_module``, the
        frozen base that the tie is about, and to each copy that holds no value yet (a clone, as a copy made after
        loading would start). nn.Module's own ``__setattr__`` raised ``KeyError: "attribute 'weight' already
        exists"`` there (the name reads through ``__getattr__``). Copies with values keep them: they train apart."""
        orig = self.__dict__.get("_modules", {}).get("original_module")
        if (orig is None or not isinstance(value, torch.Tensor) or name in self.__dict__.get("_parameters", {})
                or name not in orig._parameters):
            super().__setattr__(name, value)
            return
        setattr(orig, name, value)
        if value.is_meta:
            return
        for adapter in sorted(self._unloaded_copies):
            copy_ = self.modules_to_save[adapter]
            old = copy_._parameters.get(name)
            if old is not None and old.is_meta:
                setattr(copy_, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
            if not any(t.is_meta for t in copy_.state_dict().values()):
                self._unloaded_copies = self._unloaded_copies - {adapter}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules of the wrapper itself
        except AttributeError:
            if "original_module" not in self.__dict__.get("_modules", {}):
                raise
        return getattr(self.running_module(), name)


def wrapper_modules(model: nn.Module) -> list[tuple[str, ModulesToSaveWrapper]]:
    """``(name, wrapper)`` for every ``ModulesToSaveWrapper`` in ``model``, in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def check_modules_to_save(modules_to_save: Any, arg: str = "modules_to_save") -> list[str] | None:
    """``None`` or a list of non-empty str (a bare str is one name, as peft reads it after ``[...]``)."""
    if modules_to_save is None:
        return None
    if isinstance(modules_to_save, str):
        raise ValueError(f"{arg} must be a list of module names, e.g. ['score'], got the str {modules_to_save!r}")
    names = list(modules_to_save)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{arg} must be a list of non-empty module names, got {modules_to_save!r}")
    return names


def match_modules_to_save(model: nn.Module, modules_to_save: Iterable[str]) -> list[str]:
    """Names selected by peft's rule: ``name.endswith(entry)`` for some entry; the inside of a wrapper (its
    ``original_module`` and copies) is not searched, the wrapper itself is."""
    entries = list(modules_to_save)
    inside = tuple(f"{n}." for n, _ in wrapper_modules(model))
    return [n for n, _ in model.named_modules()
            if n and not n.startswith(inside) and any(n.endswith(e) for e in entries)]


def plan_modules_to_save(model: nn.Module, modules_to_save: Iterable[str], adapter_name: str,
                         allow_existing: bool = False) -> list[str]:
    """Validate and return the module names ``wrap_modules_to_save`` would give a copy for ``adapter_name``.

    Raises ``ValueError`` (nothing changed) for an entry that selects no module (listing the model's top-level and
    leaf names), a selected ``QLoRALinear`` or a module inside one, a module inside another selected module, or a
    module that already has a copy for ``adapter_name`` (unless ``allow_existing``: it is about to be replaced)."""
    from .nn import QLoRALinear

    entries = list(modules_to_save)
    names = match_modules_to_save(model, entries)
    for e in entries:
        if not any(n.endswith(e) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
            raise ValueError(f"modules_to_save entry {e!r} matches no module of {type(model).__name__} (peft's "
                             f"rule: a module whose full name ends with it); module names end with: {leaves[:40]}"
                             f"{' ...' if len(leaves) > 40 else ''}")
    modules = dict(model.named_modules())
    qlora = tuple(f"{n}." for n, m in modules.items() if isinstance(m, QLoRALinear))
    for n in names:
        m = modules[n]
        if isinstance(m, QLoRALinear) or n.startswith(qlora):
            raise ValueError(f"modules_to_save selects {n!r}, a LoRA layer or part of one; a module is either a LoRA "
                             "target or a module to save (exclude it from target_modules)")
        outer = [o for o in names if n.startswith(o + ".")]
        if outer:
            raise ValueError(f"modules_to_save selects both {outer[0]!r} and {n!r} inside it; name only the outer one")
        if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save and not allow_existing:
            raise ValueError(f"module {n!r} already has a copy for adapter {adapter_name!r}")
        packed = [k for k, p in m.named_parameters()
                  if type(p).__name__ in ("Params4bit", "Int8Params") or not p.is_floating_point()]
        if packed and not isinstance(m, ModulesToSaveWrapper):
            # its copy would be trained in full: torch refuses requires_grad on integer weights, and a float
            # quant_storage view would be "trained" as floats, its packed bytes destroyed
            raise ValueError(f"modules_to_save selects {n!r} ({type(m).__name__}), whose parameter(s) {packed} are "
                             "quantized (packed, not float): it cannot be trained in full. Keep it in float when "
                             f"loading (BitsAndBytesConfig(llm_int8_skip_modules=[{n.rsplit('.', 1)[-1]!r}])), or "
                             "make it a LoRA target instead")
    return names


def wrap_modules_to_save(model: nn.Module, modules_to_save: Iterable[str], adapter_name: str,
                         activate: bool = True) -> list[str]:
    """Give each module selected by ``modules_to_save`` (peft's suffix rule) a trainable copy for ``adapter_name``.

    A plain module is replaced in place by a ``ModulesToSaveWrapper``; an existing wrapper gets one more copy.
    ``activate``: make ``adapter_name`` the wrapper's active (trainable) copy; otherwise a new wrapper runs its
    original module and an existing one keeps its active adapter (peft's ``add_adapter``). Everything is validated
    first (``plan_modules_to_save``). Returns the wrapped module names."""
    names = plan_modules_to_save(model, modules_to_save, adapter_name)
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, ModulesToSaveWrapper):
            m.update(adapter_name)
            if activate:
                m.set_adapter(adapter_name)
            else:
                m.set_adapter(m.active_adapter)
            continue
        w = ModulesToSaveWrapper(m, adapter_name)
        # the new containers take m's mode (its copies are deep copies of m, in that mode already): a model in eval
        # mode stays so
        w.training = w.modules_to_save.training = m.training
        if not activate:
            w.set_adapter(None)
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, w)
    return names
