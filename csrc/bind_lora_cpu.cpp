// pybind11 bindings of the CPU LoRA product kernels (csrc/cpu/lora.*).  Registered from bindings.cpp.
// Thin: validate (ValueError naming the argument) and forward; qkernels/_native.py owns the torch-side checks.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/isa.h"
#include "cpu/lora.h"

namespace py = pybind11;

namespace {

using qkernels::DType;

// A [r, K] from a_ptr: the buffer itself, or, when a_transposed, its transpose packed into `buf` (the caller passed
// lora_B [K, r] for B^T, which the kernels read by rows of K; r * K floats, a few microseconds against the ~20-40 us
// of a torch B.t().contiguous() per call inside a training step).
const float* rows_of_A(std::uint64_t a_ptr, bool a_transposed, int64_t r, int64_t K, std::vector<float>& buf) {
  const float* a = reinterpret_cast<const float*>(a_ptr);
  if (!a_transposed) return a;
  buf.resize(static_cast<size_t>(r * K));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < r; ++j) buf[static_cast<size_t>(j * K + k)] = a[k * r + j];
  return buf.data();
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
                   std::uint64_t A_ptr, int64_t r, float scale, std::uint64_t t_ptr, bool a_transposed) {
  const char* fn = "lora_down_cpu";
  check_common(fn, dtype, M, K, r, mask_scale, mask_ptr);
  if (M == 0 || r == 0) return;
  QK_CHECK_PTR(t_ptr, fn, "t_ptr");
  if (K > 0) {
    QK_CHECK_PTR(x_ptr, fn, "x_ptr");
    QK_CHECK_PTR(A_ptr, fn, "A_ptr");
  }
  py::gil_scoped_release release;
  std::vector<float> buf;
  qkernels::cpu::lora_down(reinterpret_cast<const void*>(x_ptr), static_cast<DType>(dtype), M, K,
                           reinterpret_cast<const uint8_t*>(mask_ptr), mask_scale,
                           rows_of_A(A_ptr, a_transposed, r, K, buf), r, scale, reinterpret_cast<float*>(t_ptr));
}

void lora_gram_cpu(std::uint64_t u_ptr, int64_t M, int64_t r, std::uint64_t x_ptr, int dtype, int64_t K,
                   std::uint64_t mask_ptr, float mask_scale, std::uint64_t g_ptr) {
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
                           reinterpret_cast<float*>(g_ptr));
}

void lora_up_add_cpu(std::uint64_t y_ptr, int dtype, int64_t M, int64_t K, std::uint64_t u_ptr, int64_t r,
                     std::uint64_t A_ptr, std::uint64_t mask_ptr, float mask_scale, bool a_transposed) {
  const char* fn = "lora_up_add_cpu";
  check_common(fn, dtype, M, K, r, mask_scale, mask_ptr);
  if (M == 0 || K == 0) return;
  QK_CHECK_PTR(y_ptr, fn, "y_ptr");
  if (r > 0) {
    QK_CHECK_PTR(u_ptr, fn, "u_ptr");
    QK_CHECK_PTR(A_ptr, fn, "A_ptr");
  }
  py::gil_scoped_release release;
  std::vector<float> buf;
  qkernels::cpu::lora_up_add(reinterpret_cast<void*>(y_ptr), static_cast<DType>(dtype), M, K,
                             reinterpret_cast<const float*>(u_ptr), r, rows_of_A(A_ptr, a_transposed, r, K, buf),
                             reinterpret_cast<const uint8_t*>(mask_ptr), mask_scale);
}

}  // namespace

void qkernels_bind_lora_cpu(py::module_& m) {
  m.def("lora_down_cpu", &lora_down_cpu, py::arg("x_ptr"), py::arg("dtype"), py::arg("M"), py::arg("K"),
        py::arg("mask_ptr"), py::arg("mask_scale"), py::arg("A_ptr"), py::arg("r"), py::arg("scale"),
        py::arg("t_ptr"), py::arg("a_transposed") = false,
        "t [M, r] float32 = scale * (x * mask * mask_scale) @ A^T on the CPU. Pointers are data_ptr() ints of "
        "contiguous buffers: x [M, K] of dtype (a DType or its int), mask uint8 [M, K] of 0/1 or 0 for none, A "
        "float32 [r, K] (or, with a_transposed, float32 [K, r] holding A^T: lora_B for B^T). float32 sums; SIMD "
        "path per call (cpu_isa_active).");
  m.def("lora_gram_cpu", &lora_gram_cpu, py::arg("u_ptr"), py::arg("M"), py::arg("r"), py::arg("x_ptr"),
        py::arg("dtype"), py::arg("K"), py::arg("mask_ptr"), py::arg("mask_scale"), py::arg("g_ptr"),
        "g [r, K] float32 = u^T @ (x * mask * mask_scale) on the CPU (overwrites g). u float32 [M, r], x [M, K] of "
        "dtype, mask uint8 [M, K] or 0. Sums over M in float32, in blocks of 256 rows.");
  m.def("lora_up_add_cpu", &lora_up_add_cpu, py::arg("y_ptr"), py::arg("dtype"), py::arg("M"), py::arg("K"),
        py::arg("u_ptr"), py::arg("r"), py::arg("A_ptr"), py::arg("mask_ptr"), py::arg("mask_scale"),
        py::arg("a_transposed") = false,
        "y [M, K] of dtype += (u @ A) * mask * mask_scale in place on the CPU: u float32 [M, r], A float32 [r, K] "
        "(or, with a_transposed, float32 [K, r] holding A^T), mask uint8 [M, K] or 0; the float32 sum is added to "
        "float(y) and rounded once to dtype (nearest even).");
}
