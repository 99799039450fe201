#pragma once
// Device helpers shared by the hcext CUDA kernels (no torch headers): explicit dtype
// conversions (the build defines __CUDA_NO_HALF_CONVERSIONS__ and friends), 128-bit
// packed loads/stores, and a fixed-order (deterministic) block reduction.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common/cuda_launch.cuh"
#include "common/stream_dtype.h"
#include "hcext/lanes.h"

namespace hcext::cuda {

// p (void* or const void*) as a pointer to X, keeping its constness.
template <typename X, typename P>
auto as_typed(P* p) {
  if constexpr (std::is_const_v<P>) {
    return static_cast<const X*>(p);
  } else {
    return static_cast<X*>(p);
  }
}

// Calls fn(X*) with the streams' pointer cast to the element type `dtype` names. T is the
// compute type: T = double goes with fp64 streams only, T = float with the others (the
// torch glue guarantees it), so each kernel is instantiated for the pairs that occur.
template <typename T, typename P, typename Fn>
void with_stream_ptr(StreamDtype dtype, P* p, Fn&& fn) {
  if constexpr (std::is_same_v<T, double>) {
    fn(as_typed<double>(p));
  } else {
    switch (dtype) {
      case StreamDtype::kBFloat16: return fn(as_typed<__nv_bfloat16>(p));
      case StreamDtype::kHalf: return fn(as_typed<__half>(p));
      default: return fn(as_typed<float>(p));
    }
  }
}

// Explicit conversions between storage T and compute S.
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  using S = float;
  static __device__ __forceinline__ float in(float v) { return v; }
  static __device__ __forceinline__ float out(float v) { return v; }
};
template <>
struct Convert<double> {
  using S = double;
  static __device__ __forceinline__ double in(double v) { return v; }
  static __device__ __forceinline__ double out(double v) { return v; }
};
template <>
struct Convert<__nv_bfloat16> {
  using S = float;
  static __device__ __forceinline__ float in(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 out(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Convert<__half> {
  using S = float;
  static __device__ __forceinline__ float in(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half out(float v) { return __float2half_rn(v); }
};

template <typename T>
using ComputeOf = typename Convert<T>::S;

// Scalar forms of Convert, deducing the storage type.
template <typename X>
__device__ __forceinline__ ComputeOf<X> to_compute(X v) {
  return Convert<X>::in(v);
}
template <typename X, typename S>
__device__ __forceinline__ void store_as(X* p, S v) {
  *p = Convert<X>::out(static_cast<ComputeOf<X>>(v));
}

// VEC consecutive elements, aligned to their size up to 16 bytes: one 128-bit access when
// 16 bytes, several when more (e.g. 8 floats read alongside 8 bf16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC > 16 ? 16 : sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Lanes<ComputeOf<T>, VEC> load(const T* p) {
  HCEXT_CHECK_ALIGNED(p, alignof(Pack<T, VEC>));
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
  Lanes<ComputeOf<T>, VEC> r;
#pragma unroll
  for (int l = 0; l < VEC; ++l) r.v[l] = Convert<T>::in(pk.v[l]);
  return r;
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const Lanes<ComputeOf<T>, VEC>& r) {
  HCEXT_CHECK_ALIGNED(p, alignof(Pack<T, VEC>));
  Pack<T, VEC> pk;
#pragma unroll
  for (int l = 0; l < VEC; ++l) pk.v[l] = Convert<T>::out(r.v[l]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// Sums vals[k] for k < count (count <= K) over the block, in a fixed order, and calls
// store(k, sum) once per k. All threads of the block must call it (it synchronises).
// blockDim.x must be a multiple of 32; smem has one row per warp.
template <int K, typename S, typename Store>
__device__ __forceinline__ void block_sum(const S (&vals)[K], int count, S (*smem)[K], Store&& store_fn) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k < count) {
      S v = vals[k];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) smem[warp][k] = v;  // lane 0's sum: one fixed order
    }
  }
  __syncthreads();
  for (int k = threadIdx.x; k < count; k += blockDim.x) {
    S s = smem[0][k];
    for (int w = 1; w < warps; ++w) s += smem[w][k];
    store_fn(k, s);
  }
  __syncthreads();  // smem is reused by the block's next token
}

// 128-bit accesses need every row 16-byte aligned: C * sizeof(T) a multiple of 16 and
// 16-byte aligned base pointers (null pointers are not accessed).
template <typename T>
bool can_vectorize(int64_t C, std::initializer_list<const void*> ptrs) {
  if ((C * int64_t(sizeof(T))) % 16 != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// fn.template operator()<VEC>(): 16 bytes of X per access when `vectorize`, else 1 element.
template <typename X, typename Fn>
void with_vec(bool vectorize, Fn&& fn) {
  if (vectorize) return fn.template operator()<int(16 / sizeof(X))>();
  return fn.template operator()<1>();
}

// fn.template operator()<flag>(): a run-time flag as a template argument (a kernel variant).
template <typename Fn>
void with_flag(bool flag, Fn&& fn) {
  if (flag) return fn.template operator()<true>();
  return fn.template operator()<false>();
}

inline unsigned int ceil_div(long long a, long long b) { return static_cast<unsigned int>((a + b - 1) / b); }

}  // namespace hcext::cuda
