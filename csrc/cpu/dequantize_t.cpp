// CPU dequantization into the transposed layout: Wt[k, n] = W[n, k] for a 4-bit weight W [N, K] (row-major, the
// bitsandbytes format), bfloat16 or float32 out.  The training step's dX = dY @ W runs faster as dY @ Wt.t() (torch's
// CPU matmul with the reduction dimension contiguous in B, as in the forward's x @ W.t()): the matmul alone, 512 x
// 4096 x 4096 bf16, 44.6 -> 41.2 ms; with this kernel's extra ~0.7 ms over the row-major dequantize and cold caches,
// ~1 % of the backward's product (qkernels/_linear.py, CPU_DX_TRANSPOSED, has the figures).
//
// Each value is the row-major kernel's (dequantize.cpp): to_dtype(code[nibble] * scale), one float32 multiply and
// the same round-to-nearest-even, so Wt is bit for bit the transpose of dequantize_4bit's output.
//
// AVX-512, bfloat16 out: tiles of 32 rows of W, 128 columns at a time: each row's 64 packed bytes loaded and the
// 16 rows of a half transposed to dwords (8 columns each), then per column and half one vpermps on the 16 float32
// codes and a multiply by the rows' scales, both halves converted into one register: a column's 32 rows, one line of
// Wt, stored whole (streamed for large outputs, as in dequantize.cpp); four such tiles per pass.  Other shapes, dtypes
// and ISAs: a portable loop (slow; qkernels._linear uses this layout only where
// dequantize_4bit_transposed_vectorized says the fast path runs).
#include <algorithm>
#include <cstdint>

#include "dequantize.h"
#include "dequantize_internal.h"
#include "isa.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QK_X86 1
#endif

namespace qkernels {
namespace cpu {
namespace {

using dequant_detail::PlainScale;
using dequant_detail::kStreamMinBytes;  // the row-major kernel's threshold, same reason
// 32-row tiles per pass of the vectorized kernel (tiles_avx512's T; see there). Measured, alternating in one process
// (Zen 4, 2 threads, hot): 1024 x 1024 40 / 28 / 29 us for 2 / 4 / 8 tiles, 4096 x 4096 1.30 / 0.97 / 1.01 ms.
constexpr int kGroup = 4;

template <typename T>
inline T convert(float v);
template <>
inline float convert<float>(float v) { return v; }
template <>
inline uint16_t convert<uint16_t>(float v) { return float_to_bf16_bits(v); }

// Rows [n0, n1) of W into Wt [K, N].
template <typename T, typename Scale>
void rows_portable(const uint8_t* packed, Scale scale, const float* code, int64_t N, int64_t K, int bs_shift,
                   int64_t n0, int64_t n1, T* out) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = n * K + k;
      const uint8_t byte = packed[e >> 1];
      const int nib = (e & 1) ? (byte & 0x0f) : (byte >> 4);
      out[k * N + n] = convert<T>(code[nib] * scale(e >> bs_shift));
    }
}

#ifdef QK_X86
#define QK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define QK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

using dequant_detail::bf16_rne_avx512;  // the row-major kernel's rounding, so the bits are its

// Column c of a dword's 8 (c = 0..7): weight 8d + c is the high nibble (c even) or the low nibble (c odd) of byte
// c / 2 of dword d.
constexpr int kShift[8] = {4, 0, 12, 8, 20, 16, 28, 24};

// r[i] (row i's 16 dwords) -> r[d] (dword d of the 16 rows): unpack 32 / 64-bit within 128-bit lanes, then two rounds
// of 128-bit lane shuffles (64 instructions).
QK_AVX512 inline void transpose16x16_epi32(__m512i (&r)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // rows 4g..4g+3: u[4g + x] holds, in lane L, their dword 4L + x
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int x = 0; x < 4; ++x) {
    const __m512i p0 = _mm512_shuffle_i32x4(u[x], u[4 + x], 0x44), p1 = _mm512_shuffle_i32x4(u[x], u[4 + x], 0xEE);
    const __m512i q0 = _mm512_shuffle_i32x4(u[8 + x], u[12 + x], 0x44);
    const __m512i q1 = _mm512_shuffle_i32x4(u[8 + x], u[12 + x], 0xEE);
    r[x] = _mm512_shuffle_i32x4(p0, q0, 0x88);
    r[4 + x] = _mm512_shuffle_i32x4(p0, q0, 0xDD);
    r[8 + x] = _mm512_shuffle_i32x4(p1, q1, 0x88);
    r[12 + x] = _mm512_shuffle_i32x4(p1, q1, 0xDD);
  }
}

// 2 x 16 lanes to bf16 (lo's 16 values in the low half, hi's in the high half): vcvtne2ps2bf16 (one instruction; Cvt)
// or dequantize.cpp's integer rounding (bf16_rne_avx512). Both round to nearest even; vcvtne2ps2bf16 flushes subnormal
// inputs / outputs to zero and keeps a NaN's payload, so the tile takes it only for blocks whose scales make every
// product a normal number or zero: then the bits are the same.
QK_AVX512BF16 inline __m512i bf16x32_cvtne(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }

// The 32 * T rows [n0, n0 + 32 T) of W into Wt (bfloat16), K % 128 == 0 and K % blocksize == 0 (every row's blocks
// start at the same columns).  Per 128 columns: each 16-row half's rows loaded (64 bytes each) and transposed to
// dwords (8 columns of the 16 rows each), parked in L1 as whole 64-byte vectors; then per column, per 32-row tile, per
// half a shift (vpermps reads the index's low 4 bits), a vpermps on the 16 float32 codes and a multiply by the rows'
// scales, the two halves converted into one register (vcvtne2ps2bf16, or the integer rounding and an insert) and
// stored as the tile's 64-byte line of that column of Wt (streamed for large outputs).
// Why so: (1) the line is built in registers: an earlier version staged each half's 32 bytes in L1 and reloaded the
// line whole, which the store buffer cannot forward (a 64-byte load over two pending 32-byte stores). (2) T tiles at
// once, their lines of a column stored one after the other: one tile's lines are N * 2 bytes apart, so for N a power
// of two they all fall in one or two L1 sets and the stores evict each other's lines before they commit; T adjacent
// lines per column spread them over T times as many sets.  1024 x 1024 on the Zen 4 machine: 3.5x the row-major
// kernel's time with 32-row tiles, against ~1.4x for N = 1056.
template <int T, bool Stream, bool Cvt, typename Scale>
QK_AVX512BF16 void tiles_avx512(const uint8_t* packed, Scale scale, const float* code, int64_t N, int64_t K,
                                int bs_shift, int64_t n0, float min_normal_scale, uint16_t* out) {
  const __m512 codes = _mm512_loadu_ps(code);
  const int64_t row_bytes = K >> 1;
  const int64_t bs = int64_t(1) << bs_shift;
  const int64_t blocks_per_row = K >> bs_shift;
  alignas(64) __m512i park[2 * T][16];  // each half's transposed dwords
  alignas(64) float s[32 * T];
  for (int64_t k0 = 0; k0 < K; k0 += 128) {
    for (int h = 0; h < 2 * T; ++h) {
      const uint8_t* rows = packed + (n0 + 16 * h) * row_bytes + (k0 >> 1);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(rows + i * row_bytes + 128), _MM_HINT_T0);  // 2 chunks ahead
        r[i] = _mm512_loadu_si512(rows + i * row_bytes);
      }
      transpose16x16_epi32(r);
      for (int d = 0; d < 16; ++d) _mm512_store_si512(&park[h][d], r[d]);
    }
    __m512 sv[2 * T];
    bool cvt = false;
    for (int d = 0; d < 16; ++d) {
      const int64_t k = k0 + 8 * d;
      if ((k & (bs - 1)) == 0 || d == 0) {  // a block starts (blocksize >= 32: at most every 4th dword)
        cvt = Cvt;
        for (int i = 0; i < 32 * T; ++i) {
          s[i] = scale((n0 + i) * blocks_per_row + (k >> bs_shift));
          cvt = cvt && dequant_detail::bf16_cvt_scale_ok(s[i], min_normal_scale);
        }
        for (int h = 0; h < 2 * T; ++h) sv[h] = _mm512_load_ps(s + 16 * h);
      }
      __m512i q[2 * T];
      for (int h = 0; h < 2 * T; ++h) q[h] = _mm512_load_si512(&park[h][d]);
      for (int c = 0; c < 8; ++c) {
        uint16_t* dst = out + (k + c) * N + n0;
        for (int j = 0; j < T; ++j) {
          const __m512 v0 =
              _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q[2 * j], kShift[c]), codes), sv[2 * j]);
          const __m512 v1 =
              _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q[2 * j + 1], kShift[c]), codes), sv[2 * j + 1]);
          const __m512i line = cvt ? bf16x32_cvtne(v0, v1)
                                   : _mm512_inserti64x4(_mm512_castsi256_si512(bf16_rne_avx512(v0)),
                                                        bf16_rne_avx512(v1), 1);
          if (Stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + 32 * j), line);
          else _mm512_storeu_si512(dst + 32 * j, line);
        }
      }
    }
  }
}

template <int T, typename Scale>
QK_AVX512BF16 void tiles_dispatch(bool stream, bool cvt, const uint8_t* packed, Scale scale, const float* code,
                                  int64_t N, int64_t K, int bs_shift, int64_t n0, float min_normal_scale,
                                  uint16_t* out) {
  if (stream && cvt) tiles_avx512<T, true, true>(packed, scale, code, N, K, bs_shift, n0, min_normal_scale, out);
  else if (stream) tiles_avx512<T, true, false>(packed, scale, code, N, K, bs_shift, n0, 0.0f, out);
  else if (cvt) tiles_avx512<T, false, true>(packed, scale, code, N, K, bs_shift, n0, min_normal_scale, out);
  else tiles_avx512<T, false, false>(packed, scale, code, N, K, bs_shift, n0, 0.0f, out);
}

QK_AVX512 void sfence_avx512() { _mm_sfence(); }

#endif  // QK_X86

// The vectorized path's conditions (dequantize_4bit_transposed_vectorized): AVX-512, bfloat16 out, whole 128-column
// chunks whose blocks start at the same columns in every row, and at least one 32-row tile.
bool vectorized(int64_t N, int64_t K, int64_t blocksize, DType out_dtype) {
#ifdef QK_X86
  return active_isa() == Isa::avx512 && out_dtype == DType::bfloat16 && K % 128 == 0 && K % blocksize == 0 && N >= 32;
#else
  (void)N;
  (void)K;
  (void)blocksize;
  (void)out_dtype;
  return false;
#endif
}

template <typename T, typename Scale>
bool run(const uint8_t* packed, Scale scale, const float* code, int64_t N, int64_t K, int64_t blocksize, T* out) {
  const int bs_shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  int64_t done = 0;  // rows [0, done) written by the vector tiles
  const bool vec = vectorized(N, K, blocksize, sizeof(T) == 2 ? DType::bfloat16 : DType::float32);
#ifdef QK_X86
  if constexpr (sizeof(T) == 2) {
    if (vec) {
      const int64_t tiles = N / 32;
      const bool stream = N * K * int64_t(sizeof(T)) >= kStreamMinBytes &&
                          reinterpret_cast<std::uintptr_t>(out) % 64 == 0 && (N * int64_t(sizeof(T))) % 64 == 0;
      // vcvtneps2bf16 (AVX512_BF16) in blocks whose |scale| >= min_normal_scale: then every nonzero |code * scale|
      // is at least 2^-125, a normal number, where it rounds as the integer path does.
      const float min_normal_scale = dequant_detail::bf16_cvt_min_normal_scale(code);
      const bool cvt = dequant_detail::has_avx512bf16() && min_normal_scale < 1.0e30f;
#ifdef _OPENMP
#pragma omp parallel
#endif
      {
        const int64_t groups = tiles / kGroup;  // kGroup tiles per pass, then single tiles
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
        for (int64_t gi = 0; gi < groups; ++gi)
          tiles_dispatch<kGroup>(stream, cvt, packed, scale, code, N, K, bs_shift, gi * kGroup * 32, min_normal_scale,
                                 out);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t t = groups * kGroup; t < tiles; ++t)
          tiles_dispatch<1>(stream, cvt, packed, scale, code, N, K, bs_shift, t * 32, min_normal_scale, out);
        if (stream) sfence_avx512();  // each thread's streaming stores ordered before the region ends
      }
      done = tiles * 32;
    }
  }
#endif
  rows_portable(packed, scale, code, N, K, bs_shift, done, N, out);
  return vec;
}

template <typename Scale>
bool dispatch(const uint8_t* packed, Scale scale, const float* code, int64_t N, int64_t K, int64_t blocksize,
              void* out, DType out_dtype) {
  if (out_dtype == DType::float32)
    return run(packed, scale, code, N, K, blocksize, static_cast<float*>(out));
  return run(packed, scale, code, N, K, blocksize, static_cast<uint16_t*>(out));
}

}  // namespace

bool dequantize_4bit_transposed(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                                const float* nested_absmax, const float* nested_code, float offset,
                                int64_t nested_blocksize, const float* code, int64_t N, int64_t K, int64_t blocksize,
                                void* out, DType out_dtype) {
  if (absmax != nullptr) return dispatch(packed, PlainScale{absmax}, code, N, K, blocksize, out, out_dtype);
  const NestedScale nested{absmax_q, nested_absmax, nested_code, offset,
                           __builtin_ctzll(static_cast<unsigned long long>(nested_blocksize))};
  return dispatch(packed, nested, code, N, K, blocksize, out, out_dtype);
}

bool dequantize_4bit_transposed_vectorized(int64_t N, int64_t K, int64_t blocksize, DType out_dtype) {
  return vectorized(N, K, blocksize, out_dtype);
}

}  // namespace cpu
}  // namespace qkernels
