// CPU launcher of the fused meta-step of a network (an MLP from the Python side): OpenMP over
// tasks, one SerialGroup per task.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../core/common.h"
#include "../core/network_task.h"

namespace pymaml {

// A whole meta-batch. Per-task inputs are contiguous: support_x [T, Ks, n_0], support_y
// [T, Ks, n_L] (MSE) or labels [T, Ks] (cross-entropy), and likewise for the query set.
template <class T>
struct MetaBatch {
  int tasks;
  const T* theta;          // [P]
  const T* lrs;            // [S, P]
  const T* step_weights;   // [S]
  const T* support_x;
  const T* support_values;
  const int64_t* support_labels;
  const T* query_x;
  const T* query_values;
  const int64_t* query_labels;
};

// Outputs, means over tasks except task_losses and pre_losses ([T] each).
template <class T>
struct MetaResult {
  T* meta_loss;     // [1]
  T* task_losses;   // [T]
  T* pre_losses;    // [T]
  T* step_losses;   // [S]
  T* grad_theta;    // [P]
  T* grad_lrs;      // [S, P] or null
};

// Results do not depend on `threads`: each task is computed alone and the means over tasks
// are summed in task order.
template <class T>
void meta_step_cpu(const Network& spec, const MetaStepShape& shape, const MetaBatch<T>& batch,
                       const MetaResult<T>& result, int threads);

}  // namespace pymaml

namespace pymaml {

// Batched Hessian-vector products: hv[t] = ∇²L(θ_t; x_t, y_t) v[t] for every task t, and the
// gradients ∇L(θ_t) into grad[t] when grad is not null. theta, v, hv, grad are [T, P].
template <class T>
void hvp_cpu(const Network& spec, int tasks, int points, const T* theta, const T* v, const T* x,
                 const T* values, const int64_t* labels, T* hv, T* grad, int threads);

}  // namespace pymaml

namespace pymaml {

// The ISA levels of the per-task routines that this build has and the running CPU supports,
// best first ("x86-64-v4", "x86-64-v3", "baseline"); the first is used unless set_cpu_level
// chose another. set_cpu_level throws std::invalid_argument for a level not in that list.
std::vector<std::string> cpu_levels();
// Every level this build has, best first, including those the running CPU cannot run.
std::vector<std::string> compiled_cpu_levels();
std::string cpu_level();
void set_cpu_level(const std::string& level);

}  // namespace pymaml
