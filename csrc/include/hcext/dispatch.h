#pragma once
// Compile-time specialisation of the per-token math on n (the number of streams).
// fn.template operator()<kN, kMaxN>() is called with kN = n for the unrolled fast path
// (n = 4, the paper's and DeepSeek's setting) and kN = 0 (n read at run time) with
// per-token storage sized for kMaxN otherwise. Host code only (CPU kernels and CUDA
// launchers). Requires 1 <= n <= 32 (checked by the callers' argument checks).

namespace hcext {

template <typename Fn>
void dispatch_streams(int n, Fn&& fn) {
  if (n == 4) return fn.template operator()<4, 4>();
  if (n <= 8) return fn.template operator()<0, 8>();
  if (n <= 16) return fn.template operator()<0, 16>();
  return fn.template operator()<0, 32>();
}

}  // namespace hcext
