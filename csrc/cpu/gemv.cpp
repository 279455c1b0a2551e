// CPU fused 4-bit GEMV + LoRA + bias (contract in gemv.h).
//
// Why it is shaped this way: at small M the work is streaming the packed weight (8.4 MB for a 4096x4096 NF4 weight
// with double-quantized scales, against 33.6 MB for the same weight in bf16) and decoding it.  Each 16-byte chunk of a
// row (32 codes) is looked up in a 16-entry table that already holds code * scale for the chunk's block (one multiply
// per table entry per block instead of one per weight), and the decoded vector is multiplied with up to 8 rows of x:
// for M <= 8 straight from registers (tiles of up to 4 output rows x M), for bf16 with M > 8 from a small decoded
// buffer in L1 that every M tile reads, so a weight is decoded once whatever M is.  When K % 32 == 0 a chunk never
// straddles a block (blocks are multiples of 32 and a row starts at a multiple of 32 elements), so the table only
// changes at block boundaries, even when blocks straddle rows.
#include "gemv.h"

#include <algorithm>
#include <vector>

#include "gemv_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace qkernels {
namespace cpu {
namespace gemv_detail {
namespace {

// ------------------------------------------------------------------------------------------------ portable path
// Row n of W decoded to float32, for any K (a row may start in a low nibble and cross block boundaries anywhere).
void decode_row(const Problem& p, int64_t n, float* w) {
  const int64_t first = n * p.K;
  int64_t k = 0;
  while (k < p.K) {
    const int64_t e0 = first + k;
    const int64_t b = e0 >> p.bs_shift;
    const int64_t end = std::min(p.K, ((b + 1) << p.bs_shift) - first);
    const float s = p.scale(b);
    float lut[16];
    for (int i = 0; i < 16; ++i) lut[i] = p.code[i] * s;  // one float32 multiply, as dequantize_4bit
    for (; k < end; ++k) {
      const int64_t e = first + k;
      const uint8_t byte = p.packed[e >> 1];
      w[k] = lut[(e & 1) ? (byte & 0x0f) : (byte >> 4)];
    }
  }
}

// Eight interleaved partial sums, restarted every 256 elements and added into eight running totals, combined
// pairwise at the end: an error growth like a blocked SIMD GEMM's.  (Plain 8-lane sums over K = 4096 reached 0.8 of
// the 2x-of-torch tolerance of tests/test_gemv_cpu.py at M = 16, where torch's float32 GEMM is the more accurate.)
float dot8(const float* a, const float* b, int64_t K) {
  float tot[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  while (k < K) {
    const int64_t end = std::min(K, k + 256);
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (; k + 8 <= end; k += 8)
      for (int i = 0; i < 8; ++i) s[i] += a[k + i] * b[k + i];
    for (int i = 0; k < end; ++k, ++i) s[i] += a[k] * b[k];
    for (int i = 0; i < 8; ++i) tot[i] += s[i];
  }
  return ((tot[0] + tot[4]) + (tot[2] + tot[6])) + ((tot[1] + tot[5]) + (tot[3] + tot[7]));
}

void gemv_portable(const Problem& p, const float* xf) {
  const bool par = p.N * p.K >= kParallelMinWeights && p.N > 1;
  (void)par;
#ifdef _OPENMP
#pragma omp parallel if (par)
#endif
  {
    std::vector<float> w(static_cast<size_t>(p.K));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t n = 0; n < p.N; ++n) {
      decode_row(p, n, w.data());
      for (int64_t m = 0; m < p.M; ++m) store_y(p, m, n, epilogue_scalar(p, m, n, dot8(xf + m * p.K, w.data(), p.K)));
    }
  }
}

}  // namespace
}  // namespace gemv_detail


void gemv_4bit_lora(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed, const float* absmax,
                    const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code, float offset,
                    int64_t nested_blocksize, const float* code, int64_t blocksize, int64_t N, const float* lora_t,
                    const float* lora_B, int64_t r, const float* bias, void* out) {
  using namespace gemv_detail;
  const ScaleOf scale{absmax, NestedScale{absmax_q, nested_absmax, nested_code, offset,
                                          absmax != nullptr ? 0 : log2_pow2(nested_blocksize)}};
  const Problem p{dtype, M, K, N, log2_pow2(blocksize), packed, scale, code,
                  r > 0 ? lora_t : nullptr, r > 0 ? lora_B : nullptr, r > 0 ? r : 0, bias, out};
  if (gemv_detail::gemv_simd(p, x)) return;
  if (dtype == DType::float32) {
    gemv_portable(p, static_cast<const float*>(x));
  } else {
    const std::vector<float> xf = x_to_f32(x, dtype, M, K);
    gemv_portable(p, xf.data());
  }
}

bool gemm_dx_4bit(const void* g, DType dtype, int64_t M, int64_t N, const uint8_t* packed, const float* absmax,
                  const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code, float offset,
                  int64_t nested_blocksize, const float* code, int64_t blocksize, int64_t K, float* out) {
  using namespace gemv_detail;
  const ScaleOf scale{absmax, NestedScale{absmax_q, nested_absmax, nested_code, offset,
                                          absmax != nullptr ? 0 : log2_pow2(nested_blocksize)}};
  const Problem p{dtype, M, K, N, log2_pow2(blocksize), packed, scale, code, nullptr, nullptr, 0, nullptr, nullptr};
  return gemv_detail::gemm_dx_simd(p, g, out);
}

int gemv_max_m(DType dtype, int64_t K) { return gemv_detail::gemv_max_m(dtype, K); }

}  // namespace cpu
}  // namespace qkernels
