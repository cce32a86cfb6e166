// The per-task routines for x86-64-v4 CPUs (AVX-512); CMakeLists.txt compiles this unit with
// -march=x86-64-v4.
#define PYMAML_CPU_KERNEL_TABLE kX86_64_v4Kernels
#define PYMAML_CPU_LEVEL_NAME "x86-64-v4"
#include "cpu_kernels_impl.h"
