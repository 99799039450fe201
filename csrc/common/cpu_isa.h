#pragma once
// Run-time choice of the x86 instruction set for hcext's CPU kernels.
//
// The library is compiled for baseline x86-64 (no -march flags: one binary runs
// everywhere). Hot kernels are compiled a second and third time for AVX2 and AVX-512 by
// putting HCEXT_TARGET_AVX2 / HCEXT_TARGET_AVX512 on a small entry function that the
// kernel templates get inlined into; dispatch_isa(baseline, avx2, avx512, fn) calls fn
// with the best variant this CPU supports. HCEXT_CPU_ISA=baseline|avx2 asks for a lower
// one (tests and benchmarks); an unknown value, or one above what the CPU has, is ignored.
//
// Kernels that must give bit-identical results on every ISA are compiled with
// `#pragma GCC optimize("fp-contract=off")`: g++ would otherwise fuse a * b + c into one
// FMA wherever the target has FMA, rounding differently from the baseline.

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define HCEXT_CPU_DISPATCH 1
#define HCEXT_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#define HCEXT_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,popcnt")))
#else
#define HCEXT_TARGET_AVX2
#define HCEXT_TARGET_AVX512
#endif

namespace hcext::cpu {

enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuIsa best_supported_isa() {
#ifdef HCEXT_CPU_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq")) {
    return CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

// The best supported ISA, lowered by HCEXT_CPU_ISA (read on every call, so that tests can
// switch it).
inline CpuIsa cpu_isa() {
  static const CpuIsa best = best_supported_isa();
  CpuIsa want = best;
  if (const char* env = std::getenv("HCEXT_CPU_ISA")) {
    if (!std::strcmp(env, "baseline")) want = CpuIsa::kBaseline;
    if (!std::strcmp(env, "avx2")) want = CpuIsa::kAvx2;
  }
  return std::min(want, best);
}

// fn(Baseline{}), fn(Avx2{}) or fn(Avx512{}): structs whose static members carry the
// matching HCEXT_TARGET_* attribute.
template <class Baseline, class Avx2, class Avx512, typename Fn>
void dispatch_isa(Fn&& fn) {
  switch (cpu_isa()) {
#ifdef HCEXT_CPU_DISPATCH
    case CpuIsa::kAvx512: return fn(Avx512{});
    case CpuIsa::kAvx2: return fn(Avx2{});
#endif
    default: return fn(Baseline{});
  }
}

}  // namespace hcext::cpu
