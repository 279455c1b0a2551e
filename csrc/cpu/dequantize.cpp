// Portable scalar CPU dequantization (a later change adds explicit SIMD paths).
//
// Per block we build a 16-entry table lut[k] = to_dtype(code[k] * absmax[b]) -- the same single float32 multiply and
// single rounding as the reference -- and then each packed byte expands to two table lookups.  This is exact and
// cheap: 16 multiplies+conversions per block instead of `blocksize`.
#include "dequantize.h"

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
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

template <typename Conv>
void dequantize_impl(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                     typename Conv::T* out) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  float cb[16];
  std::copy(code, code + 16, cb);
  // Below ~256K elements the thread start-up costs more than it saves.
  constexpr int64_t kParallelThreshold = int64_t(1) << 18;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelThreshold)
#endif
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    dequantize_block<Conv>(packed, absmax[b], cb, begin, end, out);
  }
  (void)kParallelThreshold;
}

}  // namespace

void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                     void* out, DType out_dtype) {
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

}  // namespace cpu
}  // namespace qkernels
