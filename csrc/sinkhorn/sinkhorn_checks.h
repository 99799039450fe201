#pragma once
// Argument checks of the Sinkhorn family (hcext::sinkhorn, hcext::sinkhorn_backward), used
// by sinkhorn_driver.h and the mHC checks (torch glue, compiled by g++ only). The fake
// kernels (hcext/ops/sinkhorn.py) mirror these checks and messages.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "common/checks.h"
#include "hcext/sinkhorn.h"

namespace hcext {

// Far beyond any useful count; keeps 2 * iters - 1 and the workspace sizes in range.
constexpr int64_t kSinkhornMaxIters = 1 << 20;

// Validates (logits, iters, eps) and returns n. `op` names the op in the messages.
inline int check_sinkhorn_args(const at::Tensor& logits, int64_t iters, double eps,
                               const char* op) {
  TORCH_CHECK(logits.dim() >= 2, op, ": expected logits of shape [..., n, n] with at least 2 dims, got ",
              logits.dim(), " dim(s) with shape ", logits.sizes());
  const int64_t n = logits.size(-1);
  TORCH_CHECK(logits.size(-2) == n, op, ": expected logits' last two dims to be square [..., n, n], got shape ",
              logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op,
              ": expected logits to be a floating-point tensor (float32, float64, bfloat16 or float16), got ",
              logits.scalar_type());
  TORCH_CHECK(n >= 1 && n <= kSinkhornMaxN, op, ": expected n (logits' last dim) in [1, ", kSinkhornMaxN,
              "], got ", n);
  TORCH_CHECK(iters >= 1 && iters <= kSinkhornMaxIters, op, ": expected iters in [1, ", kSinkhornMaxIters, "], got ",
              iters);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": expected eps to be finite and >= 0, got ", eps);
  return static_cast<int>(n);
}

inline void check_sinkhorn_grad(const at::Tensor& grad, const at::Tensor& logits, const char* op) {
  TORCH_CHECK(grad.sizes() == logits.sizes(), op, ": expected grad of shape ", logits.sizes(), " (the logits' shape), got ",
              grad.sizes());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": expected grad to be a floating-point tensor, got ",
              grad.scalar_type());
  TORCH_CHECK(grad.device() == logits.device(), op, ": expected grad on ", logits.device(), " like logits, got ",
              grad.device());
}

}  // namespace hcext
