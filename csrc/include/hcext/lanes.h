#pragma once
// Lanes<T, W>: W independent values that the per-token math templates (sinkhorn.h, ...)
// accept in place of a scalar. The CPU kernels put W tokens side by side (one per SIMD
// lane); CUDA kernels use small Lanes for a thread's consecutive channels.
// Lane l is x.v[l] (readable and writable), under both compilers.
//
// Host compilers (g++/clang++): the lanes are a GCC vector type, so every operator is one
// SIMD instruction when the function it is inlined into targets W * sizeof(T)-byte
// registers (AVX-512: 16 floats, AVX2: 8), a few narrower ones otherwise. (Plain arrays
// with per-lane loops were left mostly scalar by g++ -O3.) Every CPU kernel family is
// compiled for baseline x86-64, AVX2 and AVX-512 and picks one at run time
// (csrc/common/cpu_isa.h).
// nvcc: a plain array with per-lane loops (registers).
//
// Every lane computes exactly what the scalar code computes. One opt-in exception on the
// host: Lanes<float, W, /*kPolyExp=*/true> computes vexp with a vector polynomial
// (vexp_poly, within 1 ulp of the correctly rounded exp) instead of the scalar std::exp,
// a library call per lane that otherwise dominates exp-heavy kernels (the sinkhorn CPU
// kernels use it).

#include <cstdint>

#include "hcext/macros.h"

namespace hcext {

#if defined(__CUDACC__)

// Distinct (inline) namespaces: nvcc and g++ translation units never share the definition.
inline namespace lanes_array {

template <typename T, int W>
struct Lanes {
  using value_type = T;
  static constexpr int width = W;
  T v[W];

  Lanes() = default;
  HCEXT_HD Lanes(T x) {  // NOLINT: implicit broadcast, like a scalar
    for (int l = 0; l < W; ++l) v[l] = x;
  }
};

#define HCEXT_LANES_BINARY_OP(op)                                                         \
  template <typename T, int W>                                                            \
  HCEXT_HD Lanes<T, W> operator op(const Lanes<T, W>& a, const Lanes<T, W>& b) {          \
    Lanes<T, W> r;                                                                        \
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] op b.v[l];                                \
    return r;                                                                             \
  }                                                                                       \
  template <typename T, int W>                                                            \
  HCEXT_HD Lanes<T, W> operator op(const Lanes<T, W>& a, T b) {                           \
    Lanes<T, W> r;                                                                        \
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] op b;                                     \
    return r;                                                                             \
  }                                                                                       \
  template <typename T, int W>                                                            \
  HCEXT_HD Lanes<T, W> operator op(T a, const Lanes<T, W>& b) {                           \
    Lanes<T, W> r;                                                                        \
    for (int l = 0; l < W; ++l) r.v[l] = a op b.v[l];                                     \
    return r;                                                                             \
  }

HCEXT_LANES_BINARY_OP(+)
HCEXT_LANES_BINARY_OP(-)
HCEXT_LANES_BINARY_OP(*)
HCEXT_LANES_BINARY_OP(/)
#undef HCEXT_LANES_BINARY_OP

template <typename T, int W>
HCEXT_HD Lanes<T, W> vmax(const Lanes<T, W>& a, const Lanes<T, W>& b) {
  Lanes<T, W> r;
  for (int l = 0; l < W; ++l) r.v[l] = a.v[l] > b.v[l] ? a.v[l] : b.v[l];
  return r;
}

template <typename T, int W>
HCEXT_HD Lanes<T, W> vexp(const Lanes<T, W>& a) {
  Lanes<T, W> r;
  for (int l = 0; l < W; ++l) r.v[l] = hcext::vexp(a.v[l]);  // the scalar overload
  return r;
}

}  // namespace lanes_array

#else  // host compiler

// Returning a 32/64-byte vector from a function compiled without AVX "changes the ABI":
// these functions are always inlined, and vectors are passed by reference.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

inline namespace lanes_simd {

template <typename T, int W, bool kPolyExp = false>
struct Lanes {
  static_assert(W > 0 && (W & (W - 1)) == 0, "the Lanes width must be a power of two");
  static_assert(!kPolyExp || sizeof(T) == 4, "kPolyExp: the polynomial exp is for float lanes");
  using value_type = T;
  static constexpr int width = W;
  typedef T vector_type __attribute__((vector_size(sizeof(T) * W)));
  vector_type v;

  Lanes() = default;
  // NOLINT: implicit broadcast, like a scalar. x - 0 is x for every x (-0 and NaN included), so
  // g++ folds it to a bare broadcast; 0 + x would turn -0 into +0 and cost an add per broadcast.
  HCEXT_HD Lanes(T x) : v(x - vector_type{}) {}
  HCEXT_HD static Lanes from(const vector_type& x) {
    Lanes r;
    r.v = x;
    return r;
  }
};

#define HCEXT_LANES_BINARY_OP(op)                                                         \
  template <typename T, int W, bool P>                                                    \
  HCEXT_HD Lanes<T, W, P> operator op(const Lanes<T, W, P>& a, const Lanes<T, W, P>& b) { \
    return Lanes<T, W, P>::from(a.v op b.v);                                              \
  }                                                                                       \
  template <typename T, int W, bool P>                                                    \
  HCEXT_HD Lanes<T, W, P> operator op(const Lanes<T, W, P>& a, T b) {                     \
    return Lanes<T, W, P>::from(a.v op b);                                                \
  }                                                                                       \
  template <typename T, int W, bool P>                                                    \
  HCEXT_HD Lanes<T, W, P> operator op(T a, const Lanes<T, W, P>& b) {                     \
    return Lanes<T, W, P>::from(a op b.v);                                                \
  }

HCEXT_LANES_BINARY_OP(+)
HCEXT_LANES_BINARY_OP(-)
HCEXT_LANES_BINARY_OP(*)
HCEXT_LANES_BINARY_OP(/)
#undef HCEXT_LANES_BINARY_OP

// The scalar vmax's selection (a > b ? a : b), NaN handling included.
template <typename T, int W, bool P>
HCEXT_HD Lanes<T, W, P> vmax(const Lanes<T, W, P>& a, const Lanes<T, W, P>& b) {
  return Lanes<T, W, P>::from(a.v > b.v ? a.v : b.v);
}

// Lane types without a vector formula (double): the scalar exp of every lane.
template <typename T, int W, bool P>
HCEXT_HD Lanes<T, W, P> vexp(const Lanes<T, W, P>& a) {
  Lanes<T, W, P> r;
  for (int l = 0; l < W; ++l) r.v[l] = hcext::vexp(T(a.v[l]));  // the scalar overload
  return r;
}

// x <- exp(x) on a vector of floats, with vector operations only.
//   x = k ln2 + r, k = round(x / ln2), |r| <= ln2 / 2 (Cody-Waite: ln2 split into a part
//   whose product with k is exact and a small correction); exp(r) by Cephes' expf
//   polynomial; 2^k applied as two power-of-two factors, so that results down in the
//   subnormals are rounded once. Within 1 ulp of the correctly rounded exp for every
//   float (checked exhaustively, with and without FMA contraction); exp(-inf) = 0,
//   exp(+inf) = inf, NaN stays NaN.
template <typename VF>
HCEXT_HD void vexp_poly(VF& x) {
  typedef int32_t VI __attribute__((vector_size(sizeof(VF))));
  const VF lo = VF{} - 104.0f;  // exp(-104) rounds to 0
  const VF hi = VF{} + 89.0f;   // exp(89) overflows to inf
  x = x < lo ? lo : x;          // NaN fails both tests and stays NaN
  x = x > hi ? hi : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (|x / ln2| < 2^22 here).
  const VF k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const VF r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const VF y = (p * (r * r) + r) + 1.0f;
  // 2^k = 2^k1 * 2^k2 with k1, k2 in [-75, 64]: both normal floats.
  const VI ki = __builtin_convertvector(k, VI);
  const VI k1 = ki >> 1;
  const VI k2 = ki - k1;
  x = y * (VF)((k1 + 127) << 23) * (VF)((k2 + 127) << 23);
}

template <int W>
HCEXT_HD Lanes<float, W, true> vexp(const Lanes<float, W, true>& a) {
  Lanes<float, W, true> r = a;
  vexp_poly(r.v);
  return r;
}

}  // namespace lanes_simd

#pragma GCC diagnostic pop

#endif  // __CUDACC__

}  // namespace hcext
