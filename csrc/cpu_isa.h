// The instruction-set variants of the CPU kernels, chosen at load time by the processor
// (GCC function multiversioning), never by the build host's -march.
#pragma once

#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LRFUSE_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LRFUSE_CPU_CLONES
#endif

namespace lrfuse {

// The variant the resolver picks: "x86-64-v4" (AVX-512), "x86-64-v3" (AVX2) or "default".
inline std::string cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
#endif
  return "default";
}

}  // namespace lrfuse
