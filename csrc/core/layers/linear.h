// Linear: z = a W^T + b, W [out, in], b [out] (with or without bias), θ holding W row-major and
// then b, as nn.Linear flattens them.
//
// Padded layout: a Linear whose input is data (no parameters before it) needs no δ product, so
// its forward product, its gradient and its HVP all read or write W^T directly and it keeps W
// transposed, [in, pad(out)]; the others keep W as [out, pad(in)]. Either is followed by b padded
// to pad(out) (present even without bias, and then zero). A Linear with at most kDotMaxOutputs
// outputs and a non-data input (the sinusoid's 40 → 1) computes its forward product from W's rows
// as dot products, where tiles would spend 15 of 16 lanes on padding; the other non-data ones
// from a transposed copy WT [in, pad(out)] followed by the bias row (transpose_weights).
//
//   forward      z = a W^T + b
//   backward     gW = δ^T a, gb = Σ_k δ (δ = dL/dz), and dL/da = δ W
//   R-forward    R(z) = R(a) W^T + a U^T + u_b
//   R-backward   R(gW) = R(δ)^T a + δ^T R(a), R(gb) = Σ_k R(δ), R(dL/da) = R(δ) W + δ U
#pragma once

#include "../layer.h"
#include "../point_sums.h"

namespace pymaml {
namespace {

struct LinearLayer {
  static constexpr int kDotMaxOutputs = kChunk / 4;

  PYMAML_HD_STATIC_MEMBER bool transposed(const Layer& L) { return L.input_is_data; }
  PYMAML_HD_STATIC_MEMBER bool dot(const Layer& L) { return !L.input_is_data && L.out <= kDotMaxOutputs; }
  PYMAML_HD_STATIC_MEMBER bool needs_transpose(const Layer& L) { return !L.input_is_data && !dot(L); }
  PYMAML_HD_STATIC_MEMBER int64_t bias_offset(const Layer& L) {
    return L.padded_offset + (transposed(L) ? int64_t(L.in) * padded(L.out) : int64_t(L.out) * padded(L.in));
  }
  // The padded index of W[o, i].
  PYMAML_HD_STATIC_MEMBER int64_t weight_index(const Layer& L, int o, int i) {
    return L.padded_offset + (transposed(L) ? int64_t(i) * padded(L.out) + o : int64_t(o) * padded(L.in) + i);
  }

  static bool aliases_input(const Layer&) { return false; }
  static bool backward_in_place(const Layer&) { return false; }
  static bool r_backward_in_place(const Layer&) { return false; }

  // Sizes, from in, channels_out (the out features), bias and input_is_data. The input is a vector
  // (nn.Linear on an image would act on its last axis; a Flatten comes first).
  static bool configure(Layer& L) {
    if (L.height_in != 1 || L.width_in != 1 || L.channels_out < 1) return false;
    L.out = L.channels_out;
    L.params = int64_t(L.out) * L.in + (L.bias ? L.out : 0);
    L.padded_params = (transposed(L) ? int64_t(L.in) * padded(L.out) : int64_t(L.out) * padded(L.in)) + padded(L.out);
    L.wt_size = needs_transpose(L) ? (int64_t(L.in) + 1) * padded(L.out) : 0;
    return true;
  }

  // Between the flat layout and the padded one (whose padding lanes must already be zero).
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void pack(const G& g, const Layer& L, const T* flat, T* padded_out) {
    const T* w = flat + L.param_offset;
    for (int o = g.rank(); o < L.out; o += g.size()) {
      for (int i = 0; i < L.in; ++i) padded_out[weight_index(L, o, i)] = w[int64_t(o) * L.in + i];
      if (L.bias) padded_out[bias_offset(L) + o] = w[int64_t(L.out) * L.in + o];
    }
  }
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void unpack(const G& g, const Layer& L, const T* padded_in, T* flat) {
    T* w = flat + L.param_offset;
    for (int o = g.rank(); o < L.out; o += g.size()) {
      for (int i = 0; i < L.in; ++i) w[int64_t(o) * L.in + i] = padded_in[weight_index(L, o, i)];
      if (L.bias) w[int64_t(L.out) * L.in + o] = padded_in[bias_offset(L) + o];
    }
  }

  // WT = W^T [in, pad(out)] and the padded bias row, where the layer reads them (needs_transpose).
  // Only real lanes are written.
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void transpose(const G& g, const Layer& L, const T* theta, T* WT) {
    if (!needs_transpose(L)) return;
    const int ld_out = padded(L.out), ld_in = padded(L.in);
    T* wt = WT + L.wt_offset;
    Products::transpose(g, L.out, L.in, theta + L.padded_offset, int64_t(ld_in), wt, int64_t(ld_out));
    for (int o = g.rank(); o < L.out; o += g.size()) wt[int64_t(L.in) * ld_out + o] = theta[bias_offset(L) + o];
  }

  // z = in W^T + b (accumulate: z += in W^T), W read as the layout above says.
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void product(const G& g, const Layer& L, int K, const T* in, const T* theta, const T* WT,
                                       T* z, bool accumulate) {
    const int ld_in = padded(L.in), ld_out = padded(L.out);
    if (dot(L)) {
      Products::gemm_rows_dot(g, K, L.out, L.in, ld_in, in, int64_t(ld_in), theta + L.padded_offset, int64_t(ld_in), z,
                              int64_t(ld_out), theta + bias_offset(L), accumulate);
    } else {
      const T* wt = transposed(L) ? theta + L.padded_offset : WT + L.wt_offset;
      Products::gemm_rows(g, K, L.in, L.out, in, int64_t(ld_in), int64_t(1), wt, int64_t(ld_out), z, int64_t(ld_out),
                          wt + int64_t(L.in) * ld_out, accumulate);
    }
  }

  // The layer's block of a padded parameter vector `out`: W[o, :] = Σ_k d1[k, o] in1[k, :] (+ Σ_k
  // d2[k, o] in2[k, :] when d2 is given), and the bias = Σ_k d1[k, o] when the layer has one;
  // added to `out` when accumulate. Transposed storage takes the same sums as W^T[i, :] = Σ_k
  // in1[k, i] d1[k, :]. The sums over k run in order (weight_products blocks them).
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void weight_products_in_order(const G& g, const Layer& L, int K, const T* d1, const T* in1,
                                                        const T* d2, const T* in2, T* out, bool accumulate) {
    const int n_in = L.in, n_out = L.out, ld_in = padded(n_in), ld_out = padded(n_out);
    T* W = out + L.padded_offset;
    if (transposed(L)) {
      Products::gemm_rows(g, n_in, K, n_out, in1, int64_t(1), int64_t(ld_in), d1, int64_t(ld_out), W, int64_t(ld_out),
                          static_cast<const T*>(nullptr), accumulate);
      if (d2) {
        Products::gemm_rows(g, n_in, K, n_out, in2, int64_t(1), int64_t(ld_in), d2, int64_t(ld_out), W,
                            int64_t(ld_out), static_cast<const T*>(nullptr), true);
      }
    } else {
      Products::gemm_rows(g, n_out, K, n_in, d1, int64_t(1), int64_t(ld_out), in1, int64_t(ld_in), W, int64_t(ld_in),
                          static_cast<const T*>(nullptr), accumulate);
      if (d2) {
        Products::gemm_rows(g, n_out, K, n_in, d2, int64_t(1), int64_t(ld_out), in2, int64_t(ld_in), W,
                            int64_t(ld_in), static_cast<const T*>(nullptr), true);
      }
    }
    if (!L.bias && !accumulate) {  // the padded bias slots of a gradient are zero
      T* bias = out + bias_offset(L);
      for (int o = g.rank(); o < ld_out; o += g.size()) bias[o] = T(0);
    } else if (L.bias) {
      T* bias = out + bias_offset(L);
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
  // point_sum_slots(K) padded vectors of PP values; only the layer's block of each is used.
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void weight_products(const G& g, const Layer& L, int K, const T* d1, const T* in1,
                                               const T* d2, const T* in2, T* out, bool accumulate, T* point_sums,
                                               int64_t PP) {
    const int blocks = point_blocks(K);
    if (blocks <= 1) {
      weight_products_in_order<Products>(g, L, K, d1, in1, d2, in2, out, accumulate);
      return;
    }
    const int64_t begin = L.padded_offset, size = L.padded_params;
    const int64_t ld_in = padded(L.in), ld_out = padded(L.out);
    const int current = point_sum_slots(K) - 1;  // slots 0..current-1 hold partial sums of 2^j blocks
    T* block = point_sums + current * PP;
    for (int b = 0; b < blocks; ++b) {
      const int k0 = b * kPointBlock, points = K - k0 < kPointBlock ? K - k0 : kPointBlock;
      weight_products_in_order<Products>(g, L, points, d1 + k0 * ld_out, in1 + k0 * ld_in,
                                         d2 ? d2 + k0 * ld_out : nullptr, in2 ? in2 + k0 * ld_in : nullptr, block,
                                         false);
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

  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void forward(const G& g, const Layer& L, int K, const LayerParams<T>& p,
                                       const LayerIO<T>& io) {
    product<Products>(g, L, K, io.in, p.theta, p.WT, io.out, false);
    g.sync();
  }

  // gW, gb into grad (when not null) and dL/da = δ W into io.grad_in (when the input is not data).
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void backward(const G& g, const Layer& L, int K, const LayerParams<T>& p,
                                        const LayerIO<T>& io, T* grad, T* point_sums, int64_t PP) {
    const int ld_in = padded(L.in), ld_out = padded(L.out);
    if (grad) {
      weight_products<Products>(g, L, K, io.grad_out, io.in, static_cast<const T*>(nullptr),
                                static_cast<const T*>(nullptr), grad, false, point_sums, PP);
    }
    if (io.grad_in) {
      Products::gemm_rows(g, K, L.out, L.in, io.grad_out, int64_t(ld_out), int64_t(1), p.theta + L.padded_offset,
                          int64_t(ld_in), io.grad_in, int64_t(ld_in), static_cast<const T*>(nullptr), false);
    }
    g.sync();
  }

  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_forward(const G& g, const Layer& L, int K, const LayerParams<T>& p,
                                         const LayerIO<T>& io) {
    product<Products>(g, L, K, io.in, p.u, p.UT, io.r_out, false);
    if (io.r_in) product<Products>(g, L, K, io.r_in, p.theta, p.WT, io.r_out, true);
    g.sync();
  }

  // R(gW), R(gb) into hv (added when accumulate) and R(dL/da) into io.r_grad_in.
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_backward(const G& g, const Layer& L, int K, const LayerParams<T>& p,
                                          const LayerIO<T>& io, T* hv, bool accumulate, T* point_sums, int64_t PP) {
    const int ld_in = padded(L.in), ld_out = padded(L.out);
    weight_products<Products>(g, L, K, io.r_grad_out, io.in, io.r_in ? io.grad_out : nullptr, io.r_in, hv, accumulate,
                              point_sums, PP);
    if (io.r_grad_in) {
      Products::gemm_rows(g, K, L.out, L.in, io.r_grad_out, int64_t(ld_out), int64_t(1), p.theta + L.padded_offset,
                          int64_t(ld_in), io.r_grad_in, int64_t(ld_in), static_cast<const T*>(nullptr), false);
      Products::gemm_rows(g, K, L.out, L.in, io.grad_out, int64_t(ld_out), int64_t(1), p.u + L.padded_offset,
                          int64_t(ld_in), io.r_grad_in, int64_t(ld_in), static_cast<const T*>(nullptr), true);
    }
    g.sync();
  }
};

}  // namespace
}  // namespace pymaml
