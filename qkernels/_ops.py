"""The op registry: every ``qkernels::`` op's schema, argument checks and fake (meta) implementation, in one place.

The ops are ``torch.library`` custom ops, so ``torch.compile`` traces through them (fullgraph) and
``torch.library.opcheck`` can test them. Their real implementation dispatches per call through
``qkernels._backend.resolve`` (the ``QKERNELS_BACKEND`` environment variable forces a backend) to the
reference (pure PyTorch, any device) or the native kernels in ``qkernels._C``.

Ops (tensors flat unless stated):

- ``quantize_4bit(A, code[16], blocksize) -> (packed uint8 [(n+1)//2, 1], absmax float32 [nblocks])``
- ``dequantize_4bit(packed uint8, absmax, code[16], blocksize, shape, dtype, nested_absmax?, nested_code?, offset?,
  nested_blocksize) -> Tensor[shape] of dtype``; ``absmax`` is float32, or uint8 codes when ``nested_absmax`` is given
  (decoded inline as ``nested_code[q] * nested_absmax[i // nested_blocksize] + offset``).
- ``quantize_blockwise(A, code[256], blocksize) -> (codes uint8 [n], absmax float32 [nblocks])``
- ``dequantize_blockwise(q uint8 [n], absmax, code[256], blocksize) -> float32 [n]``
- ``linear_4bit`` / ``linear_4bit_dx``: the QLoRA matmul's big products (below, and ``qkernels._linear``).
- ``lora_down(x [M, K], A [r, K], scale, mask?, mask_scale) -> float32 [M, r]`` and
  ``lora_gram(u [M, r], x [M, K], mask?, mask_scale) -> float32 [r, K]``: the skinny LoRA products
  ``scale * dropout(x) @ A^T`` and ``u^T @ dropout(x)`` (``dropout(x) = x * mask * mask_scale``, mask bool): the CPU
  LoRA kernels (csrc/cpu/lora.h) where built, else torch matmuls in float32.
"""

from __future__ import annotations

import math

import torch

from . import _backend, _native, reference
from .quant_state import MAX_NESTED_BLOCKSIZE, valid_nested_blocksize

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_code(code: torch.Tensor, entries: int, like: torch.Tensor) -> None:
    torch._check(code.dtype == torch.float32, lambda: f"code must be float32, got {code.dtype}")
    torch._check(code.numel() == entries, lambda: f"code must have {entries} entries, got {code.numel()}")
    torch._check(code.device == like.device, lambda: f"code is on {code.device} but the data is on {like.device}")


def _format_int(v):
    """A format integer (blocksize, nested blocksize) with its value: a ``torch.SymInt`` becomes a Python int, anything
    else is returned for the checks to judge. Under ``torch.compile(dynamic=True)`` an int that reaches an op from a
    Python object (a QuantState held outside a module) is symbolic, and the power-of-two checks compared the symbol:
    "nested_blocksize must be a power of two from 1 to 4096, got s93". int() specializes it (dynamo guards on the
    value, so another blocksize recompiles, as it must: the kernels are chosen by it)."""
    return int(v) if isinstance(v, torch.SymInt) else v


def _check_blocksize(blocksize: int, lo: int = 32) -> None:
    blocksize = _format_int(blocksize)
    torch._check(
        lo <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0,
        lambda: f"blocksize must be a power of two in [{lo}, 4096], got {blocksize}",
    )


# ------------------------------------------------------------------------------------------------ quantize_4bit
@torch.library.custom_op("qkernels::quantize_4bit", mutates_args=())
def quantize_4bit(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization (docs/format.md §2-3). See the module docstring for shapes."""
    _check_quantize(A, code, blocksize, 16)
    return quantize_4bit_impl(A, code, blocksize, None)


def quantize_4bit_impl(A: torch.Tensor, code: torch.Tensor, blocksize: int, backend: str | None):
    """The op's body with an explicit backend (``None``: the fastest available; see ``_backend.resolve``)."""
    if _backend.resolve("quantize_4bit", A.device, backend) == "reference":
        return reference.quantize_4bit(A, code, blocksize)
    return _native.quantize_4bit_native(A, code, blocksize)


def _check_quantize(A: torch.Tensor, code: torch.Tensor, blocksize: int, entries: int) -> None:
    torch._check(A.dtype in _FLOATS, lambda: f"A must be float32, float16 or bfloat16, got {A.dtype}")
    torch._check(A.numel() > 0, lambda: "A is empty")
    _check_code(code, entries, A)
    _check_blocksize(blocksize, 32 if entries == 16 else 1)


@quantize_4bit.register_fake
def _(A, code, blocksize):
    _check_quantize(A, code, blocksize, 16)
    n = A.numel()
    packed = A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    return packed, A.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- dequantize_4bit
@torch.library.custom_op("qkernels::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """Decode packed 4-bit codes to ``shape`` / ``dtype`` (docs/format.md §4-5). See the module docstring."""
    _check_dequantize(
        packed, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, offset, nested_blocksize
    )
    return dequantize_4bit_impl(
        packed, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, offset, nested_blocksize, None
    )


def dequantize_4bit_impl(packed, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, offset,
                         nested_blocksize, backend: str | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The op's body with an explicit backend (``None``: the fastest available; see ``_backend.resolve``).

    With ``out`` (contiguous, ``shape``, ``dtype``) the result is written there and ``out`` is returned.
    """
    n = math.prod(shape)
    impl = _backend.resolve("dequantize_4bit", packed.device, backend)
    # The scales are one value per block (n / 64 at most): copying a strided view is cheap, and the native kernels
    # need them dense. The fused GEMV (qkernels._native.gemv_4bit_lora_raw) does the same, so decode and training
    # shapes accept the same states.
    absmax = absmax.contiguous()
    inline_nested = impl == "cpu" or (impl == "cuda" and "dequantize_4bit_nested" in _backend.native_ops(packed.device))
    if nested_absmax is not None and inline_nested:  # the native kernel decodes the nested scales inline
        nested = (absmax, nested_absmax, nested_code, offset, nested_blocksize)
        res = _native.dequantize_4bit_native(packed, absmax, code, n, blocksize, dtype, nested=nested, out=out)
        return res.reshape(shape)
    scales = absmax
    if nested_absmax is not None:
        scales = reference.decode_nested_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    if impl != "reference":
        return _native.dequantize_4bit_native(packed, scales, code, n, blocksize, dtype, out=out).reshape(shape)
    res = reference.dequantize_4bit(packed, scales, code, blocksize, n, dtype).reshape(shape)
    return res if out is None else out.copy_(res)


def _check_dequantize(packed, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, offset, nested_bs):
    blocksize, nested_bs = _format_int(blocksize), _format_int(nested_bs)
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8 (view other storage), got {packed.dtype}")
    # The native kernels read the bytes through a raw pointer: a strided view would be decoded as the wrong bytes.
    torch._check(packed.is_contiguous(), lambda: "packed must be contiguous (its bytes are read in order); pass "
                 "packed.contiguous()")
    torch._check(dtype in _FLOATS, lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}")
    _check_blocksize(blocksize)
    _check_code(code, 16, packed)
    torch._check(all(s >= 0 for s in shape), lambda: f"shape {shape} has a negative size")
    n = math.prod(shape)
    torch._check(n > 0, lambda: f"shape {shape} has no elements")
    torch._check(packed.numel() >= (n + 1) // 2, lambda: f"packed has {packed.numel()} bytes, {(n + 1) // 2} needed")
    nblocks = _ceil_div(n, blocksize)
    torch._check(absmax.numel() == nblocks, lambda: f"absmax must have {nblocks} entries, got {absmax.numel()}")
    torch._check(absmax.device == packed.device, lambda: f"absmax is on {absmax.device}, packed on {packed.device}")
    if nested_absmax is None:
        torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
        return
    torch._check(absmax.dtype == torch.uint8, lambda: f"absmax must be uint8 codes when nested, got {absmax.dtype}")
    torch._check(nested_code is not None and offset is not None, lambda: "nested_absmax needs nested_code and offset")
    _check_code(nested_code, 256, packed)
    # before the division below (0 raised ZeroDivisionError); a huge one made the reference decode allocate that many
    torch._check(valid_nested_blocksize(nested_bs),
                 lambda: f"nested_blocksize must be a power of two from 1 to {MAX_NESTED_BLOCKSIZE}, got {nested_bs}")
    n2 = _ceil_div(nblocks, nested_bs)
    torch._check(nested_absmax.numel() == n2, lambda: f"nested_absmax must have {n2} entries")
    torch._check(nested_absmax.dtype == torch.float32, lambda: "nested_absmax must be float32")
    torch._check(offset.numel() == 1, lambda: "offset must be a single float32 value")
    # the kernels read these through raw pointers (a meta nested_absmax was decoded as garbage)
    torch._check(nested_absmax.device == packed.device,
                 lambda: f"nested_absmax is on {nested_absmax.device}, packed on {packed.device}")
    torch._check(offset.device == packed.device, lambda: f"offset is on {offset.device}, packed on {packed.device}")


@dequantize_4bit.register_fake
def _(packed, absmax, code, blocksize, shape, dtype, nested_absmax=None, nested_code=None, offset=None,
      nested_blocksize=256):
    _check_dequantize(packed, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, offset,
                      nested_blocksize)
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("qkernels::dequantize_4bit_out", mutates_args=("out",))
def dequantize_4bit_out(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out: torch.Tensor,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> None:
    """``dequantize_4bit`` into a caller-provided contiguous ``out`` (its shape and dtype say what to produce).

    For a reused buffer (e.g. the dequantized weight of a QLoRA layer): no allocation, so no page faults.
    """
    _check_dequantize_out(packed, absmax, code, blocksize, out, nested_absmax, nested_code, offset, nested_blocksize)
    dequantize_4bit_impl(packed, absmax, code, blocksize, list(out.shape), out.dtype, nested_absmax, nested_code,
                         offset, nested_blocksize, None, out=out)


def _check_dequantize_out(packed, absmax, code, blocksize, out, nested_absmax, nested_code, offset, nested_bs):
    torch._check(out.is_contiguous(), lambda: "out must be contiguous")
    torch._check(out.device == packed.device, lambda: f"out is on {out.device}, packed on {packed.device}")
    _check_dequantize(packed, absmax, code, blocksize, list(out.shape), out.dtype, nested_absmax, nested_code, offset,
                      nested_bs)


@dequantize_4bit_out.register_fake
def _(packed, absmax, code, blocksize, out, nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256):
    _check_dequantize_out(packed, absmax, code, blocksize, out, nested_absmax, nested_code, offset, nested_blocksize)


# ---------------------------------------------------------------------------------- 8-bit blockwise (nested scales)
@torch.library.custom_op("qkernels::quantize_blockwise", mutates_args=())
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization against a 256-entry map (the nested-scale format)."""
    _check_quantize(A, code, blocksize, 256)
    return quantize_blockwise_impl(A, code, blocksize, None)


def quantize_blockwise_impl(A: torch.Tensor, code: torch.Tensor, blocksize: int, backend: str | None):
    """The op's body with an explicit backend (``None``: the fastest available; see ``_backend.resolve``)."""
    if _backend.resolve("quantize_blockwise", A.device, backend) == "reference":
        return reference.quantize_blockwise(A, code, blocksize)
    return _native.quantize_blockwise_native(A, code, blocksize)


@quantize_blockwise.register_fake
def _(A, code, blocksize):
    _check_quantize(A, code, blocksize, 256)
    n = A.numel()
    return A.new_empty((n,), dtype=torch.uint8), A.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)


@torch.library.custom_op("qkernels::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: float32 ``[n]``."""
    _check_dequantize_blockwise(q, absmax, code, blocksize)
    return dequantize_blockwise_impl(q, absmax, code, blocksize, None)


def dequantize_blockwise_impl(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                              backend: str | None) -> torch.Tensor:
    """The op's body with an explicit backend (``None``: the fastest available; see ``_backend.resolve``)."""
    if _backend.resolve("dequantize_blockwise", q.device, backend) == "reference":
        return reference.dequantize_blockwise(q, absmax, code, blocksize)
    return _native.dequantize_blockwise_native(q, absmax, code, blocksize)


def _check_dequantize_blockwise(q, absmax, code, blocksize):
    torch._check(q.dtype == torch.uint8, lambda: f"q must be uint8, got {q.dtype}")
    torch._check(q.numel() > 0, lambda: "q is empty")
    _check_blocksize(blocksize, 1)
    _check_code(code, 256, q)
    nb = _ceil_div(q.numel(), blocksize)
    torch._check(absmax.numel() == nb and absmax.dtype == torch.float32, lambda: f"absmax must be float32[{nb}]")
    torch._check(absmax.device == q.device, lambda: f"absmax is on {absmax.device} but q is on {q.device}")


@dequantize_blockwise.register_fake
def _(q, absmax, code, blocksize):
    _check_dequantize_blockwise(q, absmax, code, blocksize)
    return q.new_empty((q.numel(),), dtype=torch.float32)


# ------------------------------------------------------------------------- linear_4bit (the QLoRA matmuls)
# Forward:  y [M, N]  = x [M, K] @ W^T + lora_t [M, r] @ lora_B[N, r]^T + bias [N]
# Backward: dx [M, K] = g [M, N] @ W + (lora_u [M, r] @ lora_A [r, K]) * lora_mask [M, K]
# W = dequant(packed) of shape [N, K]; its scales are absmax (float32), or uint8 codes + nested_absmax/nested_code/
# offset. The LoRA terms are the caller's already-scaled skinny products (qkernels.lora computes them), so one op
# writes the M x N (or M x K) output once. Implementations: qkernels._linear (reference, cpu, cuda, triton).
def _check_linear_4bit(x, packed, absmax, code, blocksize, W_shape, nested_absmax, nested_code, offset, nested_bs,
                       lora, lora_mask=None, dx=False):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    torch._check(x.dtype in _FLOATS, lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(packed.device == x.device, lambda: f"packed is on {packed.device} but x is on {x.device}")
    _check_dequantize(packed, absmax, code, blocksize, W_shape, x.dtype, nested_absmax, nested_code, offset, nested_bs)
    lhs, rhs, bias = lora
    M = x.shape[0]
    if lhs is not None or rhs is not None:
        torch._check(lhs is not None and rhs is not None, lambda: "the two LoRA factors must be given together")
        torch._check(lhs.dim() == 2 and lhs.shape[0] == M,
                     lambda: f"LoRA left factor must be [{M}, r], got shape {tuple(lhs.shape)}")
        # the kernels read the right factor through a raw pointer with the left factor's r: a smaller one was read
        # past its end (linear_4bit: lora_B [N, r]; linear_4bit_dx: lora_A [r, K])
        r = lhs.shape[1]
        want = (r, W_shape[1]) if dx else (W_shape[0], r)
        torch._check(tuple(rhs.shape) == want,
                     lambda: f"LoRA right factor must be {list(want)} for a left factor [{M}, {r}], got shape "
                             f"{tuple(rhs.shape)}")
        torch._check(lhs.device == x.device and rhs.device == x.device, lambda: "LoRA factors must be on x's device")
        torch._check(lhs.dtype in _FLOATS and rhs.dtype in _FLOATS, lambda: "LoRA factors must be floating point")
    if bias is not None:
        torch._check(bias.shape == (W_shape[0],), lambda: f"bias must have shape [{W_shape[0]}]")
        torch._check(bias.is_floating_point(), lambda: f"bias must be a floating-point tensor, got {bias.dtype}")
        torch._check(bias.device == x.device, lambda: f"bias is on {bias.device} but x is on {x.device}")
    if lora_mask is not None:
        torch._check(lora_mask.dtype == torch.bool or lora_mask.dtype in _FLOATS,
                     lambda: f"lora_mask must be bool (scaled by lora_mask_scale) or float, got {lora_mask.dtype}")
        torch._check(lora_mask.shape == (M, W_shape[1]), lambda: f"lora_mask must have shape [{M}, {W_shape[1]}]")
        torch._check(lora_mask.device == x.device, lambda: "lora_mask must be on x's device")


@torch.library.custom_op("qkernels::linear_4bit", mutates_args=())
def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out_features: int,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    lora_t: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W)^T + lora_t @ lora_B^T + bias``; x ``[M, K]``, W ``[out_features, K]``: ``[M, N]`` of x.dtype."""
    W_shape = [out_features, x.shape[-1]]
    _check_linear_4bit(x, packed, absmax, code, blocksize, W_shape, nested_absmax, nested_code, offset,
                       nested_blocksize, (lora_t, lora_B, bias))
    from . import _linear

    scales = (absmax, nested_absmax, nested_code, offset, nested_blocksize)
    return _linear.linear_4bit_impl(x, packed, scales, code, blocksize, out_features, lora_t, lora_B, bias, None)


@linear_4bit.register_fake
def _(x, packed, absmax, code, blocksize, out_features, nested_absmax=None, nested_code=None, offset=None,
      nested_blocksize=256, lora_t=None, lora_B=None, bias=None):
    W_shape = [out_features, x.shape[-1]]
    _check_linear_4bit(x, packed, absmax, code, blocksize, W_shape, nested_absmax, nested_code, offset,
                       nested_blocksize, (lora_t, lora_B, bias))
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("qkernels::linear_4bit_dx", mutates_args=())
def linear_4bit_dx(
    grad_y: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    in_features: int,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    lora_u: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    lora_mask: torch.Tensor | None = None,
    lora_mask_scale: float = 1.0,
) -> torch.Tensor:
    """``grad_y @ dequant(W) + (lora_u @ lora_A) * lora_mask`` for grad_y ``[M, N]``: ``[M, in_features]``. A bool
    ``lora_mask`` is scaled by ``lora_mask_scale`` (``1 / (1 - p)``); a float one is used as it is."""
    W_shape = [grad_y.shape[-1], in_features]
    _check_linear_4bit(grad_y, packed, absmax, code, blocksize, W_shape, nested_absmax, nested_code, offset,
                       nested_blocksize, (lora_u, lora_A, None), lora_mask, dx=True)
    from . import _linear

    scales = (absmax, nested_absmax, nested_code, offset, nested_blocksize)
    return _linear.linear_4bit_dx_impl(grad_y, packed, scales, code, blocksize, in_features, lora_u, lora_A,
                                       lora_mask, None, lora_mask_scale)


@linear_4bit_dx.register_fake
def _(grad_y, packed, absmax, code, blocksize, in_features, nested_absmax=None, nested_code=None, offset=None,
      nested_blocksize=256, lora_u=None, lora_A=None, lora_mask=None, lora_mask_scale=1.0):
    W_shape = [grad_y.shape[-1], in_features]
    _check_linear_4bit(grad_y, packed, absmax, code, blocksize, W_shape, nested_absmax, nested_code, offset,
                       nested_blocksize, (lora_u, lora_A, None), lora_mask, dx=True)
    return grad_y.new_empty((grad_y.shape[0], in_features))


# The skinny LoRA products (qkernels.lora). One op each, so that eager and torch.compile run the same kernel and give
# the same bits; implementations in lora_down_impl / lora_gram_impl.
def _check_lora_operand(x, mask, name: str) -> None:
    torch._check(x.dim() == 2, lambda: f"{name} must be 2-D, got shape {tuple(x.shape)}")
    torch._check(x.dtype in _FLOATS, lambda: f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if mask is not None:
        torch._check(mask.dtype == torch.bool, lambda: f"mask must be a bool tensor, got {mask.dtype}")
        torch._check(mask.shape == x.shape, lambda: f"mask must have {name}'s shape {tuple(x.shape)}")
        torch._check(mask.device == x.device, lambda: f"mask is on {mask.device} but {name} is on {x.device}")


def _check_lora_factor(f, rows: int | None, cols: int | None, like, name: str) -> None:
    torch._check(f.dim() == 2, lambda: f"{name} must be 2-D, got shape {tuple(f.shape)}")
    torch._check(f.dtype in _FLOATS, lambda: f"{name} must be float32, float16 or bfloat16, got {f.dtype}")
    torch._check(f.device == like.device, lambda: f"{name} is on {f.device} but x is on {like.device}")
    if rows is not None:
        torch._check(f.shape[0] == rows, lambda: f"{name} must have {rows} rows, got shape {tuple(f.shape)}")
    if cols is not None:
        torch._check(f.shape[1] == cols, lambda: f"{name} must have {cols} columns, got shape {tuple(f.shape)}")


def native_lora(device: torch.device) -> bool:
    """Whether the CPU LoRA kernels run on ``device``: a CPU, with a build that has them (the one test of it)."""
    return device.type == "cpu" and "lora_products" in _backend.native_ops(device)


def _dropped(x: torch.Tensor, mask: torch.Tensor | None, mask_scale: float) -> torch.Tensor:
    """float32 ``x * mask * mask_scale`` (the fallback's dropout(x); the kernels apply the mask as they read x)."""
    xf = x.to(torch.float32)
    return xf if mask is None else xf * (mask.to(torch.float32) * mask_scale)


@torch.library.custom_op("qkernels::lora_down", mutates_args=())
def lora_down(x: torch.Tensor, A: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
              mask_scale: float = 1.0) -> torch.Tensor:
    """``scale * (x * mask * mask_scale) @ A^T``: float32 ``[M, r]`` for x ``[M, K]``, A ``[r, K]``."""
    _check_lora_operand(x, mask, "x")
    _check_lora_factor(A, None, x.shape[1], x, "A")
    return lora_down_impl(x, A, scale, mask, mask_scale)


def lora_down_impl(x, A, scale, mask, mask_scale):
    """Body of ``qkernels::lora_down`` (checked arguments): the CPU kernel where built, else a float32 matmul."""
    if native_lora(x.device):
        return _native.lora_down_cpu(x.contiguous(), A, scale, None if mask is None else mask.contiguous(),
                                     mask_scale)
    return (_dropped(x, mask, mask_scale) @ A.to(torch.float32).t()) * scale


@lora_down.register_fake
def _(x, A, scale, mask=None, mask_scale=1.0):
    _check_lora_operand(x, mask, "x")
    _check_lora_factor(A, None, x.shape[1], x, "A")
    return x.new_empty((x.shape[0], A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qkernels::lora_gram", mutates_args=())
def lora_gram(u: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None,
              mask_scale: float = 1.0) -> torch.Tensor:
    """``u^T @ (x * mask * mask_scale)``: float32 ``[r, K]`` for u ``[M, r]``, x ``[M, K]``."""
    _check_lora_operand(x, mask, "x")
    _check_lora_factor(u, x.shape[0], None, x, "u")
    return lora_gram_impl(u, x, mask, mask_scale)


def lora_gram_impl(u, x, mask, mask_scale):
    """Body of ``qkernels::lora_gram`` (checked arguments): the CPU kernel where built, else a float32 matmul."""
    if native_lora(x.device):
        return _native.lora_gram_cpu(u, x.contiguous(), None if mask is None else mask.contiguous(), mask_scale)
    return u.to(torch.float32).t() @ _dropped(x, mask, mask_scale)


@lora_gram.register_fake
def _(u, x, mask=None, mask_scale=1.0):
    _check_lora_operand(x, mask, "x")
    _check_lora_factor(u, x.shape[0], None, x, "u")
    return x.new_empty((u.shape[1], x.shape[1]), dtype=torch.float32)
