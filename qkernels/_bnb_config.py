"""transformers' bitsandbytes config as qkernels reads it: which quantization method a model's
``config.quantization_config`` names, and transformers' rule for the modules its loader leaves unquantized.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any


def quantization_config(model: Any) -> Any:
    """``model.config.quantization_config`` (a dict, transformers' config object, or None)."""
    return getattr(getattr(model, "config", None), "quantization_config", None)


def method(qc: Any) -> str | None:
    """``quant_method`` of a quantization config (a dict or an object; transformers' enum is a str)."""
    m = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return None if m is None else str(getattr(m, "value", m))


def has_bnb_config(model: Any) -> bool:
    """``model.config.quantization_config`` is bitsandbytes' (an object or a dict), 4-bit or 8-bit."""
    return method(quantization_config(model)) == "bitsandbytes"


def transformers_skip(name: str, patterns: Iterable[str]) -> str | None:
    """The first of ``patterns`` under which transformers leaves module ``name`` unquantized, or None.

    transformers 5.23's ``quantizers_utils.should_convert_module``, which its bitsandbytes loader applies to
    ``llm_int8_skip_modules`` and ``_keep_in_fp32_modules``: a pattern matches as a regex from the start of the name up
    to a ``.`` boundary (``"layers.1"`` matches ``layers.1.attn``, not ``layers.11.attn``; ``"mlp.gate"`` not
    ``mlp.gate_proj``), or as a plain suffix of the name (``"o_proj"`` matches ``model.layers.0.self_attn.o_proj``)."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return next((p for p in sorted(patterns) if isinstance(p, str) and p
                 and (re.match(rf"(?:{p}){boundary}", name) or name.endswith(p))), None)
