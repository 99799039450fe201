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

// A 128-bit (or wider-than-element) access at p must be aligned to `bytes`: a no-op under
// nvcc (the hardware faults), checked by the emulator (tests/emu/cuda_emu.h).
#if defined(HCEXT_EMU)
#define HCEXT_CHECK_ALIGNED(p, bytes) ::hcext_emu::check_aligned((p), (bytes), __FILE__, __LINE__)
#else
#define HCEXT_CHECK_ALIGNED(p, bytes) ((void)0)
#endif

}  // namespace hcext::cuda
