#pragma once
// Launch declarations of the mHC coefficient CUDA kernels (mhc/mhc_kernels.cu, which
// includes no torch header). The CUDA backend (mhc/mhc_cuda.cpp) calls these. Each returns
// the launch's cudaError_t. T: float or double (the compute dtype); x in the dtype `xtype`
// names (passed as void*). Rows are [tokens, len = n*C] contiguous.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/stream_dtype.h"

namespace hcext::cuda {

// rstd[t] = 1/sqrt(sum(x[t]²)/len + norm_eps); xf (optional) receives x in T.
template <typename T>
cudaError_t mhc_rows(const void* x, StreamDtype xtype, T* xf, T* rstd, int64_t tokens, int64_t len, T norm_eps,
                     cudaStream_t stream);

// Forward epilogue: proj [tokens, D], rstd [tokens] -> h_pre/h_post [tokens, n], h_res [tokens, n*n].
template <typename T>
cudaError_t mhc_epilogue(const T* proj, const T* rstd, const T* alpha, const T* bias, T* h_pre, T* h_post, T* h_res,
                         int64_t tokens, int n, int iters, T sinkhorn_eps, T pre_eps, T post_mult, cudaStream_t stream);

// g_pre_out[t, i] = (g_pre ? g_pre[t, i] : 0) + sum_c gy[t, c] * xf[t, i*C + c].
template <typename T>
cudaError_t mhc_layer_input_grad(const T* xf, const T* gy, const T* g_pre, T* g_pre_out, int64_t tokens, int n,
                                 int64_t C, cudaStream_t stream);

// Backward epilogue (any g_* may be null = zero): -> dl, dproj [tokens, D], dalpha [tokens, 3],
// drstd [tokens]. workspace: (2*iters-1) * n * tokens elements (the Sinkhorn's half-step
// denominators), then thread_matrix_workspace(tokens, n, 2) (hcext/dispatch.h: two n x n
// matrices per token for n > kThreadMatrixMaxN).
template <typename T>
cudaError_t mhc_epilogue_backward(const T* proj, const T* rstd, const T* alpha, const T* bias, const T* g_pre,
                                  const T* g_post, const T* g_res, T* dl, T* dproj, T* dalpha, T* drstd,
                                  T* workspace, int64_t tokens, int n, int iters, T sinkhorn_eps, T post_mult,
                                  cudaStream_t stream);

// dx = dxp + (-drstd*rstd³/len) * xf + (gy ? h_i * gy : 0) + (extra ? extra : 0), summed in T
// and written in x's dtype; h_i = mix[t * mix_stride + i] when mix is non-null (the shifted
// collapse's pre_mix; stride 0 when shared), else h_pre[i] recomputed from proj; extra
// (nullable) is [tokens, len] in x's dtype.
template <typename T>
cudaError_t mhc_grad_x(const T* xf, const T* dxp, const T* proj, const T* rstd, const T* drstd, const T* gy,
                       const T* mix, int64_t mix_stride, const T* alpha, const T* bias, T pre_eps, const void* extra, void* dx, StreamDtype xtype,
                       int64_t tokens, int n, int64_t C, int64_t D, cudaStream_t stream);

}  // namespace hcext::cuda
