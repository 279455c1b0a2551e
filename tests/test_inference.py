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
    """The prompt's forward runs the GEMV up to gemv_max_m rows (16/32/64 by dtype and CPU) and dequantize + matmul
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
