"""``resize_token_embeddings`` for a model whose input embedding carries LoRA (``QLoRAEmbedding``).

transformers' ``PreTrainedModel.resize_token_embeddings`` only resizes an ``nn.Embedding``: on a model whose
``embed_tokens`` is peft's ``lora.Embedding`` (peft 0.21.2) or qkernels' ``QLoRAEmbedding`` it raises ``TypeError: Old
embeddings are of type ...``, and on BART-like models (``set_input_embeddings`` writes ``model.shared`` into the
encoder and decoder) a resize would put the plain shared embedding back in place of the LoRA layers. peft's advice is
to resize before ``get_peft_model``. ``resize_token_embeddings(model, n)`` here gives the same model as resizing first
and applying LoRA after:

1. each ``QLoRAEmbedding`` that is the input embedding or holds its weight Parameter (BART's encoder / decoder
   ``embed_tokens`` share ``model.shared``'s) is swapped for its original module holding the same Parameter
   (``QLoRAEmbedding.base_embedding``);
2. transformers' own ``resize_token_embeddings`` runs (the type's method): new rows initialized as transformers does
   (``mean_resizing``), the old ones copied, ``padding_idx`` dropped when cut off, an untied ``nn.Linear`` head
   resized, ``config.vocab_size`` updated, weights tied again;
3. each layer goes back where it was and adopts the resized module's weight (``QLoRAEmbedding.take_resized``): A's
   columns for added tokens are zero, so the outputs of the old tokens are the same bits as before and a new token's
   LoRA term starts at 0.

Refused before any change (ValueError naming the module and the fix: resize before ``apply_qlora``): a DoRA adapter on
such an embedding (its magnitude is a norm over the vocabulary), an output embedding with LoRA (``QLoRALinear``: a
4-bit head's rows cannot grow, a tied float one's B cannot follow), an input embedding with trainable tokens
(``qkernels.trainable_tokens``: apply_qlora installs this function for it to say so), and layers whose weights were
never loaded.
``apply_qlora`` installs this function as the model's ``resize_token_embeddings`` (an instance attribute, a
``functools.partial``: it survives ``deepcopy`` and pickling) when it gives an embedding LoRA, so
``model.resize_token_embeddings(n)`` works as on the plain model. An optimizer made before the resize keeps the same
A Parameters but must be rebuilt for their new shapes (as after transformers' resize of a trained embedding).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ._compiled import unwrap_compiled
from .embedding import QLoRAEmbedding

__all__ = ["install_resize_hook", "resize_token_embeddings"]


def _vocab_layers(model: nn.Module) -> list[tuple[str, QLoRAEmbedding]]:
    """The ``QLoRAEmbedding`` layers that transformers' resize reaches: the input embedding itself, or one holding its
    weight Parameter (a tied copy such as BART's ``encoder.embed_tokens``)."""
    inp = model.get_input_embeddings()
    w = getattr(inp, "weight", None)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, QLoRAEmbedding) and (m is inp or (w is not None and m.weight is w))]


def _check(model: nn.Module, layers: list[tuple[str, QLoRAEmbedding]]) -> None:
    from .nn import QLoRALinear

    fix = ("Resize the plain model first (model.resize_token_embeddings(n), then apply_qlora), as peft advises "
           "before get_peft_model")
    out = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if isinstance(out, QLoRALinear):
        name = next((n for n, m in model.named_modules() if m is out), "the output embedding")
        raise ValueError(f"resize_token_embeddings: {name!r} (the output embedding) has LoRA (a QLoRALinear, "
                         f"{'4-bit' if out.quantized else 'float base'}): its rows are the vocabulary, and neither a "
                         f"4-bit weight nor its LoRA B [out_features, r] can be resized here. {fix}")
    for n, m in layers:
        if m._unloaded:
            raise ValueError(f"resize_token_embeddings: {n!r} holds {sorted(m._unloaded)} without values (the meta "
                             "device): load the checkpoint (load_state_dict(sd, assign=True)) before resizing")
        dora = [a for a in m.lora_embedding_A if m.is_dora(a)]
        if dora:
            raise ValueError(f"resize_token_embeddings: {n!r} has DoRA adapter(s) {dora}, whose magnitude is a norm "
                             f"over the vocabulary, which resizing changes. {fix}")


def resize_token_embeddings(model: nn.Module, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                            mean_resizing: bool = True, **kwargs: Any) -> nn.Module:
    """transformers' ``model.resize_token_embeddings`` on a model with LoRA on its input embedding (module
    docstring). Arguments as transformers' (``new_num_tokens``, ``pad_to_multiple_of``, ``mean_resizing``; others
    passed through). Returns the input embeddings (the ``QLoRAEmbedding`` where it is one).

    Raises:
        ValueError: a DoRA adapter on the embedding, LoRA on the output embedding, weights never loaded (named; the
            model is unchanged). TypeError: ``model`` has no transformers ``resize_token_embeddings``.
    """
    model = unwrap_compiled(model)  # torch.compile's wrapper has no resize_token_embeddings of its own
    resize = getattr(type(model), "resize_token_embeddings", None)
    if resize is None:
        raise TypeError(f"{type(model).__name__} has no resize_token_embeddings (a transformers PreTrainedModel "
                        "method); resize its nn.Embedding before apply_qlora")
    from .trainable_tokens import TrainableTokensWrapper

    resizing = new_num_tokens is not None or pad_to_multiple_of is not None
    if resizing and isinstance(model.get_input_embeddings(), TrainableTokensWrapper):
        raise ValueError("resize_token_embeddings: the input embedding has trainable tokens (trainable_token_indices: "
                         "a TrainableTokensWrapper, which transformers' resize refuses as it refuses peft's). Resize "
                         "the plain model first (model.resize_token_embeddings(len(tokenizer))), then apply_qlora with "
                         "trainable_token_indices naming the new token ids, as peft advises before get_peft_model")
    layers = _vocab_layers(model) if resizing else []
    if not layers:  # nothing with LoRA in the way (or a no-op call): transformers' own
        return resize(model, new_num_tokens, pad_to_multiple_of, mean_resizing, **kwargs)
    _check(model, layers)
    modules = dict(model.named_modules())
    placed = []
    try:
        for n, m in layers:
            _set(model, n, m.base_embedding())
            placed.append((n, m))
        resize(model, new_num_tokens, pad_to_multiple_of, mean_resizing, **kwargs)
        resized = {n: model.get_submodule(n) for n, _ in layers}
    finally:
        for n, _ in placed:  # back in place, whatever happened (an error leaves the layer, untouched, where it was)
            _set(model, n, modules[n])
    for n, m in layers:
        m.take_resized(resized[n])
    return model.get_input_embeddings()


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def install_resize_hook(model: nn.Module) -> None:
    """Make ``model.resize_token_embeddings`` this module's ``resize_token_embeddings`` bound to ``model`` (an
    instance attribute; a ``functools.partial`` of a module-level function, so deepcopies and pickles keep it bound
    to their own model). Nothing for a model without transformers' method."""
    if callable(getattr(type(model), "resize_token_embeddings", None)):
        object.__setattr__(model, "resize_token_embeddings", functools.partial(resize_token_embeddings, model))
