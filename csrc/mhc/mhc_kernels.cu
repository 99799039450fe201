// CUDA kernels of the mHC coefficient ops (see csrc/mhc/mhc_cuda.cpp for the glue and the
// GEMMs, which are cuBLAS through at::mm). Per-token coefficient math is the shared
// hcext/mhc.h; rows of x are reduced one block per token, in a fixed order (deterministic).
// No torch header here.

#include <cuda_runtime.h>

#include <type_traits>

#include "common/cuda_utils.cuh"
#include "hcext/dispatch.h"
#include "hcext/mhc.h"
#include "mhc/mhc_launch.h"

namespace hcext::cuda {
namespace {

constexpr int kRowThreads = 256;    // one block per token for the row passes
constexpr int kTokenThreads = 128;  // one thread per token for the epilogues

// Sinkhorn denominators in a workspace laid out [step, k, token] (coalesced across threads).
template <typename T>
struct WorkspaceHistory {
  T* d;
  int64_t tokens, token;
  int n;
  __device__ void store(int t, int k, T v) { d[(int64_t(t) * n + k) * tokens + token] = v; }
  __device__ T load(int t, int k) const { return d[(int64_t(t) * n + k) * tokens + token]; }
};

// A thread handles VEC consecutive elements of a row: one 128-bit access when the rows
// allow it (see can_vectorize), else VEC = 1.
template <typename X, typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    mhc_rows_kernel(const X* __restrict__ x, T* __restrict__ xf, T* __restrict__ rstd, int64_t len, T norm_eps) {
  __shared__ T smem[kRowThreads / 32][1];
  const int64_t t = blockIdx.x;
  T acc[1] = {T(0)};
  for (int64_t k = int64_t(threadIdx.x) * VEC; k < len; k += int64_t(kRowThreads) * VEC) {
    const Lanes<T, VEC> v = load<X, VEC>(x + t * len + k);
#pragma unroll
    for (int l = 0; l < VEC; ++l) acc[0] += v.v[l] * v.v[l];
    if (xf) store<T, VEC>(xf + t * len + k, v);
  }
  block_sum<1>(acc, 1, smem, [&](int, T total) { rstd[t] = mhc_rstd<T>(total, T(len), norm_eps); });
}

template <typename T, int kN, int kMaxN>
__global__ void __launch_bounds__(kTokenThreads)
    mhc_epilogue_kernel(const T* __restrict__ proj, const T* __restrict__ rstd, const T* __restrict__ alpha,
                    const T* __restrict__ bias, T* __restrict__ h_pre, T* __restrict__ h_post, T* __restrict__ h_res,
                    int64_t tokens, int n_rt, int iters, T sinkhorn_eps, T pre_eps, T post_mult) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const int n = kN > 0 ? kN : n_rt;
  const int D = mhc_coeff_width(n);
  // The Sinkhorn's working matrix: in registers for the n = 4 path, in local memory up to
  // kThreadMatrixMaxN, beyond in the output row itself.
  constexpr bool kGlobal = kMaxN > kThreadMatrixMaxN;
  T local[kGlobal ? 1 : kMaxN * kMaxN];
  T* out = h_res + t * n * n;
  T* hr = kGlobal ? out : local;
  mhc_coeffs_epilogue<kN>(proj + t * D, rstd[t], alpha, bias, n, iters, sinkhorn_eps, pre_eps, post_mult,
                          h_pre + t * n, h_post + t * n, hr);
  if constexpr (!kGlobal) {
    HCEXT_UNROLL
    for (int k = 0; k < n * n; ++k) out[k] = hr[k];
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    mhc_layer_input_grad_kernel(const T* __restrict__ xf, const T* __restrict__ gy, const T* __restrict__ g_pre,
                            T* __restrict__ g_pre_out, int n, int64_t C) {
  __shared__ T smem[kRowThreads / 32][1];
  const int64_t t = blockIdx.x;
  for (int i = 0; i < n; ++i) {
    T acc[1] = {T(0)};
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < C; c += int64_t(kRowThreads) * VEC) {
      const Lanes<T, VEC> p = load<T, VEC>(gy + t * C + c) * load<T, VEC>(xf + (t * n + i) * C + c);
#pragma unroll
      for (int l = 0; l < VEC; ++l) acc[0] += p.v[l];
    }
    block_sum<1>(acc, 1, smem, [&](int, T total) {
      g_pre_out[t * n + i] = (g_pre ? g_pre[t * n + i] : T(0)) + total;
    });
  }
}

template <typename T, int kN, int kMaxN>
__global__ void __launch_bounds__(kTokenThreads)
    mhc_epilogue_backward_kernel(const T* __restrict__ proj, const T* __restrict__ rstd, const T* __restrict__ alpha,
                             const T* __restrict__ bias, const T* __restrict__ g_pre, const T* __restrict__ g_post,
                             const T* __restrict__ g_res, T* __restrict__ dl, T* __restrict__ dproj,
                             T* __restrict__ dalpha, T* __restrict__ drstd, T* __restrict__ workspace,
                             T* __restrict__ matrices, int64_t tokens, int n_rt, int iters, T sinkhorn_eps,
                             T post_mult) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const int n = kN > 0 ? kN : n_rt;
  const int D = mhc_coeff_width(n);
  // gr (the h_res gradient, worked on in place) and the Sinkhorn's scratch matrix: local up to
  // kThreadMatrixMaxN, beyond in the token's two slices of `matrices`.
  constexpr bool kGlobal = kMaxN > kThreadMatrixMaxN;
  T gp[kMaxN], gq[kMaxN];
  T local_r[kGlobal ? 1 : kMaxN * kMaxN], local_s[kGlobal ? 1 : kMaxN * kMaxN];
  T* gr = kGlobal ? matrices + t * 2 * n * n : local_r;
  T* scratch = kGlobal ? gr + n * n : local_s;
  HCEXT_UNROLL
  for (int i = 0; i < n; ++i) {
    gp[i] = g_pre ? g_pre[t * n + i] : T(0);
    gq[i] = g_post ? g_post[t * n + i] : T(0);
  }
  HCEXT_UNROLL
  for (int k = 0; k < n * n; ++k) gr[k] = g_res ? g_res[t * n * n + k] : T(0);
  WorkspaceHistory<T> hist{workspace, tokens, t, n};
  T dr;
  mhc_coeffs_epilogue_backward<kN>(proj + t * D, rstd[t], alpha, bias, n, iters, sinkhorn_eps, post_mult, gp, gq, gr,
                                   scratch, hist, dl + t * D, dproj + t * D, dalpha + t * 3, dr);
  drstd[t] = dr;
}

template <typename T, typename X, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    mhc_grad_x_kernel(const T* __restrict__ xf, const T* dxp, const T* __restrict__ proj, const T* __restrict__ rstd,
                  const T* __restrict__ drstd, const T* __restrict__ gy, const T* __restrict__ mix,
                  int64_t mix_stride, const T* __restrict__ alpha,
                  const T* __restrict__ bias, T pre_eps, const X* __restrict__ extra, X* dx, int n, int64_t C,
                  int64_t D) {
  // dx may alias dxp (each element read, then written, by one thread): no __restrict__ on them.
  __shared__ T h_pre[kMhcMaxN];
  const int64_t t = blockIdx.x;
  const int64_t len = n * C;
  if (gy && threadIdx.x < n) {
    // The layer input's coefficient: the shifted collapse's pre_mix, or h_pre from proj.
    h_pre[threadIdx.x] = mix ? mix[t * mix_stride + threadIdx.x]
                             : mhc_h_pre<T, T>(proj[t * D + threadIdx.x], rstd[t], alpha, bias[threadIdx.x], pre_eps);
  }
  __syncthreads();
  const T factor = mhc_rstd_grad_factor<T>(drstd[t], rstd[t], T(len));
  for (int64_t k = int64_t(threadIdx.x) * VEC; k < len; k += int64_t(kRowThreads) * VEC) {
    Lanes<T, VEC> v = load<T, VEC>(dxp + t * len + k) + load<T, VEC>(xf + t * len + k) * factor;
    if (gy) v = v + load<T, VEC>(gy + t * C + k % C) * h_pre[k / C];  // VEC divides C: one stream
    if (extra) v = v + load<X, VEC>(extra + t * len + k);  // another consumer's gradient, added in T
    store<X, VEC>(dx + t * len + k, v);
  }
}

// fn.template operator()<VEC>(): 16 bytes of X per access when `vectorize`, else 1 element.
template <typename X, typename Fn>
void with_vec(bool vectorize, Fn&& fn) {
  if (vectorize) return fn.template operator()<int(16 / sizeof(X))>();
  return fn.template operator()<1>();
}

}  // namespace

template <typename T>
cudaError_t mhc_rows(const void* x, StreamDtype xtype, T* xf, T* rstd, int64_t tokens, int64_t len, T norm_eps,
                     cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  with_stream_ptr<T>(xtype, const_cast<void*>(x), [&](auto* xp) {
    using X = std::remove_pointer_t<decltype(xp)>;
    // The fp32 copy takes the same VEC values (as T) per thread: its rows must allow it too.
    const bool vectorize = can_vectorize<X>(len, {xp}) && can_vectorize<T>(len, {xf});
    with_vec<X>(vectorize, [&]<int VEC>() {
      err = launch<mhc_rows_kernel<X, T, VEC>>(static_cast<unsigned int>(tokens), kRowThreads, 0, stream, xp, xf, rstd, len,
                                                                                           norm_eps);
    });
  });
  return err;
}

template <typename T>
cudaError_t mhc_epilogue(const T* proj, const T* rstd, const T* alpha, const T* bias, T* h_pre, T* h_post, T* h_res,
                         int64_t tokens, int n, int iters, T sinkhorn_eps, T pre_eps, T post_mult, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  dispatch_n(n, [&]<int kN, int kMaxN>() {
    err = launch<mhc_epilogue_kernel<T, kN, kMaxN>>(ceil_div(tokens, kTokenThreads), kTokenThreads, 0, stream, proj, rstd, alpha, bias, h_pre, h_post, h_res, tokens, n, iters, sinkhorn_eps, pre_eps, post_mult);
  });
  return err;
}

template <typename T>
cudaError_t mhc_layer_input_grad(const T* xf, const T* gy, const T* g_pre, T* g_pre_out, int64_t tokens, int n,
                                 int64_t C, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  with_vec<T>(can_vectorize<T>(C, {xf, gy}), [&]<int VEC>() {
    err = launch<mhc_layer_input_grad_kernel<T, VEC>>(static_cast<unsigned int>(tokens), kRowThreads, 0, stream, xf, gy, g_pre,
                                                                                                  g_pre_out, n, C);
  });
  return err;
}

template <typename T>
cudaError_t mhc_epilogue_backward(const T* proj, const T* rstd, const T* alpha, const T* bias, const T* g_pre,
                                  const T* g_post, const T* g_res, T* dl, T* dproj, T* dalpha, T* drstd,
                                  T* workspace, int64_t tokens, int n, int iters, T sinkhorn_eps, T post_mult,
                                  cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  dispatch_n(n, [&]<int kN, int kMaxN>() {
    err = launch<mhc_epilogue_backward_kernel<T, kN, kMaxN>>(
        ceil_div(tokens, kTokenThreads), kTokenThreads, 0, stream, proj, rstd, alpha, bias, g_pre, g_post, g_res, dl,
        dproj, dalpha, drstd, workspace, workspace + int64_t(sinkhorn_half_steps(iters)) * n * tokens, tokens, n,
        iters, sinkhorn_eps, post_mult);
  });
  return err;
}

template <typename T>
cudaError_t mhc_grad_x(const T* xf, const T* dxp, const T* proj, const T* rstd, const T* drstd, const T* gy,
                       const T* mix, int64_t mix_stride, const T* alpha, const T* bias, T pre_eps, const void* extra, void* dx, StreamDtype xtype,
                       int64_t tokens, int n, int64_t C, int64_t D, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  with_stream_ptr<T>(xtype, dx, [&](auto* dxp_out) {
    using X = std::remove_pointer_t<decltype(dxp_out)>;
    // VEC = 16 bytes of X, read as VEC values of T too: C must allow both (then VEC divides C).
    const X* extra_x = static_cast<const X*>(extra);
    const bool vectorize = can_vectorize<X>(C, {dxp_out, extra_x}) && can_vectorize<T>(C, {xf, dxp, gy});
    with_vec<X>(vectorize, [&]<int VEC>() {
      err = launch<mhc_grad_x_kernel<T, X, VEC>>(static_cast<unsigned int>(tokens), kRowThreads, 0, stream, xf, dxp, proj, rstd, drstd, gy, mix, mix_stride, alpha, bias, pre_eps, extra_x, dxp_out, n, C, D);
    });
  });
  return err;
}

#define HCEXT_INSTANTIATE_MHC(T)                                                                                   \
  template cudaError_t mhc_rows<T>(const void*, StreamDtype, T*, T*, int64_t, int64_t, T, cudaStream_t);            \
  template cudaError_t mhc_epilogue<T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int, int, T, T, \
                                       T, cudaStream_t);                                                          \
  template cudaError_t mhc_layer_input_grad<T>(const T*, const T*, const T*, T*, int64_t, int, int64_t,            \
                                               cudaStream_t);                                                     \
  template cudaError_t mhc_epilogue_backward<T>(const T*, const T*, const T*, const T*, const T*, const T*,        \
                                                const T*, T*, T*, T*, T*, T*, int64_t, int, int, T, T,             \
                                                cudaStream_t);                                                    \
  template cudaError_t mhc_grad_x<T>(const T*, const T*, const T*, const T*, const T*, const T*, const T*,         \
                                     int64_t, const T*, const T*, T, const void*, void*, StreamDtype, int64_t, int,  \
                                     int64_t, int64_t, cudaStream_t);
HCEXT_INSTANTIATE_MHC(float)
HCEXT_INSTANTIATE_MHC(double)
#undef HCEXT_INSTANTIATE_MHC

}  // namespace hcext::cuda
