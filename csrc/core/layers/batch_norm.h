// BatchNorm1d/BatchNorm2d on the batch statistics of the set a pass sees (torch's training mode
// with track_running_stats=False), one kind for vectors [C, 1, 1] and channels-last images
// [C, H, W]. Per channel c, over the N = K·H·W values x_i of the pass (all points, all pixels):
//
//   μ = Σ x_i / N,  d_i = x_i − μ,  σ² = Σ d_i² / N (biased),  s = 1/√(σ² + eps),  x̂_i = d_i s,
//   y_i = γ x̂_i + β (affine; θ holds γ [C] then β [C], as nn.BatchNorm flattens them), else y_i = x̂_i.
//
// pymaml.nn.PerStepBatchNorm2d with per-step affine parameters has R = rows > 1: θ holds γ [R, C]
// then β [R, C], and θ_s (inner step s) is normalized with row r = min(s, R − 1). The other rows
// do not enter that pass: their gradient and Hessian-vector product are zero there.
//
// A channel of equal values has d = 0 and x̂ = 0·(1/√eps), as in torch. With g_i = dL/dy_i,
// A = Σ g_i and B = Σ g_i x̂_i (γ = 1 without affine):
//
//   backward     dβ = A,  dγ = B,  dL/dx_i = γ s h_i,  h_i = g_i − A/N − x̂_i B/N
//   R-forward    R(μ) = Σ R(x_i) / N,  R(σ²) = 2 Σ d_i R(d_i) / N with R(d_i) = R(x_i) − R(μ),
//                R(s) = −s³ R(σ²)/2,  R(x̂_i) = s R(d_i) + d_i R(s),
//                R(y_i) = u_γ x̂_i + γ R(x̂_i) + u_β
//   R-backward   with q_i = R(g_i): R(A) = Σ q_i,  R(B) = Σ (q_i x̂_i + g_i R(x̂_i)),
//                R(dβ) = R(A),  R(dγ) = R(B),
//                R(dL/dx_i) = (u_γ s + γ R(s)) h_i + γ s (q_i − R(A)/N − R(x̂_i) B/N − x̂_i R(B)/N)
//
// (the backward differentiated along (R(x), u_γ, R(g)); R(x) = 0 when the input is data).
//
// State per pass: μ [C] and s [C]; its tangents R(μ) [C] and R(s) [C]. x̂ and R(x̂) are
// recomputed from the input where needed. Every sum over the N values of a channel runs in one
// fixed order (point by point, pixel by pixel), in blocks of kPointBlock values whose sums are
// added pairwise as sum_over_points adds them; each channel's sums are taken whole by one rank.
// The sums are accumulated in double for float32 too (as torch's CPU kernel accumulates them):
// the input gradient h_i = g_i − A/N − x̂_i B/N removes from g its parts along 1 and x̂, and a
// float32 A or B would leave their rounding in that difference, amplified through the steps of
// the inner loop.
#pragma once

#include "../layer.h"
#include "../math.h"
#include "../point_sums.h"

namespace pymaml {
namespace {

struct BatchNormLayer {
  // The most sums one pass over a channel's values takes at once.
  static constexpr int kMaxSums = 4;
  // Levels of the pairwise sum of blocks (bit j: 2^j blocks): enough for 2^46 values.
  static constexpr int kLevels = 40;
  // Channels one rank sums together: a CUDA thread takes one (its neighbours take the next
  // channels, so that a warp reads contiguous values); a CPU thread four padded chunks, so that
  // one pass over the rows reads whole pixels of up to 64 channels (a pass per 16 channels read
  // each row's cache lines again from memory, for a quarter of them at a time).
#if defined(__CUDA_ARCH__)
  static constexpr int kLanes = 1;
#else
  static constexpr int kLanes = 4 * kChunk;
#endif

  PYMAML_HD_STATIC_MEMBER float square_root(float x) { return ::sqrtf(x); }
  PYMAML_HD_STATIC_MEMBER double square_root(double x) { return ::sqrt(x); }

  // Padded layout: γ's rows, then β's, padded(C) values each.
  PYMAML_HD_STATIC_MEMBER int row_at(const Layer& L, int step) { return step < L.rows ? step : L.rows - 1; }
  PYMAML_HD_STATIC_MEMBER int64_t gamma_offset(const Layer& L, int step) {
    return L.padded_offset + int64_t(row_at(L, step)) * padded(L.channels_in);
  }
  PYMAML_HD_STATIC_MEMBER int64_t beta_offset(const Layer& L, int step) {
    return L.padded_offset + int64_t(L.rows + row_at(L, step)) * padded(L.channels_in);
  }
  // The rows other than step's, in a padded vector (gradient or HVP) of this layer: zero.
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void zero_other_rows(const G& g, const Layer& L, int step, T* out) {
    const int row = row_at(L, step), ld = padded(L.channels_in);
    for (int r = 0; r < 2 * L.rows; ++r) {
      if (r % L.rows == row) continue;
      T* block = out + L.padded_offset + int64_t(r) * ld;
      for (int c = g.rank(); c < ld; c += g.size()) block[c] = T(0);
    }
  }

  static bool configure(Layer& L) {
    const int C = L.channels_in;
    if (C < 1 || L.rows < 1 || (L.rows > 1 && !L.affine)) return false;
    L.channels_out = C;
    L.height_out = L.height_in;
    L.width_out = L.width_in;
    L.out = L.in;
    L.params = L.affine ? 2 * int64_t(L.rows) * C : 0;
    L.padded_params = L.affine ? 2 * int64_t(L.rows) * padded(C) : 0;
    L.wt_size = 0;
    L.state_size = 2 * int64_t(C);           // μ, s
    L.scratch_fixed = int64_t(kMaxSums) * C;  // the sums of the backward and the R-backward
    L.scratch_per_point = 0;
    return true;
  }
  static bool aliases_input(const Layer&) { return false; }
  static bool backward_in_place(const Layer&) { return false; }
  static bool r_backward_in_place(const Layer&) { return false; }

  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void pack(const G& g, const Layer& L, const T* flat, T* padded_out) {
    if (!L.affine) return;
    const int C = L.channels_in, R = L.rows;
    const T* w = flat + L.param_offset;
    for (int r = 0; r < R; ++r) {
      for (int c = g.rank(); c < C; c += g.size()) {
        padded_out[gamma_offset(L, r) + c] = w[int64_t(r) * C + c];
        padded_out[beta_offset(L, r) + c] = w[int64_t(R + r) * C + c];
      }
    }
  }
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void unpack(const G& g, const Layer& L, const T* padded_in, T* flat) {
    if (!L.affine) return;
    const int C = L.channels_in, R = L.rows;
    T* w = flat + L.param_offset;
    for (int r = 0; r < R; ++r) {
      for (int c = g.rank(); c < C; c += g.size()) {
        w[int64_t(r) * C + c] = padded_in[gamma_offset(L, r) + c];
        w[int64_t(R + r) * C + c] = padded_in[beta_offset(L, r) + c];
      }
    }
  }
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void transpose(const G&, const Layer&, const T*, T*) {}

  // For every channel c (each whole on one rank): the M sums Σ_i term(index_i, c, m) over its N =
  // K·H·W values, i = k·H·W + p in order, blocked and pairwise, in double (see the header
  // comment); index_i the position of point k, pixel p, channel c in the rows. Then finish(c,
  // sums) with the sums rounded to T, on the rank that took them. A rank takes kLanes adjacent
  // channels together (contiguous in the rows), each lane its own sum in the same order as alone.
  template <int M, class T, class G, class Term, class Finish>
  PYMAML_HD_STATIC_MEMBER void channel_sums(const G& g, const Layer& L, int K, const Term& term, const Finish& finish) {
    const int C = L.channels_in, P = L.height_in * L.width_in, ld = padded(L.in);
    const int64_t N = int64_t(K) * P, blocks = (N + kPointBlock - 1) / kPointBlock;
    for (int c0 = g.rank() * kLanes; c0 < C; c0 += g.size() * kLanes) {
      const int lanes = C - c0 < kLanes ? C - c0 : kLanes;
      double partial[kLevels][M][kLanes];
      int k = 0, p = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t end = (b + 1) * kPointBlock < N ? (b + 1) * kPointBlock : N;
        double sum[M][kLanes];
        for (int m = 0; m < M; ++m) {
          for (int j = 0; j < kLanes; ++j) sum[m][j] = 0;
        }
        for (int64_t i = b * kPointBlock; i < end; ++i) {
          const int64_t base = int64_t(k) * ld + int64_t(p) * C + c0;
          auto add = [&](int j) {
            T values[M];
            term(base + j, c0 + j, values);
            for (int m = 0; m < M; ++m) sum[m][j] += double(values[m]);
          };
          int j0 = 0;
          for (; j0 + kChunk <= lanes; j0 += kChunk) {  // whole chunks of channels; the last may be partial
            PYMAML_SIMD
            for (int j = j0; j < j0 + kChunk; ++j) add(j);
          }
          for (int j = j0; j < lanes; ++j) add(j);
          if (++p == P) {
            p = 0;
            ++k;
          }
        }
        int level = 0;
        for (; (b >> level) & 1; ++level) {
          for (int m = 0; m < M; ++m) {
            for (int j = 0; j < lanes; ++j) sum[m][j] = partial[level][m][j] + sum[m][j];
          }
        }
        for (int m = 0; m < M; ++m) {
          for (int j = 0; j < lanes; ++j) partial[level][m][j] = sum[m][j];
        }
      }
      for (int j = 0; j < lanes; ++j) {
        double total[M];
        for (int m = 0; m < M; ++m) total[m] = 0;
        for (int level = 0; level < kLevels && (blocks >> level) != 0; ++level) {
          if ((blocks >> level) & 1) {
            for (int m = 0; m < M; ++m) total[m] = partial[level][m][j] + total[m];
          }
        }
        T sums[M];
        for (int m = 0; m < M; ++m) sums[m] = T(total[m]);
        finish(c0 + j, sums);
      }
    }
  }

  // For every point's row (one rank each): out[k·ld + p·C + c] = value(index, c) over the real
  // lanes, zero in the padding lanes.
  template <class T, class G, class Value>
  PYMAML_HD_STATIC_MEMBER void write_rows(const G& g, const Layer& L, int K, T* out, const Value& value) {
    const int C = L.channels_in, n = L.in, ld = padded(n);
    const int P = n / C;
    for (int k = g.rank(); k < K; k += g.size()) {
      const int64_t row = int64_t(k) * ld;
      for (int p = 0; p < P; ++p) {
        const int64_t pixel = row + int64_t(p) * C;
        PYMAML_SIMD
        for (int c = 0; c < C; ++c) out[pixel + c] = value(pixel + c, c);
      }
      for (int i = n; i < ld; ++i) out[row + i] = T(0);
    }
  }

  PYMAML_HD_STATIC_MEMBER int64_t values_per_channel(const Layer& L, int K) {
    return int64_t(K) * L.height_in * L.width_in;
  }

  // μ, s into the state, then y.
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void forward(const G& g, const Layer& L, int K, const LayerParams<T>& p,
                                       const LayerIO<T>& io) {
    const int C = L.channels_in;
    const T N = T(values_per_channel(L, K)), eps = T(L.constant);
    const T* x = io.in;
    T *mean = io.state, *inv_std = io.state + C;
    channel_sums<1, T>(g, L, K, [&](int64_t i, int, T* t) { t[0] = x[i]; },
                       [&](int c, const T* sums) { mean[c] = sums[0] / N; });
    // Each channel's variance on the rank that took its mean.
    channel_sums<1, T>(g, L, K,
                       [&](int64_t i, int c, T* t) {
                         const T d = x[i] - mean[c];
                         t[0] = d * d;
                       },
                       [&](int c, const T* sums) { inv_std[c] = T(1) / square_root(sums[0] / N + eps); });
    g.sync();
    const T* gamma = p.theta + gamma_offset(L, p.step);
    const T* beta = p.theta + beta_offset(L, p.step);
    if (L.affine) {
      write_rows(g, L, K, io.out,
                 [&](int64_t i, int c) { return gamma[c] * ((x[i] - mean[c]) * inv_std[c]) + beta[c]; });
    } else {
      write_rows(g, L, K, io.out, [&](int64_t i, int c) { return (x[i] - mean[c]) * inv_std[c]; });
    }
    g.sync();
  }

  // dγ, dβ into grad (when not null) and dL/dx into io.grad_in (when the input is not data).
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void backward(const G& g, const Layer& L, int K, const LayerParams<T>& p,
                                        const LayerIO<T>& io, T* grad, T*, int64_t) {
    const bool params = L.affine && grad != nullptr;
    if (io.grad_out == nullptr || (!params && io.grad_in == nullptr)) return;
    const int C = L.channels_in;
    const T N = T(values_per_channel(L, K));
    const T *x = io.in, *dy = io.grad_out, *mean = io.state, *inv_std = io.state + C;
    T *sum_dy = io.scratch, *sum_dy_xhat = io.scratch + C;
    channel_sums<2, T>(g, L, K,
                       [&](int64_t i, int c, T* t) {
                         t[0] = dy[i];
                         t[1] = dy[i] * ((x[i] - mean[c]) * inv_std[c]);
                       },
                       [&](int c, const T* sums) {
                         sum_dy[c] = sums[0];
                         sum_dy_xhat[c] = sums[1];
                         if (params) {
                           grad[gamma_offset(L, p.step) + c] = sums[1];
                           grad[beta_offset(L, p.step) + c] = sums[0];
                         }
                       });
    if (params) {  // the padding lanes of the block, and the rows of other steps
      for (int c = C + g.rank(); c < padded(C); c += g.size()) {
        grad[gamma_offset(L, p.step) + c] = grad[beta_offset(L, p.step) + c] = T(0);
      }
      if (L.rows > 1) zero_other_rows(g, L, p.step, grad);
    }
    g.sync();
    if (io.grad_in) {
      const T* gamma = p.theta + gamma_offset(L, p.step);
      const bool affine = L.affine;
      write_rows(g, L, K, io.grad_in, [&](int64_t i, int c) {
        const T xhat = (x[i] - mean[c]) * inv_std[c];
        const T h = dy[i] - sum_dy[c] / N - xhat * (sum_dy_xhat[c] / N);
        return (affine ? gamma[c] * inv_std[c] : inv_std[c]) * h;
      });
      g.sync();
    }
  }

  // R(μ), R(s) into r_state (zero for a zero input tangent), then R(y).
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_forward(const G& g, const Layer& L, int K, const LayerParams<T>& p,
                                         const LayerIO<T>& io) {
    const int C = L.channels_in;
    const T N = T(values_per_channel(L, K));
    const T *x = io.in, *rx = io.r_in, *mean = io.state, *inv_std = io.state + C;
    T *r_mean = io.r_state, *r_inv_std = io.r_state + C;
    if (rx) {
      channel_sums<1, T>(g, L, K, [&](int64_t i, int, T* t) { t[0] = rx[i]; },
                         [&](int c, const T* sums) { r_mean[c] = sums[0] / N; });
      channel_sums<1, T>(g, L, K, [&](int64_t i, int c, T* t) { t[0] = (x[i] - mean[c]) * (rx[i] - r_mean[c]); },
                         [&](int c, const T* sums) {
                           const T s = inv_std[c], r_var = T(2) * sums[0] / N;
                           r_inv_std[c] = T(-0.5) * s * s * s * r_var;
                         });
    } else {
      for (int c = g.rank(); c < C; c += g.size()) r_mean[c] = r_inv_std[c] = T(0);
    }
    g.sync();
    const T *gamma = p.theta + gamma_offset(L, p.step), *u_gamma = p.u + gamma_offset(L, p.step),
            *u_beta = p.u + beta_offset(L, p.step);
    if (L.affine) {
      write_rows(g, L, K, io.r_out, [&](int64_t i, int c) {
        const T d = x[i] - mean[c], xhat = d * inv_std[c];
        const T r_xhat = rx ? inv_std[c] * (rx[i] - r_mean[c]) + d * r_inv_std[c] : T(0);
        return u_gamma[c] * xhat + gamma[c] * r_xhat + u_beta[c];
      });
    } else {
      write_rows(g, L, K, io.r_out, [&](int64_t i, int c) {
        return rx ? inv_std[c] * (rx[i] - r_mean[c]) + (x[i] - mean[c]) * r_inv_std[c] : T(0);
      });
    }
    g.sync();
  }

  // R(dγ), R(dβ) into hv (added when accumulate) and R(dL/dx) into io.r_grad_in.
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_backward(const G& g, const Layer& L, int K, const LayerParams<T>& p,
                                          const LayerIO<T>& io, T* hv, bool accumulate, T*, int64_t) {
    if (io.grad_out == nullptr || (!L.affine && io.r_grad_in == nullptr)) return;
    const int C = L.channels_in;
    const T N = T(values_per_channel(L, K));
    const T *x = io.in, *rx = io.r_in, *dy = io.grad_out, *r_dy = io.r_grad_out;
    const T *mean = io.state, *inv_std = io.state + C, *r_mean = io.r_state, *r_inv_std = io.r_state + C;
    T *sum_dy = io.scratch, *sum_dy_xhat = io.scratch + C, *r_sum_dy = io.scratch + 2 * C,
      *r_sum_dy_xhat = io.scratch + 3 * C;
    const bool affine = L.affine;
    T *hv_gamma = hv + gamma_offset(L, p.step), *hv_beta = hv + beta_offset(L, p.step);
    channel_sums<4, T>(g, L, K,
                       [&](int64_t i, int c, T* t) {
                         const T d = x[i] - mean[c], xhat = d * inv_std[c];
                         const T r_xhat = rx ? inv_std[c] * (rx[i] - r_mean[c]) + d * r_inv_std[c] : T(0);
                         t[0] = dy[i];
                         t[1] = dy[i] * xhat;
                         t[2] = r_dy[i];
                         t[3] = r_dy[i] * xhat + dy[i] * r_xhat;
                       },
                       [&](int c, const T* sums) {
                         sum_dy[c] = sums[0];
                         sum_dy_xhat[c] = sums[1];
                         r_sum_dy[c] = sums[2];
                         r_sum_dy_xhat[c] = sums[3];
                         if (affine) {
                           hv_gamma[c] = accumulate ? hv_gamma[c] + sums[3] : sums[3];
                           hv_beta[c] = accumulate ? hv_beta[c] + sums[2] : sums[2];
                         }
                       });
    if (affine && !accumulate) {  // the padding lanes of the block, and the rows of other steps
      for (int c = C + g.rank(); c < padded(C); c += g.size()) hv_gamma[c] = hv_beta[c] = T(0);
      if (L.rows > 1) zero_other_rows(g, L, p.step, hv);
    }
    g.sync();
    if (io.r_grad_in) {
      const T *gamma = p.theta + gamma_offset(L, p.step), *u_gamma = p.u + gamma_offset(L, p.step);
      write_rows(g, L, K, io.r_grad_in, [&](int64_t i, int c) {
        const T s = inv_std[c], d = x[i] - mean[c], xhat = d * s;
        const T r_xhat = rx ? s * (rx[i] - r_mean[c]) + d * r_inv_std[c] : T(0);
        const T h = dy[i] - sum_dy[c] / N - xhat * (sum_dy_xhat[c] / N);
        const T r_h = r_dy[i] - r_sum_dy[c] / N - r_xhat * (sum_dy_xhat[c] / N) - xhat * (r_sum_dy_xhat[c] / N);
        const T scale = affine ? gamma[c] * s : s;
        const T r_scale = affine ? u_gamma[c] * s + gamma[c] * r_inv_std[c] : r_inv_std[c];
        return r_scale * h + scale * r_h;
      });
      g.sync();
    }
  }
};

}  // namespace
}  // namespace pymaml
