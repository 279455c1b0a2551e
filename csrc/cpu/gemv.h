// CPU fused 4-bit GEMV + LoRA + bias for small M (decode / short prefill).
#pragma once

#include <cstdint>

#include "../common.h"

namespace qkernels {
namespace cpu {

// y[m, n] = sum_k x[m, k] * W[n, k] + sum_j t[m, j] * B[n, j] + bias[n]      (m < M, n < N)
// accumulated in float32 and rounded once to `dtype` (the dtype of x and of out).
//
//   x        : [M, K] of dtype (float32 / float16 / bfloat16 raw bits), contiguous
//   W        : [N, K] in bitsandbytes' 4-bit format, flattened row-major: element e = n*K + k is nibble e of `packed`
//              (e even: HIGH nibble of byte e/2, e odd: LOW nibble), in block e / blocksize; so when K is odd a row
//              starts in a low nibble, and when K % blocksize != 0 blocks straddle rows.
//              W[n, k] = code[nibble] * scale[block]  (one float32 multiply, as in dequantize_4bit)
//   scale    : absmax[b] (float32) when `absmax` is non-null; otherwise double-quantized, decoded inline exactly like
//              dequantize_4bit_nested: float32(nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize]) + offset
//   code     : float32[16];  blocksize: a power of two in [32, 4096];  nested_blocksize: a positive power of two
//   lora_t   : float32 [M, r] (the caller's already scaled s * dropout(x) @ A^T), lora_B: float32 [N, r] (peft's
//              lora_B.weight layout); both ignored when r == 0
//   bias     : float32 [N] or null
//   out      : [M, N] of dtype, contiguous; may not alias the inputs
//
// Paths (run-time dispatch on active_isa(), see isa.h):
//   * K % 32 == 0 (every 32-element chunk of a row lies in one block -- all real LLM shapes): AVX-512 or AVX2 kernels
//     that decode each 16-byte chunk of W once into registers (a 16-entry table of code * scale per block) and use it
//     for a tile of up to 8 rows of x.  x is first copied into a tile-ordered buffer (M*K elements).  With bfloat16 x
//     on a CPU with AVX512_BF16 and AVX512_VBMI, W is decoded to bfloat16 (bf16(code * scale), the W torch's
//     dequantize-to-bf16 gives) and multiplied with vdpbf16ps (exact bf16 products, float32 sums).  The environment
//     variable QKERNELS_CPU_GEMV_BF16=0 (read on every call) turns that off, so the float32 AVX-512 path can be
//     tested on such a CPU.  From M 7 on that path (M 9 without the word-order decode: K % 128 != 0 or blocksize 32)
//     six W rows are decoded once per 2048 columns into an L1 buffer that M tiles of 4 rows read.  Otherwise x is
//     converted to float32 and W is decoded to float32, from M 5 likewise into an L1 buffer (six rows per 1024
//     columns on AVX-512, three on AVX2), x in passes of 64 rows.
//   * any other K, and the scalar ISA: a portable path that decodes one row of W to float32 and takes M dot products.
// OpenMP over output rows.  Arguments are assumed validated (see bind_gemv_cpu.cpp).
void gemv_4bit_lora(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed, const float* absmax,
                    const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code, float offset,
                    int64_t nested_blocksize, const float* code, int64_t blocksize, int64_t N, const float* lora_t,
                    const float* lora_B, int64_t r, const float* bias, void* out);

// The backward's input gradient without the LoRA term: out[m, k] = sum_n g[m, n] * W[n, k] (m < M, k < K), float32
// sums (over n in blocks of 256) written as float32 [M, K]; g [M, N] of dtype, contiguous; W, scales and code as for
// gemv_4bit_lora.  Returns false, writing nothing, where no SIMD path applies (K % 64 != 0, or neither AVX-512 nor AVX2
// active): the caller then dequantizes W and multiplies.  Decodes each W element once; no [N, K] buffer.
bool gemm_dx_4bit(const void* g, DType dtype, int64_t M, int64_t N, const uint8_t* packed, const float* absmax,
                  const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code, float offset,
                  int64_t nested_blocksize, const float* code, int64_t blocksize, int64_t K, float* out);

// Rows up to which gemv_4bit_lora is faster than dequantizing W and a BLAS matmul, for x of `dtype` with rows of K
// on the ISA path active now (16, or more on AVX-512 and AVX2 with K % 32 == 0; measured, see gemv_simd.cpp).
int gemv_max_m(DType dtype, int64_t K);

}  // namespace cpu
}  // namespace qkernels
