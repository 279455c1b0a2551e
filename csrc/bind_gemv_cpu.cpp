// pybind11 bindings of the CPU fused 4-bit GEMV + LoRA kernel (csrc/cpu/gemv.*).  Registered from bindings.cpp.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void qkernels_bind_gemv_cpu(py::module_& m) { (void)m; }
