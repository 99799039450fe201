// CUDA kernels of hcext::stream_aggregate, hcext::stream_mix_expand and their backward
// ops, running the shared math of hcext/streams.h. No torch header here: see
// csrc/streams/streams_cuda.h for the glue.
//
// A thread handles VEC consecutive channels of one token as a Lanes<S, VEC>. When C *
// sizeof(T) is a multiple of 16 bytes and every stream pointer is 16-byte aligned,
// VEC * sizeof(T) == 16, so each row access is one 128-bit load or store. Otherwise
// VEC = 1 (scalar fallback). fp16/bf16 are converted to fp32 explicitly.
//
// Forward kernels: one thread per (token, channel group), grid-stride.
// Backward kernels: one block per token (block-stride over tokens). The input gradients
// are channel-wise. Each coefficient gradient is a sum over C: every thread sums its
// channel groups, then block_sum adds the threads in a fixed order (warp xor tree, then
// the warps in order). No atomics, so the results are bitwise reproducible. Shared
// coefficients are handled by the glue: the per-token rows go to a scratch, and
// sum_over_tokens reduces them with the same fixed-order scheme.
//
// n = 4 (mHC) is a fast path with compile-time n and the token's rows held in registers.
// The generic path (run-time n <= 32) reloads rows instead of holding n of them. The
// reloads hit L1.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "common/cuda_utils.cuh"
#include "hcext/lanes.h"
#include "hcext/mhc.h"
#include "hcext/streams.h"
#include "streams/streams_launch.h"

namespace hcext::cuda {
namespace {

constexpr int kThreads = 256;           // elementwise (forward) kernels
constexpr int kTokenThreads = 256;      // most threads per block of a per-token kernel
constexpr int kMaxWarps = kTokenThreads / 32;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid cap; kernels loop over the rest

// One thread's part of a coefficient gradient: the channel terms of its group, summed
// in lane order.
template <typename S, int VEC>
__device__ __forceinline__ S group_sum(const Lanes<S, VEC>& a, const Lanes<S, VEC>& b) {
  const Lanes<S, VEC> term = stream_coef_grad_term(a, b);
  S s = term.v[0];
#pragma unroll
  for (int l = 1; l < VEC; ++l) s += term.v[l];
  return s;
}

// ---------------------------------------------------------------------------------------
// Forward kernels.

template <typename T, int kN, int VEC>
__global__ void __launch_bounds__(kThreads)
    aggregate_forward_kernel(const T* __restrict__ x, const ComputeOf<T>* __restrict__ h, int64_t h_stride,
                             T* __restrict__ y, int64_t tokens, int n_rt, int64_t C) {
  using V = Lanes<ComputeOf<T>, VEC>;
  const int n = kN > 0 ? kN : n_rt;
  const int64_t groups = C / VEC;
  const int64_t total = tokens * groups;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = idx / groups;
    const int64_t c = (idx - t * groups) * VEC;
    const T* xt = x + t * n * C + c;
    const V yv = stream_aggregate_value<kN, V>(h + t * h_stride, n, [&](int i) { return load<T, VEC>(xt + i * C); });
    store<T, VEC>(y + t * C + c, yv);
  }
}

template <typename T, int kN, int VEC>
__global__ void __launch_bounds__(kThreads)
    mix_forward_kernel(const T* __restrict__ f, const T* __restrict__ x, const ComputeOf<T>* __restrict__ hp,
                       int64_t hp_stride, const ComputeOf<T>* __restrict__ hr, int64_t hr_stride, T* __restrict__ out,
                       int64_t tokens, int n_rt, int64_t C) {
  using V = Lanes<ComputeOf<T>, VEC>;
  const int n = kN > 0 ? kN : n_rt;
  const int64_t groups = C / VEC;
  const int64_t total = tokens * groups;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = idx / groups;
    const int64_t c = (idx - t * groups) * VEC;
    const T* xt = x + t * n * C + c;
    T* ot = out + t * n * C + c;
    const auto* hpt = hp + t * hp_stride;
    const auto* hrt = hr + t * hr_stride;
    const V F = load<T, VEC>(f + t * C + c);
    if constexpr (kN > 0) {
      V X[kN];
#pragma unroll
      for (int j = 0; j < kN; ++j) X[j] = load<T, VEC>(xt + j * C);
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        store<T, VEC>(ot + i * C, stream_mix_value<kN, V>(hrt + i * kN, hpt[i], F, kN, [&](int j) { return X[j]; }));
      }
    } else {
      auto rows = [&](int j) { return load<T, VEC>(xt + j * C); };  // reloads hit L1
      for (int i = 0; i < n; ++i) store<T, VEC>(ot + i * C, stream_mix_value<0, V>(hrt + i * n, hpt[i], F, n, rows));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward kernels: one block per token. Null outputs are skipped (uniform branches).

template <typename T, int kN, int VEC>
__global__ void __launch_bounds__(kTokenThreads)
    aggregate_backward_kernel(const T* __restrict__ gy, const T* __restrict__ x, const ComputeOf<T>* __restrict__ h,
                              int64_t h_stride, T* __restrict__ grad_x, ComputeOf<T>* __restrict__ gh, int64_t tokens,
                              int n_rt, int64_t C) {
  using S = ComputeOf<T>;
  using V = Lanes<S, VEC>;
  constexpr int kMaxN = kN > 0 ? kN : kStreamsMaxN;
  __shared__ S smem[kMaxWarps][kMaxN];
  const int n = kN > 0 ? kN : n_rt;
  const int64_t groups = C / VEC;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const S* ht = h + t * h_stride;
    const T* xt = x + t * n * C;
    S acc[kMaxN];
#pragma unroll
    for (int i = 0; i < kMaxN; ++i) acc[i] = S(0);
    for (int64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
      const int64_t c = gi * VEC;
      const V g = load<T, VEC>(gy + t * C + c);
      if (grad_x) {
        for (int i = 0; i < n; ++i) {
          store<T, VEC>(grad_x + (t * n + i) * C + c, stream_aggregate_grad_x_value(ht[i], g));
        }
      }
      if (gh) {
#pragma unroll
        for (int i = 0; i < kMaxN; ++i) {
          if (i < n) acc[i] += group_sum(g, load<T, VEC>(xt + i * C + c));
        }
      }
    }
    if (gh) block_sum<kMaxN>(acc, n, smem, [&](int k, S s) { gh[t * n + k] = s; });
  }
}

template <typename T, int kN, int VEC>
__global__ void __launch_bounds__(kTokenThreads)
    mix_backward_kernel(const T* __restrict__ g, const T* __restrict__ f, const T* __restrict__ x,
                        const ComputeOf<T>* __restrict__ hp, int64_t hp_stride, const ComputeOf<T>* __restrict__ hr,
                        int64_t hr_stride, T* __restrict__ grad_f, T* __restrict__ grad_x,
                        ComputeOf<T>* __restrict__ gh_post, ComputeOf<T>* __restrict__ gh_res, int64_t tokens,
                        int n_rt, int64_t C) {
  using S = ComputeOf<T>;
  using V = Lanes<S, VEC>;
  // Sums over C. Fast path: all n * n + n at once, [0, n*n) = h_res, then h_post.
  // Generic path: one row i at a time, [0] = h_post[i], [1 + j] = h_res[i, j].
  constexpr int K = kN > 0 ? kN * kN + kN : kStreamsMaxN + 1;
  __shared__ S smem[kMaxWarps][K];
  const int n = kN > 0 ? kN : n_rt;
  const int64_t groups = C / VEC;
  const bool want_inputs = grad_f != nullptr || grad_x != nullptr;
  const bool want_coefs = gh_post != nullptr || gh_res != nullptr;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const T* gt = g + t * n * C;
    const T* xt = x + t * n * C;
    const T* ft = f + t * C;
    const S* hpt = hp + t * hp_stride;
    const S* hrt = hr + t * hr_stride;

    if constexpr (kN > 0) {
      // One pass: the gradient rows G stay in registers for every output.
      S acc[K];
#pragma unroll
      for (int k = 0; k < K; ++k) acc[k] = S(0);
      for (int64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
        const int64_t c = gi * VEC;
        V G[kN];
#pragma unroll
        for (int i = 0; i < kN; ++i) G[i] = load<T, VEC>(gt + i * C + c);
        auto rows = [&](int i) { return G[i]; };
        if (grad_f) store<T, VEC>(grad_f + t * C + c, stream_mix_grad_f_value<kN, V>(hpt, kN, rows));
        if (grad_x) {
#pragma unroll
          for (int j = 0; j < kN; ++j) {
            store<T, VEC>(grad_x + (t * kN + j) * C + c, stream_mix_grad_x_value<kN, V>(hrt, j, kN, rows));
          }
        }
        if (gh_res) {
          V X[kN];
#pragma unroll
          for (int j = 0; j < kN; ++j) X[j] = load<T, VEC>(xt + j * C + c);
#pragma unroll
          for (int i = 0; i < kN; ++i) {
#pragma unroll
            for (int j = 0; j < kN; ++j) acc[i * kN + j] += group_sum(G[i], X[j]);
          }
        }
        if (gh_post) {
          const V F = load<T, VEC>(ft + c);
#pragma unroll
          for (int i = 0; i < kN; ++i) acc[kN * kN + i] += group_sum(G[i], F);
        }
      }
      if (want_coefs) {
        block_sum<K>(acc, K, smem, [&](int k, S s) {
          if (k < kN * kN) {
            if (gh_res) gh_res[t * kN * kN + k] = s;
          } else if (gh_post) {
            gh_post[t * kN + (k - kN * kN)] = s;
          }
        });
      }
    } else {
      // 1. grad_f, grad_x: channel-wise, gradient rows reloaded per output (L1 hits).
      if (want_inputs) {
        for (int64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
          const int64_t c = gi * VEC;
          auto rows = [&](int i) { return load<T, VEC>(gt + i * C + c); };
          if (grad_f) store<T, VEC>(grad_f + t * C + c, stream_mix_grad_f_value<0, V>(hpt, n, rows));
          if (grad_x) {
            for (int j = 0; j < n; ++j) {
              store<T, VEC>(grad_x + (t * n + j) * C + c, stream_mix_grad_x_value<0, V>(hrt, j, n, rows));
            }
          }
        }
      }
      // 2. grad_h_post[i], grad_h_res[i, :]: one gradient row i at a time.
      if (want_coefs) {
        for (int i = 0; i < n; ++i) {
          S acc[K];
#pragma unroll
          for (int k = 0; k < K; ++k) acc[k] = S(0);
          for (int64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
            const int64_t c = gi * VEC;
            const V Gi = load<T, VEC>(gt + i * C + c);
            if (gh_post) acc[0] += group_sum(Gi, load<T, VEC>(ft + c));
            if (gh_res) {
#pragma unroll
              for (int j = 0; j < kStreamsMaxN; ++j) {
                if (j < n) acc[1 + j] += group_sum(Gi, load<T, VEC>(xt + j * C + c));
              }
            }
          }
          block_sum<K>(acc, n + 1, smem, [&](int k, S s) {
            if (k == 0) {
              if (gh_post) gh_post[t * n + i] = s;
            } else if (gh_res) {
              gh_res[(t * n + i) * n + (k - 1)] = s;
            }
          });
        }
      }
    }
  }
}

// out[k] = sum_t partials[t * K + k]: one block per k, threads stride over tokens, then
// block_sum. Fixed order, so reproducible.
template <typename S>
__global__ void __launch_bounds__(kTokenThreads)
    sum_over_tokens_kernel(const S* __restrict__ partials, S* __restrict__ out, int64_t tokens, int64_t K) {
  __shared__ S smem[kMaxWarps][1];
  const int64_t k = blockIdx.x;
  S acc[1] = {S(0)};
  for (int64_t t = threadIdx.x; t < tokens; t += blockDim.x) acc[0] += partials[t * K + k];
  block_sum<1>(acc, 1, smem, [&](int, S s) { out[k] = s; });
}

// ---------------------------------------------------------------------------------------
// Launch helpers.

inline unsigned int elementwise_blocks(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(b < kMaxBlocks ? b : kMaxBlocks);
}

inline unsigned int token_blocks(int64_t tokens) {
  return static_cast<unsigned int>(tokens < kMaxBlocks ? tokens : kMaxBlocks);
}

// Threads of a per-token kernel: one warp per 32 channel groups, 1 to 8 warps.
inline unsigned int token_threads(int64_t groups) {
  const int64_t warps = (groups + 31) / 32;
  return static_cast<unsigned int>(32 * (warps < 1 ? 1 : (warps > kMaxWarps ? kMaxWarps : warps)));
}

// Calls fn.template operator()<kN, VEC>(): the library's n dispatch (hcext/dispatch.h;
// these kernels size their run-time-n storage for kStreamsMaxN, so the storage classes
// share one instantiation), with 128-bit or scalar accesses.
template <typename T, typename Fn>
void dispatch(int n, bool vectorize, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(T);
  dispatch_n(n, [&]<int kN, int kMaxN>() {
    if (vectorize) return fn.template operator()<kN, kVec>();
    return fn.template operator()<kN, 1>();
  });
}

}  // namespace

template <typename T, typename S>
cudaError_t stream_aggregate_forward(const T* x, const S* h_pre, int64_t h_stride, T* y, int64_t tokens, int n,
                                     int64_t C, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0 || C == 0) return cudaSuccess;
  dispatch<T>(n, can_vectorize<T>(C, {x, y}), [&]<int kN, int VEC>() {
    const int64_t total = tokens * (C / VEC);
    err = launch<aggregate_forward_kernel<T, kN, VEC>>(elementwise_blocks(total), kThreads, 0, stream, x, h_pre, h_stride, y,
                                                                                             tokens, n, C);
  });
  return err;
}

template <typename T, typename S>
cudaError_t stream_aggregate_backward(const T* grad, const T* x, const S* h_pre, int64_t h_stride, T* grad_x,
                                      S* grad_h_pre_rows, int64_t tokens, int n, int64_t C, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0 || (grad_x == nullptr && grad_h_pre_rows == nullptr)) return cudaSuccess;
  dispatch<T>(n, can_vectorize<T>(C, {grad, x, grad_x}), [&]<int kN, int VEC>() {
    err = launch<aggregate_backward_kernel<T, kN, VEC>>(token_blocks(tokens), token_threads(C / VEC), 0, stream, grad, x, h_pre, h_stride, grad_x, grad_h_pre_rows, tokens, n, C);
  });
  return err;
}

template <typename T, typename S>
cudaError_t stream_mix_expand_forward(const T* f, const T* x, const S* h_post, int64_t hp_stride, const S* h_res,
                                      int64_t hr_stride, T* out, int64_t tokens, int n, int64_t C,
                                      cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0 || C == 0) return cudaSuccess;
  dispatch<T>(n, can_vectorize<T>(C, {f, x, out}), [&]<int kN, int VEC>() {
    const int64_t total = tokens * (C / VEC);
    err = launch<mix_forward_kernel<T, kN, VEC>>(elementwise_blocks(total), kThreads, 0, stream, f, x, h_post, hp_stride, h_res,
                                                                                       hr_stride, out, tokens, n, C);
  });
  return err;
}

template <typename T, typename S>
cudaError_t stream_mix_expand_backward(const T* grad, const T* f, const T* x, const S* h_post, int64_t hp_stride,
                                       const S* h_res, int64_t hr_stride, T* grad_f, T* grad_x, S* grad_h_post_rows,
                                       S* grad_h_res_rows, int64_t tokens, int n, int64_t C, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  if (!grad_f && !grad_x && !grad_h_post_rows && !grad_h_res_rows) return cudaSuccess;
  dispatch<T>(n, can_vectorize<T>(C, {grad, f, x, grad_f, grad_x}), [&]<int kN, int VEC>() {
    err = launch<mix_backward_kernel<T, kN, VEC>>(token_blocks(tokens), token_threads(C / VEC), 0, stream, grad, f, x, h_post, hp_stride, h_res, hr_stride, grad_f, grad_x, grad_h_post_rows, grad_h_res_rows, tokens, n,
        C);
  });
  return err;
}

template <typename S>
cudaError_t sum_over_tokens(const S* partials, S* out, int64_t tokens, int64_t K, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (K == 0) return cudaSuccess;
  err = launch<sum_over_tokens_kernel<S>>(static_cast<unsigned int>(K), kTokenThreads, 0, stream, partials, out, tokens, K);
  return err;
}

#define HCEXT_INSTANTIATE_STREAMS(T, S)                                                                              \
  template cudaError_t stream_aggregate_forward<T, S>(const T*, const S*, int64_t, T*, int64_t, int, int64_t,       \
                                                      cudaStream_t);                                                 \
  template cudaError_t stream_aggregate_backward<T, S>(const T*, const T*, const S*, int64_t, T*, S*, int64_t, int, \
                                                       int64_t, cudaStream_t);                                       \
  template cudaError_t stream_mix_expand_forward<T, S>(const T*, const T*, const S*, int64_t, const S*, int64_t, T*, \
                                                       int64_t, int, int64_t, cudaStream_t);                         \
  template cudaError_t stream_mix_expand_backward<T, S>(const T*, const T*, const T*, const S*, int64_t, const S*,  \
                                                        int64_t, T*, T*, S*, S*, int64_t, int, int64_t, cudaStream_t);

HCEXT_INSTANTIATE_STREAMS(float, float)
HCEXT_INSTANTIATE_STREAMS(double, double)
HCEXT_INSTANTIATE_STREAMS(__nv_bfloat16, float)
HCEXT_INSTANTIATE_STREAMS(__half, float)
#undef HCEXT_INSTANTIATE_STREAMS

template cudaError_t sum_over_tokens<float>(const float*, float*, int64_t, int64_t, cudaStream_t);
template cudaError_t sum_over_tokens<double>(const double*, double*, int64_t, int64_t, cudaStream_t);

}  // namespace hcext::cuda
