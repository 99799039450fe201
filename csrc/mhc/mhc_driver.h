#pragma once
// The device-independent sequence of the mHC family, shared by the CPU and CUDA backends.
// A Backend (CpuMhcBackend in mhc_cpu.cpp, CudaMhcBackend in mhc_cuda.cpp) supplies the
// passes over memory (CPU loops or CUDA kernels) and names the streams backend it composes
// (Backend::Streams), whose passes the layer input and the boundary's mix use through
// streams_driver.h (never through the dispatcher).
//
// The projection x̃ @ phi is never a GEMM on a copy of x here: the backends read x's rows in
// their own dtype (fp32, bf16, fp16, fp64) in passes that also produce what the GEMM's
// neighbours needed a pass of their own for (the RMS statistic; grad_x's other terms).
// (The CUDA backend keeps a GEMM formulation inside itself for n > 6, see mhc_cuda.cpp.)
//
// Backend interface (T: the compute type; x_rows: x as contiguous [tokens, n*C], its dtype):
//   explicit Backend(const at::Tensor& x)              device guard, stream
//   project<T>(x_rows, phi, proj, rstd, d, norm_eps, layer_input, alpha, bias, pre_eps, mix, collapse)
//                                                      proj [tokens, D] = x̃ @ phi and rstd [tokens];
//     when mix is not null (the fused boundary), x_rows is x_next, which project first writes as
//     the boundary's mix: in the projection pass itself (the CPU; CUDA for n <= 6: never read back
//     for the projection), or in a mix pass of its own (CUDA, n > 6);
//     layer_input (nullable, only where projection_aggregates): also writes the layer input
//     Σ h_pre[i] x_i (h_pre from proj, alpha, bias, pre_eps) from the pass's rows (x read once);
//     collapse (MhcCollapse, nullable, only where projection_collapses): also writes the shifted
//     collapse's layer input Σ pre_mix[i] x_i from the pass's rows
//   static projection_aggregates(d, x)                 whether project takes layer_input for x (the
//                                                      CPU: always; CUDA: where a tile's rows fit in
//                                                      the device's shared memory)
//   static projection_collapses(d)                     whether project takes a collapse
//   epilogue<T>(proj, rstd, alpha, bias, h_pre, h_post, h_res, d, s)
//   layer_input_grad_x<T>(x_rows, gy, g_pre, out, d)   out = g_pre + sum_c gy * x_i
//   epilogue_backward<T>(proj, rstd, alpha, bias, g_pre, g_post, g_res, dl, dproj, dalpha, drstd, d, s)
//   grad_x_phi<T>(x_rows, phi, dproj, proj, rstd, drstd, gy, mix, mix_stride, alpha, bias,
//                 pre_eps, extra, dx, grad_phi, d, gy_rows, mix_grad)
//                                                      grad_x and grad_phi, one pass over x; where
//     grad_pass_fuses(d), also the shifted collapse's row sums Σ_c gy x_i (gy_rows, not null) and the
//     fused boundary's mix backward on x_next's gradient (mix_grad, not null: dx is not written)
//   static grad_pass_fuses(d)                          whether the backward's pass over x runs the
//     fused boundary's mix backward (and, without kFusedBackwardPass, the shifted row sums)
//   with kFusedBackwardPass, instead of the three above: backward_pass<T>(MhcBackwardPass<T>, d, s),
//     the same three steps block by block of tokens, so that a block's rows of x are read from
//     memory once (the row sums) and again from cache (grad_x); for the fused boundary it also
//     runs the mix's backward on each block of x_next's gradient as it is computed (never stored)
//
// Forward (mhc_coeffs_fwd):
//   proj = x̃ @ phi, rstd = 1/sqrt(mean(x̃²) + norm_eps)                        backend.project
//   h_pre, h_post, h_res = epilogue(proj, rstd)   (hcext/mhc.h)                backend.epilogue
// Backward (mhc_backward), from the saved proj and rstd:
//   g_pre += sum_c gy * x_i            (only when the layer input has a gradient: mhc_pre)
//                                                                               backend.layer_input_grad_x
//   dl, dproj, dalpha, drstd = epilogue_backward(...)                           backend.epilogue_backward
//   grad_x = dproj @ phiᵀ + rstd's share + h_pre ⊗ gy (+ extra), summed in the compute dtype and
//            rounded once; grad_phi = x̃ᵀ @ dproj (fixed-order partial sums)   backend.grad_x_phi
//   (the three in one backend.backward_pass where the backend has kFusedBackwardPass: the CPU)

#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/no_autocast.h"
#include "mhc/mhc_checks.h"
#include "streams/streams_driver.h"

namespace hcext {

struct MhcScalars {
  int iters;
  double norm_eps, sinkhorn_eps, pre_eps, post_mult;
};

using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The fused boundary's mix (checked, contiguous), for a backend whose projection pass writes it.
struct MhcBoundaryMix {
  const at::Tensor& f;
  const StreamsProblem& p;  // x
  const StreamsCoef& h_post;
  const StreamsCoef& h_res;
};

// The shifted collapse's layer input, layer_input = Σ_i pre_mix[i] x_i [tokens, C] in x's dtype
// (pre_mix checked, compute dtype), for a backend whose projection pass writes it from the rows it
// reads (Backend::projection_collapses): the same values as stream_aggregate(x, pre_mix).
struct MhcCollapse {
  const StreamsCoef& pre_mix;
  at::Tensor& layer_input;
};

// The fused boundary's mix backward (grad_f, grad_x, h_post's and h_res's per-token rows), for
// a backend whose backward pass over x_next runs it on x_next's gradient (grad_pass_fuses: the
// CPU's backward_pass per block of tokens, CUDA's grad_x pass for n <= 6).
// f and x contiguous; the outputs are stream_mix_expand_backward's (MixGrads: one not requested
// is an empty tensor, CoefGrad without rows).
struct MhcBoundaryMixGrad : MixGrads {
  const at::Tensor& f;
  const StreamsProblem& p;  // x
  const StreamsCoef& h_post;
  const StreamsCoef& h_res;

  MhcBoundaryMixGrad(const at::Tensor& f_, const StreamsProblem& p_, const StreamsCoef& hp, const StreamsCoef& hr,
                     std::array<bool, 4> output_mask)
      : MixGrads(p_, f_, p_.x, hp, hr, output_mask), f(f_), p(p_), h_post(hp), h_res(hr) {}
};

// The backward's tensors for a backend with kFusedBackwardPass (see the interface above);
// pointers in T, the compute type, null when absent.
template <typename T>
struct MhcBackwardPass {
  const at::Tensor& x_rows;      // [tokens, n*C], x's dtype
  const at::Tensor& phi;         // [n*C, D], contiguous
  const at::Tensor& extra_rows;  // undefined, or another consumer's gradient of x [tokens, n*C]
  const T *proj, *rstd, *alpha, *bias;
  const T* gy;             // the layer input's gradient [tokens, C]
  const T* g_pre;          // the incoming gradient of h_pre (shifted: of next_pre_mix) [tokens, n]
  const T *g_post, *g_res;
  // When gy: row_sums[t, i] = Σ_c gy[t, c] x[t, i, c], plus g_pre when not shifted (it is then
  // the epilogue's g_pre); shifted: pre_mix's gradient rows, and the epilogue reads g_pre.
  T* row_sums;
  bool shifted;
  const T* pre_mix;        // shifted: the layer input's coefficient, token t at t * pre_mix_stride
  int64_t pre_mix_stride;
  T pre_eps;
  T *dl, *dproj, *dalpha, *drstd;  // the epilogue's backward, per token
  at::Tensor& grad_x;      // [tokens, n*C] (left undefined with mix_grad)
  at::Tensor& grad_phi;    // set to [n*C, D]
  MhcBoundaryMixGrad* mix_grad;  // the fused boundary: the mix's backward of x_next's gradient
};

// The coefficient outputs of a forward, allocated for x's leading dims (compute dtype).
struct MhcCoeffs {
  at::Tensor h_pre, h_post, h_res;  // [..., n], [..., n], [..., n, n]
  at::Tensor proj, rstd;            // [..., D], [...]: what the backward needs

  MhcCoeffs(const at::Tensor& x, const MhcDims& d) {
    const auto opts = x.options().dtype(d.compute);
    const int64_t n = d.n;
    h_pre = at::empty(lead_shape(x, {n}), opts);
    h_post = at::empty(lead_shape(x, {n}), opts);
    h_res = at::empty(lead_shape(x, {n, n}), opts);
    proj = at::empty(lead_shape(x, {d.D}), opts);
    rstd = at::empty(lead_shape(x, {}), opts);
  }

  // proj and rstd from one pass over x's rows (contiguous, x's dtype), then the per-token
  // epilogue.
  // mix: the boundary's mix, written into x_rows by project before it is projected (see the
  // interface above).
  // layer_input (Backend::projection_aggregates only): the layer input Σ h_pre[i] x_i [tokens, C]
  // in x's dtype, from the projection pass's rows.
  // collapse (Backend::projection_collapses only): the shifted collapse's layer input, from the
  // same pass.
  template <class Backend>
  void compute(Backend& backend, const at::Tensor& x_rows, const at::Tensor& phi, const at::Tensor& alpha,
               const at::Tensor& bias, const MhcDims& d, const MhcScalars& s, at::Tensor* layer_input = nullptr,
               const MhcBoundaryMix* mix = nullptr, const MhcCollapse* collapse = nullptr) {
    const at::Tensor ph = phi.contiguous();
    at::Tensor proj_rows = proj.view({d.tokens, d.D}), rstd_rows = rstd.view({d.tokens});
    const at::Tensor a = alpha.contiguous(), b = bias.contiguous();
    dispatch_compute(d.compute, [&](auto zero) {
      using T = decltype(zero);
      backend.template project<T>(x_rows, ph, proj_rows, rstd_rows, d, static_cast<T>(s.norm_eps), layer_input,
                                  a.data_ptr<T>(), b.data_ptr<T>(), static_cast<T>(s.pre_eps), mix, collapse);
    });
    epilogue(backend, alpha, bias, d, s);
  }

  template <class Backend>
  void epilogue(Backend& backend, const at::Tensor& alpha, const at::Tensor& bias, const MhcDims& d,
                const MhcScalars& s) {
    const at::Tensor a = alpha.contiguous(), b = bias.contiguous();
    dispatch_compute(d.compute, [&](auto zero) {
      using T = decltype(zero);
      backend.template epilogue<T>(proj.data_ptr<T>(), rstd.data_ptr<T>(), a.data_ptr<T>(), b.data_ptr<T>(),
                                   h_pre.data_ptr<T>(), h_post.data_ptr<T>(), h_res.data_ptr<T>(), d, s);
    });
  }
};

// -> (h_pre [..., n], h_post [..., n], h_res [..., n, n], proj [..., D], rstd [...]).
// layer_input (Backend::projection_aggregates only): set to the layer input [..., C] (x's dtype),
// written by the projection pass.
template <class Backend>
Tensor5 mhc_coeffs_fwd_core(const char* op, const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                            const at::Tensor& bias, int64_t iters, double norm_eps, double sinkhorn_eps,
                            double pre_eps, double post_mult, at::Tensor* layer_input = nullptr,
                            const MhcCollapse* collapse = nullptr) {
  const NoAutocast no_autocast;
  const MhcDims d = check_mhc_args(x, phi, alpha, bias, iters, sinkhorn_eps, op);
  check_norm_eps(norm_eps, op);
  check_mhc_scalars(pre_eps, post_mult, op);
  Backend backend(x);
  const MhcScalars s{static_cast<int>(iters), norm_eps, sinkhorn_eps, pre_eps, post_mult};
  MhcCoeffs c(x, d);
  if (layer_input) {
    *layer_input = at::empty(lead_shape(x, {d.C}), x.options().memory_format(at::MemoryFormat::Contiguous));
  }
  if (d.tokens > 0) {
    c.compute(backend, x.contiguous().view({d.tokens, d.n * d.C}), phi, alpha, bias, d, s, layer_input, nullptr,
              collapse);
  }
  return {c.h_pre, c.h_post, c.h_res, c.proj, c.rstd};
}

template <class Backend>
Tensor5 mhc_coeffs_fwd_impl(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                            const at::Tensor& bias, int64_t iters, double norm_eps, double sinkhorn_eps,
                            double pre_eps, double post_mult) {
  return mhc_coeffs_fwd_core<Backend>("hcext::mhc_coeffs", x, phi, alpha, bias, iters, norm_eps, sinkhorn_eps,
                                      pre_eps, post_mult);
}

// mhc_pre = the coefficients, then the layer input by the streams backend's aggregate (the
// same kernels users call as hcext::stream_aggregate) — or, where Backend::projection_aggregates
// (the CPU; CUDA for rows that fit in shared memory), inside the projection pass from the rows
// it has just read (x read once). h_pre is not kept: the backward recomputes it from proj.
// -> (layer_input [..., C], h_post, h_res, proj, rstd)
template <class Backend>
Tensor5 mhc_pre_fwd_impl(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                         int64_t iters, double norm_eps, double sinkhorn_eps, double pre_eps, double post_mult) {
  const MhcDims d = check_mhc_args(x, phi, alpha, bias, iters, sinkhorn_eps, "hcext::mhc_coeffs");
  if (!Backend::projection_aggregates(d, x)) {
    auto [h_pre, h_post, h_res, proj, rstd] =
        mhc_coeffs_fwd_impl<Backend>(x, phi, alpha, bias, iters, norm_eps, sinkhorn_eps, pre_eps, post_mult);
    return {stream_aggregate_impl<typename Backend::Streams>(x, h_pre), h_post, h_res, proj, rstd};
  } else {
    at::Tensor layer_input;
    auto [h_pre, h_post, h_res, proj, rstd] = mhc_coeffs_fwd_core<Backend>(
        "hcext::mhc_coeffs", x, phi, alpha, bias, iters, norm_eps, sinkhorn_eps, pre_eps, post_mult, &layer_input);
    return {layer_input, h_post, h_res, proj, rstd};
  }
}

// ---- DeepSeek-V4.1's shifted collapse (hcext::mhc_pre_shifted): the coefficients of x as
// above, but the layer input collapsed with the previous sublayer's h_pre (pre_mix; e_0 for
// the first sublayer) instead of x's own; x's h_pre is returned as next_pre_mix, for the
// next sublayer. pre_mix follows the streams family's coefficient rules (per token [..., n]
// or shared [n], compute dtype).

using Tensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor8 =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// -> (layer_input, h_post, h_res, next_pre_mix, proj, rstd)
template <class Backend>
Tensor6 mhc_pre_shifted_fwd_impl(const at::Tensor& x, const at::Tensor& pre_mix, const at::Tensor& phi,
                                 const at::Tensor& alpha, const at::Tensor& bias, int64_t iters, double norm_eps,
                                 double sinkhorn_eps, double pre_eps, double post_mult) {
  const char* op = "hcext::mhc_pre_shifted";
  // x and the parameters, then pre_mix, before any work (the fake kernel's order).
  const MhcDims d = check_mhc_args(x, phi, alpha, bias, iters, sinkhorn_eps, op);
  const StreamsCoef mix = check_streams_coef(pre_mix, "pre_mix", 1, x, check_streams_shape(x, op), op);
  if (!Backend::projection_collapses(d)) {
    auto [h_pre, h_post, h_res, proj, rstd] =
        mhc_coeffs_fwd_core<Backend>(op, x, phi, alpha, bias, iters, norm_eps, sinkhorn_eps, pre_eps, post_mult);
    return {stream_aggregate_impl<typename Backend::Streams>(x, pre_mix), h_post, h_res, h_pre, proj, rstd};
  }
  // The layer input from the projection pass's rows (x read once).
  at::Tensor layer_input = at::empty(lead_shape(x, {d.C}), x.options().memory_format(at::MemoryFormat::Contiguous));
  const MhcCollapse collapse{mix, layer_input};
  auto [h_pre, h_post, h_res, proj, rstd] = mhc_coeffs_fwd_core<Backend>(
      op, x, phi, alpha, bias, iters, norm_eps, sinkhorn_eps, pre_eps, post_mult, nullptr, &collapse);
  return {layer_input, h_post, h_res, h_pre, proj, rstd};
}

struct MhcGrads {
  at::Tensor x, phi, alpha, bias;
  at::Tensor pre_mix;  // shifted collapse only: pre_mix's shape (per token or shared)
};

// The gradients of the coefficients' inputs and of x. extra: undefined, or a gradient of x
// from another consumer (x's shape and dtype), added to grad_x in fp32 before the one
// rounding. pre_mix: null for the standard collapse (the layer input is Σ h_pre[i] x_i, so
// its gradient reaches h_pre), or the shifted collapse's pre_mix (the layer input is
// Σ pre_mix[i] x_i: its gradient reaches pre_mix instead, and grad_h_pre is the gradient of
// next_pre_mix).
template <class Backend>
MhcGrads mhc_backward_core(const char* op, const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                           const at::Tensor& bias, const at::Tensor& proj, const at::Tensor& rstd,
                           const std::optional<at::Tensor>& grad_layer_input,
                           const std::optional<at::Tensor>& grad_h_pre, const std::optional<at::Tensor>& grad_h_post,
                           const std::optional<at::Tensor>& grad_h_res, int64_t iters, double sinkhorn_eps,
                           double pre_eps, double post_mult, const at::Tensor& extra,
                           const StreamsCoef* pre_mix = nullptr, bool boundary = false,
                           MhcBoundaryMixGrad* mix_grad = nullptr) {
  const NoAutocast no_autocast;
  const MhcDims d = check_mhc_args(x, phi, alpha, bias, iters, sinkhorn_eps, op);
  check_mhc_scalars(pre_eps, post_mult, op);
  check_mhc_saved(d, x, proj, rstd, op);
  check_optional_grad(grad_layer_input, d.tokens * d.C, x, op, "grad_layer_input");
  check_optional_grad(grad_h_pre, d.tokens * d.n, x, op, pre_mix ? "grad_next_pre_mix" : "grad_h_pre");
  // The boundary ops' coefficient gradients are those of the next layer's outputs.
  check_optional_grad(grad_h_post, d.tokens * d.n, x, op, boundary ? "grad_h_post_next" : "grad_h_post");
  check_optional_grad(grad_h_res, d.tokens * d.n * d.n, x, op, boundary ? "grad_h_res_next" : "grad_h_res");
  Backend backend(x);
  const MhcScalars s{static_cast<int>(iters), 0.0, sinkhorn_eps, pre_eps, post_mult};
  const auto opts = x.options().dtype(d.compute);
  MhcGrads out;
  // pre_mix's gradient: per-token rows Σ_c gy[t, c] x[t, i, c] (summed over tokens in a
  // fixed order when pre_mix is shared); zero without a layer-input gradient.
  CoefGrad gmix;
  if (pre_mix) {
    gmix = make_coef_grad(true, *pre_mix, d.tokens, d.n);
    if (!has_value(grad_layer_input) || d.tokens == 0) gmix.out.zero_();
  }
  if (d.tokens == 0) {
    out.x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    out.phi = at::zeros_like(phi);
    out.alpha = at::zeros_like(alpha);
    out.bias = at::zeros_like(bias);
    out.pre_mix = gmix.out;
    return out;
  }
  const at::Tensor extra_rows = extra.defined() ? extra.reshape({d.tokens, d.n * d.C}).contiguous() : at::Tensor();
  const int64_t T_ = d.tokens, n = d.n, D = d.D;
  const at::Tensor xr = x.contiguous().view({T_, n * d.C});  // x's own rows, its dtype
  const at::Tensor P = proj.reshape({T_, D}).contiguous(), R = rstd.reshape({T_}).contiguous();
  const at::Tensor a = alpha.contiguous(), b = bias.contiguous();
  const at::Tensor gy = optional_rows(grad_layer_input, T_, d.C, d.compute);
  at::Tensor gpre = optional_rows(grad_h_pre, T_, n, d.compute);
  const at::Tensor gpost = optional_rows(grad_h_post, T_, n, d.compute);
  const at::Tensor gres = optional_rows(grad_h_res, T_, n * n, d.compute);
  at::Tensor dl = at::empty({T_, D}, opts), dproj = at::empty({T_, D}, opts);
  at::Tensor dalpha = at::empty({T_, 3}, opts), drstd = at::empty({T_}, opts);
  at::Tensor grad_phi, grad_x, row_sums_total;
  TORCH_INTERNAL_ASSERT(mix_grad == nullptr || Backend::grad_pass_fuses(d),
                        "this backend runs the boundary's mix backward in a pass of its own");
  dispatch_compute(d.compute, [&](auto zero) {
    using T = decltype(zero);
    if constexpr (Backend::kFusedBackwardPass) {
      T* row_sums = nullptr;
      if (gy.defined() && pre_mix) {
        row_sums = gmix.rows<T>();
      } else if (gy.defined()) {
        row_sums_total = at::empty({T_, n}, opts);
        row_sums = row_sums_total.data_ptr<T>();
      }
      if (!mix_grad) grad_x = at::empty({T_, d.n * d.C}, x.options());
      const at::Tensor ph = phi.contiguous();
      const MhcBackwardPass<T> pass{xr, ph, extra_rows, P.data_ptr<T>(), R.data_ptr<T>(), a.data_ptr<T>(),
                                    b.data_ptr<T>(), data_or_null<const T>(gy), data_or_null<const T>(gpre),
                                    data_or_null<const T>(gpost), data_or_null<const T>(gres), row_sums,
                                    pre_mix != nullptr, pre_mix ? pre_mix->h.data_ptr<T>() : nullptr,
                                    pre_mix ? pre_mix->token_stride : 0, static_cast<T>(pre_eps), dl.data_ptr<T>(),
                                    dproj.data_ptr<T>(), dalpha.data_ptr<T>(), drstd.data_ptr<T>(), grad_x, grad_phi,
                                    mix_grad};
      backend.template backward_pass<T>(pass, d, s);
    } else {
      auto layer_input_grad = [&](const T* g_pre, T* total) {
        backend.template layer_input_grad_x<T>(xr, gy.data_ptr<T>(), g_pre, total, d);
      };
      // The shifted collapse's row sums: in the grad_x pass where the backend can (they feed no
      // coefficient), else a pass of their own.
      const bool rows_in_pass = gy.defined() && pre_mix && Backend::grad_pass_fuses(d);
      if (gy.defined() && pre_mix) {
        if (!rows_in_pass) layer_input_grad(nullptr, gmix.rows<T>());
      } else if (gy.defined()) {
        at::Tensor total = at::empty({T_, n}, opts);
        layer_input_grad(data_or_null<const T>(gpre), total.data_ptr<T>());
        gpre = total;
      }
      backend.template epilogue_backward<T>(P.data_ptr<T>(), R.data_ptr<T>(), a.data_ptr<T>(), b.data_ptr<T>(),
                                            data_or_null<const T>(gpre), data_or_null<const T>(gpost),
                                            data_or_null<const T>(gres),
                                            dl.data_ptr<T>(), dproj.data_ptr<T>(), dalpha.data_ptr<T>(),
                                            drstd.data_ptr<T>(), d, s);
      // The layer input's coefficient: pre_mix's (shifted) or h_pre recomputed from proj (null).
      const T* mix = pre_mix && gy.defined() ? pre_mix->h.data_ptr<T>() : nullptr;
      if (!mix_grad) grad_x = at::empty({T_, d.n * d.C}, x.options());
      backend.template grad_x_phi<T>(xr, phi.contiguous(), dproj, P.data_ptr<T>(), R.data_ptr<T>(),
                                     drstd.data_ptr<T>(), data_or_null<const T>(gy), mix,
                                     pre_mix ? pre_mix->token_stride : 0, a.data_ptr<T>(), b.data_ptr<T>(), pre_eps,
                                     extra_rows, grad_x, grad_phi, d, rows_in_pass ? gmix.rows<T>() : nullptr,
                                     mix_grad);
    }
  });
  if (pre_mix && gy.defined()) {
    typename Backend::Streams streams(x);
    finish_coef_grad(streams, gmix, *pre_mix, T_, n);
  }
  if (grad_x.defined()) out.x = grad_x.view(x.sizes());
  out.phi = grad_phi;
  out.alpha = at::sum(dalpha, {0});
  out.bias = at::sum(dl, {0});
  out.pre_mix = gmix.out;
  return out;
}

template <class Backend>
Tensor4 mhc_backward_impl(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                          const at::Tensor& proj, const at::Tensor& rstd,
                          const std::optional<at::Tensor>& grad_layer_input,
                          const std::optional<at::Tensor>& grad_h_pre, const std::optional<at::Tensor>& grad_h_post,
                          const std::optional<at::Tensor>& grad_h_res, int64_t iters, double sinkhorn_eps,
                          double pre_eps, double post_mult) {
  const MhcGrads g =
      mhc_backward_core<Backend>("hcext::mhc_backward", x, phi, alpha, bias, proj, rstd, grad_layer_input, grad_h_pre,
                                 grad_h_post, grad_h_res, iters, sinkhorn_eps, pre_eps, post_mult, at::Tensor());
  return {g.x, g.phi, g.alpha, g.bias};
}

// -> (grad_x, grad_pre_mix, grad_phi, grad_alpha, grad_bias); grad_next_pre_mix is the
// gradient of next_pre_mix (x's h_pre).
template <class Backend>
Tensor5 mhc_shifted_backward_impl(const at::Tensor& x, const at::Tensor& pre_mix, const at::Tensor& phi,
                                  const at::Tensor& alpha, const at::Tensor& bias, const at::Tensor& proj,
                                  const at::Tensor& rstd, const std::optional<at::Tensor>& grad_layer_input,
                                  const std::optional<at::Tensor>& grad_next_pre_mix,
                                  const std::optional<at::Tensor>& grad_h_post,
                                  const std::optional<at::Tensor>& grad_h_res, int64_t iters, double sinkhorn_eps,
                                  double pre_eps, double post_mult) {
  const char* op = "hcext::mhc_shifted_backward";
  check_mhc_args(x, phi, alpha, bias, iters, sinkhorn_eps, op);
  const StreamsCoef mix = check_streams_coef(pre_mix, "pre_mix", 1, x, check_streams_shape(x, op), op);
  const MhcGrads g = mhc_backward_core<Backend>(op, x, phi, alpha, bias, proj, rstd, grad_layer_input,
                                                grad_next_pre_mix, grad_h_post, grad_h_res, iters, sinkhorn_eps,
                                                pre_eps, post_mult, at::Tensor(), &mix);
  return {g.x, g.pre_mix, g.phi, g.alpha, g.bias};
}

// ---- The fused layer boundary (hcext::mhc_post_pre).
//
// Forward: x_next = mix_expand(f, x, h_post, h_res) (the streams family's arithmetic), written
//   by the projection pass, which also computes proj and rstd of the stored x_next; epilogue ->
//   h_pre, h_post_next, h_res_next; layer_input = stream_aggregate(x_next, h_pre) (on the CPU,
//   from the same pass): the rest of mhc_pre, unchanged.
// Backward: grad of x_next = grad_x_next (from x_next's other consumers) + the coefficient
//   path's share, summed in fp32 and rounded once (mhc_backward_core's extra); then
//   stream_mix_expand_backward (the streams backend) — where Backend::grad_pass_fuses, inside the
//   coefficient path's pass over x_next, on that gradient as it is computed (MhcBoundaryMixGrad).

// -> (x_next, layer_input, h_post_next, h_res_next, next h_pre, proj, rstd). pre_mix: null
// (the layer input is collapsed with x_next's own h_pre) or the shifted collapse's pre_mix.
template <class Backend>
Tensor7 mhc_post_pre_fwd_core(const char* op, const at::Tensor& f, const at::Tensor& x, const at::Tensor& h_post,
                              const at::Tensor& h_res, const at::Tensor* pre_mix, const at::Tensor& phi,
                              const at::Tensor& alpha, const at::Tensor& bias, int64_t iters, double norm_eps,
                              double sinkhorn_eps, double pre_eps, double post_mult) {
  const NoAutocast no_autocast;
  const MhcDims d = check_mhc_args(x, phi, alpha, bias, iters, sinkhorn_eps, op);
  check_norm_eps(norm_eps, op);
  check_mhc_scalars(pre_eps, post_mult, op);
  const StreamsProblem p = check_streams_x(x, op);
  check_streams_f(f, x, p, op);
  const at::Tensor fc = f.contiguous();
  const StreamsCoef hp = check_streams_coef(h_post, "h_post", 1, x, p, op);
  const StreamsCoef hr = check_streams_coef(h_res, "h_res", 2, x, p, op);
  StreamsCoef pm;
  if (pre_mix) pm = check_streams_coef(*pre_mix, "pre_mix", 1, x, p, op);
  Backend backend(x);
  const MhcScalars s{static_cast<int>(iters), norm_eps, sinkhorn_eps, pre_eps, post_mult};
  using Streams = typename Backend::Streams;
  at::Tensor x_next = at::empty(x.sizes(), p.x.options());
  MhcCoeffs c(x, d);  // layer l+1's
  // The layer input inside the projection pass where the backend can: the collapse with x_next's
  // own h_pre where projection_aggregates, the shifted collapse where projection_collapses; else
  // aggregated in a pass of its own.
  const bool own_input = pre_mix == nullptr && Backend::projection_aggregates(d, x);
  const bool shifted_input = pre_mix != nullptr && Backend::projection_collapses(d);
  at::Tensor layer_input;
  if (own_input || shifted_input) layer_input = at::empty(lead_shape(x, {d.C}), p.x.options());
  if (d.tokens > 0) {
    const at::Tensor x_next_rows = x_next.view({d.tokens, d.n * d.C});
    // x_next is mixed, stored, and projected from cache in one pass (the CPU: each token's row;
    // CUDA, n <= 6: tiles of tokens x channels of every stream; n > 6: the mix, then the GEMM).
    const MhcBoundaryMix mix{fc, p, hp, hr};
    const MhcCollapse collapse{pm, layer_input};
    c.compute(backend, x_next_rows, phi, alpha, bias, d, s, own_input ? &layer_input : nullptr, &mix,
              shifted_input ? &collapse : nullptr);
  }
  if (!own_input && !shifted_input) {
    layer_input = stream_aggregate_impl<Streams>(x_next, pre_mix ? *pre_mix : c.h_pre);
  }
  return {x_next, layer_input, c.h_post, c.h_res, c.h_pre, c.proj, c.rstd};
}

// -> (x_next, layer_input, h_post_next, h_res_next, proj, rstd)
template <class Backend>
Tensor6 mhc_post_pre_fwd_impl(const at::Tensor& f, const at::Tensor& x, const at::Tensor& h_post,
                              const at::Tensor& h_res, const at::Tensor& phi, const at::Tensor& alpha,
                              const at::Tensor& bias, int64_t iters, double norm_eps, double sinkhorn_eps,
                              double pre_eps, double post_mult) {
  auto [x_next, layer_input, h_post_next, h_res_next, h_pre, proj, rstd] =
      mhc_post_pre_fwd_core<Backend>("hcext::mhc_post_pre", f, x, h_post, h_res, nullptr, phi, alpha, bias, iters,
                                     norm_eps, sinkhorn_eps, pre_eps, post_mult);
  return {x_next, layer_input, h_post_next, h_res_next, proj, rstd};
}

// The shifted collapse at the boundary (hcext::mhc_post_pre_shifted).
// -> (x_next, layer_input, h_post_next, h_res_next, next_pre_mix, proj, rstd)
template <class Backend>
Tensor7 mhc_post_pre_shifted_fwd_impl(const at::Tensor& f, const at::Tensor& x, const at::Tensor& h_post,
                                      const at::Tensor& h_res, const at::Tensor& pre_mix, const at::Tensor& phi,
                                      const at::Tensor& alpha, const at::Tensor& bias, int64_t iters, double norm_eps,
                                      double sinkhorn_eps, double pre_eps, double post_mult) {
  return mhc_post_pre_fwd_core<Backend>("hcext::mhc_post_pre_shifted", f, x, h_post, h_res, &pre_mix, phi, alpha,
                                        bias, iters, norm_eps, sinkhorn_eps, pre_eps, post_mult);
}

// The boundary's gradients: the coefficient path's (MhcGrads), then the mix's.
struct MhcPostPreGrads {
  at::Tensor f, x, h_post, h_res;
  MhcGrads next;  // x_next's coefficient path: phi, alpha, bias (and pre_mix when shifted)
};

// output_mask: f, x, h_post, h_res. pre_mix: null (standard collapse) or the shifted
// collapse's pre_mix, whose gradient is then computed, with grad_next_pre_mix the gradient of
// x_next's h_pre.
template <class Backend>
MhcPostPreGrads mhc_post_pre_backward_core(
    const char* op, const std::optional<at::Tensor>& grad_x_next, const std::optional<at::Tensor>& grad_layer_input,
    const std::optional<at::Tensor>& grad_h_post_next, const std::optional<at::Tensor>& grad_h_res_next,
    const std::optional<at::Tensor>& grad_next_pre_mix, const at::Tensor& f, const at::Tensor& x,
    const at::Tensor& h_post, const at::Tensor& h_res, const at::Tensor* pre_mix, const at::Tensor& x_next,
    const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias, const at::Tensor& proj,
    const at::Tensor& rstd, int64_t iters, double sinkhorn_eps, double pre_eps, double post_mult,
    std::array<bool, 4> output_mask) {
  const NoAutocast no_autocast;
  // Every input of layer l's merge first, in the forward's order (x, the parameters, f,
  // h_post, h_res, pre_mix), so that a bad one is named, under this op's name, before any work.
  const MhcDims d = check_mhc_args(x, phi, alpha, bias, iters, sinkhorn_eps, op);
  const StreamsProblem p = check_streams_shape(x, op);  // validation only: the mix backward copies
  check_streams_f(f, x, p, op);
  const StreamsCoef hp = check_streams_coef(h_post, "h_post", 1, x, p, op);
  const StreamsCoef hr = check_streams_coef(h_res, "h_res", 2, x, p, op);
  StreamsCoef mix;
  if (pre_mix) mix = check_streams_coef(*pre_mix, "pre_mix", 1, x, p, op);
  TORCH_CHECK(x_next.sizes() == x.sizes() && x_next.scalar_type() == x.scalar_type() && x_next.device() == x.device(),
              op, ": expected x_next with x's shape ", x.sizes(), ", dtype ", x.scalar_type(), " and device ",
              x.device(), ", got ", x_next.sizes(), " ", x_next.scalar_type(), " on ", x_next.device());
  if (has_value(grad_x_next)) {
    TORCH_CHECK(grad_x_next->sizes() == x.sizes() && grad_x_next->scalar_type() == x.scalar_type() &&
                    grad_x_next->device() == x.device(),
                op, ": expected grad_x_next with x's shape ", x.sizes(), ", dtype ", x.scalar_type(), " and device ",
                x.device(), ", got ", grad_x_next->sizes(), " ", grad_x_next->scalar_type(), " on ",
                grad_x_next->device());
  }
  MhcPostPreGrads out;
  at::Tensor g_next;
  const bool coefficient_path = has_value(grad_layer_input) || has_value(grad_h_post_next) ||
                                has_value(grad_h_res_next) || (pre_mix && has_value(grad_next_pre_mix));
  if (coefficient_path && Backend::grad_pass_fuses(d)) {
    // The mix's backward inside the coefficient path's pass over x_next, on x_next's gradient as
    // it is computed: that gradient is never stored. The arithmetic and roundings of
    // stream_mix_expand_backward below (the CPU: its very kernel, the same bits; CUDA: its per-
    // channel values, the sums over channels in another fixed order).
    StreamsProblem px = p;
    px.x = x.contiguous();
    const at::Tensor fc = f.contiguous();
    MhcBoundaryMixGrad mg(fc, px, hp, hr, output_mask);
    out.next = mhc_backward_core<Backend>(op, x_next, phi, alpha, bias, proj, rstd, grad_layer_input,
                                          pre_mix ? grad_next_pre_mix : std::nullopt, grad_h_post_next,
                                          grad_h_res_next, iters, sinkhorn_eps, pre_eps, post_mult,
                                          has_value(grad_x_next) ? *grad_x_next : at::Tensor(), pre_mix ? &mix : nullptr,
                                          /*boundary=*/true, &mg);
    typename Backend::Streams streams(x);
    std::tie(out.f, out.x, out.h_post, out.h_res) = mg.finish(streams, px, hp, hr);
    return out;
  }
  if (coefficient_path) {
    out.next = mhc_backward_core<Backend>(op, x_next, phi, alpha, bias, proj, rstd, grad_layer_input,
                                          pre_mix ? grad_next_pre_mix : std::nullopt, grad_h_post_next,
                                          grad_h_res_next, iters, sinkhorn_eps, pre_eps, post_mult,
                                          has_value(grad_x_next) ? *grad_x_next : at::Tensor(), pre_mix ? &mix : nullptr,
                                          /*boundary=*/true);
    g_next = out.next.x;
  } else {
    g_next = has_value(grad_x_next) ? *grad_x_next : at::zeros_like(x);
    out.next.phi = at::zeros_like(phi);
    out.next.alpha = at::zeros_like(alpha);
    out.next.bias = at::zeros_like(bias);
    if (pre_mix) out.next.pre_mix = at::zeros(mix.h.sizes(), mix.h.options());
  }
  std::tie(out.f, out.x, out.h_post, out.h_res) = stream_mix_expand_backward_impl<typename Backend::Streams>(
      g_next.view(x.sizes()), f, x, h_post, h_res, output_mask);
  return out;
}

// -> (grad_f, grad_x, grad_h_post, grad_h_res, grad_phi, grad_alpha, grad_bias)
template <class Backend>
Tensor7 mhc_post_pre_backward_impl(const std::optional<at::Tensor>& grad_x_next,
                                   const std::optional<at::Tensor>& grad_layer_input,
                                   const std::optional<at::Tensor>& grad_h_post_next,
                                   const std::optional<at::Tensor>& grad_h_res_next, const at::Tensor& f,
                                   const at::Tensor& x, const at::Tensor& h_post, const at::Tensor& h_res,
                                   const at::Tensor& x_next, const at::Tensor& phi, const at::Tensor& alpha,
                                   const at::Tensor& bias, const at::Tensor& proj, const at::Tensor& rstd,
                                   int64_t iters, double sinkhorn_eps, double pre_eps, double post_mult,
                                   std::array<bool, 4> output_mask) {
  const MhcPostPreGrads g = mhc_post_pre_backward_core<Backend>(
      "hcext::mhc_post_pre_backward", grad_x_next, grad_layer_input, grad_h_post_next, grad_h_res_next, std::nullopt,
      f, x, h_post, h_res, nullptr, x_next, phi, alpha, bias, proj, rstd, iters, sinkhorn_eps, pre_eps, post_mult,
      output_mask);
  return {g.f, g.x, g.h_post, g.h_res, g.next.phi, g.next.alpha, g.next.bias};
}

// output_mask: f, x, h_post, h_res, pre_mix.
// -> (grad_f, grad_x, grad_h_post, grad_h_res, grad_pre_mix, grad_phi, grad_alpha, grad_bias)
template <class Backend>
Tensor8 mhc_post_pre_shifted_backward_impl(
    const std::optional<at::Tensor>& grad_x_next, const std::optional<at::Tensor>& grad_layer_input,
    const std::optional<at::Tensor>& grad_h_post_next, const std::optional<at::Tensor>& grad_h_res_next,
    const std::optional<at::Tensor>& grad_next_pre_mix, const at::Tensor& f, const at::Tensor& x,
    const at::Tensor& h_post, const at::Tensor& h_res, const at::Tensor& pre_mix, const at::Tensor& x_next,
    const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias, const at::Tensor& proj,
    const at::Tensor& rstd, int64_t iters, double sinkhorn_eps, double pre_eps, double post_mult,
    std::array<bool, 5> output_mask) {
  const MhcPostPreGrads g = mhc_post_pre_backward_core<Backend>(
      "hcext::mhc_post_pre_shifted_backward", grad_x_next, grad_layer_input, grad_h_post_next, grad_h_res_next,
      grad_next_pre_mix, f, x, h_post, h_res, &pre_mix, x_next, phi, alpha, bias, proj, rstd, iters, sinkhorn_eps,
      pre_eps, post_mult, {output_mask[0], output_mask[1], output_mask[2], output_mask[3]});
  const at::Tensor grad_pre_mix = output_mask[4] ? g.next.pre_mix : at::empty({0}, g.next.phi.options());
  return {g.f, g.x, g.h_post, g.h_res, grad_pre_mix, g.next.phi, g.next.alpha, g.next.bias};
}

// The family's kernels on one backend: called from the backend's TORCH_LIBRARY_IMPL, so the
// op list is written once for every backend.
template <class Backend>
void register_mhc_kernels(torch::Library& m) {
  HCEXT_IMPL(mhc_coeffs_fwd) HCEXT_IMPL(mhc_pre_fwd) HCEXT_IMPL(mhc_backward)
  HCEXT_IMPL(mhc_post_pre_fwd) HCEXT_IMPL(mhc_post_pre_backward)
  HCEXT_IMPL(mhc_pre_shifted_fwd) HCEXT_IMPL(mhc_shifted_backward)
  HCEXT_IMPL(mhc_post_pre_shifted_fwd) HCEXT_IMPL(mhc_post_pre_shifted_backward)
}

}  // namespace hcext
