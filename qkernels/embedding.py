"""``QLoRAEmbedding``: LoRA on an ``nn.Embedding``, peft's ``lora.Embedding`` step for step.

The embedding weight stays a frozen float ``weight`` Parameter (the embedding's own: a head tied to it stays tied),
as bitsandbytes + transformers keep embeddings float in a 4-bit model. The adapters are laid out as peft lays them
out (peft/tuners/lora/layer.py:1150-1545, peft 0.21.2):

- ``lora_embedding_A`` / ``lora_embedding_B``: ``nn.ParameterDict({adapter: Parameter})``, A ``[r, num_embeddings]``,
  B ``[embedding_dim, r]`` (peft's ``in_features`` / ``out_features`` of an embedding are ``num_embeddings`` /
  ``embedding_dim``); state-dict keys ``lora_embedding_A.<adapter>``, in peft's adapter files
  ``<module>.lora_embedding_A`` without ``.weight``;
- forward: ``E[x] + s * F.embedding(x, A^T, <the base's padding_idx, max_norm, ...>) @ B^T`` (layer.py:1464-1538), in
  the LoRA weights' dtype, the sum cast to the base result's dtype; ``lora_dropout`` is created but never applied
  (peft's embedding forward does not call it);
- init (layer.py:1264-1265, 346-350): ``True`` / ``"gaussian"``: A zeros, B ~ N(0, 1); ``False``: both ~ N(0, 1);
- merge: ``W += ((B @ A)^T * s).to(W.dtype)`` into the embedding's own Parameter (layer.py:1394-1422, 1364-1371).

DoRA (``use_dora=True``): peft's ``DoraEmbeddingVariant`` (variants.py:260-365, dora.py:173-202) with
``qkernels.dora``'s embedding helpers: a magnitude ``lora_magnitude_vector.<adapter>.weight`` ``[embedding_dim]``
(peft's key; in adapter files ``<module>.lora_magnitude_vector``), initialized to the column norms of ``W + s (B A)^T``
computed as peft does (with the adapter still in a half weight's dtype); forward ``g * E[x] + g * s * (A^T)[x] @ B^T``
with ``g = m / ||W + s (B A)^T||_col`` detached (a scaled embedding: ``E[x]`` scaled by its class, the second term by
``embed_scale`` after the norm, as peft); merge ``W = (m / ||W + delta||_col) * (W + delta)``. The ``[num_embeddings,
embedding_dim]`` norm is formed whole on every forward, as in peft.

Scaled embeddings: transformers' ``*ScaledWordEmbedding`` classes keep ``nn.Embedding``'s lookup and multiply it by
their ``embed_scale`` (``sqrt(hidden_size)``, or 1.0), in one of two forms (``qkernels.scaled_embeddings``,
recognized by the forward's bytecode):

- "buffer" (Gemma, Gemma 2 / 3 / 3n / 4, VaultGemma, MiniCPM3, ...): ``lookup * embed_scale.to(weight.dtype)`` with a
  one-element float32 buffer. The layer keeps the base module's tensor as its own non-persistent ``embed_scale``
  buffer (no state-dict key, moved and cast with the model as the base's is);
- "float" (BART, mBART, PLBart, M2M100, NLLB-MoE, PEGASUS-X, BigBird-Pegasus, Blenderbot, BioGPT, XGLM, TrOCR,
  SeamlessM4T, ...): ``lookup * embed_scale`` with a Python float attribute; the layer keeps the same float attribute.

peft scales the LoRA term by ``embed_scale`` too (``_get_embed_scale``, peft/tuners/tuners_utils.py:1905-1940;
layer.py:1506, 1522-1524, and 1456-1458 in a mixed batch): the buffer cast to the term's dtype, or a float made a
tensor of the WEIGHT's dtype first (a bf16 BART's LoRA term is scaled by bf16(sqrt(d_model))); so do we. It merges the
unscaled delta into the weight (the merged module, the original class again, scales it in its own forward;
layer.py:1364-1371). Other ``nn.Embedding`` subclasses with their own forward (T5Gemma2's, user subclasses), and a
plain embedding carrying an ``embed_scale`` attribute (peft would scale the LoRA term only), are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .base_bias import forget as forget_bias_mode
from .reference import lora_scaling
from .scaled_embeddings import is_scaled_embedding, scaled_embedding_form

__all__ = ["QLoRAEmbedding", "is_embedding"]

EMBEDDING_INITS = (True, False, "gaussian")
# peft's LoraLayer.adapter_layer_names for an embedding (layer.py:110-116) -> qkernels' generic names
WHICH = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}


def is_embedding(m: nn.Module) -> bool:
    """An ``nn.Embedding`` (a subclass too: ``embedding_refusal`` says whether it can be wrapped)."""
    return isinstance(m, nn.Embedding)


def embedding_refusal(m: nn.Module) -> str | None:
    """Why ``m`` (an ``nn.Embedding``) cannot get a ``QLoRAEmbedding``, or None."""
    if is_scaled_embedding(m):
        pass  # nn.Embedding's lookup times embed_scale (module docstring)
    elif scaled_embedding_form(m) is not None:
        want = "a one-element float tensor" if scaled_embedding_form(m) == "buffer" else "a Python float"
        return (f"it is a {type(m).__name__} whose embed_scale is {getattr(m, 'embed_scale', None)!r}, not {want} "
                "as transformers sets it (its own forward multiplies the lookup by it). Set embed_scale to the "
                "model's value (e.g. math.sqrt(d_model), or 1.0) or leave it out of target_modules")
    elif type(m).forward is not nn.Embedding.forward:
        return (f"it is a {type(m).__name__}, whose own forward is not nn.Embedding's; qkernels gives LoRA to "
                "nn.Embedding layers and to transformers' *ScaledWordEmbedding classes whose forward is the lookup "
                "times embed_scale (BART, M2M100, Gemma, ...; not a subclass). Leave it out of target_modules")
    elif hasattr(m, "embed_scale"):
        return ("it has an embed_scale attribute, which peft applies to the LoRA term (layer.py:1506, 1522-1524) but "
                "nn.Embedding's forward does not; leave it out of target_modules")
    if not m.weight.dtype.is_floating_point:
        return f"its weight is {m.weight.dtype}: LoRA on an embedding needs a float weight"
    return None


def _check_args(r: Any, lora_alpha: Any, lora_dropout: Any, init_lora_weights: Any, adapter_name: Any,
                use_rslora: Any, use_dora: Any) -> None:
    from .nn import _check_lora_args

    if init_lora_weights == "loftq":
        raise ValueError("init_lora_weights='loftq' fits LoRA to a 4-bit quantization error; an embedding stays float "
                         "(nothing is quantized): use init_lora_weights=True, or leave the embedding out")
    _check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights, adapter_name)
    if not isinstance(use_rslora, bool):
        raise ValueError(f"use_rslora must be a bool, got {use_rslora!r}")
    if not isinstance(use_dora, bool):
        raise ValueError(f"use_dora must be a bool, got {use_dora!r}")


def _check_dora_column_norm(norm: torch.Tensor) -> None:
    """Refuse a DoRA magnitude whose column norm ``||W + s (B A)^T||`` is 0: ``m / norm`` is 0 / 0 there, so that
    dimension of every embedding (and the loss) is NaN, as in peft."""
    zero = (norm == 0).nonzero().flatten()
    if zero.numel():
        raise ValueError(f"use_dora=True: embedding dimension(s) {zero[:8].tolist()}"
                         f"{' ...' if zero.numel() > 8 else ''} of W + s (B A)^T are zero for every token, so DoRA's "
                         "m / ||W + s (B A)^T|| is 0/0 and the embeddings NaN (as in peft): leave this embedding "
                         "out of the DoRA adapter (exclude_modules / target_modules), or give it a plain LoRA adapter")


class QLoRAEmbedding(nn.Module):
    """``y = E[x] + s * (A^T)[x] @ B^T`` with the embedding ``E`` frozen in float: peft's ``lora.Embedding``.

    Built with ``QLoRAEmbedding.from_embedding(embedding, r=..., ...)`` (``apply_qlora`` does it for targets that are
    ``nn.Embedding``). The embedding's own ``weight`` Parameter is kept (no copy), so a head tied to it stays tied;
    ``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq`` and ``sparse`` are the embedding's and apply
    to the LoRA lookup as in peft (``_embed``, layer.py:1464-1485).

    Args:
        num_embeddings, embedding_dim: the embedding's shape (``from_embedding`` takes them from it).
        r, lora_alpha, lora_dropout, use_rslora: the first adapter, as peft's ``LoraConfig`` (scaling ``lora_alpha /
            r``, or ``/ sqrt(r)`` with rsLoRA; the dropout is recorded, never applied, as in peft).
        init_lora_weights: ``True`` / ``"gaussian"`` (A = 0, B ~ N(0, 1)) or ``False`` (both ~ N(0, 1)); "loftq" is
            refused (nothing is quantized here).
        adapter_name: the first adapter's name. use_dora: a DoRA adapter (peft's ``DoraEmbeddingVariant``: a
            magnitude per embedding dimension, module docstring).

    Attributes (peft's names): ``lora_embedding_A`` / ``lora_embedding_B`` (ParameterDicts by adapter name, float32
    ``[r, num_embeddings]`` / ``[embedding_dim, r]``), ``lora_dropout`` (kept for the config; not applied, as peft),
    ``r``, ``lora_alpha``, ``scaling``, ``use_rslora`` (dicts), ``active_adapter``, ``disable_adapters``. ``lora_A``
    / ``lora_B`` are the same dicts under the names ``QLoRALinear`` uses, for qkernels' adapter functions.
    ``in_features`` / ``out_features``: ``num_embeddings`` / ``embedding_dim`` (peft's). ``quantized`` is False.
    ``embed_scale``: a scaled embedding's scale (a Gemma-form non-persistent buffer, or a BART-form Python float;
    None otherwise), applied to the lookup and to the LoRA term as peft applies it (module docstring).
    """

    quantized = False
    is_target_conv_1d_layer = False
    bias = None

    def __init__(self, num_embeddings: int, embedding_dim: int, *, _embedding: nn.Embedding, r: int = 8,
                 lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False,
                 init_lora_weights: bool | str = True, adapter_name: str = "default", use_dora: bool = False):
        super().__init__()
        _check_args(r, lora_alpha, lora_dropout, init_lora_weights, adapter_name, use_rslora, use_dora)
        self.num_embeddings = self.in_features = num_embeddings
        self.embedding_dim = self.out_features = embedding_dim
        e = _embedding
        self.padding_idx, self.max_norm, self.norm_type = e.padding_idx, e.max_norm, e.norm_type
        self.scale_grad_by_freq, self.sparse = e.scale_grad_by_freq, e.sparse
        self.weight = e.weight if isinstance(e.weight, nn.Parameter) else nn.Parameter(e.weight.detach())
        self.weight.requires_grad_(False)
        # a scaled embedding's scale: the Gemma form's buffer (the same tensor; None for a plain embedding) and the
        # value transformers initializes it to (``scalar_embed_scale``: the buffer is not in checkpoints, a meta one
        # gets it at load), or the BART form's Python float, a plain attribute as the base module holds it
        form = scaled_embedding_form(e) if is_scaled_embedding(e) else None
        if form == "float":
            self.embed_scale = e.embed_scale
        else:
            self.register_buffer("embed_scale", e.embed_scale if form == "buffer" else None, persistent=False)
        self._scalar_embed_scale = getattr(e, "scalar_embed_scale", None)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters' magnitudes (qkernels.dora.DoraMagnitude)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self._lora_init: dict[str, bool | str] = {}
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.merged = False
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora=use_dora)

    @classmethod
    def from_embedding(cls, embedding: nn.Module, **lora_kwargs: Any) -> QLoRAEmbedding:
        """A ``QLoRAEmbedding`` holding ``embedding.weight`` (the same Parameter) and one adapter (``r``,
        ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init_lora_weights``, ``adapter_name``, ``use_dora``). The
        embedding module itself is kept aside (without its weight) so that ``merge_and_unload`` gives it back holding
        the merged weight.

        Raises:
            TypeError: ``embedding`` is not an ``nn.Embedding``. ValueError: an embedding that cannot be wrapped (its
                own forward, other than transformers' scaled embeddings; an integer weight) or a bad LoRA
                argument, named.
        """
        if not is_embedding(embedding):
            raise TypeError(f"from_embedding needs an nn.Embedding, got {type(embedding).__name__}")
        why = embedding_refusal(embedding)
        if why is not None:
            raise ValueError(f"cannot add LoRA to this embedding: {why}")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, _embedding=embedding, **lora_kwargs)
        layer.train(embedding.training)
        base = copy_without_weight(embedding)
        object.__setattr__(layer, "_base_embedding", base)  # not a child: no duplicate keys, parameters or moves
        return layer

    # ------------------------------------------------------------------ adapters (peft's API, QLoRALinear's names)
    @property
    def lora_A(self) -> nn.ParameterDict:
        """``lora_embedding_A`` under ``QLoRALinear``'s name (the adapter names are its keys)."""
        return self.lora_embedding_A

    @property
    def lora_B(self) -> nn.ParameterDict:
        """``lora_embedding_B`` under ``QLoRALinear``'s name."""
        return self.lora_embedding_B

    @property
    def _unloaded(self) -> frozenset[str]:
        """State-dict keys (no prefix) whose tensors hold no value (the meta device), derived from the tensors."""
        return frozenset(k for k, t in self._local_tensors().items() if t.is_meta)

    @_unloaded.setter
    def _unloaded(self, value: Any) -> None:  # QLoRALinear's callers update theirs; here it is always derived
        pass

    def _local_tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight}
        for n in self.lora_embedding_A:
            out[f"lora_embedding_A.{n}"] = self.lora_embedding_A[n]
            out[f"lora_embedding_B.{n}"] = self.lora_embedding_B[n]
            for mag in self._magnitude_modules(n):
                out[f"lora_magnitude_vector.{n}.weight"] = mag.weight
        return out

    def _raise_unloaded(self) -> None:
        """Raise the RuntimeError naming the tensors still on meta; return if none is once a weight that accelerate
        assigned directly has been accounted for (``_sync_assigned``)."""
        self._sync_assigned()
        if not self._unloaded:
            return
        raise RuntimeError(
            f"QLoRAEmbedding(num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}): "
            f"{sorted(self._unloaded)} never loaded: the embedding was built on the meta device, which holds shapes "
            "only. Load a checkpoint that holds them: model.load_state_dict(sd, assign=True)")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, *, use_dora: bool = False,
                     **_: Any) -> None:
        """Add (or replace) adapter ``adapter_name`` of rank ``r``: peft's ``Embedding.update_layer``
        (layer.py:1207-1300). ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init_lora_weights``: as in the
        class; a bad argument raises ValueError. ``use_dora``: a DoRA adapter, its magnitude
        ``lora_magnitude_vector.<adapter_name>.weight`` (float32 ``[embedding_dim]``) the column norms of ``W + s (B
        A)^T`` as peft computes them at init (``qkernels.dora.dora_embedding_init_norm``); ValueError on a weight with
        no values (the meta device), or a zero norm.

        A ``[r, num_embeddings]`` and B ``[embedding_dim, r]``, drawn in float32 (``torch.randn``), initialized
        (``True`` / ``"gaussian"``: A zeros, B ~ N(0, 1); ``False``: both ~ N(0, 1) as drawn), then rounded through
        the embedding's dtype when that is float16 / bfloat16 (peft moves the adapter to the base layer's dtype,
        tuners_utils.py:2168-2212, and ``get_peft_model`` casts it back to float32, tuners_utils.py:2705-2745), kept
        float32 on the weight's device. The first adapter becomes active; later ones are added inactive and frozen.
        """
        _check_args(r, lora_alpha, lora_dropout, init_lora_weights, adapter_name, use_rslora, use_dora)
        w = self.weight
        A = torch.randn((r, self.num_embeddings))  # peft draws both (layer.py:1241-1242), then re-initializes
        B = torch.randn((self.embedding_dim, r))
        if init_lora_weights is not False:  # reset_lora_parameters (layer.py:346-350): "gaussian" is the same here
            nn.init.zeros_(A)
            nn.init.normal_(B)
        if w.dtype in (torch.float16, torch.bfloat16):
            A, B = A.to(w.dtype).float(), B.to(w.dtype).float()
        dev = w.device
        scaling = lora_scaling(lora_alpha, r, use_rslora)
        magnitude = None
        if use_dora:  # peft: the variant's init after A, B are final (layer.py:1267-1271)
            from .dora import DoraMagnitude, dora_embedding_init_norm

            if w.is_meta:
                raise ValueError("use_dora=True initializes the DoRA magnitude from the embedding's column norms, and "
                                 "this layer's weight holds no values (the meta device): load the base checkpoint "
                                 "first (load_state_dict(sd, assign=True)), then add the DoRA adapter (or "
                                 "load_adapter)")
            norm = dora_embedding_init_norm(w, A.to(dev), B.to(dev), scaling).to(torch.float32)
            _check_dora_column_norm(norm)
            magnitude = DoraMagnitude(norm)
        if "lora_magnitude_vector" not in self._modules:  # a layer pickled by an older qkernels
            self.lora_magnitude_vector = nn.ModuleDict()
        if adapter_name in self.lora_magnitude_vector:  # replaced: a plain adapter of that name keeps no magnitude
            del self.lora_magnitude_vector[adapter_name]
        if magnitude is not None:
            self.lora_magnitude_vector[adapter_name] = magnitude.train(self.training)
        self.lora_embedding_A[adapter_name] = nn.Parameter(A.to(dev))
        self.lora_embedding_B[adapter_name] = nn.Parameter(B.to(dev))
        self.lora_dropout[adapter_name] = nn.Dropout(p=float(lora_dropout)) if lora_dropout > 0 else nn.Identity()
        self.lora_dropout[adapter_name].train(self.training)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = scaling
        self.use_rslora[adapter_name] = use_rslora
        self._lora_init = {**self._lora_init, adapter_name: init_lora_weights}
        self.set_adapter(self.active_adapter if self.active_adapter is not None else adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one adapter that runs (trainable), the others frozen. ValueError if absent."""
        if adapter_name not in self.lora_embedding_A:
            raise ValueError(f"no adapter named {adapter_name!r}; this layer has {list(self.lora_embedding_A)}")
        for name in self.lora_embedding_A:
            on = name == adapter_name
            self.lora_embedding_A[name].requires_grad_(on)
            self.lora_embedding_B[name].requires_grad_(on)
            for mag in self._magnitude_modules(name):  # peft: the magnitude is an adapter layer (variants.py:263-265)
                mag.requires_grad_(on)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; if it was active, the first remaining adapter becomes active (or none).

        Raises ValueError if the layer has no adapter of that name."""
        if adapter_name not in self.lora_embedding_A:
            raise ValueError(f"no adapter named {adapter_name!r}; this layer has {list(self.lora_embedding_A)}")
        for d in (self.lora_embedding_A, self.lora_embedding_B, self.lora_dropout):
            del d[adapter_name]
        if adapter_name in self._magnitudes():
            del self.lora_magnitude_vector[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            del d[adapter_name]
        self._lora_init = {k: v for k, v in self._lora_init.items() if k != adapter_name}
        forget_bias_mode(self, adapter_name)  # its LoraConfig.bias (qkernels.base_bias)
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            if len(self.lora_embedding_A):
                self.set_adapter(next(iter(self.lora_embedding_A)))

    def set_lora_weight(self, adapter_name: str, which: str, value: torch.Tensor) -> None:
        """Set ``"lora_A"`` (``lora_embedding_A``, ``[r, num_embeddings]``), ``"lora_B"`` (``lora_embedding_B``,
        ``[embedding_dim, r]``) or a DoRA adapter's ``"lora_magnitude_vector"`` (``[embedding_dim]``) of
        ``adapter_name`` to ``value`` in place (cast to its dtype); on the meta device the Parameter is replaced by one
        holding ``value``. ValueError: another ``which``, no such adapter (or not a DoRA one, for the magnitude), a
        shape."""
        if which not in (*WHICH, "lora_magnitude_vector"):
            raise ValueError(f"which must be 'lora_A', 'lora_B' or 'lora_magnitude_vector', got {which!r}")
        if adapter_name not in self.lora_embedding_A:
            raise ValueError(f"no adapter named {adapter_name!r}; this layer has {list(self.lora_embedding_A)}")
        if which == "lora_magnitude_vector":
            if adapter_name not in self._magnitudes():
                raise ValueError(f"adapter {adapter_name!r} is not a DoRA adapter (use_dora=False): it has no "
                                 "magnitude")
            d, p, what = self._magnitudes()[adapter_name]._parameters, self._magnitudes()[adapter_name].weight, which
            key = "weight"
        else:
            d, what = getattr(self, WHICH[which]), WHICH[which]
            p, key = d[adapter_name], adapter_name
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{what}.{adapter_name} has shape {tuple(p.shape)}, got {tuple(value.shape)}")
        with torch.no_grad():
            if p.is_meta:
                d[key] = nn.Parameter(value.detach().to(p.dtype, copy=True), requires_grad=p.requires_grad)
            else:
                p.copy_(value)

    def _magnitudes(self) -> nn.ModuleDict | dict:
        """The DoRA magnitudes by adapter name (``{}`` on a layer pickled by an older qkernels)."""
        return self._modules.get("lora_magnitude_vector") or {}

    def is_dora(self, adapter_name: str) -> bool:
        """Returns whether adapter ``adapter_name`` is a DoRA adapter (has a ``lora_magnitude_vector`` entry)."""
        return adapter_name in self._magnitudes()

    def _magnitude_modules(self, name: str) -> list[nn.Module]:
        return [self._magnitudes()[name]] if name in self._magnitudes() else []

    def enable_adapters(self, enabled: bool) -> None:
        """peft's toggle: ``enabled=False`` runs the plain embedding, ``True`` the active adapter again."""
        self.disable_adapters = not enabled

    @property
    def active_adapters(self) -> list[str]:
        """peft's list of the adapters that run: ``[active_adapter]``, or ``[]`` when none is set."""
        return [] if self.active_adapter is None else [self.active_adapter]

    # ------------------------------------------------------------------ forward
    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """peft's ``_embed`` (layer.py:1464-1485): ``F.embedding`` with the base embedding's arguments."""
        return F.embedding(x, weight, padding_idx=self.padding_idx, max_norm=self.max_norm, norm_type=self.norm_type,
                           scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse)

    def _scale(self) -> torch.Tensor | None:
        """The ``embed_scale`` buffer of a Gemma-form scaled embedding, else None (a layer pickled before it existed:
        None)."""
        return self.__dict__.get("_buffers", {}).get("embed_scale")

    def _float_scale(self) -> float | None:
        """The Python number ``embed_scale`` of a BART-form scaled embedding, else None."""
        v = self.__dict__.get("embed_scale")
        return v if isinstance(v, (int, float)) else None

    def _lora_scale(self) -> torch.Tensor | None:
        """The scale peft applies to the LoRA term (``_get_embed_scale``, tuners_utils.py:1905-1940): the buffer, or a
        Python number as ``torch.tensor(embed_scale, dtype=weight.dtype)`` (rounded to the weight's dtype, so a bf16
        BART's LoRA term is scaled by bf16(sqrt(d_model)) while its lookup is scaled by the exact float); None."""
        f = self._float_scale()
        if f is not None:
            return torch.tensor(f, device=self.weight.device, dtype=self.weight.dtype)
        return self._scale()

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output: ``nn.Embedding.forward``, times ``embed_scale.to(weight.dtype)`` for a Gemma-form
        scaled embedding, times the Python float ``embed_scale`` for a BART-form one (their forwards, op for op)."""
        result = self._embed(x, self.weight)
        f = self._float_scale()
        if f is not None:
            return result * f
        scale = self._scale()
        return result if scale is None else result * scale.to(self.weight.dtype)

    def forward(self, x: torch.Tensor, *, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``E[x] + scaling * F.embedding(x, A^T) @ B^T`` for the active adapter, cast to ``E``'s dtype (peft's
        ``Embedding.forward``, layer.py:1487-1538; dropout is not applied there, so not here). A scaled embedding
        (Gemma, BART, ...): both terms times ``embed_scale`` (the base as its class does, the LoRA term as peft does).

        Args:
            x: integer indices, any shape. Returns ``[*x.shape, embedding_dim]`` in the weight's dtype.
            adapter_names: peft's mixed batch, one adapter name per sample (``x``'s first dimension), ``"__base__"``
                for none (``qkernels.mixed_batch``).

        Raises:
            RuntimeError: a tensor never loaded (the meta device), naming it. ValueError: ``adapter_names`` of a
                length other than the batch size.
        """
        if self._unloaded:
            self._raise_unloaded()
        if adapter_names is not None:  # layer.py:1488-1497
            from .mixed_batch import check_layer_args, embedding_mixed_batch

            check_layer_args(self, x, adapter_names)
            result = self._base_forward(x)
            if self.disable_adapters:
                return result
            return embedding_mixed_batch(self, x, result, adapter_names, self._lora_scale())
        result = self._base_forward(x)  # the base layer
        name = None if self.disable_adapters else self.active_adapter
        if name is None:
            return result
        dtype = result.dtype
        A = self.lora_embedding_A[name]
        if self.sparse and A.requires_grad and torch.is_grad_enabled():
            # F.embedding(x, A^T, sparse=True) gives A^T a sparse gradient that torch cannot transpose back to A
            # ("permute(sparse_coo): transpositions between sparse and dense dimensions are not allowed"): peft's
            # backward fails so too. Say why before the forward rather than in backward.
            raise RuntimeError(
                f"QLoRAEmbedding({self.num_embeddings}, {self.embedding_dim}) has sparse=True: the LoRA gradient "
                "through F.embedding(x, A^T, sparse=True) cannot be formed (torch cannot transpose a sparse gradient "
                "back to A; peft's lora.Embedding fails the same way in backward). Set layer.sparse = False to train "
                "(A's gradient is dense, [r, num_embeddings]), or run under torch.no_grad()")
        B, scaling, scale = self.lora_embedding_B[name], self.scaling[name], self._lora_scale()
        if name in self._magnitudes():  # DoRA: peft's DoraEmbeddingVariant.forward (variants.py:335-365)
            from .dora import dora_embedding_norm

            # dora.py:183-198: g = m / ||W + s B A||_col (detached), g * s * (A^T)[x] @ B^T; then g * result + that
            g = self._magnitudes()[name].weight / dora_embedding_norm(self.weight, A, B, scaling)
            dora = g * (self._embed(x, A.T) @ B.T) * scaling
            if scale is not None:  # variants.py:357-362: after the norm, in the term's dtype
                dora = dora * scale.to(dora.dtype)
            return (g * result + dora).to(dtype)
        after_A = self._embed(x, A.T)
        adapter_output = (after_A @ B.T) * scaling
        if scale is not None:  # layer.py:1522-1524: the scale in the LoRA term's dtype
            adapter_output = adapter_output * scale.to(adapter_output.dtype)
        return (result + adapter_output).to(dtype)

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """Returns peft's ``get_delta_weight`` (layer.py:1394-1422) of ``adapter_name`` (default: the active adapter):
        ``(B @ A)^T * scaling``, ``[num_embeddings, embedding_dim]`` in A's dtype (half-precision adapters on the CPU
        computed in float32 and cast back). Raises ValueError if there is no such adapter (or none is active)."""
        name = adapter_name or self.active_adapter
        if name is None or name not in self.lora_embedding_A:
            raise ValueError(f"no adapter {name!r} to take a delta of; this layer has {list(self.lora_embedding_A)}")
        A, B = self.lora_embedding_A[name].detach(), self.lora_embedding_B[name].detach()
        dtype = A.dtype
        cast = B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast:
            A, B = A.float(), B.float()
        out = (B @ A).T * self.scaling[name]
        return out.to(dtype) if cast else out

    def lora_delta(self, adapter_name: str | None = None) -> torch.Tensor:
        """Returns ``get_delta_weight(adapter_name)`` in float32 (ValueError if there is no such adapter)."""
        return self.get_delta_weight(adapter_name).float()

    def merged_embedding(self) -> nn.Module:
        """peft's ``merge`` then ``get_base_layer()`` (layer.py:1332-1374): the active adapter's delta added in place
        to the embedding's own weight Parameter (``W.data += delta.to(W.dtype)``; a head tied to it changes too); a
        DoRA adapter's ``(m / ||W + delta||_col) * (W + delta)`` written into it (peft's ``merge_unsafe``,
        ``qkernels.dora.dora_embedding_merged_weight``). Adapters disabled or none active: nothing is added.

        Returns the original embedding module (its class and arguments) holding that Parameter, frozen. Raises
        RuntimeError if the weights were never loaded (the meta device)."""
        if self._unloaded:
            self._raise_unloaded()
        w = self.weight
        name = None if self.disable_adapters else self.active_adapter
        if name is not None and name in self._magnitudes():  # DoRA: merge_unsafe (variants.py:304-323)
            from .dora import dora_embedding_merged_weight

            w.data = dora_embedding_merged_weight(w, self.get_delta_weight(name), self._magnitudes()[name].weight)
        elif name is not None:
            with torch.no_grad():
                w.data += self.get_delta_weight(name).to(w.dtype)
        w.requires_grad_(False)
        return self.base_embedding()

    def base_embedding(self) -> nn.Module:
        """The original embedding module without LoRA (``qkernels.resize`` hands it to transformers' resize).

        Returns:
            The embedding as it was before LoRA (its class, arguments and scale), holding this layer's weight
            Parameter (the same object: nothing merged, nothing copied), frozen, in this layer's training mode.
        """
        w = self.weight
        base = self.__dict__.get("_base_embedding")
        if base is None:
            with torch.device("meta"):
                base = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                                    max_norm=self.max_norm, norm_type=self.norm_type,
                                    scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse)
        else:
            base = copy_without_weight(base)
            if self._scale() is not None:  # the scale as the model holds it now (moved / cast with it)
                base._buffers["embed_scale"] = self._scale()
        base.weight = w
        base.train(self.training)
        return base

    def take_resized(self, resized: nn.Module) -> None:
        """Adopt the vocabulary of ``resized``, the embedding transformers' ``resize_token_embeddings`` left where
        this layer was (``qkernels.resize``): its weight Parameter (``[new_num_embeddings, embedding_dim]``, the old
        rows first), ``num_embeddings`` and ``padding_idx``. Every adapter's A ``[r, num_embeddings]`` keeps its
        first ``min(old, new)`` columns and gets zero columns for added tokens (their LoRA term starts at 0, as a
        fresh adapter's A = 0), in place (``A.data``: the same Parameter). Raises ValueError for a DoRA adapter (its
        magnitude is a norm over the vocabulary) or another embedding width."""
        if tuple(resized.weight.shape[1:]) != (self.embedding_dim,):
            raise ValueError(f"the resized embedding has shape {tuple(resized.weight.shape)}; this layer's "
                             f"embedding_dim is {self.embedding_dim}")
        dora = [n for n in self.lora_embedding_A if self.is_dora(n)]
        if dora:
            raise ValueError(f"DoRA adapter(s) {dora}: the magnitude is a norm over the vocabulary, which resizing "
                             "changes. Resize before adding the DoRA adapter")
        n_old, n_new = self.num_embeddings, int(resized.weight.shape[0])
        w = resized.weight if isinstance(resized.weight, nn.Parameter) else nn.Parameter(resized.weight.detach())
        self.weight = w.requires_grad_(False)
        self.num_embeddings = self.in_features = n_new
        self.padding_idx = resized.padding_idx
        base = self.__dict__.get("_base_embedding")
        if base is not None:
            base.num_embeddings, base.padding_idx = n_new, resized.padding_idx
        keep = min(n_old, n_new)
        with torch.no_grad():
            for A in self.lora_embedding_A.values():
                grown = A.new_zeros((A.shape[0], n_new))
                grown[:, :keep] = A[:, :keep]
                A.data = grown

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        """``nn.Module``'s, after checking the LoRA shapes (a ValueError naming the key, before anything loads); a
        LoRA key absent from a base-only checkpoint keeps its value and is not reported missing (as QLoRALinear); LoRA
        weights still on the meta device once the weight has values are initialized per ``init_lora_weights``."""
        for k, t in self._local_tensors().items():
            v = state_dict.get(prefix + k)
            if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(t.shape):
                hint = " (a different LoRA rank r?)" if k != "weight" else ""
                raise ValueError(f"size mismatch for {prefix + k!r}: checkpoint has {tuple(v.shape)}, this layer has "
                                 f"{tuple(t.shape)}{hint}")
        lora = [prefix + k for k in self._local_tensors() if k != "weight"]
        present = [k for k in lora if k in state_dict]
        if present and len(present) < len(lora):
            error_msgs.append(f"{prefix[:-1] or 'QLoRAEmbedding'}: the state dict has LoRA key(s) {present} but not "
                              f"{[k for k in lora if k not in present]}; a layer's LoRA weights load together")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not present:
            # a base-only checkpoint: LoRA still on the meta device is initialized on the weight's device, and the
            # ParameterDicts (which load after this method, from the same dict) are given their current values, so
            # they are neither changed nor reported missing
            if not self.weight.is_meta:
                self._init_meta_lora()
            state_dict.update({prefix + k: t for k, t in self._local_tensors().items() if k != "weight"})
        self._init_meta_scale()

    def _init_meta_scale(self) -> None:
        scale, value = self._scale(), getattr(self, "_scalar_embed_scale", None)
        if scale is not None and scale.is_meta and not self.weight.is_meta and value is not None:
            # not in checkpoints (persistent=False): transformers' _init_weights sets it to scalar_embed_scale, float32
            self.embed_scale = torch.tensor(float(value), device=self.weight.device)

    def _sync_assigned(self) -> None:
        """accelerate's loaders assign the weight directly (``module._parameters["weight"]``, no
        ``load_state_dict``): once it holds values, LoRA weights still on meta (a base-only checkpoint) and a Gemma
        scale are initialized, as ``_load_from_state_dict`` does. Called before a move (accelerate's
        ``dispatch_model`` calls ``model.to``) and by ``_raise_unloaded``."""
        if self.weight.is_meta:
            return
        if any(t.is_meta for k, t in self._local_tensors().items() if k != "weight"):
            self._init_meta_lora()
        self._init_meta_scale()

    def _apply(self, fn: Any, recurse: bool = True) -> QLoRAEmbedding:
        self._sync_assigned()
        return super()._apply(fn, recurse)

    def _init_meta_lora(self) -> None:
        for n in list(self.lora_embedding_A):
            A, B = self.lora_embedding_A[n], self.lora_embedding_B[n]
            if not (A.is_meta or B.is_meta):
                continue
            active = self.active_adapter
            self.update_layer(n, self.r[n], self.lora_alpha[n], _dropout_p(self.lora_dropout[n]),
                              self._lora_init.get(n, True), self.use_rslora[n], use_dora=self.is_dora(n))
            self.lora_embedding_A[n].requires_grad_(A.requires_grad)
            self.lora_embedding_B[n].requires_grad_(B.requires_grad)
            self.active_adapter = active

    def extra_repr(self) -> str:
        lora = ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]}{', dora' if self.is_dora(n) else ''}"
                         for n in self.lora_embedding_A)
        extra = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}{extra}, float base: dtype={self.weight.dtype}, "
                f"adapters=[{lora}], active={self.active_adapter!r}{', disabled' if self.disable_adapters else ''}")


def _dropout_p(d: nn.Module) -> float:
    return float(getattr(d, "p", 0.0))


def copy_without_weight(embedding: nn.Module) -> nn.Module:
    """A shallow copy of ``embedding`` whose ``weight`` entry is None (its class, hooks and attributes kept)."""
    import copy

    base = copy.copy(embedding)
    base._parameters = dict(embedding._parameters)
    base._parameters["weight"] = None
    base._modules = dict(embedding._modules)
    base._buffers = dict(embedding._buffers)
    return base

