"""peft's ``trainable_token_indices``: train only some rows of the input embedding (new special tokens) beside LoRA.

peft 0.21.2 (``LoraConfig(trainable_token_indices=[...] or {"embed_tokens": [...]})``, ``peft/utils/other.py``
``set_additional_trainable_modules`` and ``TrainableTokensWrapper``, ``peft/tuners/trainable_tokens/layer.py``) wraps
the embedding; this module does the same, with the same layout and rules:

- ``<name>.token_adapter.base_layer`` is the frozen embedding (in state dicts under ``<name>.weight``, the key it had);
  ``<name>.token_adapter.trainable_tokens_delta`` a ``ParameterDict`` with one ``[len(indices), embedding_dim]``
  Parameter per adapter, started from the rows it replaces, float32 for a float16 / bfloat16 weight (peft's
  ``autocast_adapter_dtype``), else the weight's dtype. Despite its name it holds the new rows themselves, not a
  difference: the forward looks tokens up in ``W.index_copy(0, indices, delta.to(W))`` (the gradient reaches the
  chosen rows only). A transformers
  scaled embedding (Gemma's ``embed_scale``) multiplies the lookup by its scale, as peft's ``_get_embed_scale``.
- A model whose config ties the head to the input embeddings (``tie_word_embeddings``) gets a *tied* wrapper on each
  module sharing the embedding's weight (``lm_head``): ``F.linear(x, W')`` with the same replaced rows, the same
  Parameters (nothing of its own is saved), as peft's tied ``TrainableTokensLayer``.
- The adapter file holds ``base_model.model.<name>.token_adapter.trainable_tokens_delta`` per wrapped embedding (tied
  ones are not written), its config the indices.
- One adapter runs at a time (``set_adapter``); an adapter without rows here, or adapters disabled, runs the embedding
  as it is. ``merge_and_unload`` writes the running adapter's rows into the embedding weight (shared with a tied head,
  which then sees them too) and puts the embedding back.

Not kept from peft: ``trainable_tokens_original`` (a copy of the replaced rows, which peft needs to unmerge in place;
qkernels never merges in place, ``merge_and_unload`` is final), and its tolerance of repeated indices (``index_copy``
with a repeated index keeps an unspecified one of the rows: refused here). As with peft's wrapper, ``.weight`` is the
merged weight (a tensor, not a Parameter), so transformers' ``tie_weights()`` cannot run on a model with trainable
tokens on a tied embedding (``get_parameter`` refuses it); the tie itself is kept by the wrappers.

peft refuses trainable tokens on an embedding that also has LoRA (``TypeError: trainable_token_indices cannot be
applied to modules of type <class 'peft.tuners.lora.layer.Embedding'>``) and on a module to save; so does qkernels.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TrainableTokensWrapper", "token_wrappers"]

DELTA_KEY = "token_adapter.trainable_tokens_delta"  # peft's key suffix in the adapter file


class _TokenAdapter(nn.Module):
    """peft's ``TrainableTokensLayer`` data: ``base_layer`` and the per-adapter rows (``trainable_tokens_delta``)."""

    def __init__(self, base_layer: nn.Module, tied: bool):
        super().__init__()
        self.base_layer = base_layer
        if not tied:  # a tied adapter reads its source's rows (held outside the module tree: not saved twice)
            self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}


class TrainableTokensWrapper(nn.Module):
    """An embedding (or a head tied to it) whose rows ``token_indices[adapter]`` are replaced by trainable values.

    Args:
        base_layer: an ``nn.Embedding`` (or a transformers scaled word embedding); a tied wrapper: the ``nn.Linear``
            head sharing the embedding's weight.
        source: None for the embedding's own wrapper; for a tied head, the embedding's wrapper whose rows it uses.
    """

    def __init__(self, base_layer: nn.Module, source: TrainableTokensWrapper | None = None):
        super().__init__()
        self.token_adapter = _TokenAdapter(base_layer, tied=source is not None)
        self._source = [source] if source is not None else []  # a list: not a submodule, not in the state dict
        self.active_adapter: str | None = None
        self.disable_adapters = False
        base_layer.requires_grad_(False)
        # the base layer's keys under the wrapper's own name in state dicts (model.embed_tokens.weight, lm_head.weight),
        # as QLoRALinear / QLoRAEmbedding keep theirs: transformers' save_pretrained then finds the tie it knows and
        # the checkpoint loads into the plain model (peft's live layout, token_adapter.base_layer.weight, broke both)
        self.register_state_dict_post_hook(_base_keys_out)
        self.register_load_state_dict_pre_hook(_base_keys_in)

    # ------------------------------------------------------------------ adapters
    @property
    def base_layer(self) -> nn.Module:
        """Returns the wrapped (frozen) embedding, or the tied head."""
        return self.token_adapter.base_layer

    @property
    def tied(self) -> bool:
        """Returns True for a head tied to the embedding (it reads its source's rows)."""
        return bool(self._source)

    @property
    def deltas(self) -> nn.ParameterDict:
        """The per-adapter rows: this wrapper's own, or (tied) its source's."""
        return self._source[0].deltas if self._source else self.token_adapter.trainable_tokens_delta

    @property
    def token_indices(self) -> dict[str, list[int]]:
        """Returns ``{adapter: token ids}``, this wrapper's or (tied) its source's."""
        return self._source[0].token_indices if self._source else self.token_adapter.token_indices

    def add(self, adapter_name: str, indices: Sequence[int]) -> None:
        """New rows for ``adapter_name``: a copy of the weight's rows ``indices`` (peft's ``init_weights=True``),
        float32 for a half-precision weight (peft's ``cast_adapter_dtype``), frozen until ``set_adapter``. A tied
        wrapper has nothing of its own to add."""
        if self.tied:
            return
        w = self.base_layer.weight
        idx = torch.tensor(list(indices), dtype=torch.long, device=w.device)
        self.token_adapter.token_indices[adapter_name] = [int(i) for i in indices]
        rows = w.detach()[idx].clone()
        if rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.float()
        self.token_adapter.trainable_tokens_delta[adapter_name] = nn.Parameter(rows, requires_grad=False)

    def set_adapter(self, adapter_name: str | None) -> None:
        """Run and train ``adapter_name``'s rows (frozen in a tied wrapper: the source trains them); an adapter without
        rows here (or None) runs the embedding as it is."""
        if not self.tied:
            for p in self.deltas.values():
                p.requires_grad_(False)
        if adapter_name is not None and adapter_name in self.deltas:
            if not self.tied:
                self.deltas[adapter_name].requires_grad_(True)
            self.active_adapter = adapter_name
        else:
            self.active_adapter = None

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s rows (a tied wrapper: only its activation); if it ran, the base layer runs."""
        if not self.tied and adapter_name in self.deltas:
            del self.token_adapter.trainable_tokens_delta[adapter_name]
            del self.token_adapter.token_indices[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    # ------------------------------------------------------------------ compute
    def merged_weight(self, adapter_name: str) -> torch.Tensor:
        """Returns the base weight with rows ``token_indices[adapter_name]`` replaced (peft's ``get_merged_weights``),
        differentiable in the rows: ``[num_embeddings, embedding_dim]``, the weight's dtype."""
        W = self.base_layer.weight
        idx = torch.tensor(self.token_indices[adapter_name], dtype=torch.long, device=W.device)
        return W.index_copy(0, idx, self.deltas[adapter_name].to(W))

    def _lookup(self, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, W, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)
            scale = getattr(base, "embed_scale", None)  # peft: a number becomes a tensor of the weight dtype
            if isinstance(scale, (int, float)):
                scale = torch.tensor(scale, device=W.device, dtype=W.dtype)
            return out if scale is None else out * scale.to(out.dtype)
        return F.linear(x, W, base.bias)  # the tied head (peft's F.linear; no head that ties has a bias)

    def running_adapter(self) -> str | None:
        """Returns the adapter whose rows the forward uses now (None: the base layer runs as it is)."""
        if self.disable_adapters or self.active_adapter not in self.deltas:
            return None
        return self.active_adapter

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str] | None = None,
                **kwargs: Any) -> torch.Tensor:
        """Returns the lookup with the running adapter's rows.

        Args:
            x: token ids ``[...]`` (-> ``[..., embedding_dim]``); a tied head: ``[..., in]`` -> ``[..., vocab]``; the
                weight's dtype.
            adapter_names: peft's mixed batch, one name per sample: each sample with its adapter's rows
                (``"__base__"`` or an adapter without rows here: the plain embedding).
        """
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch(x, adapter_names)
        name = self.running_adapter()
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        return self._lookup(x, self.merged_weight(name))

    def _mixed_batch(self, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        if len(x) != len(adapter_names):
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {len(x)} respectively.")
        rows: dict[str | None, list[int]] = {}
        for i, n in enumerate(adapter_names):
            rows.setdefault(n if n in self.deltas else None, []).append(i)
        out = None
        for name, r in rows.items():
            idx = torch.tensor(r, dtype=torch.long, device=x.device)
            y = self.base_layer(x[idx]) if name is None else self._lookup(x[idx], self.merged_weight(name))
            if out is None:
                out = y.new_empty((len(adapter_names), *y.shape[1:]))
            out[idx] = y
        return out

    def merge_into_base(self) -> nn.Module:
        """Write the running adapter's rows into the base weight in place (a tied head shares that Parameter) and
        return the base layer (peft's ``unload_and_optionally_merge_module`` with merge)."""
        name = self.running_adapter()
        if name is not None and not self.tied:
            with torch.no_grad():
                W = self.base_layer.weight
                idx = torch.tensor(self.token_indices[name], dtype=torch.long, device=W.device)
                W.index_copy_(0, idx, self.deltas[name].detach().to(W))
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The weight the forward uses (peft's wrapper returns the merged weight for ``.weight``)."""
        name = self.running_adapter()
        return self.base_layer.weight if name is None else self.merged_weight(name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "token_adapter" not in self.__dict__.get("_modules", {}):
                raise
        return getattr(self.token_adapter.base_layer, name)  # num_embeddings, padding_idx, embed_scale, ...


_INNER = "token_adapter.base_layer."


def _base_keys_out(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: ``<prefix>token_adapter.base_layer.<k>`` -> ``<prefix><k>``."""
    inner = prefix + _INNER
    for k in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + k[len(inner):]] = state_dict.pop(k)


def _base_keys_in(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre-hook: the base layer's keys as saved (``<prefix><k>``, or peft's ``token_adapter.base_layer.<k>``)."""
    for k in module.token_adapter.base_layer.state_dict():
        if prefix + k in state_dict:
            state_dict[prefix + _INNER + k] = state_dict.pop(prefix + k)


def token_wrappers(model: nn.Module) -> list[tuple[str, TrainableTokensWrapper]]:
    """``(name, wrapper)`` for every ``TrainableTokensWrapper`` of ``model``, in definition order (tied ones too)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableTokensWrapper)]


# ---------------------------------------------------------------------------------------------- planning
def _input_embedding_name(model: nn.Module) -> str:
    """peft's ``_get_input_embeddings_name(model, "embed_tokens")``: the name of ``model.get_input_embeddings()``
    (its last part; peft matches it as a suffix), else ``"embed_tokens"``."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None:
        for n, m in model.named_modules():
            if m is emb and n:
                return n.rpartition(".")[2]
    return "embed_tokens"


def _check_indices(key: str, indices: Any, arg: str) -> list[int]:
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not indices or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"{arg}: the token indices for {key!r} must be a non-empty list of ints (token ids, e.g. "
                         f"tokenizer.convert_tokens_to_ids(['<|im_start|>'])), got {indices!r}")
    dup = sorted(i for i, c in collections.Counter(indices).items() if c > 1)
    if dup:
        raise ValueError(f"{arg}: token indices {dup} for {key!r} appear more than once; list each token once")
    return [int(i) for i in indices]


def _tied_to(model: nn.Module, emb_name: str) -> list[str]:
    """The modules tied to the embedding ``emb_name`` as peft ties them (``_get_module_names_tied_with_embedding``):
    only when the config says ``tie_word_embeddings``; here the modules sharing its weight Parameter."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return []
    w = _base_weight(model.get_submodule(emb_name))
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, TrainableTokensWrapper))
    return [n for n, m in model.named_modules()
            if n != emb_name and not n.startswith(inside) and _base_weight(m) is w]


def _base_weight(m: nn.Module) -> Any:
    """``m.weight``, or for a wrapper its base layer's (its own ``weight`` is the merged one)."""
    return m.base_layer.weight if isinstance(m, TrainableTokensWrapper) else getattr(m, "weight", None)


def plan_trainable_tokens(model: nn.Module, spec: Any, adapter_name: str, modules_to_save: Sequence[str] | None = None,
                          arg: str = "trainable_token_indices") -> dict[str, tuple[list[int], str | None]]:
    """Validate ``spec`` (peft's ``trainable_token_indices``: a list of token ids for the input embedding, or
    ``{name suffix: ids}``) on ``model``; return ``{module name: (indices, tied source or None)}``, the embedding(s)
    first, then each head tied to one. Raises ValueError naming ``arg`` before anything changes."""
    from .embedding import QLoRAEmbedding, embedding_refusal
    from .modules_to_save import ModulesToSaveWrapper

    if isinstance(spec, dict):
        if not spec or not all(isinstance(k, str) and k for k in spec):
            raise ValueError(f"{arg} must be a list of token ids or a dict {{module name: token ids}}, got {spec!r}")
        targets = dict(spec)
    elif isinstance(spec, (list, tuple)):
        targets = {_input_embedding_name(model): spec}
    else:
        raise ValueError(f"{arg} must be a list of token ids (for the input embedding) or a dict {{'embed_tokens': "
                         f"[ids]}}, got a {type(spec).__name__}: {spec!r}")
    for key in targets:
        if modules_to_save and key in modules_to_save:  # peft's check (other.py:1575-1583)
            raise ValueError("The embedding layer is already marked to be trained fully, either specify "
                             f"`modules_to_save=[..., \"{key}\", ...]` or `{arg}={{'{key}': x}}` but not both.")
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, TrainableTokensWrapper))
    plan: dict[str, tuple[list[int], str | None]] = {}
    for key, indices in targets.items():
        indices = _check_indices(key, indices, arg)
        names = [n for n, _ in model.named_modules() if n and n.endswith(key) and not n.startswith(inside)]
        if not names:  # peft's strict_module_check
            raise ValueError(f"{arg}: {key!r} matches no module of {type(model).__name__} (peft's rule: a module "
                             "whose full name ends with it); name the input embedding, e.g. 'embed_tokens'")
        for n in names:
            m = model.get_submodule(n)
            if isinstance(m, TrainableTokensWrapper):
                m = m.base_layer
            elif isinstance(m, QLoRAEmbedding):
                raise ValueError(f"{arg}: module {n!r} has LoRA on it (target_modules selects it); peft refuses "
                                 "trainable tokens there too (trainable_token_indices cannot be applied to modules of "
                                 "type lora.Embedding). Leave it out of target_modules, or drop "
                                 f"{arg} and train the embedding with LoRA")
            elif isinstance(m, ModulesToSaveWrapper) or not isinstance(m, nn.Embedding):
                raise ValueError(f"{arg}: module {n!r} is a {type(m).__name__}, not an nn.Embedding; trainable "
                                 "tokens replace rows of an input embedding (name it, e.g. 'embed_tokens')")
            why = embedding_refusal(m)
            if why is not None:
                raise ValueError(f"{arg}: module {n!r}: {why}")
            bad = [i for i in indices if not 0 <= i < m.num_embeddings]
            if bad:
                raise ValueError(f"{arg}: token indices {bad} are out of range for {n!r}, which has "
                                 f"{m.num_embeddings} rows (0..{m.num_embeddings - 1}); resize the embeddings "
                                 "(model.resize_token_embeddings(len(tokenizer))) before adding new tokens")
            if m.weight.is_meta:
                raise ValueError(f"{arg}: module {n!r} is on the meta device: the trainable rows start from its "
                                 "weight; load the checkpoint first")
            plan[n] = (indices, None)
    for n in list(plan):
        for t in _tied_to(model, n):
            head = model.get_submodule(t)
            if t in plan:
                if plan[t][0] != plan[n][0]:
                    raise ValueError(f"{arg}: {t!r} is tied to {n!r} (tie_word_embeddings) but given other token "
                                     "indices; peft then unties their adapters, which qkernels does not do: give "
                                     "both the same indices, or name the embedding alone")
                plan[t] = (plan[n][0], n)
                continue
            if type(head) is not nn.Linear and not isinstance(head, TrainableTokensWrapper):
                raise ValueError(f"{arg}: {t!r} shares the weight of {n!r} (tie_word_embeddings), so peft gives it "
                                 f"the same trainable rows, but it is a {type(head).__name__} here (a LoRA target or "
                                 f"a module to save); leave {t!r} out of target_modules / modules_to_save")
            plan[t] = (plan[n][0], n)
    return plan


def add_trainable_tokens(model: nn.Module, plan: dict[str, tuple[list[int], str | None]], adapter_name: str,
                         activate: bool) -> list[str]:
    """Wrap (or extend) the modules of ``plan`` (``plan_trainable_tokens``) for ``adapter_name``; returns the
    embedding names whose rows were added."""
    wrappers: dict[str, TrainableTokensWrapper] = {}
    added = []
    for n, (indices, source) in plan.items():
        m = model.get_submodule(n)
        if not isinstance(m, TrainableTokensWrapper):
            w = TrainableTokensWrapper(m, wrappers[source] if source is not None else None)
            w.training = m.training
            parent, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, w)
            m = w
        wrappers[n] = m
        if source is None:
            m.add(adapter_name, indices)
            added.append(n)
        m.set_adapter(adapter_name if activate else m.active_adapter)
    return added


def unwrap_trainable_tokens(model: nn.Module, merge: bool) -> None:
    """Put each wrapped embedding / head back, with the running adapter's rows written in (``merge``) or not."""
    for n, w in token_wrappers(model)[::-1]:
        base = w.merge_into_base() if merge else w.base_layer
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, base)
