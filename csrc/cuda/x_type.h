#pragma once
// The streams' dtype as the raw-pointer launchers name it (torch glue side).

#include <c10/core/ScalarType.h>

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

}  // namespace hcext::cuda
