#pragma once
// The device-independent sequence of the mHC coefficient ops, shared by the CPU and CUDA
// implementations. A Backend supplies the passes over memory (CPU loops or CUDA kernels);
// the GEMMs are at::mm on either device (cuBLAS on CUDA, with TF32 only when the user
// enabled torch.backends.cuda.matmul.allow_tf32).
//
// Forward (mhc_coeffs_fwd):
//   xf   = x as [tokens, n*C] in fp32, rstd = 1/sqrt(mean(xf²) + norm_eps)    backend.rows
//   proj = xf @ phi                                                             at::mm
//   h_pre, h_post, h_res = epilogue(proj, rstd)   (hcext/mhc.h)                backend.epilogue
// Backward (mhc_backward), from the saved proj and rstd:
//   g_pre += sum_c gy * x_i            (only when the layer input has a gradient: mhc_pre)
//   dl, dproj, dalpha, drstd = epilogue_backward(...)                           backend.epilogue_backward
//   grad_phi = xfᵀ @ dproj, dxp = dproj @ phiᵀ                                  at::mm
//   grad_x = dxp + rstd's share + h_pre ⊗ gy, in fp32, rounded once             backend.grad_x
//            (dx may alias dxp: the passes read element k before writing element k)

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>

#include <optional>
#include <tuple>
#include <vector>

#include <array>

#include "no_autocast.h"
#include "mhc_args.h"
#include "streams_args.h"

namespace hcext {

struct MhcScalars {
  int iters;
  double norm_eps, sinkhorn_eps, pre_eps, post_mult;
};

using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline std::vector<int64_t> lead_shape(const at::Tensor& x, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.insert(shape.end(), tail);
  return shape;
}

// x as fp32 (fp64) rows [tokens, n*C]; no copy for contiguous x in the compute dtype.
inline at::Tensor rows_in_compute_dtype(const at::Tensor& x, const MhcDims& d) {
  return x.reshape({d.tokens, d.n * d.C}).to(d.compute).contiguous();
}

inline at::Tensor optional_rows(const std::optional<at::Tensor>& g, int64_t rows, int64_t cols, at::ScalarType dtype) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  return g->reshape({rows, cols}).to(dtype).contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename Fn>
void dispatch_compute(at::ScalarType compute, Fn&& fn) {
  if (compute == at::kDouble) {
    fn(double{});
  } else {
    fn(float{});
  }
}

// hcext::stream_aggregate through the dispatcher (the kernels users call directly).
inline const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&)>& stream_aggregate_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hcext::stream_aggregate", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op;
}

// -> (h_pre [..., n], h_post [..., n], h_res [..., n, n], proj [..., D], rstd [...])
template <class Backend>
Tensor5 mhc_coeffs_fwd_impl(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                            const at::Tensor& bias, int64_t iters, double norm_eps, double sinkhorn_eps,
                            double pre_eps, double post_mult) {
  const NoAutocast no_autocast;
  const char* op = "hcext::mhc_coeffs";
  const MhcDims d = check_mhc_args(x, phi, alpha, bias, iters, sinkhorn_eps, op);
  check_mhc_norm_eps(norm_eps, op);
  check_mhc_scalars(pre_eps, post_mult, op);
  Backend backend(x);
  const MhcScalars s{static_cast<int>(iters), norm_eps, sinkhorn_eps, pre_eps, post_mult};
  const auto opts = x.options().dtype(d.compute);
  const int64_t n = d.n;
  at::Tensor h_pre = at::empty(lead_shape(x, {n}), opts);
  at::Tensor h_post = at::empty(lead_shape(x, {n}), opts);
  at::Tensor h_res = at::empty(lead_shape(x, {n, n}), opts);
  at::Tensor rstd = at::empty(lead_shape(x, {}), opts);
  if (d.tokens == 0) return {h_pre, h_post, h_res, at::empty(lead_shape(x, {d.D}), opts), rstd};
  const at::Tensor xf = backend.rows(x, rstd, d, norm_eps);
  at::Tensor proj = at::mm(xf, phi).reshape(lead_shape(x, {d.D}));
  const at::Tensor a = alpha.contiguous(), b = bias.contiguous();
  dispatch_compute(d.compute, [&](auto zero) {
    using T = decltype(zero);
    backend.template epilogue<T>(proj.data_ptr<T>(), rstd.data_ptr<T>(), a.data_ptr<T>(), b.data_ptr<T>(),
                                 h_pre.data_ptr<T>(), h_post.data_ptr<T>(), h_res.data_ptr<T>(), d, s);
  });
  return {h_pre, h_post, h_res, proj, rstd};
}

// mhc_pre = the coefficients, then the layer input through hcext::stream_aggregate (the
// same kernels users call directly). h_pre is not kept: the backward recomputes it from proj.
// -> (layer_input [..., C], h_post, h_res, proj, rstd)
template <class Backend>
Tensor5 mhc_pre_fwd_impl(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                         int64_t iters, double norm_eps, double sinkhorn_eps, double pre_eps, double post_mult) {
  auto [h_pre, h_post, h_res, proj, rstd] =
      mhc_coeffs_fwd_impl<Backend>(x, phi, alpha, bias, iters, norm_eps, sinkhorn_eps, pre_eps, post_mult);
  const auto& aggregate = stream_aggregate_op();
  return {aggregate.call(x, h_pre), h_post, h_res, proj, rstd};
}

// -> (grad_x, grad_phi, grad_alpha, grad_bias). extra: undefined, or a gradient of x from
// another consumer (x's shape and dtype), added to grad_x in fp32 before the one rounding.
template <class Backend>
Tensor4 mhc_backward_core(const char* op, const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                          const at::Tensor& bias, const at::Tensor& proj, const at::Tensor& rstd,
                          const std::optional<at::Tensor>& grad_layer_input,
                          const std::optional<at::Tensor>& grad_h_pre, const std::optional<at::Tensor>& grad_h_post,
                          const std::optional<at::Tensor>& grad_h_res, int64_t iters, double sinkhorn_eps,
                          double pre_eps, double post_mult, const at::Tensor& extra) {
  const NoAutocast no_autocast;
  const MhcDims d = check_mhc_args(x, phi, alpha, bias, iters, sinkhorn_eps, op);
  check_mhc_scalars(pre_eps, post_mult, op);
  check_mhc_saved(d, x, proj, rstd, op);
  check_mhc_grad(grad_layer_input, d.tokens * d.C, x, op, "grad_layer_input");
  check_mhc_grad(grad_h_pre, d.tokens * d.n, x, op, "grad_h_pre");
  check_mhc_grad(grad_h_post, d.tokens * d.n, x, op, "grad_h_post");
  check_mhc_grad(grad_h_res, d.tokens * d.n * d.n, x, op, "grad_h_res");
  Backend backend(x);
  const MhcScalars s{static_cast<int>(iters), 0.0, sinkhorn_eps, pre_eps, post_mult};
  const auto opts = x.options().dtype(d.compute);
  if (d.tokens == 0) {
    return {at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)), at::zeros_like(phi),
            at::zeros_like(alpha), at::zeros_like(bias)};
  }
  const at::Tensor extra_rows = extra.defined() ? extra.reshape({d.tokens, d.n * d.C}).contiguous() : at::Tensor();
  const int64_t T_ = d.tokens, n = d.n, D = d.D;
  const at::Tensor xf = rows_in_compute_dtype(x, d);
  const at::Tensor P = proj.reshape({T_, D}).contiguous(), R = rstd.reshape({T_}).contiguous();
  const at::Tensor a = alpha.contiguous(), b = bias.contiguous();
  const at::Tensor gy = optional_rows(grad_layer_input, T_, d.C, d.compute);
  at::Tensor gpre = optional_rows(grad_h_pre, T_, n, d.compute);
  const at::Tensor gpost = optional_rows(grad_h_post, T_, n, d.compute);
  const at::Tensor gres = optional_rows(grad_h_res, T_, n * n, d.compute);
  at::Tensor dl = at::empty({T_, D}, opts), dproj = at::empty({T_, D}, opts);
  at::Tensor dalpha = at::empty({T_, 3}, opts), drstd = at::empty({T_}, opts);
  at::Tensor grad_phi, grad_x;
  dispatch_compute(d.compute, [&](auto zero) {
    using T = decltype(zero);
    if (gy.defined()) {
      at::Tensor total = at::empty({T_, n}, opts);
      backend.template layer_input_grad<T>(xf.data_ptr<T>(), gy.data_ptr<T>(), ptr_or_null<T>(gpre),
                                           total.data_ptr<T>(), d);
      gpre = total;
    }
    backend.template epilogue_backward<T>(P.data_ptr<T>(), R.data_ptr<T>(), a.data_ptr<T>(), b.data_ptr<T>(),
                                          ptr_or_null<T>(gpre), ptr_or_null<T>(gpost), ptr_or_null<T>(gres),
                                          dl.data_ptr<T>(), dproj.data_ptr<T>(), dalpha.data_ptr<T>(),
                                          drstd.data_ptr<T>(), d, s);
    grad_phi = at::mm(xf.t(), dproj);
    const at::Tensor dxp = at::mm(dproj, phi.t());
    // When x is already in the compute dtype, grad_x overwrites dxp in place: one fresh
    // [tokens, n*C] buffer less (on the CPU a fresh buffer costs page faults).
    grad_x = x.scalar_type() == d.compute ? dxp : at::empty({T_, d.n * d.C}, x.options());
    backend.template grad_x<T>(xf.data_ptr<T>(), dxp.data_ptr<T>(), P.data_ptr<T>(), R.data_ptr<T>(),
                               drstd.data_ptr<T>(), ptr_or_null<T>(gy), a.data_ptr<T>(), b.data_ptr<T>(), pre_eps,
                               extra_rows, grad_x, d);
  });
  return {grad_x.view(x.sizes()), grad_phi, at::sum(dalpha, {0}), at::sum(dl, {0})};
}

template <class Backend>
Tensor4 mhc_backward_impl(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                          const at::Tensor& proj, const at::Tensor& rstd,
                          const std::optional<at::Tensor>& grad_layer_input,
                          const std::optional<at::Tensor>& grad_h_pre, const std::optional<at::Tensor>& grad_h_post,
                          const std::optional<at::Tensor>& grad_h_res, int64_t iters, double sinkhorn_eps,
                          double pre_eps, double post_mult) {
  return mhc_backward_core<Backend>("hcext::mhc_backward", x, phi, alpha, bias, proj, rstd, grad_layer_input,
                                    grad_h_pre, grad_h_post, grad_h_res, iters, sinkhorn_eps, pre_eps, post_mult,
                                    at::Tensor());
}

// ---- The fused layer boundary (hcext::mhc_post_pre).
//
// Forward: x_next = mix_expand(f, x, h_post, h_res) in the pass that also reduces the stored
//   x_next to rstd (and writes its fp32 copy for the GEMM when x is not fp32)  backend.mix_rows
//   proj = xf_next @ phi; epilogue -> h_pre, h_post_next, h_res_next; layer_input =
//   stream_aggregate(x_next, h_pre): the rest of mhc_pre, unchanged.
// Backward: grad of x_next = grad_x_next (from x_next's other consumers) + the coefficient
//   path's share, summed in fp32 and rounded once (mhc_backward_core's extra); then
//   stream_mix_expand_backward.

using Tensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// -> (x_next, layer_input, h_post_next, h_res_next, proj, rstd)
template <class Backend>
Tensor6 mhc_post_pre_fwd_impl(const at::Tensor& f, const at::Tensor& x, const at::Tensor& h_post,
                              const at::Tensor& h_res, const at::Tensor& phi, const at::Tensor& alpha,
                              const at::Tensor& bias, int64_t iters, double norm_eps, double sinkhorn_eps,
                              double pre_eps, double post_mult) {
  const NoAutocast no_autocast;
  const char* op = "hcext::mhc_post_pre";
  const MhcDims d = check_mhc_args(x, phi, alpha, bias, iters, sinkhorn_eps, op);
  check_mhc_norm_eps(norm_eps, op);
  check_mhc_scalars(pre_eps, post_mult, op);
  const StreamsProblem p = check_streams_x(x, op);
  const at::Tensor fc = check_streams_f(f, x, p, op);
  const StreamsCoef hp = check_streams_coef(h_post, "h_post", 1, x, p, op);
  const StreamsCoef hr = check_streams_coef(h_res, "h_res", 2, x, p, op);
  Backend backend(x);
  const MhcScalars s{static_cast<int>(iters), norm_eps, sinkhorn_eps, pre_eps, post_mult};
  const auto opts = x.options().dtype(d.compute);
  const int64_t n = d.n;
  at::Tensor x_next = at::empty(x.sizes(), p.x.options());
  at::Tensor h_pre = at::empty(lead_shape(x, {n}), opts);
  at::Tensor h_post_next = at::empty(lead_shape(x, {n}), opts);
  at::Tensor h_res_next = at::empty(lead_shape(x, {n, n}), opts);
  at::Tensor rstd = at::empty(lead_shape(x, {}), opts);
  const auto& aggregate = stream_aggregate_op();
  if (d.tokens == 0) {
    return {x_next, aggregate.call(x_next, h_pre), h_post_next, h_res_next, at::empty(lead_shape(x, {d.D}), opts),
            rstd};
  }
  const at::Tensor xf = backend.mix_rows(p, fc, hp, hr, x_next, rstd, d, norm_eps);
  at::Tensor proj = at::mm(xf, phi).reshape(lead_shape(x, {d.D}));
  const at::Tensor a = alpha.contiguous(), b = bias.contiguous();
  dispatch_compute(d.compute, [&](auto zero) {
    using T = decltype(zero);
    backend.template epilogue<T>(proj.data_ptr<T>(), rstd.data_ptr<T>(), a.data_ptr<T>(), b.data_ptr<T>(),
                                 h_pre.data_ptr<T>(), h_post_next.data_ptr<T>(), h_res_next.data_ptr<T>(), d, s);
  });
  return {x_next, aggregate.call(x_next, h_pre), h_post_next, h_res_next, proj, rstd};
}

inline bool has_value(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

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
  const NoAutocast no_autocast;
  const char* op = "hcext::mhc_post_pre_backward";
  TORCH_CHECK(x_next.sizes() == x.sizes() && x_next.scalar_type() == x.scalar_type(), op,
              ": expected x_next with x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
              x_next.sizes(), " ", x_next.scalar_type());
  if (has_value(grad_x_next)) {
    TORCH_CHECK(grad_x_next->sizes() == x.sizes() && grad_x_next->scalar_type() == x.scalar_type() &&
                    grad_x_next->device() == x.device(),
                op, ": expected grad_x_next with x's shape ", x.sizes(), ", dtype ", x.scalar_type(), " and device ",
                x.device(), ", got ", grad_x_next->sizes(), " ", grad_x_next->scalar_type(), " on ",
                grad_x_next->device());
  }
  at::Tensor g_next, grad_phi, grad_alpha, grad_bias;
  if (has_value(grad_layer_input) || has_value(grad_h_post_next) || has_value(grad_h_res_next)) {
    std::tie(g_next, grad_phi, grad_alpha, grad_bias) = mhc_backward_core<Backend>(
        op, x_next, phi, alpha, bias, proj, rstd, grad_layer_input, std::nullopt, grad_h_post_next, grad_h_res_next,
        iters, sinkhorn_eps, pre_eps, post_mult, has_value(grad_x_next) ? *grad_x_next : at::Tensor());
  } else {
    check_mhc_args(x_next, phi, alpha, bias, iters, sinkhorn_eps, op);
    g_next = has_value(grad_x_next) ? *grad_x_next : at::zeros_like(x);
    grad_phi = at::zeros_like(phi);
    grad_alpha = at::zeros_like(alpha);
    grad_bias = at::zeros_like(bias);
  }
  using MixBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      std::array<bool, 4>);
  static const auto mix_backward = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("hcext::stream_mix_expand_backward", "")
                                       .typed<MixBackward>();
  auto [grad_f, grad_x, grad_h_post, grad_h_res] =
      mix_backward.call(g_next.view(x.sizes()), f, x, h_post, h_res, output_mask);
  return {grad_f, grad_x, grad_h_post, grad_h_res, grad_phi, grad_alpha, grad_bias};
}

}  // namespace hcext
