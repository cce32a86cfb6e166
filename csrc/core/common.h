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

enum class Activation : int { none = 0, relu = 1, tanh = 2, sigmoid = 3, leaky_relu = 4, elu = 5 };
enum class Loss : int { mse = 0, cross_entropy = 1 };

// The most Linear layers of an MLP (csrc/core/network.h, make_mlp_network).
constexpr int kMaxLayers = 16;

// Per-point buffers and weight copies pad every row to a multiple of kChunk elements, with
// zeros in the padding, so that the inner loops run on whole SIMD registers. Partial-width rows
// (40 of 48) left a scalar tail whose stores stalled the next full-width load: padded, the
// sinusoid meta-step ran several times faster (csrc/cpu/register_tiles.h).
constexpr int kChunk = 16;
PYMAML_HD int padded(int n) { return (n + kChunk - 1) / kChunk * kChunk; }

// A group of threads that work on one task together. The per-task routines split their loops
// over rank() in steps of size() and call sync() between dependent phases.
struct SerialGroup {
  PYMAML_HD_MEMBER int rank() const { return 0; }
  PYMAML_HD_MEMBER int size() const { return 1; }
  PYMAML_HD_MEMBER void sync() const {}
};

}  // namespace pymaml
