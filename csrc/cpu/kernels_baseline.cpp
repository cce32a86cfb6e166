// The per-task routines for any CPU of the target architecture (compiled with the default flags).
#define PYMAML_CPU_KERNEL_TABLE kBaselineKernels
#define PYMAML_CPU_LEVEL_NAME "baseline"
#include "cpu_kernels_impl.h"
