// CPU kernels of hcext::sinkhorn and hcext::sinkhorn_backward.
// Tokens are processed kLanes at a time (hcext::Lanes), each lane running the shared
// per-token math of hcext/sinkhorn.h; at::parallel_for splits the token blocks.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "hcext/lanes.h"
#include "hcext/sinkhorn.h"
#include "sinkhorn_args.h"

namespace hcext {
namespace {

// 8 floats = one AVX register; with SSE2 only, two.
template <typename T>
constexpr int kLanes = 8;

// Denominators of every half-step for one block of lanes: [steps, n].
template <typename V>
struct BlockHistory {
  V* d;
  int n;
  void store(int t, int k, const V& v) { d[t * n + k] = v; }
  V load(int t, int k) const { return d[t * n + k]; }
};

// Copies the [n*n] matrices of tokens [b, b + W) into lanes; missing tokens read zeros.
template <typename V, typename T>
void gather(V* P, const T* src, int64_t b, int64_t tokens, int nn) {
  constexpr int W = V::width;
  for (int k = 0; k < nn; ++k) {
    for (int l = 0; l < W; ++l) {
      P[k].v[l] = b + l < tokens ? src[(b + l) * nn + k] : T(0);
    }
  }
}

template <typename V, typename T>
void scatter(T* dst, const V* P, int64_t b, int64_t tokens, int nn) {
  constexpr int W = V::width;
  const int valid = static_cast<int>(std::min<int64_t>(W, tokens - b));
  for (int k = 0; k < nn; ++k) {
    for (int l = 0; l < valid; ++l) dst[(b + l) * nn + k] = P[k].v[l];
  }
}

// kN > 0: compile-time n; kN == 0: run-time n stored in kMaxN x kMaxN lanes.
template <int kN, int kMaxN, typename T>
void forward_blocks(const T* logits, T* out, int64_t tokens, int n, int iters, T eps) {
  using V = Lanes<T, kLanes<T>>;
  constexpr int W = V::width;
  const int nn = n * n;
  const int64_t blocks = (tokens + W - 1) / W;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    V P[kMaxN * kMaxN];
    SinkhornNoHistory none;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b = blk * W;
      gather(P, logits, b, tokens, nn);
      sinkhorn_forward<kN>(P, n, iters, eps, none);
      scatter(out, P, b, tokens, nn);
    }
  });
}

template <int kN, int kMaxN, typename T>
void backward_blocks(const T* grad, const T* logits, T* grad_logits, int64_t tokens, int n, int iters, T eps) {
  using V = Lanes<T, kLanes<T>>;
  constexpr int W = V::width;
  const int nn = n * n;
  const int64_t blocks = (tokens + W - 1) / W;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    V P[kMaxN * kMaxN];
    V G[kMaxN * kMaxN];
    // One allocation per chunk of blocks, not per token.
    std::vector<V> denominators(static_cast<size_t>(sinkhorn_half_steps(iters)) * n);
    BlockHistory<V> hist{denominators.data(), n};
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b = blk * W;
      gather(G, grad, b, tokens, nn);
      auto load_logits = [&](V* dst) { gather(dst, logits, b, tokens, nn); };
      sinkhorn_backward<kN>(P, G, n, iters, eps, hist, load_logits);
      scatter(grad_logits, G, b, tokens, nn);
    }
  });
}

// Picks the compiled variant for n: unrolled fast paths for the common sizes.
template <typename T, typename Fn>
void dispatch_n(int n, Fn&& fn) {
  switch (n) {
    case 2: return fn(std::integral_constant<int, 2>{}, std::integral_constant<int, 2>{});
    case 4: return fn(std::integral_constant<int, 4>{}, std::integral_constant<int, 4>{});
    case 8: return fn(std::integral_constant<int, 8>{}, std::integral_constant<int, 8>{});
    default:
      if (n <= 8) return fn(std::integral_constant<int, 0>{}, std::integral_constant<int, 8>{});
      if (n <= 16) return fn(std::integral_constant<int, 0>{}, std::integral_constant<int, 16>{});
      return fn(std::integral_constant<int, 0>{}, std::integral_constant<int, kSinkhornMaxN>{});
  }
}

at::Tensor sinkhorn_cpu(const at::Tensor& logits, int64_t iters, double eps) {
  const int n = check_sinkhorn_args(logits, iters, eps, "hcext::sinkhorn");
  const auto dtype = sinkhorn_compute_dtype(logits.scalar_type());
  const at::Tensor L = as_compute_contiguous(logits, dtype);
  at::Tensor out = at::empty(logits.sizes(), L.options());
  const int64_t tokens = logits.numel() / (int64_t(n) * n);
  if (tokens == 0) return out;
  auto run = [&](auto scalar) {
    using T = decltype(scalar);
    dispatch_n<T>(n, [&](auto kN, auto kMaxN) {
      forward_blocks<decltype(kN)::value, decltype(kMaxN)::value, T>(
          L.data_ptr<T>(), out.data_ptr<T>(), tokens, n, static_cast<int>(iters), static_cast<T>(eps));
    });
  };
  if (dtype == at::kDouble) run(double{}); else run(float{});
  return out;
}

at::Tensor sinkhorn_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  const int n = check_sinkhorn_args(logits, iters, eps, "hcext::sinkhorn_backward");
  check_sinkhorn_grad(grad, logits, "hcext::sinkhorn_backward");
  const auto dtype = sinkhorn_compute_dtype(logits.scalar_type());
  const at::Tensor L = as_compute_contiguous(logits, dtype);
  const at::Tensor G = as_compute_contiguous(grad, dtype);
  at::Tensor grad_logits = at::empty(logits.sizes(), L.options());
  const int64_t tokens = logits.numel() / (int64_t(n) * n);
  if (tokens > 0) {
    auto run = [&](auto scalar) {
      using T = decltype(scalar);
      dispatch_n<T>(n, [&](auto kN, auto kMaxN) {
        backward_blocks<decltype(kN)::value, decltype(kMaxN)::value, T>(
            G.data_ptr<T>(), L.data_ptr<T>(), grad_logits.data_ptr<T>(), tokens, n, static_cast<int>(iters),
            static_cast<T>(eps));
      });
    };
    if (dtype == at::kDouble) run(double{}); else run(float{});
  }
  // The gradient has the logits' dtype (computed in fp32 for fp16/bf16 logits).
  return grad_logits.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CPU, m) {
  m.impl("sinkhorn", &sinkhorn_cpu);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cpu);
}

}  // namespace hcext
