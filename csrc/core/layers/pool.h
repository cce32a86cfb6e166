// MaxPool2d and AvgPool2d with kernel = stride = k, no padding, floor mode, on channels-last images
// (csrc/core/layer.h): the input [C, H, W] gives the output [C, H/k, W/k], whose pixel (ho, wo)
// takes channel by channel the window of input pixels (ho·k + i, wo·k + j), 0 ≤ i, j < k; the
// window positions are numbered q = i·k + j (row-major, torch's order). Rows and columns past
// (H/k)·k and (W/k)·k belong to no window: their gradients are zero. No parameters.
//
// MaxPool: out = in at the window's argmax m, chosen as torch's CPU max_pool2d chooses it: the
// positions in order, a value is taken when it is greater than the maximum so far or NaN, so the
// first of equal maxima wins, a NaN wins over every number (the last NaN of the window), and a
// window of −∞ keeps its first position. m depends on the input values only: every routine
// recomputes it from io.in (the per-pass state has no room for per-point values).
//   forward      out = in[m]
//   backward     dL/din = dL/dout at m, 0 at the window's other positions
//   R-forward    R(out) = R(in)[m]
//   R-backward   R(dL/din) = R(dL/dout) at m, 0 at the others
//
// AvgPool: out = (Σ_q in[q]) / k², the sum in window order from zero, as torch's CPU avg_pool2d.
// It is linear, so its tangents go through the same routines:
//   forward      out = Σ_q in[q] / k²
//   backward     dL/din = dL/dout / k² at every position of the window
//   R-forward    R(out) = Σ_q R(in)[q] / k²
//   R-backward   R(dL/din) = R(dL/dout) / k² at every position
//
// Work is split over the windows of all K points (one output pixel each, all its channels, in
// chunks of kChunk channels); each window's outputs and its input positions' gradients are
// written by one rank, so nothing depends on the group size.
#pragma once

#include "../layer.h"

namespace pymaml {
namespace {

// What both pooling kinds share: their shape, and where a window lies in a point's row.
struct PoolGeometry {
  // Refuses a kernel other than the stride, padding, and an input smaller than the kernel.
  static bool configure(Layer& L) {
    const int k = L.kernel;
    if (k < 1 || L.stride != k || L.padding != 0 || L.height_in < k || L.width_in < k) return false;
    L.channels_out = L.channels_in;
    L.height_out = L.height_in / k;
    L.width_out = L.width_in / k;
    L.out = L.channels_out * L.height_out * L.width_out;
    L.params = 0;
    L.padded_params = 0;
    L.wt_size = 0;
    L.scratch_fixed = L.scratch_per_point = 0;
    L.state_size = 0;
    return true;
  }
  static bool aliases_input(const Layer&) { return false; }
  static bool backward_in_place(const Layer&) { return false; }
  static bool r_backward_in_place(const Layer&) { return false; }

  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void pack(const G&, const Layer&, const T*, T*) {}
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void unpack(const G&, const Layer&, const T*, T*) {}
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void transpose(const G&, const Layer&, const T*, T*) {}

  PYMAML_HD_STATIC_MEMBER int64_t windows(const Layer& L, int K) {
    return int64_t(K) * L.height_out * L.width_out;
  }
  // Window e of the K points (point e / (Hout·Wout), output pixel p): the offsets in the input's
  // and the output's rows of its first pixel.
  PYMAML_HD_STATIC_MEMBER void window_at(const Layer& L, int64_t e, int64_t* in_offset, int64_t* out_offset) {
    const int pixels = L.height_out * L.width_out;
    const int64_t point = e / pixels;
    const int p = int(e - point * pixels), ho = p / L.width_out, wo = p - ho * L.width_out;
    *in_offset = point * padded(L.in) + (int64_t(ho) * L.kernel * L.width_in + int64_t(wo) * L.kernel) * L.channels_in;
    *out_offset = point * padded(L.out) + int64_t(p) * L.channels_out;
  }
  // The offset of window position (i, j) from the window's first pixel.
  PYMAML_HD_STATIC_MEMBER int64_t position(const Layer& L, int i, int j) {
    return (int64_t(i) * L.width_in + j) * L.channels_in;
  }

  // body(in_offset, out_offset, n) for each window's chunks of n <= kChunk channels: the offsets
  // of the chunk's first channel in the input's and the output's rows; the windows split over
  // the ranks.
  template <class G, class Body>
  PYMAML_HD_STATIC_MEMBER void for_each_window_chunk(const G& g, const Layer& L, int K, const Body& body) {
    const int C = L.channels_in;
    for (int64_t e = g.rank(); e < windows(L, K); e += g.size()) {
      int64_t in_offset, out_offset;
      window_at(L, e, &in_offset, &out_offset);
      for (int c0 = 0; c0 < C; c0 += kChunk) body(in_offset + c0, out_offset + c0, C - c0 < kChunk ? C - c0 : kChunk);
    }
  }

  // dst = 0 at every input pixel of the K points that belongs to no window.
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void zero_outside_windows(const G& g, const Layer& L, int K, T* dst) {
    const int H = L.height_in, W = L.width_in, C = L.channels_in;
    const int covered_h = L.height_out * L.kernel, covered_w = L.width_out * L.kernel;
    if (covered_h == H && covered_w == W) return;
    const int64_t pixels = int64_t(H) * W, total = int64_t(K) * pixels;
    for (int64_t e = g.rank(); e < total; e += g.size()) {
      const int64_t point = e / pixels;
      const int p = int(e - point * pixels), h = p / W, w = p - h * W;
      if (h < covered_h && w < covered_w) continue;
      T* row = dst + point * padded(L.in) + int64_t(p) * C;
      for (int c = 0; c < C; ++c) row[c] = T(0);
    }
  }
};

struct MaxPoolLayer : PoolGeometry {
  // best[c] and m[c] (the position q) of channels c0..c0+n-1 of the window whose first pixel's
  // channel c0 is at `window`: torch's choice (see above).
  template <class T>
  PYMAML_HD_STATIC_MEMBER void window_max(const Layer& L, const T* window, int n, T* best, int* m) {
    for (int c = 0; c < n; ++c) {
      best[c] = window[c];
      m[c] = 0;
    }
    for (int i = 0; i < L.kernel; ++i) {
      for (int j = i == 0 ? 1 : 0; j < L.kernel; ++j) {
        const T* v = window + position(L, i, j);
        const int q = i * L.kernel + j;
        PYMAML_SIMD
        for (int c = 0; c < n; ++c) {
          const bool take = v[c] > best[c] || v[c] != v[c];
          best[c] = take ? v[c] : best[c];
          m[c] = take ? q : m[c];
        }
      }
    }
  }

  // dst = in[m], the windows' maxima (tangent null: the forward), or dst = tangent[m] (the
  // R-forward from R(in)).
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void gather(const G& g, const Layer& L, int K, const T* in, const T* tangent, T* dst) {
    for_each_window_chunk(g, L, K, [&](int64_t in_offset, int64_t out_offset, int n) {
      T best[kChunk];
      int m[kChunk];
      window_max(L, in + in_offset, n, best, m);
      T* out = dst + out_offset;
      if (!tangent) {
        for (int c = 0; c < n; ++c) out[c] = best[c];
        return;
      }
      const T* window = tangent + in_offset;
      T picked[kChunk];
      for (int c = 0; c < n; ++c) picked[c] = window[c];
      for (int i = 0; i < L.kernel; ++i) {
        for (int j = i == 0 ? 1 : 0; j < L.kernel; ++j) {
          const T* v = window + position(L, i, j);
          const int q = i * L.kernel + j;
          PYMAML_SIMD
          for (int c = 0; c < n; ++c) picked[c] = m[c] == q ? v[c] : picked[c];
        }
      }
      for (int c = 0; c < n; ++c) out[c] = picked[c];
    });
    g.sync();
  }

  // dst = src at each window's m, 0 elsewhere (the backward from dL/dout, the R-backward from
  // R(dL/dout)).
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void scatter(const G& g, const Layer& L, int K, const T* in, const T* src, T* dst) {
    for_each_window_chunk(g, L, K, [&](int64_t in_offset, int64_t out_offset, int n) {
      T best[kChunk];
      int m[kChunk];
      window_max(L, in + in_offset, n, best, m);
      const T* from = src + out_offset;
      T* window = dst + in_offset;
      for (int i = 0; i < L.kernel; ++i) {
        for (int j = 0; j < L.kernel; ++j) {
          T* v = window + position(L, i, j);
          const int q = i * L.kernel + j;
          PYMAML_SIMD
          for (int c = 0; c < n; ++c) v[c] = m[c] == q ? from[c] : T(0);
        }
      }
    });
    zero_outside_windows(g, L, K, dst);
    g.sync();
  }

  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void forward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                       const LayerIO<T>& io) {
    gather(g, L, K, io.in, static_cast<const T*>(nullptr), io.out);
  }
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void backward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                        const LayerIO<T>& io, T*, T*, int64_t) {
    if (io.grad_in) scatter(g, L, K, io.in, io.grad_out, io.grad_in);
  }
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_forward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                         const LayerIO<T>& io) {
    if (io.r_in) gather(g, L, K, io.in, io.r_in, io.r_out);
  }
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_backward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                          const LayerIO<T>& io, T*, bool, T*, int64_t) {
    if (io.r_grad_in) scatter(g, L, K, io.in, io.r_grad_out, io.r_grad_in);
  }
};

struct AvgPoolLayer : PoolGeometry {
  // dst = the windows' means of src (the forward, and the R-forward from R(in)).
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void average(const G& g, const Layer& L, int K, const T* src, T* dst) {
    const T count = T(L.kernel * L.kernel);
    for_each_window_chunk(g, L, K, [&](int64_t in_offset, int64_t out_offset, int n) {
      T sum[kChunk];
      for (int c = 0; c < n; ++c) sum[c] = T(0);
      const T* window = src + in_offset;
      for (int i = 0; i < L.kernel; ++i) {
        for (int j = 0; j < L.kernel; ++j) {
          const T* v = window + position(L, i, j);
          PYMAML_SIMD
          for (int c = 0; c < n; ++c) sum[c] += v[c];
        }
      }
      T* out = dst + out_offset;
      PYMAML_SIMD
      for (int c = 0; c < n; ++c) out[c] = sum[c] / count;
    });
    g.sync();
  }

  // dst = src / k² at every position of each window (the backward from dL/dout, the R-backward
  // from R(dL/dout)), 0 outside the windows.
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void spread(const G& g, const Layer& L, int K, const T* src, T* dst) {
    const T count = T(L.kernel * L.kernel);
    for_each_window_chunk(g, L, K, [&](int64_t in_offset, int64_t out_offset, int n) {
      T share[kChunk];
      const T* from = src + out_offset;
      PYMAML_SIMD
      for (int c = 0; c < n; ++c) share[c] = from[c] / count;
      T* window = dst + in_offset;
      for (int i = 0; i < L.kernel; ++i) {
        for (int j = 0; j < L.kernel; ++j) {
          T* v = window + position(L, i, j);
          PYMAML_SIMD
          for (int c = 0; c < n; ++c) v[c] = share[c];
        }
      }
    });
    zero_outside_windows(g, L, K, dst);
    g.sync();
  }

  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void forward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                       const LayerIO<T>& io) {
    average(g, L, K, io.in, io.out);
  }
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void backward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                        const LayerIO<T>& io, T*, T*, int64_t) {
    if (io.grad_in) spread(g, L, K, io.grad_out, io.grad_in);
  }
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_forward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                         const LayerIO<T>& io) {
    if (io.r_in) average(g, L, K, io.r_in, io.r_out);
  }
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_backward(const G& g, const Layer& L, int K, const LayerParams<T>&,
                                          const LayerIO<T>& io, T*, bool, T*, int64_t) {
    if (io.r_grad_in) spread(g, L, K, io.r_grad_out, io.r_grad_in);
  }
};

}  // namespace
}  // namespace pymaml
