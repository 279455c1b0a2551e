// CPU dequantization of the bitsandbytes 4-bit (NF4 / FP4) format.
#pragma once

#include <cstdint>

#include "../common.h"

namespace qkernels {
namespace cpu {

// Dequantize n 4-bit codes.
//   packed : uint8[ceil(n/2)]  two codes per byte; element 2j in the HIGH nibble, element 2j+1 in the LOW nibble
//   absmax : float32[ceil(n/blocksize)]  one scale per block of `blocksize` elements (the last block may be partial)
//   code   : float32[16]  the codebook (NF4 or FP4 values)
//   out    : n elements of `out_dtype` (float32 / float16 / bfloat16 stored as raw uint16 bits)
// out[i] = to_dtype((float)code[nibble(i)] * absmax[i / blocksize])  -- one float32 multiply, one RNE conversion.
// Arguments are assumed validated (see bindings.cpp).  blocksize must be even (it is a power of two >= 32).
void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                     void* out, DType out_dtype);

// As dequantize_4bit, with double-quantized (nested) scales decoded inline (no float32 absmax temporary):
//   scale[b] = (float)(nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize]) + offset
// -- a float32 product, then a float32 sum (two roundings, never fused), exactly reference.decode_absmax.
//   absmax_q      : uint8[ceil(n/blocksize)]  8-bit codes of the centered scales
//   nested_absmax : float32[ceil(nblocks/nested_blocksize)];  nested_code : float32[256]
//   nested_blocksize: a positive power of two.
void dequantize_4bit_nested(const uint8_t* packed, const uint8_t* absmax_q, const float* nested_absmax,
                            const float* nested_code, float offset, int64_t nested_blocksize, const float* code,
                            int64_t n, int64_t blocksize, void* out, DType out_dtype);

// The 4-bit weight W [N, K] (row-major, element e = n * K + k) dequantized into its transpose: out[k * N + n] =
// W[n, k], bit for bit the transpose of dequantize_4bit / dequantize_4bit_nested's output.  Scales: absmax (float32)
// or, when absmax is null, the nested ones (absmax_q, nested_absmax, nested_code, offset, nested_blocksize).
// out_dtype float32 or bfloat16.  Returns whether the vectorized path ran (dequantize_4bit_transposed_vectorized);
// the result is the same either way.  Arguments are assumed validated (see bindings.cpp).
bool dequantize_4bit_transposed(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                                const float* nested_absmax, const float* nested_code, float offset,
                                int64_t nested_blocksize, const float* code, int64_t N, int64_t K, int64_t blocksize,
                                void* out, DType out_dtype);
// Whether dequantize_4bit_transposed takes its vectorized path (AVX-512 active, bfloat16 out, K % 128 == 0,
// K % blocksize == 0, N >= 32); elsewhere it runs a portable loop, slow: callers keep the row-major layout then.
bool dequantize_4bit_transposed_vectorized(int64_t N, int64_t K, int64_t blocksize, DType out_dtype);

// 8-bit blockwise dequantization (the nested-scale format): out[i] = code[q[i]] * absmax[i / blocksize], one float32
// multiply per element (bit-identical to qkernels.reference.dequantize_blockwise on every ISA path).
//   q : uint8[n];  absmax : float32[ceil(n/blocksize)];  code : float32[256];  out : float32[n]
// Arguments are assumed validated (see bindings.cpp); blocksize any positive value.
void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                          float* out);

}  // namespace cpu
}  // namespace qkernels
