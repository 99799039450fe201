#pragma once
// What every CUDA backend holds while an op runs: a guard that makes the inputs' device
// current, and the current stream of that device, on which every launch goes (no host
// synchronisation).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace hcext {

struct CudaContext {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  at::TensorOptions options;  // the device, for scratch tensors

  explicit CudaContext(const at::Tensor& like)
      : guard(like.device()), stream(c10::cuda::getCurrentCUDAStream()), options(like.options()) {}

  // Scratch of `count` elements of T on the device (freed to the caching allocator).
  template <typename T>
  at::Tensor scratch(int64_t count) const {
    return at::empty({count}, options.dtype(c10::CppTypeToScalarType<T>::value));
  }
};

}  // namespace hcext
