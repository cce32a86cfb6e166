// The grid of a one-launch meta-step: groups of threads (CUDA blocks) take the tasks in turn
// (grid-stride), each task's meta-step by meta_step_task, and the last group to finish takes the
// means over tasks in task order; the products come from the launcher (Products, csrc/core/products.h).
// Written once for the CUDA kernel (csrc/cuda/meta_step_cuda.cu:
// a BlockGroup and CudaGrid) and for the CPU thread-group harness (csrc/tools/group_harness.cpp:
// groups of std::threads), so that the harness runs the handoff the GPU runs.
//
// The grid policy Grid gives:
//   block(), blocks()        this group's index and the number of groups;
//   last_flag()              a bool shared by the group's threads (CUDA: __shared__);
//   arrive(counter)          one thread's atomic increment of the completion counter, with
//                            acquire-release ordering at the scope of the whole grid; returns the
//                            value before the increment;
//   reset(counter)           puts the counter back to zero for the next launch;
//   load(p)                  a read of a value another group wrote (CUDA: bypasses L1).
#pragma once

#include <cstdint>

#include "network_task.h"

namespace pymaml {

// The workspace of a launch: per group, the task workspace, then θ_0 and α padded; per task
// (after all groups), the padded meta-gradient, the padded step-size gradients, the step losses
// and a marker that the task's labels were in range (cross-entropy; 1 or 0).
struct GridLayout {
  int64_t task_workspace, block_stride, per_task_stride, labels_slot;
};

PYMAML_HD GridLayout grid_layout(const Network& s, const MetaStepShape& m) {
  const int64_t PP = s.num_padded_params, S = m.steps;
  GridLayout out;
  out.task_workspace = TaskWorkspace<double>::size(s, m.support_points, m.query_points, m.steps);
  out.block_stride = out.task_workspace + PP + S * PP;
  out.labels_slot = PP + (m.lr_grad ? S * PP : 0) + (S > 0 ? S : 1);
  out.per_task_stride = out.labels_slot + 1;
  return out;
}

// Elements of the workspace a launch of `blocks` groups over `tasks` tasks needs.
inline int64_t grid_workspace_elements(const Network& s, const MetaStepShape& m, int tasks, int blocks) {
  const GridLayout lay = grid_layout(s, m);
  return int64_t(blocks) * lay.block_stride + int64_t(tasks) * lay.per_task_stride;
}

// Whether every label of `points` points lies in [0, classes).
PYMAML_HD bool labels_in_range(const int64_t* labels, int points, int classes) {
  bool inside = true;
  for (int k = 0; k < points; ++k) inside = inside && labels[k] >= 0 && labels[k] < int64_t(classes);
  return inside;
}

// One group's part of the launch. `workspace` holds grid_workspace_elements(s, m, b.tasks,
// grid.blocks()) values (any content); `counter` is zero at the start and zero again when the
// last group returns. b and r are a MetaBatch<T> and a MetaResult<T> (csrc/cpu/meta_step_cpu.h).
// labels_ok (cross-entropy only, else null) receives 1 when every task's labels were in
// [0, n_L), else 0; a task with a label outside gets NaN losses and gradients and is not run, so
// that no label indexes outside the logits.
template <class Products, class T, class G, class Grid, class Batch, class Result>
PYMAML_HD void meta_step_grid(const G& g, const Grid& grid, const Network& s, const MetaStepShape& m, const Batch& b,
                              const Result& r, T* workspace, unsigned int* counter, int* labels_ok) {
  const GridLayout lay = grid_layout(s, m);
  const int64_t P = s.num_params, PP = s.num_padded_params;
  const int S = m.steps, n0 = s.inputs(), nL = s.outputs();
  const bool labels = s.loss == Loss::cross_entropy;
  T* block_base = workspace + int64_t(grid.block()) * lay.block_stride;
  T* theta = block_base + lay.task_workspace;
  T* lrs = theta + PP;
  T* per_task = workspace + int64_t(grid.blocks()) * lay.block_stride;
  for (int t = grid.block(); t < b.tasks; t += grid.blocks()) {
    T* out = per_task + int64_t(t) * lay.per_task_stride;
    const int64_t* support_labels = labels ? b.support_labels + int64_t(t) * m.support_points : nullptr;
    const int64_t* query_labels = labels ? b.query_labels + int64_t(t) * m.query_points : nullptr;
    // Rank 0 checks the labels (2K loads, against the whole meta-step) and leaves the verdict in
    // the task's row, where the other ranks read it after the barrier and the last group later.
    if (g.rank() == 0) {
      const bool inside = !labels || (labels_in_range(support_labels, m.support_points, nL) &&
                                      labels_in_range(query_labels, m.query_points, nL));
      out[lay.labels_slot] = inside ? T(1) : T(0);
    }
    g.sync();
    if (out[lay.labels_slot] == T(0)) {
      for (int64_t i = g.rank(); i < lay.labels_slot; i += g.size()) out[i] = T(NAN);
      if (g.rank() == 0) r.task_losses[t] = r.pre_losses[t] = T(NAN);
      g.sync();
      continue;
    }
    for (int64_t i = g.rank(); i < lay.block_stride; i += g.size()) block_base[i] = T(0);
    g.sync();
    to_padded(g, s, b.theta, theta);
    for (int step = 0; step < S; ++step) to_padded(g, s, b.lrs + int64_t(step) * P, lrs + int64_t(step) * PP);
    const Targets<T> support_y{labels ? nullptr : b.support_values + int64_t(t) * m.support_points * nL,
                               support_labels};
    const Targets<T> query_y{labels ? nullptr : b.query_values + int64_t(t) * m.query_points * nL, query_labels};
    meta_step_task<Products>(g, s, m, theta, static_cast<const T*>(nullptr), lrs, b.step_weights,
                   b.support_x + int64_t(t) * m.support_points * n0, support_y,
                   b.query_x + int64_t(t) * m.query_points * n0, query_y, block_base, r.task_losses + t,
                   r.pre_losses + t, out + PP + (m.lr_grad ? int64_t(S) * PP : 0), out,
                   m.lr_grad ? out + PP : nullptr);
    g.sync();
  }
  // The handoff: every thread's results are stored and the barrier makes them rank 0's; rank 0
  // releases them to the grid with its increment, which also acquires the results of every group
  // that counted itself before; the last group's other ranks see them after the second barrier.
  g.sync();
  if (g.rank() == 0) grid.last_flag() = grid.arrive(counter) == unsigned(grid.blocks() - 1);
  g.sync();
  if (!grid.last_flag()) return;
  const int64_t width = lay.per_task_stride;
  T* mean = block_base;  // this group's workspace is free now
  for (int64_t j = g.rank(); j < lay.labels_slot; j += g.size()) {
    T sum = 0;
    for (int t = 0; t < b.tasks; ++t) sum += grid.load(per_task + int64_t(t) * width + j);
    mean[j] = sum / T(b.tasks);
  }
  g.sync();
  from_padded(g, s, mean, r.grad_theta);
  if (m.lr_grad) {
    for (int step = 0; step < S; ++step) from_padded(g, s, mean + PP + int64_t(step) * PP, r.grad_lrs + int64_t(step) * P);
  }
  const T* step_means = mean + PP + (m.lr_grad ? int64_t(S) * PP : 0);
  for (int step = g.rank(); step < S; step += g.size()) r.step_losses[step] = step_means[step];
  if (g.rank() == 0) {
    T total = 0;
    bool inside = true;
    for (int t = 0; t < b.tasks; ++t) {
      total += grid.load(r.task_losses + t);
      inside = inside && grid.load(per_task + int64_t(t) * width + lay.labels_slot) != T(0);
    }
    r.meta_loss[0] = total / T(b.tasks);
    if (labels_ok) *labels_ok = inside ? 1 : 0;
    grid.reset(counter);
  }
}

}  // namespace pymaml
