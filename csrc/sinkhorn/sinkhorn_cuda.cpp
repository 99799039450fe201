// The CUDA backend of the Sinkhorn family (the sequence around it is sinkhorn_driver.h):
// one launch of sinkhorn_kernels.cu per pass, on the current stream under a device guard.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/cuda_context.h"
#include "sinkhorn/sinkhorn_driver.h"
#include "sinkhorn/sinkhorn_launch.h"

namespace hcext {
namespace {

struct CudaSinkhornBackend : CudaContext {
  using CudaContext::CudaContext;

  template <typename T>
  void forward(const T* logits, T* out, int64_t tokens, int n, int iters, T eps) {
    HCEXT_CUDA_CHECK(cuda::sinkhorn_forward<T>(logits, out, tokens, n, iters, eps, stream));
  }
  template <typename T>
  void backward(const T* grad, const T* logits, T* grad_logits, int64_t tokens, int n, int iters, T eps) {
    // The recomputed half-step denominators (and, for large n, each token's iterates).
    const at::Tensor workspace = scratch<T>(int64_t(sinkhorn_half_steps(iters)) * n * tokens +
                                            thread_matrix_workspace(tokens, n, 1));
    HCEXT_CUDA_CHECK(cuda::sinkhorn_backward<T>(grad, logits, grad_logits, workspace.data_ptr<T>(), tokens, n, iters,
                                              eps, stream));
  }
};

}  // namespace

HCEXT_CUDA_KERNELS(m) { register_sinkhorn_kernels<CudaSinkhornBackend>(m); }

}  // namespace hcext
