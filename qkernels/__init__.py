"""qkernels: QLoRA kernels for PyTorch — NF4/FP4 blockwise quantization in bitsandbytes' format.

Public API (mirrors bitsandbytes and peft so that migrating is a rename):

Format
- ``quantize_4bit(A, blocksize=64, quant_type="nf4", double_quant=True, quant_storage=torch.uint8)``
  -> ``(packed, QuantState)``; ``dequantize_4bit(packed, quant_state, dtype=None, *, out=None)`` -> tensor
- ``QuantState`` (``as_dict(packed=True)`` / ``QuantState.from_dict(d, device)``: bitsandbytes' keys)
- ``codebooks``: ``nf4_codebook()``, ``fp4_codebook()``, ``dynamic_map()``, ``get_codebook(quant_type)``
  (``QuantType.NF4`` / ``QuantType.FP4``); ``bits_per_parameter``
- ``quantize_blockwise`` / ``dequantize_blockwise``: the 8-bit blockwise format of the nested scales

The QLoRA matmul
- ``matmul_4bit_lora(x, packed, quant_state, lora_A, lora_B, scaling, bias=None, dropout_p=0.0)``: the fused
  ``x @ dequant(W)^T + scaling * (dropout(x) @ A^T) @ B^T + bias`` (``QLoRAFunction``, which keeps W packed);
  ``lora_scaling(lora_alpha, r, use_rslora=False)``

Modules and models
- ``QLoRALinear`` (drop-in ``nn.Linear``; ``from_linear``, ``from_bnb``), ``Params4bit`` (its packed weight);
  ``QLoRAEmbedding`` (peft's LoRA on a float ``nn.Embedding``; ``from_embedding``)
- ``apply_qlora(model, target_modules, r=8, lora_alpha=16, ...)``, ``trainable_parameters``,
  ``print_trainable_parameters``, ``merge_and_unload``, ``merge_into_4bit``, ``loftq_init``;
  ``resize_token_embeddings(model, n)`` (transformers' resize on a model with LoRA on its embedding; ``apply_qlora``
  makes it the model's ``resize_token_embeddings``)
- adapters in peft's format: ``save_adapter``, ``load_adapter``, ``add_adapter``, ``set_adapter``,
  ``disable_adapters`` (a context manager), ``delete_adapter``, ``adapter_names``; ``ModulesToSaveWrapper`` (peft's
  ``modules_to_save``: modules trained in full, one copy per adapter); ``TrainableTokensWrapper`` (peft's
  ``trainable_token_indices``: chosen embedding rows trained per adapter); ``adapter_batch(model, names)`` (a context
  manager: peft's mixed-adapter batch, ``model(x, adapter_names=[...])``, one adapter per sample)
- big models: ``QLoRALinear`` / ``apply_qlora`` on the meta device, then ``load_checkpoint(model, dir)`` (transformers'
  key names and tied weights) or ``load_state_dict(sd, assign=True)``;
  ``quantize_checkpoint(src_dir, dst_dir, ...)`` streams a float safetensors checkpoint into a bitsandbytes 4-bit one

Training (``qkernels.integrations``)
- ``QLoRATrainer`` / ``QLoRASFTTrainer``: transformers' ``Trainer`` / trl's ``SFTTrainer`` whose checkpoints and
  ``save_model()`` hold only the adapters in peft's format, as with a peft model (``QLoRATrainerMixin`` for any other
  Trainer subclass); resuming restores them in place. ``save_adapters`` / ``restore_adapters``: every adapter at once.

Around them
- ``reference``: the pure-PyTorch backend, incl. ``reference.matmul_4bit_lora`` (the oracle for the fused kernels)
- ``native_info()``: what the compiled extension ``qkernels._C`` provides here, or why it is missing;
  ``native_available()``: whether it loaded.
"""

from . import adapters, codebooks, reference
from ._native import native_available, native_info
from .adapters import (
    adapter_names,
    add_adapter,
    delete_adapter,
    disable_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
)
from .checkpoint import load_checkpoint
from .codebooks import QuantType, dynamic_map, fp4_codebook, get_codebook, nf4_codebook
from .convert import quantize_checkpoint
from .embedding import QLoRAEmbedding
from .functional import (
    bits_per_parameter,
    dequantize_4bit,
    dequantize_blockwise,
    quantize_4bit,
    quantize_blockwise,
)
from .integrations import QLoRATrainerMixin, restore_adapters, save_adapters
from .loftq import loftq_init
from .lora import QLoRAFunction, lora_scaling, matmul_4bit_lora
from .mixed_batch import adapter_batch
from .model import apply_qlora, merge_and_unload, merge_into_4bit, print_trainable_parameters, trainable_parameters
from .modules_to_save import ModulesToSaveWrapper
from .nn import Params4bit, QLoRALinear
from .quant_state import QuantState
from .resize import resize_token_embeddings
from .trainable_tokens import TrainableTokensWrapper

__version__ = "0.1.0"

__all__ = [
    "ModulesToSaveWrapper",
    "Params4bit",
    "QLoRAEmbedding",
    "QLoRAFunction",
    "QLoRALinear",
    "QLoRATrainerMixin",
    "QuantState",
    "QuantType",
    "TrainableTokensWrapper",
    "adapter_batch",
    "adapter_names",
    "adapters",
    "add_adapter",
    "apply_qlora",
    "bits_per_parameter",
    "codebooks",
    "delete_adapter",
    "dequantize_4bit",
    "dequantize_blockwise",
    "disable_adapters",
    "dynamic_map",
    "fp4_codebook",
    "get_codebook",
    "load_adapter",
    "load_checkpoint",
    "loftq_init",
    "lora_scaling",
    "matmul_4bit_lora",
    "merge_and_unload",
    "merge_into_4bit",
    "native_available",
    "native_info",
    "nf4_codebook",
    "print_trainable_parameters",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_checkpoint",
    "reference",
    "resize_token_embeddings",
    "restore_adapters",
    "save_adapter",
    "save_adapters",
    "set_adapter",
    "trainable_parameters",
]


def __getattr__(name: str):
    """``QLoRATrainer`` / ``QLoRASFTTrainer`` from ``qkernels.integrations``, built on first access (they import
    transformers / trl, which ``import qkernels`` does not)."""
    if name in ("QLoRATrainer", "QLoRASFTTrainer"):
        from . import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
