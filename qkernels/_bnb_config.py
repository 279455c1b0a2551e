"""The 4-bit format a transformers bitsandbytes config names, for ``apply_qlora`` on a model built on the meta device.

A model built from a 4-bit checkpoint's ``config.json`` (``AutoConfig.from_pretrained`` + ``from_config`` under
accelerate's ``init_empty_weights``) carries ``config.quantization_config``: a dict as ``config.json`` has it, or
transformers' ``BitsAndBytesConfig`` on a model it built. accelerate's loaders load each key cast to the model's
tensor's dtype and drop keys the model lacks, so the meta layers must already be in the checkpoint's format
(``_accelerate.FORMAT``); the config says which. ``apply_qlora`` takes it for the format arguments the user left at
their defaults (``Default``) and refuses an explicit one that contradicts it (``resolve``).

What the config holds (transformers 5.23, ``utils/quantization_config.py``): ``load_in_4bit`` / ``load_in_8bit``,
``quant_method: "bitsandbytes"``, ``bnb_4bit_quant_type`` (default ``"fp4"``), ``bnb_4bit_use_double_quant`` (False),
``bnb_4bit_quant_storage`` (uint8), ``bnb_4bit_compute_dtype`` (float32; written even when never set) and
``llm_int8_skip_modules`` (None: transformers' default skips). No blocksize: bitsandbytes' ``Linear4bit`` through
transformers always quantizes at 64, and each weight's blob (``quant_state.bitsandbytes__<type>``) records its own,
which a meta layer takes at load whatever it was built with.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .quant_state import as_dtype


class Default:
    """An ``apply_qlora`` format argument left at its documented default, told apart from the same value passed: on a
    meta model with a bitsandbytes 4-bit ``quantization_config`` a default yields to the config, a passed value must
    agree with it. Its repr is the value's, so ``help(apply_qlora)`` and ``inspect.signature`` read
    ``quant_type: str = 'nf4'``; passing the object itself (forwarding a signature's defaults) counts as not passing."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


@dataclass(frozen=True)
class ConfigFormat:
    """The fields of a bitsandbytes 4-bit ``quantization_config`` that decide the layers, transformers' defaults
    where a field is absent. ``skip_modules``: ``llm_int8_skip_modules`` (None: transformers' default skips)."""

    quant_type: str
    double_quant: bool
    quant_storage: torch.dtype
    compute_dtype: torch.dtype
    skip_modules: tuple[str, ...] | None

    def describe(self) -> str:
        return (f"quant_type={self.quant_type!r}, double_quant={self.double_quant}, "
                f"quant_storage={self.quant_storage}, compute_dtype={self.compute_dtype}")


# apply_qlora's argument -> (config.json field, ConfigFormat attribute); compute_dtype and blocksize are not here:
# see resolve()
_CHECKED = {"quant_type": "bnb_4bit_quant_type", "double_quant": "bnb_4bit_use_double_quant",
            "quant_storage": "bnb_4bit_quant_storage"}


def quantization_config(model: Any) -> Any:
    """``model.config.quantization_config`` (a dict, transformers' config object, or None)."""
    return getattr(getattr(model, "config", None), "quantization_config", None)


def _field(qc: Any, name: str, default: Any) -> Any:
    value = qc.get(name, default) if isinstance(qc, dict) else getattr(qc, name, default)
    return default if value is None else value


def method(qc: Any) -> str | None:
    """``quant_method`` of a quantization config (a dict or an object; transformers' enum is a str)."""
    m = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return None if m is None else str(getattr(m, "value", m))


def has_bnb_config(model: Any) -> bool:
    """``model.config.quantization_config`` is bitsandbytes' (an object or a dict), 4-bit or 8-bit."""
    return method(quantization_config(model)) == "bitsandbytes"


def config_format(model: Any) -> ConfigFormat | None:
    """The format ``model.config.quantization_config`` names; None without one.

    As transformers' ``AutoQuantizationConfig.from_dict`` reads it: ``load_in_4bit`` makes it bitsandbytes 4-bit
    whatever ``quant_method`` says. Raises ValueError for any other quantization (8-bit bitsandbytes, GPTQ, AWQ, ...):
    its checkpoint holds no bitsandbytes 4-bit weights, and a meta model's ``QLoRALinear`` layers could load none."""
    qc = quantization_config(model)
    if qc is None:
        return None
    load_4bit = _field(qc, "load_in_4bit", None)
    if load_4bit is None and isinstance(qc, dict):
        load_4bit = qc.get("_load_in_4bit")
    if not load_4bit:
        m = method(qc)
        what = ("bitsandbytes 8-bit (load_in_8bit)" if m == "bitsandbytes" and _field(qc, "load_in_8bit", False)
                else f"quant_method={m!r}" + (", without load_in_4bit" if m == "bitsandbytes" else ""))
        raise ValueError(
            f"model.config.quantization_config is {what}, and the model is on the meta device: qkernels reads "
            "bitsandbytes 4-bit checkpoints only (load_in_4bit: transformers' save_pretrained of a "
            "BitsAndBytesConfig(load_in_4bit=True) model, or qkernels.quantize_checkpoint), and 8-bit or other "
            "quantized layers are not supported, so no layer of this checkpoint could load. Load a float or a "
            "bitsandbytes 4-bit checkpoint instead; if the config is stale and the checkpoint you will load is "
            "bitsandbytes 4-bit, set model.config.quantization_config = None first (then pass its quant_type, "
            "double_quant and quant_storage to apply_qlora)")
    skip = _field(qc, "llm_int8_skip_modules", None)
    if isinstance(skip, str):
        skip = [skip]
    fmt = ConfigFormat(
        quant_type=_field(qc, "bnb_4bit_quant_type", "fp4"),
        double_quant=_field(qc, "bnb_4bit_use_double_quant", False),
        quant_storage=as_dtype(_field(qc, "bnb_4bit_quant_storage", torch.uint8)),
        compute_dtype=as_dtype(_field(qc, "bnb_4bit_compute_dtype", torch.float32)),
        skip_modules=None if skip is None else tuple(skip),
    )
    _check(fmt)
    return fmt


def _check(fmt: ConfigFormat) -> None:
    """The config's values, checked as apply_qlora's arguments are, naming the config field."""
    from .nn import _check_quant_args

    if not isinstance(fmt.double_quant, bool):
        raise ValueError(f"model.config.quantization_config: bnb_4bit_use_double_quant must be a bool, got "
                         f"{fmt.double_quant!r}")
    if fmt.skip_modules is not None and not all(isinstance(s, str) for s in fmt.skip_modules):
        raise ValueError(f"model.config.quantization_config: llm_int8_skip_modules must be a list of module names, "
                         f"got {list(fmt.skip_modules)!r}")
    try:
        _check_quant_args(fmt.quant_type, 64, fmt.quant_storage, fmt.compute_dtype)
    except ValueError as e:
        field = next((f for a, f in (("quant_type", "bnb_4bit_quant_type"), ("quant_storage", "bnb_4bit_quant_storage"),
                                     ("compute_dtype", "bnb_4bit_compute_dtype")) if str(e).startswith(a)), "")
        raise ValueError(f"model.config.quantization_config: {field}: {e}") from None


def resolve(args: dict[str, Any], fmt: ConfigFormat | None) -> dict[str, Any]:
    """apply_qlora's format arguments (``quant_type``, ``double_quant``, ``blocksize``, ``compute_dtype``,
    ``quant_storage``; a ``Default`` where not passed) -> their values.

    ``fmt`` None (no meta model, or no config): each default's documented value, as before the config was read.
    Otherwise each default takes the config's value, and a passed ``quant_type`` / ``double_quant`` /
    ``quant_storage`` that differs is a ValueError: accelerate's loaders would refuse or corrupt the checkpoint
    (``_accelerate.FORMAT``). A passed ``compute_dtype`` wins, as it does over a bitsandbytes layer's own in
    ``QLoRALinear.from_bnb``: it is the matmul's precision, not stored in the checkpoint (and transformers writes
    ``bnb_4bit_compute_dtype: float32`` when none was set). ``blocksize`` has no config field: 64 by default, and a
    passed one is kept (a meta layer takes its checkpoint's blocksize at load, and ``quantize_checkpoint`` writes the
    same config for any blocksize)."""
    out = {k: as_dtype(v) if k in ("compute_dtype", "quant_storage") else v for k, v in args.items()}
    if fmt is None:
        return {k: v.value if isinstance(v, Default) else v for k, v in out.items()}
    from .nn import _check_quant_args

    values = {k: getattr(fmt, k, v.value) if isinstance(v, Default) else v for k, v in out.items()}
    # a bad value ("NF4", "bf16") is named as such, not as a contradiction of the config
    _check_quant_args(values["quant_type"], values["blocksize"], values["quant_storage"], values["compute_dtype"])
    for arg, field in _CHECKED.items():
        given, want = out[arg], getattr(fmt, arg)
        if not isinstance(given, Default) and given != want:
            raise ValueError(
                f"{arg}={given!r} contradicts model.config.quantization_config's {field}={want!r}: this meta model is "
                f"built for a bitsandbytes 4-bit checkpoint in that format, and accelerate's loaders need its layers "
                f"in it. Leave {arg} out (apply_qlora takes the config's) or pass {arg}={want!r}; if the checkpoint "
                f"you will load is really {arg}={given!r}, correct {field} in its config.json")
    return values


def _transformers_should_convert() -> Any:
    """The installed transformers' ``quantizers_utils.should_convert_module``, or None (absent, or no transformers)."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return None
    return should_convert_module


def transformers_skip(name: str, patterns: Iterable[str]) -> str | None:
    """The first of ``patterns`` under which transformers leaves module ``name`` unquantized, or None.

    The rule is the installed transformers' own ``quantizers_utils.should_convert_module``, which its bitsandbytes
    loader applies to ``llm_int8_skip_modules`` and ``_keep_in_fp32_modules``: the checkpoint to be loaded was made by a
    loader that followed it, and the rule changed between releases (transformers 5.17 matches a pattern as a plain
    regex prefix, so ``"model.layers.1"`` also skips ``model.layers.11``; 5.23 stops a pattern at a ``.`` boundary).
    Without that function (an older or no transformers), 5.23's rule: a pattern matches as a regex from the start of
    the name up to a ``.`` boundary (``"layers.1"`` matches ``layers.1.attn``, not ``layers.11.attn``; ``"mlp.gate"``
    not ``mlp.gate_proj``), or as a plain suffix of the name (``"o_proj"`` matches
    ``model.layers.0.self_attn.o_proj``)."""
    patterns = sorted(p for p in patterns if isinstance(p, str) and p)
    should_convert = _transformers_should_convert()
    if should_convert is not None:
        return next((p for p in patterns if not should_convert(name, [p])), None)
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return next((p for p in patterns if re.match(rf"(?:{p}){boundary}", name) or name.endswith(p)), None)
