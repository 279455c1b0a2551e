"""Model-level QLoRA: put ``QLoRALinear`` into a model, count parameters, merge adapters back.

- ``apply_qlora(model, target_modules, ...)``: replace the matching ``nn.Linear`` layers in place (a named
  ``nn.Embedding``: peft's embedding LoRA, ``qkernels.embedding``), with peft's
  matching rules (``peft.tuners.tuners_utils.check_target_module_exists`` and ``_maybe_include_all_linear_layers``),
  and freeze everything but the LoRA weights (``use_dora=True``: DoRA adapters, ``qkernels.dora``). On a meta model
  built from a 4-bit checkpoint's config, the format comes from its ``quantization_config`` (``qkernels._bnb_config``).
- ``trainable_parameters(model)`` / ``print_trainable_parameters(model)``: peft's counts and line.
- ``merge_and_unload(model)``: dense ``nn.Linear`` layers holding ``dequant(W) + s B A`` (no requantization;
  DoRA: peft's ``(m / ||W + s B A||) * (W + s B A)``); transformers ``Conv1D`` for layers that were one; a float
  base's merge is written into its own (possibly tied) weight Parameter, as peft merges in place.
- ``merge_into_4bit(model)``: explicit opt-in requantization of ``dequant(W) + s B A``; warns with the error.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import base_bias
from ._bnb_config import ConfigFormat, Default, config_format, has_bnb_config, resolve, transformers_skip
from ._compiled import unwrap_compiled
from .embedding import QLoRAEmbedding, embedding_refusal, is_embedding
from .functional import dequantize_4bit, quantize_4bit
from .modules_to_save import check_modules_to_save, plan_modules_to_save, wrap_modules_to_save, wrapper_modules
from .nn import Params4bit, QLoRALinear, _check_dora_norm, is_conv1d

__all__ = [
    "apply_qlora",
    "layer_index",
    "match_target_modules",
    "merge_and_unload",
    "merge_into_4bit",
    "print_trainable_parameters",
    "trainable_parameters",
]

logger = logging.getLogger("qkernels")

ALL_LINEAR = "all-linear"
# apply_qlora's format defaults, told apart from the same values passed: on a meta model they yield to the model's
# bitsandbytes quantization_config (qkernels._bnb_config); each reads as its value in help() and inspect.signature
_QUANT_TYPE, _DOUBLE_QUANT, _BLOCKSIZE = Default("nf4"), Default(True), Default(64)
_COMPUTE_DTYPE, _QUANT_STORAGE = Default(None), Default(torch.uint8)


def _is_excluded(key: str, exclude_modules: str | Iterable[str] | None) -> bool:
    """peft's ``exclude_modules`` rule: a str is a regex full-match, a list matches a name or a ``.``-suffix."""
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, key) is not None
    return key in exclude_modules or any(key.endswith(f".{e}") for e in exclude_modules)


def _is_target(key: str, target_modules: str | Iterable[str]) -> bool:
    """peft's ``target_modules`` rule: a str is a regex full-match; a list entry ``t`` matches ``key == t`` or
    ``key.endswith("." + t)``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return key in target_modules or any(key.endswith(f".{t}") for t in target_modules)


def _is_bnb_4bit(m: nn.Module) -> bool:
    """A quantized bitsandbytes ``Linear4bit`` (its weight a ``Params4bit`` holding a quant state)."""
    w = getattr(m, "weight", None)
    return type(w).__name__ == "Params4bit" and getattr(w, "quant_state", None) is not None


def _is_linear(m: nn.Module) -> bool:
    """What peft's "all-linear" collects and what apply_qlora can quantize: nn.Linear and transformers' Conv1D."""
    return isinstance(m, nn.Linear) or is_conv1d(m)


def _all_linear_names(model: nn.Module) -> set[str]:
    """peft's "all-linear": every nn.Linear / Conv1D but the output embedding (``model.get_output_embeddings()``,
    e.g. ``lm_head``) and anything inside an existing QLoRALinear (its lora_A/lora_B). peft only looks for the
    output embedding on a transformers ``PreTrainedModel``; here any model with ``get_output_embeddings`` counts.
    (peft's extra rule for ``task_type=SEQ_CLS`` heads is not applied: there is no task type here.)"""
    names = {n for n, m in model.named_modules() if _is_linear(m) or isinstance(m, QLoRALinear)}
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        names -= {n for n, m in model.named_modules() if m is out_emb}
    for prefix, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            names -= {f"{prefix}.{s}" for s, _ in m.named_modules() if s}
    return names


def _check_layer_args(target_modules: Any, layers_to_transform: Any, layers_pattern: Any) -> None:
    """LoraConfig's checks of ``layers_to_transform`` / ``layers_pattern`` (its ``__post_init__``), plus types."""
    if layers_to_transform is not None:
        ok = (isinstance(layers_to_transform, int) and not isinstance(layers_to_transform, bool)) or (
            isinstance(layers_to_transform, (list, tuple))
            and all(isinstance(i, int) and not isinstance(i, bool) for i in layers_to_transform))
        if not ok:
            raise ValueError(f"layers_to_transform must be an int or a list of ints (layer indices, e.g. [0, 1]), "
                             f"got {layers_to_transform!r}")
        if isinstance(target_modules, str):
            raise ValueError(f"layers_to_transform cannot be used when target_modules is a str "
                             f"({target_modules!r}: a regex or 'all-linear'), as in peft's LoraConfig; pass a list "
                             "of module names, e.g. target_modules=['q_proj', 'v_proj']")
    if layers_pattern is not None:
        if not (isinstance(layers_pattern, str) or (isinstance(layers_pattern, (list, tuple))
                                                    and all(isinstance(p, str) for p in layers_pattern))):
            raise ValueError(f"layers_pattern must be a str or a list of str (the name of the model's layer list, "
                             f"e.g. 'layers' or 'h'), got {layers_pattern!r}")
        if isinstance(target_modules, str):
            raise ValueError(f"layers_pattern cannot be used when target_modules is a str ({target_modules!r}), as in "
                             "peft's LoraConfig; pass a list of module names")
        if layers_pattern and layers_to_transform is None:
            raise ValueError("layers_pattern is given but layers_to_transform is not: layers_pattern only names the "
                             "layer list that layers_to_transform indexes (peft's rule); pass layers_to_transform too")


def _uses_layer_indexes(layers_to_transform: Any) -> bool:
    """peft: an empty list means "every layer", like None."""
    return layers_to_transform is not None and (
        len(layers_to_transform) != 0 if isinstance(layers_to_transform, (list, tuple)) else True)


def layer_index(key: str, layers_pattern: str | Iterable[str] | None = None) -> int | None:
    """The layer index peft reads from module name ``key`` for ``layers_to_transform``, or None.

    ``layers_pattern`` empty / None: the first number that is a whole dotted segment after at least two segments
    (``model.layers.3.mlp`` -> 3; ``layers.3.mlp`` -> None: peft's default needs a prefix). Otherwise the number
    after the first segment equal to one of the patterns (regexes, tried in order): ``h`` on ``transformer.h.3.attn``
    -> 3. This is ``check_target_module_exists`` in peft's ``tuners_utils``, lazy regexes included (the first
    index, not an expert index nested deeper)."""
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match["idx"]) if match else None


def _in_modules_to_save(key: str, modules_to_save: Iterable[str] | None) -> bool:
    r"""peft never puts LoRA on a module to save or inside one: ``re.match(rf"(^|.*\.){m}($|\..*)", key)``."""
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save)


def match_target_modules(model: nn.Module, target_modules: str | Iterable[str],
                         exclude_modules: str | Iterable[str] | None = None, *,
                         layers_to_transform: int | Iterable[int] | None = None,
                         layers_pattern: str | Iterable[str] | None = None,
                         modules_to_save: Iterable[str] | None = None) -> list[str]:
    """Names of the modules of ``model`` that peft's ``LoraConfig(target_modules=..., exclude_modules=...,
    layers_to_transform=..., layers_pattern=..., modules_to_save=...)`` would target, in ``named_modules()`` order.

    ``"all-linear"`` (any case) is peft's shorthand. ``layers_to_transform`` (an int or a list of ints) keeps the
    modules matched by a list entry's ``.``-suffix whose layer index (``layer_index(name, layers_pattern)``) is among
    them; as in peft, a module named in full by an entry is kept whatever its index, and the filter is ignored for a
    regex ``target_modules`` (peft's LoraConfig refuses that combination up front, as ``apply_qlora`` does).
    Modules to save, and modules inside them, are never targeted. A ``torch.compile(model)`` gives ``model``'s names
    (``qkernels._compiled``)."""
    model = unwrap_compiled(model)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        target_modules = _all_linear_names(model)
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    use_index = not isinstance(target_modules, str) and _uses_layer_indexes(layers_to_transform)
    wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform or ())
    out = []
    for n, _ in model.named_modules():
        if not n or _is_excluded(n, exclude_modules) or _in_modules_to_save(n, modules_to_save):
            continue
        if isinstance(target_modules, str) or n in target_modules:  # peft: a full-name entry ignores the layer index
            if _is_target(n, target_modules):
                out.append(n)
        elif _is_target(n, target_modules) and (not use_index or layer_index(n, layers_pattern) in wanted):
            out.append(n)
    return out


def apply_qlora(
    model: nn.Module,
    target_modules: str | Iterable[str] = ALL_LINEAR,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    quant_type: str = _QUANT_TYPE,
    double_quant: bool = _DOUBLE_QUANT,
    blocksize: int = _BLOCKSIZE,
    compute_dtype: torch.dtype | None = _COMPUTE_DTYPE,
    exclude_modules: str | Iterable[str] | None = None,
    *,
    layers_to_transform: int | Iterable[int] | None = None,
    layers_pattern: str | Iterable[str] | None = None,
    modules_to_save: Iterable[str] | None = None,
    keep_float_modules: str | Iterable[str] | None = None,
    quant_storage: torch.dtype = _QUANT_STORAGE,
    init_lora_weights: bool | str = True,
    loftq_iter: int = 1,
    adapter_name: str = "default",
    use_dora: bool = False,
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None,
    lora_bias: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    bias: str = "none",
    log_every: int = 50,
    verbose: bool | None = None,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by ``QLoRALinear`` in place; freeze all but LoRA.

    transformers' ``Conv1D`` layers (GPT-2) count as linear, as in peft, and are stored transposed to
    ``[out, in]`` the way transformers' bitsandbytes integration stores them when quantized (a float base keeps the
    Conv1D's ``[in, out]``). A model already loaded in 4 bits by
    bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True)``) works too: its ``Linear4bit`` layers are wrapped with
    ``QLoRALinear.from_bnb`` (their packed bytes and scales as they are; ``quant_type``, ``blocksize``,
    ``double_quant`` and ``quant_storage`` are the layer's own, and ``compute_dtype=None`` keeps the layer's).

    Args:
        target_modules: list of names/suffixes, a regex (full match), or ``"all-linear"``: peft's semantics
            (``match_target_modules``). Every list entry must match at least one module, else ValueError
            listing the Linear layers that exist. A matched ``nn.Embedding`` gets peft's embedding LoRA on its float
            weight (``qkernels.embedding.QLoRAEmbedding``; never under ``"all-linear"``, as in peft; LoftQ refused
            there, DoRA is peft's DoraEmbeddingVariant, and a tied embedding warns as peft does); any other matched
            module that is not an ``nn.Linear`` is an error.
        exclude_modules: peft's ``exclude_modules`` (list of names/suffixes, or a regex).
        layers_to_transform: peft's: an int or a list of ints; only modules (matched by a list entry's suffix) in
            those layers are replaced. The layer index is the number after the layer list's name in the module
            name (``model.layers.3.mlp.up_proj`` -> 3; see ``layer_index``). Needs a list ``target_modules``.
        layers_pattern: peft's: the name(s) of the layer list (``"layers"``, ``"h"``; regexes) that
            ``layers_to_transform`` indexes; None: the first numbered segment after the first one.
        modules_to_save: peft's: names (full-name suffixes, e.g. ``["score"]`` or ``["classifier"]``) of non-LoRA
            modules to train in full. Each is wrapped in a ``ModulesToSaveWrapper`` with a trainable copy for
            ``adapter_name`` (``qkernels.modules_to_save``); they and the modules inside them are never quantized.
        keep_float_modules: targets (names/suffixes as in ``target_modules``, or a regex) that get LoRA on a float
            base (``QLoRALinear(quantize=False)``) instead of being quantized. Added to the ones kept float anyway,
            as peft + bitsandbytes keep them: modules in the model's ``_keep_in_fp32_modules`` (T5's ``wo``: its
            feed-forward casts its input to ``wo.weight.dtype``), targets whose weight is tied to another module's (a
            head tied to the input embeddings: the float base holds the shared Parameter, so the tie stays; merging
            then changes the embeddings too, as in peft) and, on a model loaded in 4 bits by bitsandbytes, every
            targeted float ``nn.Linear`` / ``Conv1D`` (left float by ``llm_int8_skip_modules``, an output head; a
            Conv1D float base keeps its ``[in, out]`` weight), and on a meta model built from a bitsandbytes 4-bit
            config the targets its checkpoint holds in float (below). Float bases compute in their weight's dtype, as
            peft's ``lora.Linear``: ``compute_dtype`` is for the 4-bit layers.
        r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, loftq_iter, adapter_name: the adapter, and
            quant_type, double_quant, blocksize, compute_dtype, quant_storage: the 4-bit format, passed to
            ``QLoRALinear.from_linear`` for each layer (see ``QLoRALinear``; dtypes also by name, "bfloat16").
            Defaults: ``"nf4"``, ``True``, ``64``, ``None`` (the input's dtype), ``torch.uint8``; on a meta model
            with a bitsandbytes 4-bit ``quantization_config``, those not passed are the config's (below).
        rank_pattern, alpha_pattern: peft's: ``{key: r}`` / ``{key: lora_alpha}`` for the modules whose name ends
            with a match of the regex ``key`` (``re.match(rf"(.*\\.)?({key})$", name)``: ``"q_proj"``,
            ``"layers\\.0\\.self_attn\\.q_proj"``, ``"0\\..*v_proj"``); the first key that matches wins, the other
            modules take ``r`` / ``lora_alpha``.
        use_dora: DoRA adapters (peft's ``LoraConfig(use_dora=True)``, "QDoRA" on the 4-bit layers; see
            ``qkernels.dora``): each layer also trains a magnitude per output row (an embedding: per embedding
            dimension). It starts from the weight's norms, as in peft; on a meta model a linear layer's are computed
            when the checkpoint's weight is loaded (a meta embedding with DoRA is refused: load it first).
        trainable_token_indices: peft's (``LoraConfig(trainable_token_indices=...)``): a list of token ids whose rows
            of the input embedding train beside LoRA (new special tokens), or ``{name suffix: ids}`` (e.g.
            ``{"embed_tokens": [...]}``). The embedding is wrapped in a ``TrainableTokensWrapper``
            (``qkernels.trainable_tokens``); a head tied to it (``tie_word_embeddings``) sees the same rows. Each id
            must be a row of the embedding, listed once; the embedding must not also be a LoRA target or a module to
            save (peft refuses both).
        lora_bias: peft's: each ``lora_B`` gets a trainable bias, scaled with the LoRA term
            (``s * (dropout(x) A^T B^T + b_B)``); ``merge_and_unload`` adds ``s * b_B`` to the layer's bias (a layer
            without one cannot merge it: refused, as peft). Not with DoRA, an init other than True / False, or an
            embedding target (peft refuses all three).
        bias: peft's ``LoraConfig.bias`` (not ``lora_bias``): which of the model's own biases train beside the
            adapter (``qkernels.base_bias``). ``"none"`` (default): none; ``"all"``: every parameter named ``bias``
            (untargeted Linears, LayerNorms, heads; not those inside modules to save, which train their copies);
            ``"lora_only"``: the biases of the layers given LoRA. A 4-bit layer's bias is float, so it trains as is.
            ``save_adapter`` writes the trained biases under peft's keys and ``"bias"`` in the config;
            ``merge_and_unload`` keeps them in the merged layers; ``disable_adapters`` leaves them (with peft's
            warning). Anything else is a ValueError.
        log_every: report ``"apply_qlora: i/n layers quantized (t s)"`` every this many layers, always to the
            ``qkernels`` logger (INFO); on a meta model the format taken from its ``quantization_config`` (and the
            targets kept float for it) are reported first, the same way.
        verbose: also print those lines to stderr. None (default): print only for large models, i.e. when at least
            ``2 * log_every`` layers are replaced (a 7B Llama with all-linear: 224 layers, 5 lines).

    A model given LoRA on an embedding (or on its output embedding) gets ``qkernels.resize.resize_token_embeddings``
    as its ``resize_token_embeddings`` (an instance attribute): transformers' own refuses the LoRA layer (as it
    refuses peft's); this one resizes the base embedding as transformers does and grows A with zero columns, or says
    to resize first (DoRA on the embedding, LoRA on the head).

    Returns ``model`` (modified in place). Each new layer takes the training mode of the module it replaces (a model
    in eval mode stays in eval mode: no LoRA dropout until ``model.train()``). Layers are quantized one at a time on
    their own device, so peak memory is one float layer above the quantized model. On a model transformers loaded in
    4 bits, ``model.is_quantized`` is cleared once LoRA weights train, so that transformers' Trainer takes it (see
    ``_mark_bnb_model_trainable``).

    A model whose Linear layers are on the meta device (built under ``torch.device("meta")`` or accelerate's
    ``init_empty_weights``, e.g. transformers' ``from_config``) gets meta ``QLoRALinear`` layers: shapes only, nothing
    quantized; load a 4-bit checkpoint into it with ``qkernels.load_checkpoint``, ``model.load_state_dict(sd,
    assign=True)`` (see ``QLoRALinear``) or accelerate's ``load_checkpoint_and_dispatch``, which needs the layers in
    the checkpoint's format. So when every targeted Linear is on meta and ``model.config.quantization_config`` (a 4-bit
    checkpoint's ``config.json``, read by ``AutoConfig.from_pretrained``: a dict, or transformers'
    ``BitsAndBytesConfig``) is bitsandbytes 4-bit (``load_in_4bit``), the format is the config's:

    - ``quant_type``, ``double_quant``, ``quant_storage`` and ``compute_dtype`` not passed take
      ``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``, ``bnb_4bit_quant_storage`` and
      ``bnb_4bit_compute_dtype`` (transformers' defaults for an absent field: fp4, False, uint8, float32);
    - a passed ``quant_type``, ``double_quant`` or ``quant_storage`` that differs from the config is a ValueError
      naming both values; a passed ``compute_dtype`` is kept (the matmul's precision, not stored in the checkpoint:
      as over a bitsandbytes layer's own); the config has no blocksize (transformers' checkpoints are at 64,
      ``quantize_checkpoint``'s at any), so ``blocksize`` stays as passed (64 by default) and each layer takes its
      checkpoint's at load;
    - targets that such a checkpoint holds in float get a float base, as transformers' bitsandbytes loader (5.23,
      ``replace_with_bnb_linear``) leaves them: those matching ``llm_int8_skip_modules`` (its rule: a regex from the
      start of the name to a ``.`` boundary, or a suffix: ``"o_proj"``), or, where that is None, its default skips
      (the output embedding, the last module), and ``nn.Linear`` subclasses (Falcon's ``FalconLinear``).

    Another quantization config on a meta model (8-bit bitsandbytes, GPTQ, AWQ, ...) is a ValueError: qkernels reads
    bitsandbytes 4-bit checkpoints only. A model with real weights ignores the config for its format: the arguments
    (or the defaults above) say how its weights are quantized.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``target_modules`` is not a str or a list of names.
        ValueError: ``target_modules`` is None or empty, an entry matches no module (the Linear layers are listed),
            a ``keep_float_modules`` entry matches no target, a bad format or LoRA argument (named), or a selected
            module cannot be adapted here (not a Linear, already a QLoRALinear, tied to another weight, read by
            weight by its parent, 8-bit, a float-base Conv1D or bitsandbytes 4-bit layer, "loftq" on a float base,
            or a mixture of experts' 3-D parameters under "all-linear"); on a meta model, a ``quantization_config``
            that is not bitsandbytes 4-bit or a passed format argument that contradicts it; the message says what to
            pass.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # torch.compile(model): names, patterns and attributes are the uncompiled model's; the wrapper is returned
    outer, model = model, unwrap_compiled(model)
    if target_modules is None:  # peft's None: a per-architecture default list, which qkernels does not guess
        raise ValueError("target_modules is None: pass the module names to adapt, e.g. ['q_proj', 'v_proj'], or "
                         "'all-linear' (peft picks a default list per model type for None; qkernels does not)")
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules is empty; pass a list of module names or 'all-linear'")
    elif not isinstance(target_modules, Iterable):
        raise TypeError(f"target_modules must be a list of module names, a regex or 'all-linear', got "
                        f"{type(target_modules).__name__}")
    else:
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every <= 0:
        raise ValueError(f"log_every must be a positive int, got {log_every!r}")
    base_bias.check_bias(bias)
    if any(isinstance(m, (QLoRALinear, QLoRAEmbedding)) for m in model.modules()):  # apply_qlora called before
        base_bias.check_single(model, adapter_name, bias, replacing=True)  # its own earlier layers: one adapter
    _check_layer_args(target_modules, layers_to_transform, layers_pattern)
    rank_pattern = check_pattern(rank_pattern, "rank_pattern")
    alpha_pattern = check_pattern(alpha_pattern, "alpha_pattern")
    modules_to_save = check_modules_to_save(modules_to_save)
    save_names = plan_modules_to_save(model, modules_to_save, adapter_name) if modules_to_save else []
    names = match_target_modules(model, target_modules, exclude_modules, layers_to_transform=layers_to_transform,
                                 layers_pattern=layers_pattern, modules_to_save=modules_to_save)
    linear_names = [n for n, m in model.named_modules() if _is_linear(m)]
    _check_each_target_matches(model, target_modules, exclude_modules, names, linear_names)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        _check_no_expert_parameters(model, names)
    if not names:
        _raise_no_layer_match(model, target_modules, exclude_modules, layers_to_transform, layers_pattern,
                              modules_to_save)
    modules = dict(model.named_modules())
    emb_names = [n for n in names if is_embedding(modules[n])]  # LoRA on the float embedding (qkernels.embedding)
    show = verbose if verbose is not None else len(names) >= 2 * log_every
    # a meta model built from a 4-bit checkpoint's config.json: its layers in that checkpoint's format
    cfg = config_format(model) if _targets_on_meta(modules, names) else None
    given = dict(quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, compute_dtype=compute_dtype,
                 quant_storage=quant_storage)
    fmt = resolve(given, cfg)  # "bfloat16" as in BnB's config -> torch.bfloat16
    quant_type, double_quant, blocksize = fmt["quant_type"], fmt["double_quant"], fmt["blocksize"]
    compute_dtype, quant_storage = fmt["compute_dtype"], fmt["quant_storage"]
    stored_float = _stored_float(model, [n for n in names if n not in emb_names], cfg) if cfg else {}
    float_names = _float_base_names(model, [n for n in names if n not in emb_names], keep_float_modules,
                                    init_lora_weights, stored_float)
    _check_not_read_by_parent(model, names)
    _check_forward_is_linear(model, names)
    clash = [(t, m) for t in names for m in save_names if t == m or t.startswith(m + ".") or m.startswith(t + ".")]
    if clash:  # peft's two rules differ (suffix vs dotted regex): one module can meet both; refuse before changing
        raise ValueError(f"module {clash[0][0]!r} is a LoRA target and module {clash[0][1]!r} a module to save; "
                         "they overlap. Name the module to save exactly (e.g. its full name) or exclude it from "
                         "target_modules")
    tokens = _plan_tokens(model, trainable_token_indices, adapter_name, modules_to_save, names, save_names)
    _check_lora_bias_args(lora_bias, use_dora, init_lora_weights, emb_names)
    for n in names:
        m = modules[n]
        if n in emb_names:
            _check_embedding_target(n, m, use_dora, init_lora_weights)
            continue
        if isinstance(m, (QLoRALinear, QLoRAEmbedding)):
            raise ValueError(f"module {n!r} is already a {type(m).__name__}; add an adapter with "
                             f"model.get_submodule({n!r}).update_layer(...)")
        if not _is_linear(m):
            raise ValueError(f"target module {n!r} is a {type(m).__name__}, not an nn.Linear; only nn.Linear (and "
                             "transformers Conv1D) layers are quantized, and nn.Embedding layers get LoRA on their "
                             f"float weight. Linear layers here: {_summarize(linear_names)}")
        if _is_bnb_4bit(m):
            if init_lora_weights == "loftq":
                raise ValueError(f"module {n!r} is already a bitsandbytes 4-bit layer: init_lora_weights='loftq' "
                                 "needs the float weight; load the model unquantized for LoftQ")
        elif not m.weight.dtype.is_floating_point:
            raise ValueError(f"module {n!r} ({type(m).__name__}) holds a {m.weight.dtype} weight: only float "
                             "weights are quantized, and bitsandbytes 4-bit layers wrapped (8-bit layers are not "
                             "supported); load the model in float or in 4 bits")
        elif use_dora and not m.weight.is_meta and init_lora_weights in (True, "gaussian"):
            # before any change: B = 0, so an all-zero row of W makes DoRA's row scale 0/0 (QLoRALinear refuses it)
            rows = m.weight.detach().abs().amax(dim=0 if is_conv1d(m) else 1)
            try:
                _check_dora_norm(rows)
            except ValueError as e:
                raise ValueError(f"module {n!r}: {e}") from None
    kwargs: dict[str, Any] = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                                  quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                                  compute_dtype=compute_dtype, quant_storage=quant_storage,
                                  init_lora_weights=init_lora_weights, loftq_iter=loftq_iter,
                                  adapter_name=adapter_name, use_dora=use_dora, lora_bias=lora_bias)
    if cfg is not None:
        _log_config_format(cfg, given, stored_float, show)
    t0 = time.perf_counter()
    bnb_kwargs = {k: kwargs[k] for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights",
                                         "adapter_name", "use_dora", "lora_bias")}
    float_kwargs = dict(bnb_kwargs)  # a float base computes in its weight's dtype, as peft's lora.Linear
    emb_kwargs = {k: v for k, v in bnb_kwargs.items() if k != "lora_bias"}  # peft's lora.Embedding (DoRA too)
    _warn_tied_embedding_targets(model, emb_names)
    if compute_dtype is not None:
        bnb_kwargs["compute_dtype"] = compute_dtype
    for i, n in enumerate(names, 1):
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        m = modules[n]
        own = dict(r=pattern_value(rank_pattern, n, r), lora_alpha=pattern_value(alpha_pattern, n, lora_alpha))
        # a model loaded in 4 bits by bitsandbytes (transformers' BitsAndBytesConfig): wrap its packed weight as is
        # (its own quant_type / blocksize / double quant), as peft does; never requantize a 4-bit weight
        try:
            if n in emb_names:  # peft's lora.Embedding: the embedding stays float
                layer = QLoRAEmbedding.from_embedding(m, **{**emb_kwargs, **own})
            elif n in float_names:  # kept float, as peft + bitsandbytes keep it: LoRA on the float weight
                layer = QLoRALinear.from_linear(m, quantize=False, **{**float_kwargs, **own})
            elif _is_bnb_4bit(m):
                layer = QLoRALinear.from_bnb(m, **{**bnb_kwargs, **own})
            else:
                layer = QLoRALinear.from_linear(m, **{**kwargs, **own})
        except ValueError as e:
            raise ValueError(f"module {n!r}: {e}") from e
        # a new module starts in training mode; in a model in eval mode (from_pretrained returns one) that left LoRA
        # dropout on while model.training said False: generate() gave different tokens on each call
        layer.train(m.training)
        if isinstance(layer, QLoRALinear):
            layer._module_name = n  # for error messages that name a key (accelerate's loader gives the layer no name)
        base_bias.record(layer, adapter_name, bias)
        setattr(parent, child, layer)
        if i % log_every == 0 or i == len(names):
            line = f"apply_qlora: {i}/{len(names)} layers quantized ({time.perf_counter() - t0:.1f} s)"
            logger.info(line)
            if show:
                print(line, file=sys.stderr, flush=True)
    for pname, p in model.named_parameters():
        # LoRA weights and copies of modules to save keep the flag set_adapter gave them (active: trainable);
        # everything else is frozen
        p.requires_grad_(p.requires_grad and (_is_lora_param(pname) or ".modules_to_save." in f".{pname}"))
    if save_names:
        wrap_modules_to_save(model, modules_to_save, adapter_name)
    if tokens:
        from .trainable_tokens import add_trainable_tokens

        add_trainable_tokens(model, tokens, adapter_name, activate=True)
    # bias "all" / "lora_only": the base biases it selects train (peft's marking; modules to save keep their own)
    base_bias.mark_trainable(model)
    if tokens or emb_names or any(n in names for n in _output_embedding_names(model)):
        # transformers' resize_token_embeddings refuses a QLoRAEmbedding (TypeError, as peft's lora.Embedding) and
        # would put BART's plain shared embedding back over it: qkernels.resize's works, or says what to do
        from .resize import install_resize_hook

        install_resize_hook(model)
    _mark_bnb_model_trainable(model)
    _drop_bnb_load_conversions(model)
    _prepare_for_gradient_checkpointing(model)
    return outer


def check_pattern(pattern: Any, what: str) -> dict[str, Any]:
    """peft's ``rank_pattern`` / ``alpha_pattern``: a dict of regex keys to a positive int rank (a number alpha);
    None is ``{}``. Each key must compile (peft raises ``re.error`` while adapting the model)."""
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise TypeError(f"{what} must be a dict {{module name regex: value}}, as peft's LoraConfig, got "
                        f"{type(pattern).__name__}")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{what} keys are module-name regexes (non-empty strings), got {key!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"{what} key {key!r} is not a valid regular expression ({e}); peft matches each key as "
                             "a regex against the end of the module name") from None
        ok = (isinstance(value, int) and value > 0) if what == "rank_pattern" else (
            isinstance(value, (int, float)) and math.isfinite(value))
        if isinstance(value, bool) or not ok:
            want = "a positive int rank" if what == "rank_pattern" else "a finite number"
            raise ValueError(f"{what}[{key!r}] must be {want}, got {value!r}")
    return dict(pattern)


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key`` + lookup: the value of the first key ``p`` with ``re.match(rf"(.*\\.)?({p})$",
    module)``, else ``default``."""
    for p, v in pattern.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return v
    return default


def _plan_tokens(model: nn.Module, spec: Any, adapter_name: str, modules_to_save: list[str] | None,
                 names: list[str], save_names: list[str]) -> dict[str, tuple[list[int], str | None]]:
    """``trainable_token_indices`` checked before any change (``qkernels.trainable_tokens.plan_trainable_tokens``),
    and refused where peft refuses it: on a LoRA target (peft: "cannot be applied to modules of type
    lora.Embedding") or a module to save."""
    if spec is None:
        return {}
    from .trainable_tokens import plan_trainable_tokens

    plan = plan_trainable_tokens(model, spec, adapter_name, modules_to_save)
    for n, (_, source) in plan.items():
        what = ("a LoRA target (target_modules selects it)" if n in names else
                "a module to save" if any(n == m or n.startswith(m + ".") for m in save_names) else None)
        if what is not None:
            tied = f", tied to {source!r}," if source else ""
            raise ValueError(f"trainable_token_indices: module {n!r}{tied} is also {what}; peft refuses trainable "
                             "tokens on a LoRA embedding (trainable_token_indices cannot be applied to modules of "
                             f"type lora.Embedding) or a module to save: exclude {n.rpartition('.')[2]!r} from "
                             "target_modules / modules_to_save, or drop trainable_token_indices")
    return plan


def _check_lora_bias_args(lora_bias: Any, use_dora: bool, init_lora_weights: Any, emb_names: list[str]) -> None:
    """peft's refusals of ``lora_bias`` (LoraConfig: DoRA, inits other than True / False; lora.Embedding), before any
    change."""
    from .nn import _check_lora_bias

    _check_lora_bias(lora_bias, use_dora, init_lora_weights, True)
    if lora_bias and emb_names:
        raise ValueError(f"lora_bias=True on embedding target {emb_names[0]!r}: peft's lora.Embedding refuses it "
                         "(\"lora_bias=True is not supported for Embedding\"); leave the embedding out of "
                         "target_modules or pass lora_bias=False")


def _output_embedding_names(model: nn.Module) -> list[str]:
    """The names of ``model.get_output_embeddings()`` (a transformers head; ``[]`` without one)."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return [n for n, m in model.named_modules() if out is not None and m is out]


def _check_embedding_target(n: str, m: nn.Module, use_dora: bool, init_lora_weights: Any) -> None:
    """Refuse, before any change, an ``nn.Embedding`` target that ``QLoRAEmbedding`` cannot adapt as peft does."""
    why = embedding_refusal(m)
    if why is not None:
        raise ValueError(f"target module {n!r}: {why}")
    if use_dora and m.weight.is_meta:
        raise ValueError(f"target module {n!r} is an nn.Embedding on the meta device and use_dora=True: the DoRA "
                         "magnitude starts from the embedding's column norms, which a meta weight does not hold. Load "
                         "the base checkpoint first, then apply_qlora (or add_adapter(..., use_dora=True))")
    if use_dora and init_lora_weights in (True, "gaussian"):
        # before any change: A = 0 at init, so an all-zero column of W makes DoRA's scale 0/0 (QLoRAEmbedding refuses)
        from .embedding import _check_dora_column_norm

        try:
            _check_dora_column_norm(m.weight.detach().abs().amax(dim=0))
        except ValueError as e:
            raise ValueError(f"target module {n!r}: {e}") from None
    if init_lora_weights == "loftq":
        raise ValueError(f"target module {n!r} is an nn.Embedding, which stays float: init_lora_weights='loftq' fits "
                         "LoRA to a 4-bit quantization error and has none to fit there; leave it out "
                         f"(exclude_modules=[{n.rpartition('.')[2]!r}]) or use init_lora_weights=True")


def _warn_tied_embedding_targets(model: nn.Module, emb_names: list[str]) -> None:
    """peft's ``_check_tied_modules`` warning (tuners_utils.py:1454-1470): an embedding target tied to another module
    (``tie_word_embeddings``: the head reads the same weight). Its LoRA changes the input side only; the head keeps
    computing with the shared base weight, without the embedding's LoRA, as in peft (``ensure_weight_tying=False``)."""
    tied = _tied_targets(model, emb_names)
    if tied:
        n, other = next(iter(tied.items()))
        warnings.warn(
            f"LoRA on embedding {n!r}, whose weight is tied to {other!r} (tie_word_embeddings): the LoRA term applies "
            "to the input embeddings only and the tied module keeps the plain shared weight, as in peft with "
            "ensure_weight_tying=False (which peft also warns about); merging writes into the shared weight, so the "
            "tied module then changes too",
            UserWarning,
            stacklevel=3,
        )


def _prepare_for_gradient_checkpointing(model: nn.Module) -> None:
    """peft's ``PeftModel._prepare_model_for_gradient_checkpointing``, which ``get_peft_model`` runs when the model
    already checkpoints (``is_gradient_checkpointing``; absent counts as True) and is not loaded in 4 or 8 bits: make
    the input embeddings' output require grad, so that torch's reentrant checkpoint, whose inputs must require grad,
    passes gradients to the LoRA weights inside. transformers does it itself only for models whose input is
    ``input_ids``: Whisper (``input_features``) failed with "element 0 of tensors does not require grad" where peft
    trained."""
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        with warnings.catch_warnings():  # transformers 5 deprecates this name for is_activation_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            flag = getattr(model, "is_gradient_checkpointing", True)
    if not flag or any(getattr(model, a, False) for a in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
        return
    if callable(getattr(model, "enable_input_require_grads", None)):
        model.enable_input_require_grads()
    elif callable(getattr(model, "get_input_embeddings", None)) and model.get_input_embeddings() is not None:
        model.get_input_embeddings().register_forward_hook(_output_requires_grad)


def _output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    """Forward hook (a module-level function: a model holding it still pickles)."""
    output.requires_grad_(True)


def _mark_bnb_model_trainable(model: nn.Module) -> None:
    """A transformers model loaded in 4 bits by bitsandbytes now carries trainable LoRA: clear ``is_quantized``.

    transformers sets ``model.is_quantized`` when it quantizes at load time and reads it in two places only: the
    Trainer refuses such a model unless it is a peft model ("You cannot perform fine-tuning on purely quantized
    models", ``trainer_utils.validate_quantization_for_training``), and ``.half()`` / ``.float()`` refuse it. The other
    signals that mark a model as adapted cannot be used: ``_hf_peft_config_loaded`` sends ``save_pretrained`` down
    transformers' peft path (adapter-only save through peft's own layer classes: it fails on QLoRALinear), and
    ``hf_quantizer.is_qat_trainable`` is a read-only property that would claim quantization-aware training.

    So the flag is cleared only when both guards have nothing left to protect: some LoRA weight trains, and no layer
    remains that a dtype cast would corrupt (QLoRALinear keeps its packed bytes under any cast; an untargeted
    bitsandbytes ``Params4bit`` stored as uint8 is untouched by ``.half()``, one stored as a float ``quant_storage``
    or an 8-bit ``Int8Params`` is not). ``hf_quantizer``, ``quantization_method``, ``config.quantization_config`` and
    ``is_loaded_in_4bit`` stay: ``save_pretrained`` still writes the bitsandbytes config beside the packed weights,
    and the Trainer still leaves device placement alone and does not wrap the model in DataParallel."""
    flagged = [m for m in model.modules() if m.__dict__.get("is_quantized") is True
               and getattr(m, "quantization_method", None) == "bitsandbytes"]  # QuantizationMethod is a str enum
    if not flagged:
        return
    if not any(p.requires_grad and _is_lora_param(n) for n, p in model.named_parameters()):
        return
    for p in model.parameters():
        name = type(p).__name__
        if name == "Int8Params" or (name == "Params4bit" and not isinstance(p, Params4bit) and p.dtype != torch.uint8):
            logger.info("apply_qlora: model.is_quantized left set (transformers' Trainer will refuse the model): a "
                        "bitsandbytes layer that a dtype cast would corrupt is still there; target it too, or load "
                        "the model in float and let apply_qlora quantize it")
            return
    for m in flagged:
        m.is_quantized = False


def _drop_bnb_load_conversions(model: nn.Module) -> None:
    """Forget the bitsandbytes deserialization transformers recorded when it loaded a 4-bit checkpoint, so that
    ``save_pretrained`` (and a plain Trainer's checkpoints, which call it) work.

    transformers 5 keeps the conversions it applied at load (``model._weight_conversions``) and reverses them in
    ``save_pretrained``; the one that gathers ``weight`` / ``weight.absmax`` / ... into a ``Params4bit``
    (``Bnb4bitDeserialize``) has no reverse and raises ``NotImplementedError`` (transformers
    5.23: a model loaded from a 4-bit checkpoint cannot be saved, with or without LoRA, merged or not; its PR #45743
    was closed unmerged). Its reverse is the identity: ``QLoRALinear`` and bitsandbytes' ``Linear4bit`` both give
    their state dict in that serialized form already (a model quantized at load, which records no such conversion,
    saves exactly those keys). Other conversions (renamings) are kept."""
    for m in model.modules():
        convs = m.__dict__.get("_weight_conversions")
        if not convs:
            continue
        kept = [c for c in convs
                if not any(type(op).__name__ == "Bnb4bitDeserialize" for op in getattr(c, "operations", None) or ())]
        if len(kept) != len(convs):
            m._weight_conversions = kept


def _mark_bnb_model_quantized(model: nn.Module) -> None:
    """Undo ``_mark_bnb_model_trainable`` once the adapters are merged or deleted: a model transformers loaded in 4 bits
    that keeps its bitsandbytes config (4-bit layers remain, now without LoRA) is a purely quantized model again, and
    transformers' guards (Trainer, ``.half()`` / ``.float()``) apply to it as before apply_qlora."""
    for m in model.modules():
        if (m.__dict__.get("is_quantized") is False and getattr(m, "hf_quantizer", None) is not None
                and getattr(m, "quantization_method", None) == "bitsandbytes"):
            m.is_quantized = True


def _kept_in_float(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{name: pattern}`` for the modules among ``names`` that transformers never quantizes: those matching the
    ``_keep_in_fp32_modules`` of the model or of a transformers model inside it (names relative to that model), by
    transformers' rule (``quantizers_utils.should_convert_module``: the pattern as a regex from the start up to a
    ``.`` boundary, or a plain suffix). Its bitsandbytes loader leaves them float for this list."""
    out: dict[str, str] = {}
    for prefix, m in model.named_modules():
        patterns = getattr(m, "_keep_in_fp32_modules", None)
        if not patterns or not isinstance(patterns, (list, tuple, set)):
            continue
        for n in names:
            if prefix and not n.startswith(prefix + "."):
                continue
            hit = transformers_skip(n[len(prefix) + 1:] if prefix else n, patterns)
            if hit is not None:
                out.setdefault(n, hit)
    return out


def _expert_parameters(model: nn.Module) -> list[str]:
    """The parameters (by name suffix, e.g. ``experts.gate_up_proj``) that peft's ``"all-linear"`` adapts besides the
    Linear layers: transformers 5 stores a mixture of experts' weights as 3-D parameters (Mixtral, Qwen3-MoE, ...;
    the router may be a custom module), and peft maps "all-linear" onto them (``target_parameters``,
    ``peft.utils.transformers_weight_conversion``). Asked of peft when it is installed; else every floating 3-D
    parameter outside a convolution."""
    try:
        import peft
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except Exception:  # peft absent, or its private module moved: the structural rule below
        peft = None
    if peft is not None and hasattr(getattr(model, "config", None), "model_type"):
        cfg = peft.LoraConfig(target_modules=ALL_LINEAR)
        try:
            convert_peft_config_for_transformers(cfg, model=model, conversions=get_model_conversion_mapping(model))
            return sorted(cfg.target_parameters or ())
        except Exception:  # noqa: S110 - any failure of peft's private helper: fall back to the rule below
            pass
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    found = set()
    for prefix, m in model.named_modules():
        if isinstance(m, convs):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() == 3 and p.is_floating_point():
                found.add(f"{prefix.rsplit('.', 1)[-1]}.{pname}" if prefix else pname)
    return sorted(found)


def _check_no_expert_parameters(model: nn.Module, names: list[str]) -> None:
    """"all-linear" on a mixture of experts: peft adapts the expert weights too; qkernels cannot (it replaces Linear
    layers), so the experts, most of such a model, would stay in float without LoRA. Refuse; name the list to pass."""
    experts = _expert_parameters(model)
    if experts:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"target_modules='all-linear' on {type(model).__name__}: peft's all-linear also adapts its expert "
            f"parameters {experts} (peft's target_parameters: the experts' 3-D weights, the router), which qkernels "
            "can neither quantize nor give LoRA (it replaces nn.Linear / Conv1D layers only); they would stay in "
            "float, without adapters. "
            f"Pass the Linear layers explicitly, e.g. target_modules={leaves!r}")


def _loaded_in_4bit(model: nn.Module) -> bool:
    """A model bitsandbytes quantized at load time and still is, or holding a 4-bit bitsandbytes layer. transformers
    sets ``is_loaded_in_4bit`` at load and leaves it set when the model becomes dense (its ``dequantize()``, or
    ``merge_and_unload``), so the flag counts only while its bitsandbytes ``quantization_config`` is there (both drop
    that): apply_qlora on a merged model kept every target float, quantizing nothing."""
    return any(_is_bnb_4bit(m) or (m.__dict__.get("is_loaded_in_4bit") is True and has_bnb_config(m))
               for m in model.modules())


def _float_base_names(model: nn.Module, names: list[str], keep_float_modules: Any, init: Any,
                      stored_float: Iterable[str] = ()) -> set[str]:
    """The targets that keep a float base weight, where peft on a bitsandbytes-loaded model puts LoRA on a float layer:

    - ``_keep_in_fp32_modules`` matches (``_kept_in_float``): transformers never quantizes them, and T5's feed-forward
      casts its input to ``wo.weight.dtype`` (a 4-bit weight's packed uint8 made its logits silently wrong, 4.2 off);
    - targets whose weight is tied to another module's (``_tied_targets``: a head tied to the input embeddings,
      ``tie_word_embeddings``): transformers' bitsandbytes loader never quantizes tied weights
      (``quantizers/base.py`` ``get_keys_to_not_convert``), and peft puts LoRA on the float head, still tied;
    - on a model loaded in 4 bits (``_loaded_in_4bit``), every float ``nn.Linear`` / ``Conv1D`` target: bitsandbytes
      left it float (``llm_int8_skip_modules``, the output head), and peft adapts it as it is;
    - ``keep_float_modules`` (peft's target rules; each entry must match a target);
    - ``stored_float``: on a meta model built from a bitsandbytes 4-bit config, the targets its checkpoint holds in
      float (``_stored_float``).

    Raises ValueError for what a float base cannot be: a bitsandbytes 4-bit layer, or ``init_lora_weights="loftq"``.
    """
    out = set(_kept_in_float(model, names)) | set(stored_float)
    tied = _tied_targets(model, names)
    if tied:
        logger.info("apply_qlora: %d target(s) share their weight with another module (tied), kept float as "
                    "transformers' bitsandbytes loader keeps them: %s", len(tied), sorted(tied)[:4])
    out |= set(tied)
    if isinstance(keep_float_modules, str):
        kept = {n for n in names if re.fullmatch(keep_float_modules, n)}
        if not kept:
            raise ValueError(f"keep_float_modules={keep_float_modules!r} (a regex, full match) matches none of the "
                             f"targets {_summarize(names)}")
        out |= kept
    elif keep_float_modules is not None:
        entries = list(keep_float_modules) if isinstance(keep_float_modules, Iterable) else None
        if not entries or not all(isinstance(e, str) and e for e in entries):
            raise ValueError(f"keep_float_modules must be a regex or a non-empty list of module names, got "
                             f"{keep_float_modules!r}")
        for e in entries:
            hit = {n for n in names if _is_target(n, [e])}
            if not hit:
                raise ValueError(f"keep_float_modules entry {e!r} matches none of the targets {_summarize(names)}; "
                                 "it names target modules to keep in float")
            out |= hit
    modules = dict(model.named_modules())
    if _loaded_in_4bit(model):  # transformers quantizes only `type(module) is nn.Linear` (replace_with_bnb_linear):
        # its subclasses (Falcon's FalconLinear) stay float too, and peft adapts them as they are; GPT-2's Conv1D too
        out |= {n for n in names if ((isinstance(modules[n], nn.Linear) and not _is_bnb_layer(modules[n]))
                                     or is_conv1d(modules[n]))
                and modules[n].weight.is_floating_point()}
    packed = sorted(n for n in out if _is_bnb_4bit(modules[n]))
    if packed:  # was: "linear.weight must be float32/float16/bfloat16 to quantize", after replacing earlier targets
        raise ValueError(f"target modules {packed[:4]} are to keep a float base, but they are bitsandbytes 4-bit "
                         "layers (the model was loaded in 4 bits): their float weight is gone. Leave them out of "
                         "keep_float_modules, or load the model with BitsAndBytesConfig(llm_int8_skip_modules=[...]) "
                         "naming them, which keeps them float")
    if out and init == "loftq":
        raise ValueError(f"init_lora_weights='loftq' fits LoRA to the 4-bit quantization error, but targets "
                         f"{sorted(out)[:4]} keep a float base (transformers keeps them float: kept in float32, tied "
                         "to another module, or left float on a 4-bit model; or keep_float_modules): leave them out "
                         "(exclude_modules) or use init_lora_weights=True")
    return out


def _targets_on_meta(modules: dict[str, nn.Module], names: list[str]) -> bool:
    """Every targeted Linear / Conv1D weight is on the meta device (and there is one): the model waits for a
    checkpoint (``init_empty_weights``, ``torch.device("meta")``) rather than holding weights to quantize."""
    weights = [modules[n].weight for n in names if _is_linear(modules[n])]
    return bool(weights) and all(w.is_meta for w in weights)


def _stored_float(model: nn.Module, names: list[str], cfg: ConfigFormat) -> dict[str, str]:
    """``{target: why}`` for the Linear targets that a transformers bitsandbytes 4-bit checkpoint with config ``cfg``
    holds in float, as transformers 5.23's loader leaves them (``replace_with_bnb_linear``, ``should_convert_module``
    through ``transformers_skip``): a subclass of ``nn.Linear`` (Falcon's ``FalconLinear``: it converts only
    ``type(m) is nn.Linear`` and ``Conv1D``), and a match of ``llm_int8_skip_modules``, or where that is None of its
    default skips (``get_keys_to_not_convert``: the output embedding and the module of the last parameter). Ties and
    ``_keep_in_fp32_modules``, which it skips too, are ``_float_base_names``' own rules."""
    modules = dict(model.named_modules())
    if cfg.skip_modules is not None:
        patterns, source = list(cfg.skip_modules), "llm_int8_skip_modules"
    else:
        params = [p for p, _ in model.named_parameters()]
        patterns = _output_embedding_names(model) + ([params[-1].removesuffix(".weight")] if params else [])
        source = "transformers' default skip (llm_int8_skip_modules is None)"
    out = {}
    for n in names:
        m = modules[n]
        if not _is_linear(m):
            continue
        if type(m) is not nn.Linear and not is_conv1d(m):
            out[n] = f"a {type(m).__name__}, not a plain nn.Linear"
        elif (hit := transformers_skip(n, patterns)) is not None:
            out[n] = f"{source} {hit!r}"
    return out


def _log_config_format(cfg: ConfigFormat, given: dict[str, Any], stored_float: dict[str, str], show: bool) -> None:
    """Say which format apply_qlora took from the meta model's quantization_config, and which targets it keeps float
    for it: to the ``qkernels`` logger, and to stderr when ``show``."""
    passed = [f"{k}={v!r}" for k, v in given.items() if not isinstance(v, Default)]
    lines = [f"apply_qlora: meta model, format from model.config.quantization_config (bitsandbytes 4-bit): "
             f"{cfg.describe()}" + (f"; passed: {', '.join(passed)}" if passed else "")
             + "; blocksize: each layer's checkpoint's, read at load"]
    if stored_float:
        first = next(iter(stored_float.items()))
        lines.append(f"apply_qlora: {len(stored_float)} target(s) stored in float by such a checkpoint, given a float "
                     f"base: {sorted(stored_float)[:4]}{' ...' if len(stored_float) > 4 else ''} ({first[0]!r}: "
                     f"{first[1]})")
    for line in lines:
        logger.info(line)
        if show:
            print(line, file=sys.stderr, flush=True)


def _tied_targets(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{target: the parameter it is tied to}`` for the targets whose weight is tied to another module's: the same
    Parameter held by both (``lm_head.weight is model.embed_tokens.weight``), or a tie a transformers model declares
    (``all_tied_weights_keys``, read as transformers' ``get_keys_to_not_convert`` reads it: keys and values), which
    holds before ``tie_weights()`` has run too (a model built under accelerate's ``init_empty_weights`` is untied until
    then)."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    declared: dict[str, str] = {}
    done: list[str] = []
    for prefix, m in model.named_modules():
        pre = f"{prefix}." if prefix else ""
        if any(pre.startswith(d) for d in done):  # inside a transformers model already read (with its submodels)
            continue
        ties = _declared_ties(m)
        if ties is None:
            continue
        done.append(pre)
        for k, v in ties.items():
            if isinstance(k, str) and isinstance(v, str):
                declared.setdefault(pre + k, pre + v)
                declared.setdefault(pre + v, pre + k)
    out = {}
    for n in names:
        w = getattr(model.get_submodule(n), "weight", None)
        others = [o for o in owners.get(id(w), []) if o != f"{n}.weight"]
        if others:
            out[n] = others[0]
        elif f"{n}.weight" in declared:
            out[n] = declared[f"{n}.weight"]
    return out


def _declared_ties(m: nn.Module) -> dict[str, str] | None:
    """The ``{target: source}`` ties a transformers model declares under its current config, as ``tie_weights()``
    recomputes them (``get_expanded_tied_weights_keys(all_submodels=True)``: a config changed to
    ``tie_word_embeddings=False`` unties); ``all_tied_weights_keys`` (set at init) where that is missing. None: not a
    transformers model."""
    get = getattr(m, "get_expanded_tied_weights_keys", None)
    if callable(get):
        try:
            ties = get(all_submodels=True)
        except Exception:  # noqa: BLE001 - a transformers internal: any failure falls back to the attribute
            ties = None
        if isinstance(ties, dict):
            return ties
    ties = getattr(m, "all_tied_weights_keys", None)
    return ties if isinstance(ties, dict) else None


def _check_not_tied(model: nn.Module, names: list[str]) -> None:
    """Refuse to quantize a Linear whose weight is shared with another module (a head tied to the input embeddings,
    ``tie_word_embeddings``): a 4-bit weight cannot be shared with the float embedding, and transformers'
    ``tie_weights()`` (run by ``from_pretrained``, ``resize_token_embeddings``, ...) would assign the embedding back
    over the packed weight. transformers' bitsandbytes loader never quantizes tied weights either. (``apply_qlora``
    gives such a target a float base that keeps sharing the weight, as peft does; this guards the paths that
    quantize: ``quantize_checkpoint``.)"""
    tied = _tied_targets(model, names)
    if tied:
        n, other = next(iter(tied.items()))
        raise ValueError(
            f"target module {n!r} shares its weight with {other!r} (tied weights, e.g. tie_word_embeddings): a 4-bit "
            "weight cannot be shared with the float embedding, and transformers' tie_weights() would later overwrite "
            "the packed weight (its bitsandbytes loader never quantizes tied weights). Leave it out "
            f"(exclude_modules=[{n.rpartition('.')[2]!r}]): it stays float, and apply_qlora gives it LoRA on that "
            "float weight, still tied; or untie it first: give it its own weight (module.weight = "
            "nn.Parameter(module.weight.detach().clone())) and set config.tie_word_embeddings = False")


def _check_not_read_by_parent(model: nn.Module, names: list[str]) -> None:
    """Refuse a Linear whose parent reads its weight instead of calling it: ``nn.MultiheadAttention`` always hands
    ``out_proj.weight`` to ``F.multi_head_attention_forward``, and ``nn.TransformerEncoderLayer``'s inference fast
    path (eval, no grad) hands ``linear1`` / ``linear2.weight`` to ``torch._transformer_encoder_layer_fwd``: a 4-bit
    layer there fails inside torch (a Float x Byte matmul). peft's "all-linear" wraps them all the same (its LoRA
    never runs where the weight is read directly)."""
    readers = (nn.MultiheadAttention, nn.TransformerEncoderLayer)
    bad = {}
    for n in names:
        parent = model.get_submodule(n.rpartition(".")[0]) if "." in n else model
        if isinstance(parent, readers):
            bad[n] = type(parent).__name__
    if bad:
        # the last two name parts (self_attn.out_proj), or the leaf when its parent is a list index (layers.0.linear1)
        parts = [n.split(".") for n in bad]
        hint = sorted({p[-1] if len(p) < 2 or p[-2].isdigit() else ".".join(p[-2:]) for p in parts})
        raise ValueError(
            f"target modules {list(bad)[:4]}{' ...' if len(bad) > 4 else ''} belong to {sorted(set(bad.values()))}, "
            "which read(s) the layer's weight directly (torch's fused attention / encoder-layer fast path) instead "
            f"of calling it: a 4-bit layer's packed weight cannot be read there, and a LoRA term would never run "
            f"(on a float base too). Leave them out: exclude_modules={hint!r}")


def _is_bnb_layer(m: nn.Module) -> bool:
    """A bitsandbytes layer (``Linear4bit``, ``Linear8bitLt``): an ``nn.Linear`` subclass with its own forward, handled
    by ``from_bnb`` (4-bit) or refused (8-bit) on its own terms."""
    return type(getattr(m, "weight", None)).__name__ in ("Params4bit", "Int8Params")


def _linear_forward_differs(m: nn.Linear) -> str | None:
    """Why ``m``'s own ``forward`` is not ``x @ W^T + b`` (None when it is, when ``m`` does not override it, or when
    its weight is not float, which apply_qlora refuses on its own).

    Checked on one seeded 2-row input in the weight's dtype, hooks bypassed: the output must be one tensor of shape
    ``[2, out_features]`` and, on real weights, within twice the float rounding bound of ``F.linear``
    (``2 * gamma_K * (|x| @ |W|^T + |b|)``, K = in_features: the two only differ in summation order). On the meta
    device only the type and shape can be checked."""
    w, b = m.weight, m.bias
    if type(m).forward is nn.Linear.forward or not w.is_floating_point():  # integer weights: apply_qlora names them
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, m.in_features, generator=g).to(w.dtype).to(w.device)
    try:
        with torch.no_grad():
            y = type(m).forward(m, x)
    except Exception as e:  # noqa: BLE001 - any failure on a plain [2, in] input means it is not a plain linear
        return f"its forward fails on a [2, {m.in_features}] input ({type(e).__name__}: {e})"
    if not isinstance(y, torch.Tensor) or y.shape != (2, m.out_features):
        got = type(y).__name__ if not isinstance(y, torch.Tensor) else f"a tensor of shape {tuple(y.shape)}"
        return f"its forward returns {got}, not one [2, {m.out_features}] tensor for a [2, {m.in_features}] input"
    if w.is_meta:
        return None
    with torch.no_grad():
        want = nn.functional.linear(x, w, b)
        eps = torch.finfo(w.dtype).eps / 2
        magnitude = x.abs().float() @ w.abs().float().t() + (0 if b is None else b.abs().float())
        bound = 2 * m.in_features * eps * magnitude
        err = (y.float() - want.float()).abs()
    if not bool((err <= bound).all()):
        return (f"its forward differs from x @ W^T + b by up to {float(err.max()):.3g} (rounding allows "
                f"{float(bound.max()):.3g})")
    return None


def _check_forward_is_linear(model: nn.Module, names: list[str]) -> None:
    """Refuse a target whose class subclasses ``nn.Linear`` but computes something else in its own ``forward``:
    replacing it by a ``QLoRALinear`` (``x @ W^T + b`` plus LoRA) would change what the model computes. A router that
    returns a tuple (Llama 4's ``Llama4Router``, PhiMoE's ``PhimoeTopKRouter``) made the model crash after apply_qlora,
    a grouped projection (``DeepseekV4GroupedLinear``) would have given other numbers. peft's ``"all-linear"`` selects
    them (``isinstance(module, nn.Linear)``) and its ``lora.Linear`` calls their forward, which then fails on the
    tuple. Subclasses whose forward is the plain product (Falcon's ``FalconLinear``: ``x @ W.T + b``) pass."""
    modules = dict(model.named_modules())
    bad = {}
    for n in names:
        m = modules[n]
        if isinstance(m, nn.Linear) and not isinstance(m, QLoRALinear) and not _is_bnb_layer(m):
            why = _linear_forward_differs(m)
            if why is not None:
                bad[n] = f"{type(m).__name__}: {why}"
    if bad:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in bad})
        first = next(iter(bad))
        raise ValueError(
            f"target modules {list(bad)[:4]}{' ...' if len(bad) > 4 else ''} subclass nn.Linear but their forward is "
            f"not x @ W^T + b ({first!r} is a {bad[first]}); a QLoRALinear in their place would compute "
            f"something else. Leave them out: exclude_modules={leaves!r}")


def _is_lora_param(pname: str) -> bool:
    return any(f".{k}." in f".{pname}" for k in ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A",
                                                 "lora_embedding_B", "trainable_tokens_delta"))


def _raise_no_layer_match(model: nn.Module, target_modules: Any, exclude_modules: Any, layers_to_transform: Any,
                          layers_pattern: Any, modules_to_save: Any) -> None:
    """Every target entry matched something, yet nothing is left: say which filter removed it and what exists."""
    if not match_target_modules(model, target_modules, exclude_modules):
        raise ValueError(f"every module matched by target_modules {target_modules!r} is excluded by "
                         f"exclude_modules {exclude_modules!r}; nothing to replace")
    matched = match_target_modules(model, target_modules, exclude_modules, modules_to_save=modules_to_save)
    if not matched:
        raise ValueError(f"every module matched by target_modules {target_modules!r} is a module to save "
                         f"(modules_to_save={modules_to_save!r}) or inside one; nothing to replace")
    found = sorted({i for i in (layer_index(n, layers_pattern) for n in matched) if i is not None})
    lists = sorted({m["list"] for n in matched if (m := re.match(r".*?(?:^|\.)(?P<list>[^.]+)\.\d+\.", n))})
    where = f"layers_pattern={layers_pattern!r}" if layers_pattern else "the default layer pattern"
    raise ValueError(
        f"layers_to_transform={layers_to_transform!r} selects none of the {len(matched)} modules matched by "
        f"target_modules {target_modules!r}: their layer indices under {where} are {found or 'none'} (layer "
        f"lists in their names: {lists}; e.g. {matched[:2]}). Pass indices among those, or layers_pattern naming the "
        "layer list (peft's default needs a prefix before it, e.g. 'model.layers.3...')")


def _summarize(names: list[str], limit: int = 30) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = names[:limit]
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{shown}{more} (distinct names: {leaves})"


def _check_each_target_matches(model: nn.Module, target_modules: Any, exclude_modules: Any, names: list[str],
                               linear_names: list[str]) -> None:
    if isinstance(target_modules, str):
        if not names and not match_target_modules(model, target_modules):  # all excluded: _raise_no_layer_match says
            hint = ""
            if re.sub(r"[^a-z]", "", target_modules.lower()) == "alllinear":
                hint = f" Did you mean {ALL_LINEAR!r}?"
            elif match_target_modules(model, [target_modules]):  # a name, read as a regex of the whole name
                hint = (" A string is a regex that must match the whole module name (peft's rule); for the modules "
                        f"named {target_modules!r} pass a list, target_modules=[{target_modules!r}].")
            raise ValueError(f"target_modules {target_modules!r} matches no module of {type(model).__name__}.{hint} "
                             f"Linear layers: {_summarize(linear_names)}")
        return
    for t in target_modules:  # an entry whose matches are all excluded is not a typo: check before exclusion
        if not match_target_modules(model, [t]):
            raise ValueError(f"target_modules entry {t!r} matches no module of {type(model).__name__} (an entry "
                             f"matches a module name or its last dotted parts, e.g. 'q_proj' matches "
                             f"'model.layers.0.self_attn.q_proj'). Linear layers: {_summarize(linear_names)}")


# --------------------------------------------------------------------------------------------- counting
def _count(p: torch.Tensor) -> int:
    n = p.numel()
    if type(p).__name__ == "Params4bit":  # packed: two 4-bit values per byte (peft's rule)
        n = n * 2 * p.element_size()
    return n


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Returns ``(trainable, total)`` parameter counts of ``model`` (any ``nn.Module``), counted as peft's
    ``get_nb_trainable_parameters``: a packed 4-bit ``Params4bit`` of ``numel`` elements of ``element_size`` bytes
    counts ``numel * 2 * element_size`` parameters."""
    trainable = total = 0
    for _, p in model.named_parameters():
        n = _count(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print peft's line for ``model``: ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330``
    (counted by ``trainable_parameters``)."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


# --------------------------------------------------------------------------------------------- merging
def _qlora_layers(model: nn.Module) -> list[tuple[str, QLoRALinear | QLoRAEmbedding]]:
    """The adapter layers in ``named_modules()`` order: peft merges in that order too (``_unload_and_optionally_merge``
    walks ``named_modules``), which matters when two of them write into one tied weight."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QLoRALinear, QLoRAEmbedding))]


def _merged_weight(layer: QLoRALinear) -> torch.Tensor:
    """``dequant(W) + s B A`` (a float base: ``W + s B A``) in float32 (the active adapter; none when disabled). A DoRA
    adapter: ``(m / ||W + s B A||_row) * (W + s B A)``, peft's merge (``qkernels.dora.dora_merged_weight``)."""
    if layer._unloaded:  # a meta layer, or one to_empty() left without values: nothing to merge
        layer._raise_unloaded()
    name = None if layer.disable_adapters else layer.active_adapter
    if name is not None and layer.is_dora(name):
        from .dora import dora_merged_weight

        # peft merges from the weight dequantized to its quant-state dtype (bnb.py:384), promoted with the float32
        # delta (variants.py:192)
        W = layer._dora_base_weight(layer.float_dtype if not layer.quantized else layer.weight.quant_state.dtype)
        return dora_merged_weight(W.float(), layer.lora_A[name].weight, layer.lora_B[name].weight,
                                  layer.lora_magnitude_vector[name].weight, layer.scaling[name]).float()
    W = layer.dequantized_weight(torch.float32)
    if name is not None:
        W = W + layer.lora_delta().to(W.device)
    return W


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("the model itself is a QLoRALinear; merge it with qkernels.merge_and_unload on a parent")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace each ``QLoRALinear`` by a dense ``nn.Linear`` with weight ``dequant(W) + s B A`` and its bias.

    A DoRA adapter (``use_dora``) merges as peft's ``merge_safe``: ``(m / ||W + s B A||_row) * (W + s B A)`` with W
    dequantized to its quant-state dtype (``qkernels.dora.dora_merged_weight``).

    A layer made from a transformers ``Conv1D`` (GPT-2's c_attn / c_proj / c_fc; ``is_target_conv_1d_layer``) becomes
    a ``Conv1D`` again, weight ``(dequant(W) + s B A)^T`` of shape ``[in, out]``, as peft's merge_and_unload gives:
    ``save_pretrained`` / ``from_pretrained`` then read the layout the model class expects.

    The sum is formed in float32 and rounded once to the layer's ``float_dtype``: the dtype of the weight before
    quantization, or the one the model was last cast to with ``.half()`` / ``.to(dtype)``; the dtype of the
    activations around the layer. Not ``compute_dtype``: that only sets the precision of the layer's own matmul
    (its output is cast back to the input's dtype), and a bf16 ``nn.Linear`` in a float32 model fails on its
    float32 input. Nothing is requantized. A float-base layer (``quantized`` False) gives ``W + s B A`` in its weight's
    dtype, as peft's merge of a plain ``nn.Linear``, written into its own weight Parameter as peft writes into its base
    layer's: a weight tied to another module (a head tied to the input embeddings) stays tied, so that module (the
    embeddings) changes too, exactly as in peft's merge_and_unload; a UserWarning says so, as peft warns. The merged
    weight is frozen
    (as peft leaves a merged base weight). Each module to save (``ModulesToSaveWrapper``) is replaced by the module
    it runs: the active adapter's copy, or the original module when adapters are disabled or the active adapter has
    no copy (peft's ``unload``). A transformers model that was loaded in 4 bits by bitsandbytes loses its
    ``config.quantization_config`` once no 4-bit layer is left (as after transformers' ``model.dequantize()``), so
    ``save_pretrained`` / ``from_pretrained`` round-trip the merged model. Returns ``model`` (modified in place; a
    ``torch.compile`` wrapper stays one, around the merged model).
    """
    outer, model = model, unwrap_compiled(model)
    _check_bias_mergeable(_qlora_layers(model))
    _unwrap_modules_to_save(model)
    layers = _qlora_layers(model)
    _warn_tied_merge(model, layers)
    for name, layer in layers:
        _replace(model, name, layer.merged_embedding() if isinstance(layer, QLoRAEmbedding) else _dense(layer))
    _drop_quantization_config(model)
    _mark_bnb_model_quantized(model)
    return outer


def _warn_tied_merge(model: nn.Module, layers: list[tuple[str, QLoRALinear]]) -> None:
    """peft's ``_check_merge_allowed`` warning, for the float bases whose weight another module shares: merging
    writes ``W + s B A`` into the shared Parameter, so that module (the input embeddings) changes too."""
    merging = [n for n, m in layers if not m.quantized and m.active_adapter is not None and not m.disable_adapters]
    tied = _tied_targets(model, merging)
    if tied:
        n, other = next(iter(tied.items()))
        warnings.warn(
            f"merging LoRA into {n!r}, whose weight is tied to {other!r} (tie_word_embeddings): the merged weight "
            "W + s B A is written into the shared Parameter, so that module changes too and the tie stays (what peft's "
            "merge_and_unload does). To merge into one module alone, untie it first: module.weight = "
            "nn.Parameter(module.weight.detach().clone()) and config.tie_word_embeddings = False",
            UserWarning,
            stacklevel=3,
        )


def _check_bias_mergeable(layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse, before any change, a merge of a ``lora_bias`` adapter into a layer without a bias (peft raises
    "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")."""
    for name, layer in layers:
        active = None if layer.disable_adapters else layer.active_adapter
        if isinstance(layer, QLoRALinear) and active is not None and layer.has_lora_bias(active) and layer.bias is None:
            raise RuntimeError(f"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias "
                               f"(module {name!r}, adapter {active!r}; peft's message). A merged nn.Linear with a new "
                               "bias would not match the model's checkpoints; keep the adapter unmerged")


def _merged_bias(layer: QLoRALinear) -> torch.Tensor | None:
    """The merged layer's bias: the base bias plus ``scaling * b_B`` for an active ``lora_bias`` adapter, in the base
    bias's dtype (peft's ``bias.data += lora_B.bias * scaling``, layer.py:1041; its bitsandbytes 4-bit merge,
    bnb.py:404, adds b_B unscaled, unlike its forward: qkernels keeps the forward's ``s * b_B``)."""
    if layer.bias is None:
        return None
    b = layer.bias.detach()
    name = None if layer.disable_adapters else layer.active_adapter
    if name is not None and layer.has_lora_bias(name):
        b = (b + layer.lora_B[name].bias.detach() * layer.scaling[name]).to(b.dtype)
    return b.clone()


def _dense(layer: QLoRALinear) -> nn.Module:
    """The merged dense layer of ``layer`` (``merge_and_unload``): an ``nn.Linear`` (a ``Conv1D`` for one made from a
    Conv1D) of ``float_dtype`` holding ``W + s B A``, its bias, its training mode. A float base's merged weight is
    written into its own Parameter (peft merges into its base layer's weight in place), which the dense layer takes:
    a tie to another module survives."""
    dtype = layer.float_dtype
    with torch.no_grad():
        W = _merged_weight(layer).to(dtype)
    if not layer.quantized:
        return _dense_float_base(layer, W)
    if getattr(layer, "is_target_conv_1d_layer", False):  # absent on a layer pickled by an older qkernels
        dense = _conv1d(W, _merged_bias(layer))
        dense.bias.requires_grad_(layer.bias is not None and layer.bias.requires_grad)
    else:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=W.device, dtype=dtype)
        dense.weight = nn.Parameter(W, requires_grad=False)
        if layer.bias is not None:
            dense.bias = nn.Parameter(_merged_bias(layer), requires_grad=layer.bias.requires_grad)
    dense.train(layer.training)  # a merged model in eval mode stays so
    return dense


def _dense_float_base(layer: QLoRALinear, W: torch.Tensor) -> nn.Module:
    """``_dense`` of a float base: ``W`` (``[out, in]``, the weight's dtype) copied into the layer's weight Parameter
    (``[in, out]`` for a Conv1D), which the new ``nn.Linear`` / ``Conv1D`` holds; the bias copied."""
    w = layer.weight
    conv = layer._weight_in_out
    with torch.no_grad():
        w.copy_(W.t() if conv else W)
    w.requires_grad_(False)
    with torch.device("meta"):  # no throwaway allocation and init
        if conv:
            from transformers.pytorch_utils import Conv1D  # the layer came from a Conv1D: transformers is installed

            dense = Conv1D(layer.out_features, layer.in_features)
        else:
            dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    dense.weight = w
    if layer.bias is not None:
        dense.bias = nn.Parameter(_merged_bias(layer), requires_grad=layer.bias.requires_grad)
    elif conv:  # Conv1D always has a bias: zeros, as Conv1D initializes it
        dense.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=w.dtype, device=w.device), requires_grad=False)
    dense.train(layer.training)
    return dense


def _drop_quantization_config(model: nn.Module) -> None:
    """A transformers model loaded in 4 bits (``BitsAndBytesConfig``) whose quantized layers are now all dense: drop
    its quantization config as transformers' own ``model.dequantize()`` does. Left in place, ``save_pretrained``
    writes ``quantization_config`` beside float weights and ``from_pretrained`` fails on them (an AssertionError in
    bitsandbytes). Kept while any bitsandbytes layer remains (e.g. a Linear4bit that was not a target), and for any
    other quantization method (GPTQ, AWQ, ...: their layers are not nn.Linear, apply_qlora never replaced them)."""
    if not has_bnb_config(model):
        return
    cfg = model.config
    if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters()):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
        return
    del cfg.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _conv1d(W: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A transformers ``Conv1D`` computing ``x @ W^T + bias`` (``W [out, in]``; its weight is ``W^T``, ``[in, out]``),
    as peft's merge_and_unload gives back for a GPT-2 layer: GPT-2 checkpoints store c_attn / c_fc / c_proj
    ``[in, out]``, so an ``nn.Linear`` there would be saved transposed. Conv1D always has a bias: zeros when the layer
    had none (what ``Conv1D`` itself initializes)."""
    from transformers.pytorch_utils import Conv1D  # the layer came from a Conv1D: transformers is installed

    out_features, in_features = W.shape
    with torch.device("meta"):  # no throwaway [in, out] allocation and init
        conv = Conv1D(out_features, in_features)
    conv.weight = nn.Parameter(W.t().contiguous(), requires_grad=False)
    b = bias.detach().clone() if bias is not None else torch.zeros(out_features, dtype=W.dtype, device=W.device)
    conv.bias = nn.Parameter(b, requires_grad=bias.requires_grad if bias is not None else False)
    return conv


def _unwrap_modules_to_save(model: nn.Module) -> None:
    from .trainable_tokens import unwrap_trainable_tokens

    unwrap_trainable_tokens(model, merge=True)  # peft's TrainableTokensWrapper.unload_and_optionally_merge_module
    for name, w in wrapper_modules(model)[::-1]:  # inner first (they cannot nest, but names stay valid either way)
        _replace(model, name, w.running_module())


def merge_into_4bit(model: nn.Module) -> dict[str, float]:
    """Opt-in: requantize ``dequant(W) + s B A`` of each ``QLoRALinear`` of ``model`` (in place) to 4 bits and drop
    its adapters.

    Requantizing loses most of what a small adapter adds (a LoRA update is usually far below one 4-bit step),
    so this warns (``UserWarning``) with the error introduced. Each layer keeps its quant_type, blocksize,
    double_quant and storage; afterwards it runs as a plain 4-bit linear (no adapters). Modules to save are replaced
    by the module they run, as in ``merge_and_unload``.

    Returns ``{module_name: ||M - dequant(quantize_4bit(M))||_F / ||M||_F}`` with ``M = dequant(W) + s B A`` (a DoRA
    adapter: ``M`` its merged weight as in ``merge_and_unload``, and ``s B A`` below is ``M - dequant(W)``), and
    the same for the change of the layer's effective weight relative to the unmerged one, under
    ``"<name>.delta_lost"``: ``||dequant(Q_new) - M||_F / ||s B A||_F`` (1.0 = the adapter is entirely lost).

    A float-base layer (``quantized`` False: kept float, as transformers keeps T5's ``wo``) is never quantized: it
    becomes the dense ``nn.Linear`` ``merge_and_unload`` gives, exactly ``W + s B A``, and has no entry.
    """
    errors: dict[str, float] = {}
    model = unwrap_compiled(model)  # the uncompiled model's names in the result
    _check_bias_mergeable(_qlora_layers(model))
    _unwrap_modules_to_save(model)
    layers = _qlora_layers(model)
    _warn_tied_merge(model, layers)
    for name, layer in layers:
        if isinstance(layer, QLoRAEmbedding):  # never quantized: merged as merge_and_unload merges it
            _replace(model, name, layer.merged_embedding())
            continue
        if not layer.quantized:
            _replace(model, name, _dense(layer))
            continue
        st = layer.weight.quant_state
        with torch.no_grad():
            M = _merged_weight(layer)
            packed, state = quantize_4bit(M.to(st.dtype).contiguous(), st.blocksize, st.quant_type, st.nested,
                                          layer.weight.dtype)
            diff = dequantize_4bit(packed, state, torch.float32) - M
            m_norm = float(torch.linalg.vector_norm(M.double()))
            errors[name] = float(torch.linalg.vector_norm(diff.double())) / (m_norm or 1.0)
            if layer.active_adapter is not None and not layer.disable_adapters:
                # what the adapter adds: s B A, or for DoRA the whole change of the effective weight
                delta = (M - layer.dequantized_weight(torch.float32) if layer.is_dora(layer.active_adapter)
                         else layer.lora_delta())
                d_norm = float(torch.linalg.vector_norm(delta.double()))
                if d_norm > 0:
                    errors[name + ".delta_lost"] = float(torch.linalg.vector_norm(diff.double())) / d_norm
        layer.weight = Params4bit(packed, False, state)
        if layer.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(_merged_bias(layer))  # + s * b_B of a lora_bias adapter
        for adapter in list(layer.lora_A):
            layer.delete_adapter(adapter)
    _mark_bnb_model_quantized(model)
    if errors:
        rel = {k: v for k, v in errors.items() if not k.endswith(".delta_lost")}
        worst = max(rel, key=rel.get)
        lost = [v for k, v in errors.items() if k.endswith(".delta_lost")]
        warnings.warn(
            f"merge_into_4bit requantized {len(rel)} layers: relative Frobenius error of the merged weight up to "
            f"{rel[worst]:.3e} ({worst!r})" + (f"; requantization error is {max(lost):.2f}x the norm of the LoRA "
                                               "update it was meant to add" if lost else "")
            + ". Use qkernels.merge_and_unload for an exact dense merge.",
            UserWarning,
            stacklevel=2,
        )
    return errors
