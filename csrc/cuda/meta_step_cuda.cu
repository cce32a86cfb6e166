#include "meta_step_cuda.h"

#include <cuda_runtime.h>

#include "../core/mlp_task.h"

namespace pymaml {
namespace {

// The thread-group policy of the per-task math on CUDA: the threads of one block.
struct BlockGroup {
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
};

// Per block: the task workspace, then θ_0 and α padded; per task (after all blocks): the padded
// meta-gradient, the padded step-size gradients and the step losses.
struct Layout {
  int64_t task_workspace, block_stride, per_task_stride;
};

__host__ __device__ inline Layout layout(const MlpSpec& s, const MetaStepShape& m) {
  const int points = m.support_points > m.query_points ? m.support_points : m.query_points;
  const int64_t PP = s.num_padded_params, S = m.steps;
  Layout out;
  out.task_workspace = TaskWorkspace<double>::size(s, points, m.steps);
  out.block_stride = out.task_workspace + PP + S * PP;
  out.per_task_stride = PP + (m.lr_grad ? S * PP : 0) + (S > 0 ? S : 1);
  return out;
}

template <class T>
__global__ void meta_step_kernel(MlpSpec s, MetaStepShape m, MetaBatch<T> b, MetaResult<T> r, T* workspace,
                                 unsigned int* counter) {
  const BlockGroup g;
  const Layout lay = layout(s, m);
  const int64_t P = s.num_params, PP = s.num_padded_params;
  const int S = m.steps, n0 = s.widths[0], nL = s.outputs();
  const bool labels = s.loss == Loss::cross_entropy;
  T* block_base = workspace + int64_t(blockIdx.x) * lay.block_stride;
  T* theta = block_base + lay.task_workspace;
  T* lrs = theta + PP;
  T* per_task = workspace + int64_t(gridDim.x) * lay.block_stride;
  for (int t = blockIdx.x; t < b.tasks; t += gridDim.x) {
    for (int64_t i = g.rank(); i < lay.block_stride; i += g.size()) block_base[i] = T(0);
    g.sync();
    to_padded(g, s, b.theta, theta);
    for (int step = 0; step < S; ++step) to_padded(g, s, b.lrs + int64_t(step) * P, lrs + int64_t(step) * PP);
    T* out = per_task + int64_t(t) * lay.per_task_stride;
    const Targets<T> support_y{labels ? nullptr : b.support_values + int64_t(t) * m.support_points * nL,
                               labels ? b.support_labels + int64_t(t) * m.support_points : nullptr};
    const Targets<T> query_y{labels ? nullptr : b.query_values + int64_t(t) * m.query_points * nL,
                             labels ? b.query_labels + int64_t(t) * m.query_points : nullptr};
    meta_step_task(g, s, m, theta, static_cast<const T*>(nullptr), lrs, b.step_weights, b.support_x + int64_t(t) * m.support_points * n0, support_y,
                   b.query_x + int64_t(t) * m.query_points * n0, query_y, block_base, r.task_losses + t,
                   r.pre_losses + t, out + PP + (m.lr_grad ? int64_t(S) * PP : 0), out,
                   m.lr_grad ? out + PP : nullptr);
    g.sync();
  }
  // The last block to finish takes the means over tasks, in task order.
  // Every thread's writes are made visible device-wide before the block counts itself done.
  __shared__ bool last;
  __threadfence();
  g.sync();
  if (g.rank() == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  g.sync();
  if (!last) return;
  __threadfence();
  const int64_t width = lay.per_task_stride;
  T* mean = block_base;  // this block's workspace is free now
  for (int64_t j = g.rank(); j < width; j += g.size()) {
    T sum = 0;
    for (int t = 0; t < b.tasks; ++t) sum += per_task[int64_t(t) * width + j];
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
    for (int t = 0; t < b.tasks; ++t) total += r.task_losses[t];
    r.meta_loss[0] = total / T(b.tasks);
    *counter = 0;
  }
}

}  // namespace

int64_t mlp_meta_step_cuda_workspace(const MlpSpec& spec, const MetaStepShape& shape, int tasks, int blocks) {
  const Layout lay = layout(spec, shape);
  return int64_t(blocks) * lay.block_stride + int64_t(tasks) * lay.per_task_stride;
}

template <class T>
const char* mlp_meta_step_cuda(const MlpSpec& spec, const MetaStepShape& shape, const MetaBatch<T>& batch,
                               const MetaResult<T>& result, T* workspace, unsigned int* counter, int blocks,
                               int threads_per_block, void* stream) {
  meta_step_kernel<T><<<blocks, threads_per_block, 0, static_cast<cudaStream_t>(stream)>>>(spec, shape, batch, result,
                                                                                          workspace, counter);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? "" : cudaGetErrorString(error);
}

template const char* mlp_meta_step_cuda<float>(const MlpSpec&, const MetaStepShape&, const MetaBatch<float>&,
                                               const MetaResult<float>&, float*, unsigned int*, int, int, void*);
template const char* mlp_meta_step_cuda<double>(const MlpSpec&, const MetaStepShape&, const MetaBatch<double>&,
                                                const MetaResult<double>&, double*, unsigned int*, int, int, void*);

}  // namespace pymaml
