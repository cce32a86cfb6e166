// The products interface between the device-agnostic per-task math (csrc/core/) and a launcher.
// The core never computes a matrix product itself: every routine that needs one takes a type
// Products as its first template parameter and calls its static functions, which split their
// work over the ranks of the group g (they do not synchronize; the caller does):
//
//   Products::gemm_rows(g, R, Kd, N, a, ars, acs, B, ldb, C, ldc, init, accumulate)
//       C[r, j] = (C[r, j] if accumulate, else init[j], or 0 when init is null)
//                 + Σ_{k < Kd} a[r·ars + k·acs] B[k·ldb + j]       for r < R, j < N;
//       each sum taken in order over k. The CPU may write up to one vector register past N
//       (the padded rows hold it; padding lanes carry no meaning).
//   Products::gemm_rows_dot(g, R, n, m, ld, a, lda, W, ldw, C, ldc, init, accumulate)
//       C[r, j] = (C[r, j] if accumulate, else init[j]) + Σ_{i < m} a[r·lda + i] W[j·ldw + i]
//       for r < R, j < n, with rows padded to ld; padding lanes are left out of the sum.
//   Products::transpose(g, rows, cols, src, lds, dst, ldd)
//       dst[i·ldd + o] = src[o·lds + i] for o < rows, i < cols.
//
// Implementations: cpu::CpuProducts (csrc/cpu/register_tiles.h: register tiles sized to the ISA
// level, lane sums, vector transposes) and BlockProducts (csrc/cuda/block_products.h: one output
// per rank, the loops a CUDA block runs). Every output of gemm_rows is the same k-ordered sum in
// both, so that results do not depend on the blocking; gemm_rows_dot's order of summation is the
// implementation's own.
#pragma once
