// The CPU's products for the per-task math (csrc/core/): register-blocked GEMM tiles sized to the
// vector registers of the ISA level a unit is compiled for, lane-parallel dot products and 8×8
// vector transposes. The core reaches them through CpuProducts (the products interface that
// csrc/core/products.h describes); the CUDA launcher supplies its own (csrc/cuda/block_products.h).
//
// Everything here has internal linkage (static functions, and CpuProducts in an unnamed
// namespace), so that each ISA-level unit (kernels_*.cpp) keeps the code compiled for its own
// level and the linker never hands AVX-512 code to the baseline path.
#pragma once

#include <cstdint>

#include "../core/common.h"

#if defined(__GNUC__)
#define PYMAML_NOINLINE static __attribute__((noinline))
#else
#define PYMAML_NOINLINE static
#endif
#if !defined(__GNUC__) || defined(__clang__)
#define PYMAML_UNROLL
#else
#define PYMAML_UNROLL PYMAML_PRAGMA(GCC unroll 16)
#endif

namespace pymaml {
namespace cpu {

// The vector registers of the ISA level a unit is compiled for, which size the register tiles.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64, kVectorRegisters = 32;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32, kVectorRegisters = 16;
#elif defined(__aarch64__)
// NEON has 32 128-bit registers, but GCC 12 spills tiles sized for 32 (8 rows × 3 panels) inside
// the k loop (tests/test_register_tiles.py); the 16-register tiles stay in registers.
constexpr int kVectorBytes = 16, kVectorRegisters = 16;
#else
constexpr int kVectorBytes = 16, kVectorRegisters = 16;
#endif

// Lanes of T in one vector register of the unit's ISA level; kChunk is a multiple of it.
template <class T>
constexpr int vector_lanes() { return kVectorBytes / int(sizeof(T)) > 0 ? kVectorBytes / int(sizeof(T)) : 1; }
static_assert(kChunk % (kVectorBytes / int(sizeof(float))) == 0 && kChunk % (kVectorBytes / int(sizeof(double))) == 0,
              "padded rows must hold whole vector registers");

// The register-blocked product: for RB rows r and NP column panels p, each one vector register
// of T wide (vector_lanes<T>() columns), C[r, p] = (C[r, p] if accumulate, else init[p] or 0)
// + Σ_k a(r, k) B[k, p], with a(r, k) = a[r·ars + k·acs]; all RB·NP accumulators stay in
// registers across the k loop, so each B panel is loaded once per k for RB rows and each
// a(r, k) broadcast once for NP panels. Every output is the same k-ordered sum whatever the
// tile shape, so results do not depend on how the rows and columns are blocked.
template <class T, int RB, int NP>
PYMAML_NOINLINE void gemm_tile(int Kd, const T* a, int64_t ars, int64_t acs, const T* B, int64_t ldb, T* C,
                               int64_t ldc, const T* init, bool accumulate) {
  constexpr int lanes = vector_lanes<T>();
#if !defined(__GNUC__) || defined(__clang__)
  for (int r = 0; r < RB; ++r) {
    for (int j = 0; j < NP * lanes; ++j) {
      T acc = accumulate ? C[r * ldc + j] : (init ? init[j] : T(0));
      for (int k = 0; k < Kd; ++k) acc += a[r * ars + k * acs] * B[int64_t(k) * ldb + j];
      C[r * ldc + j] = acc;
    }
  }
#else
  // GCC vector extensions keep the accumulators in registers (plain arrays were spilled to the
  // stack on every k). A panel is exactly one register: wider vector types have no machine mode
  // below AVX-512 and GCC lowers them through the stack.
  typedef T Panel __attribute__((vector_size(lanes * sizeof(T))));
  Panel acc[RB][NP];
PYMAML_UNROLL
  for (int r = 0; r < RB; ++r) {
PYMAML_UNROLL
    for (int p = 0; p < NP; ++p) {
      if (accumulate) {
        __builtin_memcpy(&acc[r][p], C + r * ldc + p * lanes, sizeof(Panel));
      } else if (init) {
        __builtin_memcpy(&acc[r][p], init + p * lanes, sizeof(Panel));
      } else {
        acc[r][p] = Panel{};
      }
    }
  }
PYMAML_PRAGMA(GCC unroll 2)
  for (int k = 0; k < Kd; ++k) {
    Panel b[NP];
PYMAML_UNROLL
    for (int p = 0; p < NP; ++p) __builtin_memcpy(&b[p], B + int64_t(k) * ldb + p * lanes, sizeof(Panel));
PYMAML_UNROLL
    for (int r = 0; r < RB; ++r) {
      const T scale = a[r * ars + k * acs];
PYMAML_UNROLL
      for (int p = 0; p < NP; ++p) acc[r][p] += scale * b[p];
    }
  }
PYMAML_UNROLL
  for (int r = 0; r < RB; ++r) {
PYMAML_UNROLL
    for (int p = 0; p < NP; ++p) __builtin_memcpy(C + r * ldc + p * lanes, &acc[r][p], sizeof(Panel));
  }
#endif
}

// The tile shape for NP one-register panels: as many rows (at most kMaxTileRows) as the vector
// registers hold beside the NP panels of B and the broadcast a(r, k): RB·NP + NP + 1 registers.
// kMaxTilePanels, the widest tile, keeps the accumulators near the most the registers hold:
// with 32 registers (AVX-512) 8 rows × 3 or 6 × 4 panels; with 16 (AVX2, SSE2, NEON) 6 × 2 (GCC
// spills 3 × 3 there).
constexpr int kMaxTileRows = 8;
template <class T>
constexpr int tile_rows(int NP) {
  const int budget = (kVectorRegisters - NP - 1) / NP;
  return budget < 1 ? 1 : (budget > kMaxTileRows ? kMaxTileRows : budget);
}
constexpr int kMaxTilePanels = kVectorRegisters >= 32 ? 4 : 2;

template <class T, int NP>
static inline void gemm_tile_rows(int rows, int Kd, const T* a, int64_t ars, int64_t acs, const T* B, int64_t ldb, T* C,
                              int64_t ldc, const T* init, bool accumulate) {
  switch (rows) {
#define PYMAML_TILE_CASE(R) \
  case R: gemm_tile<T, (R <= tile_rows<T>(NP) ? R : tile_rows<T>(NP)), NP>(Kd, a, ars, acs, B, ldb, C, ldc, init, accumulate); break;
    PYMAML_TILE_CASE(1) PYMAML_TILE_CASE(2) PYMAML_TILE_CASE(3) PYMAML_TILE_CASE(4)
    PYMAML_TILE_CASE(5) PYMAML_TILE_CASE(6) PYMAML_TILE_CASE(7) PYMAML_TILE_CASE(8)
#undef PYMAML_TILE_CASE
    default: break;
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#define PYMAML_VECTOR_TRANSPOSE 1
// dst[j, :8] = src[:8, j] for an 8×8 tile: three rounds of pairwise shuffles (swap the 4×4, then
// the 2×2, then the 1×1 blocks). About 4× faster here than scalar strided stores, which took
// 18% of the sinusoid meta-step.
template <class T>
static inline void transpose_tile8(const T* src, int64_t lds, T* dst, int64_t ldd) {
  typedef T Row __attribute__((vector_size(sizeof(T) * 8)));
  Row r[8], a[8], b[8];
  for (int j = 0; j < 8; ++j) __builtin_memcpy(&r[j], src + j * lds, sizeof(Row));
  for (int j = 0; j < 4; ++j) {
    a[j] = __builtin_shufflevector(r[j], r[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    a[j + 4] = __builtin_shufflevector(r[j], r[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int q = 0; q < 4; ++q) {
    const int j = q < 2 ? q : q + 2;  // rows 0, 1, 4, 5 pair with 2, 3, 6, 7
    b[j] = __builtin_shufflevector(a[j], a[j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    b[j + 2] = __builtin_shufflevector(a[j], a[j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int j = 0; j < 8; j += 2) {
    r[j] = __builtin_shufflevector(b[j], b[j + 1], 0, 8, 2, 10, 4, 12, 6, 14);
    r[j + 1] = __builtin_shufflevector(b[j], b[j + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int j = 0; j < 8; ++j) __builtin_memcpy(dst + j * ldd, &r[j], sizeof(Row));
}
#endif

namespace {

// The products interface of the per-task math (csrc/core/products.h) on the CPU.
struct CpuProducts {
  // C[R, N] = (C if accumulate, else the init row or 0) + a(R × Kd) B[Kd, N], for the N real
  // columns of a layer. The CPU computes whole vector registers, N rounded up to the unit's lanes
  // (the padded rows of B, C and init hold them; padding lanes carry no meaning, see
  // activate_row), not the kChunk-padded width: 40 columns are 5 AVX2 panels rather than 6.
  // Column groups of up to kMaxTilePanels panels, of nearly equal width; in each, the R rows split
  // into blocks of nearly equal size (K = 10 rows run as 5 + 5 rather than 8 + 2), which the
  // group's ranks take in turn.
  template <class T, class G>
  static inline void gemm_rows(const G& g, int R, int Kd, int N, const T* a, int64_t ars, int64_t acs, const T* B,
                               int64_t ldb, T* C, int64_t ldc, const T* init, bool accumulate) {
    constexpr int lanes = vector_lanes<T>();
    const int panels = (N + lanes - 1) / lanes;
    if (panels == 0 || R == 0) return;
    // Column groups of nearly equal width, at most kMaxTilePanels panels (7 AVX-512 panels run
    // as 4 + 3, not 4 + 2 + 1, whose one-panel tiles wait on the FMA latency), and in each the
    // rows in blocks of nearly equal size. A group is `narrow` or one panel wider; the row blocks of
    // both widths are computed once (integer divisions cost as much as a small tile's k loop).
    const int groups = (panels + kMaxTilePanels - 1) / kMaxTilePanels;
    const int narrow = panels / groups, wide_groups = panels - narrow * groups;
    int row_blocks[2], row_base[2];
    for (int wide = 0; wide < 2; ++wide) {
      const int most = tile_rows<T>(narrow + wide);
      row_blocks[wide] = (R + most - 1) / most;
      row_base[wide] = R / row_blocks[wide];
    }
    for (int group = 0, p0 = 0; group < groups; ++group) {
      const int wide = group < wide_groups ? 1 : 0, np = narrow + wide;
      const int blocks = row_blocks[wide], base = row_base[wide];
      const int extra = R - base * blocks;  // the first `extra` blocks get one more row
      const int64_t column = int64_t(p0) * lanes;
      p0 += np;
      const T* init_p = init ? init + column : nullptr;
      for (int block = g.rank(); block < blocks; block += g.size()) {
        const int r0 = block * base + (block < extra ? block : extra);
        const int rows = base + (block < extra ? 1 : 0);
        const T* ab = a + r0 * ars;
        T* cb = C + r0 * ldc + column;
        const T* bb = B + column;
        switch (np) {
          case 1: gemm_tile_rows<T, 1>(rows, Kd, ab, ars, acs, bb, ldb, cb, ldc, init_p, accumulate); break;
          case 2: gemm_tile_rows<T, (kMaxTilePanels < 2 ? kMaxTilePanels : 2)>(rows, Kd, ab, ars, acs, bb, ldb, cb, ldc, init_p, accumulate); break;
          case 3: gemm_tile_rows<T, (kMaxTilePanels < 3 ? kMaxTilePanels : 3)>(rows, Kd, ab, ars, acs, bb, ldb, cb, ldc, init_p, accumulate); break;
          default: gemm_tile_rows<T, kMaxTilePanels>(rows, Kd, ab, ars, acs, bb, ldb, cb, ldc, init_p, accumulate); break;
        }
      }
    }
  }

  // C[r, j] = (C[r, j] if accumulate, else init[j]) + Σ_{i < m} a[r, i] W[j, i] for j < n: the
  // product with W's rows as dot products (the core uses it for layers with few outputs). Rows of a and W are padded to ld; the
  // padding lanes are left out of the sum (a 0 · NaN there would make a finite product NaN).
  template <class T, class G>
  static inline void gemm_rows_dot(const G& g, int R, int n, int m, int ld, const T* a, int64_t lda, const T* W,
                                   int64_t ldw, T* C, int64_t ldc, const T* init, bool accumulate) {
    for (int idx = g.rank(); idx < R * n; idx += g.size()) {
      const int r = idx / n, j = idx - r * n;
      const T* x = a + r * lda;
      const T* w = W + j * ldw;
#if defined(__GNUC__) && !defined(__clang__)
      static_assert(kChunk == 16, "the lane sum below is written for 16 lanes");
      // 16 partial sums, lane j over i ≡ j (mod 16), in one-register vectors (see gemm_tile),
      // then added pairwise: halves, quarters, and (q0 + q2) + (q1 + q3).
      constexpr int lanes = vector_lanes<T>(), vectors = kChunk / lanes;
      typedef T Lane __attribute__((vector_size(lanes * sizeof(T))));
      Lane acc[vectors];
PYMAML_UNROLL
      for (int v = 0; v < vectors; ++v) acc[v] = Lane{};
      const int full = m / kChunk * kChunk;
      for (int i = 0; i < full; i += kChunk) {
PYMAML_UNROLL
        for (int v = 0; v < vectors; ++v) {
          Lane xa, wa;
          __builtin_memcpy(&xa, x + i + v * lanes, sizeof(Lane));
          __builtin_memcpy(&wa, w + i + v * lanes, sizeof(Lane));
          acc[v] += xa * wa;
        }
      }
      if (full < ld) {  // the last panel, its padding lanes selected out
        typedef decltype(Lane{} < Lane{}) Mask;
        Mask lane;
        for (int i = 0; i < lanes; ++i) lane[i] = i;
PYMAML_UNROLL
        for (int v = 0; v < vectors; ++v) {
          Lane xa, wa;
          __builtin_memcpy(&xa, x + full + v * lanes, sizeof(Lane));
          __builtin_memcpy(&wa, w + full + v * lanes, sizeof(Lane));
          acc[v] += lane < m - full - v * lanes ? xa * wa : Lane{};
        }
      }
      T part[kChunk];
      __builtin_memcpy(part, acc, sizeof(part));
      T h[kChunk / 2], q[kChunk / 4];
      for (int j = 0; j < kChunk / 2; ++j) h[j] = part[j] + part[j + kChunk / 2];
      for (int j = 0; j < kChunk / 4; ++j) q[j] = h[j] + h[j + kChunk / 4];
      const T sum = (q[0] + q[2]) + (q[1] + q[3]);
#else
      T sum = 0;
      for (int i = 0; i < m; ++i) sum += x[i] * w[i];
#endif
      C[r * ldc + j] = (accumulate ? C[r * ldc + j] : init[j]) + sum;
    }
  }

  // dst[i·ldd + o] = src[o·lds + i] for o < rows, i < cols: 8×8 vector tiles where the rows of T
  // fit one register (wider ones would go through the stack), the rest element by element.
  template <class T, class G>
  static inline void transpose(const G& g, int rows, int cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
    int o_tiled = 0;
#if defined(PYMAML_VECTOR_TRANSPOSE)
    const bool vector_tiles = sizeof(T) * 8 <= size_t(kVectorBytes);
    const int i_tiled = vector_tiles ? cols / 8 * 8 : 0;
    o_tiled = vector_tiles ? rows / 8 * 8 : 0;
    for (int o0 = 0; o0 < o_tiled; o0 += 8) {
      for (int i0 = 0; i0 < i_tiled; i0 += 8) transpose_tile8(src + int64_t(o0) * lds + i0, lds, dst + int64_t(i0) * ldd + o0, ldd);
      for (int i = i_tiled; i < cols; ++i) {
        for (int o = o0; o < o0 + 8; ++o) dst[int64_t(i) * ldd + o] = src[int64_t(o) * lds + i];
      }
    }
#endif
    for (int o = o_tiled + g.rank(); o < rows; o += g.size()) {
      const T* w = src + int64_t(o) * lds;
      for (int i = 0; i < cols; ++i) dst[int64_t(i) * ldd + o] = w[i];
    }
  }
};

}  // namespace
}  // namespace cpu
}  // namespace pymaml
