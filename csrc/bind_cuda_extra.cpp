// pybind11 bindings of the CUDA kernels added after the first quantize/dequantize pair: the fused 4-bit GEMV + LoRA,
// the nested-scale dequantize and the 8-bit blockwise kernels (csrc/cuda/*).  Registered from bindings.cpp; empty
// when the module is built without CUDA.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void qkernels_bind_cuda_extra(py::module_& m) { (void)m; }
