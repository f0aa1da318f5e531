// Host emulation of the CUDA features rednet/ops/involution.cu uses, for g++ (C++20, x86-64 or any
// platform with <ucontext.h>). Included before the kernel source with REDNET_HOST_EMULATION defined.
//
// - A block's threads are fibers (ucontext) run by one OS thread: each runs until it reaches a
//   barrier (__syncthreads, or the warp-wide exchange inside __shfl_xor_sync) and the scheduler
//   releases the barrier when every thread of the block (or lane of the warp) waits at it. A
//   barrier some thread can never reach (it returned, or waits at another barrier) is reported
//   as an error instead of hanging, so the tests also prove the kernels' barriers are uniform.
// - Blocks run one after another, so a function-static array is the block's shared memory; the
//   static arrays live in their own section, and before every block they and the dynamic shared
//   memory are filled with a poison pattern (0xff bytes: NaN in every float type), so a kernel that
//   reads shared memory it did not write in this block computes NaN.
// - Threads run in a schedule chosen by emu_set_order: odd blocks in reverse (the default), or a
//   fresh random permutation of the block's threads at every round between barriers.
// - cp.async copies (copy16_async, copy4_async) are carried out when their thread calls
//   async_wait(), as late as the hardware may: reading their destination earlier reads poison.
// - Every global access and every 128-bit shared access is checked for alignment to its size;
//   with bounds on (emu_bounds), global accesses must fall inside the launch's tensors, and
//   shared vector accesses inside the block's shared memory.
// - fp16 conversions use the compiler's _Float16 (IEEE binary16, round to nearest even), the
//   same rounding as the device's cvt.rn.f16.f32; the tests check them against torch.
// - Every global load and store goes through the kernel source's REDNET_TRACE_* hooks; with
//   tracing on, the shim counts warp-level requests (accesses grouped by warp and by each
//   lane's sequence number of accesses, exact where the warp's lanes take the same path), the
//   distinct 32-byte sectors each request touches, and the distinct sectors each block touches
//   per tensor: the access pattern of the real kernel code, for tools/kernel_report.py.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#define __global__
#define __host__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("emu_shared")))

struct emu_dim3 { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) double2 { double x, y; };

inline emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline double __hiloint2double(int hi, int lo) {
  const unsigned long long u = ((unsigned long long)(unsigned)hi << 32) | (unsigned)lo;
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}
inline int __double2hiint(double d) { unsigned long long u; std::memcpy(&u, &d, 8); return (int)(u >> 32); }
inline int __double2loint(double d) { unsigned long long u; std::memcpy(&u, &d, 8); return (int)(unsigned)u; }
inline float half_to_float(unsigned short h) { _Float16 f; std::memcpy(&f, &h, 2); return (float)f; }
inline unsigned short float_to_half(float v) {
  _Float16 f = (_Float16)v;
  unsigned short h;
  std::memcpy(&h, &f, 2);
  return h;
}

namespace emu {

enum State { RUNNABLE, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };
struct Fiber { ucontext_t ctx; std::vector<char> stack; State state; };

inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline unsigned current;
inline void (*body)(void**);
inline void** body_args;
inline std::string error;
inline constexpr size_t kStack = 256 * 1024;

inline void trampoline(int t) {
  body(body_args);
  fibers[t].state = DONE;
  swapcontext(&fibers[t].ctx, &scheduler);
}

inline void wait(State s) {
  fibers[current].state = s;
  swapcontext(&fibers[current].ctx, &scheduler);
}

// ---- tracing of global memory accesses ----
struct Stats {  // totals over the traced blocks; the layout is mirrored by ctypes in the tests
  unsigned long long requests[2];       // [load, store] warp-level requests
  unsigned long long sectors[2];        // 32-byte sectors those requests touch (summed per request)
  unsigned long long used_bytes[2];     // distinct bytes those requests access (summed per request)
  unsigned long long accesses[2][5];    // thread-level accesses of 1, 2, 4, 8, 16 bytes
  unsigned long long block_sectors[2][4];  // distinct sectors per block, by tensor (args 0, 1, 2, other)
  unsigned long long threads, storing_threads;  // threads run, and those that stored anything
};
inline bool tracing = false;
inline Stats stats;
inline const char* ranges[3][2];  // [begin, end) of the kernel's three tensors
inline std::vector<unsigned> seq[2];  // per thread: accesses so far in this block
// (warp, sequence number) -> the accesses of one warp-level request: (address, bytes)
inline std::unordered_map<unsigned long long, std::vector<std::pair<unsigned long long, unsigned>>> groups[2];
inline std::unordered_set<unsigned long long> block_set[2][4];

inline bool checking = false;  // every access must fall inside one of the three tensors

// Ends the current thread with an error (the first one is kept).
inline void fail(const std::string& what) {
  if (error.empty()) {
    error = std::string("block ") + std::to_string(blockIdx.x) + " thread " + std::to_string(threadIdx.x) + ": " + what;
  }
  fibers[current].state = DONE;
  swapcontext(&fibers[current].ctx, &scheduler);
}

inline void trace(const void* p, unsigned bytes, int st) {
  if ((unsigned long long)p % bytes) {
    fail(std::string("global ") + (st ? "store" : "load") + " of " + std::to_string(bytes) +
         " bytes at an address not aligned to its size");
  }
  if (checking) {
    const char* q = (const char*)p;
    bool inside = false;
    for (int i = 0; i < 3; ++i) inside = inside || (q >= ranges[i][0] && q + bytes <= ranges[i][1]);
    if (!inside) {  // report, and end this thread before the access happens
      if (error.empty()) {
        error = std::string("block ") + std::to_string(blockIdx.x) + " thread " + std::to_string(threadIdx.x) +
                ": global " + (st ? "store" : "load") + " of " + std::to_string(bytes) +
                " bytes outside every tensor argument";
      }
      fibers[current].state = DONE;
      swapcontext(&fibers[current].ctx, &scheduler);
    }
  }
  if (!tracing) return;
  const unsigned t = threadIdx.x;
  const unsigned long long key = ((unsigned long long)(t / 32) << 40) | seq[st][t]++;
  const unsigned long long a = (unsigned long long)p, s0 = a / 32, s1 = (a + bytes - 1) / 32;
  groups[st][key].emplace_back(a, bytes);
  int tensor = 3;
  for (int i = 0; i < 3; ++i)
    if ((const char*)p >= ranges[i][0] && (const char*)p < ranges[i][1]) tensor = i;
  for (unsigned long long s = s0; s <= s1; ++s) block_set[st][tensor].insert(s);
  stats.accesses[st][bytes == 1 ? 0 : bytes == 2 ? 1 : bytes == 4 ? 2 : bytes == 8 ? 3 : 4] += 1;
}

inline void flush_block() {
  stats.threads += seq[1].size();
  for (unsigned n : seq[1]) stats.storing_threads += n > 0;
  for (int st = 0; st < 2; ++st) {
    std::unordered_map<unsigned long long, unsigned> mask;  // sector -> bytes used, one bit each
    for (auto& [key, v] : groups[st]) {
      mask.clear();
      for (auto [a, n] : v)
        for (unsigned long long b = a; b < a + n; ++b) mask[b / 32] |= 1u << (b % 32);
      stats.requests[st] += 1;
      stats.sectors[st] += mask.size();
      for (auto& [sector, m] : mask) stats.used_bytes[st] += __builtin_popcount(m);
    }
    groups[st].clear();
    for (int i = 0; i < 4; ++i) {
      stats.block_sectors[st][i] += block_set[st][i].size();
      block_set[st][i].clear();
    }
  }
}

// ---- shared memory ----
inline std::vector<uint4> dyn;  // the launch's dynamic shared memory
inline size_t dyn_bytes = 0;
}  // namespace emu
extern "C" char __start_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emu_shared[] __attribute__((weak, visibility("hidden")));
namespace emu {

inline void poison_shared() {
  if (!dyn.empty()) std::memset(dyn.data(), 0xff, dyn.size() * sizeof(uint4));
  if (__start_emu_shared && __stop_emu_shared) std::memset(__start_emu_shared, 0xff, __stop_emu_shared - __start_emu_shared);
}

inline void check_shared(const void* p, unsigned bytes, const char* what) {
  const char* q = (const char*)p;
  if ((unsigned long long)q % bytes) fail(std::string(what) + " of " + std::to_string(bytes) + " bytes in shared memory, misaligned");
  const char* d0 = (const char*)dyn.data();
  const bool in_dyn = q >= d0 && q + bytes <= d0 + dyn_bytes;
  const bool in_static = __start_emu_shared && q >= __start_emu_shared && q + bytes <= __stop_emu_shared;
  if (!in_dyn && !in_static) fail(std::string(what) + " of " + std::to_string(bytes) + " bytes outside shared memory");
}

// A thread's asynchronous copies, carried out at its async_wait().
struct Copy { void* dst; const void* src; unsigned bytes; bool valid; };
inline std::vector<std::vector<Copy>> pending;

inline void copy_async(void* dst, const void* src, unsigned bytes, bool valid) {
  check_shared(dst, bytes, "asynchronous copy");
  if (valid) trace(src, bytes, 0);
  pending[threadIdx.x].push_back({dst, src, bytes, valid});
}

inline void wait_copies() {
  for (const Copy& c : pending[threadIdx.x]) {
    if (c.valid) {
      std::memcpy(c.dst, c.src, c.bytes);
    } else {
      std::memset(c.dst, 0, c.bytes);
    }
  }
  pending[threadIdx.x].clear();
}

// ---- scheduling ----
inline int order_mode = 0;  // 0: odd blocks in reverse; 1: a random permutation every round
inline unsigned long long order_state = 1;
inline std::vector<unsigned> order;

inline unsigned next_random() {  // xorshift64*
  order_state ^= order_state >> 12, order_state ^= order_state << 25, order_state ^= order_state >> 27;
  return (unsigned)((order_state * 2685821657736338717ull) >> 32);
}

// Runs one block to completion; false (with `error` set) when its barriers cannot complete.
inline bool run_block(unsigned nthreads) {
  if (fibers.size() < nthreads) fibers.resize(nthreads);
  for (int st = 0; st < 2; ++st) seq[st].assign(nthreads, 0);
  pending.assign(nthreads, {});
  poison_shared();
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = fibers[t];
    if (f.stack.empty()) f.stack.resize(kStack);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, (void (*)())trampoline, 1, (int)t);
    f.state = RUNNABLE;
  }
  order.resize(nthreads);
  for (;;) {
    // Mode 0: odd blocks run their threads in reverse order, so a missing barrier shows up
    // whichever side of a shared-memory race the kernel gets wrong; mode 1: a new random order
    // every round, which also interleaves warps.
    for (unsigned k = 0; k < nthreads; ++k) order[k] = (order_mode == 0 && (blockIdx.x & 1)) ? nthreads - 1 - k : k;
    if (order_mode == 1) {
      for (unsigned k = nthreads - 1; k > 0; --k) std::swap(order[k], order[next_random() % (k + 1)]);
    }
    for (unsigned k = 0; k < nthreads; ++k) {
      const unsigned t = order[k];
      if (fibers[t].state != RUNNABLE) continue;
      current = t;
      threadIdx = {t, 0, 0};
      swapcontext(&scheduler, &fibers[t].ctx);
    }
    unsigned done = 0, at_block = 0;
    for (unsigned t = 0; t < nthreads; ++t) {
      done += fibers[t].state == DONE;
      at_block += fibers[t].state == AT_BLOCK_BARRIER;
    }
    if (!error.empty()) return false;
    if (done == nthreads) {
      for (unsigned t = 0; t < nthreads; ++t) {
        if (!pending[t].empty()) {
          error = "block " + std::to_string(blockIdx.x) + " thread " + std::to_string(t) +
                  ": asynchronous copies never waited for";
          return false;
        }
      }
      break;
    }
    bool released = false;
    if (at_block == nthreads) {
      for (unsigned t = 0; t < nthreads; ++t) fibers[t].state = RUNNABLE;
      released = true;
    }
    for (unsigned w0 = 0; w0 < nthreads; w0 += 32) {
      const unsigned w1 = std::min(nthreads, w0 + 32);
      bool all = true;
      for (unsigned t = w0; t < w1; ++t) all = all && fibers[t].state == AT_WARP_BARRIER;
      if (all) {
        for (unsigned t = w0; t < w1; ++t) fibers[t].state = RUNNABLE;
        released = true;
      }
    }
    if (!released) {
      error = "block " + std::to_string(blockIdx.x) + ": a barrier is not reached by every thread (" +
              std::to_string(done) + " returned, " + std::to_string(at_block) + " at __syncthreads)";
      return false;
    }
  }
  if (tracing) flush_block();
  return true;
}

}  // namespace emu

inline void __syncthreads() { emu::wait(emu::AT_BLOCK_BARRIER); }

// The device's asynchronous copies and dynamic shared memory (involution.cu declares them only
// for the device).
inline void copy16_async(uint4* dst, const void* src, bool valid) { emu::copy_async(dst, src, 16, valid); }
inline void copy4_async(unsigned* dst, const unsigned* src) { emu::copy_async(dst, src, 4, true); }
inline void async_wait() { emu::wait_copies(); }
#define REDNET_DYNAMIC_SHARED(name) uint4* const name = emu::dyn.data()
inline unsigned dynamic_shared_bytes() { return (unsigned)emu::dyn_bytes; }
inline void __trap() { emu::fail("__trap()"); }
#define REDNET_TRACE_SHARED(p, bytes) emu::check_shared((p), (bytes), "load")

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "one register or a pair");
  static unsigned long long slot[1024];
  if (mask != 0xffffffffu || width != 32) {
    emu::error = "__shfl_xor_sync: only full warps and width 32 are emulated";
  }
  const unsigned t = threadIdx.x;
  std::memcpy(&slot[t], &v, sizeof(T));
  emu::wait(emu::AT_WARP_BARRIER);  // every lane has published its value
  T r;
  std::memcpy(&r, &slot[(t & ~31u) | ((t & 31u) ^ (unsigned)lane_mask)], sizeof(T));
  emu::wait(emu::AT_WARP_BARRIER);  // every lane has read before any publishes again
  return r;
}

#define REDNET_TRACE_LOAD(p, bytes) emu::trace((p), (bytes), 0)
#define REDNET_TRACE_STORE(p, bytes) emu::trace((p), (bytes), 1)

// cuLaunchKernel-style call: args[i] points to the i-th argument's value.
template <typename... P, size_t... I>
inline void emu_call_with(void (*k)(P...), void** args, std::index_sequence<I...>) {
  std::tuple<P...> vals;
  ((std::memcpy(&std::get<I>(vals), args[I], sizeof(P))), ...);
  k(std::get<I>(vals)...);
}
template <typename... P>
inline void emu_call(void (*k)(P...), void** args) { emu_call_with(k, args, std::index_sequence_for<P...>{}); }

// Exported entry points: this header is included by exactly one translation unit (the wrapper cuda_emu.py generates).

// Launch `body` on blocks [0, grid) or, when `blocks` is given, on those blocks of a grid of
// `grid` blocks (the report samples blocks of large grids). 0 on success, else see emu_error().
extern "C" int emu_launch_blocks(void (*body)(void**), unsigned grid, unsigned threads, const unsigned* blocks,
                                 unsigned nblocks, unsigned smem, void** args) {
  emu::error.clear();
  emu::dyn.assign((smem + 15) / 16, uint4{});
  emu::dyn_bytes = smem;
  emu::body = body;
  emu::body_args = args;
  gridDim = {grid, 1, 1};
  blockDim = {threads, 1, 1};
  const unsigned n = blocks ? nblocks : grid;
  for (unsigned i = 0; i < n; ++i) {
    blockIdx = {blocks ? blocks[i] : i, 0, 0};
    if (!emu::run_block(threads) || !emu::error.empty()) return 1;
  }
  return 0;
}

extern "C" const char* emu_error() { return emu::error.c_str(); }

// Thread schedule of the following launches: 0, odd blocks reversed; 1, random from `seed`.
extern "C" void emu_set_order(int mode, unsigned long long seed) {
  emu::order_mode = mode;
  emu::order_state = seed | 1;
}

// Trace the global accesses of the following launches; the three tensors are told apart by address.
extern "C" void emu_trace_begin(const char* a, size_t na, const char* b, size_t nb, const char* o, size_t no) {
  emu::stats = {};
  const char* r[3][2] = {{a, a + na}, {b, b + nb}, {o, o + no}};
  std::memcpy(emu::ranges, r, sizeof(r));
  emu::tracing = true;
}

// Check that the following launches access only these three tensors (null: stop checking).
extern "C" void emu_bounds(const char* a, size_t na, const char* b, size_t nb, const char* o, size_t no) {
  const char* r[3][2] = {{a, a + na}, {b, b + nb}, {o, o + no}};
  std::memcpy(emu::ranges, r, sizeof(r));
  emu::checking = a != nullptr;
}

extern "C" void emu_trace_end(emu::Stats* out) {
  emu::tracing = false;
  *out = emu::stats;
}

extern "C" float emu_half_to_float(unsigned short h) { return half_to_float(h); }
extern "C" unsigned short emu_float_to_half(float v) { return float_to_half(v); }
