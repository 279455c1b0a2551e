// Shared helpers for the qkernels native module (_C).
//
// This header must stay includable from plain C++ (g++) AND from nvcc host code, so it does not
// include pybind11.  Argument errors are thrown as std::invalid_argument, which pybind11 translates
// into a Python ValueError; CUDA / runtime failures are thrown as std::runtime_error (RuntimeError).
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace qkernels {

// ---------------------------------------------------------------------------------------------------------------------
// Argument checks.  Each macro names the offending argument so the Python message is actionable, e.g.
//   ValueError: dequantize_4bit_cpu: argument 'blocksize' must be a power of two in [32, 4096] (got 48)
// ---------------------------------------------------------------------------------------------------------------------
#define QK_CHECK_ARG(cond, fn, arg, what) \
  do {                                    \
    if (!(cond)) throw std::invalid_argument(std::string(fn) + ": argument '" + (arg) + "' " + (what)); \
  } while (0)

#define QK_CHECK_PTR(ptr, fn, arg) QK_CHECK_ARG((ptr) != 0, fn, arg, "must be a non-null pointer (got 0)")
#define QK_CHECK_POSITIVE(v, fn, arg) \
  QK_CHECK_ARG((v) > 0, fn, arg, "must be > 0 (got " + std::to_string(v) + ")")
#define QK_CHECK_BLOCKSIZE(bs, fn, arg)                                                      \
  QK_CHECK_ARG((bs) >= 32 && (bs) <= 4096 && (((bs) & ((bs)-1)) == 0), fn, arg,               \
               "must be a power of two in [32, 4096] (got " + std::to_string(bs) + ")")
#define QK_CHECK_DTYPE(dt, fn, arg)                                                           \
  QK_CHECK_ARG((dt) >= 0 && (dt) <= 2, fn, arg,                                               \
               "must be a qkernels._C.DType (float32=0, float16=1, bfloat16=2) (got " + std::to_string(dt) + ")")

// A double-quantized state's nested blocksize, as every binding that decodes nested scales takes it.
inline void check_nested_blocksize(const char* fn, int64_t nested_blocksize) {
  QK_CHECK_ARG(nested_blocksize > 0 && nested_blocksize <= (int64_t(1) << 30) &&
                   (nested_blocksize & (nested_blocksize - 1)) == 0,
               fn, "nested_blocksize",
               "must be a power of two in [1, 1073741824] (got " + std::to_string(nested_blocksize) + ")");
}

// The 4-bit weight's pointers and format arguments, as the GEMV / dX bindings of both devices take them
// (bind_gemv_cpu.cpp, bind_cuda_extra.cpp): absmax_ptr 0 means double-quantized scales (absmax_q_ptr, nested_absmax_ptr,
// nested_code_ptr and a power-of-two nested_blocksize in [1, 2^30]).
inline void check_weight_args(const char* fn, std::uint64_t packed_ptr, std::uint64_t absmax_ptr,
                              std::uint64_t absmax_q_ptr, std::uint64_t nested_absmax_ptr,
                              std::uint64_t nested_code_ptr, int64_t nested_blocksize, std::uint64_t code_ptr,
                              int64_t blocksize) {
  QK_CHECK_PTR(packed_ptr, fn, "packed_ptr");
  if (absmax_ptr == 0) {  // double-quantized scales
    QK_CHECK_PTR(absmax_q_ptr, fn, "absmax_q_ptr");
    QK_CHECK_PTR(nested_absmax_ptr, fn, "nested_absmax_ptr");
    QK_CHECK_PTR(nested_code_ptr, fn, "nested_code_ptr");
    check_nested_blocksize(fn, nested_blocksize);
  }
  QK_CHECK_PTR(code_ptr, fn, "code_ptr");
  QK_CHECK_BLOCKSIZE(blocksize, fn, "blocksize");
}

// Output dtype of the dequantize kernels (exposed to Python as _C.DType).
enum class DType : int { float32 = 0, float16 = 1, bfloat16 = 2 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::float32: return "float32";
    case DType::float16: return "float16";
    case DType::bfloat16: return "bfloat16";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------------------------------
// float32 -> bfloat16 / float16 bit conversions, bit-identical to torch's `.to(dtype)` on CPU for all finite and
// infinite inputs (round-to-nearest-even, correct subnormals, overflow to inf).
// ---------------------------------------------------------------------------------------------------------------------
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// bf16 = upper 16 bits of the float, rounded to nearest even.  NaN -> canonical quiet NaN 0x7FC0 (what
// c10::BFloat16's round_to_nearest_even returns); the RNE add can never turn a finite value into NaN.
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(0x7fc0u);
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

// IEEE binary16, round-to-nearest-even, subnormals and overflow handled (ryg's float_to_half_fast3_rtne).
// Requires IEEE float addition in round-to-nearest mode without flush-to-zero (we never build with -ffast-math).
// NaN -> quiet NaN with the sign and the top payload bits kept (what F16C's vcvtps2ph does).
inline uint16_t float_to_half_bits(float f) {
  uint32_t u = f32_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= (127u + 16u) << 23) {                       // |f| >= 65536 (or inf / NaN): inf or NaN
    o = (u > 0x7f800000u) ? (0x7e00u | ((u >> 13) & 0x3ffu)) : 0x7c00u;
  } else if (u < (113u << 23)) {                       // |f| < 2^-14: result is subnormal or zero
    const uint32_t denorm_magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;  // 0.5f
    const float magic = f32_from_bits(denorm_magic_bits);
    const float r = f32_from_bits(u) + magic;          // aligns the 10 mantissa bits, RNE by the FPU
    o = f32_bits(r) - denorm_magic_bits;
  } else {                                             // normal half (65520 <= |f| < 65536 rounds up to inf)
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    u += mant_odd;
    o = u >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

// bfloat16 / binary16 bits -> float32, exact for every input (bf16 is the top half of a float; half subnormals are
// m * 2^-24, inf / NaN kept).
inline float bf16_bits_to_float(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t(h) & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return f32_from_bits(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    const float f = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -f : f;
  }
  return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

// Scale of block b of a double-quantized (nested) absmax, exactly reference.decode_nested_absmax: a float32 product,
// then a float32 sum -- two roundings, never fused (the CPU build uses -ffp-contract=off). Shared by the CPU
// dequantize and GEMV kernels.
struct NestedScale {
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;  // 256 entries
  float offset;
  int nested_shift;  // log2(nested_blocksize)
  float operator()(int64_t b) const {
    float s = nested_code[absmax_q[b]] * nested_absmax[b >> nested_shift];
    s = s + offset;
    return s;
  }
};

}  // namespace qkernels
