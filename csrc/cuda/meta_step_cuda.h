// CUDA launcher of the fused meta-step of a network (core/network.h, every layer kind of
// core/layers/): one thread block per task (grid-stride over tasks), the per-task math of
// core/network_task.h unchanged over a BlockGroup, and the means over tasks taken in task order
// by the last block to finish (core/meta_step_grid.h), so that a meta-step is one kernel launch.
// The `cuda` backend hands it MLPs only until bench/gpu_check.py's conv_correctness section has
// passed on a GPU; the op itself takes any encoded network.
#pragma once

#include <cstdint>
#include <string>

#include "../core/common.h"
#include "../cpu/meta_step_cpu.h"

namespace pymaml {

// The block size the host launches with and the kernel's __launch_bounds__: the per-task loops
// split points, pixels, channels, units and parameters over the ranks.
constexpr int kCudaThreadsPerBlock = 128;

// The workspace a launch needs: grid_workspace_elements (csrc/core/meta_step_grid.h).

// Launches on `stream` (a cudaStream_t of `device`) with `device` current, and restores the
// device that was current; returns an empty string or the error. `counter` (device memory) is
// zero before the launch and the kernel leaves it zero; no other launch in flight may use it.
// labels_ok (cross-entropy, else null): one int the kernel sets to 1 when every label is in
// range, else 0 (the tasks with a label outside then have NaN results).
template <class T>
std::string meta_step_cuda(const Network& spec, const MetaStepShape& shape, const MetaBatch<T>& batch,
                           const MetaResult<T>& result, T* workspace, unsigned int* counter, int* labels_ok,
                           int device, int blocks, int threads_per_block, void* stream);

}  // namespace pymaml
