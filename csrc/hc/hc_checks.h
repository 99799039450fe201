#pragma once
// Argument checks of the HC family (hcext::hc_coeffs_fwd, hcext::hc_coeffs_backward), used
// by hc_driver.h. Torch glue, compiled by g++ only. The fake kernels (hcext/ops/hc.py)
// mirror every check and message.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string_view>

#include "common/checks.h"
#include "hcext/hc.h"

namespace hcext {

struct HcDims {
  int64_t tokens;          // product of x's leading dims
  int n;                   // streams
  int64_t C;               // channels per stream
  at::ScalarType compute;  // fp32 (fp64 for fp64 x)
  HcShape shape;           // dynamic parts and K
  bool dynamic() const { return shape.has_alpha || shape.has_beta; }
};

// The optional parameters, in schema order.
struct HcOptionalParams {
  const OptTensor& dynamic_alpha;
  const OptTensor& dynamic_beta;
  const OptTensor& alpha_scale;
  const OptTensor& beta_scale;
  const OptTensor& norm_weight;
  const OptTensor& norm_bias;
};

inline bool parse_hc_norm(std::string_view norm, const char* op) {
  TORCH_CHECK(norm == "rms" || norm == "layer", op, ": expected norm to be \"rms\" or \"layer\", got \"", norm, "\"");
  return norm == "layer";
}

inline void check_hc_param(const at::Tensor& t, at::IntArrayRef want, const char* shape_text, const at::Tensor& x,
                           at::ScalarType compute, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == want, op, ": expected ", name, " of shape ", shape_text, " = ", want, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == compute, op, ": expected ", name, " of dtype ", compute,
              " (coefficient math is float32; float64 only with float64 x), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), " (x's device), got ", t.device());
}

inline HcDims check_hc_args(const at::Tensor& x, const at::Tensor& static_alpha, const at::Tensor& static_beta,
                            const HcOptionalParams& o, std::string_view norm, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": expected x of shape [..., n, C] with at least 2 dims, got shape ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || xt == at::kBFloat16 || xt == at::kHalf, op,
              ": expected x of dtype float32, bfloat16, float16 or float64, got ", xt);
  HcDims d;
  d.n = static_cast<int>(x.size(-2));
  d.C = x.size(-1);
  TORCH_CHECK(x.size(-2) >= 1 && x.size(-2) <= kHcMaxN, op, ": expected n = x.size(-2) in [1, ", kHcMaxN, "], got ",
              x.size(-2));
  TORCH_CHECK(d.C >= 1, op, ": expected C = x.size(-1) >= 1, got ", d.C);
  d.tokens = x.numel() / (int64_t(d.n) * d.C);
  d.compute = compute_dtype(xt);
  const bool layer = parse_hc_norm(norm, op);
  const int64_t n = d.n, C = d.C;
  check_hc_param(static_alpha, {n, n + 1}, "[n, n+1]", x, d.compute, op, "static_alpha");
  check_hc_param(static_beta, {n}, "[n]", x, d.compute, op, "static_beta");
  if (has_value(o.dynamic_alpha)) {
    check_hc_param(*o.dynamic_alpha, {C, n + 1}, "[C, n+1]", x, d.compute, op, "dynamic_alpha");
  }
  if (has_value(o.dynamic_beta)) check_hc_param(*o.dynamic_beta, {C}, "[C]", x, d.compute, op, "dynamic_beta");
  if (has_value(o.alpha_scale)) check_hc_param(*o.alpha_scale, {}, "[] (0-dim)", x, d.compute, op, "alpha_scale");
  if (has_value(o.beta_scale)) check_hc_param(*o.beta_scale, {}, "[] (0-dim)", x, d.compute, op, "beta_scale");
  if (has_value(o.norm_weight)) check_hc_param(*o.norm_weight, {C}, "[C]", x, d.compute, op, "norm_weight");
  if (has_value(o.norm_bias)) check_hc_param(*o.norm_bias, {C}, "[C]", x, d.compute, op, "norm_bias");
  d.shape.n = d.n;
  d.shape.has_alpha = has_value(o.dynamic_alpha);
  d.shape.has_beta = has_value(o.dynamic_beta);
  d.shape.K = (d.shape.has_alpha ? d.n + 1 : 0) + (d.shape.has_beta ? 1 : 0);
  d.shape.layer_norm = layer;
  d.shape.use_tanh = true;  // set by the caller
  return d;
}

// The forward's saved intermediates: proj [..., n, K] and stats [..., n, 2] = (mean, rstd).
inline void check_hc_saved(const HcDims& d, const at::Tensor& x, const at::Tensor& proj, const at::Tensor& stats,
                           const char* op) {
  const int64_t K = d.shape.K;
  TORCH_CHECK(proj.numel() == d.tokens * d.n * K && proj.dim() >= 2 && proj.size(-1) == K && proj.size(-2) == d.n,
              op, ": expected proj of shape [..., n, K] = [..., ", d.n, ", ", K, "] with x's leading dims, got ",
              proj.sizes());
  TORCH_CHECK(stats.numel() == d.tokens * d.n * 2 && stats.dim() >= 2 && stats.size(-1) == 2 && stats.size(-2) == d.n,
              op, ": expected stats of shape [..., n, 2] = [..., ", d.n, ", 2] with x's leading dims, got ",
              stats.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{proj, "proj"}, {stats, "stats"}}) {
    TORCH_CHECK(t.scalar_type() == d.compute, op, ": expected ", name, " of dtype ", d.compute, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), " (x's device), got ",
                t.device());
  }
}

}  // namespace hcext
