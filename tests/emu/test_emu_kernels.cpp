// The kernels with block- or warp-level synchronisation, launched directly (no torch) in the
// emulated grid under ThreadSanitizer. Each case runs under the in-order schedule and under
// shuffled ones (seeds 1..3: block order and thread interleaving) and checks:
//  - no data race: TSan sees each CUDA thread as a fiber that synchronises only at
//    __syncthreads, warp exchanges and the launch boundaries, so two threads touching the same
//    shared or global memory without one of those between them is a report (halt_on_error:
//    the test fails);
//  - no error from the emulator (launch limits, masks, alignment);
//  - bitwise identical outputs under every schedule (the kernels' fixed-order reductions);
//  - finite, non-trivial outputs.
// Values are checked against the reference by the Python suite (tests/emu/test_emu_parity.py).

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/cuda_utils.cuh"
#include "hc/hc_launch.h"
#include "hcext/hc.h"
#include "mhc/mhc_launch.h"
#include "streams/streams_launch.h"

namespace {

int g_failures = 0;

template <typename T>
std::vector<T> random_vec(size_t count, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<T> v(count);
  for (auto& e : v) e = T(dist(rng));
  return v;
}

template <typename T>
float as_float(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return float(v);
  }
}

// Runs `run` (which fills `outputs` from scratch) under schedules 0..3 and compares bytes.
void check_case(const std::string& name, const std::function<cudaError_t()>& run,
                const std::vector<std::pair<void*, size_t>>& outputs) {
  std::vector<std::vector<char>> first;
  for (uint64_t seed = 0; seed < 4; ++seed) {
    hcext_emu::set_schedule_seed(seed);
    for (auto& [p, bytes] : outputs) std::memset(p, 0xA5, bytes);  // poison: every output must be written
    const cudaError_t err = run();
    if (err != cudaSuccess) {
      std::printf("FAIL %s (seed %llu): %s\n", name.c_str(), (unsigned long long)seed, hcext_emu::last_error_message());
      ++g_failures;
      return;
    }
    std::vector<std::vector<char>> got;
    for (auto& [p, bytes] : outputs) got.emplace_back(static_cast<char*>(p), static_cast<char*>(p) + bytes);
    if (seed == 0) {
      first = got;
    } else if (got != first) {
      std::printf("FAIL %s: schedule %llu differs bitwise from the in-order schedule\n", name.c_str(),
                  (unsigned long long)seed);
      ++g_failures;
      return;
    }
  }
  hcext_emu::set_schedule_seed(0);
  std::printf("ok   %s\n", name.c_str());
}

template <typename S>
void expect_finite(const std::string& name, const std::vector<S>& v) {
  bool nonzero = false;
  for (const S& e : v) {
    const float f = as_float(e);
    if (!std::isfinite(f)) {
      std::printf("FAIL %s: non-finite output\n", name.c_str());
      ++g_failures;
      return;
    }
    nonzero |= f != 0.f;
  }
  if (!nonzero && !v.empty()) {
    std::printf("FAIL %s: all-zero output\n", name.c_str());
    ++g_failures;
  }
}

template <typename T, typename S>
void streams_cases(const char* dtype, int64_t tokens, int n, int64_t C, bool shared) {
  const std::string tag = std::string(dtype) + " T=" + std::to_string(tokens) + " n=" + std::to_string(n) +
                          " C=" + std::to_string(C) + (shared ? " shared" : " per-token");
  const size_t rows = size_t(tokens) * n * C, cols = size_t(tokens) * C;
  const auto x = random_vec<T>(rows, 1), f = random_vec<T>(cols, 2), gx = random_vec<T>(rows, 3),
             gy = random_vec<T>(cols, 4);
  const int64_t hp_stride = shared ? 0 : n, hr_stride = shared ? 0 : int64_t(n) * n;
  const auto h_pre = random_vec<S>(shared ? n : size_t(tokens) * n, 5, 0.f, 1.f);
  const auto h_post = random_vec<S>(shared ? n : size_t(tokens) * n, 6, 0.f, 2.f);
  const auto h_res = random_vec<S>(shared ? size_t(n) * n : size_t(tokens) * n * n, 7, 0.f, 1.f);

  std::vector<T> grad_x(rows), grad_f(cols);
  std::vector<S> gh_pre(size_t(tokens) * n), gh_post(size_t(tokens) * n), gh_res(size_t(tokens) * n * n),
      summed(size_t(n) * n);
  check_case("stream_aggregate_backward " + tag, [&] {
    return hcext::cuda::stream_aggregate_backward<T, S>(gy.data(), x.data(), h_pre.data(), hp_stride, grad_x.data(),
                                                        gh_pre.data(), tokens, n, C, nullptr);
  }, {{grad_x.data(), rows * sizeof(T)}, {gh_pre.data(), gh_pre.size() * sizeof(S)}});
  expect_finite("stream_aggregate_backward " + tag, gh_pre);
  check_case("stream_mix_expand_backward " + tag, [&] {
    return hcext::cuda::stream_mix_expand_backward<T, S>(gx.data(), f.data(), x.data(), h_post.data(), hp_stride,
                                                         h_res.data(), hr_stride, grad_f.data(), grad_x.data(),
                                                         gh_post.data(), gh_res.data(), tokens, n, C, nullptr);
  }, {{grad_f.data(), cols * sizeof(T)}, {grad_x.data(), rows * sizeof(T)},
      {gh_post.data(), gh_post.size() * sizeof(S)}, {gh_res.data(), gh_res.size() * sizeof(S)}});
  expect_finite("stream_mix_expand_backward " + tag, gh_res);
  check_case("sum_over_tokens " + tag, [&] {
    return hcext::cuda::sum_over_tokens<S>(gh_res.data(), summed.data(), tokens, int64_t(n) * n, nullptr);
  }, {{summed.data(), summed.size() * sizeof(S)}});
}

template <typename T>
void mhc_cases(hcext::StreamDtype xtype, const char* dtype, int64_t tokens, int n, int64_t C) {
  using X = T;  // fp32/fp64 streams here; the Python suite covers bf16/fp16 through the glue
  const std::string tag = std::string(dtype) + " T=" + std::to_string(tokens) + " n=" + std::to_string(n) +
                          " C=" + std::to_string(C);
  const int64_t len = int64_t(n) * C, D = int64_t(n) * n + 2 * n;
  const auto x = random_vec<X>(size_t(tokens) * len, 11), gy = random_vec<T>(size_t(tokens) * C, 12),
             dxp = random_vec<T>(size_t(tokens) * len, 13), proj = random_vec<T>(size_t(tokens) * D, 14),
             drstd = random_vec<T>(tokens, 15), gpre = random_vec<T>(size_t(tokens) * n, 16);
  const auto alpha = random_vec<T>(3, 17, 0.5f, 1.f), bias = random_vec<T>(D, 18);
  std::vector<T> xf(size_t(tokens) * len), rstd(tokens), gpre_out(size_t(tokens) * n);
  std::vector<X> dx(size_t(tokens) * len);
  check_case("mhc_rows " + tag, [&] {
    return hcext::cuda::mhc_rows<T>(x.data(), xtype, xf.data(), rstd.data(), tokens, len, T(1e-6), nullptr);
  }, {{xf.data(), xf.size() * sizeof(T)}, {rstd.data(), rstd.size() * sizeof(T)}});
  expect_finite("mhc_rows " + tag, rstd);
  check_case("mhc_layer_input_grad " + tag, [&] {
    return hcext::cuda::mhc_layer_input_grad<T>(x.data(), xtype, gy.data(), gpre.data(), gpre_out.data(), tokens, n,
                                                C, nullptr);
  }, {{gpre_out.data(), gpre_out.size() * sizeof(T)}});
  expect_finite("mhc_layer_input_grad " + tag, gpre_out);
  check_case("mhc_grad_x " + tag, [&] {
    return hcext::cuda::mhc_grad_x<T>(xf.data(), dxp.data(), proj.data(), rstd.data(), drstd.data(), gy.data(),
                                      nullptr, 0, alpha.data(), bias.data(), T(1e-6), nullptr, dx.data(), xtype,
                                      tokens, n, C, D, nullptr);
  }, {{dx.data(), dx.size() * sizeof(X)}});
  expect_finite("mhc_grad_x " + tag, dx);
  if (D <= hcext::cuda::kMhcFusedMaxD) {
    const auto phi = random_vec<T>(size_t(len) * D, 19);
    std::vector<T> proj2(size_t(tokens) * D), rstd2(tokens), grad_phi(size_t(len) * D);
    // The grad_x pass with the fused boundary's mix backward and the shifted row sums.
    const auto f = random_vec<X>(size_t(tokens) * C, 20), xprev = random_vec<X>(size_t(tokens) * len, 23),
               hp = random_vec<T>(size_t(tokens) * n, 24), hr = random_vec<T>(size_t(tokens) * n * n, 25);
    std::vector<X> grad_f(size_t(tokens) * C), grad_xprev(size_t(tokens) * len);
    std::vector<T> ghp(size_t(tokens) * n), ghr(size_t(tokens) * n * n), gy_rows(size_t(tokens) * n);
    const hcext::cuda::MhcMixInputs<T> mix_prev{f.data(), xprev.data(), hp.data(), n, hr.data(), int64_t(n) * n};
    const hcext::cuda::MhcMixInputs<T> mix_x{f.data(), x.data(), hp.data(), n, hr.data(), int64_t(n) * n};
    hcext::cuda::MhcGradRows<T> rows;
    rows.mix = mix_prev;
    rows.grad_f = grad_f.data();
    rows.grad_x = grad_xprev.data();
    rows.grad_h_post = ghp.data();
    rows.grad_h_res = ghr.data();
    rows.gy_rows = gy_rows.data();
    std::vector<T> ws(std::max({hcext::cuda::mhc_project_workspace(tokens, C, int(D), xtype),
                                hcext::cuda::mhc_grad_x_phi_workspace<T>(tokens, n, C, int(D), {}),
                                hcext::cuda::mhc_grad_x_phi_workspace<T>(tokens, n, C, int(D), rows)}));
    check_case("mhc_project " + tag, [&] {
      return hcext::cuda::mhc_project<T>(const_cast<X*>(x.data()), xtype, {}, nullptr, 0, nullptr, phi.data(),
                                         ws.data(), proj2.data(), rstd2.data(), tokens, n, C, int(D), T(1e-6),
                                         nullptr);
    }, {{proj2.data(), proj2.size() * sizeof(T)}, {rstd2.data(), rstd2.size() * sizeof(T)}});
    expect_finite("mhc_project " + tag, proj2);
    // The boundary's mix and the shifted collapse in the same pass.
    std::vector<X> x_next(size_t(tokens) * len), layer_input(size_t(tokens) * C);
    check_case("mhc_project mix+collapse " + tag, [&] {
      return hcext::cuda::mhc_project<T>(x_next.data(), xtype, mix_x, hp.data(), n, layer_input.data(), phi.data(),
                                         ws.data(), proj2.data(), rstd2.data(), tokens, n, C, int(D), T(1e-6),
                                         nullptr);
    }, {{proj2.data(), proj2.size() * sizeof(T)}, {rstd2.data(), rstd2.size() * sizeof(T)},
        {x_next.data(), x_next.size() * sizeof(X)}, {layer_input.data(), layer_input.size() * sizeof(X)}});
    expect_finite("mhc_project mix+collapse " + tag, layer_input);
    // The resident projection (rows in dynamic shared memory), with and without the boundary's mix.
    if (hcext::cuda::mhc_project_resident(n, C, int(D), xtype, 0)) {
      for (const bool mix : {false, true}) {
        check_case(std::string("mhc_project_aggregate") + (mix ? " mix " : " ") + tag, [&] {
          return hcext::cuda::mhc_project_aggregate<T>(
              mix ? x_next.data() : const_cast<X*>(x.data()), xtype, mix ? mix_x : hcext::cuda::MhcMixInputs<T>{},
              phi.data(), alpha.data(), bias.data(), T(1e-6), proj2.data(), rstd2.data(), layer_input.data(), tokens,
              n, C, int(D), T(1e-6), nullptr);
        }, {{proj2.data(), proj2.size() * sizeof(T)}, {rstd2.data(), rstd2.size() * sizeof(T)},
            {layer_input.data(), layer_input.size() * sizeof(X)}});
        expect_finite("mhc_project_aggregate " + tag, layer_input);
      }
    }
    check_case("mhc_grad_x_phi " + tag, [&] {
      return hcext::cuda::mhc_grad_x_phi<T>(x.data(), xtype, phi.data(), proj.data(), proj.data(), rstd.data(),
                                            drstd.data(), gy.data(), nullptr, 0, alpha.data(), bias.data(), T(1e-6),
                                            nullptr, dx.data(), {}, ws.data(), grad_phi.data(), tokens, n, C,
                                            int(D), nullptr);
    }, {{dx.data(), dx.size() * sizeof(X)}, {grad_phi.data(), grad_phi.size() * sizeof(T)}});
    expect_finite("mhc_grad_x_phi " + tag, grad_phi);
    check_case("mhc_grad_x_phi mix+rows " + tag, [&] {
      return hcext::cuda::mhc_grad_x_phi<T>(x.data(), xtype, phi.data(), proj.data(), proj.data(), rstd.data(),
                                            drstd.data(), gy.data(), hp.data(), n, alpha.data(), bias.data(), T(1e-6),
                                            nullptr, nullptr, rows, ws.data(), grad_phi.data(), tokens, n, C, int(D),
                                            nullptr);
    }, {{grad_f.data(), grad_f.size() * sizeof(X)}, {grad_xprev.data(), grad_xprev.size() * sizeof(X)},
        {ghp.data(), ghp.size() * sizeof(T)}, {ghr.data(), ghr.size() * sizeof(T)},
        {gy_rows.data(), gy_rows.size() * sizeof(T)}, {grad_phi.data(), grad_phi.size() * sizeof(T)}});
    expect_finite("mhc_grad_x_phi mix+rows " + tag, ghr);
    expect_finite("mhc_grad_x_phi mix+rows " + tag, gy_rows);
  }
}

template <typename T>
void hc_cases(hcext::StreamDtype xtype, const char* dtype, int64_t tokens, int n, int64_t C) {
  const std::string tag = std::string(dtype) + " T=" + std::to_string(tokens) + " n=" + std::to_string(n) +
                          " C=" + std::to_string(C);
  hcext::HcShape shape{n, n + 2, true, true, true, false};
  const auto x = random_vec<T>(size_t(tokens) * n * C, 21), wt = random_vec<T>(size_t(shape.K) * C, 22),
             sa = random_vec<T>(size_t(n) * (n + 1), 23), sb = random_vec<T>(n, 24);
  hcext::HcParams<T> params{sa.data(), sb.data(), nullptr, nullptr, nullptr, nullptr};
  std::vector<T> proj(size_t(tokens) * n * shape.K), stats(size_t(tokens) * n * 2), h_pre(size_t(tokens) * n),
      h_post(size_t(tokens) * n), h_res(size_t(tokens) * n * n);
  check_case("hc_forward " + tag, [&] {
    return hcext::cuda::hc_forward<T>(x.data(), xtype, wt.data(), shape, params, tokens, C, T(1e-6), proj.data(),
                                      stats.data(), h_pre.data(), h_post.data(), h_res.data(), nullptr);
  }, {{proj.data(), proj.size() * sizeof(T)}, {stats.data(), stats.size() * sizeof(T)},
      {h_pre.data(), h_pre.size() * sizeof(T)}, {h_post.data(), h_post.size() * sizeof(T)},
      {h_res.data(), h_res.size() * sizeof(T)}});
  expect_finite("hc_forward " + tag, proj);
}

// --- the emulator's own checks: each of these kernels breaks one hardware rule ---------------

__global__ void misaligned_load_kernel(const float* p, float* out) {
  out[threadIdx.x] = hcext::cuda::load<float, 4>(p + 1).v[0];  // 128-bit load 4 bytes off
}
__global__ void shuffle_kernel(float* out) {
  float v = float(threadIdx.x);
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

void expect_error(const std::string& name, cudaError_t err, cudaError_t want) {
  if (err != want) {
    std::printf("FAIL emulator check %s: got error %d, want %d (%s)\n", name.c_str(), int(err), int(want),
                hcext_emu::last_error_message());
    ++g_failures;
  } else {
    std::printf("ok   emulator check %s: %s\n", name.c_str(), hcext_emu::last_error_message());
  }
}

void emulator_checks() {
  using hcext::cuda::launch;
  std::vector<float> in(64, 1.f), out(1024);
  expect_error("misaligned 128-bit load", launch<misaligned_load_kernel>(1, 32, 0, nullptr, in.data(), out.data()),
               cudaErrorMisalignedAddress);
  expect_error("full-mask shuffle in a 48-thread block", launch<shuffle_kernel>(1, 48, 0, nullptr, out.data()),
               cudaErrorIllegalInstruction);
  expect_error("full-mask shuffle after a lane exited", launch<exited_lane_kernel>(1, 32, 0, nullptr, out.data()),
               cudaErrorIllegalInstruction);
  expect_error("grid y > 65535", launch<shuffle_kernel>(dim3(1, 65536), 32, 0, nullptr, out.data()),
               cudaErrorInvalidConfiguration);
  expect_error("zero-size grid", launch<shuffle_kernel>(0, 32, 0, nullptr, out.data()), cudaErrorInvalidConfiguration);
  expect_error("1025 threads", launch<shuffle_kernel>(1, 1025, 0, nullptr, out.data()), cudaErrorInvalidConfiguration);
  expect_error("228 KB of dynamic shared memory", launch<shuffle_kernel>(1, 32, 228 * 1024, nullptr, out.data()),
               cudaErrorInvalidConfiguration);
  expect_error("a valid launch", launch<shuffle_kernel>(1, 64, 0, nullptr, out.data()), cudaSuccess);
}

}  // namespace

int main() {
  emulator_checks();
  using hcext::StreamDtype;
  // n = 4: the compile-time fast paths; n = 3, 5: unrolled and generic; C: vectorised (multiple
  // of 16 bytes) and scalar tails; 33 tokens with one shared coefficient set.
  streams_cases<float, float>("fp32", 5, 4, 72, false);
  streams_cases<float, float>("fp32", 3, 5, 7, false);
  streams_cases<float, float>("fp32", 33, 3, 12, true);
  streams_cases<__nv_bfloat16, float>("bf16", 4, 4, 264, false);
  streams_cases<double, double>("fp64", 3, 2, 40, false);
  mhc_cases<float>(StreamDtype::kFloat, "fp32", 4, 4, 72);
  mhc_cases<float>(StreamDtype::kFloat, "fp32", 70, 4, 40);  // several token tiles, chunks and splits
  mhc_cases<float>(StreamDtype::kFloat, "fp32", 3, 3, 7);
  mhc_cases<double>(StreamDtype::kDouble, "fp64", 2, 5, 12);
  hc_cases<float>(StreamDtype::kFloat, "fp32", 3, 4, 70);
  hc_cases<float>(StreamDtype::kFloat, "fp32", 2, 9, 5);
  hc_cases<float>(StreamDtype::kFloat, "fp32", 3, 4, 64);  // 128-bit loads
  if (g_failures) {
    std::printf("%d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("all emulated kernel cases passed (race-free under ThreadSanitizer, schedule-independent)\n");
  return 0;
}
