// pybind11 bindings of the CPU fused 4-bit GEMV + LoRA kernel (csrc/cpu/gemv.*).  Registered from bindings.cpp.
// Thin: validate (ValueError naming the argument) and forward; qkernels/_native.py owns the torch-side checks.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/gemv.h"
#include "cpu/isa.h"
#include "cpu/lora.h"

namespace py = pybind11;

namespace {

// float32 values of a buffer of dtype `dtype` (float32: itself; bfloat16: widened into buf, exact); null stays null.
const float* as_f32(std::uint64_t ptr, int dtype, int64_t n, std::vector<float>& buf) {
  if (ptr == 0 || dtype == static_cast<int>(qkernels::DType::float32)) return reinterpret_cast<const float*>(ptr);
  const auto* src = reinterpret_cast<const uint16_t*>(ptr);
  buf.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) buf[static_cast<size_t>(i)] = qkernels::bf16_bits_to_float(src[i]);
  return buf.data();
}

void gemv_4bit_lora_cpu(std::uint64_t x_ptr, int dtype, int64_t M, int64_t K, std::uint64_t packed_ptr,
                        std::uint64_t absmax_ptr, std::uint64_t absmax_q_ptr, std::uint64_t nested_absmax_ptr,
                        std::uint64_t nested_code_ptr, float offset, int64_t nested_blocksize, std::uint64_t code_ptr,
                        int64_t blocksize, int64_t N, std::uint64_t lora_t_ptr, std::uint64_t lora_B_ptr, int64_t r,
                        std::uint64_t bias_ptr, std::uint64_t out_ptr, int lora_B_dtype, int bias_dtype,
                        std::uint64_t lora_A_ptr, int lora_A_dtype, float lora_scale) {
  const char* fn = "gemv_4bit_lora_cpu";
  const int f32 = static_cast<int>(qkernels::DType::float32), bf16 = static_cast<int>(qkernels::DType::bfloat16);
  QK_CHECK_ARG(lora_B_dtype == f32 || lora_B_dtype == bf16, fn, "lora_B_dtype",
               "must be float32 or bfloat16 (got " + std::to_string(lora_B_dtype) + ")");
  QK_CHECK_ARG(bias_dtype == f32 || bias_dtype == bf16, fn, "bias_dtype",
               "must be float32 or bfloat16 (got " + std::to_string(bias_dtype) + ")");
  QK_CHECK_PTR(x_ptr, fn, "x_ptr");
  QK_CHECK_DTYPE(dtype, fn, "dtype");
  QK_CHECK_POSITIVE(M, fn, "M");
  QK_CHECK_POSITIVE(K, fn, "K");
  QK_CHECK_POSITIVE(N, fn, "N");
  qkernels::check_weight_args(fn, packed_ptr, absmax_ptr, absmax_q_ptr, nested_absmax_ptr, nested_code_ptr, nested_blocksize, code_ptr,
               blocksize);
  QK_CHECK_ARG(r >= 0, fn, "r", "must be >= 0 (got " + std::to_string(r) + ")");
  if (r > 0) {
    QK_CHECK_ARG((lora_t_ptr != 0) != (lora_A_ptr != 0), fn, "lora_t_ptr / lora_A_ptr",
                 "exactly one must be given when r > 0 (the LoRA down-projection, or its factor A)");
    QK_CHECK_ARG(lora_A_ptr == 0 || lora_A_dtype == f32 || lora_A_dtype == bf16, fn, "lora_A_dtype",
                 "must be float32 or bfloat16 (got " + std::to_string(lora_A_dtype) + ")");
    QK_CHECK_PTR(lora_B_ptr, fn, "lora_B_ptr");
  }
  QK_CHECK_PTR(out_ptr, fn, "out_ptr");
  (void)qkernels::cpu::active_isa();  // validates QKERNELS_CPU_ISA before releasing the GIL
  py::gil_scoped_release release;
  // bfloat16 lora_B / bias (a decode step's bf16 model) widened here, exactly: ~15 us per call less than torch's
  // .to(float32) of a [4096, 16] factor.
  thread_local std::vector<float> b_buf, bias_buf;  // kept: a fresh 256 KB vector per call page-faulted ~10 us
  const float* lora_B = as_f32(lora_B_ptr, lora_B_dtype, r > 0 ? N * r : 0, b_buf);
  const float* bias = as_f32(bias_ptr, bias_dtype, N, bias_buf);
  // lora_A given: the down-projection t = lora_scale * x @ A^T here, by the CPU LoRA kernel (the same one, so the
  // same bits as qkernels.lora's separate call), sparing a decode step that call, its tensor and its Python.
  thread_local std::vector<float> t_buf;
  const float* lora_t = reinterpret_cast<const float*>(lora_t_ptr);
  if (r > 0 && lora_A_ptr != 0) {
    t_buf.resize(static_cast<size_t>(M * r));
    qkernels::cpu::lora_down(reinterpret_cast<const void*>(x_ptr), static_cast<qkernels::DType>(dtype), M, K, nullptr,
                             1.0f, reinterpret_cast<const void*>(lora_A_ptr),
                             static_cast<qkernels::DType>(lora_A_dtype), r, lora_scale, t_buf.data());
    lora_t = t_buf.data();
  }
  qkernels::cpu::gemv_4bit_lora(
      reinterpret_cast<const void*>(x_ptr), static_cast<qkernels::DType>(dtype), M, K,
      reinterpret_cast<const uint8_t*>(packed_ptr), reinterpret_cast<const float*>(absmax_ptr),
      reinterpret_cast<const uint8_t*>(absmax_q_ptr), reinterpret_cast<const float*>(nested_absmax_ptr),
      reinterpret_cast<const float*>(nested_code_ptr), offset, nested_blocksize,
      reinterpret_cast<const float*>(code_ptr), blocksize, N, lora_t, lora_B, r, bias,
      reinterpret_cast<void*>(out_ptr));
}

bool gemm_dx_4bit_cpu(std::uint64_t g_ptr, int dtype, int64_t M, int64_t N, std::uint64_t packed_ptr,
                      std::uint64_t absmax_ptr, std::uint64_t absmax_q_ptr, std::uint64_t nested_absmax_ptr,
                      std::uint64_t nested_code_ptr, float offset, int64_t nested_blocksize, std::uint64_t code_ptr,
                      int64_t blocksize, int64_t K, std::uint64_t out_ptr) {
  const char* fn = "gemm_dx_4bit_cpu";
  QK_CHECK_PTR(g_ptr, fn, "g_ptr");
  QK_CHECK_DTYPE(dtype, fn, "dtype");
  QK_CHECK_POSITIVE(M, fn, "M");
  QK_CHECK_POSITIVE(N, fn, "N");
  QK_CHECK_POSITIVE(K, fn, "K");
  qkernels::check_weight_args(fn, packed_ptr, absmax_ptr, absmax_q_ptr, nested_absmax_ptr, nested_code_ptr, nested_blocksize, code_ptr,
               blocksize);
  QK_CHECK_PTR(out_ptr, fn, "out_ptr");
  (void)qkernels::cpu::active_isa();  // validates QKERNELS_CPU_ISA before releasing the GIL
  py::gil_scoped_release release;
  return qkernels::cpu::gemm_dx_4bit(
      reinterpret_cast<const void*>(g_ptr), static_cast<qkernels::DType>(dtype), M, N,
      reinterpret_cast<const uint8_t*>(packed_ptr), reinterpret_cast<const float*>(absmax_ptr),
      reinterpret_cast<const uint8_t*>(absmax_q_ptr), reinterpret_cast<const float*>(nested_absmax_ptr),
      reinterpret_cast<const float*>(nested_code_ptr), offset, nested_blocksize,
      reinterpret_cast<const float*>(code_ptr), blocksize, K, reinterpret_cast<float*>(out_ptr));
}

}  // namespace

void qkernels_bind_gemv_cpu(py::module_& m) {
  m.def("gemm_dx_4bit_cpu", &gemm_dx_4bit_cpu, py::arg("g_ptr"), py::arg("dtype"), py::arg("M"), py::arg("N"),
        py::arg("packed_ptr"), py::arg("absmax_ptr"), py::arg("absmax_q_ptr"), py::arg("nested_absmax_ptr"),
        py::arg("nested_code_ptr"), py::arg("offset"), py::arg("nested_blocksize"), py::arg("code_ptr"),
        py::arg("blocksize"), py::arg("K"), py::arg("out_ptr"),
        "bool: out float32 [M, K] = g [M, N] @ W, W [N, K] in bitsandbytes' 4-bit format (arguments as for "
        "gemv_4bit_lora_cpu; g of dtype, contiguous), float32 sums over N in blocks of 256. False, writing nothing, "
        "where no SIMD path applies (K % 64 != 0, or neither AVX-512 nor AVX2 active): dequantize and multiply then.");
  m.def("gemv_4bit_lora_cpu", &gemv_4bit_lora_cpu, py::arg("x_ptr"), py::arg("dtype"), py::arg("M"), py::arg("K"),
        py::arg("packed_ptr"), py::arg("absmax_ptr"), py::arg("absmax_q_ptr"), py::arg("nested_absmax_ptr"),
        py::arg("nested_code_ptr"), py::arg("offset"), py::arg("nested_blocksize"), py::arg("code_ptr"),
        py::arg("blocksize"), py::arg("N"), py::arg("lora_t_ptr"), py::arg("lora_B_ptr"), py::arg("r"),
        py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("lora_B_dtype") = static_cast<int>(qkernels::DType::float32),
        py::arg("bias_dtype") = static_cast<int>(qkernels::DType::float32), py::arg("lora_A_ptr") = 0,
        py::arg("lora_A_dtype") = static_cast<int>(qkernels::DType::float32), py::arg("lora_scale") = 1.0f,
        "Fused y = x @ W^T + lora_t @ lora_B^T + bias on the CPU, W [N, K] in bitsandbytes' 4-bit format; float32 "
        "accumulation, one rounding to dtype. Pointers are data_ptr() ints of contiguous buffers: x [M, K] and out "
        "[M, N] of dtype (a DType or its int); packed uint8[ceil(N*K/2)] (flat element e = n*K+k, element 2j in the "
        "HIGH nibble); code float32[16]; blocks of `blocksize` over the flat index. Scales: absmax float32[nblocks], "
        "or absmax_ptr=0 and double-quantized absmax_q uint8[nblocks], nested_absmax float32, nested_code "
        "float32[256], offset, nested_blocksize (scale = float32(nested_code[q] * nested_absmax[b // "
        "nested_blocksize]) + offset). lora_t float32 [M, r], lora_B [N, r] of lora_B_dtype (float32 or bfloat16; 0 when r == "
        "0); or lora_t_ptr=0 and lora_A [r, K] of lora_A_dtype (float32 or bfloat16): t = lora_scale * x @ A^T computed "
        "first by the CPU LoRA kernel; bias [N] of bias_dtype (float32 or bfloat16) or 0. SIMD path chosen per call (cpu_isa_active; QKERNELS_CPU_GEMV_BF16=0 disables vdpbf16ps).");
  m.def("gemv_cpu_max_m", [](int dtype, int64_t K) {
          QK_CHECK_DTYPE(dtype, "gemv_cpu_max_m", "dtype");
          return qkernels::cpu::gemv_max_m(static_cast<qkernels::DType>(dtype), K);
        }, py::arg("dtype"), py::arg("K"),
        "int: the largest M for which gemv_4bit_lora_cpu is faster than dequantize + a BLAS matmul, for x of dtype "
        "with rows of K on the active ISA path (16; when K % 32 == 0: on AVX-512 96 for bf16 with vdpbf16ps when K % "
        "128 == 0, else 64, and 2048 for float32 / float16 x and bf16 without vdpbf16ps; on AVX2 128; measured on "
        "Zen 4).");
}
