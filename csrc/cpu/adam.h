// The fused Adam step of the CPU meta-step (PlanBinding and the one-shot call): torch.optim.Adam's
// update (amsgrad and maximize off), applied in place to the parameters and their moments right
// after the meta-gradient, so the gradient never returns to Python first.
#pragma once

#include <cmath>
#include <cstdint>

namespace pymaml {

// a·b + c rounded once, as torch's CPU kernels compute it (they use FMA): in float64 the product
// of two floats is exact and the sum is rounded to float64 and then to float, which equals the
// fused result except where that double rounding meets a tie. float64 rounds a·b and the sum apart.
inline float multiply_add(float a, float b, float c) { return float(double(a) * double(b) + double(c)); }
inline double multiply_add(double a, double b, double c) { return a * b + c; }

// The hyperparameters of one Adam step; `step` is the step being taken (the counters plus one).
struct AdamSettings {
  int64_t step = 0;
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
};

// One Adam step on n parameters p with gradients g and moments m, v. It follows torch's default
// CPU implementation (_single_tensor_adam, and the foreach one, which runs the same tensor ops)
// operation by operation: the scalars in float64 as Python computes them, each then rounded to
// the parameters' dtype where the tensor op takes it,
//   g' = g + wd·p                          (grad.add(param, alpha=wd); only when wd != 0)
//   m  = lerp(m, g', 1−β1)                 (exp_avg.lerp_(grad, 1 − beta1))
//   v  = v·β2 + ((1−β2)·g')·g'             (exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 − beta2))
//   p  = p + (−lr/(1−β1^t))·m / (sqrt(v)/sqrt(1−β2^t) + eps)   (param.addcdiv_(exp_avg, denom, value=−step_size))
// so that a float32 step gives torch's moments bit for bit (but for rare double-rounding ties in
// multiply_add) and its parameters to an ulp (torch's float32 sqrt on the CPU, from its vector math
// library, is not always correctly rounded).
template <class T>
void adam_update(const AdamSettings& settings, int64_t n, const T* g, T* p, T* m, T* v) {
  const double t = double(settings.step);
  const double bias_correction1 = 1 - std::pow(settings.beta1, t);
  const double bias_correction2 = 1 - std::pow(settings.beta2, t);
  const double step_size = settings.lr / bias_correction1;
  const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);  // Python's bc2 ** 0.5
  const T neg_step_size = T(-step_size), sqrt_bias2 = T(bias_correction2_sqrt), eps = T(settings.eps);
  const T weight_decay = T(settings.weight_decay), beta2 = T(settings.beta2), grad_weight2 = T(1 - settings.beta2);
  // torch's lerp: start + w·(end − start) for |w| < 0.5, else end + (w − 1)·(end − start).
  const T lerp_weight = T(1 - settings.beta1);
  const bool small_weight = std::abs(lerp_weight) < T(0.5);
  const T lerp_coefficient = small_weight ? lerp_weight : lerp_weight - T(1);
  const bool decay = settings.weight_decay != 0;
  for (int64_t j = 0; j < n; ++j) {
    const T grad = decay ? multiply_add(p[j], weight_decay, g[j]) : g[j];
    m[j] = multiply_add(lerp_coefficient, grad - m[j], small_weight ? m[j] : grad);
    v[j] = multiply_add(grad_weight2 * grad, grad, v[j] * beta2);
    const T denom = std::sqrt(v[j]) / sqrt_bias2 + eps;
    p[j] = p[j] + neg_step_size * m[j] / denom;
  }
}

}  // namespace pymaml
