#pragma once
// Stream aggregation and mix-expand for one token, one channel (or one group of
// channels) at a time. These are the only definitions of the arithmetic. The CPU kernels
// (csrc/streams/streams_cpu.cpp) and the CUDA kernels (csrc/streams/streams_kernels.cu) both call
// them. The readable spec is hcext/reference.py (stream_aggregate, stream_mix_expand).
//
// Layout: the token's streams are x[i, c] (n rows of C channels). Coefficients are
// fp32 (fp64 for fp64 streams):
//   stream_aggregate:   y[c]      = sum_i h_pre[i] * x[i, c]
//   stream_mix_expand:  out[i, c] = sum_j h_res[i, j] * x[j, c] + h_post[i] * f[c]
// Gradients, with g = dLoss/dout (or gy = dLoss/dy):
//   mix:       grad_x[j, c]   = sum_i h_res[i, j] * g[i, c]
//              grad_f[c]      = sum_i h_post[i] * g[i, c]
//              grad_h_post[i] = sum_c g[i, c] * f[c]
//              grad_h_res[i, j] = sum_c g[i, c] * x[j, c]
//   aggregate: grad_x[i, c]   = h_pre[i] * gy[c]
//              grad_h_pre[i]  = sum_c gy[c] * x[i, c]
// The functions here compute one channel-wise value. The sums over c (the coefficient
// gradients) are reductions, and each backend writes its own (in a fixed order).
//
// Template parameters: kN > 0 fixes n at compile time (the unrolled fast path); kN == 0
// reads n at run time. V is the value type for a channel group: hcext::Lanes<S, W> on
// both backends (W channels: a SIMD block on the CPU, one 128-bit load on the GPU), or a
// plain S. S is the coefficient/compute scalar (float, or double for fp64). Load(i)
// returns row i of the streams (or of the gradient) as a V. It is called exactly once
// per row and in the order i = 0..n-1, so a caller may load from memory lazily.

#include "hcext/dispatch.h"
#include "hcext/macros.h"

namespace hcext {

// Largest stream count every backend supports.
constexpr int kStreamsMaxN = kMaxStreams;

// sum_{i < n} w[i * stride] * row(i), accumulated in the order i = 0, 1, ..., n - 1.
// The first product is added to +0 so that every addition takes one product and a running sum,
// never two products: FMA contraction (g++ on AVX2 / AVX-512, nvcc) then has exactly one way to
// round each step, whatever the context this is inlined into (the mHC boundary's fused passes
// write x_next with this code and must give stream_mix_expand's bits). Its only effect on values:
// a first product of -0 counts as +0.
template <int kN, typename V, typename S, typename Load>
HCEXT_HD V stream_weighted_sum(const S* w, int stride, int n_rt, Load&& row) {
  const int n = kN > 0 ? kN : n_rt;
  V acc = V(S(0)) + w[0] * row(0);
  HCEXT_UNROLL
  for (int i = 1; i < n; ++i) acc = acc + w[i * stride] * row(i);
  return acc;
}

// y = sum_i h_pre[i] * x[i]
template <int kN, typename V, typename S, typename LoadX>
HCEXT_HD V stream_aggregate_value(const S* h_pre, int n_rt, LoadX&& x) {
  return stream_weighted_sum<kN, V>(h_pre, 1, n_rt, x);
}

// Row i of the mix: out[i] = sum_j h_res_row[j] * x[j] + h_post_i * f
// (h_res_row = h_res + i * n).
template <int kN, typename V, typename S, typename LoadX>
HCEXT_HD V stream_mix_value(const S* h_res_row, S h_post_i, const V& f, int n_rt, LoadX&& x) {
  return stream_weighted_sum<kN, V>(h_res_row, 1, n_rt, x) + h_post_i * f;
}

// grad_x[j] = sum_i h_res[i, j] * g[i]: column j of h_res against the gradient rows.
template <int kN, typename V, typename S, typename LoadG>
HCEXT_HD V stream_mix_grad_x_value(const S* h_res, int j, int n_rt, LoadG&& g) {
  const int n = kN > 0 ? kN : n_rt;
  return stream_weighted_sum<kN, V>(h_res + j, n, n_rt, g);
}

// grad_f = sum_i h_post[i] * g[i]
template <int kN, typename V, typename S, typename LoadG>
HCEXT_HD V stream_mix_grad_f_value(const S* h_post, int n_rt, LoadG&& g) {
  return stream_weighted_sum<kN, V>(h_post, 1, n_rt, g);
}

// grad_x[i] = h_pre[i] * gy
template <typename V, typename S>
HCEXT_HD V stream_aggregate_grad_x_value(S h_pre_i, const V& gy) {
  return h_pre_i * gy;
}

// The channel-wise term of a coefficient gradient, a * b: (g[i], f) for grad_h_post[i],
// (g[i], x[j]) for grad_h_res[i, j], (gy, x[i]) for grad_h_pre[i]. The backends sum
// these terms over the channels.
template <typename V>
HCEXT_HD V stream_coef_grad_term(const V& a, const V& b) {
  return a * b;
}

}  // namespace hcext
