// Sums over the points of a set, blocked so that float32 results do not drift with K.
#pragma once

#include "common.h"

namespace pymaml {

// Sums over points are taken in blocks of kPointBlock points, each block in order, and the block
// sums are added pairwise (a binary counter: partial sum j holds 2^j blocks). In order, a float32
// sum of K terms loses about √K·ε of its size to rounding, so that float32 results drift from
// float64 as K grows; blocked, the loss grows with √kPointBlock + log2 K. Up to kPointBlock
// points (the sinusoid's 10) the sum is the plain in-order one.
constexpr int kPointBlock = 128;
PYMAML_HD int point_blocks(int K) { return (K + kPointBlock - 1) / kPointBlock; }
// The padded parameter vectors a blocked sum over K points needs: one per bit of the block count
// (the partial sums) and one for the block being summed; none for a single block.
PYMAML_HD int point_sum_slots(int K) {
  const int blocks = point_blocks(K);
  if (blocks <= 1) return 0;
  int bits = 0;
  while (bits < 31 && (1 << bits) <= blocks) ++bits;
  return bits + 1;
}

// Σ_{k < K} x[k], blocked and pairwise as above.
template <class T>
PYMAML_HD T sum_over_points(const T* x, int K) {
  T partial[32];
  const int blocks = point_blocks(K);
  for (int b = 0; b < blocks; ++b) {
    const int end = (b + 1) * kPointBlock < K ? (b + 1) * kPointBlock : K;
    T sum = 0;
    for (int k = b * kPointBlock; k < end; ++k) sum += x[k];
    int j = 0;
    for (; (b >> j) & 1; ++j) sum = partial[j] + sum;
    partial[j] = sum;
  }
  T total = 0;
  for (int j = 0; j < 32 && (blocks >> j) != 0; ++j) {
    if ((blocks >> j) & 1) total = partial[j] + total;
  }
  return total;
}

}  // namespace pymaml
