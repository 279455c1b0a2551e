"""``quantize_checkpoint``: a float safetensors checkpoint too big for RAM -> a bitsandbytes 4-bit checkpoint, streamed.

The source is read one tensor at a time (``safetensors.safe_open``); each targeted Linear weight is quantized with
``quantize_4bit`` and written as bitsandbytes' keys (``<module>.weight`` packed, ``.weight.absmax``,
``.weight.quant_map``, ``.weight.nested_absmax``, ``.weight.nested_quant_map``,
``.weight.quant_state.bitsandbytes__<type>``: what transformers' ``save_pretrained`` writes for a model loaded with
``BitsAndBytesConfig(load_in_4bit=True)``); every other tensor is copied. Peak memory is one source tensor plus one
output shard (``max_shard_size``). The output loads with transformers' ``from_pretrained`` (its ``config.json`` gets the
matching ``quantization_config``), with bitsandbytes, and into a qkernels model built on the meta device
(``apply_qlora`` + ``load_state_dict(sd, assign=True)``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .functional import quantize_4bit
from .nn import _check_quant_args, is_conv1d
from .quant_state import FLOAT_DTYPES

__all__ = ["quantize_checkpoint"]

logger = logging.getLogger("qkernels")

INDEX_NAME = "model.safetensors.index.json"
_FLOAT_CODES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# weight files of other formats in a checkpoint directory: never copied to the 4-bit one (_is_weight_file)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.uint8: "uint8"}


def _source_files(src: Path, arg: str = "src_dir") -> list[Path]:
    """The safetensors files of directory ``src`` in order: those its index names (sorted), else every
    ``*.safetensors``. ``arg`` names the caller's argument in the errors (also used by ``qkernels.load_checkpoint``)."""
    index = src / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({src / f for f in weight_map.values()})
    else:
        files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{arg} {str(src)!r} holds no *.safetensors checkpoint (a .bin checkpoint must be "
                                "converted to safetensors first, e.g. by save_pretrained(safe_serialization=True))")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{INDEX_NAME} in {str(src)!r} names shards that do not exist: {missing}")
    return files


def _skeleton_from_config(src: Path) -> tuple[nn.Module | None, str]:
    """The model class named by ``src/config.json``, built on the meta device (no memory), or None and the reason
    (no config, no transformers, a class transformers lacks: custom code is never run, a config it refuses)."""
    if not (src / "config.json").is_file():
        return None, "src_dir has no config.json"
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed"
    try:
        # trust_remote_code=False: a custom-code config would otherwise prompt on stdin ("run the custom code? [y/N]")
        config = transformers.AutoConfig.from_pretrained(src, trust_remote_code=False)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            return None, f"config.json names no transformers model class (architectures={archs})"
        with torch.device("meta"):
            return cls._from_config(config), ""
    except Exception as e:  # noqa: BLE001 - any failure only means: no structure, names are needed
        return None, f"transformers cannot build config.json's model ({type(e).__name__}: {str(e)[:200]})"


def _kept_in_float32(model: nn.Module | None, dtype: torch.dtype | None) -> re.Pattern | None:
    """Which keys transformers loads in float32 whatever ``dtype`` asks (its ``_get_dtype_plan``): the
    ``_keep_in_fp32_modules`` patterns when ``dtype`` is float16 (T5's ``wo``), ``_keep_in_fp32_modules_strict`` for
    float16 and bfloat16. Matched as transformers does (``*`` as ``.*``, searched anywhere in the key). None: none."""
    if model is None or dtype not in (torch.float16, torch.bfloat16):
        return None
    patterns = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    patterns = [p for p in patterns if isinstance(p, str) and p]
    return re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns)) if patterns else None


def _read_header(files: list[Path]) -> dict[str, tuple[Path, list[int], str]]:
    """``{key: (file, shape, dtype code)}`` from the files' headers, without reading any tensor data."""
    from safetensors import safe_open

    out: dict[str, tuple[Path, list[int], str]] = {}
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not a dict
                if k in out:
                    raise ValueError(f"key {k!r} is in two source files: {out[k][0].name} and {f.name}")
                sl = sf.get_slice(k)
                out[k] = (f, list(sl.get_shape()), sl.get_dtype())
    return out


def _check_not_kept_in_float(model: nn.Module, names: list[str], target_modules: Any) -> None:
    """Refuse to write 4-bit weights for what transformers keeps in float (``_keep_in_fp32_modules``, T5's ``wo``):
    its bitsandbytes loader leaves those modules float Linears, which cannot take packed bytes. (``apply_qlora`` gives
    such a target a float base instead; here 'all-linear' or a regex leaves them float before this check.)"""
    from .model import _kept_in_float

    kept = _kept_in_float(model, names)
    if kept:
        patterns = sorted(set(kept.values()))
        shown = list(kept)[:4] + (["..."] if len(kept) > 4 else [])
        raise ValueError(
            f"target_modules={target_modules!r} names modules {shown} that match {type(model).__name__}'s "
            f"_keep_in_fp32_modules {patterns}: transformers' bitsandbytes loader keeps them float, so a 4-bit weight "
            f"there would not load. Leave them out: exclude_modules={patterns!r}, or a target_modules list without "
            "them ('all-linear' leaves them float by itself)")


def _drop_linear_subclasses(model: nn.Module, names: list[str], target_modules: Any) -> list[str]:
    """transformers' bitsandbytes loader converts ``type(module) is nn.Linear`` and ``Conv1D`` only
    (``integrations.bitsandbytes.replace_with_bnb_linear``): a subclass (Falcon's ``FalconLinear``) stays a float
    layer, which cannot take packed bytes (``from_pretrained`` failed on a size mismatch). 'all-linear' or a regex
    leaves them float, as transformers' own 4-bit save does; a list naming them is refused."""
    sub = [n for n in names if isinstance(model.get_submodule(n), nn.Linear) and type(model.get_submodule(n))
           is not nn.Linear]
    if not sub:
        return names
    kinds = sorted({type(model.get_submodule(n)).__name__ for n in sub})
    why = (f"{kinds} subclass nn.Linear, and transformers' bitsandbytes loader converts only nn.Linear itself "
           "(and Conv1D): it keeps them float, so 4-bit weights there would not load")
    if not isinstance(target_modules, str):
        raise ValueError(f"target modules {sub[:4]}{' ...' if len(sub) > 4 else ''} of {type(model).__name__}: {why}. "
                         f"Leave them out: exclude_modules={sorted({n.rsplit('.', 1)[-1] for n in sub})!r}")
    left = [n for n in names if n not in sub]
    if not left:
        raise ValueError(f"target_modules={target_modules!r} on {type(model).__name__}: every target is one of "
                         f"{kinds}; {why}, so the checkpoint would hold no 4-bit weight. Load the float model and "
                         "call qkernels.apply_qlora on it instead (it quantizes them)")
    logger.info("quantize_checkpoint: %d nn.Linear subclass layer(s) %s left float, as transformers' loader does: %s",
                len(sub), kinds, sub[:4])
    return left


def _select_targets(header: dict, model: nn.Module | None, target_modules: Any, exclude_modules: Any,
                    no_model_reason: str = "") -> tuple[dict[str, bool], list[str]]:
    """``({module name: stored transposed (Conv1D)}, transformers' llm_int8_skip_modules)``; every check up front."""
    from .model import (
        ALL_LINEAR,
        _check_each_target_matches,
        _check_not_tied,
        _is_excluded,
        _is_linear,
        _is_target,
        _kept_in_float,
        match_target_modules,
    )

    if model is not None:
        linear_names = [n for n, m in model.named_modules() if _is_linear(m)]
        names = match_target_modules(model, target_modules, exclude_modules)
        _check_each_target_matches(model, target_modules, exclude_modules, names, linear_names)
        bad = [n for n in names if not _is_linear(model.get_submodule(n))]
        if bad:
            raise ValueError(f"target modules {bad[:4]} are not nn.Linear / Conv1D layers of {type(model).__name__}; "
                             "only Linear weights are quantized")
        kept = _kept_in_float(model, names)
        if kept and isinstance(target_modules, str):  # 'all-linear' / a regex: left float, as transformers' loader
            names = [n for n in names if n not in kept]  # does (an explicit list naming them is refused below)
            logger.info("quantize_checkpoint: %d module(s) of _keep_in_fp32_modules left float: %s", len(kept),
                        sorted(kept)[:4])
        names = _drop_linear_subclasses(model, names, target_modules)
        _check_not_kept_in_float(model, names, target_modules)
        _check_not_tied(model, names)
        targets = {n: is_conv1d(model.get_submodule(n)) for n in names}
        for n, conv in targets.items():
            m = model.get_submodule(n)
            want = [m.nx, m.nf] if conv else [m.out_features, m.in_features]
            got = header.get(n + ".weight")
            if got is None:
                raise ValueError(f"target module {n!r} of {type(model).__name__} has no {n + '.weight'!r} in the "
                                 "checkpoint: its keys name modules differently (e.g. a prefix); pass model= built so "
                                 "that model.state_dict() keys are the checkpoint's, or a list of names")
            if got[1] != want:
                raise ValueError(f"checkpoint tensor {n + '.weight'!r} has shape {got[1]}, the model's layer {want}")
        skip = sorted(set(linear_names) - set(targets))
    else:
        if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
            raise ValueError("target_modules='all-linear' needs the model's structure (which 2-D weights are Linear "
                             f"layers), and there is none ({no_model_reason}): pass model= (e.g. built under "
                             "torch.device('meta')) or a list of module names, e.g. ['q_proj', 'v_proj']")
        cands = [k[: -len(".weight")] for k in header if k.endswith(".weight")]
        names = [n for n in cands if _is_target(n, target_modules) and not _is_excluded(n, exclude_modules)]
        if not isinstance(target_modules, str):
            for t in target_modules:
                if not any(_is_target(n, [t]) for n in cands):
                    raise ValueError(f"target_modules entry {t!r} matches no '<module>.weight' key of the checkpoint")
        if not names:
            raise ValueError(f"target_modules {target_modules!r} matches no '<module>.weight' key of the checkpoint")
        targets = dict.fromkeys(names, False)
        # without the structure, every other 2-D float weight may be a Linear: all are named, else transformers'
        # loader would make each Linear it finds 4-bit and leave the float weight unquantized in it (a broken model)
        skip = sorted(n for n in cands if n not in targets and len(header[n + ".weight"][1]) == 2
                      and header[n + ".weight"][2] in _FLOAT_CODES)
    for n in targets:
        _, shape, code = header[n + ".weight"]
        if len(shape) != 2 or code not in _FLOAT_CODES:
            raise ValueError(f"checkpoint tensor {n + '.weight'!r} is {code} {shape}: only 2-D float32/float16/"
                             "bfloat16 Linear weights are quantized (already a 4-bit checkpoint? an embedding?); "
                             "exclude it")
    return targets, skip


def _quantization_config(quant_type: str, double_quant: bool, quant_storage: torch.dtype,
                         compute_dtype: torch.dtype, skip: list[str]) -> dict[str, Any]:
    """transformers' ``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`` for this format."""
    kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                  bnb_4bit_quant_storage=quant_storage, bnb_4bit_compute_dtype=compute_dtype,
                  llm_int8_skip_modules=skip)
    try:
        from transformers import BitsAndBytesConfig
    except ImportError:  # the fields transformers 4.4x-5.x writes
        out = dict(kwargs)
        out.update(_load_in_4bit=True, _load_in_8bit=False, load_in_8bit=False, quant_method="bitsandbytes",
                   bnb_4bit_quant_storage=_DTYPE_NAMES[quant_storage],
                   bnb_4bit_compute_dtype=_DTYPE_NAMES[compute_dtype], llm_int8_threshold=6.0,
                   llm_int8_has_fp16_weight=False, llm_int8_enable_fp32_cpu_offload=False)
        return out
    return BitsAndBytesConfig(**kwargs).to_dict()


class _ShardWriter:
    """Collects output tensors and writes a shard when the next one would pass ``max_shard_size`` bytes."""

    def __init__(self, dst: Path, max_shard_size: int):
        self.dst, self.max = dst, max_shard_size
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[Path, list[str]]] = []  # (temporary path, keys) per shard written
        self.renamed: list[Path] = []  # final names given so far by finish()
        self.total = 0

    def add(self, group: dict[str, torch.Tensor]) -> None:
        """Add tensors that belong together (a weight and its quant state): they land in the same shard."""
        nbytes = sum(t.numel() * t.element_size() for t in group.values())
        if self.buffer and self.size + nbytes > self.max:
            self.flush()
        self.buffer.update(group)
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.dst / f".qkernels-shard-{len(self.files):05d}.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.buffer.items()}, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> list[str]:
        """Rename the shards as transformers names them (and write the index when there are several)."""
        self.flush()
        n = len(self.files)
        if n == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (tmp, _), name in zip(self.files, names, strict=True):
            os.replace(tmp, self.dst / name)
            self.renamed.append(self.dst / name)
        if n > 1:
            weight_map = {k: name for (_, keys), name in zip(self.files, names, strict=True) for k in keys}
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names

    def discard(self) -> None:
        """Remove every shard written, under its temporary or its final name."""
        for path in [tmp for tmp, _ in self.files] + self.renamed:
            path.unlink(missing_ok=True)


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be a positive int (bytes) or a string like '5GB' / '500MiB', "
                         f"got {size!r}")
    unit = m[2].upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m[1]) * base ** {"K": 1, "M": 2, "G": 3}[unit[0]])


def quantize_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    target_modules: str | Iterable[str] = "all-linear",
    *,
    exclude_modules: str | Iterable[str] | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    quant_storage: torch.dtype = torch.uint8,
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    model: nn.Module | None = None,
    max_shard_size: int | str = "5GB",
    verbose: bool = True,
    log_every: int = 50,
) -> dict[str, Any]:
    """Quantize the Linear weights of a float safetensors checkpoint to 4 bits, one tensor at a time.

    Args:
        src_dir: a directory with ``model.safetensors`` or shards with ``model.safetensors.index.json`` (float
            weights), and usually ``config.json``; every other file in it (tokenizer, generation config) is copied,
            except weights in other formats (``pytorch_model*.bin``, ``*.pth``, ``*.h5``, ... and their indexes) and
            subdirectories.
        dst_dir: where the 4-bit checkpoint goes (created; must hold no ``*.safetensors`` yet): ``model.safetensors``
            or ``model-0000i-of-0000n.safetensors`` + index, ``config.json`` with transformers' bitsandbytes
            ``quantization_config``. Shards are written under temporary names and renamed at the end; on an error they
            are removed.
        target_modules, exclude_modules: peft's rules, as ``apply_qlora`` (``"all-linear"``: every Linear but the
            output embedding). Which weights are Linear comes from ``model``, else from the class that
            ``src_dir/config.json`` names (built on the meta device: no memory); without either, pass a list of names
            or a regex (matched against ``<module>`` of each ``<module>.weight`` key). transformers' ``Conv1D``
            (GPT-2) weights are stored transposed to ``[out, in]``, as transformers' bitsandbytes loader stores them.
            Modules the model lists in ``_keep_in_fp32_modules`` (T5's ``wo``) stay float under ``"all-linear"`` or a
            regex, as transformers' loader leaves them; a list that names one is refused (ValueError).
        quant_type, double_quant, blocksize, quant_storage: the 4-bit format (``quantize_4bit``).
        dtype: cast every float tensor to this dtype first (the quantized weights' ``quant_state.dtype``, and the
            copied ones), except those transformers keeps in float32 at this dtype (``_keep_in_fp32_modules`` at
            float16, e.g. T5's ``wo``; ``_keep_in_fp32_modules_strict``), which are stored in float32 as
            transformers loads them; None: as stored.
        compute_dtype: ``bnb_4bit_compute_dtype`` written to the config; None: ``dtype`` or float32.
        model: the model's structure (any device, meta included) whose ``state_dict`` keys are the checkpoint's.
        max_shard_size: bytes per output shard (an int, or ``"5GB"``, ``"500MiB"``); a weight and its quant state stay
            in one shard.
        verbose: progress lines on stderr (always on the ``qkernels`` logger at INFO) every ``log_every`` tensors.

    Returns ``{"quantized": [module names], "tensors": n, "files": [shard names], "bytes_in": n, "bytes_out": n}``.

    Memory: one source tensor (read with ``safe_open``), its quantized form, and the output shard being filled.
    """
    from safetensors import safe_open

    src, dst = Path(src_dir), Path(dst_dir)
    _check_quant_args(quant_type, blocksize, quant_storage, compute_dtype)
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant must be a bool, got {double_quant!r}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be None (as stored) or one of {FLOAT_DTYPES}, got {dtype!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every <= 0:
        raise ValueError(f"log_every must be a positive int, got {log_every!r}")
    shard_bytes = _parse_size(max_shard_size)
    if not src.is_dir():
        raise FileNotFoundError(f"src_dir {str(src)!r} is not a directory")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError("dst_dir must differ from src_dir: the float checkpoint is read while the 4-bit one is "
                         "written")
    if dst.exists() and any(dst.glob("*.safetensors")):
        raise FileExistsError(f"dst_dir {str(dst)!r} already holds *.safetensors files; choose an empty directory")
    files = _source_files(src)
    header = _read_header(files)
    if any(k.endswith(".weight.absmax") or ".weight.quant_state." in k for k in header):
        raise ValueError(f"src_dir {str(src)!r} is already a 4-bit checkpoint (it has '.weight.absmax' keys)")
    no_model_reason = ""
    if model is None:
        model, no_model_reason = _skeleton_from_config(src)
    targets, skip = _select_targets(header, model, target_modules, exclude_modules, no_model_reason)
    keep_fp32 = _kept_in_float32(model, dtype)
    dst.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        logger.info(line)
        if verbose:
            print(line, file=sys.stderr, flush=True)

    writer = _ShardWriter(dst, shard_bytes)
    t0, done, nq, bytes_in = time.perf_counter(), 0, 0, 0
    say(f"quantize_checkpoint: {len(header)} tensors in {len(files)} file(s), {len(targets)} Linear weights to "
        f"quantize ({quant_type}, blocksize {blocksize}, double_quant={double_quant})")
    try:
        for f in files:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for key in sf.keys():  # noqa: SIM118 - safe_open is not a dict
                    t = sf.get_tensor(key)
                    bytes_in += t.numel() * t.element_size()
                    if dtype is not None and t.is_floating_point():
                        t = t.to(torch.float32 if keep_fp32 is not None and keep_fp32.search(key) else dtype)
                    module = key[: -len(".weight")] if key.endswith(".weight") else None
                    if module in targets:
                        w = t.t() if targets[module] else t
                        try:
                            packed, state = quantize_4bit(w.contiguous(), blocksize, quant_type, double_quant,
                                                          quant_storage)
                        except ValueError as e:
                            raise ValueError(f"checkpoint tensor {key!r} ({f.name}): {e}") from e
                        group = {key: packed}
                        group.update({f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
                        writer.add(group)
                        del w, packed, state, group
                        nq += 1
                    else:
                        writer.add({key: t})
                    del t
                    done += 1
                    if done % log_every == 0 or done == len(header):
                        say(f"quantize_checkpoint: {done}/{len(header)} tensors ({nq} quantized), "
                            f"{_human(writer.total)} out, {time.perf_counter() - t0:.1f} s")
        # the side files first: a failure there (disk full) must not leave shards that look like a finished checkpoint
        left_out = _copy_side_files(src, dst, quant_type, double_quant, quant_storage,
                                    compute_dtype or dtype or torch.float32, skip, dtype)
        names = writer.finish()
    except BaseException:
        writer.discard()
        raise
    if left_out:
        say(f"quantize_checkpoint: not copied (float weights in another format): {left_out}")
    say(f"quantize_checkpoint: wrote {len(names)} file(s) to {str(dst)!r}: {_human(bytes_in)} -> "
        f"{_human(writer.total)} in {time.perf_counter() - t0:.1f} s")
    return {"quantized": sorted(targets), "tensors": len(header), "files": names, "bytes_in": bytes_in,
            "bytes_out": writer.total}


def _is_weight_file(name: str) -> bool:
    """A float checkpoint in another format (``pytorch_model*.bin``, ``tf_model.h5``, ``consolidated.pth``, ...) or
    its index: a hub snapshot often holds one beside the safetensors. Copied, it would put the float model (as large
    as the source) next to the 4-bit one, and ``from_pretrained(use_safetensors=False)`` would read it."""
    return name.endswith(_WEIGHT_SUFFIXES) or any(name.endswith(s + ".index.json") for s in _WEIGHT_SUFFIXES)


def _copy_side_files(src: Path, dst: Path, quant_type: str, double_quant: bool, quant_storage: torch.dtype,
                     compute_dtype: torch.dtype, skip: list[str], dtype: torch.dtype | None) -> list[str]:
    """Copy the non-weight files (tokenizer, generation config, ...); ``config.json`` gets ``quantization_config``
    (and the new dtype, when cast). Returns the names of the weight files in other formats that were left out."""
    left_out = []
    for p in src.iterdir():
        if not p.is_file() or p.suffix == ".safetensors" or p.name in (INDEX_NAME, "config.json"):
            continue  # the source shards and config, written anew
        if _is_weight_file(p.name):
            left_out.append(p.name)
        else:
            shutil.copy2(p, dst / p.name)
    cfg_path = src / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"] = _quantization_config(quant_type, double_quant, quant_storage, compute_dtype, skip)
        if dtype is not None:
            for k in ("dtype", "torch_dtype"):
                if k in cfg:
                    cfg[k] = _DTYPE_NAMES[dtype]
        (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return sorted(left_out)
