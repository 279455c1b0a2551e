// Host emulation of cuda_bf16.h (see cuda_runtime.h here): __nv_bfloat16 as raw bits, RNE conversion from common.h.
#pragma once
#include "cuda_runtime.h"
#include "common.h"

struct __nv_bfloat16 {
  unsigned short bits;
};
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{qkernels::float_to_bf16_bits(f)}; }
