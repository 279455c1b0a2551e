// CPU quantization to the bitsandbytes 4-bit (NF4 / FP4) format.
#pragma once

#include <cstdint>

#include "../common.h"

namespace qkernels {
namespace cpu {

// Blockwise 4-bit quantization of n elements, bit-identical to qkernels.reference.quantize_4bit:
//   A      : n elements of in_dtype (float32 / float16 / bfloat16 raw bits), contiguous
//   code   : float32[16] codebook (any order; sorted stably inside, midpoints (s[i]+s[i+1])/2 in float32)
//   packed : uint8[(n+1)/2]  element 2j in the HIGH nibble; for odd n the last low nibble is the code of 0.0
//   absmax : float32[ceil(n/blocksize)]  max |x| per block
// v = clamp(x * (1.0f / max(absmax, 1e-38f)), -1, 1); code = order[#midpoints < v].
// NaN/inf input never crashes; absmax then is non-finite (NaN/inf propagate) and the caller must reject it.
// Dispatches at run time on active_isa() (see isa.h).  blocksize: power of two in [32, 4096].
void quantize_4bit(const void* A, DType in_dtype, int64_t n, int64_t blocksize, const float* code, uint8_t* packed,
                   float* absmax);

// 8-bit blockwise quantization of n contiguous float32 values against a 256-entry map (the nested-scale format),
// bit-identical to qkernels.reference.quantize_blockwise: absmax[b] = max|x| (NaN propagates),
// v = clamp(x * (1.0f / max(absmax, 1e-38f)), -1, 1), out[i] = order[#(255 sorted float32 midpoints < v)].
// code: any order (stably sorted inside).  blocksize: a positive power of two.  Scalar, OpenMP over blocks.
void quantize_blockwise(const float* A, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                        float* absmax);

}  // namespace cpu
}  // namespace qkernels
