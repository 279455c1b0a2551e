"""Model-level LoRA adapter API: several named adapters per model, as peft's ``PeftModel`` has them.

The functions take the model and walk its ``QLoRALinear`` modules (``qkernels.nn``), whose adapter layout is
peft's: ``lora_A`` / ``lora_B`` are ``nn.ModuleDict({adapter_name: nn.Linear})``, with ``r``, ``lora_alpha``,
``scaling`` and ``lora_dropout`` keyed by adapter name, an ``active_adapter`` and a ``disable_adapters`` flag;
and its ``QLoRAEmbedding`` modules (``qkernels.embedding``, peft's LoRA on an ``nn.Embedding``), laid out the same
but for ``lora_A`` / ``lora_B``: its ``lora_embedding_A`` / ``_B`` ParameterDicts of bare Parameters.

- ``add_adapter(model, name, r=8, lora_alpha=8, ...)``, ``set_adapter(model, name)``,
  ``delete_adapter(model, name)``, ``with disable_adapters(model): ...`` (restores on exit, like peft's
  ``PeftModel.disable_adapter()``), ``adapter_names(model)``.
- ``save_adapter``, ``load_adapter`` and ``adapter_state_dict`` (adapters on disk in peft's format) live in
  ``qkernels.adapter_files`` and are re-exported here.

Module names are relative to the ``model`` passed in: pass the same model object you would give to
``peft.get_peft_model`` (e.g. a ``transformers`` ``BertModel``) so the names agree with peft's.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from torch import nn

from ._compiled import unwrap_compiled

__all__ = [
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "save_adapter",
    "set_adapter",
    "adapter_names",
    "adapter_state_dict",
]

# ---------------------------------------------------------------------------------------------- walking
def _qlora_class() -> tuple[type, ...]:
    """The adapter layers, for ``isinstance``: ``QLoRALinear`` and ``QLoRAEmbedding`` (same adapter API; the
    embedding's ``lora_A`` / ``lora_B`` are its ``lora_embedding_A`` / ``_B`` ParameterDicts)."""
    from .embedding import QLoRAEmbedding
    from .nn import QLoRALinear  # imported here: qkernels.nn imports the kernels, adapters stays light

    return QLoRALinear, QLoRAEmbedding


def _qlora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every QLoRALinear / QLoRAEmbedding in ``model``, in definition order. Raises if there is
    none."""
    cls = _qlora_class()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no qkernels.nn.QLoRALinear module; quantize it first with "
            "qkernels.apply_qlora(model, ...)"
        )
    return found


def _wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, ModulesToSaveWrapper)`` of ``model``: the modules to save, with per-adapter copies."""
    from .modules_to_save import wrapper_modules

    return wrapper_modules(model)


def _token_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, TrainableTokensWrapper)`` of ``model`` (peft's trainable_token_indices; tied heads included)."""
    from .trainable_tokens import token_wrappers

    return token_wrappers(model)


def adapter_names(model: nn.Module) -> list[str]:
    """Returns the adapter names present on at least one QLoRALinear (or module to save) of ``model``, in first-seen
    order (``[]`` for a model without adapters)."""
    model = unwrap_compiled(model)
    names: dict[str, None] = {}
    for _, m in _qlora_modules(model):
        names.update(dict.fromkeys(m.lora_A.keys()))
    for _, w in _wrappers(model):
        names.update(dict.fromkeys(w.modules_to_save.keys()))
    for _, t in _token_wrappers(model):
        names.update(dict.fromkeys(t.deltas.keys()))
    return list(names)


def _require_known(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise ValueError(f"adapter {name!r} not found; the model has adapters {adapter_names(model)}")


def _require_adapter(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    mods = _qlora_modules(model)
    have = [(n, m) for n, m in mods if name in m.lora_A]
    if not have:
        raise ValueError(f"adapter {name!r} not found; the model has adapters {adapter_names(model)}")
    return have


def _dropout_p(d: Any) -> float:
    """The probability of a ``lora_dropout`` entry: an ``nn.Dropout``, ``nn.Identity`` (0) or a number."""
    if isinstance(d, (int, float)):
        return float(d)
    return float(getattr(d, "p", 0.0))


# ---------------------------------------------------------------------------------------------- model-level API
def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter of every QLoRALinear (peft's ``PeftModel.set_adapter``).

    A module without that adapter computes its base output only (as in peft, where its active adapter is then
    absent from its ``lora_A``). Modules to save run (and train) ``name``'s copy, or their original module when
    ``name`` has none, as peft's ``ModulesToSaveWrapper``. ``model``: any module holding QLoRALinear layers
    (``apply_qlora``'s result). Raises ``ValueError`` if no module has it.
    """
    model = unwrap_compiled(model)
    _require_known(model, name)
    for _, m in _qlora_modules(model):
        _activate(m, name)
    for _, w in _wrappers(model) + _token_wrappers(model):
        w.set_adapter(name)


def _activate(m: nn.Module, name: str | None) -> None:
    """``m.set_adapter(name)``; on a module without ``name``: no adapter runs and all are frozen (as peft).

    The name is remembered (``_selected``): peft's layer keeps an absent adapter as its active one, and
    ``delete_adapter`` hands the first LoRA layer's active adapter to the modules to save."""
    m._absent_active = None if name is None or name in m.lora_A else name
    if name is not None and name in m.lora_A:
        m.set_adapter(name)
        return
    for k in m.lora_A:
        m.lora_A[k].requires_grad_(False)
        m.lora_B[k].requires_grad_(False)
        for mag in m._magnitude_modules(k):  # a DoRA adapter's magnitude
            mag.requires_grad_(False)
    m.active_adapter = None


def _selected(m: nn.Module) -> str | None:
    """The adapter layer ``m`` is set to, as peft's layer holds it: its active adapter, or the one ``set_adapter``
    named that it lacks (it then runs none); ``None`` when it is set to none."""
    if m.active_adapter is not None:
        return m.active_adapter
    absent = getattr(m, "_absent_active", None)
    return absent if absent is not None and absent not in m.lora_A else None


def _existing_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Every parameter of ``model`` with its ``requires_grad``, by identity (a module wrapped later as a module to
    save keeps its Parameters under new names): what peft 0.21's ``inject_adapter`` restores after adding an adapter
    to a model that has LoRA layers already. ``[]`` for a model without (its first adapter sets the flags)."""
    if not any(_is_lora_layer(m) for m in model.modules() if isinstance(m, _qlora_class())):
        return []
    return [(p, p.requires_grad) for p in model.parameters()]


def _restore_flags(saved: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in saved:
        p.requires_grad_(flag)


def _is_lora_layer(m: nn.Module) -> bool:
    """Whether peft would hold ``m`` as a LoRA layer: it has an adapter, or ``delete_adapter`` emptied it (peft
    keeps the layer). A QLoRALinear that never held one (a 4-bit base layer outside the targets) is not."""
    return bool(len(m.lora_A)) or getattr(m, "_emptied_by_delete", False)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: every QLoRALinear computes its base output only and every module to save runs its original
    module; each module's flag is restored on exit.

    ``with qkernels.disable_adapters(model): y_base = model(x)`` — peft's ``with peft_model.disable_adapter():``.
    Returns the context manager; ``as`` binds ``model`` itself. Base biases trained by an adapter with ``bias``
    "all" / "lora_only" stay (they are the model's): as peft, a ``UserWarning`` says the outputs are then not the
    base model's.
    """
    from .base_bias import warn_if_disabled_with_bias

    inner = unwrap_compiled(model)
    warn_if_disabled_with_bias(inner)
    mods = _qlora_modules(inner) + _wrappers(inner) + _token_wrappers(inner)
    saved = [(m, bool(m.disable_adapters)) for _, m in mods]
    try:
        for m, _ in saved:
            m.disable_adapters = True
        yield model
    finally:
        for m, was in saved:
            m.disable_adapters = was


def delete_adapter(model: nn.Module, name: str, *, _keep_layers: bool = True) -> None:
    """Remove adapter ``name`` from every QLoRALinear that has it (peft's ``PeftModel.delete_adapter``).

    As peft's ``LoraModel.delete_adapter``: if ``name`` was the active adapter, each QLoRALinear that ran it (or
    was set to it but lacks it) switches to the alphabetically first of its remaining adapters (or none), and the
    model's new active adapter is the first LoRA layer's (a QLoRALinear that never held an adapter is none; one set
    to an adapter it lacks counts as set to it, as in peft). Modules to save drop their copy for ``name`` and run the
    copy of that new active adapter, or their original module when they have none (peft's
    ``ModulesToSaveWrapper.delete_adapter``). Raises ``ValueError`` if no module has it.

    A layer left without adapters stays a LoRA layer, as in peft, and counts for ``bias="lora_only"``
    (``qkernels.base_bias``); ``_keep_layers=False`` (``load_adapter(replace=True)``, which stands for a fresh load)
    leaves such a layer as if it had never held the adapter.
    """
    model = unwrap_compiled(model)
    _require_known(model, name)
    mods, wrappers = _qlora_modules(model), _wrappers(model)
    was_active = any(m.active_adapter == name for _, m in mods + wrappers)
    for _, m in mods:
        ran = m.active_adapter == name or (was_active and m.active_adapter is None)
        if name in m.lora_A:
            m.delete_adapter(name)
            if _keep_layers and not len(m.lora_A):
                m._emptied_by_delete = True  # peft keeps the layer: its bias counts for "lora_only"
        if ran:
            _activate(m, min(m.lora_A, default=None))  # peft: sorted(remaining adapters)[0]
    # peft: the first LoRA layer's active adapter after the deletion (a 4-bit layer with no LoRA is not one)
    new_active = next((_selected(m) for _, m in mods if _is_lora_layer(m)), None)
    for _, w in wrappers:
        if name in w.modules_to_save:
            w.delete_adapter(name)
            w.set_adapter(new_active)
    tokens = _token_wrappers(model)
    for _, t in tokens:  # the embedding's rows first: a tied head reads them
        t.delete_adapter(name)
    for _, t in tokens:
        if t.active_adapter is None:
            t.set_adapter(new_active)  # peft's TrainableTokensWrapper.delete_adapter: the new active, if it has rows
    if not any(len(m.lora_A) for _, m in mods):  # no LoRA left: a 4-bit model is purely quantized again
        from .model import _mark_bnb_model_quantized

        _mark_bnb_model_quantized(model)


def _matches(name: str, target_modules: str | list[str] | None, m: nn.Module | None = None) -> bool:
    """peft's rule: a string is a full regex match of the module name; a list matches the name or a ``.suffix``.
    ``None`` / ``"all-linear"`` select every QLoRALinear but no embedding (peft's "all-linear" takes Linear layers
    only, tuners_utils ``_maybe_include_all_linear_layers``)."""
    if target_modules is None or target_modules == "all-linear":
        from .embedding import QLoRAEmbedding

        return not isinstance(m, QLoRAEmbedding)
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def add_adapter(
    model: nn.Module,
    name: str,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    init_lora_weights: bool | str = True,
    target_modules: str | list[str] | None = None,
    modules_to_save: list[str] | None = None,
    layers_to_transform: int | list[int] | None = None,
    layers_pattern: str | list[str] | None = None,
    use_dora: bool = False,
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None,
    lora_bias: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    bias: str = "none",
) -> list[str]:
    """Add a new adapter ``name`` to the QLoRALinear modules of ``model`` (defaults are peft's ``LoraConfig``'s).

    ``target_modules``: ``None`` / ``"all-linear"`` = every QLoRALinear (not the ``QLoRAEmbedding`` layers, which
    must be named); a list of names or name suffixes (``["q_proj", "v_proj"]``); or a regex string matched against
    the whole module name (peft's rules).
    ``layers_to_transform`` / ``layers_pattern``: peft's layer filter (with a list ``target_modules``; see
    ``qkernels.apply_qlora``). ``modules_to_save``: names (full-name suffixes) of non-LoRA modules that get a
    trainable copy for ``name`` (``qkernels.modules_to_save``). The active adapter is not changed (call
    ``set_adapter``), as in peft.

    ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init_lora_weights``, ``use_dora``: the new adapter's,
    as in ``QLoRALinear`` / peft's ``LoraConfig`` (scaling ``lora_alpha / r``, or ``/ sqrt(r)`` with ``use_rslora``;
    ``use_dora``: a DoRA adapter with a magnitude per output row, ``qkernels.dora``).
    ``trainable_token_indices``: peft's, as in ``qkernels.apply_qlora`` (rows of the input embedding trained for this
    adapter; ``qkernels.trainable_tokens``). ``lora_bias``: peft's, as in ``qkernels.apply_qlora`` (a bias on each
    ``lora_B``; not on an embedding). ``rank_pattern`` / ``alpha_pattern``: peft's per-module ``r`` / ``lora_alpha``,
    as in ``qkernels.apply_qlora``. ``bias``: peft's ``LoraConfig.bias``, as in ``qkernels.apply_qlora``: which
    base biases train with this adapter ("none", "all", "lora_only"; ``qkernels.base_bias``). As in peft, the
    biases' flags are set only when this is the model's only adapter (peft's first adapter); beside other adapters
    they stay as they are (peft 0.21's ``add_adapter`` restores every existing parameter's flag), and at most one
    adapter of a model may have a mode other than "none".
    Returns the module names that got a LoRA adapter.

    Raises:
        ValueError: ``name`` already exists, a selector matches no QLoRALinear, a LoRA argument is bad (each
            named in the message), or ``bias`` is not "none" while another adapter's is; nothing is added then.
    """
    from . import base_bias
    from .model import _check_layer_args, check_pattern, match_target_modules, pattern_value
    from .modules_to_save import check_modules_to_save, plan_modules_to_save, wrap_modules_to_save

    model = unwrap_compiled(model)
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
    base_bias.check_bias(bias)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if not isinstance(use_dora, bool):
        raise ValueError(f"use_dora must be a bool, got {use_dora!r}")
    rank_pattern = check_pattern(rank_pattern, "rank_pattern")
    alpha_pattern = check_pattern(alpha_pattern, "alpha_pattern")
    mods = [(n, m) for n, m in _qlora_modules(model) if _matches(n, target_modules, m)]
    if layers_to_transform is not None or layers_pattern is not None:
        _check_layer_args("all-linear" if target_modules is None else target_modules, layers_to_transform,
                          layers_pattern)
        chosen = set(match_target_modules(model, target_modules, layers_to_transform=layers_to_transform,
                                          layers_pattern=layers_pattern))
        mods = [(n, m) for n, m in mods if n in chosen]
    if not mods:
        raise ValueError(
            f"target_modules={target_modules!r} (layers_to_transform={layers_to_transform!r}, layers_pattern="
            f"{layers_pattern!r}) matches no QLoRALinear; they are {[n for n, _ in _qlora_modules(model)]}"
        )
    clash = [n for n, m in mods if name in m.lora_A]
    if clash:
        raise ValueError(f"adapter {name!r} already exists on {clash[:3]}{'...' if len(clash) > 3 else ''}")
    base_bias.check_single(model, name, bias)
    modules_to_save = check_modules_to_save(modules_to_save)
    if modules_to_save:
        plan_modules_to_save(model, modules_to_save, name)  # validated before any change
    tokens = {}
    if trainable_token_indices is not None:
        from .trainable_tokens import add_trainable_tokens, plan_trainable_tokens

        tokens = plan_trainable_tokens(model, trainable_token_indices, name, modules_to_save)
        lora = [n for n, _ in _qlora_modules(model) if n in tokens]
        if lora:
            raise ValueError(f"trainable_token_indices: module {lora[0]!r} has LoRA (a QLoRAEmbedding / QLoRALinear); "
                             "peft refuses trainable tokens on a LoRA layer")
    flags = _existing_flags(model)
    added = []
    try:
        for n, m in mods:
            try:
                _add_to_module(m, name, pattern_value(rank_pattern, n, r), pattern_value(alpha_pattern, n, lora_alpha),
                               lora_dropout, use_rslora, init_lora_weights, use_dora, lora_bias, bias)
            except ValueError as e:
                raise ValueError(f"module {n!r}: {e}") from e
            added.append(m)
    except Exception:  # e.g. use_dora on a meta layer: leave no module with half the adapter
        for m in added:
            m.delete_adapter(name)
        raise
    if modules_to_save:
        wrap_modules_to_save(model, modules_to_save, name, activate=False)
    if tokens:
        add_trainable_tokens(model, tokens, name, activate=False)
    _restore_flags(flags)  # peft: a module to save wrapped now keeps its parameters' flags (a bias "all" trains)
    if adapter_names(model) == [name]:  # the model's only adapter: its mode picks the trainable biases (as peft's
        base_bias.mark_trainable(model)  # first injection); with others, their flags stay (peft 0.21's add_adapter)
    return [n for n, _ in mods]


def _add_to_module(m: nn.Module, name: str, r: int, alpha: float, dropout: float, rslora: bool, init: Any,
                   use_dora: bool = False, lora_bias: bool = False, bias: str = "none") -> None:
    """``update_layer`` without switching the module's active adapter (peft's ``add_adapter`` does not); records the
    adapter's ``bias`` mode on the layer (``qkernels.base_bias``)."""
    from .base_bias import record

    had, active = len(m.lora_A) > 0, _selected(m)
    if lora_bias:
        from .nn import QLoRALinear

        if not isinstance(m, QLoRALinear):  # peft's lora.Embedding: "lora_bias=True is not supported for Embedding"
            raise ValueError(f"lora_bias=True is not supported for {type(m).__name__} (peft refuses it on "
                             "embeddings too): leave the embedding out of target_modules or pass lora_bias=False")
        m.update_layer(name, r, alpha, dropout, init, rslora, use_dora=use_dora, lora_bias=True)
    else:
        m.update_layer(name, r, alpha, dropout, init, rslora, use_dora=use_dora)
    record(m, name, bias)
    if had:  # a module set to an adapter it lacks (active None) stays so; the new adapter is frozen
        _activate(m, active)


# The on-disk half builds on the functions above, so it is imported after them (adapter_files imports this module).
from .adapter_files import adapter_state_dict, load_adapter, save_adapter  # noqa: E402
