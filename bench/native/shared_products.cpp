// Whether the meta-batch's shared θ_0 pays (issue: "beyond the per-task floor"), measured on the
// kernels' own products at one ISA level (bench/test_shared_products.py compiles this file with
// each level's options from CMakeLists.txt and runs it):
//
//  1. Step 0's support products for all T tasks at once. Every task's step-0 forward product
//     z = a W^T and back-propagated δ W read the same θ_0, so the T products [K × n_in]·[n_in × n]
//     can run as one [T·K × n_in] product. Timed: T calls of gemm_rows with K rows against one
//     call with T·K rows, same B.
//  2. The rank-K structure of an inner update. For a middle layer, θ_1 = θ_0 − α g_0 with
//     g_0 = δ^T a (rank ≤ K), so z = a' W_1^T = a' W_0^T − α (a' a^T) δ: the product with W_0
//     remains, and the factored form adds 2·K·K·n multiply-adds per use, to save forming W_1 and
//     its transpose (n_in·n_out each). Timed: the update and transpose against the two small
//     products of one use.
//
//   shared_products T K WIDTH REPEATS    prints one JSON object
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "core/common.h"
#include "cpu/register_tiles.h"

namespace {

using Clock = std::chrono::steady_clock;
using Products = pymaml::cpu::CpuProducts;

template <class F>
double best_microseconds(int repeats, F&& body) {
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const auto start = Clock::now();
    body();
    best = std::min(best, std::chrono::duration<double, std::micro>(Clock::now() - start).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s T K WIDTH REPEATS\n", argv[0]);
    return 2;
  }
  const int T = std::atoi(argv[1]), K = std::atoi(argv[2]), n = std::atoi(argv[3]), repeats = std::atoi(argv[4]);
  const int ld = pymaml::padded(n);
  const pymaml::SerialGroup g;
  std::mt19937 generator(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto filled = [&](size_t count) {
    std::vector<float> values(count, 0.0f);
    for (float& v : values) v = normal(generator);
    return values;
  };
  // a: every task's K rows, [T·K, ld]; B: W^T [n, ld] with its bias row; C: the outputs.
  std::vector<float> a = filled(size_t(T) * K * ld), B = filled(size_t(n + 1) * ld), C(size_t(T) * K * ld);
  const float* bias = B.data() + size_t(n) * ld;
  const int inner = 64;  // calls per timed body, so that one body lasts well above the clock's resolution
  const double per_task = best_microseconds(repeats, [&] {
    for (int call = 0; call < inner; ++call) {
      for (int t = 0; t < T; ++t) {
        Products::gemm_rows(g, K, n, n, a.data() + size_t(t) * K * ld, int64_t(ld), int64_t(1), B.data(), int64_t(ld),
                          C.data() + size_t(t) * K * ld, int64_t(ld), bias, false);
      }
    }
  }) / inner;
  const double shared = best_microseconds(repeats, [&] {
    for (int call = 0; call < inner; ++call) {
      Products::gemm_rows(g, T * K, n, n, a.data(), int64_t(ld), int64_t(1), B.data(), int64_t(ld), C.data(),
                        int64_t(ld), bias, false);
    }
  }) / inner;

  // 2: per task, forming W_1 = W_0 − α g (n × ld) and its transpose, against the factored form's
  // two products for one use: P = a' a^T [K × K], then P δ [K × n].
  std::vector<float> W0 = filled(size_t(n) * ld), G = filled(size_t(n) * ld), W1(size_t(n) * ld),
                     WT(size_t(n) * ld), alpha(size_t(n) * ld, 0.01f), delta = filled(size_t(K) * ld),
                     P(size_t(K) * pymaml::padded(K)), aT(size_t(n) * pymaml::padded(K)), Q(size_t(K) * ld);
  const int ldp = pymaml::padded(K);
  const float* a_prime = a.data() + size_t(K) * ld;
  const double form = best_microseconds(repeats, [&] {
    for (int call = 0; call < inner; ++call) {
      for (size_t p = 0; p < W1.size(); ++p) W1[p] = W0[p] - alpha[p] * G[p];
      for (int o = 0; o < n; ++o) {
        for (int i = 0; i < n; ++i) WT[size_t(i) * ld + o] = W1[size_t(o) * ld + i];
      }
    }
  }) / inner;
  const double factored = best_microseconds(repeats, [&] {
    for (int call = 0; call < inner; ++call) {
      // P[k, j] = Σ_i a'[k, i] a[j, i], the products reading a^T [n × K] row by row.
      for (int j = 0; j < K; ++j) {
        for (int i = 0; i < n; ++i) aT[size_t(i) * ldp + j] = a[size_t(j) * ld + i];
      }
      Products::gemm_rows(g, K, n, K, a_prime, int64_t(ld), int64_t(1), aT.data(), int64_t(ldp), P.data(), int64_t(ldp),
                        static_cast<const float*>(nullptr), false);
      Products::gemm_rows(g, K, K, n, P.data(), int64_t(ldp), int64_t(1), delta.data(), int64_t(ld), Q.data(),
                        int64_t(ld), static_cast<const float*>(nullptr), false);
    }
  }) / inner;
  float checksum = 0;
  for (float v : C) checksum += v;
  for (float v : WT) checksum += v;
  for (float v : Q) checksum += v;
  std::printf(
      "{\"tasks\": %d, \"points\": %d, \"width\": %d, \"step0_per_task_us\": %.4f, \"step0_shared_us\": %.4f, "
      "\"update_and_transpose_us\": %.4f, \"factored_use_us\": %.4f, \"checksum\": %g}\n",
      T, K, n, per_task, shared, form, factored, double(checksum));
  return 0;
}
