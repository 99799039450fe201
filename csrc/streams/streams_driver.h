#pragma once
// The device-independent sequence of the streams family, shared by the CPU and CUDA
// backends: checks, allocation, dtype dispatch, and the fixed-order sum of a shared
// coefficient's gradient. The mHC driver composes these functions directly (never
// through the dispatcher).
//
// A Backend (CpuStreamsBackend in streams_cpu.h, CudaStreamsBackend in streams_cuda.h)
// supplies the passes over memory, on contiguous rows (see streams_checks.h):
//   explicit Backend(const at::Tensor& x)                      device guard, stream
//   static dispatch_dtype(dtype, fn)                           fn(T{}, S{}): the backend's
//                                                              stream type, the compute type
//   aggregate_forward<T, S>(x, h, h_stride, y, tokens, n, C)
//   aggregate_backward<T, S>(gy, x, h, h_stride, grad_x, gh_rows, tokens, n, C)
//   mix_forward<T, S>(f, x, hp, hp_stride, hr, hr_stride, out, tokens, n, C)
//   mix_backward<T, S>(g, f, x, hp, hp_stride, hr, hr_stride, grad_f, grad_x, ghp_rows, ghr_rows, tokens, n, C)
//   sum_over_tokens<S>(partials, out, tokens, K)               fixed order: deterministic
// Null output pointers mean "not requested". A coefficient's token stride is 0 when it is
// shared by every token.

#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <ATen/ops/empty.h>

#include <array>
#include <tuple>

#include "common/checks.h"
#include "streams/streams_checks.h"

namespace hcext {

// A shared coefficient's gradient: the per-token rows summed over tokens in a fixed order.
template <class Backend>
void finish_coef_grad(Backend& backend, CoefGrad& g, const StreamsCoef& c, int64_t tokens, int64_t K) {
  if (!g.partial.defined() || !c.shared) return;
  if (tokens == 0) {
    g.out.zero_();
    return;
  }
  dispatch_compute(g.out.scalar_type(), [&](auto zero) {
    using S = decltype(zero);
    backend.template sum_over_tokens<S>(g.partial.data_ptr<S>(), g.out.data_ptr<S>(), tokens, K);
  });
}

// y = Σ_i h_pre[i] x_i  -> [..., C]
template <class Backend>
at::Tensor stream_aggregate_impl(const at::Tensor& x_in, const at::Tensor& h_pre_in) {
  const char* op = "hcext::stream_aggregate";
  const StreamsProblem p = check_streams_x(x_in, op);
  const StreamsCoef h = check_streams_coef(h_pre_in, "h_pre", 1, x_in, p, op);
  Backend backend(x_in);
  at::Tensor y = at::empty(streams_aggregate_shape(p), p.x.options());
  if (p.tokens == 0 || p.C == 0) return y;
  Backend::dispatch_dtype(p.x.scalar_type(), [&](auto t_tag, auto s_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    backend.template aggregate_forward<T, S>(data_or_null<const T>(p.x), data_or_null<const S>(h.h), h.token_stride,
                                             data_or_null<T>(y), p.tokens, p.n, p.C);
  });
  return y;
}

// -> (grad_x, grad_h_pre); output_mask: x, h_pre.
template <class Backend>
std::tuple<at::Tensor, at::Tensor> stream_aggregate_backward_impl(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                  const at::Tensor& h_pre_in,
                                                                  std::array<bool, 2> output_mask) {
  const char* op = "hcext::stream_aggregate_backward";
  const StreamsProblem p = check_streams_x(x_in, op);
  const StreamsCoef h = check_streams_coef(h_pre_in, "h_pre", 1, x_in, p, op);
  const at::Tensor gy = check_streams_grad(grad_in, streams_aggregate_shape(p), x_in, op);
  Backend backend(x_in);
  at::Tensor grad_x = output_mask[0] ? at::empty(x_in.sizes(), p.x.options()) : at::empty({0}, p.x.options());
  CoefGrad gh = make_coef_grad(output_mask[1], h, p.tokens, p.n);
  if (p.tokens > 0) {
    Backend::dispatch_dtype(p.x.scalar_type(), [&](auto t_tag, auto s_tag) {
      using T = decltype(t_tag);
      using S = decltype(s_tag);
      backend.template aggregate_backward<T, S>(data_or_null<const T>(gy), data_or_null<const T>(p.x),
                                                data_or_null<const S>(h.h), h.token_stride, data_or_null<T>(grad_x),
                                                gh.rows<S>(), p.tokens, p.n, p.C);
    });
  }
  finish_coef_grad(backend, gh, h, p.tokens, p.n);
  return {grad_x, gh.out};
}

// x' = H_res x + h_post ⊗ f  -> [..., n, C]
template <class Backend>
at::Tensor stream_mix_expand_impl(const at::Tensor& f_in, const at::Tensor& x_in, const at::Tensor& h_post_in,
                                  const at::Tensor& h_res_in) {
  const char* op = "hcext::stream_mix_expand";
  const StreamsProblem p = check_streams_x(x_in, op);
  check_streams_f(f_in, x_in, p, op);
  const at::Tensor f = f_in.contiguous();
  const StreamsCoef hp = check_streams_coef(h_post_in, "h_post", 1, x_in, p, op);
  const StreamsCoef hr = check_streams_coef(h_res_in, "h_res", 2, x_in, p, op);
  Backend backend(x_in);
  at::Tensor out = at::empty(x_in.sizes(), p.x.options());
  if (p.tokens == 0 || p.C == 0) return out;
  Backend::dispatch_dtype(p.x.scalar_type(), [&](auto t_tag, auto s_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    backend.template mix_forward<T, S>(data_or_null<const T>(f), data_or_null<const T>(p.x),
                                       data_or_null<const S>(hp.h), hp.token_stride, data_or_null<const S>(hr.h),
                                       hr.token_stride, data_or_null<T>(out), p.tokens, p.n, p.C);
  });
  return out;
}

// The mix backward's outputs (output_mask: grad_f, grad_x, grad_h_post, grad_h_res; one not
// requested is an empty [0] tensor), for stream_mix_expand_backward and for the mHC boundary,
// whose coefficient pass runs the mix's backward itself (mhc_driver.h).
struct MixGrads {
  at::Tensor grad_f, grad_x;
  CoefGrad grad_h_post, grad_h_res;

  MixGrads(const StreamsProblem& p, const at::Tensor& f, const at::Tensor& x, const StreamsCoef& hp,
           const StreamsCoef& hr, std::array<bool, 4> output_mask) {
    const auto xo = p.x.options();
    grad_f = output_mask[0] ? at::empty(f.sizes(), xo) : at::empty({0}, xo);
    grad_x = output_mask[1] ? at::empty(x.sizes(), xo) : at::empty({0}, xo);
    grad_h_post = make_coef_grad(output_mask[2], hp, p.tokens, p.n);
    grad_h_res = make_coef_grad(output_mask[3], hr, p.tokens, int64_t(p.n) * p.n);
  }
  // The shared coefficients' sums over tokens, once the per-token rows are written; -> (grad_f,
  // grad_x, grad_h_post, grad_h_res).
  template <class Backend>
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish(Backend& backend, const StreamsProblem& p,
                                                                    const StreamsCoef& hp, const StreamsCoef& hr) {
    finish_coef_grad(backend, grad_h_post, hp, p.tokens, p.n);
    finish_coef_grad(backend, grad_h_res, hr, p.tokens, int64_t(p.n) * p.n);
    return {grad_f, grad_x, grad_h_post.out, grad_h_res.out};
  }
};

// -> (grad_f, grad_x, grad_h_post, grad_h_res); output_mask in that order.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_mix_expand_backward_impl(
    const at::Tensor& grad_in, const at::Tensor& f_in, const at::Tensor& x_in, const at::Tensor& h_post_in,
    const at::Tensor& h_res_in, std::array<bool, 4> output_mask) {
  const char* op = "hcext::stream_mix_expand_backward";
  const StreamsProblem p = check_streams_x(x_in, op);
  check_streams_f(f_in, x_in, p, op);
  const at::Tensor f = f_in.contiguous();
  const StreamsCoef hp = check_streams_coef(h_post_in, "h_post", 1, x_in, p, op);
  const StreamsCoef hr = check_streams_coef(h_res_in, "h_res", 2, x_in, p, op);
  const at::Tensor g = check_streams_grad(grad_in, x_in.sizes(), x_in, op);
  Backend backend(x_in);
  MixGrads out(p, f_in, x_in, hp, hr, output_mask);
  if (p.tokens > 0) {
    Backend::dispatch_dtype(p.x.scalar_type(), [&](auto t_tag, auto s_tag) {
      using T = decltype(t_tag);
      using S = decltype(s_tag);
      backend.template mix_backward<T, S>(data_or_null<const T>(g), data_or_null<const T>(f),
                                          data_or_null<const T>(p.x), data_or_null<const S>(hp.h), hp.token_stride,
                                          data_or_null<const S>(hr.h), hr.token_stride, data_or_null<T>(out.grad_f),
                                          data_or_null<T>(out.grad_x), out.grad_h_post.rows<S>(),
                                          out.grad_h_res.rows<S>(), p.tokens, p.n, p.C);
    });
  }
  return out.finish(backend, p, hp, hr);
}

// The mix of hcext::mhc_post_pre where it is a pass of its own (the mHC CUDA backend for n > 6, on
// checked inputs):
// out = stream_mix_expand(f, x, h_post, h_res), into a contiguous tensor of x's shape and dtype.
template <class Backend>
void stream_mix_into(const StreamsProblem& p, const at::Tensor& f, const StreamsCoef& hp, const StreamsCoef& hr,
                     at::Tensor& out) {
  if (p.tokens == 0) return;
  Backend backend(p.x);
  Backend::dispatch_dtype(p.x.scalar_type(), [&](auto t_tag, auto s_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    backend.template mix_forward<T, S>(data_or_null<const T>(f), data_or_null<const T>(p.x),
                                       data_or_null<const S>(hp.h), hp.token_stride, data_or_null<const S>(hr.h),
                                       hr.token_stride, data_or_null<T>(out), p.tokens, p.n, p.C);
  });
}

// The family's kernels on one backend: called from the backend's TORCH_LIBRARY_IMPL, so the
// op list is written once for every backend.
template <class Backend>
void register_streams_kernels(torch::Library& m) {
  HCEXT_IMPL(stream_aggregate) HCEXT_IMPL(stream_aggregate_backward)
  HCEXT_IMPL(stream_mix_expand) HCEXT_IMPL(stream_mix_expand_backward)
}

}  // namespace hcext
