"""qkernels: QLoRA kernels for PyTorch — NF4/FP4 blockwise quantization in bitsandbytes' format.

Public API (mirrors bitsandbytes so that migrating is a rename):

- ``quantize_4bit(A, blocksize=64, quant_type="nf4", double_quant=True, quant_storage=torch.uint8)``
  -> ``(packed, QuantState)``
- ``dequantize_4bit(packed, quant_state, dtype=None)`` -> tensor
- ``QuantState`` (``as_dict(packed=True)`` / ``QuantState.from_dict(d, device)``: bitsandbytes' keys)
- ``codebooks``: ``nf4_codebook()``, ``fp4_codebook()``, ``dynamic_map()``
- ``reference``: the pure-PyTorch backend, incl. ``reference.matmul_4bit_lora`` (the oracle for the fused kernels)
- ``matmul_4bit_lora(x, packed, quant_state, lora_A, lora_B, scaling, bias=None, dropout_p=0.0)``: the fused QLoRA
  matmul (``QLoRAFunction``), ``lora_scaling(lora_alpha, r, use_rslora=False)``
- ``native_info()``: what the compiled extension ``qkernels._C`` provides here, or why it is missing.
"""

from . import codebooks, reference
from ._native import native_available, native_info
from .codebooks import QuantType, dynamic_map, fp4_codebook, get_codebook, nf4_codebook
from .functional import (
    bits_per_parameter,
    dequantize_4bit,
    dequantize_blockwise,
    quantize_4bit,
    quantize_blockwise,
)
from .lora import QLoRAFunction, lora_scaling, matmul_4bit_lora
from .quant_state import QuantState

# --- QLoRA modules (issue 5): QLoRALinear, model-level apply/merge, LoftQ ---
# isort: split
from .loftq import loftq_init
from .model import apply_qlora, merge_and_unload, merge_into_4bit, print_trainable_parameters, trainable_parameters
from .nn import Params4bit, QLoRALinear

# --- end QLoRA modules ---

__version__ = "0.1.0"

__all__ = [
    "QLoRAFunction",
    "QuantState",
    "QuantType",
    "bits_per_parameter",
    "codebooks",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dynamic_map",
    "fp4_codebook",
    "get_codebook",
    "lora_scaling",
    "matmul_4bit_lora",
    "native_available",
    "native_info",
    "nf4_codebook",
    "quantize_4bit",
    "quantize_blockwise",
    "reference",
    # --- QLoRA modules (issue 5) ---
    "Params4bit",
    "QLoRALinear",
    "apply_qlora",
    "loftq_init",
    "merge_and_unload",
    "merge_into_4bit",
    "print_trainable_parameters",
    "trainable_parameters",
]
