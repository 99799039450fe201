#pragma once
// Argument checks and input preparation of the streams family (hcext::stream_aggregate,
// hcext::stream_mix_expand and their backward ops), used by streams_driver.h and by the
// mHC driver, which composes these ops (torch glue, compiled by g++ only). The fake
// kernels (hcext/ops/streams.py) mirror these checks and messages.
//
// Streams x are [..., n, C] with 1 <= n <= 32. A coefficient is either per token (its
// leading dims are x's: h_pre/h_post [..., n], h_res [..., n, n]) or shared by every
// token (h_pre/h_post [n], h_res [n, n]). Coefficients must be float32, or float64 when
// x is float64. Kernels see contiguous [tokens, n, C] streams and [tokens, K] or [K]
// coefficients, where a shared coefficient has a token stride of 0.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <vector>

#include "common/checks.h"
#include "hcext/streams.h"

namespace hcext {

// Validated, contiguous inputs and the sizes the kernels need.
struct StreamsProblem {
  at::Tensor x;  // [tokens, n, C] contiguous
  int n = 0;
  int64_t C = 0;
  int64_t tokens = 0;
  std::vector<int64_t> lead;  // x's leading dims (the token shape)
};

// A validated, contiguous coefficient.
struct StreamsCoef {
  at::Tensor h;
  bool shared = false;
  int64_t token_stride = 0;  // elements between tokens: 0 when shared
};

// Validates x and fills the sizes; p.x is x as given (callers that only check use this:
// no copy of a non-contiguous x).
inline StreamsProblem check_streams_shape(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": expected x of shape [..., n, C] with at least 2 dims, got ", x.dim(),
              " dim(s) with shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": expected x to be a floating-point tensor (float32, float64, bfloat16 or float16), got ",
              x.scalar_type());
  const int64_t n = x.size(-2);
  TORCH_CHECK(n >= 1 && n <= kStreamsMaxN, op, ": expected n (x's dim -2) in [1, ", kStreamsMaxN, "], got ", n,
              " (x has shape ", x.sizes(), ")");
  StreamsProblem p;
  p.x = x;
  p.n = static_cast<int>(n);
  p.C = x.size(-1);
  p.lead = std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 2);
  p.tokens = 1;
  for (int64_t d : p.lead) p.tokens *= d;
  return p;
}

// check_streams_shape, with p.x contiguous (no copy when x already is).
inline StreamsProblem check_streams_x(const at::Tensor& x, const char* op) {
  StreamsProblem p = check_streams_shape(x, op);
  p.x = x.contiguous();
  return p;
}

// `rank` is 1 for h_pre / h_post ([..., n]) and 2 for h_res ([..., n, n]).
inline StreamsCoef check_streams_coef(const at::Tensor& h, const char* name, int rank, const at::Tensor& x,
                                      const StreamsProblem& p, const char* op) {
  TORCH_CHECK(h.device() == x.device(), op, ": expected ", name, " on ", x.device(), " like x, got ", h.device());
  const auto want = compute_dtype(x.scalar_type());
  TORCH_CHECK(h.scalar_type() == want, op, ": expected ", name, " to be ", want,
              want == at::kDouble ? " (x is float64)" : " (float64 only when x is float64)", ", got ",
              h.scalar_type());
  std::vector<int64_t> shared_shape(rank, p.n);
  std::vector<int64_t> token_shape = p.lead;
  token_shape.insert(token_shape.end(), shared_shape.begin(), shared_shape.end());
  const bool per_token = h.sizes() == at::IntArrayRef(token_shape);
  const bool shared = h.sizes() == at::IntArrayRef(shared_shape);
  TORCH_CHECK(per_token || shared, op, ": expected ", name, " of shape ", at::IntArrayRef(token_shape),
              " (per token: x's leading dims, then ", rank == 1 ? "n" : "n, n", ") or ", at::IntArrayRef(shared_shape),
              " (shared by every token), got ", h.sizes());
  StreamsCoef c;
  c.h = h.contiguous();
  // With no leading dims both shapes coincide; one token either way.
  c.shared = !per_token;
  c.token_stride = c.shared ? 0 : (rank == 1 ? p.n : int64_t(p.n) * p.n);
  return c;
}

// f: [..., C] with x's leading dims, C and dtype (validation only; the caller makes it
// contiguous where a kernel reads it).
inline void check_streams_f(const at::Tensor& f, const at::Tensor& x, const StreamsProblem& p,
                                  const char* op) {
  TORCH_CHECK(f.device() == x.device(), op, ": expected f on ", x.device(), " like x, got ", f.device());
  TORCH_CHECK(f.scalar_type() == x.scalar_type(), op, ": expected f to have x's dtype ", x.scalar_type(), ", got ",
              f.scalar_type());
  TORCH_CHECK(f.dim() >= 1 && f.size(-1) == p.C, op, ": expected f's last dim (C) to be ", p.C,
              " like x's, got f of shape ", f.sizes());
  TORCH_CHECK(f.sizes().slice(0, f.dim() - 1) == at::IntArrayRef(p.lead), op, ": expected f's leading dims to be ",
              at::IntArrayRef(p.lead), " (x's leading dims), got f of shape ", f.sizes());
}

// grad: the forward output's shape and x's dtype.
inline at::Tensor check_streams_grad(const at::Tensor& grad, at::IntArrayRef out_shape, const at::Tensor& x,
                                     const char* op) {
  TORCH_CHECK(grad.device() == x.device(), op, ": expected grad on ", x.device(), " like x, got ", grad.device());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": expected grad to have x's dtype ", x.scalar_type(),
              ", got ", grad.scalar_type());
  TORCH_CHECK(grad.sizes() == out_shape, op, ": expected grad of shape ", out_shape, " (the output's), got ",
              grad.sizes());
  return grad.contiguous();  // also materialises expanded (stride-0) gradients
}

// The aggregate's output shape: x's leading dims, then C.
inline std::vector<int64_t> streams_aggregate_shape(const StreamsProblem& p) {
  std::vector<int64_t> s = p.lead;
  s.push_back(p.C);
  return s;
}

// Gradient of a coefficient, computed as per-token rows: for a per-token coefficient the
// rows are the output; for a shared one they go to a [tokens, K] scratch that the backend
// then sums over tokens in a fixed order. Not requested: an empty [0] tensor.
struct CoefGrad {
  at::Tensor out;      // the returned gradient (coefficient's shape), or an empty [0]
  at::Tensor partial;  // [tokens, K] per-token rows, aliasing `out` when per token
  template <typename S>
  S* rows() const { return partial.defined() ? partial.data_ptr<S>() : nullptr; }
};

inline CoefGrad make_coef_grad(bool wanted, const StreamsCoef& c, int64_t tokens, int64_t K) {
  CoefGrad g;
  const auto opts = c.h.options();
  if (!wanted) {
    g.out = at::empty({0}, opts);
  } else if (!c.shared) {
    g.out = at::empty(c.h.sizes(), opts);
    g.partial = g.out;
  } else {
    g.out = at::empty(c.h.sizes(), opts);
    g.partial = at::empty({tokens, K}, opts);
  }
  return g;
}

}  // namespace hcext
