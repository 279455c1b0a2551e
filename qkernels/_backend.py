"""Backend selection: which implementation of an op runs for a given device.

Names: ``reference`` (pure PyTorch, any device), ``cpu`` (C++ in ``qkernels._C``), ``cuda`` (CUDA C++ in
``qkernels._C``), ``triton``. ``backend=None`` picks the fastest available for the device; the
``QKERNELS_BACKEND`` environment variable (read at each call) or an explicit ``backend=`` argument forces
one, so tests and benchmarks can compare them. Forcing a backend that cannot run the op is an error,
never a silent fallback.
"""

from __future__ import annotations

import logging
import os

import torch

from . import _native

BACKENDS = ("reference", "cpu", "cuda", "triton")
# The QLoRA matmul ops: their native path is "native dequantize + BLAS" (plus the fused GEMV where built), so they
# are native wherever the dequantize kernel is.
_LINEAR_OPS = ("linear_4bit", "linear_4bit_dx")
TRITON_OPS = _LINEAR_OPS


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device`` here, and why not."""
    try:
        from . import triton_kernels
    except ImportError as exc:  # triton not installed
        return False, f"Triton is not importable ({exc})"
    if triton_kernels.triton_available(device):
        return True, ""
    why = triton_kernels.interpreter_unusable_reason() if triton_kernels._interpret_env() else None
    if device.type != "cuda" and why is not None:
        return False, f"Triton cannot run on {device.type} here: {why}"
    return False, f"Triton cannot run on {device.type} here (a CUDA device, or TRITON_INTERPRET=1 on the CPU)"


# device type -> (the qkernels._C module the answer is for, its ops): a test may swap the module
_native_ops_cache: dict[str, tuple[object, frozenset[str]]] = {}
logger = logging.getLogger(__name__)


def cuda_unusable_reason() -> str | None:
    """Why the CUDA kernels of ``qkernels._C`` cannot run in this process although it was built with them, or None.

    ``_C`` links its own (static) CUDA runtime, of the toolkit it was built with. A driver older than that toolkit's
    major version (e.g. a wheel built with CUDA 13 on a CUDA 12.x driver, where torch's own runtime still works) makes
    that runtime see no device: every launch would then fail with cudaErrorInsufficientDriver. The ops fall back to
    the reference path instead, and say why. None as well where torch sees no GPU either (no CUDA tensor exists there:
    the CUDA ops stay registered, as on a GPU machine).
    """
    info = _native.native_info()
    if not info.get("cuda_compiled", False) or info.get("cuda_device_count", 0) > 0:
        return None
    if torch.cuda.device_count() == 0:  # no GPU at all (a CPU machine with a CUDA build): nothing to fall back from
        return None
    return (f"qkernels._C's CUDA runtime sees no GPU while torch sees {torch.cuda.device_count()} (a driver older "
            "than the CUDA toolkit _C was built with? rebuild it with the CUDA version torch uses, "
            f"{torch.version.cuda})")


def native_ops(device: torch.device) -> frozenset[str]:
    """Names of the native ops ``qkernels._C`` can run on ``device`` in this build.

    Cached per device type and loaded module (it is asked on every op call; for CUDA it reads ``native_info()``).
    The module is compared with ``is``, not keyed by ``id()``: torch.compile traces this function, and Dynamo in
    torch 2.11 cannot trace ``id()`` of a module (a graph break, an error under ``fullgraph=True``)."""
    entry = _native_ops_cache.get(device.type)
    if entry is None or entry[0] is not _native._C:
        entry = _native_ops_cache[device.type] = (_native._C, frozenset(_native_ops(device)))
    return entry[1]


def _native_ops(device: torch.device) -> set[str]:
    if not _native.native_available():
        return set()
    if device.type == "cpu":
        ops = {"dequantize_4bit", *_LINEAR_OPS}
        if hasattr(_native._C, "gemv_4bit_lora_cpu") and hasattr(_native, "gemv_4bit_lora_native"):
            ops.add("gemv_4bit_lora")
        if hasattr(_native._C, "quantize_4bit_cpu"):
            ops.add("quantize_4bit")
        if hasattr(_native._C, "quantize_blockwise_cpu"):
            ops.add("quantize_blockwise")
        if hasattr(_native._C, "dequantize_blockwise_cpu"):
            ops.add("dequantize_blockwise")
        if hasattr(_native._C, "lora_down_cpu"):
            ops.add("lora_products")  # the skinny LoRA products of qkernels.lora (csrc/cpu/lora.h)
        return ops
    if device.type == "cuda" and _native.native_info().get("cuda_compiled", False):
        why = cuda_unusable_reason()
        if why is not None:
            logger.warning("qkernels: CUDA kernels disabled, using the reference path: %s", why)
            return set()
        ops = {"dequantize_4bit", *_LINEAR_OPS}
        if hasattr(_native._C, "gemv_4bit_lora_cuda") and hasattr(_native, "gemv_4bit_lora_native"):
            ops.add("gemv_4bit_lora")
        if hasattr(_native._C, "quantize_4bit_cuda"):
            ops.add("quantize_4bit")
        if hasattr(_native._C, "quantize_blockwise_cuda"):
            ops.add("quantize_blockwise")
        if hasattr(_native._C, "dequantize_blockwise_cuda"):
            ops.add("dequantize_blockwise")
        if hasattr(_native._C, "dequantize_4bit_nested_cuda"):
            ops.add("dequantize_4bit_nested")  # nested scales decoded inside the dequantize launch
        return ops
    return set()


def resolve(op: str, device: torch.device, backend: str | None) -> str:
    """The backend that runs ``op`` on ``device``: the forced one if valid, else the fastest available."""
    forced = backend if backend is not None else os.environ.get("QKERNELS_BACKEND") or None
    native = native_ops(device)
    if forced is None:
        if device.type in ("cpu", "cuda") and op in native:
            return device.type
        return "reference"
    if forced not in BACKENDS:
        if backend is None:  # it came from the environment: say so, or the user hunts for a backend= they never passed
            raise ValueError(f"the environment variable QKERNELS_BACKEND must be one of {BACKENDS} (or unset), got "
                             f"{forced!r}")
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {forced!r}")
    if forced == "reference":
        return forced
    if forced in ("cpu", "cuda"):
        if device.type != forced:
            raise ValueError(f"backend {forced!r} cannot run on {device.type} tensors; use backend=None or 'reference'")
        if op not in native:
            why = (device.type == "cuda" and cuda_unusable_reason()) or _native.native_info().get(
                "reason", "this build has no native implementation of it")
            raise ValueError(f"backend {forced!r} cannot run {op}: {why}; use backend='reference'")
        return forced
    if op not in TRITON_OPS:
        raise ValueError(f"backend 'triton' has no {op} implementation; use backend='reference' or None")
    ok, why = triton_usable(device)
    if not ok:
        raise ValueError(f"backend 'triton' cannot run {op}: {why}; use backend='reference' or None")
    return forced
