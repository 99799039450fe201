#pragma once
// Lanes<T, W>: W independent values (one per token) that the per-token math templates
// (sinkhorn.h, ...) accept in place of a scalar. The CPU kernels process W tokens at
// once; every operation is an elementwise loop over the lanes, which the compiler
// turns into SIMD instructions. Host only.

#include <cmath>

#include "hcext/macros.h"

namespace hcext {

template <typename T, int W>
struct Lanes {
  using value_type = T;
  static constexpr int width = W;
  T v[W];

  Lanes() = default;
  HCEXT_HD Lanes(T x) {  // NOLINT: implicit broadcast, like a scalar
    for (int l = 0; l < W; ++l) v[l] = x;
  }
};

#define HCEXT_LANES_BINARY_OP(op)                                                     \
  template <typename T, int W>                                                       \
  HCEXT_HD Lanes<T, W> operator op(const Lanes<T, W>& a, const Lanes<T, W>& b) {     \
    Lanes<T, W> r;                                                                   \
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] op b.v[l];                           \
    return r;                                                                        \
  }                                                                                  \
  template <typename T, int W>                                                       \
  HCEXT_HD Lanes<T, W> operator op(const Lanes<T, W>& a, T b) {                      \
    Lanes<T, W> r;                                                                   \
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] op b;                                \
    return r;                                                                        \
  }                                                                                  \
  template <typename T, int W>                                                       \
  HCEXT_HD Lanes<T, W> operator op(T a, const Lanes<T, W>& b) {                      \
    Lanes<T, W> r;                                                                   \
    for (int l = 0; l < W; ++l) r.v[l] = a op b.v[l];                                \
    return r;                                                                        \
  }

HCEXT_LANES_BINARY_OP(+)
HCEXT_LANES_BINARY_OP(-)
HCEXT_LANES_BINARY_OP(*)
HCEXT_LANES_BINARY_OP(/)
#undef HCEXT_LANES_BINARY_OP

template <typename T, int W>
HCEXT_HD Lanes<T, W> vmax(const Lanes<T, W>& a, const Lanes<T, W>& b) {
  Lanes<T, W> r;
  for (int l = 0; l < W; ++l) r.v[l] = a.v[l] > b.v[l] ? a.v[l] : b.v[l];
  return r;
}

template <typename T, int W>
HCEXT_HD Lanes<T, W> vexp(const Lanes<T, W>& a) {
  Lanes<T, W> r;
  for (int l = 0; l < W; ++l) r.v[l] = vexp(a.v[l]);
  return r;
}

}  // namespace hcext
