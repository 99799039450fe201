#pragma once
// Argument checks of the mHC family (mhc_coeffs, mhc_pre, mhc_post_pre and their backward
// ops), used by mhc_driver.h. Torch glue, compiled by g++ only. The fake kernels
// (hcext/ops/mhc.py) mirror these checks and messages.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "hcext/mhc.h"
#include "common/checks.h"
#include "sinkhorn/sinkhorn_checks.h"

namespace hcext {

struct MhcDims {
  int64_t tokens;  // product of x's leading dims
  int n;           // streams
  int64_t C;       // channels per stream
  int64_t D;       // coefficient width n*n + 2n
  at::ScalarType compute;  // fp32 (fp64 for fp64 x)
};

inline MhcDims check_mhc_args(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                              const at::Tensor& bias, int64_t iters, double sinkhorn_eps, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": expected x of shape [..., n, C] with at least 2 dims, got shape ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || xt == at::kBFloat16 || xt == at::kHalf, op,
              ": expected x of dtype float32, bfloat16, float16 or float64, got ", xt);
  MhcDims d;
  d.n = static_cast<int>(x.size(-2));
  d.C = x.size(-1);
  TORCH_CHECK(x.size(-2) >= 1 && x.size(-2) <= kMhcMaxN, op, ": expected n = x.size(-2) in [1, ", kMhcMaxN,
              "], got ", x.size(-2));
  TORCH_CHECK(d.C >= 1, op, ": expected C = x.size(-1) >= 1, got ", d.C);
  d.D = mhc_coeff_width(d.n);
  d.tokens = x.numel() / (int64_t(d.n) * d.C);
  d.compute = compute_dtype(xt);
  TORCH_CHECK(phi.dim() == 2 && phi.size(0) == d.n * d.C && phi.size(1) == d.D, op, ": expected phi of shape [n*C, n*n+2n] = [",
              d.n * d.C, ", ", d.D, "] for x of shape ", x.sizes(), ", got ", phi.sizes());
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == 3, op,
              ": expected alpha of shape [3] (alpha_pre, alpha_post, alpha_res), got ", alpha.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == d.D, op, ": expected bias of shape [n*n+2n] = [", d.D, "], got ",
              bias.sizes());
  check_coeff_dtype(phi, d.compute, op, "phi");
  check_coeff_dtype(alpha, d.compute, op, "alpha");
  check_coeff_dtype(bias, d.compute, op, "bias");
  check_same_device(phi, x, op, "phi");
  check_same_device(alpha, x, op, "alpha");
  check_same_device(bias, x, op, "bias");
  TORCH_CHECK(iters >= 1 && iters <= kSinkhornMaxIters, op, ": expected sinkhorn_iters in [1, ", kSinkhornMaxIters,
              "], got ", iters);
  TORCH_CHECK(std::isfinite(sinkhorn_eps) && sinkhorn_eps >= 0, op, ": expected sinkhorn_eps finite and >= 0, got ",
              sinkhorn_eps);
  return d;
}

inline void check_mhc_scalars(double pre_eps, double post_mult, const char* op) {
  TORCH_CHECK(std::isfinite(pre_eps), op, ": expected pre_eps finite, got ", pre_eps);
  TORCH_CHECK(std::isfinite(post_mult), op, ": expected post_mult finite, got ", post_mult);
}

// The saved forward intermediates of the backward ops: proj [..., D] and rstd [...].
inline void check_mhc_saved(const MhcDims& d, const at::Tensor& x, const at::Tensor& proj, const at::Tensor& rstd,
                            const char* op) {
  TORCH_CHECK(proj.numel() == d.tokens * d.D && proj.size(-1) == d.D, op, ": expected proj of shape [..., ", d.D,
              "] with x's leading dims, got ", proj.sizes());
  TORCH_CHECK(rstd.numel() == d.tokens, op, ": expected rstd with one value per token (", d.tokens, "), got ",
              rstd.sizes());
  check_coeff_dtype(proj, d.compute, op, "proj");
  check_coeff_dtype(rstd, d.compute, op, "rstd");
  check_same_device(proj, x, op, "proj");
  check_same_device(rstd, x, op, "rstd");
}

}  // namespace hcext
