"""README.md's Python blocks run, so the examples stay true.

A block runs as written unless the line above it is ``<!-- readme-test: ... -->``: then FILLERS below, keyed by that
text, fills in its placeholders (``model = ...``, a path to a peft adapter) before it runs. Each run happens in a
temporary directory, so relative paths in the examples land there. A block that cannot run at all would be marked
``<!-- readme-test: not run: <reason> -->``: the FSDP block (it needs torch.distributed processes; tests/test_fsdp.py
runs that flow).
"""

from __future__ import annotations

import copy
import re
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^<!-- readme-test: (.*) -->$")


def _python_blocks() -> list[tuple[int, str | None, str]]:
    """(line number of the fence, the readme-test marker above it or None, the block's source)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":  # at the margin or indented inside a list item
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            m = MARK.match(lines[i - 1].strip()) if i else None
            blocks.append((i + 1, m.group(1) if m else None, textwrap.dedent("\n".join(lines[i + 1:end]))))
            i = end
        i += 1
    return blocks


BLOCKS = _python_blocks()


def _tiny_llama():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _fill_qlora(src: str) -> tuple[str, dict]:
    import peft
    base = _tiny_llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    trained = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                                         init_lora_weights=False))
    trained.save_pretrained("peft-trained-adapter")
    assert "\nmodel = ...  " in "\n" + src and '"peft-trained-adapter"' in src, "the README block changed: update me"
    return src.replace("\nmodel = ...  ", "\nmodel = _base  ", 1), {"_base": base}


def _fill_meta(src: str) -> tuple[str, dict]:
    from safetensors.torch import save_file

    import qkernels

    source = _tiny_llama()
    qkernels.apply_qlora(source, "all-linear", r=16)
    Path("q4").mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, "q4/model.safetensors")
    ids = torch.randint(0, source.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    return src, {"config": source.config, "_source": source, "_ids": ids}


FILLERS = {
    "model = a small transformers Llama; peft-trained-adapter = one saved by peft": _fill_qlora,
    "config = a tiny Llama's config; q4/model.safetensors = its 4-bit state dict": _fill_meta,
}


def _check_use(ns: dict) -> None:
    assert ns["W_hat"].shape == ns["W"].shape and ns["W_hat"].dtype == torch.bfloat16
    import qkernels

    assert round(qkernels.bits_per_parameter(ns["packed"], ns["state"]), 3) == 4.127  # the README's comment
    assert torch.equal(qkernels.dequantize_4bit(ns["packed"], ns["state2"]), ns["W_hat"])


def _check_qlora(ns: dict) -> None:
    import qkernels

    assert Path("out/adapter/adapter_model.safetensors").is_file() and Path("out/adapter/adapter_config.json").is_file()
    assert not any(isinstance(m, qkernels.QLoRALinear) for m in ns["merged"].modules())


def _check_meta(ns: dict) -> None:
    import qkernels

    model, source = ns["model"], ns["_source"]
    assert sum(isinstance(m, qkernels.QLoRALinear) for m in model.modules()) == 14  # 2 layers x 7 projections
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(ns["_ids"]).logits, source(ns["_ids"]).logits)  # loaded = the model saved


def _check_tied(ns: dict) -> None:
    model = ns["model"]
    emb = model.model.embed_tokens.weight
    model.tie_weights()  # the tie survives transformers' own re-tying
    assert model.lm_head.weight is emb and sum(p is emb for p in model.parameters()) == 1  # counted once: no copy


def _check_mixed(ns: dict) -> None:
    import qkernels

    model, ids, logits = ns["model"], ns["ids"], ns["logits"]
    with torch.no_grad():
        for i, name in enumerate(["default", "other"]):
            qkernels.set_adapter(model, name)
            alone = model(ids).logits[i]
            assert (logits[i] - alone).abs().max() <= 8 * torch.finfo(torch.float32).eps * alone.abs().max()
        with qkernels.disable_adapters(model):
            assert torch.equal(logits[2], model(ids).logits[2])  # the base alone


CHECKS = {"packed, state = qkernels.quantize_4bit(W": _check_use,
          "qkernels.adapter_batch(model,": _check_mixed,
          "qkernels.apply_qlora(model, target_modules=": _check_qlora,
          "init_empty_weights()": _check_meta,
          "tie_word_embeddings=True": _check_tied}


def test_readme_has_the_blocks_this_file_knows():
    assert len(BLOCKS) >= 2
    for line, marker, src in BLOCKS:
        if marker is not None and marker.startswith("not run:"):
            assert marker[len("not run:"):].strip(), f"README.md:{line}: say why the block is not run"
        else:
            assert marker is None or marker in FILLERS, f"README.md:{line}: unknown readme-test marker {marker!r}"
            assert any(key in src for key in CHECKS), f"README.md:{line}: add a check for this block to CHECKS"


@pytest.mark.parametrize(
    "line,marker,src",
    [b for b in BLOCKS if not (b[1] or "").startswith("not run:")],
    ids=[f"README.md:{b[0]}" for b in BLOCKS if not (b[1] or "").startswith("not run:")],
)
def test_readme_python_block_runs(line, marker, src, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "readme"}
    if marker is not None:
        src, extra = FILLERS[marker](src)
        ns.update(extra)
    exec(compile(src, f"README.md:{line}", "exec"), ns)
    for key, check in CHECKS.items():
        if key in src:
            check(ns)
