// CUDA registration of the streams family: the sequence of streams_driver.h with the
// CUDA backend of streams_cuda.h.

#include <torch/library.h>

#include "streams/streams_cuda.h"
#include "streams/streams_driver.h"

namespace hcext {

HCEXT_CUDA_KERNELS(m) { register_streams_kernels<CudaStreamsBackend>(m); }

}  // namespace hcext
