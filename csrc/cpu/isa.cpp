#include "isa.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace qkernels {
namespace cpu {

Isa best_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::avx2;
#endif
  return Isa::scalar;
}

Isa active_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("QKERNELS_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  Isa want;
  if (std::strcmp(env, "scalar") == 0) want = Isa::scalar;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::avx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::avx512;
  else
    throw std::invalid_argument(std::string("QKERNELS_CPU_ISA must be scalar, avx2 or avx512 (got '") + env + "')");
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> v{"scalar"};
  const Isa best = best_isa();
  if (static_cast<int>(best) >= static_cast<int>(Isa::avx2)) v.push_back("avx2");
  if (best == Isa::avx512) v.push_back("avx512");
  return v;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "?";
}

}  // namespace cpu
}  // namespace qkernels
