// Device helpers shared by the CUDA kernels (included by .cu files only; needs nvcc).
//
// Exactness: every product / sum that must match the reference bit for bit is written with __fmul_rn / __fadd_rn, which
// nvcc never contracts into an FMA; conversions to 16-bit outputs use the round-to-nearest-even intrinsics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace qkernels {
namespace cuda {

// float32 -> output element (one RNE rounding for 16-bit types).
__device__ __forceinline__ float to_out(float v, float*) { return v; }
__device__ __forceinline__ __half to_out(float v, __half*) { return __float2half_rn(v); }
__device__ __forceinline__ __nv_bfloat16 to_out(float v, __nv_bfloat16*) { return __float2bfloat16_rn(v); }

// Raw 16 bits of a 16-bit output value (for packing two into a 32-bit store).
__device__ __forceinline__ uint32_t bits16(__half h) { return static_cast<uint32_t>(__half_as_ushort(h)); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 h) { return static_cast<uint32_t>(__bfloat16_as_ushort(h)); }

// Exact 16-bit -> float32 from raw bits.
__device__ __forceinline__ float half_bits_to_float(uint32_t h) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}
__device__ __forceinline__ float bf16_bits_to_float(uint32_t h) { return __uint_as_float(h << 16); }

// log2 of a power of two (host side).
inline int log2_pow2(int64_t v) {
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

inline std::string cuda_error_string(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

// Per-block scale: plain float32 absmax, or a double-quantized one decoded inline exactly like
// reference.decode_nested_absmax: float32(nested_code[q] * nested_absmax[b >> nested_shift]) + offset, two roundings.
struct ScaleArgs {
  const float* absmax;         // non-null: plain scales
  const uint8_t* absmax_q;     // nested: uint8 code per block
  const float* nested_absmax;  // nested: float32 per nested block
  const float* nested_code;    // nested: float32[256] (global; kernels copy it to shared memory)
  float offset;
  int nested_shift;  // log2(nested_blocksize)
};

// s_ncode: the 256-entry nested map in shared memory (unused when plain).
__device__ __forceinline__ float scale_of(const ScaleArgs& s, int64_t b, const float* s_ncode) {
  if (s.absmax != nullptr) return __ldg(s.absmax + b);
  const float prod = __fmul_rn(s_ncode[__ldg(s.absmax_q + b)], __ldg(s.nested_absmax + (b >> s.nested_shift)));
  return __fadd_rn(prod, s.offset);
}

// Codebook (16) and, when nested, the 256-entry nested map into shared memory.  Every thread of the CTA must call it
// (it ends with a barrier), before any early return.
__device__ __forceinline__ void load_codebooks(const float* code, const ScaleArgs& s, float* s_code, float* s_ncode) {
  for (int i = threadIdx.x; i < 16; i += blockDim.x) s_code[i] = code[i];
  if (s.absmax == nullptr)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_ncode[i] = s.nested_code[i];
  __syncthreads();
}

}  // namespace cuda
}  // namespace qkernels
