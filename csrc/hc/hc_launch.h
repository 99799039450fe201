#pragma once
// Launch declarations of the HC coefficient CUDA kernels (hc/hc_kernels.cu, which includes
// no torch header). The CUDA backend (hc/hc_cuda.cpp) calls these. Each returns the
// launch's cudaError_t. T: float or double (compute dtype); x and dx are [tokens, n, C]
// contiguous in the dtype `xtype` names (fp64 only with T = double). Per-stream math and
// notation: hcext/hc.h. Kernels get the shape and parameter pointers (HcShape, HcParams:
// plain structs) by value. Deterministic: no atomics.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/stream_dtype.h"
#include "hcext/hc.h"  // HcShape, HcParams

namespace hcext::cuda {

// One block per token, one warp per stream: shifted sums and the K projections with
// wt_t [K, C], then hc_stream_forward. -> proj [tokens, n, K], stats [tokens, n, 2],
// h_pre / h_post [tokens, n], h_res [tokens, n, n].
template <typename T>
cudaError_t hc_forward(const void* x, StreamDtype xtype, const T* wt_t, HcShape shape, HcParams<T> params,
                       int64_t tokens, int64_t C, T norm_eps, T* proj, T* stats, T* h_pre, T* h_post, T* h_res,
                       cudaStream_t stream);

// One thread per token: hc_token_backward. g_* may be null (zero).
// -> e [tokens, n, K], xcoef [tokens, n], partial [tokens, shape.partial_width()].
template <typename T>
cudaError_t hc_epilogue_backward(HcShape shape, HcParams<T> params, int64_t tokens, int64_t C, const T* proj,
                                 const T* stats, const T* g_pre, const T* g_post, const T* g_res, T* e, T* xcoef,
                                 T* partial, cudaStream_t stream);

// Token chunks of the Ĝ reduction: a function of the problem size only.
int64_t hc_grad_chunks(int64_t tokens, int64_t C, int K);

// G [C, K] = Σ_tokens Σ_i (x_ic - mean_i) e_ik: per-chunk partials [chunks, C, K] (workspace,
// chunks = hc_grad_chunks(...)), then summed in chunk order.
template <typename T>
cudaError_t hc_centered_grad(const void* x, StreamDtype xtype, const T* e, const T* stats, int n, int K,
                             int64_t tokens, int64_t C, T* workspace, T* G, cudaStream_t stream);

// dx = Wc e + xcoef (x - mean), written in x's dtype; wc_t [K, C] (see hcext/hc.h).
template <typename T>
cudaError_t hc_grad_x(const void* x, StreamDtype xtype, const T* wc_t, const T* e, const T* xcoef, const T* stats,
                      void* dx, int n, int K, int64_t tokens, int64_t C, cudaStream_t stream);

}  // namespace hcext::cuda
