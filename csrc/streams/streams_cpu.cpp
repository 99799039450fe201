// The CPU backend of the streams family (declared in streams_cpu.h; the sequence around
// it is streams_driver.h): kernels of hcext::stream_aggregate, hcext::stream_mix_expand,
// their backward ops and mhc_post_pre's first pass.
// at::parallel_for splits the tokens. Within a token, the channels are processed kW at a
// time as hcext::Lanes<S, kW> (a GCC vector: fp16/bf16 widened to fp32 on load), running
// the shared math of hcext/streams.h. Stack arrays only: no allocation per token.
//
// Instruction set (common/cpu_isa.h): the kernels are compiled for baseline x86-64, AVX2 and
// AVX-512 and the best is picked at run time. g++ contracts a * b + c into FMAs where the
// ISA has them (AVX2, AVX-512; as nvcc does on the GPU): the variants can differ in the
// last bit of the fp32 accumulation. These kernels are memory-bound once vectorised: fp32 and bf16
// rows move as whole vectors (bf16 <-> fp32 with integer vector shifts and
// round-to-nearest-even, as c10::BFloat16 does); fp16 converts per lane.
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
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_vec_io.h"
#include "hcext/dispatch.h"
#include "hcext/lanes.h"
#include "hcext/mhc.h"
#include "hcext/streams.h"
#include "streams/streams_cpu.h"
#include "streams/streams_cpu_rows.h"
#include "streams/streams_driver.h"

namespace hcext {
namespace {

// Channels per block: 16 floats = one AVX-512 register (two AVX2, four SSE ones).
constexpr int kW = cpu::kVecIoWidth;

template <typename S>
using Block = Lanes<S, kW>;

using cpu::load_block;
using cpu::store_block;
using cpu::store_out;

using cpu::for_channel_blocks;
using cpu::lane_sum;


// out[k] = sum_t partials[t, k], in a fixed order: fixed blocks of kRows tokens are summed
// (in parallel), then the block sums are summed in block order.
template <typename S>
void sum_rows_fixed_order(const S* partials, S* out, int64_t tokens, int64_t K) {
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
// Kernels over the tokens [t0, t1). kN > 0: compile-time n; kN == 0: run-time n <= kMaxN.


// A token's coefficients, copied to the stack: the compiler keeps them in registers
// (through the output pointers they could otherwise alias, and be reloaded every block).
template <int kN, int kCount, typename S>
struct LocalCoefs {
  S v[kCount];
  [[gnu::always_inline]] LocalCoefs(const S* src, int count) {
    const int m = kN > 0 ? kCount : count;
    for (int k = 0; k < m; ++k) v[k] = src[k];
  }
};

template <int kN, int kMaxN, typename T, typename S>
[[gnu::always_inline]] inline void aggregate_forward_range(const T* x, const S* h, int64_t h_stride, T* y, int64_t t0,
                                                           int64_t t1, int n_rt, int64_t C, bool stream) {
  const int n = kN > 0 ? kN : n_rt;
  for (int64_t t = t0; t < t1; ++t) {
    const T* xt = x + t * n * C;
    const LocalCoefs<kN, kMaxN, S> ht(h + t * h_stride, n);
    for_channel_blocks(C, [&](int64_t c, auto valid) __attribute__((always_inline)) {
      const Block<S> yv = stream_aggregate_value<kN, Block<S>>(
          ht.v, n, [&](int i) __attribute__((always_inline)) { return load_block<S>(xt + i * C + c, valid); });
      store_out(y + t * C + c, yv, valid, stream);
    });
  }
  if (stream) cpu::stream_fence();
}

// grad_x (nullable) and the per-token grad_h_pre rows gh (nullable, [tokens, n]).
template <int kN, int kMaxN, typename T, typename S>
[[gnu::always_inline]] inline void aggregate_backward_range(const T* gy, const T* x, const S* h, int64_t h_stride,
                                                            T* grad_x, S* gh, int64_t t0, int64_t t1, int n_rt,
                                                            int64_t C, bool stream) {
  const int n = kN > 0 ? kN : n_rt;
  Block<S> acc[kMaxN];
  for (int64_t t = t0; t < t1; ++t) {
    const T* xt = x + t * n * C;
    const LocalCoefs<kN, kMaxN, S> ht(h + t * h_stride, n);
    for (int i = 0; i < n; ++i) acc[i] = Block<S>(S(0));
    for_channel_blocks(C, [&](int64_t c, auto valid) __attribute__((always_inline)) {
      const Block<S> g = load_block<S>(gy + t * C + c, valid);
      if (grad_x) {
        for (int i = 0; i < n; ++i) {
          store_out(grad_x + (t * n + i) * C + c, stream_aggregate_grad_x_value(ht.v[i], g), valid, stream);
        }
      }
      if (gh) {
        for (int i = 0; i < n; ++i) acc[i] = acc[i] + stream_coef_grad_term(g, load_block<S>(xt + i * C + c, valid));
      }
    });
    if (gh) {
      for (int i = 0; i < n; ++i) gh[t * n + i] = lane_sum(acc[i]);
    }
  }
  if (stream) cpu::stream_fence();
}

// out = mix(f, x, h_post, h_res) over the tokens [t0, t1). stream: streaming stores for whole
// blocks (use_stream_stores), fenced before returning.
template <int kN, int kMaxN, typename T, typename S>
[[gnu::always_inline]] inline void mix_forward_range(const T* f, const T* x, const S* hp, int64_t hp_stride,
                                                     const S* hr, int64_t hr_stride, T* out, int64_t t0, int64_t t1,
                                                     int n_rt, int64_t C, bool stream) {
  const int n = kN > 0 ? kN : n_rt;
  Block<S> X[kMaxN];
  for (int64_t t = t0; t < t1; ++t) {
    const T* xt = x + t * n * C;
    const LocalCoefs<kN, kMaxN, S> hpt(hp + t * hp_stride, n);
    const LocalCoefs<kN, kMaxN * kMaxN, S> hrt(hr + t * hr_stride, n * n);
    T* ot = out + t * n * C;
    for_channel_blocks(C, [&](int64_t c, auto valid) __attribute__((always_inline)) {
      for (int j = 0; j < n; ++j) X[j] = load_block<S>(xt + j * C + c, valid);
      const Block<S> F = load_block<S>(f + t * C + c, valid);
      for (int i = 0; i < n; ++i) {
        const Block<S> o = stream_mix_value<kN, Block<S>>(hrt.v + i * n, hpt.v[i], F, n,
                                                          [&](int j) __attribute__((always_inline)) { return X[j]; });
        store_out(ot + i * C + c, o, valid, stream);
      }
    });
  }
  if (stream) cpu::stream_fence();
}

// Every output pointer is nullable (not requested). gh_post: [tokens, n] rows, gh_res:
// [tokens, n, n] rows of per-token coefficient gradients.
template <int kN, int kMaxN, typename T, typename S>
[[gnu::always_inline]] inline void mix_backward_range(const T* g, const T* f, const T* x, const S* hp,
                                                      int64_t hp_stride, const S* hr, int64_t hr_stride, T* grad_f,
                                                      T* grad_x, S* gh_post, S* gh_res, int64_t t0, int64_t t1,
                                                      int n_rt, int64_t C, bool stream) {
  const int n = kN > 0 ? kN : n_rt;
  Block<S> G[kMaxN];
  Block<S> acc_post[kMaxN];
  Block<S> acc_res[kMaxN * kMaxN];
  for (int64_t t = t0; t < t1; ++t) {
    const T* gt = g + t * n * C;
    const T* xt = x + t * n * C;
    const LocalCoefs<kN, kMaxN, S> hpt(hp + t * hp_stride, n);
    const LocalCoefs<kN, kMaxN * kMaxN, S> hrt(hr + t * hr_stride, n * n);
    for (int i = 0; i < n; ++i) acc_post[i] = Block<S>(S(0));
    for (int k = 0; k < n * n; ++k) acc_res[k] = Block<S>(S(0));
    for_channel_blocks(C, [&](int64_t c, auto valid) __attribute__((always_inline)) {
      for (int i = 0; i < n; ++i) G[i] = load_block<S>(gt + i * C + c, valid);
      auto load_g = [&](int i) __attribute__((always_inline)) { return G[i]; };
      if (grad_f) store_out(grad_f + t * C + c, stream_mix_grad_f_value<kN, Block<S>>(hpt.v, n, load_g), valid, stream);
      if (grad_x) {
        for (int j = 0; j < n; ++j) {
          store_out(grad_x + (t * n + j) * C + c, stream_mix_grad_x_value<kN, Block<S>>(hrt.v, j, n, load_g),
                    valid, stream);
        }
      }
      if (gh_post) {
        const Block<S> F = load_block<S>(f + t * C + c, valid);
        for (int i = 0; i < n; ++i) acc_post[i] = acc_post[i] + stream_coef_grad_term(G[i], F);
      }
      if (gh_res) {
        for (int j = 0; j < n; ++j) {
          const Block<S> X = load_block<S>(xt + j * C + c, valid);
          for (int i = 0; i < n; ++i) acc_res[i * n + j] = acc_res[i * n + j] + stream_coef_grad_term(G[i], X);
        }
      }
    });
    if (gh_post) {
      for (int i = 0; i < n; ++i) gh_post[t * n + i] = lane_sum(acc_post[i]);
    }
    if (gh_res) {
      for (int k = 0; k < n * n; ++k) gh_res[t * n * n + k] = lane_sum(acc_res[k]);
    }
  }
  if (stream) cpu::stream_fence();
}

// One set of kernels per instruction set (common/cpu_isa.h).
#define HCEXT_STREAMS_KERNELS(Name, ...)                                                        \
  struct Name {                                                                                 \
    template <int kN, int kMaxN, typename... A>                                                 \
    __VA_ARGS__ static void aggregate_forward(A... a) { aggregate_forward_range<kN, kMaxN>(a...); }   \
    template <int kN, int kMaxN, typename... A>                                                 \
    __VA_ARGS__ static void aggregate_backward(A... a) { aggregate_backward_range<kN, kMaxN>(a...); } \
    template <int kN, int kMaxN, typename... A>                                                 \
    __VA_ARGS__ static void mix_forward(A... a) { mix_forward_range<kN, kMaxN>(a...); }               \
    template <int kN, int kMaxN, typename... A>                                                 \
    __VA_ARGS__ static void mix_backward(A... a) { mix_backward_range<kN, kMaxN>(a...); }             \
  };
HCEXT_STREAMS_KERNELS(BaselineKernels)
HCEXT_STREAMS_KERNELS(Avx2Kernels, HCEXT_TARGET_AVX2)
HCEXT_STREAMS_KERNELS(Avx512Kernels, HCEXT_TARGET_AVX512)
#undef HCEXT_STREAMS_KERNELS

// ---------------------------------------------------------------------------------------
// Dispatch.

// fn(kernels, kN, kMaxN): the ISA's kernel set and the library's n dispatch (hcext/dispatch.h).
template <typename Fn>
void dispatch_kernels(int n, Fn&& fn) {
  cpu::dispatch_isa<BaselineKernels, Avx2Kernels, Avx512Kernels>([&](auto k) {
    dispatch_n(n, [&]<int kN, int kMaxN>() {
      fn(k, std::integral_constant<int, kN>{}, std::integral_constant<int, kMaxN>{});
    });
  });
}

// Runs kernel(t0, t1) over the tokens, split by at::parallel_for.
template <typename Kernel>
void for_tokens(int64_t tokens, int n, int64_t C, Kernel&& kernel) {
  at::parallel_for(0, tokens, cpu::row_grain(int64_t(n) * C), [&](int64_t t0, int64_t t1) { kernel(t0, t1); });
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The backend (streams_cpu.h).

template <typename T, typename S>
void cpu::mix_forward_tokens(const T* f, const T* x, const S* hp, int64_t hp_stride, const S* hr, int64_t hr_stride,
                             T* out, int64_t t0, int64_t t1, int n, int64_t C) {
  dispatch_kernels(n, [&](auto k, auto kN, auto kMaxN) {
    decltype(k)::template mix_forward<decltype(kN)::value, decltype(kMaxN)::value>(f, x, hp, hp_stride, hr, hr_stride,
                                                                                 out, t0, t1, n, C, false);
  });
}

template <typename T, typename S>
void CpuStreamsBackend::aggregate_forward(const T* x, const S* h, int64_t h_stride, T* y, int64_t tokens, int n,
                                          int64_t C) {
  const bool stream = cpu::use_stream_stores(y, tokens * C * int64_t(sizeof(T)), C * int64_t(sizeof(T)));
  dispatch_kernels(n, [&](auto k, auto kN, auto kMaxN) {
    for_tokens(tokens, n, C, [&](int64_t t0, int64_t t1) {
      decltype(k)::template aggregate_forward<decltype(kN)::value, decltype(kMaxN)::value>(x, h, h_stride, y, t0, t1, n, C, stream);
    });
  });
}

template <typename T, typename S>
void CpuStreamsBackend::aggregate_backward(const T* gy, const T* x, const S* h, int64_t h_stride, T* grad_x,
                                           S* gh_rows, int64_t tokens, int n, int64_t C) {
  const bool stream = grad_x && cpu::use_stream_stores(grad_x, tokens * n * C * int64_t(sizeof(T)), C * int64_t(sizeof(T)));
  dispatch_kernels(n, [&](auto k, auto kN, auto kMaxN) {
    for_tokens(tokens, n, C, [&](int64_t t0, int64_t t1) {
      decltype(k)::template aggregate_backward<decltype(kN)::value, decltype(kMaxN)::value>(gy, x, h, h_stride, grad_x, gh_rows, t0, t1, n, C, stream);
    });
  });
}

template <typename T, typename S>
void CpuStreamsBackend::mix_forward(const T* f, const T* x, const S* hp, int64_t hp_stride, const S* hr,
                                    int64_t hr_stride, T* out, int64_t tokens, int n, int64_t C) {
  const bool stream = cpu::use_stream_stores(out, tokens * n * C * int64_t(sizeof(T)), C * int64_t(sizeof(T)));
  dispatch_kernels(n, [&](auto k, auto kN, auto kMaxN) {
    for_tokens(tokens, n, C, [&](int64_t t0, int64_t t1) {
      decltype(k)::template mix_forward<decltype(kN)::value, decltype(kMaxN)::value>(f, x, hp, hp_stride, hr, hr_stride, out, t0, t1, n, C, stream);
    });
  });
}

template <typename T, typename S>
void CpuStreamsBackend::mix_backward(const T* g, const T* f, const T* x, const S* hp, int64_t hp_stride, const S* hr,
                                     int64_t hr_stride, T* grad_f, T* grad_x, S* ghp_rows, S* ghr_rows,
                                     int64_t tokens, int n, int64_t C) {
  const bool stream = mix_backward_streams(grad_f, grad_x, tokens, n, C);
  dispatch_kernels(n, [&](auto k, auto kN, auto kMaxN) {
    for_tokens(tokens, n, C, [&](int64_t t0, int64_t t1) {
      decltype(k)::template mix_backward<decltype(kN)::value, decltype(kMaxN)::value>(g, f, x, hp, hp_stride, hr, hr_stride, grad_f, grad_x,
                                                        ghp_rows, ghr_rows, t0, t1, n, C, stream);
    });
  });
}

template <typename T, typename S>
void CpuStreamsBackend::mix_backward_rows(const T* g, const T* f, const T* x, const S* hp, int64_t hp_stride,
                                          const S* hr, int64_t hr_stride, T* grad_f, T* grad_x, S* ghp_rows,
                                          S* ghr_rows, int64_t tokens, int n, int64_t C, bool stream) {
  dispatch_kernels(n, [&](auto k, auto kN, auto kMaxN) {
    decltype(k)::template mix_backward<decltype(kN)::value, decltype(kMaxN)::value>(
        g, f, x, hp, hp_stride, hr, hr_stride, grad_f, grad_x, ghp_rows, ghr_rows, int64_t(0), tokens, n, C, stream);
  });
}

template <typename T>
bool CpuStreamsBackend::mix_backward_streams(const T* grad_f, const T* grad_x, int64_t tokens, int n, int64_t C) {
  // grad_x decides (grad_f, n times smaller, follows it when both are aligned).
  const int64_t row = C * int64_t(sizeof(T));
  return grad_x && cpu::use_stream_stores(grad_x, tokens * n * row, row) &&
         (!grad_f || cpu::use_stream_stores(grad_f, cpu::kStreamStoreMinBytes, row));
}

template <typename S>
void CpuStreamsBackend::sum_over_tokens(const S* partials, S* out, int64_t tokens, int64_t K) {
  sum_rows_fixed_order(partials, out, tokens, K);
}

#define HCEXT_INSTANTIATE_CPU_STREAMS(T, S)                                                                        \
  template void CpuStreamsBackend::aggregate_forward<T, S>(const T*, const S*, int64_t, T*, int64_t, int, int64_t); \
  template void CpuStreamsBackend::aggregate_backward<T, S>(const T*, const T*, const S*, int64_t, T*, S*, int64_t,  \
                                                            int, int64_t);                                          \
  template void CpuStreamsBackend::mix_forward<T, S>(const T*, const T*, const S*, int64_t, const S*, int64_t, T*,   \
                                                     int64_t, int, int64_t);                                        \
  template void CpuStreamsBackend::mix_backward<T, S>(const T*, const T*, const T*, const S*, int64_t, const S*,   \
                                                      int64_t, T*, T*, S*, S*, int64_t, int, int64_t);             \
  template void CpuStreamsBackend::mix_backward_rows<T, S>(const T*, const T*, const T*, const S*, int64_t,        \
                                                           const S*, int64_t, T*, T*, S*, S*, int64_t, int, int64_t, \
                                                           bool);                                                  \
  template bool CpuStreamsBackend::mix_backward_streams<T>(const T*, const T*, int64_t, int, int64_t);             \
  template void cpu::mix_forward_tokens<T, S>(const T*, const T*, const S*, int64_t, const S*, int64_t, T*, int64_t, \
                                              int64_t, int, int64_t);
HCEXT_INSTANTIATE_CPU_STREAMS(float, float)
HCEXT_INSTANTIATE_CPU_STREAMS(double, double)
HCEXT_INSTANTIATE_CPU_STREAMS(c10::BFloat16, float)
HCEXT_INSTANTIATE_CPU_STREAMS(c10::Half, float)
#undef HCEXT_INSTANTIATE_CPU_STREAMS
template void CpuStreamsBackend::sum_over_tokens<float>(const float*, float*, int64_t, int64_t);
template void CpuStreamsBackend::sum_over_tokens<double>(const double*, double*, int64_t, int64_t);

TORCH_LIBRARY_IMPL(hcext, CPU, m) { register_streams_kernels<CpuStreamsBackend>(m); }

}  // namespace hcext
