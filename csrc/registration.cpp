// The hcext operator library: every schema is declared here, once. Backends register
// their kernels with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cpp; fake
// kernels and autograd are registered in Python (hcext/ops.py).
// The pybind11 module only reports build information; ops go through the dispatcher.

#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif
#ifdef HCEXT_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION: the toolkit the kernels were compiled with
#endif

// setup.py passes TORCH_CUDA_ARCH_LIST with commas as separators: stringify it whole.
#define HCEXT_STRINGIFY_ALL(...) #__VA_ARGS__
#define HCEXT_STRINGIFY(...) HCEXT_STRINGIFY_ALL(__VA_ARGS__)
#ifndef HCEXT_CUDA_ARCH_LIST_TOKENS
#define HCEXT_CUDA_ARCH_LIST_TOKENS none
#endif

TORCH_LIBRARY(hcext, m) {
  // Fake kernels live in hcext.ops; importing it is required for torch.compile.
  m.set_python_module("hcext.ops");
  m.def("sinkhorn(Tensor logits, int iters=20, float eps=1e-06) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("sinkhorn_backward(Tensor grad, Tensor logits, int iters, float eps) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Streams x [..., n, C]; coefficients per token or shared (see csrc/streams_args.h).
  // A backward op computes only the gradients whose output_mask entry is true and returns
  // an empty [0] tensor for the others.
  m.def("stream_aggregate(Tensor x, Tensor h_pre) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("stream_aggregate_backward(Tensor grad, Tensor x, Tensor h_pre, bool[2] output_mask=[True, True]) -> "
        "(Tensor grad_x, Tensor grad_h_pre)",
        {at::Tag::pt2_compliant_tag});
  m.def("stream_mix_expand(Tensor f, Tensor x, Tensor h_post, Tensor h_res) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("stream_mix_expand_backward(Tensor grad, Tensor f, Tensor x, Tensor h_post, Tensor h_res, "
        "bool[4] output_mask=[True, True, True, True]) -> "
        "(Tensor grad_f, Tensor grad_x, Tensor grad_h_post, Tensor grad_h_res)",
        {at::Tag::pt2_compliant_tag});

  // mHC coefficients (mHC Eq. 7-9). The public ops return what users need; their *_fwd
  // twins also return what the backward needs (proj = x̃ @ phi before scaling, and rstd),
  // so that autograd saves only those plus the inputs. mhc_backward serves both.
#define HCEXT_MHC_ARGS                                                                               \
  "Tensor x, Tensor phi, Tensor alpha, Tensor bias, int sinkhorn_iters=20, float norm_eps=1e-06, " \
  "float sinkhorn_eps=1e-06, float pre_eps=1e-06, float post_mult=2.0"
  m.def("mhc_coeffs(" HCEXT_MHC_ARGS ") -> (Tensor h_pre, Tensor h_post, Tensor h_res)", {at::Tag::pt2_compliant_tag});
  m.def("mhc_coeffs_fwd(" HCEXT_MHC_ARGS ") -> (Tensor h_pre, Tensor h_post, Tensor h_res, Tensor proj, Tensor rstd)",
        {at::Tag::pt2_compliant_tag});
  // mhc_pre: the coefficients and the layer input y = sum_i h_pre[i] x_i in one op.
  m.def("mhc_pre(" HCEXT_MHC_ARGS ") -> (Tensor layer_input, Tensor h_post, Tensor h_res)", {at::Tag::pt2_compliant_tag});
  m.def("mhc_pre_fwd(" HCEXT_MHC_ARGS
        ") -> (Tensor layer_input, Tensor h_post, Tensor h_res, Tensor proj, Tensor rstd)",
        {at::Tag::pt2_compliant_tag});
  // mhc_post_pre: the layer boundary fused (mHC Eq. 3 of layer l, then mhc_pre of layer
  // l + 1): x_next = stream_mix_expand(f, x, h_post, h_res), and layer l+1's layer input and
  // coefficients from x_next, whose statistics come out of the same pass that writes it.
#define HCEXT_MHC_POST_PRE_ARGS \
  "Tensor f, Tensor x, Tensor h_post, Tensor h_res, Tensor phi, Tensor alpha, Tensor bias, int sinkhorn_iters=20, " \
  "float norm_eps=1e-06, float sinkhorn_eps=1e-06, float pre_eps=1e-06, float post_mult=2.0"
  m.def("mhc_post_pre(" HCEXT_MHC_POST_PRE_ARGS
        ") -> (Tensor x_next, Tensor layer_input, Tensor h_post_next, Tensor h_res_next)",
        {at::Tag::pt2_compliant_tag});
  m.def("mhc_post_pre_fwd(" HCEXT_MHC_POST_PRE_ARGS
        ") -> (Tensor x_next, Tensor layer_input, Tensor h_post_next, Tensor h_res_next, Tensor proj, Tensor rstd)",
        {at::Tag::pt2_compliant_tag});
#undef HCEXT_MHC_POST_PRE_ARGS
  // output_mask: f, x, h_post, h_res (the parameters' gradients are always computed); a
  // gradient not requested comes back as an empty [0] tensor.
  m.def(
      "mhc_post_pre_backward(Tensor? grad_x_next, Tensor? grad_layer_input, Tensor? grad_h_post_next, "
      "Tensor? grad_h_res_next, Tensor f, Tensor x, Tensor h_post, Tensor h_res, Tensor x_next, Tensor phi, "
      "Tensor alpha, Tensor bias, Tensor proj, Tensor rstd, int sinkhorn_iters, float sinkhorn_eps, float pre_eps, "
      "float post_mult, bool[4] output_mask=[True, True, True, True]) -> (Tensor grad_f, Tensor grad_x, "
      "Tensor grad_h_post, Tensor grad_h_res, Tensor grad_phi, Tensor grad_alpha, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
#undef HCEXT_MHC_ARGS
  m.def(
      "mhc_backward(Tensor x, Tensor phi, Tensor alpha, Tensor bias, Tensor proj, Tensor rstd, "
      "Tensor? grad_layer_input, Tensor? grad_h_pre, Tensor? grad_h_post, Tensor? grad_h_res, int sinkhorn_iters, "
      "float sinkhorn_eps, float pre_eps, float post_mult) -> (Tensor grad_x, Tensor grad_phi, Tensor grad_alpha, "
      "Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});

  // Original Hyper-Connections coefficients (HC Eq. 1-7, static and dynamic; see
  // hcext/reference.py::hc_coeffs). hc_coeffs_fwd also returns what the backward needs:
  // proj [..., n, K] (the centred projections of each stream onto the K dynamic columns,
  // before the norm's scale) and stats [..., n, 2] = (mean, rstd); both are empty [0] for
  // static HC, whose outputs are the shared [n], [n], [n, n] coefficients.
#define HCEXT_HC_ARGS                                                                                        \
  "Tensor x, Tensor static_alpha, Tensor static_beta, Tensor? dynamic_alpha=None, Tensor? dynamic_beta=None, " \
  "Tensor? alpha_scale=None, Tensor? beta_scale=None, Tensor? norm_weight=None, Tensor? norm_bias=None, "      \
  "str norm=\"rms\", float norm_eps=1e-06, bool use_tanh=True"
  m.def("hc_coeffs(" HCEXT_HC_ARGS ") -> (Tensor h_pre, Tensor h_post, Tensor h_res)", {at::Tag::pt2_compliant_tag});
  m.def("hc_coeffs_fwd(" HCEXT_HC_ARGS ") -> (Tensor h_pre, Tensor h_post, Tensor h_res, Tensor proj, Tensor stats)",
        {at::Tag::pt2_compliant_tag});
#undef HCEXT_HC_ARGS
  // Dynamic HC only. output_mask: x, static_alpha, static_beta, dynamic_alpha, dynamic_beta,
  // alpha_scale, beta_scale, norm_weight, norm_bias; a gradient not requested, or of an
  // absent input, comes back as an empty [0] tensor.
  m.def(
      "hc_coeffs_backward(Tensor x, Tensor static_alpha, Tensor static_beta, Tensor? dynamic_alpha, "
      "Tensor? dynamic_beta, Tensor? alpha_scale, Tensor? beta_scale, Tensor? norm_weight, Tensor? norm_bias, "
      "Tensor proj, Tensor stats, Tensor? grad_h_pre, Tensor? grad_h_post, Tensor? grad_h_res, str norm, "
      "bool use_tanh, bool[9] output_mask=[True, True, True, True, True, True, True, True, True]) -> "
      "(Tensor grad_x, Tensor grad_static_alpha, Tensor grad_static_beta, Tensor grad_dynamic_alpha, "
      "Tensor grad_dynamic_beta, Tensor grad_alpha_scale, Tensor grad_beta_scale, Tensor grad_norm_weight, "
      "Tensor grad_norm_bias)",
      {at::Tag::pt2_compliant_tag});
}

namespace {

using MhcOutputs5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using MhcOutputs3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

using MhcFwdOp = MhcOutputs5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                             double, double, double, double);

// op = the first three outputs of op_fwd, on every backend (autograd is registered on the
// *_fwd op, which also returns what the backward saves).
template <const char* kFwdName>
MhcOutputs3 first_three_outputs(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                                const at::Tensor& bias, int64_t iters, double norm_eps, double sinkhorn_eps,
                                double pre_eps, double post_mult) {
  static const auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow(kFwdName, "").typed<MhcFwdOp>();
  auto out = fwd.call(x, phi, alpha, bias, iters, norm_eps, sinkhorn_eps, pre_eps, post_mult);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

constexpr char kMhcCoeffsFwd[] = "hcext::mhc_coeffs_fwd";
constexpr char kMhcPreFwd[] = "hcext::mhc_pre_fwd";

using T4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using T6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using MhcPostPreFwdOp = T6(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double, double,
                           double);

// mhc_post_pre = the first four outputs of mhc_post_pre_fwd.
T4 mhc_post_pre_composite(const at::Tensor& f, const at::Tensor& x, const at::Tensor& h_post, const at::Tensor& h_res,
                          const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias, int64_t iters,
                          double norm_eps, double sinkhorn_eps, double pre_eps, double post_mult) {
  static const auto fwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("hcext::mhc_post_pre_fwd", "").typed<MhcPostPreFwdOp>();
  auto out = fwd.call(f, x, h_post, h_res, phi, alpha, bias, iters, norm_eps, sinkhorn_eps, pre_eps, post_mult);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CompositeImplicitAutograd, m) {
  m.impl("mhc_coeffs", &first_three_outputs<kMhcCoeffsFwd>);
  m.impl("mhc_pre", &first_three_outputs<kMhcPreFwd>);
  m.impl("mhc_post_pre", &mhc_post_pre_composite);
}

// hc_coeffs = the first three outputs of hc_coeffs_fwd (autograd is registered on the
// *_fwd op, which also returns what the backward saves).
namespace {

using HcOpt = std::optional<at::Tensor>;
using HcOutputs5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using HcFwdOp = HcOutputs5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const HcOpt&, const HcOpt&,
                           const HcOpt&, const HcOpt&, const HcOpt&, const HcOpt&, std::string_view, double, bool);

std::tuple<at::Tensor, at::Tensor, at::Tensor> hc_coeffs_composite(
    const at::Tensor& x, const at::Tensor& static_alpha, const at::Tensor& static_beta, const HcOpt& dynamic_alpha,
    const HcOpt& dynamic_beta, const HcOpt& alpha_scale, const HcOpt& beta_scale, const HcOpt& norm_weight,
    const HcOpt& norm_bias, std::string_view norm, double norm_eps, bool use_tanh) {
  static const auto fwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("hcext::hc_coeffs_fwd", "").typed<HcFwdOp>();
  auto out = fwd.call(x, static_alpha, static_beta, dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight,
                      norm_bias, norm, norm_eps, use_tanh);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CompositeImplicitAutograd, m) { m.impl("hc_coeffs", &hc_coeffs_composite); }

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "hcext native library (ops are registered as torch.ops.hcext.*)";
  mod.def("build_info", []() {
    pybind11::dict info;
    pybind11::list backends;
    backends.append("cpu");
#ifdef HCEXT_WITH_CUDA
    backends.append("cuda");
#endif
    info["backends"] = backends;
    info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
#ifdef HCEXT_WITH_CUDA
    info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#else
    info["cuda_version"] = pybind11::none();
#endif
#ifdef HCEXT_WITH_CUDA
    info["cuda_arch_list"] = std::string(HCEXT_STRINGIFY(HCEXT_CUDA_ARCH_LIST_TOKENS));
#else
    info["cuda_arch_list"] = pybind11::none();
#endif
#ifdef NDEBUG
    info["debug"] = false;
#else
    info["debug"] = true;
#endif
    return info;
  });
}
