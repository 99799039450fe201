#pragma once
// The streams' dtype as torch-free code names it (the CUDA launch declarations and
// kernels, which include no torch header). The one enum of the library: the torch side maps
// at::ScalarType to it with hcext::stream_dtype (common/checks.h).

namespace hcext {

enum class StreamDtype { kFloat, kDouble, kBFloat16, kHalf };

}  // namespace hcext
