// The CPU backend of the mHC family (the sequence of passes is mhc_driver.h; the layer
// input and the boundary's mix are the streams CPU backend's, streams_cpu.h). Here are the
// CPU passes: at::parallel_for over tokens, the per-token epilogues (hcext/mhc.h,
// shared with CUDA) on blocks of kW tokens held in Lanes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_lane_io.h"
#include "common/cpu_vec_io.h"
#include "hcext/dispatch.h"
#include "hcext/lanes.h"
#include "hcext/mhc.h"
#include "mhc/mhc_driver.h"
#include "streams/streams_cpu.h"

namespace hcext {
namespace {

constexpr int kW = 8;  // tokens per block of lanes

constexpr int kVec = cpu::kVecIoWidth;  // channels per block in the row passes

using cpu::for_channel_blocks;
using cpu::lane_sum;
using cpu::load_block;
using cpu::row_grain;
using cpu::store_block;
using cpu::LaneHistory;
using cpu::load_lanes;
using cpu::store_lanes;

// ---- Row passes over x's n*C channels (vectorised, compiled per ISA: common/cpu_isa.h).
// S: the compute type (float, double); X: the streams' dtype.

// rstd[t] from the sum of squares of row t; xf (nullable) receives the row in S.
template <typename S, typename X>
[[gnu::always_inline]] inline void rows_range(const X* x, S* xf, S* rstd, int64_t len, S norm_eps, int64_t t0,
                                              int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    Lanes<S, kVec> squares(S(0));
    for_channel_blocks(len, [&](int64_t c, auto valid) __attribute__((always_inline)) {
      const Lanes<S, kVec> v = load_block<S>(x + t * len + c, valid);
      squares = squares + v * v;
      if (xf) store_block(xf + t * len + c, v, valid);
    });
    rstd[t] = mhc_rstd<S>(lane_sum(squares), S(len), norm_eps);
  }
}

// out[t, i] = g_pre[t, i] (or 0) + sum_c gy[t, c] * xf[t, i, c]: the layer input's share of dh_pre.
template <typename S>
[[gnu::always_inline]] inline void layer_input_grad_range(const S* xf, const S* gy, const S* g_pre, S* out, int n,
                                                          int64_t C, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int i = 0; i < n; ++i) {
      Lanes<S, kVec> acc(S(0));
      const S* row = xf + (t * n + i) * C;
      for_channel_blocks(C, [&](int64_t c, auto valid) __attribute__((always_inline)) {
        acc = acc + load_block<S>(gy + t * C + c, valid) * load_block<S>(row + c, valid);
      });
      out[t * n + i] = (g_pre ? g_pre[t * n + i] : S(0)) + lane_sum(acc);
    }
  }
}

// dx = dxp (the projection GEMM's share) + rstd's share + the layer input's share
// (h_i * gy, when gy: h_i = mix[t * mix_stride + i] for the shifted collapse, else h_pre[i]
// recomputed from proj) + extra (when non-null: a gradient from another consumer of x,
// in x's dtype), summed in S and rounded to x's dtype once. dx may alias dxp (block by
// block, every element is read before it is written).
template <typename S, typename X>
[[gnu::always_inline]] inline void grad_x_range(const S* xf, const S* dxp, const S* proj, const S* rstd,
                                                const S* drstd, const S* gy, const S* mix, int64_t mix_stride,
                                                const S* alpha, const S* bias, S pre_eps,
                                                const X* extra, X* dx, int n, int64_t C, int64_t D, int64_t t0,
                                                int64_t t1) {
  const int64_t len = n * C;
  for (int64_t t = t0; t < t1; ++t) {
    const S factor = mhc_rstd_grad_factor<S>(drstd[t], rstd[t], S(len));
    for (int i = 0; i < n; ++i) {
      const int64_t row = t * len + i * C;
      const S h = !gy ? S(0)
                  : mix ? mix[t * mix_stride + i]
                        : mhc_h_pre<S, S>(proj[t * D + i], rstd[t], alpha, bias[i], pre_eps);
      for_channel_blocks(C, [&](int64_t c, auto valid) __attribute__((always_inline)) {
        Lanes<S, kVec> v = load_block<S>(dxp + row + c, valid) + factor * load_block<S>(xf + row + c, valid);
        if (gy) v = v + h * load_block<S>(gy + t * C + c, valid);
        if (extra) v = v + load_block<S>(extra + row + c, valid);
        store_block(dx + row + c, v, valid);
      });
    }
  }
}

#define HCEXT_MHC_ROW_KERNELS(Name, ...)                                                          \
  struct Name {                                                                                   \
    template <typename... A>                                                                      \
    __VA_ARGS__ static void rows(A... a) { rows_range(a...); }                                    \
    template <typename... A>                                                                      \
    __VA_ARGS__ static void layer_input_grad(A... a) { layer_input_grad_range(a...); }            \
    template <typename... A>                                                                      \
    __VA_ARGS__ static void grad_x(A... a) { grad_x_range(a...); }                                \
  };
HCEXT_MHC_ROW_KERNELS(BaselineRowKernels)
HCEXT_MHC_ROW_KERNELS(Avx2RowKernels, HCEXT_TARGET_AVX2)
HCEXT_MHC_ROW_KERNELS(Avx512RowKernels, HCEXT_TARGET_AVX512)
#undef HCEXT_MHC_ROW_KERNELS

// fn(kernels) with the best row-kernel set for this CPU.
template <typename Fn>
void dispatch_row_kernels(Fn&& fn) {
  cpu::dispatch_isa<BaselineRowKernels, Avx2RowKernels, Avx512RowKernels>(fn);
}

template <typename T>
void epilogue_forward(const T* proj, const T* rstd, const T* alpha, const T* bias, T* h_pre, T* h_post, T* h_res,
                      const MhcDims& d, const MhcScalars& s) {
  using V = Lanes<T, kW>;
  const int n = d.n;
  const int64_t blocks = (d.tokens + kW - 1) / kW;
  dispatch_n(n, [&]<int kN, int kMaxN>() {
    at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
      V P[kMaxN * kMaxN + 2 * kMaxN], hp[kMaxN], hq[kMaxN], hr[kMaxN * kMaxN], r;
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t b = blk * kW;
        load_lanes(P, proj, b, d.tokens, d.D, static_cast<int>(d.D));
        load_lanes(&r, rstd, b, d.tokens, 1, 1);
        mhc_coeffs_epilogue<kN>(P, r, alpha, bias, n, s.iters, T(s.sinkhorn_eps), T(s.pre_eps), T(s.post_mult), hp,
                                hq, hr);
        store_lanes(h_pre, hp, b, d.tokens, n, n);
        store_lanes(h_post, hq, b, d.tokens, n, n);
        store_lanes(h_res, hr, b, d.tokens, n * n, n * n);
      }
    });
  });
}

// Backward epilogue on blocks of lanes: -> dl, dproj [tokens, D], dalpha [tokens, 3], drstd [tokens].
// g_pre / g_post / g_res may be null (zero gradient).
template <typename T>
void epilogue_backward(const T* proj, const T* rstd, const T* alpha, const T* bias, const T* g_pre, const T* g_post,
                       const T* g_res, T* dl, T* dproj, T* dalpha, T* drstd, const MhcDims& d, const MhcScalars& s) {
  using V = Lanes<T, kW>;
  const int n = d.n;
  const int D = static_cast<int>(d.D);
  const int64_t blocks = (d.tokens + kW - 1) / kW;
  auto load_or_zero = [&](V* dst, const T* src, int64_t b, int count) {
    if (src) {
      load_lanes(dst, src, b, d.tokens, count, count);
    } else {
      for (int k = 0; k < count; ++k) dst[k] = V(T(0));
    }
  };
  dispatch_n(n, [&]<int kN, int kMaxN>() {
    constexpr int kMaxD = kMaxN * kMaxN + 2 * kMaxN;
    at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
      V P[kMaxD], gp[kMaxN], gq[kMaxN], gr[kMaxN * kMaxN], scratch[kMaxN * kMaxN], L[kMaxD], DP[kMaxD], da[3], r, dr;
      std::vector<V> denominators(static_cast<size_t>(sinkhorn_half_steps(s.iters)) * n);  // per chunk
      LaneHistory<V> hist{denominators.data(), n};
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t b = blk * kW;
        load_lanes(P, proj, b, d.tokens, D, D);
        load_lanes(&r, rstd, b, d.tokens, 1, 1);
        load_or_zero(gp, g_pre, b, n);
        load_or_zero(gq, g_post, b, n);
        load_or_zero(gr, g_res, b, n * n);
        mhc_coeffs_epilogue_backward<kN>(P, r, alpha, bias, n, s.iters, T(s.sinkhorn_eps), T(s.post_mult), gp, gq, gr,
                                         scratch, hist, L, DP, da, dr);
        store_lanes(dl, L, b, d.tokens, D, D);
        store_lanes(dproj, DP, b, d.tokens, D, D);
        store_lanes(dalpha, da, b, d.tokens, 3, 3);
        store_lanes(drstd, &dr, b, d.tokens, 1, 1);
      }
    });
  });
}

// The CPU passes of mhc_driver.h.
struct CpuMhcBackend {
  explicit CpuMhcBackend(const at::Tensor&) {}

  using Streams = CpuStreamsBackend;

  // x: contiguous rows of len elements in their own dtype; xf (nullable) receives them in T.
  template <typename T>
  void rows(const at::Tensor& x, T* xf, T* rstd, int64_t tokens, int64_t len, T norm_eps) {
    Streams::dispatch_dtype_for<T>(x.scalar_type(), [&](auto xtag) {
      using X = decltype(xtag);
      const X* xp = static_cast<const X*>(x.data_ptr());
      dispatch_row_kernels([&](auto k) {
        at::parallel_for(0, tokens, row_grain(len), [&](int64_t t0, int64_t t1) {
          decltype(k)::rows(xp, xf, rstd, len, norm_eps, t0, t1);
        });
      });
    });
  }
  template <typename T>
  void epilogue(const T* proj, const T* rstd, const T* alpha, const T* bias, T* h_pre, T* h_post, T* h_res,
                const MhcDims& d, const MhcScalars& s) {
    epilogue_forward<T>(proj, rstd, alpha, bias, h_pre, h_post, h_res, d, s);
  }
  template <typename T>
  void layer_input_grad(const T* xf, const T* gy, const T* g_pre, T* out, const MhcDims& d) {
    dispatch_row_kernels([&](auto k) {
      at::parallel_for(0, d.tokens, row_grain(d.n * d.C), [&](int64_t t0, int64_t t1) {
        decltype(k)::layer_input_grad(xf, gy, g_pre, out, d.n, d.C, t0, t1);
      });
    });
  }
  template <typename T>
  void epilogue_backward(const T* proj, const T* rstd, const T* alpha, const T* bias, const T* g_pre, const T* g_post,
                         const T* g_res, T* dl, T* dproj, T* dalpha, T* drstd, const MhcDims& d, const MhcScalars& s) {
    hcext::epilogue_backward<T>(proj, rstd, alpha, bias, g_pre, g_post, g_res, dl, dproj, dalpha, drstd, d, s);
  }
  // extra: undefined, or a [tokens, n*C]-sized contiguous gradient in dx's dtype.
  template <typename T>
  void grad_x(const T* xf, const T* dxp, const T* proj, const T* rstd, const T* drstd, const T* gy, const T* mix,
              int64_t mix_stride, const T* alpha, const T* bias, double pre_eps, const at::Tensor& extra,
              at::Tensor& dx, const MhcDims& d) {
    Streams::dispatch_dtype_for<T>(dx.scalar_type(), [&](auto xtag) {
      using X = decltype(xtag);
      const X* e = data_or_null<const X>(extra);
      X* out = data_or_null<X>(dx);
      dispatch_row_kernels([&](auto k) {
        at::parallel_for(0, d.tokens, row_grain(d.n * d.C), [&](int64_t t0, int64_t t1) {
          decltype(k)::grad_x(xf, dxp, proj, rstd, drstd, gy, mix, mix_stride, alpha, bias, static_cast<T>(pre_eps), e,
                              out, d.n, d.C, d.D, t0, t1);
        });
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CPU, m) { register_mhc_kernels<CpuMhcBackend>(m); }

}  // namespace hcext
