"""Loader and torch-facing wrappers for the native module ``qkernels._C``.

Importing this module never fails.  If ``qkernels._C`` cannot be imported (not built, ``QKERNELS_NO_NATIVE=1`` at build
or run time, ABI problem, ...) then ``_C`` is ``None``, ``NATIVE_ERROR`` holds the reason, the reason is logged at INFO
level on the ``"qkernels"`` logger, and callers use the pure-torch reference path instead.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import torch

logger = logging.getLogger("qkernels")

_C: Any = None
NATIVE_ERROR: str | None = None

if os.environ.get("QKERNELS_NO_NATIVE", "").strip().lower() in ("1", "true", "yes", "on"):
    NATIVE_ERROR = "native module disabled by QKERNELS_NO_NATIVE=1"
else:
    try:
        # import_module, not `from qkernels import _C`: for a module that is simply not there the latter says
        # "cannot import name '_C' from partially initialized module ... (most likely due to a circular import)"
        _C = importlib.import_module("qkernels._C")
    except ModuleNotFoundError as exc:
        _C = None
        if exc.name == "qkernels._C":
            NATIVE_ERROR = (
                f"qkernels._C is not built: no compiled _C module in {os.path.dirname(os.path.abspath(__file__))}. "
                "Install qkernels from a wheel or sdist with pip (needs a C++ compiler and cmake), or in a checkout "
                "run `python setup.py build_ext --inplace`"
            )
        else:  # the module is there but something it needs is missing
            NATIVE_ERROR = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # ImportError, OSError (bad .so), anything raised at module init
        _C = None
        NATIVE_ERROR = f"{type(exc).__name__}: {exc}"

if _C is None:
    logger.info("qkernels native module unavailable, using the reference path (%s)", NATIVE_ERROR)

_DTYPE_TO_NATIVE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # == _C.DType values


def native_available() -> bool:
    """Return True when the compiled module ``qkernels._C`` was imported successfully."""
    return _C is not None


def native_info() -> dict:
    """Describe the native build.

    Returns ``_C.capabilities()`` plus ``{"native": True, "version": ...}`` when the module is loaded
    (keys ``cuda_compiled: bool``, ``cuda_archs: str``, ``openmp: bool``, ``cpu_isa: "avx512"|"avx2"|"scalar"``,
    ``compiler: str``; ``cuda_device_count: int`` when CUDA was compiled), else ``{"native": False, "reason": str}``.
    """
    if _C is None:
        return {"native": False, "reason": NATIVE_ERROR}
    info = dict(_C.capabilities())
    info["native"] = True
    info["version"] = _C.version()
    if hasattr(_C, "cuda_device_count"):
        info["cuda_device_count"] = int(_C.cuda_device_count())
    return info


def offset_value(offset: torch.Tensor) -> float:
    """The nested-scale ``offset`` (a one-element tensor) as a Python float, cached on the tensor.

    The kernels take the offset by value. Reading a CUDA tensor's value synchronizes the device, so it is read once
    per tensor and remembered (keyed by storage pointer and version counter, so an in-place change is seen).
    """
    key = (offset.data_ptr(), offset._version)
    cached = getattr(offset, "_qkernels_offset", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = float(offset.to(torch.float32).item())
    try:
        offset._qkernels_offset = (key, value)
    except (AttributeError, RuntimeError):  # e.g. a tensor subclass that refuses attributes: no cache, still right
        pass
    return value


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def dequantize_4bit_native(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
    nested: tuple | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize ``n`` bitsandbytes-format 4-bit values with the native kernel (CPU or CUDA).

    ``out``: an optional contiguous tensor of ``n`` elements of ``dtype`` on the inputs' device, written in place
    and returned flattened (no allocation: a fresh 32 MiB output costs more page faults than the decode itself).

    With ``nested=(absmax_q, nested_absmax, nested_code, offset, nested_blocksize)`` (CPU, or CUDA when
    ``_C.dequantize_4bit_nested_cuda`` exists) ``absmax`` is ignored and the double-quantized scales are decoded
    inline by the kernel (one pass / one launch), bit-identical to
    ``reference.decode_nested_absmax``:
    ``absmax_q`` uint8 codes (one per block), ``nested_absmax`` float32 ``[ceil(nblocks / nested_blocksize)]``,
    ``nested_code`` float32 ``[256]``, ``offset`` a float32 scalar (tensor or float), ``nested_blocksize`` a positive
    power of two; scale = ``float32(nested_code[q] * nested_absmax[b // nested_blocksize]) + offset``.

    Args:
        packed: contiguous tensor holding at least ``ceil(n/2)`` bytes, two 4-bit codes per byte: element ``2j`` in the
            HIGH nibble of byte ``j``, element ``2j+1`` in the LOW nibble.  Any shape; ``uint8`` or any other
            ``quant_storage`` dtype (reinterpreted with ``.view(torch.uint8)``).
        absmax: contiguous ``float32`` tensor with exactly ``ceil(n/blocksize)`` elements, one scale per block of
            ``blocksize`` consecutive elements (the last block may be partial).
        code: ``float32`` tensor with 16 elements, the codebook (NF4 or FP4).
        n: number of elements to produce (> 0).
        blocksize: power of two in [32, 4096].
        dtype: ``torch.float32``, ``torch.float16`` or ``torch.bfloat16``.

    Returns:
        A new flat (1-D) contiguous tensor of ``n`` elements of ``dtype`` on the inputs' device with
        ``out[i] = (code[nibble(i)] * absmax[i // blocksize]).to(dtype)`` (one float32 multiply, one RNE rounding);
        bit-identical to that pure-torch expression.  CUDA launches are asynchronous on the current stream.

    Raises:
        TypeError: a tensor argument has the wrong type/dtype.
        ValueError: a bad size, layout, device or blocksize (the message names the argument).
        RuntimeError: the native module is not available (see ``NATIVE_ERROR``) or lacks CUDA support.
    """
    if _C is None:
        raise RuntimeError(f"qkernels native module is not available ({NATIVE_ERROR}); use the reference path")
    fn = "dequantize_4bit_native"
    for name, t in (("packed", packed), ("absmax", absmax), ("code", code)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor (got {type(t).__name__})")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{fn}: argument 'n' must be an int (got {type(n).__name__})")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{fn}: argument 'blocksize' must be an int (got {type(blocksize).__name__})")
    if dtype not in _DTYPE_TO_NATIVE:
        raise TypeError(f"{fn}: argument 'dtype' must be torch.float32, torch.float16 or torch.bfloat16 (got {dtype})")
    if n <= 0:
        raise ValueError(f"{fn}: argument 'n' must be > 0 (got {n})")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"{fn}: argument 'blocksize' must be a power of two in [32, 4096] (got {blocksize})")

    if not packed.is_contiguous():
        raise ValueError(f"{fn}: argument 'packed' must be contiguous")
    if packed.dtype != torch.uint8:
        if packed.dtype.is_complex or packed.dtype == torch.bool:
            raise TypeError(f"{fn}: argument 'packed' must be uint8 or a quant_storage dtype (got {packed.dtype})")
        packed = packed.reshape(-1).view(torch.uint8)
    if nested is not None:
        absmax, nested_absmax, nested_code, offset, nested_blocksize = nested
        if not isinstance(nested_absmax, torch.Tensor) or not isinstance(nested_code, torch.Tensor):
            raise TypeError(f"{fn}: 'nested_absmax' and 'nested_code' must be torch.Tensors")
        if absmax.dtype != torch.uint8:
            raise TypeError(f"{fn}: argument 'absmax_q' must be torch.uint8 when nested (got {absmax.dtype})")
        if isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int):
            raise TypeError(f"{fn}: argument 'nested_blocksize' must be an int (got {type(nested_blocksize).__name__})")
        if nested_blocksize <= 0 or nested_blocksize & (nested_blocksize - 1):
            raise ValueError(
                f"{fn}: argument 'nested_blocksize' must be a positive power of two (got {nested_blocksize})"
            )
        if nested_absmax.dtype != torch.float32 or nested_code.dtype != torch.float32:
            raise TypeError(f"{fn}: 'nested_absmax' and 'nested_code' must be torch.float32")
        if nested_code.numel() != 256:
            raise ValueError(f"{fn}: argument 'nested_code' must have 256 elements (got {nested_code.numel()})")
        n2 = _ceil_div(_ceil_div(n, blocksize), nested_blocksize)
        if nested_absmax.numel() != n2:
            raise ValueError(f"{fn}: argument 'nested_absmax' must have {n2} elements (got {nested_absmax.numel()})")
        if packed.device.type == "cuda" and not hasattr(_C, "dequantize_4bit_nested_cuda"):
            raise RuntimeError(f"{fn}: qkernels._C has no dequantize_4bit_nested_cuda (built without CUDA, or stale)")
        if packed.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{fn}: nested scales are decoded inline on CPU or CUDA only (got {packed.device})")
        for name, t in (("nested_absmax", nested_absmax), ("nested_code", nested_code)):
            if t.device != packed.device:
                raise ValueError(f"{fn}: argument '{name}' is on {t.device} but 'packed' is on {packed.device}")
        if isinstance(offset, torch.Tensor):
            if offset.numel() != 1:
                raise ValueError(f"{fn}: argument 'offset' must be a single value (got {offset.numel()})")
            # A float32 value, exact as a Python float.  On CUDA this .item() waits for the device (one sync).
            offset = offset_value(offset)
        offset = float(offset)
        nested_absmax = nested_absmax.contiguous()
        nested_code = nested_code.contiguous()
    elif absmax.dtype != torch.float32:
        raise TypeError(f"{fn}: argument 'absmax' must be torch.float32 (got {absmax.dtype})")
    if not absmax.is_contiguous():
        raise ValueError(f"{fn}: argument 'absmax' must be contiguous")
    if code.dtype != torch.float32:
        raise TypeError(f"{fn}: argument 'code' must be torch.float32 (got {code.dtype})")
    if code.numel() != 16:
        raise ValueError(f"{fn}: argument 'code' must have 16 elements (got {code.numel()})")
    code = code.contiguous()
    nblocks = _ceil_div(n, blocksize)
    if absmax.numel() != nblocks:
        raise ValueError(
            f"{fn}: argument 'absmax' must have ceil(n/blocksize) = {nblocks} elements (got {absmax.numel()})"
        )
    if packed.numel() < _ceil_div(n, 2):
        raise ValueError(f"{fn}: argument 'packed' must hold at least ceil(n/2) = {_ceil_div(n, 2)} bytes "
                         f"(got {packed.numel()})")
    device = packed.device
    for name, t in (("absmax", absmax), ("code", code)):
        if t.device != device:
            raise ValueError(f"{fn}: argument '{name}' is on {t.device} but 'packed' is on {device}")

    if out is None:
        out = torch.empty(n, dtype=dtype, device=device)
    else:
        if not isinstance(out, torch.Tensor) or out.dtype != dtype or out.numel() != n or out.device != device:
            raise ValueError(f"{fn}: argument 'out' must be a tensor of {n} elements of {dtype} on {device}")
        if not out.is_contiguous():
            raise ValueError(f"{fn}: argument 'out' must be contiguous")
        out = out.view(-1)
    native_dtype = _DTYPE_TO_NATIVE[dtype]
    if nested is not None and device.type == "cpu":
        _C.dequantize_4bit_nested_cpu(packed.data_ptr(), absmax.data_ptr(), nested_absmax.data_ptr(),
                                      nested_code.data_ptr(), offset, nested_blocksize, code.data_ptr(), n, blocksize,
                                      out.data_ptr(), native_dtype)
    elif nested is not None:  # CUDA (checked above): one launch, scales decoded inline
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _C.dequantize_4bit_nested_cuda(packed.data_ptr(), absmax.data_ptr(), nested_absmax.data_ptr(),
                                           nested_code.data_ptr(), offset, nested_blocksize, code.data_ptr(), n,
                                           blocksize, out.data_ptr(), native_dtype, stream)
    elif device.type == "cpu":
        _C.dequantize_4bit_cpu(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, blocksize, out.data_ptr(),
                               native_dtype)
    elif device.type == "cuda":
        if not hasattr(_C, "dequantize_4bit_cuda"):
            raise RuntimeError(f"{fn}: qkernels._C was built without CUDA support (rebuild with QKERNELS_CUDA=1)")
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _C.dequantize_4bit_cuda(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, blocksize,
                                    out.data_ptr(), native_dtype, stream)
    else:
        raise ValueError(f"{fn}: argument 'packed' is on unsupported device {device} (expected cpu or cuda)")
    return out


def _dense_nested(nested_absmax: torch.Tensor, nested_code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nested scales as dense tensors, for a kernel that reads them by pointer. The caller keeps the result in
    names until the kernel returns: ``f(t.contiguous().data_ptr(), ...)`` frees a strided ``t``'s copy before ``f``
    runs, and the next allocation (the other table's copy) reused its memory, so the kernel read the wrong scales."""
    return nested_absmax.contiguous(), nested_code.contiguous()


def dequantize_4bit_cpu_into(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                             out: torch.Tensor, nested: tuple | None = None) -> torch.Tensor:
    """``dequantize_4bit_native`` on the CPU into ``out`` without its checks, for callers that validated the state
    against ``packed`` (``QuantState.validate`` or the ops' checks) and own ``out`` (the large-M path's workspace, a
    dense tensor of the weight's size): in a training step the checks were ~15 % of a 1024 x 1024 dequantization.
    ``packed`` uint8 and dense, ``absmax`` / ``code`` / the nested tensors float32 (uint8 codes when nested)."""
    n = out.numel()
    absmax = absmax.contiguous()
    code = code.contiguous()
    if nested is not None:  # absmax: the uint8 codes (nested[0] is the same tensor)
        _, nested_absmax, nested_code, offset, nested_blocksize = nested
        offset = offset_value(offset) if isinstance(offset, torch.Tensor) else float(offset)
        # dense copies held in names until the kernel returns (see _dense_nested)
        nested_absmax, nested_code = _dense_nested(nested_absmax, nested_code)
        _C.dequantize_4bit_nested_cpu(packed.data_ptr(), absmax.data_ptr(), nested_absmax.data_ptr(),
                                      nested_code.data_ptr(), offset, nested_blocksize, code.data_ptr(), n, blocksize,
                                      out.data_ptr(), _DTYPE_TO_NATIVE[out.dtype])
    else:
        _C.dequantize_4bit_cpu(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, blocksize, out.data_ptr(),
                               _DTYPE_TO_NATIVE[out.dtype])
    return out


def dequantize_4bit_cpu_t_into(packed: torch.Tensor, scales: tuple, code: torch.Tensor, blocksize: int, N: int, K: int,
                               out: torch.Tensor) -> torch.Tensor:
    """The weight ``W [N, K]`` dequantized on the CPU into ``out [K, N]`` as its transpose: ``out[k, n] = W[n, k]``,
    bit for bit the transpose of ``dequantize_4bit_cpu_into``'s result. Without checks, like that function: ``packed``
    uint8 and dense, validated against the scales; ``out`` dense float32 / bfloat16 (fast only where
    ``_C.dequantize_4bit_t_cpu_vectorized`` says so). ``scales``: ``(absmax, nested_absmax, nested_code, offset,
    nested_blocksize)``, the nested entries None for float32 absmax.

    Returns:
        ``out``.
    """
    absmax, nested_absmax, nested_code, offset, nested_blocksize = scales
    absmax = absmax.contiguous()
    code = code.contiguous()
    dt = _DTYPE_TO_NATIVE[out.dtype]
    if nested_absmax is not None:
        offset = offset_value(offset) if isinstance(offset, torch.Tensor) else float(offset)
        nested_absmax, nested_code = _dense_nested(nested_absmax, nested_code)
        _C.dequantize_4bit_t_cpu(packed.data_ptr(), 0, absmax.data_ptr(), nested_absmax.data_ptr(),
                                 nested_code.data_ptr(), offset, int(nested_blocksize), code.data_ptr(), N, K,
                                 blocksize, out.data_ptr(), dt)
    else:
        _C.dequantize_4bit_t_cpu(packed.data_ptr(), absmax.data_ptr(), 0, 0, 0, 0.0, 256, code.data_ptr(), N, K,
                                 blocksize, out.data_ptr(), dt)
    return out


def quantize_4bit_native(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of ``A`` (any shape, CPU or CUDA) with the native kernel.

    Bit-identical to ``qkernels.reference.quantize_4bit(A, code, blocksize)``.

    Args:
        A: CPU or CUDA tensor of ``torch.float32``, ``torch.float16`` or ``torch.bfloat16`` (made contiguous if
            needed), at least one element; quantized flattened row-major.
        code: ``float32`` tensor with 16 elements (NF4 / FP4 codebook, any order), on the same device as ``A``.
        blocksize: power of two in [32, 4096].

    Returns:
        ``(packed, absmax)`` on ``A``'s device: packed uint8 ``[(n + 1) // 2, 1]`` (element ``2j`` in the high
        nibble; for odd ``n`` the last low nibble is the code of 0.0) and absmax float32 ``[ceil(n / blocksize)]``.
        Non-finite input yields a non-finite absmax entry; checking for it is the caller's job. CUDA: launched
        asynchronously on the current stream of ``A``'s device.

    The CPU SIMD path is picked per call: the best of ``_C.cpu_isa_available()``, lowered by the environment variable
    ``QKERNELS_CPU_ISA=scalar|avx2|avx512`` (all paths give the same bits).

    Raises:
        TypeError: a wrong argument type / dtype.  ValueError: bad size, device or blocksize (names the argument).
        RuntimeError: the native module is not available, or was built without the kernel for ``A``'s device
        (``quantize_4bit_cpu`` / ``quantize_4bit_cuda``).
    """
    if _C is None:
        raise RuntimeError(f"qkernels native module is not available ({NATIVE_ERROR}); use the reference path")
    fn = "quantize_4bit_native"
    for name, t in (("A", A), ("code", code)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor (got {type(t).__name__})")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{fn}: argument 'blocksize' must be an int (got {type(blocksize).__name__})")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"{fn}: argument 'blocksize' must be a power of two in [32, 4096] (got {blocksize})")
    if A.dtype not in _DTYPE_TO_NATIVE:
        raise TypeError(f"{fn}: argument 'A' must be torch.float32, torch.float16 or torch.bfloat16 (got {A.dtype})")
    device = A.device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{fn}: argument 'A' is on unsupported device {device} (expected cpu or cuda)")
    n = A.numel()
    if n <= 0:
        raise ValueError(f"{fn}: argument 'A' must have at least one element (got {n})")
    if code.dtype != torch.float32:
        raise TypeError(f"{fn}: argument 'code' must be torch.float32 (got {code.dtype})")
    if code.numel() != 16:
        raise ValueError(f"{fn}: argument 'code' must have 16 elements (got {code.numel()})")
    if code.device != device:
        raise ValueError(f"{fn}: argument 'code' is on {code.device} but 'A' is on {device}")
    if device.type == "cpu":
        if not hasattr(_C, "quantize_4bit_cpu"):
            raise RuntimeError("qkernels._C has no quantize_4bit_cpu (stale build?): rebuild the native module")
    elif not hasattr(_C, "quantize_4bit_cuda"):
        if not native_info().get("cuda_compiled", False):
            raise RuntimeError(f"{fn}: qkernels._C was built without CUDA support (rebuild with QKERNELS_CUDA=1)")
        raise RuntimeError(f"{fn}: qkernels._C has no quantize_4bit_cuda (stale build?): rebuild the native module")
    A = A.contiguous()
    code = code.contiguous()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    absmax = torch.empty(_ceil_div(n, blocksize), dtype=torch.float32, device=device)
    if device.type == "cpu":
        _C.quantize_4bit_cpu(A.data_ptr(), _DTYPE_TO_NATIVE[A.dtype], n, blocksize, code.data_ptr(),
                             packed.data_ptr(), absmax.data_ptr())
    else:
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _C.quantize_4bit_cuda(A.data_ptr(), _DTYPE_TO_NATIVE[A.dtype], n, blocksize, code.data_ptr(),
                                  packed.data_ptr(), absmax.data_ptr(), stream)
    return packed, absmax


def quantize_blockwise_native(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of ``A`` (CPU or CUDA, any float dtype, quantized as float32), 256-entry map.

    Bit-identical to ``qkernels.reference.quantize_blockwise(A, code, blocksize)``: ``(codes uint8 [n], absmax
    float32 [ceil(n / blocksize)])`` on ``A``'s device. ``blocksize``: a power of two in [1, 4096]. Non-finite input
    gives a non-finite absmax (the caller checks). CUDA: launched asynchronously on the current stream.
    """
    fn = "quantize_blockwise_native"
    device = A.device
    kernel = {"cpu": "quantize_blockwise_cpu", "cuda": "quantize_blockwise_cuda"}.get(device.type)
    if kernel is None:
        raise ValueError(f"{fn}: argument 'A' is on unsupported device {device} (expected cpu or cuda)")
    if _C is None or not hasattr(_C, kernel):
        raise RuntimeError(f"qkernels native module has no {kernel} ({NATIVE_ERROR or 'built without it, or stale'})")
    if code.device != device:
        raise ValueError(f"{fn}: argument 'code' is on {code.device} but 'A' is on {device}")
    if code.dtype != torch.float32 or code.numel() != 256:
        raise ValueError(f"{fn}: argument 'code' must be float32 with 256 elements")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 0 < blocksize <= 4096 \
            or blocksize & (blocksize - 1):
        raise ValueError(f"{fn}: argument 'blocksize' must be a power of two in [1, 4096] (got {blocksize!r})")
    n = A.numel()
    if n <= 0:
        raise ValueError(f"{fn}: argument 'A' must have at least one element")
    flat = A.reshape(-1).to(torch.float32).contiguous()
    code = code.contiguous()
    out = torch.empty(n, dtype=torch.uint8, device=device)
    absmax = torch.empty(_ceil_div(n, blocksize), dtype=torch.float32, device=device)
    if device.type == "cpu":
        _C.quantize_blockwise_cpu(flat.data_ptr(), n, blocksize, code.data_ptr(), out.data_ptr(), absmax.data_ptr())
    else:
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _C.quantize_blockwise_cuda(flat.data_ptr(), n, blocksize, code.data_ptr(), out.data_ptr(),
                                       absmax.data_ptr(), stream)
    return out, absmax


def dequantize_blockwise_native(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                                blocksize: int) -> torch.Tensor:
    """Inverse of ``quantize_blockwise_native`` (CPU or CUDA): float32 ``[n]``, ``code[q[i]] * absmax[i // blocksize]``.

    Bit-identical to ``qkernels.reference.dequantize_blockwise``. ``q`` uint8 (any shape, read flattened), ``absmax``
    float32 ``[ceil(n / blocksize)]``, ``code`` float32 ``[256]``, all on one device; ``blocksize`` a power of two in
    [1, 4096]. CUDA: launched asynchronously on the current stream.
    """
    fn = "dequantize_blockwise_native"
    device = q.device
    kernel = {"cpu": "dequantize_blockwise_cpu", "cuda": "dequantize_blockwise_cuda"}.get(device.type)
    if kernel is None:
        raise ValueError(f"{fn}: argument 'q' is on unsupported device {device} (expected cpu or cuda)")
    if _C is None or not hasattr(_C, kernel):
        raise RuntimeError(f"qkernels native module has no {kernel} ({NATIVE_ERROR or 'built without it, or stale'})")
    for name, t in (("absmax", absmax), ("code", code)):
        if t.device != device:
            raise ValueError(f"{fn}: argument '{name}' is on {t.device} but 'q' is on {device}")
    if q.dtype != torch.uint8:
        raise TypeError(f"{fn}: argument 'q' must be torch.uint8 (got {q.dtype})")
    if code.dtype != torch.float32 or code.numel() != 256:
        raise ValueError(f"{fn}: argument 'code' must be float32 with 256 elements")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 0 < blocksize <= 4096 \
            or blocksize & (blocksize - 1):
        raise ValueError(f"{fn}: argument 'blocksize' must be a power of two in [1, 4096] (got {blocksize!r})")
    n = q.numel()
    if n <= 0:
        raise ValueError(f"{fn}: argument 'q' must have at least one element")
    nb = _ceil_div(n, blocksize)
    if absmax.dtype != torch.float32 or absmax.numel() != nb:
        raise ValueError(f"{fn}: argument 'absmax' must be float32 with {nb} elements")
    q = q.reshape(-1).contiguous()
    absmax = absmax.reshape(-1).contiguous()
    code = code.reshape(-1).contiguous()
    out = torch.empty(n, dtype=torch.float32, device=device)
    if device.type == "cpu":
        _C.dequantize_blockwise_cpu(q.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, blocksize, out.data_ptr())
    else:
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _C.dequantize_blockwise_cuda(q.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, blocksize,
                                         out.data_ptr(), stream)
    return out


def gemv_4bit_lora_native(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: Any,
    lora_t: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused small-M ``y = x @ dequant(W)^T + lora_t @ lora_B^T + bias`` with the native kernel (CPU or CUDA).

    Float32 accumulation, rounded once to ``x.dtype``. W is read packed, never materialized.

    Args:
        x: ``[M, K]`` float32 / float16 / bfloat16, contiguous, on the weight's device.
        packed: the packed 4-bit codes of W (``state.shape == (N, K)``), contiguous; uint8 or a ``quant_storage``
            dtype (reinterpreted as uint8).
        state: the weight's ``QuantState`` (plain float32 absmax or double-quantized; any 16-entry codebook).
        lora_t: ``[M, r]`` float32, the caller's already scaled LoRA down-projection ``s * dropout(x) @ A^T``, or
            None (no LoRA; then ``lora_B`` must be None too).
        lora_B: ``[N, r]`` (peft's ``lora_B.weight`` layout), converted to contiguous float32 if needed, or None.
        bias: ``[N]`` (converted to contiguous float32 if needed) or None.
        out: optional contiguous ``[M, N]`` tensor of ``x.dtype`` on x's device, written and returned.

    Returns:
        ``[M, N]`` in ``x.dtype``. CUDA: launched asynchronously on the current stream of x's device (needs
        ``_C.gemv_4bit_lora_cuda``). The CPU SIMD path follows ``QKERNELS_CPU_ISA`` (see ``quantize_4bit_native``).

    Raises:
        TypeError: an argument has the wrong type or dtype.  ValueError: a shape, layout or device mismatch (the
        message names the argument).  RuntimeError: the native module (or its CUDA kernel) is not available.
    """
    if _C is None:
        raise RuntimeError(f"qkernels native module is not available ({NATIVE_ERROR}); use the reference path")
    fn = "gemv_4bit_lora_native"
    for name, t in (("x", x), ("packed", packed)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor (got {type(t).__name__})")
    for name, t in (("lora_t", lora_t), ("lora_B", lora_B), ("bias", bias), ("out", out)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor or None (got {type(t).__name__})")
    if not hasattr(state, "shape") or not hasattr(state, "validate"):
        raise TypeError(f"{fn}: argument 'state' must be a qkernels.QuantState (got {type(state).__name__})")
    if x.dtype not in _DTYPE_TO_NATIVE:
        raise TypeError(f"{fn}: argument 'x' must be torch.float32, torch.float16 or torch.bfloat16 (got {x.dtype})")
    if x.dim() != 2:
        raise ValueError(f"{fn}: argument 'x' must be 2-D [M, K] (got shape {tuple(x.shape)})")
    if not x.is_contiguous():
        raise ValueError(f"{fn}: argument 'x' must be contiguous")
    state.validate(packed)  # ValueError naming the field on any inconsistency between state and packed
    if len(state.shape) != 2:
        raise ValueError(f"{fn}: argument 'state' must describe a 2-D weight [N, K] (got shape {tuple(state.shape)})")
    N, K = int(state.shape[0]), int(state.shape[1])
    M = int(x.shape[0])
    if x.shape[1] != K:
        raise ValueError(f"{fn}: argument 'x' has K = {x.shape[1]} but the quantized weight is [N, K] = [{N}, {K}]")
    if M <= 0:
        raise ValueError(f"{fn}: argument 'x' must have at least one row (got shape {tuple(x.shape)})")
    device = x.device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{fn}: argument 'x' is on unsupported device {device} (expected cpu or cuda)")
    if packed.device != device:
        raise ValueError(f"{fn}: argument 'packed' is on {packed.device} but 'x' is on {device}")
    if not packed.is_contiguous():
        raise ValueError(f"{fn}: argument 'packed' must be contiguous")
    raw = packed if packed.dtype == torch.uint8 else packed.reshape(-1).view(torch.uint8)

    if (lora_t is None) != (lora_B is None):
        raise ValueError(f"{fn}: arguments 'lora_t' and 'lora_B' must both be tensors or both be None")
    r = 0
    if lora_t is not None:
        if lora_t.dtype != torch.float32:
            raise TypeError(f"{fn}: argument 'lora_t' must be torch.float32 (got {lora_t.dtype})")
        if lora_t.dim() != 2 or lora_t.shape[0] != M:
            raise ValueError(f"{fn}: argument 'lora_t' must be [M, r] with M = {M} (got shape {tuple(lora_t.shape)})")
        r = int(lora_t.shape[1])
        if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
            raise ValueError(f"{fn}: argument 'lora_B' must be [N, r] = [{N}, {r}] (got shape {tuple(lora_B.shape)})")
        if not lora_B.dtype.is_floating_point:
            raise TypeError(f"{fn}: argument 'lora_B' must be a floating-point tensor (got {lora_B.dtype})")
        for name, t in (("lora_t", lora_t), ("lora_B", lora_B)):
            if t.device != device:
                raise ValueError(f"{fn}: argument '{name}' is on {t.device} but 'x' is on {device}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"{fn}: argument 'bias' must be [N] = [{N}] (got shape {tuple(bias.shape)})")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"{fn}: argument 'bias' must be a floating-point tensor (got {bias.dtype})")
        if bias.device != device:
            raise ValueError(f"{fn}: argument 'bias' is on {bias.device} but 'x' is on {device}")

    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=device)
    else:
        if out.dtype != x.dtype:
            raise TypeError(f"{fn}: argument 'out' must have x's dtype {x.dtype} (got {out.dtype})")
        if tuple(out.shape) != (M, N) or out.device != device or not out.is_contiguous():
            raise ValueError(f"{fn}: argument 'out' must be a contiguous [{M}, {N}] tensor on {device} "
                             f"(got shape {tuple(out.shape)} on {out.device})")

    scale_tensors = [("absmax", state.absmax), ("code", state.code)]
    if state.nested:
        scale_tensors += [("nested_absmax", state.state2.absmax), ("nested_code", state.state2.code)]
    for name, t in scale_tensors:
        if t.device != device:
            raise ValueError(f"{fn}: quant_state.{name} is on {t.device} but 'x' is on {device}")
    if device.type == "cpu" and not hasattr(_C, "gemv_4bit_lora_cpu"):
        raise RuntimeError(f"{fn}: qkernels._C has no gemv_4bit_lora_cpu (stale build?): rebuild the native module")
    if device.type == "cuda" and not hasattr(_C, "gemv_4bit_lora_cuda"):
        raise RuntimeError(f"{fn}: qkernels._C has no gemv_4bit_lora_cuda (built without CUDA, or a build "
                           "older than the CUDA GEMV): use the reference path or rebuild with QKERNELS_CUDA=1")
    if state.nested:
        s2 = state.state2
        nested = (s2.absmax, s2.code, state.offset, int(s2.blocksize))
    else:
        nested = (None, None, None, 256)
    return gemv_4bit_lora_raw(x, raw, state.absmax, state.code, int(state.blocksize), N, *nested, lora_t, lora_B,
                              bias, out)


def _scale_ptrs(absmax, nested_absmax, nested_code, offset):
    """The scale arguments of the native 4-bit kernels: ``(absmax_ptr, absmax_q_ptr, nested_absmax_ptr,
    nested_code_ptr, offset)`` (float32 absmax: its pointer first, the rest 0; double-quantized: absmax_ptr 0, the
    uint8 codes' pointer next, offset as an exact Python float), and the dense tensors those pointers read, which
    the caller keeps alive across the call."""
    absmax = absmax.contiguous()
    if nested_absmax is None:
        return (absmax.data_ptr(), 0, 0, 0, 0.0), (absmax, None, None)
    nested_absmax, nested_code = nested_absmax.contiguous(), nested_code.contiguous()
    ptrs = (0, absmax.data_ptr(), nested_absmax.data_ptr(), nested_code.data_ptr(), offset_value(offset))
    return ptrs, (absmax, nested_absmax, nested_code)


def gemv_4bit_lora_raw(x, raw, absmax, code, blocksize, N, nested_absmax, nested_code, offset, nested_blocksize,
                       lora_t, lora_B, bias, out=None, lora_A=None, lora_scale=1.0):
    """The kernel call of ``gemv_4bit_lora_native`` on already validated, flat arguments (no checks).

    For callers that have checked everything (``qkernels::linear_4bit``'s op checks, ``matmul_4bit_lora``): a
    decode step of a 4096 x 4096 weight is ~0.3 ms of kernel on the CPU machine, and the checks of
    ``gemv_4bit_lora_native`` cost ~30 us. ``x`` is ``[M, K]`` contiguous, ``raw`` the uint8 codes, ``lora_t``
    float32 ``[M, r]`` and ``lora_B [N, r]`` (both or neither), ``bias [N]`` of any float dtype; ``absmax`` is
    uint8 when ``nested_absmax`` is given, else float32. On the CPU ``lora_A`` (dense ``[r, K]``, float32 or
    bfloat16) may replace ``lora_t``: the binding computes ``lora_t = lora_scale * x @ lora_A^T`` itself with the CPU
    LoRA kernel (the same bits as ``lora_down_raw``), one call less per decode step.
    """
    M, K = x.shape
    device = x.device
    r = 0
    a_ptr, a_dt = 0, _DTYPE_TO_NATIVE[torch.float32]
    if lora_A is not None:
        r, a_ptr, a_dt = lora_A.shape[0], lora_A.data_ptr(), _DTYPE_TO_NATIVE[lora_A.dtype]
        lora_B = (lora_B if lora_B.dtype in (torch.float32, torch.bfloat16) else lora_B.to(torch.float32)).contiguous()
    # float32, or on the CPU bfloat16 too (the binding widens it, exactly: cheaper than torch's .to per call)
    kept = (torch.float32, torch.bfloat16) if device.type == "cpu" else (torch.float32,)
    if lora_t is not None:
        r = lora_t.shape[1]
        lora_t = lora_t.contiguous()
        lora_B = (lora_B if lora_B.dtype in kept else lora_B.to(torch.float32)).contiguous()  # no dispatch when dense
    if bias is not None:
        bias = (bias if bias.dtype in kept else bias.to(torch.float32)).contiguous()
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=device)
    code = code.contiguous()
    ptrs, (absmax, nested_absmax, nested_code) = _scale_ptrs(absmax, nested_absmax, nested_code, offset)
    args = (
        x.data_ptr(), _DTYPE_TO_NATIVE[x.dtype], M, K, raw.data_ptr(), *ptrs,
        int(nested_blocksize), code.data_ptr(), int(blocksize), N,
        lora_t.data_ptr() if lora_t is not None and r else 0, lora_B.data_ptr() if r else 0, r,
        bias.data_ptr() if bias is not None else 0, out.data_ptr(),
    )
    if device.type == "cpu":
        _C.gemv_4bit_lora_cpu(*args, _DTYPE_TO_NATIVE[lora_B.dtype] if r else _DTYPE_TO_NATIVE[torch.float32],
                              _DTYPE_TO_NATIVE[bias.dtype] if bias is not None else _DTYPE_TO_NATIVE[torch.float32],
                              a_ptr, a_dt, float(lora_scale))
    else:
        with torch.cuda.device(device):
            _C.gemv_4bit_lora_cuda(*args, torch.cuda.current_stream(device).cuda_stream)
    return out


def gemm_dx_raw(g, raw, scales, code, blocksize, K):
    """``g [M, N] @ W`` as a float32 ``[M, K]`` tensor by the CPU's fused kernel (``_C.gemm_dx_4bit_cpu``), or None
    where it does not apply (no such kernel in this build, K % 64 != 0, neither AVX-512 nor AVX2): the caller
    dequantizes and multiplies. No checks: ``g`` is contiguous of a float dtype on the CPU, ``raw`` the uint8 codes
    of W ``[N, K]``, ``scales`` ``(absmax, nested_absmax, nested_code, offset, nested_blocksize)`` as
    ``qkernels._linear`` passes them."""
    fn = getattr(_C, "gemm_dx_4bit_cpu", None)
    # the kernel's own conditions, asked before the output is allocated (a fresh [M, K] tensor per backward where it
    # then declines would be wasted page faults)
    if fn is None or K % 64 != 0 or _C.cpu_isa_active() not in ("avx512", "avx2"):
        return None
    M, N = g.shape
    absmax, nested_absmax, nested_code, offset, nested_blocksize = scales
    ptrs, (absmax, nested_absmax, nested_code) = _scale_ptrs(absmax, nested_absmax, nested_code, offset)
    code = code.contiguous()
    out = torch.empty((M, K), dtype=torch.float32)
    nbs = int(nested_blocksize) if nested_absmax is not None else 256  # unused without nested scales
    ran = fn(g.data_ptr(), _DTYPE_TO_NATIVE[g.dtype], M, N, raw.data_ptr(), *ptrs, nbs,
             code.data_ptr(), int(blocksize), K, out.data_ptr())
    return out if ran else None


# ------------------------------------------------------------------------------------------ CPU LoRA products
# The skinny products of a LoRA step (csrc/cpu/lora.h): X read once in its own dtype, float32 sums, an optional
# dropout mask applied on the fly. Callers: qkernels.lora and qkernels._linear (after their own checks).


def _lora_args(x: torch.Tensor, mask: torch.Tensor | None, fn: str) -> tuple[int, int]:
    """Checks shared by the LoRA wrappers: x a contiguous 2-D float CPU tensor, mask None or a bool tensor of x's
    shape. Returns (mask pointer or 0, native dtype)."""
    if _C is None or not hasattr(_C, "lora_down_cpu"):
        raise RuntimeError(f"{fn}: qkernels._C has no CPU LoRA kernels ({NATIVE_ERROR or 'stale build?'}): rebuild "
                           "the native module")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.device.type != "cpu" or x.dtype not in _DTYPE_TO_NATIVE:
        raise ValueError(f"{fn}: x must be a 2-D float32/float16/bfloat16 CPU tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not x.is_contiguous():
        raise ValueError(f"{fn}: x must be contiguous (pass x.contiguous())")
    if mask is None:
        return 0, _DTYPE_TO_NATIVE[x.dtype]
    if mask.dtype != torch.bool or mask.shape != x.shape or mask.device.type != "cpu" or not mask.is_contiguous():
        raise ValueError(f"{fn}: mask must be a contiguous bool CPU tensor of x's shape {tuple(x.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)} on {mask.device}")
    return mask.data_ptr(), _DTYPE_TO_NATIVE[x.dtype]


def _f32(t: torch.Tensor, name: str, shape: tuple[int, int], fn: str) -> torch.Tensor:
    """``t`` checked (``_check_shape``) and as a dense float32 tensor."""
    _check_shape(t, name, shape, fn)
    return (t if t.dtype == torch.float32 else t.to(torch.float32)).contiguous()


def _rows(A: torch.Tensor) -> tuple[torch.Tensor, bool, int]:
    """An ``[r, K]`` factor as the kernels take it: ``(tensor, transposed, native dtype)``. A dense float32 or bfloat16
    tensor, or a transposed view of a dense ``[K, r]`` one (``lora_B.t()``: ``transposed=True``), is passed as it is:
    the binding widens bfloat16 (exactly) and packs the rows, cheaper than torch's copies per call; anything else as
    a dense float32 copy."""
    if A.dtype in (torch.float32, torch.bfloat16):
        if A.is_contiguous():
            return A, False, _DTYPE_TO_NATIVE[A.dtype]
        if A.t().is_contiguous():
            return A, True, _DTYPE_TO_NATIVE[A.dtype]
    return A.to(torch.float32).contiguous(), False, _DTYPE_TO_NATIVE[torch.float32]


def lora_down_cpu(x: torch.Tensor, A: torch.Tensor, scale: float = 1.0, mask: torch.Tensor | None = None,
                  mask_scale: float = 1.0) -> torch.Tensor:
    """``scale * (x * mask * mask_scale) @ A^T`` as a float32 ``[M, r]`` tensor, on the CPU.

    Args:
        x: ``[M, K]`` float32 / float16 / bfloat16, contiguous (read in its dtype, converted exactly in registers).
        A: ``[r, K]`` float, used in float32: a bfloat16 A is read as it is and widened (exactly) by the kernel, a
            float16 one converted first.
        scale: multiplies the result.
        mask: None, or a bool ``[M, K]`` dropout mask (kept elements True); then x is multiplied by
            ``mask * mask_scale`` on the fly (``mask_scale = 1 / (1 - p)``).
        mask_scale: see mask.

    Returns:
        float32 ``[M, r]``.

    Raises:
        ValueError: a tensor of the wrong dtype, shape or device, or a non-contiguous x / mask.
        RuntimeError: this build has no CPU LoRA kernels.
    """
    fn = "lora_down_cpu"
    mask_ptr, dt = _lora_args(x, mask, fn)
    M, K = x.shape
    r = A.shape[0] if isinstance(A, torch.Tensor) and A.dim() == 2 else -1
    _check_shape(A, "A", (r, K), fn)
    return lora_down_raw(x, dt, mask_ptr, A, scale, mask_scale)


def lora_down_raw(x: torch.Tensor, dt: int, mask_ptr: int, A: torch.Tensor, scale: float, mask_scale: float):
    """``lora_down_cpu`` without its checks, for callers that validated the arguments (``qkernels.lora`` in a training
    step, where the checks were a measurable share of the per-layer glue): x dense 2-D of native dtype ``dt``,
    ``mask_ptr`` a bool mask's data_ptr or 0, A ``[r, K]`` float (a ``lora_B.t()`` view is read without a copy)."""
    M, K = x.shape
    A, transposed, a_dt = _rows(A)
    r = A.shape[0]
    t = torch.empty((M, r), dtype=torch.float32)
    _C.lora_down_cpu(x.data_ptr(), dt, M, K, mask_ptr, float(mask_scale), A.data_ptr(), r, float(scale), t.data_ptr(),
                     transposed, a_dt)
    return t


def _check_shape(t: torch.Tensor, name: str, shape: tuple[int, int], fn: str) -> None:
    """``t`` is a float CPU tensor of ``shape``, else ValueError naming it (no copy: the raw functions convert what
    needs it)."""
    ok = isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_floating_point()
    if not ok or tuple(t.shape) != shape:
        raise ValueError(f"{fn}: {name} must be a float CPU tensor of shape {shape}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


def lora_gram_cpu(u: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None,
                  mask_scale: float = 1.0) -> torch.Tensor:
    """``u^T @ (x * mask * mask_scale)`` as a float32 ``[r, K]`` tensor, on the CPU (sums over the M rows in float32,
    in blocks of 256 rows).

    Args:
        u: ``[M, r]`` float (used in float32).
        x: ``[M, K]`` float32 / float16 / bfloat16, contiguous.
        mask, mask_scale: as for ``lora_down_cpu``.

    Returns:
        float32 ``[r, K]``.

    Raises:
        ValueError: a tensor of the wrong dtype, shape or device, or a non-contiguous x / mask.
        RuntimeError: this build has no CPU LoRA kernels.
    """
    fn = "lora_gram_cpu"
    mask_ptr, dt = _lora_args(x, mask, fn)
    M, K = x.shape
    r = u.shape[1] if isinstance(u, torch.Tensor) and u.dim() == 2 else -1
    u = _f32(u, "u", (M, r), fn)
    return lora_gram_raw(u, x, dt, mask_ptr, mask_scale)


def lora_gram_raw(u: torch.Tensor, x: torch.Tensor, dt: int, mask_ptr: int, mask_scale: float,
                  out_scale: float = 1.0, transposed: bool = False) -> torch.Tensor:
    """``lora_gram_cpu`` without its checks (see ``lora_down_raw``): u dense float32 ``[M, r]``, x dense ``[M, K]``
    of native dtype ``dt``. ``out_scale * G`` (one float32 multiply per element, as torch's ``G * out_scale``),
    returned ``[r, K]``, or written ``[K, r]`` when ``transposed`` (dB's layout, without a transposing copy)."""
    M, K = x.shape
    r = u.shape[1]
    g = torch.empty((K, r) if transposed else (r, K), dtype=torch.float32)
    _C.lora_gram_cpu(u.data_ptr(), M, r, x.data_ptr(), dt, K, mask_ptr, float(mask_scale), g.data_ptr(),
                     float(out_scale), bool(transposed))
    return g


def lora_up_add_cpu(y: torch.Tensor, u: torch.Tensor, A: torch.Tensor, mask: torch.Tensor | None = None,
                    mask_scale: float = 1.0) -> torch.Tensor:
    """``y += (u @ A) * mask * mask_scale`` in place on the CPU: the product summed in float32, added to ``float(y)``
    and rounded once to y's dtype (nearest even).

    Args:
        y: ``[M, K]`` float32 / float16 / bfloat16, contiguous; updated in place.
        u: ``[M, r]`` and A: ``[r, K]``, float (used in float32; a bfloat16 A is widened, exactly, by the binding).
        mask, mask_scale: as for ``lora_down_cpu`` (mask has y's shape).

    Returns:
        y.

    Raises:
        ValueError: a tensor of the wrong dtype, shape or device, or a non-contiguous y / mask.
        RuntimeError: this build has no CPU LoRA kernels.
    """
    fn = "lora_up_add_cpu"
    mask_ptr, dt = _lora_args(y, mask, fn)
    M, K = y.shape
    r = u.shape[1] if isinstance(u, torch.Tensor) and u.dim() == 2 else -1
    u = _f32(u, "u", (M, r), fn)
    _check_shape(A, "A", (r, K), fn)
    return lora_up_add_raw(y, dt, u, A, mask_ptr, mask_scale)


def lora_up_add_raw(y: torch.Tensor, dt: int, u: torch.Tensor, A: torch.Tensor, mask_ptr: int,
                    mask_scale: float) -> torch.Tensor:
    """``lora_up_add_cpu`` without its checks (see ``lora_down_raw``): y dense ``[M, K]`` of native dtype ``dt``, u
    dense float32 ``[M, r]``, A ``[r, K]`` float (a ``lora_B.t()`` view is read without a copy)."""
    M, K = y.shape
    A, transposed, a_dt = _rows(A)
    _C.lora_up_add_cpu(y.data_ptr(), dt, M, K, u.data_ptr(), u.shape[1], A.data_ptr(), mask_ptr, float(mask_scale),
                       transposed, a_dt)
    return y
