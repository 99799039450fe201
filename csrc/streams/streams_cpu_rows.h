#pragma once
// The entry of the streams family's CPU mix kernel that another family's pass calls on its own
// rows, torch-free: the mHC boundary's projection pass (mhc_cpu_passes.cpp) writes the mix of
// each token with it, so that its x_next is bitwise the unfused stream_mix_expand's.

#include <cstdint>

namespace hcext::cpu {

// stream_mix_expand's CPU kernel itself (streams_cpu.cpp, the instruction set chosen at run time)
// on the tokens [t0, t1), on the calling thread, with ordinary stores. The mHC boundary's
// projection pass writes each row of x_next with it: the same compiled code as the unfused op,
// so the same bits (a copy of the kernel inlined into another function may be
// contracted into FMAs differently: measured with AVX2, n = 1 and 6).
template <typename T, typename S>
void mix_forward_tokens(const T* f, const T* x, const S* hp, int64_t hp_stride, const S* hr, int64_t hr_stride,
                        T* out, int64_t t0, int64_t t1, int n, int64_t C);

}  // namespace hcext::cpu
