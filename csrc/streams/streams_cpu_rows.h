#pragma once
// Per-token row kernels of the streams family's CPU backend (inlined into each ISA variant of
// streams_cpu.cpp, common/cpu_isa.h), and the entry another family's pass calls to run the mix
// kernel on its own rows: the mHC boundary's projection pass (mhc_cpu_passes.cpp) writes the mix
// of each token with it, so that its x_next is bitwise the unfused stream_mix_expand's.

#include <cstdint>

#include "common/cpu_vec_io.h"
#include "hcext/lanes.h"
#include "hcext/streams.h"

namespace hcext::cpu {

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

// out = mix(f, x, h_post, h_res) over the tokens [t0, t1). stream: streaming stores for whole
// blocks (use_stream_stores), fenced before returning.
template <int kN, int kMaxN, typename T, typename S>
[[gnu::always_inline]] inline void mix_forward_range(const T* f, const T* x, const S* hp, int64_t hp_stride,
                                                     const S* hr, int64_t hr_stride, T* out, int64_t t0, int64_t t1,
                                                     int n_rt, int64_t C, bool stream) {
  using B = Lanes<S, kVecIoWidth>;
  const int n = kN > 0 ? kN : n_rt;
  B X[kMaxN];
  for (int64_t t = t0; t < t1; ++t) {
    const T* xt = x + t * n * C;
    const LocalCoefs<kN, kMaxN, S> hpt(hp + t * hp_stride, n);
    const LocalCoefs<kN, kMaxN * kMaxN, S> hrt(hr + t * hr_stride, n * n);
    T* ot = out + t * n * C;
    for_channel_blocks(C, [&](int64_t c, auto valid) __attribute__((always_inline)) {
      for (int j = 0; j < n; ++j) X[j] = load_block<S>(xt + j * C + c, valid);
      const B F = load_block<S>(f + t * C + c, valid);
      for (int i = 0; i < n; ++i) {
        const B o = stream_mix_value<kN, B>(hrt.v + i * n, hpt.v[i], F, n,
                                            [&](int j) __attribute__((always_inline)) { return X[j]; });
        store_out(ot + i * C + c, o, valid, stream);
      }
    });
  }
  if (stream) stream_fence();
}

// stream_mix_expand's CPU kernel itself (streams_cpu.cpp, the instruction set chosen at run time)
// on the tokens [t0, t1), on the calling thread, with ordinary stores. The mHC boundary's
// projection pass writes each row of x_next with it: the same compiled code as the unfused op,
// so the same bits (a copy of mix_forward_range inlined into another function may be
// contracted into FMAs differently: measured with AVX2, n = 1 and 6).
template <typename T, typename S>
void mix_forward_tokens(const T* f, const T* x, const S* hp, int64_t hp_stride, const S* hr, int64_t hr_stride,
                        T* out, int64_t t0, int64_t t1, int n, int64_t C);

}  // namespace hcext::cpu
