// Internals shared by the CPU GEMV's translation units: gemv.cpp (entry point, portable path) and gemv_simd.cpp
// (the AVX-512 / AVX2 tile kernels and their dispatch).  Not part of the contract in gemv.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common.h"
#include "gemv.h"

namespace qkernels {
namespace cpu {
namespace gemv_detail {

// Below this many weights (32 KB packed) a GEMV takes a few microseconds (~0.07 ns per weight on one core here),
// about what waking the OpenMP team costs.
constexpr int64_t kParallelMinWeights = int64_t(1) << 16;

// Scale of block b: plain float32 absmax, or a double-quantized one (common.h's NestedScale, the decode the
// dequantize kernel uses).
struct ScaleOf {
  const float* absmax;  // null when nested
  NestedScale nested;
  float operator()(int64_t b) const { return absmax != nullptr ? absmax[b] : nested(b); }
};

struct Problem {
  DType dtype;
  int64_t M, K, N;
  int bs_shift;  // log2(blocksize)
  const uint8_t* packed;
  ScaleOf scale;
  const float* code;
  const float* lora_t;  // [M, r] or null
  const float* lora_B;  // [N, r] or null
  int64_t r;
  const float* bias;  // [N] or null
  void* out;          // [M, N] of dtype
};

inline int log2_pow2(int64_t v) {
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

struct FromF32 {
  using T = float;
  static float get(T v) { return v; }
};
struct FromF16 {
  using T = uint16_t;
  static float get(T v) { return half_bits_to_float(v); }
};
struct FromBF16 {
  using T = uint16_t;
  static float get(T v) { return bf16_bits_to_float(v); }
};

// x [M, K] -> float32 [M, K] (the portable path).
template <typename From>
inline void x_to_f32_t(const void* x, int64_t n, float* dst) {
  const auto* src = static_cast<const typename From::T*>(x);
  for (int64_t i = 0; i < n; ++i) dst[i] = From::get(src[i]);
}

inline std::vector<float> x_to_f32(const void* x, DType dtype, int64_t M, int64_t K) {
  std::vector<float> v(static_cast<size_t>(M * K));
  switch (dtype) {
    case DType::float32: x_to_f32_t<FromF32>(x, M * K, v.data()); break;
    case DType::float16: x_to_f32_t<FromF16>(x, M * K, v.data()); break;
    case DType::bfloat16: x_to_f32_t<FromBF16>(x, M * K, v.data()); break;
  }
  return v;
}

inline void store_y(const Problem& p, int64_t m, int64_t n, float v) {
  const int64_t i = m * p.N + n;
  switch (p.dtype) {
    case DType::float32: static_cast<float*>(p.out)[i] = v; break;
    case DType::float16: static_cast<uint16_t*>(p.out)[i] = float_to_half_bits(v); break;
    case DType::bfloat16: static_cast<uint16_t*>(p.out)[i] = float_to_bf16_bits(v); break;
  }
}

// acc + t[m] . B[n] + bias[n], in float32, left to right.
inline float epilogue_scalar(const Problem& p, int64_t m, int64_t n, float acc) {
  float y = acc;
  if (p.r > 0) {
    const float* t = p.lora_t + m * p.r;
    const float* B = p.lora_B + n * p.r;
    float l = 0.0f;
    for (int64_t j = 0; j < p.r; ++j) l += t[j] * B[j];
    y = y + l;
  }
  if (p.bias != nullptr) y = y + p.bias[n];
  return y;
}

// Start of the next run of chunks with one table per row: scale[r] is row r's block scale at k, and the run ends at
// the first block boundary of any of the NR rows (their boundaries differ when K % blocksize != 0).  Plain code (no
// vector types), so the target-specific tile kernels can inline it.
template <int NR>
inline int64_t next_segment(const Problem& p, int64_t n0, int64_t k, float (&scale)[NR]) {
  int64_t seg_end = p.K;
  for (int r = 0; r < NR; ++r) {
    const int64_t e = (n0 + r) * p.K + k;
    const int64_t b = e >> p.bs_shift;
    scale[r] = p.scale(b);
    seg_end = std::min(seg_end, k + ((b + 1) << p.bs_shift) - e);
  }
  return seg_end;
}

// The tiled SIMD paths (gemv_simd.cpp): false when none applies (scalar ISA, K % 32 != 0, or not an x86 build).
bool gemv_simd(const Problem& p, const void* x);
// out [M, K] float32 = g [M, N] (p.dtype) @ W [N, K]; p.M / p.N / p.K as for the GEMV (W [N, K]), its LoRA fields
// unused.  False, writing nothing, where no SIMD path applies.
bool gemm_dx_simd(const Problem& p, const void* g, float* out);
// The largest M for which the fused kernel is the faster path for x of `dtype` and rows of K (see gemv_simd.cpp).
int gemv_max_m(DType dtype, int64_t K);

}  // namespace gemv_detail
}  // namespace cpu
}  // namespace qkernels
