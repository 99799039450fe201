#pragma once
// Small device helpers shared by the hcext CUDA kernels (no torch headers).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace hcext::cuda {

// Explicit conversions (the build defines __CUDA_NO_HALF_CONVERSIONS__ and friends).
__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }

__device__ __forceinline__ void store_as(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_as(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_as(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store_as(__half* p, float v) { *p = __float2half(v); }

// Sum over a block of kThreads threads, in a fixed order (deterministic). Every thread
// gets the total. smem: at least kThreads / 32 elements.
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size");
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T total = smem[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) total += smem[w];
  return total;
}

inline unsigned int ceil_div(long long a, long long b) { return static_cast<unsigned int>((a + b - 1) / b); }

}  // namespace hcext::cuda
