#pragma once
// The device-independent sequence of the HC family (hcext::hc_coeffs_fwd,
// hcext::hc_coeffs_backward), shared by the CPU and CUDA backends. A Backend (CpuHcBackend
// in hc_cpu.cpp, CudaHcBackend in hc_cuda.cpp) supplies the passes over x (CPU loops or
// CUDA kernels); the parameter-sized
// preparations and finishing steps ([C, K] at most) are ATen ops on either device.
// Math and notation: csrc/include/hcext/hc.h.
//
// Forward:
//   static HC (no dynamic weights): the shared [n], [n], [n, n] coefficients, copied from
//     the static parameters (no per-token work; proj and stats come back empty)
//   dynamic: W = [dynamic_alpha | dynamic_beta], Wtᵀ = (w ⊙ W)ᵀ [K, C], col_bias, col_sum
//     one pass over x per stream: stats (mean, rstd), proj q [n, K], coefficients   backend.forward
// Backward (dynamic only; static HC's gradient is the incoming gradient itself, see hcext/ops/hc.py):
//   e, xcoef, per-token partial rows                                 backend.epilogue_backward
//   small sums = at::sum(partial rows over tokens)                   (fixed order: deterministic)
//   Ĝ = Σ_tokens (x - mean) ⊗ e   [C, K], fixed order                backend.centered_grad
//   grad_x = Wc e + xcoef (x - mean), in x's dtype                   backend.grad_x

#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/no_autocast.h"
#include "hc/hc_checks.h"

namespace hcext {

using HcTensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using HcTensor9 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor>;

// The parameter-sized tensors the passes read (kept alive for the pointers in HcParams).
struct HcWeights {
  at::Tensor W;         // [C, K] the given dynamic columns
  at::Tensor wt_t;      // [K, C] (w ⊙ W)ᵀ, contiguous
  at::Tensor col_bias;  // [K] norm_bias @ W, or undefined
  at::Tensor col_sum;   // [K] Σ_c Wt_ck (LayerNorm), or undefined
  at::Tensor static_alpha, static_beta, alpha_scale, beta_scale;

  template <typename T>
  HcParams<T> params() const {
    return HcParams<T>{static_alpha.data_ptr<T>(), static_beta.data_ptr<T>(), data_or_null<const T>(alpha_scale),
                       data_or_null<const T>(beta_scale),      data_or_null<const T>(col_bias),       data_or_null<const T>(col_sum)};
  }
};

inline HcWeights hc_prepare_weights(const HcDims& d, const at::Tensor& static_alpha, const at::Tensor& static_beta,
                                    const HcOptionalParams& o) {
  HcWeights w;
  std::vector<at::Tensor> cols;
  if (d.shape.has_alpha) cols.push_back(*o.dynamic_alpha);
  if (d.shape.has_beta) cols.push_back(o.dynamic_beta->unsqueeze(1));
  w.W = cols.size() == 1 ? cols[0].contiguous() : at::cat(cols, 1);
  const at::Tensor Wt = has_value(o.norm_weight) ? w.W.mul(o.norm_weight->unsqueeze(1)) : w.W;
  w.wt_t = Wt.t().contiguous();
  if (has_value(o.norm_bias)) w.col_bias = at::mv(w.W.t(), *o.norm_bias);
  if (d.shape.layer_norm) w.col_sum = at::sum(w.wt_t, {1});
  w.static_alpha = static_alpha.contiguous();
  w.static_beta = static_beta.contiguous();
  w.alpha_scale = d.shape.has_alpha ? contiguous_or_undefined(o.alpha_scale) : at::Tensor();
  w.beta_scale = d.shape.has_beta ? contiguous_or_undefined(o.beta_scale) : at::Tensor();
  return w;
}

// -> (h_pre, h_post, h_res, proj, stats)
template <class Backend>
HcTensor5 hc_coeffs_fwd_impl(const at::Tensor& x, const at::Tensor& static_alpha, const at::Tensor& static_beta,
                             const OptTensor& dynamic_alpha, const OptTensor& dynamic_beta,
                             const OptTensor& alpha_scale, const OptTensor& beta_scale, const OptTensor& norm_weight,
                             const OptTensor& norm_bias, std::string_view norm, double norm_eps, bool use_tanh) {
  const NoAutocast no_autocast;
  const char* op = "hcext::hc_coeffs";
  const HcOptionalParams o{dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight, norm_bias};
  HcDims d = check_hc_args(x, static_alpha, static_beta, o, norm, op);
  check_norm_eps(norm_eps, op);
  d.shape.use_tanh = use_tanh;
  const auto opts = x.options().dtype(d.compute);
  const int64_t n = d.n, K = d.shape.K;
  if (!d.dynamic()) {
    // Static HC: one set of coefficients shared by every token (copies, never views, of
    // the parameters; autograd's formula for this case lives in hcext/ops/hc.py).
    return {static_alpha.select(1, 0).clone(at::MemoryFormat::Contiguous),
            static_beta.clone(at::MemoryFormat::Contiguous),
            static_alpha.slice(1, 1).t().clone(at::MemoryFormat::Contiguous), at::empty({0}, opts),
            at::empty({0}, opts)};
  }
  at::Tensor h_pre = at::empty(lead_shape(x, {n}), opts);
  at::Tensor h_post = at::empty(lead_shape(x, {n}), opts);
  at::Tensor h_res = at::empty(lead_shape(x, {n, n}), opts);
  at::Tensor proj = at::empty(lead_shape(x, {n, K}), opts);
  at::Tensor stats = at::empty(lead_shape(x, {n, 2}), opts);
  if (d.tokens == 0) return {h_pre, h_post, h_res, proj, stats};
  Backend backend(x);
  const HcWeights w = hc_prepare_weights(d, static_alpha, static_beta, o);
  const at::Tensor xc = x.contiguous();
  dispatch_compute(d.compute, [&](auto zero) {
    using T = decltype(zero);
    backend.template forward<T>(xc, w.wt_t.data_ptr<T>(), d, w.params<T>(), T(norm_eps), proj.data_ptr<T>(),
                                stats.data_ptr<T>(), h_pre.data_ptr<T>(), h_post.data_ptr<T>(), h_res.data_ptr<T>());
  });
  return {h_pre, h_post, h_res, proj, stats};
}

// output_mask order: x, static_alpha, static_beta, dynamic_alpha, dynamic_beta, alpha_scale,
// beta_scale, norm_weight, norm_bias. A gradient not requested, or of an absent input, is an
// empty [0] tensor.
template <class Backend>
HcTensor9 hc_coeffs_backward_impl(const at::Tensor& x, const at::Tensor& static_alpha, const at::Tensor& static_beta,
                                  const OptTensor& dynamic_alpha, const OptTensor& dynamic_beta,
                                  const OptTensor& alpha_scale, const OptTensor& beta_scale,
                                  const OptTensor& norm_weight, const OptTensor& norm_bias, const at::Tensor& proj,
                                  const at::Tensor& stats, const OptTensor& grad_h_pre, const OptTensor& grad_h_post,
                                  const OptTensor& grad_h_res, std::string_view norm, bool use_tanh,
                                  std::array<bool, 9> mask) {
  const NoAutocast no_autocast;
  const char* op = "hcext::hc_coeffs_backward";
  const HcOptionalParams o{dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight, norm_bias};
  HcDims d = check_hc_args(x, static_alpha, static_beta, o, norm, op);
  d.shape.use_tanh = use_tanh;
  TORCH_CHECK(d.dynamic(), op,
              ": expected dynamic_alpha or dynamic_beta (static HC's gradient is the incoming gradient itself)");
  check_hc_saved(d, x, proj, stats, op);
  const int64_t T_ = d.tokens, n = d.n, C = d.C, K = d.shape.K;
  check_optional_grad(grad_h_pre, T_ * n, x, op, "grad_h_pre");
  check_optional_grad(grad_h_post, T_ * n, x, op, "grad_h_post");
  check_optional_grad(grad_h_res, T_ * n * n, x, op, "grad_h_res");

  const auto opts = x.options().dtype(d.compute);
  auto absent = [&]() { return at::empty({0}, opts); };  // one per output: outputs never alias
  const std::array<bool, 9> present = {true,          true,          true,         d.shape.has_alpha,
                                       d.shape.has_beta, has_value(alpha_scale), has_value(beta_scale), has_value(norm_weight),
                                       has_value(norm_bias)};
  auto wanted = [&](int k) { return mask[k] && present[k]; };

  const HcWeights w = hc_prepare_weights(d, static_alpha, static_beta, o);
  const int P = d.shape.partial_width();
  at::Tensor e = at::empty({T_, n, K}, opts), xcoef = at::empty({T_, n}, opts), partial = at::empty({T_, P}, opts);
  const at::Tensor q = proj.reshape({T_, n, K}).contiguous(), st = stats.reshape({T_, n, 2}).contiguous();
  const at::Tensor gp = optional_rows(grad_h_pre, T_, n, d.compute);
  const at::Tensor gq = optional_rows(grad_h_post, T_, n, d.compute);
  const at::Tensor gr = optional_rows(grad_h_res, T_, n * n, d.compute);
  const at::Tensor xc = x.contiguous();
  Backend backend(x);
  if (T_ > 0) {
    dispatch_compute(d.compute, [&](auto zero) {
      using T = decltype(zero);
      backend.template epilogue_backward<T>(d, w.params<T>(), q.data_ptr<T>(), st.data_ptr<T>(), data_or_null<const T>(gp),
                                            data_or_null<const T>(gq), data_or_null<const T>(gr), e.data_ptr<T>(), xcoef.data_ptr<T>(),
                                            partial.data_ptr<T>());
    });
  }
  // Token sums of the small per-token quantities (zeros for no token).
  const at::Tensor sums = at::sum(partial, {0});
  const at::Tensor S = sums.slice(0, d.shape.partial_s(), P);  // [K] Σ dz

  at::Tensor grad_x = absent(), grad_sa = absent(), grad_sb = absent(), grad_da = absent(), grad_db = absent();
  at::Tensor grad_as = absent(), grad_bs = absent(), grad_nw = absent(), grad_nb = absent();
  if (wanted(0)) {
    grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (T_ > 0) {
      // Wc: LayerNorm's centring of dL/dx̂ over c applied to the weights (see hcext/hc.h).
      const at::Tensor wc = d.shape.layer_norm ? w.wt_t.sub(w.col_sum.unsqueeze(1).div(double(C))).contiguous()
                                               : w.wt_t;
      dispatch_compute(d.compute, [&](auto zero) {
        using T = decltype(zero);
        backend.template grad_x<T>(xc, wc.data_ptr<T>(), e.data_ptr<T>(), xcoef.data_ptr<T>(), st.data_ptr<T>(),
                                   grad_x, d);
      });
    }
  }
  if (wanted(1)) grad_sa = sums.slice(0, 0, n * (n + 1)).reshape({n, n + 1}).clone();
  if (wanted(2)) grad_sb = sums.slice(0, d.shape.partial_gb(), d.shape.partial_gb() + n).clone();
  if (wanted(5)) grad_as = d.shape.has_alpha ? sums.select(0, d.shape.partial_gsa()).clone() : at::zeros({}, opts);
  if (wanted(6)) grad_bs = d.shape.has_beta ? sums.select(0, d.shape.partial_gsa() + 1).clone() : at::zeros({}, opts);
  if (wanted(3) || wanted(4) || wanted(7)) {
    // Ĝ [C, K] = Σ over tokens and streams of (x - mean) ⊗ e: the one reduction over x.
    at::Tensor G = at::empty({C, K}, opts);
    if (T_ > 0) {
      dispatch_compute(d.compute, [&](auto zero) {
        using T = decltype(zero);
        backend.template centered_grad<T>(xc, e.data_ptr<T>(), st.data_ptr<T>(), G, d);
      });
    } else {
      G.zero_();
    }
    at::Tensor gW = has_value(norm_weight) ? G.mul(norm_weight->unsqueeze(1)) : G;
    if (has_value(norm_bias)) gW = gW.add(norm_bias->unsqueeze(1).mul(S.unsqueeze(0)));
    if (wanted(3)) grad_da = gW.slice(1, 0, n + 1).contiguous();
    if (wanted(4)) grad_db = gW.select(1, d.shape.beta_col()).contiguous();
    if (wanted(7)) grad_nw = at::sum(w.W.mul(G), {1});
  }
  if (wanted(8)) grad_nb = at::mv(w.W, S);
  return {grad_x, grad_sa, grad_sb, grad_da, grad_db, grad_as, grad_bs, grad_nw, grad_nb};
}

// The family's kernels on one backend: called from the backend's TORCH_LIBRARY_IMPL, so the
// op list is written once for every backend.
template <class Backend>
void register_hc_kernels(torch::Library& m) {
  HCEXT_IMPL(hc_coeffs_fwd) HCEXT_IMPL(hc_coeffs_backward)
}

}  // namespace hcext
