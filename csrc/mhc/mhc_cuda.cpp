// The CUDA backend of the mHC family: the sequence of mhc_driver.h with the CUDA passes of
// mhc_kernels.cu (declared in mhc_launch.h) and the streams CUDA backend (streams_cuda.h),
// on the current stream under a device guard. No host synchronisation.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_context.h"
#include "mhc/mhc_driver.h"
#include "mhc/mhc_launch.h"
#include "streams/streams_cuda.h"

namespace hcext {
namespace {

// The fused boundary's mix as the CUDA passes take it (none when m is null): MhcBoundaryMix or
// MhcBoundaryMixGrad, whose inputs have the same names.
template <typename T, class Mix>
cuda::MhcMixInputs<T> mix_inputs(const Mix* m) {
  if (!m) return {};
  return {m->f.data_ptr(), m->p.x.data_ptr(), m->h_post.h.template data_ptr<T>(), m->h_post.token_stride,
          m->h_res.h.template data_ptr<T>(), m->h_res.token_stride};
}

struct CudaMhcBackend : CudaContext {
  using CudaContext::CudaContext;
  using Streams = CudaStreamsBackend;
  static constexpr bool kFusedBackwardPass = false;  // the three backward steps are passes of their own

  // The standard collapse's layer input from the projection pass where a tile of 32 tokens' rows
  // fits in shared memory (cuda::mhc_project_resident: 80 KB); else a pass of its own (the
  // streams' aggregate kernel: it needs h_pre, from the whole row's projection).
  static bool projection_aggregates(const MhcDims& d, const at::Tensor& x) {
    return cuda::mhc_project_resident(int(d.n), d.C, int(d.D), stream_dtype(x.scalar_type()), x.get_device());
  }
  // The shifted collapse's layer input from the projection pass (mhc_project) for n <= 6.
  static bool projection_collapses(const MhcDims& d) { return d.D <= cuda::kMhcFusedMaxD; }

  // proj = x̃ @ phi and rstd. n <= 6: one pass over x in its own dtype (mhc_project: tiles of
  // channels of every stream; with the boundary's mix it writes x_next and projects it from the
  // same tiles, with the shifted collapse it writes the layer input from them; with layer_input,
  // where projection_aggregates, mhc_project_aggregate keeps a tile's rows in shared memory and
  // aggregates the layer input from them). Larger n: the mix as a pass of its own, then the GEMM
  // formulation: x's rows in T (a copy for bf16/fp16, written by the rstd pass), then cuBLAS
  // (TF32 only when the user enabled torch.backends.cuda.matmul.allow_tf32).
  template <typename T>
  void project(const at::Tensor& x_rows, const at::Tensor& phi, at::Tensor& proj, at::Tensor& rstd, const MhcDims& d,
               T norm_eps, at::Tensor* layer_input, const T* alpha, const T* bias, T pre_eps,
               const MhcBoundaryMix* mix, const MhcCollapse* collapse) {
    if (layer_input) {
      TORCH_INTERNAL_ASSERT(collapse == nullptr && projection_aggregates(d, x_rows));
      HCEXT_CUDA_CHECK(cuda::mhc_project_aggregate<T>(
          x_rows.data_ptr(), stream_dtype(x_rows.scalar_type()), mix_inputs<T>(mix), phi.data_ptr<T>(), alpha, bias,
          pre_eps, proj.data_ptr<T>(), rstd.data_ptr<T>(), layer_input->data_ptr(), d.tokens, d.n, d.C, int(d.D),
          norm_eps, stream));
      return;
    }
    const int64_t len = d.n * d.C;
    const StreamDtype xtype = stream_dtype(x_rows.scalar_type());
    TORCH_INTERNAL_ASSERT(collapse == nullptr || projection_collapses(d));
    if (d.D <= cuda::kMhcFusedMaxD) {
      const at::Tensor workspace = scratch<T>(cuda::mhc_project_workspace(d.tokens, d.C, int(d.D), xtype));
      HCEXT_CUDA_CHECK(cuda::mhc_project<T>(
          x_rows.data_ptr(), xtype, mix_inputs<T>(mix), collapse ? collapse->pre_mix.h.data_ptr<T>() : nullptr,
          collapse ? collapse->pre_mix.token_stride : 0, collapse ? collapse->layer_input.data_ptr() : nullptr,
          phi.data_ptr<T>(), workspace.data_ptr<T>(), proj.data_ptr<T>(), rstd.data_ptr<T>(), d.tokens, d.n, d.C,
          int(d.D), norm_eps, stream));
      return;
    }
    if (mix) {
      at::Tensor x_next = x_rows;  // the boundary's output, written here
      stream_mix_into<Streams>(mix->p, mix->f, mix->h_post, mix->h_res, x_next);
    }
    const bool copy = x_rows.scalar_type() != d.compute;
    const at::Tensor xf = copy ? scratch<T>(d.tokens * len).view({d.tokens, len}) : x_rows;
    HCEXT_CUDA_CHECK(cuda::mhc_rows<T>(x_rows.data_ptr(), xtype, copy ? xf.data_ptr<T>() : nullptr, rstd.data_ptr<T>(),
                                       d.tokens, len, norm_eps, stream));
    at::mm_out(proj, xf, phi);
  }
  template <typename T>
  void epilogue(const T* proj, const T* rstd, const T* alpha, const T* bias, T* h_pre, T* h_post, T* h_res,
                const MhcDims& d, const MhcScalars& s) {
    HCEXT_CUDA_CHECK(cuda::mhc_epilogue<T>(proj, rstd, alpha, bias, h_pre, h_post, h_res, d.tokens, d.n, s.iters,
                                           T(s.sinkhorn_eps), T(s.pre_eps), T(s.post_mult), stream));
  }
  template <typename T>
  void layer_input_grad_x(const at::Tensor& x_rows, const T* gy, const T* g_pre, T* out, const MhcDims& d) {
    HCEXT_CUDA_CHECK(cuda::mhc_layer_input_grad<T>(x_rows.data_ptr(), stream_dtype(x_rows.scalar_type()), gy, g_pre,
                                                   out, d.tokens, d.n, d.C, stream));
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
  // The grad_x pass also runs the fused boundary's mix backward and the shifted collapse's row
  // sums where it reads x in its own dtype (n <= 6; see grad_x_phi).
  static bool grad_pass_fuses(const MhcDims& d) { return d.D <= cuda::kMhcFusedMaxD; }

  // grad_x and grad_phi. n <= 6: one pass over x (mhc_grad_x_phi), which also computes gy_rows
  // (the shifted collapse's Σ_c gy x_i) and, for the fused boundary (mix_grad), runs the mix's
  // backward on x_next's gradient instead of storing it (dx is then left undefined). Larger n:
  // x's rows in T, grad_phi = xfᵀ @ dproj and dxp = dproj @ phiᵀ by cuBLAS, then the grad_x pass
  // (dx may overwrite dxp in place when x is in T).
  template <typename T>
  void grad_x_phi(const at::Tensor& x_rows, const at::Tensor& phi, const at::Tensor& dproj, const T* proj,
                  const T* rstd, const T* drstd, const T* gy, const T* mix, int64_t mix_stride, const T* alpha,
                  const T* bias, double pre_eps, const at::Tensor& extra, at::Tensor& dx, at::Tensor& grad_phi,
                  const MhcDims& d, T* gy_rows = nullptr, MhcBoundaryMixGrad* mix_grad = nullptr) {
    const int64_t len = d.n * d.C;
    const void* ex = extra.defined() ? extra.data_ptr() : nullptr;
    if (grad_pass_fuses(d)) {
      cuda::MhcGradRows<T> rows;
      rows.gy_rows = gy_rows;
      rows.mix = mix_inputs<T>(mix_grad);
      if (mix_grad) {
        auto out = [](const at::Tensor& t) { return t.numel() > 0 ? t.data_ptr() : nullptr; };
        rows.grad_f = out(mix_grad->grad_f);
        rows.grad_x = out(mix_grad->grad_x);
        rows.grad_h_post = mix_grad->grad_h_post.rows<T>();
        rows.grad_h_res = mix_grad->grad_h_res.rows<T>();
      }
      const at::Tensor workspace =
          scratch<T>(cuda::mhc_grad_x_phi_workspace<T>(d.tokens, int(d.n), d.C, int(d.D), rows));
      grad_phi = at::empty({len, d.D}, phi.options());
      HCEXT_CUDA_CHECK(cuda::mhc_grad_x_phi<T>(
          x_rows.data_ptr(), stream_dtype(x_rows.scalar_type()), phi.data_ptr<T>(), dproj.data_ptr<T>(), proj, rstd,
          drstd, gy, mix, mix_stride, alpha, bias, T(pre_eps), ex, mix_grad ? nullptr : dx.data_ptr(), rows,
          workspace.data_ptr<T>(), grad_phi.data_ptr<T>(), d.tokens, d.n, d.C, int(d.D), stream));
      return;
    }
    TORCH_INTERNAL_ASSERT(gy_rows == nullptr && mix_grad == nullptr, "n > 6: the row sums and the mix are passes of their own");
    const at::Tensor xf = x_rows.to(d.compute);
    grad_phi = at::mm(xf.t(), dproj);
    at::Tensor dxp = at::mm(dproj, phi.t());
    if (x_rows.scalar_type() == d.compute) dx = dxp;
    HCEXT_CUDA_CHECK(cuda::mhc_grad_x<T>(xf.data_ptr<T>(), dxp.data_ptr<T>(), proj, rstd, drstd, gy, mix, mix_stride,
                                         alpha, bias, T(pre_eps), ex, dx.data_ptr(), stream_dtype(dx.scalar_type()),
                                         d.tokens, d.n, d.C, d.D, stream));
  }
};

}  // namespace

HCEXT_CUDA_KERNELS(m) { register_mhc_kernels<CudaMhcBackend>(m); }

}  // namespace hcext
