#pragma once
// CPU stream passes that other CPU ops reuse (defined in csrc/cpu/streams.cpp).

#include <ATen/core/Tensor.h>

#include "streams_args.h"

namespace hcext::cpu {

// out = stream_mix_expand(f, x, h_post, h_res) (contiguous, x's dtype and shape), and from
// the stored outputs rstd[t] = 1/sqrt(mean(out[t]²) + norm_eps) ([tokens], compute dtype);
// xf (when defined: [tokens, n*C] in the compute dtype) receives the outputs as well.
void stream_mix_rows(const StreamsProblem& p, const at::Tensor& f, const StreamsCoef& h_post,
                     const StreamsCoef& h_res, at::Tensor& out, at::Tensor& xf, at::Tensor& rstd, double norm_eps);

}  // namespace hcext::cpu
