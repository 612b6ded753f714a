#include "sinkhorn_cpu.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/sinkhorn_math.h"

// The per-row bodies are compiled twice, for AVX2+FMA and for baseline x86-64, and picked at
// load time: a wheel must not assume the CPU it runs on (no -march=native).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SK_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SK_CLONES
#endif
// The bodies must be inlined into each clone to be compiled for its instruction set.
#if defined(__GNUC__)
#define SK_INLINE __attribute__((always_inline)) inline
#else
#define SK_INLINE inline
#endif

namespace sinkhorn_ot::cpu {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// exp(x) for x <= 0 written with arithmetic and bit operations only, so `omp simd` loops
// vectorise it (libm's exp does not vectorise without -ffast-math).  Arguments whose result
// would be subnormal return 0: subnormals are slow and carry no useful mass here.
SK_INLINE float vexp(float x) {
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
    float xc = std::max(x, -87.0f);
    float nm = std::fma(xc, 1.44269504088896341f, magic);
    float n = nm - magic;
    float r = std::fma(n, -0.693359375f, xc);
    r = std::fma(n, 2.12194440e-4f, r);
    // Cephes expf polynomial, about 1 ulp on [-ln2/2, ln2/2].
    float p = 1.9875691500e-4f;
    p = std::fma(p, r, 1.3981999507e-3f);
    p = std::fma(p, r, 8.3334519073e-3f);
    p = std::fma(p, r, 4.1665795894e-2f);
    p = std::fma(p, r, 1.6666665459e-1f);
    p = std::fma(p, r, 5.0000001201e-1f);
    p = std::fma(p, r * r, r) + 1.0f;
    int32_t ni = __builtin_bit_cast(int32_t, nm) - __builtin_bit_cast(int32_t, magic);
    float scale = __builtin_bit_cast(float, (ni + 127) << 23);
    return x < -87.0f ? 0.0f : p * scale;
}

SK_INLINE double vexp(double x) {
    const double magic = 6755399441055744.0;  // 1.5 * 2^52
    double xc = std::max(x, -700.0);
    double nm = std::fma(xc, 1.4426950408889634, magic);
    double n = nm - magic;
    double r = std::fma(n, -6.93145751953125e-1, xc);
    r = std::fma(n, -1.42860682030941723212e-6, r);
    // Taylor polynomial of degree 12: error below 2e-16 on [-ln2/2, ln2/2].
    double p = 1.0 / 479001600.0;
    p = std::fma(p, r, 1.0 / 39916800.0);
    p = std::fma(p, r, 1.0 / 3628800.0);
    p = std::fma(p, r, 1.0 / 362880.0);
    p = std::fma(p, r, 1.0 / 40320.0);
    p = std::fma(p, r, 1.0 / 5040.0);
    p = std::fma(p, r, 1.0 / 720.0);
    p = std::fma(p, r, 1.0 / 120.0);
    p = std::fma(p, r, 1.0 / 24.0);
    p = std::fma(p, r, 1.0 / 6.0);
    p = std::fma(p, r, 0.5);
    p = std::fma(p, r, 1.0);
    p = std::fma(p, r, 1.0);
    int64_t ni = __builtin_bit_cast(int64_t, nm) - __builtin_bit_cast(int64_t, magic);
    double scale = __builtin_bit_cast(double, (ni + 1023) << 52);
    return x < -700.0 ? 0.0 : p * scale;
}

// Reductions run in W independent lanes (fixed-size inner loops the compiler turns into
// SIMD): without -ffast-math it may not reorder a single floating-point sum itself.
constexpr int64_t W = 8;

template <class T>
SK_INLINE T clamp_finite(T v) {  // +-inf -> +-max, so that 0 * v is 0 for forbidden pairs
    const T big = std::numeric_limits<T>::max();
    return std::max(std::min(v, big), -big);
}

// One row of the fused pass.  t (double) and e (T) are per-thread scratch rows of length K.
// t = alpha x + g and t - m are formed in double for every input type: in float32 the
// rounding of t (|t| reaches 1e7 at lam = 1e4) would make the plan the kernels measure differ
// from the plan the potentials define.  Only exp(t - m), in [0, 1], runs in T.
template <class T>
SK_INLINE void row_body(const T* __restrict x, const double* __restrict g, int64_t K,
                        double alpha, double loga_i, double rho_a, double* __restrict t,
                        T* __restrict e, double* __restrict col, double* __restrict colmax,
                        double& cost, double& f_i, int64_t* label) {
    const double ninf = -std::numeric_limits<double>::infinity();
    const int64_t Kv = K - K % W;
    double m = ninf;
#pragma omp simd reduction(max : m)
    for (int64_t y = 0; y < K; ++y) {  // a max is exact in any order: omp simd may reorder it
        double v = alpha * static_cast<double>(x[y]) + g[y];
        t[y] = v;
        m = std::max(m, v);
    }
    if (label) {
        int64_t arg = 0;
        while (t[arg] != m) ++arg;  // first maximiser; m is one of the t[y]
        *label = arg;
    }
    // exp(t - m), its row sum, and the row's sum e_y x_y (for the transport cost), in T
    T sv[W] = {}, cv[W] = {};
    for (int64_t y = 0; y < Kv; y += W)
        for (int64_t l = 0; l < W; ++l) {
            double d = t[y + l] - m;
            t[y + l] = d;
            T v = vexp(static_cast<T>(d));
            e[y + l] = v;
            sv[l] += v;
            cv[l] += v * clamp_finite(x[y + l]);  // forbidden: v = 0, x clamped to finite
        }
    T s = 0, c = 0;
    for (int64_t y = Kv; y < K; ++y) {
        t[y] -= m;
        e[y] = vexp(static_cast<T>(t[y]));
        s += e[y];
        c += e[y] * clamp_finite(x[y]);
    }
    for (int64_t l = 0; l < W; ++l) {
        s += sv[l];
        c += cv[l];
    }
    const double log_s = std::log(static_cast<double>(s));
    f_i = row_potential(loga_i, m, log_s, rho_a);
    const double logr = log_row_factor(loga_i, m, log_s, rho_a);
    const double r = std::exp(logr);
    for (int64_t y = 0; y < K; ++y) {
        col[y] += static_cast<double>(e[y]) * r;
        colmax[y] = std::max(colmax[y], t[y] + logr);
    }
    cost += r * static_cast<double>(c);
}

SK_CLONES void row_f32(const float* x, const double* g, int64_t K, double alpha,
                       double loga_i, double rho_a, double* t, float* e, double* col,
                       double* colmax, double& cost, double& f_i, int64_t* label) {
    row_body(x, g, K, alpha, loga_i, rho_a, t, e, col, colmax, cost, f_i, label);
}
SK_CLONES void row_f64(const double* x, const double* g, int64_t K, double alpha,
                       double loga_i, double rho_a, double* t, double* e, double* col,
                       double* colmax, double& cost, double& f_i, int64_t* label) {
    row_body(x, g, K, alpha, loga_i, rho_a, t, e, col, colmax, cost, f_i, label);
}
inline void row(const float* x, const double* g, int64_t K, double alpha, double loga_i,
                double rho_a, double* t, float* e, double* col, double* colmax, double& cost,
                double& f_i, int64_t* label) {
    row_f32(x, g, K, alpha, loga_i, rho_a, t, e, col, colmax, cost, f_i, label);
}
inline void row(const double* x, const double* g, int64_t K, double alpha, double loga_i,
                double rho_a, double* t, double* e, double* col, double* colmax, double& cost,
                double& f_i, int64_t* label) {
    row_f64(x, g, K, alpha, loga_i, rho_a, t, e, col, colmax, cost, f_i, label);
}

// Online log-sum-exp of one row into per-column running (M, Z): Z * exp(M) = sum so far.
template <class T>
SK_INLINE void lse_row_body(const T* __restrict x, int64_t K, T alpha, T f_i, T* __restrict M,
                         double* __restrict Z) {
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t y = 0; y < K; ++y) {  // no reduction: vectorises without help
        T u = alpha * x[y] + f_i;
        T Mn = std::max(M[y], u);
        bool dead = Mn == ninf;  // every entry so far forbidden: keep Z = 0, avoid inf - inf
        T d1 = dead ? ninf : M[y] - Mn;
        T d2 = dead ? ninf : u - Mn;
        Z[y] = Z[y] * static_cast<double>(vexp(d1)) + static_cast<double>(vexp(d2));
        M[y] = Mn;
    }
}
SK_CLONES void lse_row_f32(const float* x, int64_t K, float alpha, float f_i, float* M,
                           double* Z) {
    lse_row_body(x, K, alpha, f_i, M, Z);
}
SK_CLONES void lse_row_f64(const double* x, int64_t K, double alpha, double f_i, double* M,
                           double* Z) {
    lse_row_body(x, K, alpha, f_i, M, Z);
}
inline void lse_row(const float* x, int64_t K, float a, float f, float* M, double* Z) {
    lse_row_f32(x, K, a, f, M, Z);
}
inline void lse_row(const double* x, int64_t K, double a, double f, double* M, double* Z) {
    lse_row_f64(x, K, a, f, M, Z);
}

// Threads for a pass over N x K: as asked, else OpenMP's default, but no more than one per
// 32k entries -- waking a team costs more than a small pass (and much more on a busy machine).
int resolve_threads(int n_threads, int64_t N, int64_t K) {
    int64_t nt = n_threads > 0 ? n_threads : std::min<int64_t>(max_threads(), N * K / 32768);
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, N)));
}

int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Rows are split into one contiguous block per thread (static, so results do not depend on
// timing); the calling thread polls `interrupted` every 256 rows once 0.2 s have passed.
class Interrupt {
  public:
    explicit Interrupt(const std::function<bool()>& cb) : cb_(cb), last_(clock::now()) {}
    bool poll(int64_t i) {
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

void row_range(int64_t N, int nt, int tid, int64_t& lo, int64_t& hi) {
    lo = N * tid / nt;
    hi = N * (tid + 1) / nt;
}

}  // namespace

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

template <class T>
bool fused_pass(const T* X, int64_t N, int64_t K, double alpha, const double* g,
                const double* loga, double rho_a, PassOut& out, int n_threads,
                const std::function<bool()>& interrupted) {
    int nt = resolve_threads(n_threads, N, K);
    // Per-thread column accumulators, combined in thread order so results are reproducible.
    std::vector<std::vector<double>> col(nt), colmax(nt);
    std::vector<double> cost(nt, 0.0);
    Interrupt intr(interrupted);
#pragma omp parallel num_threads(nt)
    {
        int tid = thread_id();
        std::vector<double>& c = col[tid];
        std::vector<double>& cm = colmax[tid];
        c.assign(K, 0.0);
        cm.assign(K, kNegInf);
        std::vector<double> t(K);
        std::vector<T> e(K);
        int64_t lo, hi;
        row_range(N, nt, tid, lo, hi);
        double cost_t = 0;
        for (int64_t i = lo; i < hi; ++i) {
            if (intr.poll(i - lo)) break;
            row(X + i * K, g, K, alpha, loga[i], rho_a, t.data(),
                e.data(), c.data(), cm.data(), cost_t, out.f[i],
                out.labels ? out.labels + i : nullptr);
        }
        cost[tid] = cost_t;
    }
    if (intr.stopped()) return false;
    out.cost = 0;
    for (int64_t y = 0; y < K; ++y) {
        double s = 0, mx = kNegInf;
        for (int k = 0; k < nt; ++k) {
            s += col[k][y];
            mx = std::max(mx, colmax[k][y]);
        }
        out.col[y] = s;
        out.colmax[y] = mx;
    }
    for (int k = 0; k < nt; ++k) out.cost += cost[k];
    return true;
}

template <class T>
bool column_lse(const T* X, int64_t N, int64_t K, double alpha, const double* f, double* L,
                int n_threads, const std::function<bool()>& interrupted) {
    int nt = resolve_threads(n_threads, N, K);
    std::vector<std::vector<T>> M(nt);
    std::vector<std::vector<double>> Z(nt);
    Interrupt intr(interrupted);
#pragma omp parallel num_threads(nt)
    {
        int tid = thread_id();
        M[tid].assign(K, -std::numeric_limits<T>::infinity());
        Z[tid].assign(K, 0.0);
        int64_t lo, hi;
        row_range(N, nt, tid, lo, hi);
        for (int64_t i = lo; i < hi; ++i) {
            if (intr.poll(i - lo)) break;
            lse_row(X + i * K, K, static_cast<T>(alpha), static_cast<T>(f ? f[i] : 0.0),
                    M[tid].data(), Z[tid].data());
        }
    }
    if (intr.stopped()) return false;
    for (int64_t y = 0; y < K; ++y) {
        double mx = kNegInf;
        for (int k = 0; k < nt; ++k) mx = std::max(mx, static_cast<double>(M[k][y]));
        double z = 0;
        if (mx != kNegInf)
            for (int k = 0; k < nt; ++k) z += Z[k][y] * std::exp(static_cast<double>(M[k][y]) - mx);
        L[y] = mx + std::log(z);
    }
    return true;
}

template <class T>
CheckOut check_matrix(const T* X, int64_t N, int64_t K, double forbidden, int n_threads) {
    int nt = resolve_threads(n_threads, N, K);
    const T forb = static_cast<T>(forbidden);
    std::vector<std::vector<unsigned char>> col_ok(nt);
    std::vector<CheckOut> part(nt);
#pragma omp parallel num_threads(nt)
    {
        int tid = thread_id();
        std::vector<unsigned char>& ok = col_ok[tid];
        ok.assign(K, 0);
        CheckOut& p = part[tid];
        int64_t lo, hi;
        row_range(N, nt, tid, lo, hi);
        T mx = 0;
        for (int64_t i = lo; i < hi; ++i) {
            const T* x = X + i * K;
            int bad = 0, allowed = 0;
#pragma omp simd reduction(+ : bad, allowed) reduction(max : mx)
            for (int64_t y = 0; y < K; ++y) {
                T v = x[y];
                bool fin = std::abs(v) <= std::numeric_limits<T>::max();
                bad += !(fin || v == forb);  // NaN or the wrong infinity
                allowed += v != forb;
                ok[y] |= v != forb;
                mx = std::max(mx, fin ? std::abs(v) : T(0));
            }
            if (bad && p.first_invalid < 0) {
                for (int64_t y = 0; y < K; ++y)
                    if (!(std::abs(x[y]) <= std::numeric_limits<T>::max() || x[y] == forb)) {
                        p.first_invalid = i * K + y;
                        break;
                    }
            }
            if (!allowed && p.first_empty_row < 0) p.first_empty_row = i;
        }
        p.max_abs = static_cast<double>(mx);
    }
    CheckOut out;
    for (int k = 0; k < nt; ++k) {  // threads hold increasing row ranges: the first hit wins
        if (out.first_invalid < 0) out.first_invalid = part[k].first_invalid;
        if (out.first_empty_row < 0) out.first_empty_row = part[k].first_empty_row;
        out.max_abs = std::max(out.max_abs, part[k].max_abs);
    }
    for (int64_t y = 0; y < K && out.first_empty_col < 0; ++y) {
        bool any = false;
        for (int k = 0; k < nt; ++k) any |= col_ok[k][y] != 0;
        if (!any) out.first_empty_col = y;
    }
    return out;
}

template CheckOut check_matrix<float>(const float*, int64_t, int64_t, double, int);
template CheckOut check_matrix<double>(const double*, int64_t, int64_t, double, int);
template bool fused_pass<float>(const float*, int64_t, int64_t, double, const double*,
                                const double*, double, PassOut&, int,
                                const std::function<bool()>&);
template bool fused_pass<double>(const double*, int64_t, int64_t, double, const double*,
                                 const double*, double, PassOut&, int,
                                 const std::function<bool()>&);
template bool column_lse<float>(const float*, int64_t, int64_t, double, const double*, double*,
                                int, const std::function<bool()>&);
template bool column_lse<double>(const double*, int64_t, int64_t, double, const double*,
                                 double*, int, const std::function<bool()>&);

}  // namespace sinkhorn_ot::cpu
