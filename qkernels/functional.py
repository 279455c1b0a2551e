"""Public quantization API, mirroring bitsandbytes' names so migrating is a rename.

``quantize_4bit`` / ``dequantize_4bit`` validate their arguments (clear ``TypeError``/``ValueError``
naming the argument), then run the backend chosen by ``qkernels._backend.resolve``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import _ops
from .codebooks import dynamic_map, get_codebook
from .quant_state import FLOAT_DTYPES, NESTED_BLOCKSIZE, STORAGE_DTYPES, QuantState, check_blocksize

__all__ = [
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "bits_per_parameter",
]


def _check_float_tensor(A: object, name: str) -> torch.Tensor:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got {A.dtype}; "
            f"convert it first (e.g. {name}.float()) — integer, bool, complex and float64 tensors are not quantized"
        )
    if A.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(A.shape)}): there is nothing to quantize")
    if A.device.type == "meta":  # was "Tensor.item() cannot be called on meta tensors" from the NaN check
        raise ValueError(f"{name} is on the meta device: it has no values to quantize. Load or materialize the weights "
                         "first (e.g. model.to_empty(device=...) and load the checkpoint), then quantize")
    return A


def _check_traceable(backend: str | None, fn: str) -> None:
    """A forced native backend under torch.jit.trace: the kernels write through raw pointers, which the tracer does not
    record (it kept the output's bare ``aten::empty``: a traced function returned uninitialized memory). Refuse."""
    if backend not in (None, "reference") and torch.jit.is_tracing():
        raise ValueError(f"{fn}: backend={backend!r} cannot be traced by torch.jit.trace (it records torch ops only, "
                         "and a forced native backend calls the kernel directly): pass backend=None (the registered "
                         "op) or backend='reference'")


_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__


def _op_call(backend: str | None, *tensors: torch.Tensor | None) -> bool:
    """Whether a public function calls its registered op rather than the op's body (no forced backend only).

    Eager calls on plain tensors skip the op's dispatch and its ``torch._check`` calls (40-60 us per call here; the
    public functions make the same checks before). The op is called where something must see it: torch.compile and
    torch.jit.trace (one graph node; the kernels write through raw pointers, which a tracer records as the bare
    allocation of the output), a dispatch mode (``make_fx``, ``FakeTensorMode``, ``FlopCounterMode``: the kernels
    ran on fake tensors' missing storage), a functorch transform (``vmap``), and a tensor subclass with its own
    ``__torch_dispatch__`` among ``tensors`` (DTensor, FakeTensor: no storage of their own)."""
    if backend is not None:
        return False
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or is_in_torch_dispatch_mode()
            or torch._C._are_functorch_transforms_active()
            or any(t is not None and type(t).__torch_dispatch__ is not _PLAIN_DISPATCH for t in tensors))


def _as_int(value: object) -> object:
    """A NumPy integer (e.g. a blocksize read from a config with NumPy) as a Python int; anything else unchanged,
    for the caller's check to accept or refuse. ``True`` stays a bool: it is not a blocksize."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


# torch's CPU reductions run on one thread up to this many elements (at::internal::GRAIN_SIZE); past it the
# float32 sum is split by thread and its last bit depends on the thread count (measured from 131072 blocks).
_SERIAL_REDUCTION_MAX = 32768


def _serial_mean(absmax: torch.Tensor) -> torch.Tensor:
    """``absmax.mean()`` in float32 as torch computes it on one thread: the nested-scale offset.

    bitsandbytes takes ``absmax.mean()`` at whatever thread count is set, so its offset (and from it every nested
    code and decoded value) of a tensor over ~131k blocks (8M parameters at blocksize 64) can differ in the last bit
    between machines with different core counts. Here a CPU tensor's is the one-thread value: the same checkpoint
    from any CPU, equal to bitsandbytes run with one thread (docs/format.md §7.9). ~0.04 ms at 700k blocks. A CUDA
    tensor's is torch's CUDA mean (bitsandbytes' on CUDA), which can differ from the CPU's in the last bit.
    """
    threads = torch.get_num_threads()
    if (absmax.device.type != "cpu" or absmax.numel() <= _SERIAL_REDUCTION_MAX or threads == 1
            or torch.compiler.is_compiling()):
        return absmax.mean()
    torch.set_num_threads(1)
    try:
        return absmax.mean()
    finally:
        torch.set_num_threads(threads)


def _raise_non_finite(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, name: str) -> None:
    bad = int(torch.nonzero(~torch.isfinite(absmax))[0, 0])
    raise ValueError(
        f"{name} contains NaN or inf (first in block {bad}, elements [{bad * blocksize}, "
        f"{min((bad + 1) * blocksize, A.numel())}) of the flattened tensor); a non-finite value would corrupt its "
        f"whole block. Clean it first, e.g. torch.nan_to_num({name})"
    )


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` blockwise to 4 bits in bitsandbytes' format: ``(packed, quant_state)``.

    Args:
        A: float32/float16/bfloat16 tensor of any shape; flattened row-major into blocks of ``blocksize``
            (the last block may be partial). Must be finite (NaN/inf raise ValueError).
        blocksize: 32, 64, 128, ..., 4096.
        quant_type: ``"nf4"`` (NormalFloat, for normally distributed weights) or ``"fp4"``.
        double_quant: store the per-block absmax as uint8 codes of the signed dynamic map, in nested blocks
            of 256 with a float32 scale each and a float32 offset (their mean): 4.127 instead of 4.5
            bits/parameter at blocksize 64. bitsandbytes calls this ``compress_statistics``.
        quant_storage: dtype of the returned packed tensor: uint8, or bf16/fp16/fp32 reinterpreting the same
            bytes (for FSDP, which needs a float dtype). The byte count is padded with zeros to a multiple
            of the storage element size.
        backend: force ``"reference"`` (see ``qkernels._backend``); ``None`` picks the fastest.

    Returns:
        packed: ``[ceil(ceil(n / 2) / itemsize), 1]`` of ``quant_storage``; byte ``j`` holds element ``2j``
            in its high nibble and ``2j + 1`` in its low nibble.
        quant_state: ``QuantState`` with shape, dtype, blocksize, codebook and (nested) absmax.
    """
    A = _check_float_tensor(A, "A")
    blocksize = check_blocksize(_as_int(blocksize))
    code = get_codebook(quant_type, A.device)  # raises ValueError for an unknown quant_type
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES}, got {quant_storage!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    # Traced: through the registered ops, so torch.compile sees one node each; eager: their bodies directly (the ops'
    # checks are the ones made above, and the nested call's arguments are built here), as dequantize_4bit does: the
    # two ops' dispatch and torch._check calls cost ~45 us per call here (64 x 64 bf16, double quant: 54 -> 28 us).
    _check_traceable(backend, "quantize_4bit")
    traced = _op_call(backend, A)
    if traced:
        packed, absmax = torch.ops.qkernels.quantize_4bit(A, code, blocksize)
    else:
        packed, absmax = _ops.quantize_4bit_impl(A, code, blocksize, backend)
    # absmax >= 0 and max() propagates NaN, so one reduction tells whether any block held NaN/inf (4x cheaper than
    # isfinite(absmax).all(), which materializes a bool tensor: 0.26 ms of a 2.3 ms 4096 x 4096 quantize here).
    if not math.isfinite(absmax.max().item()):
        _raise_non_finite(A, absmax, blocksize, "A")
    if quant_storage != torch.uint8:
        raw = packed.reshape(-1)
        itemsize = torch.empty((), dtype=quant_storage).element_size()
        pad = -raw.numel() % itemsize
        if pad:
            raw = torch.cat([raw, raw.new_zeros(pad)])
        packed = raw.view(quant_storage).unsqueeze(1)

    state = QuantState(
        absmax=absmax, shape=A.shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=A.dtype
    )
    if double_quant:
        offset = _serial_mean(absmax)
        centered, dyn = absmax - offset, dynamic_map(A.device)
        if traced:
            qabsmax, nested_absmax = torch.ops.qkernels.quantize_blockwise(centered, dyn, NESTED_BLOCKSIZE)
        else:  # a forced "reference" applies to the nested scales too; other backends pick the fastest for them
            nested_backend = "reference" if backend == "reference" else None
            qabsmax, nested_absmax = _ops.quantize_blockwise_impl(centered, dyn, NESTED_BLOCKSIZE, nested_backend)
        state.absmax = qabsmax
        state.offset = offset
        state.state2 = QuantState(
            absmax=nested_absmax, code=dynamic_map(A.device), blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
        )
    return packed, state


def dequantize_4bit(
    packed: torch.Tensor,
    quant_state: QuantState,
    dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode a packed 4-bit tensor: ``code[nibble] * absmax`` in float32, rounded once to ``dtype``.

    Args:
        packed: the packed codes from ``quantize_4bit`` (uint8, or a bf16/fp16/fp32 ``quant_storage`` view of
            the same bytes), on the same device as ``quant_state``.
        quant_state: its ``QuantState`` (nested absmax are decoded as ``dyn[q] * nested_absmax + offset``).
        dtype: output dtype, float32/float16/bfloat16; default ``quant_state.dtype`` (or ``out.dtype``).
        out: optional contiguous tensor of ``quant_state.shape`` to write into (a reused buffer: no allocation).
        backend: force ``"reference"``, ``"cpu"`` or ``"cuda"``; ``None`` picks the fastest.

    Returns:
        Tensor of ``quant_state.shape`` and ``dtype`` on ``packed``'s device (``out`` itself when given).

    Raises:
        TypeError: ``quant_state`` is not a ``QuantState``, ``packed`` is not a tensor of a storage dtype, or
            ``dtype`` is not float32/float16/bfloat16 (or differs from ``out.dtype``).
        ValueError: the state does not fit ``packed`` (size, device, corrupted fields: named), ``packed`` is not
            contiguous, ``out`` has the wrong shape or device or requires grad; ``backend`` unknown or unavailable.
    """
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a qkernels.QuantState, got {type(quant_state).__name__}")
    quant_state.validate(packed)
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != quant_state.shape or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous tensor of shape {tuple(quant_state.shape)}")
        if out.requires_grad and torch.is_grad_enabled():  # as torch's own out= functions refuse it
            raise ValueError("out requires grad, but dequantize_4bit writes it in place outside autograd; pass a "
                             "buffer that does not require grad, or call it under torch.no_grad()")
        if dtype is not None and dtype != out.dtype:
            raise TypeError(f"dtype {dtype} does not match out.dtype {out.dtype}")
        dtype = out.dtype
    dtype = quant_state.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES and not (dtype == torch.float64 and backend == "reference"):
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if not packed.is_contiguous():
        raise ValueError("packed must be contiguous (its bytes are read in order); pass packed.contiguous()")
    raw = packed if packed.dtype == torch.uint8 else packed.reshape(-1).view(torch.uint8)
    qs = quant_state
    no_nesting = (None, None, None, NESTED_BLOCKSIZE)
    nested = (qs.state2.absmax, qs.state2.code, qs.offset, qs.state2.blocksize) if qs.nested else no_nesting
    args = (raw, qs.absmax, qs.code, qs.blocksize, list(qs.shape), dtype, *nested)
    # Traced (torch.compile, torch.jit.trace): through the registered op, so the graph holds one node. Eager: the op's
    # body directly; every check the op makes (_ops._check_dequantize) was made above by validate() and this
    # function. The op's dispatch and torch._check calls cost ~40-60 us per call here, 15x the kernel of a 64 x 64
    # weight and 3x that of a 1024 x 1024 one (bf16 into out=: 64 x 64 66 -> 14 us, 1024 x 1024 87 -> 38 us).
    _check_traceable(backend, "dequantize_4bit")
    traced = _op_call(backend, raw, qs.absmax, out)
    if out is not None:
        if out.device != raw.device:
            raise ValueError(f"out is on {out.device} but packed is on {raw.device}")
        if traced:
            torch.ops.qkernels.dequantize_4bit_out(raw, qs.absmax, qs.code, qs.blocksize, out, *nested)
            return out
        _ops.dequantize_4bit_impl(*args, backend, out=out)  # returns a reshaped view of out, not out itself
        # as the op's mutation would: a graph that saved out (W = dequantize_4bit(..., out=buf) used in a matmul,
        # then buf refilled) must raise on backward instead of computing gradients from the new values
        torch.autograd.graph.increment_version(out)
        return out
    if traced:
        return torch.ops.qkernels.dequantize_4bit(*args)
    return _ops.dequantize_4bit_impl(*args, backend)


def _check_blockwise_blocksize(blocksize: object) -> int:
    blocksize = _as_int(blocksize)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 0 < blocksize <= 4096 \
            or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two from 1 to 4096, got {blocksize!r}")
    return blocksize


def _check_code256(code: object, device: torch.device) -> torch.Tensor:
    if not isinstance(code, torch.Tensor) or code.numel() != 256 or not code.is_floating_point():
        raise ValueError("code must be a float tensor of 256 entries (e.g. qkernels.codebooks.dynamic_map())")
    return code.reshape(-1).to(device, torch.float32)


def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE, *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization (the nested-scale format): ``(codes uint8 [n], absmax float32 [nblocks])``.

    Args:
        A: float32 / float16 / bfloat16 tensor, any shape (quantized as float32, flattened in order).
        code: a 256-entry float map, sorted or not; default the signed dynamic map (bitsandbytes'
            ``create_dynamic_map``).
        blocksize: a power of two from 1 to 4096 (bitsandbytes uses 256 for the nested scales).
        backend: force ``"reference"``, ``"cpu"`` or ``"cuda"``; ``None`` picks the fastest.

    Returns:
        ``(codes, absmax)``: codes uint8 of ``A``'s shape, absmax float32 ``[ceil(n / blocksize)]``.
        NaN or inf in ``A`` is an error naming the first bad block.
    """
    A = _check_float_tensor(A, "A")
    code = _check_code256(dynamic_map(A.device) if code is None else code, A.device)
    blocksize = _check_blockwise_blocksize(blocksize)
    _check_traceable(backend, "quantize_blockwise")
    if _op_call(backend, A):  # traced: through the registered op (eager: its body, as quantize_4bit)
        q, absmax = torch.ops.qkernels.quantize_blockwise(A, code, blocksize)
    else:
        q, absmax = _ops.quantize_blockwise_impl(A, code, blocksize, backend)
    if not bool(torch.isfinite(absmax).all()):
        _raise_non_finite(A, absmax, blocksize, "A")
    return q.reshape(A.shape), absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE, *,
    backend: str | None = None,
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: ``code[q[i]] * absmax[i // blocksize]``, float32 of ``q``'s shape.

    Args:
        q: uint8 codes, any shape (read flattened, in order).
        absmax: float32 (or float16 / bfloat16, converted exactly) scales, ``ceil(q.numel() / blocksize)`` of them,
            on ``q``'s device.
        code: the 256-entry map the codes index; default the signed dynamic map.
        blocksize: the blocksize ``q`` was quantized with (a power of two from 1 to 4096).
        backend: force ``"reference"``, ``"cpu"`` or ``"cuda"``; ``None`` picks the fastest.

    Returns:
        float32 tensor of ``q``'s shape.

    Raises:
        TypeError: ``q`` is not a uint8 tensor. ValueError: ``q`` is empty, a bad ``blocksize``, ``absmax`` of the
            wrong size, dtype or device, or ``code`` not 256 float entries.
    """
    if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8:
        raise TypeError(f"q must be a uint8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if q.numel() == 0:
        raise ValueError(f"q is empty (shape {tuple(q.shape)}): there is nothing to dequantize")
    blocksize = _check_blockwise_blocksize(blocksize)
    nblocks = -(-q.numel() // blocksize)
    if not isinstance(absmax, torch.Tensor) or absmax.numel() != nblocks or absmax.dtype not in FLOAT_DTYPES:
        raise ValueError(f"absmax must hold {nblocks} float32 scales for {q.numel()} codes at blocksize {blocksize}"
                         f" (got {getattr(absmax, 'dtype', type(absmax).__name__)} with "
                         f"{getattr(absmax, 'numel', lambda: '?')()} elements)")
    if absmax.device != q.device:
        raise ValueError(f"absmax is on {absmax.device} but q is on {q.device}; move one of them")
    absmax = absmax.reshape(-1).to(torch.float32)
    code = _check_code256(dynamic_map(q.device) if code is None else code, q.device)
    _check_traceable(backend, "dequantize_blockwise")
    if _op_call(backend, q, absmax):  # traced: through the registered op (eager: its body, as dequantize_4bit)
        out = torch.ops.qkernels.dequantize_blockwise(q, absmax, code, blocksize)
    else:
        out = _ops.dequantize_blockwise_impl(q, absmax, code, blocksize, backend)
    return out.reshape(q.shape)


def bits_per_parameter(packed: torch.Tensor, quant_state: QuantState) -> float:
    """Returns the storage cost per parameter as a float: (packed bytes + scale bytes) * 8 / numel.

    ``packed`` and ``quant_state``: ``quantize_4bit``'s results. Codebooks (64 bytes, plus 1 KiB for the nested
    map) are shared constants and not counted. 4.127 at blocksize 64 with double quantization, 4.5 without.

    Raises TypeError if ``quant_state`` is not a ``QuantState``; ValueError if it does not fit ``packed``.
    """
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a qkernels.QuantState, got {type(quant_state).__name__}")
    quant_state.validate(packed)
    return (packed.numel() * packed.element_size() + quant_state.nbytes()) * 8 / quant_state.numel
