// The CUDA backend of the HC family: the sequence of hc_driver.h with the CUDA passes of
// hc_kernels.cu (declared in hc_launch.h), on the current stream under a device guard. No
// host synchronisation.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/cuda_context.h"
#include "hc/hc_driver.h"
#include "hc/hc_launch.h"
namespace hcext {
namespace {

// The CUDA passes of hc_driver.h. x is contiguous.
struct CudaHcBackend : CudaContext {
  using CudaContext::CudaContext;

  template <typename T>
  void forward(const at::Tensor& x, const T* wt_t, const HcDims& d, const HcParams<T>& p, T eps, T* proj, T* stats,
               T* h_pre, T* h_post, T* h_res) {
    HCEXT_CUDA_CHECK(cuda::hc_forward<T>(x.data_ptr(), stream_dtype(x.scalar_type()), wt_t, d.shape, p, d.tokens, d.C, eps,
                                       proj, stats, h_pre, h_post, h_res, stream));
  }
  template <typename T>
  void epilogue_backward(const HcDims& d, const HcParams<T>& p, const T* q, const T* stats, const T* g_pre,
                         const T* g_post, const T* g_res, T* e, T* xcoef, T* partial) {
    HCEXT_CUDA_CHECK(cuda::hc_epilogue_backward<T>(d.shape, p, d.tokens, d.C, q, stats, g_pre, g_post, g_res, e, xcoef,
                                                 partial, stream));
  }
  template <typename T>
  void centered_grad(const at::Tensor& x, const T* e, const T* stats, at::Tensor& G, const HcDims& d) {
    const int64_t chunks = cuda::hc_grad_chunks(d.tokens, d.C, d.shape.K);
    // Per-chunk partials; none needed for one chunk.
    const at::Tensor workspace = scratch<T>(chunks > 1 ? chunks * d.C * d.shape.K : 0);
    HCEXT_CUDA_CHECK(cuda::hc_centered_grad<T>(x.data_ptr(), stream_dtype(x.scalar_type()), e, stats, d.n, d.shape.K,
                                             d.tokens, d.C, chunks > 1 ? workspace.data_ptr<T>() : nullptr,
                                             G.data_ptr<T>(), stream));
  }
  template <typename T>
  void grad_x(const at::Tensor& x, const T* wc_t, const T* e, const T* xcoef, const T* stats, at::Tensor& dx,
              const HcDims& d) {
    HCEXT_CUDA_CHECK(cuda::hc_grad_x<T>(x.data_ptr(), stream_dtype(x.scalar_type()), wc_t, e, xcoef, stats, dx.data_ptr(),
                                      d.n, d.shape.K, d.tokens, d.C, stream));
  }
};

}  // namespace

HCEXT_CUDA_KERNELS(m) { register_hc_kernels<CudaHcBackend>(m); }

}  // namespace hcext
