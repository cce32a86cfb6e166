// Shared definitions for the per-task MLP math. No torch, no threads of its own: the same code
// runs on the CPU (one thread per task) and on CUDA (one block per task).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYMAML_HD __host__ __device__ __forceinline__
#else
#define PYMAML_HD inline
#endif

#define PYMAML_PRAGMA(x) _Pragma(#x)
#if defined(__CUDA_ARCH__) || !defined(_OPENMP)
#define PYMAML_SIMD_SUM(var)
#define PYMAML_SIMD
#else
// Lets the compiler reassociate this one reduction into SIMD lanes (GCC will not without
// -ffast-math, which pymaml does not use).
#define PYMAML_SIMD_SUM(var) PYMAML_PRAGMA(omp simd reduction(+ : var))
#define PYMAML_SIMD PYMAML_PRAGMA(omp simd)
#endif

namespace pymaml {

enum class Activation : int { none = 0, relu = 1, tanh = 2, sigmoid = 3 };
enum class Loss : int { mse = 0, cross_entropy = 1 };

constexpr int kMaxLayers = 16;

// An MLP: `layers` Linear layers of widths n_0 -> n_1 -> ... -> n_L, the activation between
// them (none after the last). Parameters are flattened in nn.Sequential order: W_1 [n_1, n_0]
// row-major, b_1 [n_1] (if bias), W_2, b_2, ...
struct MlpSpec {
  int layers = 0;
  int widths[kMaxLayers + 1] = {};
  int64_t param_offset[kMaxLayers + 1] = {};  // offset of W_l for l = 1..L; [0] unused
  int64_t unit_offset[kMaxLayers + 1] = {};   // offset of layer l's units in per-point buffers
  int64_t num_params = 0;
  int64_t total_units = 0;  // n_1 + ... + n_L
  int max_width = 0;
  bool bias = true;
  Activation activation = Activation::relu;
  Loss loss = Loss::mse;

  PYMAML_HD int in(int l) const { return widths[l - 1]; }
  PYMAML_HD int out(int l) const { return widths[l]; }
  PYMAML_HD int outputs() const { return widths[layers]; }
};

// Builds the offsets; returns false if the widths are invalid.
inline bool make_spec(const int* widths, int count, bool bias, Activation activation, Loss loss, MlpSpec* spec) {
  if (count < 2 || count > kMaxLayers + 1) return false;
  spec->layers = count - 1;
  spec->bias = bias;
  spec->activation = activation;
  spec->loss = loss;
  int64_t params = 0, units = 0;
  int widest = 0;
  for (int i = 0; i < count; ++i) {
    if (widths[i] < 1) return false;
    spec->widths[i] = widths[i];
    widest = widths[i] > widest ? widths[i] : widest;
  }
  for (int l = 1; l < count; ++l) {
    spec->param_offset[l] = params;
    spec->unit_offset[l] = units;
    params += int64_t(widths[l]) * widths[l - 1] + (bias ? widths[l] : 0);
    units += widths[l];
  }
  spec->num_params = params;
  spec->total_units = units;
  spec->max_width = widest;
  return true;
}

// A group of threads that work on one task together. The per-task routines split their loops
// over rank() in steps of size() and call sync() between dependent phases.
struct SerialGroup {
  PYMAML_HD int rank() const { return 0; }
  PYMAML_HD int size() const { return 1; }
  PYMAML_HD void sync() const {}
};

}  // namespace pymaml
