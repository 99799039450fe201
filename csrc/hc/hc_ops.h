#pragma once
// The HC family's schemas (hc_coeffs, hc_coeffs_fwd, hc_coeffs_backward), and hc_coeffs as
// the first outputs of hc_coeffs_fwd (CompositeImplicitAutograd).
// Included once, by csrc/hcext.cpp, which calls these from its TORCH_LIBRARY blocks (one
// translation unit for every schema: torch/library.h costs half a minute per unit).
// Backends register kernels in hc_cpu.cpp and hc_cuda.cpp; the fake kernels and
// autograd are in hcext/ops/hc.py.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace hcext {

inline void define_hc_ops(torch::Library& m) {
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

// hc_coeffs = the first three outputs of hc_coeffs_fwd (autograd is registered on the
// *_fwd op, which also returns what the backward saves).
namespace hc_detail {

using HcOpt = std::optional<at::Tensor>;
using HcOutputs5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using HcFwdOp = HcOutputs5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const HcOpt&, const HcOpt&,
                           const HcOpt&, const HcOpt&, const HcOpt&, const HcOpt&, std::string_view, double, bool);

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> hc_coeffs_composite(
    const at::Tensor& x, const at::Tensor& static_alpha, const at::Tensor& static_beta, const HcOpt& dynamic_alpha,
    const HcOpt& dynamic_beta, const HcOpt& alpha_scale, const HcOpt& beta_scale, const HcOpt& norm_weight,
    const HcOpt& norm_bias, std::string_view norm, double norm_eps, bool use_tanh) {
  static const auto fwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("hcext::hc_coeffs_fwd", "").typed<HcFwdOp>();
  auto out = fwd.call(x, static_alpha, static_beta, dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight,
                      norm_bias, norm, norm_eps, use_tanh);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

}  // namespace hc_detail

// The public ops on every backend (CompositeImplicitAutograd).
inline void register_hc_composites(torch::Library& m) {
  m.impl("hc_coeffs", &hc_detail::hc_coeffs_composite);
}

}  // namespace hcext
