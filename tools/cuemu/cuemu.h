// cuemu.h: run CUDA C++ kernel source on the CPU, for tests (no GPU, no CUDA runtime).
//
// Compile a .cu as plain C++:  g++ -std=c++17 -O2 -x c++ -include cuemu.h file.cu
// Launch with cuemu::launch(kernel, grid, block, shmem, stream, args...) or
// cuemu::launcher(kernel, grid, block[, shmem, stream])(args...)  (`<<<...>>>` cannot be parsed
// by a host compiler; rewrite it into the second form).
//
// Model: every CUDA thread of a block is a fiber; the fibers of one block run on one OS thread
// and switch only at synchronisation points (__syncthreads, __syncwarp, warp shuffles / votes /
// reductions). Between two such points a thread runs alone, so any interleaving the emulator
// produces is one that Volta-style independent thread scheduling also allows. Warp collectives
// wait for exactly the lanes named in their mask and check that they all call the same
// collective with the same mask; reading a lane outside the mask, naming an exited or absent
// lane, and deadlocks (a barrier that can never complete) are reported as errors.
//
// Environment: CUEMU_SCHEDULE=forward|reverse|random (order in which threads, and blocks, run
// after each synchronisation point; default forward), CUEMU_SEED (for random), CUEMU_THREADS
// (OS threads that run blocks in parallel; default 1), CUEMU_STACK (bytes per fiber stack),
// CUEMU_STRICT=1 (also report __syncthreads reached by only part of the block: threads that
// exited early while others synchronised, or different barrier counts per thread).
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define CUEMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define CUEMU_TSAN 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer) && !defined(CUEMU_ASAN)
#define CUEMU_ASAN 1
#endif
#if __has_feature(thread_sanitizer) && !defined(CUEMU_TSAN)
#define CUEMU_TSAN 1
#endif
#endif
#if defined(CUEMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(CUEMU_TSAN)
#include <sanitizer/tsan_interface.h>
extern "C" void AnnotateIgnoreReadsBegin(const char*, int);
extern "C" void AnnotateIgnoreReadsEnd(const char*, int);
extern "C" void AnnotateIgnoreWritesBegin(const char*, int);
extern "C" void AnnotateIgnoreWritesEnd(const char*, int);
#endif
#if !defined(__x86_64__) && !defined(CUEMU_UCONTEXT)
#define CUEMU_UCONTEXT 1
#endif
#if defined(CUEMU_UCONTEXT)
#include <ucontext.h>
#endif

// ---- CUDA keywords ------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static thread_local  // one block per OS thread at a time: TLS = block memory
#define __constant__
#define __managed__
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#ifndef CUEMU_NO_ARCH_MACROS
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900  // device code paths are the ones compiled
#endif
#endif

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
inline constexpr int warpSize = 32;

// CUDA's vector types, with the alignment nvcc gives them (what makes float4 a 16-byte load;
// UBSan's alignment check reports one made from a misaligned pointer).
#define CUEMU_VEC2(T, N, ALIGN)           \
  struct alignas(ALIGN) N##2 { T x, y; }; \
  inline N##2 make_##N##2(T x, T y) { return N##2 {x, y}; }
#define CUEMU_VEC3(T, N)      \
  struct N##3 { T x, y, z; }; \
  inline N##3 make_##N##3(T x, T y, T z) { return N##3 {x, y, z}; }
#define CUEMU_VEC4(T, N, ALIGN)                 \
  struct alignas(ALIGN) N##4 { T x, y, z, w; }; \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4 {x, y, z, w}; }
// clang-format off
// (a list of macro calls without semicolons, which clang-format would indent as one statement)
CUEMU_VEC2(signed char, char, 2) CUEMU_VEC4(signed char, char, 4)
CUEMU_VEC2(unsigned char, uchar, 2) CUEMU_VEC4(unsigned char, uchar, 4)
CUEMU_VEC2(short, short, 4) CUEMU_VEC4(short, short, 8)
CUEMU_VEC2(unsigned short, ushort, 4) CUEMU_VEC4(unsigned short, ushort, 8)
CUEMU_VEC2(int, int, 8) CUEMU_VEC3(int, int) CUEMU_VEC4(int, int, 16)
CUEMU_VEC2(unsigned, uint, 8) CUEMU_VEC4(unsigned, uint, 16)
CUEMU_VEC2(long long, longlong, 16)
CUEMU_VEC2(unsigned long long, ulonglong, 16)
CUEMU_VEC2(float, float, 8) CUEMU_VEC3(float, float) CUEMU_VEC4(float, float, 16)
CUEMU_VEC2(double, double, 16)
#undef CUEMU_VEC2
#undef CUEMU_VEC3
#undef CUEMU_VEC4

typedef struct CUstream_st* cudaStream_t;
// clang-format on
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};

namespace cuemu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

// Under TSan the emulator's own bookkeeping is hidden from the race detector: the only
// happens-before edges between CUDA threads are the ones CUDA gives (__syncthreads,
// __syncwarp, kernel begin and end); shuffles and votes order no memory.
// (Blocks that run one after the other on the same OS thread are ordered for TSan, so that
// their reuse of shared memory and stacks is not taken for races; races between blocks are
// seen only between blocks that run at the same time, with CUEMU_THREADS > 1.)
#if defined(CUEMU_TSAN)
inline thread_local int tl_ignore_depth = 0;  // of the current fiber: a switch saves/restores it
inline int ignore_depth() { return __atomic_load_n(&tl_ignore_depth, __ATOMIC_RELAXED); }
inline void set_ignore_depth(int d) { __atomic_store_n(&tl_ignore_depth, d, __ATOMIC_RELAXED); }
#endif
struct Internal {
#if defined(CUEMU_TSAN)
  Internal() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
    set_ignore_depth(ignore_depth() + 1);
  }
  ~Internal() {
    set_ignore_depth(ignore_depth() - 1);
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
  // A TSan fiber left inside the emulator (it ended, or was abandoned on an error) keeps its
  // ignores: they are closed when the fiber is next used, or when the worker goes.
  static void end_n(int n) {
    for (; n > 0; --n) {
      AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
      AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    }
  }
#else
  Internal() noexcept {}  // (user-provided: no unused-variable warnings)
#endif
};

enum class Policy { Forward, Reverse, Random };
enum class St : unsigned char { Ready, WaitWarp, WaitBar, Exited };
enum Op : int {
  OpSyncwarp = 1,
  OpShfl,
  OpShflUp,
  OpShflDown,
  OpShflXor,
  OpBallot,
  OpAll,
  OpAny,
  OpRedAdd,
  OpRedMin,
  OpRedMax,
  OpRedAnd,
  OpRedOr,
  OpRedXor,
  OpRedMinS,
  OpRedMaxS
};

inline const char* op_name(int k) {
  static const char* const n[] = {"?",
                                  "__syncwarp",
                                  "__shfl_sync",
                                  "__shfl_up_sync",
                                  "__shfl_down_sync",
                                  "__shfl_xor_sync",
                                  "__ballot_sync",
                                  "__all_sync",
                                  "__any_sync",
                                  "__reduce_add_sync",
                                  "__reduce_min_sync",
                                  "__reduce_max_sync",
                                  "__reduce_and_sync",
                                  "__reduce_or_sync",
                                  "__reduce_xor_sync",
                                  "__reduce_min_sync",
                                  "__reduce_max_sync"};
  return k > 0 && k <= OpRedMaxS ? n[k] : n[0];
}

struct Config {
  Policy policy = Policy::Forward;
  unsigned seed = 1;
  unsigned threads = 1;
  std::size_t stack = 0;
  bool strict = false;
  Config() {
    if (const char* s = std::getenv("CUEMU_SCHEDULE")) {
      if (!std::strcmp(s, "reverse"))
        policy = Policy::Reverse;
      else if (!std::strcmp(s, "random"))
        policy = Policy::Random;
    }
    if (const char* s = std::getenv("CUEMU_SEED")) seed = unsigned(std::strtoul(s, nullptr, 10));
    if (const char* s = std::getenv("CUEMU_THREADS"))
      threads = std::max(1ul, std::strtoul(s, nullptr, 10));
    if (const char* s = std::getenv("CUEMU_STACK")) stack = std::strtoul(s, nullptr, 10);
    if (const char* s = std::getenv("CUEMU_STRICT")) strict = s[0] == '1';
#if defined(CUEMU_ASAN) || defined(CUEMU_TSAN)
    if (!stack) stack = 1u << 20;
#else
    if (!stack) stack = 64u << 10;
#endif
  }
};
inline Config& config() {
  static Config c;
  return c;
}

#if !defined(CUEMU_UCONTEXT)
// x86-64 System V: save callee-saved registers, MXCSR and the x87 control word on the old
// stack, switch stacks, restore them from the new one.
extern "C" void cuemu_ctx_switch(void** save_sp, void* to_sp);
__asm__(
    ".text\n"
    ".weak cuemu_ctx_switch\n"
    ".type cuemu_ctx_switch,@function\n"
    "cuemu_ctx_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $16, %rsp\n  stmxcsr 8(%rsp)\n  fnstcw (%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr 8(%rsp)\n  fldcw (%rsp)\n  addq $16, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size cuemu_ctx_switch,.-cuemu_ctx_switch\n");
#endif

struct Ctx {
#if defined(CUEMU_UCONTEXT)
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
  const void* stack_lo = nullptr;  // for the sanitizers
  std::size_t stack_size = 0;
#if defined(CUEMU_TSAN)
  void* tsan = nullptr;
  int ign = 0;  // its TSan ignore depth while switched out
#endif
};

struct Fiber {
  Ctx ctx;
  void* stack = nullptr;  // mmap'ed, lowest page a guard
  std::size_t stack_bytes = 0;
  St st = St::Ready;
  uint3 tid{0, 0, 0};
  unsigned lin = 0, lane = 0, warp = 0;
  unsigned bars = 0;  // __syncthreads passed
  bool started = false;
  int wait_op = 0;  // what it waits in, for reports
  unsigned wait_mask = 0;
  alignas(16) unsigned char res[16];  // result of its last warp collective
};

struct PendingOp {
  unsigned mask, arrived;
  int kind, width;
  unsigned size;
};

struct Warp {
  unsigned present = 0, exited = 0;
  std::vector<PendingOp> ops;
  alignas(16) unsigned char val[32][16];
  int arg[32];
};

struct Worker;
inline thread_local Worker* tl_worker = nullptr;
inline thread_local Fiber* tl_cur = nullptr;

struct Grid {
  void (*invoke)(const void*);  // runs the kernel body with its parameters
  const void* params;
  dim3 grid, block;
  std::size_t shmem = 0;  // dynamic shared memory per block, bytes
  std::atomic<unsigned long long> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string error;
  std::vector<unsigned long long> order;  // block order when not forward
  void fail(const std::string& msg) {
    std::lock_guard<std::mutex> lk(mu);
    if (!failed.exchange(true)) error = msg;
  }
};

inline std::string coord(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}
inline std::string hex(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

struct Worker {
  Config cfg = config();
  std::mt19937 rng{cfg.seed};
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned> q;  // ready ring
  unsigned qh = 0, qn = 0;
  Ctx sched;
  Grid* g = nullptr;
  dim3 bdim, gdim;
  uint3 bid{0, 0, 0};
  unsigned n = 0, live = 0, bar_arrived = 0;
  int bar_acc = 0;  // __syncthreads_count / _and / _or accumulator
  int bar_result = 0;
  int bar_kind = 0;  // 0 plain, 1 count, 2 and, 3 or
  bool err = false;
  std::string msg;
  std::vector<unsigned> tmp;
  std::vector<std::max_align_t> dyn_shared;  // this block's `extern __shared__` memory
#if defined(CUEMU_TSAN)
  char tsan_bar[2];       // release/acquire objects of alternate barrier generations
  char tsan_block_begin;  // the scheduler's set-up of a block -> its threads
  char tsan_block_end;    // a block's threads -> the scheduler (-> the next block)
  unsigned bar_gen = 0;
  std::vector<unsigned char> tsan_warp_gen;
  std::vector<char> tsan_warp_obj;  // 2 per warp
#endif

  Worker() {
#if defined(CUEMU_ASAN)
    pthread_attr_t a;
    void* lo = nullptr;
    std::size_t sz = 0;
    if (!pthread_getattr_np(pthread_self(), &a)) {
      pthread_attr_getstack(&a, &lo, &sz);
      pthread_attr_destroy(&a);
    }
    sched.stack_lo = lo;
    sched.stack_size = sz;
#endif
  }
  ~Worker() {
#if defined(CUEMU_TSAN)
    void* self = __tsan_get_current_fiber();
#endif
    for (auto& f : fibers) {
      if (f.stack) munmap(f.stack, f.stack_bytes);
#if defined(CUEMU_TSAN)
      if (!f.ctx.tsan) continue;
      if (const int n = __atomic_load_n(&f.ctx.ign, __ATOMIC_RELAXED)) {
        __tsan_switch_to_fiber(f.ctx.tsan, __tsan_switch_to_fiber_no_sync);  // TSan's view only
        Internal::end_n(n);
        __tsan_switch_to_fiber(self, __tsan_switch_to_fiber_no_sync);
      }
      __tsan_destroy_fiber(f.ctx.tsan);
#endif
    }
  }

  void push(unsigned i) {
    q[(qh + qn) % q.size()] = i;
    ++qn;
  }
  Fiber* pop() {
    if (!qn) return nullptr;
    const unsigned i = q[qh];
    qh = (qh + 1) % q.size();
    --qn;
    return &fibers[i];
  }
  // make ready, in the policy's order
  void release(std::vector<unsigned>& v) {
    if (cfg.policy == Policy::Reverse)
      std::reverse(v.begin(), v.end());
    else if (cfg.policy == Policy::Random)
      std::shuffle(v.begin(), v.end(), rng);
    for (unsigned i : v) {
      fibers[i].st = St::Ready;
      push(i);
    }
  }

  std::string who(const Fiber& f) const {
    return "thread " + coord(f.tid) + " of block " + coord(bid);
  }
  [[noreturn]] void fail(const std::string& m);
  void switch_to(Ctx& from, Ctx& to, bool from_exits = false);
  void yield();  // the current fiber waits; run the next ready one
  void run_block(const uint3& b);
  void deadlock();
};

#if defined(CUEMU_UCONTEXT)
inline void fiber_entry_uc();
#endif
[[noreturn]] inline void fiber_main();

// What a switch needs of its target, read before the switch (under TSan, while the
// emulator's accesses are still hidden).
struct Target {
#if defined(CUEMU_UCONTEXT)
  ucontext_t* uc;
#else
  void* sp;
#endif
  const void* lo;
  std::size_t size;
#if defined(CUEMU_TSAN)
  void* tsan;
#endif
  static Target of(Ctx& c) {
#if defined(CUEMU_UCONTEXT)
    Target t{&c.uc, c.stack_lo, c.stack_size};
#else
    Target t{c.sp, c.stack_lo, c.stack_size};
#endif
#if defined(CUEMU_TSAN)
    t.tsan = c.tsan;
#endif
    return t;
  }
};

inline void switch_raw(Ctx& from, const Target& to, bool from_exits) {
#if defined(CUEMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(from_exits ? nullptr : &fake, to.lo, to.size);
#else
  (void)from_exits;
#endif
#if defined(CUEMU_TSAN)
  __atomic_store_n(&from.ign, ignore_depth(), __ATOMIC_RELAXED);
  __tsan_switch_to_fiber(to.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(CUEMU_UCONTEXT)
  swapcontext(&from.uc, to.uc);
#else
  cuemu_ctx_switch(&from.sp, to.sp);
#endif
#if defined(CUEMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
#if defined(CUEMU_TSAN)
  set_ignore_depth(__atomic_load_n(&from.ign, __ATOMIC_RELAXED));
#endif
}

inline void Worker::switch_to(Ctx& from, Ctx& to, bool from_exits) {
  switch_raw(from, Target::of(to), from_exits);
}

inline void Worker::yield() {
  Fiber* cur = tl_cur;
  Fiber* next = pop();
  if (next == cur) return;
  tl_cur = next;
  switch_to(cur->ctx, next ? next->ctx : sched);
  tl_cur = cur;
}

inline void Worker::fail(const std::string& m) {
  if (!err) {
    err = true;
    msg = m;
  }
  Fiber* cur = tl_cur;
  tl_cur = nullptr;
  const Target t = Target::of(sched);
  switch_raw(cur->ctx, t, true);  // abandoned: never resumed
  std::abort();
}

inline std::string ranges(const std::vector<unsigned>& v) {
  std::string s;
  for (std::size_t i = 0; i < v.size();) {
    std::size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(v[i]);
    if (j > i) s += "-" + std::to_string(v[j]);
    i = j + 1;
  }
  return s;
}

inline void Worker::deadlock() {
  std::vector<unsigned> bar;
  std::string m = "deadlock in block " + coord(bid) + ": no thread can proceed;";
  for (unsigned i = 0; i < n; ++i)
    if (fibers[i].st == St::WaitBar) bar.push_back(i);
  if (!bar.empty()) m += " threads " + ranges(bar) + " wait in __syncthreads;";
  for (unsigned w = 0; w < warps.size(); ++w)
    for (auto& op : warps[w].ops) {
      std::vector<unsigned> in, missing;
      for (unsigned l = 0; l < 32; ++l) {
        if (op.arrived >> l & 1)
          in.push_back(w * 32 + l);
        else if (op.mask >> l & 1)
          missing.push_back(w * 32 + l);
      }
      m += " threads " + ranges(in) + " wait in " + op_name(op.kind) + "(mask " + hex(op.mask) +
           ") for threads " + ranges(missing) + ";";
    }
  err = true;
  msg = m;
}

inline void Worker::run_block(const uint3& b) {
  bid = b;
  n = bdim.x * bdim.y * bdim.z;
  const unsigned nw = (n + 31) / 32;
  if (fibers.size() < n) fibers.resize(n);
  if (warps.size() < nw) warps.resize(nw);
  if (q.size() < n) q.assign(n, 0);
  qh = qn = 0;
  live = n;
  bar_arrived = 0;
  // Shared memory starts undefined on a GPU: 0xff bytes (NaN as floats, -1 as integers), so
  // that a read before the first write shows in the results.
  if (g->shmem) {
    Internal in;
    dyn_shared.resize((g->shmem + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t));
    std::memset(dyn_shared.data(), 0xff, dyn_shared.size() * sizeof(std::max_align_t));
  }
  bar_kind = 0;
  err = false;
  for (unsigned w = 0; w < nw; ++w) {
    const unsigned cnt = std::min(32u, n - w * 32);
    warps[w].present = cnt == 32 ? 0xffffffffu : ((1u << cnt) - 1);
    warps[w].exited = 0;
    warps[w].ops.clear();
  }
#if defined(CUEMU_TSAN)
  tsan_warp_gen.assign(nw, 0);
  tsan_warp_obj.assign(2 * nw, 0);
#endif
  const std::size_t page = std::size_t(sysconf(_SC_PAGESIZE));
  const std::size_t bytes = (cfg.stack + page - 1) / page * page + page;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    if (!f.stack || f.stack_bytes != bytes) {
      if (f.stack) munmap(f.stack, f.stack_bytes);
      f.stack = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (f.stack == MAP_FAILED) throw Error("cuemu: cannot allocate fiber stacks");
      mprotect(f.stack, page, PROT_NONE);  // overflow faults instead of corrupting
      f.stack_bytes = bytes;
#if defined(CUEMU_TSAN)
      // one TSan thread per thread index of this worker, kept across blocks (its stack is
      // reused by the same index), so races between the same index of two blocks go unseen
      if (!f.ctx.tsan) f.ctx.tsan = __tsan_create_fiber(0);
#endif
    }
    f.st = St::Ready;
    f.lin = i;
    f.lane = i % 32;
    f.warp = i / 32;
    f.tid = uint3{i % bdim.x, (i / bdim.x) % bdim.y, i / (bdim.x * bdim.y)};
    f.bars = 0;
    f.wait_op = 0;
    f.started = false;
    char* lo = static_cast<char*>(f.stack) + page;
    const std::size_t size = bytes - page;
    f.ctx.stack_lo = lo;
    f.ctx.stack_size = size;
#if defined(CUEMU_ASAN)
    __asan_unpoison_memory_region(lo, size);  // frames of an abandoned fiber
#endif
#if defined(CUEMU_UCONTEXT)
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = lo;
    f.ctx.uc.uc_stack.ss_size = size;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, fiber_entry_uc, 0);
#else
    // a frame that cuemu_ctx_switch "returns" from into fiber_main, 16-byte aligned as a call
    std::uintptr_t top = (reinterpret_cast<std::uintptr_t>(lo) + size) & ~std::uintptr_t(15);
    auto* sp = reinterpret_cast<std::uint64_t*>(top - 128);
    std::memset(sp, 0, 128);
    const std::uint16_t fpucw = 0x037f;
    const std::uint32_t mxcsr = 0x1f80;
    std::memcpy(reinterpret_cast<char*>(sp), &fpucw, 2);
    std::memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, 4);
    sp[8] = reinterpret_cast<std::uint64_t>(&fiber_main);
    f.ctx.sp = sp;
#endif
  }
  tmp.clear();
  for (unsigned i = 0; i < n; ++i) tmp.push_back(i);
  release(tmp);
#if defined(CUEMU_TSAN)
  sched.tsan = __tsan_get_current_fiber();
  __tsan_release(&tsan_block_begin);
#endif
  while (!err) {
    Fiber* f = pop();
    if (!f) {
      if (live) deadlock();
      break;
    }
    {
      Internal in;  // (tl_cur is read by threadIdx: keep these writes out of TSan's view)
      tl_cur = f;
    }
    switch_to(sched, f->ctx);
    Internal in;
    tl_cur = nullptr;
  }
#if defined(CUEMU_TSAN)
  if (err) {  // threads abandoned mid-kernel: end them in TSan's view
    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = fibers[i];
      if (!f.started || f.st == St::Exited) continue;
      __tsan_switch_to_fiber(f.ctx.tsan, __tsan_switch_to_fiber_no_sync);
      Internal::end_n(__atomic_exchange_n(&f.ctx.ign, 0, __ATOMIC_RELAXED));
      __tsan_release(&tsan_block_end);
      __tsan_switch_to_fiber(sched.tsan, __tsan_switch_to_fiber_no_sync);
    }
  }
  __tsan_acquire(&tsan_block_end);
#endif
  if (!err && cfg.strict) {
    for (unsigned i = 1; i < n; ++i)
      if (fibers[i].bars != fibers[0].bars) {
        err = true;
        msg = "CUEMU_STRICT: in block " + coord(bid) + " thread " + coord(fibers[i].tid) +
              " passed " + std::to_string(fibers[i].bars) + " __syncthreads, thread (0,0,0) " +
              std::to_string(fibers[0].bars);
        break;
      }
  }
}

#if defined(CUEMU_TSAN)
inline char g_tsan_launch_begin, g_tsan_launch_end;  // host -> kernel, kernel -> host
#endif

// A thread ends: it can no longer hold up a barrier; a collective still waiting for it fails.
inline void on_exit(Worker& w, Fiber& f) {
  f.st = St::Exited;
  --w.live;
  Warp& wp = w.warps[f.warp];
  wp.exited |= 1u << f.lane;
  for (auto& op : wp.ops)
    if (op.mask >> f.lane & 1)
      w.fail(w.who(f) + " exited while lanes of its warp wait for it in " + op_name(op.kind) +
             "(mask " + hex(op.mask) + ")");
  if (w.bar_arrived && w.bar_arrived == w.live) {
    if (w.cfg.strict)
      w.fail("CUEMU_STRICT: " + w.who(f) + " exited while other threads wait in __syncthreads");
    w.tmp.clear();
    for (unsigned i = 0; i < w.n; ++i)
      if (w.fibers[i].st == St::WaitBar) w.tmp.push_back(i);
    w.bar_result = w.bar_acc;
    w.bar_arrived = 0;
#if defined(CUEMU_TSAN)
    ++w.bar_gen;
#endif
    w.release(w.tmp);
  }
#if defined(CUEMU_TSAN)
  __tsan_release(&g_tsan_launch_end);
  __tsan_release(&w.tsan_block_end);
#endif
}

[[noreturn]] inline void fiber_main() {
#if defined(CUEMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
#if defined(CUEMU_TSAN)
  {
    int left;
    {
      Internal in;
      left = __atomic_load_n(&tl_cur->ctx.ign, __ATOMIC_RELAXED);
      tl_cur->started = true;
    }
    Internal::end_n(left);
  }
  set_ignore_depth(0);
  __tsan_acquire(&g_tsan_launch_begin);
  __tsan_acquire(&tl_worker->tsan_block_begin);
#endif
  Worker* wp;
  Fiber* fp;
  void (*invoke)(const void*);
  const void* params;
  {
    Internal in;
    wp = tl_worker;
    fp = tl_cur;
    invoke = wp->g->invoke;
    params = wp->g->params;
  }
  invoke(params);
  Internal in;
  on_exit(*wp, *fp);
  Fiber* next = wp->pop();
  tl_cur = next;
  switch_raw(fp->ctx, Target::of(next ? next->ctx : wp->sched), true);
  std::abort();
}

#if defined(CUEMU_UCONTEXT)
inline void fiber_entry_uc() { fiber_main(); }
#endif

// ---- warp collectives -----------------------------------------------------------------------

inline void check_width(Worker& w, Fiber& f, int kind, int width) {
  if (width < 1 || width > 32 || (width & (width - 1)))
    w.fail(w.who(f) + ": " + op_name(kind) + " width " + std::to_string(width) +
           " is not a power of two in [1, 32]");
}

// The calling lane joins the collective `kind` over `mask`, with value `val` (size bytes) and
// argument `arg`; returns when every lane of the mask has joined, its result in f.res.
inline void collective(int kind, unsigned mask, const void* val, unsigned size, int arg,
                       int width) {
  Internal in;
  Worker& w = *tl_worker;
  Fiber& f = *tl_cur;
  Warp& wp = w.warps[f.warp];
  const unsigned bit = 1u << f.lane;
  if (!(mask & bit))
    w.fail(w.who(f) + " calls " + op_name(kind) + " with mask " + hex(mask) +
           " that does not name its own lane " + std::to_string(f.lane));
  if (mask & ~wp.present)
    w.fail(w.who(f) + ": " + op_name(kind) + " mask " + hex(mask) +
           " names lanes that do not exist in this block (warp has " + hex(wp.present) + ")");
  if (mask & wp.exited)
    w.fail(w.who(f) + ": " + op_name(kind) + " mask " + hex(mask) + " names exited lanes " +
           hex(mask & wp.exited));
  PendingOp* op = nullptr;
  for (auto& o : wp.ops)
    if (o.mask & bit)
      op = &o;
    else if (o.mask & mask)
      w.fail(w.who(f) + " calls " + op_name(kind) + " with mask " + hex(mask) + " while lanes " +
             hex(o.arrived) + " wait in " + op_name(o.kind) + " with mask " + hex(o.mask));
  if (op && (op->kind != kind || op->mask != mask || op->size != size || op->width != width))
    w.fail(w.who(f) + " calls " + op_name(kind) + "(mask " + hex(mask) + ", width " +
           std::to_string(width) + ") while lanes " + hex(op->arrived) + " wait in " +
           op_name(op->kind) + "(mask " + hex(op->mask) + ", width " + std::to_string(op->width) +
           ")");
  if (!op) {
    wp.ops.push_back(PendingOp{mask, 0, kind, width, size});
    op = &wp.ops.back();
  }
  if (size) std::memcpy(wp.val[f.lane], val, size);
  wp.arg[f.lane] = arg;
  op->arrived |= bit;
#if defined(CUEMU_TSAN)
  const bool orders = kind == OpSyncwarp;  // shuffles and votes order no memory
  char* sync = &w.tsan_warp_obj[2 * f.warp + (w.tsan_warp_gen[f.warp] & 1)];
  if (orders) __tsan_release(sync);
#endif
  if (op->arrived == mask) {
    // every lane is here: compute each lane's result, then let them all go on
    const unsigned m = mask;
    const int c = op->width;
    for (unsigned l = 0; l < 32; ++l) {
      if (!(m >> l & 1)) continue;
      Fiber& lf = w.fibers[f.warp * 32 + l];
      int src = int(l);
      const int seg = int(l) & ~(c - 1);
      switch (kind) {
        case OpShfl:
          src = seg + (wp.arg[l] & (c - 1));
          break;
        case OpShflUp:
          src = (int(l) - seg) >= wp.arg[l] ? int(l) - wp.arg[l] : int(l);
          break;
        case OpShflDown:
          src = (int(l) - seg) + wp.arg[l] < c ? int(l) + wp.arg[l] : int(l);
          break;
        case OpShflXor:
          src = int(l) ^ wp.arg[l];
          if (src >= seg + c) src = int(l);
          break;
        default:
          break;
      }
      if (kind >= OpShfl && kind <= OpShflXor) {
        if (src < 0 || src > 31 || !(m >> src & 1))
          w.fail(w.who(lf) + ": " + op_name(kind) + "(mask " + hex(m) + ") reads lane " +
                 std::to_string(src) + ", which is not in the mask (undefined on a GPU)");
        std::memcpy(lf.res, wp.val[src], size);
      } else if (kind == OpBallot || kind == OpAll || kind == OpAny) {
        unsigned b = 0;
        for (unsigned k = 0; k < 32; ++k)
          if ((m >> k & 1) && wp.arg[k]) b |= 1u << k;
        const unsigned r = kind == OpBallot ? b
                           : kind == OpAll  ? unsigned(b == m)
                                            : unsigned(b != 0);
        std::memcpy(lf.res, &r, 4);
      } else if (kind >= OpRedAdd) {
        unsigned r = kind == OpRedMin ? ~0u : kind == OpRedAnd ? ~0u : 0u;
        int rs = kind == OpRedMinS ? INT32_MAX : INT32_MIN;
        for (unsigned k = 0; k < 32; ++k) {
          if (!(m >> k & 1)) continue;
          unsigned v;
          std::memcpy(&v, wp.val[k], 4);
          switch (kind) {
            case OpRedAdd:
              r += v;
              break;
            case OpRedMin:
              r = std::min(r, v);
              break;
            case OpRedMax:
              r = std::max(r, v);
              break;
            case OpRedAnd:
              r &= v;
              break;
            case OpRedOr:
              r |= v;
              break;
            case OpRedXor:
              r ^= v;
              break;
            case OpRedMinS:
              rs = std::min(rs, int(v));
              break;
            case OpRedMaxS:
              rs = std::max(rs, int(v));
              break;
          }
        }
        if (kind == OpRedMinS || kind == OpRedMaxS) std::memcpy(&r, &rs, 4);
        std::memcpy(lf.res, &r, 4);
      }
    }
    wp.ops.erase(wp.ops.begin() + (op - wp.ops.data()));
#if defined(CUEMU_TSAN)
    if (orders) ++w.tsan_warp_gen[f.warp];
#endif
    w.tmp.clear();
    for (unsigned l = 0; l < 32; ++l)
      if (m >> l & 1) w.tmp.push_back(f.warp * 32 + l);
    w.release(w.tmp);  // the last arrival waits its turn too, so the policy orders every lane
  } else {
    f.st = St::WaitWarp;
    f.wait_op = kind;
    f.wait_mask = mask;
  }
  w.yield();
#if defined(CUEMU_TSAN)
  if (orders) __tsan_acquire(sync);
#endif
}

inline int block_barrier(int kind, int pred) {
  Internal in;
  Worker& w = *tl_worker;
  Fiber& f = *tl_cur;
#if defined(CUEMU_TSAN)
  char* sync = &w.tsan_bar[w.bar_gen & 1];
  __tsan_release(sync);
#endif
  if (w.bar_arrived == 0) {
    w.bar_kind = kind;
    w.bar_acc = kind == 2 ? 1 : 0;
  }
  if (kind == 1)
    w.bar_acc += pred != 0;
  else if (kind == 2)
    w.bar_acc &= pred != 0;
  else if (kind == 3)
    w.bar_acc |= pred != 0;
  ++f.bars;
  f.st = St::WaitBar;
  if (++w.bar_arrived == w.live) {
    w.bar_result = w.bar_acc;
    w.bar_arrived = 0;
#if defined(CUEMU_TSAN)
    ++w.bar_gen;
#endif
    w.tmp.clear();
    for (unsigned i = 0; i < w.n; ++i)
      if (w.fibers[i].st == St::WaitBar) w.tmp.push_back(i);
    w.release(w.tmp);
  }
  w.yield();
#if defined(CUEMU_TSAN)
  __tsan_acquire(sync);
#endif
  return w.bar_result;
}

template <typename T>
inline T shfl(int kind, unsigned mask, T v, int arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16,
                "warp shuffle of a type that is not trivially copyable or larger than 16 bytes");
  Internal in;
  check_width(*tl_worker, *tl_cur, kind, width);
  collective(kind, mask, &v, sizeof(T), arg, width);
  T r;
  std::memcpy(&r, tl_cur->res, sizeof(T));
  return r;
}
inline unsigned vote(int kind, unsigned mask, int pred) {
  Internal in;
  collective(kind, mask, nullptr, 0, pred != 0, 32);
  unsigned r;
  std::memcpy(&r, tl_cur->res, 4);
  return r;
}
inline unsigned reduce(int kind, unsigned mask, unsigned v) {
  Internal in;
  collective(kind, mask, &v, 4, 0, 32);
  unsigned r;
  std::memcpy(&r, tl_cur->res, 4);
  return r;
}

inline Worker& worker() {
  thread_local Worker w;
  return w;
}

inline void run_blocks(Grid& g) {
  Worker& w = worker();
  {
    Internal in;
    tl_worker = &w;
  }
  w.g = &g;
  w.bdim = g.block;
  w.gdim = g.grid;
  const unsigned long long nb = (unsigned long long)g.grid.x * g.grid.y * g.grid.z;
  while (!g.failed.load(std::memory_order_relaxed)) {
    unsigned long long i = g.next.fetch_add(1);
    if (i >= nb) break;
    if (!g.order.empty()) i = g.order[i];
    const uint3 b{unsigned(i % g.grid.x), unsigned((i / g.grid.x) % g.grid.y),
                  unsigned(i / ((unsigned long long)g.grid.x * g.grid.y))};
    w.run_block(b);
    if (w.err) g.fail(w.msg);
  }
  Internal in;  // (read by blockIdx & co.)
  tl_worker = nullptr;
}

// A failed launch throws cuemu::Error instead (the host wrappers' launch checks then have
// nothing to find); nothing sets this yet.
inline cudaError_t& last_error() {
  static thread_local cudaError_t e = cudaSuccess;
  return e;
}

struct LaunchLog {
  std::mutex mu;
  std::map<std::string, unsigned long long> counts;
};
inline LaunchLog& launch_log() {
  static LaunchLog log;
  return log;
}
inline void count_launch(const char* name) {
  if (!name) return;
  auto& log = launch_log();
  std::lock_guard<std::mutex> lk(log.mu);
  ++log.counts[name];
}

template <typename Tuple, typename K>
struct Invoker {
  static void run(const void* p) {
    const auto& pk = *static_cast<const std::pair<K, Tuple>*>(p);
    std::apply(pk.first, pk.second);  // each thread gets its own copy of the parameters
  }
};

}  // namespace detail

// Runs kernel over grid x block; returns when the whole grid is done (launches are
// synchronous). Throws cuemu::Error on a bad configuration or an emulation error.
// The most dynamic shared memory a block may ask for: the 227 KiB of an H100/H200 SM, which
// needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize) beyond 48 KiB on a real device.
inline constexpr std::size_t kMaxDynamicShared = 227u << 10;

template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shmem,
            cudaStream_t stream, A&&... args) {
  (void)stream;
  static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
  using detail::Grid;
  const unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
  if (!grid.x || !grid.y || !grid.z || !nthreads || nthreads > 1024 || block.z > 64 ||
      grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u || shmem > kMaxDynamicShared) {
    // (the exception reports it: cudaGetLastError stays clean for the next launch's check)
    throw Error(std::string("cuemu: invalid launch configuration of ") +
                (name ? name : "a kernel") + ": grid " + detail::coord(grid) + " block " +
                detail::coord(block) + " dynamic shared memory " + std::to_string(shmem) +
                " bytes");
  }
  detail::count_launch(name);
  using Tuple = std::tuple<std::decay_t<P>...>;
  using K = void (*)(P...);
  const std::pair<K, Tuple> pk(kernel, Tuple(std::forward<A>(args)...));
  Grid g;
  g.invoke = &detail::Invoker<Tuple, K>::run;
  g.params = &pk;
  g.grid = grid;
  g.block = block;
  g.shmem = shmem;
  const auto& cfg = detail::config();
  const unsigned long long nb = (unsigned long long)grid.x * grid.y * grid.z;
  if (cfg.policy != detail::Policy::Forward) {
    g.order.resize(nb);
    for (unsigned long long i = 0; i < nb; ++i) g.order[i] = i;
    if (cfg.policy == detail::Policy::Reverse)
      std::reverse(g.order.begin(), g.order.end());
    else
      std::shuffle(g.order.begin(), g.order.end(), std::mt19937(cfg.seed));
  }
#if defined(CUEMU_TSAN)
  __tsan_release(&detail::g_tsan_launch_begin);
#endif
  const unsigned nw = unsigned(std::min<unsigned long long>(cfg.threads, nb));
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < nw; ++t) pool.emplace_back([&g] { detail::run_blocks(g); });
  detail::run_blocks(g);
  for (auto& t : pool) t.join();
#if defined(CUEMU_TSAN)
  __tsan_acquire(&detail::g_tsan_launch_end);
#endif
  if (g.failed) throw Error("cuemu: " + g.error);
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shmem, cudaStream_t stream,
            A&&... args) {
  launch(nullptr, kernel, grid, block, shmem, stream, std::forward<A>(args)...);
}

template <typename... P>
struct Launcher {
  const char* name;
  void (*kernel)(P...);
  dim3 grid, block;
  std::size_t shmem;
  cudaStream_t stream;
  template <typename... A>
  void operator()(A&&... args) const {
    launch(name, kernel, grid, block, shmem, stream, std::forward<A>(args)...);
  }
};
// cuemu::launcher(k, grid, block, shmem, stream)(args...) mirrors k<<<grid, block, shmem,
// stream>>>(args...); with a name first, the launch is counted under that name (see launch_counts).
template <typename... P>
Launcher<P...> launcher(const char* name, void (*kernel)(P...), dim3 grid, dim3 block,
                        std::size_t shmem = 0, cudaStream_t stream = nullptr) {
  return Launcher<P...>{name, kernel, grid, block, shmem, stream};
}
template <typename... P>
Launcher<P...> launcher(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shmem = 0,
                        cudaStream_t stream = nullptr) {
  return Launcher<P...>{nullptr, kernel, grid, block, shmem, stream};
}

// Launches since the process started, per kernel name (of the named launches).
inline std::map<std::string, unsigned long long> launch_counts() {
  auto& log = detail::launch_log();
  std::lock_guard<std::mutex> lk(log.mu);
  return log.counts;
}

// The calling block's dynamic shared memory (`extern __shared__ T name[];` in CUDA).
inline void* dynamic_shared() {
  detail::Internal in;
  detail::Worker& w = *detail::tl_worker;
  return w.dyn_shared.empty() ? nullptr : static_cast<void*>(w.dyn_shared.data());
}

}  // namespace cuemu

// ---- built-in variables ---------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::cuemu::detail::tl_cur->tid))
#define blockIdx (static_cast<const uint3&>(::cuemu::detail::tl_worker->bid))
#define blockDim (static_cast<const dim3&>(::cuemu::detail::tl_worker->bdim))
#define gridDim (static_cast<const dim3&>(::cuemu::detail::tl_worker->gdim))

// ---- synchronisation and warp intrinsics ----------------------------------------------------
inline void __syncthreads() { ::cuemu::detail::block_barrier(0, 0); }
inline int __syncthreads_count(int p) { return ::cuemu::detail::block_barrier(1, p); }
inline int __syncthreads_and(int p) { return ::cuemu::detail::block_barrier(2, p); }
inline int __syncthreads_or(int p) { return ::cuemu::detail::block_barrier(3, p); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cuemu::detail::collective(::cuemu::detail::OpSyncwarp, mask, nullptr, 0, 0, 32);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  return ::cuemu::detail::shfl(::cuemu::detail::OpShfl, mask, v, src, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return ::cuemu::detail::shfl(::cuemu::detail::OpShflUp, mask, v, int(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return ::cuemu::detail::shfl(::cuemu::detail::OpShflDown, mask, v, int(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return ::cuemu::detail::shfl(::cuemu::detail::OpShflXor, mask, v, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  return ::cuemu::detail::vote(::cuemu::detail::OpBallot, mask, p);
}
inline int __all_sync(unsigned mask, int p) {
  return int(::cuemu::detail::vote(::cuemu::detail::OpAll, mask, p));
}
inline int __any_sync(unsigned mask, int p) {
  return int(::cuemu::detail::vote(::cuemu::detail::OpAny, mask, p));
}
inline unsigned __reduce_add_sync(unsigned m, unsigned v) {
  return ::cuemu::detail::reduce(::cuemu::detail::OpRedAdd, m, v);
}
inline unsigned __reduce_min_sync(unsigned m, unsigned v) {
  return ::cuemu::detail::reduce(::cuemu::detail::OpRedMin, m, v);
}
inline unsigned __reduce_max_sync(unsigned m, unsigned v) {
  return ::cuemu::detail::reduce(::cuemu::detail::OpRedMax, m, v);
}
inline int __reduce_add_sync(unsigned m, int v) {
  return int(::cuemu::detail::reduce(::cuemu::detail::OpRedAdd, m, unsigned(v)));
}
inline int __reduce_min_sync(unsigned m, int v) {
  return int(::cuemu::detail::reduce(::cuemu::detail::OpRedMinS, m, unsigned(v)));
}
inline int __reduce_max_sync(unsigned m, int v) {
  return int(::cuemu::detail::reduce(::cuemu::detail::OpRedMaxS, m, unsigned(v)));
}
inline unsigned __reduce_and_sync(unsigned m, unsigned v) {
  return ::cuemu::detail::reduce(::cuemu::detail::OpRedAnd, m, v);
}
inline unsigned __reduce_or_sync(unsigned m, unsigned v) {
  return ::cuemu::detail::reduce(::cuemu::detail::OpRedOr, m, v);
}
inline unsigned __reduce_xor_sync(unsigned m, unsigned v) {
  return ::cuemu::detail::reduce(::cuemu::detail::OpRedXor, m, v);
}
// No notion of convergence here: the lanes of the warp that have not exited.
inline unsigned __activemask() {
  ::cuemu::detail::Internal in;
  auto& w = ::cuemu::detail::tl_worker->warps[::cuemu::detail::tl_cur->warp];
  return w.present & ~w.exited;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap() {
  ::cuemu::detail::Internal in;
  ::cuemu::detail::tl_worker->fail("__trap() called");
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- arithmetic intrinsics ------------------------------------------------------------------
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __drcp_rn(double a) { return 1.0 / a; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
// fast-math intrinsics: the accurate functions (results differ from the GPU's approximations)
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __log2f(float a) { return std::log2(a); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __sinf(float a) { return std::sin(a); }
inline float __cosf(float a) { return std::cos(a); }
inline float __saturatef(float a) { return a != a ? 0.0f : a < 0.0f ? 0.0f : a > 1.0f ? 1.0f : a; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline unsigned __float_as_uint(float f) {
  unsigned i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __uint_as_float(unsigned i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline long long __double_as_longlong(double d) {
  long long i;
  std::memcpy(&i, &d, 8);
  return i;
}
inline double __longlong_as_double(long long i) {
  double d;
  std::memcpy(&d, &i, 8);
  return d;
}
inline int __float2int_rn(float f) { return int(std::nearbyint(f)); }
inline int __float2int_rz(float f) { return int(std::trunc(f)); }
inline int __float2int_rd(float f) { return int(std::floor(f)); }
inline int __float2int_ru(float f) { return int(std::ceil(f)); }
inline float __int2float_rn(int i) { return float(i); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(unsigned(x)) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline int __mulhi(int a, int b) { return int((long long)a * b >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return unsigned((unsigned long long)a * b >> 32);
}
inline int __mul24(int a, int b) { return int(unsigned(a << 8 >> 8) * unsigned(b << 8 >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }

// ---- atomics (real atomics: blocks may run on several OS threads) ---------------------------
template <typename T>
inline T atomicAdd(T* p, T v) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  } else {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, T(old + v), true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
    return old;
  }
}
template <typename T>
inline T atomicSub(T* p, T v) {
  return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicExch(T* p, T v) {
  return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return cmp;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v &&
         !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < old &&
         !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
inline T atomicAnd(T* p, T v) {
  return __atomic_fetch_and(p, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicOr(T* p, T v) {
  return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicXor(T* p, T v) {
  return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED);
}

// ---- a little of the host runtime, so that test launchers read like CUDA host code ----------
inline cudaError_t cudaMalloc(void** p, std::size_t n) {
  *p = std::malloc(n ? n : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <typename T>
inline cudaError_t cudaMalloc(T** p, std::size_t n) {
  return cudaMalloc(reinterpret_cast<void**>(p), n);
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, std::size_t n, cudaMemcpyKind) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, std::size_t n, cudaMemcpyKind k,
                                   cudaStream_t = nullptr) {
  return cudaMemcpy(d, s, n, k);
}
inline cudaError_t cudaMemset(void* d, int v, std::size_t n) {
  std::memset(d, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
// The emulated device: one, with an H100/H200's shared memory per block.
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0 || attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = static_cast<int>(::cuemu::kMaxDynamicShared);
  return cudaSuccess;
}
// Opting a kernel in to more than 48 KiB of dynamic shared memory: launch() allows up to
// kMaxDynamicShared whatever was set, so only the value is checked here.
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K*, cudaFuncAttribute, int value) {
  return value >= 0 && std::size_t(value) <= ::cuemu::kMaxDynamicShared ? cudaSuccess
                                                                        : cudaErrorInvalidValue;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::cuemu::detail::last_error();
  ::cuemu::detail::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::cuemu::detail::last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    default:
      return "invalid argument";
  }
}
