// Internals shared by the CPU dequantize kernels: dequantize.cpp (row-major) and dequantize_t.cpp (transposed).
// Not part of the contract in dequantize.h.
#pragma once

#include <cstdint>

#include "../common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace qkernels {
namespace cpu {
namespace dequant_detail {

// Per-block scale providers.  PlainScale reads a float32 absmax; NestedScale (common.h) decodes a double-quantized
// scale inline.
struct PlainScale {
  const float* absmax;
  float operator()(int64_t b) const { return absmax[b]; }
};

// Outputs from this size up are written with non-temporal (streaming) stores on the AVX-512 paths: larger than any
// L3 they would be written back to DRAM anyway, and streaming skips reading each output line first (the
// read-for-ownership of a normal store). Measured inside a 512 x 4096 x 4096 training step timed round-robin with
// peft's (the reused 32 MiB buffer and the packed weight cold, as inside a network), alternating in one process:
// 90.1-90.8 vs 94.2-95.0 ms per step. Below it the output may stay in cache for the matmul that reads it next.
constexpr int64_t kStreamMinBytes = int64_t(16) << 20;

#if defined(__x86_64__) || defined(__i386__)
// float_to_bf16_bits (common.h) on 16 float32 lanes: integer round-to-nearest-even, subnormals kept, NaN -> 0x7FC0.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256i bf16_rne_avx512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                     _mm512_set1_epi32(1)));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

// Whether this CPU has AVX512_BF16 (vcvtneps2bf16 / vcvtne2ps2bf16), asked once.
inline bool has_avx512bf16() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
  }();
  return has;
}
#endif

// The smallest |scale| from which every nonzero |code[k] * scale| is at least 2^-125, a normal float32 (0: none is
// nonzero). There vcvtneps2bf16, which flushes subnormals and keeps a NaN's payload, rounds exactly as
// float_to_bf16_bits; the bf16 kernels take it only for blocks whose finite |scale| is at least this.
inline float bf16_cvt_min_normal_scale(const float* code) {
  float cmin = 0.0f;
  for (int i = 0; i < 16; ++i) {
    const float a = code[i] < 0 ? -code[i] : code[i];
    if (a > 0.0f && (cmin == 0.0f || a < cmin)) cmin = a;
  }
  return cmin > 0.0f ? 2.0f * 1.1754944e-38f / cmin : 0.0f;
}

// A block whose scale takes vcvtneps2bf16: finite, and every product code[k] * scale normal or zero.
inline bool bf16_cvt_scale_ok(float scale, float min_normal_scale) {
  const float a = scale < 0 ? -scale : scale;
  return a == 0.0f || (a >= min_normal_scale && a <= 3.4e38f);
}

}  // namespace dequant_detail
}  // namespace cpu
}  // namespace qkernels
