// pybind11 bindings of the CUDA kernels added after the first quantize/dequantize pair: the fused 4-bit GEMV + LoRA,
// the nested-scale dequantize and the 8-bit blockwise kernels (csrc/cuda/*).  Registered from bindings.cpp; empty
// when the module is built without CUDA.  Same conventions as bindings.cpp: pointers are data_ptr() ints, the
// stream is a cudaStream_t as an int, argument errors raise ValueError naming the argument, launch errors raise
// RuntimeError.  qkernels/_native.py owns the torch-side checks (dtype, device, contiguity, sizes).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common.h"
#ifdef QKERNELS_WITH_CUDA
#include "cuda/blockwise.h"
#include "cuda/dequantize.h"
#include "cuda/gemv.h"
#endif

namespace py = pybind11;

#ifdef QKERNELS_WITH_CUDA
namespace {

using qkernels::DType;

template <typename P>
P ptr(std::uint64_t v) {
  return reinterpret_cast<P>(static_cast<std::uintptr_t>(v));
}

void raise_if(const char* fn, const std::string& err) {
  if (!err.empty()) throw std::runtime_error(std::string(fn) + ": CUDA launch failed: " + err);
}

void check_pow2(const char* fn, const char* arg, int64_t v, int64_t lo, int64_t hi) {
  QK_CHECK_ARG(v >= lo && v <= hi && (v & (v - 1)) == 0, fn, arg,
               "must be a power of two in [" + std::to_string(lo) + ", " + std::to_string(hi) + "] (got " +
                   std::to_string(v) + ")");
}

void gemv_4bit_lora_cuda(std::uint64_t x_ptr, int dtype, int64_t M, int64_t K, std::uint64_t packed_ptr,
                         std::uint64_t absmax_ptr, std::uint64_t absmax_q_ptr, std::uint64_t nested_absmax_ptr,
                         std::uint64_t nested_code_ptr, float offset, int64_t nested_blocksize, std::uint64_t code_ptr,
                         int64_t blocksize, int64_t N, std::uint64_t lora_t_ptr, std::uint64_t lora_B_ptr, int64_t r,
                         std::uint64_t bias_ptr, std::uint64_t out_ptr, std::uint64_t stream) {
  const char* fn = "gemv_4bit_lora_cuda";
  QK_CHECK_PTR(x_ptr, fn, "x_ptr");
  QK_CHECK_DTYPE(dtype, fn, "dtype");
  QK_CHECK_POSITIVE(M, fn, "M");
  QK_CHECK_POSITIVE(K, fn, "K");
  qkernels::check_weight_args(fn, packed_ptr, absmax_ptr, absmax_q_ptr, nested_absmax_ptr, nested_code_ptr,
                              nested_blocksize, code_ptr, blocksize);
  QK_CHECK_POSITIVE(N, fn, "N");
  QK_CHECK_ARG(r >= 0, fn, "r", "must be >= 0 (got " + std::to_string(r) + ")");
  if (r > 0) {
    QK_CHECK_PTR(lora_t_ptr, fn, "lora_t_ptr");
    QK_CHECK_PTR(lora_B_ptr, fn, "lora_B_ptr");
  }
  QK_CHECK_PTR(out_ptr, fn, "out_ptr");
  raise_if(fn, qkernels::cuda::gemv_4bit_lora(
                   ptr<const void*>(x_ptr), static_cast<DType>(dtype), M, K, ptr<const uint8_t*>(packed_ptr),
                   ptr<const float*>(absmax_ptr), ptr<const uint8_t*>(absmax_q_ptr),
                   ptr<const float*>(nested_absmax_ptr), ptr<const float*>(nested_code_ptr), offset, nested_blocksize,
                   ptr<const float*>(code_ptr), blocksize, N, ptr<const float*>(lora_t_ptr),
                   ptr<const float*>(lora_B_ptr), r, ptr<const float*>(bias_ptr), ptr<void*>(out_ptr),
                   static_cast<std::uintptr_t>(stream)));
}

void dequantize_4bit_nested_cuda(std::uint64_t packed_ptr, std::uint64_t absmax_q_ptr, std::uint64_t nested_absmax_ptr,
                                 std::uint64_t nested_code_ptr, float offset, int64_t nested_blocksize,
                                 std::uint64_t code_ptr, int64_t n, int64_t blocksize, std::uint64_t out_ptr,
                                 int out_dtype, std::uint64_t stream) {
  const char* fn = "dequantize_4bit_nested_cuda";
  qkernels::check_weight_args(fn, packed_ptr, 0, absmax_q_ptr, nested_absmax_ptr, nested_code_ptr, nested_blocksize,
                              code_ptr, blocksize);  // absmax_ptr 0: this kernel reads nested scales only
  QK_CHECK_POSITIVE(n, fn, "n");
  QK_CHECK_PTR(out_ptr, fn, "out_ptr");
  QK_CHECK_DTYPE(out_dtype, fn, "out_dtype");
  raise_if(fn, qkernels::cuda::dequantize_4bit_nested(
                   ptr<const uint8_t*>(packed_ptr), ptr<const uint8_t*>(absmax_q_ptr),
                   ptr<const float*>(nested_absmax_ptr), ptr<const float*>(nested_code_ptr), offset, nested_blocksize,
                   ptr<const float*>(code_ptr), n, blocksize, ptr<void*>(out_ptr), static_cast<DType>(out_dtype),
                   static_cast<std::uintptr_t>(stream)));
}

void quantize_blockwise_cuda(std::uint64_t A_ptr, int64_t n, int64_t blocksize, std::uint64_t code_ptr,
                             std::uint64_t out_ptr, std::uint64_t absmax_ptr, std::uint64_t stream) {
  const char* fn = "quantize_blockwise_cuda";
  QK_CHECK_PTR(A_ptr, fn, "A_ptr");
  QK_CHECK_POSITIVE(n, fn, "n");
  check_pow2(fn, "blocksize", blocksize, 1, 4096);
  QK_CHECK_PTR(code_ptr, fn, "code_ptr");
  QK_CHECK_PTR(out_ptr, fn, "out_ptr");
  QK_CHECK_PTR(absmax_ptr, fn, "absmax_ptr");
  raise_if(fn, qkernels::cuda::quantize_blockwise(ptr<const float*>(A_ptr), n, blocksize, ptr<const float*>(code_ptr),
                                                  ptr<uint8_t*>(out_ptr), ptr<float*>(absmax_ptr),
                                                  static_cast<std::uintptr_t>(stream)));
}

void dequantize_blockwise_cuda(std::uint64_t q_ptr, std::uint64_t absmax_ptr, std::uint64_t code_ptr, int64_t n,
                               int64_t blocksize, std::uint64_t out_ptr, std::uint64_t stream) {
  const char* fn = "dequantize_blockwise_cuda";
  QK_CHECK_PTR(q_ptr, fn, "q_ptr");
  QK_CHECK_PTR(absmax_ptr, fn, "absmax_ptr");
  QK_CHECK_PTR(code_ptr, fn, "code_ptr");
  QK_CHECK_POSITIVE(n, fn, "n");
  check_pow2(fn, "blocksize", blocksize, 1, 4096);
  QK_CHECK_PTR(out_ptr, fn, "out_ptr");
  raise_if(fn, qkernels::cuda::dequantize_blockwise(ptr<const uint8_t*>(q_ptr), ptr<const float*>(absmax_ptr),
                                                    ptr<const float*>(code_ptr), n, blocksize, ptr<float*>(out_ptr),
                                                    static_cast<std::uintptr_t>(stream)));
}

}  // namespace
#endif  // QKERNELS_WITH_CUDA

void qkernels_bind_cuda_extra(py::module_& m) {
#ifdef QKERNELS_WITH_CUDA
  m.def("gemv_4bit_lora_cuda", &gemv_4bit_lora_cuda, py::arg("x_ptr"), py::arg("dtype"), py::arg("M"), py::arg("K"),
        py::arg("packed_ptr"), py::arg("absmax_ptr"), py::arg("absmax_q_ptr"), py::arg("nested_absmax_ptr"),
        py::arg("nested_code_ptr"), py::arg("offset"), py::arg("nested_blocksize"), py::arg("code_ptr"),
        py::arg("blocksize"), py::arg("N"), py::arg("lora_t_ptr"), py::arg("lora_B_ptr"), py::arg("r"),
        py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("stream"),
        "Fused 4-bit GEMV + LoRA on CUDA: out[m, n] = sum_k x[m, k] W[n, k] + sum_j t[m, j] B[n, j] + bias[n], float32 "
        "accumulation, one rounding to dtype (a DType or its int). x [M, K] and out [M, N] of dtype; W = dequant of "
        "packed uint8[ceil(N*K/2)] (bitsandbytes layout, blocks over the flat index); absmax float32[nblocks], or "
        "absmax_ptr == 0 for nested scales (absmax_q uint8, nested_absmax float32, nested_code float32[256], offset, "
        "nested_blocksize); code float32[16]; t float32 [M, r], B float32 [N, r] (0 when r == 0); bias float32[N] or "
        "0. Device pointers, launched asynchronously on `stream`.");
  m.def("dequantize_4bit_nested_cuda", &dequantize_4bit_nested_cuda, py::arg("packed_ptr"), py::arg("absmax_q_ptr"),
        py::arg("nested_absmax_ptr"), py::arg("nested_code_ptr"), py::arg("offset"), py::arg("nested_blocksize"),
        py::arg("code_ptr"), py::arg("n"), py::arg("blocksize"), py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("stream"),
        "CUDA version of dequantize_4bit_nested_cpu (bit-identical, one launch): the double-quantized scales are "
        "decoded inline. Device pointers, launched asynchronously on `stream`.");
  m.def("quantize_blockwise_cuda", &quantize_blockwise_cuda, py::arg("A_ptr"), py::arg("n"), py::arg("blocksize"),
        py::arg("code_ptr"), py::arg("out_ptr"), py::arg("absmax_ptr"), py::arg("stream"),
        "CUDA version of quantize_blockwise_cpu (bit-identical): float32 A[n] -> out uint8[n], absmax "
        "float32[ceil(n/blocksize)]; code float32[256] (any order); blocksize a power of two in [1, 4096].");
  m.def("dequantize_blockwise_cuda", &dequantize_blockwise_cuda, py::arg("q_ptr"), py::arg("absmax_ptr"),
        py::arg("code_ptr"), py::arg("n"), py::arg("blocksize"), py::arg("out_ptr"), py::arg("stream"),
        "out float32[n] = code[q[i]] * absmax[i // blocksize] on CUDA (bit-identical to "
        "reference.dequantize_blockwise); blocksize a power of two in [1, 4096].");
#else
  (void)m;
#endif
}
