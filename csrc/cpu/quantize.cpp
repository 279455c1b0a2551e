// CPU 4-bit quantization (absmax + nearest codebook entry by float32 midpoints), scalar / AVX2 / AVX-512.
//
// Exactness notes (see qkernels/reference.py::_encode):
// - absmax is computed as an integer max over |x| bit patterns (sign bit cleared).  For non-NaN floats the order of
//   the magnitude bit patterns equals the numeric order, so the result is exactly max |x|; a NaN (bits above inf)
//   propagates into absmax, which the Python layer rejects.
// - inv = 1.0f / max(absmax, 1e-38f): one float32 division, then v = x * inv (one float32 multiply), clamped.
// - The code index is #(midpoints < v) (torch.bucketize, right=False) on the stably sorted codebook; the AVX-512
//   path finds it with a branchless binary search over the (sorted, non-decreasing) midpoints padded with +inf,
//   which equals that count; the other paths count directly.  Then code = order[index].
// - quantize_blockwise (8-bit, 256-entry map) uses the same rules; every path runs the same 8-step branchless search
//   as count_below256 (AVX-512: first 4 steps by permutexvar over bounds[16k+15], last 4 by gather; AVX2: gathers),
//   so it is bit-identical to the scalar code even for maps with NaN/ties; order[] is skipped for a sorted map.
// Built with -ffp-contract=off: no FMA contraction anywhere.
#include "quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "isa.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QK_X86 1
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace qkernels {
namespace cpu {
namespace {

constexpr float kAbsmaxFloor = 1e-38f;
constexpr int64_t kParallelThreshold = int64_t(1) << 16;

struct Codebook {
  float bounds[16];   // 15 sorted midpoints, bounds[15] = +inf
  int32_t order[16];  // order[j] = codebook index of the j-th smallest entry
};

Codebook make_codebook(const float* code) {
  Codebook cb;
  int32_t idx[16];
  for (int i = 0; i < 16; ++i) idx[i] = i;
  // Stable sort by value (NaN last, like torch.argsort), never undefined behaviour.
  std::stable_sort(idx, idx + 16, [code](int32_t a, int32_t b) {
    const float x = code[a], y = code[b];
    return x < y || (!std::isnan(x) && std::isnan(y));
  });
  for (int i = 0; i < 16; ++i) cb.order[i] = idx[i];
  for (int i = 0; i < 15; ++i) cb.bounds[i] = (code[idx[i]] + code[idx[i + 1]]) / 2.0f;
  cb.bounds[15] = std::numeric_limits<float>::infinity();
  return cb;
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    const float f = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    return sign ? -f : f;
  }
  return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline float load_scalar(const void* A, DType dt, int64_t i) {
  switch (dt) {
    case DType::float32: return static_cast<const float*>(A)[i];
    case DType::float16: return half_bits_to_float(static_cast<const uint16_t*>(A)[i]);
    case DType::bfloat16: return f32_from_bits(static_cast<uint32_t>(static_cast<const uint16_t*>(A)[i]) << 16);
  }
  return 0.0f;
}

inline float block_inv(float absmax) { return 1.0f / std::max(absmax, kAbsmaxFloor); }

inline int32_t encode_scalar(float v, const Codebook& cb) {
  v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);  // NaN stays NaN (compares false below)
  int32_t j = 0;
  for (int k = 0; k < 15; ++k) j += cb.bounds[k] < v ? 1 : 0;
  return cb.order[j];
}

// ------------------------------------------------------------------------------------------------------ scalar
void block_scalar(const void* A, DType dt, int64_t begin, int64_t end, const Codebook& cb, uint8_t* packed,
                  float* absmax_out) {
  uint32_t m = 0;
  for (int64_t i = begin; i < end; ++i) m = std::max(m, f32_bits(load_scalar(A, dt, i)) & 0x7fffffffu);
  const float absmax = f32_from_bits(m);
  *absmax_out = absmax;
  const float inv = block_inv(absmax);
  for (int64_t i = begin; i < end; i += 2) {
    const int32_t hi = encode_scalar(load_scalar(A, dt, i) * inv, cb);
    const int32_t lo = encode_scalar(i + 1 < end ? load_scalar(A, dt, i + 1) * inv : 0.0f, cb);
    packed[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
  }
}

#ifdef QK_X86
// ------------------------------------------------------------------------------------------------------ AVX2
#define QK_AVX2 __attribute__((target("avx2,fma,f16c")))

QK_AVX2 inline __m256 load8_avx2(const void* A, DType dt, int64_t i) {
  switch (dt) {
    case DType::float32: return _mm256_loadu_ps(static_cast<const float*>(A) + i);
    case DType::float16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(A) + i)));
    case DType::bfloat16:
    default: {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(A) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

// Elements [i, i+cnt) (cnt <= 8), zero-padded.
QK_AVX2 inline __m256 load8_partial_avx2(const void* A, DType dt, int64_t i, int64_t cnt) {
  alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = 0; k < cnt; ++k) tmp[k] = load_scalar(A, dt, i + k);
  return _mm256_load_ps(tmp);
}

// 8 normalized values -> 4 packed bytes (as a little-endian uint32).
QK_AVX2 inline uint32_t encode8_avx2(__m256 v, const Codebook& cb, __m256i order_lo, __m256i order_hi) {
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(1.0f));
  __m256i j = _mm256_setzero_si256();
  for (int k = 0; k < 15; ++k) {
    const __m256 lt = _mm256_cmp_ps(_mm256_set1_ps(cb.bounds[k]), v, _CMP_LT_OQ);
    j = _mm256_sub_epi32(j, _mm256_castps_si256(lt));  // mask is -1 where bound < v
  }
  const __m256i c_lo = _mm256_permutevar8x32_epi32(order_lo, j);
  const __m256i c_hi = _mm256_permutevar8x32_epi32(order_hi, j);
  const __m256i c = _mm256_blendv_epi8(c_lo, c_hi, _mm256_cmpgt_epi32(j, _mm256_set1_epi32(7)));
  // 64-bit lane = (c_odd << 32) | c_even; byte 0 of t = (c_even << 4) | c_odd.
  const __m256i t = _mm256_or_si256(_mm256_slli_epi64(c, 4), _mm256_srli_epi64(c, 32));
  alignas(32) uint64_t q[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(q), t);
  return static_cast<uint32_t>(q[0] & 0xff) | static_cast<uint32_t>(q[1] & 0xff) << 8 |
         static_cast<uint32_t>(q[2] & 0xff) << 16 | static_cast<uint32_t>(q[3] & 0xff) << 24;
}

QK_AVX2 void block_avx2(const void* A, DType dt, int64_t begin, int64_t end, const Codebook& cb, uint8_t* packed,
                        float* absmax_out) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i m = _mm256_setzero_si256();
  int64_t i = begin;
  for (; i + 8 <= end; i += 8)
    m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(load8_avx2(A, dt, i)), abs_mask));
  if (i < end)
    m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(load8_partial_avx2(A, dt, i, end - i)), abs_mask));
  alignas(32) uint32_t mm[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(mm), m);
  uint32_t mb = 0;
  for (int k = 0; k < 8; ++k) mb = std::max(mb, mm[k]);
  const float absmax = f32_from_bits(mb);
  *absmax_out = absmax;
  const __m256 inv = _mm256_set1_ps(block_inv(absmax));
  const __m256i order_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb.order));
  const __m256i order_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb.order + 8));
  i = begin;
  for (; i + 8 <= end; i += 8) {
    const uint32_t w = encode8_avx2(_mm256_mul_ps(load8_avx2(A, dt, i), inv), cb, order_lo, order_hi);
    std::memcpy(packed + i / 2, &w, 4);
  }
  if (i < end) {
    const int64_t cnt = end - i;
    const uint32_t w = encode8_avx2(_mm256_mul_ps(load8_partial_avx2(A, dt, i, cnt), inv), cb, order_lo, order_hi);
    std::memcpy(packed + i / 2, &w, static_cast<size_t>((cnt + 1) / 2));
  }
}

// ------------------------------------------------------------------------------------------------------ AVX-512
#define QK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

QK_AVX512 inline __m512 load16_avx512(const void* A, DType dt, int64_t i, __mmask16 k) {
  switch (dt) {
    case DType::float32: return _mm512_maskz_loadu_ps(k, static_cast<const float*>(A) + i);
    case DType::float16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(A) + i));
    case DType::bfloat16:
    default:
      return _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(A) + i)), 16));
  }
}

// 16 normalized values -> 8 packed bytes in the low 64 bits.
QK_AVX512 inline __m128i encode16_avx512(__m512 v, __m512 bounds, __m512i order) {
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f));
  // Branchless lower_bound over 16 slots (bounds[15] = +inf): j = #(bounds < v).
  __m512i j = _mm512_setzero_si512();
  for (int step = 8; step >= 1; step >>= 1) {
    const __m512i probe = _mm512_add_epi32(j, _mm512_set1_epi32(step - 1));
    const __m512 b = _mm512_permutexvar_ps(probe, bounds);
    const __mmask16 lt = _mm512_cmp_ps_mask(b, v, _CMP_LT_OQ);
    j = _mm512_mask_add_epi32(j, lt, j, _mm512_set1_epi32(step));
  }
  const __m512i c = _mm512_permutexvar_epi32(j, order);
  const __m512i t = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
  return _mm512_cvtepi64_epi8(t);
}

QK_AVX512 void block_avx512(const void* A, DType dt, int64_t begin, int64_t end, __m512 bounds, __m512i order,
                            uint8_t* packed, float* absmax_out) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i m = _mm512_setzero_si512();
  int64_t i = begin;
  for (; i + 16 <= end; i += 16)
    m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(load16_avx512(A, dt, i, 0xffff)), abs_mask));
  const __mmask16 tail = static_cast<__mmask16>((1u << (end - i)) - 1u);
  if (i < end) m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(load16_avx512(A, dt, i, tail)), abs_mask));
  const float absmax = f32_from_bits(_mm512_reduce_max_epu32(m));
  *absmax_out = absmax;
  const __m512 inv = _mm512_set1_ps(block_inv(absmax));
  i = begin;
  for (; i + 16 <= end; i += 16)
    _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + i / 2),
                     encode16_avx512(_mm512_mul_ps(load16_avx512(A, dt, i, 0xffff), inv), bounds, order));
  if (i < end) {
    const int64_t nbytes = (end - i + 1) / 2;  // padded lanes are 0.0 -> the code of 0.0 (the odd-n pad nibble)
    _mm_mask_storeu_epi8(packed + i / 2, static_cast<__mmask16>((1u << nbytes) - 1u),
                         encode16_avx512(_mm512_mul_ps(load16_avx512(A, dt, i, tail), inv), bounds, order));
  }
}

QK_AVX512 void quantize_avx512(const void* A, DType dt, int64_t n, int64_t blocksize, const Codebook& cb,
                               uint8_t* packed, float* absmax) {
  const __m512 bounds = _mm512_loadu_ps(cb.bounds);
  const __m512i order = _mm512_loadu_si512(cb.order);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelThreshold)
#endif
  for (int64_t b = 0; b < nblocks; ++b)
    block_avx512(A, dt, b * blocksize, std::min(n, (b + 1) * blocksize), bounds, order, packed, absmax + b);
}

QK_AVX2 void quantize_avx2(const void* A, DType dt, int64_t n, int64_t blocksize, const Codebook& cb,
                           uint8_t* packed, float* absmax) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelThreshold)
#endif
  for (int64_t b = 0; b < nblocks; ++b)
    block_avx2(A, dt, b * blocksize, std::min(n, (b + 1) * blocksize), cb, packed, absmax + b);
}
#endif  // QK_X86

void quantize_scalar(const void* A, DType dt, int64_t n, int64_t blocksize, const Codebook& cb, uint8_t* packed,
                     float* absmax) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelThreshold)
#endif
  for (int64_t b = 0; b < nblocks; ++b)
    block_scalar(A, dt, b * blocksize, std::min(n, (b + 1) * blocksize), cb, packed, absmax + b);
}

}  // namespace

void quantize_4bit(const void* A, DType in_dtype, int64_t n, int64_t blocksize, const float* code, uint8_t* packed,
                   float* absmax) {
  const Codebook cb = make_codebook(code);
  (void)kParallelThreshold;
  switch (active_isa()) {
#ifdef QK_X86
    case Isa::avx512: quantize_avx512(A, in_dtype, n, blocksize, cb, packed, absmax); return;
    case Isa::avx2: quantize_avx2(A, in_dtype, n, blocksize, cb, packed, absmax); return;
#endif
    default: quantize_scalar(A, in_dtype, n, blocksize, cb, packed, absmax); return;
  }
}

namespace {
// 8-bit (256-entry map) codebook: 255 sorted float32 midpoints + the stable sort order (NaN last, like torch.argsort).
struct Codebook256 {
  float bounds[256];  // 255 sorted midpoints, bounds[255] = +inf (never probed; keeps gathers in range)
  int32_t order[256];
  float coarse[16];   // coarse[k] = bounds[16k + 15] (k < 15), coarse[15] = +inf: the probes of the first 4 steps
  bool identity;      // order[i] == i for all i (an already sorted map): the order lookup is skipped
};

void make_codebook256(const float* code, Codebook256* cb) {
  int32_t idx[256];
  for (int i = 0; i < 256; ++i) idx[i] = i;
  std::stable_sort(idx, idx + 256, [code](int32_t a, int32_t b) {
    const float x = code[a], y = code[b];
    return x < y || (!std::isnan(x) && std::isnan(y));
  });
  for (int i = 0; i < 256; ++i) cb->order[i] = idx[i];
  for (int i = 0; i < 255; ++i) cb->bounds[i] = (code[idx[i]] + code[idx[i + 1]]) / 2.0f;
  cb->bounds[255] = std::numeric_limits<float>::infinity();
  for (int k = 0; k < 15; ++k) cb->coarse[k] = cb->bounds[16 * k + 15];
  cb->coarse[15] = std::numeric_limits<float>::infinity();
  cb->identity = true;
  for (int i = 0; i < 256; ++i) cb->identity = cb->identity && cb->order[i] == i;
}

// #(bounds < v) over the sorted (non-decreasing) midpoints: branchless lower_bound over 256 slots (slot 255 = +inf).
inline int32_t count_below256(const float* bounds, float v) {
  int32_t j = 0;
  for (int32_t step = 128; step >= 1; step >>= 1) {
    const int32_t probe = j + step - 1;  // <= 254
    j += (bounds[probe] < v) ? step : 0;
  }
  return j;
}
}  // namespace

namespace {
inline uint32_t absmax_bits_scalar(const float* A, int64_t begin, int64_t end) {
  uint32_t m = 0;
  for (int64_t i = begin; i < end; ++i) m = std::max(m, f32_bits(A[i]) & 0x7fffffffu);
  return m;
}

void blockwise_block_scalar(const float* A, int64_t begin, int64_t end, const Codebook256& cb, uint8_t* out,
                            float* absmax_out) {
  const float am = f32_from_bits(absmax_bits_scalar(A, begin, end));  // exactly max|x|; a NaN propagates
  *absmax_out = am;
  const float inv = block_inv(am);
  for (int64_t i = begin; i < end; ++i) {
    float v = A[i] * inv;
    v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
    out[i] = static_cast<uint8_t>(cb.order[count_below256(cb.bounds, v)]);
  }
}

#ifdef QK_X86
// The vector paths run the SAME 8-step branchless search as count_below256 (same probes, same `<` compares, so the
// same result even for a map with NaN midpoints): the first 4 steps only ever probe bounds[16k + 15] (held in one
// register, `coarse`), the last 4 probe bounds[j + step - 1] by gather.  Clamp: max(-1, v) then min(1, .) with the
// constant FIRST, so a NaN v stays NaN (x86 max/min return the second operand when either is NaN), like the scalar.
QK_AVX512 inline __m512i blockwise_codes16_avx512(__m512 v, __m512 coarse, const Codebook256& cb, bool identity) {
  v = _mm512_min_ps(_mm512_set1_ps(1.0f), _mm512_max_ps(_mm512_set1_ps(-1.0f), v));
  __m512i j = _mm512_setzero_si512();
  for (int step = 128; step >= 16; step >>= 1) {
    const __m512i k = _mm512_srli_epi32(_mm512_add_epi32(j, _mm512_set1_epi32(step - 1)), 4);
    const __mmask16 lt = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(k, coarse), v, _CMP_LT_OQ);
    j = _mm512_mask_add_epi32(j, lt, j, _mm512_set1_epi32(step));
  }
  for (int step = 8; step >= 1; step >>= 1) {
    const __m512i probe = _mm512_add_epi32(j, _mm512_set1_epi32(step - 1));
    const __mmask16 lt = _mm512_cmp_ps_mask(_mm512_i32gather_ps(probe, cb.bounds, 4), v, _CMP_LT_OQ);
    j = _mm512_mask_add_epi32(j, lt, j, _mm512_set1_epi32(step));
  }
  return identity ? j : _mm512_i32gather_epi32(j, cb.order, 4);
}

constexpr int kU = 8;  // vectors per interleaved group
// kU independent vectors interleaved step by step (the search is a dependent chain; this gives it ILP).
QK_AVX512 inline void blockwise_codesU_avx512(__m512 v[kU], __m512 coarse, const Codebook256& cb, bool identity,
                                               __m512i c[kU]) {
  __m512i j[kU];
  for (int u = 0; u < kU; ++u) {
    v[u] = _mm512_min_ps(_mm512_set1_ps(1.0f), _mm512_max_ps(_mm512_set1_ps(-1.0f), v[u]));
    j[u] = _mm512_setzero_si512();
  }
  for (int step = 128; step >= 16; step >>= 1)
    for (int u = 0; u < kU; ++u) {
      const __m512i k = _mm512_srli_epi32(_mm512_add_epi32(j[u], _mm512_set1_epi32(step - 1)), 4);
      const __mmask16 lt = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(k, coarse), v[u], _CMP_LT_OQ);
      j[u] = _mm512_mask_add_epi32(j[u], lt, j[u], _mm512_set1_epi32(step));
    }
  for (int step = 8; step >= 1; step >>= 1)
    for (int u = 0; u < kU; ++u) {
      const __m512i probe = _mm512_add_epi32(j[u], _mm512_set1_epi32(step - 1));
      const __mmask16 lt = _mm512_cmp_ps_mask(_mm512_i32gather_ps(probe, cb.bounds, 4), v[u], _CMP_LT_OQ);
      j[u] = _mm512_mask_add_epi32(j[u], lt, j[u], _mm512_set1_epi32(step));
    }
  for (int u = 0; u < kU; ++u) c[u] = identity ? j[u] : _mm512_i32gather_epi32(j[u], cb.order, 4);
}

QK_AVX512 void blockwise_block_avx512(const float* A, int64_t begin, int64_t end, const Codebook256& cb,
                                      __m512 coarse, uint8_t* out, float* absmax_out) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i m = _mm512_setzero_si512();
  int64_t i = begin;
  for (; i + 16 <= end; i += 16)
    m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(A + i)), abs_mask));
  const __mmask16 tail = static_cast<__mmask16>((1u << (end - i)) - 1u);
  if (i < end) m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(_mm512_maskz_loadu_ps(tail, A + i)), abs_mask));
  const float am = f32_from_bits(_mm512_reduce_max_epu32(m));
  *absmax_out = am;
  const __m512 inv = _mm512_set1_ps(block_inv(am));
  const bool identity = cb.identity;
  i = begin;
  for (; i + 16 * kU <= end; i += 16 * kU) {
    __m512 v[kU];
    __m512i c[kU];
    for (int u = 0; u < kU; ++u) v[u] = _mm512_mul_ps(_mm512_loadu_ps(A + i + 16 * u), inv);
    blockwise_codesU_avx512(v, coarse, cb, identity, c);
    for (int u = 0; u < kU; ++u)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 16 * u), _mm512_cvtepi32_epi8(c[u]));
  }
  for (; i + 16 <= end; i += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm512_cvtepi32_epi8(blockwise_codes16_avx512(_mm512_mul_ps(_mm512_loadu_ps(A + i), inv), coarse,
                                                                   cb, identity)));
  if (i < end)
    _mm_mask_storeu_epi8(out + i, tail,
                         _mm512_cvtepi32_epi8(blockwise_codes16_avx512(
                             _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, A + i), inv), coarse, cb, identity)));
}

QK_AVX2 inline __m256i blockwise_codes8_avx2(__m256 v, const Codebook256& cb, bool identity) {
  v = _mm256_min_ps(_mm256_set1_ps(1.0f), _mm256_max_ps(_mm256_set1_ps(-1.0f), v));
  __m256i j = _mm256_setzero_si256();
  for (int step = 128; step >= 1; step >>= 1) {
    const __m256i probe = _mm256_add_epi32(j, _mm256_set1_epi32(step - 1));
    const __m256 lt = _mm256_cmp_ps(_mm256_i32gather_ps(cb.bounds, probe, 4), v, _CMP_LT_OQ);
    j = _mm256_add_epi32(j, _mm256_and_si256(_mm256_castps_si256(lt), _mm256_set1_epi32(step)));
  }
  return identity ? j : _mm256_i32gather_epi32(cb.order, j, 4);
}

// 4 x 8 values interleaved step by step (ILP for the dependent gather chain).
QK_AVX2 inline void blockwise_codes32_avx2(__m256 v[4], const Codebook256& cb, bool identity, __m256i c[4]) {
  __m256i j[4];
  for (int u = 0; u < 4; ++u) {
    v[u] = _mm256_min_ps(_mm256_set1_ps(1.0f), _mm256_max_ps(_mm256_set1_ps(-1.0f), v[u]));
    j[u] = _mm256_setzero_si256();
  }
  for (int step = 128; step >= 1; step >>= 1)
    for (int u = 0; u < 4; ++u) {
      const __m256i probe = _mm256_add_epi32(j[u], _mm256_set1_epi32(step - 1));
      const __m256 lt = _mm256_cmp_ps(_mm256_i32gather_ps(cb.bounds, probe, 4), v[u], _CMP_LT_OQ);
      j[u] = _mm256_add_epi32(j[u], _mm256_and_si256(_mm256_castps_si256(lt), _mm256_set1_epi32(step)));
    }
  for (int u = 0; u < 4; ++u) c[u] = identity ? j[u] : _mm256_i32gather_epi32(cb.order, j[u], 4);
}

// 8 int32 codes (each < 256) -> 8 bytes in the low 64 bits.
QK_AVX2 inline uint64_t narrow8_avx2(__m256i c) {
  const __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  return static_cast<uint64_t>(_mm_cvtsi128_si64(_mm_packus_epi16(p16, p16)));
}

QK_AVX2 void blockwise_block_avx2(const float* A, int64_t begin, int64_t end, const Codebook256& cb, uint8_t* out,
                                  float* absmax_out) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i m = _mm256_setzero_si256();
  int64_t i = begin;
  for (; i + 8 <= end; i += 8)
    m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(A + i)), abs_mask));
  alignas(32) uint32_t mm[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(mm), m);
  uint32_t mb = absmax_bits_scalar(A, i, end);
  for (int k = 0; k < 8; ++k) mb = std::max(mb, mm[k]);
  const float am = f32_from_bits(mb);
  *absmax_out = am;
  const float inv_s = block_inv(am);
  const __m256 inv = _mm256_set1_ps(inv_s);
  const bool identity = cb.identity;
  i = begin;
  for (; i + 32 <= end; i += 32) {
    __m256 v[4];
    __m256i c[4];
    for (int u = 0; u < 4; ++u) v[u] = _mm256_mul_ps(_mm256_loadu_ps(A + i + 8 * u), inv);
    blockwise_codes32_avx2(v, cb, identity, c);
    for (int u = 0; u < 4; ++u) {
      const uint64_t w = narrow8_avx2(c[u]);
      std::memcpy(out + i + 8 * u, &w, 8);
    }
  }
  for (; i + 8 <= end; i += 8) {
    const uint64_t w = narrow8_avx2(blockwise_codes8_avx2(_mm256_mul_ps(_mm256_loadu_ps(A + i), inv), cb, identity));
    std::memcpy(out + i, &w, 8);
  }
  for (; i < end; ++i) {
    float v = A[i] * inv_s;
    v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
    out[i] = static_cast<uint8_t>(cb.order[count_below256(cb.bounds, v)]);
  }
}

QK_AVX512 void quantize_blockwise_avx512(const float* A, int64_t n, int64_t blocksize, const Codebook256& cb,
                                         uint8_t* out, float* absmax) {
  const __m512 coarse = _mm512_loadu_ps(cb.coarse);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelThreshold)
#endif
  for (int64_t b = 0; b < nblocks; ++b)
    blockwise_block_avx512(A, b * blocksize, std::min(n, (b + 1) * blocksize), cb, coarse, out, absmax + b);
}

QK_AVX2 void quantize_blockwise_avx2(const float* A, int64_t n, int64_t blocksize, const Codebook256& cb,
                                     uint8_t* out, float* absmax) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelThreshold)
#endif
  for (int64_t b = 0; b < nblocks; ++b)
    blockwise_block_avx2(A, b * blocksize, std::min(n, (b + 1) * blocksize), cb, out, absmax + b);
}
#endif  // QK_X86

void quantize_blockwise_scalar(const float* A, int64_t n, int64_t blocksize, const Codebook256& cb, uint8_t* out,
                               float* absmax) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelThreshold)
#endif
  for (int64_t b = 0; b < nblocks; ++b)
    blockwise_block_scalar(A, b * blocksize, std::min(n, (b + 1) * blocksize), cb, out, absmax + b);
}
}  // namespace

void quantize_blockwise(const float* A, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                        float* absmax) {
  Codebook256 cb;
  make_codebook256(code, &cb);
  switch (active_isa()) {
#ifdef QK_X86
    case Isa::avx512: quantize_blockwise_avx512(A, n, blocksize, cb, out, absmax); return;
    case Isa::avx2: quantize_blockwise_avx2(A, n, blocksize, cb, out, absmax); return;
#endif
    default: quantize_blockwise_scalar(A, n, blocksize, cb, out, absmax); return;
  }
}

}  // namespace cpu
}  // namespace qkernels
