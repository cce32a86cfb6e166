// The per-task entry points of the CPU launcher, compiled once per x86-64 ISA level
// (kernels_*.cpp include cpu_kernels_impl.h with different -march flags) and chosen at run time
// from the running CPU (meta_step_cpu.cpp). Nothing here is tuned to the build machine.
#pragma once

#include <cstdint>

#include "../core/common.h"
#include "../core/network_task.h"
#include "meta_step_cpu.h"

namespace pymaml {
namespace cpu {

template <class T>
struct TaskArgs {
  const Network* spec;
  const MetaStepShape* shape;
  const MetaBatch<T>* batch;
  const T* theta_padded;  // [PP]
  const T* wt0;           // θ_0's transposed weights (transpose_weights)
  const T* lrs_padded;    // [S, PP]
  int task;
  T* workspace;
  T* task_loss;
  T* pre_loss;
  T* step_losses;
  T* grad_theta;  // [PP]
  T* grad_lrs;    // [S, PP] or null
};

template <class T>
struct HvpArgs {
  const Network* spec;
  int points;
  const T* theta;  // flat [P]
  const T* v;      // flat [P]
  const T* x;
  Targets<T> y;
  T* workspace;
  T* scratch;  // 4·PP zeroed: θ, v, hv, grad padded
  T* hv;       // flat [P]
  T* grad;     // flat [P] or null
};

// One ISA level's build of the per-task routines.
struct KernelTable {
  const char* level;  // "x86-64-v4", "x86-64-v3" or "baseline"
  void (*task_f32)(const TaskArgs<float>&);
  void (*task_f64)(const TaskArgs<double>&);
  void (*hvp_f32)(const HvpArgs<float>&);
  void (*hvp_f64)(const HvpArgs<double>&);
};

extern const KernelTable kBaselineKernels;
#if defined(PYMAML_CPU_X86_LEVELS)
extern const KernelTable kX86_64_v3Kernels;
extern const KernelTable kX86_64_v4Kernels;
#endif

}  // namespace cpu
}  // namespace pymaml
