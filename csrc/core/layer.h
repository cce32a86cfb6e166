// What every layer routine sees: its descriptor (Layer), the parameters of the point at which the
// network is evaluated, and the per-point buffers of its input and output.
//
// A network is a sequence of layers between value slots: slot 0 is the network's input, every
// other slot a layer's output, rows of pad(width) per point ([K, pad(width)] row-major, padding
// lanes zero while every value is finite; see kChunk). A layer that changes no value (Flatten)
// writes no slot of its own: its output is its input's slot. Per slot there is also a gradient
// buffer (dL/d value) and, for Hessian-vector products, the tangents R(value) and R(dL/d value)
// (Pearlmutter's R-operator, forward-over-reverse). A layer reads the gradient of its output from
// grad_out and writes the gradient of its input to grad_in; a layer whose backward runs in place
// (ReLU, Identity, Flatten) has grad_in == grad_out.
#pragma once

#include <cstdint>

#include "common.h"
#include "layers/kinds.h"

namespace pymaml {

struct Layer {
  int64_t param_offset = 0;   // its parameters' offset in θ (flattened in nn.Sequential order)
  int64_t padded_offset = 0;  // and in the padded layout the per-task math works in
  int64_t padded_params = 0;  // its padded parameter count
  int64_t wt_offset = 0;      // its block of the transposed weight copies (wt_size values), if any
  int64_t wt_size = 0;
  int in = 0, out = 0;        // features per point of its input and output
  int64_t params = 0;         // its parameter count in θ
  LayerKind kind = LayerKind::linear;
  Activation activation = Activation::none;
  bool bias = false;
  // No layer with parameters comes before this one: the gradient of its input is not needed and
  // the tangent of its input is zero.
  bool input_is_data = true;
  signed char value_in = 0, value_out = 0;    // value slots
  signed char grad_in = -1, grad_out = -1;    // gradient buffers (slot numbers); -1: none
  signed char r_grad_in = -1, r_grad_out = -1;  // R(gradient) buffers (slot numbers); -1: none
};

// The parameters at which a layer is evaluated, all in the padded layout: θ and its transposed
// weight copies WT (transpose_weights), and for the R-operator the direction u and its copies UT.
template <class T>
struct LayerParams {
  const T* theta;
  const T* WT;
  const T* u;
  const T* UT;
};

// One layer's buffers in one pass over K points: values, gradients and their tangents (null where
// the layer has none: the gradient of an input that is data, the tangent of a zero tangent).
template <class T>
struct LayerIO {
  const T* in;
  T* out;
  const T* grad_out;
  T* grad_in;
  const T* r_in;
  T* r_out;
  const T* r_grad_out;
  T* r_grad_in;
};

}  // namespace pymaml
