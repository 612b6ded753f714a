// Row kernels of the batched and multi-target solves (batched.cpp), compiled once per
// instruction set: batched.cpp includes this file inside a namespace per ISA with the
// matching `#pragma GCC target`, so the plain loops below are auto-vectorised at that
// width.  No include guard: every definition here is per-ISA.
//
// Everything is float64: the rows of a small problem live in L1, so the pass is bound by
// its exponentials, not by memory, and float64 keeps the measured plan the plan of the
// float64 potentials without a precision budget.  The vector exponential is the single
// solve's (simd.h, included before this file).

// exp for the scalar tails of the rows (and every entry without vector extensions): exactly
// 0 below -708, as the vector exponential (a forbidden pair, or a term under float64's
// normal range).
BK_INLINE double bexp(double x) { return x < -708.0 ? 0.0 : std::exp(x); }

#if defined(__GNUC__)
typedef double bvd __attribute__((vector_size(BK_W)));
typedef uint64_t bvu __attribute__((vector_size(BK_W)));
typedef int64_t bvm __attribute__((vector_size(BK_W)));
typedef float bvh __attribute__((vector_size(BK_W / 2)));
constexpr int64_t BL = BK_W / 8;
BK_INLINE bvd bload(const double* p) {
    bvd v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
}
BK_INLINE bvd bload(const float* p) {
    bvh v;
    __builtin_memcpy(&v, p, sizeof(v));
    return __builtin_convertvector(v, bvd);
}
BK_INLINE void bstore(double* p, bvd v) { __builtin_memcpy(p, &v, sizeof(v)); }
BK_INLINE double bsum(bvd v) {
    double s = 0;
    for (int64_t l = 0; l < BL; ++l) s += v[l];
    return s;
}
BK_INLINE double bmax(bvd v) {
    double s = v[0];
    for (int64_t l = 1; l < BL; ++l) s = v[l] > s ? v[l] : s;
    return s;
}
#endif

// t_y = alpha x_y + g_y into t; returns max_y t_y (-inf when the row has no allowed entry)
template <class T>
BK_INLINE double row_exponents(const T* x, const double* g, int64_t K, double alpha,
                               double* t) {
    double m = -std::numeric_limits<double>::infinity();
    int64_t y = 0;
#if defined(__GNUC__)
    bvd mv = bvd{} + m;
    for (; y + BL <= K; y += BL) {
        ahead(x + y);  // the multi-target pass streams X
        const bvd v = bload(x + y) * alpha + bload(g + y);
        bstore(t + y, v);
        mv = v > mv ? v : mv;
    }
    m = bmax(mv);
#endif
    for (; y < K; ++y) {
        t[y] = alpha * static_cast<double>(x[y]) + g[y];
        m = t[y] > m ? t[y] : m;
    }
    return m;
}

// One row of the balanced pass at g: t_y = alpha x_y + g_y, m = max t, e_y = exp(t_y - m)
// into `e`, s = sum e.  Returns m (-inf when the row has no allowed entry).
template <class T>
BK_INLINE double row_exp(const T* x, const double* g, int64_t K, double alpha, double* e,
                         double& s) {
    const double m = row_exponents(x, g, K, alpha, e);
    s = 0;
    if (!(m > -std::numeric_limits<double>::infinity())) return m;
    int64_t y = 0;
#if defined(__GNUC__)
    bvd sv = bvd{};
    for (; y + BL <= K; y += BL) {
        const bvd v = vexp(bload(e + y) - m);
        bstore(e + y, v);
        sv += v;
    }
    s = bsum(sv);
#endif
    for (; y < K; ++y) {
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

// The multi-target kernels work on blocks of kRows rows and kTargets targets, padded with
// zeros: E (kRows x Kp), Wt and the accumulators (kp x Kp), Kp a multiple of the vector
// width and kp of kTargets, so every loop below has constant bounds and its accumulators
// stay in registers.
constexpr int64_t kRows = 4, kTargets = 4;
#if defined(__GNUC__)
// S_rt = sum_y E_ry Wt_ty for the kRows rows of E and targets t0 .. t0 + kTargets - 1
BK_INLINE void multi_dots(const double* E, const double* Wt, int64_t Kp, int64_t t0,
                          double* S, int64_t kp) {
    bvd acc[kRows][kTargets] = {};
    const double* w0 = Wt + t0 * Kp;
    for (int64_t y = 0; y < Kp; y += BL) {
        bvd w[kTargets], e[kRows];
        for (int64_t t = 0; t < kTargets; ++t) w[t] = bload(w0 + t * Kp + y);
        for (int64_t r = 0; r < kRows; ++r) e[r] = bload(E + r * Kp + y);
        for (int64_t r = 0; r < kRows; ++r)
            for (int64_t t = 0; t < kTargets; ++t) acc[r][t] += e[r] * w[t];
    }
    for (int64_t r = 0; r < kRows; ++r)
        for (int64_t t = 0; t < kTargets; ++t) S[r * kp + t0 + t] = bsum(acc[r][t]);
}

// acc_ty += sum_r Rr_rt E_ry for every target (Rr: kRows x kp)
BK_INLINE void multi_axpys(const double* E, const double* Rr, int64_t Kp, int64_t kp,
                           double* acc) {
    for (int64_t y = 0; y < Kp; y += BL) {
        bvd e[kRows];
        for (int64_t r = 0; r < kRows; ++r) e[r] = bload(E + r * Kp + y);
        for (int64_t t = 0; t < kp; ++t) {
            bvd a = bload(acc + t * Kp + y);
            for (int64_t r = 0; r < kRows; ++r) a += Rr[r * kp + t] * e[r];
            bstore(acc + t * Kp + y, a);
        }
    }
}
#else
BK_INLINE void multi_dots(const double* E, const double* Wt, int64_t Kp, int64_t t0,
                          double* S, int64_t kp) {
    for (int64_t r = 0; r < kRows; ++r)
        for (int64_t t = t0; t < t0 + kTargets; ++t) {
            double s = 0;
            for (int64_t y = 0; y < Kp; ++y) s += E[r * Kp + y] * Wt[t * Kp + y];
            S[r * kp + t] = s;
        }
}
BK_INLINE void multi_axpys(const double* E, const double* Rr, int64_t Kp, int64_t kp,
                           double* acc) {
    for (int64_t t = 0; t < kp; ++t)
        for (int64_t r = 0; r < kRows; ++r) {
            const double c = Rr[r * kp + t];
            for (int64_t y = 0; y < Kp; ++y) acc[t * Kp + y] += c * E[r * Kp + y];
        }
}
#endif

// The multi-target row block: for the R (<= kRows) rows of X, e_ry = exp(alpha x_ry +
// gbar_y - m_r) into E (kRows x Kp; rows R.. zero), then S_rt = sum_y e_ry W_ty for every
// target (S: kRows x kp): one exponential per entry serves every target.
template <class T>
BK_INLINE void multi_rows(const T* X, int64_t R, int64_t K, int64_t Kp, int64_t kp,
                          double alpha, const double* gbar, const double* Wt, double* E,
                          double* m_out, double* S) {
    for (int64_t r = 0; r < kRows; ++r) {
        double s;
        if (r < R) {
            m_out[r] = row_exp(X + r * K, gbar, K, alpha, E + r * Kp, s);
            if (!(m_out[r] > -std::numeric_limits<double>::infinity()))
                for (int64_t y = 0; y < K; ++y) E[r * Kp + y] = 0;
        } else {
            for (int64_t y = 0; y < Kp; ++y) E[r * Kp + y] = 0;
        }
    }
    for (int64_t t0 = 0; t0 < kp; t0 += kTargets) multi_dots(E, Wt, Kp, t0, S, kp);
}

// E_ry x_ry where E_ry > 0 (a forbidden pair's x is infinite), for the cost
template <class T>
BK_INLINE void times_x(const double* E, const T* X, int64_t R, int64_t K, int64_t Kp,
                       double* Ex) {
    for (int64_t r = 0; r < kRows; ++r) {
        double* o = Ex + r * Kp;
        const double* e = E + r * Kp;
        if (r >= R) {
            for (int64_t y = 0; y < Kp; ++y) o[y] = 0;
            continue;
        }
        const T* x = X + r * K;
#pragma omp simd
        for (int64_t y = 0; y < K; ++y) o[y] = e[y] > 0 ? e[y] * static_cast<double>(x[y]) : 0.0;
        for (int64_t y = K; y < Kp; ++y) o[y] = 0;
    }
}

// mx_y = max(mx_y, alpha x_y): the column maxima of S, a row at a time
template <class T>
BK_INLINE void col_max(const T* x, int64_t K, double alpha, double* mx) {
    for (int64_t y = 0; y < K; ++y) {
        const double t = alpha * static_cast<double>(x[y]);
        mx[y] = t > mx[y] ? t : mx[y];
    }
}

#if defined(__GNUC__)
// z_y += exp(alpha x_y - mx_y) (mx_y = -inf: the column has no allowed entry, z stays 0)
template <class T>
BK_INLINE void col_sumexp(const T* x, int64_t K, double alpha, const double* mx, double* z) {
    const int64_t Kb = K - K % BL;
    for (int64_t y = 0; y < Kb; y += BL) {
        const bvd d = bload(x + y) * alpha - bload(mx + y);
        const bvd e = vexp(d);
        bstore(z + y, bload(z + y) + (d == d ? e : bvd{}));  // -inf - -inf: NaN, nothing
    }
    for (int64_t y = Kb; y < K; ++y) {
        const double d = alpha * static_cast<double>(x[y]) - mx[y];
        z[y] += d == d ? bexp(d) : 0.0;
    }
}

// sum_y exp(alpha x_y + c_y) x_y over the allowed pairs (c_y = f_i + g_y; the plan entries
// are at most the row mass, so the exponent stays below ~0)
template <class T>
BK_INLINE double row_cost(const T* x, const double* c, int64_t K, double alpha) {
    const int64_t Kb = K - K % BL;
    bvd sv = bvd{};
    for (int64_t y = 0; y < Kb; y += BL) {
        const bvd xv = bload(x + y);
        const bvd q = vexp(xv * alpha + bload(c + y));
        sv += q > 0 ? q * xv : bvd{};
    }
    double s = bsum(sv);
    for (int64_t y = Kb; y < K; ++y) {
        const double xv = static_cast<double>(x[y]);
        const double q = bexp(alpha * xv + c[y]);
        s += q > 0 ? q * xv : 0.0;
    }
    return s;
}
#else
template <class T>
BK_INLINE void col_sumexp(const T* x, int64_t K, double alpha, const double* mx, double* z) {
    for (int64_t y = 0; y < K; ++y) {
        const double d = alpha * static_cast<double>(x[y]) - mx[y];
        z[y] += d == d ? bexp(d) : 0.0;
    }
}
template <class T>
BK_INLINE double row_cost(const T* x, const double* c, int64_t K, double alpha) {
    double s = 0;
    for (int64_t y = 0; y < K; ++y) {
        const double xv = static_cast<double>(x[y]);
        const double q = bexp(alpha * xv + c[y]);
        s += q > 0 ? q * xv : 0.0;
    }
    return s;
}
#endif

// log(x) in float64 for positive normal x: x = 2^e u with u in [sqrt(1/2), sqrt(2)), log u =
// 2 atanh(s), s = (u - 1) / (u + 1), |s| <= 0.172, by its series to s^23 (relative error
// below 1e-16).  Unsigned bit arithmetic only (no arithmetic shift, no int64 -> double
// conversion: AVX2 has neither), so `omp simd` loops vectorise it at every width.
BK_INLINE double blog(double x) {
    const uint64_t b = BK_BITS(uint64_t, x);
    // e + 1024 for the exponent e that lands u in [sqrt(1/2), sqrt(2)) (0x3fe6a09e... =
    // sqrt(1/2)); the bias keeps the difference positive for every positive normal x
    constexpr uint64_t kBias = uint64_t(1024) << 52;
    const uint64_t eb = (b - 0x3fe6a09e667f3bcdULL + kBias) >> 52;
    const double u = BK_BITS(double, b + kBias - (eb << 52));
    // e exactly: 2^52 + eb as a double's bits, less 2^52 + 1024
    const double ed = BK_BITS(double, eb + 0x4330000000000000ULL) - 4503599627371520.0;
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
    return ed * 0.693147180559890330187 + (2.0 * s * p + ed * 5.4979230187083711552e-14);
}

// f_i = loga_i - m_i - log s_i (f = -inf where the row carried no plan: m_i = -inf)
BK_INLINE void row_potentials(const double* loga, const double* m, const double* s, int64_t N,
                              double* f) {
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) {
        const double ninf = -std::numeric_limits<double>::infinity();
        const double v = loga[i] - m[i] - blog(s[i] > 0 ? s[i] : 1.0);
        f[i] = m[i] > ninf ? v : ninf;
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

// The validation facts of one problem's n entries (the single solve's check_matrix):
// returns bit 0 when an entry is NaN or the wrong infinity, bit 1 when one is `forbidden`;
// max_abs = the largest |finite entry|.
template <class T>
BK_INLINE uint8_t scan_entries(const T* x, int64_t n, double forbidden, double& max_abs) {
    const double inf = std::numeric_limits<double>::infinity();
    double mx = 0;
    bool bad = false, forb = false;
#if defined(__GNUC__)
    const int64_t nb = n - n % BL;
    bvd mv = bvd{};
    bvu badv = bvu{}, forbv = bvu{};
    for (int64_t y = 0; y < nb; y += BL) {
        const bvd v = bload(x + y);
        const bvd av = v < 0 ? -v : v;
        const bvm fin = av < inf;  // false for +-inf and NaN
        const bvm isf = v == forbidden;
        mv = mv > (fin ? av : bvd{}) ? mv : (fin ? av : bvd{});
        badv |= (bvu)(~fin & ~isf);
        forbv |= (bvu)isf;
    }
    mx = bmax(mv);
    for (int64_t l = 0; l < BL; ++l) {
        bad |= badv[l] != 0;
        forb |= forbv[l] != 0;
    }
#else
    const int64_t nb = 0;
#endif
    for (int64_t y = nb; y < n; ++y) {
        const double v = static_cast<double>(x[y]), av = v < 0 ? -v : v;
        if (av < inf) {
            mx = av > mx ? av : mx;
        } else if (v == forbidden) {
            forb = true;
        } else {
            bad = true;
        }
    }
    max_abs = mx;
    return static_cast<uint8_t>((bad ? 1 : 0) | (forb ? 2 : 0));
}

// sum_y u_y v_y (Anderson's least squares)
BK_INLINE double dot(const double* u, const double* v, int64_t n) {
    double s = 0;
    int64_t nb = 0;
#if defined(__GNUC__)
    nb = n - n % BL;
    bvd a0 = bvd{}, a1 = bvd{};
    int64_t y = 0;
    for (; y + 2 * BL <= nb; y += 2 * BL) {
        a0 += bload(u + y) * bload(v + y);
        a1 += bload(u + y + BL) * bload(v + y + BL);
    }
    for (; y < nb; y += BL) a0 += bload(u + y) * bload(v + y);
    s = bsum(a0 + a1);
#endif
    for (int64_t y2 = nb; y2 < n; ++y2) s += u[y2] * v[y2];
    return s;
}

// e_j = exp(x_j - shift) (0 below -708 and for x_j = -inf)
BK_INLINE void exp_shifted(const double* x, double shift, int64_t n, double* e) {
    int64_t nb = 0;
#if defined(__GNUC__)
    nb = n - n % BL;
    for (int64_t j = 0; j < nb; j += BL) bstore(e + j, vexp(bload(x + j) - shift));
#endif
    for (int64_t j = nb; j < n; ++j) e[j] = bexp(x[j] - shift);
}

// The reductions of the loop over one problem's rows and columns (its err, the dual of
// Anderson's guard, the means of the centred potentials), in four vector accumulators:
// a single running sum would wait on every addition before the next.
#if defined(__GNUC__)
#define BK_REDUCE(body)                                                                    \
    bvd acc[4] = {};                                                                      \
    int64_t y = 0;                                                                        \
    for (; y + 4 * BL <= n; y += 4 * BL)                                                  \
        for (int64_t q = 0; q < 4; ++q) {                                                 \
            const int64_t j = y + q * BL;                                                 \
            acc[q] += (body);                                                             \
        }                                                                                 \
    for (; y + BL <= n; y += BL) {                                                        \
        const int64_t j = y;                                                              \
        acc[0] += (body);                                                                 \
    }
#endif

// sum_y |c_y - b_y|
BK_INLINE double l1_diff(const double* c, const double* b, int64_t n) {
    double s = 0;
    int64_t y0 = 0;
#if defined(__GNUC__)
    {
        BK_REDUCE(bload(c + j) - bload(b + j) < 0 ? bload(b + j) - bload(c + j)
                                                  : bload(c + j) - bload(b + j))
        s = bsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
        y0 = y;
    }
#endif
    for (int64_t y = y0; y < n; ++y) s += std::abs(c[y] - b[y]);
    return s;
}

// sum_y v_y over the y with gate_y == 0 (the columns of positive mass; v may be -inf on the
// others)
BK_INLINE double gated_sum(const double* v, const double* gate, int64_t n) {
    double s = 0;
    int64_t y0 = 0;
#if defined(__GNUC__)
    {
        BK_REDUCE(bload(gate + j) == 0 ? bload(v + j) : bvd{})
        s = bsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
        y0 = y;
    }
#endif
    for (int64_t y = y0; y < n; ++y) s += gate[y] == 0 ? v[y] : 0.0;
    return s;
}
#if defined(__GNUC__)
#undef BK_REDUCE
#endif

// out = (sum_i w_i v_i, sum_i |w_i v_i|) over the i with w_i > 0 and v_i > -inf
BK_INLINE void weighted_sums(const double* w, const double* v, int64_t n, double* out) {
    const double ninf = -std::numeric_limits<double>::infinity();
    double s = 0, a = 0;
    int64_t y = 0;
#if defined(__GNUC__)
    bvd s0 = bvd{}, s1 = bvd{}, a0 = bvd{}, a1 = bvd{};
    for (; y + 2 * BL <= n; y += 2 * BL) {
        const bvd w0 = bload(w + y), v0 = bload(v + y);
        const bvd w1 = bload(w + y + BL), v1 = bload(v + y + BL);
        const bvd t0 = (w0 > 0) & (v0 > ninf) ? w0 * v0 : bvd{};
        const bvd t1 = (w1 > 0) & (v1 > ninf) ? w1 * v1 : bvd{};
        s0 += t0;
        s1 += t1;
        a0 += t0 < 0 ? -t0 : t0;
        a1 += t1 < 0 ? -t1 : t1;
    }
    s = bsum(s0 + s1);
    a = bsum(a0 + a1);
#endif
    for (; y < n; ++y) {
        const double t = w[y] > 0 && v[y] > ninf ? w[y] * v[y] : 0.0;
        s += t;
        a += std::abs(t);
    }
    out[0] = s;
    out[1] = a;
}

// The scaling form of sf's matrix at alpha (Scaled in batched.cpp): k_iy = exp(alpha x_iy +
// gate_y - mx_i), mx_i the row's largest alpha x_iy + gate_y (-inf: none, the row of k all
// zero), into sf.k (N x Kp, zero padded).  gate_y = 0 on the columns of positive mass, -inf
// on the others: a row's shift must be one of its live entries (see pass).
template <class T>
BK_INLINE void scaled_rows(const T* X, double alpha, const double* gate, Scaled& sf) {
    const double ninf = -std::numeric_limits<double>::infinity();
    const int64_t N = sf.N, K = sf.K, Kp = sf.Kp;
    double* k = sf.k.data();
    // every row's exponents and shift first, then the exponentials of all the rows in one
    // sweep: no row's exponentials wait for its own maximum (a reduction across the row)
    for (int64_t i = 0; i < N; ++i) {
        double* t = k + i * Kp;
        sf.mx[i] = row_exponents(X + i * K, gate, K, alpha, t);
        for (int64_t y = K; y < Kp; ++y) t[y] = ninf;  // exp: 0
    }
    for (int64_t i = 0; i < N; ++i) {
        double* t = k + i * Kp;
        const double m = sf.mx[i];
        if (!(m > ninf)) {  // no allowed entry in a live column: the row of k all zero
            for (int64_t y = 0; y < Kp; ++y) t[y] = 0;
            continue;
        }
        exp_shifted(t, m, Kp, t);
    }
}

// out_i = sum_j M_ij x_j (M: rows x cols row-major, cols a multiple of 8), eight rows at a
// time so that their sums overlap.
BK_INLINE void gemv_dots(const double* M, int64_t rows, int64_t cols, const double* x,
                         double* out) {
    int64_t i = 0;
#if defined(__GNUC__)
    constexpr int64_t kR = 8;
    for (; i + kR <= rows; i += kR) {
        bvd acc[kR] = {};
        const double* mi = M + i * cols;
        for (int64_t j = 0; j < cols; j += BL) {
            const bvd xv = bload(x + j);
            for (int64_t r = 0; r < kR; ++r) acc[r] += bload(mi + r * cols + j) * xv;
        }
        for (int64_t r = 0; r < kR; ++r) out[i + r] = bsum(acc[r]);
    }
#endif
    for (; i < rows; ++i) out[i] = dot(M + i * cols, x, cols);
}

// out_j = sum_r x_r M_rj for j < cols (M: rows x cols row-major, cols a multiple of 8): the
// accumulators of kBlock vectors of out stay in registers while the rows stream past, two
// sets (even and odd rows) so that the additions do not wait on each other.
BK_INLINE void gemv_rows(const double* M, int64_t rows, int64_t cols, const double* x,
                         double* out) {
#if defined(__GNUC__)
    constexpr int64_t kBlock = 4;
    int64_t j = 0;
    for (; j + kBlock * BL <= cols; j += kBlock * BL) {
        bvd acc[kBlock] = {}, acc2[kBlock] = {};
        int64_t r = 0;
        for (; r + 2 <= rows; r += 2) {
            const double x0 = x[r], x1 = x[r + 1];
            const double* m0 = M + r * cols + j;
            for (int64_t q = 0; q < kBlock; ++q) {
                acc[q] += x0 * bload(m0 + q * BL);
                acc2[q] += x1 * bload(m0 + cols + q * BL);
            }
        }
        for (; r < rows; ++r)
            for (int64_t q = 0; q < kBlock; ++q) acc[q] += x[r] * bload(M + r * cols + j + q * BL);
        for (int64_t q = 0; q < kBlock; ++q) bstore(out + j + q * BL, acc[q] + acc2[q]);
    }
    for (; j < cols; j += BL) {
        bvd acc = {};
        for (int64_t r = 0; r < rows; ++r) acc += x[r] * bload(M + r * cols + j);
        bstore(out + j, acc);
    }
#else
    for (int64_t j = 0; j < cols; ++j) out[j] = 0;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < cols; ++j) out[j] += x[r] * M[r * cols + j];
#endif
}

// pass_rows at g in the scaling form, no exponential per entry: v_y = exp(g_y - gmax),
// r = k v, then m_i = mx_i + gmax and s_i = r_i (the same row sum exp(m_i) s_i as
// pass_rows), col = v * (k^T w) with w_i = a_i / r_i.  Scratch: v and c (Kp), r and w (N).
BK_INLINE void scaled_pass(const Scaled& sf, const double* g, double gmax, const double* a,
                           double* m, double* s, double* col, double* v, double* c, double* r,
                           double* w) {
    const double ninf = -std::numeric_limits<double>::infinity();
    const int64_t N = sf.N, K = sf.K, Kp = sf.Kp;
    exp_shifted(g, gmax, K, v);
    for (int64_t y = K; y < Kp; ++y) v[y] = 0;
    gemv_dots(sf.k.data(), N, Kp, v, r);
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) {
        const bool carries = a[i] > 0 && sf.mx[i] > ninf && r[i] > 0;
        m[i] = carries ? sf.mx[i] + gmax : ninf;
        s[i] = carries ? r[i] : a[i] > 0 ? 0.0 : 1.0;
        w[i] = carries ? a[i] / r[i] : 0.0;
    }
    gemv_rows(sf.k.data(), N, Kp, w, c);
    for (int64_t y = 0; y < K; ++y) col[y] = c[y] * v[y];
}

// z_y = sum_i k_iy exp(mx_i - M) (y < K; scratch sf.w, sf.c)
BK_INLINE void scaled_colsums(Scaled& sf, double M, double* z) {
    exp_shifted(sf.mx.data(), M, sf.N, sf.w.data());
    gemv_rows(sf.k.data(), sf.N, sf.Kp, sf.w.data(), sf.c.data());
    for (int64_t y = 0; y < sf.K; ++y) z[y] = sf.c[y];
}

// k^4 in place: the scaling form at 4 alpha from the one at alpha (exp(4 t) = exp(t)^4; a
// square below float64's normal range flushes to zero, as exp below -708 does)
BK_INLINE void scaled_pow4(double* k, int64_t n) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        const double q = k[j] * k[j];
        k[j] = q * q;
    }
}

// sum Q X over the allowed pairs for the plan Q_iy = exp(S_iy + f_i + g_y) = rho_i k_iy v_y,
// rho_i = exp(mx_i + f_i + gmax), v_y = exp(g_y - gmax) (scratch `rho` (N) and `v` (K))
template <class T>
BK_INLINE double scaled_cost(const Scaled& sf, const T* X, const double* f, const double* g,
                             double gmax, double* rho, double* v) {
    const int64_t N = sf.N, K = sf.K;
    exp_shifted(g, gmax, K, v);
    for (int64_t i = 0; i < N; ++i) rho[i] = sf.mx[i] + f[i];
    exp_shifted(rho, -gmax, N, rho);
    double cost = 0;
#if defined(__GNUC__)
    // one vector sum over all the rows (two, so that the additions overlap), reduced once
    bvd acc0 = bvd{}, acc1 = bvd{};
    const int64_t Kb = K - K % BL;
#else
    const int64_t Kb = 0;
#endif
    for (int64_t i = 0; i < N; ++i) {
        if (!(rho[i] > 0)) continue;
        const double* ki = sf.k.data() + i * sf.Kp;
        const T* x = X + i * K;
        const double ri = rho[i];
        int64_t y = 0;
#if defined(__GNUC__)
        for (; y + 2 * BL <= Kb; y += 2 * BL) {
            const bvd q0 = bload(ki + y) * bload(v + y), x0 = bload(x + y);
            const bvd q1 = bload(ki + y + BL) * bload(v + y + BL), x1 = bload(x + y + BL);
            acc0 += q0 > 0 ? (ri * q0) * x0 : bvd{};  // (a forbidden pair's x is infinite)
            acc1 += q1 > 0 ? (ri * q1) * x1 : bvd{};
        }
        for (; y < Kb; y += BL) {
            const bvd q = bload(ki + y) * bload(v + y), xv = bload(x + y);
            acc0 += q > 0 ? (ri * q) * xv : bvd{};
        }
#endif
        for (; y < K; ++y) {
            const double q = ki[y] * v[y];
            cost += q > 0 ? (ri * q) * static_cast<double>(x[y]) : 0.0;
        }
    }
#if defined(__GNUC__)
    cost += bsum(acc0 + acc1);
#endif
    return cost;
}

// l_y = log col_y where col_y > kColumnUnderflow (next_g reads it only there), else 0
BK_INLINE void col_logs(const double* col, int64_t K, double* l) {
#pragma omp simd
    for (int64_t y = 0; y < K; ++y)
        l[y] = col[y] > kColumnUnderflow ? blog(col[y]) : 0.0;
}
