// CPU implementation of the mHC coefficient ops: hcext::mhc_coeffs_fwd (and through it the
// public mhc_coeffs) and hcext::mhc_backward. The projection GEMMs are at::mm; the
// per-token epilogues (hcext/mhc.h, shared with CUDA) run on blocks of Lanes tokens.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <vector>

#include "cpu/lane_io.h"
#include "hcext/dispatch.h"
#include "hcext/lanes.h"
#include "hcext/mhc.h"
#include "mhc_args.h"

namespace hcext {
namespace {

constexpr int kW = 8;  // tokens per block of lanes

using cpu::LaneHistory;
using cpu::load_lanes;
using cpu::store_lanes;

struct MhcScalars {
  int iters;
  double norm_eps, sinkhorn_eps, pre_eps, post_mult;
};

// x as fp32 (fp64) rows [tokens, n*C]: the GEMM operand; no copy for contiguous fp32 x.
at::Tensor rows_in_compute_dtype(const at::Tensor& x, const MhcDims& d) {
  return x.reshape({d.tokens, d.n * d.C}).to(d.compute).contiguous();
}

// Sum of the k-th block of 8 (SIMD) products; T accumulates in its own precision.
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

std::vector<int64_t> lead_shape(const at::Tensor& x, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.insert(shape.end(), tail);
  return shape;
}

// -> (h_pre [..., n], h_post [..., n], h_res [..., n, n], proj [..., D], rstd [...])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mhc_coeffs_fwd_cpu(
    const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias, int64_t iters,
    double norm_eps, double sinkhorn_eps, double pre_eps, double post_mult) {
  const char* op = "hcext::mhc_coeffs";
  const MhcDims d = check_mhc_args(x, phi, alpha, bias, iters, sinkhorn_eps, op);
  check_mhc_norm_eps(norm_eps, op);
  check_mhc_scalars(pre_eps, post_mult, op);
  const MhcScalars s{static_cast<int>(iters), norm_eps, sinkhorn_eps, pre_eps, post_mult};
  const auto opts = x.options().dtype(d.compute);
  const int64_t n = d.n;
  at::Tensor h_pre = at::empty(lead_shape(x, {n}), opts);
  at::Tensor h_post = at::empty(lead_shape(x, {n}), opts);
  at::Tensor h_res = at::empty(lead_shape(x, {n, n}), opts);
  at::Tensor rstd = at::empty(lead_shape(x, {}), opts);
  if (d.tokens == 0) return {h_pre, h_post, h_res, at::empty(lead_shape(x, {d.D}), opts), rstd};
  const at::Tensor xf = rows_in_compute_dtype(x, d);
  at::Tensor proj = at::mm(xf, phi).reshape(lead_shape(x, {d.D}));
  const at::Tensor a = alpha.contiguous(), b = bias.contiguous();
  auto run = [&](auto zero) {
    using T = decltype(zero);
    compute_rstd<T>(xf.data_ptr<T>(), rstd.data_ptr<T>(), d, norm_eps);
    epilogue_forward<T>(proj.data_ptr<T>(), rstd.data_ptr<T>(), a.data_ptr<T>(), b.data_ptr<T>(), h_pre.data_ptr<T>(),
                        h_post.data_ptr<T>(), h_res.data_ptr<T>(), d, s);
  };
  if (d.compute == at::kDouble) run(double{}); else run(float{});
  return {h_pre, h_post, h_res, proj, rstd};
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

at::Tensor optional_rows(const c10::optional<at::Tensor>& g, int64_t rows, int64_t cols, at::ScalarType dtype) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  return g->reshape({rows, cols}).to(dtype).contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// -> (grad_x, grad_phi, grad_alpha, grad_bias)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mhc_backward_cpu(
    const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
    const at::Tensor& proj, const at::Tensor& rstd, const c10::optional<at::Tensor>& grad_layer_input,
    const c10::optional<at::Tensor>& grad_h_pre, const c10::optional<at::Tensor>& grad_h_post,
    const c10::optional<at::Tensor>& grad_h_res, int64_t iters, double sinkhorn_eps, double pre_eps,
    double post_mult) {
  const char* op = "hcext::mhc_backward";
  const MhcDims d = check_mhc_args(x, phi, alpha, bias, iters, sinkhorn_eps, op);
  check_mhc_scalars(pre_eps, post_mult, op);
  check_mhc_saved(d, x, proj, rstd, op);
  check_mhc_grad(grad_layer_input, d.tokens * d.C, x, op, "grad_layer_input");
  check_mhc_grad(grad_h_pre, d.tokens * d.n, x, op, "grad_h_pre");
  check_mhc_grad(grad_h_post, d.tokens * d.n, x, op, "grad_h_post");
  check_mhc_grad(grad_h_res, d.tokens * d.n * d.n, x, op, "grad_h_res");
  const MhcScalars s{static_cast<int>(iters), 0.0, sinkhorn_eps, pre_eps, post_mult};
  const auto opts = x.options().dtype(d.compute);
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (d.tokens == 0) {
    return {grad_x, at::zeros_like(phi), at::zeros_like(alpha), at::zeros_like(bias)};
  }
  const int64_t T_ = d.tokens, n = d.n, D = d.D;
  const at::Tensor xf = rows_in_compute_dtype(x, d);
  const at::Tensor P = proj.reshape({T_, D}).contiguous(), R = rstd.reshape({T_}).contiguous();
  const at::Tensor a = alpha.contiguous(), b = bias.contiguous();
  const at::Tensor gy = optional_rows(grad_layer_input, T_, d.C, d.compute);
  at::Tensor gpre = optional_rows(grad_h_pre, T_, n, d.compute);
  const at::Tensor gpost = optional_rows(grad_h_post, T_, n, d.compute);
  const at::Tensor gres = optional_rows(grad_h_res, T_, n * n, d.compute);
  at::Tensor dl = at::empty({T_, D}, opts), dproj = at::empty({T_, D}, opts);
  at::Tensor dalpha = at::empty({T_, 3}, opts), drstd = at::empty({T_}, opts);
  at::Tensor grad_phi, dxp;
  auto run = [&](auto zero) {
    using T = decltype(zero);
    if (gy.defined()) {
      at::Tensor total = at::empty({T_, n}, opts);
      add_layer_input_grad_to_h_pre<T>(xf.data_ptr<T>(), gy.data_ptr<T>(), ptr_or_null<T>(gpre), total.data_ptr<T>(), d);
      gpre = total;
    }
    epilogue_backward<T>(P.data_ptr<T>(), R.data_ptr<T>(), a.data_ptr<T>(), b.data_ptr<T>(), ptr_or_null<T>(gpre),
                         ptr_or_null<T>(gpost), ptr_or_null<T>(gres), dl.data_ptr<T>(), dproj.data_ptr<T>(),
                         dalpha.data_ptr<T>(), drstd.data_ptr<T>(), d, s);
    grad_phi = at::mm(xf.t(), dproj);
    dxp = at::mm(dproj, phi.t());
    auto write = [&](auto* out) {
      grad_x_pass<T>(xf.data_ptr<T>(), dxp.data_ptr<T>(), P.data_ptr<T>(), R.data_ptr<T>(), drstd.data_ptr<T>(),
                     ptr_or_null<T>(gy), a.data_ptr<T>(), b.data_ptr<T>(), pre_eps, out, d);
    };
    switch (x.scalar_type()) {
      case at::kFloat: write(grad_x.data_ptr<float>()); break;
      case at::kDouble: write(grad_x.data_ptr<double>()); break;
      case at::kBFloat16: write(grad_x.data_ptr<at::BFloat16>()); break;
      default: write(grad_x.data_ptr<at::Half>()); break;
    }
  };
  if (d.compute == at::kDouble) run(double{}); else run(float{});
  return {grad_x, grad_phi, at::sum(dalpha, {0}), at::sum(dl, {0})};
}

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CPU, m) {
  m.impl("mhc_coeffs_fwd", &mhc_coeffs_fwd_cpu);
  m.impl("mhc_backward", &mhc_backward_cpu);
}

}  // namespace hcext
