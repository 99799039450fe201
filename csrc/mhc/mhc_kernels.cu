// CUDA kernels of the mHC coefficient ops (see csrc/mhc/mhc_cuda.cpp for the glue). Per-token
// coefficient math is the shared hcext/mhc.h; every sum has a fixed order (deterministic, no
// atomics). No torch header here.
//
// The projection x̃ @ phi (D = n² + 2n columns) for D <= kMhcFusedMaxD (n <= 6) runs without a
// GEMM library and without a copy of x: mhc_project_kernel reads x in its own dtype once, tiles
// of 32 tokens x 32 bytes of channels of every stream with phi's matching rows in shared memory,
// a split over channels whose partial sums (with the sum of squares) mhc_project_reduce_kernel
// adds in split order — the same order for every op, so mhc_coeffs, mhc_pre(_shifted) and the
// boundary's projection of x_next agree bitwise. Holding every stream of a channel in one thread,
// the same tiles also write the fused boundary's mix (x_next, written once, projected from
// shared memory, not read back) and the shifted collapse's layer input.
// mhc_grad_x_phi_kernel writes grad_x (every term summed in T, rounded once) and grad_phi's
// per-chunk partial sums in one pass over x, added in chunk order by mhc_grad_phi_reduce_kernel;
// by blocks of channels of every stream, it also runs the boundary's mix backward and the
// shifted collapse's row sums.
// Larger n keep the GEMM formulation (cuBLAS through at::mm in the glue on x's rows in T).

#include <cuda_runtime.h>

#include <type_traits>

#include "common/cuda_utils.cuh"
#include "hcext/dispatch.h"
#include "hcext/mhc.h"
#include "hcext/streams.h"
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

template <typename T, typename X, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    mhc_layer_input_grad_kernel(const X* __restrict__ x, const T* __restrict__ gy, const T* __restrict__ g_pre,
                                T* __restrict__ g_pre_out, int n, int64_t C) {
  __shared__ T smem[kRowThreads / 32][1];
  const int64_t t = blockIdx.x;
  for (int i = 0; i < n; ++i) {
    T acc[1] = {T(0)};
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < C; c += int64_t(kRowThreads) * VEC) {
      const Lanes<T, VEC> p = load<T, VEC>(gy + t * C + c) * load<X, VEC>(x + (t * n + i) * C + c);
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

// ---- The fused projection (D <= kMhcFusedMaxD) --------------------------------------------

constexpr int kProjTokens = 32;                       // tokens per block tile
constexpr int kProjGroups = 8;                        // thread (token, group): columns group + 8 j
constexpr int kProjThreads = kProjTokens * kProjGroups;
constexpr int kProjCols = kMhcFusedMaxD / kProjGroups;

// The projection kernels' inner loop, one token's row of a shared-memory tile against the tile of
// phi: acc[j] += xrow[kk] * ps[kk][grp + kProjGroups * j] and squares += xrow[kk]² over kk < K.
template <typename T>
__device__ __forceinline__ void project_tile(const T* xrow, T (*ps)[kMhcFusedMaxD], int K, int grp,
                                             T (&acc)[kProjCols], T& squares) {
#pragma unroll 4
  for (int kk = 0; kk < K; ++kk) {
    const T v = xrow[kk];
    squares += v * v;
#pragma unroll
    for (int j = 0; j < kProjCols; ++j) acc[j] += v * ps[kk][grp + kProjGroups * j];
  }
}

// This split's partial sums of token t (when t < tokens): partial[split, t, c] = acc[j] for this
// thread's columns c = grp + kProjGroups * j < D, and partial[split, t, D] = squares (group 0).
template <typename T>
__device__ __forceinline__ void store_partial(T* partial, int64_t tokens, int64_t t, int D, int grp,
                                              const T (&acc)[kProjCols], T squares) {
  if (t >= tokens) return;
  T* out = partial + (int64_t(blockIdx.y) * tokens + t) * (D + 1);
#pragma unroll
  for (int j = 0; j < kProjCols; ++j) {
    const int c = grp + kProjGroups * j;
    if (c < D) out[c] = acc[j];
  }
  if (grp == 0) out[D] = squares;
}

// ---- The projection by channels of every stream: the boundary's mix and the shifted collapse --
// inside it (D <= kMhcFusedMaxD)

// Channels of each stream per step: 32 bytes of X (one memory sector per token row and stream).
template <typename X>
constexpr int kMixC = 32 / int(sizeof(X));
template <typename X>
constexpr int kMixMaxK = kMhcFusedMaxN * kMixC<X>;  // k per step: n * kMixC <= 96

// Stream i of token t at channel c as the projection sees it: x itself, or (kMix) the boundary's
// mix x_next[t, i, c] = sum_j h_res[t, i, j] x[t, j, c] + h_post[t, i] f[t, c] (stream_mix_value,
// as the streams family's mix kernel: the same bits as stream_mix_expand), written once here.
template <typename X, typename T, bool kMix>
__device__ __forceinline__ X projected_value(const X* f, const X* x, const T* hp, int64_t hp_stride, const T* hr,
                                             int64_t hr_stride, X* x_next, int64_t t, int i, int64_t c, int n,
                                             int64_t C) {
  const X* xt = x + t * n * C + c;
  if constexpr (kMix) {
    using V = Lanes<T, 1>;
    const V F(to_compute(f[t * C + c]));
    const V o = stream_mix_value<0, V>(hr + t * hr_stride + i * n, hp[t * hp_stride + i], F, n,
                                        [&](int j) { return V(to_compute(xt[j * C])); });
    const X stored = Convert<X>::out(static_cast<ComputeOf<X>>(o.v[0]));
    x_next[(t * n + i) * C + c] = stored;
    return stored;
  } else {
    return xt[i * C];
  }
}

// phi's rows for a step of kC channels of every stream: ps[kk][col] = phi[k, col] with
// k = (kk / kC) C + cb + kk % kC, zero past c_end or D.
template <int kC, typename T>
__device__ __forceinline__ void load_phi_step(T (*ps)[kMhcFusedMaxD], const T* __restrict__ phi, int64_t cb,
                                              int64_t c_end, int64_t C, int K, int D) {
  for (int e = threadIdx.x; e < K * kMhcFusedMaxD; e += kProjThreads) {
    const int kk = e / kMhcFusedMaxD, col = e % kMhcFusedMaxD;
    const int64_t c = cb + kk % kC;
    ps[kk][col] = (c < c_end && col < D) ? phi[((kk / kC) * C + c) * D + col] : T(0);
  }
}

// One split's projection over channels [c_begin, c_end), a step of kC channels of every stream at
// a time: fill(r, cc, c) writes xs[r][i kC + cc] for every stream i of the tile's token r at
// channel c = step + cc (zero where out of range); then acc[j] += over the step's k of
// xs[tok][k] phi[k, grp + kProjGroups j] and squares += xs[tok][k]² (project_tile). Both
// projection kernels run this, so their sums are the same arithmetic in the same order.
template <typename X, typename T, typename Fill>
__device__ __forceinline__ void project_channels(const T* __restrict__ phi, int64_t c_begin, int64_t c_end, int64_t C,
                                                 int n, int D, T (*xs)[kMixMaxK<X> + 1], T (*ps)[kMhcFusedMaxD],
                                                 int tok, int grp, T (&acc)[kProjCols], T& squares, Fill&& fill) {
  constexpr int kC = kMixC<X>;
  const int K = n * kC;
  squares = T(0);
#pragma unroll
  for (int j = 0; j < kProjCols; ++j) acc[j] = T(0);
  for (int64_t cb = c_begin; cb < c_end; cb += kC) {
    for (int e = threadIdx.x; e < kProjTokens * kC; e += kProjThreads) fill(e / kC, e % kC, cb + e % kC);
    load_phi_step<kC>(ps, phi, cb, c_end, C, K, D);
    __syncthreads();
    project_tile(xs[tok], ps, K, grp, acc, squares);
    __syncthreads();  // the tiles are refilled
  }
}

// The projection of a tile of kProjTokens tokens over this split's channels, every stream of
// each channel in one thread, so that what needs all of a channel's streams runs in the same
// pass:
// - kMix (hcext::mhc_post_pre's first pass): the rows projected are x_next[t, i, c] =
//   sum_j h_res[t, i, j] x[t, j, c] + h_post[t, i] f[t, c] (stream_mix_value, as the streams
//   family's mix kernel: the same bits as stream_mix_expand), stored once and projected from the
//   stored (rounded) values — never read back; else the rows of x as loaded.
// - layer_input (not null: the shifted collapse, whose weights pre_mix do not depend on this
//   projection): layer_input[t, c] = sum_i pre_mix[t, i] rows[t, i, c] (stream_aggregate_value,
//   as stream_aggregate), so the rows are read once for both.
// partial[split, t, :D] = sum of rows[t, k] phi[k, :], partial[split, t, D] = sum of rows[t, k]²
// over the split's k = i C + c, over channel steps, stream-major within a step;
// mhc_project_reduce_kernel adds the splits in order. Grid: (token tiles, channel splits).
template <typename X, typename T, bool kMix>
__global__ void __launch_bounds__(kProjThreads)
    mhc_project_kernel(const X* __restrict__ f, const X* __restrict__ x, const T* __restrict__ hp, int64_t hp_stride,
                       const T* __restrict__ hr, int64_t hr_stride, X* __restrict__ x_next,
                       const T* __restrict__ pre_mix, int64_t pm_stride, X* __restrict__ layer_input,
                       const T* __restrict__ phi, T* __restrict__ partial, int64_t tokens, int n, int64_t C, int D,
                       int64_t c_per_split) {
  constexpr int kC = kMixC<X>;
  __shared__ T xs[kProjTokens][kMixMaxK<X> + 1];  // +1: tokens in different banks
  __shared__ T ps[kMixMaxK<X>][kMhcFusedMaxD];
  const int tok = threadIdx.x / kProjGroups, grp = threadIdx.x % kProjGroups;
  const int64_t t0 = int64_t(blockIdx.x) * kProjTokens;
  const int64_t c_begin = int64_t(blockIdx.y) * c_per_split;
  const int64_t c_end = c_begin + c_per_split < C ? c_begin + c_per_split : C;
  T acc[kProjCols], squares;
  // The rows at (token r, channel c), every stream, one thread each.
  project_channels<X>(phi, c_begin, c_end, C, n, D, xs, ps, tok, grp, acc, squares, [&](int r, int cc, int64_t c) {
    const int64_t t = t0 + r;
    if (t < tokens && c < c_end) {
      for (int i = 0; i < n; ++i) {
        const X stored = projected_value<X, T, kMix>(f, x, hp, hp_stride, hr, hr_stride, x_next, t, i, c, n, C);
        xs[r][i * kC + cc] = T(to_compute(stored));
      }
      if (layer_input) {
        using V = Lanes<T, 1>;
        const V y = stream_aggregate_value<0, V>(pre_mix + t * pm_stride, n,
                                                 [&](int i) { return V(xs[r][i * kC + cc]); });
        store_as(layer_input + t * C + c, y.v[0]);
      }
    } else {
      for (int i = 0; i < n; ++i) xs[r][i * kC + cc] = T(0);
    }
  });
  store_partial(partial, tokens, t0 + tok, D, grp, acc, squares);
}

// ---- The resident projection: a token tile's rows held in shared memory -----------------------
//
// The standard collapse's layer input needs h_pre, hence the whole row's projection, before any
// of it can be written: a split over channels reads x again for it (the aggregate pass). Where a
// tile's rows fit in shared memory (mhc_project_resident), one block per tile of kProjTokens
// tokens keeps them there: x is read from memory once (for the boundary, x_next is mixed into
// shared memory, written once, never read back), projected over the same splits in the same order
// as mhc_project_kernel + mhc_project_reduce_kernel (the same bits), and the layer input is
// aggregated from shared memory.

// Bytes of dynamic shared memory for a tile's rows: with the static tiles (<= 31 KB) and the
// 1 KB the hardware reserves, two blocks (16 warps) fit an sm_90 SM's 228 KB. phi is streamed
// from L2 once per tile of 32 tokens, as in the split kernel. So rows of n*C*sizeof(x) <= 2.5 KB
// (bf16, n = 4: C <= 320; fp32: C <= 160): small models; at C = 4096 a token's row is 32 KB and
// the split kernel, with the aggregate as a pass of its own, serves (see the README).
constexpr int64_t kResidentBytes = 80 * 1024;
// Static shared memory of mhc_project_resident_kernel for x's dtype X (its tiles below): what the
// device must allow besides kResidentBytes.
template <typename X, typename T>
constexpr int64_t resident_static_bytes() {
  return int64_t(sizeof(T)) * (kProjTokens * (kMixMaxK<X> + 1) + kMixMaxK<X> * kMhcFusedMaxD +
                               kProjTokens * kMhcFusedMaxN + kProjTokens);
}
constexpr int64_t kResidentStaticMax = resident_static_bytes<__nv_bfloat16, float>();
static_assert(resident_static_bytes<float, float>() <= kResidentStaticMax &&
              resident_static_bytes<double, double>() <= kResidentStaticMax &&
              resident_static_bytes<__half, float>() <= kResidentStaticMax);

template <typename X, typename T, bool kMix>
__global__ void __launch_bounds__(kProjThreads)
    mhc_project_resident_kernel(const X* __restrict__ f, const X* __restrict__ x, const T* __restrict__ hp,
                                int64_t hp_stride, const T* __restrict__ hr, int64_t hr_stride,
                                X* __restrict__ x_next, const T* __restrict__ phi, const T* __restrict__ alpha,
                                const T* __restrict__ bias, T pre_eps, T norm_eps, T* __restrict__ proj,
                                T* __restrict__ rstd, X* __restrict__ layer_input, int64_t tokens, int n, int64_t C,
                                int D, int64_t c_per_split) {
  constexpr int kC = kMixC<X>;
  X* rows = dynamic_shared<X>();  // [kProjTokens][n C]
  // The static tiles (resident_static_bytes counts them).
  __shared__ T xs[kProjTokens][kMixMaxK<X> + 1];
  __shared__ T ps[kMixMaxK<X>][kMhcFusedMaxD];
  __shared__ T hs[kProjTokens][kMhcFusedMaxN];
  __shared__ T rs[kProjTokens];
  using V = Lanes<T, 1>;
  const int tok = threadIdx.x / kProjGroups, grp = threadIdx.x % kProjGroups;
  const int64_t t0 = int64_t(blockIdx.x) * kProjTokens;
  const int nt = int(tokens - t0 < kProjTokens ? tokens - t0 : kProjTokens);
  const int64_t len = int64_t(n) * C;
  // 1. The tile's rows, from memory once (the boundary: mixed as stream_mix_expand, written).
  for (int64_t e = threadIdx.x; e < nt * C; e += kProjThreads) {
    const int r = int(e / C);
    const int64_t c = e - r * C, t = t0 + r;
    for (int i = 0; i < n; ++i) {
      rows[r * len + i * C + c] = projected_value<X, T, kMix>(f, x, hp, hp_stride, hr, hr_stride, x_next, t, i, c, n, C);
    }
  }
  __syncthreads();
  // 2. The projection, split by split as mhc_project_kernel's blocks, the splits' sums added in
  // order as mhc_project_reduce_kernel adds them.
  T total[kProjCols], total_squares = T(0);
  for (int64_t c_begin = 0; c_begin < C; c_begin += c_per_split) {
    const int64_t c_end = c_begin + c_per_split < C ? c_begin + c_per_split : C;
    T acc[kProjCols], squares;
    project_channels<X>(phi, c_begin, c_end, C, n, D, xs, ps, tok, grp, acc, squares, [&](int r, int cc, int64_t c) {
      for (int i = 0; i < n; ++i) {
        xs[r][i * kC + cc] = (r < nt && c < c_end) ? T(to_compute(rows[r * len + i * C + c])) : T(0);
      }
    });
#pragma unroll
    for (int j = 0; j < kProjCols; ++j) total[j] = c_begin == 0 ? acc[j] : total[j] + acc[j];
    total_squares = c_begin == 0 ? squares : total_squares + squares;
  }
  // 3. proj and rstd; h_pre (mhc_h_pre, as the epilogue and the backward compute it): column c of
  // the thread's token is total[j] for c = grp + kProjGroups j, so h_pre[i] is thread i's total[0].
  if (tok < nt) {
#pragma unroll
    for (int j = 0; j < kProjCols; ++j) {
      const int c = grp + kProjGroups * j;
      if (c < D) proj[(t0 + tok) * D + c] = total[j];
    }
    if (grp == 0) {
      rs[tok] = mhc_rstd<T>(total_squares, T(len), norm_eps);
      rstd[t0 + tok] = rs[tok];
    }
  }
  __syncthreads();
  if (tok < nt && grp < n) hs[tok][grp] = mhc_h_pre<T, T>(total[0], rs[tok], alpha, bias[grp], pre_eps);
  __syncthreads();
  // 4. The layer input from shared memory (stream_aggregate_value, as stream_aggregate).
  for (int64_t e = threadIdx.x; e < nt * C; e += kProjThreads) {
    const int r = int(e / C);
    const int64_t c = e - r * C;
    const V y = stream_aggregate_value<0, V>(hs[r], n, [&](int i) { return V(to_compute(rows[r * len + i * C + c])); });
    store_as(layer_input + (t0 + r) * C + c, y.v[0]);
  }
}

// proj[t, c] = sum over splits (in order) of partial[split, t, c]; rstd[t] from the squares.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    mhc_project_reduce_kernel(const T* __restrict__ partial, T* __restrict__ proj, T* __restrict__ rstd,
                              int64_t tokens, int D, int splits, int64_t len, T norm_eps) {
  const int64_t total = tokens * (D + 1);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / (D + 1);
    const int c = int(e - t * (D + 1));
    T s = partial[e];
    for (int sp = 1; sp < splits; ++sp) s += partial[int64_t(sp) * total + e];
    if (c < D) {
      proj[t * D + c] = s;
    } else {
      rstd[t] = mhc_rstd<T>(s, T(len), norm_eps);
    }
  }
}

// ---- The backward's pass over x (D <= kMhcFusedMaxD) ----------------------------------------
//
// A block owns kGradW channels of every stream (thread (i, c): element k = i C + c of the
// row) for a chunk of tokens, so that the boundary's mix backward, which needs x_next's
// gradient of every stream at a channel, runs in the same pass on values exchanged through
// shared memory, and the per-token sums over channels (the mix's coefficient gradients; the
// shifted collapse's Σ_c gy x_i) come out of the same rows as per-block partial sums.

constexpr int kGradW = 64;       // channels per block, of every stream
constexpr int kGradTokens = 32;  // tokens staged in shared memory per step
// Streams per block for a column count: D <= 24 means n <= 4.
template <int kMaxD>
constexpr int kGradMaxN = kMaxD <= 24 ? 4 : kMhcFusedMaxN;
// Tokens per exchange of the mix backward (16 bytes of T per thread and array).
template <typename T>
constexpr int kGradStage = int(16 / sizeof(T));

// What the pass adds to grad_x/grad_phi (mhc_launch.h's MhcGradRows, typed): the boundary's mix
// backward (f non-null) and the per-token sums, partial [channel blocks, tokens, terms] with
// terms = mix_terms (h_res's n², then h_post's n; 0 when neither is wanted) + (gy rows ? n : 0).
template <typename X, typename T>
struct GradRows {
  const X* f;
  const X* x;  // layer l's streams
  const T *hp, *hr;
  int64_t hp_stride, hr_stride;
  X *grad_f, *grad_x;
  T* partial;
  int mix_terms, terms;
};

// The exchange between a block's threads (arrays sized 1 where unused): x_next's gradient
// rounded to X (g), x and f (kMix), gy x_next (kRows), for kS tokens.
template <typename T, int kN, int kS, bool kMix, bool kRows>
struct GradExchange {
  T g[kMix ? kS : 1][kN][kGradW];
  T x[kMix ? kS : 1][kN][kGradW];
  T f[kMix ? kS : 1][kGradW];
  T p[kRows ? kS : 1][kN][kGradW];
};

// The staged tokens [t0, t0 + count) of the exchange: the mix's input gradients, channel-wise
// (stream_mix_expand_backward's arithmetic on x_next's gradient rounded to X, eg), and one
// thread per (token, term) summing the block's channels in order.
template <typename X, typename T, int kN, int kS, bool kMix, bool kRows>
__device__ __forceinline__ void grad_rows_step(const GradRows<X, T>& r, const GradExchange<T, kN, kS, kMix, kRows>& e,
                                               int64_t t0, int count, int i, int cl, int64_t c, bool active, int n,
                                               int64_t C, int64_t tokens) {
  using V = Lanes<T, 1>;
  const auto& eg = e.g;
  const auto& ex = e.x;
  const auto& ef = e.f;
  const auto& ep = e.p;
  if constexpr (kMix) {
    if (active) {
      for (int s = 0; s < count; ++s) {
        const int64_t t = t0 + s;
        auto rows = [&](int q) { return V(eg[s][q][cl]); };
        if (r.grad_x) {
          store_as(r.grad_x + (t * n + i) * C + c, stream_mix_grad_x_value<0, V>(r.hr + t * r.hr_stride, i, n, rows).v[0]);
        }
        if (r.grad_f && i == 0) {
          store_as(r.grad_f + t * C + c, stream_mix_grad_f_value<0, V>(r.hp + t * r.hp_stride, n, rows).v[0]);
        }
      }
    }
  }
  for (int p = threadIdx.x; p < count * r.terms; p += blockDim.x) {
    const int s = p / r.terms, q = p % r.terms;
    T sum = T(0);
    if (kMix && q < r.mix_terms) {
      if (q < n * n) {  // h_res[a, b]: Σ_c g_a x_b
        const int a = q / n, b = q % n;
        for (int l = 0; l < kGradW; ++l) sum += stream_coef_grad_term(V(eg[s][a][l]), V(ex[s][b][l])).v[0];
      } else {  // h_post[a]: Σ_c g_a f
        const int a = q - n * n;
        for (int l = 0; l < kGradW; ++l) sum += stream_coef_grad_term(V(eg[s][a][l]), V(ef[s][l])).v[0];
      }
    } else if (kRows) {  // the shifted collapse's pre_mix[a]: Σ_c gy x_next_a
      const int a = q - r.mix_terms;
      for (int l = 0; l < kGradW; ++l) sum += ep[s][a][l];
    }
    r.partial[(int64_t(blockIdx.x) * tokens + t0 + s) * r.terms + q] = sum;
  }
}

// For this block's channels and its chunk of tokens: dx[t, k] = sum_d dproj[t, d] phi[k, d] +
// factor[t] x[t, k] + h[t, i] gy[t, c] + extra[t, k] (k = i C + c), rounded once to X; and
// partial[chunk, k, d] = sum over the chunk's tokens of x[t, k] dproj[t, d]. phi's row k
// stays in registers for the whole chunk. kMix: dx is x_next's gradient, not stored: the mix's
// backward runs on it (grad_f, grad_x of layer l's streams, their coefficients' partial sums);
// kRows: the partial sums of gy x too. Grid: (channel blocks, token chunks); n * kGradW threads.
template <typename X, typename T, int kMaxD, bool kMix, bool kRows>
__global__ void __launch_bounds__(kGradMaxN<kMaxD> * kGradW)
    mhc_grad_x_phi_kernel(const X* __restrict__ x, const T* __restrict__ phi, const T* __restrict__ dproj,
                          const T* __restrict__ proj, const T* __restrict__ rstd, const T* __restrict__ drstd,
                          const T* __restrict__ gy, const T* __restrict__ mix, int64_t mix_stride,
                          const T* __restrict__ alpha, const T* __restrict__ bias, T pre_eps,
                          const X* __restrict__ extra, X* __restrict__ dx, T* __restrict__ partial, int64_t tokens,
                          int n, int64_t C, int D, int64_t tokens_per_chunk, GradRows<X, T> r) {
  constexpr int kN = kGradMaxN<kMaxD>;
  constexpr int kS = kGradStage<T>;
  __shared__ T dps[kGradTokens][kMaxD];
  __shared__ T fs[kGradTokens];
  __shared__ T hs[kGradTokens][kMhcFusedMaxN];
  __shared__ GradExchange<T, kN, kS, kMix, kRows> xch;
  const int64_t len = int64_t(n) * C;
  const int i = int(threadIdx.x) / kGradW, cl = int(threadIdx.x) % kGradW;
  const int64_t c = int64_t(blockIdx.x) * kGradW + cl;
  const bool active = c < C;
  const int64_t k = int64_t(i) * C + c;
  T ph[kMaxD], g[kMaxD];
#pragma unroll
  for (int d = 0; d < kMaxD; ++d) {
    ph[d] = (active && d < D) ? phi[k * D + d] : T(0);
    g[d] = T(0);
  }
  const int64_t t_begin = int64_t(blockIdx.y) * tokens_per_chunk;
  const int64_t t_end = t_begin + tokens_per_chunk < tokens ? t_begin + tokens_per_chunk : tokens;
  for (int64_t tb = t_begin; tb < t_end; tb += kGradTokens) {
    const int nt = int(t_end - tb < kGradTokens ? t_end - tb : kGradTokens);
    for (int e = threadIdx.x; e < nt * kMaxD; e += blockDim.x) {
      const int j = e / kMaxD, d = e % kMaxD;
      dps[j][d] = d < D ? dproj[(tb + j) * D + d] : T(0);
    }
    for (int j = threadIdx.x; j < nt; j += blockDim.x) {
      const int64_t t = tb + j;
      fs[j] = mhc_rstd_grad_factor<T>(drstd[t], rstd[t], T(len));
      for (int q = 0; q < n; ++q) {
        hs[j][q] = !gy ? T(0) : mix ? mix[t * mix_stride + q] : mhc_h_pre<T, T>(proj[t * D + q], rstd[t], alpha, bias[q], pre_eps);
      }
    }
    __syncthreads();
    for (int j = 0; j < nt; ++j) {
      const int64_t t = tb + j;
      T v = T(0), xv = T(0);
      if (active) {
        xv = T(to_compute(x[t * len + k]));
        // One product per addition (FMA contraction rounds it one way): an absent gradient and a
        // zero one give the same bits.
        v = extra ? T(to_compute(extra[t * len + k])) : T(0);
        v += fs[j] * xv;
        if (gy) v += hs[j][i] * gy[t * C + c];
#pragma unroll
        for (int d = 0; d < kMaxD; ++d) {
          v += dps[j][d] * ph[d];
          g[d] += dps[j][d] * xv;
        }
        if constexpr (!kMix) store_as(dx + t * len + k, v);
      }
      if constexpr (kMix || kRows) {
        const int s = j % kS;
        if constexpr (kMix) {
          // The gradient as stream_mix_expand_backward would read it back: rounded to X.
          xch.g[s][i][cl] = active ? T(to_compute(Convert<X>::out(static_cast<ComputeOf<X>>(v)))) : T(0);
          xch.x[s][i][cl] = active ? T(to_compute(r.x[t * len + k])) : T(0);
          if (i == 0) xch.f[s][cl] = active ? T(to_compute(r.f[t * C + c])) : T(0);
        }
        if constexpr (kRows) xch.p[s][i][cl] = active ? stream_coef_grad_term(Lanes<T, 1>(gy[t * C + c]), Lanes<T, 1>(xv)).v[0] : T(0);
        if (s == kS - 1 || j == nt - 1) {
          __syncthreads();
          grad_rows_step(r, xch, t - s, s + 1, i, cl, c, active, n, C, tokens);
          __syncthreads();  // the exchange is refilled
        }
      }
    }
    __syncthreads();  // the staged tokens are replaced
  }
  if (active) {
    T* out = partial + (int64_t(blockIdx.y) * len + k) * D;
#pragma unroll
    for (int d = 0; d < kMaxD; ++d) {
      if (d < D) out[d] = g[d];
    }
  }
}

// The per-token sums: rows[t, q] = sum over channel blocks (in order) of partial[block, t, q],
// to h_res's rows (q < n²), h_post's (q < mix_terms) and gy's (the rest); null ones skipped.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    mhc_grad_rows_reduce_kernel(const T* __restrict__ partial, T* __restrict__ gh_res, T* __restrict__ gh_post,
                                T* __restrict__ gy_rows, int64_t tokens, int n, int mix_terms, int terms,
                                int blocks) {
  const int64_t total = tokens * terms;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / terms;
    const int q = int(e - t * terms);
    T s = partial[e];
    for (int b = 1; b < blocks; ++b) s += partial[int64_t(b) * total + e];
    if (q < mix_terms && q < n * n) {
      if (gh_res) gh_res[t * n * n + q] = s;
    } else if (q < mix_terms) {
      if (gh_post) gh_post[t * n + q - n * n] = s;
    } else {
      gy_rows[t * n + q - mix_terms] = s;
    }
  }
}

// grad_phi[e] = sum over chunks (in order) of partial[chunk, e], e over [len * D].
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    mhc_grad_phi_reduce_kernel(const T* __restrict__ partial, T* __restrict__ grad_phi, int64_t count, int chunks) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    T s = partial[e];
    for (int q = 1; q < chunks; ++q) s += partial[int64_t(q) * count + e];
    grad_phi[e] = s;
  }
}

// The split of the projection over channels: about 1024 blocks in all, whole steps of `step`
// channels per split.
struct ProjSplit {
  int64_t c_per_split;
  int splits;
};
inline ProjSplit project_split(int64_t tokens, int64_t C, int64_t step) {
  const int64_t tiles = (tokens + kProjTokens - 1) / kProjTokens;
  const int64_t steps = (C + step - 1) / step;
  int64_t want = (1024 + tiles - 1) / tiles;
  want = want < 1 ? 1 : (want > steps ? steps : want);
  const int64_t per = (steps + want - 1) / want;
  return {per * step, int((steps + per - 1) / per)};
}

// The channel step of the projection kernel for x's dtype.
inline int64_t mix_step(StreamDtype xtype) {
  switch (xtype) {
    case StreamDtype::kDouble: return kMixC<double>;
    case StreamDtype::kBFloat16: return kMixC<__nv_bfloat16>;
    case StreamDtype::kHalf: return kMixC<__half>;
    default: return kMixC<float>;
  }
}

// The token chunks of the backward: about 1024 blocks in all, at most 16 partials of grad_phi.
inline int64_t grad_tokens_per_chunk(int64_t tokens, int64_t C) {
  const int64_t cblocks = (C + kGradW - 1) / kGradW;
  int64_t chunks = (1024 + cblocks - 1) / cblocks;
  chunks = chunks < 1 ? 1 : (chunks > 16 ? 16 : chunks);
  return (tokens + chunks - 1) / chunks;
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
cudaError_t mhc_layer_input_grad(const void* x, StreamDtype xtype, const T* gy, const T* g_pre, T* g_pre_out,
                                 int64_t tokens, int n, int64_t C, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  with_stream_ptr<T>(xtype, x, [&](const auto* xp) {
    using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    // VEC = 16 bytes of X, with gy read as VEC values of T: C must allow both.
    const bool vectorize = can_vectorize<X>(C, {xp}) && can_vectorize<T>(C, {gy});
    with_vec<X>(vectorize, [&]<int VEC>() {
      err = launch<mhc_layer_input_grad_kernel<T, X, VEC>>(static_cast<unsigned int>(tokens), kRowThreads, 0, stream,
                                                           xp, gy, g_pre, g_pre_out, n, C);
    });
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

int64_t mhc_project_workspace(int64_t tokens, int64_t C, int D, StreamDtype xtype) {
  return int64_t(project_split(tokens, C, mix_step(xtype)).splits) * tokens * (D + 1);
}

namespace {
// The per-token sums mhc_grad_x_phi writes for `rows`: h_res's and h_post's gradient rows when
// either is wanted, gy's rows when wanted.
template <typename T>
int mix_terms(const MhcGradRows<T>& rows, int n) {
  return rows.mix.f && (rows.grad_h_res || rows.grad_h_post) ? n * n + n : 0;
}
template <typename T>
int row_terms(const MhcGradRows<T>& rows, int n) {
  return mix_terms(rows, n) + (rows.gy_rows ? n : 0);
}
}  // namespace

template <typename T>
int64_t mhc_grad_x_phi_workspace(int64_t tokens, int n, int64_t C, int D, const MhcGradRows<T>& rows) {
  if (tokens == 0) return 0;
  const int64_t per = grad_tokens_per_chunk(tokens, C);
  const int64_t chunks = (tokens + per - 1) / per;
  const int64_t cblocks = (C + kGradW - 1) / kGradW;
  return chunks * n * C * D + cblocks * tokens * row_terms(rows, n);
}

template <typename T>
cudaError_t mhc_project(void* rows, StreamDtype xtype, const MhcMixInputs<T>& mix, const T* pre_mix, int64_t pm_stride,
                        void* layer_input, const T* phi, T* workspace, T* proj, T* rstd, int64_t tokens, int n,
                        int64_t C, int D, T norm_eps, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  const ProjSplit sp = project_split(tokens, C, mix_step(xtype));
  const dim3 grid(ceil_div(tokens, kProjTokens), static_cast<unsigned int>(sp.splits));
  with_stream_ptr<T>(xtype, rows, [&](auto* rp) {
    using X = std::remove_pointer_t<decltype(rp)>;
    with_flag(mix.f != nullptr, [&]<bool kMix>() {
      err = launch<mhc_project_kernel<X, T, kMix>>(
          grid, kProjThreads, 0, stream, static_cast<const X*>(mix.f), kMix ? static_cast<const X*>(mix.x) : rp,
          mix.h_post, mix.hp_stride, mix.h_res, mix.hr_stride, rp, pre_mix, pm_stride, static_cast<X*>(layer_input),
          phi, workspace, tokens, n, C, D, sp.c_per_split);
    });
  });
  if (err != cudaSuccess) return err;
  const int64_t total = tokens * (D + 1);
  const int64_t blocks = (total + kRowThreads - 1) / kRowThreads;
  return launch<mhc_project_reduce_kernel<T>>(static_cast<unsigned int>(blocks < 65536 ? blocks : 65536), kRowThreads,
                                              0, stream, workspace, proj, rstd, tokens, D, sp.splits,
                                              int64_t(n) * C, norm_eps);
}

namespace {
int64_t stream_bytes(StreamDtype xtype) {
  return xtype == StreamDtype::kDouble ? 8 : xtype == StreamDtype::kFloat ? 4 : 2;
}
}  // namespace

bool mhc_project_resident(int n, int64_t C, int D, StreamDtype xtype, int device) {
  // The device must allow the rows and the static tiles in one block (sm_90: yes; sm_86/89: no).
  return D <= kMhcFusedMaxD && int64_t(kProjTokens) * n * C * stream_bytes(xtype) <= kResidentBytes &&
         kResidentBytes + kResidentStaticMax <= shared_memory_optin(device);
}

template <typename T>
cudaError_t mhc_project_aggregate(void* rows, StreamDtype xtype, const MhcMixInputs<T>& mix, const T* phi,
                                  const T* alpha, const T* bias, T pre_eps, T* proj, T* rstd, void* layer_input,
                                  int64_t tokens, int n, int64_t C, int D, T norm_eps, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (tokens == 0) return cudaSuccess;
  const ProjSplit sp = project_split(tokens, C, mix_step(xtype));  // mhc_project's splits: the same sums
  const size_t smem = size_t(kProjTokens) * n * C * stream_bytes(xtype);
  with_stream_ptr<T>(xtype, rows, [&](auto* rp) {
    using X = std::remove_pointer_t<decltype(rp)>;
    with_flag(mix.f != nullptr, [&]<bool kMix>() {
      constexpr auto kKernel = mhc_project_resident_kernel<X, T, kMix>;
      err = allow_dynamic_shared<kKernel>(kResidentBytes);
      if (err != cudaSuccess) return;
      err = launch<kKernel>(static_cast<unsigned int>(ceil_div(tokens, kProjTokens)), kProjThreads, smem, stream,
                            static_cast<const X*>(mix.f), kMix ? static_cast<const X*>(mix.x) : rp, mix.h_post,
                            mix.hp_stride, mix.h_res, mix.hr_stride, rp, phi, alpha, bias, pre_eps, norm_eps, proj,
                            rstd, static_cast<X*>(layer_input), tokens, n, C, D, sp.c_per_split);
    });
  });
  return err;
}

template <typename T>
cudaError_t mhc_grad_x_phi(const void* x, StreamDtype xtype, const T* phi, const T* dproj, const T* proj,
                           const T* rstd, const T* drstd, const T* gy, const T* mix, int64_t mix_stride,
                           const T* alpha, const T* bias, T pre_eps, const void* extra, void* dx,
                           const MhcGradRows<T>& rows, T* workspace, T* grad_phi, int64_t tokens, int n, int64_t C,
                           int D, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  const int64_t len = int64_t(n) * C;
  if (tokens == 0 || len == 0) return cudaSuccess;
  const int64_t per = grad_tokens_per_chunk(tokens, C);
  const int chunks = int((tokens + per - 1) / per);
  const int cblocks = int(ceil_div(C, kGradW));
  const dim3 grid(static_cast<unsigned int>(cblocks), static_cast<unsigned int>(chunks));
  const int threads = n * kGradW;
  T* row_partial = workspace + int64_t(chunks) * len * D;
  const int mterms = mix_terms(rows, n), terms = row_terms(rows, n);
  with_stream_ptr<T>(xtype, const_cast<void*>(x), [&](auto* xp) {
    using X = std::remove_pointer_t<decltype(xp)>;
    const MhcMixInputs<T>& m = rows.mix;
    const GradRows<X, T> r{static_cast<const X*>(m.f), static_cast<const X*>(m.x), m.h_post, m.h_res, m.hp_stride,
                           m.hr_stride, static_cast<X*>(rows.grad_f), static_cast<X*>(rows.grad_x), row_partial,
                           mterms, terms};
    auto go = [&]<int kMaxD>() {
      with_flag(m.f != nullptr, [&]<bool kMix>() {
        with_flag(rows.gy_rows != nullptr, [&]<bool kRows>() {
          err = launch<mhc_grad_x_phi_kernel<X, T, kMaxD, kMix, kRows>>(
              grid, threads, 0, stream, xp, phi, dproj, proj, rstd, drstd, gy, mix, mix_stride, alpha, bias, pre_eps,
              static_cast<const X*>(extra), static_cast<X*>(dx), workspace, tokens, n, C, D, per, r);
        });
      });
    };
    if (D <= 24) {
      go.template operator()<24>();
    } else {
      go.template operator()<kMhcFusedMaxD>();
    }
  });
  if (err != cudaSuccess) return err;
  const int64_t count = len * D;
  const int64_t blocks = (count + kRowThreads - 1) / kRowThreads;
  err = launch<mhc_grad_phi_reduce_kernel<T>>(static_cast<unsigned int>(blocks < 65536 ? blocks : 65536), kRowThreads,
                                              0, stream, workspace, grad_phi, count, chunks);
  if (err != cudaSuccess || terms == 0) return err;
  const int64_t row_blocks = (tokens * terms + kRowThreads - 1) / kRowThreads;
  return launch<mhc_grad_rows_reduce_kernel<T>>(
      static_cast<unsigned int>(row_blocks < 65536 ? row_blocks : 65536), kRowThreads, 0, stream, row_partial,
      rows.grad_h_res, rows.grad_h_post, rows.gy_rows, tokens, n, mterms, terms, cblocks);
}

#define HCEXT_INSTANTIATE_MHC(T)                                                                                   \
  template cudaError_t mhc_rows<T>(const void*, StreamDtype, T*, T*, int64_t, int64_t, T, cudaStream_t);            \
  template cudaError_t mhc_epilogue<T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int, int, T, T, \
                                       T, cudaStream_t);                                                          \
  template cudaError_t mhc_layer_input_grad<T>(const void*, StreamDtype, const T*, const T*, T*, int64_t, int,      \
                                               int64_t, cudaStream_t);                                            \
  template cudaError_t mhc_project<T>(void*, StreamDtype, const MhcMixInputs<T>&, const T*, int64_t, void*,       \
                                      const T*, T*, T*, T*, int64_t, int, int64_t, int, T, cudaStream_t);          \
  template cudaError_t mhc_project_aggregate<T>(void*, StreamDtype, const MhcMixInputs<T>&, const T*, const T*,     \
                                                const T*, T, T*, T*, void*, int64_t, int, int64_t, int, T,           \
                                                cudaStream_t);                                                       \
  template int64_t mhc_grad_x_phi_workspace<T>(int64_t, int, int64_t, int, const MhcGradRows<T>&);                 \
  template cudaError_t mhc_grad_x_phi<T>(const void*, StreamDtype, const T*, const T*, const T*, const T*,          \
                                         const T*, const T*, const T*, int64_t, const T*, const T*, T,              \
                                         const void*, void*, const MhcGradRows<T>&, T*, T*, int64_t, int, int64_t,  \
                                         int, cudaStream_t);                                                        \
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
