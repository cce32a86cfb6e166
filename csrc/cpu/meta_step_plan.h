// The held meta-step of one network on the CPU (pymaml.backends.cpp._Plan through the binding's
// PlanBinding, which checks the buffers and keeps their DLPack views alive): the parameter, gradient
// and, optionally, Adam buffers are given once as raw pointers, and each run passes only the
// batch. θ is gathered from the parameters, the meta-gradient scattered into the gradient
// buffers and, with Adam, the step taken in place and the step counters advanced. α_s = inner_lr
// everywhere; the loss is L_query(θ_S).
// Concurrent runs of one plan take turns (they read and write the same parameters, gradients and
// moments); each has its own θ, losses and scratch buffers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "adam.h"
#include "meta_step_cpu.h"

namespace pymaml {

// One buffer of T values (a parameter, its gradient or a moment).
struct HeldBuffer {
  void* data;
  int64_t numel;
};

// A parameter's Adam step counter: one float32 or float64 value (torch's Adam `step`).
struct StepCounter {
  void* data;
  bool is_f32;

  double value() const { return is_f32 ? double(*static_cast<float*>(data)) : *static_cast<double*>(data); }
  void set(int64_t step) const {
    if (is_f32) {
      *static_cast<float*>(data) = float(step);
    } else {
      *static_cast<double*>(data) = double(step);
    }
  }
};

// Adam's buffers: per parameter its two moments and its step counter.
struct HeldAdam {
  std::vector<HeldBuffer> exp_avg, exp_avg_sq;
  std::vector<StepCounter> counters;
};

class MetaStepPlan {
 public:
  // params and grads: one buffer each per parameter, in θ's order, of θ's dtype (float32 when
  // is_f32, else float64); adam: null, or the moments and counters of every parameter.
  MetaStepPlan(const Network& spec, bool is_f32, bool first_order, int steps, double inner_lr,
               std::vector<HeldBuffer> params, std::vector<HeldBuffer> grads, const HeldAdam* adam)
      : spec_(spec), is_f32_(is_f32), first_order_(first_order), steps_(steps), params_(std::move(params)),
        grads_(std::move(grads)), has_adam_(adam != nullptr) {
    if (adam) adam_ = *adam;
    const size_t bytes = is_f32 ? sizeof(float) : sizeof(double), P = size_t(spec_.num_params);
    lrs_.resize(size_t(steps) * P * bytes);
    step_weights_.resize(size_t(steps) * bytes);
    if (is_f32) {
      fill_constants<float>(inner_lr);
    } else {
      fill_constants<double>(inner_lr);
    }
  }

  bool has_adam() const { return has_adam_; }

  // The meta-step (and, with Adam, the step with these hyperparameters; settings.step is taken
  // from the counters) on the batch's raw buffers, holding the plan's lock; losses: [T + 2] of
  // θ's dtype: the meta-loss, the mean pre-adaptation loss, then the per-task losses. Returns ""
  // or the error.
  std::string run(int tasks, int support_points, int query_points, const void* support_x, const void* support_y,
                  const void* query_x, const void* query_y, void* losses, int threads, AdamSettings adam) {
    const MetaStepShape shape{steps_, support_points, query_points, first_order_, false, false};
    const std::lock_guard<std::mutex> lock(mutex_);
    if (is_f32_) {
      return run_typed<float>(shape, tasks, support_x, support_y, query_x, query_y, static_cast<float*>(losses),
                              threads, adam);
    }
    return run_typed<double>(shape, tasks, support_x, support_y, query_x, query_y, static_cast<double*>(losses),
                             threads, adam);
  }

 private:
  template <class T>
  void fill_constants(double inner_lr) {
    std::fill_n(reinterpret_cast<T*>(lrs_.data()), lrs_.size() / sizeof(T), T(inner_lr));
    T* weights = reinterpret_cast<T*>(step_weights_.data());
    std::fill_n(weights, steps_, T(0));
    if (steps_ > 0) weights[steps_ - 1] = T(1);
  }

  // The Adam step to take: one more than the counters, which must agree; 0 and the reason if not.
  int64_t next_adam_step(std::string& error) const {
    const double first = adam_.counters[0].value();
    for (const StepCounter& counter : adam_.counters) {
      if (counter.value() != first) {
        error = "the parameters' Adam step counters differ";
        return 0;
      }
    }
    if (!(first >= 0) || first != std::floor(first)) {
      error = "invalid Adam step counter";
      return 0;
    }
    return int64_t(first) + 1;
  }

  template <class T>
  std::string run_typed(const MetaStepShape& shape, int tasks, const void* sx, const void* sy, const void* qx,
                        const void* qy, T* losses, int threads, AdamSettings adam) {
    std::string error;
    if (has_adam_) {
      adam.step = next_adam_step(error);
      if (!error.empty()) return error;
    }
    const bool labels = spec_.loss == Loss::cross_entropy;
    const size_t P = size_t(spec_.num_params);
    std::vector<T> theta(P), pre(static_cast<size_t>(tasks)), step_losses(static_cast<size_t>(steps_));
    std::vector<T> gathered(grads_.size() == 1 ? 0 : P);
    T* cursor = theta.data();
    for (const HeldBuffer& param : params_) cursor = std::copy_n(static_cast<const T*>(param.data), param.numel, cursor);
    const MetaBatch<T> batch{tasks,
                             theta.data(),
                             reinterpret_cast<const T*>(lrs_.data()),
                             reinterpret_cast<const T*>(step_weights_.data()),
                             static_cast<const T*>(sx),
                             labels ? nullptr : static_cast<const T*>(sy),
                             labels ? static_cast<const int64_t*>(sy) : nullptr,
                             static_cast<const T*>(qx),
                             labels ? nullptr : static_cast<const T*>(qy),
                             labels ? static_cast<const int64_t*>(qy) : nullptr};
    T* grad = grads_.size() == 1 ? static_cast<T*>(grads_[0].data) : gathered.data();
    const MetaResult<T> result{losses, losses + 2, pre.data(), step_losses.data(), grad, nullptr};
    meta_step_cpu<T>(spec_, shape, batch, result, threads);
    T pre_sum = 0;
    for (int t = 0; t < tasks; ++t) pre_sum += pre[t];
    losses[1] = pre_sum / T(tasks);
    if (grads_.size() > 1) {
      const T* flat = grad;
      for (const HeldBuffer& part : grads_) {
        std::copy_n(flat, part.numel, static_cast<T*>(part.data));
        flat += part.numel;
      }
    }
    if (has_adam_) {
      for (size_t i = 0; i < params_.size(); ++i) {
        adam_update<T>(adam, params_[i].numel, static_cast<const T*>(grads_[i].data), static_cast<T*>(params_[i].data),
                       static_cast<T*>(adam_.exp_avg[i].data), static_cast<T*>(adam_.exp_avg_sq[i].data));
      }
      for (const StepCounter& counter : adam_.counters) counter.set(adam.step);
    }
    return error;
  }

  Network spec_;
  bool is_f32_, first_order_;
  int steps_;
  std::vector<HeldBuffer> params_, grads_;
  bool has_adam_;
  HeldAdam adam_;
  std::vector<unsigned char> lrs_, step_weights_;
  std::mutex mutex_;
};

}  // namespace pymaml
