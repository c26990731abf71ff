// Which instruction sets the CPU kernels may use at run time, beyond the AVX2 of the build.
#pragma once

#include <cstdlib>
#include <cstring>

namespace palm_cpu {

// The AVX-512 paths run where the CPU has AVX-512F, unless PALM_CPU_AVX512=0: that keeps
// every kernel to its AVX2 path, as on the CPUs without AVX-512, so that those paths can be
// checked and measured on a machine that has it.
inline bool avx512_enabled() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool enabled = [] {
    const char* setting = std::getenv("PALM_CPU_AVX512");
    return __builtin_cpu_supports("avx512f") && !(setting && std::strcmp(setting, "0") == 0);
  }();
  return enabled;
#else
  return false;
#endif
}

}  // namespace palm_cpu
