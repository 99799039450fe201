// Unit test of the shared host/device math headers (csrc/include/hcext), compiled by plain
// g++ without torch: the same templates the CUDA kernels instantiate with float/double and
// the CPU kernels with Lanes. Run by ctest (CMakeLists.txt). Every header is checked against
// naive double implementations of its formulas (hcext/reference.py in C++):
//   sinkhorn.h  forward vs the spec, backward vs finite differences, Lanes lanes == scalar
//   streams.h   every channel-wise value vs its sum, Load called once per row in order,
//               Lanes lanes == scalar
//   mhc.h       rstd, the forward epilogue (h_pre, h_post, h_res) vs the spec, the backward
//               epilogue (dl, dproj, dalpha, drstd) and the rstd chain factor vs finite
//               differences, Lanes lanes == scalar
//   hc.h        the per-stream forward (from the kernels' shifted sums) vs the spec, the
//               per-token backward (dx, d static_alpha / static_beta / scales / dynamic
//               weights / norm weight and bias, assembled as the kernels do) vs finite
//               differences, for RMSNorm and LayerNorm, with and without tanh, every
//               combination of the optional parameters
//   lanes.h     the polynomial exp of the CPU Sinkhorn (Lanes<float, W, true>::vexp /
//               vexp_poly) over its whole input range, within 1 ulp of the correctly rounded
//               exp, compiled as the baseline kernels are and (when the CPU has it) with
//               AVX2 + FMA contraction as the AVX2 / AVX-512 kernels may be

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "hcext/hc.h"
#include "hcext/lanes.h"
#include "hcext/mhc.h"
#include "hcext/sinkhorn.h"
#include "hcext/streams.h"

namespace {

int failures = 0;
long long checks = 0;

void expect(bool ok, const char* what, int n, double got, double want) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s (n=%d): got %.9g, want %.9g\n", what, n, got, want);
  }
}

// The spec, written as plainly as possible in double (hcext/reference.py in C++).
std::vector<double> naive_sinkhorn(const std::vector<double>& L, int n, int iters, double eps) {
  std::vector<double> P(L);
  for (int j = 0; j < n; ++j) {
    double m = -INFINITY, s = 0;
    for (int i = 0; i < n; ++i) m = std::fmax(m, P[i * n + j]);
    for (int i = 0; i < n; ++i) s += std::exp(P[i * n + j] - m);
    for (int i = 0; i < n; ++i) P[i * n + j] = std::exp(P[i * n + j] - m) / s + eps;
  }
  auto rows = [&] {
    for (int i = 0; i < n; ++i) {
      double s = 0;
      for (int j = 0; j < n; ++j) s += P[i * n + j];
      for (int j = 0; j < n; ++j) P[i * n + j] /= s + eps;
    }
  };
  auto cols = [&] {
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int i = 0; i < n; ++i) s += P[i * n + j];
      for (int i = 0; i < n; ++i) P[i * n + j] /= s + eps;
    }
  };
  rows();
  for (int t = 1; t < iters; ++t) {
    cols();
    rows();
  }
  return P;
}

template <typename V>
struct VectorHistory {
  std::vector<V> d;
  int n;
  void store(int t, int k, const V& v) { d[t * n + k] = v; }
  V load(int t, int k) const { return d[t * n + k]; }
};

template <int kN>
void check_n(int n, int iters, std::mt19937& rng) {
  std::normal_distribution<double> normal(0.0, 2.0);
  const double eps = 1e-6;
  std::vector<double> L(n * n), W(n * n);
  for (auto& v : L) v = normal(rng);
  for (auto& v : W) v = normal(rng);

  // Forward (double, scalar value type as on the GPU) against the naive spec.
  std::vector<double> P(L);
  hcext::SinkhornNoHistory none;
  hcext::sinkhorn_forward<kN>(P.data(), n, iters, eps, none);
  const std::vector<double> want = naive_sinkhorn(L, n, iters, eps);
  for (int k = 0; k < n * n; ++k) expect(std::fabs(P[k] - want[k]) < 1e-12, "forward vs naive", n, P[k], want[k]);
  for (int i = 0; i < n; ++i) {
    double s = 0;
    for (int j = 0; j < n; ++j) s += P[i * n + j];
    expect(std::fabs(s - 1) < 1e-5 * n, "row sum", n, s, 1);
  }

  // Backward of loss = sum(W * H) against central finite differences of the naive spec.
  std::vector<double> G(W), scratch(n * n);
  VectorHistory<double> hist{std::vector<double>(hcext::sinkhorn_half_steps(iters) * n), n};
  auto load = [&](double* dst) {
    for (int k = 0; k < n * n; ++k) dst[k] = L[k];
  };
  hcext::sinkhorn_backward<kN>(scratch.data(), G.data(), n, iters, eps, hist, load);
  for (int k = 0; k < n * n; ++k) {
    const double h = 1e-6;
    std::vector<double> Lp(L), Lm(L);
    Lp[k] += h;
    Lm[k] -= h;
    const auto Hp = naive_sinkhorn(Lp, n, iters, eps), Hm = naive_sinkhorn(Lm, n, iters, eps);
    double fd = 0;
    for (int m = 0; m < n * n; ++m) fd += W[m] * (Hp[m] - Hm[m]) / (2 * h);
    expect(std::fabs(G[k] - fd) < 1e-6 * (1 + std::fabs(fd)), "backward vs finite differences", n, G[k], fd);
  }

  // The CPU's SIMD value type gives exactly the scalar result in every lane.
  using V = hcext::Lanes<float, 8>;
  std::vector<V> PL(n * n);
  std::vector<float> PF(n * n);
  for (int k = 0; k < n * n; ++k) {
    PF[k] = static_cast<float>(L[k]);
    for (int l = 0; l < 8; ++l) PL[k].v[l] = PF[k];
  }
  hcext::sinkhorn_forward<kN>(PL.data(), n, iters, 1e-6f, none);
  hcext::sinkhorn_forward<kN>(PF.data(), n, iters, 1e-6f, none);
  for (int k = 0; k < n * n; ++k) {
    for (int l = 0; l < 8; ++l) {
      expect(PL[k].v[l] == PF[k], "Lanes lane == scalar", n, PL[k].v[l], PF[k]);
    }
    expect(std::fabs(PF[k] - want[k]) < 1e-5, "float forward vs naive", n, PF[k], want[k]);
  }
}


// ---------------------------------------------------------------------------------------
// helpers

double rel_err(double got, double want) { return std::fabs(got - want) / (1.0 + std::fabs(want)); }

void expect_close(double got, double want, double tol, const char* what, int n) {
  expect(rel_err(got, want) <= tol, what, n, got, want);
}

// Central finite difference of f at x[k] (x is restored).
double fd(std::vector<double>& x, int k, const std::function<double()>& f, double h = 1e-6) {
  const double x0 = x[k];
  x[k] = x0 + h;
  const double fp = f();
  x[k] = x0 - h;
  const double fm = f();
  x[k] = x0;
  return (fp - fm) / (2 * h);
}

std::vector<double> randn(int size, std::mt19937& rng, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<double> v(size);
  for (auto& e : v) e = normal(rng);
  return v;
}

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// ---------------------------------------------------------------------------------------
// streams.h: the channel-wise values for one token, one channel (double) or 8 (Lanes)

// A row loader that records the order of its calls (the header's contract: each row once,
// in the order 0..n-1).
template <typename V>
struct RowLoader {
  const V* rows;
  std::vector<int>* calls;
  V operator()(int i) const {
    calls->push_back(i);
    return rows[i];
  }
};

void expect_in_order(const std::vector<int>& calls, int n, const char* what) {
  bool ok = static_cast<int>(calls.size()) == n;
  for (int i = 0; ok && i < n; ++i) ok = calls[i] == i;
  expect(ok, what, n, static_cast<double>(calls.size()), n);
}

template <int kN>
void check_streams(int n, std::mt19937& rng) {
  const auto h_pre = randn(n, rng), h_post = randn(n, rng), h_res = randn(n * n, rng);
  const auto x = randn(n, rng), g = randn(n, rng), fv = randn(1, rng);
  const double f = fv[0];
  std::vector<int> calls;

  // Double, one channel, against the sums written out.
  double want = 0;
  for (int i = 0; i < n; ++i) want += h_pre[i] * x[i];
  calls.clear();
  const double y = hcext::stream_aggregate_value<kN, double>(h_pre.data(), n, RowLoader<double>{x.data(), &calls});
  expect_close(y, want, 1e-14, "stream_aggregate_value", n);
  expect_in_order(calls, n, "stream_aggregate_value loads rows once, in order");
  for (int i = 0; i < n; ++i) {
    want = h_post[i] * f;
    for (int j = 0; j < n; ++j) want += h_res[i * n + j] * x[j];
    calls.clear();
    const double out = hcext::stream_mix_value<kN, double>(h_res.data() + i * n, h_post[i], f, n,
                                                           RowLoader<double>{x.data(), &calls});
    expect_close(out, want, 1e-14, "stream_mix_value", n);
    expect_in_order(calls, n, "stream_mix_value loads rows once, in order");
  }
  for (int j = 0; j < n; ++j) {
    want = 0;
    for (int i = 0; i < n; ++i) want += h_res[i * n + j] * g[i];
    calls.clear();
    const double gx = hcext::stream_mix_grad_x_value<kN, double>(h_res.data(), j, n, RowLoader<double>{g.data(), &calls});
    expect_close(gx, want, 1e-14, "stream_mix_grad_x_value", n);
    expect_in_order(calls, n, "stream_mix_grad_x_value loads rows once, in order");
  }
  want = 0;
  for (int i = 0; i < n; ++i) want += h_post[i] * g[i];
  calls.clear();
  const double gf = hcext::stream_mix_grad_f_value<kN, double>(h_post.data(), n, RowLoader<double>{g.data(), &calls});
  expect_close(gf, want, 1e-14, "stream_mix_grad_f_value", n);
  expect_in_order(calls, n, "stream_mix_grad_f_value loads rows once, in order");
  for (int i = 0; i < n; ++i) {
    expect_close(hcext::stream_aggregate_grad_x_value(h_pre[i], g[0]), h_pre[i] * g[0], 1e-15,
                 "stream_aggregate_grad_x_value", n);
    expect_close(hcext::stream_coef_grad_term(g[i], x[i]), g[i] * x[i], 1e-15, "stream_coef_grad_term", n);
  }

  // Lanes<float, 8> (8 channels): every lane computes exactly the scalar float value, and
  // the scalar float value is the double one up to fp32 rounding.
  using L = hcext::Lanes<float, 8>;
  std::vector<float> hp(n), hq(n), hr(n * n);
  for (int i = 0; i < n; ++i) hp[i] = static_cast<float>(h_pre[i]), hq[i] = static_cast<float>(h_post[i]);
  for (int k = 0; k < n * n; ++k) hr[k] = static_cast<float>(h_res[k]);
  std::vector<L> xl(n);
  std::vector<std::vector<float>> xs(8, std::vector<float>(n));
  L fl;
  float fs[8];
  for (int l = 0; l < 8; ++l) {
    const auto col = randn(n + 1, rng);
    for (int i = 0; i < n; ++i) xl[i].v[l] = xs[l][i] = static_cast<float>(col[i]);
    fl.v[l] = fs[l] = static_cast<float>(col[n]);
  }
  calls.clear();
  const L yl = hcext::stream_aggregate_value<kN, L>(hp.data(), n, RowLoader<L>{xl.data(), &calls});
  const L gxl = hcext::stream_mix_grad_x_value<kN, L>(hr.data(), n - 1, n, RowLoader<L>{xl.data(), &calls});
  const L ml = hcext::stream_mix_value<kN, L>(hr.data(), hq[0], fl, n, RowLoader<L>{xl.data(), &calls});
  for (int l = 0; l < 8; ++l) {
    const float ys = hcext::stream_aggregate_value<kN, float>(hp.data(), n, [&](int i) { return xs[l][i]; });
    const float gxs = hcext::stream_mix_grad_x_value<kN, float>(hr.data(), n - 1, n, [&](int i) { return xs[l][i]; });
    const float ms = hcext::stream_mix_value<kN, float>(hr.data(), hq[0], fs[l], n, [&](int i) { return xs[l][i]; });
    expect(yl.v[l] == ys, "stream_aggregate_value: Lanes lane == scalar", n, yl.v[l], ys);
    expect(gxl.v[l] == gxs, "stream_mix_grad_x_value: Lanes lane == scalar", n, gxl.v[l], gxs);
    expect(ml.v[l] == ms, "stream_mix_value: Lanes lane == scalar", n, ml.v[l], ms);
    double yd = 0;
    for (int i = 0; i < n; ++i) yd += static_cast<double>(hp[i]) * xs[l][i];
    expect_close(ys, yd, 1e-5 * n, "stream_aggregate_value float vs double", n);
  }
}

// ---------------------------------------------------------------------------------------
// mhc.h: one token's coefficients from (proj, rstd), and their backward

struct MhcCase {
  int n, iters;
  double sinkhorn_eps, pre_eps, post_mult;
};

// The spec (hcext/reference.py::mhc_coeffs after the projection): h = [h_pre n | h_post n | h_res n*n].
std::vector<double> naive_mhc(const MhcCase& c, const std::vector<double>& proj, double rstd,
                              const std::vector<double>& alpha, const std::vector<double>& bias) {
  const int n = c.n;
  std::vector<double> h(n * n + 2 * n), L(n * n);
  for (int i = 0; i < n; ++i) {
    h[i] = sigmoid(alpha[0] * proj[i] * rstd + bias[i]) + c.pre_eps;
    h[n + i] = c.post_mult * sigmoid(alpha[1] * proj[n + i] * rstd + bias[n + i]);
  }
  for (int k = 0; k < n * n; ++k) L[k] = alpha[2] * proj[2 * n + k] * rstd + bias[2 * n + k];
  const auto H = naive_sinkhorn(L, n, c.iters, c.sinkhorn_eps);
  for (int k = 0; k < n * n; ++k) h[2 * n + k] = H[k];
  return h;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t k = 0; k < a.size(); ++k) s += a[k] * b[k];
  return s;
}

template <int kN>
void check_mhc(const MhcCase& c, int C, std::mt19937& rng) {
  const int n = c.n, D = hcext::mhc_coeff_width(n), nC = n * C;
  const double norm_eps = 1e-3;
  auto xt = randn(nC, rng), phi = randn(nC * D, rng, 1.0 / std::sqrt(nC));
  auto alpha = randn(3, rng, 0.5), bias = randn(D, rng, 0.5);
  const auto w = randn(D, rng);  // loss = sum(w * [h_pre | h_post | h_res])

  auto project = [&](const std::vector<double>& x) {
    std::vector<double> proj(D, 0.0);
    for (int r = 0; r < nC; ++r)
      for (int k = 0; k < D; ++k) proj[k] += x[r] * phi[r * D + k];
    return proj;
  };
  auto naive_rstd = [&](const std::vector<double>& x) {
    double ss = 0;
    for (double v : x) ss += v * v;
    return 1.0 / std::sqrt(ss / nC + norm_eps);
  };
  auto proj = project(xt);
  double ss = 0;
  for (double v : xt) ss += v * v;
  double rstd = hcext::mhc_rstd(ss, double(nC), norm_eps);
  expect_close(rstd, naive_rstd(xt), 1e-14, "mhc_rstd", n);

  // Forward epilogue (double) against the spec.
  std::vector<double> h_pre(n), h_post(n), h_res(n * n);
  hcext::mhc_coeffs_epilogue<kN>(proj.data(), rstd, alpha.data(), bias.data(), n, c.iters, c.sinkhorn_eps, c.pre_eps,
                                 c.post_mult, h_pre.data(), h_post.data(), h_res.data());
  const auto want = naive_mhc(c, proj, rstd, alpha, bias);
  for (int i = 0; i < n; ++i) {
    expect_close(h_pre[i], want[i], 1e-13, "mhc h_pre vs spec", n);
    expect_close(h_post[i], want[n + i], 1e-13, "mhc h_post vs spec", n);
    expect_close(hcext::mhc_h_pre(proj[i], rstd, alpha.data(), bias[i], c.pre_eps), want[i], 1e-13, "mhc_h_pre", n);
  }
  for (int k = 0; k < n * n; ++k) expect_close(h_res[k], want[2 * n + k], 1e-12, "mhc h_res vs spec", n);

  // Backward epilogue (double) against finite differences of the spec.
  std::vector<double> g_pre(w.begin(), w.begin() + n), g_post(w.begin() + n, w.begin() + 2 * n),
      g_res(w.begin() + 2 * n, w.end()), P(n * n), dl(D), dproj(D), dalpha(3);
  double drstd = 0;
  VectorHistory<double> hist{std::vector<double>(hcext::sinkhorn_half_steps(c.iters) * n), n};
  hcext::mhc_coeffs_epilogue_backward<kN>(proj.data(), rstd, alpha.data(), bias.data(), n, c.iters, c.sinkhorn_eps,
                                          c.post_mult, g_pre.data(), g_post.data(), g_res.data(), P.data(), hist,
                                          dl.data(), dproj.data(), dalpha.data(), drstd);
  auto loss = [&] { return dot(w, naive_mhc(c, proj, rstd, alpha, bias)); };
  const double tol = 1e-6;
  for (int k = 0; k < D; ++k) {
    expect_close(dl[k], fd(bias, k, loss), tol, "mhc dl (= dbias) vs finite differences", n);
    expect_close(dproj[k], fd(proj, k, loss), tol, "mhc dproj vs finite differences", n);
  }
  for (int p = 0; p < 3; ++p) expect_close(dalpha[p], fd(alpha, p, loss), tol, "mhc dalpha vs finite differences", n);
  std::vector<double> rv{rstd};
  auto loss_r = [&] { return dot(w, naive_mhc(c, proj, rv[0], alpha, bias)); };
  expect_close(drstd, fd(rv, 0, loss_r), tol, "mhc drstd vs finite differences", n);

  // The kernels' chain to x̃: dx̃ = phi @ dproj + mhc_rstd_grad_factor(drstd, rstd, nC) * x̃.
  const double factor = hcext::mhc_rstd_grad_factor(drstd, rstd, double(nC));
  auto loss_x = [&] { return dot(w, naive_mhc(c, project(xt), naive_rstd(xt), alpha, bias)); };
  for (int r = 0; r < nC; r += std::max(1, nC / 7)) {
    double dx = factor * xt[r];
    for (int k = 0; k < D; ++k) dx += phi[r * D + k] * dproj[k];
    expect_close(dx, fd(xt, r, loss_x), tol, "mhc dx (phi @ dproj + rstd factor * x) vs finite differences", n);
  }

  // Lanes<float, 8>: every lane computes exactly the scalar float result.
  using L = hcext::Lanes<float, 8>;
  std::vector<float> af(3), bf(D);
  for (int p = 0; p < 3; ++p) af[p] = static_cast<float>(alpha[p]);
  for (int k = 0; k < D; ++k) bf[k] = static_cast<float>(bias[k]);
  std::vector<L> projl(D), prel(n), postl(n), resl(n * n);
  std::vector<std::vector<float>> projs(8, std::vector<float>(D));
  L rstdl;
  float rstds[8];
  for (int l = 0; l < 8; ++l) {
    const auto pr = randn(D, rng);
    for (int k = 0; k < D; ++k) projl[k].v[l] = projs[l][k] = static_cast<float>(pr[k]);
    rstdl.v[l] = rstds[l] = 0.5f + 0.1f * l;
  }
  const float se = static_cast<float>(c.sinkhorn_eps), pe = static_cast<float>(c.pre_eps),
              pm = static_cast<float>(c.post_mult);
  hcext::mhc_coeffs_epilogue<kN>(projl.data(), rstdl, af.data(), bf.data(), n, c.iters, se, pe, pm, prel.data(),
                                 postl.data(), resl.data());
  for (int l = 0; l < 8; ++l) {
    std::vector<float> ps(n), qs(n), rs(n * n);
    hcext::mhc_coeffs_epilogue<kN>(projs[l].data(), rstds[l], af.data(), bf.data(), n, c.iters, se, pe, pm, ps.data(),
                                   qs.data(), rs.data());
    for (int i = 0; i < n; ++i) {
      expect(prel[i].v[l] == ps[i], "mhc h_pre: Lanes lane == scalar", n, prel[i].v[l], ps[i]);
      expect(postl[i].v[l] == qs[i], "mhc h_post: Lanes lane == scalar", n, postl[i].v[l], qs[i]);
    }
    for (int k = 0; k < n * n; ++k) expect(resl[k].v[l] == rs[k], "mhc h_res: Lanes lane == scalar", n, resl[k].v[l], rs[k]);
    std::vector<double> pd(projs[l].begin(), projs[l].end()), ad(af.begin(), af.end()), bd(bf.begin(), bf.end());
    const auto wd = naive_mhc(c, pd, rstds[l], ad, bd);
    for (int k = 0; k < n * n; ++k) expect(std::fabs(rs[k] - wd[2 * n + k]) < 1e-5, "mhc float h_res vs spec", n, rs[k], wd[2 * n + k]);
  }
}

// ---------------------------------------------------------------------------------------
// hc.h: the original Hyper-Connections, one token of n streams of C channels

struct HcCase {
  int n, C;
  bool layer_norm, use_tanh, has_alpha, has_beta, has_scales, has_weight, has_bias;
  bool g_res_null;  // the incoming gradient of h_res absent (null: zero)
};

struct HcValues {
  std::vector<double> x, static_alpha, static_beta, Wa, Wb, sa, sb, w, b;
};

// The spec (hcext/reference.py::hc_coeffs, one token): [h_pre n | h_post n | h_res n*n].
std::vector<double> naive_hc(const HcCase& c, const HcValues& v, double eps) {
  const int n = c.n, C = c.C;
  std::vector<double> h(n * n + 2 * n);
  for (int i = 0; i < n; ++i) {
    const double* xi = v.x.data() + i * C;
    double mean = 0, var = 0;
    if (c.layer_norm) {
      for (int ch = 0; ch < C; ++ch) mean += xi[ch];
      mean /= C;
      for (int ch = 0; ch < C; ++ch) var += (xi[ch] - mean) * (xi[ch] - mean);
      var /= C;
    } else {
      for (int ch = 0; ch < C; ++ch) var += xi[ch] * xi[ch];
      var /= C;
    }
    const double rstd = 1.0 / std::sqrt(var + eps);
    std::vector<double> xn(C);
    for (int ch = 0; ch < C; ++ch) {
      xn[ch] = (xi[ch] - mean) * rstd * (c.has_weight ? v.w[ch] : 1.0) + (c.has_bias ? v.b[ch] : 0.0);
    }
    auto act = [&](double z) { return c.use_tanh ? std::tanh(z) : z; };
    for (int k = 0; k <= n; ++k) {
      double a = v.static_alpha[i * (n + 1) + k];
      if (c.has_alpha) {
        double z = 0;
        for (int ch = 0; ch < C; ++ch) z += xn[ch] * v.Wa[ch * (n + 1) + k];
        a += (c.has_scales ? v.sa[0] : 1.0) * act(z);
      }
      if (k == 0) {
        h[i] = a;
      } else {
        h[2 * n + (k - 1) * n + i] = a;  // h_res[dst, src=i] = α[i, 1 + dst]
      }
    }
    double beta = v.static_beta[i];
    if (c.has_beta) {
      double z = 0;
      for (int ch = 0; ch < C; ++ch) z += xn[ch] * v.Wb[ch];
      beta += (c.has_scales ? v.sb[0] : 1.0) * act(z);
    }
    h[n + i] = beta;
  }
  return h;
}

void check_hc(const HcCase& c, std::mt19937& rng) {
  const int n = c.n, C = c.C;
  const double eps = 1e-3;
  HcValues v;
  v.x = randn(n * C, rng);
  for (int k = 0; k < n * C; k += 3) v.x[k] += 2.0;  // a mean away from 0 (LayerNorm's shift)
  v.static_alpha = randn(n * (n + 1), rng);
  v.static_beta = randn(n, rng);
  v.Wa = randn(C * (n + 1), rng, 0.5);
  v.Wb = randn(C, rng, 0.5);
  v.sa = randn(1, rng);
  v.sb = randn(1, rng);
  v.w = randn(C, rng, 0.3);
  for (auto& e : v.w) e += 1.0;
  v.b = randn(C, rng, 0.3);
  const auto gw = randn(n * n + 2 * n, rng);  // loss = sum(gw * [h_pre | h_post | h_res])

  // The kernels' per-call preparation: W = [Wa | Wb] ([C, K]), Wt = w ⊙ W, col_bias = b @ W,
  // col_sum = Σ_c Wt.
  hcext::HcShape s{n, (c.has_alpha ? n + 1 : 0) + (c.has_beta ? 1 : 0), c.has_alpha, c.has_beta, c.use_tanh,
                   c.layer_norm};
  const int K = s.K;
  auto W = [&](int ch, int k) { return (c.has_alpha && k <= n) ? v.Wa[ch * (n + 1) + k] : v.Wb[ch]; };
  std::vector<double> Wt(C * K), col_bias(K, 0.0), col_sum(K, 0.0);
  for (int ch = 0; ch < C; ++ch) {
    for (int k = 0; k < K; ++k) {
      Wt[ch * K + k] = (c.has_weight ? v.w[ch] : 1.0) * W(ch, k);
      col_bias[k] += (c.has_bias ? v.b[ch] : 0.0) * W(ch, k);
      col_sum[k] += Wt[ch * K + k];
    }
  }
  hcext::HcParams<double> p{v.static_alpha.data(), v.static_beta.data(), c.has_scales ? v.sa.data() : nullptr,
                            c.has_scales ? v.sb.data() : nullptr, c.has_bias ? col_bias.data() : nullptr,
                            col_sum.data()};

  // Forward: per stream, the shifted sums and projections, then hc_stream_forward.
  std::vector<double> q(n * std::max(K, 1)), stats(2 * n), h_pre(n), h_post(n), h_res(n * n);
  for (int i = 0; i < n; ++i) {
    const double* xi = v.x.data() + i * C;
    const double shift = c.layer_norm ? xi[0] : 0.0;
    double s1 = 0, s2 = 0;
    for (int k = 0; k < K; ++k) q[i * K + k] = 0;
    for (int ch = 0; ch < C; ++ch) {
      const double d = xi[ch] - shift;
      s1 += d;
      s2 += d * d;
      for (int k = 0; k < K; ++k) q[i * K + k] += d * Wt[ch * K + k];
    }
    hcext::hc_stream_forward(s, p, i, double(C), eps, shift, s1, s2, q.data() + i * K, stats.data() + 2 * i,
                             h_pre.data(), h_post.data(), h_res.data());
  }
  const auto want = naive_hc(c, v, eps);
  for (int i = 0; i < n; ++i) {
    expect_close(h_pre[i], want[i], 1e-12, "hc h_pre vs spec", n);
    expect_close(h_post[i], want[n + i], 1e-12, "hc h_post vs spec", n);
  }
  for (int k = 0; k < n * n; ++k) expect_close(h_res[k], want[2 * n + k], 1e-12, "hc h_res vs spec", n);
  if (K == 0) return;  // static HC: no per-token backward

  // Backward: hc_token_backward, then the kernels' assembly of every gradient.
  std::vector<double> g_pre(gw.begin(), gw.begin() + n), g_post(gw.begin() + n, gw.begin() + 2 * n),
      g_res(gw.begin() + 2 * n, gw.end()), e(n * K), xcoef(n), partial(s.partial_width());
  hcext::hc_token_backward(s, p, double(C), q.data(), stats.data(), g_pre.data(), g_post.data(),
                           c.g_res_null ? nullptr : g_res.data(), e.data(), xcoef.data(), partial.data());
  std::vector<double> lw(gw);
  if (c.g_res_null) std::fill(lw.begin() + 2 * n, lw.end(), 0.0);
  auto loss = [&] { return dot(lw, naive_hc(c, v, eps)); };
  const double tol = 1e-6;

  std::vector<double> G(C * K, 0.0);  // Ĝ_ck = Σ_i (x_ic - mean_i) e_ik
  for (int i = 0; i < n; ++i) {
    const double mean = stats[2 * i];
    for (int ch = 0; ch < C; ++ch) {
      double dx = xcoef[i] * (v.x[i * C + ch] - mean);
      for (int k = 0; k < K; ++k) {
        const double wc = Wt[ch * K + k] - (c.layer_norm ? col_sum[k] / C : 0.0);
        dx += wc * e[i * K + k];
        G[ch * K + k] += (v.x[i * C + ch] - mean) * e[i * K + k];
      }
      expect_close(dx, fd(v.x, i * C + ch, loss), tol, "hc dx vs finite differences", n);
    }
  }
  for (int k = 0; k < n * (n + 1); ++k)
    expect_close(partial[k], fd(v.static_alpha, k, loss), tol, "hc d static_alpha vs finite differences", n);
  for (int i = 0; i < n; ++i)
    expect_close(partial[s.partial_gb() + i], fd(v.static_beta, i, loss), tol, "hc d static_beta vs finite differences", n);
  if (c.has_scales) {
    if (c.has_alpha) expect_close(partial[s.partial_gsa()], fd(v.sa, 0, loss), tol, "hc d alpha_scale vs finite differences", n);
    if (c.has_beta) expect_close(partial[s.partial_gsa() + 1], fd(v.sb, 0, loss), tol, "hc d beta_scale vs finite differences", n);
  }
  const double* S = partial.data() + s.partial_s();
  for (int ch = 0; ch < C; ++ch) {
    double dw = 0, db = 0;
    for (int k = 0; k < K; ++k) {
      const double dW = (c.has_weight ? v.w[ch] : 1.0) * G[ch * K + k] + (c.has_bias ? v.b[ch] : 0.0) * S[k];
      const bool beta_col = !(c.has_alpha && k <= n);
      auto& param = beta_col ? v.Wb : v.Wa;
      const int idx = beta_col ? ch : ch * (n + 1) + k;
      expect_close(dW, fd(param, idx, loss), tol, beta_col ? "hc d dynamic_beta vs finite differences"
                                                           : "hc d dynamic_alpha vs finite differences", n);
      dw += W(ch, k) * G[ch * K + k];
      db += W(ch, k) * S[k];
    }
    if (c.has_weight) expect_close(dw, fd(v.w, ch, loss), tol, "hc d norm_weight vs finite differences", n);
    if (c.has_bias) expect_close(db, fd(v.b, ch, loss), tol, "hc d norm_bias vs finite differences", n);
  }
}

// ---------------------------------------------------------------------------------------
// lanes.h: the polynomial exp of the CPU Sinkhorn kernels

constexpr int kExpW = 16;
using ExpLanes = hcext::Lanes<float, kExpW, true>;

// exp of x[0..count) through Lanes<float, 16, true>::vexp (vexp_poly), compiled as the
// baseline kernels are (no -march flags).
void poly_exp_baseline(const float* x, float* y, int64_t count) {
  for (int64_t b = 0; b < count; b += kExpW) {
    ExpLanes v;
    for (int l = 0; l < kExpW; ++l) v.v[l] = b + l < count ? x[b + l] : 0.0f;
    const ExpLanes r = hcext::vexp(v);
    for (int l = 0; l < kExpW && b + l < count; ++l) y[b + l] = r.v[l];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define HCEXT_TEST_FMA 1
// The same, compiled for AVX2 + FMA as the AVX2 / AVX-512 kernels are: g++ contracts
// a * b + c into FMAs here (-std=gnu++20: -ffp-contract=fast), rounding differently.
__attribute__((target("avx2,fma"))) void poly_exp_fma(const float* x, float* y, int64_t count) {
  for (int64_t b = 0; b < count; b += kExpW) {
    ExpLanes v;
    for (int l = 0; l < kExpW; ++l) v.v[l] = b + l < count ? x[b + l] : 0.0f;
    const ExpLanes r = hcext::vexp(v);
    for (int l = 0; l < kExpW && b + l < count; ++l) y[b + l] = r.v[l];
  }
}
#endif

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The correctly rounded exp, as the double exp rounded to float.
float exp_reference(float x) { return static_cast<float>(std::exp(static_cast<double>(x))); }

struct ExpStats {
  int64_t checked = 0;
  uint32_t max_ulp = 0;
  float worst_x = 0;
};

// Checks exp over the inputs (every result >= 0: the distance in ulp is the distance of the
// bit patterns; +inf is one ulp above FLT_MAX).
void check_exp_inputs(void (*fn)(const float*, float*, int64_t), const char* name, const std::vector<float>& xs,
                      ExpStats& st) {
  std::vector<float> ys(xs.size());
  fn(xs.data(), ys.data(), static_cast<int64_t>(xs.size()));
  for (size_t k = 0; k < xs.size(); ++k) {
    const float x = xs[k], got = ys[k];
    if (std::isnan(x)) {
      expect(std::isnan(got), name, 0, got, x);
      continue;
    }
    const float want = exp_reference(x);
    const bool sane = got >= 0.0f && !std::isnan(got);
    const uint32_t a = bits_of(got), b = bits_of(want);
    const uint32_t ulp = sane ? (a > b ? a - b : b - a) : UINT32_MAX;
    ++st.checked;
    if (ulp > st.max_ulp) st.max_ulp = ulp, st.worst_x = x;
    if (ulp > 1) {
      ++failures;
      if (failures < 20) std::printf("FAIL %s: exp(%.9g) = %.9g, correctly rounded %.9g (%u ulp)\n", name, x, got, want, ulp);
    }
  }
}

void check_poly_exp(void (*fn)(const float*, float*, int64_t), const char* name) {
  ExpStats st;
  std::vector<float> xs;
  auto flush = [&] {
    check_exp_inputs(fn, name, xs, st);
    xs.clear();
  };
  // 1. The whole input range: every float in [-104, 89] (exp(-104) rounds to 0, exp(89)
  //    overflows; the subnormal results lie in between), by a bit-pattern stride of 61 (a prime:
  //    every mantissa residue is visited), both signs.
  for (float lim : {89.0f, -104.0f}) {
    const uint32_t top = bits_of(lim);
    const uint32_t sign = lim < 0 ? 0x80000000u : 0u;
    for (uint32_t u = 0; u <= (top & 0x7fffffffu); u += 61) {
      xs.push_back(float_of(sign | u));
      if (xs.size() == (1u << 20)) flush();
    }
    xs.push_back(lim);
  }
  flush();
  // 2. Every power of two 2^k, k = -149..6, its float neighbours and (1 + j/64) 2^k, both signs.
  for (int k = -149; k <= 6; ++k) {
    const float p = std::ldexp(1.0f, k);
    for (float v : {p, std::nextafter(p, 0.0f), std::nextafter(p, INFINITY)}) xs.push_back(v), xs.push_back(-v);
    for (int j = 1; j < 64; ++j) {
      const float v = std::ldexp(1.0f + j / 64.0f, k);
      if (v < 104.0f) xs.push_back(v), xs.push_back(-v);
    }
  }
  flush();
  // 3. Dense near 0 (where exp(x) = 1 + x + ... must not lose x): every float in [-1/8, 1/8]
  //    by a bit-pattern stride of 7, and every float in [-2^-20, 2^-20] above 2^-40.
  for (float lim : {0.125f, -0.125f}) {
    const uint32_t sign = lim < 0 ? 0x80000000u : 0u;
    for (uint32_t u = bits_of(std::fabs(lim)); u > bits_of(0x1p-26f); u -= 7) {
      xs.push_back(float_of(sign | u));
      if (xs.size() == (1u << 20)) flush();
    }
    for (uint32_t u = bits_of(0x1p-20f); u > bits_of(0x1p-40f); u -= 97) xs.push_back(float_of(sign | u));
    flush();
  }
  // 4. Around the ends: the overflow threshold (exp(88.7228...) = FLT_MAX) and the last
  //    non-zero results; every float within 2^16 ulp of each.
  for (float centre : {88.72283935546875f, -87.33654f, -103.278931f, -103.972076f}) {
    const float c = std::fabs(centre);
    const uint32_t sign = centre < 0 ? 0x80000000u : 0u;
    for (uint32_t u = bits_of(c) - 65536; u <= bits_of(c) + 65536; ++u) xs.push_back(float_of(sign | u));
  }
  flush();
  // 5. Special values: exp(±0) = 1, exp(-inf) = 0, exp(+inf) = inf, NaN stays NaN, beyond the
  //    clamps 0 and inf.
  xs = {0.0f, -0.0f, -INFINITY, INFINITY, NAN, -NAN, -1e30f, -200.0f, -104.5f, 89.5f, 100.0f, 1e30f, FLT_MAX, -FLT_MAX};
  flush();
  std::printf("%s: %lld inputs, max %u ulp from the correctly rounded exp (at x = %.9g)\n", name,
              static_cast<long long>(st.checked), st.max_ulp, st.worst_x);
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  for (int iters : {1, 3, 20}) {
    check_n<4>(4, iters, rng);
    check_n<0>(1, iters, rng);
    check_n<0>(3, iters, rng);
    check_n<0>(4, iters, rng);
    check_n<0>(7, iters, rng);
  }

  // streams.h: the compile-time n = 4 path and the run-time n path.
  for (int rep = 0; rep < 3; ++rep) {
    check_streams<4>(4, rng);
    for (int n : {1, 2, 3, 4, 7, 17, 32}) check_streams<0>(n, rng);
  }

  // mhc.h: n = 4 unrolled and at run time, other n, other scalars.
  for (int iters : {1, 3, 20}) {
    check_mhc<4>({4, iters, 1e-6, 1e-6, 2.0}, 5, rng);
    check_mhc<0>({4, iters, 1e-6, 1e-6, 2.0}, 5, rng);
    check_mhc<0>({1, iters, 1e-6, 1e-6, 2.0}, 3, rng);
    check_mhc<0>({3, iters, 3e-2, 0.1, 1.5}, 4, rng);
  }
  check_mhc<0>({7, 7, 1e-6, 1e-6, 2.0}, 2, rng);

  // hc.h: both norms, with and without tanh, every combination of the optional parameters.
  for (bool layer_norm : {false, true}) {
    for (bool use_tanh : {true, false}) {
      for (int dyn = 0; dyn < 4; ++dyn) {  // 0: static HC; 1: alpha; 2: beta; 3: both
        for (int opt = 0; opt < 8; ++opt) {  // scales, norm weight, norm bias
          const bool has_alpha = dyn & 1, has_beta = dyn & 2;
          const bool scales = opt & 1, weight = opt & 2, bias = opt & 4;
          check_hc({4, 6, layer_norm, use_tanh, has_alpha, has_beta, scales, weight, bias, false}, rng);
          if (opt == 7 && dyn == 3) {
            check_hc({1, 5, layer_norm, use_tanh, true, true, true, true, true, false}, rng);
            check_hc({3, 7, layer_norm, use_tanh, true, true, true, true, true, true}, rng);
          }
        }
      }
    }
  }

  // lanes.h: the polynomial exp, as the baseline kernels compile it and with FMA contraction.
  check_poly_exp(poly_exp_baseline, "vexp_poly (baseline)");
#ifdef HCEXT_TEST_FMA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    check_poly_exp(poly_exp_fma, "vexp_poly (AVX2 + FMA)");
  } else {
    std::printf("vexp_poly (AVX2 + FMA): skipped, this CPU has no AVX2/FMA\n");
  }
#endif

  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("math headers: all %lld checks passed (plus the exp inputs above)\n", checks);
  return EXIT_SUCCESS;
}
