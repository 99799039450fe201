#pragma once
// Launch declarations of the Sinkhorn CUDA kernels (sinkhorn/sinkhorn_kernels.cu, which
// includes no torch header). The CUDA backend (sinkhorn/sinkhorn_cuda.cpp) allocates, picks
// the stream and calls these. Each returns the launch's cudaError_t. T: float or double.

#include <cuda_runtime_api.h>

#include <cstdint>

namespace hcext::cuda {

// logits, out: [tokens, n, n] contiguous.
template <typename T>
cudaError_t sinkhorn_forward(const T* logits, T* out, int64_t tokens, int n, int iters, T eps, cudaStream_t stream);

// grad, logits, grad_logits: [tokens, n, n] contiguous. workspace: (2 * iters - 1) * n * tokens
// elements of scratch for the recomputed half-step denominators, then
// thread_matrix_workspace(tokens, n, 1) for the iterates of n > kThreadMatrixMaxN
// (hcext/dispatch.h).
template <typename T>
cudaError_t sinkhorn_backward(const T* grad, const T* logits, T* grad_logits, T* workspace, int64_t tokens, int n,
                              int iters, T eps, cudaStream_t stream);

}  // namespace hcext::cuda
