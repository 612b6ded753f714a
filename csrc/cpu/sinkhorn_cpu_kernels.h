// The per-row kernels of the CPU core, compiled once per instruction set: sinkhorn_cpu.cpp
// includes this file inside a namespace per ISA with SK_W (the vector width in bytes) set and
// the matching `#pragma GCC target`, then calls the right copy through a table.  No include
// guard: every definition here is per-ISA.

#include "simd.h"

// ----------------------------------------------------------------------------------------
// t - m = alpha x + (g_y - m) is formed in float64 for every input type: |alpha x| and |g|
// reach 1e7 at lam = 1e4 while t - m must be exact to about 1e-7 for the plan the kernels
// measure to be the plan the float64 potentials define.  exp(t - m), at most about 1, runs
// in float32 only where the pass allows its error (see row_body).  A row type's diff gives
// t - m for a block of B entries as a vector of its arithmetic's type (E), and its float64
// lanes (lo, hi) for the labels.

// x as float64 lanes (exact for float32 input)
SK_V vd widen(const float* x) { return to_double(load<vfh>(x)); }
SK_V vd widen(const double* x) { return load<vd>(x); }

// Rows of input I with float32 exponentials: t - m in float64, rounded to float32.
template <class I>
struct Float32Rows {
    using In = I;
    using Out = float;
    static constexpr int B = NF;
    using E = vf;
    static SK_V E diff(const I* x, const double* g, double alpha, double m, vd& lo, vd& hi) {
        lo = widen(x) * alpha + (load<vd>(g) - m);
        hi = widen(x + ND) * alpha + (load<vd>(g + ND) - m);
        return concat(to_float(lo), to_float(hi));
    }
    static SK_V E exp(E d, E& dc) { return vexp_clamped(d, dc); }
};

// Rows of input I in float64 throughout (float32 input read once, not copied to float64).
template <class I>
struct Float64Rows {
    using In = I;
    using Out = double;
    static constexpr int B = ND;
    using E = vd;
    static SK_V E diff(const I* x, const double* g, double alpha, double m, vd& lo, vd& hi) {
        lo = widen(x) * alpha + (load<vd>(g) - m);
        hi = lo;
        return lo;
    }
    static SK_V E exp(E d, E& dc) { return vexp_clamped(d, dc); }
};

// Each input's own precision (the plan of a row of T is written in T); Widened: the
// float64 rows of float32 input; Narrowed: the mixed rows of float64 input, whose
// exponentials go to a float32 buffer.
template <class T> struct Traits;
template <> struct Traits<float> : Float32Rows<float> {};
template <> struct Traits<double> : Float64Rows<double> {};
using Widened = Float64Rows<float>;
using Narrowed = Float32Rows<double>;

// Float64 rows (Traits<double> or Widened) with the short exponential: a row error of
// kShortExpErr, for the passes allowed it (see row_body).
template <class Base>
struct ShortExp : Base {
    static SK_V vd exp(vd d, vd& dc) { return vexp_short(d, dc); }
};

// The tail of a row (fewer than B entries) as a full block, padded with entries that
// contribute nothing (x = 0 with g = -inf gives t = -inf).
template <class T>
struct Tail {
    T x[NF];
    double g[NF];
    Tail(const T* xr, const double* gr, int64_t n) {
        for (int64_t l = 0; l < NF; ++l) {
            x[l] = l < n ? xr[l] : T(0);
            g[l] = l < n ? gr[l] : kNegInf;
        }
    }
};

// The exponentials' shift: max_y (alpha x_y + g_y), in float32 for float32 input (within a
// few ulps of |t|, checked by the caller), exact in float64.
template <class T>
SK_V double row_shift(const T* x, const float* gf, const double* g, int64_t K, double alpha) {
    constexpr int B = Traits<T>::B;
    const int64_t Kb = K - K % B;
    if constexpr (std::is_same_v<T, float>) {
        const float af = static_cast<float>(alpha);
        vf mx = splat<vf>(-std::numeric_limits<float>::infinity());
        for (int64_t y = 0; y < Kb; y += B) {
            ahead(x + y);
            mx = vmax(mx, load<vf>(x + y) * af + load<vf>(gf + y));
        }
        float m = hmax(mx);
        for (int64_t y = Kb; y < K; ++y) m = std::max(m, x[y] * af + gf[y]);
        return m;
    } else {
        (void)gf;
        vd mx = splat<vd>(kNegInf);
        for (int64_t y = 0; y < Kb; y += B) {
            ahead(x + y);
            mx = vmax(mx, load<vd>(x + y) * alpha + load<vd>(g + y));
        }
        double m = hmax(mx);
        for (int64_t y = Kb; y < K; ++y) m = std::max(m, x[y] * alpha + g[y]);
        return m;
    }
}

// The first maximiser of t over a row, B entries (the float64 lanes lo, and hi when B is
// two float64 vectors wide) at a time: the labels of sweep and row_argmax.
template <int B>
struct ArgMax {
    vd best = splat<vd>(kNegInf), besth = best;
    vl bidx = splat<vl>(int64_t(0)), bidxh = bidx, idx = bidx, idxh = bidx;
    ArgMax() {
        for (int l = 0; l < ND; ++l) {
            idx[l] = l;
            idxh[l] = l + ND;
        }
    }
    SK_V void update(vd lo, vd hi, int64_t y) {
        const vl yv = splat<vl>(y);
        const auto up = lo > best;
        best = select(up, lo, best);
        bidx = select(up, idx + yv, bidx);
        if constexpr (B == NF) {
            const auto uph = hi > besth;
            besth = select(uph, hi, besth);
            bidxh = select(uph, idxh + yv, bidxh);
        }
    }
    // the smallest index among ties; 0 when every t is -inf
    int64_t first() const {
        double bv = kNegInf;
        int64_t bi = 0;
        for (int l = 0; l < ND; ++l)
            for (int h = 0; h < (B == NF ? 2 : 1); ++h) {
                const double v = h ? besth[l] : best[l];
                const int64_t i = h ? bidxh[l] : bidx[l];
                if (v > bv || (v == bv && i < bi)) {
                    bv = v;
                    bi = i;
                }
            }
        return bi;
    }
};

// The main sweep of a row: e_y = exp(t_y - m) (stored), s = sum_y e_y, sd = sum_y e_y
// (t_y - m) for the transport cost, and the first argmax of t when LAB.
struct RowSums {
    double s = 0, sd = 0;
    int64_t arg = 0;
};

// Row sums run in SIMD lanes and move into float64 every kChunk entries, so their rounding
// error does not grow with K: a float32 lane adds at most kChunk / NF terms (the `lane` of
// row_body's bounds).
constexpr int64_t kChunk = 128;

// Tr: the traits of the row's input and arithmetic (Traits<T> or Widened).  FAST
// (float32 arithmetic on float32 input only): t - m in float32 from float32 g, accurate to
// the bound the caller computed (fast_error) instead of to float64.
template <class Tr, bool LAB, bool FAST>
SK_V void sweep(const typename Tr::In* x, const double* g, const float* gf, int64_t K,
                double alpha, double m, typename Tr::Out* e, RowSums& out) {
    using T = typename Tr::Out;
    using E = typename Tr::E;
    constexpr int B = Tr::B;
    static_assert(!FAST || std::is_same_v<typename Tr::In, float>, "FAST: float32 rows");
    E s = splat<E>(T(0)), sd = splat<E>(T(0));
    ArgMax<B> am;
    const float af = static_cast<float>(alpha), mf = static_cast<float>(m);
    auto block = [&](const typename Tr::In* xb, const double* gb, const float* gfb, T* eb,
                     int64_t y) {
        vd lo, hi;
        E d;
        if constexpr (FAST) {
            (void)gb;
            d = load<vf>(xb) * af + (load<vf>(gfb) - mf);
        } else {
            (void)gfb;
            d = Tr::diff(xb, gb, alpha, m, lo, hi);
        }
        E dc;
        E v = Tr::exp(d, dc);
        store(eb, v);
        s += v;
        sd += v * dc;  // dc, not d: a forbidden pair has d = -inf and e of the clamp
        if constexpr (LAB) am.update(lo, hi, y);
    };
    // the chunk's lane sums into float64 lanes
    vd s64 = splat<vd>(0.0), sd64 = s64;
    auto flush = [&] {
        if constexpr (B == NF) {
            s64 += to_double(half_lo(s)) + to_double(half_hi(s));
            sd64 += to_double(half_lo(sd)) + to_double(half_hi(sd));
        } else {
            s64 += s;
            sd64 += sd;
        }
        s = splat<E>(T(0));
        sd = splat<E>(T(0));
    };
    const int64_t Kb = K - K % B;
    for (int64_t y0 = 0; y0 < Kb; y0 += kChunk) {
        const int64_t y1 = std::min(Kb, y0 + kChunk);
        for (int64_t y = y0; y < y1; y += B) {
            ahead(x + y);
            if constexpr (sizeof(x[0]) * B > 64) ahead(x + y + 64 / sizeof(x[0]));
            block(x + y, g + y, gf + y, e + y, y);
        }
        flush();
    }
    if (Kb < K) {
        Tail<typename Tr::In> t(x + Kb, g + Kb, K - Kb);
        float gft[NF];
        for (int l = 0; l < NF; ++l) gft[l] = static_cast<float>(t.g[l]);
        T eb[NF];
        block(t.x, t.g, gft, eb, Kb);
        std::memcpy(e + Kb, eb, (K - Kb) * sizeof(T));
        // padding lanes hold the clamp's exp (about 1e-38): subtract them from the sums
        for (int64_t l = K - Kb; l < B; ++l) {
            s[l] = 0;
            sd[l] = 0;
        }
        flush();
    }
    out.s = hsum(s64);
    out.sd = hsum(sd64);
    if constexpr (LAB) out.arg = am.first();
}

// Adds r e_y to the column sums: for a float32 row (`f32`) into float32 accumulators `colf`
// that the caller moves into float64 every few rows (see flush_cols), unless r itself is
// outside float32's comfortable range; otherwise straight into `col`, in float64.
template <class T>
SK_V void add_row(const T* e, int64_t K, double r, float* colf, double* col, bool f32) {
    if constexpr (std::is_same_v<T, float>) {
        if (f32 && r > 1e-30 && r < 1e30) {
            const float rf = static_cast<float>(r);
            const int64_t Kb = K - K % NF;
            for (int64_t y = 0; y < Kb; y += NF)
                store(colf + y, load<vf>(colf + y) + load<vf>(e + y) * rf);
            for (int64_t y = Kb; y < K; ++y) colf[y] += e[y] * rf;
            return;
        }
        const int64_t Kb = K - K % ND;
        for (int64_t y = 0; y < Kb; y += ND)
            store(col + y, load<vd>(col + y) + to_double(load<vfh>(e + y)) * r);
        for (int64_t y = Kb; y < K; ++y) col[y] += static_cast<double>(e[y]) * r;
    } else {
        (void)colf;
        const int64_t Kb = K - K % ND;
        for (int64_t y = 0; y < Kb; y += ND) store(col + y, load<vd>(col + y) + load<vd>(e + y) * r);
        for (int64_t y = Kb; y < K; ++y) col[y] += e[y] * r;
    }
}

// One row of the fused pass: f_i, optionally the label, the row's share of the column sums
// and of the cost, and optionally the plan row (scaled).
//
// A row is formed the cheapest way whose bound on the row's relative plan error
// (RowResult::slack) is within `fast` (the error the caller allows; 0: float64):
//   fast (float32 input, no labels): t - m in float32 from float32 g (sweep<Traits<float>,
//     false, true>), float32 column accumulation;
//   mixed: t - m in float64, rounded to float32 for a float32 exponential and float32 row
//     sums; its bound is known after the sweep (it weighs |t - m| by the row's entries);
//     for float64 input the exponentials go to `colf` (Narrowed), and the column sums are
//     float64;
//   float64: float64 t - m, exponentials and column sums (slack 0, or kShortExpErr with the
//     short exponential, vexp_short); for float32 input the exponentials go to `xd`
//     (Widened).
// The bound covers the plan entries (hence the column sums measured) and the row sum s the
// row potential comes from (hence the row marginal of the returned f).
template <class T, bool LAB>
RowResult row_body(const T* __restrict x, const double* __restrict g,
                        const float* __restrict gf, int64_t K, double alpha, double loga_i,
                        double rho_a, T* __restrict e, double* __restrict xd,
                        float* __restrict colf, double* __restrict col,
                        double& f_i, int64_t* label, T* __restrict plan_row,
                        double plan_scale, double fast, bool try_mixed, double g_absmax,
                        double m_hint, double& lse_i) {
    constexpr bool f32 = std::is_same_v<T, float>;
    RowResult res;
    auto empty = [&] {  // every pair forbidden (a row of zero mass): no plan row
        f_i = kNegInf;
        lse_i = kNegInf;
        if (label) *label = 0;
        if (plan_row) std::fill(plan_row, plan_row + K, T(0));
        return res;
    };
    RowSums rs;
    enum { kFast, kMixed, kExact } mode = kExact;
    // The float32 row sums: a lane adds up to kChunk / NF exponentials in float32 (relative
    // error (n - 1) 2^-24) before they move into float64.
    const double lane = static_cast<double>(std::min<int64_t>(K, kChunk) / NF + 1);
    // float32 exp: 1.3 ulp (simd.h), with room for its range reduction
    constexpr double kExpUlps = 3;
    auto run = [&](double& m) {
        // The float32 shift is within a few ulps of |t| of the true maximum; beyond 1e6 that
        // is more than exp's range can absorb, so take the exact float64 maximum.
        if (f32 && !(std::abs(m) < 1e6)) {
            m = kNegInf;
            for (int64_t y = 0; y < K; ++y)
                m = std::max(m, static_cast<double>(x[y]) * alpha + g[y]);
        }
        res.slack = 0;
        if (f32) m = static_cast<float>(m);  // any shift works: one float32 can hold it exactly
        if constexpr (f32 && !LAB) {
            // |error of t - m| over the entries that carry mass (t - m > -90, so |alpha x|
            // <= |m| + |g| + 90): the roundings of alpha, g, g - m and alpha x + (g - m).
            // Plus the float32 column accumulation of such rows (8 terms per sum: see
            // kFlushRows in sinkhorn_cpu.cpp), the exponential and the row sums.
            const double bound =
                0x1p-24 * (2 * std::abs(m) + 3 * g_absmax + 180 + 8 + kExpUlps + lane);
            if (bound <= fast) {
                res.slack = bound;
                mode = kFast;
                sweep<Traits<float>, false, true>(x, g, gf, K, alpha, m, e, rs);
                return;
            }
        }
        // mixed: t - m exact to 2^-52 (|alpha x| + |g| + |m|) in float64, then rounded to
        // float32: |t - m| 2^-24 on each entry, which the row's entries weigh into |sd| / s
        // (sd = sum_y e_y (t_y - m); t_y - m <= 0 up to the shift's few ulps).  The
        // exponentials of float64 input go to `colf` (Narrowed).
        {
            const double floor_mixed = 0x1p-24 * (kExpUlps + lane + 1);
            const double t_err = 0x1p-52 * (2 * std::abs(m) + 3 * g_absmax + 180);
            // Float64 input tries only rows whose bound holds whatever their entries, so that
            // which rows are mixed does not depend on the rows before them (threads and
            // ranks give the same pass): the weighted |t - m| is at most log K + 30 (an
            // entropy, plus m's distance above the maximum).
            const double need =
                f32 ? floor_mixed
                    : floor_mixed + 0x1p-24 * (std::log(static_cast<double>(K)) + 30) + t_err;
            if (need <= fast && (try_mixed || !f32)) {
                if constexpr (f32)
                    sweep<Traits<float>, LAB, false>(x, g, gf, K, alpha, m, e, rs);
                else
                    sweep<Narrowed, LAB, false>(x, g, gf, K, alpha, m, colf, rs);
                const double bound = floor_mixed + 0x1p-24 * std::abs(rs.sd) / rs.s + t_err;
                if (bound <= fast) {  // false when s is 0 or NaN
                    res.slack = bound;
                    mode = kMixed;
                    return;
                }
                res.mixed_failed = true;
                rs = RowSums();
            }
        }
        // float64 rows (kExact), with the short exponential where its error is allowed
        mode = kExact;
        using Full = std::conditional_t<f32, Widened, Traits<double>>;
        double* out;  // (for float32 input the float64 exponentials go to xd)
        if constexpr (f32)
            out = xd;
        else
            out = e;
        if (kShortExpErr <= fast) {
            res.slack = kShortExpErr;
            sweep<ShortExp<Full>, LAB, false>(x, g, gf, K, alpha, m, out, rs);
        } else {
            sweep<Full, LAB, false>(x, g, gf, K, alpha, m, out, rs);
        }
    };
    // m_hint (NaN: none) bounds the row's maximum from above, by at most 30 (see RowShifts):
    // the largest exponential is then at least exp(-30), far above the clamp; a row whose
    // sum is smaller all the same is redone at its exact maximum.
    double m = std::isnan(m_hint) ? row_shift(x, gf, g, K, alpha) : m_hint;
    if (!(m > kNegInf)) return empty();
    run(m);
    if (!std::isnan(m_hint) && !(rs.s > 1e-20)) {
        m = row_shift(x, gf, g, K, alpha);
        if (!(m > kNegInf)) return empty();
        rs = RowSums();
        run(m);
    }
    if (label) *label = rs.arg;
    const double log_s = std::log(rs.s);
    lse_i = m + log_s;
    f_i = row_potential(loga_i, m, log_s, rho_a);
    const double logr = log_row_factor(loga_i, m, log_s, rho_a);
    const double r = std::exp(logr);
    res.qs = r * (rs.sd + m * rs.s);
    if (r == 0) {
        if (plan_row) std::fill(plan_row, plan_row + K, T(0));
        return res;
    }
    // The row's exponentials: e (in T) or xd (float64, exact rows of float32 input); an
    // exponential is exp of the clamp (not 0) for a forbidden or underflowed entry: the plan
    // gets 0 there.  FTZ is on, so products below the smallest normal number are 0 too.
    auto finish = [&](const auto* ev, bool f32_cols) {
        using V = std::remove_cv_t<std::remove_pointer_t<decltype(ev)>>;
        add_row(ev, K, r, colf, col, f32_cols);
        if (!plan_row) return;
        const V tiny = std::is_same_v<V, float> ? V(2e-38) : V(4e-308);
        if constexpr (std::is_same_v<V, T>) {
            using E = typename Traits<T>::E;
            constexpr int B = Traits<T>::B;
            const T q = static_cast<T>(r * plan_scale);
            const int64_t Kq = K - K % B;
            for (int64_t y = 0; y < Kq; y += B) {
                E v = load<E>(ev + y);
                store(plan_row + y, select(v > tiny, v * q, splat<E>(T(0))));
            }
            for (int64_t y = Kq; y < K; ++y) plan_row[y] = ev[y] > tiny ? ev[y] * q : T(0);
        } else {  // rounded once, from the product in float64
            const double q = r * plan_scale;
            for (int64_t y = 0; y < K; ++y)
                plan_row[y] = ev[y] > tiny ? static_cast<T>(ev[y] * q) : T(0);
        }
    };
    if (f32 && mode == kExact)
        finish(xd, false);
    else if (!f32 && mode == kMixed)
        finish(colf, false);
    else
        finish(e, mode == kFast);
    return res;
}

// col += colf; colf = 0 (float32 column accumulators into float64).
void flush_cols(float* colf, double* col, int64_t K) {
    const int64_t Kb = K - K % ND;
    for (int64_t y = 0; y < Kb; y += ND) {
        store(col + y, load<vd>(col + y) + to_double(load<vfh>(colf + y)));
        store(colf + y, splat<vfh>(0.0f));
    }
    for (int64_t y = Kb; y < K; ++y) {
        col[y] += colf[y];
        colf[y] = 0;
    }
}

// exp(alpha x + c_y) for one row, in T (c = f_i + g + log scale).
template <class T>
void plan_row(const T* x, const double* c, int64_t K, double alpha, T* out) {
    using Tr = Traits<T>;
    constexpr int B = Tr::B;
    const int64_t Kb = K - K % B;
    vd lo, hi;
    for (int64_t y = 0; y < Kb; y += B) store(out + y, vexp(Tr::diff(x + y, c + y, alpha, 0.0, lo, hi)));
    if (Kb < K) {
        Tail<T> t(x + Kb, c + Kb, K - Kb);
        T ob[NF];
        store(ob, vexp(Tr::diff(t.x, t.g, alpha, 0.0, lo, hi)));
        std::memcpy(out + Kb, ob, (K - Kb) * sizeof(T));
    }
}

// cm_y = max(cm_y, alpha x_y + f_i): the exact column-max pass.
template <class T>
void colmax_row(const T* x, int64_t K, double alpha, double f_i, double* cm) {
    const int64_t Kb = K - K % ND;
    for (int64_t y = 0; y < Kb; y += ND) {
        ahead(x + y);
        vd t;
        if constexpr (std::is_same_v<T, float>)
            t = to_double(load<vfh>(x + y)) * alpha + f_i;
        else
            t = load<vd>(x + y) * alpha + f_i;
        store(cm + y, vmax(load<vd>(cm + y), t));
    }
    for (int64_t y = Kb; y < K; ++y)
        cm[y] = std::max(cm[y], static_cast<double>(x[y]) * alpha + f_i);
}

// Column log-sum-exp, a block of rows at a time (the block stays in cache between its two
// sweeps): the block's column maxima (with the validation facts of its rows, LseRow, when
// CHK), the running (M, Z) rescaled to the new maxima, then Z += exp(t - M) over the block.
// Z * exp(M) is the sum so far; M is stored negated (nM, the place of g in Traits::diff) and
// nM = kNoMax marks a column with no allowed entry yet.
template <class T, bool CHK>
LseRow lse_max_row(const T* __restrict x, int64_t K, double alpha, double f_i, T sgn,
                   double* __restrict bm) {
    using E = typename Traits<T>::E;
    constexpr int B = Traits<T>::B;
    const T inf = std::numeric_limits<T>::infinity();
    using MT = decltype(splat<E>(T(0)) > T(0));
    MT bad = splat<MT>(0), ok = splat<MT>(0);
    E hi = splat<E>(T(0)), lo = splat<E>(T(0));
    colmax_row(x, K, alpha, f_i, bm);
    LseRow res;
    if constexpr (CHK) {
        auto facts = [&](E xs) {  // xs = x * sgn: forbidden -inf, invalid NaN or +inf
            bad = bad | ~(xs < inf);
            auto allow = xs > -inf;
            ok = ok | allow;
            hi = vmax(hi, select(xs < inf, xs, splat<E>(T(0))));  // the finite entries only
            lo = vmin(lo, select(allow, xs, splat<E>(T(0))));
        };
        const int64_t Kb = K - K % B;
        for (int64_t y = 0; y < Kb; y += B) facts(load<E>(x + y) * sgn);
        if (Kb < K) {
            T xt[NF];
            for (int l = 0; l < NF; ++l) xt[l] = l < K - Kb ? x[Kb + l] : -inf * sgn;
            facts(load<E>(xt) * sgn);
        }
        res.bad = any(bad);
        res.allowed = any(ok);
        res.mx = std::max(static_cast<double>(hmax(hi)), static_cast<double>(hmax(-lo)));
    }
    return res;
}
// M <- max(M, bm), Z <- Z exp(M_old - M_new).
void lse_rescale(double* nM, double* Z, const double* bm, int64_t K) {
    const int64_t Kd = K - K % ND;
    for (int64_t y = 0; y < Kd; y += ND) {
        vd m_old = -load<vd>(nM + y), m_new = vmax(m_old, load<vd>(bm + y)), c;
        store(Z + y, load<vd>(Z + y) * vexp_clamped(m_old - m_new, c));
        store(nM + y, -m_new);
    }
    for (int64_t y = Kd; y < K; ++y) {
        double m_old = -nM[y], m_new = std::max(m_old, bm[y]);
        Z[y] *= std::exp(m_old - m_new);
        nM[y] = -m_new;
    }
}

// Z += exp(alpha x + f_i - M).
template <class T>
void lse_sum_row(const T* x, int64_t K, double alpha, double f_i, const double* nM,
                 double* Z) {
    using Tr = Traits<T>;
    using E = typename Tr::E;
    constexpr int B = Tr::B;
    auto add = [&](double* Zb, E v) {
        if constexpr (std::is_same_v<T, float>) {
            store(Zb, load<vd>(Zb) + to_double(half_lo(v)));
            store(Zb + ND, load<vd>(Zb + ND) + to_double(half_hi(v)));
        } else {
            store(Zb, load<vd>(Zb) + v);
        }
    };
    const int64_t Kb = K - K % B;
    vd lo, hi;
    E c;
    for (int64_t y = 0; y < Kb; y += B)
        add(Z + y, vexp_clamped(Tr::diff(x + y, nM + y, alpha, -f_i, lo, hi), c));
    if (Kb < K) {
        Tail<T> t(x + Kb, nM + Kb, K - Kb);
        double Zt[NF] = {};
        add(Zt, vexp_clamped(Tr::diff(t.x, t.g, alpha, -f_i, lo, hi), c));
        for (int64_t l = 0; l < K - Kb; ++l) Z[Kb + l] += Zt[l];
    }
}

// ----------------------------------------------------------------------------------------
// Scaling passes (a fixed-iteration solve whose only output is the plan: codes()).  The
// kernel is stored once as E_iy = exp(alpha (x_iy - max_y x_iy)) in [0, 1] (or is the input
// itself, for probabilities), and the passes scale it: u = a / (E v), c = E^T u, in float64.

// The validation facts of one row (a NaN or wrong infinity, an allowed entry), its maximum
// and (mn) the smallest of its allowed entries; for probabilities (PROBS) an entry is invalid unless 0 <= p < inf and allowed
// when p > 0, for scores invalid when NaN or +inf and allowed when > -inf.
template <class T, bool PROBS>
T scal_row_facts(const T* x, int64_t K, bool& bad, bool& allowed, T& mn) {
    using E = typename Traits<T>::E;
    constexpr int B = Traits<T>::B;
    const T inf = std::numeric_limits<T>::infinity();
    using MT = decltype(splat<E>(T(0)) > T(0));
    MT badv = splat<MT>(0), okv = splat<MT>(0);
    E mx = splat<E>(-inf), mnv = splat<E>(inf);
    auto facts = [&](E v) {
        if constexpr (PROBS) {
            badv = badv | ~((v < inf) & ~(v < T(0)));
            okv = okv | (v > T(0));
        } else {
            badv = badv | ~(v < inf);
            okv = okv | (v > -inf);
        }
        mx = vmax(mx, v);
        mnv = vmin(mnv, select(v > -inf, v, splat<E>(inf)));
    };
    const int64_t Kb = K - K % B;
    for (int64_t y = 0; y < Kb; y += B) {
        ahead(x + y);
        facts(load<E>(x + y));
    }
    if (Kb < K) {
        T xt[NF];
        for (int l = 0; l < NF; ++l) xt[l] = l < K - Kb ? x[Kb + l] : (PROBS ? T(0) : -inf);
        facts(load<E>(xt));
    }
    bad = any(badv);
    allowed = any(okv);
    mn = -hmax(-mnv);
    return hmax(mx);
}

// e_y = exp(alpha (x_y - mx)) (0 on a forbidden pair).  The difference and the product are
// rounded in T: an entry's error is about |alpha (x_y - mx)| ulps of e_y, at most 0.4 ulps
// of the row's largest entry.
template <class T>
void scal_exp_row(const T* x, int64_t K, double alpha, T mx, T* e) {
    using E = typename Traits<T>::E;
    constexpr int B = Traits<T>::B;
    const T a = static_cast<T>(alpha);
    const int64_t Kb = K - K % B;
    for (int64_t y = 0; y < Kb; y += B) store(e + y, vexp((load<E>(x + y) - mx) * a));
    for (int64_t y = Kb; y < K; ++y) e[y] = static_cast<T>(std::exp(static_cast<double>((x[y] - mx) * a)));
}

// sum_y e_y v_y in float64, in four sums (a chain of fused multiply-adds waits on each one's
// latency: two sums left the pass bound by it).
template <class T>
double scal_dot(const T* e, const double* v, int64_t K) {
    vd s0 = splat<vd>(0.0), s1 = s0, s2 = s0, s3 = s0;
    const int64_t K4 = K - K % (4 * ND);
    auto ld = [&](int64_t y) {
        if constexpr (std::is_same_v<T, float>)
            return to_double(load<vfh>(e + y));
        else
            return load<vd>(e + y);
    };
    for (int64_t y = 0; y < K4; y += 4 * ND) {
        for (int64_t o = 0; o < 4 * ND; o += 64 / static_cast<int64_t>(sizeof(T)))
            ahead(e + y + o);  // each cache line of the block
        s0 = s0 + ld(y) * load<vd>(v + y);
        s1 = s1 + ld(y + ND) * load<vd>(v + y + ND);
        s2 = s2 + ld(y + 2 * ND) * load<vd>(v + y + 2 * ND);
        s3 = s3 + ld(y + 3 * ND) * load<vd>(v + y + 3 * ND);
    }
    int64_t y = K4;
    for (; y + ND <= K; y += ND) s0 = s0 + ld(y) * load<vd>(v + y);
    double s = hsum((s0 + s1) + (s2 + s3));
    for (; y < K; ++y) s += static_cast<double>(e[y]) * v[y];
    return s;
}

// col += u e, in float64.
template <class T>
void scal_axpy(const T* e, double u, int64_t K, double* col) {
    const int64_t Kb = K - K % ND;
    for (int64_t y = 0; y < Kb; y += ND) {
        vd ev;
        if constexpr (std::is_same_v<T, float>)
            ev = to_double(load<vfh>(e + y));
        else
            ev = load<vd>(e + y);
        store(col + y, load<vd>(col + y) + ev * u);
    }
    for (int64_t y = Kb; y < K; ++y) col[y] += static_cast<double>(e[y]) * u;
}

// out_y = (u e_y) v_y, rounded once to T (out may be e).
template <class T>
void scal_write(const T* e, double u, const double* v, int64_t K, T* out) {
    const int64_t Kb = K - K % ND;
    for (int64_t y = 0; y < Kb; y += ND) {
        if constexpr (std::is_same_v<T, float>)
            store(out + y, to_float(to_double(load<vfh>(e + y)) * u * load<vd>(v + y)));
        else
            store(out + y, load<vd>(e + y) * u * load<vd>(v + y));
    }
    for (int64_t y = Kb; y < K; ++y) out[y] = static_cast<T>(static_cast<double>(e[y]) * u * v[y]);
}

// The number of entries of a row whose score alpha x_y + g_y (in float64, as the passes form
// it) is within tau (plus a rounding margin) of the row's best: more than 1 is a tie.
template <class T>
int64_t row_ties(const T* x, const double* g, int64_t K, double alpha, double tau) {
    using Tr = Traits<T>;
    constexpr int B = Tr::B;
    const int64_t Kb = K - K % B;
    vd lo, hi;
    vd mx = splat<vd>(kNegInf), mxh = mx;
    for (int64_t y = 0; y < Kb; y += B) {
        Tr::diff(x + y, g + y, alpha, 0.0, lo, hi);
        mx = vmax(mx, lo);
        mxh = vmax(mxh, hi);
    }
    double best = std::max(hmax(mx), hmax(mxh));
    for (int64_t y = Kb; y < K; ++y) best = std::max(best, static_cast<double>(x[y]) * alpha + g[y]);
    const double cut = best - tau - 1e-12 * (1.0 + std::abs(best));
    vl n = splat<vl>(int64_t(0));
    for (int64_t y = 0; y < Kb; y += B) {
        Tr::diff(x + y, g + y, alpha, 0.0, lo, hi);
        n = n - bits<vl>(lo >= cut);  // a true lane is -1
        if constexpr (B == NF) n = n - bits<vl>(hi >= cut);
    }
    int64_t count = 0;
    for (int l = 0; l < ND; ++l) count += n[l];
    for (int64_t y = Kb; y < K; ++y) count += static_cast<double>(x[y]) * alpha + g[y] >= cut;
    return count;
}

// The first argmax over y of alpha x_y + g_y in float64 (0 for a row with no allowed
// entry): a solve's labels, read once after its loop, the expression near_ties counts.
template <class T>
int64_t row_argmax(const T* x, const double* g, int64_t K, double alpha) {
    using Tr = Traits<T>;
    constexpr int B = Tr::B;
    ArgMax<B> am;
    auto block = [&](const T* xb, const double* gb, int64_t y) {
        vd lo, hi;
        Tr::diff(xb, gb, alpha, 0.0, lo, hi);
        am.update(lo, hi, y);
    };
    const int64_t Kb = K - K % B;
    for (int64_t y = 0; y < Kb; y += B) {
        ahead(x + y);
        if constexpr (sizeof(T) * B > 64) ahead(x + y + 64 / sizeof(T));
        block(x + y, g + y, y);
    }
    if (Kb < K) {
        Tail<T> t(x + Kb, g + Kb, K - Kb);
        block(t.x, t.g, Kb);
    }
    return am.first();
}

#undef SK_V
