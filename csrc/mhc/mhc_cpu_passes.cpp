// The mHC CPU passes over x that replace the projection GEMMs (declared in mhc_cpu_passes.h):
// the forward's projection with the RMS statistic, and the backward's grad_x with grad_phi's
// partial sums. Each reads x once, in its own dtype: no fp32 copy of x, no BLAS call, no
// [tokens, n*C] intermediate (the GEMM formulation wrote dxp = dproj @ phiᵀ, an fp32 tensor of
// x's size, and read it back).
//
// Why register blocking: the projection is a skinny product ([tokens, n*C] x [n*C, D], D =
// n² + 2n = 24 for n = 4), which BLAS libraries run far below their square-GEMM rate. Here a
// block of 4 tokens x 3 vectors of columns (12 accumulators, 4 broadcasts and 3 loads of phi
// per element of x) keeps the FMA units busy from L1/L2.
//
// FMA: this file is compiled with fp-contract=fast (a * b + c -> one FMA on the AVX2 / AVX-512
// variants), so its results differ from the baseline ISA's by rounding only (the tolerance
// table; the GEMMs they replace rounded differently again).

#pragma GCC optimize("fp-contract=fast")

#include "mhc/mhc_cpu_passes.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common/cpu_isa.h"
#include "common/cpu_vec_io.h"
#include "hcext/lanes.h"
#include "hcext/mhc.h"

namespace hcext::cpu {
namespace {

constexpr int kTokens = 4;   // tokens per register block (both passes)
constexpr int kColumns = 3;  // column vectors per register block (projection)

template <typename S>
constexpr int kColWidth = 32 / int(sizeof(S));  // 8 floats, 4 doubles per column vector

template <typename S>
using Col = Lanes<S, kColWidth<S>>;

template <typename S>
[[gnu::always_inline]] inline Col<S> load_col(const S* p) {
  Col<S> r;
  std::memcpy(&r.v, p, sizeof(r.v));
  return r;
}

// Sum of squares of a row (lane order, then lanes summed in order); converts it to S into
// `out` when out is non-null.
template <typename S, typename X>
[[gnu::always_inline]] inline S row_squares(const X* row, int64_t len, S* out) {
  Lanes<S, kVecIoWidth> sq(S(0));
  for_channel_blocks(len, [&](int64_t c, auto valid) __attribute__((always_inline)) {
    const Lanes<S, kVecIoWidth> v = load_block<S>(row + c, valid);
    sq = sq + v * v;
    if (out) store_block(out + c, v, valid);
  });
  return lane_sum(sq);
}

template <typename S, typename X>
[[gnu::always_inline]] inline void project_range(const X* x, const S* phi_pad, int64_t Dp, S* proj, S* rstd,
                                                 int64_t len, int64_t D, S norm_eps, int64_t t0, int64_t t1, S* buf) {
  constexpr int W = kColWidth<S>;
  for (int64_t tb = t0; tb < t1; tb += kTokens) {
    const int nt = static_cast<int>(std::min<int64_t>(kTokens, t1 - tb));
    const S* rows[kTokens];
    for (int j = 0; j < kTokens; ++j) {
      if (j >= nt) {
        rows[j] = rows[0];  // padding: computed, never stored
        continue;
      }
      const int64_t t = tb + j;
      S* converted = nullptr;
      if constexpr (std::is_same_v<S, X>) {
        rows[j] = x + t * len;
      } else {
        converted = buf + j * len;
        rows[j] = converted;
      }
      rstd[t] = mhc_rstd<S>(row_squares<S>(x + t * len, len, converted), S(len), norm_eps);
    }
    // Column blocks of up to kColumns vectors: the block's accumulators stay in registers
    // while k runs over the whole row.
    auto sweep = [&]<int NC>(int64_t c0) __attribute__((always_inline)) {
      Col<S> acc[kTokens][NC];
      for (int j = 0; j < kTokens; ++j) {
        for (int c = 0; c < NC; ++c) acc[j][c] = Col<S>(S(0));
      }
      const S* p = phi_pad + c0;
      for (int64_t k = 0; k < len; ++k, p += Dp) {
        Col<S> ph[NC];
        for (int c = 0; c < NC; ++c) ph[c] = load_col(p + c * W);
        for (int j = 0; j < kTokens; ++j) {
          const Col<S> b(rows[j][k]);
          for (int c = 0; c < NC; ++c) acc[j][c] = acc[j][c] + b * ph[c];
        }
      }
      for (int j = 0; j < nt; ++j) {
        S* out = proj + (tb + j) * D;
        for (int c = 0; c < NC; ++c) {
          for (int l = 0; l < W; ++l) {
            const int64_t col = c0 + c * W + l;
            if (col < D) out[col] = acc[j][c].v[l];
          }
        }
      }
    };
    int64_t c0 = 0;
    for (; c0 + kColumns * W <= Dp; c0 += kColumns * W) sweep.template operator()<kColumns>(c0);
    if (Dp - c0 == 2 * W) sweep.template operator()<2>(c0);
    if (Dp - c0 == W) sweep.template operator()<1>(c0);
  }
}

// fn.template operator()<N>() for N == count, 1 <= count <= kMax (compile-time loop bounds, so
// that accumulators stay in registers).
template <int kMax, typename Fn>
[[gnu::always_inline]] inline void with_count(int count, Fn&& fn) {
  if constexpr (kMax > 0) {
    if (count == kMax) return fn.template operator()<kMax>();
    with_count<kMax - 1>(count, fn);
  }
}

constexpr int kGradTokens = 8;      // tokens per register block of the grad_x sweep
constexpr int kChunkTokens = 16;    // tokens whose rows the two sweeps share (in L2)
constexpr int kGradColumns = 12;    // columns of grad_phi per register block

// The backward's pass for tokens [t0, t1), in chunks of kChunkTokens tokens whose rows stay in
// L2 between two sweeps (x read once from memory):
//  1. grad_x: blocks of kGradTokens tokens x one vector of channels, dproj[t, d] broadcast,
//     phiT[d] (one row of phiᵀ) loaded once per block;
//  2. grad_phi: one vector of k x kGradColumns columns of accumulators in registers over the
//     chunk's tokens, added to partialT once per chunk.
template <typename S, typename X>
[[gnu::always_inline]] inline void grad_x_phi_range(const X* x, const S* phiT, const S* dproj, const S* factor,
                                                    const S* h, const S* gy, const X* extra, X* dx, S* partialT, int n,
                                                    int64_t C, int64_t D, int64_t t0, int64_t t1) {
  constexpr int W = kColWidth<S>;
  using V = Col<S>;
  const int64_t len = n * C;
  for (int64_t cb = t0; cb < t1; cb += kChunkTokens) {
    const int64_t ce = std::min(t1, cb + kChunkTokens);
    // 1. grad_x. Padding tokens repeat the block's first token and are not stored.
    for (int64_t tb = cb; tb < ce; tb += kGradTokens) {
      const int nt = static_cast<int>(std::min<int64_t>(kGradTokens, ce - tb));
      int64_t tj[kGradTokens];
      for (int j = 0; j < kGradTokens; ++j) tj[j] = tb + (j < nt ? j : 0);
      for (int i = 0; i < n; ++i) {
        for_channel_blocks<W>(C, [&](int64_t c, auto valid) __attribute__((always_inline)) {
          const int64_t k = i * C + c;
          // Every addition takes one product and the running sum (never two products), so FMA
          // contraction has one way to round it: an absent gradient and a zero one give the same bits.
          V acc[kGradTokens];
          for (int j = 0; j < kGradTokens; ++j) {
            acc[j] = extra ? load_block<S, X, W>(extra + tj[j] * len + k, valid) : V(S(0));
            acc[j] = acc[j] + factor[tj[j]] * load_block<S, X, W>(x + tj[j] * len + k, valid);
            if (gy) acc[j] = acc[j] + h[tj[j] * n + i] * load_block<S, S, W>(gy + tj[j] * C + c, valid);
          }
          for (int64_t d = 0; d < D; ++d) {
            const V p = load_block<S, S, W>(phiT + d * len + k, valid);
            for (int j = 0; j < kGradTokens; ++j) acc[j] = acc[j] + dproj[tj[j] * D + d] * p;
          }
          for (int j = 0; j < nt; ++j) store_block(dx + tj[j] * len + k, acc[j], valid);
        });
      }
    }
    // 2. grad_phi's share of the chunk.
    for_channel_blocks<W>(len, [&](int64_t k, auto valid) __attribute__((always_inline)) {
      for (int64_t d0 = 0; d0 < D; d0 += kGradColumns) {
        with_count<kGradColumns>(static_cast<int>(std::min<int64_t>(kGradColumns, D - d0)),
                                 [&]<int DC>() __attribute__((always_inline)) {
          V acc[DC];
          for (int q = 0; q < DC; ++q) acc[q] = V(S(0));
          for (int64_t t = cb; t < ce; ++t) {
            const V xv = load_block<S, X, W>(x + t * len + k, valid);
            const S* dp = dproj + t * D + d0;
            for (int q = 0; q < DC; ++q) acc[q] = acc[q] + dp[q] * xv;
          }
          for (int q = 0; q < DC; ++q) {
            S* out = partialT + (d0 + q) * len + k;
            store_block(out, load_block<S, S, W>(out, valid) + acc[q], valid);
          }
        });
      }
    });
  }
}

#define HCEXT_MHC_PASSES(Name, ...)                                                          \
  struct Name {                                                                              \
    template <typename... A>                                                                 \
    __VA_ARGS__ static void project(A... a) { project_range(a...); }                         \
    template <typename... A>                                                                 \
    __VA_ARGS__ static void grad_x_phi(A... a) { grad_x_phi_range(a...); }                   \
  };
HCEXT_MHC_PASSES(BaselinePasses)
HCEXT_MHC_PASSES(Avx2Passes, HCEXT_TARGET_AVX2)
HCEXT_MHC_PASSES(Avx512Passes, HCEXT_TARGET_AVX512)
#undef HCEXT_MHC_PASSES

}  // namespace

int64_t mhc_project_width(int64_t D, bool fp64) {
  const int64_t w = fp64 ? kColWidth<double> : kColWidth<float>;
  return (D + w - 1) / w * w;
}

template <typename S, typename X>
void mhc_project_rows(const X* x, const S* phi_pad, int64_t Dp, S* proj, S* rstd, int64_t len, int64_t D,
                      S norm_eps, int64_t t0, int64_t t1, S* buf) {
  dispatch_isa<BaselinePasses, Avx2Passes, Avx512Passes>(
      [&](auto k) { decltype(k)::project(x, phi_pad, Dp, proj, rstd, len, D, norm_eps, t0, t1, buf); });
}

template <typename S, typename X>
void mhc_grad_x_phi_rows(const X* x, const S* phiT, const S* dproj, const S* factor, const S* h, const S* gy,
                         const X* extra, X* dx, S* partialT, int n, int64_t C, int64_t D, int64_t t0, int64_t t1) {
  dispatch_isa<BaselinePasses, Avx2Passes, Avx512Passes>([&](auto k) {
    decltype(k)::grad_x_phi(x, phiT, dproj, factor, h, gy, extra, dx, partialT, n, C, D, t0, t1);
  });
}

#define HCEXT_INSTANTIATE(S, X)                                                                                   \
  template void mhc_project_rows<S, X>(const X*, const S*, int64_t, S*, S*, int64_t, int64_t, S, int64_t, int64_t, \
                                       S*);                                                                       \
  template void mhc_grad_x_phi_rows<S, X>(const X*, const S*, const S*, const S*, const S*, const S*, const X*, X*, \
                                          S*, int, int64_t, int64_t, int64_t, int64_t);
HCEXT_INSTANTIATE(float, float)
HCEXT_INSTANTIATE(double, double)
HCEXT_INSTANTIATE(float, c10::BFloat16)
HCEXT_INSTANTIATE(float, c10::Half)
#undef HCEXT_INSTANTIATE

}  // namespace hcext::cpu
