#pragma once
// The emulated CUDA grid: what hcext's CUDA kernels (csrc/<family>/<family>_kernels.cu) need
// to compile as host C++ with g++ and run on the CPU, one fiber per CUDA thread. Force-included
// (-include) ahead of every translation unit of the emulated build (HCEXT_EMU); owned by the
// tests, never part of the extension.
//
// What it provides and what it checks (see cuda_emu.cpp for the scheduler):
// - threadIdx / blockIdx / blockDim / gridDim of the running fiber; __shared__ is a static
//   (one block runs at a time, so a block's threads share it).
// - __syncthreads(): a real barrier: a fiber waits until every thread of its block that has
//   not exited arrives (the hardware's rule since sm_70).
// - __shfl_{xor,down,up,}_sync and __ballot/__any/__all_sync: a real warp exchange: every lane
//   named in the mask deposits its value and waits for the others. Reported as errors: a mask
//   naming a lane that does not exist (partial warp), has exited, or does not call the same
//   intrinsic; a caller outside its own mask; a source lane outside the mask.
// - launch<kernel>(grid, block, smem, stream, args...): checks the launch against the
//   hardware's limits (grid x < 2^31, y and z <= 65535, no zero-size grid or block, at most
//   1024 threads and 64 in z, dynamic shared memory <= 227 KB) and runs the grid: blocks in
//   order, or in a shuffled order, with the threads' interleaving shuffled too, for a non-zero
//   schedule seed (hcext_emu::set_schedule_seed). Kernels with fixed-order reductions must give
//   bitwise identical results under every schedule. Dynamic shared memory (dynamic_shared<T>()
//   of csrc/common/cuda_launch.cuh) is a buffer of exactly the launch's bytes, filled with 0xa5
//   before each block.
// - check_aligned(p, bytes): every 128-bit (packed) access of csrc/common/cuda_utils.cuh goes
//   through it (HCEXT_CHECK_ALIGNED); a misaligned one is an error.
// Errors are recorded (the first one, with the kernel, block and thread); the launch then
// returns an error code and hcext_emu::last_error_message() says what happened. A deadlock (a
// barrier some threads never reach) aborts the process with a report. The bf16/fp16
// conversions are the CUDA headers' own host code paths.
//
// Numerics differ from a GPU in one way only: g++ does not contract a*b+c into an FMA on
// baseline x86-64 where nvcc does, so results agree with a GPU's to rounding, not bitwise.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace hcext_emu {

struct ThreadState;  // cuda_emu.cpp

// The running fiber's coordinates (valid inside a kernel only).
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void syncthreads();

// The running launch's dynamic shared memory (its `smem` bytes; an error if it has none).
void* dynamic_shared_memory();

// A warp exchange: deposits `bytes` (1, 2, 4 or 8) of the caller's value for the lanes named in
// `mask`, waits until all of them have deposited, and copies lane `src_lane`'s value to `out`.
// `what` names the intrinsic (every lane of the mask must call the same one). The copies are
// the emulator's (not the kernel's) memory accesses: race detection sees only the
// synchronisation.
void warp_exchange(const char* what, unsigned mask, const void* value, size_t bytes, unsigned src_lane, void* out);
// __ballot_sync: the predicates of the lanes in `mask`, as bits.
unsigned warp_ballot(unsigned mask, int pred);
unsigned lane_id();

void check_aligned(const void* p, size_t bytes, const char* file, int line);

using GridBody = void (*)(const void* closure);
cudaError_t run_grid(const char* pretty_name, dim3 grid, dim3 block, size_t smem, GridBody body,
                     const void* closure);

// The schedule: 0 = blocks in order and threads in order (round robin between barriers); any
// other seed shuffles the block order and each round's thread order.
void set_schedule_seed(uint64_t seed);
uint64_t schedule_seed();
const char* last_error_message();
// Kernel base name -> number of launches, since the process started.
std::map<std::string, uint64_t> executed_kernels();

template <auto kKernel>
const char* kernel_pretty_name() {
  return __PRETTY_FUNCTION__;  // "... [with auto kKernel = ns::name<args>]"
}

template <auto kKernel, typename... Args>
cudaError_t launch(dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/, Args&&... args) {
  // Arguments are copied once, as a real launch copies them into the parameter buffer.
  const auto params = std::make_tuple(std::decay_t<Args>(std::forward<Args>(args))...);
  using Params = decltype(params);
  GridBody body = [](const void* closure) { std::apply(kKernel, *static_cast<const Params*>(closure)); };
  return run_grid(kernel_pretty_name<kKernel>(), grid, block, smem, body, &params);
}

namespace detail {
template <typename T>
T shuffle(const char* what, unsigned mask, T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8 && (sizeof(T) & (sizeof(T) - 1)) == 0 && std::is_trivially_copyable_v<T>,
                "emulated shuffles move 1, 2, 4 or 8 bytes");
  T r;
  warp_exchange(what, mask, &v, sizeof(T), src_lane, &r);
  return r;
}
}  // namespace detail

}  // namespace hcext_emu

#define threadIdx (::hcext_emu::thread_idx())
#define blockIdx (::hcext_emu::block_idx())
#define blockDim (::hcext_emu::block_dim())
#define gridDim (::hcext_emu::grid_dim())

inline void __syncthreads() { ::hcext_emu::syncthreads(); }

// Lane arithmetic of the PTX shfl modes, segments of `width` lanes.
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const unsigned lane = ::hcext_emu::lane_id();
  const unsigned seg = lane & ~unsigned(width - 1);
  unsigned src = lane ^ unsigned(lane_mask);
  if (src >= seg + unsigned(width)) src = lane;
  return ::hcext_emu::detail::shuffle("__shfl_xor_sync", mask, v, src);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned lane = ::hcext_emu::lane_id();
  const unsigned seg = lane & ~unsigned(width - 1);
  unsigned src = lane + delta;
  if (src >= seg + unsigned(width)) src = lane;
  return ::hcext_emu::detail::shuffle("__shfl_down_sync", mask, v, src);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned lane = ::hcext_emu::lane_id();
  const unsigned seg = lane & ~unsigned(width - 1);
  const unsigned src = (lane >= seg + delta) ? lane - delta : lane;
  return ::hcext_emu::detail::shuffle("__shfl_up_sync", mask, v, src);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const unsigned lane = ::hcext_emu::lane_id();
  const unsigned seg = lane & ~unsigned(width - 1);
  return ::hcext_emu::detail::shuffle("__shfl_sync", mask, v, seg + (unsigned(src_lane) & unsigned(width - 1)));
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::hcext_emu::warp_ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
