#pragma once
// The mHC family's schemas (mhc_coeffs, mhc_pre, mhc_post_pre, their *_fwd twins and
// backward ops), and the public ops as the first outputs of their *_fwd twins
// (CompositeImplicitAutograd: autograd is registered on the *_fwd ops).
// Included once, by csrc/hcext.cpp, which calls these from its TORCH_LIBRARY blocks (one
// translation unit for every schema: torch/library.h costs half a minute per unit).
// Backends register kernels in mhc_cpu.cpp and mhc_cuda.cpp; the fake kernels and
// autograd are in hcext/ops/mhc.py.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace hcext {

inline void define_mhc_ops(torch::Library& m) {
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

  // DeepSeek-V4.1's shifted collapse: the coefficients of x as mhc_pre, but the layer input
  // is collapsed with pre_mix (the previous sublayer's h_pre; e_0 for the first), and x's own
  // h_pre is returned as next_pre_mix. pre_mix: [..., n] per token or [n] shared.
#define HCEXT_MHC_SCALARS                                                                         \
  "int sinkhorn_iters=20, float norm_eps=1e-06, float sinkhorn_eps=1e-06, float pre_eps=1e-06, " \
  "float post_mult=2.0"
  m.def("mhc_pre_shifted(Tensor x, Tensor pre_mix, Tensor phi, Tensor alpha, Tensor bias, " HCEXT_MHC_SCALARS
        ") -> (Tensor layer_input, Tensor h_post, Tensor h_res, Tensor next_pre_mix)",
        {at::Tag::pt2_compliant_tag});
  m.def("mhc_pre_shifted_fwd(Tensor x, Tensor pre_mix, Tensor phi, Tensor alpha, Tensor bias, " HCEXT_MHC_SCALARS
        ") -> (Tensor layer_input, Tensor h_post, Tensor h_res, Tensor next_pre_mix, Tensor proj, Tensor rstd)",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "mhc_shifted_backward(Tensor x, Tensor pre_mix, Tensor phi, Tensor alpha, Tensor bias, Tensor proj, "
      "Tensor rstd, Tensor? grad_layer_input, Tensor? grad_next_pre_mix, Tensor? grad_h_post, Tensor? grad_h_res, "
      "int sinkhorn_iters, float sinkhorn_eps, float pre_eps, float post_mult) -> (Tensor grad_x, "
      "Tensor grad_pre_mix, Tensor grad_phi, Tensor grad_alpha, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
  m.def("mhc_post_pre_shifted(Tensor f, Tensor x, Tensor h_post, Tensor h_res, Tensor pre_mix, Tensor phi, "
        "Tensor alpha, Tensor bias, " HCEXT_MHC_SCALARS
        ") -> (Tensor x_next, Tensor layer_input, Tensor h_post_next, Tensor h_res_next, Tensor next_pre_mix)",
        {at::Tag::pt2_compliant_tag});
  m.def("mhc_post_pre_shifted_fwd(Tensor f, Tensor x, Tensor h_post, Tensor h_res, Tensor pre_mix, Tensor phi, "
        "Tensor alpha, Tensor bias, " HCEXT_MHC_SCALARS
        ") -> (Tensor x_next, Tensor layer_input, Tensor h_post_next, Tensor h_res_next, Tensor next_pre_mix, "
        "Tensor proj, Tensor rstd)",
        {at::Tag::pt2_compliant_tag});
#undef HCEXT_MHC_SCALARS
  // output_mask: f, x, h_post, h_res, pre_mix (the parameters' gradients are always computed).
  m.def(
      "mhc_post_pre_shifted_backward(Tensor? grad_x_next, Tensor? grad_layer_input, Tensor? grad_h_post_next, "
      "Tensor? grad_h_res_next, Tensor? grad_next_pre_mix, Tensor f, Tensor x, Tensor h_post, Tensor h_res, "
      "Tensor pre_mix, Tensor x_next, Tensor phi, Tensor alpha, Tensor bias, Tensor proj, Tensor rstd, "
      "int sinkhorn_iters, float sinkhorn_eps, float pre_eps, float post_mult, "
      "bool[5] output_mask=[True, True, True, True, True]) -> (Tensor grad_f, Tensor grad_x, Tensor grad_h_post, "
      "Tensor grad_h_res, Tensor grad_pre_mix, Tensor grad_phi, Tensor grad_alpha, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
}

namespace mhc_detail {

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
inline T4 mhc_post_pre_composite(const at::Tensor& f, const at::Tensor& x, const at::Tensor& h_post, const at::Tensor& h_res,
                          const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias, int64_t iters,
                          double norm_eps, double sinkhorn_eps, double pre_eps, double post_mult) {
  static const auto fwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("hcext::mhc_post_pre_fwd", "").typed<MhcPostPreFwdOp>();
  auto out = fwd.call(f, x, h_post, h_res, phi, alpha, bias, iters, norm_eps, sinkhorn_eps, pre_eps, post_mult);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

using T5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using T7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using MhcPreShiftedFwdOp = T6(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, int64_t, double, double, double, double);
using MhcPostPreShiftedFwdOp = T7(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                  double, double, double, double);

// mhc_pre_shifted = the first four outputs of mhc_pre_shifted_fwd.
inline T4 mhc_pre_shifted_composite(const at::Tensor& x, const at::Tensor& pre_mix, const at::Tensor& phi,
                                    const at::Tensor& alpha, const at::Tensor& bias, int64_t iters, double norm_eps,
                                    double sinkhorn_eps, double pre_eps, double post_mult) {
  static const auto fwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("hcext::mhc_pre_shifted_fwd", "").typed<MhcPreShiftedFwdOp>();
  auto out = fwd.call(x, pre_mix, phi, alpha, bias, iters, norm_eps, sinkhorn_eps, pre_eps, post_mult);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

// mhc_post_pre_shifted = the first five outputs of mhc_post_pre_shifted_fwd.
inline T5 mhc_post_pre_shifted_composite(const at::Tensor& f, const at::Tensor& x, const at::Tensor& h_post,
                                         const at::Tensor& h_res, const at::Tensor& pre_mix, const at::Tensor& phi,
                                         const at::Tensor& alpha, const at::Tensor& bias, int64_t iters,
                                         double norm_eps, double sinkhorn_eps, double pre_eps, double post_mult) {
  static const auto fwd = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("hcext::mhc_post_pre_shifted_fwd", "")
                              .typed<MhcPostPreShiftedFwdOp>();
  auto out =
      fwd.call(f, x, h_post, h_res, pre_mix, phi, alpha, bias, iters, norm_eps, sinkhorn_eps, pre_eps, post_mult);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out), std::get<4>(out)};
}

}  // namespace mhc_detail

// The public ops on every backend (CompositeImplicitAutograd).
inline void register_mhc_composites(torch::Library& m) {
  m.impl("mhc_coeffs", &mhc_detail::first_three_outputs<mhc_detail::kMhcCoeffsFwd>);
  m.impl("mhc_pre", &mhc_detail::first_three_outputs<mhc_detail::kMhcPreFwd>);
  m.impl("mhc_post_pre", &mhc_detail::mhc_post_pre_composite);
  m.impl("mhc_pre_shifted", &mhc_detail::mhc_pre_shifted_composite);
  m.impl("mhc_post_pre_shifted", &mhc_detail::mhc_post_pre_shifted_composite);
}

}  // namespace hcext
