#pragma once
// hcext's op implementations call ATen ops (at::mm, at::mv, ...) on tensors whose dtypes
// they chose (fp32 coefficient math). When a user runs the op under torch.autocast, the
// autocast dispatch keys are still enabled inside the kernel, and would re-dispatch those
// calls to bf16/fp16. Every implementation that calls ATen ops starts with this guard.

#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace hcext {

struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace hcext
