#pragma once
// Per-stream coefficient math of the original Hyper-Connections (HC, arXiv 2409.19606v3,
// Eq. 5-7 / Alg. 2), forward and backward: the ONE implementation that the CPU kernels
// (csrc/hc/hc_cpu.cpp) and the CUDA kernels (csrc/hc/hc_kernels.cu) both call.
// hcext/reference.py::hc_coeffs is the readable spec.
//
// The given dynamic weights are concatenated column-wise, W = [dynamic_alpha | dynamic_beta]
// ([C, K], K = (n+1 if dynamic_alpha) + (1 if dynamic_beta)), and the norm's weight w is
// folded in: Wt = w ⊙ W. For stream i of a token, with x̂ = (x_i - mean_i) * rstd_i
// (mean_i = 0 for RMSNorm) and H̄_i = x̂ ⊙ w + b:
//   z_ik = H̄_i · W_k = rstd_i * q_ik + col_bias_k,   q_ik = Σ_c (x_ic - mean_i) Wt_ck,
//                                                      col_bias_k = Σ_c b_c W_ck
// so one pass over x_i (its sums and the K dot products with Wt) gives every z without
// materialising H̄. The kernels accumulate around a shift (x_i0 for LayerNorm, which keeps
// E[x²] - E[x]² and the centring of the projections from cancelling when |mean| >> std;
// 0 for RMSNorm):
//   s1 = Σ (x - shift), s2 = Σ (x - shift)², p_k = Σ (x - shift) Wt_k
//   dmean = s1 / C, mean = shift + dmean, var = s2 / C - dmean², q_k = p_k - dmean * col_sum_k
// with col_sum_k = Σ_c Wt_ck. Then (act = tanh, or the identity without use_tanh):
//   α_ik = s_α act(z_ik) + static_alpha[i, k]   (k <= n)  ->  h_pre[i] = α_i0, h_res[dst, i] = α_i,1+dst
//   β_i  = s_β act(z_iβ) + static_beta[i]                 ->  h_post[i] = β_i
// A missing dynamic part leaves the static value; a missing scale is 1.
//
// Backward, per stream, from the saved q and (mean, rstd) and the incoming gradients:
//   dz_ik = g_ik s act'(z_ik),  e_ik = rstd_i dz_ik
//   dx_ic = Σ_k Wc_ck e_ik + b_i (x_ic - mean_i),   b_i = -(rstd_i² / C) Σ_k e_ik q_ik
// with Wc = Wt for RMSNorm and Wc_ck = Wt_ck - col_sum_k / C for LayerNorm: its subtraction of
// the mean of dL/dx̂ over c, moved onto the (parameter-sized) weights. This keeps the
// cancellation out of the per-token sums: for a constant stream (var = 0, rstd = 1/sqrt(eps),
// e large) the terms cancel exactly instead of leaving rounding noise of size e.
// Summed over tokens and streams (by the caller, in a fixed order):
//   Ĝ_ck = Σ (x_ic - mean_i) e_ik,  S_k = Σ dz_ik
//   dW = w ⊙ Ĝ + b ⊗ S,  dw_c = Σ_k W_ck Ĝ_ck,  db_c = Σ_k W_ck S_k
//   d static_alpha = Σ g_α,  d static_beta = Σ g_β,  d s_α = Σ g_α act(z),  d s_β = Σ g_β act(z)
// This file produces e, b and each token's share of the small sums (a "partial row").

#include "hcext/dispatch.h"
#include "hcext/macros.h"

namespace hcext {

constexpr int kHcMaxN = kMaxStreams;

#if defined(__CUDA_ARCH__)
HCEXT_HD float hc_tanh(float a) { return tanhf(a); }
HCEXT_HD double hc_tanh(double a) { return tanh(a); }
#else
HCEXT_HD float hc_tanh(float a) { return std::tanh(a); }
HCEXT_HD double hc_tanh(double a) { return std::tanh(a); }
#endif

// Which dynamic parts a call has, and the layout of the per-token arrays.
struct HcShape {
  int n;           // streams
  int K;           // dynamic columns: (n + 1) * has_alpha + has_beta
  bool has_alpha;  // dynamic_alpha given
  bool has_beta;   // dynamic_beta given
  bool use_tanh;
  bool layer_norm;  // LayerNorm (else RMSNorm)

  HCEXT_HD int beta_col() const { return has_alpha ? n + 1 : 0; }
  // A token's partial row: [gA n*(n+1) | gB n | g_sa | g_sb | S K]
  HCEXT_HD int partial_gb() const { return n * (n + 1); }
  HCEXT_HD int partial_gsa() const { return n * (n + 1) + n; }
  HCEXT_HD int partial_s() const { return n * (n + 1) + n + 2; }
  HCEXT_HD int partial_width() const { return partial_s() + K; }
};

// Parameter pointers (all contiguous, compute dtype S). Null: absent.
template <typename S>
struct HcParams {
  const S* static_alpha;  // [n, n+1]
  const S* static_beta;   // [n]
  const S* alpha_scale;   // scalar; null = 1
  const S* beta_scale;    // scalar; null = 1
  const S* col_bias;      // [K] = norm_bias @ W; null = 0 (no norm bias)
  const S* col_sum;       // [K] = Σ_c Wt_ck; used by LayerNorm only
};

template <typename S>
HCEXT_HD S hc_act(S z, bool use_tanh) {
  return use_tanh ? hc_tanh(z) : z;
}

template <typename S>
HCEXT_HD S hc_z(const HcParams<S>& p, const S* q, S rstd, int k) {
  return rstd * q[k] + (p.col_bias ? p.col_bias[k] : S(0));
}

// Finishes one stream from its shifted sums (see the top of the file): writes
// stats = (mean, rstd), turns p [K] into the centred q in place (the saved proj),
// then writes the stream's coefficients into the token's rows h_pre [n], h_post [n],
// h_res [n*n] (h_res[dst * n + i]: column i of the token's H_res).
template <typename S>
HCEXT_HD void hc_stream_forward(const HcShape& s, const HcParams<S>& p, int i, S C, S norm_eps, S shift, S s1, S s2,
                                S* q, S* stats, S* h_pre, S* h_post, S* h_res) {
  S mean = S(0), rstd, dmean = S(0);
  if (s.layer_norm) {
    dmean = s1 / C;
    S var = s2 / C - dmean * dmean;
    var = var > S(0) ? var : S(0);
    mean = shift + dmean;
    rstd = S(1) / vsqrt(var + norm_eps);
    for (int k = 0; k < s.K; ++k) q[k] = q[k] - dmean * p.col_sum[k];
  } else {
    rstd = S(1) / vsqrt(s2 / C + norm_eps);
  }
  stats[0] = mean;
  stats[1] = rstd;

  const int n = s.n;
  const S sa = p.alpha_scale ? *p.alpha_scale : S(1);
  for (int k = 0; k <= n; ++k) {
    S a = p.static_alpha[i * (n + 1) + k];
    if (s.has_alpha) a = sa * hc_act(hc_z(p, q, rstd, k), s.use_tanh) + a;
    if (k == 0) {
      h_pre[i] = a;
    } else {
      h_res[(k - 1) * n + i] = a;  // H_res[dst, src] = α[src, 1 + dst]
    }
  }
  S b = p.static_beta[i];
  if (s.has_beta) {
    const S sb = p.beta_scale ? *p.beta_scale : S(1);
    b = sb * hc_act(hc_z(p, q, rstd, s.beta_col()), s.use_tanh) + b;
  }
  h_post[i] = b;
}

// dL/dz of one dynamic column, given dL/d(coefficient) g; accumulates the scale's
// gradient and S_k, and returns e_k = rstd dz_k.
template <typename S>
HCEXT_HD S hc_column_backward(const HcShape& s, const HcParams<S>& p, const S* q, S rstd, int k, S g, S scale,
                              S& g_scale, S* S_sum) {
  const S a = hc_act(hc_z(p, q, rstd, k), s.use_tanh);
  g_scale = g_scale + g * a;
  S dz = g * scale;
  if (s.use_tanh) dz = dz * (S(1) - a * a);
  S_sum[k] = S_sum[k] + dz;
  return rstd * dz;
}

// Backward of one stream.
//   in:  q [K] and stats = (mean, rstd) of the stream (saved by the forward); the token's
//        incoming gradients g_pre [n], g_post [n], g_res [n*n] (null: zero)
//   out: e [K], xcoef = b_i (see the top of the file); the stream's share of the token's
//        partial row (which the caller zeroes before the first stream)
template <typename S>
HCEXT_HD void hc_stream_backward(const HcShape& s, const HcParams<S>& p, int i, S C, const S* q, const S* stats,
                                 const S* g_pre, const S* g_post, const S* g_res, S* e, S* xcoef, S* partial) {
  const int n = s.n;
  const S rstd = stats[1];
  S* gA = partial;
  S* gB = partial + s.partial_gb();
  S& g_sa = partial[s.partial_gsa()];
  S& g_sb = partial[s.partial_gsa() + 1];
  S* S_sum = partial + s.partial_s();
  for (int k = 0; k <= n; ++k) {
    const S g = k == 0 ? (g_pre ? g_pre[i] : S(0)) : (g_res ? g_res[(k - 1) * n + i] : S(0));
    gA[i * (n + 1) + k] = g;
    if (s.has_alpha) {
      const S sa = p.alpha_scale ? *p.alpha_scale : S(1);
      e[k] = hc_column_backward(s, p, q, rstd, k, g, sa, g_sa, S_sum);
    }
  }
  const S g = g_post ? g_post[i] : S(0);
  gB[i] = g;
  if (s.has_beta) {
    const S sb = p.beta_scale ? *p.beta_scale : S(1);
    const int k = s.beta_col();
    e[k] = hc_column_backward(s, p, q, rstd, k, g, sb, g_sb, S_sum);
  }
  S sum_eq = S(0);
  for (int k = 0; k < s.K; ++k) sum_eq = sum_eq + e[k] * q[k];
  *xcoef = -rstd * rstd * sum_eq / C;
}

// Backward of one token: every stream in order, into the token's rows
// q [n*K], stats [n*2], e [n*K], xcoef [n], partial [partial_width()].
template <typename S>
HCEXT_HD void hc_token_backward(const HcShape& s, const HcParams<S>& p, S C, const S* q, const S* stats,
                                const S* g_pre, const S* g_post, const S* g_res, S* e, S* xcoef, S* partial) {
  const int width = s.partial_width();
  for (int k = 0; k < width; ++k) partial[k] = S(0);
  for (int i = 0; i < s.n; ++i) {
    hc_stream_backward(s, p, i, C, q + i * s.K, stats + 2 * i, g_pre, g_post, g_res, e + i * s.K, xcoef + i,
                       partial);
  }
}

}  // namespace hcext
