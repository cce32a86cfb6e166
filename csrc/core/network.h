// A network: a sequence of layers (csrc/core/layers/) between value slots (csrc/core/layer.h),
// with a loss on the last slot, and its layouts: parameters (flat and padded), the transposed
// weight copies, the per-point buffers. Built on the host (make_network, make_mlp_network) and
// passed by value to every launcher.
#pragma once

#include <cstdint>

#include "layer.h"
#include "layers/registry.h"

namespace pymaml {

// The most layers of a network: an MLP of kMaxLayers Linear layers is 2·kMaxLayers − 1 layers
// with its activations.
constexpr int kMaxNetworkLayers = 2 * kMaxLayers;
constexpr int kMaxSlots = kMaxNetworkLayers + 1;

struct Network {
  int count = 0;
  Layer layers[kMaxNetworkLayers];
  int slots = 1;                     // value slots, the input (slot 0) included
  int slot_width[kMaxSlots] = {};    // features per point
  int64_t slot_offset[kMaxSlots] = {};  // offset of slot s's rows in a per-point buffer, in units of K values
  int64_t units = 0;                 // Σ pad(slot_width) over slots 1.. (slot 0 lives in its own buffer)
  int64_t num_params = 0, num_padded_params = 0, wt_size = 0;
  int64_t scratch_fixed = 0, scratch_per_point = 0;  // the most any layer uses (Layer)
  int64_t state_size = 0;            // Σ state_size over layers: a pass's state
  int input_channels = 0, input_height = 1, input_width = 1;  // slot 0 as torch gives it, [C, H, W]
  Loss loss = Loss::mse;

  PYMAML_HD_MEMBER int inputs() const { return slot_width[0]; }
  PYMAML_HD_MEMBER int output_slot() const { return layers[count - 1].value_out; }
  PYMAML_HD_MEMBER int outputs() const { return slot_width[output_slot()]; }
  // Scratch values for a routine over K points.
  PYMAML_HD_MEMBER int64_t scratch(int K) const { return scratch_fixed + int64_t(K) * scratch_per_point; }
};

// The layer kinds' build-time properties.
inline bool configure_layer(Layer& L) {
  bool valid = false;
  visit_layer_on_host(L.kind, [&](auto kind) { valid = decltype(kind)::configure(L); });
  return valid;
}
inline bool layer_aliases_input(const Layer& L) {
  bool aliases = false;
  visit_layer_on_host(L.kind, [&](auto kind) { aliases = decltype(kind)::aliases_input(L); });
  return aliases;
}
inline bool layer_backward_in_place(const Layer& L) {
  bool in_place = false;
  visit_layer_on_host(L.kind, [&](auto kind) { in_place = decltype(kind)::backward_in_place(L); });
  return in_place;
}
inline bool layer_r_backward_in_place(const Layer& L) {
  bool in_place = false;
  visit_layer_on_host(L.kind, [&](auto kind) { in_place = decltype(kind)::r_backward_in_place(L); });
  return in_place;
}

// Builds the network from `count` layers on inputs of shape [channels, height, width] (a vector
// of n features: [n, 1, 1]). Each layer's kind and its own settings are set: Linear and Conv2d
// their channels_out (out features, out channels) and bias; activations their activation and
// constant; Conv2d and pooling kernel, stride, padding; BatchNorm affine and constant (eps).
// Chains the shapes, sets each layer's slots and offsets. Returns false when the layers do not
// form a network (a layer that cannot take its input's shape, no parameters, too many layers).
inline bool make_network(const Layer* layers, int count, int channels, int height, int width, Loss loss,
                         Network* net) {
  if (count < 1 || count > kMaxNetworkLayers || channels < 1 || height < 1 || width < 1) return false;
  *net = Network{};
  net->count = count;
  net->loss = loss;
  net->input_channels = channels;
  net->input_height = height;
  net->input_width = width;
  net->slot_width[0] = channels * height * width;
  int slot = 0;
  bool parameters_before = false;
  int64_t params = 0, padded_params = 0, wt = 0, state = 0;
  for (int i = 0; i < count; ++i) {
    Layer L = layers[i];
    L.channels_in = channels;
    L.height_in = height;
    L.width_in = width;
    L.in = channels * height * width;
    L.input_is_data = !parameters_before;
    if (!configure_layer(L) || L.out < 1) return false;
    L.param_offset = params;
    L.padded_offset = padded_params;
    L.wt_offset = wt;
    L.state_offset = state;
    params += L.params;
    padded_params += L.padded_params;
    wt += L.wt_size;
    state += L.state_size;
    if (L.scratch_fixed > net->scratch_fixed) net->scratch_fixed = L.scratch_fixed;
    if (L.scratch_per_point > net->scratch_per_point) net->scratch_per_point = L.scratch_per_point;
    parameters_before = parameters_before || L.params > 0;
    L.value_in = static_cast<signed char>(slot);
    if (!layer_aliases_input(L)) {
      slot = net->slots++;
      net->slot_width[slot] = L.out;
    }
    L.value_out = static_cast<signed char>(slot);
    channels = L.channels_out;
    height = L.height_out;
    width = L.width_out;
    net->layers[i] = L;
  }
  net->num_params = params;
  net->num_padded_params = padded_params;
  net->wt_size = wt;
  net->state_size = state;
  int64_t units = 0;
  for (int s = 1; s < net->slots; ++s) {
    net->slot_offset[s] = units;
    units += padded(net->slot_width[s]);
  }
  net->units = units;
  // The gradient chain, from the output back: each layer reads dL/d(output) from the buffer its
  // successor wrote, and writes dL/d(input) in place or into its input slot's buffer; none for
  // an input that is data.
  int grad = net->output_slot(), r_grad = grad;
  for (int i = count - 1; i >= 0; --i) {
    Layer& L = net->layers[i];
    L.grad_out = static_cast<signed char>(grad);
    L.r_grad_out = static_cast<signed char>(r_grad);
    if (L.input_is_data) {
      L.grad_in = L.r_grad_in = -1;
    } else {
      L.grad_in = static_cast<signed char>(layer_backward_in_place(L) ? grad : L.value_in);
      L.r_grad_in = static_cast<signed char>(layer_r_backward_in_place(L) ? r_grad : L.value_in);
    }
    grad = L.grad_in;
    r_grad = L.r_grad_in;
  }
  return net->num_params > 0;
}

// The network of an MLP: `count` widths n_0 -> n_1 -> ... -> n_L, Linear layers (all with or all
// without bias) with `activation` between them (none after the last). Its θ is flattened in
// nn.Sequential order: W_1 [n_1, n_0] row-major, b_1 [n_1] (if bias), W_2, b_2, ...
inline bool make_mlp_network(const int* widths, int count, bool bias, Activation activation, Loss loss, Network* net) {
  if (count < 2 || count > kMaxLayers + 1) return false;
  for (int i = 0; i < count; ++i) {
    if (widths[i] < 1) return false;
  }
  Layer layers[kMaxNetworkLayers];
  int n = 0;
  for (int l = 1; l < count; ++l) {
    layers[n] = Layer{};
    layers[n].kind = LayerKind::linear;
    layers[n].channels_out = widths[l];
    layers[n].bias = bias;
    ++n;
    if (l + 1 < count) {
      layers[n] = Layer{};
      layers[n].kind = LayerKind::activation;
      layers[n].activation = activation;
      ++n;
    }
  }
  return make_network(layers, n, widths[0], 1, 1, loss, net);
}

// Between the flat parameter layout (nn.Sequential order) and the padded one; the padding
// lanes of `padded_out` must already be zero.
template <class T, class G>
PYMAML_HD void to_padded(const G& g, const Network& net, const T* flat, T* padded_out) {
  for (int i = 0; i < net.count; ++i) {
    const Layer& L = net.layers[i];
    visit_layer(L.kind, [&](auto kind) { decltype(kind)::pack(g, L, flat, padded_out); });
  }
  g.sync();
}

template <class T, class G>
PYMAML_HD void from_padded(const G& g, const Network& net, const T* padded_in, T* flat) {
  for (int i = 0; i < net.count; ++i) {
    const Layer& L = net.layers[i];
    visit_layer(L.kind, [&](auto kind) { decltype(kind)::unpack(g, L, padded_in, flat); });
  }
  g.sync();
}

// The transposed weight copies WT (net.wt_size values) of a padded parameter vector.
template <class Products, class T, class G>
PYMAML_HD void transpose_weights(const G& g, const Network& net, const T* theta, T* WT) {
  for (int i = 0; i < net.count; ++i) {
    const Layer& L = net.layers[i];
    visit_layer(L.kind, [&](auto kind) { decltype(kind)::template transpose<Products>(g, L, theta, WT); });
  }
  g.sync();
}

}  // namespace pymaml
