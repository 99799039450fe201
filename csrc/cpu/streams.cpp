// CPU kernels of hcext::stream_aggregate, hcext::stream_mix_expand and their backward ops.
// at::parallel_for splits the tokens. Within a token, the channels are processed kW at a
// time as hcext::Lanes<S, kW> (fp16/bf16 converted to fp32 on load), running the shared
// math of hcext/streams.h. The lane loops have a constant trip count, so g++ -O3 turns
// them into SIMD instructions. Stack arrays only: no allocation per token.
//
// A coefficient gradient is first computed per token: into the output itself for a
// per-token coefficient, into a [tokens, K] scratch for a shared one. The shared case
// then sums the scratch over tokens in a fixed order (sum_over_tokens), so the result
// does not depend on the thread count.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include "hcext/lanes.h"
#include "hcext/streams.h"
#include "streams_args.h"

namespace hcext {
namespace {

// Channels per block: 8 floats = one AVX register, or two SSE registers.
constexpr int kW = 8;

template <typename S>
using Block = Lanes<S, kW>;

// Compute scalar: double for double streams, float otherwise.
template <typename T>
using ComputeOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Loads channels [0, valid) of a block (zeros beyond, so they add nothing to sums).
template <typename S, typename T>
inline Block<S> load_block(const T* p, int valid) {
  Block<S> r;
  if (valid == kW) {
    for (int l = 0; l < kW; ++l) r.v[l] = static_cast<S>(p[l]);
  } else {
    for (int l = 0; l < kW; ++l) r.v[l] = l < valid ? static_cast<S>(p[l]) : S(0);
  }
  return r;
}

template <typename T, typename S>
inline void store_block(T* p, const Block<S>& b, int valid) {
  if (valid == kW) {
    for (int l = 0; l < kW; ++l) p[l] = static_cast<T>(b.v[l]);
  } else {
    for (int l = 0; l < valid; ++l) p[l] = static_cast<T>(b.v[l]);
  }
}

// Sum of the lanes, in lane order.
template <typename S>
inline S lane_sum(const Block<S>& b) {
  S s = b.v[0];
  for (int l = 1; l < kW; ++l) s += b.v[l];
  return s;
}

// Tokens per parallel_for task: about 32K stream elements of work.
inline int64_t token_grain(int n, int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n * C)); }

// out[k] = sum_t partials[t, k], in a fixed order: fixed blocks of kRows tokens are summed
// (in parallel), then the block sums are summed in block order.
template <typename S>
void sum_over_tokens(const S* partials, S* out, int64_t tokens, int64_t K) {
  constexpr int64_t kRows = 256;
  const int64_t blocks = (tokens + kRows - 1) / kRows;
  std::vector<S> block_sums(static_cast<size_t>(blocks * K), S(0));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      S* acc = block_sums.data() + b * K;
      const int64_t last = std::min(tokens, (b + 1) * kRows);
      for (int64_t t = b * kRows; t < last; ++t) {
        for (int64_t k = 0; k < K; ++k) acc[k] += partials[t * K + k];
      }
    }
  });
  for (int64_t k = 0; k < K; ++k) out[k] = S(0);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t k = 0; k < K; ++k) out[k] += block_sums[b * K + k];
  }
}

// ---------------------------------------------------------------------------------------
// Kernels. kN > 0: compile-time n; kN == 0: run-time n <= kMaxN.

template <int kN, int kMaxN, typename T, typename S>
void aggregate_forward(const T* x, const S* h, int64_t h_stride, T* y, int64_t tokens, int n_rt, int64_t C) {
  const int n = kN > 0 ? kN : n_rt;
  at::parallel_for(0, tokens, token_grain(n, C), [&](int64_t begin, int64_t end) {
    Block<S> X[kMaxN];
    for (int64_t t = begin; t < end; ++t) {
      const T* xt = x + t * n * C;
      const S* ht = h + t * h_stride;
      for (int64_t c = 0; c < C; c += kW) {
        const int valid = static_cast<int>(std::min<int64_t>(kW, C - c));
        for (int i = 0; i < n; ++i) X[i] = load_block<S>(xt + i * C + c, valid);
        const Block<S> yv = stream_aggregate_value<kN, Block<S>>(ht, n, [&](int i) { return X[i]; });
        store_block(y + t * C + c, yv, valid);
      }
    }
  });
}

// grad_x (nullable) and the per-token grad_h_pre rows gh (nullable, [tokens, n]).
template <int kN, int kMaxN, typename T, typename S>
void aggregate_backward(const T* gy, const T* x, const S* h, int64_t h_stride, T* grad_x, S* gh, int64_t tokens,
                        int n_rt, int64_t C) {
  const int n = kN > 0 ? kN : n_rt;
  at::parallel_for(0, tokens, token_grain(n, C), [&](int64_t begin, int64_t end) {
    Block<S> acc[kMaxN];
    for (int64_t t = begin; t < end; ++t) {
      const T* xt = x + t * n * C;
      const S* ht = h + t * h_stride;
      for (int i = 0; i < n; ++i) acc[i] = Block<S>(S(0));
      for (int64_t c = 0; c < C; c += kW) {
        const int valid = static_cast<int>(std::min<int64_t>(kW, C - c));
        const Block<S> g = load_block<S>(gy + t * C + c, valid);
        if (grad_x) {
          for (int i = 0; i < n; ++i) {
            store_block(grad_x + (t * n + i) * C + c, stream_aggregate_grad_x_value(ht[i], g), valid);
          }
        }
        if (gh) {
          for (int i = 0; i < n; ++i) acc[i] = acc[i] + stream_coef_grad_term(g, load_block<S>(xt + i * C + c, valid));
        }
      }
      if (gh) {
        for (int i = 0; i < n; ++i) gh[t * n + i] = lane_sum(acc[i]);
      }
    }
  });
}

template <int kN, int kMaxN, typename T, typename S>
void mix_forward(const T* f, const T* x, const S* hp, int64_t hp_stride, const S* hr, int64_t hr_stride, T* out,
                 int64_t tokens, int n_rt, int64_t C) {
  const int n = kN > 0 ? kN : n_rt;
  at::parallel_for(0, tokens, token_grain(n, C), [&](int64_t begin, int64_t end) {
    Block<S> X[kMaxN];
    for (int64_t t = begin; t < end; ++t) {
      const T* xt = x + t * n * C;
      const S* hpt = hp + t * hp_stride;
      const S* hrt = hr + t * hr_stride;
      T* ot = out + t * n * C;
      for (int64_t c = 0; c < C; c += kW) {
        const int valid = static_cast<int>(std::min<int64_t>(kW, C - c));
        for (int j = 0; j < n; ++j) X[j] = load_block<S>(xt + j * C + c, valid);
        const Block<S> F = load_block<S>(f + t * C + c, valid);
        for (int i = 0; i < n; ++i) {
          const Block<S> o = stream_mix_value<kN, Block<S>>(hrt + i * n, hpt[i], F, n, [&](int j) { return X[j]; });
          store_block(ot + i * C + c, o, valid);
        }
      }
    }
  });
}

// Every output pointer is nullable (not requested). gh_post: [tokens, n] rows, gh_res:
// [tokens, n, n] rows of per-token coefficient gradients.
template <int kN, int kMaxN, typename T, typename S>
void mix_backward(const T* g, const T* f, const T* x, const S* hp, int64_t hp_stride, const S* hr,
                  int64_t hr_stride, T* grad_f, T* grad_x, S* gh_post, S* gh_res, int64_t tokens, int n_rt,
                  int64_t C) {
  const int n = kN > 0 ? kN : n_rt;
  at::parallel_for(0, tokens, token_grain(n, C), [&](int64_t begin, int64_t end) {
    Block<S> G[kMaxN];
    Block<S> X[kMaxN];
    Block<S> acc_post[kMaxN];
    Block<S> acc_res[kMaxN * kMaxN];
    for (int64_t t = begin; t < end; ++t) {
      const T* gt = g + t * n * C;
      const T* xt = x + t * n * C;
      const S* hpt = hp + t * hp_stride;
      const S* hrt = hr + t * hr_stride;
      for (int i = 0; i < n; ++i) acc_post[i] = Block<S>(S(0));
      for (int k = 0; k < n * n; ++k) acc_res[k] = Block<S>(S(0));
      for (int64_t c = 0; c < C; c += kW) {
        const int valid = static_cast<int>(std::min<int64_t>(kW, C - c));
        for (int i = 0; i < n; ++i) G[i] = load_block<S>(gt + i * C + c, valid);
        auto load_g = [&](int i) { return G[i]; };
        if (grad_f) store_block(grad_f + t * C + c, stream_mix_grad_f_value<kN, Block<S>>(hpt, n, load_g), valid);
        if (grad_x) {
          for (int j = 0; j < n; ++j) {
            store_block(grad_x + (t * n + j) * C + c, stream_mix_grad_x_value<kN, Block<S>>(hrt, j, n, load_g),
                        valid);
          }
        }
        if (gh_post) {
          const Block<S> F = load_block<S>(f + t * C + c, valid);
          for (int i = 0; i < n; ++i) acc_post[i] = acc_post[i] + stream_coef_grad_term(G[i], F);
        }
        if (gh_res) {
          for (int j = 0; j < n; ++j) X[j] = load_block<S>(xt + j * C + c, valid);
          for (int i = 0; i < n; ++i) {
            for (int j = 0; j < n; ++j) acc_res[i * n + j] = acc_res[i * n + j] + stream_coef_grad_term(G[i], X[j]);
          }
        }
      }
      if (gh_post) {
        for (int i = 0; i < n; ++i) gh_post[t * n + i] = lane_sum(acc_post[i]);
      }
      if (gh_res) {
        for (int k = 0; k < n * n; ++k) gh_res[t * n * n + k] = lane_sum(acc_res[k]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Dispatch.

// Unrolled fast path for n = 4 (the mHC setting); run-time n in 8- or 32-sized storage.
template <typename Fn>
void dispatch_n(int n, Fn&& fn) {
  if (n == 4) return fn(std::integral_constant<int, 4>{}, std::integral_constant<int, 4>{});
  if (n <= 8) return fn(std::integral_constant<int, 0>{}, std::integral_constant<int, 8>{});
  return fn(std::integral_constant<int, 0>{}, std::integral_constant<int, kStreamsMaxN>{});
}

// Calls fn(T{}) with T the C++ type of the (checked, floating) stream dtype.
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kDouble: return fn(double{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, "hcext streams: unsupported dtype ", dtype);
  }
}

inline void finish_coef_grad(CoefGrad& g, const StreamsCoef& c, int64_t tokens, int64_t K) {
  if (!g.partial.defined() || !c.shared) return;
  if (g.out.scalar_type() == at::kDouble) {
    sum_over_tokens(g.partial.data_ptr<double>(), g.out.data_ptr<double>(), tokens, K);
  } else {
    sum_over_tokens(g.partial.data_ptr<float>(), g.out.data_ptr<float>(), tokens, K);
  }
}

at::Tensor stream_aggregate_cpu(const at::Tensor& x_in, const at::Tensor& h_pre_in) {
  const char* op = "hcext::stream_aggregate";
  const StreamsProblem p = check_streams_x(x_in, op);
  const StreamsCoef h = check_streams_coef(h_pre_in, "h_pre", 1, x_in, p, op);
  at::Tensor y = at::empty(streams_aggregate_shape(p), p.x.options());
  if (p.tokens == 0 || p.C == 0) return y;
  dispatch_dtype(p.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using S = ComputeOf<T>;
    dispatch_n(p.n, [&](auto kN, auto kMaxN) {
      aggregate_forward<decltype(kN)::value, decltype(kMaxN)::value>(
          p.x.data_ptr<T>(), h.h.data_ptr<S>(), h.token_stride, y.data_ptr<T>(), p.tokens, p.n, p.C);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> stream_aggregate_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                 const at::Tensor& h_pre_in,
                                                                 std::array<bool, 2> output_mask) {
  const char* op = "hcext::stream_aggregate_backward";
  const StreamsProblem p = check_streams_x(x_in, op);
  const StreamsCoef h = check_streams_coef(h_pre_in, "h_pre", 1, x_in, p, op);
  const at::Tensor gy = check_streams_grad(grad_in, streams_aggregate_shape(p), x_in, op);
  at::Tensor grad_x = output_mask[0] ? at::empty(x_in.sizes(), p.x.options()) : at::empty({0}, p.x.options());
  CoefGrad gh = make_coef_grad(output_mask[1], h, p.tokens, p.n);
  if (p.tokens == 0) {
    if (gh.partial.defined()) gh.out.zero_();  // a shared coefficient's gradient is 0
    return {grad_x, gh.out};
  }
  dispatch_dtype(p.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using S = ComputeOf<T>;
    dispatch_n(p.n, [&](auto kN, auto kMaxN) {
      aggregate_backward<decltype(kN)::value, decltype(kMaxN)::value>(
          gy.data_ptr<T>(), p.x.data_ptr<T>(), h.h.data_ptr<S>(), h.token_stride,
          output_mask[0] ? grad_x.data_ptr<T>() : nullptr, gh.rows<S>(), p.tokens, p.n, p.C);
    });
  });
  finish_coef_grad(gh, h, p.tokens, p.n);
  return {grad_x, gh.out};
}

at::Tensor stream_mix_expand_cpu(const at::Tensor& f_in, const at::Tensor& x_in, const at::Tensor& h_post_in,
                                 const at::Tensor& h_res_in) {
  const char* op = "hcext::stream_mix_expand";
  const StreamsProblem p = check_streams_x(x_in, op);
  const at::Tensor f = check_streams_f(f_in, x_in, p, op);
  const StreamsCoef hp = check_streams_coef(h_post_in, "h_post", 1, x_in, p, op);
  const StreamsCoef hr = check_streams_coef(h_res_in, "h_res", 2, x_in, p, op);
  at::Tensor out = at::empty(x_in.sizes(), p.x.options());
  if (p.tokens == 0 || p.C == 0) return out;
  dispatch_dtype(p.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using S = ComputeOf<T>;
    dispatch_n(p.n, [&](auto kN, auto kMaxN) {
      mix_forward<decltype(kN)::value, decltype(kMaxN)::value>(f.data_ptr<T>(), p.x.data_ptr<T>(),
                                                               hp.h.data_ptr<S>(), hp.token_stride,
                                                               hr.h.data_ptr<S>(), hr.token_stride, out.data_ptr<T>(),
                                                               p.tokens, p.n, p.C);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_mix_expand_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& f_in, const at::Tensor& x_in, const at::Tensor& h_post_in,
    const at::Tensor& h_res_in, std::array<bool, 4> output_mask) {
  const char* op = "hcext::stream_mix_expand_backward";
  const StreamsProblem p = check_streams_x(x_in, op);
  const at::Tensor f = check_streams_f(f_in, x_in, p, op);
  const StreamsCoef hp = check_streams_coef(h_post_in, "h_post", 1, x_in, p, op);
  const StreamsCoef hr = check_streams_coef(h_res_in, "h_res", 2, x_in, p, op);
  const at::Tensor g = check_streams_grad(grad_in, x_in.sizes(), x_in, op);
  const auto xo = p.x.options();
  at::Tensor grad_f = output_mask[0] ? at::empty(f_in.sizes(), xo) : at::empty({0}, xo);
  at::Tensor grad_x = output_mask[1] ? at::empty(x_in.sizes(), xo) : at::empty({0}, xo);
  const int64_t nn = int64_t(p.n) * p.n;
  CoefGrad ghp = make_coef_grad(output_mask[2], hp, p.tokens, p.n);
  CoefGrad ghr = make_coef_grad(output_mask[3], hr, p.tokens, nn);
  if (p.tokens == 0) {
    if (ghp.partial.defined()) ghp.out.zero_();
    if (ghr.partial.defined()) ghr.out.zero_();
    return {grad_f, grad_x, ghp.out, ghr.out};
  }
  dispatch_dtype(p.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using S = ComputeOf<T>;
    dispatch_n(p.n, [&](auto kN, auto kMaxN) {
      mix_backward<decltype(kN)::value, decltype(kMaxN)::value>(
          g.data_ptr<T>(), f.data_ptr<T>(), p.x.data_ptr<T>(), hp.h.data_ptr<S>(), hp.token_stride,
          hr.h.data_ptr<S>(), hr.token_stride, output_mask[0] ? grad_f.data_ptr<T>() : nullptr,
          output_mask[1] ? grad_x.data_ptr<T>() : nullptr, ghp.rows<S>(), ghr.rows<S>(), p.tokens, p.n, p.C);
    });
  });
  finish_coef_grad(ghp, hp, p.tokens, p.n);
  finish_coef_grad(ghr, hr, p.tokens, nn);
  return {grad_f, grad_x, ghp.out, ghr.out};
}

}  // namespace

TORCH_LIBRARY_IMPL(hcext, CPU, m) {
  m.impl("stream_aggregate", &stream_aggregate_cpu);
  m.impl("stream_aggregate_backward", &stream_aggregate_backward_cpu);
  m.impl("stream_mix_expand", &stream_mix_expand_cpu);
  m.impl("stream_mix_expand_backward", &stream_mix_expand_backward_cpu);
}

}  // namespace hcext
