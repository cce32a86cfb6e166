// CUDA launcher of the fused MLP meta-step: one thread block per task (grid-stride over tasks),
// the per-task math of core/mlp_task.h unchanged over a BlockGroup, and the means over tasks
// taken in task order by the last block to finish, so that a meta-step is one kernel launch.
#pragma once

#include <cstdint>

#include "../core/common.h"
#include "../cpu/meta_step_cpu.h"

namespace pymaml {

// Elements of T the launcher needs in `workspace` (device memory, any content) for `blocks`
// blocks, and bytes of `counter` (device memory, zeroed once; the kernel leaves it zeroed).
int64_t mlp_meta_step_cuda_workspace(const MlpSpec& spec, const MetaStepShape& shape, int tasks, int blocks);

// Launches on `stream` (a cudaStream_t); returns an empty string or the CUDA error message.
template <class T>
const char* mlp_meta_step_cuda(const MlpSpec& spec, const MetaStepShape& shape, const MetaBatch<T>& batch,
                               const MetaResult<T>& result, T* workspace, unsigned int* counter, int blocks,
                               int threads_per_block, void* stream);

}  // namespace pymaml
