// Host emulation of cuda_fp16.h (see cuda_runtime.h here): __half as raw bits, RNE conversions from common.h.
#pragma once
#include "cuda_runtime.h"
#include "common.h"

struct __half {
  unsigned short bits;
};
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { return qkernels::half_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{qkernels::float_to_half_bits(f)}; }
