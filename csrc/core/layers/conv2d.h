// Conv2d: y = conv(x, W) + b with zero padding p, stride s, a square kernel k, groups 1 and
// dilation 1; x [C, H, W] and y [F, Ho, Wo] channels last (Ho = (H + 2p − k)/s + 1, Wo likewise),
// θ holding W [F, C, k, k] row-major and then b [F] (with or without bias), as nn.Conv2d flattens
// them.
//
// As matrix products (im2col): a point's patch matrix X̂ [P, KK] (P = Ho·Wo output pixels, KK =
// k·k·C) has in row q = (ho, wo), for each tap (kh, kw) in order, the C channels of input pixel
// (ho·s − p + kh, wo·s − p + kw), zeros outside the image; stored channels last, each tap's C
// values are contiguous in the input. With Ŵ [F, KK], Ŵ[f, (kh·k + kw)·C + c] = W[f, c, kh, kw],
// and a point's δ = dL/dy as the matrix [P, F] that its channels-last row is:
//   forward      y = X̂ Ŵ^T + b
//   backward     gŴ = Σ_points δ^T X̂, gb = Σ_points Σ_pixels δ, dL/dX̂ = δ Ŵ, and dL/dx its col2im:
//                each input value the sum of the patch entries that copied it
//   R-forward    R(y) = R(X̂) Ŵ^T + X̂ Û^T + u_b
//   R-backward   R(gŴ) = Σ_points R(δ)^T X̂ + δ^T R(X̂), R(gb) = Σ R(δ),
//                R(dL/dX̂) = R(δ) Ŵ + δ Û (and its col2im)
// (Û, u_b: the direction u's weights and bias; R(X̂) is the patch matrix of R(x)).
//
// Padded layout, as Linear's (layers/linear.h): a Conv2d whose input is data needs no dL/dX̂, so
// its forward, gradient and HVP all use Ŵ^T and it keeps Ŵ^T [KK, pad(F)]; the others keep Ŵ
// [F, pad(KK)] (which dL/dX̂ = δ Ŵ reads) and a transposed copy Ŵ^T [KK, pad(F)] followed by the
// bias row (transpose_weights) for the forward. Either block ends with b padded to pad(F) (zero
// without bias).
//
// The points run in chunks, whose patch matrices are stacked into one product of chunk·P rows:
// a chunk's scratch (two patch matrices, rows padded to pad(KK), and for F not a multiple of
// kChunk two [chunk·P, pad(F)] matrices) stays within kScratchValues, or one point's when that is
// more, so that a patch matrix stays in the core's cache while the product reads it once per
// group of output columns. With F a multiple of kChunk a point's row of P·F values has no padding lanes, so the rows
// of consecutive points are one [K·P, F] matrix and the products read and write y and δ in place;
// otherwise they go through the padded scratch matrices (the CPU products read and write whole
// vector registers past F). The sums over points and pixels run in order, over the rows of the
// chunks in turn, so results do not depend on the chunk size or the group.
#pragma once

#include "../layer.h"

namespace pymaml {
namespace {

struct Conv2dLayer {
  static constexpr int64_t kScratchValues = int64_t(1) << 16;
  // Sizes beyond this are refused, so that every index a routine forms in int stays in range.
  static constexpr int64_t kMaxSize = int64_t(1) << 28;
  // Channels one rank sums for the bias gradient: a CUDA thread one padded chunk, a CPU thread
  // four, so that one pass over δ's rows reads whole pixels of up to 64 channels (as BatchNorm's
  // channel sums do).
#if defined(__CUDA_ARCH__)
  static constexpr int kBiasLanes = kChunk;
#else
  static constexpr int kBiasLanes = 4 * kChunk;
#endif

  PYMAML_HD_STATIC_MEMBER bool transposed(const Layer& L) { return L.input_is_data; }
  PYMAML_HD_STATIC_MEMBER int taps(const Layer& L) { return L.kernel * L.kernel * L.channels_in; }
  PYMAML_HD_STATIC_MEMBER int pixels(const Layer& L) { return L.height_out * L.width_out; }
  PYMAML_HD_STATIC_MEMBER bool in_place(const Layer& L) { return L.channels_out % kChunk == 0; }
  PYMAML_HD_STATIC_MEMBER int64_t point_scratch(const Layer& L) {
    const int64_t P = pixels(L);
    return 2 * P * padded(taps(L)) + (in_place(L) ? 0 : 2 * P * padded(L.channels_out));
  }
  PYMAML_HD_STATIC_MEMBER int chunk_points(const Layer& L) {
    const int64_t n = kScratchValues / point_scratch(L);
    return n < 1 ? 1 : int(n);
  }
  PYMAML_HD_STATIC_MEMBER int64_t bias_offset(const Layer& L) {
    const int64_t KK = taps(L), F = L.channels_out;
    return L.padded_offset + (transposed(L) ? KK * padded(L.channels_out) : F * padded(taps(L)));
  }
  // The padded index of Ŵ[f, j].
  PYMAML_HD_STATIC_MEMBER int64_t weight_index(const Layer& L, int f, int j) {
    return L.padded_offset +
           (transposed(L) ? int64_t(j) * padded(L.channels_out) + f : int64_t(f) * padded(taps(L)) + j);
  }

  static bool aliases_input(const Layer&) { return false; }
  static bool backward_in_place(const Layer&) { return false; }
  static bool r_backward_in_place(const Layer&) { return false; }

  // Sizes, from the input's shape, channels_out (F), kernel, stride, padding, bias and
  // input_is_data. Refuses a kernel larger than the padded input and sizes out of range.
  static bool configure(Layer& L) {
    const int64_t k = L.kernel, s = L.stride, p = L.padding, F = L.channels_out;
    if (k < 1 || s < 1 || p < 0 || F < 1 || L.channels_in < 1 || L.height_in < 1 || L.width_in < 1) return false;
    if (p > kMaxSize || k > kMaxSize || L.height_in + 2 * p < k || L.width_in + 2 * p < k) return false;
    const int64_t Ho = (L.height_in + 2 * p - k) / s + 1, Wo = (L.width_in + 2 * p - k) / s + 1;
    const int64_t KK = k * k * L.channels_in;
    if (KK > kMaxSize || F > kMaxSize || Ho * Wo > kMaxSize || F * Ho * Wo > kMaxSize) return false;
    L.height_out = int(Ho);
    L.width_out = int(Wo);
    L.out = int(F * Ho * Wo);
    const int64_t ld_taps = padded(int(KK)), ld_channels = padded(int(F));
    if (pixels(L) * ld_taps > kMaxSize) return false;
    L.params = F * KK + (L.bias ? F : 0);
    L.padded_params = (transposed(L) ? KK * ld_channels : F * ld_taps) + ld_channels;
    L.wt_size = transposed(L) ? 0 : (KK + 1) * ld_channels;
    L.scratch_fixed = chunk_points(L) * point_scratch(L);
    L.scratch_per_point = 0;
    L.state_size = 0;
    return true;
  }

  // Between the flat layout (W[f, c, kh, kw] at ((f·C + c)·k + kh)·k + kw, then b) and the padded
  // one (whose padding lanes must already be zero).
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void pack(const G& g, const Layer& L, const T* flat, T* padded_out) {
    const T* w = flat + L.param_offset;
    const int C = L.channels_in, k = L.kernel, F = L.channels_out, KK = taps(L);
    for (int f = g.rank(); f < F; f += g.size()) {
      for (int c = 0; c < C; ++c) {
        for (int tap = 0; tap < k * k; ++tap) {
          padded_out[weight_index(L, f, tap * C + c)] = w[(int64_t(f) * C + c) * k * k + tap];
        }
      }
      if (L.bias) padded_out[bias_offset(L) + f] = w[int64_t(F) * KK + f];
    }
  }
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void unpack(const G& g, const Layer& L, const T* padded_in, T* flat) {
    T* w = flat + L.param_offset;
    const int C = L.channels_in, k = L.kernel, F = L.channels_out, KK = taps(L);
    for (int f = g.rank(); f < F; f += g.size()) {
      for (int c = 0; c < C; ++c) {
        for (int tap = 0; tap < k * k; ++tap) {
          w[(int64_t(f) * C + c) * k * k + tap] = padded_in[weight_index(L, f, tap * C + c)];
        }
      }
      if (L.bias) w[int64_t(F) * KK + f] = padded_in[bias_offset(L) + f];
    }
  }

  // The copy Ŵ^T [KK, pad(F)] and the bias row after it, where the layer keeps Ŵ (its input is
  // not data). Only real lanes are written.
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void transpose(const G& g, const Layer& L, const T* theta, T* WT) {
    if (transposed(L)) return;
    const int F = L.channels_out, KK = taps(L), ld_channels = padded(F);
    T* wt = WT + L.wt_offset;
    Products::transpose(g, F, KK, theta + L.padded_offset, int64_t(padded(KK)), wt, int64_t(ld_channels));
    for (int f = g.rank(); f < F; f += g.size()) wt[int64_t(KK) * ld_channels + f] = theta[bias_offset(L) + f];
  }

  // Ŵ^T [KK, pad(F)], followed by the bias row, of the parameters `theta` (whose transposed
  // copies are WT).
  template <class T>
  PYMAML_HD_STATIC_MEMBER const T* weights_transposed(const Layer& L, const T* theta, const T* WT) {
    return transposed(L) ? theta + L.padded_offset : WT + L.wt_offset;
  }

  // The patch matrices X̂ of n points (rows of pad(in) from `in`) as [n·P, pad(KK)], padding
  // lanes zero.
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void gather_patches(const G& g, const Layer& L, int n, const T* in, T* X) {
    const int C = L.channels_in, H = L.height_in, W = L.width_in, k = L.kernel, s = L.stride, pad = L.padding;
    const int Wo = L.width_out, P = pixels(L), KK = taps(L), ld_taps = padded(KK), ld_in = padded(L.in);
    const int64_t rows = int64_t(n) * P;
    for (int64_t row = g.rank(); row < rows; row += g.size()) {
      const int64_t point = row / P;
      const int q = int(row - point * P), ho = q / Wo, wo = q - ho * Wo;
      const T* image = in + point * ld_in;
      T* patch = X + row * ld_taps;
      // The taps kw in [first, last) fall inside the image: w = wo·s − p + kw in [0, W).
      const int w0 = wo * s - pad;
      const int first = w0 < 0 ? (-w0 < k ? -w0 : k) : 0;
      const int last = W - w0 < k ? (W - w0 > first ? W - w0 : first) : k;
      for (int kh = 0; kh < k; ++kh) {
        const int h = ho * s - pad + kh;
        T* taps_row = patch + int64_t(kh) * k * C;
        if (h < 0 || h >= H) {
          for (int i = 0; i < k * C; ++i) taps_row[i] = T(0);
          continue;
        }
        const T* src = image + (int64_t(h) * W + w0 + first) * C;
        T* inside = taps_row + first * C;
        for (int i = 0; i < first * C; ++i) taps_row[i] = T(0);
        PYMAML_SIMD
        for (int i = 0; i < (last - first) * C; ++i) inside[i] = src[i];
        for (int i = last * C; i < k * C; ++i) taps_row[i] = T(0);
      }
      for (int i = KK; i < ld_taps; ++i) patch[i] = T(0);
    }
    g.sync();
  }

  // col2im: dx of n points (rows of pad(in)) from dX̂ [n·P, pad(KK)]: dx[h, w, c] = Σ dX̂[(ho, wo),
  // (kh·k + kw)·C + c] over the taps with ho·s − p + kh = h and wo·s − p + kw = w, in order of kh
  // and kw (zero where no patch holds the pixel). Only real lanes are written.
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void add_patches(const G& g, const Layer& L, int n, const T* dX, T* dx) {
    const int C = L.channels_in, H = L.height_in, W = L.width_in, k = L.kernel, s = L.stride, pad = L.padding;
    const int Ho = L.height_out, Wo = L.width_out, P = pixels(L), ld_taps = padded(taps(L)), ld_in = padded(L.in);
    const int HW = H * W;
    const int64_t total = int64_t(n) * HW;
    for (int64_t item = g.rank(); item < total; item += g.size()) {
      const int64_t point = item / HW;
      const int hw = int(item - point * HW), h = hw / W, w = hw - h * W;
      T* out = dx + point * ld_in + int64_t(hw) * C;
      for (int c = 0; c < C; ++c) out[c] = T(0);
      const T* rows = dX + point * P * ld_taps;
      for (int kh = 0; kh < k; ++kh) {
        const int th = h + pad - kh;  // ho·s
        if (th < 0) break;
        if (th % s != 0 || th / s >= Ho) continue;
        for (int kw = 0; kw < k; ++kw) {
          const int tw = w + pad - kw;  // wo·s
          if (tw < 0) break;
          if (tw % s != 0 || tw / s >= Wo) continue;
          const T* src = rows + int64_t((th / s) * Wo + tw / s) * ld_taps + (kh * k + kw) * C;
          PYMAML_SIMD
          for (int c = 0; c < C; ++c) out[c] += src[c];
        }
      }
    }
    g.sync();
  }

  // [n·P, pad(F)] rows from n points' rows of P·F values (row stride pad(out)), padding lanes
  // zero; and back (only real lanes written).
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void to_pixel_rows(const G& g, const Layer& L, int n, const T* points, T* rows) {
    const int F = L.channels_out, ld_channels = padded(F), P = pixels(L), ld_out = padded(L.out);
    const int64_t total = int64_t(n) * P;
    for (int64_t row = g.rank(); row < total; row += g.size()) {
      const int64_t point = row / P;
      const T* src = points + point * ld_out + (row - point * P) * F;
      T* dst = rows + row * ld_channels;
      for (int f = 0; f < F; ++f) dst[f] = src[f];
      for (int f = F; f < ld_channels; ++f) dst[f] = T(0);
    }
  }
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void from_pixel_rows(const G& g, const Layer& L, int n, const T* rows, T* points) {
    const int F = L.channels_out, ld_channels = padded(F), P = pixels(L), ld_out = padded(L.out);
    const int64_t total = int64_t(n) * P;
    for (int64_t row = g.rank(); row < total; row += g.size()) {
      const int64_t point = row / P;
      T* dst = points + point * ld_out + (row - point * P) * F;
      const T* src = rows + row * ld_channels;
      for (int f = 0; f < F; ++f) dst[f] = src[f];
    }
  }

  // The chunk's scratch: patch matrices X1, X2 [chunk·P, pad(KK)], then (F not a multiple of
  // kChunk) pixel rows D1, D2 [chunk·P, pad(F)].
  template <class T>
  struct Scratch {
    T *X1, *X2, *D1, *D2;
    PYMAML_HD_MEMBER Scratch(const Layer& L, T* scratch) {
      const int64_t rows = int64_t(chunk_points(L)) * pixels(L);
      X1 = scratch;
      X2 = X1 + rows * padded(taps(L));
      D1 = X2 + rows * padded(taps(L));
      D2 = D1 + rows * padded(L.channels_out);
    }
  };

  // A chunk's [n·P, F] matrix of y or δ from point k0 on: the points' rows themselves (F a
  // multiple of kChunk) or the pixel rows of the scratch (to_pixel_rows, from_pixel_rows). Row
  // stride:
  PYMAML_HD_STATIC_MEMBER int64_t pixel_stride(const Layer& L) {
    return in_place(L) ? int64_t(L.channels_out) : int64_t(padded(L.channels_out));
  }
  // The chunk's matrices e1, e2 of the n points from k0 on of d1 and d2 (e2 null when d2 is),
  // copied into the scratch's pixel rows D1, D2 where the layer does not read them in place.
  template <class T, class G>
  PYMAML_HD_STATIC_MEMBER void pixel_matrices(const G& g, const Layer& L, int n, int k0, const T* d1, const T* d2,
                                              const Scratch<T>& sc, const T** e1, const T** e2) {
    const int64_t first = int64_t(k0) * padded(L.out);
    if (in_place(L)) {
      *e1 = d1 + first;
      *e2 = d2 ? d2 + first : nullptr;
      return;
    }
    to_pixel_rows(g, L, n, d1 + first, sc.D1);
    if (d2) to_pixel_rows(g, L, n, d2 + first, sc.D2);
    g.sync();
    *e1 = sc.D1;
    *e2 = d2 ? sc.D2 : nullptr;
  }

  // out = X̂(in1) WT1 + bias row of WT1 (+ X̂(in2) WT2 when in2 is given), WT1, WT2 as Ŵ^T
  // [KK, pad(F)] with the bias row after (weights_transposed).
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void convolve(const G& g, const Layer& L, int K, const T* in1, const T* wt1, const T* in2,
                                        const T* wt2, T* out, T* scratch) {
    const Scratch<T> sc(L, scratch);
    const int F = L.channels_out, KK = taps(L), P = pixels(L), chunk = chunk_points(L);
    const int64_t ld_taps = padded(KK), ld_channels = padded(F), ld_in = padded(L.in);
    for (int k0 = 0; k0 < K; k0 += chunk) {
      const int n = K - k0 < chunk ? K - k0 : chunk;
      gather_patches(g, L, n, in1 + k0 * ld_in, sc.X1);
      if (in2) gather_patches(g, L, n, in2 + k0 * ld_in, sc.X2);
      const int64_t ld_y = pixel_stride(L);
      T* y = in_place(L) ? out + int64_t(k0) * padded(L.out) : sc.D1;
      Products::gemm_rows(g, n * P, KK, F, sc.X1, ld_taps, int64_t(1), wt1, ld_channels, y, ld_y,
                          wt1 + KK * ld_channels, false);
      if (in2) {
        Products::gemm_rows(g, n * P, KK, F, sc.X2, ld_taps, int64_t(1), wt2, ld_channels, y, ld_y,
                            static_cast<const T*>(nullptr), true);
      }
      g.sync();
      if (!in_place(L)) {
        from_pixel_rows(g, L, n, sc.D1, out + k0 * padded(L.out));
        g.sync();
      }
    }
  }

  // The layer's block of a padded parameter vector `out`: Ŵ = Σ d1^T X̂(in1) (+ Σ d2^T X̂(in2)
  // when d2 is given) over the K points' pixels in order, and the bias Σ d1 when the layer has
  // one; added to `out` when accumulate, and otherwise the whole block written (padding lanes
  // zero). d1, d2 are points' rows of δ-like values [P, F].
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void weight_products(const G& g, const Layer& L, int K, const T* d1, const T* in1,
                                               const T* d2, const T* in2, T* out, bool accumulate, T* scratch) {
    const Scratch<T> sc(L, scratch);
    const int F = L.channels_out, KK = taps(L), P = pixels(L), chunk = chunk_points(L);
    const int ld_taps = padded(KK), ld_channels = padded(F), ld_in = padded(L.in), ld_out = padded(L.out);
    T* block = out + L.padded_offset;
    for (int k0 = 0; k0 < K; k0 += chunk) {
      const int n = K - k0 < chunk ? K - k0 : chunk;
      gather_patches(g, L, n, in1 + int64_t(k0) * ld_in, sc.X1);
      if (d2) gather_patches(g, L, n, in2 + int64_t(k0) * ld_in, sc.X2);
      const T *e1, *e2;
      pixel_matrices(g, L, n, k0, d1, d2, sc, &e1, &e2);
      const int64_t ld_d = pixel_stride(L);
      const bool add = accumulate || k0 > 0;
      const int rows = n * P;
      if (transposed(L)) {  // Ŵ^T [KK, pad(F)] = Σ X̂^T d
        Products::gemm_rows(g, KK, rows, F, sc.X1, int64_t(1), int64_t(ld_taps), e1, ld_d, block,
                            int64_t(ld_channels), static_cast<const T*>(nullptr), add);
        if (d2) {
          Products::gemm_rows(g, KK, rows, F, sc.X2, int64_t(1), int64_t(ld_taps), e2, ld_d, block,
                              int64_t(ld_channels), static_cast<const T*>(nullptr), true);
        }
      } else {  // Ŵ [F, pad(KK)] = Σ d^T X̂
        Products::gemm_rows(g, F, rows, KK, e1, int64_t(1), ld_d, sc.X1, int64_t(ld_taps), block, int64_t(ld_taps),
                            static_cast<const T*>(nullptr), add);
        if (d2) {
          Products::gemm_rows(g, F, rows, KK, e2, int64_t(1), ld_d, sc.X2, int64_t(ld_taps), block,
                              int64_t(ld_taps), static_cast<const T*>(nullptr), true);
        }
      }
      g.sync();
    }
    if (!accumulate) {  // the padding lanes of the weight rows
      const int row_count = transposed(L) ? KK : F, real = transposed(L) ? F : KK;
      const int ld = transposed(L) ? ld_channels : ld_taps;
      for (int r = g.rank(); r < row_count; r += g.size()) {
        for (int j = real; j < ld; ++j) block[int64_t(r) * ld + j] = T(0);
      }
    }
    T* bias = out + bias_offset(L);
    if (!L.bias && !accumulate) {  // the padded bias slots of a gradient are zero
      for (int f = g.rank(); f < ld_channels; f += g.size()) bias[f] = T(0);
    } else if (L.bias) {
      // Σ over points and pixels in order, kBiasLanes channels a rank (each lane its own sum).
      for (int f0 = g.rank() * kBiasLanes; f0 < ld_channels; f0 += g.size() * kBiasLanes) {
        const int lanes = ld_channels - f0 < kBiasLanes ? ld_channels - f0 : kBiasLanes;
        const int width = F - f0 < lanes ? F - f0 : lanes;
        T sum[kBiasLanes];
        for (int j = 0; j < lanes; ++j) sum[j] = accumulate ? bias[f0 + j] : T(0);
        for (int k = 0; k < K; ++k) {
          for (int q = 0; q < P; ++q) {
            const T* row = d1 + int64_t(k) * ld_out + int64_t(q) * F + f0;
            PYMAML_SIMD
            for (int j = 0; j < width; ++j) sum[j] += row[j];
          }
        }
        for (int j = 0; j < lanes; ++j) bias[f0 + j] = j < width ? sum[j] : (accumulate ? bias[f0 + j] : T(0));
      }
    }
    g.sync();
  }

  // dx = col2im(d1 Ŵ1 (+ d2 Ŵ2 when d2 is given)), with w1, w2 the blocks Ŵ [F, pad(KK)] of two
  // padded parameter vectors (a layer whose input is not data keeps Ŵ).
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void input_gradient(const G& g, const Layer& L, int K, const T* d1, const T* w1,
                                              const T* d2, const T* w2, T* dx, T* scratch) {
    const Scratch<T> sc(L, scratch);
    const int F = L.channels_out, KK = taps(L), P = pixels(L), chunk = chunk_points(L);
    const int ld_taps = padded(KK), ld_in = padded(L.in);
    for (int k0 = 0; k0 < K; k0 += chunk) {
      const int n = K - k0 < chunk ? K - k0 : chunk;
      const T *e1, *e2;
      pixel_matrices(g, L, n, k0, d1, d2, sc, &e1, &e2);
      const int64_t ld_d = pixel_stride(L);
      Products::gemm_rows(g, n * P, F, KK, e1, ld_d, int64_t(1), w1, int64_t(ld_taps), sc.X1, int64_t(ld_taps),
                          static_cast<const T*>(nullptr), false);
      if (d2) {
        Products::gemm_rows(g, n * P, F, KK, e2, ld_d, int64_t(1), w2, int64_t(ld_taps), sc.X1, int64_t(ld_taps),
                            static_cast<const T*>(nullptr), true);
      }
      g.sync();
      add_patches(g, L, n, sc.X1, dx + int64_t(k0) * ld_in);
    }
  }

  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void forward(const G& g, const Layer& L, int K, const LayerParams<T>& p,
                                       const LayerIO<T>& io) {
    convolve<Products>(g, L, K, io.in, weights_transposed(L, p.theta, p.WT), static_cast<const T*>(nullptr),
                       static_cast<const T*>(nullptr), io.out, io.scratch);
    g.sync();
  }

  // gŴ, gb into grad (when not null) and dL/dx into io.grad_in (when the input is not data).
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void backward(const G& g, const Layer& L, int K, const LayerParams<T>& p,
                                        const LayerIO<T>& io, T* grad, T*, int64_t) {
    if (grad) {
      weight_products<Products>(g, L, K, io.grad_out, io.in, static_cast<const T*>(nullptr),
                                static_cast<const T*>(nullptr), grad, false, io.scratch);
    }
    if (io.grad_in) {
      input_gradient<Products>(g, L, K, io.grad_out, p.theta + L.padded_offset, static_cast<const T*>(nullptr),
                               static_cast<const T*>(nullptr), io.grad_in, io.scratch);
    }
    g.sync();
  }

  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_forward(const G& g, const Layer& L, int K, const LayerParams<T>& p,
                                         const LayerIO<T>& io) {
    convolve<Products>(g, L, K, io.in, weights_transposed(L, p.u, p.UT), io.r_in, weights_transposed(L, p.theta, p.WT),
                       io.r_out, io.scratch);
    g.sync();
  }

  // R(gŴ), R(gb) into hv (added when accumulate) and R(dL/dx) into io.r_grad_in.
  template <class Products, class T, class G>
  PYMAML_HD_STATIC_MEMBER void r_backward(const G& g, const Layer& L, int K, const LayerParams<T>& p,
                                          const LayerIO<T>& io, T* hv, bool accumulate, T*, int64_t) {
    weight_products<Products>(g, L, K, io.r_grad_out, io.in, io.r_in ? io.grad_out : nullptr, io.r_in, hv, accumulate,
                              io.scratch);
    if (io.r_grad_in) {
      input_gradient<Products>(g, L, K, io.r_grad_out, p.theta + L.padded_offset, io.grad_out, p.u + L.padded_offset,
                               io.r_grad_in, io.scratch);
    }
    g.sync();
  }
};

}  // namespace
}  // namespace pymaml
