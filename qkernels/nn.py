"""``QLoRALinear``: a drop-in ``nn.Linear`` with a frozen 4-bit weight and peft-style LoRA adapters.

The layer holds the weight packed in bitsandbytes' 4-bit format (``weight``, a ``Params4bit`` carrying its
``QuantState``) and LoRA adapters laid out exactly as peft's ``lora.Linear4bit`` lays them out
(``lora_A.<adapter>.weight [r, in]``, ``lora_B.<adapter>.weight [out, r]``), so that:

- ``state_dict()`` has bitsandbytes' ``Linear4bit`` keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
  ``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__<type>``,
  ``bias``) plus peft's LoRA keys (``lora_A.default.weight``, ``lora_B.default.weight``);
- a bitsandbytes ``Linear4bit`` state dict (a base-only checkpoint: none of the layer's LoRA keys) loads with
  ``load_state_dict(sd)``, strict included: the LoRA weights keep their current values and are not reported
  missing. A state dict with some but not all of a layer's LoRA keys is an error (see ``_load_from_state_dict``);
  ours loads into bitsandbytes through ``Params4bit.from_prequantized``.

The forward is one call to the fused ``matmul_4bit_lora`` with the active adapter (or none); a DoRA adapter
(``use_dora``, peft's ``lora_magnitude_vector``) rescales its rows (``qkernels.dora``). A layer built with
``quantize=False`` keeps a float base weight instead (peft's LoRA on a plain ``nn.Linear``: its keys, its forward),
for the layers peft + bitsandbytes leave in float; every adapter function treats both alike.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os as _os
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import _accelerate
from . import lora as _lora_mod
from .base_bias import forget as forget_bias_mode
from .codebooks import lowercase_hint
from .functional import dequantize_4bit, quantize_4bit
from .lora import matmul_4bit_lora
from .quant_state import _QS_PREFIX, FLOAT_DTYPES, STORAGE_DTYPES, QuantState, as_dtype, check_blocksize
from .reference import lora_scaling

__all__ = ["Params4bit", "QLoRALinear"]

INIT_CHOICES = (True, False, "gaussian", "loftq")


# --------------------------------------------------------------------------------------------- the weight
class Params4bit(nn.Parameter):
    """A frozen packed 4-bit weight: the packed bytes as tensor data, its ``QuantState`` as ``quant_state``.

    Data: uint8 ``[(n + 1) // 2, 1]`` (or a bf16/fp16/fp32 ``quant_storage`` view of the same bytes) for a
    logical ``quant_state.shape == [out_features, in_features]``. Never requires grad.

    The class name is bitsandbytes' on purpose: peft (``get_nb_trainable_parameters``), accelerate and
    transformers recognize a packed 4-bit parameter by ``type(p).__name__ == "Params4bit"`` and count it as
    ``numel * 2 * element_size`` parameters. The attribute names (``quant_state``, ``blocksize``, ``quant_type``,
    ``compress_statistics``, ``quant_storage``, ``bnb_quantized``, ``absmax``...) are bitsandbytes' too.

    Args:
        data: the packed bytes (``quantize_4bit``'s first result); None: an empty uint8 tensor.
        requires_grad: must be False (the weight is frozen; LoRA adapters train).
        quant_state: the ``QuantState`` that describes ``data``.

    Raises:
        ValueError: ``requires_grad=True``.
    """

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = False,
                quant_state: QuantState | None = None, _qkernels_layer: Any = None) -> Params4bit:
        if data is None:
            data = torch.empty(0, dtype=torch.uint8)
        if requires_grad:
            raise ValueError("a packed 4-bit weight is frozen: requires_grad must be False (train LoRA adapters)")
        # accelerate's set_module_tensor_to_device rebuilds a layer's weight from a checkpoint's packed bytes as
        # type(old)(value, requires_grad=..., **old.__dict__): the owner link in old.__dict__ sends them to the layer,
        # which loads them with the weight's quant-state keys (qkernels._accelerate)
        layer = _qkernels_layer() if _qkernels_layer is not None else None
        if layer is not None and not data.is_meta:
            return layer._accelerate_weight(data)
        self = torch.Tensor._make_subclass(cls, data, False)
        self.quant_state = quant_state
        if layer is not None:
            _accelerate.link(self, layer)
        return self

    # accelerate walks a key such as "<layer>.weight.absmax" with getattr and then sets module._parameters["absmax"]:
    # a layer's weight answers with its quant-state pieces (qkernels._accelerate); any other Params4bit is no module
    @property
    def _parameters(self) -> Any:
        return _accelerate.slots(self, "weight.", "_parameters")

    @property
    def _buffers(self) -> Any:
        return _accelerate.slots(self, "weight.", "_buffers")

    # bitsandbytes' attribute names, read from the QuantState
    @property
    def blocksize(self) -> int:
        """Elements per 4-bit block (``quant_state.blocksize``)."""
        return self.quant_state.blocksize

    @property
    def quant_type(self) -> str:
        """``"nf4"`` or ``"fp4"`` (``quant_state.quant_type``)."""
        return self.quant_state.quant_type

    @property
    def compress_statistics(self) -> bool:
        """Whether the absmax are double-quantized (bitsandbytes' name for ``quant_state.nested``)."""
        return self.quant_state.nested

    @property
    def quant_storage(self) -> torch.dtype:
        """The dtype the packed bytes are stored as (uint8, or bf16/fp16/fp32 for FSDP)."""
        return self.dtype

    @property
    def bnb_quantized(self) -> bool:
        """Always True: the data is packed already (bitsandbytes quantizes on its first device move)."""
        return True

    @property
    def absmax(self) -> torch.Tensor:
        """The per-block scales, ``quant_state.absmax`` (uint8 codes when double-quantized)."""
        return self.quant_state.absmax

    @property
    def quant_map(self) -> torch.Tensor:
        """The 16-entry float32 codebook, ``quant_state.code``."""
        return self.quant_state.code

    # torch.distributed.checkpoint's get_model_state_dict resolves every state-dict key as an attribute path
    # (weight.nested_absmax, weight.quant_state.bitsandbytes__nf4): bitsandbytes answers them the same way
    @property
    def nested_absmax(self) -> torch.Tensor:
        """The float32 scales of the double-quantized absmax, ``quant_state.state2.absmax``; AttributeError when the
        absmax is not double-quantized (the key does not exist then)."""
        if not self.quant_state.nested:
            raise AttributeError("nested_absmax: this weight's absmax is not double-quantized")
        return self.quant_state.state2.absmax

    @property
    def nested_quant_map(self) -> torch.Tensor:
        """The 256-entry dynamic map of the double-quantized absmax, ``quant_state.state2.code``; AttributeError when
        the absmax is not double-quantized."""
        if not self.quant_state.nested:
            raise AttributeError("nested_quant_map: this weight's absmax is not double-quantized")
        return self.quant_state.state2.code

    def __deepcopy__(self, memo: dict) -> Params4bit:
        if id(self) in memo:
            return memo[id(self)]
        new = type(self)(self.data.clone(memory_format=torch.preserve_format), False,
                         copy.deepcopy(self.quant_state, memo))
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, proto: int):  # torch.save(module) / pickle: data + state, not the subclass internals
        return (_rebuild_params4bit, (self.data, self.quant_state))

    def __repr__(self) -> str:
        return f"Params4bit({self.quant_state!r}, storage={self.dtype}, bytes={self.numel() * self.element_size()})"


def _warn_frozen_adapter(name: str) -> None:
    """The active adapter runs in training mode with gradients on, yet neither of its weights trains: most likely
    ``peft.prepare_model_for_kbit_training`` (or ``model.requires_grad_(False)``) ran after ``apply_qlora``; it freezes
    every parameter, LoRA included. Training then goes on and changes nothing (with gradient checkpointing's input
    gradients the backward even succeeds), so say so. A warning, not an error: freezing LoRA on purpose (training
    only a module to save) is legitimate. Python shows it once per process."""
    warnings.warn(
        f"QLoRALinear: the active adapter {name!r} is frozen (lora_A and lora_B requires_grad=False) while the model "
        "trains, so it will not change. peft.prepare_model_for_kbit_training freezes every parameter, LoRA included: "
        f"call it before qkernels.apply_qlora, or call qkernels.set_adapter(model, {name!r}) after it.",
        UserWarning,
        stacklevel=3,
    )


def _rebuild_params4bit(data: torch.Tensor, quant_state: QuantState) -> Params4bit:
    return Params4bit(data, False, quant_state)


def _packed_rows(numel: int, storage: torch.dtype) -> int:
    """Rows of the packed ``[rows, 1]`` tensor for ``numel`` 4-bit values stored as ``storage``."""
    nbytes = (numel + 1) // 2
    itemsize = torch.empty((), dtype=storage).element_size()
    return -(-nbytes // itemsize)


def _new_meta_weight(out_features: int, in_features: int, quant_type: str, blocksize: int, double_quant: bool,
                     quant_storage: torch.dtype, dtype: torch.dtype) -> tuple[torch.Tensor, QuantState]:
    """The packed weight and QuantState of an ``[out, in]`` weight in this format, on the meta device: shapes and
    dtypes only (packed ``[rows, 1]`` of ``quant_storage``, scales per ``QuantState.empty``), nothing computed."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"the weight to quantize must be float32/float16/bfloat16, got {dtype}")
    state = QuantState.empty((out_features, in_features), blocksize, quant_type, double_quant, dtype, "meta")
    packed = torch.empty(_packed_rows(state.numel, quant_storage), 1, dtype=quant_storage, device="meta")
    return packed, state


def _gives_value(v: Any, current: torch.Tensor) -> bool:
    """Whether a state-dict value ``v`` loads a value into the tensor ``current``: another tensor, not a meta one."""
    return v is not current and not (isinstance(v, torch.Tensor) and v.is_meta)


def _init_lora_(A: torch.Tensor, B: torch.Tensor, init: bool | str, r: int) -> None:
    """Initialize LoRA weights in place as ``update_layer`` does for ``init`` (True, "gaussian", False)."""
    if init == "gaussian":
        nn.init.normal_(A, std=1 / r)
    else:  # nn.Linear's default init: A for True, both for False
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    else:
        nn.init.zeros_(B)


# QLoRALinear's decode plans (see QLoRALinear._planned_forward), by layer: outside the module, so a deepcopy, pickle or
# torch.save of the layer never carries one (a closure pickles not; a copy's plan would hold the original's tensors),
# and a layer's plan goes with it.
_DECODE_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# False: every call runs the full forward (for tests and comparisons).
DECODE_PLANS = True


def _loses_precision(dtype: torch.dtype, to: torch.dtype) -> bool:
    """Whether casting from ``dtype`` to ``to`` rounds (float32 -> bf16 / fp16, fp16 -> bf16)."""
    return torch.finfo(to).eps > torch.finfo(dtype).eps


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 family: a linear layer with its weight stored ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


# --------------------------------------------------------------------------------------------- arg checks
def _check_positive_int(v: Any, name: str, fix: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}; {fix}")
    return v


def _check_lora_args(r: Any, lora_alpha: Any, lora_dropout: Any, init_lora_weights: Any, adapter_name: Any) -> None:
    _check_positive_int(r, "r", "the LoRA rank is the number of rows of lora_A, e.g. r=8")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}; e.g. lora_alpha=2*r")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be a probability in [0, 1), got {lora_dropout!r}; use 0.0 for none")
    if not (init_lora_weights is True or init_lora_weights is False or init_lora_weights in ("gaussian", "loftq")):
        raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES}, got {init_lora_weights!r}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty str without '.', got {adapter_name!r} "
                         "(it becomes a state-dict key segment, e.g. lora_A.default.weight)")


def _check_lora_bias(lora_bias: Any, use_dora: bool, init_lora_weights: Any, has_bias: bool) -> None:
    """peft's LoraConfig checks of ``lora_bias`` (config.py:1081-1088), and its warning for a base without a bias."""
    if not isinstance(lora_bias, bool):
        raise ValueError(f"lora_bias must be a bool, got {lora_bias!r}")
    if not lora_bias:
        return
    if use_dora:
        raise ValueError("lora_bias=True is not supported with DoRA (peft refuses it too: \"The argument "
                         "lora_bias=True is not supported for DoRA\"): pass use_dora=False or lora_bias=False")
    if init_lora_weights not in (True, False):
        raise ValueError(f"lora_bias=True is only supported with init_lora_weights=True or False (as in peft), got "
                         f"init_lora_weights={init_lora_weights!r}")
    if not has_bias:
        warnings.warn("lora_bias=True was passed but the targeted layer has no bias. This means that merging LoRA "
                      "weights won't be possible (peft's warning; qkernels.merge_and_unload refuses it as peft does)",
                      UserWarning, stacklevel=4)


def _check_quant_args(quant_type: Any, blocksize: Any, quant_storage: Any, compute_dtype: Any) -> None:
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}{lowercase_hint(quant_type)}")
    check_blocksize(blocksize)
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES} (or its name, e.g. 'uint8'), got "
                         f"{quant_storage!r}; torch.uint8 unless FSDP needs a float dtype")
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise ValueError(f"compute_dtype must be None (the input's dtype) or one of {FLOAT_DTYPES} (or its name, "
                         f"e.g. 'bfloat16'), got {compute_dtype!r}")


# torch.export swaps parameters for plain fake tensors, and transformers' tie_weights() assigns a float weight over a
# tied head's: either way the layer's weight no longer carries its QuantState (was: AttributeError 'quant_state').
_NO_QUANT_STATE = (
    "QLoRALinear.weight is a {} without a quant_state: the packed 4-bit weight was replaced. torch.export is not "
    "supported (it swaps parameters for plain fake tensors): export qkernels.merge_and_unload(copy.deepcopy(model)), "
    "or use torch.compile. A float weight assigned over it (e.g. transformers' tie_weights() on a head tied to the "
    "embeddings: apply_qlora keeps a tied head float, so this is a layer quantized by hand) must be re-quantized with "
    "QLoRALinear.from_linear, or the head kept float (QLoRALinear.from_linear(head, quantize=False) keeps the tie)"
)


# FSDP casts every parameter to MixedPrecision's param_dtype: a packed weight stored in another dtype loses its codes.
_CAST_PACKED = (
    "QLoRALinear.weight holds {} elements of {}, and its packed 4-bit weight was stored as {}: it was cast (FSDP's "
    "MixedPrecision / MixedPrecisionPolicy param_dtype casts every parameter), so its bytes are no longer the 4-bit "
    "codes. Store the packed weight in that dtype, quant_storage={} (apply_qlora(..., quant_storage=...), "
    "transformers' bnb_4bit_quant_storage), so the cast changes nothing"
)

# FSDP2 shards a parameter into a DTensor outside forward: a shard holds part of the bytes, no decodable weight.
_SHARDED = (
    "QLoRALinear.weight is sharded by FSDP (a DTensor): each rank holds part of the packed bytes. Gather it first "
    "(FSDP2: module.unshard(), FSDP1: FullyShardedDataParallel.summon_full_params), or save a full state dict "
    "(torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True)"
)


@dataclasses.dataclass(frozen=True)
class _CheckpointKeys:
    """What ``QLoRALinear._fqn_modifiers`` points torch.distributed.checkpoint at: ``weight`` answers the attributes
    ``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map``, ``quant_state.bitsandbytes__<type>``."""

    weight: Params4bit


@dataclasses.dataclass(frozen=True)
class _PackedRecord:
    """What a 4-bit layer remembers of its packed weight, as bitsandbytes' ``Linear4bit`` keeps ``quant_state`` on the
    module: FSDP replaces the weight Parameter by its own (FSDP2: a DTensor shard, then the all-gathered plain tensor
    in forward; FSDP1 ``use_orig_params=True``: a view of the flat parameter), which carries the same bytes but no
    ``quant_state``. A weight with ``storage`` dtype and ``numel`` elements is those bytes; any other is refused."""

    quant_state: QuantState
    storage: torch.dtype
    numel: int


_UNLOADED = (
    "QLoRALinear(in_features={}, out_features={}): {} never loaded. The layer was created on the meta device "
    "(QLoRALinear(device='meta'), or apply_qlora on a model built under torch.device('meta') / accelerate's "
    "init_empty_weights), which holds shapes only{}. Load a checkpoint that holds them: model.load_state_dict(sd, "
    "assign=True) (or model.to_empty(device=...) then model.load_state_dict(sd)); strict=True names missing keys"
)


# --------------------------------------------------------------------------------------------- the layer
def _check_dora_norm(norm: torch.Tensor) -> None:
    """Refuse a DoRA magnitude whose row norm ``||W + s B A||`` is 0: DoRA's scale ``m / ||W + s B A||`` is 0 / 0 there,
    so that output (a tied head's logit of the padding token, whose embedding row is zero) is NaN, and so is the loss
    (peft's too)."""
    zero = (norm == 0).nonzero().flatten()
    if zero.numel():
        raise ValueError(f"use_dora=True: output row(s) {zero[:8].tolist()}{' ...' if zero.numel() > 8 else ''} of "
                         "W + s B A are all zero (e.g. a tied head's padding-token embedding row), so DoRA's "
                         "m / ||W + s B A|| is 0/0 and the outputs and loss NaN (as in peft): leave this module out of "
                         "the DoRA adapter (exclude_modules / target_modules), or give it a plain LoRA adapter")


class QLoRALinear(nn.Module):
    """``y = x @ dequant(W)^T + s * dropout(x) @ A^T @ B^T + bias`` with W frozen in 4 bits (drop-in nn.Linear).

    Args:
        in_features, out_features, bias: as ``nn.Linear``. A fresh layer initializes a float weight the way
            ``nn.Linear`` does and quantizes it; ``from_linear`` / ``from_bnb`` wrap existing weights.
        r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_name: the first LoRA adapter, as
            peft's ``LoraConfig``: scaling ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); init ``True`` (A
            kaiming-uniform a=sqrt(5), B zeros), ``"gaussian"`` (A ~ N(0, 1/r), B zeros), ``False`` (both as
            nn.Linear's default: the adapter is not a no-op), ``"loftq"`` (A, B from the quantization residual of
            the float weight, see ``qkernels.loftq``; needs that weight: a fresh layer or ``from_linear``).
        quant_type, double_quant, blocksize, quant_storage: the 4-bit format (``qkernels.quantize_4bit``).
        compute_dtype: dtype the matmul runs in (x is cast to it and the result back to x.dtype); None: x.dtype.
            A name works too (``"bfloat16"``, as in transformers' ``BitsAndBytesConfig``), and for quant_storage.
        device, dtype: of the float weight before quantization (also ``quant_state.dtype`` and the bias dtype).
            LoRA weights are float32 (peft's ``autocast_adapter_dtype``) on ``device``.
        loftq_iter: LoftQ iterations; 1 keeps ``W`` quantized exactly as ``quantize_4bit(W)`` (see loftq.py).
        quantize: False keeps the base weight in float (a "float base"): ``weight`` is a frozen float
            ``nn.Parameter``, the forward is peft's ``lora.Linear`` (``F.linear`` in the weight's dtype plus the LoRA
            term), the state dict is peft's on a plain ``nn.Linear`` (``weight``, ``bias``, LoRA keys) and merges
            give ``W + s B A``. The 4-bit arguments are then unused and ``compute_dtype`` must be None. ``apply_qlora``
            builds these where peft + bitsandbytes keep a layer float (``_keep_in_fp32_modules`` such as T5's ``wo``,
            a float Linear of a model loaded in 4 bits, ``keep_float_modules``). ``quantized`` records the mode.
        use_dora: the first adapter is a DoRA adapter (peft's ``use_dora=True``; ``qkernels.dora``): a magnitude
            ``lora_magnitude_vector.<adapter>.weight [out_features]`` initialized to the row norms of
            ``dequant(W) + s B A``, and the output rows rescaled by ``m / ||W + s B A||``. On the meta device the
            magnitude is meta too and takes that value when the weight is loaded (unless the checkpoint holds it).
        lora_bias: the first adapter's ``lora_B`` gets a trainable bias (peft's ``LoraConfig(lora_bias=True)``): the
            LoRA term is ``s * (dropout(x) A^T B^T + b_B)``, so the bias is scaled too; zeros at init True (peft's).
            Not with DoRA or ``init_lora_weights`` "gaussian" / "loftq" (peft refuses them); on a layer without a bias
            it warns as peft does (the adapter then cannot be merged).

    Attributes (peft's names): ``lora_A``, ``lora_B``, ``lora_dropout``, ``lora_magnitude_vector`` (DoRA adapters
    only) (ModuleDicts by adapter name), ``r``, ``lora_alpha``, ``scaling``, ``use_rslora`` (dicts),
    ``active_adapter`` (str or None),
    ``disable_adapters`` (bool). Only the active adapter runs. ``float_dtype``: the dtype the layer's float parts
    were last given (``dtype``, then ``.half()`` / ``.to(dtype)``; a float base: its weight's dtype, also after
    ``load_state_dict(sd, assign=True)``); ``merge_and_unload`` produces it.
    ``is_target_conv_1d_layer`` (peft's name): the layer was built from a transformers ``Conv1D`` (``from_linear``; or
    ``from_bnb`` of a ``Linear4bit`` whose ``source_cls``, set by transformers' bitsandbytes loader, is ``Conv1D``),
    so ``merge_and_unload`` gives back a ``Conv1D`` (weight ``[in, out]``) that the model's checkpoints expect. A
    4-bit layer stores the weight ``[out, in]`` either way (as transformers' bitsandbytes loader does); a float base
    made from a Conv1D holds the Conv1D's own ``[in, out]`` Parameter (state-dict key ``weight`` as in GPT-2's
    checkpoints, forward ``addmm(bias, x, W)`` as ``Conv1D``'s: peft's LoRA on a Conv1D, bit for bit). The LoRA
    shapes are the same in all cases (``A [r, in]``, ``B [out, r]``).

    Big models: a layer built on the meta device (``device="meta"``; under ``torch.device("meta")`` or accelerate's
    ``init_empty_weights``; ``from_linear`` / ``apply_qlora`` of a meta ``nn.Linear``) computes nothing: its weight,
    quant state, bias and LoRA weights are meta tensors with the shapes of the chosen format. It gets its values from
    ``load_state_dict(sd, assign=True)`` (or ``to_empty(device=...)`` then ``load_state_dict(sd)``): the packed weight
    and quant state are the checkpoint's, in the checkpoint's format (quant_type, blocksize, double quant, storage;
    the shape must match); LoRA weights absent from the checkpoint are initialized then, per ``init_lora_weights``,
    on the weight's device. Until every tensor is loaded, ``forward`` raises a RuntimeError naming the ones that are
    not (never meta or uninitialized values). accelerate's ``load_checkpoint_in_model`` and
    ``load_checkpoint_and_dispatch`` (with a ``device_map``) load it too, one key at a time, when the layer is in the
    checkpoint's format (quant_type, double quant, storage): see ``qkernels._accelerate``.
    """

    # state-dict keys of this layer (weight, bias, lora_A.<name>.weight, ...) whose tensors hold no loaded value: meta,
    # or uninitialized after to_empty. Class-level defaults: a layer pickled by an older qkernels has neither.
    _unloaded: frozenset[str] = frozenset()
    _lora_init: dict[str, bool | str] = {}  # noqa: RUF012 - replaced, never mutated: init_lora_weights per adapter
    # the packed weight and quant-state tensors of a load split across calls (transformers' sharded 4-bit checkpoints
    # put a weight's absmax and its quant_map / blob in different shards), by key without prefix, until complete
    _pending_weight: dict[str, torch.Tensor] = {}  # noqa: RUF012 - replaced, never mutated
    _pending_dora: dict[str, torch.Tensor] = {}  # noqa: RUF012 - replaced, never mutated (_dora_magnitudes_at_init)
    # keys in _unloaded whose tensors left the meta device without values (to_empty): see _sync_assigned
    _empty_keys: frozenset[str] = frozenset()
    _module_name: str = ""  # the name apply_qlora found the layer under, for error messages ("" if unknown)
    quantized: bool = True  # False: a float base (quantize=False); the default for layers pickled by older qkernels
    # the packed weight's QuantState, storage dtype and size, kept on the module (see _PackedRecord); None on a float
    # base and on layers pickled by an older qkernels (their weight still carries its quant_state)
    _packed_record: _PackedRecord | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        quant_type: str = "nf4",
        double_quant: bool = True,
        blocksize: int = 64,
        compute_dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
        init_lora_weights: bool | str = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter_name: str = "default",
        loftq_iter: int = 1,
        quantize: bool = True,
        use_dora: bool = False,
        lora_bias: bool = False,
        _float_weight: torch.Tensor | None = None,
        _packed: tuple[torch.Tensor, QuantState] | None = None,
        _conv1d: bool = False,
        _bias: torch.Tensor | None = None,
    ):
        super().__init__()
        compute_dtype, quant_storage = as_dtype(compute_dtype), as_dtype(quant_storage)  # "bfloat16" as in BnB's config
        _check_positive_int(in_features, "in_features", "the size of the input's last dimension")
        _check_positive_int(out_features, "out_features", "the size of the output's last dimension")
        _check_quant_args(quant_type, blocksize, quant_storage, compute_dtype)
        _check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights, adapter_name)
        if not isinstance(double_quant, bool):
            raise ValueError(f"double_quant must be a bool, got {double_quant!r}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be None or one of {FLOAT_DTYPES}, got {dtype!r}")
        if not isinstance(quantize, bool):
            raise ValueError(f"quantize must be a bool, got {quantize!r} (False keeps the base weight in float)")
        if not quantize and compute_dtype is not None:  # was stored and silently unused: the matmul ran in float32
            raise ValueError(f"compute_dtype={compute_dtype} sets the precision of a 4-bit layer's matmul; with "
                             "quantize=False (a float base) the layer computes as nn.Linear, in its weight's dtype (or "
                             "under autocast): pass compute_dtype=None, and dtype=... (or .to(dtype)) for the weight")
        if not quantize and init_lora_weights == "loftq":
            raise ValueError("init_lora_weights='loftq' fits LoRA to the 4-bit quantization error, and quantize=False "
                             "keeps the base weight in float (no error to fit): use init_lora_weights=True")
        self.quantized = quantize
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters' magnitudes (qkernels.dora), keyed as peft's
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.merged = False  # peft's flag; a QLoRALinear never merges in place (see qkernels.merge_into_4bit)
        # a transformers Conv1D (GPT-2 family; set by from_linear): merges back to one, and a float base keeps its
        # weight [in, out]
        self.is_target_conv_1d_layer = _conv1d

        # A probe registered where the weight will be: on meta under torch.device("meta") / set_default_device, with
        # device="meta", and under accelerate's init_empty_weights (which moves each parameter to meta as it is
        # registered). A meta layer (or a meta float weight, e.g. apply_qlora on a meta model) gets the format's shapes
        # and nothing is computed: a 70B model never exists in float (see _new_meta_weight).
        self.weight = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        on_meta = self.weight.is_meta or (_float_weight is not None and _float_weight.is_meta)
        if on_meta and init_lora_weights == "loftq":
            raise ValueError("init_lora_weights='loftq' needs the float weight, which a layer on the meta device does "
                             "not have: build the model on a real device for LoftQ, or load trained LoRA weights")
        in_out = _conv1d and not quantize  # a Conv1D float base holds the Conv1D's own [in, out] weight
        want = (in_features, out_features) if in_out else (out_features, in_features)
        if _float_weight is not None and tuple(_float_weight.shape) != want:
            raise ValueError(f"weight has shape {tuple(_float_weight.shape)}, expected {want} = "
                             f"{'(in_features, out_features): a Conv1D' if in_out else '(out_features, in_features)'}")
        if _float_weight is None and _packed is None:  # nn.Linear's initialization (none on meta: no values to draw)
            _float_weight = torch.empty(out_features, in_features, device=device, dtype=dtype or torch.float32)
            if not _float_weight.is_meta:
                nn.init.kaiming_uniform_(_float_weight, a=math.sqrt(5))
            if in_out:
                _float_weight = _float_weight.t().contiguous()
        float_weight = None
        if not quantize:  # a float base (peft's lora.Linear on a plain nn.Linear): nothing is quantized
            if _packed is not None:
                raise ValueError("quantize=False keeps a float weight; a packed 4-bit weight cannot be its base")
            w = _float_weight if dtype is None or _float_weight.dtype == dtype else _float_weight.detach().to(dtype)
            # the linear's own Parameter when it has one (as peft's base_layer keeps it): no copy, ties kept
            self.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w.detach(), requires_grad=False)
            self.weight.requires_grad_(False)
            base_device, base_dtype = self.weight.device, self.weight.dtype
        else:
            if on_meta:
                shape_dtype = dtype or (_float_weight.dtype if _float_weight is not None else torch.float32)
                if _packed is not None:  # the packed format, the values dropped
                    st, quant_storage = _packed[1], _packed[0].dtype
                    quant_type, double_quant, blocksize, shape_dtype = st.quant_type, st.nested, st.blocksize, st.dtype
                packed, state = _new_meta_weight(out_features, in_features, quant_type, blocksize, double_quant,
                                                 quant_storage, shape_dtype)
            elif _packed is not None:
                packed, state = _packed
            else:  # quantize the given (or just initialized) float weight
                float_weight = _float_weight if dtype is None else _float_weight.to(dtype)
                packed, state = quantize_4bit(float_weight.detach().contiguous(), blocksize, quant_type,
                                              double_quant, quant_storage)
            self.weight = Params4bit(packed, False, state)
            base_device, base_dtype = packed.device, state.dtype
        # The dtype the float parts of this layer were last given (dtype, then .half() / .to(dtype) / model.to(...)):
        # what merge_and_unload produces (compute_dtype only sets the matmul's precision). quant_state.dtype stays
        # the checkpoint's.
        self.float_dtype: torch.dtype = dtype or base_dtype
        if bias and _bias is not None:  # the replaced layer's (from_linear / from_bnb): nothing drawn, so the LoRA
            self.bias = _bias  # init below takes the random numbers peft's would under the same seed
        elif bias:
            b = torch.empty(out_features, device=base_device, dtype=dtype or base_dtype)
            if not b.is_meta:
                bound = 1 / math.sqrt(in_features)  # nn.Linear's bias init
                nn.init.uniform_(b, -bound, bound)
            self.bias = nn.Parameter(b)
        else:
            self.register_parameter("bias", None)
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                          original_weight=float_weight, loftq_iter=loftq_iter, use_dora=use_dora, lora_bias=lora_bias)
        self._track_meta()

    def __setattr__(self, name: str, value: Any) -> None:
        """``nn.Module``'s, plus: a real tensor assigned as a float base's ``weight`` holds values. transformers'
        ``tie_weights()`` assigns the input embedding's Parameter to a tied head this way, also to a meta layer that
        no checkpoint gave a weight (a tied head's weight is saved once, under the embedding): the weight counts as
        loaded then, ``float_dtype`` is its dtype, and LoRA weights that hold no value are initialized on its device
        (as a checkpoint load without them does). DoRA magnitudes still at the old weight's row norms take the new
        weight's (``_dora_magnitudes_at_init``)."""
        at_init = {}
        if (name == "weight" and not getattr(self, "quantized", True) and isinstance(value, torch.Tensor)
                and not value.is_meta and "_modules" in self.__dict__ and not self.__dict__.get("_loading")
                and value is not self._parameters.get("weight")):
            # tie_weights() after a checkpoint replaced the embedding: DoRA magnitudes at init follow the new weight,
            # as in a checkpoint load (_load_from_state_dict)
            at_init = self._dora_magnitudes_at_init({}, "")
        super().__setattr__(name, value)
        if name == "weight" and isinstance(value, Params4bit):
            self._remember_packed(value)
            self._link_weight()
        if (name == "weight" and not getattr(self, "quantized", True) and isinstance(value, torch.Tensor)
                and not value.is_meta and "weight" in self._unloaded and not self.__dict__.get("_loading")):
            self._unloaded = self._unloaded - {"weight"}
            self.float_dtype = value.dtype
            self._sync_assigned()  # LoRA weights that accelerate assigned (before its retie) are not initialized again
            self._init_unloaded_lora(value.device)
            self._init_unloaded_magnitudes()
        if at_init:
            self._reinit_dora_magnitudes(at_init)

    def __setstate__(self, state: dict) -> None:
        """``nn.Module``'s (unpickling, deepcopy), then the weight linked to this layer again (the link is weak and
        not copied: ``_link_weight``)."""
        super().__setstate__(state)
        if isinstance(self._parameters.get("weight"), Params4bit):
            self._link_weight()

    def _link_weight(self) -> None:
        """Link the packed weight and its QuantState to this layer, so that accelerate's per-key loader can give
        their pieces to it (``qkernels._accelerate``). Links the object ``_parameters`` holds: accelerate's
        ``init_empty_weights`` replaces a Parameter as it is registered."""
        self._link_weight_of(self._parameters["weight"])

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_linear(cls, linear: nn.Module, **qlora_kwargs: Any) -> QLoRALinear:
        """Quantize ``linear.weight`` (no copy of it is kept) into a new layer on the linear's device; keeps bias.

        ``linear``: an ``nn.Linear``, or a transformers ``Conv1D`` (GPT-2's ``y = x @ W + b`` with ``W [in, out]``),
        whose weight is transposed to ``[out, in]`` first, as transformers' bitsandbytes integration does.
        ``qlora_kwargs`` are ``QLoRALinear``'s keyword arguments (r, lora_alpha, quant_type, ...); ``dtype``
        (default: the linear's weight dtype) is what the weight is cast to before quantization (``quant_state.dtype``)
        and the bias dtype. ``init_lora_weights="loftq"`` uses the float weight.

        ``quantize=False`` keeps the weight in float instead (a float base, see ``QLoRALinear``): the layer holds the
        linear's own weight Parameter (frozen; converted only when ``dtype`` differs), as peft's ``lora.Linear`` holds
        its base layer, so a weight tied to another module (a head tied to the input embeddings) stays shared. A
        ``Conv1D``'s Parameter is held as it is, ``[in, out]``, and the forward is ``Conv1D``'s
        (``addmm(bias, x, W)``), as peft's LoRA on a Conv1D (``fan_in_fan_out``).

        Returns:
            A new ``QLoRALinear`` on the linear's device, in training mode as any new module (``apply_qlora``
            gives it the replaced module's mode).

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear`` / ``Conv1D``.
            ValueError: its weight is not float32/float16/bfloat16, ``device`` was passed, or a ``qlora_kwargs``
                value is bad (see ``QLoRALinear``).
        """
        if is_conv1d(linear):
            w = linear.weight.detach().t()
            in_features, out_features = linear.nx, linear.nf
        elif isinstance(linear, nn.Linear):
            w = linear.weight.detach()
            in_features, out_features = linear.in_features, linear.out_features
        else:
            raise TypeError(f"from_linear expects an nn.Linear (or transformers Conv1D), got {type(linear).__name__}")
        for k in ("device", "_float_weight", "_packed", "_conv1d", "_bias"):
            if k in qlora_kwargs:
                raise ValueError(f"from_linear takes {k!r} from the linear; do not pass it")
        if w.dtype not in FLOAT_DTYPES:
            fix = ("cast the model first, model.float() or model.to(torch.bfloat16): the 4-bit kernels compute in "
                   "those dtypes" if w.is_floating_point() else
                   "a bitsandbytes Linear4bit is wrapped as it is by QLoRALinear.from_bnb")
            raise ValueError(f"linear.weight must be float32/float16/bfloat16, got {w.dtype} ({fix})")
        qlora_kwargs.setdefault("dtype", w.dtype)
        if qlora_kwargs.get("quantize", True) is False:
            w = linear.weight  # the Parameter itself ([in, out] for a Conv1D): no copy, and a tie survives
        bias = None
        if linear.bias is not None:
            bias = nn.Parameter(linear.bias.detach().to(qlora_kwargs["dtype"], copy=True),
                                requires_grad=linear.bias.requires_grad)
        return cls(in_features, out_features, bias=bias is not None, device=w.device, _float_weight=w,
                   _conv1d=is_conv1d(linear), _bias=bias, **qlora_kwargs)

    @classmethod
    def from_bnb(cls, bnb_linear: nn.Module, **lora_kwargs: Any) -> QLoRALinear:
        """Wrap a bitsandbytes ``Linear4bit``'s packed weight and quant state (no requantization) with LoRA.

        The packed bytes and scales are copied (no storage shared with the bnb layer); the QuantState is rebuilt
        through bitsandbytes' own ``as_dict(packed=True)`` keys. ``lora_kwargs``: r, lora_alpha, lora_dropout,
        use_rslora, init_lora_weights (not "loftq": the float weight is gone), use_dora, adapter_name, compute_dtype
        (default: the bitsandbytes layer's ``compute_dtype``).

        Args:
            bnb_linear: a bitsandbytes ``Linear4bit`` whose weight is quantized (moved to a device once).

        Returns:
            A new ``QLoRALinear`` holding a copy of the packed weight, the bias and a fresh adapter.

        Raises:
            ValueError: ``bnb_linear`` is not a quantized ``Linear4bit``, a format argument was passed (the format
                is the bnb layer's), or ``init_lora_weights="loftq"``.
        """
        weight = getattr(bnb_linear, "weight", None)
        qs = getattr(weight, "quant_state", None)
        if type(weight).__name__ != "Params4bit" or qs is None:
            raise ValueError("from_bnb expects a quantized bitsandbytes Linear4bit (weight a Params4bit with a "
                             "quant_state); call .to(device) on it first: bitsandbytes quantizes on the first move")
        bad = set(lora_kwargs) - {"r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights",
                                  "adapter_name", "compute_dtype", "use_dora", "lora_bias"}
        if bad:
            raise ValueError(f"from_bnb does not take {sorted(bad)}: the 4-bit format comes from the bnb layer")
        if lora_kwargs.get("init_lora_weights") == "loftq":
            raise ValueError("init_lora_weights='loftq' needs the float weight; use QLoRALinear.from_linear")
        data = weight.data
        if getattr(qs, "packing_format_for_cpu", False):  # bnb's CPU inference repacking: undo it, as its save does
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            # on a copy: the inverse rewrites the quant state in place, which broke the bnb layer (its next eval
            # forward repacked the already repacked bytes: outputs ~3 off)
            data, qs = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(qs))
        # copies, so the two layers share no storage (bnb's QuantState tensors would otherwise be aliased)
        bnb_dict = {k: v.detach().clone() for k, v in qs.as_dict(packed=True).items()}
        state = QuantState.from_dict(bnb_dict, device=data.device)
        packed = data.detach().clone()
        state.validate(packed)
        lora_kwargs.setdefault("compute_dtype", getattr(bnb_linear, "compute_dtype", None))
        out_features, in_features = state.shape
        bias = None
        if bnb_linear.bias is not None:
            bias = nn.Parameter(bnb_linear.bias.detach().clone(), requires_grad=bnb_linear.bias.requires_grad)
        layer = cls(in_features, out_features, bias=bias is not None, quant_type=state.quant_type,
                    double_quant=state.nested, blocksize=state.blocksize, quant_storage=packed.dtype,
                    device=packed.device, dtype=state.dtype, _packed=(packed, state), _bias=bias, **lora_kwargs)
        # transformers' bitsandbytes loader records what each Linear4bit replaced: a GPT-2 Conv1D merges back to one
        source = getattr(bnb_linear, "source_cls", None)
        layer.is_target_conv_1d_layer = isinstance(source, type) and any(c.__name__ == "Conv1D" for c in source.__mro__)
        return layer

    # ------------------------------------------------------------------ adapters (peft's API)
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, *,
                     original_weight: torch.Tensor | None = None, loftq_iter: int = 1, use_dora: bool = False,
                     lora_bias: bool = False) -> None:
        """Add (or replace) adapter ``adapter_name``: ``lora_A [r, in]``, ``lora_B [out, r]`` float32.

        The first adapter becomes active; later ones are added inactive and frozen (peft's behaviour).
        ``init_lora_weights="loftq"`` needs ``original_weight`` (the float weight W that was quantized); with
        ``loftq_iter > 1`` the stored 4-bit weight is replaced by LoftQ's (see ``qkernels.loftq``).
        ``lora_alpha``, ``lora_dropout``, ``use_rslora``: as in ``QLoRALinear`` (scaling ``lora_alpha / r``, or
        ``/ sqrt(r)`` with ``use_rslora``). ``use_dora``: a DoRA adapter (``qkernels.dora``): its magnitude
        ``lora_magnitude_vector.<adapter_name>.weight`` (float32 ``[out_features]``) starts as the row norms of
        ``W + s B A`` with the initialized A, B and ``W`` dequantized to its quant-state dtype (peft's
        ``DoraLinearLayer.update_layer``, peft/tuners/lora/dora.py:101-130). ``lora_bias``: ``lora_B`` gets a bias
        (``lora_B.<adapter_name>.bias``, float32 ``[out_features]``, zeros at init True; see ``QLoRALinear``).

        Raises:
            ValueError: a bad LoRA argument (named in the message), ``"loftq"`` without ``original_weight``,
                ``use_dora`` on a layer whose weight holds no values and is not meta (``to_empty`` memory, part of a
                sharded load; on a meta weight the magnitude is computed when the weight is loaded:
                ``_init_unloaded_magnitudes``), or ``lora_bias`` with DoRA or an init other than True / False (peft's
                LoraConfig refuses both).
        """
        _check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights, adapter_name)
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora must be a bool, got {use_rslora!r}")
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora must be a bool, got {use_dora!r}")
        _check_lora_bias(lora_bias, use_dora, init_lora_weights, self.bias is not None)
        if use_dora and not self.weight.is_meta and "weight" in self._unloaded:
            raise ValueError("use_dora=True initializes the DoRA magnitude from the base weight's row norms, and this "
                             "layer's weight holds no values (memory from to_empty, or part of a sharded load): "
                             "load the base checkpoint first, then add the DoRA adapter (or load_adapter)")
        dev = self.weight.device
        A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=torch.float32)
        B = nn.Linear(r, self.out_features, bias=lora_bias, device=dev, dtype=torch.float32)
        if lora_bias and init_lora_weights is True:
            nn.init.zeros_(B.bias)  # peft's init; False keeps nn.Linear's default, as peft
        scaling = lora_scaling(lora_alpha, r, use_rslora)
        if init_lora_weights == "loftq":
            if not self.quantized:
                raise ValueError("init_lora_weights='loftq' fits LoRA to the 4-bit quantization error; this layer "
                                 "keeps its base weight in float (quantize=False): use init_lora_weights=True")
            if original_weight is None:
                raise ValueError("init_lora_weights='loftq' needs the original float weight: build the layer with "
                                 "QLoRALinear.from_linear(linear, init_lora_weights='loftq') or apply_qlora(...)")
            others = [n for n in self.lora_A if n != adapter_name]
            if loftq_iter != 1 and others:
                raise ValueError(f"loftq_iter={loftq_iter} replaces the 4-bit weight, which adapters {others} were "
                                 "trained against; use loftq_iter=1 (keeps the weight) or a fresh layer")
            from .loftq import loftq_init

            st = self.weight.quant_state
            res = loftq_init(original_weight, r, scaling, quant_type=st.quant_type, blocksize=st.blocksize,
                             double_quant=st.nested, quant_storage=self.weight.dtype, num_iter=loftq_iter,
                             packed=self.weight.data, quant_state=st)
            with torch.no_grad():
                A.weight.copy_(res.lora_A)
                B.weight.copy_(res.lora_B)
            if res.packed is not self.weight.data:
                self.weight = Params4bit(res.packed, False, res.quant_state)
        elif init_lora_weights is True:
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(A.weight, std=1 / r)
            nn.init.zeros_(B.weight)
        # init_lora_weights=False: nn.Linear's default init for both, as peft
        self._round_as_peft(A, B)
        if "lora_magnitude_vector" not in self._modules:  # a layer pickled by an older qkernels
            self.lora_magnitude_vector = nn.ModuleDict()
        if adapter_name in self.lora_magnitude_vector:  # replaced: a plain adapter of that name keeps no magnitude
            del self.lora_magnitude_vector[adapter_name]
        if use_dora:  # after A, B (and a LoftQ weight) are final, as peft's layer.py:316-317 runs the variant's init
            from .dora import DoraMagnitude

            if self.weight.is_meta:  # computed when the weight is loaded (_init_unloaded_magnitudes), as peft would
                norm = torch.empty(self.out_features, dtype=torch.float32, device="meta")
            else:
                norm = self._dora_norm(A.weight, B.weight, scaling).to(torch.float32)
                _check_dora_norm(norm)
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm)
        self.lora_A[adapter_name] = A
        self.lora_B[adapter_name] = B
        self._lora_init = {**self._lora_init, adapter_name: init_lora_weights}  # for a meta layer's load
        self._unloaded = self._unloaded - self._adapter_keys(adapter_name)
        self.lora_dropout[adapter_name] = nn.Dropout(p=float(lora_dropout)) if lora_dropout > 0 else nn.Identity()
        for m in (A, B, self.lora_dropout[adapter_name], *self._magnitude_modules(adapter_name)):
            m.train(self.training)  # an adapter added to a layer in eval mode is in eval mode
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = scaling
        self.use_rslora[adapter_name] = use_rslora
        self.set_adapter(self.active_adapter if self.active_adapter is not None else adapter_name)
        self._track_meta()

    def _round_as_peft(self, A: nn.Module, B: nn.Module) -> None:
        """Round freshly initialized LoRA weights through the dtype peft gives them: peft moves a new adapter to its
        base layer's dtype (a bitsandbytes ``Linear4bit``'s ``compute_dtype``, a float base's weight dtype;
        tuners_utils.py:2149-2212) and ``get_peft_model`` casts it back to float32 (``autocast_adapter_dtype``), so
        under bf16 / fp16 peft's initial A and B are float32 tensors holding bf16 / fp16 values. Rounding them here
        gives the same initial adapter under the same seed (the DoRA magnitude is computed from these, as in peft).
        A 4-bit layer without a ``compute_dtype`` computes in its input's dtype, the model's: peft's LoRA on that
        float model is in the weight's dtype, so that is the dtype here (``float_dtype``)."""
        dtype = (self.compute_dtype or self.float_dtype) if self.quantized else self.weight.dtype
        if dtype in (torch.float16, torch.bfloat16):
            with torch.no_grad():
                for p in (*A.parameters(), *B.parameters()):
                    if not p.is_meta:
                        p.copy_(p.to(dtype))

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one adapter that runs; it becomes trainable, the others frozen (as peft).

        Raises ValueError if the layer has no adapter of that name."""
        if adapter_name not in self.lora_A:
            raise ValueError(f"no adapter named {adapter_name!r}; this layer has {list(self.lora_A)}")
        for name in self.lora_A:
            on = name == adapter_name
            self.lora_A[name].requires_grad_(on)
            self.lora_B[name].requires_grad_(on)
            for mag in self._magnitude_modules(name):  # peft: the magnitude is an adapter layer (variants.py:143)
                mag.requires_grad_(on)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; if it was active, the first remaining adapter becomes active (or none).

        Raises ValueError if the layer has no adapter of that name."""
        if adapter_name not in self.lora_A:
            raise ValueError(f"no adapter named {adapter_name!r}; this layer has {list(self.lora_A)}")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[adapter_name]
        if adapter_name in self._magnitudes():
            del self.lora_magnitude_vector[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            del d[adapter_name]
        self._lora_init = {k: v for k, v in self._lora_init.items() if k != adapter_name}
        self._unloaded = self._unloaded - self._adapter_keys(adapter_name)
        forget_bias_mode(self, adapter_name)  # its LoraConfig.bias (qkernels.base_bias)
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            if len(self.lora_A):
                self.set_adapter(next(iter(self.lora_A)))

    def set_lora_weight(self, adapter_name: str, which: str, value: torch.Tensor) -> None:
        """Set ``lora_A``, ``lora_B`` or a DoRA adapter's ``lora_magnitude_vector`` (``which``) of ``adapter_name`` to
        ``value`` (its shape; cast to its dtype).

        Copies in place, so the Parameter (and an optimizer holding it) stays. On the meta device, where a copy is a
        no-op, the Parameter is replaced by one holding ``value`` on ``value``'s device: an adapter loaded into a meta
        model before its base checkpoint keeps its values (the base load then leaves them alone).

        Raises:
            ValueError: ``which`` is not "lora_A", "lora_B" or "lora_magnitude_vector", the layer has no adapter
                ``adapter_name`` (or it is not a DoRA adapter, for the magnitude), or ``value``'s shape differs from
                the weight's.
        """
        if which not in ("lora_A", "lora_B", "lora_magnitude_vector", "lora_B.bias"):
            raise ValueError(f"which must be 'lora_A', 'lora_B', 'lora_B.bias' or 'lora_magnitude_vector', got "
                             f"{which!r}")
        if adapter_name not in self.lora_A:
            raise ValueError(f"no adapter named {adapter_name!r}; this layer has {list(self.lora_A)}")
        if which == "lora_magnitude_vector" and adapter_name not in self._magnitudes():
            raise ValueError(f"adapter {adapter_name!r} is not a DoRA adapter (use_dora=False): it has no magnitude")
        if which == "lora_B.bias" and not self.has_lora_bias(adapter_name):
            raise ValueError(f"adapter {adapter_name!r} has no lora_B bias (lora_bias=False)")
        module, attr = (self.lora_B[adapter_name], "bias") if which == "lora_B.bias" else \
            (getattr(self, which)[adapter_name], "weight")
        w = getattr(module, attr)
        key = f"lora_B.{adapter_name}.bias" if which == "lora_B.bias" else f"{which}.{adapter_name}.weight"
        if tuple(value.shape) != tuple(w.shape):
            raise ValueError(f"{key} has shape {tuple(w.shape)}, got {tuple(value.shape)}")
        with torch.no_grad():
            if w.is_meta:
                new = nn.Parameter(value.detach().to(w.dtype, copy=True), requires_grad=w.requires_grad)
                setattr(module, attr, new)
            else:
                w.copy_(value)
        self._unloaded = self._unloaded - {key}

    @staticmethod
    def _adapter_keys(name: str) -> set[str]:
        """The state-dict keys (without prefix) an adapter ``name`` may have."""
        return {f"lora_A.{name}.weight", f"lora_B.{name}.weight", f"lora_B.{name}.bias",
                f"lora_magnitude_vector.{name}.weight"}

    def has_lora_bias(self, adapter_name: str) -> bool:
        """Returns whether adapter ``adapter_name``'s ``lora_B`` has a bias (peft's ``lora_bias[adapter_name]``)."""
        return adapter_name in self.lora_B and self.lora_B[adapter_name].bias is not None

    @property
    def lora_bias(self) -> dict[str, bool]:
        """peft's ``lora_bias`` dict: adapter name -> whether its ``lora_B`` has a bias."""
        return {n: self.has_lora_bias(n) for n in self.lora_B}

    def _magnitudes(self) -> nn.ModuleDict | dict:
        """The DoRA magnitudes by adapter name (``{}`` on a layer pickled by an older qkernels)."""
        return self._modules.get("lora_magnitude_vector") or {}

    def _magnitude_modules(self, name: str) -> list[nn.Module]:
        """``[the DoraMagnitude of adapter name]`` for a DoRA adapter, ``[]`` for a plain one."""
        return [self._magnitudes()[name]] if name in self._magnitudes() else []

    def is_dora(self, adapter_name: str) -> bool:
        """Returns whether adapter ``adapter_name`` is a DoRA adapter (has a ``lora_magnitude_vector`` entry);
        False for a plain or absent one."""
        return adapter_name in self._magnitudes()

    def _dora_norm(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        """``||W + scaling * B A||`` per row in A's dtype, no gradient, as the DoRA forward computes it (so a magnitude
        set at init equals the forward's norm at B = 0): a 4-bit weight a slab of rows at a time
        (``dora_weight_norm_4bit``), a float base's weight whole (``dora_weight_norm`` on ``_dora_base_weight``)."""
        from .dora import dora_weight_norm, dora_weight_norm_4bit

        if self.quantized:
            return dora_weight_norm_4bit(*self._packed(), A, B, scaling)
        return dora_weight_norm(self._dora_base_weight(A.dtype), A, B, scaling)

    def _dora_base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as peft's DoRA sees it, a new ``[out, in]`` tensor of ``dtype``: a 4-bit weight dequantized
        to its quant-state dtype (bitsandbytes' ``dequantize_4bit``, peft/utils/integrations.py:116-123) then cast; a
        float base's weight cast (dora.py:141-142), ``[out, in]`` for a Conv1D too (peft's ``transpose(weight,
        fan_in_fan_out)``, dora.py:90 and 157: its norm is over output rows)."""
        if not self.quantized:
            w = self.weight.detach()
            return (w.t() if self._weight_in_out else w).to(dtype)
        packed, st = self._packed()
        return dequantize_4bit(packed, st, st.dtype).to(dtype)

    def enable_adapters(self, enabled: bool) -> None:
        """peft's toggle: ``enabled=False`` runs the plain 4-bit linear, ``True`` the active adapter again."""
        self.disable_adapters = not enabled

    @property
    def active_adapters(self) -> list[str]:
        """peft's list of the adapters that run: ``[active_adapter]``, or ``[]`` when none is set."""
        return [] if self.active_adapter is None else [self.active_adapter]

    # ------------------------------------------------------------------ the packed weight, also under FSDP
    def _remember_packed(self, w: Params4bit) -> None:
        """Record ``w``'s QuantState, storage dtype and size on the module (``_PackedRecord``). The size is the one
        the state needs, not ``w``'s: FSDP1 (``use_orig_params=True``) sets the original Parameter back holding this
        rank's shard (often empty)."""
        if w.quant_state is not None:
            rows = _packed_rows(w.quant_state.numel, w.dtype)
            self.__dict__["_packed_record"] = _PackedRecord(w.quant_state, w.dtype, rows)

    def _packed(self) -> tuple[torch.Tensor, QuantState]:
        """The packed bytes (``[rows, 1]`` of the storage dtype) and the QuantState that decodes them.

        The weight's own ``quant_state`` when it has one; else (FSDP replaced the Parameter: the all-gathered plain
        tensor in FSDP2's forward, a flat-parameter view in FSDP1's) the module's record, if the weight holds as many
        elements of the same dtype as the packed weight did: the same bytes. Like bitsandbytes'
        ``fix_4bit_weight_quant_state_from_module``, with the size and dtype checked, so other bytes are never decoded.

        Raises:
            TypeError: the weight is of another size (a float weight assigned over it; torch.export's fake parameters,
                refused whatever their size), of another dtype (cast: FSDP's mixed precision), or an FSDP shard.
        """
        w = self.weight
        state = getattr(w, "quant_state", None)
        if state is not None:
            return w.data, state
        if type(w).__name__ == "DTensor":  # torch.distributed.tensor.DTensor, without importing it
            raise TypeError(_SHARDED)
        state = self._recorded_state(w)
        if state.device != w.device:  # FSDP moved the parameters (the state is not one): it follows, as in .to()
            state.to(w.device)
        return w.detach().reshape(-1, 1), state

    def _recorded_state(self, w: Any) -> QuantState:
        """The module's recorded QuantState for a weight ``w`` that has none, if ``w`` holds the packed weight's
        bytes: ``_PackedRecord.numel`` elements of its storage dtype (an FSDP2 DTensor counts its global size)."""
        rec = self._packed_record
        if rec is None or not isinstance(w, torch.Tensor) or torch.compiler.is_exporting() or w.numel() != rec.numel:
            raise TypeError(_NO_QUANT_STATE.format(type(w).__name__))
        if w.dtype != rec.storage:
            raise TypeError(_CAST_PACKED.format(w.numel(), w.dtype, rec.storage, w.dtype))
        return rec.quant_state

    def _fqn_modifiers(self) -> dict[str, str]:
        """torch.distributed.checkpoint's hook (``StateDictOptions.dsd_fqn_modifiers``): ``get_model_state_dict``
        resolves each key as an attribute path, and under FSDP2 ``weight`` is a DTensor without ``absmax`` & co.
        Mapping ``weight`` to ``_checkpoint_keys`` makes it resolve ``weight.*`` on that object instead; the keys
        are unchanged."""
        return {"weight": "_checkpoint_keys"} if self.quantized and self._packed_record is not None else {}

    @property
    def _checkpoint_keys(self) -> Any:
        """An object whose ``weight`` answers the state-dict keys under ``weight`` as attributes (a meta Params4bit
        with the recorded QuantState: ``absmax``, ``quant_map``, ``nested_*``, ``quant_state.bitsandbytes__*``)."""
        rec = self._packed_record
        return _CheckpointKeys(Params4bit(torch.empty(0, dtype=rec.storage, device="meta"), False, rec.quant_state))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``x @ dequant(W)^T + scaling * dropout(x) @ A^T @ B^T + bias`` with the active adapter (a DoRA adapter:
        rows rescaled by ``m / ||W + s B A||``, see ``qkernels.dora``).

        Args:
            x: ``[..., in_features]`` float32/float16/bfloat16 (cast to ``compute_dtype`` when that is set).
            adapter_names: peft's mixed batch: one adapter name per sample (``x``'s first dimension), ``"__base__"``
                for none; see ``qkernels.mixed_batch`` (ValueError: a length that is not the batch size, a DoRA one).

        Returns:
            ``[..., out_features]`` in ``x``'s dtype (a float base: nn.Linear's, see ``_float_forward``).

        Raises:
            TypeError: the weight lost its ``quant_state`` (a float weight assigned over it, or torch.export's fake
                parameters), or ``x`` has an unsupported dtype; ValueError: ``x``'s last dimension is not
                ``in_features`` (from ``matmul_4bit_lora``); RuntimeError: weights never loaded (a meta layer
                or ``to_empty`` memory; the message names the keys), or, on a float base, ``x``'s dtype is not the
                weight's outside autocast (torch's error, as nn.Linear's).
        """
        if self._unloaded:
            self._raise_unloaded()
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        if DECODE_PLANS and not self.training and not torch.is_grad_enabled():
            y = self._planned_forward(x)
            if y is not None:
                return y
        name = None if self.disable_adapters else self.active_adapter
        A = B = b_mod = None
        scaling, p = 0.0, 0.0
        if name is not None:
            # The submodules through _modules, not nn.Module.__getattr__ (~0.8 us each: a decode step of a small
            # layer is ~25 us of kernel, so the per-call glue counts); nn.Identity (no dropout) has no p.
            mods = self._modules
            a_mod, b_mod, drop = mods["lora_A"][name], mods["lora_B"][name], mods["lora_dropout"][name]
            A, B, scaling = a_mod.weight, b_mod.weight, self.scaling[name]
            p = 0.0 if type(drop) is nn.Identity else getattr(drop, "p", 0.0)
            if self.training and not (A.requires_grad or B.requires_grad) and torch.is_grad_enabled():
                _warn_frozen_adapter(name)
        dora = name is not None and name in self._magnitudes()
        if not self.quantized:
            if dora:
                from .dora import dora_forward_float

                # a Conv1D's [in, out] weight as peft's transpose(weight, fan_in_fan_out) sees it (dora.py:90, 157):
                # F.linear(x, W^T) runs Conv1D's addmm(bias, x, W), and the norm is over output rows
                w = self.weight.t() if self._weight_in_out else self.weight
                return dora_forward_float(x, w, A, B, self._magnitudes()[name].weight, scaling, self.bias,
                                          self.lora_dropout[name], self.training)
            return self._float_forward(x, name, A, B, scaling)
        packed, state = self._packed()
        cdt = self.compute_dtype
        xc = x if cdt is None or cdt == x.dtype else x.to(cdt)
        if dora:
            from .dora import dora_forward_4bit

            # ||W + s B A|| a slab of rows at a time (dora_weight_norm_4bit): nothing [out, in] kept or saved
            y = dora_forward_4bit(x, xc, packed, state, A, B, self._magnitudes()[name].weight,
                                  scaling, self.bias, self.lora_dropout[name], self.training)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        if name is not None and xc is not x and _loses_precision(x.dtype, cdt) and not torch.is_autocast_enabled():
            return self._lora_beside_base(x, xc, packed, state, name, A, b_mod, scaling)
        bias = self.bias if b_mod is None or b_mod.bias is None else self._effective_bias(name, scaling)
        # (no adapter here: with one, a narrowing cast took _lora_beside_base above)
        late = bias is not None and xc is not x and _loses_precision(x.dtype, cdt) and not torch.is_autocast_enabled()
        y = matmul_4bit_lora(xc, packed, state, A, B, scaling, None if late else bias, p, training=self.training)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y + bias.to(y.dtype) if late else y

    # ------------------------------------------------------------------ the decode fast path
    # A decode step of a small layer is a few microseconds of kernel and was ~20 us of Python around it (this forward,
    # matmul_4bit_lora's checks, the QuantState's validation, the backend's resolution): a quarter of a 0.5B model's
    # token on the CPU machine. In eval without grad the layer keeps a plan, the kernel's arguments validated once,
    # keyed by every object (and tensor shape / dtype / data pointer) they came from; any change rebuilds it.
    def _plan_key(self, x: torch.Tensor) -> tuple[tuple, tuple] | None:
        """What the decode plan depends on, read again per call, as ``(key, objects)``: the key holds the ids of the
        objects (compared by identity: a tensor's ``==`` is elementwise), their shapes, dtypes and data pointers, and
        the plain values; the plan keeps the objects alive, so no id is reused while it stands. None where no plan
        applies (no quant_state on the weight: a float base, FSDP, a replaced weight)."""
        w = self._parameters["weight"]
        state = getattr(w, "quant_state", None)
        if not isinstance(state, QuantState) or not self.quantized:  # else: the full forward (and its error)
            return None
        name = None if self.disable_adapters else self.active_adapter
        a = b = b_bias = scaling = None
        if name is not None:
            mods = self._modules
            a, bm = mods["lora_A"][name]._parameters["weight"], mods["lora_B"][name]
            b, b_bias, scaling = bm._parameters["weight"], bm._parameters.get("bias"), self.scaling[name]
        bias = self._parameters.get("bias")
        am, code, s2 = state.absmax, state.code, state.state2
        s2a, s2c, offset = (None, None, None) if s2 is None else (s2.absmax, s2.code, state.offset)
        objs = (w, state, am, code, s2, s2a, s2c, offset, a, b, b_bias, bias)
        key = (tuple(map(id, objs)), x.dtype, x.device, x.shape[-1], w.data_ptr(), w.shape, w.dtype,
               am.shape, am.dtype, code.shape, code.dtype, state.blocksize, state.shape,
               None if s2 is None else (s2a.shape, s2a.dtype, s2c.shape, s2.blocksize),
               name, None if a is None else (a.shape, a.dtype, b.shape, b.dtype), scaling,
               None if bias is None else (bias.shape, bias.dtype), self.compute_dtype,
               _os.environ.get("QKERNELS_BACKEND"))
        return key, objs

    def _planned_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Inference (eval, no grad, CPU) through the layer's plan (``_build_plan``), rebuilt whenever ``_plan_key``
        changes; None where the plan does not apply (the full forward runs)."""
        if (x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or _lora_mod._traced()
                or type(x).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__):
            return None  # tracing, a dispatch mode or functorch transform, a wrapper subclass: the full forward
        keyed = self._plan_key(x)
        if keyed is None:
            return None
        plan = _DECODE_PLANS.get(self)
        if plan is None or plan[0] != keyed[0]:
            _DECODE_PLANS[self] = plan = (keyed[0], self._build_plan(x), keyed[1])
        return None if plan[1] is None else plan[1](x)

    def _build_plan(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
        """The fused GEMV's call with this layer's arguments, checked here once as ``forward`` checks them per call
        (``matmul_4bit_lora``, ``QuantState.validate``); None where the layer's forward does more than that call (a
        float base, DoRA, a LoRA bias, a cast to ``compute_dtype``, no native GEMV, a forced backend, adapters the
        binding does not read in place). The returned function gives None for rows past the GEMV's limit."""
        from . import _backend, _linear, _native

        name = None if self.disable_adapters else self.active_adapter
        if x.dtype not in FLOAT_DTYPES or (self.compute_dtype is not None and self.compute_dtype != x.dtype):
            return None
        if name is not None and name in self._magnitudes():
            return None
        packed, state = self._packed()
        if (_backend.resolve("linear_4bit", x.device, None) != "cpu" or not _linear._has_gemv(x.device)
                or len(state.shape) != 2 or packed.device != x.device or not packed.is_contiguous()):
            return None
        state.validate(packed)
        N, K = int(state.shape[0]), int(state.shape[1])
        if x.shape[-1] != K:
            return None
        A = B = None
        scaling = 1.0
        if name is not None:
            A = self._modules["lora_A"][name].weight
            b_mod = self._modules["lora_B"][name]
            B, scaling = b_mod.weight, float(self.scaling[name])
            if (b_mod.bias is not None or A.dtype not in (torch.float32, torch.bfloat16)
                    or B.dtype not in FLOAT_DTYPES or A.shape[1] != K or B.shape[0] != N or A.shape[0] != B.shape[1]
                    or A.device != x.device or B.device != x.device):
                return None
        bias = self.bias
        if bias is not None and (bias.shape != (N,) or bias.device != x.device or not bias.is_floating_point()):
            return None
        raw = packed if packed.dtype == torch.uint8 else packed.reshape(-1).view(torch.uint8)
        s2 = state.state2
        nested = (s2.absmax, s2.code, state.offset, s2.blocksize) if s2 is not None else (None, None, None, 256)
        absmax, code, blocksize = state.absmax, state.code, int(state.blocksize)

        def run(x: torch.Tensor) -> torch.Tensor | None:
            x2 = x.reshape(-1, K) if x.dim() != 2 else x
            M = x2.shape[0]
            if M == 0 or M > _linear.gemv_max_m(x2) or (A is not None and not A.is_contiguous()):
                return None
            y = _native.gemv_4bit_lora_raw(x2.contiguous(), raw, absmax, code, blocksize, N, *nested, None, B, bias,
                                           lora_A=A, lora_scale=scaling)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)

        return run

    def _lora_beside_base(self, x: torch.Tensor, xc: torch.Tensor, packed: torch.Tensor, state: QuantState,
                          name: str, A: torch.Tensor, b_mod: nn.Module, scaling: float) -> torch.Tensor:
        """peft's bitsandbytes layer (peft/tuners/lora/bnb.py:540-575) when ``compute_dtype`` is narrower than the
        input's dtype (a float32 model with a bf16 / fp16 compute dtype): the base product in the compute dtype on the
        cast input, cast back to the input's dtype, plus ``s * lora_B(lora_A(dropout(x)))`` on the input itself in
        the adapters' dtype. Fused on the cast input instead, the LoRA term and the gradients of A and B carried the
        compute dtype's rounding of x and of the output gradient, which peft's do not: A and B gradients 4x (fp16)
        to 60x peft's error on a BART (tests/fuzz_vs_peft.py, flow c).

        The base bias is added after the cast back, in the input's dtype: bitsandbytes adds it in the compute dtype
        (its ``Linear4bit`` casts the bias Parameter itself to it), a rounding of the same bias value in every row;
        a float32 bias that training moved (peft's ``bias="all"``) then put a systematic error into every token, which
        a sum over tokens (the gradient of a LayerNorm's bias) accumulates: 5x peft's error on a Starcoder2
        (fuzz_vs_peft seed 52 case 67), where peft's own bias is its bf16 Parameter."""
        y = matmul_4bit_lora(xc, packed, state, None, None, 0.0, None, 0.0, training=self.training)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        xl = x if x.dtype == A.dtype else x.to(A.dtype)
        lora = b_mod(nn.functional.linear(self.lora_dropout[name](xl), A)) * scaling
        return y + (lora if lora.dtype == y.dtype else lora.to(y.dtype))

    def _effective_bias(self, name: str | None, scaling: float) -> torch.Tensor | None:
        """The bias the fused op adds: the base bias, plus ``scaling * b_B`` for an adapter with ``lora_bias`` (peft's
        ``lora_B(...) * scaling`` scales lora_B's bias), formed with differentiable ops in float32 (b_B's dtype), so
        both biases get their gradients. peft adds ``base + bias`` and ``s * (x A^T B^T + b_B)`` separately: the sum is
        the same up to float32 rounding of the bias terms (tests/test_lora_bias.py states the bound)."""
        if name is None or not self.has_lora_bias(name):
            return self.bias
        b = self.lora_B[name].bias * scaling
        return b if self.bias is None else self.bias.to(b.dtype) + b

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """peft's ``_check_forward_args`` then, unless adapters are disabled, ``_mixed_batch_forward``
        (peft/tuners/lora/bnb.py:458-511, layer.py:853-898): the base product once for the batch (``forward`` with no
        adapter), each named adapter's LoRA term on its rows only (``qkernels.mixed_batch``)."""
        from .mixed_batch import check_layer_args, linear_mixed_batch

        check_layer_args(self, x, adapter_names)
        if not self.quantized:
            result = self._float_base_forward(x)
        else:  # forward's 4-bit product with no adapter (the packed weight as forward finds it, FSDP included)
            packed, state = self._packed()
            cdt = self.compute_dtype
            xc = x if cdt is None or cdt == x.dtype else x.to(cdt)
            result = matmul_4bit_lora(xc, packed, state, None, None, 0.0, self.bias, 0.0, training=self.training)
            result = result if result.dtype == x.dtype else result.to(x.dtype)
        return result if self.disable_adapters else linear_mixed_batch(self, x, result, adapter_names)

    def _float_forward(self, x: torch.Tensor, name: str | None, A: torch.Tensor | None, B: torch.Tensor | None,
                       scaling: float) -> torch.Tensor:
        """A float base: peft's ``lora.Linear.forward`` step for step, so the outputs are peft's and the dtypes
        nn.Linear's: ``F.linear(x, W, bias)`` (``x`` must have the weight's dtype, as for nn.Linear: T5 casts its
        input to ``wo.weight.dtype`` itself; under autocast, the autocast dtype), then ``lora_B(lora_A(dropout(x)))``
        with ``x`` in the LoRA weights' dtype, added and cast to the base result's dtype. ``compute_dtype`` does not
        apply. A Conv1D float base runs ``Conv1D.forward`` (``addmm(bias, x, W)``, W ``[in, out]``), as peft's
        base layer does there."""
        y = self._float_base_forward(x)
        if name is None:
            return y
        xl = x if x.dtype == A.dtype else x.to(A.dtype)
        lora = torch.nn.functional.linear(torch.nn.functional.linear(self.lora_dropout[name](xl), A), B,
                                          self.lora_B[name].bias)  # peft's lora_B(...): its bias (lora_bias) too
        return (y + lora * scaling).to(y.dtype)

    def _float_base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A float base's own product, ``[..., out]`` in the weight's dtype: ``F.linear(x, W, bias)``, or for a Conv1D
        (``W [in, out]``) ``Conv1D.forward``'s ``addmm(bias, x, W)``, as peft's base layer runs it."""
        if not self._weight_in_out:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.shape[-1])
        y2 = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return y2.view(*x.shape[:-1], self.out_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Returns ``dequant(W)`` (a float base: ``W``) as a new ``[out_features, in_features]`` tensor of ``dtype``."""
        if self._unloaded:
            self._raise_unloaded()
        if not self.quantized:
            w = self.weight.detach()
            return (w.t() if self._weight_in_out else w).to(dtype, copy=True).contiguous()
        return dequantize_4bit(*self._packed(), dtype)

    @property
    def _weight_in_out(self) -> bool:
        """A float base made from a Conv1D: ``weight`` is the Conv1D's own ``[in_features, out_features]``."""
        return not self.quantized and getattr(self, "is_target_conv_1d_layer", False)

    def lora_delta(self, adapter_name: str | None = None) -> torch.Tensor:
        """Returns ``scaling * B @ A`` of ``adapter_name`` (default: the active adapter), float32 ``[out, in]``. For a
        DoRA adapter that is its LoRA part only (the merges apply the magnitude, see ``merge_and_unload``).

        Raises ValueError if there is no such adapter (or none is active)."""
        name = adapter_name or self.active_adapter
        if name is None or name not in self.lora_A:
            raise ValueError(f"no adapter {name!r} to take a delta of; this layer has {list(self.lora_A)}")
        if {f"lora_A.{name}.weight", f"lora_B.{name}.weight"} & self._unloaded:
            self._raise_unloaded()
        A = self.lora_A[name].weight.detach().float()
        B = self.lora_B[name].weight.detach().float()
        return self.scaling[name] * (B @ A)

    def extra_repr(self) -> str:
        lora = ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]}{', dora' if self.is_dora(n) else ''}"
                         for n in self.lora_A)
        st = getattr(self.weight, "quant_state", None) or self._packed_record and self._packed_record.quant_state
        if self.quantized and st is not None:  # (FSDP's weight: the module's record)
            base = (f"quant_type={st.quant_type}, blocksize={st.blocksize}, double_quant={st.nested}, "
                    f"storage={self.weight.dtype}, compute_dtype={self.compute_dtype}")
        elif self.quantized:
            base = f"weight replaced by a {type(self.weight).__name__} without a quant_state"
        else:
            base = f"float base: dtype={self.weight.dtype}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{base}, adapters=[{lora}], "
                f"active={self.active_adapter!r}{', disabled' if self.disable_adapters else ''}"
                f"{', from Conv1D' if getattr(self, 'is_target_conv_1d_layer', False) else ''}")

    # ------------------------------------------------------------------ meta layers: what is not loaded yet
    def _local_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's tensors by state-dict key (without prefix): weight, bias, every adapter's LoRA weights."""
        out = {"weight": self.weight}
        if self.bias is not None:
            out["bias"] = self.bias
        for name in self.lora_A:
            out[f"lora_A.{name}.weight"] = self.lora_A[name].weight
            out[f"lora_B.{name}.weight"] = self.lora_B[name].weight
            if self.has_lora_bias(name):
                out[f"lora_B.{name}.bias"] = self.lora_B[name].bias
            if name in self._magnitudes():
                out[f"lora_magnitude_vector.{name}.weight"] = self._magnitudes()[name].weight
        return out

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Every adapter's tensors by state-dict key (without prefix): LoRA A and B, and a DoRA adapter's magnitude
        (``lora_magnitude_vector.<name>.weight``, peft's key). They load all together or not at all."""
        return {k: t for k, t in self._local_tensors().items() if k not in ("weight", "bias")}

    def _track_meta(self) -> None:
        """Every tensor now on the meta device holds no value: record its key in ``_unloaded``."""
        meta = {k for k, t in self._local_tensors().items() if t.is_meta}
        if meta - self._unloaded:
            self._unloaded = self._unloaded | meta

    def _raise_unloaded(self) -> None:
        """Raise the RuntimeError naming what holds no value yet; return if nothing does once the tensors that
        accelerate assigned directly are counted (``_sync_assigned``)."""
        self._sync_assigned()
        if not self._unloaded:
            return
        if _accelerate.offloading_hook(self):
            raise RuntimeError(_accelerate.OFFLOADED.format(self.in_features, self.out_features))
        if self._pending_weight:
            raise RuntimeError(
                f"QLoRALinear(in_features={self.in_features}, out_features={self.out_features}): its weight is "
                f"partly loaded: the state dicts loaded so far held {sorted(self._pending_weight)} but not "
                f"{self._waiting_for(self._pending_weight, '')}. Load the shard that holds them "
                "(load_state_dict(shard, strict=False, assign=True) per shard completes the weight when its last "
                "key arrives)")
        keys = sorted(self._unloaded)
        after = ("" if all(t.is_meta for k, t in self._local_tensors().items() if k in self._unloaded)
                 else "; to_empty() gave them memory but no values")
        raise RuntimeError(_UNLOADED.format(self.in_features, self.out_features, keys, after))

    # ------------------------------------------------------------------ accelerate's per-key loader
    def _sync_assigned(self) -> None:
        """Count as loaded the tensors that were assigned directly: accelerate's ``set_module_tensor_to_device``
        writes ``module._parameters[name]`` (bias, LoRA, magnitudes, a float base's weight), never calling
        ``load_state_dict``. A key in ``_unloaded`` whose tensor is no longer meta got a value that way, unless
        ``to_empty`` gave it memory only (``_empty_keys``). A 4-bit weight loads through ``_accelerate_piece``."""
        if not self._unloaded:
            return
        tensors = self._local_tensors()
        got = {k for k in self._unloaded - self._empty_keys
               if k in tensors and not tensors[k].is_meta and (k != "weight" or not self.quantized)}
        if not got:
            return
        self._unloaded = self._unloaded - got
        if "weight" in got:  # a float base's weight: as a checkpoint load of it (_load_from_state_dict)
            self.float_dtype = self.weight.dtype
            self._init_unloaded_lora(self.weight.device)
            self._init_unloaded_magnitudes()

    def _key(self, local: str) -> str:
        """A state-dict key of this layer for messages: with the module's name when apply_qlora recorded it
        (``_key("")``: the prefix)."""
        return f"{self._module_name}.{local}" if self._module_name else local

    def _accelerate_accepts(self, key: str) -> bool:
        """Whether ``key`` (``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...) is a piece of this
        layer's weight in its format. A piece only another format has is a ValueError naming the fix: accelerate
        passes such keys only with ``strict=True`` (otherwise it drops them as absent from the model's state dict)."""
        st = getattr(self.weight, "quant_state", None)
        short = key.removeprefix("weight.")
        if st is None or short in ("absmax", "quant_map"):
            return st is not None
        if short in ("nested_absmax", "nested_quant_map"):
            if not st.nested:
                raise ValueError(_accelerate.FORMAT.format(
                    key=self._key(key), what="the checkpoint's absmax is double-quantized, this layer's is not",
                    fix="apply_qlora(..., double_quant=True)"))
            return True
        if short.startswith("quant_state.bitsandbytes__"):
            qt = short.rpartition("__")[2]
            if qt != st.quant_type:
                raise ValueError(_accelerate.FORMAT.format(
                    key=self._key(key), what=f"the checkpoint is {qt}, this layer {st.quant_type}",
                    fix=f"apply_qlora(..., quant_type={qt!r})"))
            return True
        return False

    def _accelerate_weight(self, data: torch.Tensor) -> Params4bit:
        """accelerate rebuilt this layer's weight from the checkpoint's packed bytes (``Params4bit.__new__``): load
        them as the key ``weight``. Returns what accelerate stores as ``weight``: the loaded weight once the quant
        state is complete; else the layer's weight as it is, or, on the meta device (from which accelerate cannot
        move it), the bytes with the meta quant state, until the rest arrives (the layer refuses to run meanwhile)."""
        w = self._accelerate_piece("weight", data)
        if "weight" not in self._unloaded or not w.is_meta:
            return w
        waiting = Params4bit(self._pending_weight["weight"], False, w.quant_state)
        self._link_weight_of(waiting)
        return waiting

    def _link_weight_of(self, w: Params4bit) -> None:
        """Link ``w`` and its QuantState to this layer (``qkernels._accelerate.link``)."""
        _accelerate.link(w, self)
        _accelerate.link(w.quant_state, self)

    def _accelerate_piece(self, key: str, value: torch.Tensor) -> Params4bit:
        """Load one key of this layer's weight that accelerate delivered (``weight``, ``weight.absmax``, ...,
        ``weight.quant_state.bitsandbytes__<type>``) as a ``load_state_dict(..., assign=True)`` of that key alone:
        the parts are kept until the set is complete, then validated and loaded whole (``_load_from_state_dict``).
        Pieces that accelerate cast (its ``dtype=``) or that belong to another format are refused first, naming the
        key and the fix. Returns the layer's weight."""
        self._sync_assigned()  # LoRA weights accelerate already set are not initialized again when the weight loads
        _accelerate.check_piece(self, key, value)
        prefix = self._key("")  # the module's name in messages ("model.layers.0.mlp.up_proj.weight.*")
        self._load_from_state_dict({prefix + key: value}, prefix, {"assign_to_params_buffers": True}, True, [], [],
                                   [])
        return self.weight

    # ------------------------------------------------------------------ device / dtype moves
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QLoRALinear:
        """Move like any module, except the packed weight and its QuantState change device, never dtype.

        ``.half()``, ``.to(torch.bfloat16)``, ``model.to(dtype)`` convert floating tensors: applied to a bf16/fp16
        ``quant_storage`` view or to the float32 absmax they would corrupt the format. So ``fn`` sees the weight's
        bytes as uint8 (which no dtype conversion touches) and the QuantState just follows to the new device.

        From the meta device (``to_empty``: its ``fn`` allocates without copying) the QuantState gets uninitialized
        scales (``QuantState.to_empty``); the keys stay in ``_unloaded`` until a checkpoint is loaded. A tensor moved
        to meta joins them.
        """
        self._sync_assigned()  # before a move (accelerate's dispatch_model calls model.to)
        was_meta = {k for k, t in self._local_tensors().items() if t.is_meta}
        try:
            return self._apply_inner(fn, recurse)
        finally:
            # tensors that left the meta device here got memory without values (to_empty): _sync_assigned must not
            # count them as assigned
            now = self._local_tensors()
            self._empty_keys = frozenset(k for k in self._unloaded if k in now and not now[k].is_meta
                                         and (k in was_meta or k in self._empty_keys))

    def _apply_inner(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool) -> QLoRALinear:
        if not self.quantized:  # a float base moves and converts like nn.Linear's weight
            super()._apply(fn, recurse)
            self.float_dtype = self.weight.dtype
            self._track_meta()
            return self
        w = self._parameters["weight"]
        if not isinstance(w, Params4bit):  # FSDP's parameter: its owner's to move; _packed refuses it if cast
            super()._apply(fn, recurse)
            self._track_meta()
            return self
        self._parameters["weight"] = None  # nn.Module._apply skips None entries; the key keeps its place
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = w
        probe = fn(torch.empty(0, dtype=self.float_dtype, device=w.device))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.float_dtype = probe.dtype
        raw = w.data.reshape(-1).view(torch.uint8)
        moved = fn(raw)
        if not isinstance(moved, torch.Tensor):
            return self
        if moved.dtype != torch.uint8 or moved.shape != raw.shape:  # fn converted regardless of dtype: keep bytes
            moved = raw.to(moved.device)
        if moved is not raw:
            data = moved.view(w.dtype).reshape(w.shape)
            if torch._has_compatible_shallow_copy_type(w, data):
                w.data = data
            else:  # meta -> a real device (to_empty): .data cannot change the tensor's kind; torch makes a new one too
                w = self._parameters["weight"] = Params4bit(data, False, w.quant_state)
                self._remember_packed(w)
                self._link_weight()
            if w.quant_state.device != moved.device:
                if w.quant_state.device.type == "meta":
                    w.quant_state.to_empty(moved.device)
                else:
                    w.quant_state.to(moved.device)
        self._track_meta()
        return self

    # ------------------------------------------------------------------ state dict (bitsandbytes' keys)
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed; a float base: float), bias
        if not self.quantized:
            return
        state = getattr(self.weight, "quant_state", None)
        if state is None:  # FSDP's weight (a shard, or gathered): the module's record, if it holds these bytes
            state = self._recorded_state(self.weight)
        for k, v in state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        """Read bitsandbytes' keys. Everything is validated first; on any error a ValueError naming the key is
        raised and nothing in this layer (weight, quant state, bias, LoRA) has been changed.

        LoRA keys (``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight`` for every adapter of the layer) load all
        together or not at all:

        - none present (a base-only checkpoint, e.g. bitsandbytes' ``Linear4bit``): the LoRA weights keep their
          current values and are not reported missing, so ``load_state_dict(sd, strict=True)`` succeeds (a DoRA
          magnitude still at its initial value, the old weight's row norms, takes the new weight's:
          ``_dora_magnitudes_at_init``);
        - some but not all present: the absent ones are reported missing and ``load_state_dict`` raises
          ``RuntimeError`` (strict or not: half an adapter is never a valid load); nothing in this layer changes.

        Base keys (``weight``, its quant-state keys, ``bias``) that are absent are reported missing as usual. A dict
        with only part of the weight's keys (a shard of a sharded 4-bit checkpoint: transformers can split a weight
        from its quant_map / blob) changes nothing of the weight: the part is kept (``_pending_weight``), the keys it
        lacks are reported missing, the layer refuses to run, and a later call with the rest loads the weight.
        (``strict`` is not seen here: torch passes True to every module and applies strictness at the end.)
        """
        wkey = prefix + "weight"
        pieces = {k: state_dict.pop(k) for k in list(state_dict) if k == wkey or k.startswith(wkey + ".")}
        waiting: list[str] = []
        pending: dict[str, torch.Tensor] = {}
        if self.quantized:  # a float base's weight is one tensor: nothing to wait for
            if pieces and self._pending_weight:  # the rest of a weight whose first keys came in an earlier call
                pieces = {**{prefix + k: v for k, v in self._pending_weight.items()}, **pieces}
            waiting = self._waiting_for(pieces, prefix) if pieces else []
            if waiting:  # part of the weight's keys: kept (once all is validated) until the rest comes
                pending = {k[len(prefix):]: v for k, v in pieces.items()}
                pieces = {}
        state_dict.update(pieces)  # a complete set (or none): loaded below
        qkeys = {k: v for k, v in pieces.items() if k != wkey}
        new_weight = None
        had_weight = wkey in pieces
        if not self.quantized:  # a float base: the weight loads as nn.Linear's (below, with the bias)
            self._validate_float_weight(state_dict.get(wkey), qkeys, wkey)
        elif had_weight:
            new_weight = self._validated_weight(state_dict[wkey], qkeys, wkey, local_metadata)
        self._validate_other_keys(state_dict, prefix)
        # DoRA magnitudes still at their initial value, the row norms of the weight being replaced, that the checkpoint
        # does not give: taken again from the new weight below, as if the adapter were added after loading (a weight
        # split over shards: judged on the first part, while the old weight is still here)
        dora_init = {**self._pending_dora, **(self._dora_magnitudes_at_init(state_dict, prefix)
                                              if had_weight or waiting else {})}
        if waiting:  # validated (a failed call keeps nothing): the weight waits for its other keys, unchanged
            self._pending_dora = dora_init
            self._pending_weight = pending
            self._unloaded = self._unloaded | {"weight"}
        assign = local_metadata.get("assign_to_params_buffers", False)
        lora_keys = [prefix + k for k in self._adapter_tensors()]
        base_device = None
        if new_weight is not None:
            base_device = new_weight.device
        elif had_weight and not self.quantized:  # assign=True's rule for a meta layer: the checkpoint's device
            base_device = state_dict[wkey].device if self.weight.is_meta else self.weight.device
        if base_device is not None and not any(k in state_dict for k in lora_keys):
            self._init_unloaded_lora(base_device)  # a meta layer's LoRA, absent from a base checkpoint
        lora = {prefix + k: t for k, t in self._adapter_tensors().items()}
        present = [k for k in lora if k in state_dict]
        if len(present) < len(lora):
            # the LoRA children load after this method from the same dict: give the keys they must not take from
            # the checkpoint their current values (a no-op copy), so they are neither changed nor reported missing
            keep = lora if not present else {k: v for k, v in lora.items() if k in state_dict}
            state_dict.update(keep)  # the Parameters themselves: with assign=True they stay the same objects
            if present:  # partial: the absent ones stay absent (reported missing); nothing of this layer loads
                absent = [k for k in lora if k not in present]
                error_msgs.append(
                    f"{prefix[:-1] or 'QLoRALinear'}: the state dict has LoRA key(s) {present} but not {absent}; "
                    "a layer's LoRA weights load together (a base-only checkpoint has none of them). Nothing of this "
                    "layer was loaded."
                )
                for k in [wkey, *qkeys]:
                    state_dict.pop(k, None)
                if self.bias is not None and prefix + "bias" in state_dict:
                    state_dict[prefix + "bias"] = self.bias
                new_weight = None
        # what this call gives a value (bias here, LoRA in the children, after us): a key whose value is not the
        # tensor already there, nor a meta tensor (a meta model's state dict holds none). A meta tensor only takes one
        # with assign=True (else torch warns: copying is a no-op).
        loaded = {k for k, t in self._local_tensors().items()
                  if (k != "weight" or not self.quantized) and _gives_value(state_dict.get(prefix + k, t), t)
                  and (assign or not t.is_meta)}
        if new_weight is not None:
            loaded.add("weight")
        # the base class loads the bias (and a float base's weight; shapes already checked) and reports unexpected
        # keys; hide the packed weight's keys
        for k in [wkey, *qkeys] if self.quantized else []:
            state_dict.pop(k, None)
        n_missing = len(missing_keys)
        self.__dict__["_loading"] = True  # a float base's weight assigned here is accounted for below
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            del self.__dict__["_loading"]
        # the weight is not missing when present (even if a partial LoRA set kept it from loading) or pending; the
        # keys a pending weight lacks are
        if had_weight or waiting:
            missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k != wkey]
        missing_keys.extend(waiting)
        if new_weight is not None:
            self.weight = new_weight
            self._pending_weight = {}
        if not self.quantized:  # assign=True gives a float base the checkpoint's tensor, dtype included (nn.Linear's)
            self.float_dtype = self.weight.dtype
        self._unloaded = self._unloaded - loaded
        if "weight" in loaded and not self.weight.is_meta:
            self._reinit_dora_magnitudes(dora_init)
            self._pending_dora = {}
            # a DoRA adapter added on meta, absent from the checkpoint: its new magnitude replaces the meta one that
            # the children would otherwise take back from the state dict (the no-op entries set above)
            for k in self._init_unloaded_magnitudes():
                if prefix + k in state_dict:
                    state_dict[prefix + k] = self._local_tensors()[k]
        # a meta weight / bias assigned over a real one (assign=True) holds no value either (the LoRA weights are
        # assigned after this method, by the children: see `loaded`)
        self._unloaded = self._unloaded | {k for k in ("weight", "bias")
                                           if getattr(self, k) is not None and getattr(self, k).is_meta}

    def _dora_magnitudes_at_init(self, state_dict: dict, prefix: str) -> dict[str, torch.Tensor]:
        """``{adapter: a copy of its magnitude}`` for the DoRA adapters whose magnitude ``state_dict`` lacks and that
        still hold the row norms of the current weight (``||W + s B A||``, as ``update_layer`` set them; to 4 ulps of
        the magnitude's dtype, as a model cast since rounded them): a base-only checkpoint loaded after
        ``apply_qlora(use_dora=True)`` on a model built with other weights (``from_config`` on the CPU) would leave
        them the norms of those weights, rescaling every row of the loaded model. A magnitude trained away from its
        initial value is the adapter's own and stays (as in peft)."""
        names = [n for n in self._magnitudes() if f"{prefix}lora_magnitude_vector.{n}.weight" not in state_dict]
        if not names or self.weight.is_meta or "weight" in self._unloaded:
            return {}
        out = {}
        for n in names:
            A, B, m = self.lora_A[n].weight, self.lora_B[n].weight, self._magnitudes()[n].weight
            if A.is_meta or B.is_meta or m.is_meta:
                continue
            # update_layer's recipe (in the adapters' dtype), or in float32 for a model cast since (.to(bfloat16)
            # rounded the float32 norms, and a float base's weight); equal within 4 ulps of the magnitude's dtype
            mag = m.detach().float()
            tol = 4 * torch.finfo(m.dtype).eps * mag.abs()
            for dt in dict.fromkeys((A.dtype, torch.float32)):
                norm = self._dora_norm(A.to(dt), B.to(dt), self.scaling[n]).float()
                if bool(((norm - mag).abs() <= tol).all()):
                    out[n] = m.detach().clone()
                    break
        return out

    def _reinit_dora_magnitudes(self, at_init: dict[str, torch.Tensor]) -> None:
        """Set the magnitudes of the DoRA adapters in ``at_init`` (``_dora_magnitudes_at_init``) to the row norms of
        the (new) weight, in place (the same Parameters: an optimizer holding them keeps them); one that changed
        since (loaded from another shard) stays."""
        for n, before in at_init.items():
            if n not in self._magnitudes():
                continue
            A, B, m = self.lora_A[n].weight, self.lora_B[n].weight, self._magnitudes()[n].weight
            rows = self.out_features if self.quantized else self.weight.shape[1 if self._weight_in_out else 0]
            if m.is_meta or rows != m.shape[0] or not torch.equal(m.detach(), before):
                continue  # changed since (another shard), or a weight of another shape (left to forward's error)
            with torch.no_grad():
                norm = self._dora_norm(A, B, self.scaling[n])
                m.copy_(norm)
            try:
                _check_dora_norm(norm)
            except ValueError as e:  # mid-load: warn (the rest of the checkpoint still loads)
                warnings.warn(f"DoRA adapter {n!r} after loading a new base weight: {e}", stacklevel=3)

    def _waiting_for(self, pieces: dict[str, Any], prefix: str) -> list[str]:
        """The keys (with ``prefix``) that ``pieces`` (the packed weight and quant-state entries seen so far) still
        lack: bitsandbytes' weight, absmax, quant_map and blob, plus the nested keys when the blob says nested. A set
        that cannot be judged (a float weight alone: an unquantized checkpoint; a blob that is not JSON, or meta)
        counts as complete, so that its validation names the problem."""
        wkey = prefix + "weight"
        w = pieces.get(wkey)
        if (len(pieces) == 1 and isinstance(w, torch.Tensor) and w.is_floating_point()
                and tuple(w.shape) == (self.out_features, self.in_features)):
            return []
        blob = next((k for k in pieces if k.startswith(f"{wkey}.{_QS_PREFIX}")), None)
        if blob is None and f"{wkey}.quant_type" in pieces:  # an unpacked quant state: no blob to wait for
            return []
        need = [wkey, f"{wkey}.absmax", f"{wkey}.quant_map"]
        if blob is None:
            state = getattr(self.weight, "quant_state", None)  # the blob's name in this layer's format, as a hint
            need.append(f"{wkey}.{_QS_PREFIX}{getattr(state, 'quant_type', 'nf4')}")
            nested = f"{wkey}.nested_absmax" in pieces or f"{wkey}.nested_quant_map" in pieces
        else:
            try:
                nested = "nested_blocksize" in json.loads(bytes(pieces[blob].cpu().tolist()).decode("utf-8"))
            except (AttributeError, TypeError, ValueError, NotImplementedError):  # NotImplementedError: a meta blob
                return []
        if nested:
            need += [f"{wkey}.nested_absmax", f"{wkey}.nested_quant_map"]
        return [k for k in need if k not in pieces]

    def _init_unloaded_magnitudes(self) -> list[str]:
        """Give the DoRA adapters added on the meta device whose magnitude holds no value (absent from the checkpoint)
        peft's initial one, the row norms of ``W + s B A``, once the weight and A, B hold values: what
        ``update_layer(use_dora=True)`` would have computed had the weight been there. A new Parameter (a meta one
        cannot take values in place). An all-zero row warns (0/0: NaN in peft) and the rest of the load goes on.
        Returns the keys it set."""
        done: list[str] = []
        if "weight" in self._unloaded or self.weight.is_meta:
            return done
        for name, mag in self._magnitudes().items():
            key = f"lora_magnitude_vector.{name}.weight"
            if key not in self._unloaded or {f"lora_A.{name}.weight", f"lora_B.{name}.weight"} & self._unloaded:
                continue
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            with torch.no_grad():
                norm = self._dora_norm(A, B, self.scaling[name]).to(torch.float32)
            mag.weight = nn.Parameter(norm, requires_grad=mag.weight.requires_grad)
            self._unloaded = self._unloaded - {key}
            done.append(key)
            try:
                _check_dora_norm(norm)
            except ValueError as e:
                warnings.warn(f"DoRA adapter {name!r} initialized at load: {e}", stacklevel=3)
        return done

    def _init_unloaded_lora(self, device: torch.device) -> None:
        """Give the adapters whose LoRA weights hold no value (a meta layer's; after ``to_empty``) their initial values
        per the ``init_lora_weights`` they were created with, as a layer built on ``device`` would have had them. A meta
        weight becomes a new Parameter on ``device``; an uninitialized one is initialized in place."""
        for name in self.lora_A:
            keys = {f"lora_A.{name}.weight", f"lora_B.{name}.weight"}
            if not keys & self._unloaded:
                continue
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            if A.is_meta or B.is_meta:
                A = nn.Parameter(torch.empty_like(A, device=device), requires_grad=A.requires_grad)
                B = nn.Parameter(torch.empty_like(B, device=device), requires_grad=B.requires_grad)
                self.lora_A[name].weight, self.lora_B[name].weight = A, B
            with torch.no_grad():
                _init_lora_(A, B, self._lora_init.get(name, True), self.r[name])
            if self.has_lora_bias(name):  # zeros (init True), nn.Linear's default (False): update_layer's init
                b = self.lora_B[name].bias
                if b.is_meta:
                    b = nn.Parameter(torch.empty_like(b, device=device), requires_grad=b.requires_grad)
                    self.lora_B[name].bias = b
                with torch.no_grad():
                    if self._lora_init.get(name, True) is False:
                        nn.init.uniform_(b, -1 / math.sqrt(self.r[name]), 1 / math.sqrt(self.r[name]))
                    else:
                        b.zero_()
            self._round_as_peft(self.lora_A[name], self.lora_B[name])
            self._unloaded = self._unloaded - keys - {f"lora_B.{name}.bias"}

    def _validated_weight(self, packed: Any, qkeys: dict, wkey: str, local_metadata: dict) -> Params4bit:
        if not isinstance(packed, torch.Tensor):
            raise ValueError(f"{wkey!r} must be a tensor of packed 4-bit codes, got {type(packed).__name__}")
        if not qkeys:
            if packed.is_floating_point() and tuple(packed.shape) == (self.out_features, self.in_features):
                name = wkey[:-len(".weight")].rpartition(".")[2] if wkey != "weight" else ""
                keep = (f"apply_qlora(..., keep_float_modules=[{name!r}])" if name
                        else "QLoRALinear.from_linear(linear, quantize=False)")
                raise ValueError(f"{wkey!r} is a float weight {tuple(packed.shape)} (an unquantized checkpoint, or one "
                                 "that keeps this layer float) and this layer is 4-bit: load an unquantized checkpoint "
                                 "into the float model before apply_qlora, which quantizes it (or build this layer "
                                 "with QLoRALinear.from_linear); for one that keeps the layer float "
                                 "(quantize_checkpoint's exclude_modules, llm_int8_skip_modules), keep it float here "
                                 f"too: {keep}")
            raise ValueError(f"{wkey!r} has no quant state: expected {wkey}.absmax, {wkey}.quant_map, ... and "
                             f"{wkey}.quant_state.bitsandbytes__nf4/fp4 (a bitsandbytes Linear4bit state dict)")
        if packed.is_meta or any(isinstance(v, torch.Tensor) and v.is_meta for v in qkeys.values()):
            raise ValueError(f"{wkey!r} (or its quant state) is a meta tensor in the state dict: it holds no values. "
                             "Load a checkpoint read from disk (safetensors.torch.load_file, torch.load)")
        # a meta layer takes the checkpoint's device (assign=True's rule: it has no device of its own to keep)
        dev = packed.device if self.weight.is_meta else self.weight.device
        try:
            state = QuantState.from_dict(qkeys, device=dev)
        except (ValueError, TypeError) as e:
            raise ValueError(f"corrupted quant state under {wkey + '.*'!r}: {e}") from e
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"size mismatch for {wkey!r}: checkpoint weight is {tuple(state.shape)}, this layer is "
                             f"(out_features, in_features) = ({self.out_features}, {self.in_features})")
        if packed.dtype not in STORAGE_DTYPES:
            raise ValueError(f"{wkey!r} must be uint8 (or a bf16/fp16/fp32 quant_storage view), got {packed.dtype}")
        rows = _packed_rows(state.numel, packed.dtype)
        if packed.numel() != rows:
            raise ValueError(f"size mismatch for {wkey!r}: {state.numel} 4-bit values in {packed.dtype} need "
                             f"{rows} elements ([{rows}, 1]), the checkpoint has shape {tuple(packed.shape)}")
        if local_metadata.get("assign_to_params_buffers", False):
            data = packed.detach().to(dev)
        else:
            data = packed.detach().to(dev, copy=True)
        return Params4bit(data.reshape(rows, 1).contiguous(), False, state)

    def _validate_float_weight(self, w: Any, qkeys: dict, wkey: str) -> None:
        """A float base's ``weight`` key: a float ``[out_features, in_features]`` tensor (None: absent, reported
        missing by the base class). A 4-bit checkpoint's keys are refused: this layer keeps its weight in float."""
        if qkeys:
            raise ValueError(f"state dict has the 4-bit quant state {sorted(qkeys)[:3]} for {wkey!r}, but this layer "
                             "keeps its base weight in float (quantize=False, e.g. a module transformers keeps in "
                             "float32): load a float weight there, or build the layer quantized")
        if w is None:
            return
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            what = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{wkey!r} must be a float tensor (this layer's base weight is float), got {what}")
        if self._weight_in_out and tuple(w.shape) != (self.in_features, self.out_features):
            raise ValueError(f"size mismatch for {wkey!r}: checkpoint has {tuple(w.shape)}, this layer (a Conv1D's "
                             f"float base) has (in_features, out_features) = ({self.in_features}, {self.out_features})")
        if not self._weight_in_out and tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"size mismatch for {wkey!r}: checkpoint has {tuple(w.shape)}, this layer has "
                             f"(out_features, in_features) = ({self.out_features}, {self.in_features})")

    def _validate_other_keys(self, state_dict: dict, prefix: str) -> None:
        """Shape checks for bias and LoRA keys, done before anything is assigned (they load after us)."""
        expected = {}
        if self.bias is not None:
            expected[prefix + "bias"] = tuple(self.bias.shape)
        for name in self.lora_A:
            expected[f"{prefix}lora_A.{name}.weight"] = tuple(self.lora_A[name].weight.shape)
            expected[f"{prefix}lora_B.{name}.weight"] = tuple(self.lora_B[name].weight.shape)
            if self.has_lora_bias(name):
                expected[f"{prefix}lora_B.{name}.bias"] = (self.out_features,)
            mkey = f"{prefix}lora_magnitude_vector.{name}.weight"
            if self.is_dora(name):
                expected[mkey] = (self.out_features,)
            elif mkey in state_dict and f"{prefix}lora_A.{name}.weight" in state_dict:
                # its A and B would load into this plain adapter and the magnitude be dropped as unexpected (with
                # strict=False silently): plain LoRA with DoRA's A and B, another function
                raise ValueError(f"{mkey!r}: the checkpoint's adapter {name!r} is a DoRA adapter and this layer's is "
                                 "plain LoRA; give the model a DoRA adapter of that name first (apply_qlora(..., "
                                 "use_dora=True) or add_adapter(model, name, use_dora=True): on a meta model, load "
                                 "the base checkpoint first), or load the checkpoint's base keys only")
        for k, shape in expected.items():
            if k in state_dict:
                v = state_dict[k]
                if not isinstance(v, torch.Tensor):
                    raise ValueError(f"{k!r} must be a tensor, got {type(v).__name__}")
                if tuple(v.shape) != shape:
                    hint = " (a different LoRA rank r?)" if k[len(prefix):].startswith("lora_") else ""
                    raise ValueError(f"size mismatch for {k!r}: checkpoint has {tuple(v.shape)}, this layer has "
                                     f"{shape}{hint}")
