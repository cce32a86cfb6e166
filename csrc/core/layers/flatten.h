// Flatten: [K, C, H, W] → [K, C·H·W] in torch's order, feature c·H·W + h·W + w. Images are stored
// channels last (csrc/core/layer.h), so for C > 1 and H·W > 1 the layer copies each point's row
// into that order (a permutation P: out = P in), and its gradients and tangents go back through
// P^T. Otherwise the rows are already in torch's order: the layer changes no value, its output is
// its input's slot, its gradients are its output's, and every routine is empty.
//
//   forward      out = P in          backward     dL/din = P^T dL/dout
//   R-forward    R(out) = P R(in)    R-backward   R(dL/din) = P^T R(dL/dout)
#pragma once

#include "../layer.h"

namespace pymaml {
namespace {

struct FlattenLayer {
  PYMAML_HD_STATIC_MEMBER bool permutes(const Layer& L) {
    return L.channels_in > 1 && int64_t(L.height_in) * L.width_in > 1;
  }

  static bool configure(Layer& L) {
    L.out = L.in;
    L.channels_out = L.in;
    L.height_out = L.width_out = 1;
    L.params = 0;
    L.padded_params = 0;
    L.wt_size = 0;
    return true;
  }
  static bool aliases_input(const Layer& L) { return !permutes(L); }
  static bool backward_in_place(const Layer& L) { return !permutes(L); }
  static bool r_backward_in_place(const Layer& L) { return !permutes(L); }

  // dst = P src (to_torch_order) or P^T src, row by row over K points of pad(in) values; only real
  // lanes are written.
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void permute(const G& g, const Layer& L, int K, const T* src, T* dst, bool to_torch_order) {
    const int C = L.channels_in, P = L.height_in * L.width_in, ld = padded(L.in);
    const int64_t total = int64_t(K) * L.in;
    for (int64_t e = g.rank(); e < total; e += g.size()) {
      const int64_t k = e / L.in;
      const int f = int(e - k * L.in), c = f / P, p = f - c * P;  // f = c·P + p in torch's order
      const int64_t torch_index = k * ld + f, stored_index = k * ld + int64_t(p) * C + c;
      if (to_torch_order) {
        dst[torch_index] = src[stored_index];
      } else {
        dst[stored_index] = src[torch_index];
      }
    }
    g.sync();
  }

  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void pack(const G&, const Layer&, const T*, T*) {}
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void unpack(const G&, const Layer&, const T*, T*) {}
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void transpose(const G&, const Layer&, const T*, T*) {}

  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void forward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                       const LayerIO<T>& io) {
    if (permutes(L)) permute(g, L, K, io.in, io.out, true);
  }
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void backward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                        const LayerIO<T>& io, T*, T*, int64_t) {
    if (permutes(L) && io.grad_in) permute(g, L, K, io.grad_out, io.grad_in, false);
  }
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_forward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                         const LayerIO<T>& io) {
    if (permutes(L) && io.r_in) permute(g, L, K, io.r_in, io.r_out, true);
  }
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_backward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                          const LayerIO<T>& io, T*, bool, T*, int64_t) {
    if (permutes(L) && io.r_grad_in) permute(g, L, K, io.r_grad_out, io.r_grad_in, false);
  }
};

}  // namespace
}  // namespace pymaml
