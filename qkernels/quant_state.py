"""``QuantState``: everything needed to decode a packed 4-bit tensor, in bitsandbytes' layout.

A QuantState is attribute-compatible with ``bitsandbytes.functional.QuantState`` (``absmax``,
``shape``, ``code``, ``blocksize``, ``quant_type``, ``dtype``, ``offset``, ``state2``, ``nested``),
and its ``as_dict(packed=True)`` / ``from_dict`` read and write bitsandbytes' state-dict keys and JSON
blob byte for byte, so a checkpoint written by either library loads in the other.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from .codebooks import dynamic_map, get_codebook

__all__ = ["QuantState", "VALID_BLOCKSIZES", "FLOAT_DTYPES", "STORAGE_DTYPES", "check_blocksize"]

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)
NESTED_BLOCKSIZE = 256
# The largest nested blocksize read (bitsandbytes writes 256; its blockwise format goes to 4096). A larger one has no
# use, and a corrupted one near 2**40 made the reference decode allocate nested_blocksize floats per nested block
# (killed for memory), or overflowed the native binding's int64 argument past 2**63.
MAX_NESTED_BLOCKSIZE = 4096

_QS_PREFIX = "quant_state.bitsandbytes__"
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_BLOB_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_blocksize(blocksize: Any, name: str = "blocksize") -> int:
    """Return ``blocksize`` as an int if it is a supported power of two (32..4096), else raise ValueError."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"{name} must be one of {VALID_BLOCKSIZES} (a power of two, 32..4096), got {blocksize!r}")
    return blocksize


def valid_nested_blocksize(nested_blocksize: Any) -> bool:
    """Whether ``nested_blocksize`` is an int power of two from 1 to ``MAX_NESTED_BLOCKSIZE``."""
    return (isinstance(nested_blocksize, int) and not isinstance(nested_blocksize, bool)
            and 0 < nested_blocksize <= MAX_NESTED_BLOCKSIZE and nested_blocksize & (nested_blocksize - 1) == 0)


def as_dtype(value: Any) -> Any:
    """A dtype given by name (``"bfloat16"``, ``"torch.bfloat16"``, as transformers' ``BitsAndBytesConfig`` takes
    ``bnb_4bit_compute_dtype`` / ``bnb_4bit_quant_storage``) as the ``torch.dtype``; anything else unchanged, for
    the caller's check to accept or refuse."""
    if isinstance(value, str):
        dtype = getattr(torch, value.strip().removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: Any, key: str) -> torch.dtype:
    if name not in _DTYPE_NAMES:
        raise ValueError(f"quant state key '{key}' must be one of {sorted(_DTYPE_NAMES)}, got {name!r}")
    return _DTYPE_NAMES[name]


def _parse_nested_dtype(name: Any) -> torch.dtype:
    """The blob's ``nested_dtype``: "float32", the only value bitsandbytes writes. bitsandbytes decodes the nested
    scales in that dtype (its ``dequantize_blockwise`` output) before adding the offset, qkernels always in float32, so
    another value would decode differently in the two libraries."""
    dtype = _parse_dtype(name, "nested_dtype")
    if dtype != torch.float32:
        raise ValueError(f"quant state key 'nested_dtype' must be 'float32' (what bitsandbytes writes; it would decode "
                         f"the nested scales in {name}, qkernels in float32), got {name!r}")
    return dtype


def _from_cpu_inference_layout(absmax: Any, shape: list[int], blocksize: Any) -> Any:
    """A plain (not nested) absmax in bitsandbytes' CPU inference layout -> the format's float32 ``[nblocks]``.

    bitsandbytes 0.50.2, on a CPU with AVX512-BF16, repacks a ``Linear4bit`` for inference on its first eval
    forward: absmax becomes bfloat16 ``[K / blocksize, N]`` (transposed) for a weight ``[N, K]``. Saving undoes the
    nibble repacking but, without double quantization, not this: the checkpoint holds that bf16 ``[K/bs, N]`` tensor
    (its own reload then reads it in the wrong order). It holds the exact scales the saving model ran with, so it is
    read back as ``absmax.T.reshape(-1)`` widened to float32 (exact). Anything else is returned unchanged.
    """
    if (
        isinstance(absmax, torch.Tensor) and absmax.dtype == torch.bfloat16 and absmax.dim() == 2
        and len(shape) == 2 and isinstance(blocksize, int) and blocksize > 0 and shape[1] % blocksize == 0
        and tuple(absmax.shape) == (shape[1] // blocksize, shape[0])
    ):
        return absmax.t().reshape(-1).float()
    return absmax


def _check_loaded_scales(state: QuantState) -> None:
    """What ``validate`` does not check on every call (it runs before each dequantization), checked once at load.

    - ``quant_map`` must be the standard table of ``quant_type``: bitsandbytes decodes with that table whatever the
      checkpoint's ``quant_map`` says, while qkernels decodes with ``quant_map``; a different one would silently give
      outputs that differ from bitsandbytes'.
    - float scales must be finite: a NaN/inf absmax turns its whole block into NaN.
    """
    if not torch.equal(state.code.cpu(), get_codebook(state.quant_type)):
        raise ValueError(
            f"quant state key 'quant_map' is not the standard {state.quant_type} codebook (corrupted, or written for "
            f"another quant_type); bitsandbytes decodes quant_type={state.quant_type!r} with its standard table, so "
            "this checkpoint is inconsistent. Re-save it from the model that wrote it."
        )
    # nested_quant_map is read as it is (bitsandbytes decodes the nested scales with the stored map too), so a NaN in it
    # corrupts every block whose code points there, like a NaN scale
    scales = [("nested_absmax", state.state2.absmax), ("nested_quant_map", state.state2.code)] if state.nested else [
        ("absmax", state.absmax)]
    for key, t in scales:
        t = t.reshape(-1)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"quant state key {key!r} holds NaN or inf (first at index "
                             f"{int((~torch.isfinite(t)).nonzero()[0, 0])}); the checkpoint is corrupted")


class QuantState:
    """Decoding state of a blockwise-quantized 4-bit tensor (or of its nested 8-bit absmax).

    Attributes:
        absmax: per-block scales. float32 ``[nblocks]``; uint8 ``[nblocks]`` codes when double-quantized.
        shape: ``torch.Size`` of the original tensor (``None`` for a nested state).
        code: float32 ``[16]`` codebook (``[256]`` dynamic map for a nested state).
        blocksize: elements per block (32..4096, a power of two; 256 for the nested state).
        quant_type: ``"nf4"`` or ``"fp4"`` (``None`` for a nested state).
        dtype: dtype of the original tensor, and the default dequantization dtype.
        offset: float32 0-d tensor, the mean subtracted from absmax before nesting (or ``None``).
        state2: the nested ``QuantState`` holding the float32 ``nested_absmax`` (or ``None``).

    ``nblocks = ceil(prod(shape) / blocksize)``; nested: ``nested_blocks = ceil(nblocks / 256)``.
    """

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: torch.Size | tuple[int, ...] | None = None,
        code: torch.Tensor | None = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: torch.dtype | None = None,
        offset: torch.Tensor | None = None,
        state2: QuantState | None = None,
    ):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        """True when ``absmax`` is double-quantized (uint8 codes + ``state2`` + ``offset``)."""
        return self.state2 is not None

    @property
    def numel(self) -> int:
        """Number of elements of the quantized tensor."""
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        """Number of quantization blocks, ``ceil(numel / blocksize)``."""
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        """The device of the state's tensors (where ``absmax`` is; ``to(device)`` moves them all)."""
        return self.absmax.device

    def __getattr__(self, name: str) -> Any:
        """``bitsandbytes__<quant_type>``: the packed blob tensor (``as_dict(packed=True)``'s last key), as
        bitsandbytes' QuantState answers it: torch.distributed.checkpoint's ``get_model_state_dict`` resolves the key
        ``weight.quant_state.bitsandbytes__nf4`` as an attribute path. Any other missing name: AttributeError."""
        if name.startswith("bitsandbytes__") and name == f"bitsandbytes__{self.__dict__.get('quant_type')}":
            return self.as_dict(packed=True)[_QS_PREFIX + name.removeprefix("bitsandbytes__")]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")

    # accelerate's set_module_tensor_to_device walks "<layer>.weight.quant_state.bitsandbytes__nf4" with getattr and
    # sets module._parameters["bitsandbytes__nf4"]: the state of a layer's weight answers (qkernels._accelerate)
    @property
    def _parameters(self) -> Any:
        from . import _accelerate

        return _accelerate.slots(self, "weight.quant_state.", "_parameters")

    @property
    def _buffers(self) -> Any:
        from . import _accelerate

        return _accelerate.slots(self, "weight.quant_state.", "_buffers")

    def __getstate__(self) -> dict[str, Any]:
        """Pickle / deepcopy state: the fields, without the weak link to the layer that holds this state."""
        from . import _accelerate

        return {k: v for k, v in self.__dict__.items() if k != _accelerate.OWNER}

    def __repr__(self) -> str:
        nested = f", nested_blocksize={self.state2.blocksize}" if self.nested else ""
        return (
            f"QuantState(quant_type={self.quant_type!r}, shape={tuple(self.shape) if self.shape else None}, "
            f"dtype={self.dtype}, blocksize={self.blocksize}{nested}, device={self.device})"
        )

    # ------------------------------------------------------------------ validation
    def validate(self, packed: torch.Tensor | None = None) -> QuantState:
        """Check internal consistency (and against ``packed`` when given); raise ValueError naming the field.

        Returns ``self`` so it can be chained. Called by ``from_dict`` and before every dequantization, so a
        corrupted or mismatched state is an error, never an out-of-bounds read or a wrong answer.
        """
        # Each quantity read once (this runs before every matmul: a decode step of a small layer is ~25 us of kernel)
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_state.quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        blocksize = self.blocksize
        check_blocksize(blocksize, "quant_state.blocksize")
        shape = self.shape
        if shape is None or (len(shape) and min(int(s) for s in shape) < 0):
            raise ValueError(f"quant_state.shape must be a tuple of sizes, got {shape!r}")
        numel = math.prod(shape)
        if numel == 0:
            raise ValueError(f"quant_state.shape {tuple(shape)} has no elements")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"quant_state.dtype must be one of {FLOAT_DTYPES}, got {self.dtype!r}")
        code, absmax, s2 = self.code, self.absmax, self.state2
        if not isinstance(code, torch.Tensor) or code.numel() != 16 or code.dtype != torch.float32:
            got = (tuple(code.shape), code.dtype) if isinstance(code, torch.Tensor) else code
            raise ValueError(f"quant_state.code (quant_map) must be a float32 tensor of 16 entries, got {got}")
        nblocks = -(-numel // blocksize)
        if not isinstance(absmax, torch.Tensor) or absmax.dim() != 1 or absmax.numel() != nblocks:
            got = tuple(absmax.shape) if isinstance(absmax, torch.Tensor) else type(absmax).__name__
            raise ValueError(
                f"quant_state.absmax must have one entry per block: shape {tuple(shape)} at blocksize "
                f"{blocksize} has {nblocks} blocks, but absmax has shape {got}; the state does not "
                "belong to this tensor"
            )
        if s2 is not None:
            if absmax.dtype != torch.uint8:
                raise ValueError(f"quant_state.absmax must be uint8 when double-quantized, got {absmax.dtype}")
            bs2 = s2.blocksize
            if not valid_nested_blocksize(bs2):
                raise ValueError(f"nested_blocksize must be a power of two from 1 to {MAX_NESTED_BLOCKSIZE} "
                                 f"(bitsandbytes writes 256), got {bs2!r}")
            n2 = -(-nblocks // bs2)
            a2, c2 = s2.absmax, s2.code
            if not isinstance(a2, torch.Tensor) or a2.dtype != torch.float32 or a2.shape != (n2,):
                got = (tuple(a2.shape), a2.dtype) if isinstance(a2, torch.Tensor) else a2
                raise ValueError(f"nested_absmax must be float32 of shape ({n2},) for {nblocks} blocks, got {got}")
            if not isinstance(c2, torch.Tensor) or c2.numel() != 256 or c2.dtype != torch.float32:
                raise ValueError("nested_quant_map must be a float32 tensor of 256 entries")
            if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1:
                raise ValueError(f"nested_offset must be a single float, got {self.offset!r}")
        elif absmax.dtype != torch.float32:
            raise ValueError(f"quant_state.absmax must be float32 (not double-quantized), got {absmax.dtype}")
        if packed is not None:
            if not isinstance(packed, torch.Tensor):
                raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
            if packed.dtype not in STORAGE_DTYPES:
                raise TypeError(f"packed must be uint8 (or a bf16/fp16/fp32 quant_storage view), got {packed.dtype}")
            need = (numel + 1) // 2
            have = packed.numel() * packed.element_size()
            if have < need:
                raise ValueError(
                    f"packed holds {have} bytes but quant_state.shape {tuple(shape)} needs {need} "
                    "(two 4-bit codes per byte); the state does not belong to this tensor"
                )
            device = packed.device
            if absmax.device != device:
                raise ValueError(
                    f"packed is on {device} but quant_state.absmax is on {absmax.device}; "
                    "move both with quant_state.to(device)"
                )
            # the other tables too: a codebook left behind failed deep in an op ("code is on meta but the data is on
            # cpu", a RuntimeError that named neither the state nor the fix)
            others = (("quant_state.code (quant_map)", code),) if s2 is None else (
                ("quant_state.code (quant_map)", code), ("nested_absmax", s2.absmax), ("nested_quant_map", s2.code),
                ("nested_offset (quant_state.offset)", self.offset))
            for name, t in others:
                if t.device != device:
                    raise ValueError(f"{name} is on {t.device} but packed and quant_state.absmax are on "
                                     f"{device}; move the whole state with "
                                     f"quant_state.to({str(device)!r})")
        return self

    # ------------------------------------------------------------------ shape-only states (meta device)
    @classmethod
    def empty(cls, shape: torch.Size | tuple[int, ...], blocksize: int, quant_type: str, nested: bool,
              dtype: torch.dtype, device: torch.device | str = "meta") -> QuantState:
        """A state with the right fields and tensor shapes for ``shape`` in this format, its scales uninitialized.

        For a layer built on the meta device (a model too big to materialize in float): nothing is computed. Tensors:
        ``absmax`` uint8 ``[nblocks]`` when ``nested`` else float32 ``[nblocks]``; ``code`` float32 ``[16]``; nested:
        ``offset`` float32 ``[]``, ``state2.absmax`` float32 ``[ceil(nblocks / 256)]``, ``state2.code`` float32
        ``[256]``. On a real device the codebooks hold the standard tables; the scales are whatever memory held: the
        values come from a checkpoint.

        Args:
            shape: the weight's shape; blocksize, quant_type ("nf4"/"fp4"), nested (double quant): the format;
            dtype: the weight's float dtype (what dequantize returns); device: where the tensors live.

        Returns:
            a ``QuantState`` whose tensors have the format's shapes and hold no values yet.
        """
        state = cls(absmax=torch.empty(0), shape=shape, code=None, blocksize=blocksize, quant_type=quant_type,
                    dtype=dtype)
        dev = torch.device(device)
        state.absmax = torch.empty(state.nblocks, dtype=torch.uint8 if nested else torch.float32, device=dev)
        state.code = torch.empty(16, dtype=torch.float32, device=dev)
        if nested:
            n2 = -(-state.nblocks // NESTED_BLOCKSIZE)
            state.offset = torch.empty((), dtype=torch.float32, device=dev)
            state.state2 = cls(absmax=torch.empty(n2, dtype=torch.float32, device=dev),
                               code=torch.empty(256, dtype=torch.float32, device=dev), blocksize=NESTED_BLOCKSIZE,
                               dtype=torch.float32)
        return state.to_empty(dev) if dev.type != "meta" else state

    def to_empty(self, device: torch.device | str) -> QuantState:
        """Move to ``device`` in place without copying values (``nn.Module.to_empty``'s move, which a meta tensor needs:
        it has none). The codebooks get the standard tables of ``quant_type`` and the dynamic map; ``absmax``,
        ``offset`` and the nested absmax are uninitialized until a checkpoint is loaded. Returns ``self``."""
        dev = torch.device(device)
        self.absmax = torch.empty_like(self.absmax, device=dev)
        self.code = get_codebook(self.quant_type, dev)
        if self.nested:
            self.offset = torch.empty_like(self.offset, device=dev)
            self.state2.absmax = torch.empty_like(self.state2.absmax, device=dev)
            self.state2.code = dynamic_map(dev)
        return self

    # ------------------------------------------------------------------ device moves
    def to(self, device: torch.device | str) -> QuantState:
        """Move every tensor to ``device`` in place (as bitsandbytes does) and return ``self``."""
        self.code = self.code.to(device)
        self.absmax = self.absmax.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        return self

    # ------------------------------------------------------------------ serialization
    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """Returns the state as a dict with bitsandbytes' keys (what ``from_dict`` reads back).

        ``packed=False``: ``{quant_type, absmax, blocksize, quant_map, dtype, shape[, nested_absmax,
        nested_blocksize, nested_quant_map, nested_dtype, nested_offset]}`` with Python values.
        ``packed=True``: tensors only (safetensors-ready): ``absmax``, ``quant_map``[, ``nested_absmax``,
        ``nested_quant_map``] and ``quant_state.bitsandbytes__<quant_type>``, a uint8 tensor holding the
        UTF-8 bytes of ``json.dumps`` of the non-tensor fields, in bitsandbytes' key order.
        Under a module prefix ``p.`` these become ``p.weight.absmax`` etc.
        """
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    # a copy, so safetensors never sees it as shared storage (bitsandbytes does the same)
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    # a meta state has no value: 0.0 stands in, so that the keys (and the blob, on meta) exist
                    "nested_offset": 0.0 if self.offset.is_meta else self.offset.item(),
                }
            )
        if not packed:
            return d
        out = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        blob = json.dumps({k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}).encode("utf-8")
        blob_device = "meta" if self.absmax.is_meta else "cpu"
        out[_QS_PREFIX + self.quant_type] = torch.tensor(list(blob), dtype=torch.uint8, device=blob_device)
        return out

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str | None = None) -> QuantState:
        """Returns a QuantState built from a bitsandbytes-format dict (packed or unpacked), every field validated.

        Keys may carry a module prefix (``"layer.weight.absmax"``): the part after the last ``.`` is the key,
        except for the ``quant_state.bitsandbytes__nf4``/``__fp4`` blob. Missing, unknown or corrupted keys
        raise ValueError naming the key, as do a ``quant_map`` that is not the standard table of ``quant_type`` and
        NaN/inf scales. A plain absmax in bitsandbytes' CPU inference layout (bf16 ``[K/bs, N]``, written by
        bitsandbytes 0.50.2 when a model is saved after a CPU eval forward) is read back in the format's order.
        Tensors are moved to ``device`` (default: where ``absmax`` is). Does not modify ``qs_dict``.

        Raises:
            TypeError: ``qs_dict`` is not a dict. ValueError: a missing, unknown or corrupted key (named).
        """
        if not isinstance(qs_dict, dict):
            raise TypeError(f"qs_dict must be a dict of state-dict entries, got {type(qs_dict).__name__}")
        fields: dict[str, Any] = {}
        blobs = [k for k in qs_dict if "quant_state." in k or k.startswith("bitsandbytes__")]
        for k, v in qs_dict.items():
            if k in blobs:
                continue
            short = k.rsplit(".", 1)[-1]
            if short not in _TENSOR_KEYS + _BLOB_KEYS:
                raise ValueError(f"unexpected quant state key {k!r}; expected keys among {_TENSOR_KEYS + _BLOB_KEYS}")
            fields[short] = v
        if blobs:
            if len(blobs) != 1:
                raise ValueError(f"expected exactly one 'quant_state.bitsandbytes__<type>' entry, found {blobs}")
            key = blobs[0]
            qt = key.rsplit("bitsandbytes__", 1)[-1]
            if qt not in ("nf4", "fp4"):
                raise ValueError(f"quant state key {key!r} must end in bitsandbytes__nf4 or bitsandbytes__fp4")
            blob = qs_dict[key]
            if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
                raise ValueError(f"quant state key {key!r} must be a 1-D uint8 tensor of JSON bytes")
            try:
                meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"quant state key {key!r} is corrupted: its bytes are not valid JSON ({e})") from e
            if not isinstance(meta, dict):
                raise ValueError(f"quant state key {key!r} is corrupted: JSON is not an object")
            for mk in meta:
                if mk not in _BLOB_KEYS:
                    raise ValueError(f"quant state key {key!r} holds unexpected field {mk!r}")
            if meta.get("quant_type", qt) != qt:
                raise ValueError(f"quant state key {key!r} says quant_type {meta.get('quant_type')!r}")
            fields.update(meta)
        elif "quant_type" not in fields:
            raise ValueError(
                "quant state has neither a 'quant_state.bitsandbytes__nf4'/'__fp4' entry nor a 'quant_type' key; "
                f"found keys {sorted(qs_dict)}"
            )

        def need(key: str, kind: type | tuple[type, ...]) -> Any:
            if key not in fields:
                raise ValueError(f"quant state is missing key {key!r}; found {sorted(fields)}")
            v = fields[key]
            if not isinstance(v, kind) or isinstance(v, bool):
                raise ValueError(f"quant state key {key!r} has the wrong type {type(v).__name__}")
            return v

        absmax = need("absmax", torch.Tensor)
        dev = torch.device(device) if device is not None else absmax.device
        shape = need("shape", (list, tuple))
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise ValueError(f"quant state key 'shape' must be a list of ints, got {shape!r}")
        state2 = offset = None
        nested = any(k in fields for k in ("nested_absmax", "nested_quant_map", "nested_blocksize", "nested_offset"))
        if not nested:
            absmax = _from_cpu_inference_layout(absmax, shape, fields.get("blocksize"))
        if nested:
            offset_v = need("nested_offset", (float, int))
            # an int past float's range (JSON allows 1e400 written as digits) raised OverflowError from isfinite
            if isinstance(offset_v, int) and abs(offset_v) > 2**128 or not math.isfinite(offset_v):
                raise ValueError(f"quant state key 'nested_offset' must be a finite number, got {offset_v!r}")
            offset = torch.tensor(float(offset_v), dtype=torch.float32, device=dev)
            state2 = cls(
                absmax=need("nested_absmax", torch.Tensor).to(dev),
                code=need("nested_quant_map", torch.Tensor).to(dev),
                blocksize=need("nested_blocksize", int),
                dtype=_parse_nested_dtype(fields.get("nested_dtype", "float32")),
            )
        state = cls(
            absmax=absmax.to(dev),
            shape=torch.Size(shape),
            code=need("quant_map", torch.Tensor).to(dev),
            blocksize=need("blocksize", int),
            quant_type=need("quant_type", str),
            dtype=_parse_dtype(fields.get("dtype"), "dtype"),
            offset=offset,
            state2=state2,
        )
        state.validate()
        _check_loaded_scales(state)
        return state

    # ------------------------------------------------------------------ helpers
    def nbytes(self) -> int:
        """Returns the bytes of all scale data (absmax, nested absmax, offset), excluding codebooks and codes."""
        n = self.absmax.numel() * self.absmax.element_size()
        if self.nested:
            n += self.state2.absmax.numel() * self.state2.absmax.element_size() + 4  # + float32 offset
        return n

    def codebook_matches(self) -> bool:
        """Returns True when ``code`` is the standard table for ``quant_type`` (bit for bit), else False."""
        return torch.equal(self.code.cpu(), get_codebook(self.quant_type))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented

        def same(a: Any, b: Any) -> bool:
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
            return a == b

        return (
            same(self.absmax, other.absmax)
            and self.shape == other.shape
            and same(self.code, other.code)
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and (same(self.offset, other.offset) if self.nested and other.nested else self.offset is other.offset)
            and (self.state2 == other.state2 if self.nested and other.nested else self.state2 is other.state2)
        )

    __hash__ = None  # mutable container of tensors
