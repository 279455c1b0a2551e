"""``torch.compile(model)``'s wrapper, seen through by the model-level functions.

``torch.compile(model)`` returns a ``torch._dynamo.eval_frame.OptimizedModule`` that holds ``model`` as its submodule
``_orig_mod``: every name under it (``named_modules()``, ``state_dict()``) gains an ``_orig_mod.`` prefix. The model's
own methods do not see it (``compiled.save_pretrained`` runs on ``model``), but a function that walks the wrapper did:
``save_adapter(compiled, path)`` wrote ``base_model.model._orig_mod.model.layers...`` keys, which peft loaded as
"missing adapter keys" (a trained adapter silently replaced by its zero init), and ``load_adapter`` / ``apply_qlora``
with a regex found no module. So each model-level function (``apply_qlora``, ``save_adapter``, ``load_adapter``,
``merge_and_unload``, ...) acts on the wrapped model and gives the names, files and results of the uncompiled one, as
peft does (``get_peft_model_state_dict(unwrap_compiled=...)``, its ``_orig_mod.`` prefix stripped on load). A
function that returns or yields the model it was given still returns the wrapper, so ``model = apply_qlora(model)``
keeps a compiled model compiled.

A compiled submodule put back into the tree (``model.layers[0] = torch.compile(model.layers[0])``) puts ``_orig_mod``
in the middle of its names; ``nn.Module.compile()`` compiles in place and does not, so that is the form to use per
layer (adapter files refuse the other, ``qkernels.adapter_files``).
"""

from __future__ import annotations

import sys
from typing import Any

ORIG_MOD = "_orig_mod"  # OptimizedModule's attribute (and submodule name) for the compiled module


def unwrap_compiled(model: Any) -> Any:
    """The module ``torch.compile`` wrapped (through any number of wrappers), or ``model`` itself."""
    # An OptimizedModule exists only once dynamo is imported: no import here (it costs ~1 s when nothing compiled).
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model = getattr(model, ORIG_MOD)
    return model


def strip_compiled_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A compiled model's ``state_dict()`` under the uncompiled model's keys (leading ``_orig_mod.`` removed)."""
    prefix = ORIG_MOD + "."
    out = {}
    for k, v in state_dict.items():
        while k.startswith(prefix):
            k = k[len(prefix):]
        out[k] = v
    return out
