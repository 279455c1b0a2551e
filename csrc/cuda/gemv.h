// CUDA fused 4-bit GEMV + LoRA for small M.  Plain C++ declarations (no CUDA headers) so the bindings compile with g++.
#pragma once

#include <cstdint>
#include <string>

#include "../common.h"

namespace qkernels {
namespace cuda {

// y[m, n] = sum_k x[m, k] * W[n, k] + sum_j t[m, j] * B[n, j] + bias[n], float32 accumulation, one rounding to x's
// dtype.  W = dequant(packed) [N, K] in bitsandbytes' format: flat row-major index n*K + k, blocks of `blocksize`
// over the FLAT index (they may straddle rows), element 2j in the HIGH nibble of byte j;
// W[n, k] = float32(code[nibble] * scale[block]) with scale = absmax[block] (float32), or, when absmax == nullptr,
// the double-quantized scale float32(nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize]) + offset.
//   x        : [M, K] of x_dtype, contiguous              out   : [M, N] of x_dtype, contiguous
//   packed   : uint8[ceil(N*K/2)]                          code  : float32[16]
//   lora_t   : float32[M, r] (caller-scaled x @ A^T)       lora_B: float32[N, r]   (both unused when r == 0)
//   bias     : float32[N] or nullptr
// All pointers are device pointers; launched asynchronously on `stream` (a cudaStream_t as an integer).
// Returns "" on success, otherwise a message (launch error or an unsupported size).
std::string gemv_4bit_lora(const void* x, DType x_dtype, int64_t M, int64_t K, const uint8_t* packed,
                           const float* absmax, const uint8_t* absmax_q, const float* nested_absmax,
                           const float* nested_code, float offset, int64_t nested_blocksize, const float* code,
                           int64_t blocksize, int64_t N, const float* lora_t, const float* lora_B, int64_t r,
                           const float* bias, void* out, std::uintptr_t stream);

}  // namespace cuda
}  // namespace qkernels
