// What this build of the core was compiled with; reported by pymaml.build_info().
#pragma once

#include <string>

namespace pymaml {

inline std::string compiler_description() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

inline bool openmp_enabled() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace pymaml

namespace pymaml {

// Which clone of the per-task CPU kernel the running CPU gets (see cpu/meta_step_cpu.cpp).
inline const char* cpu_dispatch_description() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2, FMA)";
  return "x86-64 baseline";
#else
  return "single build (no target clones)";
#endif
}

}  // namespace pymaml
