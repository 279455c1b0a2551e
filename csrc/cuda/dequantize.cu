// Minimal CUDA dequantization kernel (one thread per packed byte).  It is deliberately simple: its main job is to
// prove that every submission compiles with nvcc; the optimized kernels come later.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dequantize.h"

namespace qkernels {
namespace cuda {
namespace {

__device__ __forceinline__ void store(float* out, int64_t i, float v) { out[i] = v; }
__device__ __forceinline__ void store(__half* out, int64_t i, float v) { out[i] = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* out, int64_t i, float v) { out[i] = __float2bfloat16_rn(v); }

template <typename T>
__global__ void dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                       const float* __restrict__ code, int64_t n, int64_t blocksize,
                                       T* __restrict__ out) {
  const int64_t byte_idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i0 = 2 * byte_idx;
  if (i0 >= n) return;
  const uint8_t byte = packed[byte_idx];
  const float scale = absmax[i0 / blocksize];  // blocksize is even: elements 2j and 2j+1 share a block
  store(out, i0, __fmul_rn(code[byte >> 4], scale));  // __fmul_rn: never contracted into an FMA
  if (i0 + 1 < n) store(out, i0 + 1, __fmul_rn(code[byte & 0x0f], scale));
}

template <typename T>
cudaError_t launch(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                   void* out, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t nbytes = (n + 1) / 2;
  const int64_t nblocks = (nbytes + kThreads - 1) / kThreads;
  dequantize_4bit_kernel<T><<<static_cast<unsigned int>(nblocks), kThreads, 0, stream>>>(
      packed, absmax, code, n, blocksize, static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

int device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the (non-sticky) error so later runtime calls start clean
    return 0;
  }
  return count;
}

std::string dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                            int64_t blocksize, void* out, DType out_dtype, std::uintptr_t stream_handle) {
  const int64_t nbytes = (n + 1) / 2;
  if ((nbytes + 255) / 256 > 0x7fffffffLL) return "n is too large for a single launch";
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cudaError_t err = cudaSuccess;
  switch (out_dtype) {
    case DType::float32: err = launch<float>(packed, absmax, code, n, blocksize, out, stream); break;
    case DType::float16: err = launch<__half>(packed, absmax, code, n, blocksize, out, stream); break;
    case DType::bfloat16: err = launch<__nv_bfloat16>(packed, absmax, code, n, blocksize, out, stream); break;
  }
  if (err != cudaSuccess) return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  return std::string();
}

}  // namespace cuda
}  // namespace qkernels
