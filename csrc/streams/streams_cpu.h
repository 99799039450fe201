#pragma once
// The CPU backend of the streams family (see streams_driver.h for the interface): the
// passes are defined, and instantiated for every (stream, compute) type pair, in
// streams_cpu.cpp. Declared here because the mHC CPU backend composes it.

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common/checks.h"

namespace hcext {

struct CpuStreamsBackend {
  explicit CpuStreamsBackend(const at::Tensor&) {}

  // fn(T{}, S{}): T = float, double, c10::BFloat16 or c10::Half; S the compute type.
  template <typename Fn>
  static void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
    dispatch_stream_dtype<c10::BFloat16, c10::Half>(dtype, fn);
  }
  // fn(T{}) for the stream dtypes computed in S (the passes that already chose S).
  template <typename S, typename Fn>
  static void dispatch_dtype_for(at::ScalarType dtype, Fn&& fn) {
    dispatch_stream_dtype_for<S, c10::BFloat16, c10::Half>(dtype, fn);
  }

  template <typename T, typename S>
  void aggregate_forward(const T* x, const S* h, int64_t h_stride, T* y, int64_t tokens, int n, int64_t C);
  template <typename T, typename S>
  void aggregate_backward(const T* gy, const T* x, const S* h, int64_t h_stride, T* grad_x, S* gh_rows,
                          int64_t tokens, int n, int64_t C);
  template <typename T, typename S>
  void mix_forward(const T* f, const T* x, const S* hp, int64_t hp_stride, const S* hr, int64_t hr_stride, T* out,
                   int64_t tokens, int n, int64_t C);
  template <typename T, typename S>
  void mix_backward(const T* g, const T* f, const T* x, const S* hp, int64_t hp_stride, const S* hr,
                    int64_t hr_stride, T* grad_f, T* grad_x, S* ghp_rows, S* ghr_rows, int64_t tokens, int n,
                    int64_t C);
  template <typename S>
  void sum_over_tokens(const S* partials, S* out, int64_t tokens, int64_t K);

  // mix_backward's kernel on the calling thread, for the rows [0, tokens) of pointers already
  // at the first of them (the mHC boundary's backward pass runs it on each block of x_next's
  // gradient it has just computed). stream: mix_backward_streams of the whole outputs.
  template <typename T, typename S>
  static void mix_backward_rows(const T* g, const T* f, const T* x, const S* hp, int64_t hp_stride, const S* hr,
                                int64_t hr_stride, T* grad_f, T* grad_x, S* ghp_rows, S* ghr_rows, int64_t tokens,
                                int n, int64_t C, bool stream);
  // Whether mix_backward streams its stores, for the whole grad_f [tokens, C] and grad_x
  // [tokens, n, C] (nullable).
  template <typename T>
  static bool mix_backward_streams(const T* grad_f, const T* grad_x, int64_t tokens, int n, int64_t C);
};

}  // namespace hcext
