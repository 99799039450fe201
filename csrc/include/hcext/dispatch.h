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

// CUDA kernels that work on an n x n matrix per thread (the Sinkhorn, the mHC epilogues) keep
// it in registers / local memory up to this n, and in a per-token slice of global memory
// beyond (the output itself, or a workspace the glue allocates): local memory is reserved for
// every thread the GPU can hold at once, whatever n the call has, so kernels for n up to 32
// must not ask for n = 32's matrices there (build-ptxas.log; the ptxas check's stack budget).
constexpr int kThreadMatrixMaxN = 8;

// Elements of global workspace the Sinkhorn backward needs per call beyond its half-step
// denominators: one n x n matrix per token (`matrices`) when n > kThreadMatrixMaxN.
inline long long thread_matrix_workspace(long long tokens, int n, int matrices) {
  return n > kThreadMatrixMaxN ? tokens * n * n * matrices : 0;
}

// Always inlined: a caller inside an ISA-targeted CPU kernel (common/cpu_isa.h) gets the chosen
// instantiation compiled for its own ISA.
template <typename Fn>
[[gnu::always_inline]] inline void dispatch_n(int n, Fn&& fn) {
  if (n == 4) return fn.template operator()<4, 4>();
  if (n <= 8) return fn.template operator()<0, 8>();
  if (n <= 16) return fn.template operator()<0, 16>();
  return fn.template operator()<0, kMaxStreams>();
}

}  // namespace hcext
