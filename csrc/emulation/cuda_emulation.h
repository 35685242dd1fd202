// A CPU emulation of the CUDA features csrc/'s kernels use, so that the tests run the kernels' own
// source on a machine without a GPU (as TRITON_INTERPRET=1 runs the Triton kernels). Included first
// by harness.cpp, with LORA_KERNELS_EMULATION defined, before the kernel headers
// (nf4_gemv_kernels.cuh, nf4_gemv_mma_kernel.cuh), which take their emulated branches for the few
// hardware operations that have no C++ spelling (mma.sync, cp.async, shared-memory loads by address).
//
// Execution model: every CUDA thread of a block is a fiber (ucontext) on the calling OS thread; the
// blocks of a grid run one after the other. A fiber runs until it reaches a synchronisation point
// (__syncthreads, a warp shuffle, an mma), so every interleaving the kernels may rely on is one the
// hardware allows; the order threads are resumed in is selectable (ascending, descending, seeded
// shuffles), so that a missing barrier changes results between orders. The emulation is strict where the hardware is undefined or racy, and reports
// instead of hanging or reading garbage:
//  * a barrier that not every thread of the block (or lane of the warp) reaches -- divergent
//    __syncthreads, early exits -- is a deadlock, reported with what each thread waits for;
//  * cp.async copies land only when cp.async.wait_group lets them (the latest moment the hardware
//    may deliver them); a shared-memory load of bytes that a pending copy of the same thread will
//    write, and a thread exiting with copies pending, are errors;
//  * __ldg and cp.async sources must lie in the ranges the harness registered (the kernel's inputs)
//    and be aligned to their size; shared-memory addresses must lie in the dynamic shared memory;
//  * dynamic shared memory starts as 0xff bytes (NaN in every float format), so a value read before
//    it is written shows in the results.
// Arithmetic is the host's IEEE single precision without contraction (build with -ffp-contract=off):
// __fmul_rn / __fadd_rn are exact emulations; an mma sums its 16 products in double and rounds once.
#pragma once
#ifndef LORA_KERNELS_EMULATION
#error "define LORA_KERNELS_EMULATION before including cuda_emulation.h"
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>  // cudaStream_t, for the launchers' shared host code
#include <ucontext.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

// The host compiler's CUDA headers define __shared__ as nothing: a kernel's __shared__ array would
// then be a local array per thread. One block runs at a time, so a static is its block's array.
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

namespace lora_kernels {
namespace emulation {

struct Copy {
  uint32_t dst;
  const void* src;
  int bytes;
};
struct Thread {
  ucontext_t context;
  uint3 index;
  bool done = false;
  const uint64_t* wait_on = nullptr;  // blocked while *wait_on == wait_value
  uint64_t wait_value = 0;
  const char* waits_for = "";
  std::vector<Copy> open;                   // cp.async copies not committed yet
  std::deque<std::vector<Copy>> committed;  // committed groups, oldest first
};
struct Warp {
  int arrived = 0;
  uint64_t generation = 0;
  uint32_t words[32][6];
};
struct Range {
  const char* begin;
  size_t bytes;
  std::string name;
};

struct State {
  uint3 block_index, grid_dim, block_dim;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  int barrier_arrived = 0;
  uint64_t barrier_generation = 0;
  std::vector<uint4> shared_words;  // dynamic shared memory, 16-byte aligned
  size_t shared_bytes = 0;
  std::vector<char> stacks;
  int current = -1;
  ucontext_t scheduler;
  std::function<void()> body;
  std::string error;
  std::vector<Range> readable;
  // The order the scheduler resumes threads in, per block: 0 ascending, 1 descending, else a
  // permutation drawn from this seed. Correct kernels give the same results in every order.
  uint64_t schedule = 0;
};
inline State& state() {
  static State s;
  return s;
}
inline Thread& self() { return state().threads[state().current]; }
inline int linear_thread_index() {
  const State& s = state();
  const uint3 t = s.threads[s.current].index;
  return static_cast<int>(t.x + s.block_dim.x * (t.y + s.block_dim.y * t.z));
}

// Records the first error and abandons the calling thread (its fiber is never resumed).
inline void fail(const std::string& message) {
  State& s = state();
  if (s.error.empty()) {
    s.error = message + " (block " + std::to_string(s.block_index.x) + "," + std::to_string(s.block_index.y) +
              ", thread " + std::to_string(s.current < 0 ? -1 : linear_thread_index()) + ")";
  }
  if (s.current >= 0) swapcontext(&self().context, &s.scheduler);
}
inline void block_until_changed(const uint64_t* generation, uint64_t value, const char* what) {
  Thread& t = self();
  t.wait_on = generation;
  t.wait_value = value;
  t.waits_for = what;
  swapcontext(&t.context, &state().scheduler);
}

// ---- memory

inline void allow_reads(const void* begin, size_t bytes, const char* name) {
  state().readable.push_back({static_cast<const char*>(begin), bytes, name});
}
inline void check_readable(const void* p, size_t bytes, const char* what) {
  const char* c = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) fail(std::string(what) + ": address not aligned to its size");
  for (const Range& r : state().readable) {
    if (c >= r.begin && c + bytes <= r.begin + r.bytes) return;
  }
  fail(std::string(what) + ": reads outside every input tensor");
}
inline unsigned char* dynamic_shared() { return reinterpret_cast<unsigned char*>(state().shared_words.data()); }
inline void check_shared(uint32_t addr, size_t bytes, const char* what) {
  if (addr % bytes != 0) fail(std::string(what) + ": shared address not aligned to its size");
  if (addr + bytes > state().shared_bytes) fail(std::string(what) + ": outside the dynamic shared memory");
}
inline bool overlaps(const Copy& c, uint32_t addr, size_t bytes) {
  return c.dst < addr + bytes && addr < c.dst + static_cast<uint32_t>(c.bytes);
}
template <typename V>
V load_shared(uint32_t addr) {
  check_shared(addr, sizeof(V), "ld.shared");
  const Thread& t = self();
  for (const Copy& c : t.open) {
    if (overlaps(c, addr, sizeof(V))) fail("ld.shared of bytes an uncommitted cp.async of this thread writes");
  }
  for (const auto& group : t.committed) {
    for (const Copy& c : group) {
      if (overlaps(c, addr, sizeof(V))) fail("ld.shared of bytes a cp.async of this thread has not landed yet");
    }
  }
  V v;
  std::memcpy(&v, dynamic_shared() + addr, sizeof(V));
  return v;
}
inline void cp_async(uint32_t dst, const void* src, int bytes) {
  check_shared(dst, bytes, "cp.async destination");
  check_readable(src, bytes, "cp.async source");
  self().open.push_back({dst, src, bytes});
}
inline void cp_async_commit() {
  Thread& t = self();
  t.committed.push_back(std::move(t.open));
  t.open.clear();
}
inline void cp_async_wait(int pending) {
  Thread& t = self();
  while (static_cast<int>(t.committed.size()) > pending) {
    for (const Copy& c : t.committed.front()) std::memcpy(dynamic_shared() + c.dst, c.src, c.bytes);
    t.committed.pop_front();
  }
}

// ---- warps

inline Warp& my_warp() { return state().warps[linear_thread_index() / 32]; }
inline int lane_id() { return linear_thread_index() % 32; }
// Every lane of the warp arrives before any leaves (a lane missing is a reported deadlock).
inline void warp_barrier(Warp& w, const char* what) {
  const uint64_t generation = w.generation;
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.generation;
  } else {
    block_until_changed(&w.generation, generation, what);
  }
}
template <typename T>
float half_to_float(uint32_t bits16) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const uint32_t u = bits16 << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
  }
}
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: the fragment layout of the PTX ISA (lane =
// 4 * groupID + threadID_in_group; each register holds two elements, the lower column / row in its
// low half): A rows g (a0, a2) and g + 8 (a1, a3), columns 2t + {0, 1} (a0, a1) and 2t + 8 + {0, 1}
// (a2, a3); B rows 2t + {0, 1} (b0) and 2t + 8 + {0, 1} (b1), column g; C / D rows g (c0, c1) and
// g + 8 (c2, c3), columns 2t + {0, 1}.
template <typename T>
void mma_m16n8k16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  Warp& w = my_warp();
  const int lane = lane_id();
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  std::memcpy(w.words[lane], mine, sizeof(mine));
  warp_barrier(w, "mma.sync");
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    const uint32_t* r = w.words[l];
    for (int half = 0; half < 2; ++half) {
      const int shift = 16 * half;
      A[g][2 * t + half] = half_to_float<T>((r[0] >> shift) & 0xffffu);
      A[g + 8][2 * t + half] = half_to_float<T>((r[1] >> shift) & 0xffffu);
      A[g][2 * t + 8 + half] = half_to_float<T>((r[2] >> shift) & 0xffffu);
      A[g + 8][2 * t + 8 + half] = half_to_float<T>((r[3] >> shift) & 0xffffu);
      B[2 * t + half][g] = half_to_float<T>((r[4] >> shift) & 0xffffu);
      B[2 * t + 8 + half][g] = half_to_float<T>((r[5] >> shift) & 0xffffu);
    }
  }
  warp_barrier(w, "mma.sync (operands read)");
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double sum = c[i];
    for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[row][k]) * B[k][col];
    c[i] = static_cast<float>(sum);
  }
}

// ---- scheduler

constexpr size_t kStackBytes = 128 * 1024;

inline void thread_entry() {
  State& s = state();
  s.body();
  Thread& t = self();
  if (!t.open.empty() || !t.committed.empty()) fail("thread exits with cp.async copies pending");
  t.done = true;
  swapcontext(&t.context, &s.scheduler);
}

inline std::vector<int> schedule_order(int n, uint64_t schedule, uint64_t block) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = schedule == 1 ? n - 1 - i : i;
  if (schedule > 1) {  // Fisher-Yates with a splitmix64 stream of (schedule, block)
    uint64_t z = schedule * 0x9E3779B97F4A7C15ull + block;
    for (int i = n - 1; i > 0; --i) {
      z += 0x9E3779B97F4A7C15ull;
      uint64_t v = z;
      v = (v ^ (v >> 30)) * 0xBF58476D1CE4E5B9ull;
      v = (v ^ (v >> 27)) * 0x94D049BB133111EBull;
      v ^= v >> 31;
      std::swap(order[i], order[v % static_cast<uint64_t>(i + 1)]);
    }
  }
  return order;
}

// Runs `body` as every thread of every block of the grid; returns "" or the first error.
inline std::string run_grid(dim3 grid, dim3 block, size_t shared_bytes, std::function<void()> body) {
  State& s = state();
  s.error.clear();
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024 || n % 32 != 0) return "block of " + std::to_string(n) + " threads: the emulation takes whole warps, at most 1024";
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "empty grid";
  s.grid_dim = make_uint3(grid.x, grid.y, grid.z);
  s.block_dim = make_uint3(block.x, block.y, block.z);
  s.body = std::move(body);
  s.shared_bytes = shared_bytes;
  s.shared_words.assign((shared_bytes + 15) / 16 + 1, make_uint4(~0u, ~0u, ~0u, ~0u));
  if (s.stacks.size() < n * kStackBytes) s.stacks.resize(n * kStackBytes);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_index = make_uint3(bx, by, bz);
        std::fill(s.shared_words.begin(), s.shared_words.end(), make_uint4(~0u, ~0u, ~0u, ~0u));
        s.threads.assign(n, Thread());
        s.warps.assign(n / 32, Warp());
        s.barrier_arrived = 0;
        for (int i = 0; i < n; ++i) {
          Thread& t = s.threads[i];
          t.index = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          getcontext(&t.context);
          t.context.uc_stack.ss_sp = s.stacks.data() + i * kStackBytes;
          t.context.uc_stack.ss_size = kStackBytes;
          t.context.uc_link = nullptr;
          makecontext(&t.context, thread_entry, 0);
        }
        const std::vector<int> order = schedule_order(n, s.schedule, bx + grid.x * (by + grid.y * bz));
        for (;;) {
          bool progress = false, live = false;
          for (const int i : order) {
            Thread& t = s.threads[i];
            if (t.done) continue;
            live = true;
            if (t.wait_on != nullptr && *t.wait_on == t.wait_value) continue;  // still blocked
            t.wait_on = nullptr;
            s.current = i;
            swapcontext(&s.scheduler, &t.context);
            s.current = -1;
            if (!s.error.empty()) return s.error;
            progress = true;
          }
          if (!live) break;
          if (!progress) {
            int exited = 0, at_block = 0, at_warp = 0;
            for (const Thread& t : s.threads) {
              if (t.done) ++exited;
              else if (t.wait_on == &s.barrier_generation) ++at_block;
              else ++at_warp;
            }
            return "deadlock in block " + std::to_string(bx) + "," + std::to_string(by) + ": " +
                   std::to_string(at_block) + " threads wait at __syncthreads, " + std::to_string(at_warp) +
                   " at a warp-wide operation, " + std::to_string(exited) + " have exited";
          }
        }
      }
    }
  }
  return "";
}

// A kernel launch: kernel<<<grid, block, shared_bytes>>>(args...), run to completion.
template <typename... Params, typename... Args>
std::string launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
  return run_grid(grid, block, shared_bytes, [=] { kernel(args...); });
}
// LK_LAUNCH in host code shared with the CUDA launchers: after a failed launch, later ones are
// skipped and the first error is kept for take_launch_error().
inline std::string& launch_error() {
  static std::string error;
  return error;
}
template <typename... Params, typename... Args>
void launch_or_keep_error(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                          Args... args) {
  if (!launch_error().empty()) return;
  const std::string error = launch(kernel, grid, block, shared_bytes, args...);
  if (!error.empty()) launch_error() = std::string(name) + ": " + error;
}
inline std::string take_launch_error() {
  std::string error;
  error.swap(launch_error());
  return error;
}

}  // namespace emulation
}  // namespace lora_kernels

// ---- the CUDA built-ins the kernels use

#define threadIdx (::lora_kernels::emulation::self().index)
#define blockIdx (::lora_kernels::emulation::state().block_index)
#define blockDim (::lora_kernels::emulation::state().block_dim)
#define gridDim (::lora_kernels::emulation::state().grid_dim)

inline void __syncthreads() {
  using namespace lora_kernels::emulation;
  State& s = state();
  const uint64_t generation = s.barrier_generation;
  if (++s.barrier_arrived == static_cast<int>(s.threads.size())) {
    s.barrier_arrived = 0;
    ++s.barrier_generation;
  } else {
    block_until_changed(&s.barrier_generation, generation, "__syncthreads");
  }
}
template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask) {
  using namespace lora_kernels::emulation;
  static_assert(sizeof(V) == 4, "32-bit shuffles only");
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask");
  Warp& w = my_warp();
  const int lane = lane_id();
  std::memcpy(w.words[lane], &value, 4);
  warp_barrier(w, "__shfl_xor_sync");
  V out;
  std::memcpy(&out, w.words[(lane ^ lane_mask) & 31], 4);
  warp_barrier(w, "__shfl_xor_sync (values read)");
  return out;
}
template <typename V>
V __ldg(const V* p) {
  lora_kernels::emulation::check_readable(p, sizeof(V), "__ldg");
  return *p;
}
inline size_t __cvta_generic_to_shared(const void* p) {
  using namespace lora_kernels::emulation;
  const ptrdiff_t offset = static_cast<const unsigned char*>(p) - dynamic_shared();
  if (offset < 0 || static_cast<size_t>(offset) > state().shared_bytes) fail("__cvta_generic_to_shared of a non-shared address");
  return static_cast<size_t>(offset);
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline void __trap() { lora_kernels::emulation::fail("__trap"); }
template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
