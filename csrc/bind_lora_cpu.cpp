// pybind11 bindings of the CPU LoRA product kernels (csrc/cpu/lora.*).  Registered from bindings.cpp.
// Thin: validate (ValueError naming the argument) and forward; qkernels/_native.py owns the torch-side checks.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/isa.h"
#include "cpu/lora.h"

namespace py = pybind11;

namespace {

using qkernels::DType;

// n floats of buf at a 64-byte boundary (the kernels' rows of A: a vector's 16-byte alignment made lora_down at
// M 16 ~3x slower than on torch's 64-byte aligned tensors).
float* aligned64(std::vector<float>& buf, int64_t n) {
  buf.resize(static_cast<size_t>(n + 16));
  const auto p = reinterpret_cast<std::uintptr_t>(buf.data());
  return reinterpret_cast<float*>((p + 63) & ~std::uintptr_t(63));
}

// A [r, K] as float32 rows: the buffer itself (float32, not transposed), or its values packed into `buf`: converted
// from bfloat16 (exact: the top half of a float32; a decode step's bf16 LoRA factor, ~15 us per call as a torch
// .to(float32) against a few here) and/or transposed (the caller passed lora_B [K, r] for B^T, which the kernels
// read by rows of K; ~20-40 us as a torch B.t().contiguous() inside a training step).
const float* rows_of_A(std::uint64_t a_ptr, int a_dtype, bool a_transposed, int64_t r, int64_t K,
                       std::vector<float>& buf) {
  const bool bf16 = a_dtype == static_cast<int>(DType::bfloat16);
  if (!bf16 && !a_transposed) return reinterpret_cast<const float*>(a_ptr);
  float* o = aligned64(buf, r * K);
  if (bf16 && !a_transposed) {
    const auto* a = reinterpret_cast<const uint16_t*>(a_ptr);
    for (int64_t i = 0; i < r * K; ++i) o[i] = qkernels::bf16_bits_to_float(a[i]);
    return o;
  }
  // Transposed: in strips of kStrip columns, each output row's strip one cache line written whole.  Column by column
  // (o[j * K + k] for every j, then the next k) the r rows' lines, K * 4 bytes apart, fall in one L1 set when K is a
  // multiple of 1024 and evict each other: 45 us per call at r 16, K 1024 (bf16), ~4 us in strips.
  constexpr int64_t kStrip = 16;
  for (int64_t k0 = 0; k0 < K; k0 += kStrip) {
    const int64_t k1 = std::min(K, k0 + kStrip);
    if (bf16) {
      const auto* a = reinterpret_cast<const uint16_t*>(a_ptr);
      for (int64_t j = 0; j < r; ++j)
        for (int64_t k = k0; k < k1; ++k) o[j * K + k] = qkernels::bf16_bits_to_float(a[k * r + j]);
    } else {
      const float* a = reinterpret_cast<const float*>(a_ptr);
      for (int64_t j = 0; j < r; ++j)
        for (int64_t k = k0; k < k1; ++k) o[j * K + k] = a[k * r + j];
    }
  }
  return o;
}

void check_a_dtype(const char* fn, int a_dtype) {
  QK_CHECK_ARG(a_dtype == static_cast<int>(DType::float32) || a_dtype == static_cast<int>(DType::bfloat16), fn,
               "a_dtype", "must be float32 or bfloat16 (got " + std::to_string(a_dtype) + ")");
}

void check_common(const char* fn, int dtype, int64_t M, int64_t K, int64_t r, float mask_scale,
                  std::uint64_t mask_ptr) {
  QK_CHECK_DTYPE(dtype, fn, "dtype");
  QK_CHECK_ARG(M >= 0, fn, "M", "must be >= 0 (got " + std::to_string(M) + ")");
  QK_CHECK_ARG(K >= 0, fn, "K", "must be >= 0 (got " + std::to_string(K) + ")");
  QK_CHECK_ARG(r >= 0, fn, "r", "must be >= 0 (got " + std::to_string(r) + ")");
  if (mask_ptr != 0)
    QK_CHECK_ARG(mask_scale == mask_scale, fn, "mask_scale", "must not be NaN (1 / (1 - dropout_p))");
  (void)qkernels::cpu::active_isa();  // validates QKERNELS_CPU_ISA before releasing the GIL
}

void lora_down_cpu(std::uint64_t x_ptr, int dtype, int64_t M, int64_t K, std::uint64_t mask_ptr, float mask_scale,
                   std::uint64_t A_ptr, int64_t r, float scale, std::uint64_t t_ptr, bool a_transposed, int a_dtype) {
  const char* fn = "lora_down_cpu";
  check_common(fn, dtype, M, K, r, mask_scale, mask_ptr);
  check_a_dtype(fn, a_dtype);
  if (M == 0 || r == 0) return;
  QK_CHECK_PTR(t_ptr, fn, "t_ptr");
  if (K > 0) {
    QK_CHECK_PTR(x_ptr, fn, "x_ptr");
    QK_CHECK_PTR(A_ptr, fn, "A_ptr");
  }
  py::gil_scoped_release release;
  thread_local std::vector<float> buf;  // kept between calls: a fresh one page-faulted (~10 us at 16 x 4096)
  // a dense bfloat16 A is read as it is (the kernel widens it as it loads: widened here first, the other core's half
  // of a parallel call read the buffer out of this core's cache, ~30 us at 16 x 4096); a transposed one is packed.
  const void* A = a_transposed ? static_cast<const void*>(rows_of_A(A_ptr, a_dtype, true, r, K, buf))
                               : reinterpret_cast<const void*>(A_ptr);
  const DType a_dt = a_transposed ? DType::float32 : static_cast<DType>(a_dtype);
  qkernels::cpu::lora_down(reinterpret_cast<const void*>(x_ptr), static_cast<DType>(dtype), M, K,
                           reinterpret_cast<const uint8_t*>(mask_ptr), mask_scale, A, a_dt, r, scale,
                           reinterpret_cast<float*>(t_ptr));
}

void lora_gram_cpu(std::uint64_t u_ptr, int64_t M, int64_t r, std::uint64_t x_ptr, int dtype, int64_t K,
                   std::uint64_t mask_ptr, float mask_scale, std::uint64_t g_ptr, float out_scale, bool transposed) {
  const char* fn = "lora_gram_cpu";
  check_common(fn, dtype, M, K, r, mask_scale, mask_ptr);
  if (r == 0 || K == 0) return;
  QK_CHECK_PTR(g_ptr, fn, "g_ptr");
  if (M > 0) {
    QK_CHECK_PTR(u_ptr, fn, "u_ptr");
    QK_CHECK_PTR(x_ptr, fn, "x_ptr");
  }
  py::gil_scoped_release release;
  qkernels::cpu::lora_gram(reinterpret_cast<const float*>(u_ptr), M, r, reinterpret_cast<const void*>(x_ptr),
                           static_cast<DType>(dtype), K, reinterpret_cast<const uint8_t*>(mask_ptr), mask_scale,
                           reinterpret_cast<float*>(g_ptr), out_scale, transposed);
}

void lora_up_add_cpu(std::uint64_t y_ptr, int dtype, int64_t M, int64_t K, std::uint64_t u_ptr, int64_t r,
                     std::uint64_t A_ptr, std::uint64_t mask_ptr, float mask_scale, bool a_transposed, int a_dtype) {
  const char* fn = "lora_up_add_cpu";
  check_common(fn, dtype, M, K, r, mask_scale, mask_ptr);
  check_a_dtype(fn, a_dtype);
  if (M == 0 || K == 0) return;
  QK_CHECK_PTR(y_ptr, fn, "y_ptr");
  if (r > 0) {
    QK_CHECK_PTR(u_ptr, fn, "u_ptr");
    QK_CHECK_PTR(A_ptr, fn, "A_ptr");
  }
  py::gil_scoped_release release;
  thread_local std::vector<float> buf;  // kept between calls: a fresh one page-faulted (~10 us at 16 x 4096)
  qkernels::cpu::lora_up_add(reinterpret_cast<void*>(y_ptr), static_cast<DType>(dtype), M, K,
                             reinterpret_cast<const float*>(u_ptr), r, rows_of_A(A_ptr, a_dtype, a_transposed, r, K, buf),
                             reinterpret_cast<const uint8_t*>(mask_ptr), mask_scale);
}

}  // namespace

void qkernels_bind_lora_cpu(py::module_& m) {
  m.def("lora_down_cpu", &lora_down_cpu, py::arg("x_ptr"), py::arg("dtype"), py::arg("M"), py::arg("K"),
        py::arg("mask_ptr"), py::arg("mask_scale"), py::arg("A_ptr"), py::arg("r"), py::arg("scale"),
        py::arg("t_ptr"), py::arg("a_transposed") = false, py::arg("a_dtype") = static_cast<int>(DType::float32),
        "t [M, r] float32 = scale * (x * mask * mask_scale) @ A^T on the CPU. Pointers are data_ptr() ints of "
        "contiguous buffers: x [M, K] of dtype (a DType or its int), mask uint8 [M, K] of 0/1 or 0 for none, A "
        "[r, K] of a_dtype, float32 or bfloat16 (or, with a_transposed, [K, r] holding A^T: lora_B for B^T). "
        "float32 sums; SIMD path per call (cpu_isa_active).");
  m.def("lora_gram_cpu", &lora_gram_cpu, py::arg("u_ptr"), py::arg("M"), py::arg("r"), py::arg("x_ptr"),
        py::arg("dtype"), py::arg("K"), py::arg("mask_ptr"), py::arg("mask_scale"), py::arg("g_ptr"),
        py::arg("out_scale") = 1.0f, py::arg("transposed") = false,
        "g [r, K] float32 = out_scale * (u^T @ (x * mask * mask_scale)) on the CPU (overwrites g; transposed: g is "
        "[K, r]). u float32 [M, r], x [M, K] of dtype, mask uint8 [M, K] or 0. Sums over M in float32, in blocks of "
        "256 rows; out_scale is one float32 multiply of each sum.");
  m.def("lora_up_add_cpu", &lora_up_add_cpu, py::arg("y_ptr"), py::arg("dtype"), py::arg("M"), py::arg("K"),
        py::arg("u_ptr"), py::arg("r"), py::arg("A_ptr"), py::arg("mask_ptr"), py::arg("mask_scale"),
        py::arg("a_transposed") = false, py::arg("a_dtype") = static_cast<int>(DType::float32),
        "y [M, K] of dtype += (u @ A) * mask * mask_scale in place on the CPU: u float32 [M, r], A [r, K] of a_dtype, "
        "float32 or bfloat16 (or, with a_transposed, [K, r] holding A^T), mask uint8 [M, K] or 0; the float32 sum is added to "
        "float(y) and rounded once to dtype (nearest even).");
}
