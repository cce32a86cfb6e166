// Shared definitions for the per-task math. No torch, no threads of its own: the same code
// runs on the CPU (one thread per task) and on CUDA (one block per task).
#pragma once

#include <cstdint>

// PYMAML_HD marks the free functions of the per-task math, PYMAML_HD_MEMBER the member
// functions and PYMAML_HD_STATIC_MEMBER the static ones (a launcher's products). On the CPU the
// free functions are `static`: each ISA-level unit (csrc/cpu/) keeps its own copies, so the
// linker never hands AVX-512 code to the baseline path.
#if defined(__CUDACC__)
#define PYMAML_HD __host__ __device__ __forceinline__
#define PYMAML_HD_MEMBER __host__ __device__ __forceinline__
#define PYMAML_HD_STATIC_MEMBER static __host__ __device__ __forceinline__
#else
#define PYMAML_HD static inline
#define PYMAML_HD_MEMBER inline
#define PYMAML_HD_STATIC_MEMBER static inline
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

// Per-point buffers and weight copies pad every row to a multiple of kChunk elements, with
// zeros in the padding, so that the inner loops run on whole SIMD registers. Partial-width rows
// (40 of 48) left a scalar tail whose stores stalled the next full-width load: padded, the
// sinusoid meta-step ran several times faster (csrc/cpu/register_tiles.h).
constexpr int kChunk = 16;
PYMAML_HD int padded(int n) { return (n + kChunk - 1) / kChunk * kChunk; }

// An MLP: `layers` Linear layers of widths n_0 -> n_1 -> ... -> n_L, the activation between
// them (none after the last). Parameters are flattened in nn.Sequential order: W_1 [n_1, n_0]
// row-major, b_1 [n_1] (if bias), W_2, b_2, ...
//
// The padded layout the per-task math works in keeps W_1 transposed, [n_0, pad(n_1)] (the
// first layer needs no δ product, so its forward product, its gradient and its HVP all read
// or write W_1^T directly), and W_l, l >= 2, as [n_l, pad(n_{l-1})]; each followed by b_l
// padded to pad(n_l) (present even without bias, and then zero). For the sinusoid MLP that is
// 2,128 values instead of 2,720 with W_1 untransposed.
struct MlpSpec {
  int layers = 0;
  int widths[kMaxLayers + 1] = {};
  int64_t param_offset[kMaxLayers + 1] = {};   // offset of W_l in θ, l = 1..L; [0] unused
  int64_t padded_offset[kMaxLayers + 1] = {};  // offset of W_l in the padded layout (see above)
  int64_t unit_offset[kMaxLayers + 1] = {};    // offset of layer l's units in a padded per-point row
  int64_t wt_offset[kMaxLayers + 1] = {};      // offset of W_l^T [n_{l-1}, pad(n_l)] and its bias row
  int64_t num_params = 0;
  int64_t num_padded_params = 0;
  int64_t total_units = 0;  // pad(n_1) + ... + pad(n_L)
  int64_t wt_size = 0;
  int max_width = 0;  // max over l of pad(n_l), n_0 included
  bool bias = true;
  Activation activation = Activation::relu;
  Loss loss = Loss::mse;

  PYMAML_HD_MEMBER int in(int l) const { return widths[l - 1]; }
  PYMAML_HD_MEMBER int out(int l) const { return widths[l]; }
  PYMAML_HD_MEMBER int outputs() const { return widths[layers]; }
  // The padded offset of b_l.
  PYMAML_HD_MEMBER int64_t bias_offset(int l) const {
    return padded_offset[l] + int64_t(l == 1 ? widths[0] * ((widths[1] + kChunk - 1) / kChunk * kChunk)
                                             : widths[l] * ((widths[l - 1] + kChunk - 1) / kChunk * kChunk));
  }
};

// Builds the offsets; returns false if the widths are invalid.
inline bool make_spec(const int* widths, int count, bool bias, Activation activation, Loss loss, MlpSpec* spec) {
  if (count < 2 || count > kMaxLayers + 1) return false;
  spec->layers = count - 1;
  spec->bias = bias;
  spec->activation = activation;
  spec->loss = loss;
  int widest = 0;
  for (int i = 0; i < count; ++i) {
    if (widths[i] < 1) return false;
    spec->widths[i] = widths[i];
    widest = padded(widths[i]) > widest ? padded(widths[i]) : widest;
  }
  int64_t params = 0, padded_params = 0, units = 0, wt = 0;
  for (int l = 1; l < count; ++l) {
    const int64_t n_in = widths[l - 1], n_out = widths[l];
    spec->param_offset[l] = params;
    spec->padded_offset[l] = padded_params;
    spec->unit_offset[l] = units;
    spec->wt_offset[l] = wt;
    params += n_out * n_in + (bias ? n_out : 0);
    padded_params += (l == 1 ? n_in * padded(int(n_out)) : n_out * padded(int(n_in))) + padded(int(n_out));
    units += padded(int(n_out));
    wt += (n_in + 1) * padded(int(n_out));
  }
  spec->num_params = params;
  spec->num_padded_params = padded_params;
  spec->total_units = units;
  spec->wt_size = wt;
  spec->max_width = widest;
  return true;
}

// Between the flat parameter layout (nn.Sequential order) and the padded one; the padding
// lanes of `padded_out` must already be zero.
// The padded index of W_l[o, i].
PYMAML_HD int64_t padded_weight_index(const MlpSpec& s, int l, int o, int i) {
  return s.padded_offset[l] + (l == 1 ? int64_t(i) * padded(s.widths[1]) + o : int64_t(o) * padded(s.widths[l - 1]) + i);
}

template <class T, class G>
PYMAML_HD void to_padded(const G& g, const MlpSpec& s, const T* flat, T* padded_out) {
  for (int l = 1; l <= s.layers; ++l) {
    const int n_in = s.widths[l - 1], n_out = s.widths[l];
    const T* w = flat + s.param_offset[l];
    for (int o = g.rank(); o < n_out; o += g.size()) {
      for (int i = 0; i < n_in; ++i) padded_out[padded_weight_index(s, l, o, i)] = w[int64_t(o) * n_in + i];
      if (s.bias) padded_out[s.bias_offset(l) + o] = w[int64_t(n_out) * n_in + o];
    }
  }
  g.sync();
}

template <class T, class G>
PYMAML_HD void from_padded(const G& g, const MlpSpec& s, const T* padded_in, T* flat) {
  for (int l = 1; l <= s.layers; ++l) {
    const int n_in = s.widths[l - 1], n_out = s.widths[l];
    T* w = flat + s.param_offset[l];
    for (int o = g.rank(); o < n_out; o += g.size()) {
      for (int i = 0; i < n_in; ++i) w[int64_t(o) * n_in + i] = padded_in[padded_weight_index(s, l, o, i)];
      if (s.bias) w[int64_t(n_out) * n_in + o] = padded_in[s.bias_offset(l) + o];
    }
  }
  g.sync();
}

// A group of threads that work on one task together. The per-task routines split their loops
// over rank() in steps of size() and call sync() between dependent phases.
struct SerialGroup {
  PYMAML_HD_MEMBER int rank() const { return 0; }
  PYMAML_HD_MEMBER int size() const { return 1; }
  PYMAML_HD_MEMBER void sync() const {}
};

}  // namespace pymaml
