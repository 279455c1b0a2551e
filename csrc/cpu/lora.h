// CPU kernels for the skinny LoRA products of a QLoRA training step (forward and backward).
//
// With X [M, K] the activations (or the output gradient), a LoRA factor of rank r is tiny next to X, so each
// product is one pass over X: its cost is reading X and r multiply-adds per element of X.  torch's way (cast X
// to float32, then a BLAS GEMM with one dimension of r) reads and writes X twice more and runs a GEMM kernel
// shaped for large matrices: 2.5-3 ms per product at 512 x 4096 on the 2-core Zen 4 machine, against ~0.3 ms
// here.  All three read X in its own dtype (float32 / float16 / bfloat16, converted exactly to float32 in
// registers), multiply and sum in float32, and optionally apply a dropout mask on the fly (never materializing
// dropout(X)):
//
//   lora_down   : T [M, r]  = scale * Xd @ A^T           A [r, K] float32 or bfloat16 (a_dtype); Xd = X * mask * mask_scale
//   lora_gram   : G [r, K]  = out_scale * (U^T @ Xd)     U [M, r] float32;   sums over the M rows; transposed: G is
//                                                         written [K, r] (dB's layout: no transposing copy after)
//   lora_up_add : Y [M, K] += mask * mask_scale * (U @ A)  Y of dtype, in place: float(Y) + the float32 sum, rounded
//                                                         once to dtype (round to nearest even, as torch's .to())
//
// mask is uint8 [M, K] of 0 / 1 (a torch.bool tensor's bytes) or null (no mask, mask_scale ignored).  Every
// matrix is dense row-major.  Uses in qkernels.lora (s = lora_alpha / r):
//   forward  T = lora_down(x, A) (saved), y += lora_up_add((s * T), B^T)      (B^T: [r, N])
//   backward u = lora_down(dY, B^T, scale=s), dB = lora_gram(T, dY, out_scale=s, transposed), dA = lora_gram(u, x, mask),
//            dX += lora_up_add(u, A, mask)
//
// Sums: lora_down sums K in vector lanes (K / 16 terms per lane on AVX-512) and adds the lanes at the end;
// lora_gram sums M in blocks of 256 rows, each block's partial sum added into G; lora_up_add sums r in order.
// Errors are those of a blocked float32 GEMM (tests/test_lora_cpu.py checks them against float64).
// Paths (run-time dispatch on active_isa(), isa.h): AVX-512, AVX2+FMA+F16C, and portable C++; OpenMP over rows
// (lora_down, lora_up_add) or columns (lora_gram) when the work is large enough to pay for waking the team.
// Arguments are assumed validated (bind_lora_cpu.cpp checks them).
#pragma once

#include <cstdint>

#include "../common.h"

namespace qkernels {
namespace cpu {

void lora_down(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* mask, float mask_scale,
               const void* A, DType a_dtype, int64_t r, float scale, float* t);

void lora_gram(const float* u, int64_t M, int64_t r, const void* x, DType dtype, int64_t K, const uint8_t* mask,
               float mask_scale, float* g, float out_scale = 1.0f, bool transposed = false);

void lora_up_add(void* y, DType dtype, int64_t M, int64_t K, const float* u, int64_t r, const float* A,
                 const uint8_t* mask, float mask_scale);

}  // namespace cpu
}  // namespace qkernels
