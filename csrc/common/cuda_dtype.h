#pragma once
// The streams' dtype as CUDA types, for the CUDA backends (torch glue side; the kernels
// take raw pointers and a StreamDtype).

#include <c10/core/ScalarType.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/checks.h"

namespace hcext::cuda {

// fn(T{}, S{}): T = float, double, __nv_bfloat16 or __half (bit-compatible with the ATen
// type), S the compute type.
template <typename Fn>
void dispatch_stream_dtype(at::ScalarType dtype, Fn&& fn) {
  hcext::dispatch_stream_dtype<__nv_bfloat16, __half>(dtype, fn);
}

}  // namespace hcext::cuda
