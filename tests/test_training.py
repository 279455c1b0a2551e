"""The training flows users run on a qkernels model: transformers' Trainer (float models and models transformers
loaded in 4 bits), its checkpoints and resuming, peft's prepare_model_for_kbit_training, mixed precision and plain
optimizers. Tiny Llamas built from a LlamaConfig (nothing is downloaded)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import qkernels
from qkernels import QLoRALinear, apply_qlora

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(_config())


def bnb_llama(tmp_path, storage: torch.dtype = torch.uint8) -> LlamaForCausalLM:
    """``tiny_llama()`` saved, then loaded by transformers in 4 bits (NF4, double quant) with bitsandbytes."""
    d = tmp_path / "dense"
    if not d.exists():
        tiny_llama().save_pretrained(d)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(d, quantization_config=cfg, dtype=torch.float32)


class _Batch(torch.utils.data.Dataset):
    """``n`` fixed sequences of ids in ``[low, vocab)``, as inputs and labels. The default four: with a batch of 4
    every step sees the same batch, so the loss falls step by step."""

    def __init__(self, n: int = 4, length: int = 16, low: int = 3, vocab: int = 96):
        self.ids = torch.randint(low, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out, max_steps: int, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_steps=2, logging_steps=1,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **kw)


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def _packed(model) -> dict[str, tuple]:
    """Each 4-bit layer's stored bytes (as uint8, whatever the quant_storage) and its float32 absmax."""
    out = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if type(w).__name__ == "Params4bit":
            out[n] = (type(m).__name__, w.dtype, w.data.view(torch.uint8).clone(), w.quant_state.absmax.clone())
    return out


def _state_dtypes(model) -> dict[str, torch.dtype]:
    return {n: m.weight.quant_state.dtype for n, m in model.named_modules() if isinstance(m, QLoRALinear)}


def _train_three_steps(model, opt, autocast_dtype=None) -> list[float]:
    """Three optimizer steps on a fixed batch in train mode; returns the losses (the tests want them falling)."""
    model.train()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_same_packed(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for n, (kind, dtype, data, absmax) in before.items():
        assert after[n][0] == kind and after[n][1] == dtype, n
        assert torch.equal(after[n][2], data) and torch.equal(after[n][3], absmax), n


# ---------------------------------------------------------------------------------------------- Trainer
@pytest.mark.parametrize("base", ["float", "bnb-4bit"])
def test_trainer_trains_checkpoints_the_packed_model_and_resumes(tmp_path, base):
    """Trainer takes the model (a model transformers loaded in 4 bits used to be refused as "purely quantized"),
    the loss falls, a checkpoint holds the packed weights (no dense copy of a target) and resuming from it restores
    the adapter: the resumed run ends with the LoRA weights of the uninterrupted one, bit for bit (same batches,
    same order of operations)."""

    def make(seed: int):
        model = tiny_llama() if base == "float" else bnb_llama(tmp_path)
        torch.manual_seed(seed)  # LoRA A's init: the resumed model starts elsewhere
        targets = LLAMA_TARGETS if base == "float" else ["q_proj", "v_proj"]  # bnb: untargeted 4-bit layers stay
        return apply_qlora(model, targets, r=4, lora_alpha=8)

    model = make(1)
    packed = _packed(model)
    trainer = Trainer(model=model, args=_args(tmp_path / "run", 4), train_dataset=_Batch())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses
    _assert_same_packed(packed, _packed(model))
    final = _lora(model)

    from safetensors.torch import load_file

    sd = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    for n, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            assert sd[f"{n}.weight"].dtype == torch.uint8 and sd[f"{n}.weight"].numel() == m.weight.numel(), n
            assert f"{n}.lora_A.default.weight" in sd, n

    resumed = make(2)
    assert any(not torch.equal(v, final[k]) for k, v in _lora(resumed).items())
    Trainer(model=resumed, args=_args(tmp_path / "run", 4), train_dataset=_Batch()).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    got = _lora(resumed)
    assert got.keys() == final.keys()
    for k in final:
        assert torch.equal(got[k], final[k]), k


def test_a_4bit_model_keeps_transformers_guards_while_a_castable_bnb_layer_remains(tmp_path):
    """``is_quantized`` is cleared only when nothing is left for transformers' dtype guards to protect: with a
    bitsandbytes layer stored as bfloat16 left untargeted, ``.half()`` must still refuse (it would convert those
    packed bytes), and so does the Trainer. Wrapping every 4-bit layer clears it: QLoRALinear keeps its bytes."""
    model = apply_qlora(bnb_llama(tmp_path, torch.bfloat16), ["q_proj", "v_proj"], r=4)
    assert model.is_quantized
    with pytest.raises(ValueError, match="half"):
        model.half()
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=_args(tmp_path / "run", 1), train_dataset=_Batch())

    model = apply_qlora(bnb_llama(tmp_path, torch.bfloat16), LLAMA_TARGETS, r=4)
    assert not model.is_quantized and model.hf_quantizer is not None and model.is_loaded_in_4bit
    packed = _packed(model)
    model.half()
    _assert_same_packed(packed, _packed(model))
    qkernels.delete_adapter(model, "default")  # no LoRA left: purely quantized again, the guards are back
    assert model.is_quantized
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=_args(tmp_path / "run", 1), train_dataset=_Batch())


def test_a_4bit_model_with_uint8_layers_left_survives_half(tmp_path):
    """Untargeted bitsandbytes layers stored as uint8 (the default): ``.half()`` leaves their bytes alone, so the
    cleared flag lets it through; every 4-bit layer, ours and bitsandbytes', keeps its bytes and the model runs."""
    model = apply_qlora(bnb_llama(tmp_path), ["q_proj", "v_proj"], r=4)
    assert not model.is_quantized
    packed = _packed(model)
    assert {kind for kind, *_ in packed.values()} == {"QLoRALinear", "Linear4bit"}
    model.half()
    _assert_same_packed(packed, _packed(model))
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(input_ids=ids).logits).all()


# ---------------------------------------------------------------------------------------------- peft's preparation
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
def test_prepare_model_for_kbit_training_keeps_packed_weights(storage):
    """peft's prepare_model_for_kbit_training casts every float16/bfloat16 parameter to float32 unless its class is
    named ``Params4bit``: a bfloat16 ``quant_storage`` weight is a float tensor and would be cast (its bytes lost).
    Before apply_qlora (peft's order): the model trains. After it: the packed bytes survive, and since peft freezes
    every parameter, LoRA included (as it does on a PeftModel), ``qkernels.set_adapter`` makes it trainable again."""
    model = tiny_llama().to(torch.bfloat16)
    peft.prepare_model_for_kbit_training(model)
    apply_qlora(model, LLAMA_TARGETS, r=4, quant_storage=storage)
    packed = _packed(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = _train_three_steps(model, opt)
    assert losses[2] < losses[1] < losses[0], losses
    _assert_same_packed(packed, _packed(model))

    model = apply_qlora(tiny_llama().to(torch.bfloat16), LLAMA_TARGETS, r=4, quant_storage=storage)
    packed, trainable = _packed(model), qkernels.trainable_parameters(model)
    peft.prepare_model_for_kbit_training(model)
    _assert_same_packed(packed, _packed(model))
    assert qkernels.trainable_parameters(model)[0] == 0
    qkernels.set_adapter(model, "default")
    assert qkernels.trainable_parameters(model) == trainable


def _frozen_adapter_warnings(model, ids) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids, labels=ids).loss.backward()
    return [str(w.message) for w in caught if "is frozen" in str(w.message)]


def test_training_with_the_adapter_frozen_by_prepare_model_for_kbit_training_warns():
    """prepare_model_for_kbit_training after apply_qlora freezes the LoRA weights; with gradient checkpointing's
    input gradients the backward still succeeds, so training ran and changed nothing, silently (the Trainer logged a
    constant loss). The forward now warns, naming the fix; normal training, eval and frozen-on-purpose inference
    do not."""
    model = apply_qlora(tiny_llama(), LLAMA_TARGETS, r=4)
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    assert _frozen_adapter_warnings(model, ids) == []
    peft.prepare_model_for_kbit_training(model)
    model.gradient_checkpointing_enable()  # what prepare_model_for_kbit_training does for a model loaded in 4 bits
    msgs = _frozen_adapter_warnings(model, ids)
    assert msgs and "set_adapter(model, 'default')" in msgs[0] and "before qkernels.apply_qlora" in msgs[0]
    model.eval()
    assert _frozen_adapter_warnings(model, ids) == []
    qkernels.set_adapter(model, "default")
    model.train()
    assert _frozen_adapter_warnings(model, ids) == []


# ---------------------------------------------------------------------------------------------- optimizers
def test_adamw_over_all_parameters_touches_only_lora():
    """``AdamW(model.parameters())``: frozen packed weights get no gradient and no optimizer state; the trainable
    count is peft's on the same model."""
    model = apply_qlora(tiny_llama(), LLAMA_TARGETS, r=8)
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=8, target_modules=LLAMA_TARGETS))
    assert qkernels.trainable_parameters(model) == ref.get_nb_trainable_parameters()
    model.train()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with_state = {id(p) for p in opt.state if opt.state[p]}
    for n, p in model.named_parameters():
        assert (id(p) in with_state) == (".lora_" in n), n
        assert (p.grad is not None) == (".lora_" in n), n


# ---------------------------------------------------------------------------------------------- mixed precision
def test_autocast_bf16_training_keeps_float32_adapters_and_the_packed_weights():
    """``torch.autocast("cpu", bfloat16)`` training: the matmuls run in bfloat16, the LoRA weights, their gradients
    and AdamW's state stay float32 (as peft's under autocast), the loss falls and the packed weights never change."""
    model = apply_qlora(tiny_llama(), LLAMA_TARGETS, r=4)
    packed = _packed(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = _train_three_steps(model, opt, autocast_dtype=torch.bfloat16)
    assert losses[2] < losses[1] < losses[0], losses
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert p.dtype == p.grad.dtype == opt.state[p]["exp_avg"].dtype == torch.float32, n
    _assert_same_packed(packed, _packed(model))


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
@pytest.mark.parametrize("cast", ["to-bf16", "half"])
def test_casting_the_model_after_apply_qlora_keeps_the_format_and_casts_lora_like_peft(storage, cast):
    """``model.to(torch.bfloat16)`` / ``.half()`` after apply_qlora: the packed bytes, absmax and quant_state.dtype
    survive; the LoRA weights take the new dtype exactly as peft's do on the same model; the model still trains."""

    def do(m):
        return m.to(torch.bfloat16) if cast == "to-bf16" else m.half()

    model = apply_qlora(tiny_llama(), LLAMA_TARGETS, r=4, quant_storage=storage)
    packed = _packed(model)
    state_dtypes = _state_dtypes(model)
    do(model)
    _assert_same_packed(packed, _packed(model))
    assert _state_dtypes(model) == state_dtypes
    ref = do(peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=LLAMA_TARGETS)))
    want = {n.removeprefix("base_model.model."): p.dtype for n, p in ref.named_parameters() if ".lora_" in n}
    assert {n: p.dtype for n, p in model.named_parameters() if ".lora_" in n} == want
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # AdamW's eps 1e-8 is 0 in float16: NaN there, with peft too
    losses = _train_three_steps(model, opt)
    assert losses[2] < losses[1] < losses[0], losses
    _assert_same_packed(packed, _packed(model))


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
def test_a_quantized_module_to_save_is_refused_before_any_change(tmp_path, storage):
    """A module to save is trained in full; one transformers loaded in 4 bits cannot be: with uint8 storage torch
    raised "only Tensors of floating point dtype can require gradients" halfway through apply_qlora (q_proj already
    replaced), and a bfloat16 quant_storage copy would have been trained as floats. Now a ValueError naming the module
    and the fix, with the model untouched."""
    model = bnb_llama(tmp_path, storage)
    before = {n: type(m).__name__ for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"selects 'model.layers.0.mlp.down_proj'.*llm_int8_skip_modules"):
        apply_qlora(model, ["q_proj"], r=4, modules_to_save=["layers.0.mlp.down_proj"])
    assert {n: type(m).__name__ for n, m in model.named_modules()} == before
    assert model.is_quantized


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
def test_trainable_count_on_a_4bit_model_is_peft_s(tmp_path, storage):
    """On a model transformers loaded in 4 bits (untargeted 4-bit layers left): peft's counts, where a packed
    Params4bit of n elements of b bytes counts 2 * n * b parameters."""
    ours = apply_qlora(bnb_llama(tmp_path, storage), ["q_proj", "v_proj"], r=8)
    ref = peft.get_peft_model(bnb_llama(tmp_path, storage), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert qkernels.trainable_parameters(ours) == ref.get_nb_trainable_parameters()
