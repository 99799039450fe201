#pragma once
// Per-token coefficient math of mHC (mHC Eq. 7-9 with the reordered RMSNorm of
// Eq. 14-15), forward and backward: the ONE implementation that the CPU kernels
// (csrc/mhc/mhc_cpu.cpp) and the CUDA kernels (csrc/mhc/mhc_kernels.cu) both call.
// hcext/reference.py::mhc_coeffs is the readable spec.
//
// Per token, with x̃ the flattened streams [n*C] and D = n*n + 2n:
//   proj = x̃ @ phi                        [D]   (a GEMM, done by the caller: at::mm / cuBLAS)
//   rstd = 1 / sqrt(sum(x̃²) / (n*C) + norm_eps)
//   ℓ_k  = alpha[part(k)] * proj_k * rstd + bias_k      part: [pre n | post n | res n*n]
//   h_pre  = sigmoid(ℓ_pre) + pre_eps
//   h_post = post_mult * sigmoid(ℓ_post)
//   h_res  = sinkhorn(ℓ_res as n x n)       (hcext/sinkhorn.h)
//
// Backward: given dL/dh_pre, dL/dh_post, dL/dh_res it produces dℓ (= the bias gradient
// contribution of the token), dproj = dℓ * alpha * rstd (what the two backward GEMMs
// consume), the token's contributions to dalpha, and drstd = sum(dℓ * alpha * proj); the
// caller turns drstd into dx̃ += drstd * (-rstd³ / (n*C)) * x̃.

#include "hcext/macros.h"
#include "hcext/sinkhorn.h"

namespace hcext {

constexpr int kMhcMaxN = kSinkhornMaxN;

HCEXT_HD constexpr int mhc_coeff_width(int n) { return n * n + 2 * n; }

template <typename S>
HCEXT_HD S mhc_rstd(S sum_squares, S count, S norm_eps) {
  return S(1) / vsqrt(sum_squares / count + norm_eps);
}

template <typename V, typename S>
HCEXT_HD V mhc_sigmoid(const V& l) {
  return S(1) / (S(1) + vexp(S(0) - l));
}

// h_pre[i] from the token's proj[i] (shared by the forward epilogue and the backward's
// recomputation of the layer input's coefficients).
template <typename V, typename S>
HCEXT_HD V mhc_h_pre(const V& proj_i, const V& rstd, const S* alpha, S bias_i, S pre_eps) {
  return mhc_sigmoid<V, S>(proj_i * rstd * alpha[0] + bias_i) + pre_eps;
}

// Writes ℓ_res (the Sinkhorn logits, n*n) into L.
template <int kN, typename V, typename S>
HCEXT_HD void mhc_res_logits(V* L, const V* proj, const V& rstd, const S* alpha, const S* bias, int n_rt) {
  const int n = kN > 0 ? kN : n_rt;
  HCEXT_UNROLL
  for (int k = 0; k < n * n; ++k) L[k] = proj[2 * n + k] * rstd * alpha[2] + bias[2 * n + k];
}

// Forward epilogue for one token (h_res is also the Sinkhorn's working storage).
template <int kN, typename V, typename S>
HCEXT_HD void mhc_coeffs_epilogue(const V* proj, const V& rstd, const S* alpha, const S* bias, int n_rt, int iters,
                                  S sinkhorn_eps, S pre_eps, S post_mult, V* h_pre, V* h_post, V* h_res) {
  const int n = kN > 0 ? kN : n_rt;
  HCEXT_UNROLL
  for (int i = 0; i < n; ++i) {
    h_pre[i] = mhc_h_pre(proj[i], rstd, alpha, bias[i], pre_eps);
    h_post[i] = mhc_sigmoid<V, S>(proj[n + i] * rstd * alpha[1] + bias[n + i]) * post_mult;
  }
  mhc_res_logits<kN>(h_res, proj, rstd, alpha, bias, n_rt);
  SinkhornNoHistory none;
  sinkhorn_forward<kN>(h_res, n_rt, iters, sinkhorn_eps, none);
}

// Backward epilogue for one token.
//   in:  proj [D], rstd, g_pre [n], g_post [n], g_res [n*n] (overwritten: scratch)
//   out: dl [D] (dL/dℓ), dproj [D], dalpha [3] (this token's share), drstd
//   scratch: P [n*n]; hist: Sinkhorn denominators (see sinkhorn.h)
template <int kN, typename V, typename S, typename Hist>
HCEXT_HD void mhc_coeffs_epilogue_backward(const V* proj, const V& rstd, const S* alpha, const S* bias, int n_rt,
                                           int iters, S sinkhorn_eps, S post_mult, const V* g_pre, const V* g_post,
                                           V* g_res, V* P, Hist& hist, V* dl, V* dproj, V* dalpha, V& drstd) {
  const int n = kN > 0 ? kN : n_rt;
  HCEXT_UNROLL
  for (int i = 0; i < n; ++i) {
    const V s_pre = mhc_sigmoid<V, S>(proj[i] * rstd * alpha[0] + bias[i]);
    const V s_post = mhc_sigmoid<V, S>(proj[n + i] * rstd * alpha[1] + bias[n + i]);
    dl[i] = g_pre[i] * s_pre * (S(1) - s_pre);
    dl[n + i] = g_post[i] * post_mult * s_post * (S(1) - s_post);
  }
  // Sinkhorn backward, recomputing its iterates from ℓ_res.
  auto load_logits = [&](V* L) { mhc_res_logits<kN>(L, proj, rstd, alpha, bias, n_rt); };
  sinkhorn_backward<kN>(P, g_res, n_rt, iters, sinkhorn_eps, hist, load_logits);
  HCEXT_UNROLL
  for (int k = 0; k < n * n; ++k) dl[2 * n + k] = g_res[k];

  V da[3] = {V(S(0)), V(S(0)), V(S(0))};
  V dr = V(S(0));
  const int D = mhc_coeff_width(n);
  HCEXT_UNROLL
  for (int k = 0; k < D; ++k) {
    const int part = k < n ? 0 : (k < 2 * n ? 1 : 2);
    const V dl_proj = dl[k] * proj[k];
    da[part] = da[part] + dl_proj * rstd;
    dr = dr + dl_proj * alpha[part];
    dproj[k] = dl[k] * rstd * alpha[part];
  }
  dalpha[0] = da[0];
  dalpha[1] = da[1];
  dalpha[2] = da[2];
  drstd = dr;
}

// d rstd / d x̃_k = -rstd³ * x̃_k / (n*C): the per-token factor multiplying x̃_k.
template <typename S>
HCEXT_HD S mhc_rstd_grad_factor(S drstd, S rstd, S count) {
  return -drstd * rstd * rstd * rstd / count;
}

}  // namespace hcext
