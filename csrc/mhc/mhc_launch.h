#pragma once
// Launch declarations of the mHC coefficient CUDA kernels (mhc/mhc_kernels.cu, which
// includes no torch header). The CUDA backend (mhc/mhc_cuda.cpp) calls these. Each returns
// the launch's cudaError_t. T: float or double (the compute dtype); x in the dtype `xtype`
// names (passed as void*). Rows are [tokens, len = n*C] contiguous.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/stream_dtype.h"

namespace hcext::cuda {

// The fused passes (mhc_project, mhc_grad_x_phi: no GEMM library, no copy of x) handle
// D = n² + 2n <= kMhcFusedMaxD, i.e. n <= 6; larger n keep the GEMM formulation (mhc_rows +
// cuBLAS + mhc_grad_x).
constexpr int kMhcFusedMaxN = 6;
constexpr int kMhcFusedMaxD = kMhcFusedMaxN * kMhcFusedMaxN + 2 * kMhcFusedMaxN;  // 48

// The fused boundary's mix, x_next = stream_mix_expand(f, x, h_post, h_res), as the passes below
// take it (f null: no mix): f [tokens, C] and x [tokens, n, C] in x's dtype, h_post / h_res with
// token t at t * stride (0: shared).
template <typename T>
struct MhcMixInputs {
  const void *f = nullptr, *x = nullptr;
  const T* h_post = nullptr;
  int64_t hp_stride = 0;
  const T* h_res = nullptr;
  int64_t hr_stride = 0;
};

// proj [tokens, D] = rows @ phi [n*C, D] and rstd [tokens], D <= kMhcFusedMaxD: one pass over the
// rows [tokens, n, C] (in their own dtype, xtype) by tiles of tokens x channels of every stream,
// split over channels, the splits' partial sums added in order (deterministic; the same order in
// every op). rows is x, read; or, with mix.f (the fused boundary's first pass), x_next, written
// once here as the mix of mix.x computes it (the same bits as stream_mix_expand) and projected
// from the values stored. layer_input non-null (the shifted collapse): also writes layer_input
// [tokens, C] (x's dtype) = Σ_i pre_mix[t, i] rows_i (pre_mix: token t at t * pm_stride; 0:
// shared), as stream_aggregate computes it (the same bits), from the same tiles (the rows read
// once). workspace: mhc_project_workspace elements.
int64_t mhc_project_workspace(int64_t tokens, int64_t C, int D, StreamDtype xtype);
template <typename T>
cudaError_t mhc_project(void* rows, StreamDtype xtype, const MhcMixInputs<T>& mix, const T* pre_mix, int64_t pm_stride,
                        void* layer_input, const T* phi, T* workspace, T* proj, T* rstd, int64_t tokens, int n,
                        int64_t C, int D, T norm_eps, cudaStream_t stream);

// The standard collapse where a tile's rows fit on chip (mhc_project_resident: 32 tokens' rows
// of n*C elements of x's dtype in 80 KB of shared memory, D <= kMhcFusedMaxD): proj, rstd and
// layer_input [tokens, C] = Σ_i h_pre[t, i] rows_i (h_pre from proj as the epilogue computes it)
// in one pass that reads the rows once — proj and rstd bitwise mhc_project's (the same splits,
// added in the same order), the layer input stream_aggregate's. rows and mix as mhc_project's.
// device: the CUDA device whose shared-memory limit decides (it must allow the 80 KB and the
// kernel's static tiles in one block).
bool mhc_project_resident(int n, int64_t C, int D, StreamDtype xtype, int device);
template <typename T>
cudaError_t mhc_project_aggregate(void* rows, StreamDtype xtype, const MhcMixInputs<T>& mix, const T* phi,
                                  const T* alpha, const T* bias, T pre_eps, T* proj, T* rstd, void* layer_input,
                                  int64_t tokens, int n, int64_t C, int D, T norm_eps, cudaStream_t stream);

// What mhc_grad_x_phi also computes from the rows it reads (every pointer nullable).
// The fused boundary's mix backward (mix.f non-null):
// dx is then x_next's gradient, rounded to x's dtype and not stored; the pass runs
// stream_mix_expand_backward's arithmetic on it: grad_f, grad_x (of layer l's streams), and the
// per-token rows of h_post's and h_res's gradients ([tokens, n], [tokens, n*n]: Σ_c g_i f,
// Σ_c g_i x_j). gy_rows: the shifted collapse's pre_mix gradient rows, Σ_c gy x_next_i
// [tokens, n]. The sums over channels are per block of channels, added in block order.
template <typename T>
struct MhcGradRows {
  MhcMixInputs<T> mix;  // x: layer l's streams
  void *grad_f = nullptr, *grad_x = nullptr;
  T *grad_h_post = nullptr, *grad_h_res = nullptr;
  T* gy_rows = nullptr;
};

// Elements of T of workspace mhc_grad_x_phi needs: grad_phi's per-chunk partial sums, then the
// per-block partial sums of `rows`.
template <typename T>
int64_t mhc_grad_x_phi_workspace(int64_t tokens, int n, int64_t C, int D, const MhcGradRows<T>& rows);

// One pass over x (xtype) for the backward, D <= kMhcFusedMaxD:
//   dx = dproj @ phiᵀ + (-drstd rstd³ / len) x + (gy ? h_i gy : 0) + (extra ? extra : 0),
//        summed in T and rounded once to x's dtype: written to dx, or, with rows.mix.f, the mix's
//        backward runs on it (see MhcGradRows; dx unused); h_i as in mhc_grad_x;
//   grad_phi [len, D] = xᵀ @ dproj, from per-chunk partial sums (workspace) added in chunk order;
//   rows' sums (see MhcGradRows).
template <typename T>
cudaError_t mhc_grad_x_phi(const void* x, StreamDtype xtype, const T* phi, const T* dproj, const T* proj,
                           const T* rstd, const T* drstd, const T* gy, const T* mix, int64_t mix_stride,
                           const T* alpha, const T* bias, T pre_eps, const void* extra, void* dx,
                           const MhcGradRows<T>& rows, T* workspace, T* grad_phi, int64_t tokens, int n, int64_t C,
                           int D, cudaStream_t stream);

// rstd[t] = 1/sqrt(sum(x[t]²)/len + norm_eps); xf (optional) receives x in T.
template <typename T>
cudaError_t mhc_rows(const void* x, StreamDtype xtype, T* xf, T* rstd, int64_t tokens, int64_t len, T norm_eps,
                     cudaStream_t stream);

// Forward epilogue: proj [tokens, D], rstd [tokens] -> h_pre/h_post [tokens, n], h_res [tokens, n*n].
template <typename T>
cudaError_t mhc_epilogue(const T* proj, const T* rstd, const T* alpha, const T* bias, T* h_pre, T* h_post, T* h_res,
                         int64_t tokens, int n, int iters, T sinkhorn_eps, T pre_eps, T post_mult, cudaStream_t stream);

// g_pre_out[t, i] = (g_pre ? g_pre[t, i] : 0) + sum_c gy[t, c] * x[t, i*C + c] (x in xtype).
template <typename T>
cudaError_t mhc_layer_input_grad(const void* x, StreamDtype xtype, const T* gy, const T* g_pre, T* g_pre_out,
                                 int64_t tokens, int n, int64_t C, cudaStream_t stream);

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
