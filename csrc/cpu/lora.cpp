// CPU LoRA product kernels (contract and design in lora.h): the vector operations of each ISA, and the run-time
// dispatch.  The kernels themselves are in lora_kernels.inc, compiled once per ISA under a target pragma.
#include "lora.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "isa.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QK_X86 1
#endif

namespace qkernels {
namespace cpu {
namespace lora_detail {

// Below this many multiply-adds (~10 us on one core) a product runs on the calling thread: waking the OpenMP team
// costs about that much.
constexpr int64_t kLoraParallelMin = int64_t(1) << 18;
// lora_gram sums M in blocks of this many rows (a float32 partial sum per block), so the error of a sum over many
// tokens grows like a blocked GEMM's, not like one running sum's.
constexpr int64_t kLoraSumRows = 256;
// Software prefetch (lora_kernels.inc prefetch_span): cache line bytes, how far ahead along a row lora_down fetches
// x (elements), and how many rows ahead lora_gram fetches its column strip.
constexpr int64_t kLine = 64;
constexpr int64_t kPrefetchAhead = 256;
constexpr int64_t kPrefetchRows = 16;

template <DType D>
constexpr int elem_bytes() { return D == DType::float32 ? 4 : 2; }

template <DType D>
inline float load1(const void* base, int64_t e) {
  if constexpr (D == DType::float32) return static_cast<const float*>(base)[e];
  else if constexpr (D == DType::float16) return half_bits_to_float(static_cast<const uint16_t*>(base)[e]);
  else return bf16_bits_to_float(static_cast<const uint16_t*>(base)[e]);
}

template <DType D>
inline void store1(void* base, int64_t e, float v) {
  if constexpr (D == DType::float32) static_cast<float*>(base)[e] = v;
  else if constexpr (D == DType::float16) static_cast<uint16_t*>(base)[e] = float_to_half_bits(v);
  else static_cast<uint16_t*>(base)[e] = float_to_bf16_bits(v);
}

// ------------------------------------------------------------------------------------------------------ portable
namespace portable {
// Eight emulated lanes, as the AVX2 path: the sums over K (lora_down) spread over eight partial sums added at the end,
// whose error grows like the SIMD paths' (one float lane summed K terms in order: at M 1 with dropout its error
// exceeded twice plain torch's in tests/test_lora.py). Plain loops the compiler may vectorize.
struct S {
  static constexpr int W = 8;
  static constexpr int DOWN_MR = 4, DOWN_JR = 4, GRAM_JR = 4, GRAM_CW = 4, UP_MR = 4, UP_CW = 4;
  struct V {
    float v[W];
  };
  static V zero() { return set1(0.0f); }
  static V set1(float a) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = a;
    return r;
  }
  static V fma(V a, V b, V c) {  // two roundings (-ffp-contract=off), as the tails
    for (int i = 0; i < W; ++i) c.v[i] = a.v[i] * b.v[i] + c.v[i];
    return c;
  }
  static V mul(V a, V b) {
    for (int i = 0; i < W; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static V add(V a, V b) {
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  static V loadf(const float* p) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i];
    return r;
  }
  static void storef(float* p, V v) {
    for (int i = 0; i < W; ++i) p[i] = v.v[i];
  }
  static float hsum(V v) {  // pairwise, as the AVX2 path's
    return ((v.v[0] + v.v[4]) + (v.v[2] + v.v[6])) + ((v.v[1] + v.v[5]) + (v.v[3] + v.v[7]));
  }
  template <DType D>
  static V loadx(const void* base, int64_t e) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = load1<D>(base, e + i);
    return r;
  }
  template <DType D>
  static void storex(void* base, int64_t e, V v) {
    for (int i = 0; i < W; ++i) store1<D>(base, e + i, v.v[i]);
  }
  static V maskv(const uint8_t* p, float s) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = static_cast<float>(p[i]) * s;
    return r;
  }
};
#include "lora_kernels.inc"
}  // namespace portable

#ifdef QK_X86
// Every function defined between QK_LORA_TARGET(t) and QK_LORA_TARGET_END is compiled for target t.
#define QK_LORA_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define QK_LORA_TARGET(t) QK_LORA_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define QK_LORA_TARGET_END _Pragma("clang attribute pop")
#else
#define QK_LORA_TARGET(t) _Pragma("GCC push_options") QK_LORA_PRAGMA(GCC target(t))
#define QK_LORA_TARGET_END _Pragma("GCC pop_options")
#endif

// ------------------------------------------------------------------------------------------------------ AVX2
QK_LORA_TARGET("avx2,fma,f16c")
namespace avx2 {
struct S {
  static constexpr int W = 8;
  // 16 ymm registers: 2 x 4 and 4 x 2 accumulator tiles leave room for the operands.
  static constexpr int DOWN_MR = 2, DOWN_JR = 4, GRAM_JR = 4, GRAM_CW = 2, UP_MR = 4, UP_CW = 2;
  using V = __m256;
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V set1(float a) { return _mm256_set1_ps(a); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline V loadf(const float* p) { return _mm256_loadu_ps(p); }
  static inline void storef(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  template <DType D>
  static inline V loadx(const void* base, int64_t e) {
    if constexpr (D == DType::float32) {
      return _mm256_loadu_ps(static_cast<const float*>(base) + e);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + e));
      if constexpr (D == DType::float16) return _mm256_cvtph_ps(h);
      else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  template <DType D>
  static inline void storex(void* base, int64_t e, V v) {
    if constexpr (D == DType::float32) {
      _mm256_storeu_ps(static_cast<float*>(base) + e, v);
    } else {
      __m128i h;
      if constexpr (D == DType::float16) {
        h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      } else {  // round to nearest even on the upper 16 bits; NaN -> 0x7fc0 (float_to_bf16_bits)
        const __m256i b = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
        __m256i rnd = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
        const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        rnd = _mm256_blendv_epi8(rnd, _mm256_set1_epi32(0x7fc00000), _mm256_castps_si256(nan));
        rnd = _mm256_srli_epi32(rnd, 16);
        h = _mm_packus_epi32(_mm256_castsi256_si128(rnd), _mm256_extracti128_si256(rnd, 1));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + e), h);
    }
  }
  static inline V maskv(const uint8_t* p, float s) {
    const __m128i m = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m)), _mm256_set1_ps(s));
  }
};
#include "lora_kernels.inc"
}  // namespace avx2
QK_LORA_TARGET_END

// ------------------------------------------------------------------------------------------------------ AVX-512
QK_LORA_TARGET("avx512f,avx512bw,avx512vl")
namespace avx512 {
struct S {
  static constexpr int W = 16;
  // 32 zmm registers: 4 x 4, 8 x 2 and 4 x 4 accumulator tiles.
  static constexpr int DOWN_MR = 4, DOWN_JR = 4, GRAM_JR = 8, GRAM_CW = 2, UP_MR = 4, UP_CW = 4;
  using V = __m512;
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V set1(float a) { return _mm512_set1_ps(a); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline V loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline void storef(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline float hsum(V v) { return _mm512_reduce_add_ps(v); }
  template <DType D>
  static inline V loadx(const void* base, int64_t e) {
    if constexpr (D == DType::float32) {
      return _mm512_loadu_ps(static_cast<const float*>(base) + e);
    } else {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + e));
      if constexpr (D == DType::float16) return _mm512_cvtph_ps(h);
      else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
  template <DType D>
  static inline void storex(void* base, int64_t e, V v) {
    if constexpr (D == DType::float32) {
      _mm512_storeu_ps(static_cast<float*>(base) + e, v);
    } else {
      __m256i h;
      if constexpr (D == DType::float16) {
        h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      } else {  // round to nearest even on the upper 16 bits; NaN -> 0x7fc0 (float_to_bf16_bits)
        const __m512i b = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        __m512i rnd = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        rnd = _mm512_mask_mov_epi32(rnd, nan, _mm512_set1_epi32(0x7fc00000));
        h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rnd, 16));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + e), h);
    }
  }
  static inline V maskv(const uint8_t* p, float s) {
    const __m128i m = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m)), _mm512_set1_ps(s));
  }
};
#include "lora_kernels.inc"
}  // namespace avx512
QK_LORA_TARGET_END
#endif  // QK_X86

}  // namespace lora_detail

void lora_down(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* mask, float mask_scale,
               const void* A, DType a_dtype, int64_t r, float scale, float* t) {
#ifdef QK_X86
  const Isa isa = active_isa();
  if (isa == Isa::avx512)
    return lora_detail::avx512::down(x, dtype, M, K, mask, mask_scale, A, a_dtype, r, scale, t);
  if (isa == Isa::avx2) return lora_detail::avx2::down(x, dtype, M, K, mask, mask_scale, A, a_dtype, r, scale, t);
#endif
  lora_detail::portable::down(x, dtype, M, K, mask, mask_scale, A, a_dtype, r, scale, t);
}

void lora_gram(const float* u, int64_t M, int64_t r, const void* x, DType dtype, int64_t K, const uint8_t* mask,
               float mask_scale, float* g, float out_scale, bool transposed) {
#ifdef QK_X86
  const Isa isa = active_isa();
  if (isa == Isa::avx512)
    return lora_detail::avx512::gram(u, M, r, x, dtype, K, mask, mask_scale, out_scale, transposed, g);
  if (isa == Isa::avx2)
    return lora_detail::avx2::gram(u, M, r, x, dtype, K, mask, mask_scale, out_scale, transposed, g);
#endif
  lora_detail::portable::gram(u, M, r, x, dtype, K, mask, mask_scale, out_scale, transposed, g);
}

void lora_up_add(void* y, DType dtype, int64_t M, int64_t K, const float* u, int64_t r, const float* A,
                 const uint8_t* mask, float mask_scale) {
#ifdef QK_X86
  const Isa isa = active_isa();
  if (isa == Isa::avx512) return lora_detail::avx512::up_add(y, dtype, M, K, u, r, A, mask, mask_scale);
  if (isa == Isa::avx2) return lora_detail::avx2::up_add(y, dtype, M, K, u, r, A, mask, mask_scale);
#endif
  lora_detail::portable::up_add(y, dtype, M, K, u, r, A, mask, mask_scale);
}

}  // namespace cpu
}  // namespace qkernels
