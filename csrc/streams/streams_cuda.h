#pragma once
// The CUDA backend of the streams family (see streams_driver.h for the interface): each
// pass is one launch of streams_kernels.cu (declared in streams_launch.h) on the current
// stream, under a device guard; no host synchronisation. Declared here because the mHC
// CUDA backend composes it.

#include <ATen/core/Tensor.h>

#include "common/cuda_context.h"
#include "common/cuda_dtype.h"
#include "streams/streams_launch.h"

namespace hcext {

struct CudaStreamsBackend : CudaContext {
  using CudaContext::CudaContext;

  template <typename Fn>
  static void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
    cuda::dispatch_stream_dtype(dtype, fn);
  }

  template <typename T, typename S>
  void aggregate_forward(const T* x, const S* h, int64_t h_stride, T* y, int64_t tokens, int n, int64_t C) {
    HCEXT_CUDA_CHECK((cuda::stream_aggregate_forward<T, S>(x, h, h_stride, y, tokens, n, C, stream)));
  }
  template <typename T, typename S>
  void aggregate_backward(const T* gy, const T* x, const S* h, int64_t h_stride, T* grad_x, S* gh_rows,
                          int64_t tokens, int n, int64_t C) {
    HCEXT_CUDA_CHECK((cuda::stream_aggregate_backward<T, S>(gy, x, h, h_stride, grad_x, gh_rows, tokens, n, C, stream)));
  }
  template <typename T, typename S>
  void mix_forward(const T* f, const T* x, const S* hp, int64_t hp_stride, const S* hr, int64_t hr_stride, T* out,
                   int64_t tokens, int n, int64_t C) {
    HCEXT_CUDA_CHECK((cuda::stream_mix_expand_forward<T, S>(f, x, hp, hp_stride, hr, hr_stride, out, tokens, n, C, stream)));
  }
  template <typename T, typename S>
  void mix_backward(const T* g, const T* f, const T* x, const S* hp, int64_t hp_stride, const S* hr,
                    int64_t hr_stride, T* grad_f, T* grad_x, S* ghp_rows, S* ghr_rows, int64_t tokens, int n,
                    int64_t C) {
    HCEXT_CUDA_CHECK((cuda::stream_mix_expand_backward<T, S>(g, f, x, hp, hp_stride, hr, hr_stride, grad_f, grad_x,
                                                          ghp_rows, ghr_rows, tokens, n, C, stream)));
  }
  template <typename S>
  void sum_over_tokens(const S* partials, S* out, int64_t tokens, int64_t K) {
    HCEXT_CUDA_CHECK((cuda::sum_over_tokens<S>(partials, out, tokens, K, stream)));
  }
};

}  // namespace hcext
