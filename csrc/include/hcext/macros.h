#pragma once
// Portability macros for the per-token math headers: the same source is compiled by
// g++ (CPU kernels, C++ tests) and by nvcc (CUDA kernels). No torch header in here.

#if defined(__CUDACC__)
#define HCEXT_HD __host__ __device__ __forceinline__
#define HCEXT_UNROLL _Pragma("unroll")
#else
#define HCEXT_HD inline __attribute__((always_inline))
#define HCEXT_UNROLL _Pragma("GCC unroll 8")
#endif

#if defined(__CUDA_ARCH__)
#include <math.h>
#else
#include <cmath>
#endif

namespace hcext {

// Scalar primitives the templated math uses besides + - * /. SIMD lane types
// (lanes.h) overload the same names so one template serves both backends.
HCEXT_HD float vmax(float a, float b) { return a > b ? a : b; }
HCEXT_HD double vmax(double a, double b) { return a > b ? a : b; }
#if defined(__CUDA_ARCH__)
HCEXT_HD float vexp(float a) { return expf(a); }
HCEXT_HD double vexp(double a) { return exp(a); }
HCEXT_HD float vsqrt(float a) { return sqrtf(a); }
HCEXT_HD double vsqrt(double a) { return sqrt(a); }
#else
HCEXT_HD float vexp(float a) { return std::exp(a); }
HCEXT_HD double vexp(double a) { return std::exp(a); }
HCEXT_HD float vsqrt(float a) { return std::sqrt(a); }
HCEXT_HD double vsqrt(double a) { return std::sqrt(a); }
#endif

}  // namespace hcext
