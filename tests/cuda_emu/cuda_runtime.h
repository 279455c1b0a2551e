// Host emulation of the CUDA subset used by csrc/cuda/*.cu, for tests/test_cuda_emulation.py (no GPU needed).
//
// The real kernel sources are compiled with g++ (after their `k<<<grid, block, smem, stream>>>(args)` launches are
// rewritten to `qk_emu::launcher(&k, grid, block, smem, stream)(args)`).  A launch runs the CTAs one after another;
// each CTA runs every one of its threads as a std::thread, so __syncthreads (a CTA barrier) and __shfl_xor_sync (a
// warp exchange) behave as on the GPU.  `__shared__` becomes `static`: one copy, fine because CTAs run one at a time.
// Checks that a GPU would turn into faults or silent garbage, recorded in qk_emu::errors():
//   - every __ldg and every 16-byte vector load / store must lie inside a buffer registered by the test
//     (qk_emu_register) and be aligned to its size;
//   - a warp shuffle must see all 32 lanes of its warp (full mask; no lane has exited).
// Arithmetic: __fmul_rn / __fadd_rn / __fdiv_rn are IEEE float32 ops (built with -ffp-contract=off), fmaf is a
// fused multiply-add, conversions to fp16 / bf16 round to nearest even -- as the GPU instructions do.
#pragma once

#include <atomic>
#include <barrier>
#include <pthread.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorNoDevice = 100 };
inline const char* cudaGetErrorName(cudaError_t e) {
  return e == cudaSuccess ? "cudaSuccess" : e == cudaErrorInvalidConfiguration ? "cudaErrorInvalidConfiguration"
                                                                                  : "cudaErrorNoDevice";
}
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
inline cudaError_t cudaGetDeviceCount(int* c) {
  *c = 0;
  return cudaErrorNoDevice;
}

namespace qk_emu {

struct Warp {
  std::barrier<> bar{32};
  std::atomic<int> live{32};
  uint64_t slots[32];
};

struct Ctx {
  dim3 tid, bid, bdim, gdim;
  std::barrier<>* block = nullptr;
  Warp* warp = nullptr;
};
inline thread_local Ctx ctx;

// Test-registered buffers [begin, end) and the error log.
struct State {
  std::mutex mu;
  std::vector<std::pair<uintptr_t, uintptr_t>> buffers;
  std::vector<std::string> errors;
  cudaError_t last = cudaSuccess;
};
inline State& state() {
  static State s;
  return s;
}
inline void error(const std::string& what) {
  std::lock_guard<std::mutex> g(state().mu);
  if (state().errors.size() < 20) state().errors.push_back(what);
}
inline void check_access(const void* p, size_t size, size_t align, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % align != 0) error(std::string(what) + ": misaligned " + std::to_string(size) + "-byte access");
  std::lock_guard<std::mutex> g(state().mu);
  for (const auto& b : state().buffers)
    if (a >= b.first && a + size <= b.second) return;
  if (state().errors.size() < 20)
    state().errors.push_back(std::string(what) + ": access outside every registered buffer");
}

template <class... P>
struct Launch {
  void (*fn)(P...);
  dim3 grid, block;
  template <class... A>
  void operator()(A&&... a) const {
    const std::tuple<P...> args(std::forward<A>(a)...);
    const unsigned nt = block.x * block.y * block.z;
    if (nt == 0 || nt > 1024 || nt % 32 != 0 || grid.x == 0 || grid.y == 0 || grid.y > 65535 || grid.z > 65535) {
      state().last = cudaErrorInvalidConfiguration;
      return;
    }
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          std::barrier<> blk(nt);
          std::vector<std::unique_ptr<Warp>> warps;
          for (unsigned w = 0; w < nt / 32; ++w) warps.emplace_back(new Warp());
          std::vector<std::thread> threads;
          threads.reserve(nt);
          for (unsigned t = 0; t < nt; ++t)
            threads.emplace_back([&, t] {
              ctx.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
              ctx.bid = dim3(bx, by, bz);
              ctx.bdim = block;
              ctx.gdim = grid;
              ctx.block = &blk;
              ctx.warp = warps[t / 32].get();
              std::apply(fn, args);
              ctx.warp->live.fetch_sub(1);
              ctx.warp->bar.arrive_and_drop();
              blk.arrive_and_drop();
            });
          for (auto& th : threads) th.join();
        }
  }
};

template <class... P>
Launch<P...> launcher(void (*fn)(P...), dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t /*stream*/) {
  return Launch<P...>{fn, grid, block};
}

}  // namespace qk_emu

#define threadIdx (qk_emu::ctx.tid)
#define blockIdx (qk_emu::ctx.bid)
#define blockDim (qk_emu::ctx.bdim)
#define gridDim (qk_emu::ctx.gdim)

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = qk_emu::state().last;
  qk_emu::state().last = cudaSuccess;
  return e;
}

inline void __syncthreads() { qk_emu::ctx.block->arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "");
  qk_emu::Warp& w = *qk_emu::ctx.warp;
  const unsigned lane = qk_emu::ctx.tid.x & 31u;
  if (mask != 0xffffffffu) qk_emu::error("__shfl_xor_sync: mask is not the full warp");
  std::memcpy(&w.slots[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  if (w.live.load() != 32) qk_emu::error("__shfl_xor_sync with a full mask after a lane of the warp exited");
  T r;
  std::memcpy(&r, &w.slots[(lane ^ static_cast<unsigned>(lane_mask)) & 31u], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}

// Whether p is on the calling thread's stack (a local variable: not a global-memory access).
inline bool on_stack(const void* p) {
  static thread_local uintptr_t lo = 0, hi = 0;
  if (hi == 0) {
    pthread_attr_t attr;
    void* addr = nullptr;
    size_t size = 0;
    pthread_getattr_np(pthread_self(), &attr);
    pthread_attr_getstack(&attr, &addr, &size);
    pthread_attr_destroy(&attr);
    lo = reinterpret_cast<uintptr_t>(addr);
    hi = lo + size;
  }
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return a >= lo && a < hi;
}

// 16-byte vector types; a store to global memory is checked (bounds + 16-byte alignment).
struct alignas(16) float4 {
  float x, y, z, w;
  float4& operator=(const float4& o) {
    if (!on_stack(this)) qk_emu::check_access(this, 16, 16, "float4 store");
    x = o.x; y = o.y; z = o.z; w = o.w;
    return *this;
  }
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
  uint4& operator=(const uint4& o) {
    if (!on_stack(this)) qk_emu::check_access(this, 16, 16, "uint4 store");
    x = o.x; y = o.y; z = o.z; w = o.w;
    return *this;
  }
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

template <class T>
T __ldg(const T* p) {
  qk_emu::check_access(p, sizeof(T), sizeof(T) >= 16 ? 16 : alignof(T), "__ldg");
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
using std::fmaf;
using std::isnan;
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// PTX prmt (default mode): result byte i = byte (s >> 4i) & 7 of the 8-byte value {y, x}; bit 3 of a selector
// nibble replicates that byte's sign bit.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 0xfu;
    unsigned byte = static_cast<unsigned>(v >> (8 * (sel & 7u))) & 0xffu;
    if (sel & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;
    r |= byte << (8 * i);
  }
  return r;
}
