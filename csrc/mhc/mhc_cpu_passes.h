#pragma once
// The mHC CPU passes that read x in its own dtype and replace the projection GEMMs
// (mhc_cpu_passes.cpp; the CPU backend in mhc_cpu.cpp runs them over token ranges).
// Torch-light: raw pointers; X is float, double, c10::BFloat16 or c10::Half, S the compute
// type (double for double x, else float).

#include <cstdint>

namespace hcext::cpu {

// Columns of the padded phi the projection reads: D rounded up to a whole vector.
int64_t mhc_project_width(int64_t D, bool fp64);

// The layer input of mhc_pre, computed by the projection pass while a block's rows are still
// in cache: y[t, c] = sum_i w[t, i] x[t, i, c] with w = h_pre = mhc_h_pre(proj[t, i], rstd[t]),
// or, for the shifted collapse, the given weights (pre_mix).
template <typename S, typename X>
struct MhcLayerInputArgs {
  const S* alpha;  // [3]
  const S* bias;   // [D] (h_pre's are the first n)
  S pre_eps;
  int n;
  X* y;            // [tokens, len / n]
  const S* weights = nullptr;  // the shifted collapse's pre_mix: token t at t * w_stride (0: shared)
  int64_t w_stride = 0;
};

// The fused boundary's mix, written by the projection pass one token ahead of projecting it:
// out[t, i] = Σ_j h_res[t, i, j] x[t, j] + h_post[t, i] f[t] (the streams family's mix, same
// arithmetic: bitwise the unfused stream_mix_expand), then out[t] is the x the pass projects.
template <typename S, typename X>
struct MhcMixArgs {
  const X* f;       // [tokens, C]
  const X* x;       // [tokens, n, C], contiguous
  const S* h_post;  // token t at h_post + t * hp_stride (0: shared)
  int64_t hp_stride;
  const S* h_res;   // token t at h_res + t * hr_stride (0: shared)
  int64_t hr_stride;
  int n;
};

// proj[t] = x[t] @ phi and rstd[t] = 1/sqrt(mean(x[t]²) + norm_eps) for tokens [t0, t1), in
// one pass over x (no copy of x in S beyond a per-thread block of rows), and, when li is not
// null, the layer input from the same rows:
//   x       [tokens, len] contiguous, in X;
//   phi_pad [len, Dp] (Dp = mhc_project_width(D, ...)), phi's rows zero-padded;
//   proj    [tokens, D], rstd [tokens];
//   buf     4 * len values of S of scratch (a block of rows converted to S) when X != S.
// Sums in S with FMA where the CPU has it (tolerance, not bits, against the baseline ISA).
// With mix: x is the boundary's output x_next, written here (row t from mix, just before it is
// projected) instead of read.
template <typename S, typename X>
void mhc_project_rows(const X* x, const S* phi_pad, int64_t Dp, S* proj, S* rstd, int64_t len, int64_t D,
                      S norm_eps, int64_t t0, int64_t t1, S* buf, const MhcLayerInputArgs<S, X>* li = nullptr,
                      const MhcMixArgs<S, X>* mix = nullptr);

// Tokens whose grad_phi shares mhc_grad_x_phi_rows sums together before adding them to
// partialP (fixed: the sum's order depends on the token range only). Callers' token ranges
// are best multiples of it. It is also the CPU backward pass's block of tokens (mhc_cpu.cpp:
// row sums, epilogue backward, grad_x, the boundary's mix backward, block by block), so a
// multiple of the epilogue's 8 lanes, and small enough that a block's rows stay in cache
// between the row sums and grad_x (n = 4, C = 1024, fp32: 384 KB, in a 1 MB L2). Measured
// (2026-12-06, AMD EPYC, 2 threads, T = 4096, n = 4, fp32; mhc_backward / the boundary's
// backward, min of 3-6 interleaved runs): 24 tokens 20.4 / 30.3 ms at C = 1024, 50.6 / 74.0 ms
// at C = 2560; 48 tokens 22.2 / 31.0, 55.6 / 73.9; 96 tokens 22.3 / 29.9, 55.9 / 82.2.
constexpr int64_t kMhcGradChunkTokens = 24;

// The backward pass reads phi and accumulates grad_phi's partial sums in panels: for stream i and panel
// p = c / P of its channels (P = kMhcPanel<S>, 128 bytes of S), the D rows of P values are
// contiguous, at ((i * panels + p) * D + d) * P + c % P with panels = ceil(C / P) (zero-padded).
// [D, n*C] rows would sit n*C*sizeof(S) bytes apart — a multiple of 4 KB for the usual C, so
// the D rows of one group of channels would share a few L1 sets and evict each other.
template <typename S>
constexpr int64_t kMhcPanel = 128 / static_cast<int64_t>(sizeof(S));

template <typename S>
inline int64_t mhc_panels(int64_t C) { return (C + kMhcPanel<S> - 1) / kMhcPanel<S>; }

// Values of S in one panel layout of [n*C, D].
template <typename S>
inline int64_t mhc_panel_size(int n, int64_t C, int64_t D) { return n * mhc_panels<S>(C) * D * kMhcPanel<S>; }

// phi [n*C, D] (row-major) -> its panel layout (mhc_panel_size values, padding zeroed).
template <typename S>
void mhc_pack_phi_panels(const S* phi, S* panels, int n, int64_t C, int64_t D);

// grad_phi [n*C, D] = the sum over chunks of `chunks` panel layouts (partials, one after
// another), added in chunk order; panels [q0, q1) of the n * mhc_panels(C) panels.
template <typename S>
void mhc_sum_panels(const S* partials, int64_t chunks, S* grad_phi, int n, int64_t C, int64_t D, int64_t q0,
                    int64_t q1);

// The next block of tokens a caller of mhc_grad_x_phi_rows will pass (pointers at its first
// token, the same layouts): its rows are prefetched to L2, a group of channels at a time, while
// this call's FMAs run, so that the next block's first pass over them (the layer input's row
// sums) reads cache, not memory.
template <typename S, typename X>
struct MhcNextRows {
  const X* x;
  const X* extra;  // nullable
  const S* gy;     // nullable
  int64_t tokens;
};

// The backward's pass over x for tokens [t0, t1) (one pass: reads x, gy, extra once, writes dx
// once, every term summed in S and rounded once):
//   dx[t, k]    = sum_d dproj[t, d] phi[k, d]        (the projection's share; phiP: phi's panels)
//               + factor[t] x[t, k]                  (the RMS statistic's share)
//               + h[t, i] gy[t, c]   (k = i C + c; when gy: the layer input's share, h [tokens, n])
//               + extra[t, k]                        (when extra: another consumer's gradient, in X)
//   partialP[k, d] += sum_t dproj[t, d] x[t, k]      (grad_phi's share of these tokens, panels)
// dx may not alias x. stream: dx's whole vectors are written with streaming stores
// (cpu::use_stream_stores on the whole dx; common/cpu_vec_io.h).
template <typename S, typename X>
void mhc_grad_x_phi_rows(const X* x, const S* phiP, const S* dproj, const S* factor, const S* h, const S* gy,
                         const X* extra, X* dx, S* partialP, int n, int64_t C, int64_t D, int64_t t0, int64_t t1,
                         bool stream, const MhcNextRows<S, X>* next = nullptr);

}  // namespace hcext::cpu
