// Row kernels of the batched and multi-target solves (batched.cpp), compiled once per
// instruction set: batched.cpp includes this file inside a namespace per ISA with the
// matching `#pragma GCC target`, so the plain loops below are auto-vectorised at that
// width.  No include guard: every definition here is per-ISA.
//
// Everything is float64: the rows of a small problem live in L1, so the pass is bound by
// its exponentials, not by memory, and float64 keeps the measured plan the plan of the
// float64 potentials without a precision budget.

// exp(x) in float64 for x <= ~0: Cody-Waite reduction by ln 2 and a degree-12 Taylor
// polynomial on |r| <= ln2 / 2 (relative error below 2e-16).  Exactly 0 below -708 (a
// forbidden pair, or a term under float64's normal range).  Written with scalar arithmetic
// and bit casts only, so `omp simd` loops vectorise it.
BK_INLINE double bexp(double x) {
    const double magic = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
    const double xc = x < -708.0 ? -708.0 : x;
    const double kt = xc * 1.4426950408889634 + magic;
    const double kd = kt - magic;
    const double r = (xc - kd * 0.693147180559890330187) - kd * 5.4979230187083711552e-14;
    double p = 2.08767569878681e-09;  // 1 / 12!
    p = p * r + 2.505210838544172e-08;
    p = p * r + 2.755731922398589e-07;
    p = p * r + 2.755731922398589e-06;
    p = p * r + 2.48015873015873e-05;
    p = p * r + 1.984126984126984e-04;
    p = p * r + 1.388888888888889e-03;
    p = p * r + 8.333333333333333e-03;
    p = p * r + 4.166666666666666e-02;
    p = p * r + 1.666666666666667e-01;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uint64_t ki;  // kd as an integer: the low bits of kt (no float-to-int conversion)
    __builtin_memcpy(&ki, &kt, 8);
    ki -= 0x4338000000000000ULL;
    uint64_t pb;
    __builtin_memcpy(&pb, &p, 8);
    pb += ki << 52;
    double out;
    __builtin_memcpy(&out, &pb, 8);
    return x < -708.0 ? 0.0 : out;
}

// One row of the balanced pass at g: t_y = alpha x_y + g_y, m = max t, e_y = exp(t_y - m)
// into `e`, s = sum e.  Returns m (-inf when the row has no allowed entry).
template <class T>
BK_INLINE double row_exp(const T* x, const double* g, int64_t K, double alpha, double* e,
                         double& s) {
    double m = -std::numeric_limits<double>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t y = 0; y < K; ++y) {
        const double t = alpha * static_cast<double>(x[y]) + g[y];
        e[y] = t;
        m = t > m ? t : m;
    }
    s = 0;
    if (!(m > -std::numeric_limits<double>::infinity())) return m;
#pragma omp simd reduction(+ : s)
    for (int64_t y = 0; y < K; ++y) {
        const double v = bexp(e[y] - m);
        e[y] = v;
        s += v;
    }
    return m;
}

// col_y += r e_y
BK_INLINE void axpy(double* col, const double* e, double r, int64_t K) {
#pragma omp simd
    for (int64_t y = 0; y < K; ++y) col[y] += r * e[y];
}

// The multi-target row block: for rows i of a block (R at most kBlock), e_iy = exp(alpha x_iy
// + gbar_y - m_i) into E (R x K), then s_it = sum_y e_iy W_yt (W: K x k, row-major), all k
// targets from one exponential per entry.
template <class T>
BK_INLINE void multi_rows(const T* X, int64_t R, int64_t K, int64_t k, double alpha,
                          const double* gbar, const double* W, double* E, double* m_out,
                          double* S) {
    for (int64_t r = 0; r < R; ++r) {
        double s;
        m_out[r] = row_exp(X + r * K, gbar, K, alpha, E + r * K, s);
    }
    for (int64_t q = 0; q < R * k; ++q) S[q] = 0;
    for (int64_t y = 0; y < K; ++y) {
        const double* w = W + y * k;
        for (int64_t r = 0; r < R; ++r) {
            const double ey = E[r * K + y];
            double* sr = S + r * k;
#pragma omp simd
            for (int64_t t = 0; t < k; ++t) sr[t] += ey * w[t];
        }
    }
}

// acc_yt += sum_r e_ry rr_rt for a block of rows (the column sums before the W_yt factor).
BK_INLINE void multi_accumulate(const double* E, const double* Rr, int64_t R, int64_t K,
                                int64_t k, double* acc) {
    for (int64_t y = 0; y < K; ++y) {
        double* ay = acc + y * k;
        for (int64_t r = 0; r < R; ++r) {
            const double ey = E[r * K + y];
            const double* rr = Rr + r * k;
#pragma omp simd
            for (int64_t t = 0; t < k; ++t) ay[t] += ey * rr[t];
        }
    }
}

// mx_y = max(mx_y, alpha x_y): the column maxima of S, a row at a time
template <class T>
BK_INLINE void col_max(const T* x, int64_t K, double alpha, double* mx) {
#pragma omp simd
    for (int64_t y = 0; y < K; ++y) {
        const double t = alpha * static_cast<double>(x[y]);
        mx[y] = t > mx[y] ? t : mx[y];
    }
}

// z_y += exp(alpha x_y - mx_y) (mx_y = -inf: the column has no allowed entry, z stays 0)
template <class T>
BK_INLINE void col_sumexp(const T* x, int64_t K, double alpha, const double* mx, double* z) {
#pragma omp simd
    for (int64_t y = 0; y < K; ++y) {
        const double d = alpha * static_cast<double>(x[y]) - mx[y];
        z[y] += d == d ? bexp(d) : 0.0;  // -inf - -inf is NaN: nothing allowed
    }
}

// sum_y exp(alpha x_y + c_y) x_y over the allowed pairs (c_y = f_i + g_y; the plan entries
// are at most the row mass, so the exponent stays below ~0)
template <class T>
BK_INLINE double row_cost(const T* x, const double* c, int64_t K, double alpha) {
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t y = 0; y < K; ++y) {
        const double xv = static_cast<double>(x[y]);
        const double q = bexp(alpha * xv + c[y]);
        s += q > 0 ? q * xv : 0.0;
    }
    return s;
}

// log(x) in float64 for positive normal x: x = 2^e u with u in [sqrt(1/2), sqrt(2)), log u =
// 2 atanh(s), s = (u - 1) / (u + 1), |s| <= 0.172, by its series to s^23 (relative error
// below 1e-16).  Bit casts and arithmetic only, so `omp simd` loops vectorise it.
BK_INLINE double blog(double x) {
    uint64_t b;
    __builtin_memcpy(&b, &x, 8);
    // shift the exponent so that u lands in [sqrt(1/2), sqrt(2)): 0x3fe6a09e... = sqrt(1/2)
    const uint64_t off = b - 0x3fe6a09e667f3bcdULL;
    const int64_t e = static_cast<int64_t>(off) >> 52;
    const uint64_t ub = b - (static_cast<uint64_t>(e) << 52);
    double u;
    __builtin_memcpy(&u, &ub, 8);
    const double s = (u - 1.0) / (u + 1.0), s2 = s * s;
    double p = 1.0 / 23;
    p = p * s2 + 1.0 / 21;
    p = p * s2 + 1.0 / 19;
    p = p * s2 + 1.0 / 17;
    p = p * s2 + 1.0 / 15;
    p = p * s2 + 1.0 / 13;
    p = p * s2 + 1.0 / 11;
    p = p * s2 + 1.0 / 9;
    p = p * s2 + 1.0 / 7;
    p = p * s2 + 1.0 / 5;
    p = p * s2 + 1.0 / 3;
    p = p * s2 + 1.0;
    const double ed = static_cast<double>(e);
    return ed * 0.693147180559890330187 + (2.0 * s * p + ed * 5.4979230187083711552e-14);
}

// f_i = loga_i - m_i - log s_i (f = -inf where the row carried no plan: m_i = -inf)
BK_INLINE void row_potentials(const double* loga, const double* m, const double* s, int64_t N,
                              double* f) {
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) {
        const double v = loga[i] - m[i] - blog(s[i] > 0 ? s[i] : 1.0);
        f[i] = m[i] > -std::numeric_limits<double>::infinity() ? v
                                                               : -std::numeric_limits<double>::infinity();
    }
}

// One balanced pass at g over the rows of X (N x K): m_i, s_i of every row (m_i = -inf for
// a row of zero mass or with no allowed entry) and the column sums col of the plan, whose
// row i is e_i a_i / s_i.
template <class T>
BK_INLINE void pass_rows(const T* X, int64_t N, int64_t K, double alpha, const double* g,
                         const double* a, double* m, double* s, double* col, double* e) {
    for (int64_t y = 0; y < K; ++y) col[y] = 0;
    for (int64_t i = 0; i < N; ++i) {
        if (!(a[i] > 0)) {
            m[i] = -std::numeric_limits<double>::infinity();
            s[i] = 1;
            continue;
        }
        double si;
        const double mi = row_exp(X + i * K, g, K, alpha, e, si);
        m[i] = mi;
        s[i] = si;
        if (!(mi > -std::numeric_limits<double>::infinity())) continue;
        axpy(col, e, a[i] / si, K);
    }
}
