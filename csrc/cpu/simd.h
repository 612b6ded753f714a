// Fixed-width vectors for the CPU kernels, SK_W bytes wide (16, 32 or 64: SSE2, AVX2,
// AVX-512).  Included once per instruction set inside that set's namespace (see
// sinkhorn_cpu.cpp), so it has no include guard: every name here is per-ISA.
//
// With GCC or Clang the types are the compilers' vector extensions, compiled to native SIMD
// of the width of the enclosing `#pragma GCC target`.  Elsewhere (MSVC) they are structs whose
// operations are plain loops over the lanes, correct and left to the auto-vectoriser.  The
// kernels only use the functions and operators defined here.

constexpr int NF = SK_W / 4;  // float32 lanes
constexpr int ND = SK_W / 8;  // float64 lanes

#if defined(SK_VECTOR_EXT)

#define SK_V __attribute__((always_inline)) inline

typedef float vf __attribute__((vector_size(SK_W)));
typedef int32_t vi __attribute__((vector_size(SK_W)));
typedef double vd __attribute__((vector_size(SK_W)));
typedef int64_t vl __attribute__((vector_size(SK_W)));
typedef float vfh __attribute__((vector_size(SK_W / 2)));  // ND floats

template <class V, class S>
SK_V V splat(S s) {
    V v = {};
    return v + s;
}
template <class To, class From>
SK_V To bits(From a) {
    static_assert(sizeof(To) == sizeof(From), "same width");
    return (To)a;
}
template <class M, class V>
SK_V V select(M m, V a, V b) { return m ? a : b; }
// (a > b) ? a : b is exactly the x86 max instruction: the compiler emits one max.
template <class V>
SK_V V vmax(V a, V b) { return a > b ? a : b; }
template <class V>
SK_V V vmin(V a, V b) { return a < b ? a : b; }

// float32 <-> float64 lanes.  GCC 12 splits __builtin_convertvector(float -> double) into
// halves; the intrinsics give the single instruction.
SK_V vd to_double(vfh a) {
#if SK_W == 64 && defined(SK_X86)
    return (vd)_mm512_cvtps_pd((__m256)a);
#elif SK_W == 32 && defined(SK_X86)
    return (vd)_mm256_cvtps_pd((__m128)a);
#else
    return __builtin_convertvector(a, vd);
#endif
}
SK_V vfh to_float(vd a) { return __builtin_convertvector(a, vfh); }

#if SK_W == 64
#define SK_LO 0, 1, 2, 3, 4, 5, 6, 7
#define SK_HI 8, 9, 10, 11, 12, 13, 14, 15
#elif SK_W == 32
#define SK_LO 0, 1, 2, 3
#define SK_HI 4, 5, 6, 7
#else
#define SK_LO 0, 1
#define SK_HI 2, 3
#endif
SK_V vf concat(vfh lo, vfh hi) { return __builtin_shufflevector(lo, hi, SK_LO, SK_HI); }
SK_V vfh half_lo(vf a) { return __builtin_shufflevector(a, a, SK_LO); }
SK_V vfh half_hi(vf a) { return __builtin_shufflevector(a, a, SK_HI); }
#undef SK_LO
#undef SK_HI

#else  // portable lane loops

#define SK_V inline

template <class E, int N>
struct Vec {
    E v[N];
    E& operator[](int i) { return v[i]; }
    E operator[](int i) const { return v[i]; }
};
using vf = Vec<float, NF>;
using vi = Vec<int32_t, NF>;
using vd = Vec<double, ND>;
using vl = Vec<int64_t, ND>;
using vfh = Vec<float, ND>;

template <class E> struct MaskOf;
template <> struct MaskOf<float> { using type = int32_t; };
template <> struct MaskOf<double> { using type = int64_t; };
template <> struct MaskOf<int32_t> { using type = int32_t; };
template <> struct MaskOf<int64_t> { using type = int64_t; };

#define SK_BINOP(op)                                                         \
    template <class E, int N>                                                \
    inline Vec<E, N> operator op(Vec<E, N> a, Vec<E, N> b) {                 \
        for (int i = 0; i < N; ++i) a.v[i] = a.v[i] op b.v[i];               \
        return a;                                                            \
    }                                                                        \
    template <class E, int N, class S>                                       \
    inline Vec<E, N> operator op(Vec<E, N> a, S s) {                         \
        for (int i = 0; i < N; ++i) a.v[i] = a.v[i] op static_cast<E>(s);    \
        return a;                                                            \
    }                                                                        \
    template <class E, int N>                                                \
    inline Vec<E, N>& operator op##=(Vec<E, N>& a, Vec<E, N> b) { return a = a op b; }
SK_BINOP(+)
SK_BINOP(-)
SK_BINOP(*)
SK_BINOP(&)
SK_BINOP(|)
#undef SK_BINOP
template <class E, int N>
inline Vec<E, N> operator<<(Vec<E, N> a, int s) {
    for (int i = 0; i < N; ++i) a.v[i] = a.v[i] << s;
    return a;
}
template <class E, int N>
inline Vec<E, N> operator~(Vec<E, N> a) {
    for (int i = 0; i < N; ++i) a.v[i] = ~a.v[i];
    return a;
}
template <class E, int N>
inline Vec<E, N> operator-(Vec<E, N> a) {
    for (int i = 0; i < N; ++i) a.v[i] = -a.v[i];
    return a;
}
#define SK_CMPOP(op)                                                               \
    template <class E, int N>                                                      \
    inline Vec<typename MaskOf<E>::type, N> operator op(Vec<E, N> a, Vec<E, N> b) { \
        Vec<typename MaskOf<E>::type, N> m;                                        \
        for (int i = 0; i < N; ++i) m.v[i] = a.v[i] op b.v[i] ? -1 : 0;            \
        return m;                                                                  \
    }                                                                              \
    template <class E, int N, class S>                                             \
    inline Vec<typename MaskOf<E>::type, N> operator op(Vec<E, N> a, S s) {        \
        Vec<typename MaskOf<E>::type, N> m;                                        \
        for (int i = 0; i < N; ++i) m.v[i] = a.v[i] op static_cast<E>(s) ? -1 : 0; \
        return m;                                                                  \
    }
SK_CMPOP(<)
SK_CMPOP(>)
SK_CMPOP(==)
SK_CMPOP(>=)
#undef SK_CMPOP

template <class V, class S>
inline V splat(S s) {
    V v;
    for (auto& e : v.v) e = static_cast<std::remove_reference_t<decltype(e)>>(s);
    return v;
}
template <class To, class From>
inline To bits(From a) {
    static_assert(sizeof(To) == sizeof(From), "same width");
    To r;
    std::memcpy(&r, &a, sizeof r);
    return r;
}
template <class M, class V>
inline V select(M m, V a, V b) {
    for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(a[0])); ++i) a[i] = m[i] ? a[i] : b[i];
    return a;
}
template <class V>
inline V vmax(V a, V b) { return select(a > b, a, b); }
template <class V>
inline V vmin(V a, V b) { return select(a < b, a, b); }
template <class To, class From>
inline To convert(From a, int from = 0) {  // lanes from, from + 1, ... of a, converted
    To r;
    for (int i = 0; i < static_cast<int>(sizeof(r.v) / sizeof(r.v[0])); ++i)
        r.v[i] = static_cast<std::remove_reference_t<decltype(r.v[0])>>(a.v[i + from]);
    return r;
}
inline vd to_double(vfh a) { return convert<vd>(a); }
inline vfh to_float(vd a) { return convert<vfh>(a); }
inline vfh half_lo(vf a) { return convert<vfh>(a); }
inline vfh half_hi(vf a) { return convert<vfh>(a, ND); }
inline vf concat(vfh lo, vfh hi) {
    vf r;
    for (int i = 0; i < ND; ++i) r.v[i] = lo.v[i], r.v[i + ND] = hi.v[i];
    return r;
}

#endif

template <class V, class E>
SK_V V load(const E* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
template <class V, class E>
SK_V void store(E* p, V v) {
    std::memcpy(p, &v, sizeof v);
}
template <class V>
constexpr int lanes() { return static_cast<int>(sizeof(V) / sizeof(std::declval<V>()[0])); }

template <class V>
SK_V auto hmax(V a) -> std::remove_cv_t<std::remove_reference_t<decltype(a[0])>> {
    auto m = a[0];
    for (int i = 1; i < lanes<V>(); ++i) m = a[i] > m ? a[i] : m;
    return m;
}
template <class V>
SK_V double hsum(V a) {
    double s = 0;
    for (int i = 0; i < lanes<V>(); ++i) s += a[i];
    return s;
}
template <class M>
SK_V bool any(M m) {
    for (int i = 0; i < lanes<M>(); ++i)
        if (m[i]) return true;
    return false;
}

// exp(x) for the sweeps, vectorised, after x = n ln2 + r (float32) or x = n ln2 / 16 + r
// (float64, AVX-512: 2^(n mod 16 / 16) from a 16-entry table in two registers): a degree-6
// minimax polynomial for exp(r) on [-ln2/2, ln2/2] (relative error 8e-8, about 1.3 ulp) or
// on [-ln2/32, ln2/32] (2.2e-16); without AVX-512, float64 takes a degree-12 Taylor
// polynomial on [-ln2/2, ln2/2] (below 2e-16; 3.1e-16 with the rounding, against np.exp).
// AVX-512 scales by 2^n with vscalef; the others add n to the exponent bits.  Arguments are clamped below at -87 (-708): exp of the
// clamp, 1.7e-38 (3e-308), stands for anything smaller, so the result is never subnormal;
// `xc` returns the clamped argument.  The caller guarantees x < 88 (700): no overflow test.
// NaN is not propagated (inputs are validated).  The arithmetic runs one instruction per
// line: the pass is bound by these instructions.
SK_V vf vexp_clamped(vf x, vf& xc) {
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
    xc = vmax(x, splat<vf>(-87.0f));
    vf nm = xc * 1.44269504088896341f + magic;
    vf n = nm - magic;
    vf r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf p = splat<vf>(1.3814608100801706e-3f);
    p = p * r + 8.368710055947304e-3f;
    p = p * r + 4.166838899254799e-2f;
    p = p * r + 1.666652113199234e-1f;
    p = p * r + 4.999999403953552e-1f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
#if SK_W == 64 && defined(SK_X86)
    return (vf)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
    // times 2^n: n, the low bits of nm (those of magic shift out), added to p's exponent.
    // p * 2^n stays normal: n = -126 only where r > 0.33, so p > 1.
    return bits<vf>(bits<vi>(p) + (bits<vi>(nm) << 23));
#endif
}

#if !(SK_W == 64 && defined(SK_X86))
// x = n ln2 + r (Cody and Waite's two-part ln2), |r| <= ln2 / 2; n is also in the low bits of
// nm (for the scaling by 2^n).
SK_V vd exp_reduce(vd x, vd& nm) {
    const double magic = 6755399441055744.0;  // 1.5 * 2^52
    nm = x * 1.4426950408889634 + magic;
    const vd n = nm - magic;
    const vd r = x - n * 6.93145751953125e-1;
    return r - n * 1.42860682030941723212e-6;
}
#endif

SK_V vd vexp_clamped(vd x, vd& xc) {
    xc = vmax(x, splat<vd>(-708.0));
#if SK_W == 64 && defined(SK_X86)
    const double magic = 6755399441055744.0;  // 1.5 * 2^52
    vd nm = xc * 23.083120654223414 + magic;  // 16 / ln2
    vd n = nm - magic;
    vd r = xc - n * (6.93145751953125e-1 / 16);
    r = r - n * (1.42860682030941723212e-6 / 16);
    vd p = splat<vd>(1.3951796496087874e-3);
    p = p * r + 8.333386045338058e-3;
    p = p * r + 4.166666390347901e-2;
    p = p * r + 1.666666666786651e-1;
    p = p * r + 5.000000000000308e-1;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const __m512d t0 = _mm512_setr_pd(
        1.0, 1.0442737824274138403, 1.0905077326652576592, 1.1387886347566916537,
        1.1892071150027210667, 1.2418578120734840486, 1.2968395546510096659,
        1.3542555469368927283);
    const __m512d t1 = _mm512_setr_pd(
        1.4142135623730950488, 1.4768261459394993114, 1.5422108254079408236,
        1.6104903319492543082, 1.6817928305074290861, 1.7562521603732994831,
        1.8340080864093424635, 1.9152065613971472939);
    // the low 4 bits of nm's bits are n mod 16: the table entry; 2^floor(n / 16) by vscalef
    vd t = (vd)_mm512_permutex2var_pd(t0, (__m512i)nm, t1);
    return (vd)_mm512_scalef_pd((__m512d)(p * t), (__m512d)(n * 0.0625));
#else
    vd nm;
    const vd r = exp_reduce(xc, nm);
    // The terms from r^4 on by Estrin's scheme, the last four by Horner's: a chain of 12
    // dependent products kept so many of them waiting in the scheduler that the pass ran
    // below the multipliers' throughput; Horner's last steps keep the rounding of the sum
    // (about half an ulp) where a full Estrin tree would add one at each level.
    const vd r2 = r * r, r4 = r2 * r2;
    const vd a0 = r * (1.0 / 120.0) + 1.0 / 24.0, a1 = r * (1.0 / 5040.0) + 1.0 / 720.0;
    const vd a2 = r * (1.0 / 362880.0) + 1.0 / 40320.0;
    const vd a3 = r * (1.0 / 39916800.0) + 1.0 / 3628800.0;
    const vd b0 = a1 * r2 + a0, b1 = r4 * (1.0 / 479001600.0) + (a3 * r2 + a2);
    vd p = b1 * r4 + b0;  // sum_{k >= 4} r^(k - 4) / k!
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    return bits<vd>(bits<vl>(p) + (bits<vl>(nm) << 52));  // times 2^n, as for float32
#endif
}

// exp(x) for the passes allowed a relative plan error of kShortExpErr (see row_body): as
// vexp_clamped, but with a degree-7 polynomial for exp(r) on [-ln2/2, ln2/2] (the
// interpolant of (exp(r) - 1 - r) / r^2 at Chebyshev nodes; relative error 2.2e-10, checked
// against a long double exp over the range), about a third less work per exponential.
// AVX-512's table already leaves a short polynomial: it is vexp_clamped there.
constexpr double kShortExpErr = 3e-10;
SK_V vd vexp_short(vd x, vd& xc) {
#if SK_W == 64 && defined(SK_X86)
    return vexp_clamped(x, xc);
#else
    xc = vmax(x, splat<vd>(-708.0));
    vd nm;
    const vd r = exp_reduce(xc, nm);
    vd p = splat<vd>(1.9890988455544567e-4);
    p = p * r + 1.3933647862928863e-3;
    p = p * r + 8.333310927615311e-3;
    p = p * r + 4.1666464944505696e-2;
    p = p * r + 1.6666666681621095e-1;
    p = p * r + 5.000000013463886e-1;
    p = p * r + 1.0;
    p = p * r + 1.0;
    return bits<vd>(bits<vl>(p) + (bits<vl>(nm) << 52));
#endif
}

// exp(x) with exact zeros below the clamp and +inf above the largest finite result: for
// the plan, whose entries are returned to the user.
template <class V>
SK_V V vexp(V x) {
    using E = std::remove_cv_t<std::remove_reference_t<decltype(x[0])>>;
    constexpr bool f32 = sizeof(E) == 4;
    const E lo = f32 ? E(-87) : E(-708), hi = f32 ? E(88.7) : E(709.7);
    V xc;
    V e = vexp_clamped(vmin(x, splat<V>(hi)), xc);
    e = select(x < lo, splat<V>(E(0)), e);
    return select(x > hi, splat<V>(std::numeric_limits<E>::infinity()), e);
}

// Asks for the cache line kAhead bytes past p: the sweeps that stream X call it for every
// block of at most 64 bytes they read, so that the memory system keeps a steady run of requests in flight
// while the arithmetic runs (measured on a Xeon, 20_000 x 1_000 passes: float64 1.33 -> 0.85
// ns/entry on one thread, 0.65 -> 0.45 on two).  Past the end of X it fetches nothing useful
// and faults never.
constexpr int64_t kAhead = 4096;
SK_V void ahead(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(static_cast<const char*>(p) + kAhead, 0, 3);
#else
    (void)p;
#endif
}
