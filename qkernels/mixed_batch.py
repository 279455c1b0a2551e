"""Mixed-adapter batches: one forward in which each sample runs its own adapter (peft's ``adapter_names``).

peft 0.21.2 serves several adapters in one batch with ``peft_model(x, adapter_names=["a", "b", "__base__", ...])``
(one name per sample, ``"__base__"`` for the base model alone): ``LoraModel._enable_peft_forward_hooks``
(peft/tuners/lora/model.py:566-682) checks the call and registers a forward pre-hook on every LoRA layer and module to
save that passes ``adapter_names`` to its forward; each layer then runs ``_mixed_batch_forward``
(peft/tuners/lora/layer.py:853-898 for Linear, 1424-1462 for Embedding; bnb.py:458-511 for the 4-bit Linear;
peft/utils/other.py:465-508 for modules to save). qkernels models are the transformers model itself (no wrapper with
its own ``forward``), so the same hooks are installed by a context manager::

    model.eval()
    with qkernels.adapter_batch(model, ["a", "b", "__base__"]):
        logits = model(input_ids).logits          # input_ids: [3, T]; sample 0 runs "a", 1 "b", 2 the base
        out = model.generate(input_ids, max_new_tokens=8)   # greedy / sampling: the batch keeps its size

The layers also take the keyword themselves (``layer(x, adapter_names=[...])``), as peft's do.

peft's rules, kept here:

- refused in training mode (``model.training``), and a name no adapter layer has is refused (peft:
  "Trying to infer with non-existing adapter(s): ..."; qkernels' message also lists the model's adapters);
- each layer refuses ``len(adapter_names) != len(x)`` (x's first dimension is the batch), a merged layer, and a DoRA
  adapter among the names (peft: "Cannot pass `adapter_names` when DoRA is enabled.");
- a layer without one of the named adapters gives those samples its base output (as for ``set_adapter``);
- adapters disabled (``qkernels.disable_adapters``): ``adapter_names`` is ignored and every sample gets the base
  output, with no check, as peft's ``PeftModel`` installs no hook then (peft_model.py:988-999);
- the base product runs once for the whole batch; each adapter's LoRA term runs on its own rows only and is added
  there, cast to the base output's dtype (peft's ``result[rows] += lora(x[rows]).to(result.dtype)``). An embedding
  with an ``embed_scale`` (Gemma, BART: as a tensor, ``QLoRAEmbedding._lora_scale``) scales each adapter's term by it,
  as peft does.

Beam search: ``generate(..., num_beams=k)`` runs ``k`` rows per sample; pass ``adapter_batch(model, names,
num_beams=k)`` and each name is repeated ``k`` times, except for an encoder-decoder's encoder (which runs before the
expansion), as peft does from ``generate``'s ``num_beams`` (model.py:627-677).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ._compiled import unwrap_compiled

__all__ = ["BASE", "adapter_batch"]

BASE = "__base__"  # peft's placeholder for "no adapter" (layer.py:868)


# ---------------------------------------------------------------------------------------------- per layer
def check_layer_args(layer: nn.Module, x: torch.Tensor, adapter_names: Sequence[str]) -> None:
    """peft's ``LoraLayer._check_forward_args`` (layer.py:826-851), its messages verbatim: one name per sample, no
    merged adapter, no DoRA adapter among the names (``"__base__"`` is not checked)."""
    if len(x) != len(adapter_names):
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(adapter_names)} and {len(x)} respectively.")
    if getattr(layer, "merged", False):
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
                         "first.")
    for name in {n for n in adapter_names if n != BASE}:
        if layer.is_dora(name):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")


def groups(adapter_names: Sequence[str], have: Any, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """``[(adapter, row indices)]`` for each adapter of ``adapter_names`` the layer ``have``s (``"__base__"`` and the
    adapters a layer lacks get the base output: layer.py:862-872), in first-seen order."""
    rows: dict[str, list[int]] = {}
    for i, n in enumerate(adapter_names):
        if n != BASE and n in have:
            rows.setdefault(n, []).append(i)
    return [(n, torch.tensor(r, dtype=torch.long, device=device)) for n, r in rows.items()]


def linear_mixed_batch(layer: nn.Module, x: torch.Tensor, result: torch.Tensor,
                       adapter_names: Sequence[str]) -> torch.Tensor:
    """``result`` (the base output for the whole batch, modified in place and returned) plus each adapter's
    ``lora_B(lora_A(dropout(x[rows]))) * scaling`` on its rows, with ``x`` in the LoRA weights' dtype and the term cast
    to ``result``'s dtype before the add (peft's bnb.py:466-493 and layer.py:862-878, outside autocast)."""
    for name, idx in groups(adapter_names, layer.lora_A, x.device):
        A, B = layer.lora_A[name], layer.lora_B[name]
        sub = x[idx]
        sub = sub if sub.dtype == A.weight.dtype else sub.to(A.weight.dtype)
        out = B(A(layer.lora_dropout[name](sub))) * layer.scaling[name]
        result[idx] += out.to(result.dtype)
    return result


def embedding_mixed_batch(layer: nn.Module, x: torch.Tensor, result: torch.Tensor,
                          adapter_names: Sequence[str], embed_scale: torch.Tensor | None) -> torch.Tensor:
    """peft's ``Embedding._mixed_batch_forward`` (layer.py:1424-1462): ``result`` (the base lookup, scaled) plus, on
    each adapter's rows, ``F.embedding(x[rows], A^T) @ B^T * scaling`` (times ``embed_scale`` in the term's dtype when
    the embedding has one), added in place (the in-place add rounds to ``result``'s dtype)."""
    for name, idx in groups(adapter_names, layer.lora_embedding_A, x.device):
        after_A = layer._embed(x[idx], layer.lora_embedding_A[name].T)
        out = (after_A @ layer.lora_embedding_B[name].T) * layer.scaling[name]
        if embed_scale is not None:
            out = out * embed_scale.to(out.dtype)
        result[idx] += out
    return result


# peft/utils/other.py:471: the module types whose rows are independent, so that a module to save may run per sub-batch
_ROWWISE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def wrapper_mixed_batch(wrapper: nn.Module, args: tuple, kwargs: dict, adapter_names: Sequence[str]) -> Any:
    """peft's ``AuxiliaryTrainingWrapper`` mixed batch for a module to save (other.py:439-508): each adapter's copy (or
    the original module for ``"__base__"``) on its rows, the rows put back in order. An adapter without a copy here
    runs the original module on its rows (what ``set_adapter`` to it gives; peft raises a KeyError there)."""
    if args and len(args[0]) != len(adapter_names):
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(adapter_names)} and {len(args[0])} respectively.")
    if wrapper.disable_adapters or not args:
        return wrapper.original_module(*args, **kwargs)
    if not isinstance(wrapper.original_module, _ROWWISE):
        raise TypeError("Mixed batching is only supported for the following modules: "
                        f"{', '.join(c.__name__ for c in _ROWWISE)}; this module to save is a "
                        f"{type(wrapper.original_module).__name__}")
    x, rest = args[0], args[1:]
    rows: dict[str, list[int]] = {}
    for i, n in enumerate(adapter_names):
        rows.setdefault(n if n in wrapper.modules_to_save else BASE, []).append(i)
    out = None
    for name, r in rows.items():
        idx = torch.tensor(r, dtype=torch.long, device=x.device)
        module = wrapper.original_module if name == BASE else wrapper.modules_to_save[name]
        y = module(x[idx], *rest, **kwargs)
        if out is None:
            out = y.new_empty((len(adapter_names), *y.shape[1:]))
        out[idx] = y
    return out


# ---------------------------------------------------------------------------------------------- the model
def _inject(adapter_names: list[str], module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """peft's ``_adapter_names_pre_forward_hook`` (model.py:72-75)."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _encoder(model: nn.Module) -> nn.Module | None:
    """peft's ``_get_encoder`` (model.py:83-93): ``model.get_encoder()`` unless that is the model itself."""
    if not hasattr(model, "get_encoder"):
        return None
    encoder = model.get_encoder()
    return None if encoder is model else encoder


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names: Sequence[str], *, num_beams: int = 1) -> Iterator[nn.Module]:
    """Context manager: inside it, each forward of ``model`` runs sample ``i`` with adapter ``adapter_names[i]``
    (``"__base__"``: no adapter) in one batch: peft's ``model(x, adapter_names=...)``.

    ``with qkernels.adapter_batch(model, ["a", "b", "__base__"]): model(input_ids)``. The base product of every
    4-bit layer runs once for the whole batch; each adapter's LoRA term on its own samples only. See the module
    docstring for the rules (peft's); the active adapter and the trainable flags are left as they are.

    Args:
        model: an ``apply_qlora`` model (QLoRALinear / QLoRAEmbedding layers) in eval mode.
        adapter_names: one adapter name (str) per sample of every forward run inside the context.
        num_beams: the ``num_beams`` of a ``generate`` call inside the context: each name then stands for that many
            rows (an encoder's layers still get one per sample), as peft repeats them.

    Returns:
        The context manager; ``as`` binds ``model``.

    Raises:
        TypeError: ``adapter_names`` is not a sequence of str (a lone str is refused: it would be one name per
            character), or ``num_beams`` is not a positive int.
        ValueError: the model has no QLoRALinear / QLoRAEmbedding, is in training mode, or a name is neither
            ``"__base__"`` nor an adapter of the model (the message lists the model's adapters). Inside the
            context, a layer's forward raises ValueError when the batch size is not ``len(adapter_names)`` (times
            ``num_beams``) or a named adapter is a DoRA adapter (peft's messages).
    """
    from .adapters import _qlora_modules, _token_wrappers, _wrappers
    from .adapters import adapter_names as known_names

    if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, Sequence) or not all(
            isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of str (one adapter name per sample, {BASE!r} for the base "
                        f"model), got {adapter_names!r}")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise TypeError(f"num_beams must be a positive int (generate's num_beams), got {num_beams!r}")
    names = list(adapter_names)
    outer, model = model, unwrap_compiled(model)  # the hooks go on the uncompiled modules; `as` binds what was passed
    mods = [m for _, m in _qlora_modules(model) + _wrappers(model) + _token_wrappers(model)]
    if all(m.disable_adapters for m in mods):  # peft_model.py:992: no enabled adapter, no hook (names ignored)
        yield outer
        return
    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode. Call model.eval() first "
                         "(mixed-adapter batches are for inference)")
    expected = {n for _, m in _qlora_modules(model) for n in m.lora_A}  # peft: LoRA layers' adapters (model.py:639)
    unexpected = {n for n in names if n != BASE} - expected
    if unexpected:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}; the model "
                         f"has adapters {known_names(model)} (and {BASE!r} for the base model)")
    rows = [n for n in names for _ in range(num_beams)]  # model.py:659: each sample's beams
    handles = [m.register_forward_pre_hook(functools.partial(_inject, rows), with_kwargs=True) for m in mods]
    encoder = _encoder(model) if num_beams > 1 else None
    if encoder is not None:  # model.py:667-677: the encoder runs on the samples, before the beams; this hook runs last
        enc = [m for m in encoder.modules() if any(m is x for x in mods)]
        handles += [m.register_forward_pre_hook(functools.partial(_inject, names), with_kwargs=True) for m in enc]
    try:  # peft removes its hooks after the yield without a finally: an exception inside would leave them installed
        yield outer
    finally:
        for h in handles:
            h.remove()
