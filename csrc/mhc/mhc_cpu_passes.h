#pragma once
// The mHC CPU passes that read x in its own dtype and replace the projection GEMMs
// (mhc_cpu_passes.cpp; the CPU backend in mhc_cpu.cpp runs them over token ranges).
// Torch-light: raw pointers; X is float, double, c10::BFloat16 or c10::Half, S the compute
// type (double for double x, else float).

#include <cstdint>

namespace hcext::cpu {

// Columns of the padded phi the projection reads: D rounded up to a whole vector.
int64_t mhc_project_width(int64_t D, bool fp64);

// proj[t] = x[t] @ phi and rstd[t] = 1/sqrt(mean(x[t]²) + norm_eps) for tokens [t0, t1), in
// one pass over x (no copy of x in S beyond a per-thread block of rows):
//   x       [tokens, len] contiguous, in X;
//   phi_pad [len, Dp] (Dp = mhc_project_width(D, ...)), phi's rows zero-padded;
//   proj    [tokens, D], rstd [tokens];
//   buf     4 * len values of S of scratch (a block of rows converted to S) when X != S.
// Sums in S with FMA where the CPU has it (tolerance, not bits, against the baseline ISA).
template <typename S, typename X>
void mhc_project_rows(const X* x, const S* phi_pad, int64_t Dp, S* proj, S* rstd, int64_t len, int64_t D,
                      S norm_eps, int64_t t0, int64_t t1, S* buf);

// The backward's pass over x for tokens [t0, t1) (one pass: reads x, gy, extra once, writes dx
// once, every term summed in S and rounded once):
//   dx[t, k]    = sum_d dproj[t, d] phi[k, d]        (the projection's share, phiT = phiᵀ [D, len])
//               + factor[t] x[t, k]                  (the RMS statistic's share)
//               + h[t, i] gy[t, c]   (k = i C + c; when gy: the layer input's share, h [tokens, n])
//               + extra[t, k]                        (when extra: another consumer's gradient, in X)
//   partialT[d, k] += sum_t dproj[t, d] x[t, k]      (grad_phiᵀ's share of these tokens)
// dx may not alias x.
template <typename S, typename X>
void mhc_grad_x_phi_rows(const X* x, const S* phiT, const S* dproj, const S* factor, const S* h, const S* gy,
                         const X* extra, X* dx, S* partialT, int n, int64_t C, int64_t D, int64_t t0, int64_t t1);

}  // namespace hcext::cpu
