#include "meta_step_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <vector>

#include "cpu_kernels.h"
#include "register_tiles.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace pymaml {
namespace {

using cpu::HvpArgs;
using cpu::KernelTable;
using cpu::TaskArgs;

// Every level this build compiled, best first, whether or not the running CPU supports it.
std::vector<const KernelTable*> compiled_kernels() {
  std::vector<const KernelTable*> tables;
#if defined(PYMAML_CPU_X86_LEVELS)
  tables.push_back(&cpu::kX86_64_v4Kernels);
  tables.push_back(&cpu::kX86_64_v3Kernels);
#endif
  tables.push_back(&cpu::kBaselineKernels);
  return tables;
}

// The built levels, best first, that the running CPU supports.
std::vector<const KernelTable*> usable_kernels() {
  std::vector<const KernelTable*> tables;
#if defined(PYMAML_CPU_X86_LEVELS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) tables.push_back(&cpu::kX86_64_v4Kernels);
  if (__builtin_cpu_supports("x86-64-v3")) tables.push_back(&cpu::kX86_64_v3Kernels);
#endif
  tables.push_back(&cpu::kBaselineKernels);
  return tables;
}

std::atomic<const KernelTable*> chosen_kernels{nullptr};

const KernelTable& kernels() {
  const KernelTable* table = chosen_kernels.load(std::memory_order_acquire);
  if (table == nullptr) {
    table = usable_kernels().front();
    chosen_kernels.store(table, std::memory_order_release);
  }
  return *table;
}

inline void dispatch(const TaskArgs<float>& a) { kernels().task_f32(a); }
inline void dispatch(const TaskArgs<double>& a) { kernels().task_f64(a); }
inline void dispatch(const HvpArgs<float>& a) { kernels().hvp_f32(a); }
inline void dispatch(const HvpArgs<double>& a) { kernels().hvp_f64(a); }

// The calling thread's workspace for the meta-step of one layout (network, points, steps), kept
// between calls and zeroed only when the layout changes: no routine sums a padding lane into a
// real value, so what a call leaves in the padding (NaN, after non-finite parameters) is harmless. Allocating and zeroing it
// on every call cost about 8% of the sinusoid meta-step.
template <class T>
T* cached_workspace(const Network& spec, int support_points, int query_points, int steps, size_t elements) {
  struct Cache {
    std::vector<T> buffer;
    std::vector<int64_t> key;
  };
  thread_local Cache cache;
  std::vector<int64_t> key{spec.count, support_points, query_points, steps, int64_t(elements)};
  for (int i = 0; i < spec.count; ++i) {
    const Layer& layer = spec.layers[i];
    key.insert(key.end(), {int64_t(layer.kind), layer.in, layer.out, layer.bias});
  }
  if (key != cache.key) {
    cache.buffer.assign(elements, T(0));
    cache.key = std::move(key);
  }
  return cache.buffer.data();
}

inline int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// At most one thread per tasks/threads share of about 2 MFLOP: an OpenMP fork and join costs a
// few µs on idle cores and far more when another process holds them (4 HVPs of a 2-8-1 MLP took
// 0.03 ms on one thread and 11.6 ms on two with the other core busy). flops_per_task is an estimate.
inline int useful_threads(int threads, int tasks, double flops_per_task) {
  constexpr double kFlopsPerThread = 2e6;
  const double useful = std::max(1.0, std::floor(double(tasks) * flops_per_task / kFlopsPerThread));
  return int(std::min<double>(std::max(1, std::min(threads, tasks)), useful));
}

// Sum over tasks in task order, divided by the task count: out[j] = Σ_t per_task[t·n + j] / T.
// Each j is summed in the same order whatever the thread count; rows are read contiguously.
template <class T>
void mean_over_tasks(const T* per_task, int tasks, int64_t n, T* out, int threads) {
  constexpr int64_t kBlock = 1024;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(threads) schedule(static) if (n * tasks > 65536)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t begin = block * kBlock, end = std::min(n, begin + kBlock);
    for (int64_t j = begin; j < end; ++j) out[j] = 0;
    for (int t = 0; t < tasks; ++t) {
      const T* row = per_task + int64_t(t) * n;
      PYMAML_SIMD
      for (int64_t j = begin; j < end; ++j) out[j] += row[j];
    }
    for (int64_t j = begin; j < end; ++j) out[j] /= T(tasks);
  }
}

}  // namespace

template <class T>
void meta_step_cpu(const Network& spec, const MetaStepShape& shape, const MetaBatch<T>& batch,
                       const MetaResult<T>& result, int threads) {
  const int tasks = batch.tasks, S = shape.steps;
  const int64_t P = spec.num_params, PP = spec.num_padded_params;
  const SerialGroup g;
  // Per task: S support passes with HVPs (~12 flops per parameter and point), S + 1 query passes.
  threads = useful_threads(threads, tasks, 12.0 * double(P) * (double(S) * shape.support_points +
                                                               double(S + 1) * shape.query_points));
  const int Ks = shape.support_points, Kq = shape.query_points;
  const int64_t workspace_size = TaskWorkspace<T>::size(spec, Ks, Kq, S);
  T* workspace = cached_workspace<T>(spec, Ks, Kq, S, size_t(threads) * workspace_size);
  std::vector<T> theta_padded(PP), lrs_padded(size_t(S) * PP);
  to_padded(g, spec, batch.theta, theta_padded.data());
  std::vector<T> wt0(spec.wt_size);
  transpose_weights<cpu::CpuProducts>(g, spec, theta_padded.data(), wt0.data());
  for (int step = 0; step < S; ++step) to_padded(g, spec, batch.lrs + int64_t(step) * P, lrs_padded.data() + step * PP);
  // Every padded slot of a task's meta-gradient is written, so it starts uninitialized.
  const std::unique_ptr<T[]> task_grads(new T[size_t(tasks) * PP]);
  std::vector<T> task_lr_grads(shape.lr_grad ? size_t(tasks) * S * PP : 0);
  std::vector<T> task_step_losses(size_t(tasks) * std::max(S, 1));

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int t = 0; t < tasks; ++t) {
    TaskArgs<T> args{&spec, &shape, &batch, theta_padded.data(), wt0.data(), lrs_padded.data(), t,
                     workspace + thread_index() * workspace_size, result.task_losses + t,
                     result.pre_losses + t, task_step_losses.data() + int64_t(t) * std::max(S, 1),
                     task_grads.get() + int64_t(t) * PP,
                     shape.lr_grad ? task_lr_grads.data() + int64_t(t) * S * PP : nullptr};
    dispatch(args);
  }

  std::vector<T> mean(PP);
  mean_over_tasks(task_grads.get(), tasks, PP, mean.data(), threads);
  from_padded(g, spec, mean.data(), result.grad_theta);
  if (shape.lr_grad) {
    for (int step = 0; step < S; ++step) {
      std::vector<T> per_task(size_t(tasks) * PP);
      for (int t = 0; t < tasks; ++t) {
        std::copy_n(task_lr_grads.data() + (int64_t(t) * S + step) * PP, PP, per_task.data() + int64_t(t) * PP);
      }
      mean_over_tasks(per_task.data(), tasks, PP, mean.data(), threads);
      from_padded(g, spec, mean.data(), result.grad_lrs + int64_t(step) * P);
    }
  }
  for (int step = 0; step < S; ++step) {
    T sum = 0;
    for (int t = 0; t < tasks; ++t) sum += task_step_losses[size_t(t) * S + step];
    result.step_losses[step] = sum / T(tasks);
  }
  T total = 0;
  for (int t = 0; t < tasks; ++t) total += result.task_losses[t];
  result.meta_loss[0] = total / T(tasks);
}

template <class T>
void hvp_cpu(const Network& spec, int tasks, int points, const T* theta, const T* v, const T* x,
                 const T* values, const int64_t* labels, T* hv, T* grad, int threads) {
  threads = useful_threads(threads, tasks, 8.0 * double(spec.num_params) * points);  // forward, backward, R-op
  const int64_t P = spec.num_params, PP = spec.num_padded_params, n0 = spec.inputs(), nL = spec.outputs();
  const int64_t workspace_size = TaskWorkspace<T>::size(spec, points, points, 0) + 4 * PP;
  std::vector<T> workspace(size_t(threads) * workspace_size);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int t = 0; t < tasks; ++t) {
    T* base = workspace.data() + thread_index() * workspace_size;
    const Targets<T> y{values ? values + int64_t(t) * points * nL : nullptr, labels ? labels + int64_t(t) * points : nullptr};
    HvpArgs<T> args{&spec, points, theta + t * P, v + t * P, x + int64_t(t) * points * n0, y,
                    base, base + TaskWorkspace<T>::size(spec, points, points, 0), hv + t * P, grad ? grad + t * P : nullptr};
    dispatch(args);
  }
}

template void hvp_cpu<float>(const Network&, int, int, const float*, const float*, const float*, const float*,
                                 const int64_t*, float*, float*, int);
template void hvp_cpu<double>(const Network&, int, int, const double*, const double*, const double*,
                                  const double*, const int64_t*, double*, double*, int);

template void meta_step_cpu<float>(const Network&, const MetaStepShape&, const MetaBatch<float>&,
                                       const MetaResult<float>&, int);
template void meta_step_cpu<double>(const Network&, const MetaStepShape&, const MetaBatch<double>&,
                                        const MetaResult<double>&, int);

std::vector<std::string> cpu_levels() {
  std::vector<std::string> names;
  for (const KernelTable* table : usable_kernels()) names.push_back(table->level);
  return names;
}

std::vector<std::string> compiled_cpu_levels() {
  std::vector<std::string> names;
  for (const KernelTable* table : compiled_kernels()) names.push_back(table->level);
  return names;
}

std::string cpu_level() { return kernels().level; }

void set_cpu_level(const std::string& level) {
  for (const KernelTable* table : usable_kernels()) {
    if (level == table->level) {
      chosen_kernels.store(table, std::memory_order_release);
      return;
    }
  }
  std::string known;
  for (const std::string& name : cpu_levels()) known += (known.empty() ? "" : ", ") + name;
  for (const KernelTable* table : compiled_kernels()) {
    if (level == table->level) {
      throw std::invalid_argument("CPU level '" + level + "' is compiled in, but this CPU lacks its instructions; it runs: " +
                                  known);
    }
  }
  std::string compiled;
  for (const std::string& name : compiled_cpu_levels()) compiled += (compiled.empty() ? "" : ", ") + name;
  throw std::invalid_argument("CPU level '" + level + "' is not one this build has (" + compiled +
                              "); this CPU runs: " + known);
}

}  // namespace pymaml
