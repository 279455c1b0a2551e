// Run-time CPU ISA selection for the CPU kernels.
#pragma once

#include <string>
#include <vector>

namespace qkernels {
namespace cpu {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

// Best ISA this CPU supports: avx512 needs AVX-512 F+BW+VL; avx2 needs AVX2+FMA+F16C.
Isa best_isa();

// ISA a kernel call uses: best_isa(), lowered by the environment variable QKERNELS_CPU_ISA=scalar|avx2|avx512
// (read on EVERY call, so tests can switch paths at run time; a request above best_isa() is capped at best_isa();
// an unknown value throws std::invalid_argument).
Isa active_isa();

// The ISAs usable on this CPU, lowest first, e.g. {"scalar", "avx2", "avx512"}.
std::vector<std::string> available_isas();

const char* isa_name(Isa isa);

}  // namespace cpu
}  // namespace qkernels
