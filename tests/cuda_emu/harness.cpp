// C entry points of the emulated CUDA kernels (tests/test_cuda_emulation.py loads this with ctypes).
// "Device pointers" are host pointers; every call returns the kernel API's message ("" on success) in `msg`.
#include <cstring>
#include <string>

#include "cuda/blockwise.h"
#include "cuda/dequantize.h"
#include "cuda/gemv.h"
#include "cuda/quantize.h"
#include "cuda_runtime.h"

namespace {
void put(const std::string& s, char* msg, int cap) {
  std::strncpy(msg, s.c_str(), static_cast<size_t>(cap) - 1);
  msg[cap - 1] = '\0';
}
}  // namespace

using qkernels::DType;

extern "C" {

void emu_register(const void* p, int64_t nbytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> g(qk_emu::state().mu);
  qk_emu::state().buffers.emplace_back(a, a + static_cast<uintptr_t>(nbytes));
}

void emu_reset() {
  std::lock_guard<std::mutex> g(qk_emu::state().mu);
  qk_emu::state().buffers.clear();
  qk_emu::state().errors.clear();
}

// Emulation errors so far, joined by newlines ("" when none).
void emu_errors(char* msg, int cap) {
  std::lock_guard<std::mutex> g(qk_emu::state().mu);
  std::string s;
  for (const auto& e : qk_emu::state().errors) s += e + "\n";
  put(s, msg, cap);
}

void emu_dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t bs,
                         void* out, int dt, char* msg, int cap) {
  put(qkernels::cuda::dequantize_4bit(packed, absmax, code, n, bs, out, static_cast<DType>(dt), 0), msg, cap);
}

void emu_dequantize_4bit_nested(const uint8_t* packed, const uint8_t* absmax_q, const float* nested_absmax,
                                const float* nested_code, float offset, int64_t nested_bs, const float* code,
                                int64_t n, int64_t bs, void* out, int dt, char* msg, int cap) {
  put(qkernels::cuda::dequantize_4bit_nested(packed, absmax_q, nested_absmax, nested_code, offset, nested_bs, code, n,
                                             bs, out, static_cast<DType>(dt), 0),
      msg, cap);
}

void emu_quantize_4bit(const void* A, int dt, int64_t n, int64_t bs, const float* code, uint8_t* packed,
                       float* absmax, char* msg, int cap) {
  put(qkernels::cuda::quantize_4bit(A, static_cast<DType>(dt), n, bs, code, packed, absmax, 0), msg, cap);
}

void emu_quantize_blockwise(const float* A, int64_t n, int64_t bs, const float* code, uint8_t* out, float* absmax,
                            char* msg, int cap) {
  put(qkernels::cuda::quantize_blockwise(A, n, bs, code, out, absmax, 0), msg, cap);
}

void emu_dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n, int64_t bs,
                              float* out, char* msg, int cap) {
  put(qkernels::cuda::dequantize_blockwise(q, absmax, code, n, bs, out, 0), msg, cap);
}

void emu_gemv_4bit_lora(const void* x, int dt, int64_t M, int64_t K, const uint8_t* packed, const float* absmax,
                        const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code, float offset,
                        int64_t nested_bs, const float* code, int64_t bs, int64_t N, const float* lora_t,
                        const float* lora_B, int64_t r, const float* bias, void* out, char* msg, int cap) {
  put(qkernels::cuda::gemv_4bit_lora(x, static_cast<DType>(dt), M, K, packed, absmax, absmax_q, nested_absmax,
                                     nested_code, offset, nested_bs, code, bs, N, lora_t, lora_B, r, bias, out, 0),
      msg, cap);
}

}  // extern "C"
