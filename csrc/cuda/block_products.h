// The CUDA block's products for the per-task math (csrc/core/): the products interface that
// csrc/core/products.h describes, with each rank computing whole outputs, one after another, in
// the same k order as the CPU's register tiles. Consecutive ranks take consecutive columns, so a
// warp's loads of B are contiguous. Host-compilable: the thread-group harness
// (csrc/tools/group_harness.cpp) and the CPU launcher built with PYMAML_HOST_RUNS_CUDA_PATHS run
// these loops on CPU threads.
#pragma once

#include <cstdint>

#include "../core/common.h"

namespace pymaml {
namespace {

struct BlockProducts {
  // C[r, j] = (C[r, j] if accumulate, else init[j] or 0) + Σ_{k < Kd} a[r·ars + k·acs] B[k, j] for
  // r < R, j < N.
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void gemm_rows(const G& g, int R, int Kd, int N, const T* a, int64_t ars, int64_t acs,
                                         const T* B, int64_t ldb, T* C, int64_t ldc, const T* init, bool accumulate) {
    for (int idx = g.rank(); idx < R * N; idx += g.size()) {
      const int r = idx / N, j = idx - r * N;
      T acc = accumulate ? C[r * ldc + j] : (init ? init[j] : T(0));
      for (int k = 0; k < Kd; ++k) acc += a[r * ars + k * acs] * B[int64_t(k) * ldb + j];
      C[r * ldc + j] = acc;
    }
  }

  // C[r, j] = (C[r, j] if accumulate, else init[j]) + Σ_{i < m} a[r, i] W[j, i] for j < n, in order
  // over i.
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void gemm_rows_dot(const G& g, int R, int n, int m, int ld, const T* a, int64_t lda,
                                             const T* W, int64_t ldw, T* C, int64_t ldc, const T* init,
                                             bool accumulate) {
    (void)ld;
    for (int idx = g.rank(); idx < R * n; idx += g.size()) {
      const int r = idx / n, j = idx - r * n;
      const T* x = a + r * lda;
      const T* w = W + j * ldw;
      T sum = 0;
      for (int i = 0; i < m; ++i) sum += x[i] * w[i];
      C[r * ldc + j] = (accumulate ? C[r * ldc + j] : init[j]) + sum;
    }
  }

  // dst[i·ldd + o] = src[o·lds + i] for o < rows, i < cols.
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void transpose(const G& g, int rows, int cols, const T* src, int64_t lds, T* dst,
                                         int64_t ldd) {
    for (int o = g.rank(); o < rows; o += g.size()) {
      const T* w = src + int64_t(o) * lds;
      for (int i = 0; i < cols; ++i) dst[int64_t(i) * ldd + o] = w[i];
    }
  }
};

}  // namespace
}  // namespace pymaml
