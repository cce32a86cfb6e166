// The body of one ISA level's unit: define PYMAML_CPU_KERNEL_TABLE and PYMAML_CPU_LEVEL_NAME,
// then include this file. Every function here and in the core headers it includes has internal
// linkage, so each unit keeps the code compiled for its own level.
#include "cpu_kernels.h"

// The products: the register tiles of this unit's ISA level, or, in a build that defines
// PYMAML_HOST_RUNS_CUDA_PATHS, the loops a CUDA block runs (one output per rank), so that the
// oracle check covers those loops without a GPU (tests/test_group_harness.py).
#if defined(PYMAML_HOST_RUNS_CUDA_PATHS)
#include "../cuda/block_products.h"
#else
#include "register_tiles.h"
#endif

namespace pymaml {
namespace cpu {
namespace {

#if defined(PYMAML_HOST_RUNS_CUDA_PATHS)
using UnitProducts = BlockProducts;
#else
using UnitProducts = CpuProducts;
#endif

template <class T>
void run_task(const TaskArgs<T>& a) {
  const Network& s = *a.spec;
  const MetaStepShape& m = *a.shape;
  const MetaBatch<T>& b = *a.batch;
  const int t = a.task, n0 = s.inputs(), nL = s.outputs();
  const bool labels = s.loss == Loss::cross_entropy;
  const Targets<T> support_y{labels ? nullptr : b.support_values + int64_t(t) * m.support_points * nL,
                             labels ? b.support_labels + int64_t(t) * m.support_points : nullptr};
  const Targets<T> query_y{labels ? nullptr : b.query_values + int64_t(t) * m.query_points * nL,
                           labels ? b.query_labels + int64_t(t) * m.query_points : nullptr};
  meta_step_task<UnitProducts>(SerialGroup{}, s, m, a.theta_padded, a.wt0, a.lrs_padded, b.step_weights,
                 b.support_x + int64_t(t) * m.support_points * n0, support_y,
                 b.query_x + int64_t(t) * m.query_points * n0, query_y, a.workspace, a.task_loss, a.pre_loss,
                 a.step_losses, a.grad_theta, a.grad_lrs);
}

template <class T>
void run_hvp(const HvpArgs<T>& a) {
  const Network& s = *a.spec;
  const SerialGroup g;
  const int64_t PP = s.num_padded_params;
  T *theta = a.scratch, *v = a.scratch + PP, *hv = a.scratch + 2 * PP, *grad = a.scratch + 3 * PP;
  const TaskWorkspace<T> ws(a.workspace, s, a.points, a.points, 0);
  to_padded(g, s, a.theta, theta);
  to_padded(g, s, a.v, v);
  transpose_weights<UnitProducts>(g, s, theta, ws.WTs);
  network_hvp<UnitProducts>(g, s, theta, ws.WTs, v, a.x, a.y, a.points, ws, a.grad ? grad : nullptr, hv);
  from_padded(g, s, hv, a.hv);
  if (a.grad) from_padded(g, s, grad, a.grad);
}

}  // namespace

extern const KernelTable PYMAML_CPU_KERNEL_TABLE;
const KernelTable PYMAML_CPU_KERNEL_TABLE = {PYMAML_CPU_LEVEL_NAME, &run_task<float>, &run_task<double>,
                                             &run_hvp<float>, &run_hvp<double>};

}  // namespace cpu
}  // namespace pymaml
