"""The QLoRA matmul: ``Y = X @ dequant(W)^T + s * (dropout(X) @ A^T) @ B^T + bias``, forward and backward.

Layers (STYLE 3): ``qkernels::linear_4bit`` / ``linear_4bit_dx`` ops (``qkernels._ops``, implementations in
``qkernels._linear``) → ``QLoRAFunction`` (this file) → ``matmul_4bit_lora`` (this file) → ``QLoRALinear``.

What the Function saves for backward: the PACKED weight and its scales (never a dequantized copy: W is decoded
again in backward), X (with LoRA; ``dropout(X)``, which the LoRA-A gradient needs, is rebuilt from X and the mask),
the dropout mask as bool, and ``T = dropout(X) A^T`` (``[M, r]``, the LoRA-B gradient needs it). Gradients
(DESIGN §2), with ``Xd = dropout(X)``, ``u = s * (dY B)``:

- ``dX = dY @ W + (u @ A) * mask / (1 - p)``   (one ``linear_4bit_dx`` call: W decoded once, LoRA in the epilogue)
- ``dA = u^T @ Xd``,   ``dB = s * dY^T @ T``,   ``dbias = sum(dY)``;   no gradient for W.

A double backward (``create_graph=True``) is supported: the backward then uses differentiable torch ops only (T
recomputed with its graph, W decoded into a fresh tensor that autograd keeps), so it costs a dequantized weight.

The LoRA products: on the native CPU path, the CPU LoRA kernels (``qkernels::lora_down`` / ``lora_gram`` ops and
the up-add of ``qkernels._linear``, csrc/cpu/lora.h) read x and dY once in their own dtype and multiply and sum in
float32 whatever the adapters' dtype, applying the dropout mask as they read x (dropout(x) is never built; T is
float32). Elsewhere they are torch matmuls in the LoRA weights' dtype when it is wider than x's (peft keeps adapters
in float32 on a bf16 base and casts x up: so do we), else in x's dtype; on a CPU without a fast GEMM for that half
dtype, in float32 (``_lora_dtype``).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import _backend, _native, _ops  # _ops registers the qkernels:: ops
from . import _linear as _linear_mod
from ._linear import _as as _to  # t.to(dtype) without the dispatch when t already has it
from .quant_state import QuantState
from .reference import lora_scaling

__all__ = ["QLoRAFunction", "matmul_4bit_lora", "lora_scaling"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _lora_dtype(x_dtype: torch.dtype, lora_dtype: torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """The dtype of the skinny LoRA products: the wider of x's and the adapters' (peft keeps adapters in float32 and
    casts x up). On a CPU without a GEMM for a half dtype (qkernels._linear.cpu_matmul_dtype) float32: torch's CPU
    float16 ``u @ A`` of the backward took ~56 ms at 512 x 16 x 4096 on the Zen 4 machine, float32 ~2 ms."""
    dt = torch.promote_types(x_dtype, lora_dtype)
    if device is not None and device.type == "cpu":
        from . import _linear

        return _linear.cpu_matmul_dtype(dt)
    return dt


class QLoRAFunction(torch.autograd.Function):
    """Autograd for ``matmul_4bit_lora`` on 2-D ``x [M, K]``. Use ``matmul_4bit_lora`` (it checks and reshapes).

    ``forward(ctx, x, packed, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, bias,
    blocksize, nested_blocksize, out_features, scaling, dropout_p, training, backend)``: ``packed`` is the uint8
    view of the weight bytes; ``absmax`` float32 scales, or uint8 codes with ``nested_absmax`` / ``nested_code`` /
    ``offset``; ``lora_A [r, K]`` / ``lora_B [N, r]`` or both None; ``bias [N]`` or None.
    """

    @staticmethod
    def forward(ctx, x, packed, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, bias,
                blocksize: int, nested_blocksize: int, out_features: int, scaling: float, dropout_p: float,
                training: bool, backend: str | None):
        scales = (absmax, nested_absmax, nested_code, offset, nested_blocksize)
        y, _, mask, t = _forward(x, packed, scales, code, blocksize, out_features, lora_A, lora_B, bias, scaling,
                                 dropout_p, training, backend)
        # dropout(x) is rebuilt in backward from x and the bool mask (the same expression, so the same bits): x is
        # usually alive anyway (q/k/v projections share it), and saving x itself keeps its graph for a double backward.
        x_saved = x if lora_A is not None else None  # only the LoRA gradients read it
        ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, x_saved, mask,
                              t)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.meta = (blocksize, nested_blocksize, x.shape[1], scaling, dropout_p, backend, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if not torch.is_autocast_enabled(grad_y.device.type):  # entering the context costs more than asking
            return QLoRAFunction._backward(ctx, grad_y)
        with torch.autocast(grad_y.device.type, enabled=False):
            return QLoRAFunction._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y):
        packed, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, x, mask, t = ctx.saved_tensors
        blocksize, nested_blocksize, K, scaling, dropout_p, backend, has_bias = ctx.meta
        needs = ctx.needs_input_grad
        need_x, need_A, need_B, need_bias = needs[0], needs[7], needs[8], needs[9]
        # Grad mode is on here only under create_graph=True (a double backward follows): then every gradient is
        # built from differentiable torch ops on tensors that keep their graph (see _dx_differentiable).
        create_graph = torch.is_grad_enabled()
        g = grad_y.contiguous()
        dx = dA = dB = dbias = None
        impl = _backend.resolve("linear_4bit_dx", g.device, backend)  # once, for the LoRA products and dX
        if lora_A is not None and not create_graph and impl == "cpu" and _ops.native_lora(g.device):
            saved = (packed, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, x, mask, t)
            dx, dA, dB = QLoRAFunction._cpu_lora_backward(saved, ctx.meta, g, need_x, need_A, need_B, impl)
            if need_bias and has_bias:
                dbias = g.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
            return dx, None, None, None, None, None, None, dA, dB, dbias, None, None, None, None, None, None, None
        u = xd = None
        if lora_A is not None and (need_A or create_graph):
            xd = x if mask is None else x * mask / (1.0 - dropout_p)  # as in _forward: the same bits
            if create_graph:  # T with its graph (the saved one has none): dB's derivative goes through it
                t = xd.to(t.dtype) @ lora_A.to(t.dtype).t()
        gl = None  # g in the LoRA products' dtype, cast once for u and dB (each cast of g cost ~0.9 ms at 512 x 4096
        # bf16 -> float32 inside a training step on the 2-core CPU: DRAM traffic, g is cold after the big matmul)
        if lora_A is not None and (need_x or need_A or need_B):
            ldt = _lora_dtype(g.dtype, lora_A.dtype, g.device)
            gl = _to(g, ldt)
        if lora_A is not None and (need_x or need_A):
            u = (gl @ lora_B.to(ldt)) * scaling  # [M, r]
        if need_B:  # here, so that the cast of g is freed before the dX matmul (the peak stays what it was)
            gt = gl if gl.dtype == t.dtype else g.to(t.dtype)
            dB = ((gt.t() @ t) * scaling).to(lora_B.dtype)
        gl = gt = None
        if need_x:
            scales = (absmax, nested_absmax, nested_code, offset, nested_blocksize)
            lora_mask = None
            if mask is not None:
                lora_mask = mask.to(g.dtype) / (1.0 - dropout_p)
            lora = (u, lora_A if u is not None else None, lora_mask)
            if create_graph:
                dx = _dx_differentiable(g, packed, scales, code, blocksize, K, *lora)
            else:
                dx = _linear_dx(g, packed, scales, code, blocksize, K, *lora, backend, impl=impl)
        if need_A:
            dA = (u.t() @ xd.to(u.dtype)).to(lora_A.dtype)
        if need_bias and has_bias:
            dbias = g.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, None, None, None, None, None, None, dA, dB, dbias, None, None, None, None, None, None, None


    @staticmethod
    def _cpu_lora_backward(saved, meta, g, need_x, need_A, need_B, impl):
        """dX, dA, dB with the LoRA products in the CPU LoRA kernels (csrc/cpu/lora.h; ``_backward`` calls this on the
        native CPU path of a build that has them): each reads g or x once in its dtype, float32 sums; the dropout
        mask is applied as x is read (dropout(x) is never built). ``saved`` is
        ``ctx.saved_tensors`` unpacked once by the caller (under activation checkpointing a second unpack raises);
        ``impl`` the resolved backend."""
        packed, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, x, mask, t = saved
        blocksize, nested_blocksize, K, scaling, dropout_p, backend, _ = meta
        ms = 1.0 / (1.0 - dropout_p)
        dx = dA = dB = None
        u = None
        traced = _traced()
        if need_x or need_A:
            u = _lora_down(g, lora_B.t(), scaling, None, 1.0, traced)  # [M, r] = s * g @ B
        if need_B:
            dB = _to(_lora_db(t, g, scaling, traced), lora_B.dtype)  # [N, r] = s * g^T @ T
        if need_x:  # dx = g @ W + (u @ A) * mask / (1 - p), the LoRA term added to the matmul's output in float32
            scales = (absmax, nested_absmax, nested_code, offset, nested_blocksize)
            dx = _linear_dx(g, packed, scales, code, blocksize, K, u, lora_A, mask, backend, ms, impl, traced)
        if need_A:
            dA = _to(_lora_gram(u, x, mask, ms, traced), lora_A.dtype)  # [r, K] = u^T @ dropout(x)
        return dx, dA, dB


def _dx_differentiable(g, packed, scales, code, blocksize, K, lora_u, lora_A, lora_mask):
    """``g @ W + (lora_u @ lora_A) * lora_mask`` from torch ops, for a double backward (create_graph=True).

    The fused kernels have no derivative, so W is decoded here into a fresh ``[N, K]`` tensor of g's dtype (the
    reference decode: the same bits on every device), which autograd keeps for the second derivative. Only this
    rare path holds a dequantized weight.
    """
    absmax, nested_absmax, nested_code, offset, nested_blocksize = scales
    W = _ops.dequantize_4bit_impl(packed, absmax, code, blocksize, [g.shape[1], K], g.dtype, nested_absmax,
                                  nested_code, offset, nested_blocksize, "reference")
    dx = g @ W
    if lora_u is not None:
        lora = lora_u.to(g.dtype) @ lora_A.to(g.dtype)
        dx = dx + (lora if lora_mask is None else lora * lora_mask)
    return dx


def _lora_down(x, A, scale, mask, mask_scale, traced=None):
    """``qkernels::lora_down``: through the op when traced (one graph node), else the kernel directly (the same kernel,
    so the same bits), without the op's checks: matmul_4bit_lora checked the shapes, x / grad_y are dense and the
    mask is a fresh bool tensor of x's shape (per-call checks were a measurable share of a training step's glue).
    ``traced``: ``_traced()`` when the caller knows it."""
    if _traced() if traced is None else traced:
        return torch.ops.qkernels.lora_down(x, A, scale, mask, mask_scale)
    return _native.lora_down_raw(x, _native._DTYPE_TO_NATIVE[x.dtype], 0 if mask is None else mask.data_ptr(), A,
                                 scale, mask_scale)


def _lora_gram(u, x, mask, mask_scale, traced=None):
    """``qkernels::lora_gram``, as ``_lora_down`` (u: a float32 result of ``_lora_down``, or the saved T)."""
    if _traced() if traced is None else traced:
        return torch.ops.qkernels.lora_gram(u, x, mask, mask_scale)
    u = u if u.dtype == torch.float32 and u.is_contiguous() else u.to(torch.float32).contiguous()
    return _native.lora_gram_raw(u, x, _native._DTYPE_TO_NATIVE[x.dtype], 0 if mask is None else mask.data_ptr(),
                                 mask_scale)


def _lora_db(t, g, scaling, traced):
    """dB = ``scaling * g^T @ t``, float32 ``[N, r]`` and dense (AccumulateGrad keeps it as it is: a transposed
    ``G.t() * scaling`` cost a multiply and a transposing copy per layer, ~0.1 ms at 256 x 2816 in a training step).
    Eager: the gram kernel scales and writes the transposed layout itself (the same float32 multiply, so the same
    bits as the traced path's ``G.t() * scaling``)."""
    if traced:
        return torch.ops.qkernels.lora_gram(t, g, None, 1.0).t() * scaling
    t = t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()
    return _native.lora_gram_raw(t, g, _native._DTYPE_TO_NATIVE[g.dtype], 0, 1.0, scaling, True)


def _forward(x, packed, scales, code, blocksize, N, lora_A, lora_B, bias, scaling, dropout_p, training, backend,
             keep_t=True):
    """The forward computation; returns ``(y, dropout(x), bool mask or None, T = dropout(x) @ A^T or None)``.

    On the CPU LoRA kernels' path dropout(x) is never built (the kernel applies the mask as it reads x): the second
    item is then None, and T is float32. ``keep_t=False`` (nothing will be saved): T may be None there too."""
    xd, mask, t = x, None, None
    traced = _traced()
    # The backend, resolved once for the LoRA products and the matmul. The LoRA products run in the CPU LoRA kernels
    # (csrc/cpu/lora.h: x read once in its dtype, float32 sums, the dropout mask applied on the fly) on the native CPU
    # path with a build that has them, else as torch matmuls in _lora_dtype.
    impl = _backend.resolve("linear_4bit", x.device, backend)
    if lora_A is not None:
        if training and dropout_p > 0.0:
            mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
        if impl == "cpu" and _ops.native_lora(x.device) and not keep_t:
            # nothing saved: the kernel scales its float32 sums (the same float32 multiply as t * scaling)
            if mask is None and not traced:  # the down-projection inside the matmul's call (the GEMV's binding)
                y = _linear_mod.linear_4bit_resolved(x, packed, scales, code, blocksize, N, None, lora_B, bias, impl,
                                                     lora_A=lora_A, lora_scale=scaling)
                return y, None, mask, None
            y = _linear(x, packed, scales, code, blocksize, N,
                        _lora_down(x, lora_A, scaling, mask, 1.0 / (1.0 - dropout_p), traced), lora_B, bias, backend,
                        impl, traced)
            return y, None, mask, None
        if impl == "cpu" and _ops.native_lora(x.device):
            xd = None
            t = _lora_down(x, lora_A, 1.0, mask, 1.0 / (1.0 - dropout_p), traced)  # [M, r] = xd A^T
        else:
            ldt = _lora_dtype(x.dtype, lora_A.dtype, x.device)
            if mask is not None:
                xd = x * mask / (1.0 - dropout_p)
            t = F.linear(_to(xd, ldt), _to(lora_A, ldt))  # [M, r] = xd A^T
    y = _linear(x, packed, scales, code, blocksize, N, None if t is None else t * scaling, lora_B, bias, backend,
                impl, traced)
    return y, xd, mask, t


def _traced() -> bool:
    """Under torch.compile, torch.jit.trace, a dispatch mode (``make_fx``, ``FakeTensorMode``, ``FlopCounterMode``) or
    a functorch transform: the kernels must be reached through the registered ops. Tracers record only torch ops; the
    native kernels write their output through a raw pointer, which torch.jit.trace recorded as the bare ``aten::empty``
    of the output (a traced model returned uninitialized memory), and fake tensors have no storage to write."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or is_in_torch_dispatch_mode()
            or torch._C._are_functorch_transforms_active())


def _linear(x, packed, scales, code, blocksize, N, lora_t, lora_B, bias, backend, impl, traced):
    """The matmul with the LoRA up-projection and bias; ``impl``: the resolved backend, ``traced``: ``_traced()``."""
    # Traced (torch.compile, torch.jit.trace): through the registered op, so the graph holds one node. Eager:
    # matmul_4bit_lora has validated everything the op would check, so call its body directly (saves ~0.1 ms of
    # dispatch and re-checks, a fifth of a 4096 x 4096 decode GEMV here).
    if backend is None and traced:
        absmax, nested_absmax, nested_code, offset, nested_blocksize = scales
        return torch.ops.qkernels.linear_4bit(x, packed, absmax, code, blocksize, N, nested_absmax, nested_code,
                                              offset, nested_blocksize, lora_t, lora_B, bias)
    return _linear_mod.linear_4bit_resolved(x, packed, scales, code, blocksize, N, lora_t, lora_B, bias, impl)


def _linear_dx(g, packed, scales, code, blocksize, K, lora_u, lora_A, lora_mask, backend, lora_mask_scale=1.0,
               impl=None, traced=None):
    """``g @ W`` plus the LoRA term; ``impl`` / ``traced``: the resolved backend and ``_traced()`` when known."""
    if backend is None and (_traced() if traced is None else traced):
        absmax, nested_absmax, nested_code, offset, nested_blocksize = scales
        return torch.ops.qkernels.linear_4bit_dx(g, packed, absmax, code, blocksize, K, nested_absmax, nested_code,
                                                 offset, nested_blocksize, lora_u, lora_A, lora_mask, lora_mask_scale)
    if impl is None:
        return _linear_mod.linear_4bit_dx_impl(g, packed, scales, code, blocksize, K, lora_u, lora_A, lora_mask,
                                               backend, lora_mask_scale)
    return _linear_mod.linear_4bit_dx_resolved(g, packed, scales, code, blocksize, K, lora_u, lora_A, lora_mask, impl,
                                               lora_mask_scale)


def matmul_4bit_lora(
    x: torch.Tensor,
    packed: torch.Tensor,
    quant_state: QuantState,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """``Y = X @ dequant(W)^T + scaling * (dropout(X) @ lora_A^T) @ lora_B^T + bias``, differentiable.

    Args:
        x: ``[..., K]`` float32 / float16 / bfloat16 (any leading shape). Under ``torch.autocast`` it is cast to
            the autocast dtype first, and the matmuls run in it.
        packed, quant_state: the frozen 4-bit weight ``W [N, K]`` from ``qkernels.quantize_4bit`` (uint8, or a
            float ``quant_storage`` view of the same bytes), on x's device. Gets no gradient.
        lora_A: ``[r, K]`` and lora_B: ``[N, r]`` (peft's ``lora_A.weight`` / ``lora_B.weight``), float32 / float16 /
            bfloat16 (not float64), or both ``None`` for the plain 4-bit linear. Gradients flow to them.
        scaling: the LoRA scale ``s`` (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rsLoRA: ``lora_scaling``).
        bias: ``[N]`` or None; gets a gradient when it requires one.
        dropout_p: dropout on the LoRA branch's input only (as peft), in [0, 1); active when ``training``. The
            mask drawn in forward is the one used in backward.
        training: whether dropout is applied.
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; ``None`` picks by device, dtype
            and the number of rows (see ``qkernels._linear``).

    Returns:
        ``[..., N]`` in x's dtype.

    Raises:
        TypeError: x is not a float32/float16/bfloat16 tensor (float64 says what to do instead), ``quant_state`` is
            not a ``QuantState``, lora_A / lora_B / bias are not tensors or have an unsupported dtype, ``scaling`` is
            not a real number.
        ValueError: a shape that does not fit ``W [N, K]`` (x's last dim, lora_A, lora_B, bias), tensors on
            different devices, a state that does not fit ``packed``, ``dropout_p`` outside [0, 1), a bad ``backend``.

    Saves only the packed weight, never a dequantized ``N x K`` copy (see the module docstring for what is saved).
    """
    if isinstance(x, torch.Tensor) and x.dtype == torch.float64:  # e.g. a model cast with .double() for a reference
        raise TypeError("x is float64, which the 4-bit kernels do not compute in (a model cast with .double()?): use "
                        "float32 (model.float()); for a float64 reference run qkernels.merge_and_unload("
                        "copy.deepcopy(model)).double(), or qkernels.reference.matmul_4bit_lora on float64 tensors")
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a qkernels.QuantState, got {type(quant_state).__name__}")
    quant_state.validate(packed)
    if not packed.is_contiguous():  # the fused kernels read its bytes through a raw pointer, in storage order
        raise ValueError("packed must be contiguous (its bytes are read in order); pass packed.contiguous()")
    if len(quant_state.shape) != 2:
        raise ValueError(f"the quantized weight must be 2-D [N, K] (out, in features), got {tuple(quant_state.shape)}")
    N, K = int(quant_state.shape[0]), int(quant_state.shape[1])
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x has shape {tuple(x.shape)} but the weight is [{N}, {K}]: x's last dim must be {K}")
    if packed.device != x.device:
        raise ValueError(f"x is on {x.device} but the packed weight is on {packed.device}; move the layer to x.device")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must both be tensors or both be None")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if lora_A is not None:
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != K or lora_B.shape[0] != N:
            raise ValueError(f"lora_A must be [r, {K}] and lora_B [{N}, r] (peft's layout), got "
                             f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
        if lora_A.shape[0] != lora_B.shape[1]:
            raise ValueError(f"lora_A has rank {lora_A.shape[0]} but lora_B has rank {lora_B.shape[1]}")
        if lora_A.device != x.device or lora_B.device != x.device:
            raise ValueError(f"lora_A/lora_B must be on x's device {x.device}")
        if lora_A.dtype not in _FLOATS or lora_B.dtype not in _FLOATS:
            raise TypeError("lora_A and lora_B must be float32/float16/bfloat16")
    if bias is not None and (bias.shape != (N,) or bias.device != x.device):
        raise ValueError(f"bias must be a [{N}] tensor on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor (as for nn.Linear), got {bias.dtype}")
    # numbers.Real: Python and NumPy scalars alike (a config read with NumPy gives np.float32 / np.float64).
    # type() is float first: the ABC check of numbers.Real costs ~0.5 us, and the module always passes floats
    if (type(dropout_p) is not float and (not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool))
            or not 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if type(scaling) is not float and (not isinstance(scaling, numbers.Real) or isinstance(scaling, bool)):
        raise TypeError(f"scaling must be a real number (lora_alpha / r), got {type(scaling).__name__}")

    if backend is not None and torch.jit.is_tracing():
        raise ValueError(f"backend={backend!r} cannot be traced by torch.jit.trace (it records torch ops only, and a "
                         "forced backend calls the kernel directly): pass backend=None, or set QKERNELS_BACKEND")
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        x = x.to(torch.get_autocast_dtype(device_type))
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    raw = packed if packed.dtype == torch.uint8 else packed.reshape(-1).view(torch.uint8)
    qs = quant_state
    nested = (qs.state2.absmax, qs.state2.code, qs.offset) if qs.nested else (None, None, None)
    nested_blocksize = qs.state2.blocksize if qs.nested else 256
    if autocast:
        with torch.autocast(device_type, enabled=False):
            y = QLoRAFunction.apply(x2, raw, qs.absmax, qs.code, *nested, lora_A, lora_B, bias, qs.blocksize,
                                    nested_blocksize, N, float(scaling), float(dropout_p), bool(training), backend)
    elif _needs_grad(x2, lora_A, lora_B, bias) or torch.compiler.is_compiling():
        y = QLoRAFunction.apply(x2, raw, qs.absmax, qs.code, *nested, lora_A, lora_B, bias, qs.blocksize,
                                nested_blocksize, N, float(scaling), float(dropout_p), bool(training), backend)
    else:
        # Inference (no_grad, or nothing requires grad): the Function's forward without its autograd machinery
        # (~40 us against a ~0.3 ms 4096 x 4096 decode GEMV here). Same code, same result; nothing is saved.
        scales = (qs.absmax, *nested, nested_blocksize)
        y = _forward(x2, raw, scales, qs.code, qs.blocksize, N, lora_A, lora_B, bias, float(scaling),
                     float(dropout_p), bool(training), backend, keep_t=False)[0]
    return y if x.dim() == 2 else y.reshape(*lead, N)


def _needs_grad(x, lora_A, lora_B, bias) -> bool:
    if not torch.is_grad_enabled():
        return False
    return (x.requires_grad or (lora_A is not None and (lora_A.requires_grad or lora_B.requires_grad))
            or (bias is not None and bias.requires_grad))
