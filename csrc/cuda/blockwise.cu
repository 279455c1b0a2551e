// CUDA 8-bit blockwise quantize / dequantize against a 256-entry map (the nested-scale format), bit-identical to
// qkernels.reference.quantize_blockwise / dequantize_blockwise and to the CPU kernels (csrc/cpu/quantize.cpp).
//
// quantize: every CTA (256 threads) first builds the stably sorted map in shared memory -- thread i computes the rank
// of entry i (#entries less than it, plus #equivalent entries with a lower index: a stable sort, NaN last, like
// torch.argsort(stable=True) and the CPU's std::stable_sort), then the 255 float32 midpoints (a + b) / 2 -- and then
// loops over quantization blocks, one warp per block: |x| bit max (exactly max|x|; a NaN propagates), shuffle
// reduction, inv = 1.0f / max(absmax, 1e-38f), v = clamp(x * inv, -1, 1), and the CPU's 8-step branchless search
// over the midpoints (bounds[255] = +inf), so a map with ties or NaN gives the same index as the CPU path.
// The grid is capped so the per-CTA sort (256 compares per thread) is amortized over many blocks.
#include "blockwise.h"
#include "device_utils.cuh"

namespace qkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // == map entries: one thread per entry in the sort
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGrid = 2048;
constexpr float kAbsmaxFloor = 1e-38f;

// Stable "less" of the CPU kernel's make_codebook256: by value, NaN last.
__device__ __forceinline__ bool code_less(float x, float y) { return x < y || (!isnan(x) && isnan(y)); }

__global__ void __launch_bounds__(kThreads)
    quantize_blockwise_kernel(const float* __restrict__ A, int64_t n, int64_t blocksize, int64_t nblocks,
                              const float* __restrict__ code, uint8_t* __restrict__ out, float* __restrict__ absmax) {
  __shared__ float s_val[256];
  __shared__ float s_sorted[256];
  __shared__ float s_bounds[256];
  __shared__ int s_order[256];

  const int i = threadIdx.x;
  const float ci = code[i];
  s_val[i] = ci;
  __syncthreads();
  int rank = 0;
  for (int j = 0; j < 256; ++j) {
    const float cj = s_val[j];
    rank += (code_less(cj, ci) || (j < i && !code_less(ci, cj))) ? 1 : 0;
  }
  s_sorted[rank] = ci;  // ranks are a permutation of 0..255 (strict weak order + index tie-break)
  s_order[rank] = i;
  __syncthreads();
  s_bounds[i] = i < 255 ? __fdiv_rn(__fadd_rn(s_sorted[i], s_sorted[i + 1]), 2.0f) : __int_as_float(0x7f800000);
  __syncthreads();

  const int lane = i & 31;
  const int warp = i >> 5;
  for (int64_t qb = static_cast<int64_t>(blockIdx.x) * kWarps + warp; qb < nblocks;
       qb += static_cast<int64_t>(gridDim.x) * kWarps) {  // warp-uniform loop: the shuffles see all 32 lanes
    const int64_t begin = qb * blocksize;
    const int64_t end = n - begin < blocksize ? n : begin + blocksize;
    uint32_t m = 0;
    for (int64_t k = begin + lane; k < end; k += 32) m = max(m, __float_as_uint(__ldg(A + k)) & 0x7fffffffu);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
    const float am = __uint_as_float(m);
    if (lane == 0) absmax[qb] = am;
    const float inv = __fdiv_rn(1.0f, am < kAbsmaxFloor ? kAbsmaxFloor : am);  // std::max(am, floor): NaN stays
    for (int64_t k = begin + lane; k < end; k += 32) {
      float v = __fmul_rn(__ldg(A + k), inv);
      v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);  // NaN stays NaN (compares false below)
      int j = 0;
#pragma unroll
      for (int step = 128; step >= 1; step >>= 1) j += (s_bounds[j + step - 1] < v) ? step : 0;
      out[k] = static_cast<uint8_t>(s_order[j]);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    dequantize_blockwise_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                                const float* __restrict__ code, int64_t n, int bs_shift, float* __restrict__ out) {
  __shared__ float s_code[256];
  s_code[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  out[i] = __fmul_rn(s_code[__ldg(q + i)], __ldg(absmax + (i >> bs_shift)));
}

bool bad_blocksize(int64_t bs) { return bs < 1 || bs > 4096 || (bs & (bs - 1)) != 0; }

}  // namespace

std::string quantize_blockwise(const float* A, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                               float* absmax, std::uintptr_t stream) {
  if (n <= 0) return std::string();
  if (bad_blocksize(blocksize)) return "blocksize must be a power of two in [1, 4096]";
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  int64_t grid = (nblocks + kWarps - 1) / kWarps;
  if (grid > kMaxGrid) grid = kMaxGrid;
  quantize_blockwise_kernel<<<static_cast<unsigned int>(grid), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      A, n, blocksize, nblocks, code, out, absmax);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : cuda_error_string(err);
}

std::string dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                                 int64_t blocksize, float* out, std::uintptr_t stream) {
  if (n <= 0) return std::string();
  if (bad_blocksize(blocksize)) return "blocksize must be a power of two in [1, 4096]";
  const int64_t grid = (n + kThreads - 1) / kThreads;
  if (grid > 0x7fffffffLL) return "n is too large for a single launch";
  dequantize_blockwise_kernel<<<static_cast<unsigned int>(grid), kThreads, 0,
                                reinterpret_cast<cudaStream_t>(stream)>>>(q, absmax, code, n, log2_pow2(blocksize),
                                                                          out);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : cuda_error_string(err);
}

}  // namespace cuda
}  // namespace qkernels
