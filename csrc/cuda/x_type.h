#pragma once
// The streams' dtype as the raw-pointer launchers name it, and as CUDA types (torch glue side).

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"

namespace hcext::cuda {

inline MhcXType x_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MhcXType::kFloat;
    case at::kDouble: return MhcXType::kDouble;
    case at::kBFloat16: return MhcXType::kBFloat16;
    default: return MhcXType::kHalf;
  }
}

// Calls fn(T{}, S{}) with T the CUDA type of the streams' dtype (bit-compatible with the
// ATen type) and S the coefficient / compute type.
template <typename Fn>
void dispatch_stream_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{}, float{});
    case at::kDouble: return fn(double{}, double{});
    case at::kBFloat16: return fn(__nv_bfloat16{}, float{});
    case at::kHalf: return fn(__half{}, float{});
    default: TORCH_CHECK(false, "hcext: unsupported streams dtype ", dtype);
  }
}

}  // namespace hcext::cuda
