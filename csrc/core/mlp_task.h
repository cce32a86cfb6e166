// The per-task MLP math: forward, backward, Hessian-vector product (Pearlmutter's R-operator,
// forward-over-reverse) and the whole MAML meta-step of one task. Written once for every
// launcher: each routine splits its loops over the ranks of a thread group G (SerialGroup on
// the CPU, a thread block on CUDA) and synchronizes between dependent phases.
//
// Notation for layer l (1..L): a_0 = x, z_l = a_{l-1} W_l^T + b_l, a_l = σ(z_l) for l < L,
// output z_L. Per point k and unit o, buffers are row-major [K, n_l].
#pragma once

#include <cmath>

#include "common.h"

namespace pymaml {

PYMAML_HD float math_tanh(float x) { return ::tanhf(x); }
PYMAML_HD double math_tanh(double x) { return ::tanh(x); }
PYMAML_HD float math_exp(float x) { return ::expf(x); }
PYMAML_HD double math_exp(double x) { return ::exp(x); }
PYMAML_HD float math_log(float x) { return ::logf(x); }
PYMAML_HD double math_log(double x) { return ::log(x); }

template <class T>
PYMAML_HD T activate(Activation act, T z) {
  switch (act) {
    case Activation::relu: return z > T(0) ? z : T(0);
    case Activation::tanh: return math_tanh(z);
    case Activation::sigmoid: return T(1) / (T(1) + math_exp(-z));
    default: return z;
  }
}

// σ'(z) and σ''(z), from z and a = σ(z). ReLU: σ' = [z > 0] (torch's convention at 0), σ'' = 0;
// tanh: σ' = 1 - a², σ'' = -2a σ'; sigmoid: σ' = a(1 - a), σ'' = σ'(1 - 2a).
template <class T>
PYMAML_HD T activation_slope(Activation act, T z, T a) {
  switch (act) {
    case Activation::relu: return z > T(0) ? T(1) : T(0);
    case Activation::tanh: return T(1) - a * a;
    case Activation::sigmoid: return a * (T(1) - a);
    default: return T(1);
  }
}

template <class T>
PYMAML_HD T activation_curvature(Activation act, T a, T slope) {
  switch (act) {
    case Activation::tanh: return T(-2) * a * slope;
    case Activation::sigmoid: return slope * (T(1) - T(2) * a);
    default: return T(0);
  }
}

// Scratch for one task. Sizes in elements of T, with K = max(support, query) points:
//   Z, A, RZ, RA: K·(n_1 + ... + n_L) each;  D0, D1, RD0, RD1: K·max width each;
//   rows: 2K (per-point loss, log-sum-exp); cell: 2;  thetas: (S+1)·P;  grads: S·P;
//   v, u, hv, qg, WT, UT: P each (WT, UT: transposed weights of θ and of the HVP direction).
// That is O(S·|θ| + K·width) per task: the weights and inner gradients of every step, and the
// activations of one forward pass; no graph.
template <class T>
struct TaskWorkspace {
  T *Z, *A, *RZ, *RA, *D0, *D1, *RD0, *RD1, *row_loss, *row_lse, *cell, *thetas, *grads, *v, *u, *hv, *qg, *WT, *UT;

  PYMAML_HD static int64_t size(const MlpSpec& s, int K, int S) {
    const int64_t P = s.num_params, act = int64_t(K) * s.total_units, delta = int64_t(K) * s.max_width;
    return 4 * act + 4 * delta + 2 * int64_t(K) + 2 + (2 * int64_t(S) + 1) * P + 6 * P;
  }

  PYMAML_HD TaskWorkspace(T* base, const MlpSpec& s, int K, int S) {
    const int64_t P = s.num_params, act = int64_t(K) * s.total_units, delta = int64_t(K) * s.max_width;
    T* p = base;
    Z = p; p += act;
    A = p; p += act;
    RZ = p; p += act;
    RA = p; p += act;
    D0 = p; p += delta;
    D1 = p; p += delta;
    RD0 = p; p += delta;
    RD1 = p; p += delta;
    row_loss = p; p += K;
    row_lse = p; p += K;
    cell = p; p += 2;
    thetas = p; p += (int64_t(S) + 1) * P;
    grads = p; p += int64_t(S) * P;
    v = p; p += P;
    u = p; p += P;
    hv = p; p += P;
    qg = p; p += P;
    WT = p; p += P;
    UT = p;
  }
};

// Targets of one task: MSE values [K, n_L] or class labels [K].
template <class T>
struct Targets {
  const T* values;
  const int64_t* labels;
};

// WT_l = W_l^T ([n_{l-1}, n_l], at W_l's offset), so that the forward pass runs along rows of
// outputs: z[k, :] = b + Σ_i a[k, i] WT[i, :]. Row updates vectorize over units; a dot product
// per unit needs a horizontal sum each, which made the forward pass 2-3x slower.
template <class T, class G>
PYMAML_HD void transpose_weights(const G& g, const MlpSpec& s, const T* theta, T* WT) {
  for (int l = 1; l <= s.layers; ++l) {
    const int n_in = s.in(l), n_out = s.out(l);
    const T* W = theta + s.param_offset[l];
    T* Wt = WT + s.param_offset[l];
    for (int o = g.rank(); o < n_out; o += g.size()) {
      const T* w = W + int64_t(o) * n_in;
      for (int i = 0; i < n_in; ++i) Wt[int64_t(i) * n_out + o] = w[i];
    }
  }
  g.sync();
}

// out[k, :] = (bias or 0) + Σ_i in[k, i] WT[i, :] for the rows k of this rank.
template <class T, class G>
PYMAML_HD void rows_times_transposed(const G& g, int K, int n_in, int n_out, const T* in, const T* WT, const T* bias,
                                     T* out) {
  for (int k = g.rank(); k < K; k += g.size()) {
    T* row = out + int64_t(k) * n_out;
    const T* a = in + int64_t(k) * n_in;
    if (bias) {
      for (int o = 0; o < n_out; ++o) row[o] = bias[o];
    } else {
      for (int o = 0; o < n_out; ++o) row[o] = 0;
    }
    for (int i = 0; i < n_in; ++i) {
      const T ai = a[i];
      const T* wt = WT + int64_t(i) * n_out;
      PYMAML_SIMD
      for (int o = 0; o < n_out; ++o) row[o] += ai * wt[o];
    }
  }
}

// Forward pass at theta; needs ws.WT = transpose of theta's weights.
template <class T, class G>
PYMAML_HD void mlp_forward(const G& g, const MlpSpec& s, const T* theta, const T* WT, const T* x, int K, T* Z, T* A) {
  for (int l = 1; l <= s.layers; ++l) {
    const int n_in = s.in(l), n_out = s.out(l);
    const T* b = s.bias ? theta + s.param_offset[l] + int64_t(n_out) * n_in : nullptr;
    const T* in = l == 1 ? x : A + int64_t(K) * s.unit_offset[l - 1];
    T* z = Z + int64_t(K) * s.unit_offset[l];
    T* a = A + int64_t(K) * s.unit_offset[l];
    rows_times_transposed(g, K, n_in, n_out, in, WT + s.param_offset[l], b, z);
    if (l < s.layers) {
      for (int k = g.rank(); k < K; k += g.size()) {
        for (int o = 0; o < n_out; ++o) a[int64_t(k) * n_out + o] = activate(s.activation, z[int64_t(k) * n_out + o]);
      }
    }
    g.sync();
  }
}

// The task's loss (a mean over points, and over outputs for MSE) into *ws.cell, and, if
// `delta` is given, δ_L = dL/dz_L. MSE: δ = 2(z - y)/(K n_L). Cross-entropy, stable through
// log-sum-exp: L = mean_k (lse_k - z_k[y_k]), δ = (softmax(z) - onehot(y))/K.
template <class T, class G>
PYMAML_HD void mlp_loss(const G& g, const MlpSpec& s, const T* out, Targets<T> y, int K, T* delta,
                        const TaskWorkspace<T>& ws) {
  const int n = s.outputs();
  for (int k = g.rank(); k < K; k += g.size()) {
    const T* z = out + int64_t(k) * n;
    T* d = delta ? delta + int64_t(k) * n : nullptr;
    if (s.loss == Loss::mse) {
      const T scale = T(1) / (T(K) * T(n));
      const T* target = y.values + int64_t(k) * n;
      T sum = 0;
      for (int o = 0; o < n; ++o) {
        const T diff = z[o] - target[o];
        sum += diff * diff;
        if (d) d[o] = T(2) * diff * scale;
      }
      ws.row_loss[k] = sum * scale;
    } else {
      T peak = z[0];
      for (int o = 1; o < n; ++o) peak = z[o] > peak ? z[o] : peak;
      T total = 0;
      for (int o = 0; o < n; ++o) total += math_exp(z[o] - peak);
      const T lse = peak + math_log(total);
      const int64_t label = y.labels[k];
      ws.row_lse[k] = lse;
      ws.row_loss[k] = (lse - z[label]) / T(K);
      if (d) {
        for (int o = 0; o < n; ++o) d[o] = (math_exp(z[o] - lse) - (o == label ? T(1) : T(0))) / T(K);
      }
    }
  }
  g.sync();
  if (g.rank() == 0) {
    T total = 0;
    for (int k = 0; k < K; ++k) total += ws.row_loss[k];
    ws.cell[0] = total;
  }
  g.sync();
}

// Gradient of a layer's weights and bias from δ_l and the layer input: gW = δ^T a_{l-1}, gb = Σ_k δ.
template <class T, class G>
PYMAML_HD void weight_gradient(const G& g, int K, int n_in, int n_out, const T* delta, const T* in, T* gW, T* gb) {
  for (int o = g.rank(); o < n_out; o += g.size()) {
    T* gw = gW + int64_t(o) * n_in;
    for (int i = 0; i < n_in; ++i) gw[i] = 0;
    T bias_sum = 0;
    for (int k = 0; k < K; ++k) {
      const T d = delta[int64_t(k) * n_out + o];
      const T* row = in + int64_t(k) * n_in;
      PYMAML_SIMD
      for (int i = 0; i < n_in; ++i) gw[i] += d * row[i];
      bias_sum += d;
    }
    if (gb) gb[o] = bias_sum;
  }
}

// Back-propagation from δ_L (in ws.D0) through every layer into `grad` (P values).
template <class T, class G>
PYMAML_HD void mlp_backward(const G& g, const MlpSpec& s, const T* theta, const T* x, int K,
                            const TaskWorkspace<T>& ws, T* grad) {
  T* delta = ws.D0;
  T* prev = ws.D1;
  for (int l = s.layers; l >= 1; --l) {
    const int n_in = s.in(l), n_out = s.out(l);
    const T* W = theta + s.param_offset[l];
    const T* in = l == 1 ? x : ws.A + int64_t(K) * s.unit_offset[l - 1];
    T* gW = grad + s.param_offset[l];
    weight_gradient(g, K, n_in, n_out, delta, in, gW, s.bias ? gW + int64_t(n_out) * n_in : nullptr);
    if (l > 1) {  // δ_{l-1} = (δ_l W_l) ⊙ σ'(z_{l-1})
      const T* z = ws.Z + int64_t(K) * s.unit_offset[l - 1];
      for (int k = g.rank(); k < K; k += g.size()) {
        T* p = prev + int64_t(k) * n_in;
        for (int i = 0; i < n_in; ++i) p[i] = 0;
        for (int o = 0; o < n_out; ++o) {
          const T d = delta[int64_t(k) * n_out + o];
          const T* w = W + int64_t(o) * n_in;
          PYMAML_SIMD
          for (int i = 0; i < n_in; ++i) p[i] += d * w[i];
        }
        const T* zk = z + int64_t(k) * n_in;
        const T* ak = in + int64_t(k) * n_in;
        for (int i = 0; i < n_in; ++i) p[i] *= activation_slope(s.activation, zk[i], ak[i]);
      }
    }
    g.sync();
    T* swap = delta;
    delta = prev;
    prev = swap;
  }
}

// Loss and gradient at theta; the loss is left in ws.cell[0].
template <class T, class G>
PYMAML_HD void mlp_gradient(const G& g, const MlpSpec& s, const T* theta, const T* x, Targets<T> y, int K,
                            const TaskWorkspace<T>& ws, T* grad) {
  transpose_weights(g, s, theta, ws.WT);
  mlp_forward(g, s, theta, ws.WT, x, K, ws.Z, ws.A);
  mlp_loss(g, s, ws.Z + int64_t(K) * s.unit_offset[s.layers], y, K, ws.D0, ws);
  mlp_backward(g, s, theta, x, K, ws, grad);
}

template <class T, class G>
PYMAML_HD T mlp_loss_at(const G& g, const MlpSpec& s, const T* theta, const T* x, Targets<T> y, int K,
                        const TaskWorkspace<T>& ws) {
  transpose_weights(g, s, theta, ws.WT);
  mlp_forward(g, s, theta, ws.WT, x, K, ws.Z, ws.A);
  mlp_loss(g, s, ws.Z + int64_t(K) * s.unit_offset[s.layers], y, K, static_cast<T*>(nullptr), ws);
  return ws.cell[0];
}

// Hessian-vector product hv = H u of the loss at theta (R-operator: forward-over-reverse), and
// the gradient into `grad` when it is not null.
//   R(z_l) = R(a_{l-1}) W_l^T + a_{l-1} U_l^T + u_b,  R(a_l) = σ'(z_l) R(z_l)
//   R(δ_L): MSE 2 R(z_L)/(K n_L);  cross-entropy p ⊙ (R(z) - p·R(z))/K
//   R(gW_l) = R(δ_l)^T a_{l-1} + δ_l^T R(a_{l-1}),  R(gb_l) = Σ_k R(δ_l)
//   R(δ_{l-1}) = (R(δ_l) W_l + δ_l U_l) ⊙ σ'(z_{l-1}) + (δ_l W_l) ⊙ σ''(z_{l-1}) ⊙ R(z_{l-1})
template <class T, class G>
PYMAML_HD void mlp_hvp(const G& g, const MlpSpec& s, const T* theta, const T* u, const T* x, Targets<T> y, int K,
                       const TaskWorkspace<T>& ws, T* grad, T* hv) {
  transpose_weights(g, s, theta, ws.WT);
  transpose_weights(g, s, u, ws.UT);
  mlp_forward(g, s, theta, ws.WT, x, K, ws.Z, ws.A);
  for (int l = 1; l <= s.layers; ++l) {
    const int n_in = s.in(l), n_out = s.out(l);
    const T* ub = s.bias ? u + s.param_offset[l] + int64_t(n_out) * n_in : nullptr;
    const T* in = l == 1 ? x : ws.A + int64_t(K) * s.unit_offset[l - 1];
    const T* r_in = l == 1 ? nullptr : ws.RA + int64_t(K) * s.unit_offset[l - 1];
    const T* WT = ws.WT + s.param_offset[l];
    const T* z = ws.Z + int64_t(K) * s.unit_offset[l];
    const T* a = ws.A + int64_t(K) * s.unit_offset[l];
    T* rz = ws.RZ + int64_t(K) * s.unit_offset[l];
    T* ra = ws.RA + int64_t(K) * s.unit_offset[l];
    rows_times_transposed(g, K, n_in, n_out, in, ws.UT + s.param_offset[l], ub, rz);
    for (int k = g.rank(); k < K; k += g.size()) {
      T* row = rz + int64_t(k) * n_out;
      if (r_in) {
        const T* r_row = r_in + int64_t(k) * n_in;
        for (int i = 0; i < n_in; ++i) {
          const T ri = r_row[i];
          const T* wt = WT + int64_t(i) * n_out;
          PYMAML_SIMD
          for (int o = 0; o < n_out; ++o) row[o] += ri * wt[o];
        }
      }
      if (l < s.layers) {
        for (int o = 0; o < n_out; ++o) {
          const int64_t at = int64_t(k) * n_out + o;
          ra[at] = activation_slope(s.activation, z[at], a[at]) * row[o];
        }
      }
    }
    g.sync();
  }
  const int n = s.outputs();
  const T* out = ws.Z + int64_t(K) * s.unit_offset[s.layers];
  const T* r_out = ws.RZ + int64_t(K) * s.unit_offset[s.layers];
  mlp_loss(g, s, out, y, K, ws.D0, ws);
  for (int k = g.rank(); k < K; k += g.size()) {
    const T* rz = r_out + int64_t(k) * n;
    T* rd = ws.RD0 + int64_t(k) * n;
    if (s.loss == Loss::mse) {
      const T scale = T(2) / (T(K) * T(n));
      for (int o = 0; o < n; ++o) rd[o] = scale * rz[o];
    } else {
      const T* z = out + int64_t(k) * n;
      const T lse = ws.row_lse[k];
      T p_dot_rz = 0;
      for (int o = 0; o < n; ++o) p_dot_rz += math_exp(z[o] - lse) * rz[o];
      for (int o = 0; o < n; ++o) rd[o] = math_exp(z[o] - lse) * (rz[o] - p_dot_rz) / T(K);
    }
  }
  g.sync();
  T *delta = ws.D0, *prev = ws.D1, *r_delta = ws.RD0, *r_prev = ws.RD1;
  for (int l = s.layers; l >= 1; --l) {
    const int n_in = s.in(l), n_out = s.out(l);
    const T* W = theta + s.param_offset[l];
    const T* UW = u + s.param_offset[l];
    const T* in = l == 1 ? x : ws.A + int64_t(K) * s.unit_offset[l - 1];
    const T* r_in = l == 1 ? nullptr : ws.RA + int64_t(K) * s.unit_offset[l - 1];
    T* hW = hv + s.param_offset[l];
    T* hb = s.bias ? hW + int64_t(n_out) * n_in : nullptr;
    weight_gradient(g, K, n_in, n_out, r_delta, in, hW, hb);
    if (r_in) {  // + δ_l^T R(a_{l-1}); the ranks own the same rows o as in weight_gradient
      for (int o = g.rank(); o < n_out; o += g.size()) {
        T* hw = hW + int64_t(o) * n_in;
        for (int k = 0; k < K; ++k) {
          const T d = delta[int64_t(k) * n_out + o];
          const T* r_row = r_in + int64_t(k) * n_in;
          PYMAML_SIMD
          for (int i = 0; i < n_in; ++i) hw[i] += d * r_row[i];
        }
      }
    }
    if (grad) {
      T* gW = grad + s.param_offset[l];
      weight_gradient(g, K, n_in, n_out, delta, in, gW, s.bias ? gW + int64_t(n_out) * n_in : nullptr);
    }
    if (l > 1) {
      const T* z = ws.Z + int64_t(K) * s.unit_offset[l - 1];
      const T* rz = ws.RZ + int64_t(K) * s.unit_offset[l - 1];
      for (int k = g.rank(); k < K; k += g.size()) {
        T* p = prev + int64_t(k) * n_in;
        T* rp = r_prev + int64_t(k) * n_in;
        for (int i = 0; i < n_in; ++i) p[i] = rp[i] = 0;
        for (int o = 0; o < n_out; ++o) {
          const T d = delta[int64_t(k) * n_out + o];
          const T rd = r_delta[int64_t(k) * n_out + o];
          const T* w = W + int64_t(o) * n_in;
          const T* uw = UW + int64_t(o) * n_in;
          PYMAML_SIMD
          for (int i = 0; i < n_in; ++i) {
            p[i] += d * w[i];
            rp[i] += rd * w[i] + d * uw[i];
          }
        }
        const T* zk = z + int64_t(k) * n_in;
        const T* ak = in + int64_t(k) * n_in;
        const T* rzk = rz + int64_t(k) * n_in;
        for (int i = 0; i < n_in; ++i) {
          const T slope = activation_slope(s.activation, zk[i], ak[i]);
          const T curvature = activation_curvature(s.activation, ak[i], slope);
          rp[i] = rp[i] * slope + p[i] * curvature * rzk[i];
          p[i] *= slope;
        }
      }
    }
    g.sync();
    T* swap = delta; delta = prev; prev = swap;
    swap = r_delta; r_delta = r_prev; r_prev = swap;
  }
}

// What one meta-step computes, beyond the model.
struct MetaStepShape {
  int steps;            // S
  int support_points;   // K_s
  int query_points;     // K_q
  bool first_order;
  bool lr_grad;         // also compute ∂/∂α_s
};

// The meta-step of one task.
//   Inner loop: g_s = ∇L_support(θ_s), θ_{s+1} = θ_s − α_s ⊙ g_s, s = 0..S−1.
//   Task loss: Σ_{s=1..S} w_s L_query(θ_s) (S = 0: L_query(θ_0)).
//   Reverse chain: v_S = w_S ∇L_query(θ_S); for s = S−1..0:
//     ∂/∂α_s = −g_s ⊙ v_{s+1};  v_s = v_{s+1} − H_s(α_s ⊙ v_{s+1}) + w_s ∇L_query(θ_s)  (w_0 = 0;
//     first order drops the H_s term). The task's meta-gradient is v_0.
// lrs: α as [S, P]; step_weights: w_1..w_S. Outputs: the task loss, the query loss at θ_0,
// L_query(θ_s) for s = 1..S (the step weights' gradients), v_0, and [S, P] step-size gradients.
template <class T, class G>
PYMAML_HD void meta_step_task(const G& g, const MlpSpec& s, const MetaStepShape& m, const T* theta0, const T* lrs,
                              const T* step_weights, const T* support_x, Targets<T> support_y, const T* query_x,
                              Targets<T> query_y, T* workspace, T* task_loss, T* pre_loss, T* step_losses,
                              T* grad_theta, T* grad_lrs) {
  const int64_t P = s.num_params;
  const int S = m.steps, Ks = m.support_points, Kq = m.query_points;
  const TaskWorkspace<T> ws(workspace, s, Ks > Kq ? Ks : Kq, S);
  const T pre = mlp_loss_at(g, s, theta0, query_x, query_y, Kq, ws);
  if (g.rank() == 0) *pre_loss = pre;
  if (S == 0) {
    mlp_gradient(g, s, theta0, query_x, query_y, Kq, ws, grad_theta);
    if (g.rank() == 0) *task_loss = pre;
    g.sync();
    return;
  }
  for (int64_t p = g.rank(); p < P; p += g.size()) ws.thetas[p] = theta0[p];
  g.sync();
  for (int step = 0; step < S; ++step) {
    const T* theta = ws.thetas + step * P;
    T* grad = ws.grads + step * P;
    mlp_gradient(g, s, theta, support_x, support_y, Ks, ws, grad);
    const T* lr = lrs + step * P;
    T* next = ws.thetas + (step + 1) * P;
    for (int64_t p = g.rank(); p < P; p += g.size()) next[p] = theta[p] - lr[p] * grad[p];
    g.sync();
  }
  T total = 0;
  for (int step = 1; step < S; ++step) {
    const T loss = mlp_loss_at(g, s, ws.thetas + step * P, query_x, query_y, Kq, ws);
    if (g.rank() == 0) step_losses[step - 1] = loss;
    total += step_weights[step - 1] * loss;
  }
  mlp_gradient(g, s, ws.thetas + S * P, query_x, query_y, Kq, ws, ws.qg);
  const T last = ws.cell[0];
  if (g.rank() == 0) {
    step_losses[S - 1] = last;
    *task_loss = total + step_weights[S - 1] * last;
  }
  for (int64_t p = g.rank(); p < P; p += g.size()) ws.v[p] = step_weights[S - 1] * ws.qg[p];
  g.sync();
  for (int step = S - 1; step >= 0; --step) {
    const T* theta = ws.thetas + step * P;
    const T* grad = ws.grads + step * P;
    const T* lr = lrs + step * P;
    if (m.lr_grad) {
      T* out = grad_lrs + step * P;
      for (int64_t p = g.rank(); p < P; p += g.size()) out[p] = -grad[p] * ws.v[p];
    }
    if (!m.first_order) {
      for (int64_t p = g.rank(); p < P; p += g.size()) ws.u[p] = lr[p] * ws.v[p];
      g.sync();
      mlp_hvp(g, s, theta, ws.u, support_x, support_y, Ks, ws, static_cast<T*>(nullptr), ws.hv);
      for (int64_t p = g.rank(); p < P; p += g.size()) ws.v[p] -= ws.hv[p];
      g.sync();
    }
    if (step >= 1 && step_weights[step - 1] != T(0)) {
      mlp_gradient(g, s, theta, query_x, query_y, Kq, ws, ws.qg);
      const T w = step_weights[step - 1];
      for (int64_t p = g.rank(); p < P; p += g.size()) ws.v[p] += w * ws.qg[p];
      g.sync();
    }
  }
  for (int64_t p = g.rank(); p < P; p += g.size()) grad_theta[p] = ws.v[p];
  g.sync();
}

}  // namespace pymaml
