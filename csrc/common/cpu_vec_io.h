#pragma once
// Loading and storing rows of channels as hcext::Lanes<S, kVecIoWidth> for the CPU
// kernels: fp32/fp64 as whole vectors, bf16 widened to fp32 with integer vector shifts
// (and narrowed with round-to-nearest-even, NaN -> quiet NaN, exactly as c10::BFloat16),
// fp16 per lane through c10::Half. Partial blocks (valid < width) read zeros beyond the
// end (they add nothing to sums) and write only the valid channels.

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "hcext/lanes.h"

namespace hcext::cpu {

constexpr int kVecIoWidth = 16;

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

template <int W>
struct Bf16Vectors {
  typedef uint16_t U16 __attribute__((vector_size(2 * W)));
  typedef uint32_t U32 __attribute__((vector_size(4 * W)));
  typedef int32_t I32 __attribute__((vector_size(4 * W)));
  typedef float F32 __attribute__((vector_size(4 * W)));
};

template <typename S, typename T, int W = kVecIoWidth>
[[gnu::always_inline]] inline Lanes<S, W> load_block(const T* p, int valid) {
  Lanes<S, W> r;
  if (valid == W) {
    if constexpr (std::is_same_v<S, T>) {
      std::memcpy(&r.v, p, sizeof(r.v));
      return r;
    } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<S, float>) {
      using B = Bf16Vectors<W>;
      typename B::U16 h;
      std::memcpy(&h, p, sizeof(h));
      const typename B::U32 w = __builtin_convertvector(h, typename B::U32) << 16;
      std::memcpy(&r.v, &w, sizeof(w));
      return r;
    } else {
      for (int l = 0; l < W; ++l) r.v[l] = static_cast<S>(p[l]);
      return r;
    }
  }
  for (int l = 0; l < W; ++l) r.v[l] = l < valid ? static_cast<S>(p[l]) : S(0);
  return r;
}

template <typename T, typename S, int W>
[[gnu::always_inline]] inline void store_block(T* p, const Lanes<S, W>& b, int valid) {
  if (valid == W) {
    if constexpr (std::is_same_v<S, T>) {
      std::memcpy(p, &b.v, sizeof(b.v));
      return;
    } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<S, float>) {
      using B = Bf16Vectors<W>;
      typename B::U32 u;
      std::memcpy(&u, &b.v, sizeof(u));
      const typename B::U32 rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
      const typename B::I32 nan = b.v != b.v;  // -1 where NaN
      const typename B::U32 bits = nan ? typename B::U32{} + 0x7FC0u : rounded;
      const typename B::U16 h = __builtin_convertvector(bits, typename B::U16);
      std::memcpy(p, &h, sizeof(h));
      return;
    }
  }
  for (int l = 0; l < valid; ++l) p[l] = static_cast<T>(b.v[l]);
}

// Runs body(c, valid) over blocks of W (default kVecIoWidth) channels of [0, len): full blocks
// first, with valid a compile-time constant (whole-vector loads and stores, no tests), then the tail.
template <int W = kVecIoWidth, typename Body>
[[gnu::always_inline]] inline void for_channel_blocks(int64_t len, Body&& body) {
  int64_t c = 0;
  for (; c + W <= len; c += W) body(c, std::integral_constant<int, W>{});
  if (c < len) body(c, static_cast<int>(len - c));
}

// Sum of the lanes, in lane order.
template <typename S, int W>
[[gnu::always_inline]] inline S lane_sum(const Lanes<S, W>& b) {
  S s = b.v[0];
  for (int l = 1; l < W; ++l) s += b.v[l];
  return s;
}

#pragma GCC diagnostic pop

// Tokens per at::parallel_for task for a pass over rows of `len` elements per token:
// about 32K elements of work per task.
inline int64_t row_grain(int64_t len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, len)); }

}  // namespace hcext::cpu
