"""Every public name has a docstring that reads right in help(): it names each argument, says what it returns, and,
where the function itself raises, which errors.

Public = ``qkernels.__all__`` and the names of the submodules users import (``qkernels.reference``,
``qkernels.adapters``, ``qkernels.codebooks``), with the public methods and properties of the public classes.
"""

from __future__ import annotations

import ast
import enum
import inspect
import re
import textwrap
import types

import torch

import qkernels

MODULES = {
    "qkernels": qkernels,
    "qkernels.reference": qkernels.reference,
    "qkernels.adapters": qkernels.adapters,
    "qkernels.codebooks": qkernels.codebooks,
}
# Called by torch, not by users: autograd's entry points are documented on matmul_4bit_lora, which calls them.
NOT_USER_FACING = {"QLoRAFunction.forward", "QLoRAFunction.backward", "QLoRAFunction.setup_context"}


def _public_names(module: types.ModuleType) -> list[str]:
    return list(getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")])


found_properties: set[str] = set()


def _public_objects() -> dict[str, object]:
    """qualified name -> function, class, method or property getter, each once (the first module listing it)."""
    found: dict[str, object] = {}
    seen: set[int] = set()
    found_properties.clear()
    for mod_name, module in MODULES.items():
        for name in _public_names(module):
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType) or id(obj) in seen:
                continue
            if not getattr(obj, "__module__", "").startswith("qkernels"):
                continue  # re-exported from elsewhere (typing, torch)
            seen.add(id(obj))
            if inspect.isclass(obj):
                found[f"{mod_name}.{name}"] = obj
                for attr, value in vars(obj).items():
                    if attr.startswith("_") or f"{name}.{attr}" in NOT_USER_FACING:
                        continue
                    fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                    if inspect.isfunction(fn):
                        found[f"{mod_name}.{name}.{attr}"] = fn
                        if isinstance(value, property):
                            found_properties.add(f"{mod_name}.{name}.{attr}")
            elif callable(obj):
                found[f"{mod_name}.{name}"] = obj
    return found


PUBLIC = _public_objects()  # fills found_properties
# a property's docstring describes the value itself ("Elements per block"): no "Returns" needed
PROPERTIES = set(found_properties)


def _documented_parameters(obj: object) -> list[str]:
    if inspect.isclass(obj):
        if issubclass(obj, enum.Enum) or "__init__" not in vars(obj) and "__new__" not in vars(obj):
            return []  # Enum's or an inherited constructor (nn.Module, autograd.Function): not ours to document
        if issubclass(obj, torch.autograd.Function):
            return []
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.name not in ("self", "cls") and not p.name.startswith("_")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _raises_directly(obj: object) -> bool:
    """Whether the function's own body (not a nested function) has a ``raise`` statement."""
    if not inspect.isfunction(obj):
        return False
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    fn = tree.body[0]

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Raise) and child.exc is not None:
                return True
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)) and walk(child):
                return True
        return False

    return walk(fn)


def _returns_value(obj: object) -> bool:
    if not inspect.isfunction(obj):
        return False
    ann = inspect.signature(obj).return_annotation
    return ann not in (inspect.Signature.empty, None, "None") and not (inspect.isgeneratorfunction(obj))


def _problems(qualname: str, obj: object) -> list[str]:
    doc = inspect.getdoc(obj)
    if not doc:
        return ["no docstring"]
    probs = [f"argument {p!r} not described" for p in _documented_parameters(obj)
             if not re.search(rf"(?<![\w.]){re.escape(p)}(?!\w)", doc)]
    returns = r"\b[Rr]eturns?\b|\bgives\b|->|\bthe (?:\w+ )?(?:tensor|list|dict)\b"
    if qualname not in PROPERTIES and _returns_value(obj) and not re.search(returns, doc):
        probs.append("what it returns is not said ('Returns ...')")
    if _raises_directly(obj) and not re.search(r"\b[Rr]aises?\b|\w+Error\b|\brefuse[sd]?\b|\berror\b", doc):
        probs.append("it raises, but the docstring names no error ('Raises: ValueError ...')")
    return probs


def test_the_public_surface_is_found():
    for name in ("qkernels.quantize_4bit", "qkernels.QLoRALinear.forward", "qkernels.QuantState.as_dict",
                 "qkernels.reference.matmul_4bit_lora", "qkernels.adapters.adapter_state_dict",
                 "qkernels.Params4bit.blocksize"):
        assert name in PUBLIC, name
    assert len(PUBLIC) > 60


def test_every_public_name_has_a_complete_docstring():
    """A public function without a docstring, or one whose docstring leaves out an argument, its return value or the
    errors it raises, fails here: help() is the first thing a user reads."""
    bad = {name: p for name, obj in PUBLIC.items() if (p := _problems(name, obj))}
    assert not bad, "\n".join(f"{name}: {'; '.join(p)}" for name, p in sorted(bad.items()))


def test_package_docstring_lists_the_public_api():
    """help(qkernels) opens with the public API: every name in __all__ is in it."""
    missing = [n for n in qkernels.__all__ if not re.search(rf"(?<!\w){re.escape(n)}(?!\w)", qkernels.__doc__)]
    assert not missing, f"add to qkernels/__init__.py's docstring: {missing}"


def test_help_renders_the_package():
    import pydoc

    text = pydoc.render_doc(qkernels, renderer=pydoc.plaintext)
    assert "quantize_4bit" in text and "matmul_4bit_lora" in text and "apply_qlora" in text
