#pragma once
// What every CUDA backend holds while an op runs: a guard that makes the inputs' device
// current, and the current stream of that device, on which every launch goes (no host
// synchronisation). Also the two names the CUDA glue uses instead of c10's directly:
// HCEXT_CUDA_CHECK (a launcher's cudaError_t -> a C++ error) and HCEXT_CUDA_KERNELS (the
// TORCH_LIBRARY_IMPL block of a family's CUDA kernels).
//
// The emulated build of the tests (HCEXT_EMU, tests/emu/) compiles the same glue against
// the emulated grid: the context is then a CPU one (no guard, a null stream, CPU scratch),
// errors carry the emulator's report, and the kernels register for CPU tensors in the
// test-only operator library hcext_emu (same schemas), so that the whole CUDA path — glue,
// drivers, scratch, launches, kernels — runs in CI without a GPU.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#if defined(HCEXT_EMU)
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace hcext {

#if defined(HCEXT_EMU)

struct CudaContext {
  cudaStream_t stream = nullptr;
  at::TensorOptions options;

  explicit CudaContext(const at::Tensor& like) : options(like.options()) {}

  template <typename T>
  at::Tensor scratch(int64_t count) const {
    return at::empty({count}, options.dtype(c10::CppTypeToScalarType<T>::value));
  }
};

#define HCEXT_CUDA_CHECK(expr)                                                                     \
  do {                                                                                             \
    const cudaError_t hcext_err_ = (expr);                                                         \
    TORCH_CHECK(hcext_err_ == cudaSuccess, "emulated CUDA launch failed (error ", int(hcext_err_), \
                "): ", ::hcext_emu::last_error_message());                                        \
  } while (0)
#define HCEXT_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(hcext_emu, CPU, m)

#else

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

#define HCEXT_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#define HCEXT_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(hcext, CUDA, m)

#endif

}  // namespace hcext
