#pragma once
// Moving per-token rows between memory and hcext::Lanes (W tokens side by side) for the
// CPU kernels. Tokens past the end read as zero and are not written back.

#include <algorithm>
#include <cstdint>

#include "hcext/lanes.h"

namespace hcext::cpu {

// dst[k].v[l] = src[(b + l) * stride + k] for k < count.
template <typename V, typename T>
inline void load_lanes(V* dst, const T* src, int64_t b, int64_t tokens, int64_t stride, int count) {
  constexpr int W = V::width;
  for (int k = 0; k < count; ++k) {
    for (int l = 0; l < W; ++l) dst[k].v[l] = b + l < tokens ? T(src[(b + l) * stride + k]) : T(0);
  }
}

template <typename V, typename T>
inline void store_lanes(T* dst, const V* src, int64_t b, int64_t tokens, int64_t stride, int count) {
  constexpr int W = V::width;
  const int valid = static_cast<int>(std::min<int64_t>(W, tokens - b));
  for (int k = 0; k < count; ++k) {
    for (int l = 0; l < valid; ++l) dst[(b + l) * stride + k] = src[k].v[l];
  }
}

// Recorded Sinkhorn denominators of one block of lanes: [steps, n] (see sinkhorn.h).
template <typename V>
struct LaneHistory {
  V* d;
  int n;
  void store(int t, int k, const V& v) { d[t * n + k] = v; }
  V load(int t, int k) const { return d[t * n + k]; }
};

}  // namespace hcext::cpu
