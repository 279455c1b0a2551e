// CUDA dequantization entry points.  Plain C++ declarations (no CUDA headers) so bindings.cpp compiles with g++.
#pragma once

#include <cstdint>
#include <string>

#include "../common.h"

namespace qkernels {
namespace cuda {

// Number of visible CUDA devices; 0 (never an error) when there is no driver or no GPU.
int device_count();

// Same semantics as qkernels::cpu::dequantize_4bit, all pointers are device pointers, launched on `stream`
// (a cudaStream_t passed as an integer; 0 = legacy default stream).  Asynchronous.
// Returns "" on success, otherwise the CUDA error string of the launch.
std::string dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                            int64_t blocksize, void* out, DType out_dtype, std::uintptr_t stream);

}  // namespace cuda
}  // namespace qkernels
