#include "sinkhorn_cpu.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SK_X86 1
#endif
#if (defined(__GNUC__) || defined(__clang__)) && !defined(SK_NO_VECTOR_EXT)
#define SK_VECTOR_EXT 1
#endif

#include "../common/sinkhorn_math.h"

namespace sinkhorn_ot::cpu {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kNoMax = std::numeric_limits<double>::max();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// What a kernel row returns.  RowResult::qs = r_i (sum_y e_iy (t_iy - m_i) + m_i s_i) =
// sum_y Q_iy (S_iy + g_y): the row's share of the cost before the column term (fused_pass).
// RowResult::slack: for a row done in float32, the bound on its plan error relative to its
// mass (the L1 error of its entries, and the error of its row sum; 0 for a row done in
// float64: see row_body).  It bounds the change of a pass's L1 err by 2 slack mass.
// RowResult::mixed_failed: the row tried the mixed form and its bound came out over the
// allowance (the row was redone in float64; see fused_pass).
struct RowResult {
    double qs = 0;
    double slack = 0;
    bool mixed_failed = false;
};
struct LseRow {
    bool bad = false;      // a NaN or wrong-infinity entry in the row
    bool allowed = false;  // an entry that is not forbidden
    double mx = 0;         // largest |finite entry|
};

// The row kernels, once per instruction set, chosen at load time: a wheel must not assume
// the CPU it runs on (no -march=native).  GCC builds AVX-512 (x86-64-v4), AVX2+FMA
// (x86-64-v3) and baseline copies, each with vectors of its native width; other compilers
// and CPUs get the baseline copy only.  Only our own code lies inside the target regions:
// the standard headers are included above, so their inline functions stay baseline.
#if defined(SK_X86) && defined(__GNUC__) && !defined(__clang__) && defined(SK_VECTOR_EXT)
#define SK_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // _mm512_cvtps_pd's undefined base
namespace v4 {
#define SK_W 64
#include "sinkhorn_cpu_kernels.h"
#undef SK_W
}  // namespace v4
#pragma GCC diagnostic pop
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace v3 {
#define SK_W 32
#include "sinkhorn_cpu_kernels.h"
#undef SK_W
}  // namespace v3
#pragma GCC pop_options
#endif
namespace base {
#define SK_W 16
#include "sinkhorn_cpu_kernels.h"
#undef SK_W
}  // namespace base

// The entry points of one instruction set's kernels.
template <class T>
struct Kernels {
    RowResult (*row_nolab)(const T*, const double*, const float*, int64_t, double, double,
                           double, T*, double*, float*, double*, double&, int64_t*, T*, double,
                           double, bool, double, double, double&);
    decltype(row_nolab) row_lab;
    void (*flush_cols)(float*, double*, int64_t);
    void (*plan_row)(const T*, const double*, int64_t, double, T*);
    void (*colmax_row)(const T*, int64_t, double, double, double*);
    LseRow (*lse_max_row_check)(const T*, int64_t, double, double, T, double*);
    decltype(lse_max_row_check) lse_max_row_plain;
    void (*lse_rescale)(double*, double*, const double*, int64_t);
    void (*lse_sum_row)(const T*, int64_t, double, double, const double*, double*);
    T (*scal_facts_scores)(const T*, int64_t, bool&, bool&, T&);
    decltype(scal_facts_scores) scal_facts_probs;
    void (*scal_exp_row)(const T*, int64_t, double, T, T*);
    double (*scal_dot)(const T*, const double*, int64_t);
    void (*scal_axpy)(const T*, double, int64_t, double*);
    void (*scal_write)(const T*, double, const double*, int64_t, T*);
    int64_t (*row_ties)(const T*, const double*, int64_t, double, double);
    int64_t (*row_argmax)(const T*, const double*, int64_t, double);
};

#define SK_TABLE(ns, T)                                                                    \
    Kernels<T> {                                                                           \
        &ns::row_body<T, false>, &ns::row_body<T, true>, &ns::flush_cols, &ns::plan_row<T>, \
            &ns::colmax_row<T>, &ns::lse_max_row<T, true>, &ns::lse_max_row<T, false>,     \
            &ns::lse_rescale, &ns::lse_sum_row<T>, &ns::scal_row_facts<T, false>,          \
            &ns::scal_row_facts<T, true>, &ns::scal_exp_row<T>, &ns::scal_dot<T>,          \
            &ns::scal_axpy<T>, &ns::scal_write<T>, &ns::row_ties<T>, &ns::row_argmax<T>    \
    }

// The widest instruction set this CPU has, capped by SINKHORN_OT_CPU_ISA ("avx512", "avx2"
// or "baseline"; for benchmarks and for testing every copy on one machine).
int isa_level() {
    static const int level = [] {
        int cap = 2;
        if (const char* env = std::getenv("SINKHORN_OT_CPU_ISA")) {
            const std::string v(env);
            cap = v == "baseline" ? 0 : v == "avx2" ? 1 : 2;
        }
        int have = 0;
#ifdef SK_MULTI_ISA
        __builtin_cpu_init();
        have = __builtin_cpu_supports("x86-64-v4") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
#endif
        return std::min(cap, have);
    }();
    return level;
}

template <class T>
const Kernels<T>& kernels() {
    static const Kernels<T> k = [] {
#ifdef SK_MULTI_ISA
        if (isa_level() == 2) return SK_TABLE(v4, T);
        if (isa_level() == 1) return SK_TABLE(v3, T);
#endif
        return SK_TABLE(base, T);
    }();
    return k;
}
#undef SK_TABLE


// Threads for a pass over N x K: as asked (else OpenMP's default), but never more than one
// per 32k entries -- waking a team costs more than a small pass (and much more on a busy
// machine, where a descheduled thread stalls the others at the barrier).
int resolve_threads(int n_threads, int64_t N, int64_t K) {
    int64_t nt = std::min<int64_t>(n_threads > 0 ? n_threads : max_threads(), N * K / 32768);
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, N)));
}

#include "runtime.h"

// Rows are split into one contiguous block per thread (static, so results do not depend on
// timing).
void row_range(int64_t N, int nt, int tid, int64_t& lo, int64_t& hi) {
    lo = N * tid / nt;
    hi = N * (tid + 1) / nt;
}

// Per-thread scratch kept between passes (OpenMP reuses its threads): a pass allocates
// nothing once the first has run at this K.
template <class T>
struct Scratch {
    std::vector<T> e;         // exp(t - m) of the current row
    // float32 column accumulators (float32 input) or the float32 exponentials of a mixed
    // row (float64 input)
    std::vector<float> colf;
    std::vector<double> xd;   // float64 exponentials of a float32 row
    std::vector<double> col;  // the thread's column sums
};

// float32 column accumulators move into float64 every kFlushRows rows: each float32 sum
// then holds at most 8 terms (relative error below 5e-7, about 1e-7 in practice).
constexpr int64_t kFlushRows = 8;
template <class T>
Scratch<T>& scratch() {
    thread_local Scratch<T> s;
    return s;
}


// Where a pass writes plan row i, or null.
template <class T>
T* plan_row_ptr(const PlanOut<T>* p, int64_t i, int64_t K, int64_t& cursor) {
    if (!p) return nullptr;
    if (!p->rows) {
        int64_t k = i - p->row0;
        return (k >= 0 && k < p->n_rows) ? p->out + k * K : nullptr;
    }
    if (cursor == 0) cursor = std::lower_bound(p->rows, p->rows + p->n_rows, i) - p->rows;
    while (cursor < p->n_rows && p->rows[cursor] < i) ++cursor;
    return (cursor < p->n_rows && p->rows[cursor] == i) ? p->out + cursor * K : nullptr;
}

// A row's validation facts into its thread's CheckOut (the exact position of a bad entry
// by a scalar scan, only in a row that has one).
template <class T>
void note_row(CheckOut& pc, const LseRow& r, const T* x, int64_t i, int64_t K, T sgn) {
    pc.max_abs = std::max(pc.max_abs, r.mx);
    if (r.bad && pc.first_invalid < 0)
        for (int64_t y = 0; y < K; ++y)
            if (!(sgn * x[y] < std::numeric_limits<T>::infinity())) {
                pc.first_invalid = i * K + y;
                break;
            }
    if (!r.allowed && pc.first_empty_row < 0) pc.first_empty_row = i;
}

// The threads' facts in one (threads hold increasing row ranges: the first hit wins).
CheckOut combine_checks(const std::vector<CheckOut>& part) {
    CheckOut out;
    for (const CheckOut& p : part) {
        if (out.first_invalid < 0) out.first_invalid = p.first_invalid;
        if (out.first_empty_row < 0) out.first_empty_row = p.first_empty_row;
        out.max_abs = std::max(out.max_abs, p.max_abs);
    }
    return out;
}

template <class T>
void exact_colmax(const T* X, int64_t N, int64_t K, double alpha, const double* f,
                  const double* g, double* colmax, int nt) {
    std::vector<std::vector<double>> part(nt);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = thread_id();
        part[tid].assign(K, kNegInf);
        int64_t lo, hi;
        row_range(N, nt, tid, lo, hi);
        for (int64_t i = lo; i < hi; ++i)
            if (f[i] > kNegInf)
                kernels<T>().colmax_row(X + i * K, K, alpha, f[i], part[tid].data());
    }
    for (int64_t y = 0; y < K; ++y) {
        double mx = kNegInf;
        for (int k = 0; k < nt; ++k) mx = std::max(mx, part[k][y]);
        colmax[y] = mx + g[y];
    }
}

}  // namespace

const char* isa_name() {
    static const char* names[] = {"baseline", "avx2", "avx512"};
    return names[isa_level()];
}

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

template <class T>
bool fused_pass(const T* X, int64_t N, int64_t K, double alpha, const double* g,
                const double* loga, double rho_a, PassOut& out, const PlanOut<T>* plan,
                double fast, const RowShifts* shifts, int n_threads,
                const Interrupted& interrupted) {
    const int nt = resolve_threads(n_threads, N, K);
    // The previous pass's row log-sum-exps bound this pass's row maxima from above (rows
    // move by at most the largest change of g) and from below within log K + the range of
    // the change: within 30, the bound serves as the shift (exp(-30) keeps float32's
    // precision), saving the maximum's sweep.
    const double* lse_prev = nullptr;
    double dg_max = kNegInf;
    if (shifts && shifts->lse_prev && shifts->g_prev) {
        double dg_min = std::numeric_limits<double>::infinity();
        bool ok = true;
        for (int64_t y = 0; y < K && ok; ++y) {
            const double gp = shifts->g_prev[y];
            if (g[y] == kNegInf || gp == kNegInf) {  // a column that opened or closed: none
                ok = g[y] == gp;
                continue;
            }
            dg_max = std::max(dg_max, g[y] - gp);
            dg_min = std::min(dg_min, g[y] - gp);
        }
        if (ok && dg_max > kNegInf && dg_max - dg_min + std::log(double(K)) <= 30.0)
            lse_prev = shifts->lse_prev;
    }
    double* lse_out = shifts ? shifts->lse : nullptr;
    std::vector<float> gf;  // float32 g for the float32 row shift and float32 rows
    double g_absmax = 0;
    for (int64_t y = 0; y < K; ++y) g_absmax = std::max(g_absmax, std::abs(g[y]));
    if constexpr (std::is_same_v<T, float>) {
        gf.resize(K);
        for (int64_t y = 0; y < K; ++y) gf[y] = static_cast<float>(g[y]);
    }
    std::vector<double*> cols(nt);
    std::vector<double> qs(nt, 0.0), slack(nt, 0.0);
    Interrupt intr(interrupted);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        FlushDenormals ftz;
        const int tid = thread_id();
        const Kernels<T>& kern = kernels<T>();
        const auto row = out.labels ? kern.row_lab : kern.row_nolab;
        Scratch<T>& s = scratch<T>();
        if (static_cast<int64_t>(s.e.size()) < K) s.e.resize(K);
        if (std::is_same_v<T, float> && static_cast<int64_t>(s.xd.size()) < K) s.xd.resize(K);
        s.col.assign(K, 0.0);
        if constexpr (std::is_same_v<T, float>)
            s.colf.assign(K, 0.0f);
        else if (static_cast<int64_t>(s.colf.size()) < K)
            s.colf.resize(K);
        cols[tid] = s.col.data();
        int64_t lo, hi;
        row_range(N, nt, tid, lo, hi);
        double qs_t = 0, slack_t = 0;
        int64_t cursor = 0;
        // Rows of one pass weigh their |t - m| alike: once one row's mixed bound exceeds the
        // allowance, the thread's later rows go to float64 without trying (speed only).
        bool try_mixed = true;
        const double pscale = plan ? plan->scale : 1.0;
        for (int64_t i = lo; i < hi; ++i) {
            if (intr.poll(i - lo)) break;
            T* prow = plan_row_ptr(plan, i, K, cursor);
            double lse_i;
            const double hint =
                lse_prev ? (lse_prev[i] > kNegInf ? lse_prev[i] + dg_max : kNegInf) : kNaN;
            RowResult r = row(X + i * K, g, gf.data(), K, alpha, loga[i], rho_a, s.e.data(),
                              s.xd.data(), s.colf.data(), s.col.data(), out.f[i],
                              out.labels ? out.labels + i : nullptr, prow, pscale, fast,
                              try_mixed, g_absmax, hint, lse_i);
            try_mixed &= !r.mixed_failed;
            if (lse_out) lse_out[i] = lse_i;
            qs_t += r.qs;
            slack_t = std::max(slack_t, r.slack);
            if (std::is_same_v<T, float> && (i - lo) % kFlushRows == kFlushRows - 1)
                kern.flush_cols(s.colf.data(), s.col.data(), K);
        }
        if (std::is_same_v<T, float>) kern.flush_cols(s.colf.data(), s.col.data(), K);
        qs[tid] = qs_t;
        slack[tid] = slack_t;
#pragma omp barrier
        // Combine the per-thread column sums, a slice of columns per thread, in thread order
        // (reproducible).
        const int64_t y0 = K * tid / nt, y1 = K * (tid + 1) / nt;
        for (int64_t y = y0; y < y1; ++y) {
            double c = 0;
            for (int k = 0; k < nt; ++k) c += cols[k][y];
            out.col[y] = c;
        }
    }
    if (intr.stopped()) return false;
    double qsum = 0, gsum = 0;
    out.slack = 0;
    for (int k = 0; k < nt; ++k) {
        qsum += qs[k];
        out.slack = std::max(out.slack, slack[k]);
    }
    bool underflow = false;
    for (int64_t y = 0; y < K; ++y) {
        // exp of the clamp (1.7e-38 in float32) stands for entries far below a row's
        // maximum; a column closed by g = -inf carries exactly no mass
        if (g[y] == kNegInf) out.col[y] = 0;
        if (out.col[y] > 0) gsum += out.col[y] * g[y];
        underflow |= !(out.col[y] > kColumnUnderflow);
    }
    // sum_iy Q_iy S_iy = sum_i r_i sum_y e_iy (t_iy - m_i) + r_i m_i s_i - sum_y col_y g_y
    out.cost = (qsum - gsum) / alpha;
    if (underflow) {
        exact_colmax(X, N, K, alpha, out.f, g, out.colmax, nt);
    } else {
        // col_y >= max_i Q_iy for the entries kept, and a dropped entry is below
        // exp(-87) r_i (float32) or exp(-708) r_i (float64), far below col_y here.
        for (int64_t y = 0; y < K; ++y) out.colmax[y] = std::log(out.col[y]);
    }
    return true;
}

// A float64 scaling, column sum or row sum outside [kScalLo, kScalHi] ends the scaling
// passes: beyond it products of u, E and v could leave float64's range (the log-domain
// passes take over).
constexpr double kScalLo = 1e-280, kScalHi = 1e280;

template <class T>
int scaling_codes(const T* X, int64_t N, int64_t K, double alpha, bool probs, const double* b,
                  int n_iter, double scale, T* out, int n_threads,
                  const Interrupted& interrupted) {
    const int nt = resolve_threads(n_threads, N, K);
    const T* E = probs ? X : out;
    const double a = 1.0 / static_cast<double>(N);
    std::vector<double*> cols(nt);
    std::vector<double> ref(nt, kNegInf), v(K);
    // The largest u_i and v_y of any iteration (u of the first column step is at most 1):
    // an entry of E that underflowed (below exp(-87), exp(-708) in float64, of its row's
    // largest) weighed at most u_max e v_max in the plan.
    std::vector<double> umax(nt, 1.0), vmax(nt, 0.0);
    double b_min = b ? kNoMax : 1.0 / static_cast<double>(K);
    for (int64_t y = 0; b && y < K; ++y)
        if (b[y] > 0) b_min = std::min(b_min, b[y]);
    std::atomic<int> status{0};
    Interrupt intr(interrupted);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        FlushDenormals ftz;
        const int tid = thread_id();
        const Kernels<T>& kern = kernels<T>();
        Scratch<T>& s = scratch<T>();
        s.col.assign(K, 0.0);
        double* col = s.col.data();
        cols[tid] = col;
        int64_t lo, hi;
        row_range(N, nt, tid, lo, hi);
        const int64_t y0 = K * tid / nt, y1 = K * (tid + 1) / nt;
        // The thread's largest u and v, kept in registers: the threads' slots of umax and
        // vmax share a cache line, and writing them per entry made the threads take turns.
        double umax_t = 1.0, vmax_t = 0.0;
        // Column sums over the threads (a slice of columns each), then v = b / c.
        auto column_step = [&](bool rescale) {
            double M = kNegInf;
            if (rescale)
                for (int k = 0; k < nt; ++k) M = std::max(M, ref[k]);
            for (int64_t y = y0; y < y1; ++y) {
                double c = 0;
                for (int k = 0; k < nt; ++k)
                    c += rescale ? (ref[k] > kNegInf ? cols[k][y] * std::exp(ref[k] - M) : 0.0)
                                 : cols[k][y];
                if (!(c > kScalLo && c < kScalHi)) status.store(2);
                v[y] = (b ? b[y] : 1.0 / static_cast<double>(K)) / c;
                vmax_t = std::max(vmax_t, v[y]);
            }
        };
        // The kernel and its column sums at u_i = exp(m_i - ref): ref is the thread's largest
        // row maximum m_i = alpha max_y x_iy so far (0 for probabilities).
        double rt = kNegInf;
        for (int64_t i = lo; i < hi; ++i) {
            if (intr.poll(i - lo) || status.load(std::memory_order_relaxed)) break;
            bool bad, allowed;
            T mn;
            const T* x = X + i * K;
            const T mx = probs ? kern.scal_facts_probs(x, K, bad, allowed, mn)
                               : kern.scal_facts_scores(x, K, bad, allowed, mn);
            // |alpha x| beyond what the log-domain kernels accept is refused there too
            if (bad || !allowed ||
                !(std::abs(alpha) * std::max(std::abs(double(mx)), std::abs(double(mn))) <=
                  std::numeric_limits<T>::max() / 16)) {
                status.store(1);
                break;
            }
            double m = 0;
            if (!probs) {
                kern.scal_exp_row(x, K, alpha, mx, out + i * K);
                m = alpha * static_cast<double>(mx);
            }
            if (m > rt) {
                if (rt > kNegInf) {
                    const double r = std::exp(rt - m);
                    for (int64_t y = 0; y < K; ++y) col[y] *= r;
                }
                rt = m;
            }
            kern.scal_axpy(E + i * K, std::exp(m - rt), K, col);
        }
        ref[tid] = rt;
#pragma omp barrier
        int st = status.load() != 0 || intr.stopped();
#pragma omp barrier
        if (!st) column_step(true);
        for (int it = 1; it <= n_iter && !st; ++it) {
#pragma omp barrier
            st = status.load() != 0 || intr.stopped();
#pragma omp barrier
            if (st) break;
            const bool last = it == n_iter;
            if (!last) std::fill(col, col + K, 0.0);
            for (int64_t i = lo; i < hi; ++i) {
                if (intr.poll(i - lo)) break;
                const T* e = E + i * K;
                const double rs = kern.scal_dot(e, v.data(), K);
                if (!(rs > kScalLo && rs < kScalHi)) {
                    status.store(2);
                    break;
                }
                umax_t = std::max(umax_t, a / rs);
                if (last)
                    kern.scal_write(e, a * scale / rs, v.data(), K, out + i * K);
                else
                    kern.scal_axpy(e, a / rs, K, col);
            }
            if (last) break;
#pragma omp barrier
            column_step(false);
        }
        umax[tid] = umax_t;
        vmax[tid] = vmax_t;
    }
    if (intr.stopped()) return -1;
    if (status.load()) return status.load();
    // The mass the underflowed entries could have carried, N K u_max e v_max, must stay
    // below 1e-7 (1e-15 in float64) of the smallest marginal entry; otherwise the kernel
    // has lost what the log-domain passes keep (a cluster fed only by entries far below
    // their rows' best).
    const bool f32 = std::is_same_v<T, float>;
    const double lost = static_cast<double>(N) * static_cast<double>(K) *
                        *std::max_element(umax.begin(), umax.end()) *
                        *std::max_element(vmax.begin(), vmax.end()) *
                        (f32 ? 1.7e-38 : 3.4e-308);
    return lost <= (f32 ? 1e-7 : 1e-15) * std::min(a, b_min) ? 0 : 2;
}

template <class T>
void labels(const T* X, int64_t N, int64_t K, double alpha, const double* g, int64_t* out,
            int n_threads) {
    const int nt = resolve_threads(n_threads, N, K);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t lo, hi;
        row_range(N, nt, thread_id(), lo, hi);
        for (int64_t i = lo; i < hi; ++i) out[i] = kernels<T>().row_argmax(X + i * K, g, K, alpha);
    }
}

template <class T>
void near_ties(const T* X, int64_t N, int64_t K, double alpha, const double* g,
               const int64_t* rows, int64_t n, double tau, int64_t* count, int n_threads) {
    const int nt = resolve_threads(n_threads, std::max<int64_t>(n, 1), K);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        FlushDenormals ftz;
        int64_t lo, hi;
        row_range(n, nt, thread_id(), lo, hi);
        for (int64_t k = lo; k < hi; ++k)
            count[k] = kernels<T>().row_ties(X + rows[k] * K, g, K, alpha, tau);
    }
    (void)N;
}

// h_i = sum_y (x_iy > -inf ? x_iy r0_y : r1_y) in float64, the terms added in a fixed
// order (eight running sums by y mod 8): identical rows get identical hashes whatever their
// alignment, which a BLAS product does not promise.
template <class T>
void row_hashes(const T* X, int64_t N, int64_t K, const double* r0, const double* r1,
                double* h, int n_threads) {
    const int nt = resolve_threads(n_threads, std::max<int64_t>(N, 1), K);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t lo, hi;
        row_range(N, nt, thread_id(), lo, hi);
        for (int64_t i = lo; i < hi; ++i) {
            const T* x = X + i * K;
            double s[8] = {};
            for (int64_t y0 = 0; y0 < K; y0 += 8)
                for (int64_t l = 0; l < 8 && y0 + l < K; ++l) {
                    const int64_t y = y0 + l;
                    const double v = static_cast<double>(x[y]);
                    s[l] += v > kNegInf ? v * r0[y] : r1[y];
                }
            h[i] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
        }
    }
}

template <class T>
bool plan(const T* X, int64_t N, int64_t K, double alpha, const double* f, const double* g,
          const PlanOut<T>& p, int n_threads, const Interrupted& interrupted) {
    const int64_t n = p.n_rows;
    const int nt = resolve_threads(n_threads, std::max<int64_t>(n, 1), K);
    const double log_scale = std::log(p.scale);
    Interrupt intr(interrupted);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        FlushDenormals ftz;
        std::vector<double> c(K);
        int64_t lo, hi;
        row_range(n, nt, thread_id(), lo, hi);
        for (int64_t k = lo; k < hi; ++k) {
            if (intr.poll(k - lo)) break;
            const int64_t i = p.rows ? p.rows[k] : p.row0 + k;
            const double fi = f[i] + log_scale;
            for (int64_t y = 0; y < K; ++y) c[y] = fi + g[y];
            kernels<T>().plan_row(X + i * K, c.data(), K, alpha, p.out + k * K);
        }
    }
    (void)N;
    return !intr.stopped();
}

template <class T>
bool column_lse(const T* X, int64_t N, int64_t K, double alpha, const double* f, double* L,
                CheckOut* check, double forbidden, int n_threads,
                const Interrupted& interrupted) {
    const int nt = resolve_threads(n_threads, N, K);
    std::vector<std::vector<double>> M(nt), Z(nt);
    std::vector<CheckOut> part(nt);
    // t = alpha x with alpha > 0 maps a forbidden -inf to -inf; alpha < 0 maps +inf to -inf
    const T sgn = forbidden < 0 ? T(1) : T(-1);
    Interrupt intr(interrupted);
    // rows per block: the block's two sweeps share the cache (about 128 KB of X)
    const int64_t R = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        FlushDenormals ftz;
        const int tid = thread_id();
        const Kernels<T>& kern = kernels<T>();
        M[tid].assign(K, kNoMax);
        Z[tid].assign(K, 0.0);
        std::vector<double> bm(K);
        CheckOut pc;  // the thread's own (the slots of `part` share cache lines)
        int64_t lo, hi;
        row_range(N, nt, tid, lo, hi);
        for (int64_t i0 = lo; i0 < hi; i0 += R) {
            if (intr.poll(((i0 - lo) / R) * 256)) break;
            const int64_t i1 = std::min(hi, i0 + R);
            std::fill(bm.begin(), bm.end(), -kNoMax);
            for (int64_t i = i0; i < i1; ++i) {
                const T* x = X + i * K;
                const double fi = f ? f[i] : 0.0;
                if (!check) {
                    kern.lse_max_row_plain(x, K, alpha, fi, sgn, bm.data());
                    continue;
                }
                note_row(pc, kern.lse_max_row_check(x, K, alpha, fi, sgn, bm.data()), x, i, K,
                         sgn);
            }
            kern.lse_rescale(M[tid].data(), Z[tid].data(), bm.data(), K);
            for (int64_t i = i0; i < i1; ++i)
                kern.lse_sum_row(X + i * K, K, alpha, f ? f[i] : 0.0, M[tid].data(),
                                 Z[tid].data());
        }
        part[tid] = pc;
    }
    if (intr.stopped()) return false;
    for (int64_t y = 0; y < K; ++y) {  // M = -nM per thread; nM = kNoMax: no entry
        double nmx = kNoMax;
        for (int k = 0; k < nt; ++k) nmx = std::min(nmx, M[k][y]);
        double z = 0;
        if (nmx != kNoMax)
            for (int k = 0; k < nt; ++k)
                if (M[k][y] != kNoMax) z += Z[k][y] * std::exp(nmx - M[k][y]);
        L[y] = nmx == kNoMax ? kNegInf : -nmx + std::log(z);
    }
    if (check) {
        *check = combine_checks(part);
        for (int64_t y = 0; y < K; ++y)
            if (L[y] == kNegInf) {
                check->first_empty_col = y;
                break;
            }
    }
    return true;
}

template <class T>
CheckOut check_matrix(const T* X, int64_t N, int64_t K, double forbidden, int n_threads) {
    // The validation sweep of column_lse alone: column maxima of sgn * x (-inf on a
    // forbidden pair, so a column whose maximum stays at its start has none allowed).
    const int nt = resolve_threads(n_threads, N, K);
    const T sgn = forbidden < 0 ? T(1) : T(-1);
    std::vector<std::vector<double>> bm(nt);
    std::vector<CheckOut> part(nt);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        FlushDenormals ftz;
        const int tid = thread_id();
        bm[tid].assign(K, -kNoMax);
        int64_t lo, hi;
        row_range(N, nt, tid, lo, hi);
        CheckOut pc;  // the thread's own (the slots of `part` share cache lines)
        for (int64_t i = lo; i < hi; ++i)
            note_row(pc, kernels<T>().lse_max_row_check(X + i * K, K, sgn, 0.0, sgn,
                                                        bm[tid].data()),
                     X + i * K, i, K, sgn);
        part[tid] = pc;
    }
    CheckOut out = combine_checks(part);
    for (int64_t y = 0; y < K && out.first_empty_col < 0; ++y) {
        bool none = true;
        for (int k = 0; k < nt; ++k) none &= bm[k][y] == -kNoMax;
        if (none) out.first_empty_col = y;
    }
    return out;
}

double column_update(const double* g, const double* logb, const double* col,
                     const double* colmax, int64_t K, double log_n_rows, double rho_b,
                     double* g_next) {
    double err = 0;
    for (int64_t y = 0; y < K; ++y) {
        err += std::abs(col[y] - column_target(logb[y], g[y], rho_b));
        g_next[y] = next_g(g[y], logb[y], col[y], colmax[y], log_n_rows, rho_b);
    }
    return err;
}

#define SK_INSTANTIATE(T)                                                                  \
    template CheckOut check_matrix<T>(const T*, int64_t, int64_t, double, int);            \
    template bool fused_pass<T>(const T*, int64_t, int64_t, double, const double*,          \
                                const double*, double, PassOut&, const PlanOut<T>*, double, \
                                const RowShifts*, int, const Interrupted&);                                       \
    template bool plan<T>(const T*, int64_t, int64_t, double, const double*, const double*, \
                          const PlanOut<T>&, int, const Interrupted&);                     \
    template bool column_lse<T>(const T*, int64_t, int64_t, double, const double*, double*, \
                                CheckOut*, double, int, const Interrupted&);                \
    template int scaling_codes<T>(const T*, int64_t, int64_t, double, bool, const double*,  \
                                  int, double, T*, int, const Interrupted&);                \
    template void labels<T>(const T*, int64_t, int64_t, double, const double*, int64_t*,    \
                            int);                                                          \
    template void near_ties<T>(const T*, int64_t, int64_t, double, const double*,           \
                               const int64_t*, int64_t, double, int64_t*, int);            \
    template void row_hashes<T>(const T*, int64_t, int64_t, const double*, const double*,   \
                                double*, int);
SK_INSTANTIATE(float)
SK_INSTANTIATE(double)

}  // namespace sinkhorn_ot::cpu
