// CUDA 4-bit quantization (absmax + nearest codebook entry by float32 midpoints), bit-identical to the CPU kernel
// (csrc/cpu/quantize.cpp) and to qkernels.reference.quantize_4bit.
//
// Layout: every thread owns kEpt = 8 consecutive elements (4 packed bytes).  blocksize is a power of two >= 32, so a
// thread's elements never straddle two quantization blocks, and a quantization block is owned by tpq = blocksize / 8
// consecutive threads (a power of two, 4..512).  A thread block has max(256, tpq) threads, i.e. it covers a whole
// number of quantization blocks (2048 elements, or one 4096-element block).
//
// Exactness (same rules as the CPU kernel):
// - absmax = integer max over the sign-cleared bit patterns of the float32 inputs.  For non-NaN values that order is
//   the numeric order of |x|, so the result is exactly max |x|; a NaN (bits above inf) propagates into absmax, which
//   the Python layer rejects.  Elements past n count as 0 (bits 0), which never raises a maximum.
// - inv = 1.0f / max(absmax, 1e-38f) with IEEE round-to-nearest division (__fdiv_rn); v = x * inv (__fmul_rn: never
//   contracted into an FMA), clamped to [-1, 1] (NaN stays NaN, like the CPU scalar path).
// - code index j = #(midpoints < v), counted linearly over the 15 midpoints of the stably sorted codebook; code =
//   order[j].  Sorting + midpoints are computed per thread block in shared memory by thread 0 (16 entries).
// - Inputs are converted exactly (fp16 / bf16 -> float32 is exact); no flush-to-zero (nvcc's default -ftz=false).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "quantize.h"

namespace qkernels {
namespace cuda {
namespace {

constexpr int kEpt = 8;  // elements per thread (must divide 32, the smallest blocksize, and be even)
constexpr float kAbsmaxFloor = 1e-38f;

template <typename T>
struct Loader;

template <>
struct Loader<float> {
  __device__ __forceinline__ static void load(const float* __restrict__ A, int64_t i0, int64_t n, bool vec,
                                              float (&x)[kEpt]) {
    if (vec && i0 + kEpt <= n) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(A + i0));
      const float4 b = __ldg(reinterpret_cast<const float4*>(A + i0) + 1);
      x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
      x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    } else {
#pragma unroll
      for (int k = 0; k < kEpt; ++k) x[k] = (i0 + k < n) ? __ldg(A + i0 + k) : 0.0f;
    }
  }
};

// 16-bit inputs are read as raw bits and converted exactly.
__device__ __forceinline__ float bits_to_float(uint16_t h, __half*) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float bits_to_float(uint16_t h, __nv_bfloat16*) {
  return __uint_as_float(static_cast<uint32_t>(h) << 16);
}

template <typename T16>
struct Loader16 {
  __device__ __forceinline__ static void load(const uint16_t* __restrict__ A, int64_t i0, int64_t n, bool vec,
                                              float (&x)[kEpt]) {
    if (vec && i0 + kEpt <= n) {
      const uint4 w = __ldg(reinterpret_cast<const uint4*>(A + i0));
      const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {  // little-endian: element 2k in the low half
        x[2 * k] = bits_to_float(static_cast<uint16_t>(u[k] & 0xffffu), static_cast<T16*>(nullptr));
        x[2 * k + 1] = bits_to_float(static_cast<uint16_t>(u[k] >> 16), static_cast<T16*>(nullptr));
      }
    } else {
#pragma unroll
      for (int k = 0; k < kEpt; ++k)
        x[k] = (i0 + k < n) ? bits_to_float(__ldg(A + i0 + k), static_cast<T16*>(nullptr)) : 0.0f;
    }
  }
};

template <>
struct Loader<__half> : Loader16<__half> {};
template <>
struct Loader<__nv_bfloat16> : Loader16<__nv_bfloat16> {};

template <typename T>
struct Storage { using type = T; };
template <>
struct Storage<__half> { using type = uint16_t; };
template <>
struct Storage<__nv_bfloat16> { using type = uint16_t; };

// Stable "less" of the CPU kernel's make_codebook: by value, NaN last.
__device__ __forceinline__ bool code_less(float x, float y) { return x < y || (!isnan(x) && isnan(y)); }

template <typename T>
__global__ void quantize_4bit_kernel(const typename Storage<T>::type* __restrict__ A, int64_t n, int tpq,
                                     const float* __restrict__ code, uint8_t* __restrict__ packed,
                                     float* __restrict__ absmax, int64_t nblocks, bool vec_load) {
  __shared__ float s_bounds[16];
  __shared__ int s_order[16];
  __shared__ uint32_t s_warp_max[32];

  // ---- codebook: stable insertion sort of 16 entries + float32 midpoints (thread 0) ----
  if (threadIdx.x == 0) {
    float val[16];
    int idx[16];
    for (int i = 0; i < 16; ++i) {
      const float c = code[i];
      int j = i;
      while (j > 0 && code_less(c, val[j - 1])) {  // strict: equal keys keep their original order (stable)
        val[j] = val[j - 1];
        idx[j] = idx[j - 1];
        --j;
      }
      val[j] = c;
      idx[j] = i;
    }
    for (int i = 0; i < 15; ++i) s_bounds[i] = __fdiv_rn(__fadd_rn(val[i], val[i + 1]), 2.0f);
    s_bounds[15] = __int_as_float(0x7f800000);  // +inf, never used by the count
    for (int i = 0; i < 16; ++i) s_order[i] = idx[i];
  }

  // ---- load 8 elements, |x| bit max ----
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kEpt;
  float x[kEpt];
  Loader<T>::load(A, i0, n, vec_load, x);  // elements >= n read as 0.0f (never loaded)
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < kEpt; ++k) m = max(m, __float_as_uint(x[k]) & 0x7fffffffu);

  // ---- reduce over the tpq threads of this quantization block ----
  const int lanes = tpq < 32 ? tpq : 32;  // tpq is a power of two: xor partners stay inside the aligned group
  for (int off = lanes >> 1; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (tpq > 32) {  // uniform across the thread block (tpq is a kernel argument)
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) s_warp_max[warp] = m;
    __syncthreads();
    const int wpq = tpq >> 5;
    const int first = (warp / wpq) * wpq;
    m = 0;
    for (int w = first; w < first + wpq; ++w) m = max(m, s_warp_max[w]);
  }
  __syncthreads();  // s_bounds / s_order ready (and every thread passed the reduction)

  const float amax = __uint_as_float(m);
  const int64_t qb = i0 / (static_cast<int64_t>(tpq) * kEpt);  // this thread's quantization block
  if (i0 >= n) return;                                         // no more barriers below
  if ((threadIdx.x & (tpq - 1)) == 0 && qb < nblocks) absmax[qb] = amax;

  const float inv = __fdiv_rn(1.0f, amax < kAbsmaxFloor ? kAbsmaxFloor : amax);  // std::max(amax, floor) semantics
  float bounds[15];
#pragma unroll
  for (int k = 0; k < 15; ++k) bounds[k] = s_bounds[k];

  uint32_t word = 0;  // byte b (little-endian) = packed byte (i0 / 2 + b)
#pragma unroll
  for (int k = 0; k < kEpt; k += 2) {
    int q[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v = __fmul_rn(x[k + h], inv);  // padded elements: 0 * inv = 0 -> the code of 0.0 (odd-n pad nibble)
      v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
      int j = 0;
#pragma unroll
      for (int b = 0; b < 15; ++b) j += bounds[b] < v ? 1 : 0;
      q[h] = s_order[j];
    }
    word |= static_cast<uint32_t>((q[0] << 4) | q[1]) << (4 * k);  // byte k/2 at bit offset 8 * (k/2)
  }

  const int64_t byte0 = i0 / 2;
  const int64_t nbytes_total = (n + 1) / 2;
  const int64_t nb = nbytes_total - byte0 < kEpt / 2 ? nbytes_total - byte0 : kEpt / 2;  // >= 1 since i0 < n
  if (nb == kEpt / 2 && (reinterpret_cast<uintptr_t>(packed + byte0) & 3u) == 0) {
    *reinterpret_cast<uint32_t*>(packed + byte0) = word;
  } else {
    for (int b = 0; b < nb; ++b) packed[byte0 + b] = static_cast<uint8_t>(word >> (8 * b));
  }
}

template <typename T>
cudaError_t launch(const void* A, int64_t n, int64_t blocksize, const float* code, uint8_t* packed, float* absmax,
                   cudaStream_t stream) {
  const int tpq = static_cast<int>(blocksize / kEpt);
  const int threads = tpq > 256 ? tpq : 256;  // a multiple of tpq (both powers of two)
  const int64_t per_cta = static_cast<int64_t>(threads) * kEpt;
  const int64_t grid = (n + per_cta - 1) / per_cta;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const bool vec = (reinterpret_cast<uintptr_t>(A) & 15u) == 0;
  using S = typename Storage<T>::type;
  quantize_4bit_kernel<T><<<static_cast<unsigned int>(grid), threads, 0, stream>>>(
      static_cast<const S*>(A), n, tpq, code, packed, absmax, nblocks, vec);
  return cudaGetLastError();
}

}  // namespace

std::string quantize_4bit(const void* A, DType in_dtype, int64_t n, int64_t blocksize, const float* code,
                          uint8_t* packed, float* absmax, std::uintptr_t stream_handle) {
  if (n <= 0) return std::string();
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0) return "blocksize must be a power of two in [32, 4096]";
  const int64_t per_cta = (blocksize > 2048 ? blocksize : 2048);
  if ((n + per_cta - 1) / per_cta > 0x7fffffffLL) return "n is too large for a single launch";
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cudaError_t err = cudaSuccess;
  switch (in_dtype) {
    case DType::float32: err = launch<float>(A, n, blocksize, code, packed, absmax, stream); break;
    case DType::float16: err = launch<__half>(A, n, blocksize, code, packed, absmax, stream); break;
    case DType::bfloat16: err = launch<__nv_bfloat16>(A, n, blocksize, code, packed, absmax, stream); break;
  }
  if (err != cudaSuccess) return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  return std::string();
}

}  // namespace cuda
}  // namespace qkernels
