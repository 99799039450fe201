#pragma once
// Sinkhorn-Knopp projection of one token's n x n logits, forward and backward.
// This is the ONE implementation of the arithmetic: the CPU kernels
// (csrc/sinkhorn/sinkhorn_cpu.cpp) and the CUDA kernels (csrc/sinkhorn/sinkhorn_kernels.cu)
// both call these functions; hcext/reference.py is the readable spec they match.
//
// Convention (mHC paper, DeepSeek's official kernels): P[i * n + j] = H[dst=i, src=j],
// applied as out[i] = sum_j H[i, j] * x[j].
//
//   P = softmax(logits, dim=-2) + eps        each column normalised over destinations
//   P = P / (rowsum(P) + eps)                 half-step t = 0 (rows)
//   repeat iters - 1 times:
//     P = P / (colsum(P) + eps)               odd t (columns)
//     P = P / (rowsum(P) + eps)               even t (rows)
//
// so the 2 * iters - 1 half-steps after the softmax alternate rows (even t) and
// columns (odd t) and the last one normalises rows: rows sum to 1 up to eps.
//
// Backward. Nothing but the logits is saved by autograd. The backward recomputes the
// forward from the logits, recording only the denominator d = s + eps of every
// half-step (n numbers per step), then walks the half-steps in reverse. For one line
// (row or column) of a step y = x / d with d = sum(x) + eps:
//     dx = (g - sum(g * y)) / d,        and the step's input is recovered as x = y * d.
// Finally the column softmax q = softmax(logits, dim=-2) (recomputed, exact) gives
//     dlogits = q * (g - colsum(g * q)).
// This differentiates the unrolled, finite iteration exactly (no implicit or
// fixed-point gradient). The recovered inputs x = y * d differ from the forward's by
// rounding only (a few ulp over 2 * iters steps).
//
// Template parameters: kN > 0 fixes n at compile time (fully unrolled fast paths);
// kN == 0 reads n at run time. V is the value type: float / double on the GPU (one
// token per thread), hcext::Lanes<...> on the CPU (several tokens side by side).
// Hist stores and loads the denominators: hist.store(t, k, d), hist.load(t, k).

#include "hcext/dispatch.h"
#include "hcext/macros.h"

namespace hcext {

// Largest n every backend supports (the CUDA kernels keep one token in registers or
// thread-local memory).
constexpr int kSinkhornMaxN = kMaxStreams;

HCEXT_HD constexpr int sinkhorn_half_steps(int iters) { return 2 * iters - 1; }

// For the forward op, which records nothing.
struct SinkhornNoHistory {
  template <typename V>
  HCEXT_HD void store(int, int, const V&) const {}
};

// P <- softmax(P, dim=-2) + eps: every column normalised over its n destinations,
// with the max subtracted first so exp cannot overflow.
template <int kN, typename V, typename S>
HCEXT_HD void sinkhorn_softmax_cols(V* P, int n_rt, S eps) {
  const int n = kN > 0 ? kN : n_rt;
  HCEXT_UNROLL
  for (int j = 0; j < n; ++j) {
    V m = P[j];
    HCEXT_UNROLL
    for (int i = 1; i < n; ++i) m = vmax(m, P[i * n + j]);
    V s = V(S(0));
    HCEXT_UNROLL
    for (int i = 0; i < n; ++i) {
      const V e = vexp(P[i * n + j] - m);
      P[i * n + j] = e;
      s = s + e;
    }
    const V r = S(1) / s;
    HCEXT_UNROLL
    for (int i = 0; i < n; ++i) P[i * n + j] = P[i * n + j] * r + eps;
  }
}

// One half-step: divide every row (kRows) or column by (its sum + eps); record d.
template <int kN, bool kRows, typename V, typename S, typename Hist>
HCEXT_HD void sinkhorn_normalize(V* P, int n_rt, S eps, Hist& hist, int t) {
  const int n = kN > 0 ? kN : n_rt;
  HCEXT_UNROLL
  for (int a = 0; a < n; ++a) {
    V s = V(S(0));
    HCEXT_UNROLL
    for (int b = 0; b < n; ++b) s = s + P[kRows ? a * n + b : b * n + a];
    const V d = s + eps;
    const V r = S(1) / d;
    HCEXT_UNROLL
    for (int b = 0; b < n; ++b) {
      V& p = P[kRows ? a * n + b : b * n + a];
      p = p * r;
    }
    hist.store(t, a, d);
  }
}

// Forward: P holds the logits on entry and H = sinkhorn(logits) on return.
template <int kN, typename V, typename S, typename Hist>
HCEXT_HD void sinkhorn_forward(V* P, int n_rt, int iters, S eps, Hist& hist) {
  sinkhorn_softmax_cols<kN>(P, n_rt, eps);
  const int steps = sinkhorn_half_steps(iters);
  for (int t = 0; t < steps; ++t) {
    if (t % 2 == 0) {
      sinkhorn_normalize<kN, true>(P, n_rt, eps, hist, t);
    } else {
      sinkhorn_normalize<kN, false>(P, n_rt, eps, hist, t);
    }
  }
}

// Reverse of one half-step: G <- (G - sum(G * y)) / d along each line, y <- y * d.
template <int kN, bool kRows, typename V, typename Hist>
HCEXT_HD void sinkhorn_normalize_backward(V* P, V* G, int n_rt, Hist& hist, int t) {
  const int n = kN > 0 ? kN : n_rt;
  HCEXT_UNROLL
  for (int a = 0; a < n; ++a) {
    const V d = hist.load(t, a);
    V s = G[kRows ? a * n : a] * P[kRows ? a * n : a];
    HCEXT_UNROLL
    for (int b = 1; b < n; ++b) {
      const int k = kRows ? a * n + b : b * n + a;
      s = s + G[k] * P[k];
    }
    const V r = decltype(d)(1) / d;
    HCEXT_UNROLL
    for (int b = 0; b < n; ++b) {
      const int k = kRows ? a * n + b : b * n + a;
      G[k] = (G[k] - s) * r;
      P[k] = P[k] * d;
    }
  }
}

// Backward for one token. On entry G = dLoss/dH. load_logits(P) must fill P with the
// token's logits (it is called twice: recompute, then the softmax's own backward).
// P is scratch. On return G = dLoss/dlogits.
template <int kN, typename V, typename S, typename Hist, typename LoadLogits>
HCEXT_HD void sinkhorn_backward(V* P, V* G, int n_rt, int iters, S eps, Hist& hist,
                                LoadLogits load_logits) {
  const int n = kN > 0 ? kN : n_rt;
  // 1. Recompute the forward, recording each half-step's denominators.
  load_logits(P);
  sinkhorn_forward<kN>(P, n_rt, iters, eps, hist);
  // 2. Walk the half-steps in reverse.
  for (int t = sinkhorn_half_steps(iters) - 1; t >= 0; --t) {
    if (t % 2 == 0) {
      sinkhorn_normalize_backward<kN, true>(P, G, n_rt, hist, t);
    } else {
      sinkhorn_normalize_backward<kN, false>(P, G, n_rt, hist, t);
    }
  }
  // 3. G is now the gradient w.r.t. softmax + eps; back through the column softmax.
  load_logits(P);
  sinkhorn_softmax_cols<kN>(P, n_rt, S(0));
  HCEXT_UNROLL
  for (int j = 0; j < n; ++j) {
    V s = G[j] * P[j];
    HCEXT_UNROLL
    for (int i = 1; i < n; ++i) s = s + G[i * n + j] * P[i * n + j];
    HCEXT_UNROLL
    for (int i = 0; i < n; ++i) G[i * n + j] = P[i * n + j] * (G[i * n + j] - s);
  }
}

}  // namespace hcext
