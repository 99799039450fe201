// CUDA implementation of hcext::sinkhorn and hcext::sinkhorn_backward: checks,
// allocation, device guard and current stream; the kernels are in sinkhorn_kernels.cu.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launchers.h"
#include "sinkhorn_args.h"

namespace hcext {
namespace {

at::Tensor sinkhorn_cuda(const at::Tensor& logits, int64_t iters, double eps) {
  const int n = check_sinkhorn_args(logits, iters, eps, "hcext::sinkhorn");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto dtype = sinkhorn_compute_dtype(logits.scalar_type());
  const at::Tensor L = as_compute_contiguous(logits, dtype);
  at::Tensor out = at::empty(logits.sizes(), L.options());
  const int64_t tokens = logits.numel() / (int64_t(n) * n);
  if (tokens == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (dtype == at::kDouble) {
    C10_CUDA_CHECK(cuda::sinkhorn_forward<double>(L.data_ptr<double>(), out.data_ptr<double>(), tokens, n,
                                                  static_cast<int>(iters), eps, stream));
  } else {
    C10_CUDA_CHECK(cuda::sinkhorn_forward<float>(L.data_ptr<float>(), out.data_ptr<float>(), tokens, n,
                                                 static_cast<int>(iters), static_cast<float>(eps), stream));
  }
  return out;
}

at::Tensor sinkhorn_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  const int n = check_sinkhorn_args(logits, iters, eps, "hcext::sinkhorn_backward");
  check_sinkhorn_grad(grad, logits, "hcext::sinkhorn_backward");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto dtype = sinkhorn_compute_dtype(logits.scalar_type());
  const at::Tensor L = as_compute_contiguous(logits, dtype);
  const at::Tensor G = as_compute_contiguous(grad, dtype);
  at::Tensor grad_logits = at::empty(logits.sizes(), L.options());
  const int64_t tokens = logits.numel() / (int64_t(n) * n);
  if (tokens > 0) {
    at::Tensor workspace = at::empty({int64_t(sinkhorn_half_steps(static_cast<int>(iters))) * n * tokens}, L.options());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (dtype == at::kDouble) {
      C10_CUDA_CHECK(cuda::sinkhorn_backward<double>(G.data_ptr<double>(), L.data_ptr<double>(),
                                                     grad_logits.data_ptr<double>(), workspace.data_ptr<double>(),
                                                     tokens, n, static_cast<int>(iters), eps, stream));
    } else {
      C10_CUDA_CHECK(cuda::sinkhorn_backward<float>(G.data_ptr<float>(), L.data_ptr<float>(),
                                                    grad_logits.data_ptr<float>(), workspace.data_ptr<float>(), tokens,
                                                    n, static_cast<int>(iters), static_cast<float>(eps), stream));
    }
  }
  return grad_logits.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CUDA, m) {
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cuda);
}

}  // namespace hcext
