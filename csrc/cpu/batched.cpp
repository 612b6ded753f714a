#include "batched.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#include <type_traits>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BK_X86 1
#define SK_X86 1
#endif
#if (defined(__GNUC__) || defined(__clang__)) && !defined(SK_NO_VECTOR_EXT)
#define SK_VECTOR_EXT 1
#endif

#include "../common/sinkhorn_math.h"

#if defined(__GNUC__) || defined(__clang__)
#define BK_BITS(To, x) __builtin_bit_cast(To, x)
#else
#include <bit>
#define BK_BITS(To, x) std::bit_cast<To>(x)
#endif

namespace sinkhorn_ot::cpu {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// The scaling form of one small problem's matrix at one alpha (see pass): k_iy = exp(alpha
// x_iy - mx_i) on the live columns (0 on the others), N x Kp row-major, Kp = K rounded up
// to 8 with zero padding.
struct Scaled {
    std::vector<double> k, mx, v, c, r, w;  // v, c, r, w: a pass's scratch
    int64_t N = 0, K = 0, Kp = 0;
    double alpha = 0;  // 0: none for this problem
    void size(int64_t n, int64_t m) {
        N = n;
        K = m;
        Kp = (m + 7) / 8 * 8;
        k.resize(static_cast<size_t>(N) * Kp);
        for (auto* x : {&mx, &r, &w}) x->resize(N);
        for (auto* x : {&v, &c}) x->resize(Kp);
        alpha = 0;
    }
};

// The row kernels once per instruction set (as sinkhorn_cpu.cpp does for the single solve):
// GCC builds AVX-512, AVX2+FMA and baseline copies; other compilers the baseline only.
#if defined(BK_X86) && defined(__GNUC__) && !defined(__clang__)
#define BK_MULTI_ISA 1
#define BK_INLINE inline __attribute__((always_inline))
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // _mm512 intrinsics' undefined bases
namespace v4 {
#define BK_W 64
#define SK_W 64
#include "simd.h"
#include "batched_kernels.h"
#undef SK_W
#undef BK_W
}  // namespace v4
#pragma GCC diagnostic pop
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace v3 {
#define BK_W 32
#define SK_W 32
#include "simd.h"
#include "batched_kernels.h"
#undef SK_W
#undef BK_W
}  // namespace v3
#pragma GCC pop_options
#else
#define BK_INLINE inline
#endif
namespace base {
#define BK_W 16
#define SK_W 16
#include "simd.h"
#include "batched_kernels.h"
#undef SK_W
#undef BK_W
}  // namespace base

// Out-of-line entry points per ISA (the kernels are always_inline into these).
template <class T>
struct Kernels {
    double (*row_exp)(const T*, const double*, int64_t, double, double*, double&);
    void (*axpy)(double*, const double*, double, int64_t);
    void (*multi_rows)(const T*, int64_t, int64_t, int64_t, int64_t, double, const double*,
                       const double*, double*, double*, double*);
    void (*multi_axpys)(const double*, const double*, int64_t, int64_t, double*);
    void (*times_x)(const double*, const T*, int64_t, int64_t, int64_t, double*);
    void (*col_max)(const T*, int64_t, double, double*);
    void (*col_sumexp)(const T*, int64_t, double, const double*, double*);
    double (*row_cost)(const T*, const double*, int64_t, double);
    void (*pass_rows)(const T*, int64_t, int64_t, double, const double*, const double*,
                      double*, double*, double*, double*);
    void (*row_potentials)(const double*, const double*, const double*, int64_t, double*);
    uint8_t (*scan_entries)(const T*, int64_t, double, double&);
    double (*dot)(const double*, const double*, int64_t);
    void (*scaled_rows)(const T*, double, const double*, Scaled&);
    void (*scaled_pass)(const Scaled&, const double*, double, const double*, double*, double*,
                        double*, double*, double*, double*, double*);
    void (*scaled_pow4)(double*, int64_t);
    void (*scaled_colsums)(Scaled&, double, double*);
    double (*scaled_cost)(const Scaled&, const T*, const double*, const double*, double,
                          double*, double*);
    void (*col_logs)(const double*, int64_t, double*);
    double (*l1_diff)(const double*, const double*, int64_t);
    double (*gated_sum)(const double*, const double*, int64_t);
    void (*weighted_sums)(const double*, const double*, int64_t, double*);
};

#define BK_ENTRIES(ns)                                                                      \
    namespace ns##_entry {                                                                  \
    template <class T>                                                                      \
    double row_exp(const T* x, const double* g, int64_t K, double alpha, double* e,         \
                   double& s) {                                                             \
        return ns::row_exp<T>(x, g, K, alpha, e, s);                                        \
    }                                                                                       \
    inline void axpy(double* c, const double* e, double r, int64_t K) { ns::axpy(c, e, r, K); } \
    template <class T>                                                                      \
    void multi_rows(const T* X, int64_t R, int64_t K, int64_t Kp, int64_t kp, double alpha, \
                    const double* gbar, const double* Wt, double* E, double* m, double* S) {\
        ns::multi_rows<T>(X, R, K, Kp, kp, alpha, gbar, Wt, E, m, S);                       \
    }                                                                                       \
    inline void multi_axpys(const double* E, const double* Rr, int64_t Kp, int64_t kp,     \
                            double* acc) {                                                  \
        ns::multi_axpys(E, Rr, Kp, kp, acc);                                                \
    }                                                                                       \
    template <class T>                                                                      \
    void times_x(const double* E, const T* X, int64_t R, int64_t K, int64_t Kp, double* o) {\
        ns::times_x<T>(E, X, R, K, Kp, o);                                                  \
    }                                                                                       \
    template <class T>                                                                      \
    void col_max(const T* x, int64_t K, double alpha, double* mx) {                         \
        ns::col_max<T>(x, K, alpha, mx);                                                    \
    }                                                                                       \
    template <class T>                                                                      \
    void col_sumexp(const T* x, int64_t K, double alpha, const double* mx, double* z) {     \
        ns::col_sumexp<T>(x, K, alpha, mx, z);                                              \
    }                                                                                       \
    template <class T>                                                                      \
    double row_cost(const T* x, const double* c, int64_t K, double alpha) {                 \
        return ns::row_cost<T>(x, c, K, alpha);                                             \
    }                                                                                       \
    template <class T>                                                                      \
    void pass_rows(const T* X, int64_t N, int64_t K, double alpha, const double* g,         \
                   const double* a, double* m, double* s, double* col, double* e) {         \
        ns::pass_rows<T>(X, N, K, alpha, g, a, m, s, col, e);                               \
    }                                                                                       \
    inline void row_potentials(const double* la, const double* m, const double* s,         \
                               int64_t N, double* f) {                                      \
        ns::row_potentials(la, m, s, N, f);                                                 \
    }                                                                                       \
    template <class T>                                                                      \
    uint8_t scan_entries(const T* x, int64_t n, double forbidden, double& mx) {             \
        return ns::scan_entries<T>(x, n, forbidden, mx);                                    \
    }                                                                                       \
    inline double dot(const double* u, const double* v, int64_t n) { return ns::dot(u, v, n); } \
    template <class T>                                                                      \
    void scaled_rows(const T* X, double alpha, const double* gate, Scaled& sf) {            \
        ns::scaled_rows<T>(X, alpha, gate, sf);                                             \
    }                                                                                       \
    inline void scaled_pass(const Scaled& sf, const double* g, double gmax, const double* a,\
                            double* m, double* s, double* col, double* v, double* c,        \
                            double* r, double* w) {                                         \
        ns::scaled_pass(sf, g, gmax, a, m, s, col, v, c, r, w);                             \
    }                                                                                       \
    inline void scaled_pow4(double* k, int64_t n) { ns::scaled_pow4(k, n); }               \
    inline void scaled_colsums(Scaled& sf, double M, double* z) {                          \
        ns::scaled_colsums(sf, M, z);                                                       \
    }                                                                                       \
    template <class T>                                                                      \
    double scaled_cost(const Scaled& sf, const T* X, const double* f, const double* g,      \
                       double gmax, double* rho, double* v) {                               \
        return ns::scaled_cost<T>(sf, X, f, g, gmax, rho, v);                               \
    }                                                                                       \
    inline void col_logs(const double* col, int64_t K, double* l) { ns::col_logs(col, K, l); } \
    inline double l1_diff(const double* c, const double* b, int64_t n) {                   \
        return ns::l1_diff(c, b, n);                                                        \
    }                                                                                       \
    inline double gated_sum(const double* v, const double* gate, int64_t n) {              \
        return ns::gated_sum(v, gate, n);                                                   \
    }                                                                                       \
    inline void weighted_sums(const double* w, const double* v, int64_t n, double* o) {    \
        ns::weighted_sums(w, v, n, o);                                                      \
    }                                                                                       \
    }

#ifdef BK_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
BK_ENTRIES(v4)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
BK_ENTRIES(v3)
#pragma GCC pop_options
#endif
BK_ENTRIES(base)
#undef BK_ENTRIES

#define BK_TABLE(ns, T)                                                                    \
    Kernels<T> {                                                                           \
        &ns##_entry::row_exp<T>, &ns##_entry::axpy, &ns##_entry::multi_rows<T>,            \
            &ns##_entry::multi_axpys, &ns##_entry::times_x<T>, &ns##_entry::col_max<T>,    \
            &ns##_entry::col_sumexp<T>, &ns##_entry::row_cost<T>,                          \
            &ns##_entry::pass_rows<T>, &ns##_entry::row_potentials,                        \
            &ns##_entry::scan_entries<T>, &ns##_entry::dot, &ns##_entry::scaled_rows<T>,   \
            &ns##_entry::scaled_pass, &ns##_entry::scaled_pow4, &ns##_entry::scaled_colsums, \
            &ns##_entry::scaled_cost<T>, &ns##_entry::col_logs, &ns##_entry::l1_diff,      \
            &ns##_entry::gated_sum, &ns##_entry::weighted_sums                             \
    }

// The same choice of instruction set as the single solve's kernels (isa_name honours
// SINKHORN_OT_CPU_ISA).
template <class T>
const Kernels<T>& kernels() {
    static const Kernels<T> k = [] {
#ifdef BK_MULTI_ISA
        const std::string isa = isa_name();
        if (isa == "avx512") return BK_TABLE(v4, T);
        if (isa == "avx2") return BK_TABLE(v3, T);
#endif
        return BK_TABLE(base, T);
    }();
    return k;
}
#undef BK_TABLE

#include "runtime.h"

// Solve A x = rhs (m x m, row-major, overwritten) by Gaussian elimination with partial
// pivoting; false when a pivot vanishes.
bool solve_small(std::vector<double>& A, std::vector<double>& rhs, int m) {
    for (int c = 0; c < m; ++c) {
        int p = c;
        for (int r = c + 1; r < m; ++r)
            if (std::abs(A[r * m + c]) > std::abs(A[p * m + c])) p = r;
        if (!(A[p * m + c] != 0.0) || !std::isfinite(A[p * m + c])) return false;
        if (p != c) {
            for (int j = 0; j < m; ++j) std::swap(A[p * m + j], A[c * m + j]);
            std::swap(rhs[p], rhs[c]);
        }
        for (int r = c + 1; r < m; ++r) {
            const double l = A[r * m + c] / A[c * m + c];
            for (int j = c; j < m; ++j) A[r * m + j] -= l * A[c * m + j];
            rhs[r] -= l * rhs[c];
        }
    }
    for (int c = m - 1; c >= 0; --c) {
        double v = rhs[c];
        for (int j = c + 1; j < m; ++j) v -= A[c * m + j] * rhs[j];
        rhs[c] = v / A[c * m + c];
    }
    return true;
}

// Anderson mixing of the column potential, the algorithm of _solver.Anderson (type II,
// guarded by the dual objective, in the quotient space of centred potentials), over the
// columns of positive mass (`gate` 0 there and -inf elsewhere; g stays -inf on the others).
class Anderson {
  public:
    using Dot = double (*)(const double*, const double*, int64_t);
    using GatedSum = double (*)(const double*, const double*, int64_t);

    Anderson(int64_t K, int memory, double rel_slack, double bound, const double* gate, Dot dot,
             GatedSum gated_sum)
        : K_(K), mem_(memory), rel_slack_(rel_slack), bound_(bound), gate_(gate),
          dot_(dot), gated_sum_(gated_sum),
          dg_(static_cast<size_t>(memory) * K), dr_(static_cast<size_t>(memory) * K),
          gram_(static_cast<size_t>(memory) * memory), pg_(K), pr_(K), acc_tg_(K), gc_(K),
          r_(K) {
        int64_t n = 0;
        for (int64_t y = 0; y < K; ++y) n += gate[y] == 0 ? 1 : 0;
        n_live_ = std::max<int64_t>(n, 1);
    }

    // Writes the next point into g (the evaluated point on entry; Tg its plain step).
    void step(double* g, const double* Tg, double dual, double scale, double g_max) {
        if (has_acc_ && (dual < acc_dual_ - rel_slack_ * scale || !(g_max <= bound_))) {
            count_ = 0;
            has_prev_ = false;
            has_acc_ = false;
            std::copy(acc_tg_.begin(), acc_tg_.end(), g);
            return;
        }
        const double mg = mean(g), mt = mean(Tg);
        const double* gate = gate_;
        double *gc = gc_.data(), *atg = acc_tg_.data(), *r = r_.data();
        for (int64_t y = 0; y < K_; ++y) {  // selects on the gate, not branches
            const bool l = gate[y] == 0;
            gc[y] = l ? g[y] - mg : 0.0;
            atg[y] = l ? Tg[y] - mt : kNegInf;
            r[y] = l ? (Tg[y] - mt) - gc[y] : 0.0;
        }
        has_acc_ = true;
        acc_dual_ = dual;
        if (has_prev_) {
            const int slot = (head_ + count_) % mem_;
            if (count_ < mem_) {
                ++count_;
            } else {
                head_ = (head_ + 1) % mem_;
            }
            double* dg = &dg_[static_cast<size_t>(slot) * K_];
            double* dr = &dr_[static_cast<size_t>(slot) * K_];
            for (int64_t y = 0; y < K_; ++y) {
                dg[y] = gc_[y] - pg_[y];
                dr[y] = r_[y] - pr_[y];
            }
            // the Gram matrix of the residual differences, one new row per step
            for (int q = 0; q < count_; ++q) {
                const int sq = (head_ + q) % mem_;
                gram_[slot * mem_ + sq] = gram_[sq * mem_ + slot] =
                    dot_(dr, &dr_[static_cast<size_t>(sq) * K_], K_);
            }
        }
        std::copy(gc_.begin(), gc_.end(), pg_.begin());
        std::copy(r_.begin(), r_.end(), pr_.begin());
        has_prev_ = true;
        if (count_ == 0) {
            std::copy(acc_tg_.begin(), acc_tg_.end(), g);
            return;
        }
        const int m = count_;
        A_.assign(static_cast<size_t>(m) * m, 0.0);
        rhs_.assign(m, 0.0);
        double trace = 0;
        for (int p = 0; p < m; ++p) {
            const int sp = (head_ + p) % mem_;
            for (int q = 0; q < m; ++q) A_[p * m + q] = gram_[sp * mem_ + (head_ + q) % mem_];
            rhs_[p] = dot_(col_r(p), r_.data(), K_);
            trace += A_[p * m + p];
        }
        // Tikhonov term: the differences become nearly collinear close to convergence.
        for (int p = 0; p < m; ++p) A_[p * m + p] += 1e-10 * trace + 1e-300;
        if (!solve_small(A_, rhs_, m)) {
            count_ = 0;
            std::copy(acc_tg_.begin(), acc_tg_.end(), g);
            return;
        }
        for (int64_t y = 0; y < K_; ++y) g[y] = gc_[y] + r_[y];
        for (int p = 0; p < m; ++p) {
            const double* dgp = col_g(p);
            const double* drp = col_r(p);
            const double c = rhs_[p];
            for (int64_t y = 0; y < K_; ++y) g[y] -= (dgp[y] + drp[y]) * c;
        }
        const double mo = mean(g);
        for (int64_t y = 0; y < K_; ++y) g[y] = gate_[y] == 0 ? g[y] - mo : kNegInf;
    }

    // the mean of v over the columns of positive mass (0 when there are none)
    double mean(const double* v) const {
        return gated_sum_(v, gate_, K_) / static_cast<double>(n_live_);
    }

  private:
    const double* col_r(int p) const { return &dr_[static_cast<size_t>((head_ + p) % mem_) * K_]; }
    const double* col_g(int p) const { return &dg_[static_cast<size_t>((head_ + p) % mem_) * K_]; }

    int64_t K_, n_live_ = 1;
    int mem_;
    double rel_slack_, bound_;
    const double* gate_;
    Dot dot_;
    GatedSum gated_sum_;
    std::vector<double> dg_, dr_, gram_, pg_, pr_, acc_tg_, gc_, r_, A_, rhs_;
    int head_ = 0, count_ = 0;
    bool has_prev_ = false, has_acc_ = false;
    double acc_dual_ = 0;
};

// max |v| over the finite entries of v (0 when none)
double log_range(const double* v, int64_t n) {
    double r = 0;
    for (int64_t i = 0; i < n; ++i)
        if (std::isfinite(v[i])) r = std::max(r, std::abs(v[i]));
    return r;
}

// Per-thread working memory of one problem's loop.  A pass keeps each row's shift m_i and
// sum s_i; f_i = log a_i - m_i - log s_i is formed only where needed (the dual of
// Anderson's guard, an underflowed column, the returned iterate).
struct Work {
    std::vector<double> e, col, colmax, f, m_work, s_work, m_best, s_best, g, g_next, g_best,
        ea, eb, gate;
    std::vector<uint8_t> live;
    Scaled sf;
    void size(int64_t N, int64_t K) {
        for (auto* v : {&e, &col, &colmax, &g, &g_next, &g_best, &eb}) v->resize(K);
        for (auto* v : {&f, &m_work, &s_work, &m_best, &s_best, &ea}) v->resize(N);
        live.resize(K);
        gate.resize(K);
        sf.alpha = 0;
    }
};

// Problems of at most this many entries keep their matrix in the scaling form (Scaled:
// float64, 1 MiB, in the core's L2) and run scaled_pass while the live column potentials
// span at most kScaledRange: then r_i >= v at the row's largest live entry (k = 1 there)
// >= exp(-kScaledRange), and
// every term scaled_pass drops (below float64's normal range, in k or in a product k v) is
// below exp(-708 + kScaledRange) r_i, as negligible as the terms below exp(-708) times the
// row's largest that pass_rows drops; no row factor a_i / r_i or column sum overflows.
constexpr int64_t kScaledEntries = int64_t(1) << 17;
constexpr double kScaledRange = 600;

// The largest live g, when the live g span at most kScaledRange (else -inf).
double scaled_shift(const double* g, const uint8_t* live, int64_t K) {
    double lo = std::numeric_limits<double>::infinity(), hi = kNegInf;
    for (int64_t y = 0; y < K; ++y)
        if (live[y]) {
            lo = std::min(lo, g[y]);
            hi = std::max(hi, g[y]);
        }
    return hi > kNegInf && hi - lo <= kScaledRange ? hi : kNegInf;
}

// The scaling form of X at alpha in w.sf (computed unless it is already there).
template <class T>
Scaled& scaled_form(const Kernels<T>& kern, const T* X, int64_t N, int64_t K, double alpha,
                    Work& w) {
    Scaled& sf = w.sf;
    if (sf.alpha == alpha) return sf;
    if (4.0 * sf.alpha == alpha) {  // the next epsilon-scaling stage
        kern.scaled_pow4(sf.k.data(), N * sf.Kp);
        for (int64_t i = 0; i < N; ++i) sf.mx[i] *= 4.0;
    } else {
        sf.size(N, K);
        kern.scaled_rows(X, alpha, w.gate.data(), sf);
    }
    sf.alpha = alpha;
    return sf;
}

// One fused pass at g: m, s of every row, the column sums col, and colmax where a column
// underflowed (then f of the pass is in w.f; `f_ready` says so).
template <class T>
void pass(const Kernels<T>& kern, const T* X, int64_t N, int64_t K, double alpha,
          const double* g, const double* loga, Work& w, bool& f_ready) {
    double* col = w.col.data();
    const double gmax = N * K <= kScaledEntries ? scaled_shift(g, w.live.data(), K) : kNegInf;
    if (gmax > kNegInf) {
        Scaled& sf = scaled_form(kern, X, N, K, alpha, w);
        kern.scaled_pass(sf, g, gmax, w.ea.data(), w.m_work.data(), w.s_work.data(), col,
                         sf.v.data(), sf.c.data(), sf.r.data(), sf.w.data());
    } else {
        kern.pass_rows(X, N, K, alpha, g, w.ea.data(), w.m_work.data(), w.s_work.data(), col,
                       w.e.data());
    }
    f_ready = false;
    bool underflow = false;
    for (int64_t y = 0; y < K; ++y) {
        if (g[y] == kNegInf) col[y] = 0;
        underflow |= g[y] > kNegInf && !(col[y] > kColumnUnderflow);
    }
    if (!underflow) return;  // next_g reads colmax only where a column underflowed
    // max_i log Q_iy exactly, for the columns whose sum underflowed (see next_g)
    double* f = w.f.data();
    kern.row_potentials(loga, w.m_work.data(), w.s_work.data(), N, f);
    f_ready = true;
    double* cm = w.colmax.data();
    std::fill(cm, cm + K, kNegInf);
    for (int64_t i = 0; i < N; ++i) {
        if (!(f[i] > kNegInf)) continue;
        const T* x = X + i * K;
        for (int64_t y = 0; y < K; ++y)
            cm[y] = std::max(cm[y], alpha * static_cast<double>(x[y]) + f[i]);
    }
    for (int64_t y = 0; y < K; ++y) cm[y] += g[y];
}

// g = logb - LSE_i(S_iy): the first half-iteration, a column normalisation of exp(S).  A
// small problem takes the sums from its scaling form, LSE_i(S_iy) = M + log sum_i k_iy
// exp(mx_i - M) with M = max_i mx_i, when every column's largest S_iy is within
// kScaledRange of M (then each column's largest term is at least exp(-kScaledRange), and
// the terms lost to underflow are negligible beside it, as in pass).
template <class T>
void column_start(const Kernels<T>& kern, const T* X, int64_t N, int64_t K, double alpha,
                  const double* logb, double* g, double* mx, Work& w) {
    std::fill(mx, mx + K, kNegInf);
    for (int64_t i = 0; i < N; ++i) kern.col_max(X + i * K, K, alpha, mx);
    bool scaled = N * K <= kScaledEntries;
    double M = kNegInf;
    if (scaled) {
        Scaled& sf = scaled_form(kern, X, N, K, alpha, w);
        for (int64_t i = 0; i < N; ++i) M = std::max(M, sf.mx[i]);
        for (int64_t y = 0; y < K; ++y)
            scaled &= !(mx[y] > kNegInf) || mx[y] >= M - kScaledRange;
        if (scaled) kern.scaled_colsums(sf, M, g);
    }
    if (!scaled) {
        M = 0;
        std::fill(g, g + K, 0.0);
        for (int64_t i = 0; i < N; ++i) kern.col_sumexp(X + i * K, K, alpha, mx, g);
    }
    for (int64_t y = 0; y < K; ++y)
        g[y] = (logb[y] == kNegInf || !(mx[y] > kNegInf))
                   ? kNegInf
                   : logb[y] - ((scaled ? M : mx[y]) + std::log(g[y]));
}

struct OneResult {
    int64_t n_iter = 0;
    double err = 0;
    bool stalled = false;
};

// The passes of one stage at `alpha` (_solver.sinkhorn_loop) from w.g: at most `iters`
// passes (exactly that many when `fixed`), until err <= tol; Anderson mixing when `accel`,
// its iterates bounded by _solver.potential_bound (s_max = |alpha| max |X|), given up after
// `stall_window` passes (0: never) that cut the best err by less than 5%.  The best pass's
// m, s and g are left in w.m_best, w.s_best, w.g_best.
template <class T>
OneResult run_stage(const Kernels<T>& kern, const T* X, int64_t N, int64_t K, double alpha,
                    const BatchedArgs& A, const double* loga, const double* logb, double tol,
                    int64_t iters, bool fixed, bool accel, double s_max, int64_t stall_window,
                    Work& w, Interrupt& intr) {
    double* g = w.g.data();
    const double log_n = std::log(static_cast<double>(std::max<int64_t>(N, 1)));
    double bound = std::numeric_limits<double>::infinity();
    if (accel) {  // _solver.potential_bound
        const double lr = log_range(loga, N) + log_range(logb, K) +
                          std::log(std::max<double>(static_cast<double>(N) * K, 2.0));
        bound = 4.0 * static_cast<double>(std::min(N, K)) * (s_max + lr + 1.0);
    }
    Anderson anderson(K, std::max(A.memory, 1), A.rel_slack, bound, w.gate.data(), kern.dot,
                      kern.gated_sum);
    double best_err = std::numeric_limits<double>::infinity();
    int64_t best_it = 0;
    std::vector<double> history;
    OneResult res;
    int64_t it = 0;
    for (it = 1; it <= iters; ++it) {
        if (intr.poll()) break;
        bool f_ready;
        pass(kern, X, N, K, alpha, g, loga, w, f_ready);
        const double* f_work = w.f.data();
        const double err = kern.l1_diff(w.col.data(), w.eb.data(), K);
        double* lc = w.g_next.data();  // log col, then the next g in place
        kern.col_logs(w.col.data(), K, lc);
        for (int64_t y = 0; y < K; ++y) {
            lc[y] = w.live[y] ? next_g_of_log(g[y], logb[y], w.col[y], lc[y], w.colmax[y],
                                              log_n, 1.0)
                              : kNegInf;
        }
        double dual = 0, scale = 0, g_max = 0;
        if (accel) {
            if (!f_ready)
                kern.row_potentials(loga, w.m_work.data(), w.s_work.data(), N, w.f.data());
            // (b_y > 0 exactly on the live columns, g_y > -inf there)
            double rows[2], cols[2];
            kern.weighted_sums(w.ea.data(), f_work, N, rows);
            kern.weighted_sums(w.eb.data(), g, K, cols);
            dual = rows[0] + cols[0];
            scale = rows[1] + cols[1];
            const double gm = anderson.mean(g);
            for (int64_t y = 0; y < K; ++y)
                if (w.live[y]) g_max = std::max(g_max, std::abs(g[y] - gm));
        }
        if (best_it == 0 || ((err <= best_err || fixed) && (!accel || g_max <= bound))) {
            std::swap(w.m_work, w.m_best);
            std::swap(w.s_work, w.s_best);
            std::copy(g, g + K, w.g_best.begin());
            best_err = err;
            best_it = it;
        }
        if ((!fixed && err <= tol && best_it == it) || !std::isfinite(err)) break;
        if (stall_window > 0) {
            history.push_back(best_err);
            const size_t W = static_cast<size_t>(stall_window);
            if (history.size() > W && best_err > 0.95 * history[history.size() - 1 - W]) {
                res.stalled = true;
                break;
            }
        }
        if (accel) {
            anderson.step(g, w.g_next.data(), dual, scale, g_max);
        } else {
            std::copy(w.g_next.begin(), w.g_next.end(), g);
        }
    }
    res.n_iter = std::min(it, iters);
    res.err = best_err;
    return res;
}

// One problem: _solver.solve on one thread.  Epsilon scaling (tolerance mode without a warm
// start): stages at alpha / 4^k (k = eps_stages .. 1, a stage skipped once |alpha_k| max|X|
// < 4) solved to max(tol, 1e-2 mass), each warm-starting the next with g scaled by the ratio
// of the alphas; then the requested alpha to tol.  max_iter bounds every stage's passes
// together; n_iter counts them all.
template <class T>
OneResult solve_one(const Kernels<T>& kern, const T* X, int64_t N, int64_t K,
                    const BatchedArgs& A, const double* loga, const double* logb,
                    const double* g0, double tol, double max_abs, double* f_out,
                    double* g_out, Work& w, Interrupt& intr) {
    w.size(N, K);
    double mass = 0;
    for (int64_t y = 0; y < K; ++y) {
        w.live[y] = logb[y] > kNegInf;
        w.gate[y] = w.live[y] ? 0.0 : kNegInf;
        w.eb[y] = std::exp(logb[y]);
    }
    for (int64_t i = 0; i < N; ++i) {
        w.ea[i] = std::exp(loga[i]);
        mass += w.ea[i];
    }
    const bool fixed = A.n_iter > 0;
    const bool accel = A.memory > 0 && !fixed;
    double* g = w.g.data();
    std::vector<double> stages;
    if (!fixed && !g0)
        for (int k = A.eps_stages; k >= 1; --k) {
            const double a_k = A.alpha / std::pow(4.0, k);
            if (std::abs(a_k) * max_abs >= 4.0) stages.push_back(a_k);
        }
    int64_t passes = 0;
    double a_g = 0;  // the alpha of w.g_best (0: no stage ran)
    OneResult res;
    for (double a_k : stages) {
        if (A.max_iter - passes <= 1) break;
        if (a_g == 0) {
            column_start(kern, X, N, K, a_k, logb, g, w.g_next.data(), w);
        } else {
            for (int64_t y = 0; y < K; ++y) g[y] = w.g_best[y] * (a_k / a_g);
        }
        const OneResult st = run_stage(kern, X, N, K, a_k, A, loga, logb,
                                       std::max(tol, 1e-2 * mass), A.max_iter - passes - 1,
                                       false, accel, std::abs(a_k) * max_abs, 0, w, intr);
        passes += st.n_iter;
        a_g = a_k;
        if (!std::isfinite(st.err)) {
            res = st;
            break;
        }
    }
    if (std::isfinite(res.err)) {
        if (a_g != 0) {
            for (int64_t y = 0; y < K; ++y) g[y] = w.g_best[y] * (A.alpha / a_g);
        } else if (g0) {
            std::copy(g0, g0 + K, g);
            for (int64_t y = 0; y < K; ++y)
                if (!w.live[y]) g[y] = kNegInf;
        } else {
            column_start(kern, X, N, K, A.alpha, logb, g, w.g_next.data(), w);
        }
        const bool accelerated = !fixed && (passes > 0 || accel);
        res = run_stage(kern, X, N, K, A.alpha, A, loga, logb, tol,
                        fixed ? A.n_iter : A.max_iter - passes, fixed, accel,
                        std::abs(A.alpha) * max_abs, accelerated ? A.stall_window : 0, w,
                        intr);
    }
    res.n_iter += passes;
    kern.row_potentials(loga, w.m_best.data(), w.s_best.data(), N, f_out);
    std::copy(w.g_best.begin(), w.g_best.end(), g_out);
    return res;
}

// sum Q X over the allowed pairs, and the labels argmax_y (S_iy + g_y), at (f, g); from the
// scaling form of the matrix when the last stage kept one and g allows it (see pass).
template <class T>
double finish(const Kernels<T>& kern, const T* X, int64_t N, int64_t K, double alpha,
              const double* f, const double* g, int64_t* labels, Work& w) {
    for (int64_t i = 0; i < N && labels; ++i) {
        const T* x = X + i * K;
        double best = kNegInf;
        int64_t arg = 0;
        for (int64_t y = 0; y < K; ++y) {
            const double t = alpha * static_cast<double>(x[y]) + g[y];
            if (t > best) {
                best = t;
                arg = y;
            }
        }
        labels[i] = arg;
    }
    const double gmax = w.sf.alpha == alpha ? scaled_shift(g, w.live.data(), K) : kNegInf;
    if (gmax > kNegInf)  // rho_i <= a_i exp(kScaledRange): no overflow
        return kern.scaled_cost(w.sf, X, f, g, gmax, w.m_work.data(), w.e.data());
    double cost = 0;
    double* c = w.e.data();
    for (int64_t i = 0; i < N; ++i) {
        if (!(f[i] > kNegInf)) continue;
        for (int64_t y = 0; y < K; ++y) c[y] = f[i] + g[y];
        cost += kern.row_cost(X + i * K, c, K, alpha);
    }
    return cost;
}

}  // namespace

template <class T>
bool batched_solve(const T* X, const BatchedArgs& A, BatchedOut& out, int n_threads,
                   const Interrupted& interrupted) {
    const int64_t B = A.B, N = A.N, K = A.K;
    int nt = n_threads > 0 ? n_threads : max_threads();
    nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, B)));
    Interrupt intr(interrupted);
    const Kernels<T>& kern = kernels<T>();
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        FlushDenormals ftz;
        Work w;
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < B; ++p) {
            if (intr.poll()) continue;
            const T* Xp = X + p * A.x_stride;
            // the validation read: a problem with an invalid entry is not solved (the
            // caller raises, naming it)
            double mx = 0;
            out.flags[p] = kern.scan_entries(Xp, N * K, A.forbidden, mx);
            out.max_abs[p] = mx;
            if (out.flags[p] & 1) {
                out.n_iter[p] = 0;
                out.err[p] = std::numeric_limits<double>::quiet_NaN();
                out.stalled[p] = 0;
                out.cost[p] = 0;
                continue;
            }
            OneResult r = solve_one(kern, Xp, N, K, A, A.loga + p * A.a_stride,
                                    A.logb + p * A.b_stride, A.g0 ? A.g0 + p * K : nullptr,
                                    A.tol[p], mx, out.f + p * N, out.g + p * K, w, intr);
            out.n_iter[p] = r.n_iter;
            out.err[p] = r.err;
            out.stalled[p] = r.stalled ? 1 : 0;
            out.cost[p] = finish(kern, Xp, N, K, A.alpha, out.f + p * N, out.g + p * K,
                                 out.labels ? out.labels + p * N : nullptr, w);
        }
    }
    return !intr.stopped();
}

template <class T>
bool multi_pass(const T* X, int64_t N, int64_t K, double alpha, const double* G, int64_t k,
                const double* loga, double* F, double* col, double* cost, uint8_t* underflow,
                int n_threads, const Interrupted& interrupted) {
    // Padded sizes: Kp a multiple of 8 lanes, kp of base::kTargets (zero rows and columns
    // contribute nothing).
    const int64_t Kp = (K + 7) / 8 * 8, kR = base::kRows, kT = base::kTargets;
    const int64_t kp = (k + kT - 1) / kT * kT;
    // gbar_y = max_t g^t_y and Wt_ty = exp(g^t_y - gbar_y) <= 1, once per pass
    std::vector<double> gbar(K, kNegInf), Wt(static_cast<size_t>(kp) * Kp, 0.0);
    for (int64_t t = 0; t < k; ++t)
        for (int64_t y = 0; y < K; ++y) gbar[y] = std::max(gbar[y], G[t * K + y]);
    for (int64_t t = 0; t < k; ++t)
        for (int64_t y = 0; y < K; ++y)
            Wt[t * Kp + y] = gbar[y] > kNegInf ? std::exp(G[t * K + y] - gbar[y]) : 0.0;
    const int64_t entries = N * K * (1 + k / 4);
    int nt = n_threads > 0 ? n_threads : max_threads();
    nt = static_cast<int>(
        std::max<int64_t>(1, std::min<int64_t>({int64_t(nt), N, entries / 32768})));
    // a factorised row sum below this has lost digits to underflow: recomputed exactly
    constexpr double kTiny = 1e-250;
    std::vector<std::vector<double>> acc(nt), acc_x(nt), ccol(nt);
    std::vector<double> part_cost(static_cast<size_t>(nt) * k, 0.0);
    Interrupt intr(interrupted);
    const Kernels<T>& kern = kernels<T>();
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        FlushDenormals ftz;
        const int tid = thread_id();
        std::vector<double>& a = acc[tid];
        std::vector<double>& ax = acc_x[tid];  // sum_i Rr_it e_iy x_iy, for the cost
        std::vector<double>& cc = ccol[tid];   // exact contributions (k x K), rarely used
        a.assign(static_cast<size_t>(kp) * Kp, 0.0);
        if (cost) ax.assign(static_cast<size_t>(kp) * Kp, 0.0);
        std::vector<double> E(kR * Kp, 0.0), Ex(cost ? kR * Kp : 0), m(kR),
            S(kR * kp), Rr(kR * kp, 0.0), ex(K);
        double* pc = &part_cost[static_cast<size_t>(tid) * k];
        const int64_t lo = N * tid / nt, hi = N * (tid + 1) / nt;
        for (int64_t i0 = lo; i0 < hi; i0 += kR) {
            if (((i0 - lo) & 255) == 0 && intr.poll()) break;
            const int64_t R = std::min(kR, hi - i0);
            kern.multi_rows(X + i0 * K, R, K, Kp, kp, alpha, gbar.data(), Wt.data(),
                            E.data(), m.data(), S.data());
            for (int64_t r = 0; r < kR; ++r) {
                for (int64_t t = 0; t < kp; ++t) Rr[r * kp + t] = 0;
                if (r >= R) continue;
                const int64_t i = i0 + r;
                const double la = loga[i];
                for (int64_t t = 0; t < k; ++t) {
                    const double s = S[r * kp + t];
                    if (la == kNegInf || !(m[r] > kNegInf)) {
                        F[t * N + i] = kNegInf;
                    } else if (s > kTiny) {
                        const double ls = std::log(s);
                        F[t * N + i] = la - m[r] - ls;
                        Rr[r * kp + t] = std::exp(la - ls);
                    } else {  // this target's own shift: exact, one more read of the row
                        const T* x = X + i * K;
                        double ss;
                        const double mt = kern.row_exp(x, G + t * K, K, alpha, ex.data(), ss);
                        if (!(mt > kNegInf)) {
                            F[t * N + i] = kNegInf;
                            continue;
                        }
                        const double ls = std::log(ss), r_it = std::exp(la - ls);
                        F[t * N + i] = la - mt - ls;
                        if (cc.empty()) cc.assign(static_cast<size_t>(k) * K, 0.0);
                        kern.axpy(cc.data() + t * K, ex.data(), r_it, K);
                        if (cost) {
                            double c = 0;
                            for (int64_t y = 0; y < K; ++y)
                                if (ex[y] > 0) c += ex[y] * static_cast<double>(x[y]);
                            pc[t] += c * r_it;
                        }
                    }
                }
            }
            kern.multi_axpys(E.data(), Rr.data(), Kp, kp, a.data());
            if (cost) {
                kern.times_x(E.data(), X + i0 * K, R, K, Kp, Ex.data());
                kern.multi_axpys(Ex.data(), Rr.data(), Kp, kp, ax.data());
            }
        }
    }
    if (intr.stopped()) return false;
    for (int64_t t = 0; t < k; ++t) {
        underflow[t] = 0;
        double c = 0;
        for (int p = 0; p < nt; ++p) c += part_cost[static_cast<size_t>(p) * k + t];
        for (int64_t y = 0; y < K && cost; ++y) {
            double v = 0;
            for (int p = 0; p < nt; ++p) v += acc_x[p][t * Kp + y];
            c += Wt[t * Kp + y] * v;
        }
        if (cost) cost[t] = c;
        for (int64_t y = 0; y < K; ++y) {
            double v = 0;
            for (int p = 0; p < nt; ++p) v += acc[p][t * Kp + y];
            v *= Wt[t * Kp + y];
            for (int p = 0; p < nt; ++p)
                if (!ccol[p].empty()) v += ccol[p][t * K + y];
            if (G[t * K + y] == kNegInf) v = 0;
            col[t * K + y] = v;
            if (G[t * K + y] > kNegInf && !(v > kColumnUnderflow)) underflow[t] = 1;
        }
    }
    return true;
}

template bool batched_solve<float>(const float*, const BatchedArgs&, BatchedOut&, int,
                                   const Interrupted&);
template bool batched_solve<double>(const double*, const BatchedArgs&, BatchedOut&, int,
                                    const Interrupted&);
template bool multi_pass<float>(const float*, int64_t, int64_t, double, const double*, int64_t,
                                const double*, double*, double*, double*, uint8_t*, int,
                                const Interrupted&);
template bool multi_pass<double>(const double*, int64_t, int64_t, double, const double*,
                                 int64_t, const double*, double*, double*, double*, uint8_t*,
                                 int, const Interrupted&);

}  // namespace sinkhorn_ot::cpu
