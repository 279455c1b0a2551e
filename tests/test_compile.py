"""torch.compile the way users compile: a whole transformers causal LM after apply_qlora, trained with AdamW over
sequence lengths that change (dynamo's automatic dynamic shapes, ``mark_dynamic``, ``dynamic=True``), in eval for
decoding and ``generate``, with gradient checkpointing and LoRA dropout; graph breaks counted; the model-level
functions (``save_adapter``, ``load_adapter``, ``apply_qlora``, ...) given the ``torch.compile(model)`` wrapper.
Tiny models built from configs (nothing downloaded).

Tolerances (STYLE 12):

- ``backend="aot_eager"`` (dynamo and AOTAutograd, no code generation) runs the captured ATen graph with eager's
  kernels, and the qkernels ops run their eager bodies, in the same order on the same inputs: losses, logits and
  every LoRA gradient must be bit-equal to eager, step after step. A difference means the compiled program computes
  something else (another dropout mask in backward, a weight read once and kept, a kernel's write lost from the
  trace), which is what these tests are for. (Measured here: equal on Llama, Qwen2, GPT-2, fp32 / bf16 / fp16,
  autocast, DoRA, dropout, gradient checkpointing.)
- Inductor generates its own code for the elementwise work around the ops (casts, the LoRA scale, the sums), in
  another order: compiled results are held to the rule of tests/test_lora.py against a float64 reference, error at
  most twice plain torch's in the same dtype plus two ulps.

Compile time dominates: whole models run on aot_eager (a few seconds each on one core); inductor runs at layer
level (its compile of a whole model takes ~40 s here).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch._dynamo
from packaging.version import Version
from safetensors.torch import load_file
from torch import nn
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import qkernels
from qkernels import _linear, reference

from .test_lora import _assert_close_to_fp64, _grads, _problem

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CFG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
           tie_word_embeddings=False)
QKERNELS_DIR = os.path.dirname(qkernels.__file__)


def tiny_lm(arch: str = "llama", *, dtype: torch.dtype = torch.float32, **kw) -> nn.Module:
    """A 1-layer causal LM with LoRA on every projection, A and B random (a fresh B = 0 would hide LoRA mistakes)."""
    torch.manual_seed(0)
    cls, cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
    model = qkernels.apply_qlora(cls(cfg(**CFG)).to(dtype), LLAMA_TARGETS, r=4, lora_alpha=8, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def reset() -> None:
    torch._dynamo.reset()
    counters.clear()


def compiles() -> int:
    """Frames dynamo compiled since ``reset()``: one per graph, so a recompile or a graph break adds one. (Not the
    backend's calls: under ``dynamic=True`` dynamo traces a frame twice when a Python float it made symbolic must be
    specialized, a plain transformers Llama included: one compile, two backend calls.)"""
    return counters["frames"]["ok"]


def ids_of(length: int, step: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(step))


def train(model: nn.Module, forward, lengths, mark_dynamic: bool = False) -> list:
    """AdamW steps on ``forward`` (the model or its compiled wrapper), one sequence length each: per step the loss
    and the LoRA gradients. The global seed is set per step, so eager and compiled draw the same dropout masks."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = []
    for step, length in enumerate(lengths):
        ids = ids_of(length, step)
        if mark_dynamic:
            torch._dynamo.mark_dynamic(ids, 1)
        torch.manual_seed(100 + step)
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        opt.step()
        opt.zero_grad()
    return out


def assert_same_steps(eager: list, compiled: list) -> None:
    """Bit-equal losses and LoRA gradients, step by step (module docstring)."""
    assert len(eager) == len(compiled)
    for step, ((le, ge), (lc, gc)) in enumerate(zip(eager, compiled, strict=True)):
        assert torch.equal(le, lc), f"step {step}: loss {lc.item()!r} compiled, {le.item()!r} eager"
        assert ge.keys() == gc.keys() and len(ge) > 0
        for n in ge:
            assert torch.equal(ge[n], gc[n]), f"step {step}: {n}: max diff {(ge[n] - gc[n]).abs().max():.3g}"


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_model_trains_as_eager_over_changing_lengths(arch):
    """torch.compile(model) of a whole causal LM (Qwen2: biased q/k/v), AdamW over lengths 16, 24, 33, 24: dynamo
    compiles the first shape static, recompiles once with the length dynamic (its automatic dynamic shapes) and
    reuses that graph for every later length. Rows 32..66: the 4-bit layers' GEMV / dequantize switch (64 rows on an
    AVX-512 CPU, 16 elsewhere) is crossed inside one dynamic graph, as the op decides at run time."""
    lengths = [16, 24, 33, 24]
    eager = train(model := tiny_lm(arch).train(), model, lengths)
    model = tiny_lm(arch).train()
    reset()
    assert_same_steps(eager, train(model, torch.compile(model, backend="aot_eager"), lengths))
    assert compiles() == 2, f"{compiles()} graphs: a graph break or a recompile per length"


@pytest.mark.parametrize("how", ["mark_dynamic", "dynamic=True"])
def test_compiled_model_with_dynamic_lengths_compiles_once(how):
    """``mark_dynamic`` on the length, or ``torch.compile(dynamic=True)``: one graph for every length (>= 2: dynamo
    specializes sizes 0 and 1), bf16 weights, dropout on (the masks are eager's: the same seed, the same draw)."""
    lengths = [16, 40, 7, 33]
    kw = dict(dtype=torch.bfloat16, lora_dropout=0.1)
    eager = train(model := tiny_lm(**kw).train(), model, lengths)
    model = tiny_lm(**kw).train()
    reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True if how == "dynamic=True" else None)
    got = train(model, compiled, lengths, mark_dynamic=how == "mark_dynamic")
    assert compiles() == 1
    if Version(torch.__version__.split("+")[0]) >= Version("2.13"):
        assert_same_steps(eager, got)
        return
    # torch 2.11's aot_eager with a dynamic length is not bit-equal to eager even without qkernels: a plain
    # transformers Llama's float32 gradients differ by up to 1.5e-8 at length 40 (torch 2.13: bit-equal). There only a
    # loose check of the losses; CI's torch checks the bits
    for step, ((le, _), (lc, _)) in enumerate(zip(eager, got, strict=True)):
        torch.testing.assert_close(lc, le, rtol=2e-2, atol=0, msg=f"step {step}")


def test_compiled_model_with_gradient_checkpointing_trains_as_eager():
    """``gradient_checkpointing_enable()`` (transformers' default: non-reentrant torch.utils.checkpoint, which dynamo
    traces) + LoRA dropout: the recomputed forward must redraw nothing. transformers' own graph breaks (the input
    embeddings' ``requires_grad_`` hook of ``enable_input_require_grads``, its ``logger.warning_once`` about
    use_cache) split the graph; none is in qkernels."""
    lengths = [16, 24, 33]

    def build():
        model = tiny_lm(lora_dropout=0.1).train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5: renamed activation_checkpointing_enable
            model.gradient_checkpointing_enable()
        return model

    eager = train(model := build(), model, lengths)
    model = build()
    reset()
    assert_same_steps(eager, train(model, torch.compile(model, backend="aot_eager"), lengths))
    reset()
    explained = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(ids_of(16, 0))
    assert not _breaks_in_qkernels(explained)


# ---------------------------------------------------------------------------------------------- graph breaks
def _breaks_in_qkernels(explained) -> list[str]:
    """The graph breaks whose Python stack passes through qkernels' source (``torch._dynamo.explain``)."""
    return [str(b.reason) for b in explained.break_reasons
            if any(f.filename.startswith(QKERNELS_DIR) for f in b.user_stack)]


@pytest.mark.parametrize("mode", ["train", "no_grad", "inference_mode"])
def test_whole_model_forward_has_no_graph_break(mode):
    """The training forward (loss included), and eval under no_grad / inference_mode at a decode step (one token:
    the GEMV) and a prompt (dequantize + matmul): one graph each, no break anywhere (qkernels' inference path, which
    skips QLoRAFunction in eager, traces through the Function and the ops instead)."""
    model = tiny_lm(lora_dropout=0.1)
    ctx = {"train": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    model.train(mode == "train")
    for length in (1, 70) if mode != "train" else (16,):
        reset()
        with ctx():
            explained = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(ids_of(length, 0, 1))
        assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
        assert explained.graph_count == 1


# ---------------------------------------------------------------------------------------------- inference
def _generate(model, ids, **kw):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             **kw)
    return out.sequences, torch.stack(out.logits)


def test_generate_with_a_compiled_forward_equals_eager():
    """``model.forward = torch.compile(model.forward)`` then ``generate`` (dynamic cache: prompt, first step, then
    one dynamic graph for the growing cache), and transformers' own compiled decoding (a static cache with a
    ``CompileConfig``, fullgraph): the same tokens and logits as eager (bit-equal with the dynamic cache)."""
    from transformers import CompileConfig

    model = tiny_lm().eval()
    ids = ids_of(5, 0, 1)
    seq, logits = _generate(model, ids)
    eager_forward = model.forward
    reset()
    model.forward = torch.compile(eager_forward, backend="aot_eager")
    try:
        s, lg = _generate(model, ids)
    finally:
        model.forward = eager_forward
    assert torch.equal(s, seq) and torch.equal(lg, logits)
    assert compiles() <= 3  # the prompt, the first step, then the cache length dynamic
    seq_static, logits_static = _generate(model, ids, cache_implementation="static")
    reset()
    config = CompileConfig(backend="aot_eager", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles the decoding step on GPUs only unless this is set
    s, lg = _generate(model, ids, cache_implementation="static", compile_config=config)
    assert counters["stats"]["unique_graphs"] >= 1, "transformers did not compile the decoding step"
    # Not bit-equal: transformers' compiled static-cache step differs from its eager one in the attention around the
    # layers (a plain Llama without qkernels: up to ~1 ulp of the largest logit, measured); 4 ulps allowed.
    assert torch.equal(s, seq_static)
    ulp = torch.finfo(torch.float32).eps * logits_static.abs().max()
    assert (lg - logits_static).abs().max() <= 4 * ulp


# ---------------------------------------------------------------------------------------------- inductor, layer level
def _layer_fn(packed, state, s, p=0.0):
    def f(x, A, B, b):
        return qkernels.matmul_4bit_lora(x, packed, state, A, B, s, b, p)
    return f


@pytest.mark.parametrize("how", ["automatic", "mark_dynamic", "dynamic=True", "reduce-overhead"])
def test_inductor_layer_across_the_gemv_switch(how, monkeypatch):
    """Inductor, forward and every gradient, rows 3, 17, 70, 5, 100: both sides of the GEMV switch in one dynamic
    graph, against float64 (module docstring). The switch is held at 64 rows (its float32 value on an AVX-512 CPU
    before the thirteenth session; now 2048): at 2051 rows inductor's float32 sum over the rows (the bias gradient)
    was 12x less accurate than eager torch's, its reduction order, not the layer's. Compiles: automatic dynamic
    shapes two (the first size static, then dynamic), mark_dynamic / dynamic=True one. mode="reduce-overhead" is
    CUDA graphs, which inductor skips for CPU tensors: it runs as the default mode."""
    limit = min(64, _linear.gemv_max_m(torch.empty(1, 128)))
    monkeypatch.setattr(_linear, "gemv_max_m", lambda x: limit)  # read per call by the op's implementation
    rows = [3, 17, 70, 5, 100]
    assert min(rows) <= _linear.GEMV_MAX_M and max(rows) > _linear.gemv_max_m(torch.empty(1, 128))
    N, K, r = 96, 128, 8
    s = reference.lora_scaling(16.0, r)
    reset()
    kw = {"dynamic=True": dict(dynamic=True), "reduce-overhead": dict(mode="reduce-overhead")}.get(how, {})
    compiled = torch.compile(_layer_fn(*_problem(1, N, K, r, torch.float32)[:2], s), **kw)

    for M in rows:
        packed, state, x, A, B, b, gy = _problem(M, N, K, r, torch.float32)  # seed 0: the same weight every M

        def ours(x_, *rest):
            if how == "mark_dynamic":
                torch._dynamo.mark_dynamic(x_, 0)
            return compiled(x_, *rest)

        def plain(x_, A_, B_, b_, dt=torch.float32, packed=packed, state=state):
            return reference.matmul_4bit_lora(x_.to(dt), packed, state, A_.to(dt), B_.to(dt), s, b_.to(dt))

        got = _grads(ours, x, A, B, b, gy)
        base = _grads(plain, x, A, B, b, gy)
        ref = _grads(lambda *t: plain(*t, dt=torch.float64), x, A, B, b, gy.double())
        _assert_close_to_fp64(got, base, ref, [f"{n} (M={M})" for n in ("y", "dx", "dA", "dB", "dbias")])
    assert compiles() == (1 if how in ("mark_dynamic", "dynamic=True") else 2), compiles()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_dropout_uses_the_forward_mask_in_backward(backend):
    """LoRA dropout under compile, whatever random numbers the backend draws (inductor generates its own): with
    ``A = B = I`` (r = K = N) the LoRA term is ``s * x * mask / (1 - p)``, so the forward output shows the mask it
    drew; dA must be ``s * dY^T (x * mask / (1 - p))`` and dx ``dY W + s * dY * mask / (1 - p)`` with that mask."""
    K, M, p, s = 64, 40, 0.5, 2.0
    packed, state, x, _, _, _, gy = _problem(M, K, K, 0, torch.float32, bias=False)
    eye = torch.eye(K)
    reset()
    fn = torch.compile(_layer_fn(packed, state, s, p), backend=backend)
    leaves = [t.clone().requires_grad_() for t in (x, eye, eye)]
    y = fn(leaves[0], leaves[1], leaves[2], None)
    dx, dA, _ = torch.autograd.grad(y, leaves, gy)
    W = qkernels.dequantize_4bit(packed, state, torch.float32)
    lora = (y.detach() - x @ W.t()) / s  # x * mask / (1 - p) = 2x where kept, 0 where dropped, plus rounding
    mask = lora.abs() > x.abs()
    assert 0.3 < mask.float().mean() < 0.7
    xd = x * mask / (1 - p)  # exact (times 2)
    # A float32 sum of n products is within n * eps * sum|products| of the exact sum (the classic gamma_n bound);
    # the kernels' sums and the ones here each are, so they differ by at most twice that.
    eps = torch.finfo(torch.float32).eps
    bound_dA = 2 * M * eps * s * (gy.abs().t() @ xd.abs())  # dA = s dY^T Xd: M terms
    assert ((dA - s * gy.t() @ xd).abs() <= bound_dA).all(), "dA does not use the forward's mask"
    want_dx = gy @ W + s * gy * mask / (1 - p)  # dY W + s (dY B A) * mask / (1 - p): K + 1 terms
    bound_dx = 2 * (K + 1) * eps * (gy.abs() @ W.abs() + s * gy.abs() * mask / (1 - p))
    assert ((dx - want_dx).abs() <= bound_dx).all(), "dx does not use the forward's mask"


# ---------------------------------------------------------------------------------------------- the compiled wrapper
def test_model_functions_see_through_the_compiled_wrapper(tmp_path):
    """``torch.compile(model)`` wraps the model in an OptimizedModule whose names carry ``_orig_mod.``. The
    model-level functions act on the model inside: save_adapter writes the uncompiled model's files (it wrote
    ``base_model.model._orig_mod...`` keys, which peft loaded as missing: the trained adapter silently zero),
    load_adapter reads an uncompiled model's files, apply_qlora matches a regex on the uncompiled names; functions
    that return or yield the model give back the wrapper. A compiled submodule put into the tree is refused by
    save_adapter, naming the fix."""
    import peft

    model = tiny_lm().eval()
    compiled = torch.compile(model, backend="aot_eager")
    qkernels.save_adapter(model, tmp_path / "plain")
    qkernels.save_adapter(compiled, tmp_path / "compiled")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if f.endswith(".json"):
            assert (tmp_path / "plain" / f).read_text() == (tmp_path / "compiled" / f).read_text()
        else:
            a, b = load_file(tmp_path / "plain" / f), load_file(tmp_path / "compiled" / f)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # peft reads the compiled model's file with every key (it only warns about missing ones)
    base = LlamaForCausalLM(LlamaConfig(**CFG))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "compiled")
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    got = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.equal(got, model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)

    loaded = qkernels.load_adapter(compiled, tmp_path / "plain", adapter_name="again")
    assert "model.layers.0.self_attn.q_proj" in loaded
    assert qkernels.adapter_names(compiled) == ["default", "again"]
    ids = ids_of(7, 0, 1)
    with torch.no_grad(), qkernels.disable_adapters(compiled) as bound:
        assert bound is compiled
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=0, atol=0)

    torch.manual_seed(0)
    fresh = torch.compile(LlamaForCausalLM(LlamaConfig(**CFG)), backend="aot_eager")
    assert qkernels.apply_qlora(fresh, r"model\.layers\.\d+\.self_attn\.q_proj", r=4) is fresh
    assert qkernels.merge_and_unload(fresh) is fresh
    assert not any(isinstance(m, qkernels.QLoRALinear) for m in fresh.modules())

    model.model.layers[0] = torch.compile(model.model.layers[0], backend="aot_eager")
    with pytest.raises(ValueError, match=r"submodule\.compile\(\)"):
        qkernels.save_adapter(model, tmp_path / "nested")
