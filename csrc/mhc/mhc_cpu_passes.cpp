// The mHC CPU passes over x that replace the projection GEMMs (declared in mhc_cpu_passes.h):
// the forward's projection with the RMS statistic (and, from the same cached rows, mhc_pre's
// layer input; for the fused boundary each row is first written as the mix x_next), and the
// backward's grad_x with grad_phi's partial sums. Each reads x once, in its own dtype: no fp32
// copy of x, no BLAS call, no [tokens, n*C] intermediate (the GEMM formulation wrote
// dxp = dproj @ phiᵀ, an fp32 tensor of x's size, and read it back).
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
#include "hcext/dispatch.h"
#include "hcext/lanes.h"
#include "hcext/mhc.h"
#include "hcext/streams.h"
#include "streams/streams_cpu_rows.h"

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

// Row t of the boundary's mix into out (= the projection's x): the streams family's compiled CPU
// mix kernel on one token (streams/streams_cpu_rows.h: bitwise the unfused stream_mix_expand),
// with ordinary stores (the projection reads the row back from cache).
template <typename S, typename X>
[[gnu::always_inline]] inline void mix_row(const MhcMixArgs<S, X>& m, X* out, int64_t t, int64_t C) {
  mix_forward_tokens<X, S>(m.f, m.x, m.h_post, m.hp_stride, m.h_res, m.hr_stride, out, t, t + 1, m.n, C);
}

template <typename S, typename X>
[[gnu::always_inline]] inline void project_range(const X* x, const S* phi_pad, int64_t Dp, S* proj, S* rstd,
                                                 int64_t len, int64_t D, S norm_eps, int64_t t0, int64_t t1, S* buf,
                                                 const MhcLayerInputArgs<S, X>* li, const MhcMixArgs<S, X>* mix) {
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
      if (mix) mix_row(*mix, const_cast<X*>(x), t, len / mix->n);  // x is the mix's output here
      S* converted = nullptr;
      if constexpr (std::is_same_v<S, X>) {
        rows[j] = x + t * len;
      } else {
        converted = buf + j * len;
        rows[j] = converted;
      }
      rstd[t] = mhc_rstd<S>(row_squares<S>(x + t * len, len, converted), S(len), norm_eps);
    }
    // The next block's rows (the mix's inputs for the boundary) on their way to L2 while this
    // block's FMAs run, one cache line of each per line of k in the first column block: the
    // next block's squares otherwise waited on memory (perf, n = 4, C = 1024 fp32: ~23 % of
    // the pass's samples on that first read).
    const X* next[kTokens];
    const X* next_f[kTokens];
    int n_next = 0;
    for (int j = 0; j < kTokens && tb + kTokens + j < t1; ++j, ++n_next) {
      const int64_t t = tb + kTokens + j;
      next[j] = (mix ? mix->x : x) + t * len;
      next_f[j] = mix ? mix->f + t * (len / mix->n) : nullptr;
    }
    constexpr int64_t kLine = 64 / int64_t(sizeof(X));  // values of X per cache line
    // Column blocks of up to kColumns vectors: the block's accumulators stay in registers
    // while k runs over the whole row.
    auto sweep = [&]<int NC>(int64_t c0) __attribute__((always_inline)) {
      Col<S> acc[kTokens][NC];
      for (int j = 0; j < kTokens; ++j) {
        for (int c = 0; c < NC; ++c) acc[j][c] = Col<S>(S(0));
      }
      const S* p = phi_pad + c0;
      for (int64_t k0 = 0; k0 < len; k0 += kLine) {
        if (c0 == 0) {
          for (int j = 0; j < n_next; ++j) {
            __builtin_prefetch(next[j] + k0, 0, 2);
            if (mix && k0 % (mix->n * kLine) == 0) __builtin_prefetch(next_f[j] + k0 / mix->n, 0, 2);
          }
        }
        const int64_t k1 = std::min(len, k0 + kLine);
        for (int64_t k = k0; k < k1; ++k, p += Dp) {
          Col<S> ph[NC];
          for (int c = 0; c < NC; ++c) ph[c] = load_col(p + c * W);
          for (int j = 0; j < kTokens; ++j) {
            const Col<S> b(rows[j][k]);
            for (int c = 0; c < NC; ++c) acc[j][c] = acc[j][c] + b * ph[c];
          }
        }
      }
      // Compile-time j and c (unrolled), lanes indexed on a copy: acc stays in registers (see
      // grad_x_phi_range's store).
#pragma GCC unroll 8
      for (int j = 0; j < kTokens; ++j) {
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) {
          const Col<S> a = acc[j][c];
          if (j >= nt) continue;
          S* out = proj + (tb + j) * D;
          for (int l = 0; l < W; ++l) {
            const int64_t col = c0 + c * W + l;
            if (col < D) out[col] = a.v[l];
          }
        }
      }
    };
    int64_t c0 = 0;
    for (; c0 + kColumns * W <= Dp; c0 += kColumns * W) sweep.template operator()<kColumns>(c0);
    if (Dp - c0 == 2 * W) sweep.template operator()<2>(c0);
    if (Dp - c0 == W) sweep.template operator()<1>(c0);
    // The layer input from the block's rows, still in cache (in S: x itself or the converted
    // buffer): y = sum_i h_pre[i] x_i, summed in stream order in S, rounded once.
    if (li) {
      const int n = li->n;
      const int64_t C = len / n;
      for (int j = 0; j < nt; ++j) {
        const int64_t t = tb + j;
        S hp[kStreamsMaxN];
        for (int i = 0; i < n; ++i) {
          hp[i] = li->weights ? li->weights[t * li->w_stride + i]
                              : mhc_h_pre<S, S>(proj[t * D + i], rstd[t], li->alpha, li->bias[i], li->pre_eps);
        }
        for_channel_blocks(C, [&](int64_t c, auto valid) __attribute__((always_inline)) {
          const auto acc = stream_aggregate_value<0, Lanes<S, kVecIoWidth>>(
              hp, n, [&](int i) __attribute__((always_inline)) { return load_block<S, S>(rows[j] + i * C + c, valid); });
          store_block(li->y + t * C + c, acc, valid);
        });
      }
    }
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

// Register blocks of the backward pass, per ISA (accumulators + operands within the vector
// registers: 16 with AVX2, 32 with AVX-512; the baseline build takes AVX2's shape).
struct GradBlocks16 {
  static constexpr int kTokens = 6;   // grad_x: tokens x kVectors accumulators
  static constexpr int kVectors = 2;  // vectors of channels per group (both sweeps)
  static constexpr int kColumns = 6;  // grad_phi: columns x kVectors accumulators
};
struct GradBlocks32 {
  static constexpr int kTokens = 6;
  static constexpr int kVectors = 4;
  static constexpr int kColumns = 6;
};

constexpr int64_t kChunkTokens = kMhcGradChunkTokens;

// acc[j][v] += sum_d dproj[tj[j] * D + d] * phi[d * P + v * W ..]: the grad_x sweep's FMAs, on a
// copy of the accumulators that only this loop sees (g++ otherwise kept acc's stack copy current
// on every d: 24 stores per 24 FMAs, ~40 % of the pass's samples in perf).
template <int TB, int NV, int W, typename V, typename S, typename Width>
[[gnu::always_inline]] inline void phi_product(V (&acc)[TB][NV], const S* phi, int64_t P, const S* dproj,
                                               const int64_t (&tj)[TB], int64_t D, Width vw) {
  V r[TB][NV];
#pragma GCC unroll 8
  for (int j = 0; j < TB; ++j) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) r[j][v] = acc[j][v];
  }
  for (int64_t d = 0; d < D; ++d) {
    V p[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) p[v] = load_block<S, S, W>(phi + d * P + v * W, vw(v));
#pragma GCC unroll 8
    for (int j = 0; j < TB; ++j) {
      const S b = dproj[tj[j] * D + d];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) r[j][v] = r[j][v] + b * p[v];
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < TB; ++j) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[j][v] = r[j][v];
  }
}

// The backward's pass for tokens [t0, t1), in chunks of kChunkTokens tokens. For each group of
// kVectors vectors of channels (one stream i, channels c..), while the chunk's x for that
// group (kChunkTokens x kVectors x W values) sits in L1:
//  1. grad_x: blocks of kTokens tokens x the group's vectors of accumulators, running over
//     d with dproj[t, d] broadcast and phi[.., d] (a panel row) loaded once per block;
//  2. grad_phi: kColumns columns x the group's vectors of accumulators, running over the
//     chunk's tokens with dproj[t, d] broadcast, then added to partialP once per chunk.
// Every value of x, gy, extra and dx is read or written once from memory; phi's and partialP's
// pieces for the group (contiguous in the panel layout) and the group's x (copied to a buffer
// in S) are reused across the chunk's tokens from L1.
template <class Blocks, typename S, typename X>
[[gnu::always_inline]] inline void grad_x_phi_range(const X* x, const S* phiP, const S* dproj, const S* factor,
                                                    const S* h, const S* gy, const X* extra, X* dx, S* partialP, int n,
                                                    int64_t C, int64_t D, int64_t t0, int64_t t1, bool stream,
                                                    const MhcNextRows<S, X>* next) {
  constexpr int W = kColWidth<S>;
  constexpr int TB = Blocks::kTokens, VB = Blocks::kVectors, DB = Blocks::kColumns;
  constexpr int64_t P = kMhcPanel<S>;
  static_assert(P % (VB * W) == 0, "a group of vectors never crosses a panel");
  using V = Col<S>;
  const int64_t len = n * C, panels = mhc_panels<S>(C);
  // The chunk's x for the current group, converted to S by the grad_x sweep and read back
  // by the grad_phi sweep: contiguous, so it stays in L1 (x's own rows do not, see below).
  constexpr int G = VB * W;
  alignas(64) S xbuf[kChunkTokens * G];
  // grad_x is written once and not read again here: streamed past the caches when large
  // (cpu_vec_io.h; the caller decides, the whole tensor's size is not known here).
  // One group: NV vectors at channel c of stream i (the last NV - 1 full, the last one `valid`
  // channels wide), tokens [cb, ce).
  auto group = [&]<int NV>(int i, int64_t c, int64_t cb, int64_t ce, auto valid) __attribute__((always_inline)) {
    const int64_t k = i * C + c;
    const int64_t pk = (i * panels + c / P) * D * P + c % P;  // the group in a panel layout
    auto vw = [&](int v) { return v == NV - 1 ? int(valid) : W; };
    // 1. grad_x. Padding tokens repeat the block's first token and are not stored.
    for (int64_t tb = cb; tb < ce; tb += TB) {
      const int nt = static_cast<int>(std::min<int64_t>(TB, ce - tb));
      int64_t tj[TB];
      for (int j = 0; j < TB; ++j) tj[j] = tb + (j < nt ? j : 0);
      // Every addition takes one product and the running sum (never two products), so FMA
      // contraction has one way to round it: an absent gradient and a zero one give the same bits.
      V acc[TB][NV];
      // The next block's rows of this group on their way to L2 while this block's FMAs run:
      // the chunk's rows sit len * sizeof(X) bytes apart (a multiple of 4 KB for the usual C),
      // too many streams for the hardware prefetcher, and all in the same few L1 sets.
      for (int64_t t = tb + 2 * TB; t < std::min(ce, tb + 3 * TB); ++t) {
        for (int64_t b = 0; b < int64_t(sizeof(X)) * NV * W; b += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(x + t * len + k) + b, 0, 2);
          if (extra) __builtin_prefetch(reinterpret_cast<const char*>(extra + t * len + k) + b, 0, 2);
        }
        if (gy) __builtin_prefetch(gy + t * C + c, 0, 2);
      }
      for (int j = 0; j < TB; ++j) {
        for (int v = 0; v < NV; ++v) {
          const int64_t at = tj[j] * len + k + v * W;
          const V xv = load_block<S, X, W>(x + at, vw(v));
          if (j < nt) std::memcpy(xbuf + (tj[j] - cb) * G + v * W, &xv.v, sizeof(xv.v));
          acc[j][v] = extra ? load_block<S, X, W>(extra + at, vw(v)) : V(S(0));
          acc[j][v] = acc[j][v] + factor[tj[j]] * xv;
          if (gy) acc[j][v] = acc[j][v] + h[tj[j] * n + i] * load_block<S, S, W>(gy + tj[j] * C + c + v * W, vw(v));
        }
      }
      phi_product<TB, NV, W>(acc, phiP + pk, P, dproj, tj, D, vw);
      // j and v run to compile-time bounds (unrolled: acc[j][v] stays in registers; a loop to
      // the run-time nt indexed acc in memory and g++ then stored all of it to the stack on
      // every d above), and each vector is stored from a copy (store_out's partial-vector path
      // indexes its lanes).
#pragma GCC unroll 8
      for (int j = 0; j < TB; ++j) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          const V out = acc[j][v];
          if (j < nt) store_out(dx + tj[j] * len + k + v * W, out, vw(v), stream);
        }
      }
    }
    // The next block's rows of this group on their way to L2 (see MhcNextRows).
    if (next) {
      for (int64_t t = 0; t < next->tokens; ++t) {
        for (int64_t b = 0; b < int64_t(sizeof(X)) * NV * W; b += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(next->x + t * len + k) + b, 0, 2);
          if (next->extra) __builtin_prefetch(reinterpret_cast<const char*>(next->extra + t * len + k) + b, 0, 2);
        }
        if (next->gy && i == 0) {
          for (int64_t b = 0; b < int64_t(sizeof(S)) * NV * W; b += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(next->gy + t * C + c) + b, 0, 2);
          }
        }
      }
    }
    // 2. grad_phi's share of the chunk.
    for (int64_t d0 = 0; d0 < D; d0 += DB) {
      with_count<DB>(static_cast<int>(std::min<int64_t>(DB, D - d0)), [&]<int DC>() __attribute__((always_inline)) {
        V acc[DC][NV];
        for (int q = 0; q < DC; ++q) {
          for (int v = 0; v < NV; ++v) acc[q][v] = V(S(0));
        }
        for (int64_t t = cb; t < ce; ++t) {
          V xv[NV];
          for (int v = 0; v < NV; ++v) std::memcpy(&xv[v].v, xbuf + (t - cb) * G + v * W, sizeof(xv[v].v));
          const S* dp = dproj + t * D + d0;
          for (int q = 0; q < DC; ++q) {
            for (int v = 0; v < NV; ++v) acc[q][v] = acc[q][v] + dp[q] * xv[v];
          }
        }
        for (int q = 0; q < DC; ++q) {
          for (int v = 0; v < NV; ++v) {
            S* out = partialP + pk + (d0 + q) * P + v * W;
            store_block(out, load_block<S, S, W>(out, vw(v)) + acc[q][v], vw(v));
          }
        }
      });
    }
  };
  for (int64_t cb = t0; cb < t1; cb += kChunkTokens) {
    const int64_t ce = std::min(t1, cb + kChunkTokens);
    for (int i = 0; i < n; ++i) {
      int64_t c = 0;
      for (; c + VB * W <= C; c += VB * W) group.template operator()<VB>(i, c, cb, ce, std::integral_constant<int, W>{});
      // The rest of the stream: whole vectors, then one partial vector.
      const int64_t full = (C - c) / W;
      with_count<VB>(static_cast<int>(full), [&]<int NV>() __attribute__((always_inline)) {
        group.template operator()<NV>(i, c, cb, ce, std::integral_constant<int, W>{});
      });
      c += full * W;
      if (c < C) group.template operator()<1>(i, c, cb, ce, static_cast<int>(C - c));
    }
  }
  if (stream) stream_fence();
}

#define HCEXT_MHC_PASSES(Name, Blocks, ...)                                                  \
  struct Name {                                                                              \
    template <typename... A>                                                                 \
    __VA_ARGS__ static void project(A... a) { project_range(a...); }                         \
    template <typename S, typename X, typename... A>                                         \
    __VA_ARGS__ static void grad_x_phi(const X* x, const S* phiP, A... a) {                  \
      grad_x_phi_range<Blocks, S, X>(x, phiP, a...);                                         \
    }                                                                                        \
  };
HCEXT_MHC_PASSES(BaselinePasses, GradBlocks16)
HCEXT_MHC_PASSES(Avx2Passes, GradBlocks16, HCEXT_TARGET_AVX2)
HCEXT_MHC_PASSES(Avx512Passes, GradBlocks32, HCEXT_TARGET_AVX512)
#undef HCEXT_MHC_PASSES

}  // namespace

int64_t mhc_project_width(int64_t D, bool fp64) {
  const int64_t w = fp64 ? kColWidth<double> : kColWidth<float>;
  return (D + w - 1) / w * w;
}

template <typename S, typename X>
void mhc_project_rows(const X* x, const S* phi_pad, int64_t Dp, S* proj, S* rstd, int64_t len, int64_t D,
                      S norm_eps, int64_t t0, int64_t t1, S* buf, const MhcLayerInputArgs<S, X>* li,
                      const MhcMixArgs<S, X>* mix) {
  dispatch_isa<BaselinePasses, Avx2Passes, Avx512Passes>(
      [&](auto k) { decltype(k)::project(x, phi_pad, Dp, proj, rstd, len, D, norm_eps, t0, t1, buf, li, mix); });
}

template <typename S, typename X>
void mhc_grad_x_phi_rows(const X* x, const S* phiP, const S* dproj, const S* factor, const S* h, const S* gy,
                         const X* extra, X* dx, S* partialP, int n, int64_t C, int64_t D, int64_t t0, int64_t t1,
                         bool stream, const MhcNextRows<S, X>* next) {
  dispatch_isa<BaselinePasses, Avx2Passes, Avx512Passes>([&](auto k) {
    decltype(k)::grad_x_phi(x, phiP, dproj, factor, h, gy, extra, dx, partialP, n, C, D, t0, t1, stream, next);
  });
}

template <typename S>
void mhc_pack_phi_panels(const S* phi, S* panels, int n, int64_t C, int64_t D) {
  constexpr int64_t P = kMhcPanel<S>;
  const int64_t np = mhc_panels<S>(C);
  for (int i = 0; i < n; ++i) {
    for (int64_t p = 0; p < np; ++p) {
      S* out = panels + (i * np + p) * D * P;
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t cc = 0; cc < P; ++cc) {
          const int64_t c = p * P + cc;
          out[d * P + cc] = c < C ? phi[(i * C + c) * D + d] : S(0);
        }
      }
    }
  }
}

template <typename S>
void mhc_sum_panels(const S* partials, int64_t chunks, S* grad_phi, int n, int64_t C, int64_t D, int64_t q0,
                    int64_t q1) {
  constexpr int64_t P = kMhcPanel<S>;
  const int64_t np = mhc_panels<S>(C), size = mhc_panel_size<S>(n, C, D);
  S sum[P];
  for (int64_t q = q0; q < q1; ++q) {  // q = i * np + p
    const int64_t i = q / np, c0 = (q % np) * P, cn = std::min(P, C - c0);
    for (int64_t d = 0; d < D; ++d) {
      const S* row = partials + (q * D + d) * P;
      for (int64_t cc = 0; cc < P; ++cc) sum[cc] = row[cc];
      for (int64_t ch = 1; ch < chunks; ++ch) {
        for (int64_t cc = 0; cc < P; ++cc) sum[cc] += row[ch * size + cc];
      }
      for (int64_t cc = 0; cc < cn; ++cc) grad_phi[(i * C + c0 + cc) * D + d] = sum[cc];
    }
  }
}

template void mhc_pack_phi_panels<float>(const float*, float*, int, int64_t, int64_t);
template void mhc_pack_phi_panels<double>(const double*, double*, int, int64_t, int64_t);
template void mhc_sum_panels<float>(const float*, int64_t, float*, int, int64_t, int64_t, int64_t, int64_t);
template void mhc_sum_panels<double>(const double*, int64_t, double*, int, int64_t, int64_t, int64_t, int64_t);

#define HCEXT_INSTANTIATE(S, X)                                                                                   \
  template void mhc_project_rows<S, X>(const X*, const S*, int64_t, S*, S*, int64_t, int64_t, S, int64_t, int64_t, \
                                       S*, const MhcLayerInputArgs<S, X>*, const MhcMixArgs<S, X>*);              \
  template void mhc_grad_x_phi_rows<S, X>(const X*, const S*, const S*, const S*, const S*, const S*, const X*, X*, \
                                          S*, int, int64_t, int64_t, int64_t, int64_t, bool,                      \
                                          const MhcNextRows<S, X>*);
HCEXT_INSTANTIATE(float, float)
HCEXT_INSTANTIATE(double, double)
HCEXT_INSTANTIATE(float, c10::BFloat16)
HCEXT_INSTANTIATE(float, c10::Half)
#undef HCEXT_INSTANTIATE

}  // namespace hcext::cpu
