// CUDA fused 4-bit GEMV + LoRA for small M (decode): y = x @ dequant(W)^T + t @ B^T + bias, float32 accumulation.
//
// Why this shape: at M <= 16 the op is bound by reading the packed weight once (N*K/2 bytes + scales), so every
// packed byte is loaded exactly once with 128-bit loads and decoded in registers; x (M*K elements, tiny) is read
// through the read-only cache, and each loaded x value is reused for ROWS output rows held by the same lane.
//
// Two kernels, picked on the host:
// - fast    (K % 32 == 0, packed and x 16-byte aligned): one warp owns ROWS consecutive rows; lane l handles the
//           32-element chunks c = l, l+32, ... of each row.  A chunk is one uint4 of packed bytes (row n's packed
//           bytes start at n*K/2, a multiple of 16) and lies inside one quantization block (blocksize is a power of
//           two >= 32 and the chunk starts at a multiple of 32 of the flat index; blocks may still straddle rows),
//           so it needs one scale, applied to the chunk's partial sums.  Codes are looked up in a 16-float shared
//           table (16 distinct words in 16 banks: conflict-free).  The warp reduces its per-lane sums with
//           shuffles; lane m writes y[m, n].
// - general (anything else: blocks straddling rows, odd K, unaligned storage): one warp per row, lane l handles
//           k = l, l+32, ...; each element decodes its own byte, nibble and block from the flat index n*K + k.
// Both tile M by MT (grid.y = ceil(M / MT)), so any M is correct; M <= 16 is one pass over the weight.
//
// Numerics: float32 throughout, one rounding to the output dtype.  The general kernel multiplies the reference's
// float32 weight __fmul_rn(code[nibble], scale); the fast kernel sums x * code per 32-element chunk and multiplies by
// the scale once.  Both accumulate with FMAs: not bit-exact vs any other path (tests use a float64 oracle).
#include "device_utils.cuh"
#include "gemv.h"

namespace qkernels {
namespace cuda {
namespace {

constexpr int kWarps = 4;  // warps per CTA
constexpr int kThreads = 32 * kWarps;

template <typename T>
struct GemvArgs {
  const T* x;
  int64_t M, K, N;
  const uint8_t* packed;
  ScaleArgs scales;
  const float* code;  // float32[16]
  int bs_shift;       // log2(blocksize)
  const float* lora_t;
  const float* lora_B;
  int64_t r;
  const float* bias;  // nullptr: no bias
  T* out;
};

// 8 consecutive x elements from a 16-byte aligned address, as float32 (exact conversions).
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
template <bool kBf16>
__device__ __forceinline__ void load8_16(const void* p, float (&v)[8]) {
  const uint4 w = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // little-endian: element 2k in the low half of word k
    v[2 * k] = kBf16 ? bf16_bits_to_float(u[k] & 0xffffu) : half_bits_to_float(u[k] & 0xffffu);
    v[2 * k + 1] = kBf16 ? bf16_bits_to_float(u[k] >> 16) : half_bits_to_float(u[k] >> 16);
  }
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) { load8_16<false>(p, v); }
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) { load8_16<true>(p, v); }

__device__ __forceinline__ float load1(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load1(const __half* p) {
  return half_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ float load1(const __nv_bfloat16* p) {
  return bf16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

// s_code[off / 4] for a byte offset `off` (a multiple of 4 below 64): one shared load at register + immediate.
__device__ __forceinline__ float code_at(const float* s_code, uint32_t off) {
  return *reinterpret_cast<const float*>(reinterpret_cast<const unsigned char*>(s_code) + off);
}

// Warp-reduce the MT partial sums of row n (all 32 lanes must call this); lane m adds the LoRA term and the bias to
// y[m0 + m, n] and writes it, rounded once to T.
template <typename T, int MT>
__device__ __forceinline__ void finish_row(const GemvArgs<T>& a, const float (&acc)[MT], int64_t n, int64_t m0, int mv,
                                           int lane) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == m && m < mv) {
      const int64_t mg = m0 + m;
      float lora = 0.0f;
      const float* t = a.lora_t + mg * a.r;
      const float* B = a.lora_B + n * a.r;
      for (int64_t j = 0; j < a.r; ++j) lora = fmaf(__ldg(t + j), __ldg(B + j), lora);
      float y = v + lora;
      if (a.bias != nullptr) y += __ldg(a.bias + n);
      a.out[mg * a.N + n] = to_out(y, static_cast<T*>(nullptr));
    }
  }
}

template <typename T, int MT, int ROWS>
__global__ void __launch_bounds__(kThreads) gemv_fast_kernel(const GemvArgs<T> a) {
  __shared__ float s_code[16];
  __shared__ float s_ncode[256];
  load_codebooks(a.code, a.scales, s_code, s_ncode);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * ROWS;
  if (row0 >= a.N) return;  // warp-uniform; no barrier below
  const int nrows = a.N - row0 < ROWS ? static_cast<int>(a.N - row0) : ROWS;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int mv = a.M - m0 < MT ? static_cast<int>(a.M - m0) : MT;
  const int64_t cpr = a.K >> 5;  // 32-element chunks (uint4 of packed bytes) per row
  const uint4* wq = reinterpret_cast<const uint4*>(a.packed);
  const T* xm = a.x + m0 * a.K;

  float acc[ROWS][MT];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;

  // Per-row base pointer / flat index, hoisted out of the loop.  Rows past N (only in the last warp) alias row0:
  // they load valid memory, are computed branch-free and are never written.
  const uint4* wrow[ROWS];
  int64_t fbase[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t row = row0 + (r < nrows ? r : 0);
    wrow[r] = wq + row * cpr;
    fbase[r] = row * a.K;
  }

  for (int64_t c = lane; c < cpr; c += 32) {
    uint4 q[ROWS];
    float sc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      q[r] = __ldg(wrow[r] + c);
      sc[r] = scale_of(a.scales, (fbase[r] + (c << 5)) >> a.bs_shift, s_ncode);
    }
    // Partial sums of x * code over this chunk; its one scale is applied once per chunk, not once per weight (the
    // result differs from x * float32(code * scale) only by float32 rounding: ~1 multiply fewer per weight).
    float part[ROWS][MT];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) part[r][m] = 0.0f;
#pragma unroll
    for (int sub = 0; sub < 4; ++sub) {  // 8 elements (one 32-bit word of each row's uint4) at a time
      float w[ROWS][8];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const uint32_t word = sub == 0 ? q[r].x : sub == 1 ? q[r].y : sub == 2 ? q[r].z : q[r].w;
        // Byte j of hi4 / lo4 = 4 * (high / low nibble of packed byte 4*sub + j) = its byte offset into s_code;
        // the masks drop the bits shifted in from the neighbouring byte.
        const uint32_t hi4 = (word >> 2) & 0x3c3c3c3cu;
        const uint32_t lo4 = (word << 2) & 0x3c3c3c3cu;
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // element 2j = high nibble, 2j + 1 = low nibble
          w[r][2 * j] = code_at(s_code, __byte_perm(hi4, 0u, 0x4440u | j));
          w[r][2 * j + 1] = code_at(s_code, __byte_perm(lo4, 0u, 0x4440u | j));
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < mv) {
          float xv[8];
          load8(xm + m * a.K + (c << 5) + 8 * sub, xv);  // one x load reused for ROWS rows
#pragma unroll
          for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int e = 0; e < 8; ++e) part[r][m] = fmaf(xv[e], w[r][e], part[r][m]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(part[r][m], sc[r], acc[r][m]);
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
    if (r < nrows) finish_row<T, MT>(a, acc[r], row0 + r, m0, mv, lane);  // nrows is warp-uniform
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) gemv_general_kernel(const GemvArgs<T> a) {
  __shared__ float s_code[16];
  __shared__ float s_ncode[256];
  load_codebooks(a.code, a.scales, s_code, s_ncode);

  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= a.N) return;  // warp-uniform; no barrier below
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int mv = a.M - m0 < MT ? static_cast<int>(a.M - m0) : MT;
  const T* xm = a.x + m0 * a.K;

  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
  const int64_t base = n * a.K;
  for (int64_t k = lane; k < a.K; k += 32) {
    const int64_t f = base + k;  // flat index of W[n, k]
    const uint32_t byte = __ldg(a.packed + (f >> 1));
    const uint32_t nib = (f & 1) ? (byte & 0x0fu) : (byte >> 4);
    const float w = __fmul_rn(s_code[nib], scale_of(a.scales, f >> a.bs_shift, s_ncode));
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < mv) acc[m] = fmaf(load1(xm + m * a.K + k), w, acc[m]);
  }
  finish_row<T, MT>(a, acc, n, m0, mv, lane);
}

// Rows per warp of the fast kernel: each x value loaded (and converted) is reused ROWS times.  acc + part hold
// 2 * ROWS * MT floats, so MT = 16 uses 2 rows (~100 registers) and the rest 4.
constexpr int rows_for(int mt) { return mt <= 8 ? 4 : 2; }

template <typename T, int MT>
cudaError_t launch_mt(const GemvArgs<T>& a, bool fast, cudaStream_t stream) {
  const unsigned gy = static_cast<unsigned>((a.M + MT - 1) / MT);
  if (fast) {
    constexpr int kRows = rows_for(MT);
    const int64_t per_cta = static_cast<int64_t>(kWarps) * kRows;
    const unsigned gx = static_cast<unsigned>((a.N + per_cta - 1) / per_cta);
    gemv_fast_kernel<T, MT, kRows><<<dim3(gx, gy), kThreads, 0, stream>>>(a);
  } else {
    const unsigned gx = static_cast<unsigned>((a.N + kWarps - 1) / kWarps);
    gemv_general_kernel<T, MT><<<dim3(gx, gy), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const GemvArgs<T>& a, bool fast, cudaStream_t stream) {
  if (a.M <= 1) return launch_mt<T, 1>(a, fast, stream);
  if (a.M <= 2) return launch_mt<T, 2>(a, fast, stream);
  if (a.M <= 4) return launch_mt<T, 4>(a, fast, stream);
  if (a.M <= 8) return launch_mt<T, 8>(a, fast, stream);
  return launch_mt<T, 16>(a, fast, stream);
}

template <typename T>
GemvArgs<T> make_args(const void* x, int64_t M, int64_t K, const uint8_t* packed, const ScaleArgs& s,
                      const float* code, int bs_shift, int64_t N, const float* lora_t, const float* lora_B, int64_t r,
                      const float* bias, void* out) {
  GemvArgs<T> a;
  a.x = static_cast<const T*>(x);
  a.M = M;
  a.K = K;
  a.N = N;
  a.packed = packed;
  a.scales = s;
  a.code = code;
  a.bs_shift = bs_shift;
  a.lora_t = lora_t;
  a.lora_B = lora_B;
  a.r = r;
  a.bias = bias;
  a.out = static_cast<T*>(out);
  return a;
}

}  // namespace

std::string gemv_4bit_lora(const void* x, DType x_dtype, int64_t M, int64_t K, const uint8_t* packed,
                           const float* absmax, const uint8_t* absmax_q, const float* nested_absmax,
                           const float* nested_code, float offset, int64_t nested_blocksize, const float* code,
                           int64_t blocksize, int64_t N, const float* lora_t, const float* lora_B, int64_t r,
                           const float* bias, void* out, std::uintptr_t stream_handle) {
  if (M <= 0 || N <= 0 || K <= 0) return "M, N and K must be positive";
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0)
    return "blocksize must be a power of two in [32, 4096]";
  if (absmax == nullptr && (nested_blocksize <= 0 || (nested_blocksize & (nested_blocksize - 1)) != 0))
    return "nested_blocksize must be a positive power of two";
  if (r < 0 || (r > 0 && (lora_t == nullptr || lora_B == nullptr))) return "r > 0 needs lora_t and lora_B";
  if ((M + 15) / 16 > 65535) return "M is too large for one launch (grid.y > 65535)";
  if ((N + kWarps - 1) / kWarps > 0x7fffffffLL) return "N is too large for one launch";

  ScaleArgs s;
  s.absmax = absmax;
  s.absmax_q = absmax_q;
  s.nested_absmax = nested_absmax;
  s.nested_code = nested_code;
  s.offset = offset;
  s.nested_shift = absmax == nullptr ? log2_pow2(nested_blocksize) : 0;
  const int bs_shift = log2_pow2(blocksize);
  if (r == 0) lora_t = lora_B = nullptr;
  // A 32-element chunk starting at a multiple of 32 of the flat index never straddles a block (blocksize is a power
  // of two >= 32), so the fast kernel only needs K % 32 == 0 (each row's packed bytes start 16-byte aligned).
  const bool fast = K % 32 == 0 && (reinterpret_cast<std::uintptr_t>(packed) & 15u) == 0 &&
                    (reinterpret_cast<std::uintptr_t>(x) & 15u) == 0;

  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cudaError_t err = cudaSuccess;
  switch (x_dtype) {
    case DType::float32:
      err = launch(make_args<float>(x, M, K, packed, s, code, bs_shift, N, lora_t, lora_B, r, bias, out), fast, stream);
      break;
    case DType::float16:
      err = launch(make_args<__half>(x, M, K, packed, s, code, bs_shift, N, lora_t, lora_B, r, bias, out), fast,
                   stream);
      break;
    case DType::bfloat16:
      err = launch(make_args<__nv_bfloat16>(x, M, K, packed, s, code, bs_shift, N, lora_t, lora_B, r, bias, out), fast,
                   stream);
      break;
  }
  if (err != cudaSuccess) return cuda_error_string(err);
  return std::string();
}

}  // namespace cuda
}  // namespace qkernels
