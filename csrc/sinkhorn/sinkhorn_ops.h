#pragma once
// The Sinkhorn family's schemas (hcext::sinkhorn, hcext::sinkhorn_backward).
// Included once, by csrc/hcext.cpp, which calls these from its TORCH_LIBRARY blocks (one
// translation unit for every schema: torch/library.h costs half a minute per unit).
// Backends register kernels in sinkhorn_cpu.cpp and sinkhorn_cuda.cpp; the fake kernels and
// autograd are in hcext/ops/sinkhorn.py.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace hcext {

inline void define_sinkhorn_ops(torch::Library& m) {
  m.def("sinkhorn(Tensor logits, int iters=20, float eps=1e-06) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("sinkhorn_backward(Tensor grad, Tensor logits, int iters, float eps) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

}  // namespace hcext
