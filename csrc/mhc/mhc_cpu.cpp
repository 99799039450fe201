// The CPU backend of the mHC family (the sequence of passes is mhc_driver.h; the layer
// input and the boundary's mix are the streams CPU backend's, streams_cpu.h). Here are the
// CPU passes: at::parallel_for over tokens, the per-token epilogues (hcext/mhc.h,
// shared with CUDA) on blocks of kW tokens held in Lanes, and the passes over x that
// replace the projection GEMMs (mhc_cpu_passes.cpp: x read in its own dtype, no fp32 copy).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
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
#include "mhc/mhc_cpu_passes.h"
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

// ---- Row pass over x's channels (vectorised, compiled per ISA: common/cpu_isa.h).
// S: the compute type (float, double); X: the streams' dtype.

// out[t, i] = g_pre[t, i] (or 0) + sum_c gy[t, c] * x[t, i, c]: the layer input's share of
// dh_pre (x in its own dtype X).
template <typename S, typename X>
[[gnu::always_inline]] inline void layer_input_grad_range(const X* x, const S* gy, const S* g_pre, S* out, int n,
                                                          int64_t C, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int i = 0; i < n; ++i) {
      Lanes<S, kVec> acc(S(0));
      const X* row = x + (t * n + i) * C;
      for_channel_blocks(C, [&](int64_t c, auto valid) __attribute__((always_inline)) {
        acc = acc + load_block<S>(gy + t * C + c, valid) * load_block<S>(row + c, valid);
      });
      out[t * n + i] = (g_pre ? g_pre[t * n + i] : S(0)) + lane_sum(acc);
    }
  }
}

#define HCEXT_MHC_ROW_KERNELS(Name, ...)                                                          \
  struct Name {                                                                                   \
    template <typename... A>                                                                      \
    __VA_ARGS__ static void layer_input_grad(A... a) { layer_input_grad_range(a...); }            \
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

// Backward epilogue on the blocks [b0, b1) of kW tokens (lanes), on the calling thread:
// -> dl, dproj [tokens, D], dalpha [tokens, 3], drstd [tokens]. g_pre / g_post / g_res may be
// null (zero gradient). Each lane is one token: the results do not depend on the blocks' split.
template <typename T>
void epilogue_backward_blocks(const T* proj, const T* rstd, const T* alpha, const T* bias, const T* g_pre,
                              const T* g_post, const T* g_res, T* dl, T* dproj, T* dalpha, T* drstd, const MhcDims& d,
                              const MhcScalars& s, int64_t b0, int64_t b1) {
  using V = Lanes<T, kW>;
  const int n = d.n;
  const int D = static_cast<int>(d.D);
  auto load_or_zero = [&](V* dst, const T* src, int64_t b, int count) {
    if (src) {
      load_lanes(dst, src, b, d.tokens, count, count);
    } else {
      for (int k = 0; k < count; ++k) dst[k] = V(T(0));
    }
  };
  dispatch_n(n, [&]<int kN, int kMaxN>() {
    constexpr int kMaxD = kMaxN * kMaxN + 2 * kMaxN;
    V P[kMaxD], gp[kMaxN], gq[kMaxN], gr[kMaxN * kMaxN], scratch[kMaxN * kMaxN], L[kMaxD], DP[kMaxD], da[3], r, dr;
    std::vector<V> denominators(static_cast<size_t>(sinkhorn_half_steps(s.iters)) * n);
    LaneHistory<V> hist{denominators.data(), n};
    for (int64_t blk = b0; blk < b1; ++blk) {
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
}

// The CPU passes of mhc_driver.h.
struct CpuMhcBackend {
  explicit CpuMhcBackend(const at::Tensor&) {}

  using Streams = CpuStreamsBackend;
  // The layer input (either collapse) from the projection pass's rows, while they are cached.
  static bool projection_aggregates(const MhcDims&, const at::Tensor&) { return true; }
  // proj = x @ phi and rstd, one pass over x's rows (contiguous [tokens, n*C], x's dtype),
  // and, when layer_input is given, Σ h_pre[i] x_i from the same rows while they are cached;
  // with mix, each row of x is first written as the boundary's mix (x is x_next).
  // Each token's sums run over k in order whatever the threads' split: deterministic.
  // collapse: the shifted collapse's layer input Σ pre_mix[i] x_i instead (the same pass).
  static bool projection_collapses(const MhcDims&) { return true; }
  template <typename T>
  void project(const at::Tensor& x_rows, const at::Tensor& phi, at::Tensor& proj_rows, at::Tensor& rstd_rows,
               const MhcDims& d, T norm_eps, at::Tensor* layer_input, const T* alpha, const T* bias, T pre_eps,
               const MhcBoundaryMix* mix, const MhcCollapse* collapse) {
    TORCH_INTERNAL_ASSERT(!(layer_input && collapse), "one collapse per pass");
    if (collapse) layer_input = &collapse->layer_input;
    T* proj = proj_rows.data_ptr<T>();
    T* rstd = rstd_rows.data_ptr<T>();
    const int64_t len = d.n * d.C, D = d.D;
    const int64_t Dp = cpu::mhc_project_width(D, std::is_same_v<T, double>);
    at::Tensor phi_pad = phi.contiguous();
    if (Dp != D) {
      at::Tensor padded = at::zeros({len, Dp}, phi.options());
      padded.narrow(1, 0, D).copy_(phi);
      phi_pad = padded;
    }
    const T* ph = phi_pad.data_ptr<T>();
    Streams::dispatch_dtype_for<T>(x_rows.scalar_type(), [&](auto xtag) {
      using X = decltype(xtag);
      const X* xp = static_cast<const X*>(x_rows.data_ptr());
      const cpu::MhcLayerInputArgs<T, X> li{alpha, bias, pre_eps, d.n,
                                            layer_input ? static_cast<X*>(layer_input->data_ptr()) : nullptr,
                                            collapse ? collapse->pre_mix.h.data_ptr<T>() : nullptr,
                                            collapse ? collapse->pre_mix.token_stride : 0};
      cpu::MhcMixArgs<T, X> mx{};
      if (mix) {
        mx = {static_cast<const X*>(mix->f.data_ptr()), static_cast<const X*>(mix->p.x.data_ptr()),
              mix->h_post.h.data_ptr<T>(), mix->h_post.token_stride, mix->h_res.h.data_ptr<T>(),
              mix->h_res.token_stride, d.n};
      }
      at::parallel_for(0, d.tokens, std::max<int64_t>(4, row_grain(len * D / 8)), [&](int64_t t0, int64_t t1) {
        std::vector<T> buf(std::is_same_v<X, T> ? 0 : 4 * len);
        cpu::mhc_project_rows<T, X>(xp, ph, Dp, proj, rstd, len, D, norm_eps, t0, t1, buf.data(),
                                    layer_input ? &li : nullptr, mix ? &mx : nullptr);
      });
    });
  }
  // The backward in one pass over x's rows (contiguous, x's dtype), per block of
  // kMhcGradChunkTokens (24) tokens while its rows are in cache:
  //   1. the layer input's row sums Σ_c gy x_i (the block's rows read from memory),
  //   2. the epilogue's backward of the block's tokens (dl, dproj, dalpha, drstd),
  //   3. grad_x (every term, rounded once to x's dtype) and the block's share of grad_phi (the
  //      rows read again, from cache),
  //   4. the fused boundary only: the mix's backward on the block's grad_x (x_next's gradient),
  //      kept in a per-thread buffer in x's dtype instead of memory: the same kernel and the
  //      same values as stream_mix_expand_backward on the stored gradient.
  // grad_phi's sum over tokens runs in fixed chunks of blocks (their number depends on the
  // token count only) added in chunk order: deterministic, whatever the thread count.
  static constexpr bool kFusedBackwardPass = true;
  static bool grad_pass_fuses(const MhcDims&) { return true; }  // the boundary's mix backward: step 4
  template <typename T>
  void backward_pass(const MhcBackwardPass<T>& a, const MhcDims& d, const MhcScalars& s) {
    constexpr int64_t kBlock = cpu::kMhcGradChunkTokens;
    static_assert(kBlock % kW == 0, "blocks of tokens are whole blocks of the epilogue's lanes");
    const int n = d.n;
    const int64_t T_ = d.tokens, C = d.C, len = n * C, D = d.D;
    const auto opts = a.phi.options();
    // The epilogue's g_pre: the row sums (which include the incoming g_pre) or the incoming g_pre.
    const T* epi_g_pre = a.gy && !a.shifted ? a.row_sums : a.g_pre;
    // Per-token factors of grad_x: the RMS statistic's share and the layer input's coefficient.
    at::Tensor factor = at::empty({T_}, opts), h = at::empty({a.gy ? T_ * n : 0}, opts);
    T* fp = factor.data_ptr<T>();
    T* hp = h.data_ptr<T>();
    // phi and the chunks' partial sums of grad_phi in the grad_x pass's panel layout.
    const int64_t psize = cpu::mhc_panel_size<T>(n, C, D), npanels = n * cpu::mhc_panels<T>(C);
    at::Tensor phiP = at::empty({psize}, opts);
    cpu::mhc_pack_phi_panels<T>(a.phi.template data_ptr<T>(), phiP.data_ptr<T>(), n, C, D);
    int64_t chunk = std::max<int64_t>(256, (T_ + 15) / 16);
    chunk = (chunk + kBlock - 1) / kBlock * kBlock;
    const int64_t chunks = (T_ + chunk - 1) / chunk;
    at::Tensor partials = at::zeros({chunks, psize}, opts);
    T* part = partials.data_ptr<T>();
    MhcBoundaryMixGrad* mg = a.mix_grad;
    Streams::dispatch_dtype_for<T>(a.x_rows.scalar_type(), [&](auto xtag) {
      using X = decltype(xtag);
      const X* xp = static_cast<const X*>(a.x_rows.data_ptr());
      const X* ex = data_or_null<const X>(a.extra_rows);
      const int64_t row = C * int64_t(sizeof(X));
      X* out = mg ? nullptr : static_cast<X*>(a.grad_x.data_ptr());
      const bool stream_dx = out && cpu::use_stream_stores(out, T_ * n * row, row);
      // The boundary's mix backward: its inputs, outputs (nullable) and stores.
      const X *mf = nullptr, *mx = nullptr;
      X *gf = nullptr, *gx = nullptr;
      T *ghp = nullptr, *ghr = nullptr;
      bool stream_mix = false;
      if (mg) {
        mf = static_cast<const X*>(mg->f.data_ptr());
        mx = static_cast<const X*>(mg->p.x.data_ptr());
        gf = mg->grad_f.numel() ? static_cast<X*>(mg->grad_f.data_ptr()) : nullptr;
        gx = mg->grad_x.numel() ? static_cast<X*>(mg->grad_x.data_ptr()) : nullptr;
        ghp = mg->grad_h_post.rows<T>();
        ghr = mg->grad_h_res.rows<T>();
        stream_mix = Streams::mix_backward_streams<X>(gf, gx, T_, n, C);
      }
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        // The boundary: one block of x_next's gradient, in x's dtype (rounded once, as stored).
        std::vector<X> gbuf(mg ? kBlock * len : 0);
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t t0 = c * chunk; t0 < std::min(T_, (c + 1) * chunk); t0 += kBlock) {
            const int64_t t1 = std::min({T_, (c + 1) * chunk, t0 + kBlock}), nt = t1 - t0;
            if (a.gy) {
              dispatch_row_kernels([&](auto k) {
                decltype(k)::layer_input_grad(xp, a.gy, a.shifted ? nullptr : a.g_pre, a.row_sums, n, C, t0, t1);
              });
            }
            epilogue_backward_blocks<T>(a.proj, a.rstd, a.alpha, a.bias, epi_g_pre, a.g_post, a.g_res, a.dl, a.dproj,
                                        a.dalpha, a.drstd, d, s, t0 / kW, (t1 + kW - 1) / kW);
            for (int64_t t = t0; t < t1; ++t) {
              fp[t] = mhc_rstd_grad_factor<T>(a.drstd[t], a.rstd[t], T(len));
              if (!a.gy) continue;
              for (int i = 0; i < n; ++i) {
                hp[t * n + i] = a.shifted ? a.pre_mix[t * a.pre_mix_stride + i]
                                          : mhc_h_pre<T, T>(a.proj[t * D + i], a.rstd[t], a.alpha, a.bias[i], a.pre_eps);
              }
            }
            // The next block this thread runs (in this chunk or its next one), prefetched by the
            // grad_x pass.
            const int64_t u0 = t1 < std::min(T_, (c + 1) * chunk) ? t1 : (c + 1 < c1 ? (c + 1) * chunk : T_);
            const int64_t u1 = std::min({T_, u0 + kBlock, (u0 / chunk + 1) * chunk});
            const cpu::MhcNextRows<T, X> next{xp + u0 * len, ex ? ex + u0 * len : nullptr,
                                              a.gy ? a.gy + u0 * C : nullptr, u1 - u0};
            // The block's pointers start at token t0 (its tokens are [0, nt) of the pass).
            cpu::mhc_grad_x_phi_rows<T, X>(xp + t0 * len, phiP.data_ptr<T>(), a.dproj + t0 * D, fp + t0,
                                           a.gy ? hp + t0 * n : nullptr, a.gy ? a.gy + t0 * C : nullptr,
                                           ex ? ex + t0 * len : nullptr, mg ? gbuf.data() : out + t0 * len,
                                           part + c * psize, n, C, D, 0, nt, stream_dx, u1 > u0 ? &next : nullptr);
            if (mg) {
              Streams::mix_backward_rows<X, T>(
                  gbuf.data(), mf + t0 * C, mx + t0 * len, mg->h_post.h.data_ptr<T>() + t0 * mg->h_post.token_stride,
                  mg->h_post.token_stride, mg->h_res.h.data_ptr<T>() + t0 * mg->h_res.token_stride,
                  mg->h_res.token_stride, gf ? gf + t0 * C : nullptr, gx ? gx + t0 * len : nullptr,
                  ghp ? ghp + t0 * n : nullptr, ghr ? ghr + t0 * n * n : nullptr, nt, n, C, stream_mix);
            }
          }
        }
      });
    });
    // grad_phi [len, D]: the chunks' partial sums added in chunk order.
    a.grad_phi = at::empty({len, D}, opts);
    T* grad_phi = a.grad_phi.template data_ptr<T>();
    at::parallel_for(0, npanels, 4, [&](int64_t q0, int64_t q1) {
      cpu::mhc_sum_panels<T>(part, chunks, grad_phi, n, C, D, q0, q1);
    });
  }

  template <typename T>
  void epilogue(const T* proj, const T* rstd, const T* alpha, const T* bias, T* h_pre, T* h_post, T* h_res,
                const MhcDims& d, const MhcScalars& s) {
    epilogue_forward<T>(proj, rstd, alpha, bias, h_pre, h_post, h_res, d, s);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CPU, m) { register_mhc_kernels<CpuMhcBackend>(m); }

}  // namespace hcext
