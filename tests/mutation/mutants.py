"""The planted bugs of the mutation-test gate (``make mutation-test``; runner: run.py).

Each mutant replaces one exact snippet (it must occur exactly once in its file) and names
the tests that must fail for it to count as killed. They are spread over the shared math
headers, every CPU kernel file, the drivers, the Python wrappers and hcext/nn.py. A mutant
that survives is a hole in the suite: add the test that catches it, never loosen the list.
"""

from typing import List, NamedTuple


class Mutant(NamedTuple):
    name: str
    path: str  # relative to the repository root
    find: str
    replace: str
    tests: List[str]  # pytest arguments (files or node ids) that must fail


MUTANTS = [
    # ---- shared per-token math (csrc/include/hcext)
    Mutant("n = 9..16 sent to the n = 4 path", "csrc/include/hcext/dispatch.h",
           "if (n <= 16) return fn.template operator()<0, 16>();",
           "if (n <= 16) return fn.template operator()<4, 4>();",
           ["tests/test_coverage.py"]),
    Mutant("Sinkhorn: eps dropped from the half-step denominators", "csrc/include/hcext/sinkhorn.h",
           "    const V d = s + eps;", "    const V d = s;", ["tests/test_sinkhorn.py"]),
    Mutant("streams: h_post not applied to f in the mix", "csrc/include/hcext/streams.h",
           "  return stream_weighted_sum<kN, V>(h_res_row, 1, n_rt, x) + h_post_i * f;",
           "  return stream_weighted_sum<kN, V>(h_res_row, 1, n_rt, x) + f;", ["tests/test_streams.py"]),
    Mutant("mHC: post_mult ignored", "csrc/include/hcext/mhc.h",
           "    h_post[i] = mhc_sigmoid<V, S>(proj[n + i] * rstd * alpha[1] + bias[n + i]) * post_mult;",
           "    h_post[i] = mhc_sigmoid<V, S>(proj[n + i] * rstd * alpha[1] + bias[n + i]);", ["tests/test_mhc.py"]),
    Mutant("mHC: pre_eps dropped", "csrc/include/hcext/mhc.h",
           "  return mhc_sigmoid<V, S>(proj_i * rstd * alpha[0] + bias_i) + pre_eps;",
           "  return mhc_sigmoid<V, S>(proj_i * rstd * alpha[0] + bias_i);", ["tests/test_mhc.py"]),
    Mutant("HC: tanh always applied", "csrc/include/hcext/hc.h",
           "  return use_tanh ? hc_tanh(z) : z;", "  return hc_tanh(z);", ["tests/test_hc.py"]),
    # ---- CPU kernels and their shared helpers
    Mutant("a scalar tail one short", "csrc/common/cpu_vec_io.h",
           "  if (c < len) body(c, static_cast<int>(len - c));",
           "  if (c < len) body(c, static_cast<int>(len - c - 1));", ["tests/test_streams.py", "tests/test_mhc.py"]),
    Mutant("token lanes: the last partial block not written", "csrc/common/cpu_lane_io.h",
           "  const int valid = static_cast<int>(std::min<int64_t>(W, tokens - b));",
           "  const int valid = static_cast<int>(std::min<int64_t>(W, tokens - b - 1));", ["tests/test_mhc.py"]),
    Mutant("compute dtype always fp32", "csrc/common/checks.h",
           "return input == at::kDouble ? at::kDouble : at::kFloat;", "return at::kFloat;",
           ["tests/test_sinkhorn.py", "tests/test_streams.py"]),
    Mutant("streams CPU: the first token block left out of a shared gradient", "csrc/streams/streams_cpu.cpp",
           "  for (int64_t b = 0; b < blocks; ++b) {", "  for (int64_t b = 1; b < blocks; ++b) {",
           ["tests/test_streams.py"]),
    Mutant("mHC CPU: rstd over one channel too few", "csrc/mhc/mhc_cpu.cpp",
           "    rstd[t] = mhc_rstd<S>(lane_sum(squares), S(len), norm_eps);",
           "    rstd[t] = mhc_rstd<S>(lane_sum(squares), S(len - 1), norm_eps);", ["tests/test_mhc.py"]),
    Mutant("mHC CPU: the other consumers' gradient of x_next dropped", "csrc/mhc/mhc_cpu.cpp",
           "        if (extra) v = v + load_block<S>(extra + row + c, valid);", "",
           ["tests/test_mhc_post_pre.py"]),
    Mutant("HC CPU: the shifted tail not zeroed (LayerNorm sums polluted)", "csrc/hc/hc_cpu.cpp",
           "        zero_tail(v, valid);", "", ["tests/test_hc.py"]),
    Mutant("Sinkhorn CPU: forward kernel for the wrong n class", "csrc/sinkhorn/sinkhorn_cpu.cpp",
           "        K::template forward<kN, kMaxN>(logits, out, tokens, n, iters, eps, begin, end);",
           "        K::template forward<kN, kMaxN>(logits, out, tokens, n, iters - 1, eps, begin, end);",
           ["tests/test_sinkhorn.py"]),
    # ---- drivers
    Mutant("streams driver: a shared coefficient's gradient not summed", "csrc/streams/streams_driver.h",
           "  if (!g.partial.defined() || !c.shared) return;", "  if (!g.partial.defined() || c.shared) return;",
           ["tests/test_streams.py"]),
    Mutant("Sinkhorn driver: gradient returned in the compute dtype", "csrc/sinkhorn/sinkhorn_driver.h",
           "  return grad_logits.to(logits.scalar_type());", "  return grad_logits;", ["tests/test_sinkhorn.py"]),
    Mutant("HC driver: norm_bias gradient negated", "csrc/hc/hc_driver.h",
           "  if (wanted(8)) grad_nb = at::mv(w.W, S);", "  if (wanted(8)) grad_nb = at::mv(w.W, S).neg();",
           ["tests/test_hc.py"]),
    Mutant("mHC driver: the shifted collapse's layer input collapsed with h_pre", "csrc/mhc/mhc_driver.h",
           "  return {stream_aggregate_impl<typename Backend::Streams>(x, pre_mix), h_post, h_res, h_pre, proj, rstd};",
           "  return {stream_aggregate_impl<typename Backend::Streams>(x, h_pre), h_post, h_res, h_pre, proj, rstd};",
           ["tests/test_mhc_shifted.py"]),
    # ---- Python wrappers
    Mutant("streams autograd: f's gradient mask shifted", "hcext/ops/streams.py",
           "    mask = [bool(m) for m in ctx.needs_input_grad[:4]]",
           "    mask = [bool(m) for m in ctx.needs_input_grad[1:5]] + [True]",
           ["tests/test_streams.py"]),
    Mutant("mhc_pre autograd: h_post's gradient dropped", "hcext/ops/mhc.py",
           "        x, phi, alpha, bias, proj, rstd, g_layer_input, None, g_post, g_res, *ctx.args",
           "        x, phi, alpha, bias, proj, rstd, g_layer_input, None, None, g_res, *ctx.args",
           ["tests/test_mhc_layer.py", "tests/test_coverage.py"]),
    Mutant("sinkhorn fake kernel: result in the input's dtype", "hcext/ops/sinkhorn.py",
           "    return logits.new_empty(logits.shape, dtype=compute_dtype(logits.dtype))",
           "    return logits.new_empty(logits.shape)", ["tests/test_sinkhorn.py"]),
    # ---- hcext.nn
    Mutant("norm_eps and sinkhorn_eps swapped in HyperConnection", "hcext/nn.py",
           "        self.sinkhorn_iters, self.norm_eps, self.sinkhorn_eps = sinkhorn_iters, norm_eps, sinkhorn_eps",
           "        self.sinkhorn_iters, self.norm_eps, self.sinkhorn_eps = sinkhorn_iters, sinkhorn_eps, norm_eps",
           ["tests/test_nn_reference.py"]),
    Mutant("use_tanh hard-coded in HyperConnection", "hcext/nn.py",
           "        self.norm, self.use_tanh = norm, use_tanh", "        self.norm, self.use_tanh = norm, True",
           ["tests/test_nn_reference.py"]),
    Mutant("alpha_init ignored by HyperConnection", "hcext/nn.py",
           "            self.alpha = nn.Parameter(torch.full((3,), float(alpha_init)))",
           "            self.alpha = nn.Parameter(torch.full((3,), 0.01))", ["tests/test_nn_reference.py"]),
]
