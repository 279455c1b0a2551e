// CUDA 8-bit blockwise quantize / dequantize (the nested-scale format).  Plain C++ declarations for the bindings.
#pragma once

#include <cstdint>
#include <string>

namespace qkernels {
namespace cuda {

// Same semantics as qkernels::cpu::quantize_blockwise (bit-identical to qkernels.reference.quantize_blockwise):
// absmax[b] = max|x| over block b (NaN propagates), v = clamp(x * (1.0f / max(absmax, 1e-38f)), -1, 1),
// out[i] = order[#(255 sorted float32 midpoints < v)] for the stably sorted 256-entry `code` (any order, NaN last).
//   A: float32[n]   code: float32[256]   out: uint8[n]   absmax: float32[ceil(n/blocksize)]
// blocksize: a power of two in [1, 4096].  Device pointers, asynchronous on `stream`.  "" on success.
std::string quantize_blockwise(const float* A, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                               float* absmax, std::uintptr_t stream);

// Inverse: out[i] = float32(code[q[i]] * absmax[i / blocksize]) (one rounding), bit-identical to
// qkernels.reference.dequantize_blockwise.  q: uint8[n], code: float32[256], absmax: float32[ceil(n/blocksize)],
// out: float32[n].  blocksize: a power of two in [1, 4096].
std::string dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                                 int64_t blocksize, float* out, std::uintptr_t stream);

}  // namespace cuda
}  // namespace qkernels
