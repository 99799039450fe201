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
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/cpu_isa.h"
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

// fp32 lanes -> their bf16 bits (round to nearest even, NaN -> quiet NaN, as c10::BFloat16).
template <int W>
[[gnu::always_inline]] inline typename Bf16Vectors<W>::U16 bf16_bits(const Lanes<float, W>& b) {
  using B = Bf16Vectors<W>;
  typename B::U32 u;
  std::memcpy(&u, &b.v, sizeof(u));
  const typename B::U32 rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const typename B::I32 nan = b.v != b.v;  // -1 where NaN
  const typename B::U32 bits = nan ? typename B::U32{} + 0x7FC0u : rounded;
  return __builtin_convertvector(bits, typename B::U16);
}

template <typename T, typename S, int W>
[[gnu::always_inline]] inline void store_block(T* p, const Lanes<S, W>& b, int valid) {
  if (valid == W) {
    if constexpr (std::is_same_v<S, T>) {
      std::memcpy(p, &b.v, sizeof(b.v));
      return;
    } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<S, float>) {
      const auto h = bf16_bits(b);
      std::memcpy(p, &h, sizeof(h));
      return;
    }
  }
  for (int l = 0; l < valid; ++l) p[l] = static_cast<T>(b.v[l]);
}

// ---- Streaming (non-temporal) stores for outputs far larger than the caches.
//
// A kernel that writes a large output once (grad_x, the new streams) with ordinary stores
// makes the CPU first read every output line (read-for-ownership) and evicts the inputs it is
// about to read; non-temporal stores write whole lines around the caches: a third less
// traffic for a mix (read x, write out). They are used when the output is at least
// kStreamStoreMinBytes (half this machine class's 32 MB L3: smaller outputs may still be in
// cache when the next op reads them), starts on a 16-byte boundary with rows that keep it there,
// and the CPU runs the AVX2 or AVX-512 kernels (VEX-encoded vmovntps). HCEXT_CPU_STREAM_STORES=0
// (read on every call) turns them off; the results are the same bits either way. Streamed stores
// are weakly ordered: a kernel that streams ends with stream_fence() before its task returns.
constexpr int64_t kStreamStoreMinBytes = int64_t(16) << 20;

inline bool use_stream_stores(const void* out, int64_t bytes, int64_t row_bytes) {
  if (bytes < kStreamStoreMinBytes || reinterpret_cast<uintptr_t>(out) % 16 != 0 || row_bytes % 16 != 0) return false;
  if (const char* env = std::getenv("HCEXT_CPU_STREAM_STORES"); env && !std::strcmp(env, "0")) return false;
  return cpu_isa() != CpuIsa::kBaseline;
}

// Writes the bytes of vector v (a multiple of 16 bytes) at p (16-byte aligned), 16 bytes per
// vmovntps. Inline asm rather than intrinsics: the kernels' lambdas carry no target attribute
// and GCC refuses to inline AVX intrinsics into them; 16-byte operands fit every ISA's registers.
template <typename Vec>
[[gnu::always_inline]] inline void stream_bytes(void* p, const Vec& v) {
  typedef float F4 __attribute__((vector_size(16)));
  static_assert(sizeof(Vec) % 16 == 0, "whole 16-byte pieces");
  for (size_t q = 0; q < sizeof(Vec); q += 16) {
    F4 piece;
    std::memcpy(&piece, reinterpret_cast<const char*>(&v) + q, 16);
    asm volatile("vmovntps %1, %0" : "=m"(*reinterpret_cast<F4*>(static_cast<char*>(p) + q)) : "x"(piece));
  }
}

inline void stream_fence() { asm volatile("sfence" ::: "memory"); }

// store_block, streamed when `stream` (use_stream_stores) and the block is whole; fp16 (converted
// per lane) and partial blocks are stored as usual.
template <typename T, typename S, int W>
[[gnu::always_inline]] inline void store_out(T* p, const Lanes<S, W>& b, int valid, bool stream) {
  if (stream && valid == W) {
    if constexpr (std::is_same_v<S, T> && sizeof(b.v) % 16 == 0) {
      return stream_bytes(p, b.v);
    } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<S, float> && W % 8 == 0) {
      return stream_bytes(p, bf16_bits(b));
    }
  }
  store_block(p, b, valid);
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
