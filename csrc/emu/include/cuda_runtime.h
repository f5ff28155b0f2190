// The CPU emulator of the CUDA execution model that runs csrc/cuda's kernels in CI, where there
// is no GPU (csrc/emu/README.md; built by tests/cuda_emu.py, never shipped).
//
// A launch runs its blocks one after another. In a block every CUDA thread is a fiber (ucontext)
// on the calling OS thread, and the fibers take turns: thread 0 runs until it reaches a barrier
// (__syncthreads, or a warp shuffle's exchange), then thread 1, and so on; a barrier lets its
// threads go on once all of them have reached it. That is a legal CUDA schedule, and a harsh
// one: a read of shared memory that some other thread writes without a barrier in between sees
// the value from before (or garbage) instead of the value the GPU's lockstep warps would
// usually deliver. The emulator fails the launch (cudaErrorLaunchFailure, with the reason in
// cudaGetErrorString) where CUDA's behaviour is undefined and a GPU would hang or compute
// garbage: threads of one block waiting at different __syncthreads calls, a barrier that some
// threads never reach, a full-mask shuffle in a warp whose lanes are not all there. Launch
// configurations outside the limits of the GPUs this project targets (1024 threads per block,
// 65535 blocks in y and z, 48 KiB of dynamic shared memory without an opt-in) fail as on a GPU.
//
// Device memory is host memory: the kernels read and write the CPU tensors they are given.
// __shared__ variables are static (one copy, which the blocks use one after another), rewritten
// (tests/cuda_emu.py) to be filled with 0xff bytes (NaN for floating point, -1 for integers) by
// the first thread of each block that reaches them, as the dynamic shared memory is before every
// block: a value read before any thread of the block wrote it is garbage, not a previous
// block's or launch's leftover. Atomics and fences
// are plain operations (one OS thread). Floating point is the host's (no FMA contraction on
// x86-64, glibc's expf / log), so results may differ from a GPU's in the last bits: tests compare
// tokens, as for every backend.
#pragma once

#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "cuda_runtime_api.h"

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in coordinates, set by the scheduler before it resumes a thread.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace sc_emu {

constexpr int kWarp = 32;
constexpr size_t kStack = 256 * 1024;  // per fiber, with a guard page below it
constexpr size_t kPage = 4096;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;

struct Barrier {
  unsigned expected = 0;  // threads that have not exited
  unsigned count = 0;     // arrived in this phase
  unsigned gen = 0;       // phases completed
  const void* site = nullptr;  // where this phase's first thread waits
};

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  unsigned flat = 0;
  bool done = false;
  const unsigned* wait_gen = nullptr;  // resumed only once *wait_gen != wait_value
  unsigned wait_value = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<uint64_t> lanes;  // the shuffle slots, two per thread
  ucontext_t scheduler;
  unsigned current = 0;
  unsigned live = 0;
  std::string error;
  const std::function<void()>* body = nullptr;
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
  std::vector<unsigned char> dynamic_shared;
  unsigned long long run = 0;                          // blocks run so far
  std::unordered_map<const void*, unsigned long long> poisoned;  // __shared__ -> its block

  ~Block() {
    if (stacks != nullptr) munmap(stacks, stacks_bytes);
  }
};

inline Block& block() {
  static Block b;
  return b;
}

inline Fiber& me() { return block().fibers[block().current]; }

inline void to_scheduler() { swapcontext(&me().ctx, &block().scheduler); }

// Stops the launch: the scheduler resumes no thread after this one returns to it.
[[noreturn]] inline void fail(const std::string& why) {
  Block& k = block();
  if (k.error.empty()) {
    char where[96];
    std::snprintf(where, sizeof where, " (block (%u, %u, %u), thread %u)", blockIdx.x, blockIdx.y,
                  blockIdx.z, me().flat);
    k.error = why + where;
  }
  for (;;) to_scheduler();
}

inline void release(Barrier& bar) {
  bar.count = 0;
  bar.site = nullptr;
  ++bar.gen;
}

inline void wait(Barrier& bar, const void* site, const char* what) {
  if (bar.count == 0) {
    bar.site = site;
  } else if (bar.site != site) {
    fail(std::string("threads wait at different ") + what + " calls (undefined behaviour)");
  }
  const unsigned gen = bar.gen;
  if (++bar.count == bar.expected) {
    release(bar);
    return;
  }
  Fiber& f = me();
  f.wait_gen = &bar.gen;
  f.wait_value = gen;
  to_scheduler();
  f.wait_gen = nullptr;
}

// A thread has returned from the kernel: __syncthreads stops counting it (a barrier whose other
// threads all wait is complete, as on sm_70 and later), and a full-mask shuffle that other lanes
// of its warp wait in can no longer complete.
inline void exited(Barrier& bar, bool warp) {
  if (warp && bar.count > 0) fail("a lane exited while its warp waits in a full-mask shuffle");
  --bar.expected;
  if (bar.count > 0 && bar.count == bar.expected) release(bar);
}

inline void trampoline() {
  Block& k = block();
  (*k.body)();
  Fiber& f = me();
  f.done = true;
  --k.live;
  exited(k.warps[f.flat / kWarp], true);
  exited(k.block, false);
  to_scheduler();  // never resumed
}

inline void run_block(const std::function<void()>& body) {
  Block& k = block();
  const unsigned n = blockDim.x * blockDim.y * blockDim.z;
  const size_t span = kStack + kPage;
  if (k.stacks_bytes < n * span) {
    if (k.stacks != nullptr) munmap(k.stacks, k.stacks_bytes);
    k.stacks_bytes = n * span;
    void* mem = mmap(nullptr, k.stacks_bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      k.stacks = nullptr;
      k.stacks_bytes = 0;
      k.error = "cannot map the fibers' stacks";
      return;
    }
    k.stacks = static_cast<char*>(mem);
    for (unsigned i = 0; i < n; ++i) mprotect(k.stacks + i * span, kPage, PROT_NONE);
  }
  k.body = &body;
  ++k.run;
  k.fibers.assign(n, Fiber{});
  k.block = Barrier{};
  k.block.expected = n;
  const unsigned warps = (n + kWarp - 1) / kWarp;
  k.warps.assign(warps, Barrier{});
  for (unsigned w = 0; w < warps; ++w) k.warps[w].expected = w + 1 < warps ? kWarp : n - w * kWarp;
  k.lanes.assign(2 * n, 0);
  k.live = n;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = k.fibers[i];
    f.flat = i;
    f.tid = dim3(i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = k.stacks + i * span + kPage;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
  }
  while (k.live > 0 && k.error.empty()) {
    bool ran = false;
    for (unsigned i = 0; i < n && k.error.empty(); ++i) {
      Fiber& f = k.fibers[i];
      if (f.done || (f.wait_gen != nullptr && *f.wait_gen == f.wait_value)) continue;
      k.current = i;
      threadIdx = f.tid;
      swapcontext(&k.scheduler, &f.ctx);
      ran = true;
    }
    if (!ran && k.error.empty()) {
      k.error = "deadlock: threads wait at a barrier that the others never reach";
    }
  }
}

// Runs body() as the kernel <<<grid, block, shared>>>; the launch status goes to
// cudaGetLastError().
inline void run(dim3 grid, dim3 blk, size_t shared, const std::function<void()>& body) {
  LastError& status = last_error();
  const unsigned long long threads = 1ULL * blk.x * blk.y * blk.z;
  if (threads == 0 || threads > kMaxThreads || blk.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 ||
      shared > kMaxDynamicShared) {
    char msg[160];
    std::snprintf(msg, sizeof msg,
                  "invalid launch configuration: grid (%u, %u, %u), block (%u, %u, %u), %zu bytes "
                  "of dynamic shared memory",
                  grid.x, grid.y, grid.z, blk.x, blk.y, blk.z, shared);
    status.code = cudaErrorInvalidConfiguration;
    status.message = msg;
    return;
  }
  Block& k = block();
  k.error.clear();
  k.dynamic_shared.assign(shared + 16, 0);
  gridDim = grid;
  blockDim = blk;
  for (unsigned z = 0; z < grid.z && k.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && k.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && k.error.empty(); ++x) {
        blockIdx = dim3(x, y, z);
        std::memset(k.dynamic_shared.data(), 0xff, k.dynamic_shared.size());
        run_block(body);
      }
  if (!k.error.empty()) {
    status.code = cudaErrorLaunchFailure;
    status.message = "CUDA emulator: " + k.error;
  }
}

// `__shared__ T name...;` is rewritten as `static T name...; sc_emu::poison_once(&name, ...)`.
inline void poison_once(void* p, size_t bytes) {
  Block& k = block();
  auto& seen = k.poisoned[p];
  if (seen != k.run) {
    seen = k.run;
    std::memset(p, 0xff, bytes);
  }
}

inline void* dynamic_shared() {
  // 16-byte aligned, as the GPU's dynamic shared memory
  const uintptr_t p = reinterpret_cast<uintptr_t>(block().dynamic_shared.data());
  return reinterpret_cast<void*>((p + 15) & ~static_cast<uintptr_t>(15));
}

// kernel<<<grid, block, shared, stream>>>(args...) is rewritten (tests/cuda_emu.py) as
// sc_emu::launch(kernel, grid, block, shared, stream)(args...).
template <typename Kernel>
auto launch(Kernel kernel, dim3 grid, dim3 blk, size_t shared = 0, cudaStream_t = nullptr) {
  return [=](auto&&... args) { run(grid, blk, shared, [&] { kernel(args...); }); };
}

template <typename T>
T shuffle(unsigned mask, T v, int src, const void* site) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value,
                "the emulator shuffles types of at most 8 bytes");
  Block& k = block();
  const unsigned flat = me().flat, w = flat / kWarp;
  Barrier& bar = k.warps[w];
  if (mask != 0xffffffffu || bar.expected != static_cast<unsigned>(kWarp))
    fail("a warp shuffle needs the full mask and all 32 lanes of the warp");
  // Two slots per lane, alternating with the barrier's phase: a lane can be one shuffle ahead of
  // a lane that has not read this one's value yet (never two: the next exchange waits for it).
  uint64_t* slots = &k.lanes[(bar.gen & 1) * k.fibers.size()];
  std::memcpy(&slots[flat], &v, sizeof(T));
  wait(bar, site, "warp shuffle");
  T out = v;
  if (src >= 0 && src < kWarp) std::memcpy(&out, &slots[w * kWarp + src], sizeof(T));
  return out;
}

}  // namespace sc_emu

// ---- CUDA's keywords and built-ins ------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)

__attribute__((noinline)) inline void __syncthreads() {
  sc_emu::wait(sc_emu::block().block, __builtin_return_address(0), "__syncthreads");
}

inline void __threadfence() {}

template <typename T>
__attribute__((noinline)) T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  const int lane = static_cast<int>(sc_emu::me().flat % sc_emu::kWarp);
  return sc_emu::shuffle(mask, v, lane ^ lane_mask, __builtin_return_address(0));
}

template <typename T>
__attribute__((noinline)) T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  const int lane = static_cast<int>(sc_emu::me().flat % sc_emu::kWarp);
  return sc_emu::shuffle(mask, v, lane + static_cast<int>(delta), __builtin_return_address(0));
}

template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}

template <typename T>
T __ldcg(const T* p) {
  return *p;
}

template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// fp64 -> fp32 rounded towards +inf
inline float __double2float_ru(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, INFINITY);
  return f;
}
