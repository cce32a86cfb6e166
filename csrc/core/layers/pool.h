// MaxPool2d and AvgPool2d, kernel = stride, no padding.
//
// Not built yet: configure refuses every layer, so make_network refuses a network that holds one.
#pragma once

#include "../layer.h"

namespace pymaml {
namespace {

struct MaxPoolLayer {
  static bool configure(Layer&) { return false; }
  static bool aliases_input(const Layer&) { return false; }
  static bool backward_in_place(const Layer&) { return false; }
  static bool r_backward_in_place(const Layer&) { return false; }

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

struct AvgPoolLayer {
  static bool configure(Layer&) { return false; }
  static bool aliases_input(const Layer&) { return false; }
  static bool backward_in_place(const Layer&) { return false; }
  static bool r_backward_in_place(const Layer&) { return false; }

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
