// The CUDA backend of the mHC family: the sequence of mhc_driver.h with the CUDA passes of
// mhc_kernels.cu (declared in mhc_launch.h) and the streams CUDA backend (streams_cuda.h),
// on the current stream under a device guard. No host synchronisation.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_context.h"
#include "mhc/mhc_driver.h"
#include "mhc/mhc_launch.h"
#include "streams/streams_cuda.h"

namespace hcext {
namespace {

struct CudaMhcBackend : CudaContext {
  using CudaContext::CudaContext;
  using Streams = CudaStreamsBackend;

  // x: contiguous rows of len elements in their own dtype; xf (nullable) receives them in T.
  template <typename T>
  void rows(const at::Tensor& x, T* xf, T* rstd, int64_t tokens, int64_t len, T norm_eps) {
    HCEXT_CUDA_CHECK(cuda::mhc_rows<T>(x.data_ptr(), stream_dtype(x.scalar_type()), xf, rstd, tokens, len, norm_eps,
                                     stream));
  }
  template <typename T>
  void epilogue(const T* proj, const T* rstd, const T* alpha, const T* bias, T* h_pre, T* h_post, T* h_res,
                const MhcDims& d, const MhcScalars& s) {
    HCEXT_CUDA_CHECK(cuda::mhc_epilogue<T>(proj, rstd, alpha, bias, h_pre, h_post, h_res, d.tokens, d.n, s.iters,
                                         T(s.sinkhorn_eps), T(s.pre_eps), T(s.post_mult), stream));
  }
  template <typename T>
  void layer_input_grad(const T* xf, const T* gy, const T* g_pre, T* out, const MhcDims& d) {
    HCEXT_CUDA_CHECK(cuda::mhc_layer_input_grad<T>(xf, gy, g_pre, out, d.tokens, d.n, d.C, stream));
  }
  template <typename T>
  void epilogue_backward(const T* proj, const T* rstd, const T* alpha, const T* bias, const T* g_pre, const T* g_post,
                         const T* g_res, T* dl, T* dproj, T* dalpha, T* drstd, const MhcDims& d, const MhcScalars& s) {
    // The recomputed Sinkhorn denominators (and, for large n, two matrices per token).
    const at::Tensor workspace = scratch<T>(int64_t(sinkhorn_half_steps(s.iters)) * d.n * d.tokens +
                                            thread_matrix_workspace(d.tokens, d.n, 2));
    HCEXT_CUDA_CHECK(cuda::mhc_epilogue_backward<T>(proj, rstd, alpha, bias, g_pre, g_post, g_res, dl, dproj, dalpha,
                                                  drstd, workspace.data_ptr<T>(), d.tokens, d.n, s.iters,
                                                  T(s.sinkhorn_eps), T(s.post_mult), stream));
  }
  template <typename T>
  void grad_x(const T* xf, const T* dxp, const T* proj, const T* rstd, const T* drstd, const T* gy, const T* mix,
              int64_t mix_stride, const T* alpha,
              const T* bias, double pre_eps, const at::Tensor& extra, at::Tensor& dx, const MhcDims& d) {
    HCEXT_CUDA_CHECK(cuda::mhc_grad_x<T>(xf, dxp, proj, rstd, drstd, gy, mix, mix_stride, alpha, bias, T(pre_eps),
                                       extra.defined() ? extra.data_ptr() : nullptr, dx.data_ptr(),
                                       stream_dtype(dx.scalar_type()), d.tokens, d.n, d.C, d.D, stream));
  }

};

}  // namespace

HCEXT_CUDA_KERNELS(m) { register_mhc_kernels<CudaMhcBackend>(m); }

}  // namespace hcext
