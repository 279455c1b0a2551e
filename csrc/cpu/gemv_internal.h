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

// x packed for the tile kernels (K % 32 == 0), so that a tile's x values for one 32-element chunk are contiguous and
// one pointer walks them sequentially: the M rows are cut into tiles of mt = min(mt_max, M - m0) rows (the driver's
// cut) and tile (m0, mt) holds, for chunk k = 0, 32, ..., the mt rows' chunks back to back:
//   xp[m0*K + k*mt + i*32 + c]  for row m0+i, c < 32.
// Float32 (split=true): inside a chunk the even elements come first, then the odd ones (c < 16: x[k + 2c],
// c >= 16: x[k + 2(c-16) + 1]), so the decoded high nibbles (elements k+2j) and low nibbles (k+2j+1) of 16 bytes
// each meet 16 contiguous x values.  bfloat16 (split=false): the chunk as is (vdpbf16ps takes adjacent pairs).
template <typename From, typename To>
inline void pack_x_t(const void* x, int64_t M, int64_t K, int mt_max, bool split, To* xp) {
  const auto* src = static_cast<const typename From::T*>(x);
  for (int64_t m0 = 0; m0 < M; m0 += mt_max) {
    const int64_t mt = std::min<int64_t>(mt_max, M - m0);
    for (int64_t i = 0; i < mt; ++i) {
      const auto* s = src + (m0 + i) * K;
      for (int64_t k = 0; k < K; k += 32) {
        To* d = xp + m0 * K + k * mt + i * 32;
        for (int c = 0; c < 32; ++c) d[c] = From::get(s[k + (split ? (c < 16 ? 2 * c : 2 * (c - 16) + 1) : c)]);
      }
    }
  }
}

struct RawU16 {  // bfloat16 bits copied as they are
  using T = uint16_t;
  static uint16_t get(T v) { return v; }
};

inline std::vector<float> pack_x_f32(const void* x, DType dtype, int64_t M, int64_t K, int mt_max) {
  std::vector<float> v(static_cast<size_t>(M * K));
  switch (dtype) {
    case DType::float32: pack_x_t<FromF32>(x, M, K, mt_max, true, v.data()); break;
    case DType::float16: pack_x_t<FromF16>(x, M, K, mt_max, true, v.data()); break;
    case DType::bfloat16: pack_x_t<FromBF16>(x, M, K, mt_max, true, v.data()); break;
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

}  // namespace gemv_detail
}  // namespace cpu
}  // namespace qkernels
