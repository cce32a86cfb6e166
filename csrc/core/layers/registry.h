// The layer kinds' headers and the dispatch over PYMAML_LAYER_KINDS (layers/kinds.h).
#pragma once

#include "activation.h"
#include "batch_norm.h"
#include "conv2d.h"
#include "flatten.h"
#include "kinds.h"
#include "linear.h"
#include "pool.h"

namespace pymaml {

// f(Type{}) for the struct of the layer's kind: the static routines of that kind.
template <class F>
PYMAML_HD void visit_layer(LayerKind kind, F&& f) {
  switch (kind) {
#define PYMAML_LAYER_CASE(name, Type) \
  case LayerKind::name:               \
    f(Type{});                        \
    break;
    PYMAML_LAYER_KINDS(PYMAML_LAYER_CASE)
#undef PYMAML_LAYER_CASE
  }
}

// visit_layer for the host's build-time routines (csrc/core/network.h, make_network).
template <class F>
inline void visit_layer_on_host(LayerKind kind, F&& f) {
  switch (kind) {
#define PYMAML_LAYER_CASE(name, Type) \
  case LayerKind::name:               \
    f(Type{});                        \
    break;
    PYMAML_LAYER_KINDS(PYMAML_LAYER_CASE)
#undef PYMAML_LAYER_CASE
  }
}

}  // namespace pymaml
