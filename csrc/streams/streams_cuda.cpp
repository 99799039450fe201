// CUDA registration of the streams family: the sequence of streams_driver.h with the
// CUDA backend of streams_cuda.h.

#include <torch/library.h>

#include "streams/streams_cuda.h"
#include "streams/streams_driver.h"

namespace hcext {

TORCH_LIBRARY_IMPL(hcext, CUDA, m) { register_streams_kernels<CudaStreamsBackend>(m); }

}  // namespace hcext
