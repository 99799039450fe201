// CUDA kernels of the HC coefficient ops (glue: csrc/hc/hc_cuda.cpp). Per-stream math is the
// shared hcext/hc.h. Kept simple: one block per token (one warp per stream) for the passes
// over a token's streams, one thread per token for the backward epilogue, one thread per
// VEC channels and token chunk for the Ĝ reduction. Every sum has a fixed order (warp
// butterflies, sequential loops, chunk-ordered final sum): deterministic, no atomics.
// No torch header here.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "hcext/dispatch.h"
#include "hcext/hc.h"
#include "hc/hc_launch.h"
#include "streams/streams_launch.h"  // sum_over_tokens: the fixed-order sum over chunks

namespace hcext::cuda {
namespace {

constexpr int kMaxWarps = 8;            // forward: warps per token block (streams beyond loop)
constexpr int kRowThreads = 128;        // grad_x: threads per token block
constexpr int kTokenThreads = 128;      // backward epilogue: one thread per token
constexpr int kChannelThreads = 128;    // Ĝ: one thread per VEC channels
constexpr int kMaxVecColumns = 10;      // Ĝ: 128-bit rows only up to this many columns (K x VEC sums)
constexpr int64_t kMaxBlocks = 1 << 20;  // grid cap of the per-token kernels; they loop over the rest

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// kMaxK >= shape.K: the projections are held in registers (loops guarded by k < K). A lane reads
// VEC consecutive channels of its row and of each projection column at a time (one 128-bit load
// of x when the rows allow it, see with_vec; VEC = 1 otherwise).
template <typename T, typename X, int kMaxK, int VEC>
__global__ void hc_forward_kernel(const X* __restrict__ x, const T* __restrict__ wt_t, HcShape s, HcParams<T> p,
                               int64_t tokens, int64_t C, T norm_eps, T* __restrict__ proj, T* __restrict__ stats,
                               T* __restrict__ h_pre, T* __restrict__ h_post, T* __restrict__ h_res) {
  const int n = s.n, K = s.K;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int i = warp; i < n; i += warps) {
      const int64_t r = t * n + i;
      const X* row = x + r * C;
      const T shift = s.layer_norm ? T(to_compute(row[0])) : T(0);
      T s1 = 0, s2 = 0, acc[kMaxK];
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) acc[k] = 0;
      for (int64_t c = int64_t(lane) * VEC; c < C; c += 32 * VEC) {
        const Lanes<T, VEC> v = load<X, VEC>(row + c) - shift;
#pragma unroll
        for (int l = 0; l < VEC; ++l) {
          s1 += v.v[l];
          s2 += v.v[l] * v.v[l];
        }
#pragma unroll
        for (int k = 0; k < kMaxK; ++k) {
          if (k < K) {
            const Lanes<T, VEC> w = load<T, VEC>(wt_t + k * C + c);
#pragma unroll
            for (int l = 0; l < VEC; ++l) acc[k] += v.v[l] * w.v[l];
          }
        }
      }
      s1 = warp_sum(s1);
      s2 = warp_sum(s2);
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) acc[k] = warp_sum(acc[k]);
      if (lane == 0) {
        hc_stream_forward(s, p, i, T(C), norm_eps, shift, s1, s2, acc, stats + 2 * r, h_pre + t * n, h_post + t * n,
                          h_res + t * n * n);
        for (int k = 0; k < K; ++k) proj[r * K + k] = acc[k];
      }
    }
  }
}

template <typename T>
__global__ void hc_epilogue_backward_kernel(HcShape s, HcParams<T> p, int64_t tokens, int64_t C,
                                         const T* __restrict__ proj, const T* __restrict__ stats,
                                         const T* __restrict__ g_pre, const T* __restrict__ g_post,
                                         const T* __restrict__ g_res, T* __restrict__ e, T* __restrict__ xcoef,
                                         T* __restrict__ partial) {
  const int n = s.n, K = s.K, P = s.partial_width();
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < tokens; t += int64_t(gridDim.x) * blockDim.x) {
    hc_token_backward(s, p, T(C), proj + t * n * K, stats + t * n * 2, g_pre ? g_pre + t * n : nullptr,
                      g_post ? g_post + t * n : nullptr, g_res ? g_res + t * n * n : nullptr, e + t * n * K,
                      xcoef + t * n, partial + t * P);
  }
}

// partial[chunk, c, k] = Σ_{t in chunk} Σ_i (x_tic - mean_ti) e_tik. Grid: (channel blocks, chunks).
// A thread owns VEC consecutive channels (one 128-bit load of x per row when the rows allow it,
// see with_vec; VEC = 1 otherwise) and holds their K sums in registers; each row's e[r, :K]
// is read once per thread into registers. The sums run over (t, i) in order for every
// channel, whatever VEC: the vector and scalar paths give the same bits.
template <typename T, typename X, int kMaxK, int VEC>
__global__ void hc_centered_grad_kernel(const X* __restrict__ x, const T* __restrict__ e, const T* __restrict__ stats,
                                     int n, int K, int64_t tokens, int64_t C, int64_t chunk_tokens,
                                     T* __restrict__ partial) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;
  const int64_t t0 = int64_t(blockIdx.y) * chunk_tokens;
  const int64_t t1 = t0 + chunk_tokens < tokens ? t0 + chunk_tokens : tokens;
  Lanes<T, VEC> acc[kMaxK];
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) acc[k] = Lanes<T, VEC>(T(0));
  for (int64_t t = t0; t < t1; ++t) {
    for (int i = 0; i < n; ++i) {
      const int64_t r = t * n + i;
      T er[kMaxK];
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) er[k] = k < K ? e[r * K + k] : T(0);
      const Lanes<T, VEC> v = load<X, VEC>(x + r * C + c) - stats[2 * r];
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) {
        if (k < K) acc[k] = acc[k] + v * er[k];
      }
    }
  }
#pragma unroll
  for (int l = 0; l < VEC; ++l) {
    T* out = partial + (int64_t(blockIdx.y) * C + c + l) * K;
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      if (k < K) out[k] = acc[k].v[l];
    }
  }
}

// The row's e[r, :K] are held in registers; VEC consecutive channels per access (as the forward).
template <typename T, typename X, int kMaxK, int VEC>
__global__ void hc_grad_x_kernel(const X* __restrict__ x, const T* __restrict__ wc_t, const T* __restrict__ e,
                                 const T* __restrict__ xcoef, const T* __restrict__ stats, X* __restrict__ dx, int n,
                                 int K, int64_t tokens, int64_t C) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int i = 0; i < n; ++i) {
      const int64_t r = t * n + i;
      const T b = xcoef[r], mean = stats[2 * r];
      T er[kMaxK];
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) er[k] = k < K ? e[r * K + k] : T(0);
      for (int64_t c = int64_t(threadIdx.x) * VEC; c < C; c += int64_t(blockDim.x) * VEC) {
        Lanes<T, VEC> v = (load<X, VEC>(x + r * C + c) - mean) * b;
#pragma unroll
        for (int k = 0; k < kMaxK; ++k) {
          if (k < K) v = v + load<T, VEC>(wc_t + k * C + c) * er[k];
        }
        store<X, VEC>(dx + r * C + c, v);
      }
    }
  }
}


// fn.template operator()<kMaxK>() with kMaxK >= K (n + 2 at most).
template <typename Fn>
void dispatch_columns(int n, Fn&& fn) {
  dispatch_n(n, [&]<int kN, int kMaxN>() { fn.template operator()<(kN > 0 ? kN : kMaxN) + 2>(); });
}

unsigned int capped_blocks(int64_t count) {
  return static_cast<unsigned int>(count < kMaxBlocks ? count : kMaxBlocks);
}

}  // namespace

template <typename T>
cudaError_t hc_forward(const void* x, StreamDtype xtype, const T* wt_t, HcShape shape, HcParams<T> params, int64_t tokens,
                       int64_t C, T norm_eps, T* proj, T* stats, T* h_pre, T* h_post, T* h_res, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  const int warps = shape.n < kMaxWarps ? shape.n : kMaxWarps;
  with_stream_ptr<T>(xtype, x, [&](const auto* xp) {
    using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    // x's rows as VEC = 16 bytes of X, the projection columns as VEC values of T: C must allow both.
    const bool vectorize = can_vectorize<X>(C, {xp}) && can_vectorize<T>(C, {wt_t});
    dispatch_columns(shape.n, [&]<int kMaxK>() {
      with_vec<X>(vectorize, [&]<int VEC>() {
        err = launch<hc_forward_kernel<T, X, kMaxK, VEC>>(capped_blocks(tokens), 32 * warps, 0, stream, xp, wt_t, shape,
                                                          params, tokens, C, norm_eps, proj, stats, h_pre, h_post,
                                                          h_res);
      });
    });
  });
  return err;
}

template <typename T>
cudaError_t hc_epilogue_backward(HcShape shape, HcParams<T> params, int64_t tokens, int64_t C, const T* proj,
                                 const T* stats, const T* g_pre, const T* g_post, const T* g_res, T* e, T* xcoef,
                                 T* partial, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  err = launch<hc_epilogue_backward_kernel<T>>(capped_blocks(ceil_div(tokens, kTokenThreads)), kTokenThreads, 0, stream, shape, params, tokens, C, proj, stats, g_pre, g_post, g_res, e, xcoef, partial);
  return err;
}

int64_t hc_grad_chunks(int64_t tokens, int64_t C, int K) {
  // Chunks of >= 64 tokens, at most 65535 (grid.y) and about 2^22 partial values.
  int64_t chunks = (tokens + 63) / 64;
  const int64_t cap = (int64_t(1) << 22) / (C * K);
  if (chunks > cap) chunks = cap;
  if (chunks > 65535) chunks = 65535;
  return chunks < 1 ? 1 : chunks;
}

template <typename T>
cudaError_t hc_centered_grad(const void* x, StreamDtype xtype, const T* e, const T* stats, int n, int K, int64_t tokens,
                             int64_t C, T* workspace, T* G, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  const int64_t chunks = hc_grad_chunks(tokens, C, K);
  const int64_t chunk_tokens = (tokens + chunks - 1) / chunks;
  const int64_t used = (tokens + chunk_tokens - 1) / chunk_tokens;  // every chunk non-empty
  T* partial = used > 1 ? workspace : G;
  with_stream_ptr<T>(xtype, x, [&](const auto* xp) {
    using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    dispatch_columns(n, [&]<int kMaxK>() {
      auto run = [&]<int VEC>() {
        const dim3 grid(ceil_div(ceil_div(C, VEC), kChannelThreads), static_cast<unsigned int>(used));
        err = launch<hc_centered_grad_kernel<T, X, kMaxK, VEC>>(grid, kChannelThreads, 0, stream, xp, e, stats, n, K,
                                                                tokens, C, chunk_tokens, partial);
      };
      // 128-bit rows where they allow it and the K x VEC sums fit in registers (n <= 8; the
      // wider variants are not even compiled).
      if constexpr (kMaxK <= kMaxVecColumns) {
        with_vec<X>(can_vectorize<X>(C, {xp}), run);
      } else {
        run.template operator()<1>();
      }
    });
  });
  if (err != cudaSuccess || used == 1) return err;
  return sum_over_tokens<T>(partial, G, used, C * K, stream);
}

template <typename T>
cudaError_t hc_grad_x(const void* x, StreamDtype xtype, const T* wc_t, const T* e, const T* xcoef, const T* stats,
                      void* dx, int n, int K, int64_t tokens, int64_t C, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  with_stream_ptr<T>(xtype, x, [&](const auto* xp) {
    using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    X* out = static_cast<X*>(dx);
    const bool vectorize = can_vectorize<X>(C, {xp, out}) && can_vectorize<T>(C, {wc_t});
    dispatch_columns(n, [&]<int kMaxK>() {
      with_vec<X>(vectorize, [&]<int VEC>() {
        err = launch<hc_grad_x_kernel<T, X, kMaxK, VEC>>(capped_blocks(tokens), kRowThreads, 0, stream, xp, wc_t, e,
                                                         xcoef, stats, out, n, K, tokens, C);
      });
    });
  });
  return err;
}

#define HCEXT_INSTANTIATE_HC(T)                                                                                     \
  template cudaError_t hc_forward<T>(const void*, StreamDtype, const T*, HcShape, HcParams<T>, int64_t, int64_t, T, T*, \
                                     T*, T*, T*, T*, cudaStream_t);                                                 \
  template cudaError_t hc_epilogue_backward<T>(HcShape, HcParams<T>, int64_t, int64_t, const T*, const T*, const T*, \
                                               const T*, const T*, T*, T*, T*, cudaStream_t);                       \
  template cudaError_t hc_centered_grad<T>(const void*, StreamDtype, const T*, const T*, int, int, int64_t, int64_t,   \
                                           T*, T*, cudaStream_t);                                                   \
  template cudaError_t hc_grad_x<T>(const void*, StreamDtype, const T*, const T*, const T*, const T*, void*, int, int,  \
                                    int64_t, int64_t, cudaStream_t);
HCEXT_INSTANTIATE_HC(float)
HCEXT_INSTANTIATE_HC(double)
#undef HCEXT_INSTANTIATE_HC

}  // namespace hcext::cuda
