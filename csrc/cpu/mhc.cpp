// CPU implementation of the mHC coefficient ops: hcext::mhc_coeffs_fwd (and through it the
// public mhc_coeffs) and hcext::mhc_backward. The sequence of passes is mhc_driver.h; here
// are the CPU passes: at::parallel_for over tokens, the per-token epilogues (hcext/mhc.h,
// shared with CUDA) on blocks of kW tokens held in Lanes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "cpu/lane_io.h"
#include "hcext/dispatch.h"
#include "hcext/lanes.h"
#include "hcext/mhc.h"
#include "mhc_driver.h"

namespace hcext {
namespace {

constexpr int kW = 8;  // tokens per block of lanes

using cpu::LaneHistory;
using cpu::load_lanes;
using cpu::store_lanes;

// Dot product with kW independent accumulators (vectorisable without -ffast-math).
template <typename T>
T dot(const T* a, const T* b, int64_t len) {
  Lanes<T, kW> acc(T(0));
  int64_t k = 0;
  for (; k + kW <= len; k += kW) {
    for (int l = 0; l < kW; ++l) acc.v[l] += a[k + l] * b[k + l];
  }
  T s = 0;
  for (int l = 0; l < kW; ++l) s += acc.v[l];
  for (; k < len; ++k) s += a[k] * b[k];
  return s;
}

template <typename T>
void compute_rstd(const T* xf, T* rstd, const MhcDims& d, double norm_eps) {
  const int64_t len = d.n * d.C;
  at::parallel_for(0, d.tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = xf + t * len;
      rstd[t] = mhc_rstd<T>(dot(row, row, len), T(len), T(norm_eps));
    }
  });
}

template <typename T>
void epilogue_forward(const T* proj, const T* rstd, const T* alpha, const T* bias, T* h_pre, T* h_post, T* h_res,
                      const MhcDims& d, const MhcScalars& s) {
  using V = Lanes<T, kW>;
  const int n = d.n;
  const int64_t blocks = (d.tokens + kW - 1) / kW;
  dispatch_streams(n, [&]<int kN, int kMaxN>() {
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
  dispatch_streams(n, [&]<int kN, int kMaxN>() {
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

// g_pre_total[t, i] = g_pre[t, i] + sum_c gy[t, c] * x[t, i, c]: the layer input's share of dh_pre.
template <typename T>
void add_layer_input_grad_to_h_pre(const T* xf, const T* gy, const T* g_pre, T* out, const MhcDims& d) {
  at::parallel_for(0, d.tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int i = 0; i < d.n; ++i) {
        const T base = g_pre ? g_pre[t * d.n + i] : T(0);
        out[t * d.n + i] = base + dot(gy + t * d.C, xf + (t * d.n + i) * d.C, d.C);
      }
    }
  });
}

// dx = dxp (the projection GEMM's share) + rstd's share + the layer input's share
// (h_pre[i] * gy), summed in fp32 and rounded to x's dtype once.
template <typename T, typename X>
void grad_x_pass(const T* xf, const T* dxp, const T* proj, const T* rstd, const T* drstd, const T* gy, const T* alpha,
                 const T* bias, double pre_eps, X* dx, const MhcDims& d) {
  const int64_t len = d.n * d.C;
  at::parallel_for(0, d.tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T factor = mhc_rstd_grad_factor<T>(drstd[t], rstd[t], T(len));
      for (int i = 0; i < d.n; ++i) {
        const int64_t row = t * len + i * d.C;
        if (gy) {
          const T h = mhc_h_pre<T, T>(proj[t * d.D + i], rstd[t], alpha, bias[i], T(pre_eps));
          const T* g = gy + t * d.C;
          for (int64_t c = 0; c < d.C; ++c) dx[row + c] = X(dxp[row + c] + factor * xf[row + c] + h * g[c]);
        } else {
          for (int64_t c = 0; c < d.C; ++c) dx[row + c] = X(dxp[row + c] + factor * xf[row + c]);
        }
      }
    }
  });
}

// The CPU passes of mhc_driver.h.
struct CpuMhcBackend {
  explicit CpuMhcBackend(const at::Tensor&) {}

  at::Tensor rows(const at::Tensor& x, at::Tensor& rstd, const MhcDims& d, double norm_eps) {
    at::Tensor xf = rows_in_compute_dtype(x, d);
    dispatch_compute(d.compute, [&](auto zero) {
      using T = decltype(zero);
      compute_rstd<T>(xf.data_ptr<T>(), rstd.data_ptr<T>(), d, norm_eps);
    });
    return xf;
  }
  template <typename T>
  void epilogue(const T* proj, const T* rstd, const T* alpha, const T* bias, T* h_pre, T* h_post, T* h_res,
                const MhcDims& d, const MhcScalars& s) {
    epilogue_forward<T>(proj, rstd, alpha, bias, h_pre, h_post, h_res, d, s);
  }
  template <typename T>
  void layer_input_grad(const T* xf, const T* gy, const T* g_pre, T* out, const MhcDims& d) {
    add_layer_input_grad_to_h_pre<T>(xf, gy, g_pre, out, d);
  }
  template <typename T>
  void epilogue_backward(const T* proj, const T* rstd, const T* alpha, const T* bias, const T* g_pre, const T* g_post,
                         const T* g_res, T* dl, T* dproj, T* dalpha, T* drstd, const MhcDims& d, const MhcScalars& s) {
    hcext::epilogue_backward<T>(proj, rstd, alpha, bias, g_pre, g_post, g_res, dl, dproj, dalpha, drstd, d, s);
  }
  template <typename T>
  void grad_x(const T* xf, const T* dxp, const T* proj, const T* rstd, const T* drstd, const T* gy, const T* alpha,
              const T* bias, double pre_eps, at::Tensor& dx, const MhcDims& d) {
    auto write = [&](auto* out) { grad_x_pass<T>(xf, dxp, proj, rstd, drstd, gy, alpha, bias, pre_eps, out, d); };
    switch (dx.scalar_type()) {
      case at::kFloat: return write(dx.data_ptr<float>());
      case at::kDouble: return write(dx.data_ptr<double>());
      case at::kBFloat16: return write(dx.data_ptr<at::BFloat16>());
      default: return write(dx.data_ptr<at::Half>());
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CPU, m) {
  m.impl("mhc_coeffs_fwd", &mhc_coeffs_fwd_impl<CpuMhcBackend>);
  m.impl("mhc_pre_fwd", &mhc_pre_fwd_impl<CpuMhcBackend>);
  m.impl("mhc_backward", &mhc_backward_impl<CpuMhcBackend>);
}

}  // namespace hcext
