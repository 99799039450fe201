#pragma once
// Rules shared by every op family's torch glue (checks, drivers, backends), each written
// once: the compute dtype, the streams' dtype, leading shapes, optional tensors and the
// checks every family makes of a parameter. Compiled by g++ only (torch headers).

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <type_traits>
#include <optional>
#include <vector>

#include "common/stream_dtype.h"

// In a family's register_<family>_kernels<Backend>(torch::Library& m): registers the op
// `op` as the driver's op_impl<Backend>. One name per op, from the schema to the driver.
#define HCEXT_IMPL(op) m.impl(#op, &op##_impl<Backend>);

namespace hcext {

using OptTensor = std::optional<at::Tensor>;

// Coefficient math is fp32; fp64 inputs keep fp64 (gradcheck); fp16/bf16 inputs are
// computed in, and their coefficients returned in, fp32.
inline at::ScalarType compute_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

// fn(T{}) with T the C++ type of a compute dtype (double or float).
template <typename Fn>
void dispatch_compute(at::ScalarType compute, Fn&& fn) {
  if (compute == at::kDouble) {
    fn(double{});
  } else {
    fn(float{});
  }
}

// The streams' dtype for torch-free code. Callers have checked that it is floating.
inline StreamDtype stream_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return StreamDtype::kFloat;
    case at::kDouble: return StreamDtype::kDouble;
    case at::kBFloat16: return StreamDtype::kBFloat16;
    case at::kHalf: return StreamDtype::kHalf;
    default: TORCH_CHECK(false, "hcext: unsupported streams dtype ", t);
  }
}

// fn(T{}, S{}): T the backend's C++ type of the streams' dtype (Bf16 / Half name the
// backend's 16-bit types: c10's on the CPU, CUDA's on the GPU), S the compute type.
template <typename Bf16, typename Half, typename Fn>
void dispatch_stream_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{}, float{});
    case at::kDouble: return fn(double{}, double{});
    case at::kBFloat16: return fn(Bf16{}, float{});
    case at::kHalf: return fn(Half{}, float{});
    default: TORCH_CHECK(false, "hcext: unsupported streams dtype ", dtype);
  }
}

// dispatch_stream_dtype for a pass whose compute type S is already chosen: fn(X{}) with X
// the backend's type of the streams' dtype, instantiated only for the dtypes computed in S.
template <typename S, typename Bf16, typename Half, typename Fn>
void dispatch_stream_dtype_for(at::ScalarType dtype, Fn&& fn) {
  dispatch_stream_dtype<Bf16, Half>(dtype, [&](auto x_tag, auto s_tag) {
    if constexpr (std::is_same_v<decltype(s_tag), S>) fn(x_tag);
  });
}

// x's leading dims ([..., n, C] without n, C), then `tail`.
inline std::vector<int64_t> lead_shape(const at::Tensor& x, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.insert(shape.end(), tail);
  return shape;
}

inline bool has_value(const OptTensor& t) { return t.has_value() && t->defined(); }

// The tensor's data as T*, or null for an undefined or empty tensor (an absent optional
// input, an output that was not requested). T may be a backend's 16-bit type (the same bits
// as ATen's) and const-qualified.
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<T*>(t.data_ptr()) : nullptr;
}

// An optional input as contiguous [rows, cols] in `dtype`, or undefined when absent.
inline at::Tensor optional_rows(const OptTensor& g, int64_t rows, int64_t cols, at::ScalarType dtype) {
  if (!has_value(g)) return at::Tensor();
  return g->reshape({rows, cols}).to(dtype).contiguous();
}

inline at::Tensor contiguous_or_undefined(const OptTensor& t) { return has_value(t) ? t->contiguous() : at::Tensor(); }

inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), " (x's device), got ", t.device());
}

inline void check_coeff_dtype(const at::Tensor& t, at::ScalarType compute, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == compute, op, ": expected ", name, " of dtype ", compute,
              " (coefficient math is float32; float64 only with float64 x), got ", t.scalar_type());
}

inline void check_norm_eps(double norm_eps, const char* op) {
  TORCH_CHECK(std::isfinite(norm_eps) && norm_eps >= 0, op, ": expected norm_eps finite and >= 0, got ", norm_eps);
}

// An optional incoming gradient with `numel` elements (undefined means zero).
inline void check_optional_grad(const OptTensor& g, int64_t numel, const at::Tensor& x, const char* op,
                                const char* name) {
  if (!has_value(g)) return;
  TORCH_CHECK(g->numel() == numel, op, ": expected ", name, " with ", numel, " elements, got shape ", g->sizes());
  TORCH_CHECK(at::isFloatingType(g->scalar_type()), op, ": expected ", name, " to be floating point, got ",
              g->scalar_type());
  check_same_device(*g, x, op, name);
}

}  // namespace hcext
