// Host emulation of the CUDA subset used by csrc/cuda/sinkhorn_cuda.cu, so that machines
// without a GPU (CI) run the real kernel source on the CPU: the same templates, the same block
// decomposition, the same reductions and the same loop state.  What it does not emulate:
// timing, the memory model of a real GPU (every access here is sequentially consistent), MUFU
// accuracy (ex2 is exp2f here), and resource limits (registers, shared-memory size).
//
// Execution model: a launch runs its blocks one after another; the BT threads of a block are
// fibers on the calling OS thread (x86-64 only), switched round robin at barriers.
// __syncthreads is a block barrier; warp shuffles exchange through per-thread slots between
// two warp barriers (every shuffle in the kernels is a full-warp one).  Static __shared__
// arrays become function-local statics: one block is alive at a time, so they are the block's
// shared memory.
#pragma once

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <algorithm>
#include <math.h>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#define SK_CUDA_EMULATION 1

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct float4 { float x, y, z, w; };
struct double2 { double x, y; };
struct uint4 { unsigned x, y, z, w; };

namespace sk_emu {

// ---- fibers: the BT threads of a block run on one OS thread and switch at barriers ----------
// x86-64 System V context switch: saves the callee-saved registers on the current stack,
// stores the stack pointer in *save, continues on `next`.  MXCSR and the x87 control word are
// not switched: no fiber changes them (the kernels never touch the floating-point environment).
extern "C" void sk_emu_switch(void** save, void* next);
asm(R"(
.text
.globl sk_emu_switch
.type sk_emu_switch,@function
sk_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size sk_emu_switch, .-sk_emu_switch
)");

constexpr std::size_t kStack = 256 * 1024;

struct Fiber {
    void* sp = nullptr;
    bool done = false;
    unsigned char* stack = nullptr;
};

// Fiber stacks, kept for the life of the process (launches reuse them).
inline unsigned char* stack_of(int t) {
    static std::vector<std::unique_ptr<unsigned char[]>> pool;
    while (static_cast<int>(pool.size()) <= t) pool.emplace_back(new unsigned char[kStack]);
    return pool[t].get();
}

struct Barrier {
    int n = 0, count = 0;
    std::vector<int> waiters;
};

struct Block {
    int bt = 0, cur = 0, n_done = 0;
    void* main_sp = nullptr;
    std::vector<Fiber> fibers;
    std::deque<int> ready;  // fibers that can run, in order
    Barrier block_bar;
    std::vector<Barrier> warp_bar;
    std::vector<uint64_t> slot[2];  // shuffle slots (two, used alternately)
    std::vector<unsigned> phase;    // exchanges done by each thread
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
};

inline Block* g_block = nullptr;
inline uint3 t_thread{0, 0, 0};
inline uint3 t_block{0, 0, 0};
inline dim3 g_grid, g_bdim;

// Leave the current fiber for the next ready one (the current one is waiting or done).
inline void switch_out() {
    Block& b = *g_block;
    if (b.ready.empty()) {
        std::fprintf(stderr, "cuda_emu: deadlock: every thread of the block waits at a barrier "
                             "(thread %d)\n", b.cur);
        std::abort();
    }
    const int from = b.cur, nxt = b.ready.front();
    b.ready.pop_front();
    b.cur = nxt;
    t_thread = uint3{static_cast<unsigned>(nxt), 0, 0};
    sk_emu_switch(&b.fibers[from].sp, b.fibers[nxt].sp);
}

inline void wait(Barrier& bar) {
    Block& b = *g_block;
    if (++bar.count == bar.n) {  // the last to arrive releases the others and goes on
        bar.count = 0;
        for (int w : bar.waiters) b.ready.push_back(w);
        bar.waiters.clear();
        return;
    }
    bar.waiters.push_back(b.cur);
    switch_out();
}

[[noreturn]] inline void fiber_entry() {
    Block& b = *g_block;
    b.body(b.body_arg);
    b.fibers[b.cur].done = true;
    if (++b.n_done == b.bt) {
        void* dummy;
        sk_emu_switch(&dummy, b.main_sp);  // the last one returns to the launcher
    }
    switch_out();  // never comes back: this fiber is done
    std::abort();
}

inline void run_block(Block& b) {
    b.n_done = 0;
    b.ready.clear();
    for (int t = 0; t < b.bt; ++t) {
        Fiber& f = b.fibers[t];
        f.done = false;
        // Initial frame, read by the second half of sk_emu_switch: six registers, then the
        // return address (fiber_entry), 16-byte aligned as after a call.
        // (stack tops staggered by thread, so that they do not all share one cache set)
        auto top = reinterpret_cast<std::uintptr_t>(f.stack + kStack - (t % 61) * 320) &
                   ~std::uintptr_t(15);
        auto* w = reinterpret_cast<uint64_t*>(top - 16);
        w[0] = reinterpret_cast<uint64_t>(&fiber_entry);
        for (int k = 1; k <= 6; ++k) w[-k] = 0;
        f.sp = w - 6;
        if (t > 0) b.ready.push_back(t);
    }
    std::fill(b.phase.begin(), b.phase.end(), 0u);
    b.cur = 0;
    t_thread = uint3{0, 0, 0};
    sk_emu_switch(&b.main_sp, b.fibers[0].sp);
}

template <class T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// All 32 lanes publish a value, then read the one of `src_of(lane)`.  One barrier: slot
// buffer k % 2 is written again at exchange k + 2, after every lane has passed barrier k + 1,
// i.e. after every lane has read exchange k.
template <class T, class F>
inline T exchange(T v, F src_of) {
    Block& b = *g_block;
    const int tid = static_cast<int>(t_thread.x), warp = tid >> 5, lane = tid & 31;
    std::vector<uint64_t>& slot = b.slot[b.phase[tid]++ & 1];
    slot[tid] = to_bits(v);
    wait(b.warp_bar[warp]);
    return from_bits<T>(slot[warp * 32 + src_of(lane)]);
}

// __any_sync: one exchange, every lane reads all 32 slots.
inline int any_lane(int pred) {
    Block& b = *g_block;
    const int tid = static_cast<int>(t_thread.x), warp = tid >> 5;
    std::vector<uint64_t>& slot = b.slot[b.phase[tid]++ & 1];
    slot[tid] = pred != 0;
    wait(b.warp_bar[warp]);
    int any = 0;
    for (int k = 0; k < 32; ++k) any |= slot[warp * 32 + k] != 0;
    return any;
}

// Run kernel(args...) over the grid: blocks in order, the block's threads as fibers.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
    if (block.x % 32 != 0 || block.x == 0 || block.y != 1 || block.z != 1)
        throw std::runtime_error("cuda_emu: blocks must be whole warps, one-dimensional");
    Block b;
    b.bt = static_cast<int>(block.x);
    b.fibers.resize(b.bt);
    for (int t = 0; t < b.bt; ++t) b.fibers[t].stack = stack_of(t);
    b.block_bar.n = b.bt;
    b.warp_bar.assign(b.bt / 32, Barrier{32, 0, {}});
    b.slot[0].assign(b.bt, 0);
    b.slot[1].assign(b.bt, 0);
    b.phase.assign(b.bt, 0);
    auto call = [&]() { kernel(static_cast<P>(args)...); };
    b.body = [](void* c) { (*static_cast<decltype(call)*>(c))(); };
    b.body_arg = &call;
    g_block = &b;
    g_grid = grid;
    g_bdim = block;
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            t_block = uint3{bx, by, 0};
            run_block(b);
        }
    g_block = nullptr;
}

}  // namespace sk_emu

#define threadIdx (sk_emu::t_thread)
#define blockIdx (sk_emu::t_block)
#define blockDim (sk_emu::g_bdim)
#define gridDim (sk_emu::g_grid)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

inline void __syncthreads() { sk_emu::wait(sk_emu::g_block->block_bar); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int off) {
    return sk_emu::exchange(v, [off](int lane) { return lane ^ off; });
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, int off) {
    return sk_emu::exchange(v, [off](int lane) { return lane + off < 32 ? lane + off : lane; });
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src) {
    return sk_emu::exchange(v, [src](int) { return src; });
}
inline int __any_sync(unsigned, int pred) { return sk_emu::any_lane(pred); }

inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return std::atomic_ref<unsigned>(*p).fetch_add(v);
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    std::atomic_ref<unsigned long long> a(*p);
    unsigned long long cur = a.load();
    while (v < cur && !a.compare_exchange_weak(cur, v)) {}
    return cur;
}
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
    std::atomic_ref<unsigned long long> a(*p);
    unsigned long long cur = a.load();
    while (v > cur && !a.compare_exchange_weak(cur, v)) {}
    return cur;
}

inline float __int_as_float(int v) { return sk_emu::from_bits<float>(sk_emu::to_bits(v)); }
inline float __uint_as_float(unsigned v) { return sk_emu::from_bits<float>(sk_emu::to_bits(v)); }
inline double __longlong_as_double(long long v) {
    return sk_emu::from_bits<double>(sk_emu::to_bits(v));
}
inline long long __double_as_longlong(double v) {
    return sk_emu::from_bits<long long>(sk_emu::to_bits(v));
}
inline float __double2float_rn(double v) { return static_cast<float>(v); }
// Built with -ffp-contract=off: a * b and a + b round on their own, as the _rn intrinsics.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

// The five PTX primitives of sinkhorn_cuda.cu (its #ifndef SK_CUDA_EMULATION block).
alignas(16) inline unsigned char sk_dyn_smem[256 * 1024];
namespace sinkhorn_ot {
namespace cuda {
inline float f16_to_float(unsigned short h) {
    const unsigned sign = (h >> 15) & 1u, ex = (h >> 10) & 31u, man = h & 1023u;
    float v;
    if (ex == 0) v = std::ldexp(static_cast<float>(man), -24);
    else if (ex == 31) v = man ? NAN : INFINITY;
    else v = std::ldexp(static_cast<float>(man | 1024u), static_cast<int>(ex) - 25);
    return sign ? -v : v;
}
inline float ex2_ftz(float x) {
    const float y = std::exp2(x);
    return (y < 1.17549435e-38f) ? 0.0f : y;  // flush-to-zero results, as .ftz
}
inline float nan_to_ninf(float d) { return std::isnan(d) ? -INFINITY : d; }
inline void cp_async16(void* smem, const void* gmem) { std::memcpy(smem, gmem, 16); }
inline void cp_async_commit() {}
template <int NPEND>
inline void cp_async_wait() {}
}  // namespace cuda
}  // namespace sinkhorn_ot

namespace sk_emu {
// cuLaunchKernel-style entry: argv[i] points to the value of parameter i.
template <class... P, std::size_t... I>
void launch_argv_impl(void (*k)(P...), dim3 g, dim3 b, void** argv, std::index_sequence<I...>) {
    launch(k, g, b, *static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(argv[I])...);
}
template <class... P>
void launch_argv(void (*k)(P...), dim3 g, dim3 b, void** argv) {
    launch_argv_impl(k, g, b, argv, std::index_sequence_for<P...>{});
}
template <class... P>
int arg_sizes(void (*)(P...), long long* out) {
    const long long s[] = {static_cast<long long>(sizeof(P))..., 0};
    for (std::size_t i = 0; i < sizeof...(P); ++i) out[i] = s[i];
    return static_cast<int>(sizeof...(P));
}
}  // namespace sk_emu
