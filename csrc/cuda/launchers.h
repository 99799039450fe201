#pragma once
// Raw-pointer launchers of the CUDA kernels (defined in csrc/cuda/*_kernels.cu, which
// include no torch header). The torch glue in csrc/cuda/*.cpp validates, allocates,
// picks the stream and calls these. Each returns the launch's cudaError_t.

#include <cuda_runtime_api.h>

#include <cstdint>

namespace hcext::cuda {

// logits, out: [tokens, n, n] contiguous.
template <typename T>
cudaError_t sinkhorn_forward(const T* logits, T* out, int64_t tokens, int n, int iters, T eps, cudaStream_t stream);

// grad, logits, grad_logits: [tokens, n, n] contiguous. workspace: (2 * iters - 1) * n * tokens
// elements of scratch for the recomputed half-step denominators.
template <typename T>
cudaError_t sinkhorn_backward(const T* grad, const T* logits, T* grad_logits, T* workspace, int64_t tokens, int n,
                              int iters, T eps, cudaStream_t stream);

// Streams (csrc/cuda/streams_kernels.cu). T is the stream dtype: float, double,
// __nv_bfloat16 or __half; S is the coefficient dtype: double for double, else float.
// x, grad_x, out and the mix's grad are contiguous [tokens, n, C]; y, f, grad_f and the
// aggregate's grad are contiguous [tokens, C]. A coefficient is read at
// h + token * stride: stride = n (h_pre, h_post) or n * n (h_res) per token, 0 if shared.
// Null output pointers are skipped. Coefficient gradients are written per token, as
// [tokens, n] / [tokens, n, n] rows (for a shared coefficient, sum them with
// sum_over_tokens).
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

// stream_mix_expand_forward that also writes, from the stored outputs (rounded to T),
// rstd[t] = 1/sqrt(mean(out[t]²) + norm_eps) and (xf non-null) the outputs in S: the first
// pass of hcext::mhc_post_pre. One block per token; deterministic.
template <typename T, typename S>
cudaError_t stream_mix_rows(const T* f, const T* x, const S* h_post, int64_t hp_stride, const S* h_res,
                            int64_t hr_stride, T* out, S* xf, S* rstd, S norm_eps, int64_t tokens, int n, int64_t C,
                            cudaStream_t stream);

// out[k] = sum_t partials[t * K + k] in a fixed order (deterministic); K <= 2^31 - 1.
template <typename S>
cudaError_t sum_over_tokens(const S* partials, S* out, int64_t tokens, int64_t K, cudaStream_t stream);

}  // namespace hcext::cuda

namespace hcext::cuda {

// ---- mHC coefficients (csrc/cuda/mhc_kernels.cu). T: float or double (compute dtype);
// X: the streams' dtype (float, double, __nv_bfloat16 or __half passed as void*: see
// MhcXType). Rows are [tokens, len = n*C] contiguous.
enum class MhcXType { kFloat, kDouble, kBFloat16, kHalf };

// rstd[t] = 1/sqrt(sum(x[t]²)/len + norm_eps); xf (optional) receives x in T.
template <typename T>
cudaError_t mhc_rows(const void* x, MhcXType xtype, T* xf, T* rstd, int64_t tokens, int64_t len, T norm_eps,
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
// drstd [tokens]. workspace: (2*iters-1) * n * tokens elements.
template <typename T>
cudaError_t mhc_epilogue_backward(const T* proj, const T* rstd, const T* alpha, const T* bias, const T* g_pre,
                                  const T* g_post, const T* g_res, T* dl, T* dproj, T* dalpha, T* drstd,
                                  T* workspace, int64_t tokens, int n, int iters, T sinkhorn_eps, T post_mult,
                                  cudaStream_t stream);

// dx = dxp + (-drstd*rstd³/len) * xf + (gy ? h_pre[i] * gy : 0) + (extra ? extra : 0), summed
// in T and written in x's dtype; extra (nullable) is [tokens, len] in x's dtype.
template <typename T>
cudaError_t mhc_grad_x(const T* xf, const T* dxp, const T* proj, const T* rstd, const T* drstd, const T* gy,
                       const T* alpha, const T* bias, T pre_eps, const void* extra, void* dx, MhcXType xtype,
                       int64_t tokens, int n, int64_t C, int64_t D, cudaStream_t stream);

}  // namespace hcext::cuda

#include "hcext/hc.h"  // HcShape, HcParams

namespace hcext::cuda {

// ---- HC coefficients (csrc/cuda/hc_kernels.cu). T: float or double (compute dtype); x and
// dx are [tokens, n, C] contiguous in the dtype `xtype` names (fp64 only with T = double).
// Per-stream math and notation: hcext/hc.h. Kernels get the shape and parameter pointers
// (HcShape, HcParams: plain structs) by value. Deterministic: no atomics.

// One block per token, one warp per stream: shifted sums and the K projections with
// wt_t [K, C], then hc_stream_forward. -> proj [tokens, n, K], stats [tokens, n, 2],
// h_pre / h_post [tokens, n], h_res [tokens, n, n].
template <typename T>
cudaError_t hc_forward(const void* x, MhcXType xtype, const T* wt_t, HcShape shape, HcParams<T> params, int64_t tokens,
                       int64_t C, T norm_eps, T* proj, T* stats, T* h_pre, T* h_post, T* h_res, cudaStream_t stream);

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
cudaError_t hc_centered_grad(const void* x, MhcXType xtype, const T* e, const T* stats, int n, int K, int64_t tokens,
                             int64_t C, T* workspace, T* G, cudaStream_t stream);

// dx = Wc e + xcoef (x - mean), written in x's dtype; wc_t [K, C] (see hcext/hc.h).
template <typename T>
cudaError_t hc_grad_x(const void* x, MhcXType xtype, const T* wc_t, const T* e, const T* xcoef, const T* stats,
                      void* dx, int n, int K, int64_t tokens, int64_t C, cudaStream_t stream);

}  // namespace hcext::cuda
