#pragma once
// The streams family's schemas (hcext::stream_aggregate, hcext::stream_mix_expand and their
// backward ops).
// Included once, by csrc/hcext.cpp, which calls these from its TORCH_LIBRARY blocks (one
// translation unit for every schema: torch/library.h costs half a minute per unit).
// Backends register kernels in streams_cpu.cpp and streams_cuda.cpp; the fake kernels and
// autograd are in hcext/ops/streams.py.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace hcext {

inline void define_streams_ops(torch::Library& m) {
  // Streams x [..., n, C]; coefficients per token or shared (see streams_checks.h).
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

}

}  // namespace hcext
