#pragma once
// The one compile-time specialisation on n (the number of streams), for every family and
// both backends (CPU kernels and CUDA launchers; host code only).
//
// fn.template operator()<kN, kMaxN>() is called with
//   kN = 4, kMaxN = 4          n = 4, the paper's and DeepSeek's setting: loops unrolled,
//                              per-token values in registers;
//   kN = 0, kMaxN = 8, 16, 32  any other n, read at run time, with per-token storage
//                              sized for the smallest class that holds it.
// Requires 1 <= n <= kMaxStreams (checked by every family's argument checks).

namespace hcext {

constexpr int kMaxStreams = 32;

template <typename Fn>
void dispatch_n(int n, Fn&& fn) {
  if (n == 4) return fn.template operator()<4, 4>();
  if (n <= 8) return fn.template operator()<0, 8>();
  if (n <= 16) return fn.template operator()<0, 16>();
  return fn.template operator()<0, kMaxStreams>();
}

}  // namespace hcext
