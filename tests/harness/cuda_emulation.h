// Host emulation of the CUDA built-ins our kernels use, for tests only. Include it before
// a kernel header; compile with g++ (-fsanitize=address) and call cuda_emulation::launch.
//
// Every block of a launch runs on the host, one after another. A block's threads are
// fibers (started with makecontext/setcontext, then switched with __builtin_setjmp and
// __builtin_longjmp, which make no system call) run one after another: each runs until it
// reaches __syncthreads() or returns, and the next phase starts only when every thread of
// the block has reached the same barrier, so the kernel's barriers order its shared-memory
// traffic exactly as on the GPU. Shared memory is a fresh heap buffer per block, filled
// with 0xFF bytes (NaN in every float type), so AddressSanitizer catches overruns and
// unstaged values show up. Threads that return while others wait at a barrier are
// reported as a divergent barrier.
#pragma once

#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMULATION_ASAN 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define INDIVGRAD_DYNAMIC_SMEM(name) unsigned char* name = ::cuda_emulation::dynamic_smem()

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
inline void __stcs(uint4* p, uint4 v) { *p = v; }
inline void __stcs(uint2* p, uint2 v) { *p = v; }

namespace cuda_emulation {

struct Fiber {
  ucontext_t ctx;  // its first entry
  void* jmp[5];    // where it waits at a barrier (__builtin_setjmp's buffer)
  bool started = false;
  std::unique_ptr<char[]> stack;
  bool done = false;
  int barriers = 0;
  void* fake_stack = nullptr;  // ASan's bookkeeping for this fiber's stack
};

struct Scheduler {
  static constexpr size_t kStackBytes = 64 * 1024;
  void* main_jmp[5];
  void* main_fake_stack = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  std::function<void()> body;
  std::unique_ptr<unsigned char[]> smem;
  ucontext_t context_template;
  bool have_template = false;
};

inline Scheduler& scheduler() {
  static Scheduler s;
  return s;
}

inline unsigned char* dynamic_smem() { return scheduler().smem.get(); }

// The jumps between fibers. __builtin_setjmp/__builtin_longjmp are not intercepted by
// AddressSanitizer (whose longjmp makes a system call), and this helper is hidden from the
// compiler's noreturn analysis (noipa) and uninstrumented, so no __asan_handle_no_return
// runs before it: that would unpoison the whole stack being left (a fiber waiting at a
// barrier keeps its frames, and their redzones must stay) at the cost of a megabyte
// memset of the main stack's shadow per jump. It must not be the function that set buf.
__attribute__((noipa, no_sanitize_address)) inline void long_jump(void** buf) { __builtin_longjmp(buf, 1); }

// Fiber -> scheduler. dying: the fiber will never be resumed.
inline void jump_to_main(Fiber& f, bool dying) {
  Scheduler& s = scheduler();
#ifdef CUDA_EMULATION_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.fake_stack, s.main_stack_bottom, s.main_stack_size);
#else
  (void)f;
  (void)dying;
#endif
  long_jump(s.main_jmp);
}

inline void yield_to_main(Fiber& f) {
  if (__builtin_setjmp(f.jmp) == 0) jump_to_main(f, /*dying=*/false);
#ifdef CUDA_EMULATION_ASAN
  Scheduler& s = scheduler();
  __sanitizer_finish_switch_fiber(f.fake_stack, &s.main_stack_bottom, &s.main_stack_size);
#endif
}

inline void fiber_entry() {
  Scheduler& s = scheduler();
  Fiber& f = *s.current;
#ifdef CUDA_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &s.main_stack_bottom, &s.main_stack_size);
#endif
  s.body();
  f.done = true;
  jump_to_main(f, /*dying=*/true);
}

// Scheduler -> fiber, until it yields at a barrier or returns.
inline void resume(Fiber& f) {
  Scheduler& s = scheduler();
  s.current = &f;
  if (__builtin_setjmp(s.main_jmp) == 0) {
#ifdef CUDA_EMULATION_ASAN
    __sanitizer_start_switch_fiber(&s.main_fake_stack, f.stack.get(), Scheduler::kStackBytes);
#endif
    if (!f.started) {
      f.started = true;
      setcontext(&f.ctx);
    }
    long_jump(f.jmp);
  }
#ifdef CUDA_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(s.main_fake_stack, nullptr, nullptr);
#endif
}

// Runs one block: all threads to the first barrier, then all to the next, and so on.
inline void run_block(unsigned threads) {
  Scheduler& s = scheduler();
  if (s.fibers.size() < threads) s.fibers.resize(threads);
  if (!s.have_template) getcontext(&s.context_template), s.have_template = true;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    if (!f.stack) f.stack.reset(new char[Scheduler::kStackBytes]);
    f.done = f.started = false;
    f.barriers = 0;
    f.ctx = s.context_template;  // a copy: getcontext makes a system call
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = Scheduler::kStackBytes;
    f.ctx.uc_link = nullptr;  // fibers leave through jump_to_main, never by returning
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (int phase = 0;; ++phase) {
    for (unsigned t = 0; t < threads; ++t) {
      if (s.fibers[t].done) continue;
      threadIdx.x = t;
      resume(s.fibers[t]);
    }
    unsigned done = 0;
    for (unsigned t = 0; t < threads; ++t) done += s.fibers[t].done;
    if (done == threads) return;
    if (done != 0)
      throw std::runtime_error("divergent __syncthreads: block " + std::to_string(blockIdx.x) + ", phase " +
                               std::to_string(phase) + ": " + std::to_string(done) + " of " + std::to_string(threads) +
                               " threads returned while others wait at a barrier");
  }
}

// Runs the blocks `blocks` (all of the grid when empty) of kernel<<<grid, threads, smem>>>.
template <typename Kernel, typename... Args>
void launch(unsigned grid, unsigned threads, size_t smem_bytes, const std::vector<int64_t>& blocks, Kernel kernel,
            Args... args) {
  Scheduler& s = scheduler();
  gridDim.x = grid;
  blockDim.x = threads;
  s.body = [&] { kernel(args...); };
  auto run = [&](int64_t b) {
    if (b < 0 || b >= grid) throw std::runtime_error("block index out of the grid");
    blockIdx.x = static_cast<unsigned>(b);
    s.smem.reset(new unsigned char[smem_bytes ? smem_bytes : 1]);
    std::memset(s.smem.get(), 0xFF, smem_bytes);
    run_block(threads);
  };
  if (blocks.empty()) {
    for (unsigned b = 0; b < grid; ++b) run(b);
  } else {
    for (int64_t b : blocks) run(b);
  }
  s.smem.reset();
}

}  // namespace cuda_emulation

inline void __syncthreads() {
  cuda_emulation::Fiber& f = *cuda_emulation::scheduler().current;
  ++f.barriers;
  cuda_emulation::yield_to_main(f);
}
