"""accelerate's per-key loaders (``load_checkpoint_in_model`` / ``load_checkpoint_and_dispatch`` with a device map) on
qkernels' 4-bit layers.

accelerate 1.15 sets each checkpoint key on its own with ``set_module_tensor_to_device(model, key, device, value)``
(accelerate/utils/modeling.py:227-437): it walks the key's dotted path with ``getattr``, then writes
``module._parameters[name]`` (or ``_buffers``) directly, never calling ``load_state_dict``. For a key
``<layer>.weight.absmax`` the walk ends on the layer's packed weight (a ``Params4bit``), and for
``<layer>.weight.quant_state.bitsandbytes__nf4`` on its ``QuantState``: neither is a module, so accelerate failed with
``'Params4bit' object has no attribute '_parameters'``. Both now answer ``_parameters`` with a ``_PieceSlots`` while
they belong to a ``QLoRALinear`` (``link``): the names of their quant-state pieces, and a ``__setitem__`` that hands
each piece to the layer's partial-load machinery (``QLoRALinear._accelerate_piece``), which keeps the parts until
the weight's set is complete and validates it whole, as for a sharded ``load_state_dict``. The packed weight itself
(key ``<layer>.weight``) is rebuilt by accelerate as ``type(old)(value, requires_grad=..., **old.__dict__)``: the
owner link in ``__dict__`` takes ``Params4bit.__new__`` to ``QLoRALinear._accelerate_weight``.

Each slot holds a ``Params4bit``-named placeholder so that accelerate skips its shape check (a piece's shape depends
on the checkpoint's blocksize, the JSON blob's length on its offset) as it does for bitsandbytes' packed weights.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

OWNER = "_qkernels_layer"  # the __dict__ entry (a weakref to the QLoRALinear) of a linked Params4bit / QuantState


def link(obj: Any, layer: Any) -> None:
    """Mark ``obj`` (a layer's Params4bit or its QuantState) as belonging to ``layer``, weakly (no cycle kept alive;
    dropped by copies and pickles: ``QuantState.__getstate__``, ``Params4bit.__reduce_ex__``)."""
    if obj is not None:
        obj.__dict__[OWNER] = weakref.ref(layer)


def owner(obj: Any) -> Any:
    """The live ``QLoRALinear`` ``obj`` is linked to, or None."""
    ref = obj.__dict__.get(OWNER)
    return ref() if ref is not None else None


class _PieceSlots:
    """``module._parameters`` as ``set_module_tensor_to_device`` uses it on a linked Params4bit (``prefix="weight."``:
    absmax, quant_map, nested_absmax, nested_quant_map) or QuantState (``prefix="weight.quant_state."``: the
    ``bitsandbytes__<type>`` blob). ``in`` says which names are pieces (a piece of another format is refused there,
    naming the fix); ``[name] = value`` gives the piece to the layer."""

    def __init__(self, layer: Any, prefix: str):
        self._layer, self._prefix = layer, prefix

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._layer._accelerate_accepts(self._prefix + name)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self:
            raise KeyError(name)
        from .nn import Params4bit  # accelerate skips its shape check for this class name; a fresh one per call, since
        # accelerate pops entries from its __dict__
        return Params4bit(torch.empty(0, dtype=torch.uint8, device="meta"))

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        # accelerate wrapped the piece in the placeholder's class: its .data is the tensor
        self._layer._accelerate_piece(self._prefix + name, value.data if isinstance(value, torch.nn.Parameter)
                                      else value)

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def slots(obj: Any, prefix: str, attr: str) -> _PieceSlots | dict:
    """``obj._parameters`` (``attr="_parameters"``) or ``obj._buffers`` (always empty) for a linked ``obj``;
    AttributeError for one that belongs to no layer (as before: it is not a module)."""
    layer = owner(obj)
    if layer is None and getattr(obj, "quant_state", True) is None and obj.is_meta:
        # accelerate's offload (a device_map "disk" entry, offload_state_dict=True) moved a layer's weight to meta
        # as type(w)(w.to("meta")): no quant state, no layer; its next key is this weight's absmax
        raise ValueError(OFFLOADED_AT_LOAD)
    if layer is None:
        raise AttributeError(f"'{type(obj).__name__}' object has no attribute {attr!r}")
    return _PieceSlots(layer, prefix) if attr == "_parameters" else {}


def offloading_hook(module: Any) -> bool:
    """Whether accelerate's ``dispatch_model`` attached a hook that offloads ``module``'s weights (``AlignDevicesHook``
    with ``offload=True``: ``"disk"`` entries, or CPU offload behind a GPU), alone or in a ``SequentialHook``."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    return any(getattr(h, "offload", False) for h in hooks)


CAST = (
    "{key!r} arrived as {got}, and the 4-bit format stores it as {want}: accelerate's dtype= argument "
    "(load_checkpoint_in_model / load_checkpoint_and_dispatch) casts every float tensor it loads, the quant state "
    "(and a float-stored packed weight) included, which would change the 4-bit weight. Load without dtype= and cast "
    "the float parts afterwards with model.to(dtype): 4-bit layers keep their packed weight and quant state as they "
    "are under .to(dtype)"
)

FORMAT = (
    "{key!r}: {what}. accelerate's loaders load only the keys that the model's state dict has, each cast to the "
    "dtype of the model's tensor, so with them a meta model's 4-bit layers must be built in the checkpoint's format: "
    "{fix} (a transformers 4-bit checkpoint's config.json says it under quantization_config: bnb_4bit_quant_type, "
    "bnb_4bit_use_double_quant, bnb_4bit_quant_storage; apply_qlora takes them from there when the meta model is "
    "built from that config, AutoConfig.from_pretrained(checkpoint)). qkernels.load_checkpoint(model, path) and "
    "model.load_state_dict(sd, assign=True) take any format"
)

_KEEP_ON_A_DEVICE = (
    "Keep the 4-bit layers on a device: device_map={'': 'cpu'}, or device_map='auto' with a max_memory that leaves "
    "nothing to 'disk' (a 4-bit layer holds ~0.52 bytes per weight at bs 64 with double quant), or a device_map that "
    "maps the modules holding them to 'cpu', and offload_state_dict=False"
)

OFFLOADED_AT_LOAD = (
    "accelerate is offloading a QLoRALinear's packed 4-bit weight (a device_map 'disk' entry, or "
    "offload_state_dict=True): it moves the weight to the meta device without its quant state and, at each forward, "
    "would put back the weight alone, so 4-bit layers cannot be offloaded. " + _KEEP_ON_A_DEVICE
)

OFFLOADED = (
    "QLoRALinear(in_features={}, out_features={}) is offloaded by accelerate (a device_map 'disk' entry, or CPU "
    "offload behind a GPU): its hook puts back the weight and bias before each forward, never the quant state under "
    "'weight.', so a 4-bit layer cannot run offloaded. " + _KEEP_ON_A_DEVICE.replace("{", "{{").replace("}", "}}")
)


_FLOAT32_PIECES = ("weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")


def check_piece(layer: Any, key: str, value: torch.Tensor) -> None:
    """Refuse, naming ``key`` and the fix, a piece that accelerate cast or that belongs to another format than
    ``layer``'s, before anything of it is kept. With ``dtype=None`` accelerate casts each value to the model tensor's
    dtype (so a checkpoint of another format arrives converted), and with ``dtype=`` every float value to that dtype:
    the format's float32 tables and a float-stored packed weight come in another dtype then."""
    from .codebooks import get_codebook

    w = layer.weight
    st = w.quant_state
    name = layer._key(key)
    if key == "weight":
        if value.dtype != w.dtype:  # with dtype=None accelerate gives it the layer's storage dtype: dtype= cast it
            raise ValueError(CAST.format(key=name, got=value.dtype, want=f"{w.dtype} (this layer's quant_storage)"))
        return
    float_piece = key in _FLOAT32_PIECES or (key == "weight.absmax" and value.is_floating_point())
    if float_piece and value.dtype != torch.float32:
        raise ValueError(CAST.format(key=name, got=value.dtype, want="float32"))
    if key == "weight.quant_map" and value.numel() == 16:
        for qt in ("nf4", "fp4"):
            if qt != st.quant_type and torch.equal(value.detach().cpu(), get_codebook(qt)):
                # its blob, weight.quant_state.bitsandbytes__<qt>, is not a key of the model: accelerate drops it
                raise ValueError(FORMAT.format(key=name, what=f"the checkpoint's quant_map is the {qt} codebook, and "
                                               f"this layer is {st.quant_type}",
                                               fix=f"apply_qlora(..., quant_type={qt!r})"))
    if key.startswith("weight.quant_state.") and value.dtype == torch.uint8 and value.dim() == 1:
        import json

        try:
            nested = "nested_blocksize" in json.loads(bytes(value.cpu().tolist()).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, TypeError):
            return  # corrupted: the load's validation names it
        if nested != st.nested:
            what = ("the checkpoint's absmax is double-quantized, this layer's is not (its nested_absmax and "
                    "nested_quant_map are not keys of the model)" if nested else
                    "the checkpoint's absmax is not double-quantized (float32), this layer's is (uint8), so "
                    "accelerate cast it to uint8")
            raise ValueError(FORMAT.format(key=name, what=what, fix=f"apply_qlora(..., double_quant={nested})"))
