// CPU dequantization: portable scalar path plus AVX2 / AVX-512 paths chosen at run time (isa.h).
//
// Per block we build a 16-entry table lut[k] = to_dtype(code[k] * absmax[b]) -- the same single float32 multiply and
// single rounding as the reference -- and then each packed byte expands to two table lookups.  This is exact and
// cheap: 16 multiplies+conversions per block instead of `blocksize`.
#include "dequantize.h"
#include "dequantize_internal.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QK_X86 1
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __linux__
#endif

namespace qkernels {
namespace cpu {
namespace {

struct ToF32 {
  using T = float;
  static T conv(float v) { return v; }
};
struct ToF16 {
  using T = uint16_t;
  static T conv(float v) { return float_to_half_bits(v); }
};
struct ToBF16 {
  using T = uint16_t;
  static T conv(float v) { return float_to_bf16_bits(v); }
};

using dequant_detail::PlainScale;  // dequantize_internal.h
using qkernels::NestedScale;      // common.h

// Elements [begin, end) of block `b`; `begin` is even because blocksize is even.
template <typename Conv>
inline void dequantize_block(const uint8_t* packed, float scale, const float* code, int64_t begin, int64_t end,
                             typename Conv::T* out) {
  typename Conv::T lut[16];
  for (int k = 0; k < 16; ++k) lut[k] = Conv::conv(code[k] * scale);  // exactly one float32 multiply

  const int64_t full_pairs_end = begin + ((end - begin) & ~int64_t(1));
  const uint8_t* p = packed + begin / 2;
  typename Conv::T* o = out + begin;
  for (int64_t i = begin; i < full_pairs_end; i += 2, ++p, o += 2) {
    const uint8_t byte = *p;
    o[0] = lut[byte >> 4];
    o[1] = lut[byte & 0x0f];
  }
  if (full_pairs_end < end) *o = lut[*p >> 4];  // odd tail: only the high nibble of the last byte is used
}

// One loop for every path: per block, `vec_block` decodes the whole multiple of 32 elements and the scalar
// `dequantize_block` the rest (the scalar path passes a `vec_block` that is `dequantize_block` itself).
// `fence` runs on every thread after its blocks: the streaming-store paths pass _mm_sfence (their non-temporal
// stores must be visible before the caller reads the output), the others nothing.
template <typename Conv, typename Scale, typename VecBlock, typename Fence>
void dequantize_vec(const uint8_t* packed, Scale scale_of, const float* code, int64_t n, int64_t blocksize,
                    typename Conv::T* out, VecBlock vec_block, Fence fence) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  float cb[16];
  std::copy(code, code + 16, cb);
  // Below ~256K elements the thread start-up costs more than it saves.
  constexpr int64_t kParallelThreshold = int64_t(1) << 18;
#ifdef _OPENMP
#pragma omp parallel if (n >= kParallelThreshold)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t begin = b * blocksize;
      const int64_t end = std::min(n, begin + blocksize);
      const int64_t vend = begin + ((end - begin) & ~int64_t(31));
      const float scale = scale_of(b);
      vec_block(packed, scale, cb, begin, vend, out);
      if (vend < end) dequantize_block<Conv>(packed, scale, cb, vend, end, out);
    }
    fence();
  }
  (void)kParallelThreshold;
}

inline void no_fence() {}

template <typename Conv, typename Scale, typename VecBlock>
void dequantize_vec(const uint8_t* packed, Scale scale_of, const float* code, int64_t n, int64_t blocksize,
                    typename Conv::T* out, VecBlock vec_block) {
  dequantize_vec<Conv>(packed, scale_of, code, n, blocksize, out, vec_block, no_fence);
}

template <typename Conv, typename Scale>
void dequantize_impl(const uint8_t* packed, Scale scale_of, const float* code, int64_t n, int64_t blocksize,
                     typename Conv::T* out) {
  dequantize_vec<Conv>(packed, scale_of, code, n, blocksize, out, dequantize_block<Conv>);
}

#ifdef QK_X86
// SIMD paths.  The per-block 16-entry table is built exactly as in the scalar path (one float32 multiply, then the
// scalar conversion helpers of common.h); only the table lookups are vectorized, so every path gives the same bits.
// A block's elements are processed 32 at a time (16 packed bytes); the remainder of a partial last block goes to
// the scalar dequantize_block.
#define QK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

template <typename Conv>
inline void make_lut(const float* code, float scale, typename Conv::T* lut) {
  for (int k = 0; k < 16; ++k) lut[k] = Conv::conv(code[k] * scale);
}

// 16 packed bytes -> 32 nibble indices (uint8, element order: hi0, lo0, hi1, lo1, ...) as two 128-bit halves.
QK_AVX2 inline void nibbles32(const uint8_t* p, __m128i* i0, __m128i* i1) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0f);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  const __m128i lo = _mm_and_si128(b, m);
  *i0 = _mm_unpacklo_epi8(hi, lo);
  *i1 = _mm_unpackhi_epi8(hi, lo);
}

QK_AVX2 void block_f32_avx2(const uint8_t* packed, float scale, const float* code, int64_t begin, int64_t vend,
                            float* out) {
  alignas(32) float lut[16];
  make_lut<ToF32>(code, scale, lut);
  const __m256 la = _mm256_load_ps(lut), lb = _mm256_load_ps(lut + 8);
  for (int64_t i = begin; i < vend; i += 32) {
    __m128i q[2];
    nibbles32(packed + i / 2, &q[0], &q[1]);
    for (int h = 0; h < 4; ++h) {
      const __m128i src = (h & 1) ? _mm_srli_si128(q[h >> 1], 8) : q[h >> 1];
      const __m256i idx = _mm256_cvtepu8_epi32(src);
      const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(la, idx), _mm256_permutevar8x32_ps(lb, idx),
                                        _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      _mm256_storeu_ps(out + i + 8 * h, v);
    }
  }
}

template <typename Conv>
QK_AVX2 void block_u16_avx2(const uint8_t* packed, float scale, const float* code, int64_t begin, int64_t vend,
                            uint16_t* out) {
  alignas(32) uint16_t lut[16];
  if (std::is_same<Conv, ToF16>::value) {  // F16C vcvtps2ph (RNE) == float_to_half_bits, NaN included
    const __m256 s = _mm256_set1_ps(scale);
    _mm_store_si128(reinterpret_cast<__m128i*>(lut),
                    _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(code), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_store_si128(reinterpret_cast<__m128i*>(lut + 8),
                    _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(code + 8), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    make_lut<Conv>(code, scale, lut);
  }
  alignas(16) uint8_t tl[16], th[16];
  for (int k = 0; k < 16; ++k) {
    tl[k] = static_cast<uint8_t>(lut[k] & 0xff);
    th[k] = static_cast<uint8_t>(lut[k] >> 8);
  }
  const __m256i tab_lo = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(tl)));
  const __m256i tab_hi = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(th)));
  for (int64_t i = begin; i < vend; i += 32) {
    __m128i i0, i1;
    nibbles32(packed + i / 2, &i0, &i1);
    const __m256i ix = _mm256_inserti128_si256(_mm256_castsi128_si256(i0), i1, 1);  // lane0: 0..15, lane1: 16..31
    const __m256i L = _mm256_shuffle_epi8(tab_lo, ix), H = _mm256_shuffle_epi8(tab_hi, ix);
    const __m256i o0 = _mm256_unpacklo_epi8(L, H);  // lane0: 0..7,  lane1: 16..23
    const __m256i o1 = _mm256_unpackhi_epi8(L, H);  // lane0: 8..15, lane1: 24..31
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permute2x128_si256(o0, o1, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 16), _mm256_permute2x128_si256(o0, o1, 0x31));
  }
}

QK_AVX512 inline __m256i nibbles32_avx512(const uint8_t* p) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  // 16-bit lane k = (lo_k << 8) | hi_k  ->  bytes in element order hi0, lo0, hi1, lo1, ...
  return _mm256_or_si256(_mm256_srli_epi16(w, 4), _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x0f)), 8));
}

// Stream: non-temporal stores (the output 64-byte aligned, see kStreamMinBytes).
template <bool Stream>
QK_AVX512 inline void store512(void* p, __m512i v) {
  if (Stream) _mm512_stream_si512(static_cast<__m512i*>(p), v);
  else _mm512_storeu_si512(p, v);
}

template <bool Stream>
QK_AVX512 void block_f32_avx512(const uint8_t* packed, float scale, const float* code, int64_t begin, int64_t vend,
                                float* out) {
  alignas(64) float lut[16];
  make_lut<ToF32>(code, scale, lut);
  const __m512 l = _mm512_load_ps(lut);
  for (int64_t i = begin; i < vend; i += 32) {
    const __m256i x = nibbles32_avx512(packed + i / 2);
    store512<Stream>(out + i,
                     _mm512_castps_si512(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(x)), l)));
    store512<Stream>(out + i + 16, _mm512_castps_si512(
                                       _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(x, 1)), l)));
  }
}

template <typename Conv, bool Stream>
QK_AVX512 void block_u16_avx512(const uint8_t* packed, float scale, const float* code, int64_t begin, int64_t vend,
                                uint16_t* out) {
  // Table: 16 float32 products (one multiply each, as in the scalar path), converted in-register exactly like
  // float_to_half_bits (vcvtps2ph, round-to-nearest-even) / float_to_bf16_bits (integer RNE, NaN -> 0x7FC0).
  const __m512 prod = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
  __m256i h;
  if (std::is_same<Conv, ToF16>::value) {
    h = _mm512_cvtps_ph(prod, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    h = dequant_detail::bf16_rne_avx512(prod);
  }
  const __m512i l = _mm512_castsi256_si512(h);  // permutexvar_epi16 only reads lanes 0..15 (indices < 16)
  for (int64_t i = begin; i < vend; i += 32) {
    const __m512i idx = _mm512_cvtepu8_epi16(nibbles32_avx512(packed + i / 2));
    store512<Stream>(out + i, _mm512_permutexvar_epi16(idx, l));
  }
}


using dequant_detail::kStreamMinBytes;  // dequantize_internal.h: why and from which size

QK_AVX512 void sfence_avx512() { _mm_sfence(); }

// 16-bit outputs on AVX-512 with VBMI, blocksize a multiple of 64: 128 elements (one 64-byte load of packed bytes)
// per step. The two 64-element halves' tables (16 entries each: code[k] * scale, rounded as the scalar path does)
// share one register, so one vpermw with 5-bit indices (bit 4: the half) looks up 32 elements; vpermb puts each
// element's byte in its 16-bit lane, vpsrlvw brings the high nibble down for even elements, and one vpternlogd
// masks the nibble and sets the half's bit. Per 32 elements: 4 vector ops and a store, against ~8 and a table per
// 64 elements in block_u16_avx512. The bf16 table converts with vcvtne2ps2bf16 (AVX512_BF16) where every product is
// zero or normal (|scale| >= min_normal_scale and finite), where it rounds exactly as the integer path; elsewhere
// (and without AVX512_BF16) with bf16_rne_avx512.
#define QK_AVX512VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi")))
#define QK_AVX512VBMI_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")))

bool has_vbmi() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi");
  }();
  return has;
}


QK_AVX512VBMI_BF16 inline __m512i bf16x32_cvtne(__m512 lo, __m512 hi) {
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lanes 0..15 from lo, 16..31 from hi
}

template <typename Conv, bool Stream, bool Cvt, typename Scale>
QK_AVX512VBMI_BF16 void chunks128_u16(const uint8_t* packed, Scale scale_of, const float* code, int bs_shift,
                                      int64_t c_begin, int64_t c_end, float min_normal_scale, uint16_t* out) {
  alignas(64) uint8_t ctrl[4][64];
  alignas(64) uint16_t shift[32];
  for (int k = 0; k < 4; ++k)
    for (int m = 0; m < 32; ++m) ctrl[k][2 * m] = ctrl[k][2 * m + 1] = static_cast<uint8_t>(16 * k + m / 2);
  for (int m = 0; m < 32; ++m) shift[m] = (m % 2 == 0) ? 4 : 0;  // element 2j: byte j's high nibble (bitsandbytes)
  __m512i perm[4];
  for (int k = 0; k < 4; ++k) perm[k] = _mm512_load_si512(ctrl[k]);
  const __m512i sh = _mm512_load_si512(shift);
  const __m512i nib = _mm512_set1_epi16(0x0f);
  const __m512i half[2] = {_mm512_setzero_si512(), _mm512_set1_epi16(0x10)};
  const __m512 cv = _mm512_loadu_ps(code);
  int64_t pb0 = -1, pb1 = -1;
  __m512i tab = _mm512_setzero_si512();
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t i = c * 128;
    const int64_t b0 = i >> bs_shift, b1 = (i + 64) >> bs_shift;
    if (b0 != pb0 || b1 != pb1) {
      const float s0 = scale_of(b0), s1 = b1 == b0 ? s0 : scale_of(b1);
      const __m512 p0 = _mm512_mul_ps(cv, _mm512_set1_ps(s0)), p1 = _mm512_mul_ps(cv, _mm512_set1_ps(s1));
      bool done = false;
      if constexpr (std::is_same<Conv, ToF16>::value) {
        tab = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtps_ph(p0, _MM_FROUND_TO_NEAREST_INT |
                                                                                _MM_FROUND_NO_EXC)),
                                 _mm512_cvtps_ph(p1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), 1);
        done = true;
      } else if constexpr (Cvt) {  // instantiated only where the CPU has AVX512_BF16 (has_avx512bf16)
        if (dequant_detail::bf16_cvt_scale_ok(s0, min_normal_scale) &&
            dequant_detail::bf16_cvt_scale_ok(s1, min_normal_scale)) {
          tab = bf16x32_cvtne(p0, p1);
          done = true;
        }
      }
      if (!done) {
        tab = _mm512_inserti64x4(_mm512_castsi256_si512(dequant_detail::bf16_rne_avx512(p0)),
                                 dequant_detail::bf16_rne_avx512(p1), 1);
      }
      pb0 = b0;
      pb1 = b1;
    }
    const __m512i d = _mm512_loadu_si512(packed + i / 2);
    for (int k = 0; k < 4; ++k) {
      __m512i x = _mm512_srlv_epi16(_mm512_permutexvar_epi8(perm[k], d), sh);
      x = _mm512_ternarylogic_epi32(x, nib, half[k >> 1], 0xEA);  // (x & 0x0f) | half bit
      store512<Stream>(out + i + 32 * k, _mm512_permutexvar_epi16(x, tab));
    }
  }
}

// The 128-element path over [0, n & ~127) in parallel, the rest (< 128 elements) by the scalar block loop. Returns
// false where it does not apply (no VBMI, blocksize not a multiple of 64, fewer than 128 elements).
template <typename Conv, typename Scale>
bool dequantize_u16_chunks(bool stream, const uint8_t* packed, Scale scale_of, const float* code, int64_t n,
                           int64_t blocksize, uint16_t* out) {
  if (!has_vbmi() || blocksize % 64 != 0 || n < 128) return false;
  const int bs_shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  float cb[16];
  std::copy(code, code + 16, cb);
  const float min_normal_scale = dequant_detail::bf16_cvt_min_normal_scale(cb);
  const bool cvt = dequant_detail::has_avx512bf16() && min_normal_scale < 1.0e30f;
  const int64_t chunks = n / 128;
  constexpr int64_t kParallelThreshold = int64_t(1) << 18;
#ifdef _OPENMP
#pragma omp parallel if (n >= kParallelThreshold)
#endif
  {
    int64_t c0 = 0, c1 = chunks;
#ifdef _OPENMP
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    c0 = chunks * t / nt;
    c1 = chunks * (t + 1) / nt;
#endif
    if (stream && cvt) chunks128_u16<Conv, true, true>(packed, scale_of, cb, bs_shift, c0, c1, min_normal_scale, out);
    else if (stream) chunks128_u16<Conv, true, false>(packed, scale_of, cb, bs_shift, c0, c1, min_normal_scale, out);
    else if (cvt) chunks128_u16<Conv, false, true>(packed, scale_of, cb, bs_shift, c0, c1, min_normal_scale, out);
    else chunks128_u16<Conv, false, false>(packed, scale_of, cb, bs_shift, c0, c1, min_normal_scale, out);
    if (stream) sfence_avx512();
  }
  (void)kParallelThreshold;
  for (int64_t i = chunks * 128; i < n;) {  // the tail: at most two blocks' pieces
    const int64_t b = i / blocksize, end = std::min(n, (b + 1) * blocksize);
    dequantize_block<Conv>(packed, scale_of(b), cb, i, end, out);
    i = end;
  }
  return true;
}

// dequantize_vec with the streaming block kernel and its fence, or the plain one.
template <typename Conv, typename Scale, typename StreamBlock, typename PlainBlock>
void dequantize_vec_avx512(bool stream, const uint8_t* packed, Scale absmax, const float* code, int64_t n,
                           int64_t blocksize, void* out, StreamBlock stream_block, PlainBlock plain_block) {
  auto* o = static_cast<typename Conv::T*>(out);
  if (stream) dequantize_vec<Conv>(packed, absmax, code, n, blocksize, o, stream_block, sfence_avx512);
  else dequantize_vec<Conv>(packed, absmax, code, n, blocksize, o, plain_block);
}

template <typename Scale>
bool dequantize_simd(Isa isa, const uint8_t* packed, Scale absmax, const float* code, int64_t n,
                     int64_t blocksize, void* out, DType out_dtype) {
  if (isa == Isa::avx512) {
    const int64_t bytes = n * (out_dtype == DType::float32 ? 4 : 2);
    // every block starts 64-byte aligned when the output does (blocksize >= 32 elements of >= 2 bytes)
    const bool stream = bytes >= kStreamMinBytes && (reinterpret_cast<uintptr_t>(out) & 63) == 0;
    switch (out_dtype) {
      case DType::float32:
        dequantize_vec_avx512<ToF32>(stream, packed, absmax, code, n, blocksize, out, block_f32_avx512<true>,
                                     block_f32_avx512<false>);
        return true;
      case DType::float16:
        if (dequantize_u16_chunks<ToF16>(stream, packed, absmax, code, n, blocksize, static_cast<uint16_t*>(out)))
          return true;
        dequantize_vec_avx512<ToF16>(stream, packed, absmax, code, n, blocksize, out, block_u16_avx512<ToF16, true>,
                                     block_u16_avx512<ToF16, false>);
        return true;
      case DType::bfloat16:
        if (dequantize_u16_chunks<ToBF16>(stream, packed, absmax, code, n, blocksize, static_cast<uint16_t*>(out)))
          return true;
        dequantize_vec_avx512<ToBF16>(stream, packed, absmax, code, n, blocksize, out, block_u16_avx512<ToBF16, true>,
                                      block_u16_avx512<ToBF16, false>);
        return true;
    }
  } else if (isa == Isa::avx2) {
    switch (out_dtype) {
      case DType::float32:
        dequantize_vec<ToF32>(packed, absmax, code, n, blocksize, static_cast<float*>(out), block_f32_avx2);
        return true;
      case DType::float16:
        dequantize_vec<ToF16>(packed, absmax, code, n, blocksize, static_cast<uint16_t*>(out), block_u16_avx2<ToF16>);
        return true;
      case DType::bfloat16:
        dequantize_vec<ToBF16>(packed, absmax, code, n, blocksize, static_cast<uint16_t*>(out),
                               block_u16_avx2<ToBF16>);
        return true;
    }
  }
  return false;
}
#endif  // QK_X86

}  // namespace

namespace {
// A fresh 32 MiB output (4096x4096 bf16) costs ~8-9 ms of 4 KiB page faults on this VM on first touch, several
// times the decode itself (~1.2 ms); that is the allocating call's floor here, shared with W.clone(). Asking for
// transparent huge pages on the output (madvise MADV_HUGEPAGE) was tried: 3.7 ms in one process, but 17-34 ms in
// others (memory compaction), so it was removed; callers that care pass a reused `out=` buffer.
template <typename Scale>
void dequantize_dispatch(const uint8_t* packed, Scale absmax, const float* code, int64_t n, int64_t blocksize,
                         void* out, DType out_dtype) {
#ifdef QK_X86
  if (dequantize_simd(active_isa(), packed, absmax, code, n, blocksize, out, out_dtype)) return;
#endif
  switch (out_dtype) {
    case DType::float32:
      dequantize_impl<ToF32>(packed, absmax, code, n, blocksize, static_cast<float*>(out));
      break;
    case DType::float16:
      dequantize_impl<ToF16>(packed, absmax, code, n, blocksize, static_cast<uint16_t*>(out));
      break;
    case DType::bfloat16:
      dequantize_impl<ToBF16>(packed, absmax, code, n, blocksize, static_cast<uint16_t*>(out));
      break;
  }
}
}  // namespace

void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                     void* out, DType out_dtype) {
  dequantize_dispatch(packed, PlainScale{absmax}, code, n, blocksize, out, out_dtype);
}

void dequantize_4bit_nested(const uint8_t* packed, const uint8_t* absmax_q, const float* nested_absmax,
                            const float* nested_code, float offset, int64_t nested_blocksize, const float* code,
                            int64_t n, int64_t blocksize, void* out, DType out_dtype) {
  int shift = 0;
  while ((int64_t(1) << shift) < nested_blocksize) ++shift;  // nested_blocksize is a power of two (validated)
  dequantize_dispatch(packed, NestedScale{absmax_q, nested_absmax, nested_code, offset, shift}, code, n, blocksize,
                      out, out_dtype);
}

// ------------------------------------------------------------------------------------ 8-bit blockwise (nested format)
namespace {
// out[i] = code[q[i]] * absmax[i / blocksize]: one float32 multiply per element on every path (the SIMD paths only
// vectorize the table read, with gathers from the 1 KiB map, which stays in L1), so all paths give the same bits.
inline void blockwise_range_scalar(const uint8_t* q, float scale, const float* code, int64_t begin, int64_t end,
                                   float* out) {
  for (int64_t i = begin; i < end; ++i) out[i] = code[q[i]] * scale;
}

#ifdef QK_X86
QK_AVX2 int64_t blockwise_range_avx2(const uint8_t* q, float scale, const float* code, int64_t begin, int64_t end,
                                     float* out) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_i32gather_ps(code, idx, 4), s));
  }
  return i;
}

QK_AVX512 int64_t blockwise_range_avx512(const uint8_t* q, float scale, const float* code, int64_t begin,
                                         int64_t end, float* out) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_i32gather_ps(idx, code, 4), s));
  }
  return i;
}
#endif  // QK_X86
}  // namespace

void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                          float* out) {
  const Isa isa = active_isa();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  float cb[256];
  std::copy(code, code + 256, cb);
  constexpr int64_t kParallelThreshold = int64_t(1) << 18;  // as dequantize_vec: below it threads cost more
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelThreshold)
#endif
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const float scale = absmax[b];
    int64_t i = begin;
#ifdef QK_X86
    if (isa == Isa::avx512) i = blockwise_range_avx512(q, scale, cb, begin, end, out);
    else if (isa == Isa::avx2) i = blockwise_range_avx2(q, scale, cb, begin, end, out);
#endif
    blockwise_range_scalar(q, scale, cb, i, end, out);
  }
  (void)isa;
  (void)kParallelThreshold;
}

}  // namespace cpu
}  // namespace qkernels
