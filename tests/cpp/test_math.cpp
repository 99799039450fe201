// Unit test of the shared host/device math headers (csrc/include/hcext), compiled by plain
// g++ without torch: the same templates the CUDA kernels instantiate with float/double and
// the CPU kernels with Lanes. Run by ctest (CMakeLists.txt).

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "hcext/lanes.h"
#include "hcext/sinkhorn.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, int n, double got, double want) {
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
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("math headers: all checks passed\n");
  return EXIT_SUCCESS;
}
