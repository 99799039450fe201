#pragma once
// Launch declarations of the stream CUDA kernels (streams/streams_kernels.cu, which includes
// no torch header). The CUDA backend (streams/streams_cuda.h) calls these. Each returns the
// launch's cudaError_t.
//
// T is the stream dtype: float, double, __nv_bfloat16 or __half; S is the coefficient
// dtype: double for double, else float. x, grad_x, out and the mix's grad are contiguous
// [tokens, n, C]; y, f, grad_f and the aggregate's grad are contiguous [tokens, C]. A
// coefficient is read at h + token * stride: stride = n (h_pre, h_post) or n * n (h_res)
// per token, 0 if shared. Null output pointers are skipped. Coefficient gradients are
// written per token, as [tokens, n] / [tokens, n, n] rows (for a shared coefficient, sum
// them with sum_over_tokens).

#include <cuda_runtime_api.h>

#include <cstdint>

namespace hcext::cuda {

template <typename T, typename S>
cudaError_t stream_aggregate_forward(const T* x, const S* h_pre, int64_t h_stride, T* y, int64_t tokens, int n,
                                     int64_t C, cudaStream_t stream);

template <typename T, typename S>
cudaError_t stream_aggregate_backward(const T* grad, const T* x, const S* h_pre, int64_t h_stride, T* grad_x,
                                      S* grad_h_pre_rows, int64_t tokens, int n, int64_t C, cudaStream_t stream);

template <typename T, typename S>
cudaError_t stream_mix_expand_forward(const T* f, const T* x, const S* h_post, int64_t hp_stride, const S* h_res,
                                      int64_t hr_stride, T* out, int64_t tokens, int n, int64_t C,
                                      cudaStream_t stream);

template <typename T, typename S>
cudaError_t stream_mix_expand_backward(const T* grad, const T* f, const T* x, const S* h_post, int64_t hp_stride,
                                       const S* h_res, int64_t hr_stride, T* grad_f, T* grad_x, S* grad_h_post_rows,
                                       S* grad_h_res_rows, int64_t tokens, int n, int64_t C, cudaStream_t stream);

// out[k] = sum_t partials[t * K + k] in a fixed order (deterministic); K <= 2^31 - 1.
template <typename S>
cudaError_t sum_over_tokens(const S* partials, S* out, int64_t tokens, int64_t K, cudaStream_t stream);

}  // namespace hcext::cuda
