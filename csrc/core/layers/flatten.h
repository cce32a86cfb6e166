// Flatten: [K, features...] → [K, Π features]. Per-point rows are already flat, so the layer
// changes no value: its output is its input's slot, its gradients are its output's, and every
// routine is empty.
#pragma once

#include "../layer.h"

namespace pymaml {
namespace {

struct FlattenLayer {
  static void configure(Layer& L) {
    L.out = L.in;
    L.params = 0;
    L.padded_params = 0;
    L.wt_size = 0;
  }
  static constexpr bool kAliasesInput = true;
  static bool backward_in_place(const Layer&) { return true; }
  static constexpr bool kRBackwardInPlace = true;

  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void pack(const G&, const Layer&, const T*, T*) {}
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void unpack(const G&, const Layer&, const T*, T*) {}
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void transpose(const G&, const Layer&, const T*, T*) {}
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void forward(const G&, const Layer&, int, const LayerParams<T>&, const LayerIO<T>&) {}
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void backward(const G&, const Layer&, int, const LayerParams<T>&, const LayerIO<T>&, T*, T*,
                                        int64_t) {}
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_forward(const G&, const Layer&, int, const LayerParams<T>&, const LayerIO<T>&) {}
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_backward(const G&, const Layer&, int, const LayerParams<T>&, const LayerIO<T>&, T*,
                                          bool, T*, int64_t) {}
};

}  // namespace
}  // namespace pymaml
