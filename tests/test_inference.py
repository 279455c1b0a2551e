"""Inference flows users run on apply_qlora models: generate (greedy, padded batches, prompt lengths on both sides of
the GEMV / dequantize switch), merge_and_unload then generate, torch.compile, copies, and the inputs users pass.
Tiny causal LMs built from configs (nothing downloaded).

Tolerances: the QLoRA model and its merged dense copy compute the same function in float32 with different summation
orders (the LoRA term added separately vs folded into the weight), so each differs from a float64 run by rounding
only; their difference is held to twice the sum of those two errors (STYLE 12).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import qkernels
from qkernels import apply_qlora, merge_and_unload

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=512, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """Nonzero A and B: a fresh adapter has B = 0 and would hide every LoRA mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def qlora_llama(**kw) -> LlamaForCausalLM:
    model = apply_qlora(tiny_llama(), LLAMA_TARGETS, r=4, lora_alpha=8, **kw)
    randomize_lora(model)
    return model.eval()


def greedy(model, ids, mask=None, new: int = 6):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def assert_close_to_merged(ours: torch.Tensor, merged: torch.Tensor, ref64: torch.Tensor) -> None:
    """``|ours - merged| <= 2 (|ours - ref| + |merged - ref|)`` plus 4 float32 ulps of the largest logit for
    outputs that both land exactly (module docstring)."""
    e_ours, e_merged = (ours.double() - ref64).abs().max(), (merged.double() - ref64).abs().max()
    ulp = torch.finfo(torch.float32).eps * ref64.abs().max()
    diff = (ours.double() - merged.double()).abs().max()
    assert diff <= 2 * (e_ours + e_merged) + 4 * ulp, f"{diff:.3g} vs errors {e_ours:.3g}, {e_merged:.3g}"


# ---------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("n", [1, 16, 17, 33, 64, 65, 100], ids=lambda n: f"prompt{n}")
def test_greedy_generate_equals_the_merged_model_across_the_gemv_switch(n):
    """The prompt's forward runs the GEMV up to gemv_max_m rows (16 to 96 by dtype, K and CPU) and dequantize + matmul
    above; each decode step runs the GEMV. Step by step, the logits are the merged dense model's up to rounding."""
    model = qlora_llama()
    merged = merge_and_unload(copy.deepcopy(model))
    ids = torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(n))
    seq, logits = greedy(model, ids)
    seq_m, logits_m = greedy(merged, ids)
    assert torch.equal(seq, seq_m)
    with torch.no_grad():  # the merged model in float64, teacher-forced on the generated sequence
        ref = copy.deepcopy(merged).double()(seq).logits[0, n - 1:-1]
    assert_close_to_merged(logits[:, 0], logits_m[:, 0], ref)


def test_compute_dtype_model_merges_into_one_that_runs_on_the_same_inputs():
    """Bug: merge_and_unload rounded to compute_dtype, so a float32 model with compute_dtype=bfloat16 merged into
    bf16 nn.Linear layers that fail on the model's float32 activations (RuntimeError: mat1 and mat2 dtype). The
    merged layers now take the model's float dtype; the merged model is the float32 evaluation of the same weights."""
    model = qlora_llama(compute_dtype=torch.bfloat16)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = merge_and_unload(copy.deepcopy(model))
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        ours, theirs = model(ids).logits, merged(ids).logits
        ref = copy.deepcopy(merged).double()(ids).logits
    assert theirs.dtype == torch.float32
    assert_close_to_merged(ours, theirs, ref)
    assert greedy(merged, ids[:1])[0].shape == (1, 18)


def test_a_model_cast_to_float64_says_how_to_get_a_float64_reference():
    """Before: ``model.double()`` then a forward raised "x must be a float32/float16/bfloat16 tensor, got
    torch.float64" from deep inside, naming no fix. The merged copy is the float64 reference that works."""
    model = qlora_llama()
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y32 = model(ids).logits
        with pytest.raises(TypeError, match=r"x is float64.*model\.float\(\).*merge_and_unload"):
            copy.deepcopy(model).double()(ids)
        y64 = merge_and_unload(copy.deepcopy(model)).double()(ids).logits
    assert y64.dtype == torch.float64
    # float32 rounding of the same function: measured ~2e-7 on logits of magnitude ~0.5; 1e-5 leaves 50x room
    assert (y32.double() - y64).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- adapters
def test_adapter_switches_between_generate_calls_match_peft(tmp_path):
    """set_adapter / disable_adapters / delete_adapter between generate calls (a fresh KV cache each call) give the
    tokens peft gives on the dense dequantized base with the same adapters, and logits within rounding of a float64
    peft run (module docstring's rule)."""
    peft = pytest.importorskip("peft", reason="peft is the oracle for adapter switching")
    from qkernels import adapters

    model = qlora_llama()
    adapters.add_adapter(model, "b", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    randomize_lora(model, seed=3)  # both adapters nonzero
    for name in ("default", "b"):
        adapters.save_adapter(model, tmp_path / name, adapter_name=name)
    with adapters.disable_adapters(model):
        base = merge_and_unload(copy.deepcopy(model))

    def load(dtype):
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(dtype), str(tmp_path / "default"))
        pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
        return pm.to(dtype).eval()

    theirs, ref = load(torch.float32), load(torch.float64)
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0  # left padding

    def check() -> torch.Tensor:
        seq, logits = greedy(model, ids, mask)
        seq_p, logits_p = greedy(theirs, ids, mask)
        assert torch.equal(seq, seq_p)
        full = torch.cat([mask, torch.ones_like(seq[:, ids.shape[1]:])], 1)
        with torch.no_grad():
            r = ref(input_ids=seq, attention_mask=full).logits[:, ids.shape[1] - 1:-1].transpose(0, 1)
        assert_close_to_merged(logits, logits_p, r)
        return seq

    seq_default = check()
    adapters.set_adapter(model, "b")
    theirs.set_adapter("b")
    ref.set_adapter("b")
    assert not torch.equal(check(), seq_default), "the adapters differ: switching must show"
    with adapters.disable_adapters(model), theirs.disable_adapter(), ref.disable_adapter():
        check()
    for m in (model, theirs, ref):
        (adapters.set_adapter(m, "default") if m is model else m.set_adapter("default"))
    assert torch.equal(check(), seq_default)
    adapters.delete_adapter(model, "default")
    with pytest.warns(UserWarning):  # peft says it switched to b
        theirs.delete_adapter("default")
        ref.delete_adapter("default")
    check()


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_compiled_layer_has_no_graph_break_and_equals_eager(grad_mode):
    """Eager inference skips QLoRAFunction (no grad wanted); under torch.compile the Function and the custom op are
    traced instead. fullgraph=True fails on any graph break; the outputs are bit-equal to eager on both sides of the
    GEMV switch (the same op body runs)."""
    model = qlora_llama()
    layer = model.model.layers[0].mlp.down_proj  # K = 128: the GEMV takes up to 64 float32 rows here
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    for m in (1, 17, 100):
        x = torch.randn(1, m, 128, generator=torch.Generator().manual_seed(m))
        with grad_mode():
            assert torch.equal(compiled(x), layer(x)), m


# ---------------------------------------------------------------------------------------------- copies
def test_deepcopy_and_pickle_keep_the_packed_weight_and_share_nothing():
    """A deep copy / pickle round trip generates the same tokens; the copy's tensors (packed bytes, scales, LoRA,
    bias) and dicts live apart from the original's, so changing the copy leaves the original's outputs unchanged."""
    import pickle

    from qkernels import QLoRALinear

    model = qlora_llama()
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    seq = greedy(model, ids)[0]
    clone, loaded = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    for other in (clone, loaded):
        assert torch.equal(greedy(other, ids)[0], seq)

    def tensors(m):
        for layer in m.modules():
            if isinstance(layer, QLoRALinear):
                st = layer.weight.quant_state
                yield from (layer.weight.data, st.absmax, st.code, st.state2.absmax, st.state2.code, st.offset)
                yield from layer.parameters()

    ptrs = {t.untyped_storage().data_ptr() for t in tensors(model)}
    assert not ptrs & {t.untyped_storage().data_ptr() for t in tensors(clone)}
    q, q2 = model.model.layers[0].self_attn.q_proj, clone.model.layers[0].self_attn.q_proj
    assert q.scaling is not q2.scaling and q.weight.quant_state is not q2.weight.quant_state
    with torch.no_grad():
        for t in tensors(clone):
            t.zero_()
    clone.model.layers[0].self_attn.q_proj.scaling["default"] = 0.0
    assert torch.equal(greedy(model, ids)[0], seq)


# ---------------------------------------------------------------------------------------------- train / eval
def test_apply_qlora_on_a_model_in_eval_mode_keeps_it_in_eval_mode():
    """Bug: from_pretrained returns a model in eval mode; apply_qlora put new QLoRALinear layers (training=True) into
    it, so model.training said False while LoRA dropout ran: generate() differed from call to call. The new layers
    (and module-to-save wrappers) now take the replaced module's mode; model.train() turns dropout on as usual."""
    model = apply_qlora(tiny_llama(), LLAMA_TARGETS, r=4, lora_dropout=0.5, modules_to_save=["lm_head"])
    randomize_lora(model)
    assert not any(m.training for m in model.modules())
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
    assert torch.equal(greedy(model, ids)[0], greedy(model, ids)[0])
    model.train()
    with torch.no_grad():  # p = 0.5 on every LoRA input: two draws differ
        assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    with torch.inference_mode():
        y_inf = model(ids).logits
    with torch.no_grad():
        y_ng = model(ids).logits
    assert torch.equal(y_inf, y_ng) and torch.equal(model(ids).logits.detach(), y_ng)
    qkernels.add_adapter(model, "b", r=2, lora_dropout=0.5, target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert not any(m.training for m in model.modules())
    assert not any(m.training for m in merge_and_unload(copy.deepcopy(model)).modules())
    trained = apply_qlora(tiny_llama().train(), LLAMA_TARGETS, r=4)
    assert all(m.training for m in trained.modules())


def test_a_head_tied_to_the_embeddings_stays_float_and_tied_through_generate():
    """Bug (first): targeting GPT-2's lm_head (tied to wte) quantized it; transformers' tie_weights() then put the float
    embedding back over the packed weight and the next generate failed ('Parameter' object has no attribute
    'quant_state'). Then it was refused. Now, as transformers' bitsandbytes loader and peft: the head keeps the shared
    float weight with LoRA on it, survives tie_weights(), and generates; an untied head is quantized."""
    model = tiny_gpt2()
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte
    apply_qlora(model, ["c_attn", "lm_head"], r=4)
    assert not model.lm_head.quantized and model.lm_head.weight is wte
    model.tie_weights()
    assert model.lm_head.weight is wte
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    assert greedy(model, ids, new=3)[0].shape == (1, 9)
    untied = tiny_gpt2()
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    untied.config.tie_word_embeddings = False
    apply_qlora(untied, ["c_attn", "lm_head"], r=4)
    assert untied.lm_head.quantized
    untied.tie_weights()
    assert greedy(untied, ids, new=3)[0].shape == (1, 9)


# ---------------------------------------------------------------------------------------------- torch.jit.trace
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_jit_trace_records_the_op_not_an_empty_output(grad):
    """Bug: the native kernels write through a raw pointer, so torch.jit.trace recorded only the ``aten::empty`` of
    the output: the traced module returned uninitialized memory at decode sizes (and failed past the GEMV limit).
    Traced now through the registered op: bit-equal to eager on new inputs, both sides of the GEMV switch."""
    import warnings

    from qkernels import QLoRALinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(QLoRALinear(64, 48, r=4), torch.nn.GELU(), QLoRALinear(48, 32, r=2)).eval()
    randomize_lora(model)
    for m in (1, 100):
        x = torch.randn(m, 64)
        with torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
            traced = torch.jit.trace(model, x, check_trace=False)
        x_new = torch.randn(m, 64)
        with torch.no_grad():
            assert torch.equal(traced(x_new), model(x_new)), m
    with pytest.raises(ValueError, match="backend='cpu' cannot be traced"):
        layer = model[0]
        torch.jit.trace(lambda x: qkernels.matmul_4bit_lora(x, layer.weight.data, layer.weight.quant_state, None, None,
                                                            0.0, backend="cpu"), torch.randn(2, 64))


def test_torch_export_and_a_replaced_weight_say_what_to_do():
    """Bug: torch.export (fake parameters) and a float weight assigned over the packed one failed with
    "AttributeError: 'FakeTensor' / 'Parameter' object has no attribute 'quant_state'". Now a TypeError naming the
    cause and the fix; the merged dense copy exports and gives the layer's outputs (merge test's rounding rule)."""
    from qkernels import QLoRALinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(QLoRALinear(64, 32, r=4)).eval()
    randomize_lora(model)
    x = torch.randn(3, 64)
    with pytest.raises(TypeError, match=r"torch\.export is not supported.*merge_and_unload"):
        torch.export.export(model, (x,))
    exported = torch.export.export(merge_and_unload(copy.deepcopy(model)), (x,)).module()
    with torch.no_grad():
        y, y_exp, ref = model(x), exported(x), merge_and_unload(copy.deepcopy(model)).double()(x.double())
    assert_close_to_merged(y, y_exp, ref)
    model[0].weight = torch.nn.Parameter(torch.randn(32, 64))
    with pytest.raises(TypeError, match="Parameter without a quant_state"):
        model(x)
