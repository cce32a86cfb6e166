// The registry of layer kinds: one line per kind, X(name, Type), with Type the struct of static
// routines in layers/<name>.h (included by layers/registry.h). Adding a kind is its header, its
// include in layers/registry.h and its line here; the enum LayerKind, the dispatch
// (visit_layer) and the network's workspace follow from the list.
#pragma once

#define PYMAML_LAYER_KINDS(X)     \
  X(linear, LinearLayer)          \
  X(activation, ActivationLayer)  \
  X(flatten, FlattenLayer)        \
  X(conv2d, Conv2dLayer)          \
  X(batch_norm, BatchNormLayer)   \
  X(max_pool, MaxPoolLayer)       \
  X(avg_pool, AvgPoolLayer)

namespace pymaml {

enum class LayerKind : signed char {
#define PYMAML_LAYER_ENUM(name, Type) name,
  PYMAML_LAYER_KINDS(PYMAML_LAYER_ENUM)
#undef PYMAML_LAYER_ENUM
};

}  // namespace pymaml
