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

// dequantize_4bit with double-quantized scales decoded inline (one launch), same semantics as
// qkernels::cpu::dequantize_4bit_nested: block b's scale = float32(nested_code[absmax_q[b]] *
// nested_absmax[b / nested_blocksize]) + offset (two roundings, never fused).  absmax_q uint8[ceil(n/blocksize)],
// nested_absmax float32[ceil(nblocks/nested_blocksize)], nested_code float32[256]; nested_blocksize a power of two.
std::string dequantize_4bit_nested(const uint8_t* packed, const uint8_t* absmax_q, const float* nested_absmax,
                                   const float* nested_code, float offset, int64_t nested_blocksize,
                                   const float* code, int64_t n, int64_t blocksize, void* out, DType out_dtype,
                                   std::uintptr_t stream);

}  // namespace cuda
}  // namespace qkernels
