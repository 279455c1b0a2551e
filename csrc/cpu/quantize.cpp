// CPU 4-bit quantization (absmax + nearest codebook entry by float32 midpoints), scalar / AVX2 / AVX-512.
//
// Exactness notes (see qkernels/reference.py::_encode):
// - absmax is computed as an integer max over |x| bit patterns (sign bit cleared).  For non-NaN floats the order of
//   the magnitude bit patterns equals the numeric order, so the result is exactly max |x|; a NaN (bits above inf)
//   propagates into absmax, which the Python layer rejects.
// - inv = 1.0f / max(absmax, 1e-38f): one float32 division, then v = x * inv (one float32 multiply), clamped.
// - The code index is #(midpoints < v) (torch.bucketize, right=False) on the stably sorted codebook; the AVX-512
//   path finds it with a 32-cell lookup plus the few compares inside a cell (QuantizeCellsAvx512; exactness argued
//   there), or, for codebooks that do not fit it, a branchless binary search over the (sorted, non-decreasing)
//   midpoints padded with +inf; both equal that count.  The other paths count directly.  Then code = order[index].
// - quantize_blockwise (8-bit, 256-entry map) uses the same rules; every path runs the same 8-step branchless search
//   as count_below256 (AVX-512: first 4 steps by permutexvar over bounds[16k+15], last 4 by gather; AVX2: gathers),
//   so it is bit-identical to the scalar code even for maps with NaN/ties; order[] is skipped for a sorted map.
// Built with -ffp-contract=off: no FMA contraction anywhere.  The one explicit FMA (the cell index v * 16 + 15.5)
// rounds exactly like the separate multiply and add that build its tables, because v * 16 is exact.
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

// The one "blocks in parallel" loop of every quantize path.  fn(b0, b1) quantizes blocks [b0, b1); each OpenMP
// thread makes ONE call with its static share, so the per-block loop lives inside fn, where it can carry the ISA's
// target attribute and inline the block body (GCC does not inline a target("avx512...") function into a caller
// without it, and a lambda does not inherit the attribute: a per-block call cost ~5 ns x 262,144 blocks at 4096^2).
template <class RangeFn>
void for_each_block_range(int64_t n, int64_t blocksize, const RangeFn& fn) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#ifdef _OPENMP
  if (n >= kParallelThreshold && omp_get_max_threads() > 1) {
#pragma omp parallel
    {
      const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
      const int64_t b0 = nblocks * t / nt, b1 = nblocks * (t + 1) / nt;
      if (b0 < b1) fn(b0, b1);
    }
    return;
  }
#endif
  fn(int64_t(0), nblocks);
}

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

// ---- AVX-512 fast path: cell lookup + even/odd split (used when the codebook allows it; see make_cells).
//
// Code index j = #(bounds < v).  A monotone cell function c(v) = trunc(RN(v * 16 + 15.5)) splits [-1, 1] into 32
// cells.  For a midpoint m: c(m) < c(v) implies m < v and c(m) > c(v) implies m > v (monotone), so
//   j = base[c] + #(m in cell c with m < v),   base[c] = #(m with c(m) < c).
// The midpoints sharing a cell (K of them at most: NF4 has 1, FP4 3) are compared explicitly, so the result is the
// scalar count exactly.  v * 16 is exact (a power of two), so the vector FMA v * 16 + 15.5 rounds once, like the
// scalar multiply-then-add that builds the tables.  Requires every midpoint finite and inside (-1, 1): then the
// [-1, 1] clamp never changes a count (a v just above 1 exceeds all 15 midpoints either way, a v below -1 none),
// so it is skipped; |v| <= 1 + 2^-20 always (v = x * RN(1/absmax), |x| <= absmax), so c(v) is in [0, 31].  A NaN v
// converts to INT_MIN, whose low 5 bits select cell 0 (base 0) and whose compares are false: j = 0, as in the
// scalar path.  Per 16 values: 1 FMA, 1 convert, 1 + K two-table permutes, K compares and masked adds, against
// the 4-step binary search's 16 dependent operations.
constexpr int kCells = 32;
constexpr int kMaxPerCell = 3;

struct CellTables {
  alignas(64) float mid[kMaxPerCell][kCells];  // midpoints of cell c, ascending, padded with +inf
  alignas(64) int32_t base[kCells];
  int K = 0;        // max midpoints in one cell
  bool ok = false;  // the fast path applies
};

inline int32_t cell_of(float m) {
  float t = m * 16.0f;
  t = t + 15.5f;
  return static_cast<int32_t>(t);  // m in (-1, 1): t in (-0.5, 31.5), truncation toward zero
}

CellTables make_cells(const Codebook& cb) {
  CellTables ct;
  for (int k = 0; k < 15; ++k)
    if (!(cb.bounds[k] > -1.0f && cb.bounds[k] < 1.0f)) return ct;  // also rejects NaN
  int count[kCells] = {0};
  for (int t = 0; t < kMaxPerCell; ++t)
    for (int c = 0; c < kCells; ++c) ct.mid[t][c] = std::numeric_limits<float>::infinity();
  for (int c = 0; c < kCells; ++c) ct.base[c] = 0;
  for (int k = 0; k < 15; ++k) {  // bounds ascending: each cell's list comes out ascending
    const int c = cell_of(cb.bounds[k]);
    if (count[c] == kMaxPerCell) return ct;
    ct.mid[count[c]++][c] = cb.bounds[k];
    for (int d = c + 1; d < kCells; ++d) ++ct.base[d];
  }
  for (int c = 0; c < kCells; ++c) ct.K = std::max(ct.K, count[c]);
  ct.K = std::max(ct.K, 1);
  ct.ok = true;
  return ct;
}

template <int K>
struct CellRegs {
  __m512i base_lo, base_hi;
  __m512 mid_lo[K], mid_hi[K];
};

template <int K>
QK_AVX512 inline __m512i cell_index16(__m512 v, const CellRegs<K>& r) {
  const __m512i c = _mm512_cvttps_epi32(_mm512_fmadd_ps(v, _mm512_set1_ps(16.0f), _mm512_set1_ps(15.5f)));
  __m512i j = _mm512_permutex2var_epi32(r.base_lo, c, r.base_hi);
  for (int t = 0; t < K; ++t) {
    const __mmask16 lt = _mm512_cmp_ps_mask(_mm512_permutex2var_ps(r.mid_lo[t], c, r.mid_hi[t]), v, _CMP_LT_OQ);
    j = _mm512_mask_add_epi32(j, lt, j, _mm512_set1_epi32(1));
  }
  return j;
}

// 32 consecutive elements [i, i + 32) (lanes beyond the mask read as 0): even = elements i, i+2, ..., odd = i+1, ...
// as float32.  Even elements go to the high nibble, so the split makes packing one shift + or per 32 elements.
template <DType DT>
QK_AVX512 inline void load32_split(const void* A, int64_t i, __mmask32 k, __m512* even, __m512* odd) {
  if (DT == DType::float32) {
    const float* p = static_cast<const float*>(A) + i;
    const __m512 a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(k), p);
    const __m512 b = _mm512_maskz_loadu_ps(static_cast<__mmask16>(k >> 16), p + 16);
    const __m512i idx_even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    *even = _mm512_permutex2var_ps(a, idx_even, b);
    *odd = _mm512_permutex2var_ps(a, _mm512_add_epi32(idx_even, _mm512_set1_epi32(1)), b);
  } else {
    const __m512i x = _mm512_maskz_loadu_epi16(k, static_cast<const uint16_t*>(A) + i);
    if (DT == DType::bfloat16) {  // bf16 -> f32 is a 16-bit shift; the odd element already sits in the high half
      *even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      *odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u))));
    } else {
      *even = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(x));
      *odd = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
    }
  }
}

// max |x| bits over [begin, end) as the input dtype's magnitude bits (integer order = numeric order; NaN is larger
// than inf, so it propagates), returned as the exact float32 value.
template <DType DT>
QK_AVX512 inline float block_absmax_avx512(const void* A, int64_t begin, int64_t end) {
  if (DT == DType::float32) {
    const float* p = static_cast<const float*>(A);
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    __m512i m = _mm512_setzero_si512();
    for (int64_t i = begin; i < end; i += 16) {
      const int64_t cnt = std::min<int64_t>(16, end - i);
      const __mmask16 k = static_cast<__mmask16>(cnt == 16 ? 0xffffu : (1u << cnt) - 1u);
      m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(_mm512_maskz_loadu_ps(k, p + i)), abs_mask));
    }
    return f32_from_bits(_mm512_reduce_max_epu32(m));
  }
  const uint16_t* p = static_cast<const uint16_t*>(A);
  const __m512i abs_mask = _mm512_set1_epi16(0x7fff);
  __m512i m = _mm512_setzero_si512();
  for (int64_t i = begin; i < end; i += 32) {
    const int64_t cnt = std::min<int64_t>(32, end - i);
    const __mmask32 k = cnt == 32 ? 0xffffffffu : (1u << cnt) - 1u;
    m = _mm512_max_epu16(m, _mm512_and_si512(_mm512_maskz_loadu_epi16(k, p + i), abs_mask));
  }
  m = _mm512_max_epu32(_mm512_and_si512(m, _mm512_set1_epi32(0xffff)), _mm512_srli_epi32(m, 16));
  const uint32_t bits = _mm512_reduce_max_epu32(m);
  return DT == DType::bfloat16 ? f32_from_bits(bits << 16) : half_bits_to_float(static_cast<uint16_t>(bits));
}

// max |x| of 16 full blocks of a 16-bit input at once: per block a 32-lane u16 max vector, then a transposed
// reduction (shuffle two vectors' halves together, max) that costs ~3 operations per block instead of ~14 for a
// horizontal reduction each, and one vector division for the 16 reciprocals.  Writes absmax[0..16) (float32, exact)
// and inv[0..16) = 1 / max(absmax, 1e-38) (a NaN absmax stays NaN, like block_inv).
template <DType DT>
QK_AVX512 inline void group16_absmax_avx512(const uint16_t* p, int64_t blocksize, float* absmax, float* inv) {
  const __m512i abs_mask = _mm512_set1_epi16(0x7fff);
  __m512i M[16];
  for (int b = 0; b < 16; ++b) {
    const uint16_t* q = p + b * blocksize;
    __m512i m = _mm512_and_si512(_mm512_loadu_si512(q), abs_mask);
    for (int64_t i = 32; i < blocksize; i += 32)
      m = _mm512_max_epu16(m, _mm512_and_si512(_mm512_loadu_si512(q + i), abs_mask));
    M[b] = m;
  }
  // [P0 P1 P2 P3] (128-bit lanes), [Q0 ..] -> [P0|P2, P1|P3, Q0|Q2, Q1|Q3]  (| = lane-wise max)
  __m512i R[8];
  for (int k = 0; k < 8; ++k)
    R[k] = _mm512_max_epu16(_mm512_shuffle_i64x2(M[2 * k], M[2 * k + 1], 0x44),
                            _mm512_shuffle_i64x2(M[2 * k], M[2 * k + 1], 0xee));
  // -> one 128-bit lane per block: V[g] lanes = blocks 4g, 4g+1, 4g+2, 4g+3
  __m512i V[4];
  for (int g = 0; g < 4; ++g)
    V[g] = _mm512_max_epu16(_mm512_shuffle_i64x2(R[2 * g], R[2 * g + 1], 0x88),
                            _mm512_shuffle_i64x2(R[2 * g], R[2 * g + 1], 0xdd));
  // W[h] lane l: qword 0 = block 8h + l, qword 1 = block 8h + 4 + l (4 u16 each)
  __m512i W[2];
  for (int h = 0; h < 2; ++h) {
    W[h] = _mm512_max_epu16(_mm512_unpacklo_epi64(V[2 * h], V[2 * h + 1]),
                            _mm512_unpackhi_epi64(V[2 * h], V[2 * h + 1]));
    W[h] = _mm512_max_epu16(W[h], _mm512_shuffle_epi32(W[h], _MM_PERM_CDAB));  // both dwords of a qword = its max
  }
  // dword 4l + k holds block l (k=0), 8 + l (k=1), 4 + l (k=2), 12 + l (k=3) in two u16 halves
  __m512i Z = _mm512_mask_blend_epi32(0xaaaa, W[0], W[1]);
  Z = _mm512_max_epu32(_mm512_and_si512(Z, _mm512_set1_epi32(0xffff)), _mm512_srli_epi32(Z, 16));
  Z = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15), Z);
  const __m512 am = DT == DType::bfloat16 ? _mm512_castsi512_ps(_mm512_slli_epi32(Z, 16))
                                          : _mm512_cvtph_ps(_mm512_cvtepi32_epi16(Z));
  _mm512_storeu_ps(absmax, am);
  _mm512_storeu_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_max_ps(_mm512_set1_ps(kAbsmaxFloor), am)));
}

template <DType DT, int K>
struct QuantizeCellsAvx512 {
  const void* A;
  int64_t n, blocksize;
  const Codebook* cb;
  const CellTables* ct;
  uint8_t* packed;
  float* absmax;

  QK_AVX512 void operator()(int64_t b0, int64_t b1) const {
    CellRegs<K> r;
    r.base_lo = _mm512_load_si512(ct->base);
    r.base_hi = _mm512_load_si512(ct->base + 16);
    for (int t = 0; t < K; ++t) {
      r.mid_lo[t] = _mm512_load_ps(ct->mid[t]);
      r.mid_hi[t] = _mm512_load_ps(ct->mid[t] + 16);
    }
    bool identity = true;
    for (int k = 0; k < 16; ++k) identity = identity && cb->order[k] == k;
    const __m512i order = _mm512_loadu_si512(cb->order);
    const __m512i order_hi = _mm512_slli_epi32(order, 4);
    alignas(64) float inv16[16];
    for (int64_t b = b0; b < b1;) {
      int64_t nb = 1;  // blocks handled in this step
      if (DT != DType::float32 && b + 16 <= b1 && (b + 16) * blocksize <= n) {
        group16_absmax_avx512<DT>(static_cast<const uint16_t*>(A) + b * blocksize, blocksize, absmax + b, inv16);
        nb = 16;
      } else {
        const float am = block_absmax_avx512<DT>(A, b * blocksize, std::min(n, (b + 1) * blocksize));
        absmax[b] = am;
        inv16[0] = block_inv(am);
      }
      for (int64_t k = 0; k < nb; ++k, ++b) {
        const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
        const __m512 inv = _mm512_set1_ps(inv16[k]);
        for (int64_t i = begin; i < end; i += 32) {
          const int64_t cnt = std::min<int64_t>(32, end - i);
          __m512 even, odd;
          load32_split<DT>(A, i, cnt == 32 ? 0xffffffffu : (1u << cnt) - 1u, &even, &odd);
          const __m512i je = cell_index16<K>(_mm512_mul_ps(even, inv), r);
          const __m512i jo = cell_index16<K>(_mm512_mul_ps(odd, inv), r);
          const __m512i bytes = identity ? _mm512_or_si512(_mm512_slli_epi32(je, 4), jo)
                                         : _mm512_or_si512(_mm512_permutexvar_epi32(je, order_hi),
                                                           _mm512_permutexvar_epi32(jo, order));
          const __m128i out = _mm512_cvtepi32_epi8(bytes);
          if (cnt == 32) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2), out);
          } else {  // padded lanes are 0.0 -> the code of 0.0 (the odd-n pad nibble)
            const int64_t nbytes = (cnt + 1) / 2;
            _mm_mask_storeu_epi8(packed + i / 2, static_cast<__mmask16>((1u << nbytes) - 1u), out);
          }
        }
      }
    }
  }
};

template <DType DT>
void quantize_cells_avx512(const void* A, int64_t n, int64_t blocksize, const Codebook& cb, const CellTables& ct,
                           uint8_t* packed, float* absmax) {
  switch (ct.K) {
    case 1:
      for_each_block_range(n, blocksize, QuantizeCellsAvx512<DT, 1>{A, n, blocksize, &cb, &ct, packed, absmax});
      return;
    case 2:
      for_each_block_range(n, blocksize, QuantizeCellsAvx512<DT, 2>{A, n, blocksize, &cb, &ct, packed, absmax});
      return;
    default:
      for_each_block_range(n, blocksize, QuantizeCellsAvx512<DT, 3>{A, n, blocksize, &cb, &ct, packed, absmax});
      return;
  }
}

// ---- AVX-512 general path (any codebook): binary search per block (block_avx512).
struct QuantizeSearchAvx512 {
  const void* A;
  DType dt;
  int64_t n, blocksize;
  const Codebook* cb;
  uint8_t* packed;
  float* absmax;
  QK_AVX512 void operator()(int64_t b0, int64_t b1) const {
    const __m512 bounds = _mm512_loadu_ps(cb->bounds);
    const __m512i order = _mm512_loadu_si512(cb->order);
    for (int64_t b = b0; b < b1; ++b)
      block_avx512(A, dt, b * blocksize, std::min(n, (b + 1) * blocksize), bounds, order, packed, absmax + b);
  }
};

void quantize_avx512(const void* A, DType dt, int64_t n, int64_t blocksize, const Codebook& cb, uint8_t* packed,
                     float* absmax) {
  const CellTables ct = make_cells(cb);
  if (!ct.ok) {
    for_each_block_range(n, blocksize, QuantizeSearchAvx512{A, dt, n, blocksize, &cb, packed, absmax});
    return;
  }
  switch (dt) {
    case DType::float32: quantize_cells_avx512<DType::float32>(A, n, blocksize, cb, ct, packed, absmax); return;
    case DType::float16: quantize_cells_avx512<DType::float16>(A, n, blocksize, cb, ct, packed, absmax); return;
    case DType::bfloat16: quantize_cells_avx512<DType::bfloat16>(A, n, blocksize, cb, ct, packed, absmax); return;
  }
}

struct QuantizeAvx2 {
  const void* A;
  DType dt;
  int64_t n, blocksize;
  const Codebook* cb;
  uint8_t* packed;
  float* absmax;
  QK_AVX2 void operator()(int64_t b0, int64_t b1) const {
    for (int64_t b = b0; b < b1; ++b)
      block_avx2(A, dt, b * blocksize, std::min(n, (b + 1) * blocksize), *cb, packed, absmax + b);
  }
};

void quantize_avx2(const void* A, DType dt, int64_t n, int64_t blocksize, const Codebook& cb, uint8_t* packed,
                   float* absmax) {
  for_each_block_range(n, blocksize, QuantizeAvx2{A, dt, n, blocksize, &cb, packed, absmax});
}
#endif  // QK_X86

void quantize_scalar(const void* A, DType dt, int64_t n, int64_t blocksize, const Codebook& cb, uint8_t* packed,
                     float* absmax) {
  for_each_block_range(n, blocksize, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      block_scalar(A, dt, b * blocksize, std::min(n, (b + 1) * blocksize), cb, packed, absmax + b);
  });
}

}  // namespace

void quantize_4bit(const void* A, DType in_dtype, int64_t n, int64_t blocksize, const float* code, uint8_t* packed,
                   float* absmax) {
  const Codebook cb = make_codebook(code);
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

struct BlockwiseAvx512 {
  const float* A;
  int64_t n, blocksize;
  const Codebook256* cb;
  uint8_t* out;
  float* absmax;
  QK_AVX512 void operator()(int64_t b0, int64_t b1) const {
    const __m512 coarse = _mm512_loadu_ps(cb->coarse);
    for (int64_t b = b0; b < b1; ++b)
      blockwise_block_avx512(A, b * blocksize, std::min(n, (b + 1) * blocksize), *cb, coarse, out, absmax + b);
  }
};

struct BlockwiseAvx2 {
  const float* A;
  int64_t n, blocksize;
  const Codebook256* cb;
  uint8_t* out;
  float* absmax;
  QK_AVX2 void operator()(int64_t b0, int64_t b1) const {
    for (int64_t b = b0; b < b1; ++b)
      blockwise_block_avx2(A, b * blocksize, std::min(n, (b + 1) * blocksize), *cb, out, absmax + b);
  }
};
#endif  // QK_X86

void quantize_blockwise_scalar(const float* A, int64_t n, int64_t blocksize, const Codebook256& cb, uint8_t* out,
                               float* absmax) {
  for_each_block_range(n, blocksize, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      blockwise_block_scalar(A, b * blocksize, std::min(n, (b + 1) * blocksize), cb, out, absmax + b);
  });
}
}  // namespace

void quantize_blockwise(const float* A, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                        float* absmax) {
  Codebook256 cb;
  make_codebook256(code, &cb);
  switch (active_isa()) {
#ifdef QK_X86
    case Isa::avx512: for_each_block_range(n, blocksize, BlockwiseAvx512{A, n, blocksize, &cb, out, absmax}); return;
    case Isa::avx2: for_each_block_range(n, blocksize, BlockwiseAvx2{A, n, blocksize, &cb, out, absmax}); return;
#endif
    default: quantize_blockwise_scalar(A, n, blocksize, cb, out, absmax); return;
  }
}

}  // namespace cpu
}  // namespace qkernels
