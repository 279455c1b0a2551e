// CPU fused 4-bit GEMV: the tiled SIMD kernels (AVX-512 with and without AVX512_BF16, AVX2) and their dispatch,
// gemv_simd.  The design notes are at the top of gemv.cpp and on each tile below.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include "dequantize_internal.h"
#include "gemv_internal.h"
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
namespace gemv_detail {

// ------------------------------------------------------------------------------------------------ tiled SIMD paths
#ifdef QK_X86
namespace {  // the kernels: internal linkage, so the compiler may inline and specialize them freely

// A tile kernel computes y[m0 .. m0+MT, n0 .. n0+NR] (K % 32 == 0).  The driver walks groups of 4 output rows
// (OpenMP over groups) and, inside a group, M in tiles of at most mt_max rows, so a group's packed rows
// (4 x K/2 bytes) stay in L1 across the M tiles.
using TileFn = void (*)(const Problem&, const void* xprep, int64_t n0, int64_t m0);

constexpr int kMaxMt = 8;
constexpr int64_t kGroupRows = 4;  // output rows per group of run_tiles
struct TileTable {
  int mt_max = 1;
  int nr[kMaxMt + 1] = {};
  TileFn tile[kMaxMt + 1] = {};  // NR = nr[mt] rows
  TileFn row1[kMaxMt + 1] = {};  // one row (the group's remainder)
};

// NR(mt) = mt <= small_mt ? nr_small : nr_big; more rows per tile for small M keeps several independent
// accumulator chains in flight (FMA / vdpbf16ps latency 4-6 cycles) and shares each x load across rows.
template <template <int, int> class Tile, int NrSmall, int NrBig, int SmallMt, int... MT>
TileTable make_table(std::integer_sequence<int, MT...>) {
  TileTable t;
  t.mt_max = static_cast<int>(sizeof...(MT));
  ((t.nr[MT] = (MT <= SmallMt ? NrSmall : NrBig), t.tile[MT] = &Tile<(MT <= SmallMt ? NrSmall : NrBig), MT>::run,
    t.row1[MT] = &Tile<1, MT>::run),
   ...);
  return t;
}

void run_tiles(const Problem& p, const void* xprep, const TileTable& t) {
  constexpr int64_t G = kGroupRows;  // rows per group: a multiple of every nr[]
  const int64_t ngroups = (p.N + G - 1) / G;
  const bool par = p.N * p.K >= kParallelMinWeights && ngroups > 1;
  (void)par;
  // Dynamic, at least 64 KB of W per grab (8 groups, 32 rows, at K = 4096): a contiguous stretch for the prefetcher,
  // and a thread descheduled on a shared machine no longer holds the others up with a fixed half of the work.
  const int64_t chunk = std::max<int64_t>(8, (int64_t(64) << 10) / (G * p.K / 2));
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, chunk) if (par)
#endif
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t n_begin = g * G, n_end = std::min(p.N, n_begin + G);
    for (int64_t m0 = 0; m0 < p.M;) {
      const int mt = static_cast<int>(std::min<int64_t>(t.mt_max, p.M - m0));
      int64_t n = n_begin;
      for (; n + t.nr[mt] <= n_end; n += t.nr[mt]) t.tile[mt](p, xprep, n, m0);
      for (; n < n_end; ++n) t.row1[mt](p, xprep, n, m0);
      m0 += mt;
    }
  }
}

#define QK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define QK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")))
#define QK_INLINE inline __attribute__((always_inline))

// 64-byte aligned storage for zmm-sized scratch (std::vector's default allocator only guarantees 16 bytes).
template <typename T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* ptr, size_t) { ::operator delete(ptr, std::align_val_t(64)); }
  bool operator==(const AlignedAlloc&) const { return true; }
  bool operator!=(const AlignedAlloc&) const { return false; }
};

// Bytes ahead, in each row's packed stream, that the small-M tiles prefetch (into L2: _MM_HINT_T1), at least.  Their
// weights come from DRAM in a model (a 0.5B one's 185 MB of packed projections per token, read once each): 24 layers
// of Qwen2-0.5B's shapes decoded one after the other, M 1, GEMV time per token (ms, two runs each, into L1): no
// prefetch 16.3 / 18.2, 2 KB ahead 12.4 / 14.0, 4 KB 13.5 / 12.8, 8 KB 11.6 / 11.7, 16 KB 14.6 / 14.4, 32 KB 16.8 /
// 16.5; the down projection (K 4864) gained most (147 -> 112 us).  8 KB into L2 instead of L1, alternating processes
// (three pairs): 14.5 / 14.7 / 12.9 -> 11.1 / 11.9 / 12.7 (more misses in flight than L1's fill buffers hold).
constexpr int64_t kConstPrefetch = 8192;
// The per-block-table and word-order tiles (K % 128 != 0, blocksize 32, M 5-8) had none: from DRAM they ran at
// 17 GB/s of packed weight (18176 x 4544, bf16, M 1: 2.4 ms, against 1.0 ms at K 4480 on the constant-table tile);
// with the same prefetch, once per 64 bytes of each row: see prefetch_row.
// The distance is at least a group's rows (prefetch_distance): a tile reads kGroupRows rows side by side, so once
// those rows hold more than 8 KB (K > 4096) an 8 KB prefetch no longer reaches the next group's rows, which started
// cold (from K > 16384 it stays inside the row). One group ahead (the same lane of the next group), measured in one
// process against 8 KB, bf16 M 1 (fourteenth session): 4544 x 18176 1.40 -> 0.94 ms, 4096 x 14336 0.84-0.91 ->
// 0.63, 4096 x 11008 0.65 -> 0.47 (47 GB/s of packed weight from DRAM, as the short rows'); K <= 4096 unchanged.

// The small-M tiles' prefetch of the byte `ahead` past b (the byte of the row the tile reads next) when b starts a
// 64-byte stretch of the row (k % 128 == 0): one prefetch per cache line's worth of weights.
QK_INLINE int64_t prefetch_distance(int64_t K) {
  return std::max<int64_t>(kConstPrefetch, kGroupRows * (K >> 1));
}
QK_INLINE void prefetch_row(const uint8_t* row, int64_t k, int64_t ahead) {
  if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + (k >> 1) + ahead), _MM_HINT_T1);
}

// ---- AVX-512, float32 x (packed, even / odd split), W decoded with vpermps on the 16 float32 products
// code * scale.  vpermps reads only index bits 0..3, so a byte's low nibble needs no mask.
template <int NR, int MT>
QK_AVX512 QK_INLINE void finish_avx512(const Problem& p, __m512 (&acc)[NR][MT], int64_t n0, int64_t m0) {
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < MT; ++i) {
      __m512 a = acc[r][i];
      if (p.r > 0) {  // LoRA folded into the lanes before the one horizontal sum
        const float* t = p.lora_t + (m0 + i) * p.r;
        const float* B = p.lora_B + (n0 + r) * p.r;
        for (int64_t j = 0; j < p.r; j += 16) {
          const int64_t left = p.r - j;
          const __mmask16 mk = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
          a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, t + j), _mm512_maskz_loadu_ps(mk, B + j), a);
        }
      }
      float y = _mm512_reduce_add_ps(a);
      if (p.bias != nullptr) y = y + p.bias[n0 + r];
      store_y(p, m0 + i, n0 + r, y);
    }
  }
}

template <int NR, int MT>
struct TileF32Avx512 {
  QK_AVX512 static void run(const Problem& p, const void* xprep, int64_t n0, int64_t m0) {
    const int64_t K = p.K;
    const int64_t ahead = prefetch_distance(K);
    const float* xt = static_cast<const float*>(xprep) + m0 * K;  // this M tile's packed x
    const __m512 code = _mm512_loadu_ps(p.code);
    // Small tiles keep the high- and low-nibble products in separate accumulators: with one, each accumulator took
    // two dependent FMAs per 32 weights, and at M 1 (4 accumulators) the FMA latency, not the pipes, set the pace
    // (M 1, 4096 x 4096, float32 x: 0.57 ms).  Larger tiles have enough accumulators (and too few registers).
    constexpr bool kSplit = NR * MT <= 8;
    constexpr int kLo = kSplit ? MT : 1;
    __m512 acc[NR][MT], acc_lo[NR][kLo];
    __m512 lut[NR];
    const uint8_t* row[NR];
    for (int r = 0; r < NR; ++r) {
      row[r] = p.packed + (((n0 + r) * K) >> 1);
      for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_ps();
      for (int i = 0; i < kLo; ++i) acc_lo[r][i] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K;) {
      float sc[NR];
      const int64_t seg_end = next_segment<NR>(p, n0, k, sc);
      for (int r = 0; r < NR; ++r) lut[r] = _mm512_mul_ps(code, _mm512_set1_ps(sc[r]));
      for (; k < seg_end; k += 32) {
        __m512 whi[NR], wlo[NR];
        for (int r = 0; r < NR; ++r) {
          prefetch_row(row[r], k, ahead);
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + (k >> 1))));
          whi[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut[r]);  // elements k, k+2, ...
          wlo[r] = _mm512_permutexvar_ps(v, lut[r]);                        // elements k+1, k+3, ...
        }
        const float* xk = xt + k * MT;
        for (int i = 0; i < MT; ++i) {
          const __m512 xe = _mm512_loadu_ps(xk + 32 * i), xo = _mm512_loadu_ps(xk + 32 * i + 16);
          for (int r = 0; r < NR; ++r) {
            acc[r][i] = _mm512_fmadd_ps(whi[r], xe, acc[r][i]);
            if constexpr (kSplit)
              acc_lo[r][i] = _mm512_fmadd_ps(wlo[r], xo, acc_lo[r][i]);
            else
              acc[r][i] = _mm512_fmadd_ps(wlo[r], xo, acc[r][i]);
          }
        }
      }
    }
    if constexpr (kSplit)
      for (int r = 0; r < NR; ++r)
        for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_add_ps(acc[r][i], acc_lo[r][i]);
    finish_avx512<NR, MT>(p, acc, n0, m0);
  }
};

// ---- AVX-512 + AVX512_BF16 + VBMI, bfloat16 x packed as is.  vdpbf16ps multiplies adjacent bf16 pairs (2i, 2i+1) --
// the high and low nibble of byte i -- so W is wanted in element order as 16-bit table indices.  16 bytes become
// 8 qwords (vpmovzxwq: qword q = byte 2q | byte 2q+1 << 8), and vpmultishiftqb picks, per 16-bit index, the 8 bits
// starting at the wanted nibble (offsets 4, 0, 12, 8: hi(2q), lo(2q), hi(2q+1), lo(2q+1)).  vpermw reads index bits
// 0..4; bit 4 may hold a neighbouring nibble's bit, so the 16-entry table is stored twice (32 words).  3 ops per
// 32 weights.  The table holds bf16(code * scale), rounded to nearest even by vcvtneps2bf16 (one instruction per
// block; the integer rounding of dequantize.cpp costs ~10 ops and took ~10% of the time at bs 64, M 16): the W of
// torch's dequantize-to-bf16, except that a |code * scale| below 2^-126 becomes 0 -- as vdpbf16ps would treat it.
QK_AVX512BF16 QK_INLINE __m512i bf16_table(__m512 code, float s) {
  const __m512 v = _mm512_mul_ps(code, _mm512_set1_ps(s));
  return (__m512i)_mm512_cvtne2ps_pbh(v, v);  // words 0..15 and 16..31: the 16 entries twice, in one instruction
}

template <int NR, int MT>
struct TileBf16Avx512 {
  QK_AVX512BF16 static void run(const Problem& p, const void* xprep, int64_t n0, int64_t m0) {
    const int64_t K = p.K;
    const int64_t ahead = prefetch_distance(K);
    const uint16_t* xt = static_cast<const uint16_t*>(xprep) + m0 * K;  // this M tile's packed x
    const __m512 code = _mm512_loadu_ps(p.code);
    const __m512i shifts = _mm512_set1_epi64(0x0008000c00000004LL);  // bytes 0,2,4,6 of each qword: 4, 0, 12, 8
    __m512 acc[NR][MT];
    __m512i lut[NR];
    const uint8_t* row[NR];
    for (int r = 0; r < NR; ++r) {
      row[r] = p.packed + (((n0 + r) * K) >> 1);
      for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K;) {
      float sc[NR];
      const int64_t seg_end = next_segment<NR>(p, n0, k, sc);
      for (int r = 0; r < NR; ++r) lut[r] = bf16_table(code, sc[r]);
      for (; k < seg_end; k += 32) {
        __m512i w[NR];
        for (int r = 0; r < NR; ++r) {
          prefetch_row(row[r], k, ahead);
          const __m512i q = _mm512_cvtepu16_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + (k >> 1))));
          w[r] = _mm512_permutexvar_epi16(_mm512_multishift_epi64_epi8(shifts, q), lut[r]);
        }
        const uint16_t* xk = xt + k * MT;
        for (int i = 0; i < MT; ++i) {
          const __m512i xv = _mm512_loadu_si512(xk + 32 * i);
          for (int r = 0; r < NR; ++r) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)w[r], (__m512bh)xv);
        }
      }
    }
    finish_avx512<NR, MT>(p, acc, n0, m0);
  }
};

// Word-order decode of 128 weights (a 64-byte load of packed bytes at element e, e % 128 == 0, blocksize >= 64) into
// 4 vectors of 32 bf16 values: vector j, word w holds weight 4w + kPermOfNibble[j] (OrderWords128), value
// bf16(code * scale) with the scale of its 64-block (words 0-15: the first block, 16-31: the second; each word's
// table index is its nibble with bit 4 set in words 16-31, a vpternlogd).
struct WordsDecoder {
  __m512 code;
  __m512i low, half;
  QK_AVX512BF16 explicit WordsDecoder(const float* c)
      : code(_mm512_loadu_ps(c)), low(_mm512_set1_epi16(15)),
        half(_mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1)) {}
  QK_AVX512BF16 QK_INLINE void operator()(const Problem& p, const uint8_t* src, int64_t e, __m512i (&w)[4]) const {
    const __m512i lut = (__m512i)_mm512_cvtne2ps_pbh(
        _mm512_mul_ps(code, _mm512_set1_ps(p.scale((e + 64) >> p.bs_shift))),
        _mm512_mul_ps(code, _mm512_set1_ps(p.scale(e >> p.bs_shift))));
    const __m512i v = _mm512_loadu_si512(src);
    w[0] = _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(v, low, half, 0xEA), lut);
    w[1] = _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low, half, 0xEA), lut);
    w[2] = _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), low, half, 0xEA), lut);
    w[3] = _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi16(v, 12), half), lut);
  }
};

template <int NR, int MT>
struct TileBf16Words {
  QK_AVX512BF16 static void run(const Problem& p, const void* xprep, int64_t n0, int64_t m0) {
    const int64_t K = p.K;
    const int64_t ahead = prefetch_distance(K);
    const uint16_t* xt = static_cast<const uint16_t*>(xprep) + m0 * K;
    const WordsDecoder decode(p.code);
    __m512 acc[NR][MT];
    const uint8_t* row[NR];
    for (int r = 0; r < NR; ++r) {
      row[r] = p.packed + (((n0 + r) * K) >> 1);
      for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; k += 128) {
      const uint16_t* xk = xt + k * MT;
      __m512i w[NR][4];
      for (int r = 0; r < NR; ++r) {
        prefetch_row(row[r], k, ahead);
        decode(p, row[r] + (k >> 1), (n0 + r) * K + k, w[r]);
      }
      for (int i = 0; i < MT; ++i)
        for (int j = 0; j < 4; ++j) {
          const __m512i xv = _mm512_loadu_si512(xk + 128 * i + 32 * j);
          for (int r = 0; r < NR; ++r) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)w[r][j], (__m512bh)xv);
        }
    }
    finish_avx512<NR, MT>(p, acc, n0, m0);
  }
};

// ---- AVX-512 + AVX512_BF16, bfloat16 x, small M, K % 64 == 0 and blocksize >= 64: a constant table and the
// scale applied after the dot product.  128 weights (64 packed bytes, two 64-blocks or part of one) are one zmm
// load; viewed as 32 words, word w holds the nibbles of weights 4w+1 (bits 0-3), 4w (4-7), 4w+3 (8-11), 4w+2
// (12-15), so vpermw on the word (shifted by 0, 4, 8, 12) looks up one weight per word: vpermw reads index bits
// 0..4, and bit 4 (the next nibble's low bit) is harmless because the table holds the 16 codes twice.  The table
// is bf16(code), the same for every block; the 4 products are summed per lane and the lane sums multiplied by the
// block scale in float32 (lanes 0-7 hold words 0-15, i.e. weights 0-63: the first block; lanes 8-15 the second).
// x is packed to the same order once per call (pack_x with OrderWords128).  Per 128 weights and row: 1 load, 3 shifts,
// 4 vpermw, 4 vdpbf16ps, 1 fma, against 4 x (vpmovzxwq, vpmultishiftqb, vpermw, vdpbf16ps) plus two scaled tables
// for the per-block-table tile above; measured one core, M 1, 4096 x 4096: 0.60 -> 0.35 ms.  The decoded weight
// is bf16(code) * scale (rounded once, in float32) instead of bf16(code * scale): no less accurate.
constexpr int kPermOfNibble[4] = {1, 0, 3, 2};  // vector j (shift 4j) holds weights 4w + kPermOfNibble[j]
constexpr int64_t kConstMaxM = 4;  // rows of x up to which gemv_simd takes this path (see there)

// ---- x packed once per call in the order a tile's decode produces W.  The M rows are cut into tiles of
// mt = min(mt_max, M - m0) rows (the driver's cut) and tile (m0, mt) holds, per group of G columns k = 0, G, ...,
// the mt rows' groups back to back, position c of a group holding column k + Order::at(c):
//   xp[m0*K + k*mt + i*G + c] = x[m0 + i, k + Order::at(c)]
// so a tile walks one pointer sequentially.  The orders:
struct OrderAsIs32 {  // bf16 per-block-table tiles: vdpbf16ps takes adjacent pairs, the chunk as is
  static constexpr int G = 32;
  static int at(int c) { return c; }
};
struct OrderEvenOdd32 {  // float32 per-block-table tiles: 16 high nibbles (elements 2j), then the 16 low (2j + 1)
  static constexpr int G = 32;
  static int at(int c) { return c < 16 ? 2 * c : 2 * (c - 16) + 1; }
};
struct OrderWords128 {  // TileBf16Const: vector j (shift 4j), word w: weight 4w + kPermOfNibble[j]
  static constexpr int G = 128;
  static int at(int c) { return 4 * (c % 32) + kPermOfNibble[c / 32]; }
};
struct OrderDwords128 {  // TileF32Const: vector j (shift 4j), dword l: weight 8l + (j ^ 1)
  static constexpr int G = 128;
  static int at(int c) { return 8 * (c % 16) + ((c / 16) ^ 1); }
};

struct RawU16 {  // bfloat16 bits copied as they are
  using T = uint16_t;
  static uint16_t get(T v) { return v; }
};

template <typename From, typename Order, typename To>
void pack_x(const void* x, int64_t M, int64_t K, int mt_max, To* xp) {
  constexpr int G = Order::G;
  const auto* src = static_cast<const typename From::T*>(x);
  for (int64_t m0 = 0; m0 < M; m0 += mt_max) {
    const int64_t mt = std::min<int64_t>(mt_max, M - m0);
    for (int64_t i = 0; i < mt; ++i) {
      const auto* s = src + (m0 + i) * K;
      for (int64_t k = 0; k < K; k += G) {
        To* d = xp + m0 * K + k * mt + i * G;
        for (int c = 0; c < G; ++c) d[c] = From::get(s[k + Order::at(c)]);
      }
    }
  }
}

// K rounded up to a whole 128-column group: the row length of pack_x_words_bf16's output (K % 128 == 64: the last
// group's second half zero).
inline int64_t padded_k128(int64_t K) { return (K + 127) & ~int64_t(127); }

// pack_x<RawU16, OrderWords128> with two vpermt2w and a blend per 32 words: position 32j + w of a 128-column group
// holds column 4w + kPermOfNibble[j], i.e. (4w + p_j) mod 64 of the group's first (w < 16) or second (w >= 16) half.
// The scalar pack took ~45 us of a ~2 ms M 16 call, before (outside) the parallel region.
QK_AVX512 void pack_x_words_bf16(const void* x, int64_t M, int64_t K, int mt_max, uint16_t* xp) {
  __m512i idx[4];
  for (int j = 0; j < 4; ++j) {
    alignas(64) uint16_t v[32];
    for (int w = 0; w < 32; ++w) v[w] = static_cast<uint16_t>((4 * w + kPermOfNibble[j]) & 63);
    idx[j] = _mm512_load_si512(v);
  }
  const auto* src = static_cast<const uint16_t*>(x);
  for (int64_t m0 = 0; m0 < M; m0 += mt_max) {
    const int64_t mt = std::min<int64_t>(mt_max, M - m0);
    for (int64_t i = 0; i < mt; ++i) {
      const uint16_t* s = src + (m0 + i) * K;
      for (int64_t k = 0; k < K; k += 128) {
        const bool tail = k + 128 > K;  // K % 128 == 64 (TileBf16Const only): zeros for the missing half
        const __m512i a = _mm512_loadu_si512(s + k), b = _mm512_loadu_si512(s + k + 32);
        const __m512i c = tail ? _mm512_setzero_si512() : _mm512_loadu_si512(s + k + 64);
        const __m512i d = tail ? _mm512_setzero_si512() : _mm512_loadu_si512(s + k + 96);
        uint16_t* o = xp + m0 * padded_k128(K) + k * mt + i * 128;
        for (int j = 0; j < 4; ++j)
          _mm512_storeu_si512(o + 32 * j, _mm512_mask_blend_epi16(__mmask32(0xffff0000u),
                                                                  _mm512_permutex2var_epi16(a, idx[j], b),
                                                                  _mm512_permutex2var_epi16(c, idx[j], d)));
      }
    }
  }
}

// x of any float dtype, converted to float32 while packing.
template <typename Order>
std::vector<float> pack_x_f32(const void* x, DType dtype, int64_t M, int64_t K, int mt_max) {
  std::vector<float> v(static_cast<size_t>(M * K));
  switch (dtype) {
    case DType::float32: pack_x<FromF32, Order>(x, M, K, mt_max, v.data()); break;
    case DType::float16: pack_x<FromF16, Order>(x, M, K, mt_max, v.data()); break;
    case DType::bfloat16: pack_x<FromBF16, Order>(x, M, K, mt_max, v.data()); break;
  }
  return v;
}

// The scales of the 128 weights from element e (e % 128 == 0, blocksize >= 64, so weights e..e+63 share a block,
// as do e+64..e+127): lanes 0-7 the first block's, lanes 8-15 the second's -- the lanes the constant-table tiles'
// dot products leave each half's sums in.
QK_AVX512 QK_INLINE __m512 pair_scales(const Problem& p, int64_t e) {
  return _mm512_mask_blend_ps(__mmask16(0xff00), _mm512_set1_ps(p.scale(e >> p.bs_shift)),
                              _mm512_set1_ps(p.scale((e + 64) >> p.bs_shift)));
}

template <int NR, int MT>
struct TileBf16Const {
  // One group of 128 weights (v: its 64 packed bytes) of one row against MT rows of x (xk, packed), into acc.
  QK_AVX512BF16 static QK_INLINE void group(__m512i v, __m512i lut, __m512 sv, const uint16_t* xk, __m512 (&acc)[MT]) {
    const __m512i w0 = _mm512_permutexvar_epi16(v, lut), w1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
    const __m512i w2 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), lut);
    const __m512i w3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), lut);
    for (int i = 0; i < MT; ++i) {
      const uint16_t* xi = xk + 128 * i;
      __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xi));
      t = _mm512_dpbf16_ps(t, (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xi + 32));
      t = _mm512_dpbf16_ps(t, (__m512bh)w2, (__m512bh)_mm512_loadu_si512(xi + 64));
      t = _mm512_dpbf16_ps(t, (__m512bh)w3, (__m512bh)_mm512_loadu_si512(xi + 96));
      acc[i] = _mm512_fmadd_ps(t, sv, acc[i]);
    }
  }

  QK_AVX512BF16 static void run(const Problem& p, const void* xprep, int64_t n0, int64_t m0) {
    const int64_t K = p.K;
    const uint16_t* xt = static_cast<const uint16_t*>(xprep) + m0 * padded_k128(K);
    const __m512 code = _mm512_loadu_ps(p.code);
    const __m512i lut = (__m512i)_mm512_cvtne2ps_pbh(code, code);  // bf16(code), words 0..15 and 16..31
    __m512 acc[NR][MT];
    const uint8_t* row[NR];
    for (int r = 0; r < NR; ++r) {
      row[r] = p.packed + (((n0 + r) * K) >> 1);
      for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_ps();
    }
    const int64_t ahead = prefetch_distance(K);
    const int64_t kfull = K & ~int64_t(127);
    for (int64_t k = 0; k < kfull; k += 128) {
      const uint16_t* xk = xt + k * MT;
      for (int r = 0; r < NR; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(row[r] + (k >> 1) + ahead), _MM_HINT_T1);
        group(_mm512_loadu_si512(row[r] + (k >> 1)), lut, pair_scales(p, (n0 + r) * K + k), xk, acc[r]);
      }
    }
    if (kfull < K) {  // K % 128 == 64: the row's last 64 weights, half a group. Only their 32 bytes are read (the
      // register's rest zero: index 0, a finite code, against x's zero padding), and only their block's scale (the
      // next block may lie past the scales' end).
      const uint16_t* xk = xt + kfull * MT;
      for (int r = 0; r < NR; ++r)
        group(_mm512_maskz_loadu_epi8(__mmask64(0xffffffffULL), row[r] + (kfull >> 1)), lut,
              _mm512_set1_ps(p.scale(((n0 + r) * K + kfull) >> p.bs_shift)), xk, acc[r]);
    }
    finish_avx512<NR, MT>(p, acc, n0, m0);
  }
};

// ---- AVX-512, float32 x (from float32 / float16 / bfloat16), small M, K % 128 == 0, blocksize >= 64: the same
// constant-table idea with vpermps.  A 64-byte load viewed as 16 dwords: dword l holds weights 8l..8l+7, nibble j
// (bits 4j..4j+3) weight 8l + (j ^ 1); vpermps reads index bits 0..3, so shifting the dwords by 4j is the whole
// index computation (8 vpermps + 7 shifts per 128 weights, against 4 vpmovzxbd + 4 shifts + 8 vpermps for the
// per-block-table tile); the 16 float32 codes are one register for every block, and the block scale multiplies
// the lane sums (lanes 0-7: weights 0-63, the first 64-block).  Two partial sums per accumulator halve the FMA
// chains.  x packed by pack_x with OrderDwords128: position 16j + l of a group holds x[k + 8l + (j ^ 1)].
template <int NR, int MT>
struct TileF32Const {
  QK_AVX512 static void run(const Problem& p, const void* xprep, int64_t n0, int64_t m0) {
    const int64_t K = p.K;
    const int64_t ahead = prefetch_distance(K);
    const float* xt = static_cast<const float*>(xprep) + m0 * K;
    const __m512 code = _mm512_loadu_ps(p.code);
    __m512 acc[NR][MT];
    const uint8_t* row[NR];
    for (int r = 0; r < NR; ++r) {
      row[r] = p.packed + (((n0 + r) * K) >> 1);
      for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; k += 128) {
      const float* xk = xt + k * MT;
      for (int r = 0; r < NR; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(row[r] + (k >> 1) + ahead), _MM_HINT_T1);  // as TileBf16Const
        const __m512i v = _mm512_loadu_si512(row[r] + (k >> 1));
        __m512 w[8];
        w[0] = _mm512_permutexvar_ps(v, code);
        for (int j = 1; j < 8; ++j) w[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * j), code);
        const __m512 sv = pair_scales(p, (n0 + r) * K + k);
        for (int i = 0; i < MT; ++i) {
          const float* xi = xk + 128 * i;
          __m512 t0 = _mm512_mul_ps(w[0], _mm512_loadu_ps(xi)), t1 = _mm512_mul_ps(w[1], _mm512_loadu_ps(xi + 16));
          for (int j = 2; j < 8; j += 2) {
            t0 = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(xi + 16 * j), t0);
            t1 = _mm512_fmadd_ps(w[j + 1], _mm512_loadu_ps(xi + 16 * j + 16), t1);
          }
          acc[r][i] = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), sv, acc[r][i]);
        }
      }
    }
    finish_avx512<NR, MT>(p, acc, n0, m0);
  }
};

// ---- bfloat16, several M tiles (M >= 7 with the word-order decode, M > 8 without).  Decoding in registers per M
// tile would decode each W chunk once per tile (at M 16: 6 decode ops per 16 vdpbf16ps, which share the vector
// pipes).  Instead kMultiNr rows are decoded once, kKc columns at a time, into a bf16 buffer in L1 (6 x 4 KB), and
// every M tile of at most kMultiMt rows reads it from there; the tiles' accumulators live in a small per-thread
// array between column spans.  A span's inner step loads NR W vectors (L1) and MT x vectors (x is M x K: L2) for
// NR x MT vdpbf16ps, so more rows per span means fewer x loads per product: 6 x 4 (24 accumulators, 6 W, 1 x: 31 of
// the 32 zmm) against the first design's 2 x 8, measured alternating in one process (4096 x 4096, NF4 bs 64, two
// threads, medians, ms): M 16 1.26 -> 0.89, M 32 2.52 -> 1.62, M 48 3.84 -> 2.36, M 7 (word-order tile) 0.67 ->
// 0.51, M 8 0.62 -> 0.55; 4 x 4 and 4 x 6 within 5 % of 6 x 4, 5 x 5 and 6 x 3 slower, 6 x 2 18 % slower.  kKc 2048
// against 1024: 3-6 % faster at M 16 and 32 (4096 x 4096) and at M 16 with K 11008; 4096 (48 KB of W) 10 % slower.
// Blocksize 32 (no word-order decode: per-block tables, slower) at M 7: the in-register tile 0.69 ms, this one
// 1.22; at M 16 1.94 vs 1.65 (the 2 x 8 version: 1.94).
constexpr int64_t kKc = 2048;
constexpr int kMultiNr = 6;
constexpr int kMultiMt = 4;
constexpr int kWordsTileMaxM = 6;  // the word-order in-register tile (TileBf16Words) up to here: M 5 0.36 vs 0.43 ms

// Bytes ahead of the decode, in a row's packed stream, that it prefetches.  M 16, 4096 x 4096, one thread: the
// decode's load of the packed bytes was the kernel's hottest instruction (perf: ~20 % of its samples, a miss: the
// span loops between a row pair's decodes are too long for the hardware prefetcher to keep ahead); 1-8 KB ahead
// measured within noise of each other.  With decode_row_bf16_words below, alternating in one process, one thread
// (medians, ms; plain decode / plain + prefetch / words / words + prefetch): M 16 4.29 / 4.00 / 4.41 / 3.68; 11008 x
// 4096 M 16 12.5 / 11.8 / 13.4 / 11.2; M 10 5.30 / 4.81 / 4.77 / 4.28; M 32 8.77 / 8.19 / 9.19 / 8.30.
constexpr int64_t kDecodePrefetch = 2048;
QK_AVX512BF16 void decode_row_bf16(const Problem& p, int64_t n, int64_t k0, int64_t k1, uint16_t* dst) {
  const __m512 code = _mm512_loadu_ps(p.code);
  const __m512i shifts = _mm512_set1_epi64(0x0008000c00000004LL);
  const uint8_t* row = p.packed + ((n * p.K) >> 1);
  for (int64_t k = k0; k < k1;) {
    float sc[1];
    const int64_t seg_end = std::min(k1, next_segment<1>(p, n, k, sc));
    const __m512i lut = bf16_table(code, sc[0]);
    for (; k < seg_end; k += 32) {
      if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + (k >> 1) + kDecodePrefetch), _MM_HINT_T0);
      const __m512i q = _mm512_cvtepu16_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (k >> 1))));
      _mm512_store_si512(dst + (k - k0), _mm512_permutexvar_epi16(_mm512_multishift_epi64_epi8(shifts, q), lut));
    }
  }
}

// The same decode in the constant-table tiles' word order (WordsDecoder; K % 128 == 0, blocksize >= 64): per 128
// weights one 64-byte load, 3 shifts, 4 vpternlogd and 4 vpermw, against 4 x (vpmovzxwq, vpmultishiftqb, vpermw)
// above; the same values, in OrderWords128's order (x packed to match).
QK_AVX512BF16 void decode_row_bf16_words(const Problem& p, int64_t n, int64_t k0, int64_t k1, uint16_t* dst) {
  const WordsDecoder decode(p.code);
  const uint8_t* row = p.packed + ((n * p.K) >> 1);
  for (int64_t k = k0; k < k1; k += 128) {
    _mm_prefetch(reinterpret_cast<const char*>(row + (k >> 1) + kDecodePrefetch), _MM_HINT_T0);
    __m512i w[4];
    decode(p, row + (k >> 1), n * p.K + k, w);
    for (int j = 0; j < 4; ++j) _mm512_store_si512(dst + (k - k0) + 32 * j, w[j]);
  }
}

template <int NR, int MT, int G>
struct SpanBf16 {
  // acc[NR][MT] (in memory) += W[n0 .. n0+NR, k0 .. k0+kc] . x[m0 .. m0+MT, same k]; W rows at wbuf + r * ws, in
  // the order of x's packing, whose groups are G columns (pack_x: a group's MT rows back to back).
  QK_AVX512BF16 static void run(const uint16_t* wbuf, int64_t ws, const uint16_t* xk, int64_t kc, float* acc_mem,
                                bool first) {
    __m512 acc[NR][MT];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i)
        acc[r][i] = first ? _mm512_setzero_ps() : _mm512_load_ps(acc_mem + 16 * (r * MT + i));
    for (int64_t c = 0; c < kc; c += 32) {
      __m512i w[NR];
      for (int r = 0; r < NR; ++r) w[r] = _mm512_load_si512(wbuf + r * ws + c);
      const uint16_t* xc = xk + (c / G) * G * MT + c % G;
      for (int i = 0; i < MT; ++i) {
        const __m512i xv = _mm512_loadu_si512(xc + G * i);
        for (int r = 0; r < NR; ++r) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)w[r], (__m512bh)xv);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i) _mm512_store_ps(acc_mem + 16 * (r * MT + i), acc[r][i]);
  }
  QK_AVX512BF16 static void finish(const Problem& p, const float* acc_mem, int64_t n0, int64_t m0) {
    __m512 acc[NR][MT];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_load_ps(acc_mem + 16 * (r * MT + i));
    finish_avx512<NR, MT>(p, acc, n0, m0);
  }
};

template <int NR, int MT>
using SpanBf16G32 = SpanBf16<NR, MT, 32>;
template <int NR, int MT>
using SpanBf16G128 = SpanBf16<NR, MT, 128>;

// ---- float32 x (and float16 x, and bfloat16 x without vdpbf16ps), the same scheme: kMultiNr rows decoded to
// float32 (code * scale, the even / odd order of OrderEvenOdd32 per 32 weights) kKcF32 columns at a time, read by M
// tiles of kMultiMt rows with float32 FMAs, M in passes of kF32PassRows rows.  In registers (TileF32Avx512, 2 x 8)
// each M tile decoded every W chunk again.  Measured alternating in one process (4096 x 4096, two threads, medians,
// ms, in-register tiles vs this): float32 x M 5 1.04 -> 0.85, M 8 1.14 -> 1.05, M 16 2.34 -> 1.65, M 32 4.39 ->
// 2.73, M 64 12.9 -> 5.75 (11008 x 4096 M 48 18.7 -> 11.9; blocksize 32 M 48 10.0 -> 4.8); float16 x M 16 2.36 ->
// 1.79, M 32 6.44 -> 3.19; bfloat16 x without vdpbf16ps M 16 3.18 -> 1.74; M 3-4 the in-register tile stays
// (0.50 vs 0.67 ms at M 3).  Passes (M 512): 48-64 rows 41.6-42.3 ms, 96 44.0, 128 46.6, one pass 56.0.
constexpr int64_t kKcF32 = 1024;     // 6 rows x 4 KB
constexpr int kF32TileMaxM = 4;      // TileF32Avx512 (one M tile) up to here
constexpr int64_t kF32PassRows = 64;

QK_AVX512 void decode_row_f32(const Problem& p, int64_t n, int64_t k0, int64_t k1, float* dst) {
  const __m512 code = _mm512_loadu_ps(p.code);
  const uint8_t* row = p.packed + ((n * p.K) >> 1);
  for (int64_t k = k0; k < k1;) {
    float sc[1];
    const int64_t seg_end = std::min(k1, next_segment<1>(p, n, k, sc));
    const __m512 lut = _mm512_mul_ps(code, _mm512_set1_ps(sc[0]));
    for (; k < seg_end; k += 32) {
      if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + (k >> 1) + kDecodePrefetch), _MM_HINT_T0);
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (k >> 1))));
      _mm512_store_ps(dst + (k - k0), _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut));  // elements k, k+2, ...
      _mm512_store_ps(dst + (k - k0) + 16, _mm512_permutexvar_ps(v, lut));                   // k+1, k+3, ...
    }
  }
}

template <int NR, int MT>
struct SpanF32 {
  // SpanBf16 for float32: 16 columns per step, x packed with OrderEvenOdd32 (groups of 32 columns).
  QK_AVX512 static void run(const float* wbuf, int64_t ws, const float* xk, int64_t kc, float* acc_mem, bool first) {
    __m512 acc[NR][MT];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i)
        acc[r][i] = first ? _mm512_setzero_ps() : _mm512_load_ps(acc_mem + 16 * (r * MT + i));
    for (int64_t c = 0; c < kc; c += 16) {
      __m512 w[NR];
      for (int r = 0; r < NR; ++r) w[r] = _mm512_load_ps(wbuf + r * ws + c);
      const float* xc = xk + (c / 32) * 32 * MT + c % 32;
      for (int i = 0; i < MT; ++i) {
        const __m512 xv = _mm512_loadu_ps(xc + 32 * i);
        for (int r = 0; r < NR; ++r) acc[r][i] = _mm512_fmadd_ps(w[r], xv, acc[r][i]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i) _mm512_store_ps(acc_mem + 16 * (r * MT + i), acc[r][i]);
  }
  QK_AVX512 static void finish(const Problem& p, const float* acc_mem, int64_t n0, int64_t m0) {
    __m512 acc[NR][MT];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_load_ps(acc_mem + 16 * (r * MT + i));
    finish_avx512<NR, MT>(p, acc, n0, m0);
  }
};

// Sixteen horizontal sums at once: lane q of the result is the sum of a[q]'s 16 lanes (a transposing tree: pairs
// of vectors interleaved and added, then quadruples, then the 128-bit quarters; 45 instructions against ~8 per
// vector for one _mm512_reduce_add_ps each).
QK_AVX512 QK_INLINE __m512 reduce16_avx512(const __m512 (&a)[16]) {
  __m512 b[8], c[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit quarter: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] of the pair (a, b)
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // per quarter: the quarter's sums of a[4k .. 4k + 3]
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * k]), _mm512_castps_pd(b[2 * k + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * k]), _mm512_castps_pd(b[2 * k + 1]));
    c[k] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  // quarters 0 + 1 and 2 + 3 of c[0], c[1] (then c[2], c[3]), then the two halves: [sum a0 .. sum a15]
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

// run_multi's finish on AVX-512, a group of nr <= 8 rows n at once: for two rows m at a time, lanes 8h + r (h: which
// of the two, r < nr) take the accumulator of (m + h, n0 + r) with its LoRA term folded into its lanes (as
// finish_avx512), reduce16_avx512 sums all sixteen, the bias is one vector add, and each row m's nr outputs are one
// masked store (converted in the vector: bf16_rne_avx512 / vcvtps2ph, the bits of store_y's float_to_bf16_bits /
// float_to_half_bits). Against finish_avx512 per tile (one horizontal sum, one scalar conversion and one 2-byte
// store per output): at 4864 x 896 (short rows, few products per output) bf16 M 16 that finish was ~35 % of the call
// (0.39 ms; 0.25 without it).
static_assert(kMultiNr <= 8, "finish_group_avx512 puts a group's rows in 8 lanes per row m");
QK_AVX512 void finish_group_avx512(const Problem& p, const float* acc, int nr_max, int nr, int64_t n0) {
  const int64_t M = p.M;
  const unsigned row_lanes = (1u << nr) - 1u;  // lanes r < nr of each row's eight
  alignas(64) float bias16[16] = {};
  if (p.bias != nullptr)
    for (int r = 0; r < nr; ++r) bias16[r] = bias16[8 + r] = p.bias[n0 + r];
  const __m512 bias = _mm512_load_ps(bias16);
  for (int64_t m = 0; m < M; m += 2) {
    const int rows = M - m >= 2 ? 2 : 1;
    __m512 a[16];
    for (int h = 0; h < 2; ++h) {
      const int64_t mm = m + h;
      const int64_t m0 = mm - mm % kMultiMt;
      const int mt = static_cast<int>(std::min<int64_t>(kMultiMt, M - m0));
      const float* tile = acc + nr_max * m0 * 16 + 16 * (mm - m0);  // + 16 * (r * mt) for row n0 + r
      for (int r = 0; r < 8; ++r) {
        if (h >= rows || r >= nr) {
          a[8 * h + r] = _mm512_setzero_ps();
          continue;
        }
        __m512 v = _mm512_load_ps(tile + 16 * (r * mt));
        if (p.r > 0) {  // LoRA folded into the lanes before the sum, as finish_avx512
          const float* t = p.lora_t + mm * p.r;
          const float* B = p.lora_B + (n0 + r) * p.r;
          for (int64_t j = 0; j < p.r; j += 16) {
            const int64_t left = p.r - j;
            const __mmask16 mk = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
            v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, t + j), _mm512_maskz_loadu_ps(mk, B + j), v);
          }
        }
        a[8 * h + r] = v;
      }
    }
    const __m512 y = _mm512_add_ps(reduce16_avx512(a), bias);  // lane 8h + r: out[m + h, n0 + r]
    const auto lanes = static_cast<__mmask8>(row_lanes);
    const int64_t e0 = m * p.N + n0, e1 = e0 + p.N;  // row m's outputs from lane 0, row m + 1's from lane 8
    switch (p.dtype) {
      case DType::float32: {
        float* o = static_cast<float*>(p.out);
        _mm256_mask_storeu_ps(o + e0, lanes, _mm512_castps512_ps256(y));
        if (rows == 2) _mm256_mask_storeu_ps(o + e1, lanes, _mm512_castps512_ps256(_mm512_shuffle_f32x4(y, y, 0xEE)));
        break;
      }
      case DType::float16:
      case DType::bfloat16: {
        uint16_t* o = static_cast<uint16_t*>(p.out);
        const __m256i h = p.dtype == DType::float16
                              ? _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                              : dequant_detail::bf16_rne_avx512(y);
        _mm_mask_storeu_epi16(o + e0, lanes, _mm256_castsi256_si128(h));
        if (rows == 2) _mm_mask_storeu_epi16(o + e1, lanes, _mm256_extracti128_si256(h, 1));
        break;
      }
    }
  }
}

using SpanFinishFn = void (*)(const Problem&, const float*, int64_t, int64_t);
using GroupFinishFn = void (*)(const Problem&, const float*, int, int, int64_t);
template <typename T>  // T: the element type of the decoded W and the packed x (uint16_t bf16 bits, or float)
struct SpanTable {
  using Fn = void (*)(const T*, int64_t, const T*, int64_t, float*, bool);  // ..., acc, first span (acc unread)
  Fn span[kMultiNr + 1][kMultiMt + 1] = {};  // [NR][MT]
  SpanFinishFn finish[kMultiNr + 1][kMultiMt + 1] = {};
  GroupFinishFn group = nullptr;  // a whole group's finish (all M tiles at once) where set, else finish per tile
};

template <template <int, int> class Span, typename T, int NR, int... MT>
void fill_span_row(SpanTable<T>& t, std::integer_sequence<int, MT...>) {
  ((t.span[NR][MT] = &Span<NR, MT>::run, t.finish[NR][MT] = &Span<NR, MT>::finish), ...);
}

template <template <int, int> class Span, typename T, int... NR>
SpanTable<T> make_span_table(std::integer_sequence<int, NR...>) {
  SpanTable<T> t;
  static_assert(kMultiMt == 4, "fill_span_row's list is 1..kMultiMt");
  (fill_span_row<Span, T, NR>(t, std::integer_sequence<int, 1, 2, 3, 4>{}), ...);
  return t;
}
using Nrs = std::integer_sequence<int, 1, 2, 3, 4, 5, 6>;
static_assert(kMultiNr == 6, "Nrs lists 1..kMultiNr");

template <typename T>
SpanTable<T> with_group_finish(SpanTable<T> t) {  // the AVX-512 tables: finish_group_avx512
  t.group = &finish_group_avx512;
  return t;
}

// The several-M-tile driver: OpenMP over groups of nr_max rows (at most kMultiNr); per group and span of kc columns,
// decode(p, n, k0, k1, dst) writes each row's span to a per-thread buffer (row stride kc_max), then every M tile's span
// kernel reads it.
// xp: x packed (pack_x / pack_x_words_bf16 / pack_x_f32) in M tiles of kMultiMt rows.
template <typename T, typename Decode>
void run_multi(const Problem& p, const T* xp, const SpanTable<T>& t, Decode decode, int64_t kc_max,
               int nr_max = kMultiNr) {
  const int64_t ngroups = (p.N + nr_max - 1) / nr_max;
  const bool par = p.N * p.K >= kParallelMinWeights && ngroups > 1;
  (void)par;
#ifdef _OPENMP
#pragma omp parallel if (par)
#endif
  {
    std::vector<T, AlignedAlloc<T>> wbuf(static_cast<size_t>(nr_max * kc_max));
    std::vector<float, AlignedAlloc<float>> acc(static_cast<size_t>(nr_max * p.M * 16));  // [M tile][NR][MT][16]
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t n0 = nr_max * g;
      const int nr = static_cast<int>(std::min<int64_t>(nr_max, p.N - n0));
      // The first span starts the accumulators at zero (no fill, no load: with rows of K <= kc_max, one span, the
      // accumulators went memory -> registers -> memory once more per group for nothing).
      for (int64_t k0 = 0; k0 < p.K; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, p.K - k0);
        for (int r = 0; r < nr; ++r) decode(p, n0 + r, k0, k0 + kc, wbuf.data() + r * kc_max);
        for (int64_t m0 = 0; m0 < p.M; m0 += kMultiMt) {
          const int mt = static_cast<int>(std::min<int64_t>(kMultiMt, p.M - m0));
          t.span[nr][mt](wbuf.data(), kc_max, xp + m0 * p.K + k0 * mt, kc, acc.data() + nr_max * m0 * 16, k0 == 0);
        }
      }
      if (t.group != nullptr) {
        t.group(p, acc.data(), nr_max, nr, n0);
        continue;
      }
      for (int64_t m0 = 0; m0 < p.M; m0 += kMultiMt) {
        const int mt = static_cast<int>(std::min<int64_t>(kMultiMt, p.M - m0));
        t.finish[nr][mt](p, acc.data() + nr_max * m0 * 16, n0, m0);
      }
    }
  }
}

// words: W decoded by decode_row_bf16_words and x packed with OrderWords128 (else decode_row_bf16, OrderAsIs32).
void run_bf16_multi(const Problem& p, const uint16_t* xp, bool words) {
  static const SpanTable<uint16_t> t32 = with_group_finish(make_span_table<SpanBf16G32, uint16_t>(Nrs{}));
  static const SpanTable<uint16_t> t128 = with_group_finish(make_span_table<SpanBf16G128, uint16_t>(Nrs{}));
  if (words)
    run_multi(p, xp, t128, &decode_row_bf16_words, kKc);
  else
    run_multi(p, xp, t32, &decode_row_bf16, kKc);
}

// x packed with pack_x_f32<OrderEvenOdd32>.
void run_f32_multi(const Problem& p, const float* xp) {
  static const SpanTable<float> t = with_group_finish(make_span_table<SpanF32, float>(Nrs{}));
  run_multi(p, xp, t, &decode_row_f32, kKcF32);
}

// ---- dX = g @ W (the backward's input gradient), float32: out[m, k] = sum_n g[m, n] W[n, k].  OpenMP over strips
// of kDxStrip columns; per strip, W's rows are decoded kDxChunk at a time (decode_row_f32: a strip's 64 weights of a
// row, even / odd order per 32) into a per-thread buffer (64 KB, L2), and M tiles of kDxMt rows of g multiply it:
// per row n of the chunk, 4 W vectors and kDxMt broadcasts of g[m, n] feed kDxMt x 4 FMAs (24 accumulators).  Each
// chunk's sums start from zero and are added to the strip's float32 accumulators after it (sums over N in blocks of
// kDxChunk, as a blocked GEMM's); the strip is written out in column order at the end.
constexpr int64_t kDxStrip = 64;
constexpr int64_t kDxChunk = 256;
constexpr int kDxMt = 6;

template <int MT>
QK_AVX512 void dx_tile(const float* g, int64_t ldg, const float* wb, int64_t nc, float* acc) {
  __m512 a[MT][4];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 4; ++j) a[i][j] = _mm512_setzero_ps();
  for (int64_t n = 0; n < nc; ++n) {
    const float* w = wb + kDxStrip * n;
    const __m512 w0 = _mm512_load_ps(w), w1 = _mm512_load_ps(w + 16), w2 = _mm512_load_ps(w + 32),
                 w3 = _mm512_load_ps(w + 48);
    for (int i = 0; i < MT; ++i) {
      const __m512 gv = _mm512_set1_ps(g[i * ldg + n]);
      a[i][0] = _mm512_fmadd_ps(gv, w0, a[i][0]);
      a[i][1] = _mm512_fmadd_ps(gv, w1, a[i][1]);
      a[i][2] = _mm512_fmadd_ps(gv, w2, a[i][2]);
      a[i][3] = _mm512_fmadd_ps(gv, w3, a[i][3]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 4; ++j) {
      float* d = acc + kDxStrip * i + 16 * j;
      _mm512_store_ps(d, _mm512_add_ps(_mm512_load_ps(d), a[i][j]));
    }
}

using DxTileFn = void (*)(const float*, int64_t, const float*, int64_t, float*);

// The strip driver shared by the ISAs: OpenMP over strips of `strip` columns (a multiple of 32); per strip, W's rows
// decoded kDxChunk at a time by decode (a row's strip into wb, even / odd order per 32 columns), tiles[mt] adding
// g's rows times them into the strip's float32 accumulators, write(acc_row, out_row, strip) putting each row of the
// strip in column order.
template <typename Decode, typename Write>
void dx_run(const Problem& p, const float* g, float* out, int64_t strip, const DxTileFn* tiles, Decode decode,
            Write write) {
  const int64_t nstrips = p.K / strip;
  const bool par = p.N * p.K >= kParallelMinWeights && nstrips > 1;
  (void)par;
#ifdef _OPENMP
#pragma omp parallel if (par)
#endif
  {
    std::vector<float, AlignedAlloc<float>> wb(static_cast<size_t>(kDxChunk * strip));
    std::vector<float, AlignedAlloc<float>> acc(static_cast<size_t>(p.M * strip));
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t s = 0; s < nstrips; ++s) {
      const int64_t k0 = s * strip;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t n0 = 0; n0 < p.N; n0 += kDxChunk) {
        const int64_t nc = std::min(kDxChunk, p.N - n0);
        for (int64_t r = 0; r < nc; ++r) decode(p, n0 + r, k0, k0 + strip, wb.data() + strip * r);
        for (int64_t m0 = 0; m0 < p.M; m0 += kDxMt) {
          const int mt = static_cast<int>(std::min<int64_t>(kDxMt, p.M - m0));
          tiles[mt](g + m0 * p.N + n0, p.N, wb.data(), nc, acc.data() + strip * m0);
        }
      }
      for (int64_t m = 0; m < p.M; ++m) write(acc.data() + strip * m, out + m * p.K + k0, strip);
    }
  }
}

// A strip row in column order: lanes 2i <- even i, 2i + 1 <- odd i of each 32-column group.
QK_AVX512 void dx_write_avx512(const float* a, float* o, int64_t strip) {
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t c = 0; c < strip; c += 32) {
    const __m512 ev = _mm512_load_ps(a + c), od = _mm512_load_ps(a + c + 16);
    _mm512_storeu_ps(o + c, _mm512_permutex2var_ps(ev, lo, od));
    _mm512_storeu_ps(o + c + 16, _mm512_permutex2var_ps(ev, hi, od));
  }
}

void dx_strips(const Problem& p, const float* g, float* out) {
  static const DxTileFn tiles[kDxMt + 1] = {nullptr, &dx_tile<1>, &dx_tile<2>, &dx_tile<3>,
                                            &dx_tile<4>, &dx_tile<5>, &dx_tile<6>};
  static_assert(kDxMt == 6, "tiles lists 1..kDxMt");
  dx_run(p, g, out, kDxStrip, tiles, &decode_row_f32, &dx_write_avx512);
}

// ---- AVX2 + FMA, float32 x (packed, even / odd split), 16 elements (8 bytes) per step; the 16-entry table is two
// ymm halves picked by bit 3 of the index (vpermps x2 + blend), as in dequantize.cpp.
QK_AVX2 QK_INLINE __m256 lookup16_avx2(__m256 la, __m256 lb, __m256i idx) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(la, idx), _mm256_permutevar8x32_ps(lb, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

QK_AVX2 QK_INLINE float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int NR, int MT>
struct TileF32Avx2 {
  QK_AVX2 static void run(const Problem& p, const void* xprep, int64_t n0, int64_t m0) {
    const int64_t K = p.K;
    const int64_t ahead = prefetch_distance(K);
    const float* xt = static_cast<const float*>(xprep) + m0 * K;
    const __m256 code_a = _mm256_loadu_ps(p.code), code_b = _mm256_loadu_ps(p.code + 8);
    const __m256i low4 = _mm256_set1_epi32(0x0f);
    __m256 acc[NR][MT], acc_lo[NR][MT];  // high / low nibble products apart: half the summation depth per lane
    __m256 la[NR], lb[NR];
    const uint8_t* row[NR];
    for (int r = 0; r < NR; ++r) {
      row[r] = p.packed + (((n0 + r) * K) >> 1);
      for (int i = 0; i < MT; ++i) acc[r][i] = acc_lo[r][i] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < K;) {
      float sc[NR];
      const int64_t seg_end = next_segment<NR>(p, n0, k, sc);
      for (int r = 0; r < NR; ++r) {
        la[r] = _mm256_mul_ps(code_a, _mm256_set1_ps(sc[r]));
        lb[r] = _mm256_mul_ps(code_b, _mm256_set1_ps(sc[r]));
      }
      for (; k < seg_end; k += 32) {
        const float* xk = xt + k * MT;
        for (int r = 0; r < NR; ++r) prefetch_row(row[r], k, ahead);
        for (int h = 0; h < 2; ++h) {  // bytes 8h .. 8h+7 of the chunk: x evens at [8h, 8h+8), odds at [16+8h, ...)
          __m256 whi[NR], wlo[NR];
          for (int r = 0; r < NR; ++r) {
            const __m256i v =
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row[r] + (k >> 1) + 8 * h)));
            whi[r] = lookup16_avx2(la[r], lb[r], _mm256_srli_epi32(v, 4));
            wlo[r] = lookup16_avx2(la[r], lb[r], _mm256_and_si256(v, low4));
          }
          for (int i = 0; i < MT; ++i) {
            const __m256 xe = _mm256_loadu_ps(xk + 32 * i + 8 * h), xo = _mm256_loadu_ps(xk + 32 * i + 16 + 8 * h);
            for (int r = 0; r < NR; ++r) {
              acc[r][i] = _mm256_fmadd_ps(whi[r], xe, acc[r][i]);
              acc_lo[r][i] = _mm256_fmadd_ps(wlo[r], xo, acc_lo[r][i]);
            }
          }
        }
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i)
        store_y(p, m0 + i, n0 + r,
                epilogue_scalar(p, m0 + i, n0 + r, hsum_avx2(_mm256_add_ps(acc[r][i], acc_lo[r][i]))));
  }
};

// The float32 decode-to-L1 scheme (SpanF32) with 8-wide vectors: 3 rows x 4 M rows (12 accumulators, 3 W and 1 x
// register: the 16 ymm), from 5 rows.  Against the in-register AVX2 tiles (2 x 1 and 1 x 4), on the Zen 4 machine
// with QKERNELS_CPU_ISA=avx2 (alternating, 4096 x 4096 float32 x, two threads, ms): M 5 1.71 -> 1.48, M 8 2.14 ->
// 1.74, M 16 4.26 -> 2.90, M 32 8.37 -> 5.14, M 64 17.4 -> 10.2 (~210 GFLOP/s); M 2-3 the tiles (equal).
constexpr int kAvx2MultiNr = 3;
constexpr int kAvx2TileMaxM = 4;

QK_AVX2 void decode_row_f32_avx2(const Problem& p, int64_t n, int64_t k0, int64_t k1, float* dst) {
  const __m256 code_a = _mm256_loadu_ps(p.code), code_b = _mm256_loadu_ps(p.code + 8);
  const __m256i low4 = _mm256_set1_epi32(0x0f);
  const uint8_t* row = p.packed + ((n * p.K) >> 1);
  for (int64_t k = k0; k < k1;) {
    float sc[1];
    const int64_t seg_end = std::min(k1, next_segment<1>(p, n, k, sc));
    const __m256 la = _mm256_mul_ps(code_a, _mm256_set1_ps(sc[0])), lb = _mm256_mul_ps(code_b, _mm256_set1_ps(sc[0]));
    for (; k < seg_end; k += 32) {
      if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + (k >> 1) + kDecodePrefetch), _MM_HINT_T0);
      float* d = dst + (k - k0);  // OrderEvenOdd32: elements k, k+2, ... k+30, then k+1, ... k+31
      for (int h = 0; h < 2; ++h) {
        const __m256i v =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (k >> 1) + 8 * h)));
        _mm256_store_ps(d + 8 * h, lookup16_avx2(la, lb, _mm256_srli_epi32(v, 4)));
        _mm256_store_ps(d + 16 + 8 * h, lookup16_avx2(la, lb, _mm256_and_si256(v, low4)));
      }
    }
  }
}

template <int NR, int MT>
struct SpanF32Avx2 {
  QK_AVX2 static void run(const float* wbuf, int64_t ws, const float* xk, int64_t kc, float* acc_mem, bool first) {
    __m256 acc[NR][MT];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i) acc[r][i] = first ? _mm256_setzero_ps() : _mm256_load_ps(acc_mem + 8 * (r * MT + i));
    for (int64_t c = 0; c < kc; c += 8) {
      __m256 w[NR];
      for (int r = 0; r < NR; ++r) w[r] = _mm256_load_ps(wbuf + r * ws + c);
      const float* xc = xk + (c / 32) * 32 * MT + c % 32;
      for (int i = 0; i < MT; ++i) {
        const __m256 xv = _mm256_loadu_ps(xc + 32 * i);
        for (int r = 0; r < NR; ++r) acc[r][i] = _mm256_fmadd_ps(w[r], xv, acc[r][i]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i) _mm256_store_ps(acc_mem + 8 * (r * MT + i), acc[r][i]);
  }
  QK_AVX2 static void finish(const Problem& p, const float* acc_mem, int64_t n0, int64_t m0) {
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i)
        store_y(p, m0 + i, n0 + r,
                epilogue_scalar(p, m0 + i, n0 + r, hsum_avx2(_mm256_load_ps(acc_mem + 8 * (r * MT + i)))));
  }
};

// x packed with pack_x_f32<OrderEvenOdd32> in M tiles of kMultiMt rows.
void run_f32_multi_avx2(const Problem& p, const float* xp) {
  static const SpanTable<float> t = make_span_table<SpanF32Avx2, float>(std::integer_sequence<int, 1, 2, 3>{});
  static_assert(kAvx2MultiNr == 3, "the table lists NR 1..kAvx2MultiNr");
  run_multi(p, xp, t, &decode_row_f32_avx2, kKcF32, kAvx2MultiNr);
}

// float32 GEMV in passes of kF32PassRows rows of x (x's span for them stays in L2; each pass decodes W again).
template <typename Run>
void run_f32_passes(const Problem& p, const void* x, Run run) {
  const int64_t xb = p.dtype == DType::float32 ? 4 : 2;
  for (int64_t m0 = 0; m0 < p.M; m0 += kF32PassRows) {
    Problem q = p;
    q.M = std::min(kF32PassRows, p.M - m0);
    if (q.lora_t != nullptr) q.lora_t += m0 * p.r;
    q.out = static_cast<char*>(p.out) + m0 * p.N * xb;
    const void* xq = static_cast<const char*>(x) + m0 * p.K * xb;
    const std::vector<float> xp = pack_x_f32<OrderEvenOdd32>(xq, q.dtype, q.M, q.K, kMultiMt);
    run(q, xp.data());
  }
}

// dX = g @ W on AVX2 (dx_strips' scheme with 8-wide vectors): strips of 32 columns (the decoder's even / odd halves of
// 16), each half multiplied by 6-row tiles of g with 2 W vectors (12 accumulators, 2 W and 1 broadcast register).
template <int MT>
QK_AVX2 void dx_tile_avx2(const float* g, int64_t ldg, const float* wb, int64_t nc, float* acc) {
  // acc [MT][32] (a strip's rows) += g [MT, nc] @ wb [nc, 32], one half of 16 columns at a time
  for (int h = 0; h < 2; ++h) {
    __m256 a[MT][2];
    for (int i = 0; i < MT; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
    for (int64_t n = 0; n < nc; ++n) {
      const float* w = wb + 32 * n + 16 * h;
      const __m256 w0 = _mm256_load_ps(w), w1 = _mm256_load_ps(w + 8);
      for (int i = 0; i < MT; ++i) {
        const __m256 gv = _mm256_broadcast_ss(g + i * ldg + n);
        a[i][0] = _mm256_fmadd_ps(gv, w0, a[i][0]);
        a[i][1] = _mm256_fmadd_ps(gv, w1, a[i][1]);
      }
    }
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < 2; ++j) {
        float* d = acc + 32 * i + 16 * h + 8 * j;
        _mm256_store_ps(d, _mm256_add_ps(_mm256_load_ps(d), a[i][j]));
      }
  }
}

// A strip row in column order (dx_write_avx512's interleave, with 8-wide unpacks: within each 128-bit lane).
QK_AVX2 void dx_write_avx2(const float* a, float* o, int64_t strip) {
  for (int64_t c = 0; c < strip; c += 32)
    for (int h = 0; h < 2; ++h) {  // evens / odds c + 8h .. c + 8h + 7 -> columns c + 16h .. c + 16h + 15
      const __m256 ev = _mm256_load_ps(a + c + 8 * h), od = _mm256_load_ps(a + c + 16 + 8 * h);
      const __m256 l = _mm256_unpacklo_ps(ev, od), u = _mm256_unpackhi_ps(ev, od);  // per 128-bit lane
      _mm256_storeu_ps(o + c + 16 * h, _mm256_permute2f128_ps(l, u, 0x20));
      _mm256_storeu_ps(o + c + 16 * h + 8, _mm256_permute2f128_ps(l, u, 0x31));
    }
}

void dx_strips_avx2(const Problem& p, const float* g, float* out) {
  static const DxTileFn tiles[kDxMt + 1] = {nullptr, &dx_tile_avx2<1>, &dx_tile_avx2<2>, &dx_tile_avx2<3>,
                                            &dx_tile_avx2<4>, &dx_tile_avx2<5>, &dx_tile_avx2<6>};
  dx_run(p, g, out, 32, tiles, &decode_row_f32_avx2, &dx_write_avx2);
}

// vdpbf16ps path: needs AVX512_BF16 and (for vpmultishiftqb) AVX512_VBMI; QKERNELS_CPU_GEMV_BF16=0 turns it off.
bool bf16_dot_enabled() {
  static const bool cpu_has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi");
  }();
  const char* env = std::getenv("QKERNELS_CPU_GEMV_BF16");
  return cpu_has && !(env != nullptr && std::strcmp(env, "0") == 0);
}

using Mts8 = std::integer_sequence<int, 1, 2, 3, 4, 5, 6, 7, 8>;
using Mts4 = std::integer_sequence<int, 1, 2, 3, 4>;

}  // namespace

bool gemv_simd(const Problem& p, const void* x) {
  if (p.K % 32 != 0) return false;
  const Isa isa = active_isa();
  if (isa == Isa::avx512) {
    if (p.dtype == DType::bfloat16 && bf16_dot_enabled()) {
      // Up to M 4 the decode dominates and the constant-table tile wins (one core-pair, 4096 x 4096: M 1 0.46 ->
      // 0.31 ms, M 2 0.53 -> 0.37, M 4 0.67 -> 0.53; against the word-order tile, one thread: M 1 0.50 vs 0.65 ms,
      // M 4 0.97 vs 1.15); from M 6 its extra fma per 128 weights and row of x costs what the cheaper decode saves
      // (M 6 equal, M 8 1.2 vs 1.3 ms against the per-block tables).  M 5-6: the word-order tile (one thread,
      // alternating: M 5 1.50 -> 1.36 ms, M 6 1.88 -> 1.76 against the per-block tables); from 7 rows the decode
      // into L1 shared by the M tiles (run_bf16_multi; measurements there).  Without the word order's conditions
      // (K % 128 != 0, blocksize 32): the per-block tables to M 8, then run_bf16_multi with the per-block decode.
      const bool words = p.K % 128 == 0 && p.bs_shift >= 6;  // the word-order decodes apply
      // The constant-table tile also takes K % 128 == 64 (a half group ends each row; Falcon-7B's 18176 x 4544, M 1,
      // fourteenth session: 1.74 ms on the per-block tables with their prefetch, 2.4 without, 1.02 ms here, against
      // 0.93-1.0 at K 4480).
      if ((words || (p.K % 64 == 0 && p.bs_shift >= 6)) && p.M <= kConstMaxM) {
        static const TileTable tc = make_table<TileBf16Const, 4, 2, 1>(Mts4{});
        std::vector<uint16_t> xp(static_cast<size_t>(p.M * padded_k128(p.K)));
        pack_x_words_bf16(x, p.M, p.K, tc.mt_max, xp.data());
        run_tiles(p, xp.data(), tc);
        return true;
      }
      static const TileTable t = make_table<TileBf16Avx512, 4, 2, 2>(Mts8{});
      std::vector<uint16_t> xp(static_cast<size_t>(p.M * p.K));
      if (p.M > (words ? kWordsTileMaxM : t.mt_max)) {
        if (words)
          pack_x_words_bf16(x, p.M, p.K, kMultiMt, xp.data());
        else
          pack_x<RawU16, OrderAsIs32>(x, p.M, p.K, kMultiMt, xp.data());
        run_bf16_multi(p, xp.data(), words);
        return true;
      }
      if (words) {
        static const TileTable tw = make_table<TileBf16Words, 4, 2, 2>(Mts8{});
        pack_x_words_bf16(x, p.M, p.K, tw.mt_max, xp.data());
        run_tiles(p, xp.data(), tw);
        return true;
      }
      pack_x<RawU16, OrderAsIs32>(x, p.M, p.K, t.mt_max, xp.data());
      run_tiles(p, xp.data(), t);
      return true;
    }
    // M 1 only: 4096 x 4096, float32 x, 0.56-0.59 -> 0.44-0.47 ms; at M 2 and up the extra fma, mul and add per
    // 128 weights and row of x cancel the cheaper decode (M 2 equal, M 8 2.75 -> 3.0 ms).
    if (p.K % 128 == 0 && p.bs_shift >= 6 && p.M == 1) {
      static const TileTable tc = make_table<TileF32Const, 4, 4, 1>(std::integer_sequence<int, 1>{});
      const std::vector<float> xp = pack_x_f32<OrderDwords128>(x, p.dtype, p.M, p.K, tc.mt_max);
      run_tiles(p, xp.data(), tc);
      return true;
    }
    if (p.M > kF32TileMaxM) {
      run_f32_passes(p, x, &run_f32_multi);
      return true;
    }
    static const TileTable t = make_table<TileF32Avx512, 4, 2, 2>(Mts8{});
    const std::vector<float> xp = pack_x_f32<OrderEvenOdd32>(x, p.dtype, p.M, p.K, t.mt_max);
    run_tiles(p, xp.data(), t);
    return true;
  }
  if (isa == Isa::avx2) {
    if (p.M > kAvx2TileMaxM) {
      run_f32_passes(p, x, &run_f32_multi_avx2);
      return true;
    }
    static const TileTable t = make_table<TileF32Avx2, 2, 1, 1>(Mts4{});
    const std::vector<float> xp = pack_x_f32<OrderEvenOdd32>(x, p.dtype, p.M, p.K, t.mt_max);
    run_tiles(p, xp.data(), t);
    return true;
  }
  return false;
}

// dX = g @ W into float32 out (gemv_internal.h); false: no SIMD path (K % 64 != 0, or neither AVX-512 nor AVX2).
bool gemm_dx_simd(const Problem& p, const void* g, float* out) {
  const Isa isa = active_isa();
  if (p.K % kDxStrip != 0 || (isa != Isa::avx512 && isa != Isa::avx2)) return false;
  const auto run = isa == Isa::avx512 ? &dx_strips : &dx_strips_avx2;
  if (p.dtype == DType::float32) {
    run(p, static_cast<const float*>(g), out);
  } else {
    const std::vector<float> gf = x_to_f32(g, p.dtype, p.M, p.N);
    run(p, gf.data(), out);
  }
  return true;
}
#endif  // QK_X86

#ifndef QK_X86
bool gemv_simd(const Problem&, const void*) { return false; }
bool gemm_dx_simd(const Problem&, const void*, float*) { return false; }
#endif

// Rows up to which this kernel beats "dequantize into a buffer + torch matmul" (qkernels._linear asks per call).
// Measured on the 2-core Zen 4 machine (4096 x 4096, and 11008 x 4096 for bf16; same process, OMP active):
//   bf16 with vdpbf16ps, the 6 x 4 spans of run_bf16_multi (thirteenth session; through matmul_4bit_lora, LoRA r 16
//   and bias, medians of alternating runs, GEMV vs dequantize + matmul, ms): 4096 x 4096 M 48 2.37 vs 3.46, M 64
//   2.96 vs 3.83, M 96 4.20 vs 4.85, M 128 5.48 vs 5.90; 11008 x 4096 and 4096 x 11008 M 96 12.2-12.6 vs 13.5-13.9,
//   M 128 16.4-16.6 vs 16.6-16.9; blocksize 32 (the slower per-block decode) M 96 5.59 vs 5.48; K 4064 (K % 128 != 0:
//   the same) M 48 2.71 vs 3.18, M 96 5.00 vs 4.86.  GEMV to 96 with K % 128 == 0 (the word-order decode at
//   blocksize >= 64; at 32 even), else to 64.  (Past 128 rows x's span no longer fits L2: M 256 14.3 vs 9.8 ms.)
//   float32 / float16 x (and bf16 without vdpbf16ps) with run_f32_multi (thirteenth session; through
//   matmul_4bit_lora as above): 4096 x 4096 float32 M 64 5.87 vs 17.1 ms, M 128 11.5 vs 28.6, M 256 24.7 vs 47.6
//   (before the passes), M 512 45.5 vs 77.5, M 1024 89.5 vs 150, M 2048 189 vs 305; 11008 x 4096 M 192 45.0 vs
//   90.5; float16 M 128 12.2 vs 29.1, 4096 x 11008 M 1024 269 vs 418 (torch's float32 GEMM here runs at ~200
//   GFLOP/s, this kernel at ~300).  No crossover up to 2048 rows, the largest measured: GEMV to 2048.  (Before, with
//   the in-register tiles: M 32 7.4 vs 20.4 ms, M 64 15.2 vs 26.6 ms, M 128 29-40 vs 39.8 ms: GEMV to 64.)
//   The AVX2 path (run_f32_multi_avx2, QKERNELS_CPU_ISA=avx2 on the same machine; torch's matmul there still uses
//   AVX-512, about the rate an AVX2 core with two 256-bit FMA pipes reaches): float32 M 32 5.40 vs 11.1 ms, M 64
//   10.9 vs 16.5, M 128 21.3 vs 26.6, M 256 41.4 vs 47.3, M 512 83.7 vs 87.3: GEMV to 128, where it leads by 1.25x.
//   K % 32 != 0 (rows start mid-byte or mid-block) takes the portable path, scalar decode and dot products: there
//   the vectorized dequantize + matmul wins at every M on AVX-512 and AVX2 (fourteenth session, through
//   matmul_4bit_lora with LoRA r 16, us, GEMV vs dequantize + matmul: 1000 x 1000 bf16 M 1 264 vs 109, M 16 797 vs 140;
//   4096 x 4100 bf16 M 1 4065 vs 2166, M 16 12927 vs 2527; float32 1000 x 1000 M 1 259 vs 130; the one loss, float32
//   M 1 at 4096 x 4100 / 11008 x 4100, 4.1 vs 4.6 / 10.8 vs 12.4 ms): 0 rows.  The scalar ISA (its dequantize scalar
//   too) keeps 16: measured there, the GEMV wins at M 1 and loses from M 4 (bf16) / ~10 (float32).
int gemv_max_m(DType dtype, int64_t K) {
  constexpr int kDefault = 16;
#ifdef QK_X86
  const Isa isa = active_isa();
  if (K % 32 != 0) return isa == Isa::avx2 || isa == Isa::avx512 ? 0 : kDefault;
  if (isa == Isa::avx2) return 128;
  if (isa != Isa::avx512) return kDefault;
  if (dtype == DType::bfloat16 && bf16_dot_enabled()) return K % 128 == 0 ? 96 : 64;
  return 2048;
#else
  (void)dtype;
  (void)K;
  return kDefault;
#endif
}

}  // namespace gemv_detail
}  // namespace cpu
}  // namespace qkernels
