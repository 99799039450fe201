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

template <auto kKernel, typename... Args>
cudaError_t launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
#if defined(HCEXT_EMU)
  return ::hcext_emu::launch<kKernel>(grid, block, smem, stream, std::forward<Args>(args)...);
#else
  kKernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

// A kernel whose static plus dynamic shared memory exceeds 48 KB must be allowed that much
// dynamic memory first. The kernel's launcher allows its largest launch once, always with the same
// value (so two host threads cannot lower it under each other); the emulated grid has no limit to
// raise.
template <auto kKernel>
cudaError_t allow_dynamic_shared(size_t bytes) {
#if defined(HCEXT_EMU)
  (void)bytes;
  return cudaSuccess;
#else
  return cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
#endif
}

// Shared memory a block of `device` may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin: sm_90
// 227 KB, sm_86/89 99 KB, sm_80 163 KB); the emulated grid is an sm_90. 0 when it cannot be read.
inline int64_t shared_memory_optin(int device) {
#if defined(HCEXT_EMU)
  (void)device;
  return 227 * 1024;
#else
  int bytes = 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it
    return 0;
  }
  return bytes;
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
