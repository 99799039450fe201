// The CPU backend of the HC family (hcext::hc_coeffs_fwd and, through it, the public
// hc_coeffs; hcext::hc_coeffs_backward). The sequence is hc_driver.h; here are the CPU
// passes over x, in the style of every CPU kernel family: channels in blocks of
// hcext::Lanes (common/cpu_vec_io.h: bf16/fp16 widened to the compute type on load), the
// kernels compiled for baseline x86-64, AVX2 and AVX-512 and picked at run time
// (common/cpu_isa.h), at::parallel_for over tokens. Per-stream math: hcext/hc.h (shared
// with CUDA).
// Deterministic: every token is computed on its own, and the one reduction over tokens
// (Ĝ) uses token chunks fixed by the problem size, summed in chunk order.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_vec_io.h"
#include "hc/hc_driver.h"
#include "hcext/dispatch.h"
#include "hcext/hc.h"
#include "hcext/lanes.h"
#include "streams/streams_cpu.h"

namespace hcext {
namespace {

constexpr int kVec = cpu::kVecIoWidth;  // channels per block of lanes
template <typename T>
using Block = Lanes<T, kVec>;

using cpu::for_channel_blocks;
using cpu::lane_sum;
using cpu::load_block;
using cpu::store_block;

// Tokens per parallel task for work of `per_token` multiply-adds.
inline int64_t token_grain(int64_t per_token) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(per_token, 1)); }

// Lanes at and past `valid` set to zero (a partial block after a shift: the loads gave 0
// there, the shift made them -shift).
template <typename T, typename Valid>
[[gnu::always_inline]] inline void zero_tail(Block<T>& v, Valid valid) {
  if constexpr (std::is_same_v<Valid, int>) {
    for (int l = valid; l < kVec; ++l) v.v[l] = T(0);
  }
}

// ---- Row passes over x (vectorised, compiled per ISA). T: the compute type; X: x's dtype;
// kMaxK >= K (the dynamic columns, n + 2 at most).

// One pass over each stream row: the shifted sums s1 = Σ (x - shift), s2 = Σ (x - shift)²
// and the K projections q_k = Σ_c (x - shift) Wt_kc, then the stream's coefficients.
template <int kMaxK, typename T, typename X>
[[gnu::always_inline]] inline void forward_range(const X* x, const T* wt_t, HcShape s, int64_t C, HcParams<T> p, T eps,
                                                 T* proj, T* stats, T* h_pre, T* h_post, T* h_res, int64_t t0,
                                                 int64_t t1) {
  const int n = s.n, K = s.K;
  Block<T> acc[kMaxK];
  for (int64_t t = t0; t < t1; ++t) {
    for (int i = 0; i < n; ++i) {
      const int64_t r = t * n + i;
      const X* row = x + r * C;
      const T shift = s.layer_norm ? static_cast<T>(row[0]) : T(0);
      Block<T> a1(T(0)), a2(T(0));
      for (int k = 0; k < K; ++k) acc[k] = Block<T>(T(0));
      for_channel_blocks(C, [&](int64_t c, auto valid) __attribute__((always_inline)) {
        Block<T> v = load_block<T>(row + c, valid) - Block<T>(shift);
        zero_tail(v, valid);
        a1 = a1 + v;
        a2 = a2 + v * v;
        for (int k = 0; k < K; ++k) acc[k] = acc[k] + v * load_block<T>(wt_t + k * C + c, valid);
      });
      T* q = proj + r * K;
      for (int k = 0; k < K; ++k) q[k] = lane_sum(acc[k]);
      hc_stream_forward(s, p, i, T(C), eps, shift, lane_sum(a1), lane_sum(a2), q, stats + 2 * r, h_pre + t * n,
                        h_post + t * n, h_res + t * n * n);
    }
  }
}

// One task of the Ĝ reduction: channels [c0, c0 + width) (width <= kTile) over the tokens
// [ta, tb): out[c * K + k] = Σ_t Σ_i (x_ic - mean_i) e_ik.
constexpr int kTileBlocks = 4;                // blocks of lanes per task
constexpr int64_t kTile = kTileBlocks * kVec;  // channels per task
template <int kMaxK, typename T, typename X>
[[gnu::always_inline]] inline void centered_grad_tile(const X* x, const T* e, const T* stats, int n, int K, int64_t C,
                                                      int64_t c0, int64_t width, int64_t ta, int64_t tb, T* out) {
  Block<T> acc[kMaxK][kTileBlocks];
  for (int k = 0; k < K; ++k) {
    for (int j = 0; j < kTileBlocks; ++j) acc[k][j] = Block<T>(T(0));
  }
  const int full = static_cast<int>(width / kVec);
  const int tail = static_cast<int>(width % kVec);
  for (int64_t t = ta; t < tb; ++t) {
    for (int i = 0; i < n; ++i) {
      const int64_t r = t * n + i;
      const X* row = x + r * C + c0;
      const Block<T> mean(stats[2 * r]);
      Block<T> xb[kTileBlocks];
      for (int j = 0; j < full; ++j) xb[j] = load_block<T>(row + j * kVec, std::integral_constant<int, kVec>{}) - mean;
      if (tail) xb[full] = load_block<T>(row + full * kVec, tail) - mean;  // lanes past the tail are never stored
      const int blocks = full + (tail ? 1 : 0);
      for (int k = 0; k < K; ++k) {
        const Block<T> ek(e[r * K + k]);
        for (int j = 0; j < blocks; ++j) acc[k][j] = acc[k][j] + xb[j] * ek;
      }
    }
  }
  for (int64_t c = 0; c < width; ++c) {
    for (int k = 0; k < K; ++k) out[(c0 + c) * K + k] = acc[k][c / kVec].v[c % kVec];
  }
}

// dx = Wc e + xcoef (x - mean), accumulated in T and rounded to x's dtype once.
template <int kMaxK, typename T, typename X>
[[gnu::always_inline]] inline void grad_x_range(const X* x, const T* wc_t, const T* e, const T* xcoef, const T* stats,
                                                X* dx, int n, int K, int64_t C, int64_t t0, int64_t t1) {
  T ek[kMaxK];
  for (int64_t t = t0; t < t1; ++t) {
    for (int i = 0; i < n; ++i) {
      const int64_t r = t * n + i;
      const Block<T> b(xcoef[r]), mean(stats[2 * r]);
      for (int k = 0; k < K; ++k) ek[k] = e[r * K + k];
      const X* row = x + r * C;
      X* out = dx + r * C;
      for_channel_blocks(C, [&](int64_t c, auto valid) __attribute__((always_inline)) {
        Block<T> v = b * (load_block<T>(row + c, valid) - mean);
        for (int k = 0; k < K; ++k) v = v + load_block<T>(wc_t + k * C + c, valid) * Block<T>(ek[k]);
        store_block(out + c, v, valid);
      });
    }
  }
}

#define HCEXT_HC_ROW_KERNELS(Name, ...)                                                      \
  struct Name {                                                                              \
    template <int kMaxK, typename... A>                                                      \
    __VA_ARGS__ static void forward(A... a) { forward_range<kMaxK>(a...); }                  \
    template <int kMaxK, typename... A>                                                      \
    __VA_ARGS__ static void centered_grad(A... a) { centered_grad_tile<kMaxK>(a...); }       \
    template <int kMaxK, typename... A>                                                      \
    __VA_ARGS__ static void grad_x(A... a) { grad_x_range<kMaxK>(a...); }                    \
  };
HCEXT_HC_ROW_KERNELS(BaselineRowKernels)
HCEXT_HC_ROW_KERNELS(Avx2RowKernels, HCEXT_TARGET_AVX2)
HCEXT_HC_ROW_KERNELS(Avx512RowKernels, HCEXT_TARGET_AVX512)
#undef HCEXT_HC_ROW_KERNELS

// fn(kernels, kMaxK): the ISA's kernel set and storage for the K <= n + 2 dynamic columns
// from the library's n dispatch (hcext/dispatch.h).
template <typename Fn>
void dispatch_row_kernels(int n, Fn&& fn) {
  cpu::dispatch_isa<BaselineRowKernels, Avx2RowKernels, Avx512RowKernels>([&](auto k) {
    dispatch_n(n, [&]<int kN, int kMaxN>() { fn(k, std::integral_constant<int, (kN > 0 ? kN : kMaxN) + 2>{}); });
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

// The CPU passes of hc_driver.h. x is contiguous.
struct CpuHcBackend {
  explicit CpuHcBackend(const at::Tensor&) {}

  template <typename T>
  void forward(const at::Tensor& x, const T* wt_t, const HcDims& d, const HcParams<T>& p, T eps, T* proj, T* stats,
               T* h_pre, T* h_post, T* h_res) {
    const int64_t grain = token_grain(d.n * d.C * (d.shape.K + 2));
    CpuStreamsBackend::dispatch_dtype_for<T>(x.scalar_type(), [&](auto xtag) {
      using X = decltype(xtag);
      const X* xp = static_cast<const X*>(x.data_ptr());
      dispatch_row_kernels(d.n, [&](auto k, auto kMaxK) {
        at::parallel_for(0, d.tokens, grain, [&](int64_t t0, int64_t t1) {
          decltype(k)::template forward<decltype(kMaxK)::value>(xp, wt_t, d.shape, d.C, p, eps, proj, stats, h_pre,
                                                                h_post, h_res, t0, t1);
        });
      });
    });
  }
  template <typename T>
  void epilogue_backward(const HcDims& d, const HcParams<T>& p, const T* q, const T* stats, const T* g_pre,
                         const T* g_post, const T* g_res, T* e, T* xcoef, T* partial) {
    epilogue_backward_pass<T>(d, p, q, stats, g_pre, g_post, g_res, e, xcoef, partial);
  }
  // G [C, K] = Σ_tokens Σ_i (x_ic - mean_i) e_ik. Tasks are (token chunk, channel tile); the
  // chunking depends on the problem size only, and the chunks' partial sums are added in
  // chunk order, so the result does not depend on the thread count.
  template <typename T>
  void centered_grad(const at::Tensor& x, const T* e, const T* stats, at::Tensor& G, const HcDims& d) {
    const int n = d.n, K = d.shape.K;
    const int64_t C = d.C, tokens = d.tokens;
    const int64_t tiles = (C + kTile - 1) / kTile;
    const int64_t max_chunks = std::max<int64_t>(1, std::min<int64_t>(16, (int64_t(1) << 24) / (C * K)));
    const int64_t chunk_tokens = std::max<int64_t>(512, (tokens + max_chunks - 1) / max_chunks);
    const int64_t chunks = (tokens + chunk_tokens - 1) / chunk_tokens;
    std::vector<T> partials(chunks > 1 ? chunks * C * K : 0);
    T* out_base = chunks > 1 ? partials.data() : G.data_ptr<T>();
    CpuStreamsBackend::dispatch_dtype_for<T>(x.scalar_type(), [&](auto xtag) {
      using X = decltype(xtag);
      const X* xp = static_cast<const X*>(x.data_ptr());
      dispatch_row_kernels(n, [&](auto k, auto kMaxK) {
        at::parallel_for(0, chunks * tiles, 1, [&](int64_t begin, int64_t end) {
          for (int64_t task = begin; task < end; ++task) {
            const int64_t chunk = task / tiles, c0 = (task % tiles) * kTile;
            decltype(k)::template centered_grad<decltype(kMaxK)::value>(
                xp, e, stats, n, K, C, c0, std::min(kTile, C - c0), chunk * chunk_tokens,
                std::min(tokens, (chunk + 1) * chunk_tokens), out_base + chunk * C * K);
          }
        });
      });
    });
    if (chunks > 1) {
      T* g = G.data_ptr<T>();
      at::parallel_for(0, C * K, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          T sum = 0;
          for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partials[chunk * C * K + j];
          g[j] = sum;
        }
      });
    }
  }
  template <typename T>
  void grad_x(const at::Tensor& x, const T* wc_t, const T* e, const T* xcoef, const T* stats, at::Tensor& dx,
              const HcDims& d) {
    const int64_t grain = token_grain(d.n * d.C * (d.shape.K + 2));
    CpuStreamsBackend::dispatch_dtype_for<T>(x.scalar_type(), [&](auto xtag) {
      using X = decltype(xtag);
      const X* xp = static_cast<const X*>(x.data_ptr());
      X* out = static_cast<X*>(dx.data_ptr());
      dispatch_row_kernels(d.n, [&](auto k, auto kMaxK) {
        at::parallel_for(0, d.tokens, grain, [&](int64_t t0, int64_t t1) {
          decltype(k)::template grad_x<decltype(kMaxK)::value>(xp, wc_t, e, xcoef, stats, out, d.n, d.shape.K, d.C,
                                                               t0, t1);
        });
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CPU, m) { register_hc_kernels<CpuHcBackend>(m); }

}  // namespace hcext
