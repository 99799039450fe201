// CUDA implementation of the mHC coefficient ops (hcext::mhc_coeffs_fwd, mhc_pre_fwd,
// mhc_post_pre_fwd and their backward ops):
// the sequence of mhc_driver.h with the CUDA passes of mhc_kernels.cu, on the current stream
// under a device guard. No host synchronisation.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/x_type.h"
#include "launchers.h"
#include "mhc_driver.h"

namespace hcext {
namespace {

struct CudaMhcBackend {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;

  explicit CudaMhcBackend(const at::Tensor& x) : guard(x.device()), stream(c10::cuda::getCurrentCUDAStream()) {}

  // One read of x: the sum of squares, and the fp32 copy the GEMM needs when x is not fp32.
  at::Tensor rows(const at::Tensor& x, at::Tensor& rstd, const MhcDims& d, double norm_eps) {
    const at::Tensor xc = x.contiguous();
    const bool copy = xc.scalar_type() != d.compute;
    at::Tensor xf = copy ? at::empty({d.tokens, d.n * d.C}, x.options().dtype(d.compute))
                         : xc.reshape({d.tokens, d.n * d.C});
    dispatch_compute(d.compute, [&](auto zero) {
      using T = decltype(zero);
      C10_CUDA_CHECK(cuda::mhc_rows<T>(xc.data_ptr(), cuda::x_type(xc.scalar_type()), copy ? xf.data_ptr<T>() : nullptr,
                                       rstd.data_ptr<T>(), d.tokens, d.n * d.C, static_cast<T>(norm_eps), stream));
    });
    return xf;
  }
  // The first pass of mhc_post_pre: out = mix_expand(f, x, h_post, h_res), its rstd, and
  // its fp32 copy for the GEMM when x is not fp32.
  at::Tensor mix_rows(const StreamsProblem& p, const at::Tensor& f, const StreamsCoef& hp, const StreamsCoef& hr,
                      at::Tensor& out, at::Tensor& rstd, const MhcDims& d, double norm_eps) {
    const bool copy = p.x.scalar_type() != d.compute;
    at::Tensor xf = copy ? at::empty({d.tokens, d.n * d.C}, p.x.options().dtype(d.compute)) : at::Tensor();
    cuda::dispatch_stream_dtype(p.x.scalar_type(), [&](auto xtag, auto stag) {
      using X = decltype(xtag);
      using S = decltype(stag);
      const cudaError_t err = cuda::stream_mix_rows<X, S>(
          static_cast<const X*>(f.data_ptr()), static_cast<const X*>(p.x.data_ptr()), hp.h.data_ptr<S>(),
          hp.token_stride, hr.h.data_ptr<S>(), hr.token_stride, static_cast<X*>(out.data_ptr()),
          copy ? xf.data_ptr<S>() : nullptr, rstd.data_ptr<S>(), static_cast<S>(norm_eps), d.tokens, d.n, d.C,
          stream);
      C10_CUDA_CHECK(err);
    });
    return copy ? xf : out.reshape({d.tokens, d.n * d.C});
  }
  template <typename T>
  void epilogue(const T* proj, const T* rstd, const T* alpha, const T* bias, T* h_pre, T* h_post, T* h_res,
                const MhcDims& d, const MhcScalars& s) {
    C10_CUDA_CHECK(cuda::mhc_epilogue<T>(proj, rstd, alpha, bias, h_pre, h_post, h_res, d.tokens, d.n, s.iters,
                                         T(s.sinkhorn_eps), T(s.pre_eps), T(s.post_mult), stream));
  }
  template <typename T>
  void layer_input_grad(const T* xf, const T* gy, const T* g_pre, T* out, const MhcDims& d) {
    C10_CUDA_CHECK(cuda::mhc_layer_input_grad<T>(xf, gy, g_pre, out, d.tokens, d.n, d.C, stream));
  }
  template <typename T>
  void epilogue_backward(const T* proj, const T* rstd, const T* alpha, const T* bias, const T* g_pre, const T* g_post,
                         const T* g_res, T* dl, T* dproj, T* dalpha, T* drstd, const MhcDims& d, const MhcScalars& s) {
    // Scratch for the recomputed Sinkhorn denominators (freed to the caching allocator).
    at::Tensor workspace = at::empty({int64_t(sinkhorn_half_steps(s.iters)) * d.n * d.tokens},
                                     at::TensorOptions().device(at::kCUDA, guard.current_device().index())
                                         .dtype(c10::CppTypeToScalarType<T>::value));
    C10_CUDA_CHECK(cuda::mhc_epilogue_backward<T>(proj, rstd, alpha, bias, g_pre, g_post, g_res, dl, dproj, dalpha,
                                                  drstd, workspace.data_ptr<T>(), d.tokens, d.n, s.iters,
                                                  T(s.sinkhorn_eps), T(s.post_mult), stream));
  }
  template <typename T>
  void grad_x(const T* xf, const T* dxp, const T* proj, const T* rstd, const T* drstd, const T* gy, const T* alpha,
              const T* bias, double pre_eps, const at::Tensor& extra, at::Tensor& dx, const MhcDims& d) {
    C10_CUDA_CHECK(cuda::mhc_grad_x<T>(xf, dxp, proj, rstd, drstd, gy, alpha, bias, T(pre_eps),
                                       extra.defined() ? extra.data_ptr() : nullptr, dx.data_ptr(),
                                       cuda::x_type(dx.scalar_type()), d.tokens, d.n, d.C, d.D, stream));
  }

};

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CUDA, m) {
  m.impl("mhc_post_pre_fwd", &mhc_post_pre_fwd_impl<CudaMhcBackend>);
  m.impl("mhc_post_pre_backward", &mhc_post_pre_backward_impl<CudaMhcBackend>);
  m.impl("mhc_coeffs_fwd", &mhc_coeffs_fwd_impl<CudaMhcBackend>);
  m.impl("mhc_pre_fwd", &mhc_pre_fwd_impl<CudaMhcBackend>);
  m.impl("mhc_backward", &mhc_backward_impl<CudaMhcBackend>);
}

}  // namespace hcext
