#pragma once
// The device-independent sequence of the Sinkhorn family, shared by the CPU and CUDA
// backends: checks, the contiguous copy in the compute dtype (fp32; fp64 for fp64 logits),
// allocation, and the dtype of the result.
//
// A Backend (CpuSinkhornBackend in sinkhorn_cpu.cpp, CudaSinkhornBackend in
// sinkhorn_cuda.cpp) supplies the passes, on contiguous [tokens, n, n] rows in T:
//   explicit Backend(const at::Tensor& logits)            device guard, stream
//   forward<T>(logits, out, tokens, n, iters, eps)
//   backward<T>(grad, logits, grad_logits, tokens, n, iters, eps)   recomputes the iterates

#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <ATen/ops/empty.h>

#include "common/checks.h"
#include "sinkhorn/sinkhorn_checks.h"

namespace hcext {

template <class Backend>
at::Tensor sinkhorn_impl(const at::Tensor& logits, int64_t iters, double eps) {
  const int n = check_sinkhorn_args(logits, iters, eps, "hcext::sinkhorn");
  Backend backend(logits);
  const auto compute = compute_dtype(logits.scalar_type());
  const at::Tensor L = logits.to(compute).contiguous();  // no copy when it already is
  at::Tensor out = at::empty(logits.sizes(), L.options());
  const int64_t tokens = logits.numel() / (int64_t(n) * n);
  if (tokens == 0) return out;
  dispatch_compute(compute, [&](auto zero) {
    using T = decltype(zero);
    backend.template forward<T>(L.data_ptr<T>(), out.data_ptr<T>(), tokens, n, static_cast<int>(iters),
                                static_cast<T>(eps));
  });
  return out;
}

template <class Backend>
at::Tensor sinkhorn_backward_impl(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  const int n = check_sinkhorn_args(logits, iters, eps, "hcext::sinkhorn_backward");
  check_sinkhorn_grad(grad, logits, "hcext::sinkhorn_backward");
  Backend backend(logits);
  const auto compute = compute_dtype(logits.scalar_type());
  const at::Tensor L = logits.to(compute).contiguous();
  const at::Tensor G = grad.to(compute).contiguous();
  at::Tensor grad_logits = at::empty(logits.sizes(), L.options());
  const int64_t tokens = logits.numel() / (int64_t(n) * n);
  if (tokens > 0) {
    dispatch_compute(compute, [&](auto zero) {
      using T = decltype(zero);
      backend.template backward<T>(G.data_ptr<T>(), L.data_ptr<T>(), grad_logits.data_ptr<T>(), tokens, n,
                                   static_cast<int>(iters), static_cast<T>(eps));
    });
  }
  // The gradient has the logits' dtype (computed in fp32 for fp16/bf16 logits).
  return grad_logits.to(logits.scalar_type());
}

// The family's kernels on one backend: called from the backend's TORCH_LIBRARY_IMPL, so the
// op list is written once for every backend.
template <class Backend>
void register_sinkhorn_kernels(torch::Library& m) {
  HCEXT_IMPL(sinkhorn) HCEXT_IMPL(sinkhorn_backward)
}

}  // namespace hcext
