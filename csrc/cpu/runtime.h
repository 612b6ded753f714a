// What every CPU kernel driver needs around its OpenMP region: the thread's id, flush-to-zero
// while it runs, and Ctrl-C polling.  Included by sinkhorn_cpu.cpp and batched.cpp inside
// `namespace sinkhorn_ot::cpu`, after the standard headers (and <immintrin.h> with SK_X86).
#pragma once

inline int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Flush-to-zero and denormals-are-zero for the duration of a kernel on this thread: a product
// that would be subnormal (a plan entry below 1e-38) costs a microcode assist of ~100 cycles
// on x86 and carries no mass the solver can use.
class FlushDenormals {
  public:
#ifdef SK_X86
    FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
    ~FlushDenormals() { _mm_setcsr(saved_); }

  private:
    unsigned saved_;
#endif
};

// `interrupted` is called from the calling thread (OpenMP thread 0) only, once 0.2 s have
// passed since the last call, at the polls whose `i` is a multiple of 256 (a row counter;
// 0 for a poll per pass); every thread stops at its next poll once it reported.
class Interrupt {
  public:
    explicit Interrupt(const std::function<bool()>& cb) : cb_(cb), last_(clock::now()) {}
    bool poll(int64_t i = 0) {
        if (stop_.load(std::memory_order_relaxed)) return true;
        if (thread_id() != 0 || (i & 255) != 0 || !cb_) return false;
        auto now = clock::now();
        if (now - last_ < std::chrono::milliseconds(200)) return false;
        last_ = now;
        if (cb_()) stop_.store(true);
        return stop_.load();
    }
    bool stopped() const { return stop_.load(); }

  private:
    using clock = std::chrono::steady_clock;
    const std::function<bool()>& cb_;
    clock::time_point last_;
    std::atomic<bool> stop_{false};
};
