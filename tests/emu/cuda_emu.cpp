// The emulated grid's scheduler (see cuda_emu.h): one fiber per CUDA thread of a block, a
// cooperative round-robin scheduler (in thread order, or shuffled by a seed), block-wide
// barriers and warp exchanges with a generation count, launch-limit checks, and the record of
// executed kernels. Torch-free. It tells AddressSanitizer and ThreadSanitizer about every fiber
// switch and every synchronisation point, so that the kernels' own accesses are checked: ASan
// sees each fiber's stack; TSan sees the fibers as threads that synchronise only at
// __syncthreads, warp exchanges and the launch and block boundaries (blocks run one after
// another and share the static __shared__ arrays). In the TSan build this file is not
// instrumented (its bookkeeping is shared by all fibers by design; what it does through
// intercepted libc calls is hidden with IgnoredByTsan); the ASan build instruments it.
//
// x86-64 System V only (the context switch is a few instructions of assembly).

#include "cuda_emu.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define HCEXT_EMU_ASAN 1
#endif
#if defined(HCEXT_EMU_TSAN)  // set by the ThreadSanitizer build (this file itself is not instrumented)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#endif
#if defined(HCEXT_EMU_ASAN)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(const volatile void* addr, size_t size);
}
#endif

// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save_sp, and continues on new_sp (which a previous switch saved, or
// make_stack prepared).
extern "C" void hcext_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .globl hcext_emu_switch
  .hidden hcext_emu_switch
  .type hcext_emu_switch,@function
hcext_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size hcext_emu_switch, .-hcext_emu_switch
)");

namespace hcext_emu {
namespace {

constexpr size_t kStackBytes = 512 * 1024;  // per fiber; the kernels' local arrays are < 20 KB
constexpr unsigned kMaxThreads = 1024;
constexpr uint64_t kMaxSharedBytes = 227 * 1024;

enum class State { kReady, kWaiting, kDone };

struct Stack {
  char* base = nullptr;  // lowest address (a guard page), kStackBytes in all
  // The TSan fiber of whichever CUDA thread runs on this stack (one per stack, reused).
  void* tsan_fiber = nullptr;
  Stack() {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "hcext_emu: cannot map a fiber stack\n");
      std::abort();
    }
    base = static_cast<char*>(p);
    mprotect(base, 4096, PROT_NONE);  // overflow faults instead of corrupting a neighbour
  }
  char* usable_bottom() const { return base + 4096; }
  size_t usable_size() const { return kStackBytes - 4096; }
};

struct Warp {
  uint64_t generation = 0;
  unsigned arrived = 0;  // lanes that deposited for the current generation
  unsigned mask = 0;     // the mask of the exchange in progress
  unsigned exited = 0;   // lanes that have returned (reported if named in a mask; then counted
                         // as arrived, so that the launch ends with the error instead of hanging)
  const char* what = nullptr;
  uint64_t slots[2][32] = {};  // double-buffered by generation parity
};

}  // namespace

struct ThreadState {
  uint3 idx{};
  unsigned linear = 0;
  State state = State::kReady;
  void* sp = nullptr;
  Stack* stack = nullptr;
  void* fake_stack = nullptr;  // ASan's per-fiber state
  void* tsan_fiber = nullptr;
};

namespace {

struct Grid {
  const char* name = "";
  std::string short_name;
  dim3 grid, block;
  uint3 block_idx{};
  unsigned threads = 0;
  GridBody body = nullptr;
  const void* closure = nullptr;
  std::vector<ThreadState> fibers;
  std::vector<Warp> warps;
  unsigned alive = 0;
  unsigned arrived = 0;           // at the block barrier
  uint64_t barrier_generation = 0;
  uint64_t progress = 0;          // arrivals + exits: a round without any is a deadlock
  ThreadState* current = nullptr;
  void* scheduler_sp = nullptr;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  void* scheduler_tsan_fiber = nullptr;
  int launch_sync = 0, block_sync = 0, done_sync = 0;  // TSan synchronisation addresses
  int warp_sync[32] = {};
  // The launch's dynamic shared memory: exactly its bytes (AddressSanitizer catches an access
  // past them), shared by the blocks in turn as the static __shared__ arrays are.
  std::unique_ptr<unsigned char[]> dynamic_smem;
  size_t dynamic_bytes = 0;
};

std::mutex g_launch_mutex;  // one emulated grid at a time (the scheduler state is global)
Grid* g = nullptr;
uint64_t g_seed = 0;
std::string g_error;        // the first error of the current launch
cudaError_t g_error_code = cudaSuccess;
std::string g_last_error;   // kept for last_error_message()
std::vector<Stack> g_stacks;
std::map<std::string, uint64_t> g_executed;  // kernel base name -> launches

// The emulator's own bookkeeping in a fiber's context, invisible to ThreadSanitizer (its
// string and formatting calls go through intercepted libc functions).
struct IgnoredByTsan {
#if defined(HCEXT_EMU_TSAN)
  IgnoredByTsan() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~IgnoredByTsan() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#endif
};

void report(cudaError_t code, const char* fmt, ...) {
  IgnoredByTsan ignore;
  if (g_error_code != cudaSuccess) return;  // keep the first
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  char where[256] = "";
  if (g && g->current) {
    std::snprintf(where, sizeof(where), " [kernel %s, block (%u,%u,%u), thread (%u,%u,%u)]", g->short_name.c_str(),
                  g->block_idx.x, g->block_idx.y, g->block_idx.z, g->current->idx.x, g->current->idx.y,
                  g->current->idx.z);
  } else if (g) {
    std::snprintf(where, sizeof(where), " [kernel %s]", g->short_name.c_str());
  }
  g_error = std::string(buf) + where;
  g_error_code = code;
}

[[noreturn]] void fatal(const std::string& what) {
  std::fprintf(stderr, "hcext_emu: FATAL: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// "... [with auto kKernel = hcext::cuda::{anonymous}::mix_rows_kernel<float, 4, 4>]" ->
// ("mix_rows_kernel<float, 4, 4>", "mix_rows_kernel").
std::pair<std::string, std::string> kernel_names(const char* pretty) {
  std::string s(pretty);
  const size_t eq = s.find("kKernel = ");
  std::string full = eq == std::string::npos ? s : s.substr(eq + 10);
  if (!full.empty() && full.back() == ']') full.pop_back();
  const size_t lt = full.find('<');
  std::string head = full.substr(0, lt);
  const size_t colon = head.rfind("::");
  const std::string base = colon == std::string::npos ? head : head.substr(colon + 2);
  const size_t fcolon = full.rfind("::", lt == std::string::npos ? full.size() : lt);
  return {fcolon == std::string::npos ? full : full.substr(fcolon + 2), base};
}

// --- fiber switching -------------------------------------------------------------------------

void switch_to_fiber(ThreadState* t) {
  g->current = t;
#if defined(HCEXT_EMU_TSAN)
  __tsan_switch_to_fiber(t->tsan_fiber, 1 /* no implicit synchronisation */);
#endif
#if defined(HCEXT_EMU_ASAN)
  __sanitizer_start_switch_fiber(&g->scheduler_fake_stack, t->stack->usable_bottom(), t->stack->usable_size());
#endif
  hcext_emu_switch(&g->scheduler_sp, t->sp);
#if defined(HCEXT_EMU_ASAN)
  __sanitizer_finish_switch_fiber(g->scheduler_fake_stack, nullptr, nullptr);
#endif
  g->current = nullptr;
}

// Back to the scheduler from the running fiber (for good when it is done).
void yield_to_scheduler() {
  ThreadState* t = g->current;
  const bool done = t->state == State::kDone;
#if defined(HCEXT_EMU_TSAN)
  __tsan_switch_to_fiber(g->scheduler_tsan_fiber, 1);
#endif
#if defined(HCEXT_EMU_ASAN)
  __sanitizer_start_switch_fiber(done ? nullptr : &t->fake_stack, g->scheduler_stack_bottom, g->scheduler_stack_size);
#endif
  hcext_emu_switch(&t->sp, g->scheduler_sp);
  // Resumed (never after done).
#if defined(HCEXT_EMU_ASAN)
  __sanitizer_finish_switch_fiber(t->fake_stack, nullptr, nullptr);
#endif
}

void thread_exit();

unsigned existing_lanes(unsigned warp_index) {
  const unsigned lanes = std::min(32u, g->threads - warp_index * 32);
  return lanes == 32 ? ~0u : ((1u << lanes) - 1u);
}

void complete_exchange_if_ready(Warp& w, unsigned warp_index) {
  const unsigned need = w.mask & existing_lanes(warp_index);
  if (w.arrived != 0 && ((w.arrived | w.exited) & need) == need) {
    w.arrived = 0;
    ++w.generation;
  }
}

void fiber_entry() {
#if defined(HCEXT_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g->scheduler_stack_bottom, &g->scheduler_stack_size);
#endif
#if defined(HCEXT_EMU_TSAN)
  __tsan_acquire(&g->launch_sync);
#endif
  g->body(g->closure);
  thread_exit();
}

void* make_stack(Stack* s) {
#if defined(HCEXT_EMU_ASAN)
  // Frames of the stack's previous fiber that never returned (the exit path) may have left
  // redzones poisoned.
  __asan_unpoison_memory_region(s->usable_bottom(), s->usable_size());
#endif
  // Initial frame popped by hcext_emu_switch: MXCSR + x87 control word, r15..rbp, return
  // address. After the `ret`, rsp % 16 == 8 as at any function entry.
  uintptr_t top = reinterpret_cast<uintptr_t>(s->base + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 8);  // alignment padding slot
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);     // ret target
  for (int r = 0; r < 6; ++r) *--sp = 0;                // rbp rbx r12 r13 r14 r15
  --sp;
  const uint32_t mxcsr = 0x1F80;
  const uint16_t fcw = 0x037F;
  std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fcw, 2);
  return sp;
}

// --- synchronisation ---------------------------------------------------------------------------

void complete_barrier_if_ready() {
  if (g->arrived > 0 && g->arrived == g->alive) {
    g->arrived = 0;
    ++g->barrier_generation;
  }
}

void thread_exit() {
  ThreadState* t = g->current;
#if defined(HCEXT_EMU_TSAN)
  __tsan_release(&g->done_sync);
#endif
  t->state = State::kDone;
  --g->alive;
  ++g->progress;
  // A lane named in a warp exchange in progress has exited: the exchange cannot complete on
  // the hardware.
  Warp& w = g->warps[t->linear / 32];
  w.exited |= 1u << (t->linear % 32);
  if (w.arrived != 0 && ((w.mask >> (t->linear % 32)) & 1u)) {
    report(cudaErrorIllegalInstruction, "lane %u exited while named in the mask 0x%08x of %s", t->linear % 32, w.mask,
           w.what);
    complete_exchange_if_ready(w, t->linear / 32);
  }
  complete_barrier_if_ready();  // exited threads no longer hold a barrier back
  yield_to_scheduler();
  fatal("a finished fiber was resumed");
}

}  // namespace

void* dynamic_shared_memory() {
  if (g->dynamic_bytes == 0) report(cudaErrorInvalidValue, "dynamic shared memory used by a launch that has none");
  return g->dynamic_smem.get();
}

const uint3& thread_idx() { return g->current->idx; }
const uint3& block_idx() { return g->block_idx; }
const dim3& block_dim() { return g->block; }
const dim3& grid_dim() { return g->grid; }
unsigned lane_id() { return g->current->linear % 32; }

void syncthreads() {
  ThreadState* t = g->current;
#if defined(HCEXT_EMU_TSAN)
  __tsan_release(&g->block_sync);
#endif
  const uint64_t gen = g->barrier_generation;
  ++g->arrived;
  ++g->progress;
  complete_barrier_if_ready();
  t->state = State::kWaiting;
  while (g->barrier_generation == gen) yield_to_scheduler();
  t->state = State::kReady;
#if defined(HCEXT_EMU_TSAN)
  __tsan_acquire(&g->block_sync);
#endif
}

namespace {

// Moves of 1 to 8 bytes the compiler emits inline (no memcpy call that a sanitizer intercepts).
uint64_t load_bytes(const void* p, size_t bytes) {
  switch (bytes) {
    case 1: { uint8_t v; __builtin_memcpy(&v, p, 1); return v; }
    case 2: { uint16_t v; __builtin_memcpy(&v, p, 2); return v; }
    case 4: { uint32_t v; __builtin_memcpy(&v, p, 4); return v; }
    default: { uint64_t v; __builtin_memcpy(&v, p, 8); return v; }
  }
}
void store_bytes(void* p, uint64_t v, size_t bytes) {
  switch (bytes) {
    case 1: { const uint8_t w = uint8_t(v); __builtin_memcpy(p, &w, 1); return; }
    case 2: { const uint16_t w = uint16_t(v); __builtin_memcpy(p, &w, 2); return; }
    case 4: { const uint32_t w = uint32_t(v); __builtin_memcpy(p, &w, 4); return; }
    default: __builtin_memcpy(p, &v, 8); return;
  }
}

// Deposits the caller's value and waits for every lane of the mask; returns the slots of the
// completed generation (valid until this lane's next exchange).
const uint64_t* exchange(const char* what, unsigned mask, uint64_t value) {
  ThreadState* t = g->current;
  const unsigned warp_index = t->linear / 32, lane = t->linear % 32;
  Warp& w = g->warps[warp_index];
  const unsigned first = warp_index * 32;
  const unsigned lanes = std::min(32u, g->threads - first);
  const unsigned existing = lanes == 32 ? ~0u : ((1u << lanes) - 1u);
  if (!((mask >> lane) & 1u)) {
    report(cudaErrorIllegalInstruction, "%s called by lane %u outside its mask 0x%08x", what, lane, mask);
  }
  if (mask & ~existing) {
    report(cudaErrorIllegalInstruction, "%s mask 0x%08x names lanes that do not exist (the warp has %u lanes)", what,
           mask, lanes);
  }
  for (unsigned l = 0; l < lanes; ++l) {
    if (((mask >> l) & 1u) && g->fibers[first + l].state == State::kDone) {
      report(cudaErrorIllegalInstruction, "%s mask 0x%08x names lane %u, which has exited", what, mask, l);
    }
  }
  if (w.arrived == 0) {
    w.mask = mask;
    w.what = what;
  } else if (w.mask != mask || std::strcmp(w.what, what) != 0) {
    report(cudaErrorIllegalInstruction, "lanes of one warp meet at different exchanges: %s mask 0x%08x vs %s mask 0x%08x",
           what, mask, w.what, w.mask);
  }
  const uint64_t gen = w.generation;
  w.slots[gen & 1][lane] = value;
#if defined(HCEXT_EMU_TSAN)
  __tsan_release(&g->warp_sync[warp_index]);
#endif
  w.arrived |= 1u << lane;
  ++g->progress;
  complete_exchange_if_ready(w, warp_index);
  t->state = State::kWaiting;
  while (w.generation == gen) yield_to_scheduler();
  t->state = State::kReady;
#if defined(HCEXT_EMU_TSAN)
  __tsan_acquire(&g->warp_sync[warp_index]);
#endif
  return w.slots[gen & 1];
}

}  // namespace

void warp_exchange(const char* what, unsigned mask, const void* value, size_t bytes, unsigned src_lane, void* out) {
  const uint64_t* slots = exchange(what, mask, load_bytes(value, bytes));
  if (src_lane >= 32 || !((mask >> src_lane) & 1u)) {
    report(cudaErrorIllegalInstruction, "%s reads lane %u, outside the mask 0x%08x", what, src_lane, mask);
    src_lane = lane_id();
  }
  store_bytes(out, slots[src_lane], bytes);
}

unsigned warp_ballot(unsigned mask, int pred) {
  const uint64_t* slots = exchange("__ballot_sync", mask, pred != 0 ? 1 : 0);
  unsigned r = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if ((mask >> l) & 1u) r |= unsigned(slots[l] & 1u) << l;
  }
  return r;
}

void check_aligned(const void* p, size_t bytes, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    report(cudaErrorMisalignedAddress, "misaligned %zu-byte access at %p (%s:%d)", bytes, p, file, line);
  }
}

void set_schedule_seed(uint64_t seed) { g_seed = seed; }
uint64_t schedule_seed() { return g_seed; }
const char* last_error_message() { return g_last_error.c_str(); }

namespace {

void run_block(Grid& grid, std::mt19937_64* rng) {
  const unsigned n = grid.threads;
  grid.alive = n;
  grid.arrived = 0;
  grid.barrier_generation = 0;
  for (Warp& w : grid.warps) w = Warp{};
  // Each block's dynamic shared memory starts as garbage (not the previous block's values).
  if (grid.dynamic_bytes > 0) {
    std::memset(grid.dynamic_smem.get(), 0xa5, grid.dynamic_bytes);
#if defined(HCEXT_EMU_TSAN)
    __tsan_release(&grid.launch_sync);  // the fill happens before the block's threads start
#endif
  }
  for (unsigned i = 0; i < n; ++i) {
    ThreadState& t = grid.fibers[i];
    t.linear = i;
    t.idx = uint3{i % grid.block.x, (i / grid.block.x) % grid.block.y, i / (grid.block.x * grid.block.y)};
    t.state = State::kReady;
    t.stack = &g_stacks[i];
    t.sp = make_stack(t.stack);
    t.fake_stack = nullptr;
#if defined(HCEXT_EMU_TSAN)
    if (!t.stack->tsan_fiber) t.stack->tsan_fiber = __tsan_create_fiber(0);
    t.tsan_fiber = t.stack->tsan_fiber;
#endif
  }
  std::vector<unsigned> order(n);
  std::iota(order.begin(), order.end(), 0u);
  while (grid.alive > 0) {
    if (rng) std::shuffle(order.begin(), order.end(), *rng);
    const uint64_t before = grid.progress;
    bool any_resumed_ready = false;
    for (unsigned i : order) {
      ThreadState& t = grid.fibers[i];
      if (t.state == State::kDone) continue;
      if (t.state == State::kReady) any_resumed_ready = true;
      switch_to_fiber(&t);
    }
    if (grid.progress == before && !any_resumed_ready && grid.alive > 0) {
      std::string who;
      for (unsigned i = 0; i < n && who.size() < 300; ++i) {
        if (grid.fibers[i].state != State::kDone) who += " " + std::to_string(i);
      }
      fatal("deadlock in kernel " + grid.short_name + ": threads waiting at a barrier or warp exchange that the others"
            " never reach (waiting:" + who + ")");
    }
  }
#if defined(HCEXT_EMU_TSAN)
  // Blocks run one after another and share the static __shared__ arrays: order each block
  // after the previous one (so race detection is within a block: what barriers and warp
  // exchanges must order).
  __tsan_acquire(&grid.done_sync);
  __tsan_release(&grid.launch_sync);
#endif
}

}  // namespace

cudaError_t run_grid(const char* pretty_name, dim3 grid_dim_, dim3 block_dim_, size_t smem, GridBody body,
                     const void* closure) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  Grid grid;
  grid.name = pretty_name;
  const auto names = kernel_names(pretty_name);
  grid.short_name = names.first;
  grid.grid = grid_dim_;
  grid.block = block_dim_;
  grid.body = body;
  grid.closure = closure;
  g = &grid;
  g_error.clear();
  g_error_code = cudaSuccess;

  // The launch configuration, as the hardware (sm_90) checks it.
  const uint64_t threads = uint64_t(block_dim_.x) * block_dim_.y * block_dim_.z;
  if (grid_dim_.x == 0 || grid_dim_.y == 0 || grid_dim_.z == 0) {
    report(cudaErrorInvalidConfiguration, "zero-size grid (%u, %u, %u)", grid_dim_.x, grid_dim_.y, grid_dim_.z);
  } else if (grid_dim_.x > 0x7fffffffu || grid_dim_.y > 65535u || grid_dim_.z > 65535u) {
    report(cudaErrorInvalidConfiguration, "grid (%u, %u, %u) exceeds (2^31-1, 65535, 65535)", grid_dim_.x, grid_dim_.y,
           grid_dim_.z);
  } else if (threads == 0 || threads > kMaxThreads || block_dim_.z > 64) {
    report(cudaErrorInvalidConfiguration, "block (%u, %u, %u): 1 to 1024 threads, z <= 64", block_dim_.x, block_dim_.y,
           block_dim_.z);
  } else if (smem > kMaxSharedBytes) {
    report(cudaErrorInvalidConfiguration, "dynamic shared memory %zu bytes > 227 KB", smem);
  }
  if (g_error_code != cudaSuccess) {
    g_last_error = g_error;
    g = nullptr;
    return g_error_code;
  }
  ++g_executed[names.second];

  if (smem > 0) {
    grid.dynamic_bytes = smem;
    grid.dynamic_smem.reset(new unsigned char[smem]);  // filled with 0xa5 before each block (run_block)
  }
  grid.threads = unsigned(threads);
  grid.fibers.resize(grid.threads);
  grid.warps.resize((grid.threads + 31) / 32);
  if (g_stacks.size() < grid.threads) g_stacks.resize(grid.threads);
#if defined(HCEXT_EMU_TSAN)
  grid.scheduler_tsan_fiber = __tsan_get_current_fiber();
  __tsan_release(&grid.launch_sync);
#endif

  const uint64_t blocks = uint64_t(grid_dim_.x) * grid_dim_.y * grid_dim_.z;
  std::vector<uint64_t> block_order;
  std::mt19937_64 rng(g_seed);
  const bool shuffled = g_seed != 0;
  if (shuffled) {
    block_order.resize(blocks);
    std::iota(block_order.begin(), block_order.end(), uint64_t(0));
    std::shuffle(block_order.begin(), block_order.end(), rng);
  }
  for (uint64_t b = 0; b < blocks; ++b) {
    const uint64_t lin = shuffled ? block_order[b] : b;
    grid.block_idx = uint3{unsigned(lin % grid_dim_.x), unsigned((lin / grid_dim_.x) % grid_dim_.y),
                           unsigned(lin / (uint64_t(grid_dim_.x) * grid_dim_.y))};
    run_block(grid, shuffled ? &rng : nullptr);
  }
#if defined(HCEXT_EMU_TSAN)
  __tsan_acquire(&grid.done_sync);
#endif
  g_last_error = g_error;
  g = nullptr;
  return g_error_code;
}

// --- the record of executed kernels -------------------------------------------------------------

std::map<std::string, uint64_t> executed_kernels() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  return g_executed;
}

}  // namespace hcext_emu
