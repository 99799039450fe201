// The CPU backend of the Sinkhorn family (the sequence around it is sinkhorn_driver.h):
// kernels of hcext::sinkhorn and hcext::sinkhorn_backward.
// Tokens are processed W at a time (hcext::Lanes, one token per SIMD lane), each lane
// running the shared per-token math of hcext/sinkhorn.h; at::parallel_for splits the
// token blocks.
//
// Instruction set: the library is compiled for baseline x86-64 (no -march flags, so one
// binary runs everywhere), and the kernels below are compiled once more for AVX2 and
// once for AVX-512 through function target attributes. The best one the CPU supports is
// picked at run time; HCEXT_CPU_ISA=baseline|avx2 asks for a lower one (tests,
// benchmarks). All variants compute bit-identical results.
//
// Performance notes (2-core AVX-512 Xeon, n = 4, iters = 20): float lanes use a vector
// polynomial exp (lanes.h; std::exp per lane was the largest cost), and the forward is
// then bound by the throughput of the divider: n divisions 1 / d per half-step, which
// must stay IEEE divisions to keep the results of the shared math. Wider blocks (two
// registers per value) and keeping 1 / d for the backward were measured: no gain.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>

#include "common/cpu_isa.h"
#include "hcext/dispatch.h"
#include "hcext/lanes.h"
#include "hcext/sinkhorn.h"
#include "sinkhorn/sinkhorn_driver.h"

namespace hcext {
namespace {

// Every ISA computes bit-identical results (common/cpu_isa.h).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// Float lanes compute exp with the vector polynomial (lanes.h), double lanes with std::exp.
template <typename T, int W>
using KernelLanes = Lanes<T, W, std::is_same_v<T, float>>;

// Denominators of every half-step for one block of lanes: [steps, n].
template <typename V>
struct BlockHistory {
  V* d;
  int n;
  HCEXT_HD void store(int t, int k, const V& v) { d[t * n + k] = v; }
  HCEXT_HD V load(int t, int k) const { return d[t * n + k]; }
};

// Copies the [n*n] matrices of tokens [b, b + W) into lanes (a transpose: token-major to
// lane-major); tokens past the end read zeros.
template <typename V, typename T>
HCEXT_HD void gather(V* P, const T* src, int64_t b, int64_t tokens, int nn) {
  constexpr int W = V::width;
  const T* s = src + b * nn;
  if (b + W <= tokens) {
    for (int k = 0; k < nn; ++k) {
      typename V::vector_type x;
      for (int l = 0; l < W; ++l) x[l] = s[l * nn + k];
      P[k].v = x;
    }
  } else {
    const int valid = static_cast<int>(tokens - b);
    for (int k = 0; k < nn; ++k) {
      typename V::vector_type x = {};
      for (int l = 0; l < valid; ++l) x[l] = s[l * nn + k];
      P[k].v = x;
    }
  }
}

template <typename V, typename T>
HCEXT_HD void scatter(T* dst, const V* P, int64_t b, int64_t tokens, int nn) {
  constexpr int W = V::width;
  const int valid = static_cast<int>(std::min<int64_t>(W, tokens - b));
  T* d = dst + b * nn;
  for (int k = 0; k < nn; ++k) {
    for (int l = 0; l < valid; ++l) d[l * nn + k] = P[k].v[l];
  }
}

template <typename V, typename T>
struct LoadLogits {
  const T* logits;
  int64_t b, tokens;
  int nn;
  HCEXT_HD void operator()(V* dst) const { gather(dst, logits, b, tokens, nn); }
};

// Forward over token blocks [blk0, blk1). kN > 0: compile-time n; kN == 0: run-time n
// stored in kMaxN x kMaxN lanes.
template <int kN, int kMaxN, int W, typename T>
HCEXT_HD void forward_range(const T* logits, T* out, int64_t tokens, int n, int iters, T eps, int64_t blk0,
                            int64_t blk1) {
  using V = KernelLanes<T, W>;
  const int nn = n * n;
  V P[kMaxN * kMaxN];
  SinkhornNoHistory none;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t b = blk * W;
    gather(P, logits, b, tokens, nn);
    sinkhorn_forward<kN>(P, n, iters, eps, none);
    scatter(out, P, b, tokens, nn);
  }
}

// hist: sinkhorn_half_steps(iters) * n lanes of scratch.
template <int kN, int kMaxN, int W, typename T>
HCEXT_HD void backward_range(const T* grad, const T* logits, T* grad_logits, int64_t tokens, int n, int iters, T eps,
                             int64_t blk0, int64_t blk1, KernelLanes<T, W>* hist) {
  using V = KernelLanes<T, W>;
  const int nn = n * n;
  V P[kMaxN * kMaxN];
  V G[kMaxN * kMaxN];
  BlockHistory<V> history{hist, n};
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t b = blk * W;
    gather(G, grad, b, tokens, nn);
    sinkhorn_backward<kN>(P, G, n, iters, eps, history, LoadLogits<V, T>{logits, b, tokens, nn});
    scatter(grad_logits, G, b, tokens, nn);
  }
}

// One set of kernels per instruction set: kBytes is the SIMD register size it targets.
#define HCEXT_DEFINE_CPU_KERNELS(Name, kBytes, ...)                                                          \
  struct Name {                                                                                              \
    template <typename T>                                                                                    \
    static constexpr int width = (kBytes) / static_cast<int>(sizeof(T));                                     \
    template <int kN, int kMaxN, typename T>                                                                 \
    __VA_ARGS__ static void forward(const T* logits, T* out, int64_t tokens, int n, int iters, T eps,       \
                                    int64_t blk0, int64_t blk1) {                                            \
      forward_range<kN, kMaxN, width<T>>(logits, out, tokens, n, iters, eps, blk0, blk1);                    \
    }                                                                                                        \
    template <int kN, int kMaxN, typename T>                                                                 \
    __VA_ARGS__ static void backward(const T* grad, const T* logits, T* grad_logits, int64_t tokens, int n, \
                                     int iters, T eps, int64_t blk0, int64_t blk1, void* hist) {           \
      backward_range<kN, kMaxN, width<T>>(grad, logits, grad_logits, tokens, n, iters, eps, blk0, blk1,      \
                                          static_cast<KernelLanes<T, width<T>>*>(hist));                     \
    }                                                                                                        \
  };

// Baseline: SSE2 on x86-64, NEON on arm64: 16-byte registers.
HCEXT_DEFINE_CPU_KERNELS(BaselineKernels, 16)
HCEXT_DEFINE_CPU_KERNELS(Avx2Kernels, 32, HCEXT_TARGET_AVX2)
HCEXT_DEFINE_CPU_KERNELS(Avx512Kernels, 64, HCEXT_TARGET_AVX512)
#undef HCEXT_DEFINE_CPU_KERNELS
#pragma GCC pop_options

template <typename Fn>
void dispatch_isa(Fn&& fn) {
  cpu::dispatch_isa<BaselineKernels, Avx2Kernels, Avx512Kernels>(fn);
}

// Token blocks per parallel chunk: a block costs about 10 us or more at iters = 20, so
// a few blocks already amortise the scheduling.
constexpr int64_t kGrainBlocks = 4;

template <typename T>
void run_forward(const T* logits, T* out, int64_t tokens, int n, int iters, T eps) {
  dispatch_isa([&](auto kernels) {
    using K = decltype(kernels);
    constexpr int W = K::template width<T>;
    const int64_t blocks = (tokens + W - 1) / W;
    dispatch_n(n, [&]<int kN, int kMaxN>() {
      at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
        K::template forward<kN, kMaxN>(logits, out, tokens, n, iters, eps, begin, end);
      });
    });
  });
}

template <typename T>
void run_backward(const T* grad, const T* logits, T* grad_logits, int64_t tokens, int n, int iters, T eps) {
  dispatch_isa([&](auto kernels) {
    using K = decltype(kernels);
    using V = KernelLanes<T, K::template width<T>>;
    constexpr int W = V::width;
    const int64_t blocks = (tokens + W - 1) / W;
    dispatch_n(n, [&]<int kN, int kMaxN>() {
      at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
        // One history allocation per chunk of blocks, not per token (aligned new; no init).
        std::unique_ptr<V[]> hist(new V[static_cast<size_t>(sinkhorn_half_steps(iters)) * n]);
        K::template backward<kN, kMaxN>(grad, logits, grad_logits, tokens, n, iters, eps, begin, end, hist.get());
      });
    });
  });
}

// The passes of sinkhorn_driver.h.
struct CpuSinkhornBackend {
  explicit CpuSinkhornBackend(const at::Tensor&) {}
  template <typename T>
  void forward(const T* logits, T* out, int64_t tokens, int n, int iters, T eps) {
    run_forward<T>(logits, out, tokens, n, iters, eps);
  }
  template <typename T>
  void backward(const T* grad, const T* logits, T* grad_logits, int64_t tokens, int n, int iters, T eps) {
    run_backward<T>(grad, logits, grad_logits, tokens, n, iters, eps);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CPU, m) { register_sinkhorn_kernels<CpuSinkhornBackend>(m); }

}  // namespace hcext
