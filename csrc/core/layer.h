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
//
// Images are stored channels last: a point's row of a [C, H, W] value holds pixel (h, w)'s C
// channels at (h·W + w)·C (load_input transposes the input from torch's [C, H, W]; a Linear after
// Flatten reads its weights' columns in that order, see LinearLayer::pack). A vector of n
// features is the image [n, 1, 1].
//
// Besides its slots a layer may use, in each routine, `scratch` (transient, shared by all layers:
// scratch_fixed + K·scratch_per_point values), and `state` (its own state_size values per pass,
// written by its forward and read by the routines after it on the same pass, e.g. batch
// statistics) with `r_state` (state_size values of its own, written by its R-forward and read by
// its R-backward in the same Hessian-vector product).
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
  int channels_in = 0, height_in = 1, width_in = 1;    // in = channels_in·height_in·width_in
  int channels_out = 0, height_out = 1, width_out = 1;  // out likewise; configure sets them
  int kernel = 0, stride = 1, padding = 0;             // Conv2d, pooling
  int64_t params = 0;         // its parameter count in θ
  int64_t scratch_fixed = 0, scratch_per_point = 0;    // transient scratch (values)
  int64_t state_size = 0, state_offset = 0;            // per-pass state (values), offset in a pass's state
  double constant = 0;        // LeakyReLU's negative slope, ELU's alpha, BatchNorm's eps
  LayerKind kind = LayerKind::linear;
  Activation activation = Activation::none;
  bool bias = false;
  bool affine = false;        // BatchNorm with a weight and a bias
  int rows = 1;               // BatchNorm's rows of γ and β: row min(s, rows − 1) at inner step s
  // No layer with parameters comes before this one: the gradient of its input is not needed and
  // the tangent of its input is zero.
  bool input_is_data = true;
  signed char value_in = 0, value_out = 0;    // value slots
  signed char grad_in = -1, grad_out = -1;    // gradient buffers (slot numbers); -1: none
  signed char r_grad_in = -1, r_grad_out = -1;  // R(gradient) buffers (slot numbers); -1: none
};

// The parameters at which a layer is evaluated, all in the padded layout: θ and its transposed
// weight copies WT (transpose_weights), and for the R-operator the direction u and its copies UT;
// step: the inner step s of θ (θ_s), which selects a per-step BatchNorm's row.
template <class T>
struct LayerParams {
  const T* theta;
  const T* WT;
  const T* u;
  const T* UT;
  int step = 0;
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
  T* scratch;
  T* state;    // null in a pass without state (state_size 0)
  T* r_state;  // null outside a Hessian-vector product
};

}  // namespace pymaml
