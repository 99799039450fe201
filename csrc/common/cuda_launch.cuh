#pragma once
// The one way hcext launches a CUDA kernel: launch<kernel>(grid, block, smem, stream, args...)
// returns the launch's cudaError_t. Every launcher in csrc/<family>/<family>_kernels.cu goes
// through it, so the same launcher code serves two builds:
//
// - nvcc (the extension): kernel<<<grid, block, smem, stream>>>(args...), then
//   cudaGetLastError() (launch-configuration errors; no host synchronisation).
// - the emulated grid of the tests (HCEXT_EMU, tests/emu/): the kernels compiled as host C++
//   by g++, force-including tests/emu/cuda_emu.h, which provides hcext_emu::launch: every
//   CUDA thread of a block runs as a fiber, with real barriers and warp exchanges, and the
//   launch configuration is checked against the hardware's limits.
//
// The kernel is a template argument (a function pointer constant) so that the emulator can
// name it in its reports and its record of executed kernels.

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

namespace hcext::cuda {

constexpr size_t kDefaultDynamicShared = 48 * 1024;

template <auto kKernel, typename... Args>
cudaError_t launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
#if defined(HCEXT_EMU)
  return ::hcext_emu::launch<kKernel>(grid, block, smem, stream, std::forward<Args>(args)...);
#else
  if (smem > kDefaultDynamicShared) {
    // More than the default 48 KB of dynamic shared memory must be allowed per kernel (sm_90: up to 227 KB).
    const cudaError_t err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  kKernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

// The block's dynamic shared memory (the launch's smem bytes) as T, 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
#if defined(HCEXT_EMU)
  return static_cast<T*>(::hcext_emu::dynamic_shared_memory());
#else
  extern __shared__ __align__(16) unsigned char hcext_dynamic_shared[];
  return reinterpret_cast<T*>(hcext_dynamic_shared);
#endif
}

// A 128-bit (or wider-than-element) access at p must be aligned to `bytes`: a no-op under
// nvcc (the hardware faults), checked by the emulator (tests/emu/cuda_emu.h).
#if defined(HCEXT_EMU)
#define HCEXT_CHECK_ALIGNED(p, bytes) ::hcext_emu::check_aligned((p), (bytes), __FILE__, __LINE__)
#else
#define HCEXT_CHECK_ALIGNED(p, bytes) ((void)0)
#endif

}  // namespace hcext::cuda
