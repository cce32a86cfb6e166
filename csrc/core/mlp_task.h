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
#include "products.h"

namespace pymaml {

PYMAML_HD float math_tanh(float x) { return ::tanhf(x); }
PYMAML_HD double math_tanh(double x) { return ::tanh(x); }
PYMAML_HD float math_exp(float x) { return ::expf(x); }
PYMAML_HD double math_exp(double x) { return ::exp(x); }
PYMAML_HD float math_log(float x) { return ::logf(x); }
PYMAML_HD double math_log(double x) { return ::log(x); }

// Non-finite values propagate as torch propagates them, so that a NaN or Inf in the weights
// reaches the loss and the gradients exactly where autograd puts it:
//   ReLU: relu(NaN) = NaN, and its backward is torch's threshold_backward on the result a:
//   r where !(a <= 0), else exactly 0 (even for a NaN or infinite r); so a NaN unit passes r on.
//   tanh, sigmoid: σ'(z) · r with σ' from a, as torch's tanh_backward and sigmoid_backward.
// The selects compare a, never z, and are written as `a <= 0 ? 0 : r` so that a NaN takes the
// r branch; with -fno-trapping-math they vectorize to a compare and a bit mask.
//
// σ'(z) and σ''(z) of the activations with curvature, from a = σ(z): tanh: σ' = 1 - a², σ'' =
// -2a σ'; sigmoid: σ' = a(1 - a), σ'' = σ'(1 - 2a). (ReLU and none have σ'' = 0 and take
// slope_times_row.)
template <class T>
PYMAML_HD T activation_slope(Activation act, T a) {
  switch (act) {
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

// Row-wise elementwise passes, with the switch on the activation outside the loops so that
// each loop vectorizes. Callers pass the padded width where the padding lanes may be written:
// whole SIMD registers, no scalar tail. Padding lanes carry no meaning (they are zero while
// every value is finite, and may hold NaN when a real value is not); no routine sums over them.
// a[i] = σ(z[i])
template <class T>
PYMAML_HD void activate_row(Activation act, int n, const T* z, T* a) {
  switch (act) {
    case Activation::relu:
      PYMAML_SIMD
      for (int i = 0; i < n; ++i) a[i] = z[i] < T(0) ? T(0) : z[i];  // NaN stays NaN
      break;
    case Activation::tanh:
      for (int i = 0; i < n; ++i) a[i] = math_tanh(z[i]);
      break;
    case Activation::sigmoid:
      for (int i = 0; i < n; ++i) a[i] = T(1) / (T(1) + math_exp(-z[i]));
      break;
    default:
      for (int i = 0; i < n; ++i) a[i] = z[i];
  }
}

// out[i] = σ'(z[i]) · r[i] from a = σ(z)   (in place when out == r)
template <class T>
PYMAML_HD void slope_times_row(Activation act, int n, const T* a, const T* r, T* out) {
  switch (act) {
    case Activation::relu:
      PYMAML_SIMD
      for (int i = 0; i < n; ++i) out[i] = a[i] <= T(0) ? T(0) : r[i];
      break;
    case Activation::tanh:
      PYMAML_SIMD
      for (int i = 0; i < n; ++i) out[i] = (T(1) - a[i] * a[i]) * r[i];
      break;
    case Activation::sigmoid:
      PYMAML_SIMD
      for (int i = 0; i < n; ++i) out[i] = a[i] * (T(1) - a[i]) * r[i];
      break;
    default:
      for (int i = 0; i < n; ++i) out[i] = r[i];
  }
}

// R(δ) = R(t) σ'(z) + t σ''(z) R(z), in place over R(t) (rt), with t the back-propagated
// product before the slope (δ = t σ'(z)).
template <class T>
PYMAML_HD void tangent_slope_row(Activation act, int n, int ld, const T* a, const T* rz, const T* t, T* rt) {
  if (act == Activation::relu || act == Activation::none) {  // σ'' = 0
    slope_times_row(act, ld, a, rt, rt);
    return;
  }
  for (int i = 0; i < n; ++i) {
    const T slope = activation_slope(act, a[i]);
    rt[i] = rt[i] * slope + t[i] * activation_curvature(act, a[i], slope) * rz[i];
  }
}

PYMAML_HD bool has_curvature(Activation act) { return act == Activation::tanh || act == Activation::sigmoid; }

// One pass over a set of points: per layer l, z_l, a_l (l < L), δ_l = dL/dz_l and, for
// activations with curvature, t_l = δ_{l+1} W_{l+1} (δ_l before the slope), rows of pad(n_l);
// the padded inputs X and the log-sum-exp of each point (cross-entropy).
template <class T>
struct Pass {
  T *Z, *A, *D, *Dt, *lse;
  const T* X;
};

// Sums over points are taken in blocks of kPointBlock points, each block in order, and the block
// sums are added pairwise (a binary counter: partial sum j holds 2^j blocks). In order, a float32
// sum of K terms loses about √K·ε of its size to rounding, so that float32 results drift from
// float64 as K grows; blocked, the loss grows with √kPointBlock + log2 K. Up to kPointBlock
// points (the sinusoid's 10) the sum is the plain in-order one.
constexpr int kPointBlock = 128;
PYMAML_HD int point_blocks(int K) { return (K + kPointBlock - 1) / kPointBlock; }
// The padded parameter vectors a blocked sum over K points needs: one per bit of the block count
// (the partial sums) and one for the block being summed; none for a single block.
PYMAML_HD int point_sum_slots(int K) {
  const int blocks = point_blocks(K);
  if (blocks <= 1) return 0;
  int bits = 0;
  while (bits < 31 && (1 << bits) <= blocks) ++bits;
  return bits + 1;
}

// Σ_{k < K} x[k], blocked and pairwise as above.
template <class T>
PYMAML_HD T sum_over_points(const T* x, int K) {
  T partial[32];
  const int blocks = point_blocks(K);
  for (int b = 0; b < blocks; ++b) {
    const int end = (b + 1) * kPointBlock < K ? (b + 1) * kPointBlock : K;
    T sum = 0;
    for (int k = b * kPointBlock; k < end; ++k) sum += x[k];
    int j = 0;
    for (; (b >> j) & 1; ++j) sum = partial[j] + sum;
    partial[j] = sum;
  }
  T total = 0;
  for (int j = 0; j < 32 && (blocks >> j) != 0; ++j) {
    if ((blocks >> j) & 1) total = partial[j] + total;
  }
  return total;
}

// Scratch for one task. Sizes in elements of T, with K = max(support, query) points, U the
// padded units of all layers and PP the padded parameter count:
//   passes: S + 1 of 4·K·U + K each (one per inner step on the support set, kept for its HVP,
//           and one for the query set);  RZ, RA, RD: K·U each (the HVP's tangents);
//   Xs, Xq: K·pad(n_0) each;  rows: K;  cell: 2;  thetas (θ_1..θ_S), grads: S·PP each;
//   u, qg: PP each;  WTs: (S+1)·Σ (n_{l-1}+1)·pad(n_l) (the transposed weights of every θ_s);
//   UT: one more;  point_sums: point_sum_slots(K)·PP (the partial sums over points, none for
//   K <= kPointBlock).
// That is O(S·(|θ| + K·width)) per task, and no graph. It must start zeroed. After non-finite
// values its padding lanes may hold NaN, which is harmless: no routine sums a padding lane into
// a real value.
template <class T>
struct TaskWorkspace {
  T *passes, *RZ, *RA, *RD, *Xs, *Xq, *row_loss, *cell, *thetas, *grads, *u, *qg, *WTs, *UT, *point_sums;
  int64_t pass_size;

  PYMAML_HD_MEMBER static int64_t pass_elements(const MlpSpec& s, int K) { return 4 * int64_t(K) * s.total_units + K; }

  PYMAML_HD_MEMBER static int64_t size(const MlpSpec& s, int K, int S) {
    const int64_t PP = s.num_padded_params, act = int64_t(K) * s.total_units;
    return (int64_t(S) + 1) * pass_elements(s, K) + 3 * act + 2 * int64_t(K) * padded(s.widths[0]) + int64_t(K) + 2 +
           2 * int64_t(S) * PP + 2 * PP + (int64_t(S) + 2) * s.wt_size + int64_t(point_sum_slots(K)) * PP;
  }

  PYMAML_HD_MEMBER TaskWorkspace(T* base, const MlpSpec& s, int K, int S) {
    const int64_t PP = s.num_padded_params, act = int64_t(K) * s.total_units;
    pass_size = pass_elements(s, K);
    T* p = base;
    passes = p; p += (int64_t(S) + 1) * pass_size;
    RZ = p; p += act;
    RA = p; p += act;
    RD = p; p += act;
    Xs = p; p += int64_t(K) * padded(s.widths[0]);
    Xq = p; p += int64_t(K) * padded(s.widths[0]);
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

  // Pass i (0..S) over the points whose padded inputs are X.
  PYMAML_HD_MEMBER Pass<T> pass(const MlpSpec& s, int K, int i, const T* X) const {
    T* base = passes + int64_t(i) * pass_size;
    const int64_t act = int64_t(K) * s.total_units;
    return Pass<T>{base, base + act, base + 2 * act, base + 3 * act, base + 4 * act, X};
  }

  // Layer l's block of a per-point buffer: rows of pad(n_l).
  PYMAML_HD_MEMBER static T* layer(T* buffer, const MlpSpec& s, int K, int l) { return buffer + int64_t(K) * s.unit_offset[l]; }
};

// Targets of one task: MSE values [K, n_L] or class labels [K].
template <class T>
struct Targets {
  const T* values;
  const int64_t* labels;
};

// How each layer's forward product z = a W^T + b reads W: layer 1 from its transposed padded
// storage; layers with at most kDotMaxOutputs outputs (the sinusoid's 40 → 1) from W's rows as
// dot products (gemm_rows_dot), where tiles would spend 15 of 16 lanes on padding; the others
// from a transposed copy WT (transpose_weights).
constexpr int kDotMaxOutputs = kChunk / 4;
PYMAML_HD bool dot_layer(const MlpSpec& s, int l) { return l > 1 && s.out(l) <= kDotMaxOutputs; }
PYMAML_HD bool needs_transpose(const MlpSpec& s, int l) { return l > 1 && !dot_layer(s, l); }

// WT_l = W_l^T [n_{l-1}, pad(n_l)] followed by the padded bias row, for the layers that need
// it, from a padded parameter vector. Only real lanes are written.
template <class Products, class T, class G>
PYMAML_HD void transpose_weights(const G& g, const MlpSpec& s, const T* theta, T* WT) {
  for (int l = 2; l <= s.layers; ++l) {
    if (!needs_transpose(s, l)) continue;
    const int n_in = s.in(l), n_out = s.out(l), ld_out = padded(n_out), ld_in = padded(n_in);
    const T* W = theta + s.padded_offset[l];
    T* wt = WT + s.wt_offset[l];
    Products::transpose(g, n_out, n_in, W, int64_t(ld_in), wt, int64_t(ld_out));
    for (int o = g.rank(); o < n_out; o += g.size()) wt[int64_t(n_in) * ld_out + o] = theta[s.bias_offset(l) + o];
  }
  g.sync();
}



template <class T, class G>
PYMAML_HD void load_input(const G& g, const MlpSpec& s, const T* x, int K, T* X) {
  const int n0 = s.widths[0], ld = padded(n0);
  for (int k = g.rank(); k < K; k += g.size()) {
    for (int i = 0; i < n0; ++i) X[int64_t(k) * ld + i] = x[int64_t(k) * n0 + i];
  }
  g.sync();
}

// Layer l's input rows in a pass: X for l = 1, else a_{l-1}.
template <class T>
PYMAML_HD const T* layer_input(const MlpSpec& s, const Pass<T>& pass, int K, int l) {
  return l == 1 ? pass.X : TaskWorkspace<T>::layer(pass.A, s, K, l - 1);
}

// The forward product z = in W^T + b (accumulate: z += in W^T), W read as dot_layer says.
template <class Products, class T, class G>
PYMAML_HD void forward_product(const G& g, const MlpSpec& s, int l, int K, const T* in, const T* theta, const T* WT,
                               T* z, bool accumulate) {
  const int n_in = s.in(l), n_out = s.out(l), ld_in = padded(n_in), ld_out = padded(n_out);
  if (dot_layer(s, l)) {
    Products::gemm_rows_dot(g, K, n_out, n_in, ld_in, in, int64_t(ld_in), theta + s.padded_offset[l], int64_t(ld_in), z,
                  int64_t(ld_out), theta + s.bias_offset(l), accumulate);
  } else {
    const T* wt = l == 1 ? theta + s.padded_offset[1] : WT + s.wt_offset[l];
    Products::gemm_rows(g, K, n_in, n_out, in, int64_t(ld_in), int64_t(1), wt, int64_t(ld_out), z, int64_t(ld_out),
              wt + int64_t(n_in) * ld_out, accumulate);
  }
}

// Forward pass: z_l = a_{l-1} W_l^T + b_l, a_l = σ(z_l), from pass.X.
template <class Products, class T, class G>
PYMAML_HD void mlp_forward(const G& g, const MlpSpec& s, const T* theta, const T* WT, int K, const Pass<T>& pass) {
  for (int l = 1; l <= s.layers; ++l) {
    const int n_out = s.out(l), ld_out = padded(n_out);
    T* z = TaskWorkspace<T>::layer(pass.Z, s, K, l);
    forward_product<Products>(g, s, l, K, layer_input(s, pass, K, l), theta, WT, z, false);
    g.sync();
    if (l < s.layers) {
      T* a = TaskWorkspace<T>::layer(pass.A, s, K, l);
      const int width = s.activation == Activation::sigmoid ? n_out : ld_out;  // σ(0) = 0 keeps padding zero
      for (int k = g.rank(); k < K; k += g.size()) {
        activate_row(s.activation, width, z + int64_t(k) * ld_out, a + int64_t(k) * ld_out);
      }
      g.sync();
    }
  }
}

// The task's loss (a mean over points, and over outputs for MSE) into ws.cell[0], and, if
// with_delta, δ_L = dL/dz_L into the pass. MSE: δ = 2(z - y)/(K n_L). Cross-entropy, stable
// through log-sum-exp: L = mean_k (lse_k - z_k[y_k]), δ = (softmax(z) - onehot(y))/K.
template <class T, class G>
PYMAML_HD void mlp_loss(const G& g, const MlpSpec& s, Targets<T> y, int K, bool with_delta, const Pass<T>& pass,
                        const TaskWorkspace<T>& ws) {
  const int n = s.outputs(), ld = padded(n);
  const T* out = TaskWorkspace<T>::layer(pass.Z, s, K, s.layers);
  T* delta = TaskWorkspace<T>::layer(pass.D, s, K, s.layers);
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

// Layer l's block of a padded parameter vector `out`: W[o, :] = Σ_k d1[k, o] in1[k, :] (+ Σ_k
// d2[k, o] in2[k, :] when d2 is given), and the bias = Σ_k d1[k, o] when the MLP has biases;
// added to `out` when accumulate. Layer 1 is stored transposed and takes the same sums as
// W^T[i, :] = Σ_k in1[k, i] d1[k, :]. The sums over k run in order (weight_products blocks them).
template <class Products, class T, class G>
PYMAML_HD void weight_products_in_order(const G& g, const MlpSpec& s, int K, int l, const T* d1, const T* in1,
                                        const T* d2, const T* in2, T* out, bool accumulate) {
  const int n_in = s.in(l), n_out = s.out(l), ld_in = padded(n_in), ld_out = padded(n_out);
  T* W = out + s.padded_offset[l];
  if (l == 1) {
    Products::gemm_rows(g, n_in, K, n_out, in1, int64_t(1), int64_t(ld_in), d1, int64_t(ld_out), W, int64_t(ld_out),
              static_cast<const T*>(nullptr), accumulate);
    if (d2) {
      Products::gemm_rows(g, n_in, K, n_out, in2, int64_t(1), int64_t(ld_in), d2, int64_t(ld_out), W, int64_t(ld_out),
                static_cast<const T*>(nullptr), true);
    }
  } else {
    Products::gemm_rows(g, n_out, K, n_in, d1, int64_t(1), int64_t(ld_out), in1, int64_t(ld_in), W, int64_t(ld_in),
              static_cast<const T*>(nullptr), accumulate);
    if (d2) {
      Products::gemm_rows(g, n_out, K, n_in, d2, int64_t(1), int64_t(ld_out), in2, int64_t(ld_in), W, int64_t(ld_in),
                static_cast<const T*>(nullptr), true);
    }
  }
  if (!s.bias && !accumulate) {  // the padded bias slots of a gradient are zero
    T* bias = out + s.bias_offset(l);
    for (int o = g.rank(); o < ld_out; o += g.size()) bias[o] = T(0);
  } else if (s.bias) {
    T* bias = out + s.bias_offset(l);
    // Σ_k d1[k, :] along contiguous rows, padding lanes included (each lane its own sum).
    for (int o0 = g.rank() * kChunk; o0 < ld_out; o0 += g.size() * kChunk) {
      T sum[kChunk];
      PYMAML_SIMD
      for (int j = 0; j < kChunk; ++j) sum[j] = (accumulate ? bias[o0 + j] : T(0)) + d1[o0 + j];
      for (int k = 1; k < K; ++k) {
        const T* row = d1 + int64_t(k) * ld_out + o0;
        PYMAML_SIMD
        for (int j = 0; j < kChunk; ++j) sum[j] += row[j];
      }
      PYMAML_SIMD
      for (int j = 0; j < kChunk; ++j) bias[o0 + j] = sum[j];
    }
  }
}

// weight_products_in_order over all K points, as blocks of kPointBlock points whose sums are
// added pairwise (see kPointBlock) when K is larger than one block. point_sums holds
// point_sum_slots(K) padded vectors; only layer l's block [padded_offset[l], bias_offset(l) +
// pad(n_l)) of each is used.
template <class Products, class T, class G>
PYMAML_HD void weight_products(const G& g, const MlpSpec& s, int K, int l, const T* d1, const T* in1, const T* d2,
                               const T* in2, T* out, bool accumulate, T* point_sums) {
  const int blocks = point_blocks(K);
  if (blocks <= 1) {
    weight_products_in_order<Products>(g, s, K, l, d1, in1, d2, in2, out, accumulate);
    return;
  }
  const int64_t PP = s.num_padded_params, begin = s.padded_offset[l];
  const int64_t size = s.bias_offset(l) + padded(s.out(l)) - begin;
  const int64_t ld_in = padded(s.in(l)), ld_out = padded(s.out(l));
  const int current = point_sum_slots(K) - 1;  // slots 0..current-1 hold partial sums of 2^j blocks
  T* block = point_sums + current * PP;
  for (int b = 0; b < blocks; ++b) {
    const int k0 = b * kPointBlock, points = K - k0 < kPointBlock ? K - k0 : kPointBlock;
    weight_products_in_order<Products>(g, s, points, l, d1 + k0 * ld_out, in1 + k0 * ld_in, d2 ? d2 + k0 * ld_out : nullptr,
                             in2 ? in2 + k0 * ld_in : nullptr, block, false);
    g.sync();
    int j = 0;
    for (; (b >> j) & 1; ++j) {  // carry: block += partial sum j
      const T* partial = point_sums + j * PP + begin;
      T* sum = block + begin;
      PYMAML_SIMD
      for (int64_t i = g.rank(); i < size; i += g.size()) sum[i] = partial[i] + sum[i];
      g.sync();
    }
    T* partial = point_sums + j * PP + begin;
    const T* sum = block + begin;
    PYMAML_SIMD
    for (int64_t i = g.rank(); i < size; i += g.size()) partial[i] = sum[i];
    g.sync();
  }
  T* target = out + begin;
  for (int64_t i = g.rank(); i < size; i += g.size()) {
    T total = 0;
    for (int j = 0; j < current; ++j) {
      if ((blocks >> j) & 1) total = point_sums[j * PP + begin + i] + total;
    }
    target[i] = accumulate ? target[i] + total : total;
  }
  g.sync();
}

// Back-propagation from δ_L in the pass: δ_{l-1} = t ⊙ σ'(z_{l-1}) with t = δ_l W_l (kept in
// the pass for activations with curvature), and, when grad is not null, gW_l = δ_l^T a_{l-1},
// gb_l = Σ_k δ_l into it.
template <class Products, class T, class G>
PYMAML_HD void mlp_backward(const G& g, const MlpSpec& s, const T* theta, int K, const Pass<T>& pass, T* grad,
                             T* point_sums) {
  const bool curvature = has_curvature(s.activation);
  for (int l = s.layers; l >= 1; --l) {
    const int n_in = s.in(l), n_out = s.out(l), ld_in = padded(n_in), ld_out = padded(n_out);
    const T* in = layer_input(s, pass, K, l);
    const T* delta = TaskWorkspace<T>::layer(pass.D, s, K, l);
    if (grad) {
      weight_products<Products>(g, s, K, l, delta, in, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), grad, false,
                      point_sums);
    }
    if (l > 1) {
      T* prev = TaskWorkspace<T>::layer(pass.D, s, K, l - 1);
      T* product = curvature ? TaskWorkspace<T>::layer(pass.Dt, s, K, l - 1) : prev;
      Products::gemm_rows(g, K, n_out, n_in, delta, int64_t(ld_out), int64_t(1), theta + s.padded_offset[l], int64_t(ld_in),
                product, int64_t(ld_in), static_cast<const T*>(nullptr), false);
      g.sync();
      for (int k = g.rank(); k < K; k += g.size()) {
        const int64_t row = int64_t(k) * ld_in;
        slope_times_row(s.activation, ld_in, in + row, product + row, prev + row);
      }
    }
    g.sync();
  }
}

// Loss and gradient at a padded theta whose transposed weights are WT; the pass keeps the
// activations and δs, and the loss is left in ws.cell[0]. grad may be null (δs only).
template <class Products, class T, class G>
PYMAML_HD void mlp_gradient(const G& g, const MlpSpec& s, const T* theta, const T* WT, Targets<T> y, int K,
                            const Pass<T>& pass, const TaskWorkspace<T>& ws, T* grad) {
  mlp_forward<Products>(g, s, theta, WT, K, pass);
  mlp_loss(g, s, y, K, true, pass, ws);
  mlp_backward<Products>(g, s, theta, K, pass, grad, ws.point_sums);
}

template <class Products, class T, class G>
PYMAML_HD T mlp_loss_at(const G& g, const MlpSpec& s, const T* theta, const T* WT, Targets<T> y, int K,
                        const Pass<T>& pass, const TaskWorkspace<T>& ws) {
  mlp_forward<Products>(g, s, theta, WT, K, pass);
  mlp_loss(g, s, y, K, false, pass, ws);
  return ws.cell[0];
}

// Hessian-vector product hv = H u of the loss at theta (R-operator: forward-over-reverse), in
// the padded layout, from a pass that mlp_gradient left at theta (activations and δs) and the
// transposed u in UT; hv += H u when accumulate:
//   R(z_l) = R(a_{l-1}) W_l^T + a_{l-1} U_l^T + u_b,  R(a_l) = σ'(z_l) R(z_l)
//   R(δ_L): MSE 2 R(z_L)/(K n_L);  cross-entropy p ⊙ (R(z) - p·R(z))/K
//   R(gW_l) = R(δ_l)^T a_{l-1} + δ_l^T R(a_{l-1}),  R(gb_l) = Σ_k R(δ_l)
//   R(δ_{l-1}) = (R(δ_l) W_l + δ_l U_l) ⊙ σ'(z_{l-1}) + (δ_l W_l) ⊙ σ''(z_{l-1}) ⊙ R(z_{l-1})
template <class Products, class T, class G>
PYMAML_HD void mlp_hvp_from_pass(const G& g, const MlpSpec& s, const T* theta, const T* WT, const T* u, const T* UT,
                                 int K, const Pass<T>& pass, const TaskWorkspace<T>& ws, T* hv, bool accumulate) {
  for (int l = 1; l <= s.layers; ++l) {
    const int n_out = s.out(l), ld_out = padded(n_out);
    const T* in = layer_input(s, pass, K, l);
    T* rz = TaskWorkspace<T>::layer(ws.RZ, s, K, l);
    forward_product<Products>(g, s, l, K, in, u, UT, rz, false);
    if (l > 1) {
      const T* r_in = TaskWorkspace<T>::layer(ws.RA, s, K, l - 1);
      forward_product<Products>(g, s, l, K, r_in, theta, WT, rz, true);
    }
    g.sync();
    if (l < s.layers) {
      const T* a = TaskWorkspace<T>::layer(pass.A, s, K, l);
      T* ra = TaskWorkspace<T>::layer(ws.RA, s, K, l);
      for (int k = g.rank(); k < K; k += g.size()) {
        const int64_t row = int64_t(k) * ld_out;
        slope_times_row(s.activation, ld_out, a + row, rz + row, ra + row);
      }
      g.sync();
    }
  }
  const int n = s.outputs(), ld = padded(n);
  const T* out = TaskWorkspace<T>::layer(pass.Z, s, K, s.layers);
  const T* r_out = TaskWorkspace<T>::layer(ws.RZ, s, K, s.layers);
  T* r_delta_out = TaskWorkspace<T>::layer(ws.RD, s, K, s.layers);
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
  for (int l = s.layers; l >= 1; --l) {
    const int n_in = s.in(l), n_out = s.out(l), ld_in = padded(n_in), ld_out = padded(n_out);
    const T* in = layer_input(s, pass, K, l);
    const T* delta = TaskWorkspace<T>::layer(pass.D, s, K, l);
    const T* r_delta = TaskWorkspace<T>::layer(ws.RD, s, K, l);
    const T* r_in = l == 1 ? nullptr : TaskWorkspace<T>::layer(ws.RA, s, K, l - 1);
    weight_products<Products>(g, s, K, l, r_delta, in, r_in ? delta : nullptr, r_in, hv, accumulate, ws.point_sums);
    if (l > 1) {
      T* r_prev = TaskWorkspace<T>::layer(ws.RD, s, K, l - 1);
      Products::gemm_rows(g, K, n_out, n_in, r_delta, int64_t(ld_out), int64_t(1), theta + s.padded_offset[l], int64_t(ld_in),
                r_prev, int64_t(ld_in), static_cast<const T*>(nullptr), false);
      Products::gemm_rows(g, K, n_out, n_in, delta, int64_t(ld_out), int64_t(1), u + s.padded_offset[l], int64_t(ld_in), r_prev,
                int64_t(ld_in), static_cast<const T*>(nullptr), true);
      g.sync();
      const T* rz = TaskWorkspace<T>::layer(ws.RZ, s, K, l - 1);
      const T* t = TaskWorkspace<T>::layer(pass.Dt, s, K, l - 1);
      for (int k = g.rank(); k < K; k += g.size()) {
        const int64_t row = int64_t(k) * ld_in;
        tangent_slope_row(s.activation, n_in, ld_in, in + row, rz + row, t + row, r_prev + row);
      }
    }
    g.sync();
  }
}

// Hessian-vector product at theta (its transposed weights in WT) on the points x, and the
// gradient into grad when it is not null; uses pass 0 of the workspace.
template <class Products, class T, class G>
PYMAML_HD void mlp_hvp(const G& g, const MlpSpec& s, const T* theta, const T* WT, const T* u, const T* x, Targets<T> y,
                       int K, const TaskWorkspace<T>& ws, T* grad, T* hv) {
  transpose_weights<Products>(g, s, u, ws.UT);
  load_input(g, s, x, K, ws.Xs);
  const Pass<T> pass = ws.pass(s, K, 0, ws.Xs);
  mlp_gradient<Products>(g, s, theta, WT, y, K, pass, ws, grad);
  mlp_hvp_from_pass<Products>(g, s, theta, WT, u, ws.UT, K, pass, ws, hv, false);
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
PYMAML_HD void meta_step_task(const G& g, const MlpSpec& s, const MetaStepShape& m, const T* theta0, const T* WT0,
                              const T* lrs, const T* step_weights, const T* support_x, Targets<T> support_y,
                              const T* query_x, Targets<T> query_y, T* workspace, T* task_loss, T* pre_loss,
                              T* step_losses, T* grad_theta, T* grad_lrs) {
  const int64_t PP = s.num_padded_params, WS = s.wt_size;
  const int S = m.steps, Ks = m.support_points, Kq = m.query_points, K = Ks > Kq ? Ks : Kq;
  const TaskWorkspace<T> ws(workspace, s, K, S);
  auto theta_at = [&](int step) { return step == 0 ? theta0 : ws.thetas + int64_t(step - 1) * PP; };
  load_input(g, s, query_x, Kq, ws.Xq);
  if (S > 0) load_input(g, s, support_x, Ks, ws.Xs);
  // θ_0 is every task's: a launcher may pass its transposed weights, computed once.
  auto WT_at = [&](int step) -> const T* { return step == 0 && WT0 != nullptr ? WT0 : ws.WTs + step * WS; };
  if (WT0 == nullptr) transpose_weights<Products>(g, s, theta0, ws.WTs);
  const Pass<T> query = ws.pass(s, K, S, ws.Xq);
  if (S == 0) {
    mlp_gradient<Products>(g, s, theta0, WT_at(0), query_y, Kq, query, ws, grad_theta);
    if (g.rank() == 0) *pre_loss = *task_loss = ws.cell[0];
    g.sync();
    return;
  }
  const T pre = mlp_loss_at<Products>(g, s, theta0, WT_at(0), query_y, Kq, query, ws);
  if (g.rank() == 0) *pre_loss = pre;
  // Inner loop; pass `step` keeps the support activations and δs at θ_step for its HVP.
  for (int step = 0; step < S; ++step) {
    const T* theta = theta_at(step);
    T* grad = ws.grads + step * PP;
    mlp_gradient<Products>(g, s, theta, WT_at(step), support_y, Ks, ws.pass(s, K, step, ws.Xs), ws, grad);
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
    const T loss = mlp_loss_at<Products>(g, s, theta_at(step), WT_at(step), query_y, Kq, query, ws);
    if (g.rank() == 0) step_losses[step - 1] = loss;
    total += step_weights[step - 1] * loss;
  }
  // The reverse chain, with v in grad_theta: v_S = w_S ∇L_query(θ_S).
  T* v = grad_theta;
  mlp_gradient<Products>(g, s, theta_at(S), WT_at(S), query_y, Kq, query, ws, v);
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
      mlp_gradient<Products>(g, s, theta_at(step), WT_at(step), query_y, Kq, query, ws, ws.qg);
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
      mlp_hvp_from_pass<Products>(g, s, theta_at(at), WT_at(at), ws.u, ws.UT, Ks, ws.pass(s, K, at, ws.Xs), ws, v, true);
    }
    g.sync();
  }
}

}  // namespace pymaml
