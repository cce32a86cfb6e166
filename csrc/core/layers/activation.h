// Activations a = σ(z) elementwise: ReLU, LeakyReLU, ELU, Tanh, Sigmoid and Identity
// (Activation::none), each point's row of pad(n) values. LeakyReLU's negative slope and ELU's
// alpha are the layer's constant c:
//   LeakyReLU  a = z if z > 0 else c·z;            σ' = 1 or c;                    σ'' = 0
//   ELU        a = z if z > 0 else c·(exp(z) − 1);  σ' = 1 or c·exp(z) = a + c;  σ'' = c·exp(z) = a + c
//              where z < 0, else 0 (torch's second derivative is 0 at z = 0, its first c)
//
//   forward      a = σ(z)
//   backward     dL/dz = σ'(z) ⊙ dL/da
//   R-forward    R(a) = σ'(z) ⊙ R(z)
//   R-backward   R(dL/dz) = σ'(z) ⊙ R(dL/da) + σ''(z) ⊙ dL/da ⊙ R(z)
//
// The backward and the R-backward run in place where σ'' = 0 (ReLU, LeakyReLU, Identity): the
// layer's input gradient is its output gradient's buffer. With curvature (ELU, tanh, sigmoid)
// dL/da is kept apart from dL/dz, since the R-backward needs it.
//
// Every slope is taken from the output a: for LeakyReLU with c ≥ 0 and for ELU with c ≥ 0, a > 0
// exactly when z > 0 (z ≤ 0 gives a ≤ 0, a NaN z a NaN a), so configure refuses a negative or
// non-finite constant. Only ELU's σ'' reads z (its input, which the pass keeps): for z just below
// 0, exp(z) − 1 rounds to a = 0, which cannot tell z < 0 from z = 0.
#pragma once

#include "../layer.h"
#include "../math.h"

namespace pymaml {

// Non-finite values propagate as torch propagates them, so that a NaN or Inf in the weights
// reaches the loss and the gradients exactly where autograd puts it:
//   ReLU: relu(NaN) = NaN, and its backward is torch's threshold_backward on the result a:
//   r where !(a <= 0), else exactly 0 (even for a NaN or infinite r); so a NaN unit passes r on.
//   LeakyReLU: leaky_relu(NaN) = NaN, and its backward is torch's leaky_relu_backward on z:
//   r where z > 0, else c·r; a NaN unit is not > 0 and passes c·r on.
//   ELU: elu(NaN) = NaN, and its backward is torch's vectorized elu_backward on z: r where z > 0,
//   else c·exp(z)·r, so a NaN unit gives NaN (torch's scalar loop, which takes the elements past
//   the last whole vector, tests z ≤ 0 instead and passes r on). The forward is torch's
//   (exp(z) − 1)·c where z ≤ 0.
//   tanh, sigmoid: σ'(z) · r with σ' from a, as torch's tanh_backward and sigmoid_backward.
// The selects compare a and are written as `a <= 0 ? 0 : r` (ReLU) and `a > 0 ? r : c·r`
// (LeakyReLU, ELU) so that a NaN takes torch's branch; with -fno-trapping-math they vectorize to a
// compare and a bit mask.
//
// σ'(z) and σ''(z) of the activations with curvature, from a = σ(z): tanh: σ' = 1 - a², σ'' =
// -2a σ'; sigmoid: σ' = a(1 - a), σ'' = σ'(1 - 2a). (ReLU, LeakyReLU and none have σ'' = 0 and
// take slope_times_row; ELU its own select in tangent_slope_row.)
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

PYMAML_HD bool has_curvature(Activation act) {
  return act == Activation::tanh || act == Activation::sigmoid || act == Activation::elu;
}

// Row-wise elementwise passes, with the switch on the activation outside the loops so that
// each loop vectorizes. Callers pass the padded width where the padding lanes may be written:
// whole SIMD registers, no scalar tail. Padding lanes carry no meaning (they are zero while
// every value is finite, and may hold NaN when a real value is not); no routine sums over them.
// a[i] = σ(z[i])
template <class T>
PYMAML_HD void activate_row(Activation act, T c, int n, const T* z, T* a) {
  switch (act) {
    case Activation::relu:
      PYMAML_SIMD
      for (int i = 0; i < n; ++i) a[i] = z[i] < T(0) ? T(0) : z[i];  // NaN stays NaN
      break;
    case Activation::leaky_relu:
      PYMAML_SIMD
      for (int i = 0; i < n; ++i) a[i] = z[i] > T(0) ? z[i] : c * z[i];  // NaN stays NaN
      break;
    case Activation::elu:
      for (int i = 0; i < n; ++i) a[i] = z[i] > T(0) ? z[i] : (math_exp(z[i]) - T(1)) * c;  // NaN stays NaN
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
// ReLU's r is loaded before its select, and ELU's curvature term (tangent_slope_row) is taken in
// a select of its own before the outer one: where a load sits in one branch of the outer select
// only, GCC's AVX-512 code loads it under a mask merged into a register it keeps in a stack slot,
// a store-to-load chain through memory on every iteration of the loop.
template <class T>
PYMAML_HD void slope_times_row(Activation act, T c, int n, const T* a, const T* r, T* out) {
  switch (act) {
    case Activation::relu:
      PYMAML_SIMD
      for (int i = 0; i < n; ++i) {
        const T value = r[i];
        out[i] = a[i] <= T(0) ? T(0) : value;
      }
      break;
    case Activation::leaky_relu:
      PYMAML_SIMD
      for (int i = 0; i < n; ++i) out[i] = a[i] > T(0) ? r[i] : c * r[i];
      break;
    case Activation::elu:
      PYMAML_SIMD
      for (int i = 0; i < n; ++i) out[i] = a[i] > T(0) ? r[i] : (a[i] + c) * r[i];
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
// product before the slope (δ = t σ'(z)); z is read by ELU only.
template <class T>
PYMAML_HD void tangent_slope_row(Activation act, T c, int n, int ld, const T* z, const T* a, const T* rz, const T* t,
                                 T* rt) {
  if (!has_curvature(act)) {  // σ'' = 0
    slope_times_row(act, c, ld, a, rt, rt);
    return;
  }
  if (act == Activation::elu) {  // σ' = a + c where z ≤ 0, σ'' = a + c where z < 0
    PYMAML_SIMD
    for (int i = 0; i < ld; ++i) {
      const T curvature_term = z[i] < T(0) ? t[i] * rz[i] : T(0);
      rt[i] = a[i] > T(0) ? rt[i] : (rt[i] + curvature_term) * (a[i] + c);
    }
    return;
  }
  for (int i = 0; i < n; ++i) {
    const T slope = activation_slope(act, a[i]);
    rt[i] = rt[i] * slope + t[i] * activation_curvature(act, a[i], slope) * rz[i];
  }
}

namespace {

struct ActivationLayer {
  // The rows [K, ld] of a layer's buffers are contiguous, so a pass over whole padded rows is a
  // pass over K·ld values: f(offset, count) over one contiguous span of whole chunks per rank, in
  // pieces of at most kMaxSpan values (count is an int). One loop where a loop a row would pay a
  // call and the activation's switch per point: K rows of 48 values in the sinusoid's MLP.
  static constexpr int kMaxSpan = 1 << 30;
  template <class G, class F>
  PYMAML_HD_STATIC_MEMBER void for_each_span(const G& g, int K, int ld, const F& f) {
    const int64_t total = int64_t(K) * ld, chunks = total / kChunk;
    const int64_t per_rank = (chunks + g.size() - 1) / g.size() * kChunk;
    const int64_t begin = g.rank() * per_rank, end = begin + per_rank < total ? begin + per_rank : total;
    for (int64_t at = begin; at < end; at += kMaxSpan) f(at, int(end - at < kMaxSpan ? end - at : kMaxSpan));
  }

  // LeakyReLU's slope and ELU's alpha must not be negative: the slopes are read from the sign of
  // the output a (see above), which is the sign of z only then. They must be finite in float32 too
  // (at most FLT_MAX), and a NaN constant fails both tests.
  static constexpr double kFloatMax = 3.4028234663852886e38;
  static bool configure(Layer& L) {
    if (L.activation == Activation::leaky_relu || L.activation == Activation::elu) {
      if (!(L.constant >= 0 && L.constant <= kFloatMax)) return false;
    }
    L.out = L.in;
    L.channels_out = L.channels_in;
    L.height_out = L.height_in;
    L.width_out = L.width_in;
    L.params = 0;
    L.padded_params = 0;
    L.wt_size = 0;
    return true;
  }
  static bool aliases_input(const Layer&) { return false; }
  // The backward writes dL/dz over dL/da.
  static bool backward_in_place(const Layer& L) { return !has_curvature(L.activation); }
  static bool r_backward_in_place(const Layer&) { return true; }

  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void pack(const G&, const Layer&, const T*, T*) {}
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void unpack(const G&, const Layer&, const T*, T*) {}
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void transpose(const G&, const Layer&, const T*, T*) {}

  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void forward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                       const LayerIO<T>& io) {
    const int ld = padded(L.out);
    if (L.activation == Activation::sigmoid) {  // σ(0) ≠ 0: the real lanes only, keeping padding zero
      for (int k = g.rank(); k < K; k += g.size()) {
        activate_row(L.activation, T(L.constant), L.out, io.in + int64_t(k) * ld, io.out + int64_t(k) * ld);
      }
    } else {  // σ(0) = 0 keeps padding zero
      for_each_span(g, K, ld, [&](int64_t at, int n) {
        activate_row(L.activation, T(L.constant), n, io.in + at, io.out + at);
      });
    }
    g.sync();
  }

  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void backward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                        const LayerIO<T>& io, T*, T*, int64_t) {
    if (!io.grad_in) return;
    for_each_span(g, K, padded(L.out), [&](int64_t at, int n) {
      slope_times_row(L.activation, T(L.constant), n, io.out + at, io.grad_out + at, io.grad_in + at);
    });
    g.sync();
  }

  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_forward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                         const LayerIO<T>& io) {
    if (!io.r_in) return;
    for_each_span(g, K, padded(L.out), [&](int64_t at, int n) {
      slope_times_row(L.activation, T(L.constant), n, io.out + at, io.r_in + at, io.r_out + at);
    });
    g.sync();
  }

  // In place over R(dL/da) (io.r_grad_in == io.r_grad_out).
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_backward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                          const LayerIO<T>& io, T*, bool, T*, int64_t) {
    if (!io.r_grad_in) return;
    const int ld = padded(L.out);
    if (L.activation == Activation::tanh || L.activation == Activation::sigmoid) {  // the real lanes only
      for (int k = g.rank(); k < K; k += g.size()) {
        const int64_t row = int64_t(k) * ld;
        tangent_slope_row(L.activation, T(L.constant), L.out, ld, io.in + row, io.out + row, io.r_in + row,
                          io.grad_out + row, io.r_grad_in + row);
      }
    } else {  // whole padded rows
      for_each_span(g, K, ld, [&](int64_t at, int n) {
        tangent_slope_row(L.activation, T(L.constant), n, n, io.in + at, io.out + at, io.r_in + at,
                          io.grad_out + at, io.r_grad_in + at);
      });
    }
    g.sync();
  }
};

}  // namespace
}  // namespace pymaml
