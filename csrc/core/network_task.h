// The per-task math of a network (csrc/core/network.h): forward, backward and Hessian-vector
// product (Pearlmutter's R-operator, forward-over-reverse) composed from the layers' routines
// (csrc/core/layers/), the losses, and the whole MAML meta-step of one task. Written once for
// every launcher: each routine splits its loops over the ranks of a thread group G (SerialGroup
// on the CPU, a thread block on CUDA) and synchronizes between dependent phases; products come
// from the launcher's Products (csrc/core/products.h).
//
// Notation: the values v_0 = x, v_1, ..., the last one the network's output z; per point k a row
// of pad(width) values, buffers row-major [K, pad(width)] per slot.
#pragma once

#include <cmath>

#include "common.h"
#include "math.h"
#include "network.h"
#include "point_sums.h"
#include "products.h"

namespace pymaml {

// One pass over a set of points: per value slot (1..) its values and dL/d value, rows of
// pad(width) per point ([K, pad(width)] per slot); the padded inputs X (slot 0), the
// log-sum-exp of each point (cross-entropy) and the layers' state (state_size values).
template <class T>
struct Pass {
  T *values, *grads, *lse, *state;
  const T* X;
};

// Slot `slot`'s rows in a per-point buffer of one pass over K points (slot 0: null; its rows are
// the pass's X).
template <class T>
PYMAML_HD T* slot_rows(T* buffer, const Network& s, int K, int slot) {
  return slot == 0 ? nullptr : buffer + int64_t(K) * s.slot_offset[slot];
}

// Scratch for one task. Sizes in elements of T, with Ks support and Kq query points, K their
// maximum, U the padded units of all value slots but the input, PP the padded parameter count
// and Z the layers' state:
//   passes: S support passes of 2·Ks·U + Ks + Z each (one per inner step, kept for its HVP), then
//           one query pass of 2·Kq·U + Kq + Z;  RZ: Z (the HVP's tangents of the state);  scratch:
//           the most a layer's routine uses over K points;  RV, RG: K·U each (the HVP's tangents of
//           values and gradients);  Xs: Ks·pad(n_0);  Xq: Kq·pad(n_0);  rows: K;  cell: 2;
//           thetas (θ_1..θ_S), grads: S·PP each;  u, qg: PP each;  WTs: (S+1)·wt_size (the
//           transposed weights of every θ_s);  UT: one more;  point_sums: point_sum_slots(K)·PP
//           (the partial sums over points, none for K <= kPointBlock).
// That is O(S·(|θ| + Ks·width) + Kq·width) per task, and no graph: S passes sized by the query set
// would make a few-shot task with many queries (W3: 5 support, 75 query points) cost S times its
// query activations. It must start zeroed. After non-finite values its padding lanes may hold
// NaN, which is harmless: no routine sums a padding lane into a real value.
template <class T>
struct TaskWorkspace {
  T *passes, *RV, *RG, *RZ, *scratch, *Xs, *Xq, *row_loss, *cell, *thetas, *grads, *u, *qg, *WTs, *UT, *point_sums;
  int support_points, query_points, steps;

  PYMAML_HD_MEMBER static int64_t pass_elements(const Network& s, int K) {
    return 2 * int64_t(K) * s.units + K + s.state_size;
  }

  PYMAML_HD_MEMBER static int64_t size(const Network& s, int Ks, int Kq, int S) {
    const int K = Ks > Kq ? Ks : Kq;
    const int64_t PP = s.num_padded_params, act = int64_t(K) * s.units;
    return int64_t(S) * pass_elements(s, Ks) + pass_elements(s, Kq) + 2 * act + s.state_size + s.scratch(K) +
           (int64_t(Ks) + Kq) * padded(s.inputs()) + int64_t(K) + 2 +
           2 * int64_t(S) * PP + 2 * PP + (int64_t(S) + 2) * s.wt_size + int64_t(point_sum_slots(K)) * PP;
  }

  PYMAML_HD_MEMBER TaskWorkspace(T* base, const Network& s, int Ks, int Kq, int S)
      : support_points(Ks), query_points(Kq), steps(S) {
    const int K = Ks > Kq ? Ks : Kq;
    const int64_t PP = s.num_padded_params, act = int64_t(K) * s.units;
    T* p = base;
    passes = p; p += int64_t(S) * pass_elements(s, Ks) + pass_elements(s, Kq);
    RV = p; p += act;
    RG = p; p += act;
    RZ = p; p += s.state_size;
    scratch = p; p += s.scratch(K);
    Xs = p; p += int64_t(Ks) * padded(s.inputs());
    Xq = p; p += int64_t(Kq) * padded(s.inputs());
    row_loss = p; p += K;
    cell = p; p += 2;
    thetas = p; p += int64_t(S) * PP;
    grads = p; p += int64_t(S) * PP;
    u = p; p += PP;
    qg = p; p += PP;
    WTs = p; p += (int64_t(S) + 1) * s.wt_size;
    UT = p; p += s.wt_size;
    point_sums = p;
  }

  // Pass i over the points whose padded inputs are X: i < S the support pass of inner step i
  // (Ks points), i = S the query pass (Kq points).
  PYMAML_HD_MEMBER Pass<T> pass(const Network& s, int i, const T* X) const {
    const int K = i < steps ? support_points : query_points;
    T* base = passes + int64_t(i) * pass_elements(s, support_points);
    const int64_t act = int64_t(K) * s.units;
    return Pass<T>{base, base + act, base + 2 * act, base + 2 * act + K, X};
  }
};

// Targets of one task: MSE values [K, n_L] or class labels [K].
template <class T>
struct Targets {
  const T* values;
  const int64_t* labels;
};

// The padded rows X of the points x [K, C, H, W] (torch's order), stored channels last.
template <class T, class G>
PYMAML_HD void load_input(const G& g, const Network& s, const T* x, int K, T* X) {
  const int n0 = s.inputs(), ld = padded(n0), C = s.input_channels, P = s.input_height * s.input_width;
  for (int k = g.rank(); k < K; k += g.size()) {
    const T* point = x + int64_t(k) * n0;
    T* row = X + int64_t(k) * ld;
    for (int c = 0; c < C; ++c) {
      for (int p = 0; p < P; ++p) row[int64_t(p) * C + c] = point[int64_t(c) * P + p];
    }
  }
  g.sync();
}

// Layer L's buffers in a pass; with tangents (RV, RG, RZ not null) for the R-operator. Gradient
// and tangent buffers the layer has none of (an input that is data) are null.
template <class T>
PYMAML_HD LayerIO<T> layer_io(const Network& s, const Layer& L, int K, const Pass<T>& pass, T* RV, T* RG, T* RZ,
                              T* scratch) {
  LayerIO<T> io;
  io.in = L.value_in == 0 ? pass.X : slot_rows(pass.values, s, K, L.value_in);
  io.out = L.value_out == 0 ? nullptr : slot_rows(pass.values, s, K, L.value_out);
  io.grad_out = L.grad_out < 0 ? nullptr : slot_rows(pass.grads, s, K, L.grad_out);
  io.grad_in = L.grad_in < 0 ? nullptr : slot_rows(pass.grads, s, K, L.grad_in);
  const bool tangents = RV != nullptr;
  io.r_in = tangents && !L.input_is_data ? slot_rows(RV, s, K, L.value_in) : nullptr;
  io.r_out = tangents && L.value_out != 0 ? slot_rows(RV, s, K, L.value_out) : nullptr;
  io.r_grad_out = tangents && L.r_grad_out >= 0 ? slot_rows(RG, s, K, L.r_grad_out) : nullptr;
  io.r_grad_in = tangents && L.r_grad_in >= 0 ? slot_rows(RG, s, K, L.r_grad_in) : nullptr;
  io.scratch = scratch;
  io.state = L.state_size > 0 ? pass.state + L.state_offset : nullptr;
  io.r_state = tangents && L.state_size > 0 ? RZ + L.state_offset : nullptr;
  return io;
}

// Forward pass from pass.X through every layer, at θ = θ_step (step: the inner step, which selects
// a per-step BatchNorm's row; 0 outside the inner loop).
template <class Products, class T, class G>
PYMAML_HD void network_forward(const G& g, const Network& s, const T* theta, const T* WT, int step, int K,
                               const Pass<T>& pass, T* scratch) {
  const LayerParams<T> p{theta, WT, nullptr, nullptr, step};
  for (int i = 0; i < s.count; ++i) {
    const Layer& L = s.layers[i];
    const LayerIO<T> io = layer_io(s, L, K, pass, static_cast<T*>(nullptr), static_cast<T*>(nullptr), static_cast<T*>(nullptr),
                                   scratch);
    visit_layer(L.kind, [&](auto kind) { decltype(kind)::template forward<Products>(g, L, K, p, io); });
  }
}

// The task's loss (a mean over points, and over outputs for MSE) into ws.cell[0], and, if
// with_delta, δ = dL/dz of the output z into the pass. MSE: δ = 2(z - y)/(K n_L). Cross-entropy,
// stable through log-sum-exp: L = mean_k (lse_k - z_k[y_k]), δ = (softmax(z) - onehot(y))/K.
template <class T, class G>
PYMAML_HD void network_loss(const G& g, const Network& s, Targets<T> y, int K, bool with_delta, const Pass<T>& pass,
                            const TaskWorkspace<T>& ws) {
  const int n = s.outputs(), ld = padded(n);
  const T* out = slot_rows(pass.values, s, K, s.output_slot());
  T* delta = slot_rows(pass.grads, s, K, s.output_slot());
  for (int k = g.rank(); k < K; k += g.size()) {
    const T* z = out + int64_t(k) * ld;
    T* d = with_delta ? delta + int64_t(k) * ld : nullptr;
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
      pass.lse[k] = lse;
      ws.row_loss[k] = (lse - z[label]) / T(K);
      if (d) {
        for (int o = 0; o < n; ++o) d[o] = (math_exp(z[o] - lse) - (o == label ? T(1) : T(0))) / T(K);
      }
    }
  }
  g.sync();
  if (g.rank() == 0) {
    ws.cell[0] = sum_over_points(ws.row_loss, K);
  }
  g.sync();
}

// Back-propagation from δ of the output in the pass, layer by layer; the parameter gradients into
// grad when it is not null.
template <class Products, class T, class G>
PYMAML_HD void network_backward(const G& g, const Network& s, const T* theta, int step, int K, const Pass<T>& pass,
                                T* grad, T* point_sums, T* scratch) {
  const LayerParams<T> p{theta, nullptr, nullptr, nullptr, step};
  for (int i = s.count - 1; i >= 0; --i) {
    const Layer& L = s.layers[i];
    const LayerIO<T> io = layer_io(s, L, K, pass, static_cast<T*>(nullptr), static_cast<T*>(nullptr), static_cast<T*>(nullptr),
                                   scratch);
    visit_layer(L.kind, [&](auto kind) {
      decltype(kind)::template backward<Products>(g, L, K, p, io, grad, point_sums, s.num_padded_params);
    });
  }
}

// Loss and gradient at a padded theta whose transposed weights are WT; the pass keeps the
// values and gradients, and the loss is left in ws.cell[0]. grad may be null (δs only).
template <class Products, class T, class G>
PYMAML_HD void network_gradient(const G& g, const Network& s, const T* theta, const T* WT, int step, Targets<T> y,
                                int K, const Pass<T>& pass, const TaskWorkspace<T>& ws, T* grad) {
  network_forward<Products>(g, s, theta, WT, step, K, pass, ws.scratch);
  network_loss(g, s, y, K, true, pass, ws);
  network_backward<Products>(g, s, theta, step, K, pass, grad, ws.point_sums, ws.scratch);
}

template <class Products, class T, class G>
PYMAML_HD T network_loss_at(const G& g, const Network& s, const T* theta, const T* WT, int step, Targets<T> y, int K,
                            const Pass<T>& pass, const TaskWorkspace<T>& ws) {
  network_forward<Products>(g, s, theta, WT, step, K, pass, ws.scratch);
  network_loss(g, s, y, K, false, pass, ws);
  return ws.cell[0];
}

// Hessian-vector product hv = H u of the loss at theta (R-operator: forward-over-reverse), in
// the padded layout, from a pass that network_gradient left at theta (values and gradients) and
// the transposed u in UT; hv += H u when accumulate. Each layer's R-forward and R-backward (see
// its header) between the loss's
//   R(δ): MSE 2 R(z)/(K n_L);  cross-entropy p ⊙ (R(z) - p·R(z))/K.
template <class Products, class T, class G>
PYMAML_HD void network_hvp_from_pass(const G& g, const Network& s, const T* theta, const T* WT, int step, const T* u,
                                     const T* UT, int K, const Pass<T>& pass, const TaskWorkspace<T>& ws, T* hv,
                                     bool accumulate) {
  const LayerParams<T> p{theta, WT, u, UT, step};
  for (int i = 0; i < s.count; ++i) {
    const Layer& L = s.layers[i];
    const LayerIO<T> io = layer_io(s, L, K, pass, ws.RV, ws.RG, ws.RZ, ws.scratch);
    visit_layer(L.kind, [&](auto kind) { decltype(kind)::template r_forward<Products>(g, L, K, p, io); });
  }
  const int n = s.outputs(), ld = padded(n);
  const T* out = slot_rows(pass.values, s, K, s.output_slot());
  const T* r_out = slot_rows(ws.RV, s, K, s.output_slot());
  T* r_delta_out = slot_rows(ws.RG, s, K, s.output_slot());
  for (int k = g.rank(); k < K; k += g.size()) {
    const T* rz = r_out + int64_t(k) * ld;
    T* rd = r_delta_out + int64_t(k) * ld;
    if (s.loss == Loss::mse) {
      const T scale = T(2) / (T(K) * T(n));
      for (int o = 0; o < n; ++o) rd[o] = scale * rz[o];
    } else {
      const T* z = out + int64_t(k) * ld;
      const T lse = pass.lse[k];
      T p_dot_rz = 0;
      for (int o = 0; o < n; ++o) p_dot_rz += math_exp(z[o] - lse) * rz[o];
      for (int o = 0; o < n; ++o) rd[o] = math_exp(z[o] - lse) * (rz[o] - p_dot_rz) / T(K);
    }
  }
  g.sync();
  for (int i = s.count - 1; i >= 0; --i) {
    const Layer& L = s.layers[i];
    const LayerIO<T> io = layer_io(s, L, K, pass, ws.RV, ws.RG, ws.RZ, ws.scratch);
    visit_layer(L.kind, [&](auto kind) {
      decltype(kind)::template r_backward<Products>(g, L, K, p, io, hv, accumulate, ws.point_sums,
                                                    s.num_padded_params);
    });
  }
}

// Hessian-vector product at theta (its transposed weights in WT) on the points x, and the
// gradient into grad when it is not null; uses pass 0 of the workspace.
template <class Products, class T, class G>
PYMAML_HD void network_hvp(const G& g, const Network& s, const T* theta, const T* WT, const T* u, const T* x,
                           Targets<T> y, int K, const TaskWorkspace<T>& ws, T* grad, T* hv) {
  transpose_weights<Products>(g, s, u, ws.UT);
  load_input(g, s, x, K, ws.Xs);
  const Pass<T> pass = ws.pass(s, 0, ws.Xs);
  network_gradient<Products>(g, s, theta, WT, 0, y, K, pass, ws, grad);
  network_hvp_from_pass<Products>(g, s, theta, WT, 0, u, ws.UT, K, pass, ws, hv, false);
}

// What one meta-step computes, beyond the model.
struct MetaStepShape {
  int steps;            // S
  int support_points;   // K_s
  int query_points;     // K_q
  bool first_order;
  bool lr_grad;         // also compute ∂/∂α_s
  // Compute L_query(θ_s) for every s (the step weights' gradients). When false, the steps whose
  // weight is zero are skipped and their step_losses entries are NaN: nothing needs them.
  bool all_step_losses = true;
};

// The meta-step of one task, in the padded parameter layout (PP values per vector).
//   Inner loop: g_s = ∇L_support(θ_s), θ_{s+1} = θ_s − α_s ⊙ g_s, s = 0..S−1.
//   Task loss: Σ_{s=1..S} w_s L_query(θ_s) (S = 0: L_query(θ_0)).
//   Reverse chain: v_S = w_S ∇L_query(θ_S); for s = S−1..0:
//     ∂/∂α_s = −g_s ⊙ v_{s+1};  v_s = v_{s+1} − H_s(α_s ⊙ v_{s+1}) + w_s ∇L_query(θ_s)  (w_0 = 0;
//     first order drops the H_s term). The task's meta-gradient is v_0.
// theta0 and lrs ([S, PP]) are padded, WT0 is null or θ_0's transposed weights; step_weights
// holds w_1..w_S. Outputs: the task loss, the
// query loss at θ_0, L_query(θ_s) for s = 1..S (the step weights' gradients), v_0 and the
// [S, PP] step-size gradients (padded).
template <class Products, class T, class G>
PYMAML_HD void meta_step_task(const G& g, const Network& s, const MetaStepShape& m, const T* theta0, const T* WT0,
                              const T* lrs, const T* step_weights, const T* support_x, Targets<T> support_y,
                              const T* query_x, Targets<T> query_y, T* workspace, T* task_loss, T* pre_loss,
                              T* step_losses, T* grad_theta, T* grad_lrs) {
  const int64_t PP = s.num_padded_params, WS = s.wt_size;
  const int S = m.steps, Ks = m.support_points, Kq = m.query_points;
  const TaskWorkspace<T> ws(workspace, s, Ks, Kq, S);
  auto theta_at = [&](int step) { return step == 0 ? theta0 : ws.thetas + int64_t(step - 1) * PP; };
  load_input(g, s, query_x, Kq, ws.Xq);
  if (S > 0) load_input(g, s, support_x, Ks, ws.Xs);
  // θ_0 is every task's: a launcher may pass its transposed weights, computed once.
  auto WT_at = [&](int step) -> const T* { return step == 0 && WT0 != nullptr ? WT0 : ws.WTs + step * WS; };
  if (WT0 == nullptr) transpose_weights<Products>(g, s, theta0, ws.WTs);
  const Pass<T> query = ws.pass(s, S, ws.Xq);
  if (S == 0) {
    network_gradient<Products>(g, s, theta0, WT_at(0), 0, query_y, Kq, query, ws, grad_theta);
    if (g.rank() == 0) *pre_loss = *task_loss = ws.cell[0];
    g.sync();
    return;
  }
  const T pre = network_loss_at<Products>(g, s, theta0, WT_at(0), 0, query_y, Kq, query, ws);
  if (g.rank() == 0) *pre_loss = pre;
  // Inner loop; pass `step` keeps the support activations and δs at θ_step for its HVP.
  for (int step = 0; step < S; ++step) {
    const T* theta = theta_at(step);
    T* grad = ws.grads + step * PP;
    network_gradient<Products>(g, s, theta, WT_at(step), step, support_y, Ks, ws.pass(s, step, ws.Xs), ws, grad);
    g.sync();
    const T* lr = lrs + step * PP;
    T* next = ws.thetas + step * PP;
    PYMAML_SIMD
    for (int64_t p = g.rank(); p < PP; p += g.size()) next[p] = theta[p] - lr[p] * grad[p];
    g.sync();
    transpose_weights<Products>(g, s, next, ws.WTs + (step + 1) * WS);
  }
  T total = 0;
  for (int step = 1; step < S; ++step) {
    if (!m.all_step_losses && step_weights[step - 1] == T(0)) {
      if (g.rank() == 0) step_losses[step - 1] = T(NAN);
      continue;
    }
    const T loss = network_loss_at<Products>(g, s, theta_at(step), WT_at(step), step, query_y, Kq, query, ws);
    if (g.rank() == 0) step_losses[step - 1] = loss;
    total += step_weights[step - 1] * loss;
  }
  // The reverse chain, with v in grad_theta: v_S = w_S ∇L_query(θ_S).
  T* v = grad_theta;
  network_gradient<Products>(g, s, theta_at(S), WT_at(S), S, query_y, Kq, query, ws, v);
  g.sync();
  const T last = ws.cell[0];
  if (g.rank() == 0) {
    step_losses[S - 1] = last;
    *task_loss = total + step_weights[S - 1] * last;
  }
  if (step_weights[S - 1] != T(1)) {
    const T w = step_weights[S - 1];
    PYMAML_SIMD
    for (int64_t p = g.rank(); p < PP; p += g.size()) v[p] *= w;
    g.sync();
  }
  // Each step s = S−1..0 adds H_s(−α_s ⊙ v_{s+1}) into v through the HVP's accumulating
  // products, so that its vector work is one pass over the parameters: ∂/∂α_s and −α_s ⊙ v.
  for (int at = S - 1; at >= 0; --at) {
    const int step = at + 1;
    const T w = step < S ? step_weights[step - 1] : T(0);
    if (w != T(0)) {  // v_step = v_{step+1} − H_step u + w_step ∇L_query(θ_step)
      network_gradient<Products>(g, s, theta_at(step), WT_at(step), step, query_y, Kq, query, ws, ws.qg);
      g.sync();
      PYMAML_SIMD
      for (int64_t p = g.rank(); p < PP; p += g.size()) v[p] += w * ws.qg[p];
      g.sync();
    }
    const T* grad = ws.grads + at * PP;
    const T* lr = lrs + at * PP;
    if (m.lr_grad) {
      T* lr_out = grad_lrs + at * PP;
      PYMAML_SIMD
      for (int64_t p = g.rank(); p < PP; p += g.size()) lr_out[p] = -grad[p] * v[p];
    }
    if (!m.first_order) {
      PYMAML_SIMD
      for (int64_t p = g.rank(); p < PP; p += g.size()) ws.u[p] = -lr[p] * v[p];
      g.sync();
      transpose_weights<Products>(g, s, ws.u, ws.UT);
      network_hvp_from_pass<Products>(g, s, theta_at(at), WT_at(at), at, ws.u, ws.UT, Ks, ws.pass(s, at, ws.Xs), ws, v,
                                      true);
    }
    g.sync();
  }
}

}  // namespace pymaml
