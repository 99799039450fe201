// CUDA kernels of hcext::sinkhorn and hcext::sinkhorn_backward: one token per thread,
// its n x n matrix in registers (fast paths, n known at compile time) or in
// thread-local memory (generic n), running the shared math of hcext/sinkhorn.h.
// No torch header here: see csrc/sinkhorn/sinkhorn_cuda.cpp for the glue.

#include <cuda_runtime.h>

#include "common/cuda_launch.cuh"
#include "hcext/sinkhorn.h"
#include "sinkhorn/sinkhorn_launch.h"

namespace hcext::cuda {
namespace {

constexpr int kThreads = 128;

// Denominators in a global workspace laid out [step, k, token], so that neighbouring
// threads (tokens) touch neighbouring addresses.
template <typename T>
struct WorkspaceHistory {
  T* d;
  int64_t tokens;
  int64_t token;
  int n;
  __device__ void store(int t, int k, T v) { d[(int64_t(t) * n + k) * tokens + token] = v; }
  __device__ T load(int t, int k) const { return d[(int64_t(t) * n + k) * tokens + token]; }
};

template <typename T, int kN, int kMaxN>
__global__ void __launch_bounds__(kThreads) sinkhorn_forward_kernel(const T* __restrict__ logits, T* __restrict__ out,
                                                                    int64_t tokens, int n_rt, int iters, T eps) {
  const int64_t token = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token >= tokens) return;
  const int n = kN > 0 ? kN : n_rt;
  const int nn = n * n;
  // Large n: the iterates live in the output row itself (see kThreadMatrixMaxN).
  constexpr bool kGlobal = kMaxN > kThreadMatrixMaxN;
  T local[kGlobal ? 1 : kMaxN * kMaxN];
  T* dst = out + token * nn;
  T* P = kGlobal ? dst : local;
  const T* src = logits + token * nn;
  HCEXT_UNROLL
  for (int k = 0; k < nn; ++k) P[k] = src[k];
  SinkhornNoHistory none;
  hcext::sinkhorn_forward<kN>(P, n, iters, eps, none);
  if constexpr (!kGlobal) {
    HCEXT_UNROLL
    for (int k = 0; k < nn; ++k) dst[k] = P[k];
  }
}

template <typename T, int kN, int kMaxN>
__global__ void __launch_bounds__(kThreads)
    sinkhorn_backward_kernel(const T* __restrict__ grad, const T* __restrict__ logits, T* __restrict__ grad_logits,
                             T* __restrict__ workspace, T* __restrict__ matrices, int64_t tokens, int n_rt, int iters,
                             T eps) {
  const int64_t token = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token >= tokens) return;
  const int n = kN > 0 ? kN : n_rt;
  const int nn = n * n;
  // Large n: the gradient is worked on in the output row, the iterates in the token's slice of
  // `matrices` (see kThreadMatrixMaxN).
  constexpr bool kGlobal = kMaxN > kThreadMatrixMaxN;
  T local_p[kGlobal ? 1 : kMaxN * kMaxN];
  T local_g[kGlobal ? 1 : kMaxN * kMaxN];
  T* dst = grad_logits + token * nn;
  T* P = kGlobal ? matrices + token * nn : local_p;
  T* G = kGlobal ? dst : local_g;
  const T* g = grad + token * nn;
  HCEXT_UNROLL
  for (int k = 0; k < nn; ++k) G[k] = g[k];
  const T* src = logits + token * nn;
  auto load_logits = [&](T* dst) {
    HCEXT_UNROLL
    for (int k = 0; k < nn; ++k) dst[k] = src[k];
  };
  WorkspaceHistory<T> hist{workspace, tokens, token, n};
  hcext::sinkhorn_backward<kN>(P, G, n, iters, eps, hist, load_logits);
  if constexpr (!kGlobal) {
    HCEXT_UNROLL
    for (int k = 0; k < nn; ++k) dst[k] = G[k];
  }
}

inline unsigned int num_blocks(int64_t tokens) { return static_cast<unsigned int>((tokens + kThreads - 1) / kThreads); }

}  // namespace

template <typename T>
cudaError_t sinkhorn_forward(const T* logits, T* out, int64_t tokens, int n, int iters, T eps, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  dispatch_n(n, [&]<int kN, int kMaxN>() {
    err = launch<sinkhorn_forward_kernel<T, kN, kMaxN>>(num_blocks(tokens), kThreads, 0, stream, logits, out, tokens, n,
                                                        iters, eps);
  });
  return err;
}

template <typename T>
cudaError_t sinkhorn_backward(const T* grad, const T* logits, T* grad_logits, T* workspace, int64_t tokens, int n,
                              int iters, T eps, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  dispatch_n(n, [&]<int kN, int kMaxN>() {
    err = launch<sinkhorn_backward_kernel<T, kN, kMaxN>>(
        num_blocks(tokens), kThreads, 0, stream, grad, logits, grad_logits, workspace,
        workspace + int64_t(sinkhorn_half_steps(iters)) * n * tokens, tokens, n, iters, eps);
  });
  return err;
}

template cudaError_t sinkhorn_forward<float>(const float*, float*, int64_t, int, int, float, cudaStream_t);
template cudaError_t sinkhorn_forward<double>(const double*, double*, int64_t, int, int, double, cudaStream_t);
template cudaError_t sinkhorn_backward<float>(const float*, const float*, float*, float*, int64_t, int, int, float,
                                              cudaStream_t);
template cudaError_t sinkhorn_backward<double>(const double*, const double*, double*, double*, int64_t, int, int,
                                               double, cudaStream_t);

}  // namespace hcext::cuda
