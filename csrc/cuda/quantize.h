// CUDA quantization entry point.  Plain C++ declarations (no CUDA headers) so bindings.cpp compiles with g++.
#pragma once

#include <cstdint>
#include <string>

#include "../common.h"

namespace qkernels {
namespace cuda {

// Same semantics as qkernels::cpu::quantize_4bit (bit-identical to qkernels.reference.quantize_4bit); all pointers
// are device pointers, launched on `stream` (a cudaStream_t passed as an integer; 0 = legacy default stream).
// Asynchronous.  Returns "" on success, otherwise the CUDA error string of the launch.
//   A      : n elements of in_dtype, contiguous        code   : float32[16] (any order)
//   packed : uint8[(n+1)/2]                            absmax : float32[ceil(n/blocksize)]
std::string quantize_4bit(const void* A, DType in_dtype, int64_t n, int64_t blocksize, const float* code,
                          uint8_t* packed, float* absmax, std::uintptr_t stream);

}  // namespace cuda
}  // namespace qkernels
