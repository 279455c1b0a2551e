// CUDA 4-bit dequantization, bit-identical to qkernels.reference.dequantize_4bit (and, with nested scales, to
// reference.decode_nested_absmax + reference.dequantize_4bit, and to the CPU kernels).
//
// Layout: thread t owns the 32 elements [32t, 32t + 32) = packed bytes [16t, 16t + 16).  blocksize is a power of two
// >= 32, so those 32 elements lie in ONE quantization block (32t is a multiple of 32): one scale per thread, decoded
// inline when nested (float32(nested_code[q] * nested_absmax[b >> shift]) + offset, two roundings).
// Vector path (packed and out 16-byte aligned, all 32 elements < n): one 128-bit load, 32 products, 128-bit stores
// (8 for float32, 4 for 16-bit outputs).  Otherwise (unaligned storage offsets, the tail): byte-by-byte, same math.
// Every value is __fmul_rn(code[nibble], scale) (never contracted into an FMA), rounded once (RNE) to the output type.
#include "dequantize.h"
#include "device_utils.cuh"

namespace qkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kEpt = 32;  // elements per thread

// Decode the 8 elements of one 32-bit word of packed bytes (byte j -> elements 2j (high nibble), 2j+1 (low)).
__device__ __forceinline__ void decode8(uint32_t word, const float* s_code, float scale, float (&v)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t byte = (word >> (8 * j)) & 0xffu;
    v[2 * j] = __fmul_rn(s_code[byte >> 4], scale);
    v[2 * j + 1] = __fmul_rn(s_code[byte & 0x0fu], scale);
  }
}

__device__ __forceinline__ void store32(float* out, const uint4& q, const float* s_code, float scale) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  float4* o = reinterpret_cast<float4*>(out);
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    float v[8];
    decode8(words[w], s_code, scale, v);
    o[2 * w] = make_float4(v[0], v[1], v[2], v[3]);
    o[2 * w + 1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

template <typename T16>
__device__ __forceinline__ void store32(T16* out, const uint4& q, const float* s_code, float scale) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  uint4* o = reinterpret_cast<uint4*>(out);
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    float v[8];
    decode8(words[w], s_code, scale, v);
    uint32_t u[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)  // little-endian: element 2k in the low half
      u[k] = bits16(to_out(v[2 * k], static_cast<T16*>(nullptr))) |
             (bits16(to_out(v[2 * k + 1], static_cast<T16*>(nullptr))) << 16);
    o[w] = make_uint4(u[0], u[1], u[2], u[3]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const ScaleArgs s, const float* __restrict__ code,
                           int64_t n, int bs_shift, T* __restrict__ out, bool vec) {
  __shared__ float s_code[16];
  __shared__ float s_ncode[256];
  load_codebooks(code, s, s_code, s_ncode);

  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t i0 = t * kEpt;
  if (i0 >= n) return;  // no barrier below
  const float scale = scale_of(s, i0 >> bs_shift, s_ncode);
  if (vec && i0 + kEpt <= n) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(packed) + t);
    store32(out + i0, q, s_code, scale);
  } else {
    const int64_t end = n - i0 < kEpt ? n : i0 + kEpt;
    for (int64_t i = i0; i < end; ++i) {
      const uint32_t byte = __ldg(packed + (i >> 1));
      const uint32_t nib = (i & 1) ? (byte & 0x0fu) : (byte >> 4);
      out[i] = to_out(__fmul_rn(s_code[nib], scale), static_cast<T*>(nullptr));
    }
  }
}

template <typename T>
cudaError_t launch(const uint8_t* packed, const ScaleArgs& s, const float* code, int64_t n, int bs_shift, void* out,
                   cudaStream_t stream) {
  const int64_t nthreads = (n + kEpt - 1) / kEpt;
  const int64_t grid = (nthreads + kThreads - 1) / kThreads;
  const bool vec = ((reinterpret_cast<std::uintptr_t>(packed) | reinterpret_cast<std::uintptr_t>(out)) & 15u) == 0;
  dequantize_4bit_kernel<T><<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(packed, s, code, n, bs_shift,
                                                                                      static_cast<T*>(out), vec);
  return cudaGetLastError();
}

std::string run(const uint8_t* packed, const ScaleArgs& s, const float* code, int64_t n, int64_t blocksize, void* out,
                DType out_dtype, std::uintptr_t stream_handle) {
  if (n <= 0) return std::string();
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0)
    return "blocksize must be a power of two in [32, 4096]";
  if ((n + int64_t(kEpt) * kThreads - 1) / (int64_t(kEpt) * kThreads) > 0x7fffffffLL)
    return "n is too large for a single launch";
  const int bs_shift = log2_pow2(blocksize);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cudaError_t err = cudaSuccess;
  switch (out_dtype) {
    case DType::float32: err = launch<float>(packed, s, code, n, bs_shift, out, stream); break;
    case DType::float16: err = launch<__half>(packed, s, code, n, bs_shift, out, stream); break;
    case DType::bfloat16: err = launch<__nv_bfloat16>(packed, s, code, n, bs_shift, out, stream); break;
  }
  if (err != cudaSuccess) return cuda_error_string(err);
  return std::string();
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
                            int64_t blocksize, void* out, DType out_dtype, std::uintptr_t stream) {
  ScaleArgs s{};
  s.absmax = absmax;
  return run(packed, s, code, n, blocksize, out, out_dtype, stream);
}

std::string dequantize_4bit_nested(const uint8_t* packed, const uint8_t* absmax_q, const float* nested_absmax,
                                   const float* nested_code, float offset, int64_t nested_blocksize,
                                   const float* code, int64_t n, int64_t blocksize, void* out, DType out_dtype,
                                   std::uintptr_t stream) {
  if (nested_blocksize <= 0 || (nested_blocksize & (nested_blocksize - 1)) != 0)
    return "nested_blocksize must be a positive power of two";
  ScaleArgs s{};
  s.absmax = nullptr;
  s.absmax_q = absmax_q;
  s.nested_absmax = nested_absmax;
  s.nested_code = nested_code;
  s.offset = offset;
  s.nested_shift = log2_pow2(nested_blocksize);
  return run(packed, s, code, n, blocksize, out, out_dtype, stream);
}

}  // namespace cuda
}  // namespace qkernels
