// The per-task routines for x86-64-v3 CPUs (AVX2, FMA); CMakeLists.txt compiles this unit with
// -march=x86-64-v3.
#define PYMAML_CPU_KERNEL_TABLE kX86_64_v3Kernels
#define PYMAML_CPU_LEVEL_NAME "x86-64-v3"
#include "cpu_kernels_impl.h"
