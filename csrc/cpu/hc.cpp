// CPU implementation of the HC coefficient ops (hcext::hc_coeffs_fwd and, through it, the
// public hc_coeffs; hcext::hc_coeffs_backward). The sequence is hc_driver.h; here are the
// CPU passes over x. Per-stream math: hcext/hc.h (shared with CUDA).
// Deterministic: every token is computed on its own, and the one reduction over tokens
// (Ĝ) uses token chunks fixed by the problem size, summed in chunk order.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "hc_driver.h"
#include "hcext/hc.h"

namespace hcext {
namespace {

constexpr int kAcc = 8;  // independent accumulators (vectorisable without -ffast-math)

template <typename T>
T dot(const T* a, const T* b, int64_t len) {
  T acc[kAcc] = {};
  int64_t k = 0;
  for (; k + kAcc <= len; k += kAcc) {
    for (int l = 0; l < kAcc; ++l) acc[l] += a[k + l] * b[k + l];
  }
  T s = 0;
  for (int l = 0; l < kAcc; ++l) s += acc[l];
  for (; k < len; ++k) s += a[k] * b[k];
  return s;
}

// buf = row - shift (in T); s1 = Σ buf, s2 = Σ buf².
template <typename T, typename X>
void load_shifted(const X* row, T shift, T* buf, int64_t len, T& s1, T& s2) {
  T a1[kAcc] = {}, a2[kAcc] = {};
  int64_t c = 0;
  for (; c + kAcc <= len; c += kAcc) {
    for (int l = 0; l < kAcc; ++l) {
      const T v = static_cast<T>(row[c + l]) - shift;
      buf[c + l] = v;
      a1[l] += v;
      a2[l] += v * v;
    }
  }
  T t1 = 0, t2 = 0;
  for (int l = 0; l < kAcc; ++l) {
    t1 += a1[l];
    t2 += a2[l];
  }
  for (; c < len; ++c) {
    const T v = static_cast<T>(row[c]) - shift;
    buf[c] = v;
    t1 += v;
    t2 += v * v;
  }
  s1 = t1;
  s2 = t2;
}

// Calls fn(const X*) with x's data as its element type.
template <typename Fn>
void with_x(const at::Tensor& x, Fn&& fn) {
  switch (x.scalar_type()) {
    case at::kFloat: return fn(x.data_ptr<float>());
    case at::kDouble: return fn(x.data_ptr<double>());
    case at::kBFloat16: return fn(x.data_ptr<at::BFloat16>());
    default: return fn(x.data_ptr<at::Half>());
  }
}

// Tokens per parallel task for work of `per_token` multiply-adds.
int64_t token_grain(int64_t per_token) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(per_token, 1)); }

// One pass over each stream: shifted sums and the K projections (on the L1-resident
// shifted copy of the row), then the stream's coefficients.
template <typename T, typename X>
void forward_pass(const X* x, const T* wt_t, const HcDims& d, const HcParams<T>& p, T eps, T* proj, T* stats,
                  T* h_pre, T* h_post, T* h_res) {
  const HcShape s = d.shape;
  const int n = d.n, K = s.K;
  const int64_t C = d.C;
  at::parallel_for(0, d.tokens, token_grain(n * C * (K + 2)), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(C);
    for (int64_t t = begin; t < end; ++t) {
      for (int i = 0; i < n; ++i) {
        const int64_t r = t * n + i;
        const X* row = x + r * C;
        const T shift = s.layer_norm ? static_cast<T>(row[0]) : T(0);
        T s1, s2;
        load_shifted(row, shift, buf.data(), C, s1, s2);
        T* q = proj + r * K;
        for (int k = 0; k < K; ++k) q[k] = dot(buf.data(), wt_t + k * C, C);
        hc_stream_forward(s, p, i, T(C), eps, shift, s1, s2, q, stats + 2 * r, h_pre + t * n, h_post + t * n,
                          h_res + t * n * n);
      }
    }
  });
}

template <typename T>
void epilogue_backward_pass(const HcDims& d, const HcParams<T>& p, const T* q, const T* stats, const T* g_pre,
                            const T* g_post, const T* g_res, T* e, T* xcoef, T* partial) {
  const HcShape s = d.shape;
  const int n = d.n, K = s.K, P = s.partial_width();
  at::parallel_for(0, d.tokens, token_grain(n * (K + 8)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      hc_token_backward(s, p, T(d.C), q + t * n * K, stats + t * n * 2, g_pre ? g_pre + t * n : nullptr,
                        g_post ? g_post + t * n : nullptr, g_res ? g_res + t * n * n : nullptr, e + t * n * K,
                        xcoef + t * n, partial + t * P);
    }
  });
}

// G [C, K] = Σ_tokens Σ_i (x_ic - mean_i) e_ik. Tasks are (token chunk, channel block);
// the chunking depends on the problem size only, and the chunks' partial sums are added
// in chunk order, so the result does not depend on the thread count.
template <typename T, typename X>
void centered_grad_pass(const X* x, const T* e, const T* stats, const HcDims& d, T* G) {
  constexpr int64_t kBlock = 64;  // channels per task
  const int n = d.n, K = d.shape.K;
  const int64_t C = d.C, tokens = d.tokens;
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  const int64_t max_chunks = std::max<int64_t>(1, std::min<int64_t>(16, (int64_t(1) << 24) / (C * K)));
  const int64_t chunk_tokens = std::max<int64_t>(512, (tokens + max_chunks - 1) / max_chunks);
  const int64_t chunks = (tokens + chunk_tokens - 1) / chunk_tokens;
  std::vector<T> partials(chunks > 1 ? chunks * C * K : 0);
  T* out_base = chunks > 1 ? partials.data() : G;
  at::parallel_for(0, chunks * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(kBlock * K), xb(kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / blocks, c0 = (task % blocks) * kBlock;
      const int64_t width = std::min(kBlock, C - c0);
      const int64_t t1 = std::min(tokens, (chunk + 1) * chunk_tokens);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t t = chunk * chunk_tokens; t < t1; ++t) {
        for (int i = 0; i < n; ++i) {
          const int64_t r = t * n + i;
          const T mean = stats[2 * r];
          const X* row = x + r * C + c0;
          for (int64_t c = 0; c < width; ++c) xb[c] = static_cast<T>(row[c]) - mean;
          for (int k = 0; k < K; ++k) {
            const T ek = e[r * K + k];
            T* a = acc.data() + k * kBlock;
            for (int64_t c = 0; c < width; ++c) a[c] += xb[c] * ek;
          }
        }
      }
      T* out = out_base + chunk * C * K;
      for (int64_t c = 0; c < width; ++c) {
        for (int k = 0; k < K; ++k) out[(c0 + c) * K + k] = acc[k * kBlock + c];
      }
    }
  });
  if (chunks > 1) {
    at::parallel_for(0, C * K, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        T sum = 0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partials[chunk * C * K + j];
        G[j] = sum;
      }
    });
  }
}

// dx = Wc e + xcoef (x - mean), accumulated in T and rounded to x's dtype once.
template <typename T, typename X>
void grad_x_pass(const X* x, const T* wc_t, const T* e, const T* xcoef, const T* stats, X* dx, const HcDims& d) {
  const int n = d.n, K = d.shape.K;
  const int64_t C = d.C;
  at::parallel_for(0, d.tokens, token_grain(n * C * (K + 2)), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(C);
    for (int64_t t = begin; t < end; ++t) {
      for (int i = 0; i < n; ++i) {
        const int64_t r = t * n + i;
        const T b = xcoef[r], mean = stats[2 * r];
        const X* row = x + r * C;
        for (int64_t c = 0; c < C; ++c) buf[c] = b * (static_cast<T>(row[c]) - mean);
        for (int k = 0; k < K; ++k) {
          const T ek = e[r * K + k];
          const T* wk = wc_t + k * C;
          for (int64_t c = 0; c < C; ++c) buf[c] += wk[c] * ek;
        }
        X* out = dx + r * C;
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<X>(buf[c]);
      }
    }
  });
}

// The CPU passes of hc_driver.h. x is contiguous.
struct CpuHcBackend {
  explicit CpuHcBackend(const at::Tensor&) {}

  template <typename T>
  void forward(const at::Tensor& x, const T* wt_t, const HcDims& d, const HcParams<T>& p, T eps, T* proj, T* stats,
               T* h_pre, T* h_post, T* h_res) {
    with_x(x, [&](const auto* xp) {
      using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
      if constexpr (std::is_same_v<T, double> == std::is_same_v<X, double>) {
        forward_pass<T, X>(xp, wt_t, d, p, eps, proj, stats, h_pre, h_post, h_res);
      }
    });
  }
  template <typename T>
  void epilogue_backward(const HcDims& d, const HcParams<T>& p, const T* q, const T* stats, const T* g_pre,
                         const T* g_post, const T* g_res, T* e, T* xcoef, T* partial) {
    epilogue_backward_pass<T>(d, p, q, stats, g_pre, g_post, g_res, e, xcoef, partial);
  }
  template <typename T>
  void centered_grad(const at::Tensor& x, const T* e, const T* stats, at::Tensor& G, const HcDims& d) {
    with_x(x, [&](const auto* xp) {
      using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
      if constexpr (std::is_same_v<T, double> == std::is_same_v<X, double>) {
        centered_grad_pass<T, X>(xp, e, stats, d, G.data_ptr<T>());
      }
    });
  }
  template <typename T>
  void grad_x(const at::Tensor& x, const T* wc_t, const T* e, const T* xcoef, const T* stats, at::Tensor& dx,
              const HcDims& d) {
    with_x(x, [&](const auto* xp) {
      using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
      if constexpr (std::is_same_v<T, double> == std::is_same_v<X, double>) {
        grad_x_pass<T, X>(xp, wc_t, e, xcoef, stats, dx.data_ptr<X>(), d);
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CPU, m) {
  m.impl("hc_coeffs_fwd", &hc_coeffs_fwd_impl<CpuHcBackend>);
  m.impl("hc_coeffs_backward", &hc_coeffs_backward_impl<CpuHcBackend>);
}

}  // namespace hcext
