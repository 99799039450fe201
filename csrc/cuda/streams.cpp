// CUDA implementation of hcext::stream_aggregate, hcext::stream_mix_expand and their
// backward ops. This file does the checks, allocation, device guard and current stream.
// The kernels are in streams_kernels.cu.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <type_traits>

#include "cuda/x_type.h"
#include "launchers.h"
#include "streams_args.h"

namespace hcext {
namespace {

// The tensor's data as T (null for an undefined or skipped [0] output).
template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<T*>(t.data_ptr()) : nullptr;
}

void finish_coef_grad(CoefGrad& g, const StreamsCoef& c, int64_t tokens, int64_t K, cudaStream_t stream) {
  if (!g.partial.defined() || !c.shared) return;
  if (g.out.scalar_type() == at::kDouble) {
    const cudaError_t err =
        cuda::sum_over_tokens<double>(ptr<double>(g.partial), ptr<double>(g.out), tokens, K, stream);
    C10_CUDA_CHECK(err);
  } else {
    const cudaError_t err = cuda::sum_over_tokens<float>(ptr<float>(g.partial), ptr<float>(g.out), tokens, K, stream);
    C10_CUDA_CHECK(err);
  }
}

at::Tensor stream_aggregate_cuda(const at::Tensor& x_in, const at::Tensor& h_pre_in) {
  const char* op = "hcext::stream_aggregate";
  const StreamsProblem p = check_streams_x(x_in, op);
  const StreamsCoef h = check_streams_coef(h_pre_in, "h_pre", 1, x_in, p, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty(streams_aggregate_shape(p), p.x.options());
  if (p.tokens == 0 || p.C == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::dispatch_stream_dtype(p.x.scalar_type(), [&](auto t_tag, auto s_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    const cudaError_t err = cuda::stream_aggregate_forward<T, S>(ptr<T>(p.x), ptr<S>(h.h), h.token_stride,
                                                                 ptr<T>(y), p.tokens, p.n, p.C, stream);
    C10_CUDA_CHECK(err);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> stream_aggregate_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                  const at::Tensor& h_pre_in,
                                                                  std::array<bool, 2> output_mask) {
  const char* op = "hcext::stream_aggregate_backward";
  const StreamsProblem p = check_streams_x(x_in, op);
  const StreamsCoef h = check_streams_coef(h_pre_in, "h_pre", 1, x_in, p, op);
  const at::Tensor gy = check_streams_grad(grad_in, streams_aggregate_shape(p), x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor grad_x = output_mask[0] ? at::empty(x_in.sizes(), p.x.options()) : at::empty({0}, p.x.options());
  CoefGrad gh = make_coef_grad(output_mask[1], h, p.tokens, p.n);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (p.tokens == 0) {
    if (gh.partial.defined()) gh.out.zero_();  // a shared coefficient's gradient is 0
    return {grad_x, gh.out};
  }
  cuda::dispatch_stream_dtype(p.x.scalar_type(), [&](auto t_tag, auto s_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    const cudaError_t err = cuda::stream_aggregate_backward<T, S>(
        ptr<T>(gy), ptr<T>(p.x), ptr<S>(h.h), h.token_stride, ptr<T>(grad_x), ptr<S>(gh.partial), p.tokens, p.n, p.C,
        stream);
    C10_CUDA_CHECK(err);
  });
  finish_coef_grad(gh, h, p.tokens, p.n, stream);
  return {grad_x, gh.out};
}

at::Tensor stream_mix_expand_cuda(const at::Tensor& f_in, const at::Tensor& x_in, const at::Tensor& h_post_in,
                                  const at::Tensor& h_res_in) {
  const char* op = "hcext::stream_mix_expand";
  const StreamsProblem p = check_streams_x(x_in, op);
  const at::Tensor f = check_streams_f(f_in, x_in, p, op);
  const StreamsCoef hp = check_streams_coef(h_post_in, "h_post", 1, x_in, p, op);
  const StreamsCoef hr = check_streams_coef(h_res_in, "h_res", 2, x_in, p, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor out = at::empty(x_in.sizes(), p.x.options());
  if (p.tokens == 0 || p.C == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::dispatch_stream_dtype(p.x.scalar_type(), [&](auto t_tag, auto s_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    const cudaError_t err = cuda::stream_mix_expand_forward<T, S>(ptr<T>(f), ptr<T>(p.x), ptr<S>(hp.h),
                                                                  hp.token_stride, ptr<S>(hr.h), hr.token_stride,
                                                                  ptr<T>(out), p.tokens, p.n, p.C, stream);
    C10_CUDA_CHECK(err);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_mix_expand_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& f_in, const at::Tensor& x_in, const at::Tensor& h_post_in,
    const at::Tensor& h_res_in, std::array<bool, 4> output_mask) {
  const char* op = "hcext::stream_mix_expand_backward";
  const StreamsProblem p = check_streams_x(x_in, op);
  const at::Tensor f = check_streams_f(f_in, x_in, p, op);
  const StreamsCoef hp = check_streams_coef(h_post_in, "h_post", 1, x_in, p, op);
  const StreamsCoef hr = check_streams_coef(h_res_in, "h_res", 2, x_in, p, op);
  const at::Tensor g = check_streams_grad(grad_in, x_in.sizes(), x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto xo = p.x.options();
  at::Tensor grad_f = output_mask[0] ? at::empty(f_in.sizes(), xo) : at::empty({0}, xo);
  at::Tensor grad_x = output_mask[1] ? at::empty(x_in.sizes(), xo) : at::empty({0}, xo);
  const int64_t nn = int64_t(p.n) * p.n;
  CoefGrad ghp = make_coef_grad(output_mask[2], hp, p.tokens, p.n);
  CoefGrad ghr = make_coef_grad(output_mask[3], hr, p.tokens, nn);
  if (p.tokens == 0) {
    if (ghp.partial.defined()) ghp.out.zero_();
    if (ghr.partial.defined()) ghr.out.zero_();
    return {grad_f, grad_x, ghp.out, ghr.out};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::dispatch_stream_dtype(p.x.scalar_type(), [&](auto t_tag, auto s_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    const cudaError_t err = cuda::stream_mix_expand_backward<T, S>(
        ptr<T>(g), ptr<T>(f), ptr<T>(p.x), ptr<S>(hp.h), hp.token_stride, ptr<S>(hr.h), hr.token_stride,
        ptr<T>(grad_f), ptr<T>(grad_x), ptr<S>(ghp.partial), ptr<S>(ghr.partial), p.tokens, p.n, p.C, stream);
    C10_CUDA_CHECK(err);
  });
  finish_coef_grad(ghp, hp, p.tokens, p.n, stream);
  finish_coef_grad(ghr, hr, p.tokens, nn, stream);
  return {grad_f, grad_x, ghp.out, ghr.out};
}

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CUDA, m) {
  m.impl("stream_aggregate", &stream_aggregate_cuda);
  m.impl("stream_aggregate_backward", &stream_aggregate_backward_cuda);
  m.impl("stream_mix_expand", &stream_mix_expand_cuda);
  m.impl("stream_mix_expand_backward", &stream_mix_expand_backward_cuda);
}

}  // namespace hcext
