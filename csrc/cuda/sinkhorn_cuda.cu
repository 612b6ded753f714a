// CUDA twin of csrc/cpu/sinkhorn_cpu.cpp: the fused log-domain Sinkhorn pass and its helpers,
// compiled at run time by NVRTC through CuPy (src/sinkhorn_ot/_cuda/kernels.py), which pastes
// csrc/common/sinkhorn_math.h and kernel_args.cuh in place of their #includes.  No CUDA
// headers are used, so the source compiles with NVRTC alone (no toolkit on the user's machine).
//
// Layout of the work (docs/architecture.rst).  X is (N, K), row-major, read once per pass.
//  - A block owns a contiguous range of rows (blockIdx.x: one of `nrb` row blocks) and a tile
//    of columns (blockIdx.y; a single tile when K <= BT * CPT).  Thread `tid` owns the columns
//    tile0 + (j * BT + tid) * V + v, j < CPT / V, v < V (V consecutive columns per vector load),
//    and keeps g, the column sums and the column max for them in registers.
//  - Rows are processed R at a time: R * CPT values per thread in registers, one coalesced
//    load each; the R row maxima (with first argmax) and the R row sums exp(t - m) are reduced
//    over the block with warp shuffles and one shared-memory step each (two __syncthreads per
//    R rows).
//  - Column partial sums exp(t - m) * r_i are accumulated in the compute type per block and
//    written once to [nrb, K]; fused_pass_finish_kernel combines them over blocks in float64.
//  - When a row does not fit one block (K > BT * CPT), the pass runs in two launches over
//    column tiles: MODE_STATS writes per-(tile, row) max / sum / argmax, MODE_APPLY combines
//    them per row and accumulates the columns (the second read is an L2 hit for the shapes
//    where this happens, e.g. 64 x 65536).
// All indices into X are 64-bit.

#include "sinkhorn_math.h"

namespace sinkhorn_ot {
namespace cuda {

#ifndef SK_CUDA_EMULATION
extern __shared__ __align__(16) unsigned char sk_dyn_smem[];  // the pipelined pass's ring
#endif

typedef long long i64;
typedef unsigned long long u64;

#include "kernel_args.cuh"

// 16-bit storage types: bits only, converted with PTX / bit operations (no cuda_fp16.h).
struct f16_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

// ---------------------------------------------------------------------------------------------
// The only PTX in the file.  tests/cuda_emu/emu.h defines SK_CUDA_EMULATION and supplies host
// equivalents of these five primitives, so that CI (no GPU) runs the kernels on the CPU.
#ifndef SK_CUDA_EMULATION
__device__ __forceinline__ float f16_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// 2^x, one MUFU instruction; inputs and results below 2^-126 flush to 0.
__device__ __forceinline__ float ex2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// max(d, -inf): NaN becomes -inf (max.f32 returns the non-NaN operand).  PTX asm, so that no
// compiler pass folds max(d, -inf) to d.
__device__ __forceinline__ float nan_to_ninf(float d) {
    asm("max.f32 %0, %0, 0fFF800000;" : "+f"(d));
    return d;
}
// Asynchronous global -> shared copies (sm_80+).  Used by the pipelined pass: every thread
// copies its own 16-byte vectors into its own shared-memory slots and reads only those back,
// so the thread's own cp.async.wait_group is the only synchronisation needed.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int NPEND>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(NPEND) : "memory");
}
#endif  // SK_CUDA_EMULATION

__device__ __forceinline__ float bf16_to_float(unsigned short h) {
    return __uint_as_float(static_cast<unsigned>(h) << 16);
}

// Compute-type helpers.
template <class C> struct Num;
template <> struct Num<float> {
    static __device__ __forceinline__ float ninf() { return __int_as_float(0xff800000); }
    static __device__ __forceinline__ float big() { return 3.402823466e38f; }
    // exp(d) for d <= 0 (or -inf): one MUFU instruction; results below 2^-126 flush to 0,
    // as the CPU core's vexp drops them.
    static __device__ __forceinline__ float exp_(float d) {
        return ex2_ftz(d * 1.4426950408889634f);
    }
    static __device__ __forceinline__ float log_(float s) { return logf(s); }
};
template <> struct Num<double> {
    static __device__ __forceinline__ double ninf() {
        return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
    }
    static __device__ __forceinline__ double big() { return 1.7976931348623157e308; }
    static __device__ __forceinline__ double exp_(double d) { return exp(d); }
    static __device__ __forceinline__ double log_(double s) { return log(s); }
};

// ---------------------------------------------------------------------------------------------
// Accurate shifted exponent for float compute (template flag ACC of the pass and LSE kernels).
// With |t| = |alpha x + g| up to 1e7 (lam = 1e4), t rounded to float is off by up to ~1, so
// exp(t - m) would describe a different plan from the one the float64 potentials define
// (plan() computes exp(alpha x + f + g) in float64).  The row max m is still taken from plain
// float t = fmaf(alpha, x, g) (any float near the max is a valid shift: f_i uses that same m,
// exactly, in float64), but d = (alpha x + g) - m is formed from error-free transformations:
//   alpha = ahi + alo, g = ghi + glo (float pairs of the float64 values; g per column, held in
//   registers), p + pe = ahi x exactly (product + fmaf remainder), s + e = p + ghi exactly
//   (TwoSum), and s - m is exact by Sterbenz wherever exp(d) matters (s and m within 2x).
// d = (s - m) + (e + pe + alo x + glo) then carries the float32 relative precision of the
// float64 value (|error| <~ 2 ulp(d) + 2^-46 |t|).  13 FP32 instructions instead of 2, plus 2
// for the guards.  Explicit _rn intrinsics: contraction into fmaf would break TwoSum.
struct FPair {
    float hi, lo;
};
__device__ __forceinline__ FPair split_double(double v) {
    FPair r;
    r.hi = __double2float_rn(v);
    const bool fin = fabsf(r.hi) <= 3.402823466e38f;  // +-inf (padding, overflow): lo = 0
    r.lo = fin ? __double2float_rn(v - static_cast<double>(r.hi)) : 0.0f;
    return r;
}
// Upper clamp of d: m is within a few ulp(|t|) of the true row max, so d <= ~3e-7 |t|; the
// clamp only acts when |t| > ~1e8 and keeps exp(d) finite there.
constexpr float kMaxShift = 64.0f;
__device__ __forceinline__ float acc_shift(FPair a, float x, float ghi, float glo, float m) {
    const float p = __fmul_rn(a.hi, x);
    const float pe = fmaf(a.hi, x, -p);                     // a.hi x - p, exact
    const float s = __fadd_rn(p, ghi);
    const float z = __fadd_rn(s, -p);
    const float e = __fadd_rn(__fadd_rn(p, -__fadd_rn(s, -z)), __fadd_rn(ghi, -z));  // TwoSum
    const float lo = __fadd_rn(__fadd_rn(fmaf(a.lo, x, glo), pe), e);
    float d = __fadd_rn(__fadd_rn(s, -m), lo);
    // A forbidden pair (x = +-inf), a padding column (g = -inf) or an all-forbidden row
    // (m = -inf) make d NaN (inf - inf inside TwoSum): it becomes -inf, so exp(d) = 0, as in
    // the plain path.
    return fminf(nan_to_ninf(d), kMaxShift);
}

// Input-type traits: the compute type C and how to load 1 or V (16 bytes) values.
template <class T> struct In;
// float and double: stored as computed, a 16-byte vector W of them per load.
template <class F, class W> struct InNative {
    typedef F C;
    static constexpr int VEC = 16 / sizeof(F);
    static __device__ __forceinline__ void load1(const F* p, F* o) { o[0] = *p; }
    static __device__ __forceinline__ void loadv(const F* p, F* o) {
        const W v = *reinterpret_cast<const W*>(p);
        const F* e = reinterpret_cast<const F*>(&v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) o[k] = e[k];
    }
};
template <> struct In<float> : InNative<float, float4> {};
template <> struct In<double> : InNative<double, double2> {};
template <class T, float (*CVT)(unsigned short)> struct In16 {
    typedef float C;
    static constexpr int VEC = 8;
    static __device__ __forceinline__ void load1(const T* p, float* o) {
        o[0] = CVT(*reinterpret_cast<const unsigned short*>(p));
    }
    static __device__ __forceinline__ void loadv(const T* p, float* o) {
        uint4 v = *reinterpret_cast<const uint4*>(p);
        unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            o[2 * k] = CVT(static_cast<unsigned short>(w[k] & 0xffffu));
            o[2 * k + 1] = CVT(static_cast<unsigned short>(w[k] >> 16));
        }
    }
};
template <> struct In<f16_t> : In16<f16_t, f16_to_float> {};
template <> struct In<bf16_t> : In16<bf16_t, bf16_to_float> {};

// Rows i0 .. i0 + R - 1 of this thread's columns (col0[j] .. col0[j] + V - 1) into x, in the
// compute type; slots of rows >= hi or columns >= K get `fill`.
template <class T, int CPT, int R, int V>
__device__ __forceinline__ void load_rows(const T* __restrict__ X, long long K, long long i0,
                                          long long hi, const int (&col0)[CPT / V],
                                          typename In<T>::C fill,
                                          typename In<T>::C (&x)[R][CPT]) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < CPT / V; ++j) {
            if (i0 + r < hi && col0[j] < K) {
                const T* p = X + (i0 + r) * K + col0[j];
                if constexpr (V == 1) In<T>::load1(p, &x[r][j * V]);
                else In<T>::loadv(p, &x[r][j * V]);
            } else {
#pragma unroll
                for (int v = 0; v < V; ++v) x[r][j * V + v] = fill;
            }
        }
}

__device__ __forceinline__ int next_g_slot(int cur, int best) {
    return (cur != 0 && best != 0) ? 0 : ((cur != 1 && best != 1) ? 1 : 2);
}

constexpr int MODE_FUSED = 0;  // whole row in the block: stats and columns in one read
constexpr int MODE_STATS = 1;  // column-tiled, first launch: per-(tile, row) max/sum/argmax
constexpr int MODE_APPLY = 2;  // column-tiled, second launch: combine stats, accumulate columns

constexpr int NO_ARG = 0x7fffffff;

// This thread's part of the row max of t = alpha x + g (as float compute forms it: g rounded
// to the compute type), and with ARG its first column; the pass and labels_kernel share it, so
// the labels written after a solve are those its passes would write.
template <class C, int CPT, int R, int V, bool ARG>
__device__ __forceinline__ void thread_row_max(const C (&x)[R][CPT], const C (&gr)[CPT],
                                               const int (&col0)[CPT / V], C alpha, C (&m)[R],
                                               int (&a)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = Num<C>::ninf();
        a[r] = NO_ARG;
#pragma unroll
        for (int j = 0; j < CPT / V; ++j)
#pragma unroll
            for (int v = 0; v < V; ++v) {
                const C t = alpha * x[r][j * V + v] + gr[j * V + v];
                if constexpr (ARG) {
                    if (t > m[r]) { m[r] = t; a[r] = static_cast<int>(col0[j] + v); }
                } else {
                    m[r] = fmax(m[r], t);
                }
            }
    }
}

__device__ __forceinline__ i64 row_lo(i64 N, int b, int nb) { return N * b / nb; }

// Lanes that hold the per-warp results in the second step of a block reduction: a power of
// two >= the block's warps (at most MAXW), so that step takes log2(that) shuffles, not 5.
__host__ __device__ constexpr int warp_lanes(int maxw) {
    int p = 1;
    while (p < maxw) p *= 2;
    return p;
}

// Reductions over the block of R values per thread, for blocks of at most MAXW warps.  Every
// thread ends with the same results (sums are reduced in one fixed order and broadcast, so
// they are bitwise identical).
template <class C, int R, int MAXW>
__device__ __forceinline__ void block_max_arg(C (&m)[R], int (&a)[R], C* sm_m, int* sm_a) {
    constexpr int G = warp_lanes(MAXW);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            C om = __shfl_xor_sync(0xffffffffu, m[r], off);
            int oa = __shfl_xor_sync(0xffffffffu, a[r], off);
            if (om > m[r] || (om == m[r] && oa < a[r])) { m[r] = om; a[r] = oa; }
        }
        if (lane == 0) { sm_m[r * 32 + warp] = m[r]; sm_a[r * 32 + warp] = a[r]; }
    }
    __syncthreads();
    const int gl = lane & (G - 1);  // every group of G lanes reduces the same G values
#pragma unroll
    for (int r = 0; r < R; ++r) {
        C v = gl < nw ? sm_m[r * 32 + gl] : Num<C>::ninf();
        int ai = gl < nw ? sm_a[r * 32 + gl] : NO_ARG;
#pragma unroll
        for (int off = G / 2; off > 0; off >>= 1) {
            C om = __shfl_xor_sync(0xffffffffu, v, off);
            int oa = __shfl_xor_sync(0xffffffffu, ai, off);
            if (om > v || (om == v && oa < ai)) { v = om; ai = oa; }
        }
        m[r] = v;
        a[r] = ai;
    }
}

template <class C>
__device__ __forceinline__ C warp_sum_bcast(C v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return __shfl_sync(0xffffffffu, v, 0);
}

// The two operations of block_reduce.  Max: order-independent, a butterfly leaves the
// result in every lane.  Sum: lane 0 sums in a fixed order and broadcasts, so every thread
// holds the same bits (the row sums must agree across the block).  src: the lane of the
// second step that reads warp w's result.
struct MaxOp {
    template <class C> static __device__ __forceinline__ C identity() { return Num<C>::ninf(); }
    template <class C> static __device__ __forceinline__ C warp(C v) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1)
            v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
        return v;
    }
    template <int G, class C> static __device__ __forceinline__ C lanes(C v) {
#pragma unroll
        for (int off = G / 2; off > 0; off >>= 1)
            v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
        return v;
    }
    template <int G> static __device__ __forceinline__ int src(int lane) { return lane & (G - 1); }
};
struct SumOp {
    template <class C> static __device__ __forceinline__ C identity() { return C(0); }
    template <class C> static __device__ __forceinline__ C warp(C v) { return warp_sum_bcast(v); }
    template <int G, class C> static __device__ __forceinline__ C lanes(C v) {
        // lane 0 sums lanes 0 .. G - 1 (the same order as a 32-lane sweep over zeros)
#pragma unroll
        for (int off = G / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        return __shfl_sync(0xffffffffu, v, 0);
    }
    template <int G> static __device__ __forceinline__ int src(int lane) { return lane; }
};

// R values a thread reduced over the block (every thread ends with the results): within
// each warp, then over the warps' results in shared memory (sm: R * 32 values).
template <class Op, class C, int R, int MAXW>
__device__ __forceinline__ void block_reduce(C (&x)[R], C* sm) {
    constexpr int G = warp_lanes(MAXW);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const C v = Op::warp(x[r]);
        if (lane == 0) sm[r * 32 + warp] = v;
    }
    __syncthreads();
    const int sl = Op::template src<G>(lane);
#pragma unroll
    for (int r = 0; r < R; ++r)
        x[r] = Op::template lanes<G>(sl < nw ? sm[r * 32 + sl] : Op::template identity<C>());
}

// One block-wide double sum, result valid in thread 0 (used once per block).
__device__ __forceinline__ double block_sum_once(double v, double* sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_bcast(v);
    __syncthreads();  // sm may still be read by an earlier reduction
    if (lane == 0) sm[warp] = v;
    __syncthreads();
    double t = 0;
    if (threadIdx.x == 0)
        for (int w = 0; w < nw; ++w) t += sm[w];
    return t;
}


// f_i and the label of row i, in float64 as the CPU core computes them.  Not inlined: only
// one thread per row calls it, and the double-precision log would otherwise hold registers
// in the register-tile loop of every thread.
__device__ __noinline__ void write_row(double* f, i64* lab, i64 i, double loga_i, double m,
                                       double s, double rho_a, int arg) {
    f[i] = row_potential(loga_i, m, log(s), rho_a);
    if (lab) lab[i] = arg;
}

// MODE_APPLY: combine the per-tile (max, sum, argmax) of row i over the tiles, by one warp.
// Lane 0 stores the row max and log r_i (compute type) to shared memory and, when f is not
// null, writes f_i and the label.
template <class C>
__device__ __noinline__ void combine_row_stats(const C* st_m, const C* st_s, const int* st_a,
                                               i64 N, int ntiles, i64 i, double loga_i,
                                               double rho_a, double* f, i64* lab, C* out_m,
                                               C* out_logr) {
    const int lane = threadIdx.x & 31;
    const C NINF = Num<C>::ninf();
    C mm = NINF;
    int kk = NO_ARG;
    for (int k = lane; k < ntiles; k += 32) {
        const C v = st_m[static_cast<i64>(k) * N + i];
        if (v > mm) { mm = v; kk = k; }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        C om = __shfl_xor_sync(0xffffffffu, mm, off);
        int ok = __shfl_xor_sync(0xffffffffu, kk, off);
        if (om > mm || (om == mm && ok < kk)) { mm = om; kk = ok; }
    }
    double S = 0;
    for (int k = lane; k < ntiles; k += 32) {
        const C v = st_m[static_cast<i64>(k) * N + i];
        if (v != NINF)
            S += static_cast<double>(st_s[static_cast<i64>(k) * N + i]) *
                 exp(static_cast<double>(v) - static_cast<double>(mm));
    }
    S = warp_sum_bcast(S);
    if (lane == 0) {
        const double ls = log(S);
        *out_m = mm;
        *out_logr = static_cast<C>(log_row_factor(loga_i, static_cast<double>(mm), ls, rho_a));
        if (f) {
            f[i] = row_potential(loga_i, static_cast<double>(mm), ls, rho_a);
            if (lab) lab[i] = st_a[static_cast<i64>(kk) * N + i];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The pass, in stages (each force-inlined into pass_body, so the stages cost no calls and the
// compiler sees one loop).  g = gslots + K * state->g_cur; f and labels go to slot
// 1 - state->f_best of fslots / labslots (stride N).  Outputs: colpart / cmpart [nrb, K]
// (compute type), qxpart [gridDim.y * nrb] (MODE_FUSED / MODE_APPLY); st_m / st_s / st_a
// [ntiles, N] (MODE_STATS).
//
// S = 0: each row group is loaded straight into registers when its turn comes (so a block has
// no loads in flight while it reduces).  S >= 2 (pipelined, MODE_FUSED, V = 16-byte vectors):
// an S-stage ring of row groups in dynamic shared memory ([S][R][BT * CPT] of T) filled with
// cp.async, S - 1 groups ahead of the one being reduced; loga of the group is loaded early too.
//
// d = t - m and exp(d) are computed once per element, in the sum step; MODE_FUSED keeps exp(d)
// in place of x for the column step (the sum Q X is accumulated in the sum step as
// r_i sum_y exp(d_y) x_iy).  ACC (float compute only; ignored for float64): d from acc_shift
// (accurate); ACC = false: t = fmaf(alpha, x, g) in float (fewer instructions, less exact).
// MAXW: the most warps a block of this kernel has (sets the second step of the reductions).
// LAB = false (MODE_FUSED): no labels (the row max alone, cheaper); the device loop writes the
// labels of its best pass with labels_kernel afterwards, or runs its last pass with LAB.

// This thread's columns: col0[j] + v for its vectors j < NV, v < V; g rounded to the compute
// type (EFT: g = gr + glo, a float pair); g = -inf marks a padding column (t = -inf there).
template <class C, int CPT, int V, bool EFT>
__device__ __forceinline__ void thread_columns(const double* __restrict__ g, i64 K, int tile0,
                                               int tid, int BT, int (&col0)[CPT / V],
                                               C (&gr)[CPT], float (&glo)[EFT ? CPT : 1],
                                               C (&csum)[CPT], C (&cmax)[CPT]) {
    constexpr int NV = CPT / V;
    const C NINF = Num<C>::ninf();
#pragma unroll
    for (int j = 0; j < NV; ++j) {
        col0[j] = tile0 + (j * BT + tid) * V;
#pragma unroll
        for (int v = 0; v < V; ++v) {
            const i64 c = col0[j] + v;
            if constexpr (EFT) {
                const FPair gp = split_double(c < K ? g[c] : static_cast<double>(NINF));
                gr[j * V + v] = gp.hi;
                glo[j * V + v] = gp.lo;
            } else {
                gr[j * V + v] = c < K ? static_cast<C>(g[c]) : NINF;
            }
            csum[j * V + v] = C(0);
            cmax[j * V + v] = NINF;
        }
    }
}

// Pipelined loads: start copying this thread's vectors of rows ig .. ig + R - 1 (those below
// hi) into ring stage `st`, as one cp.async group (empty past the end).
template <class T, int CPT, int R, int V>
__device__ __forceinline__ void ring_fetch(T* ring, int W, const T* __restrict__ X, i64 K,
                                           i64 hi, int tile0, const int (&col0)[CPT / V],
                                           int st, i64 ig) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < CPT / V; ++j)
            if (ig + r < hi && col0[j] < K)
                cp_async16(ring + (st * R + r) * W + (col0[j] - tile0),
                           X + (ig + r) * K + col0[j]);
    cp_async_commit();
}

// The row group at i0 from ring slot `slot` into registers (zeros past the block's rows and
// the row's end).
template <class T, class C, int CPT, int R, int V>
__device__ __forceinline__ void ring_read(const T* ring, int W, i64 K, i64 i0, i64 hi,
                                          int tile0, const int (&col0)[CPT / V], int slot,
                                          C (&x)[R][CPT]) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < CPT / V; ++j) {
            if (i0 + r < hi && col0[j] < K) {
                In<T>::loadv(ring + (slot * R + r) * W + (col0[j] - tile0), &x[r][j * V]);
            } else {
#pragma unroll
                for (int v = 0; v < V; ++v) x[r][j * V + v] = C(0);
            }
        }
}

// Row sums s = sum_y exp(d_y), d = t - m, of the R rows (rows past hi are shifted by +inf:
// d = -inf, they add nothing).  MODE_FUSED also keeps exp(d) in place of x, the column max of
// d and xs = sum_y exp(d_y) x_iy (sum Q X / r_i).
template <class C, int CPT, int R, int MODE, bool EFT>
__device__ __forceinline__ void row_sums(C (&x)[R][CPT], const C (&gr)[CPT],
                                         const float (&glo)[EFT ? CPT : 1], C alpha,
                                         FPair apair, const C (&m)[R], i64 i0, i64 hi,
                                         C (&s)[R], C (&xs)[R], C (&cmax)[CPT]) {
    const C NINF = Num<C>::ninf(), BIG = Num<C>::big();
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const C ms = i0 + r >= hi ? -NINF : (m[r] == NINF ? C(0) : m[r]);
        s[r] = C(0);
        xs[r] = C(0);
#pragma unroll
        for (int k = 0; k < CPT; ++k) {
            C d;
            if constexpr (EFT) d = acc_shift(apair, x[r][k], gr[k], glo[k], ms);
            else d = alpha * x[r][k] + gr[k] - ms;
            const C e = Num<C>::exp_(d);
            s[r] += e;
            if (MODE == MODE_FUSED) {
                // forbidden entries (e = 0, x = +-inf): clamp x to finite
                xs[r] += e * fmin(fmax(x[r][k], -BIG), BIG);
                cmax[k] = fmax(cmax[k], d);  // max_i d_iy
                x[r][k] = e;  // x is not needed again: keep exp(d) in its place
            }
        }
    }
}

// log r_i of the R rows in the compute type (identical in every thread); thread 0 of the
// writing tile writes f_i (and the label) in float64 as the CPU core does.
template <class C, int R, int S>
__device__ __forceinline__ void row_factors(const C (&m)[R], const C (&s)[R], const int (&a)[R],
                                            const double (&la_g)[R],
                                            const double* __restrict__ loga, double rho_a,
                                            i64 i0, i64 hi, bool write, double* f, i64* lab,
                                            C (&rowm)[R], C (&logr)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const i64 i = i0 + r;
        rowm[r] = m[r];
        logr[r] = Num<C>::ninf();
        if (i < hi) {
            const double la = S > 0 ? la_g[r] : loga[i];
            logr[r] = static_cast<C>(
                log_row_factor(la, static_cast<double>(m[r]),
                               static_cast<double>(Num<C>::log_(s[r])), rho_a));
            if (write)
                write_row(f, lab, i, la, static_cast<double>(m[r]), static_cast<double>(s[r]),
                          rho_a, a[r]);
        }
    }
}

// Column contributions of the R rows: Q_iy = exp(d) r_i into the column sums, the column max
// of log Q (MODE_APPLY; MODE_FUSED bounds it by max d + max log r), and sum Q X.
template <class C, int CPT, int R, int MODE, bool EFT>
__device__ __forceinline__ C column_step(const C (&x)[R][CPT], const C (&gr)[CPT],
                                         const float (&glo)[EFT ? CPT : 1], C alpha,
                                         FPair apair, const C (&rowm)[R], const C (&logr)[R],
                                         const C (&xs)[R], i64 i0, i64 hi, C (&csum)[CPT],
                                         C (&cmax)[CPT], C& lrmax) {
    const C NINF = Num<C>::ninf(), BIG = Num<C>::big();
    C qxl = C(0);
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (i0 + r >= hi) continue;  // uniform over the block
        const C ms = rowm[r] == NINF ? C(0) : rowm[r];
        const C rr = Num<C>::exp_(logr[r]);
        if constexpr (MODE == MODE_FUSED) {
#pragma unroll
            for (int k = 0; k < CPT; ++k) csum[k] = fma(x[r][k], rr, csum[k]);  // x: exp(d)
            qxl += xs[r] * rr;
            lrmax = fmax(lrmax, logr[r]);
        } else {  // MODE_APPLY: x still holds the input
#pragma unroll
            for (int k = 0; k < CPT; ++k) {
                C d;
                if constexpr (EFT) d = acc_shift(apair, x[r][k], gr[k], glo[k], ms);
                else d = alpha * x[r][k] + gr[k] - ms;
                const C q = Num<C>::exp_(d) * rr;
                csum[k] += q;
                cmax[k] = fmax(cmax[k], d + logr[r]);
                // forbidden entries (q = 0, x = +-inf) add nothing: clamp x to finite
                qxl += q * fmin(fmax(x[r][k], -BIG), BIG);
            }
        }
    }
    return qxl;
}

// This block's column partials (the tiles of one row block cover disjoint columns) and its
// sum Q X.
template <class C, int CPT, int V, int MODE>
__device__ __forceinline__ void write_partials(C* __restrict__ colpart, C* __restrict__ cmpart,
                                               double* __restrict__ qxpart, i64 K,
                                               const int (&col0)[CPT / V], const C (&csum)[CPT],
                                               const C (&cmax)[CPT], C lrmax, double qx,
                                               double* sm_q) {
    C* __restrict__ cp = colpart + static_cast<i64>(blockIdx.x) * K;
    C* __restrict__ cm = cmpart + static_cast<i64>(blockIdx.x) * K;
#pragma unroll
    for (int j = 0; j < CPT / V; ++j)
#pragma unroll
        for (int v = 0; v < V; ++v) {
            const i64 c = col0[j] + v;
            if (c < K) {
                cp[c] = csum[j * V + v];
                cm[c] = MODE == MODE_FUSED ? cmax[j * V + v] + lrmax : cmax[j * V + v];
            }
        }
    const double qb = block_sum_once(qx, sm_q);
    if (threadIdx.x == 0) qxpart[static_cast<i64>(blockIdx.y) * gridDim.x + blockIdx.x] = qb;
}

template <class T, int CPT, int R, int V, int MODE, int S, bool ACC, int MAXW, bool LAB>
__device__ __forceinline__ void
pass_body(const T* __restrict__ X, i64 N, i64 K, double alpha_d,
          const double* __restrict__ gslots, const double* __restrict__ loga, double rho_a,
          double* __restrict__ fslots, i64* __restrict__ labslots,
          typename In<T>::C* __restrict__ colpart, typename In<T>::C* __restrict__ cmpart,
          double* __restrict__ qxpart, typename In<T>::C* __restrict__ st_m,
          typename In<T>::C* __restrict__ st_s, int* __restrict__ st_a,
          const State* __restrict__ state) {
    typedef typename In<T>::C C;
    static_assert(CPT % V == 0, "CPT must be a multiple of V");
    static_assert(S == 0 || (S >= 2 && MODE == MODE_FUSED && V * sizeof(T) == 16),
                  "the pipelined pass needs 16-byte vectors and MODE_FUSED");
    if (state->done) return;
    const int tid = threadIdx.x, BT = blockDim.x;
    const int nrb = gridDim.x, ntiles = gridDim.y;
    const i64 lo = row_lo(N, blockIdx.x, nrb), hi = row_lo(N, blockIdx.x + 1, nrb);
    const int tile0 = static_cast<int>(blockIdx.y) * BT * CPT;
    const int fw = 1 - state->f_best;
    double* __restrict__ f = fslots + N * fw;
    constexpr bool ARG = LAB || MODE == MODE_STATS;  // track the first argmax of each row
    i64* __restrict__ lab = (LAB && labslots) ? labslots + N * fw : nullptr;
    const bool writer = blockIdx.y == 0;  // one tile writes f and the labels of each row
    const C alpha = static_cast<C>(alpha_d);
    constexpr bool EFT = ACC && sizeof(C) == 4;
    const FPair apair = split_double(alpha_d);

    __shared__ C sm_m[R * 32];
    __shared__ int sm_a[R * 32];
    __shared__ C sm_s[R * 32];
    __shared__ C sm_rowm[2][R];
    __shared__ C sm_logr[2][R];
    __shared__ double sm_q[32];

    int col0[CPT / V];  // column indices fit in int (K < 2^31 - 2^14, checked on the host)
    C gr[CPT], csum[CPT], cmax[CPT];
    float glo[EFT ? CPT : 1];
    thread_columns<C, CPT, V, EFT>(gslots + K * state->g_cur, K, tile0, tid, BT, col0, gr, glo,
                                   csum, cmax);
    double qx = 0;
    // MODE_FUSED: cmax holds max_i d_iy (d = t - m of the row) and lrmax = max_i log r_i over
    // the block's rows; their sum bounds max_i log Q_iy from above (by at most
    // max_i log s_i <= log K), which is all next_g needs of it, and saves an exponential and
    // two instructions an entry in the column step.
    C lrmax = Num<C>::ninf();

    T* const ring = reinterpret_cast<T*>(sk_dyn_smem);  // S stages of R rows
    const int W = BT * CPT;                              // elements of one row slot
    if constexpr (S > 0) {
#pragma unroll
        for (int st = 0; st < S - 1; ++st)
            ring_fetch<T, CPT, R, V>(ring, W, X, K, hi, tile0, col0, st,
                                     lo + static_cast<i64>(st) * R);
    }
    int grp = 0;
    for (i64 i0 = lo; i0 < hi; i0 += R, ++grp) {
        C x[R][CPT];
        double la_g[R];  // loga of the group (pipelined variant: loaded before the reductions)
        if constexpr (S == 0) {
            load_rows<T, CPT, R, V>(X, K, i0, hi, col0, C(0), x);
        } else {
#pragma unroll
            for (int r = 0; r < R; ++r) la_g[r] = i0 + r < hi ? loga[i0 + r] : 0.0;
            cp_async_wait<S - 2>();  // this thread's copies of group grp have landed
            ring_read<T, C, CPT, R, V>(ring, W, K, i0, hi, tile0, col0, grp % S, x);
            // Refill the slot read in the previous step (its values are consumed: the step
            // finished with them) with group grp + S - 1.
            ring_fetch<T, CPT, R, V>(ring, W, X, K, hi, tile0, col0, (grp + S - 1) % S,
                                     i0 + static_cast<i64>(S - 1) * R);
        }
        C rowm[R], logr[R];
        C xs[R];  // MODE_FUSED: sum_y exp(d_y) x_iy of this thread (sum Q X / r_i)
        if (MODE != MODE_APPLY) {
            C m[R];  // row max and (ARG) its first column
            int a[R];
            thread_row_max<C, CPT, R, V, ARG>(x, gr, col0, alpha, m, a);
            if constexpr (ARG) block_max_arg<C, R, MAXW>(m, a, sm_m, sm_a);
            else block_reduce<MaxOp, C, R, MAXW>(m, sm_m);
            C s[R];
            row_sums<C, CPT, R, MODE, EFT>(x, gr, glo, alpha, apair, m, i0, hi, s, xs, cmax);
            block_reduce<SumOp, C, R, MAXW>(s, sm_s);
            if (MODE == MODE_STATS) {
                if (tid == 0)
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        const i64 i = i0 + r;
                        if (i < hi) {
                            const i64 o = static_cast<i64>(blockIdx.y) * N + i;
                            st_m[o] = m[r];
                            st_s[o] = s[r];
                            st_a[o] = a[r];
                        }
                    }
                continue;
            }
            row_factors<C, R, S>(m, s, a, la_g, loga, rho_a, i0, hi, tid == 0 && writer, f, lab,
                                 rowm, logr);
        } else {
            // Combine the per-tile statistics of each row: warp r handles row i0 + r.
            const int lane = tid & 31, warp = tid >> 5, nw = BT >> 5;
            const int buf = grp & 1;
            for (int r = warp; r < R; r += nw) {
                const i64 i = i0 + r;
                if (i >= hi) {
                    if (lane == 0) {
                        sm_rowm[buf][r] = Num<C>::ninf();
                        sm_logr[buf][r] = Num<C>::ninf();
                    }
                    continue;
                }
                combine_row_stats<C>(st_m, st_s, st_a, N, ntiles, i, loga[i], rho_a,
                                     writer ? f : nullptr, lab, &sm_rowm[buf][r],
                                     &sm_logr[buf][r]);
            }
            __syncthreads();
#pragma unroll
            for (int r = 0; r < R; ++r) {
                rowm[r] = sm_rowm[buf][r];
                logr[r] = sm_logr[buf][r];
            }
        }
        qx += static_cast<double>(column_step<C, CPT, R, MODE, EFT>(
            x, gr, glo, alpha, apair, rowm, logr, xs, i0, hi, csum, cmax, lrmax));
    }
    if constexpr (S > 0) cp_async_wait<0>();  // nothing is left in flight (empty groups)
    if (MODE == MODE_STATS) return;
    write_partials<C, CPT, V, MODE>(colpart, cmpart, qxpart, K, col0, csum, cmax, lrmax, qx,
                                    sm_q);
}

// The kernels take their arguments as one PassArgs (kernel_args.cuh), unpacked here into the
// typed parameters of pass_body.
#define SK_PASS_ARGS(a)                                                                       \
    static_cast<const T*>(a.X), a.N, a.K, a.alpha, a.gslots, a.loga, a.rho_a, a.fslots,       \
        a.labslots, static_cast<typename In<T>::C*>(a.colpart),                               \
        static_cast<typename In<T>::C*>(a.cmpart), a.qxpart,                                   \
        static_cast<typename In<T>::C*>(a.st_m), static_cast<typename In<T>::C*>(a.st_s),     \
        a.st_a, a.state

// The direct pass: rows loaded into registers as their turn comes.
template <class T, int CPT, int R, int V, int MODE, bool ACC, bool LAB>
__global__ void __launch_bounds__(512) fused_pass_kernel(const PassArgs a) {
    pass_body<T, CPT, R, V, MODE, 0, ACC, 16, LAB>(SK_PASS_ARGS(a));
}

// Pipelined pass (MODE_FUSED): S-stage cp.async ring in dynamic shared memory (S * R * BT *
// CPT * sizeof(T) bytes, set by the launch), at most MAXT threads, MINB blocks per SM asked of
// the register allocator.
template <class T, int CPT, int R, int S, int MAXT, int MINB, bool ACC, bool LAB>
__global__ void __launch_bounds__(MAXT, MINB) fused_pass_pipe_kernel(const PassArgs a) {
    pass_body<T, CPT, R, 16 / sizeof(T), MODE_FUSED, S, ACC, MAXT / 32, LAB>(SK_PASS_ARGS(a));
}
#undef SK_PASS_ARGS

// ---------------------------------------------------------------------------------------------
// Reduce the pass partials over row blocks (float64), apply next_g, measure the column error;
// the last block to finish sums the error and sum Q X and advances the loop state.
// 256 threads: 32 columns x 8 slices of row blocks.
template <class C>
__global__ void __launch_bounds__(256)
fused_pass_finish_kernel(const FinishArgs a) {
    const C* __restrict__ colpart = static_cast<const C*>(a.colpart);
    const C* __restrict__ cmpart = static_cast<const C*>(a.cmpart);
    const double* __restrict__ qxpart = a.qxpart;
    double* __restrict__ gslots = a.gslots;
    const double* __restrict__ logb = a.logb;
    double* __restrict__ errpart = a.errpart;
    double* __restrict__ col_out = a.col_out;
    double* __restrict__ colmax_out = a.colmax_out;
    State* state = a.state;
    const i64 K = a.K;
    const double log_n_rows = a.log_n_rows, rho_b = a.rho_b, tol = a.tol;
    const int nrb = a.nrb, nq = a.nq, fixed = a.fixed;
    if (state->done) return;
    const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
    const int gc = state->g_cur, gb = state->g_best, gn = next_g_slot(gc, gb);
    const i64 y = static_cast<i64>(blockIdx.x) * 32 + lane;
    __shared__ double sm_s[8][32];
    __shared__ double sm_m[8][32];
    __shared__ int sm_last;
    double s = 0, mx = static_cast<double>(Num<C>::ninf());
    if (y < K) {
        for (int b = slice; b < nrb; b += 8) {
            s += static_cast<double>(colpart[static_cast<i64>(b) * K + y]);
            mx = fmax(mx, static_cast<double>(cmpart[static_cast<i64>(b) * K + y]));
        }
    }
    sm_s[slice][lane] = s;
    sm_m[slice][lane] = mx;
    __syncthreads();
    if (slice == 0) {
        double col = 0, cmx = mx;
        for (int k = 0; k < 8; ++k) {
            col += sm_s[k][lane];
            cmx = fmax(cmx, sm_m[k][lane]);
        }
        double e = 0;
        if (y < K) {
            const double gy = gslots[gc * K + y], lb = logb[y];
            e = fabs(col - column_target(lb, gy, rho_b));
            gslots[gn * K + y] = next_g(gy, lb, col, cmx, log_n_rows, rho_b);
            if (col_out) { col_out[y] = col; colmax_out[y] = cmx; }
        }
        e = warp_sum_bcast(e);
        if (lane == 0) errpart[blockIdx.x] = e;
    }
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned ticket = atomicAdd(&state->counter, 1u);
        sm_last = ticket == gridDim.x - 1;
    }
    __syncthreads();
    if (!sm_last || slice != 0) return;
    __threadfence();
    const volatile double* ep = errpart;
    double err = 0, q = 0;
    for (int k = lane; k < static_cast<int>(gridDim.x); k += 32) err += ep[k];
    for (int k = lane; k < nq; k += 32) q += qxpart[k];
    err = warp_sum_bcast(err);
    q = warp_sum_bcast(q);
    if (lane == 0) {
        const int it = state->it + 1;
        const bool finite = fabs(err) <= 1.7976931348623157e308;
        // As _solver.sinkhorn_loop: keep the best pass (always the last one in fixed mode).
        if (state->it == 0 || err <= state->best_err || fixed) {
            state->best_err = err;
            state->best_qx = q;
            state->f_best = 1 - state->f_best;
            state->g_best = gc;
        }
        const bool stop = (!fixed && err <= tol) || !finite;
        if (!stop) state->g_cur = gn;
        state->it = it;
        if (stop) state->done = 1;
        state->counter = 0;
        __threadfence();
    }
}

// ---------------------------------------------------------------------------------------------
// Column log-sum-exp partials: per row block and column, (M, Z) with Z exp(M) = sum so far of
// exp(alpha X_iy + f_i).  Same column layout as the pass (grid.y = column tiles).
// ACC (float compute): M is the running max of plain float u = fmaf(alpha, x, f_i) and Z sums
// exp(acc_shift(u - M)), so L = M + log Z keeps the float64 precision of alpha x + f_i (the
// first g at lam = 1e4 would otherwise be off by ~1).
template <class T, int CPT, int V, bool ACC = true>
__global__ void __launch_bounds__(512)
column_lse_kernel(const T* __restrict__ X, i64 N, i64 K, double alpha_d,
                  const double* __restrict__ f, typename In<T>::C* __restrict__ Mpart,
                  typename In<T>::C* __restrict__ Zpart) {
    typedef typename In<T>::C C;
    constexpr bool EFT = ACC && sizeof(C) == 4;
    const FPair apair = split_double(alpha_d);
    constexpr int NV = CPT / V;
    constexpr int R = CPT >= 16 ? 1 : 16 / CPT;
    const int tid = threadIdx.x, BT = blockDim.x, nrb = gridDim.x;
    const i64 lo = row_lo(N, blockIdx.x, nrb), hi = row_lo(N, blockIdx.x + 1, nrb);
    const int tile0 = static_cast<int>(blockIdx.y) * BT * CPT;
    const C alpha = static_cast<C>(alpha_d);
    const C NINF = Num<C>::ninf();
    int col0[NV];  // column indices fit in int (K < 2^31 - 2^14, checked on the host)
    C M[CPT], Z[CPT];
#pragma unroll
    for (int j = 0; j < NV; ++j) col0[j] = tile0 + (j * BT + tid) * V;
#pragma unroll
    for (int k = 0; k < CPT; ++k) { M[k] = NINF; Z[k] = C(0); }
    for (i64 i0 = lo; i0 < hi; i0 += R) {
        C x[R][CPT];
        C fi[R];
        float flo[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const i64 i = i0 + r;
            const FPair fp = split_double((f && i < hi) ? f[i] : 0.0);
            fi[r] = EFT ? fp.hi : ((f && i < hi) ? static_cast<C>(f[i]) : C(0));
            flo[r] = fp.lo;
        }
        load_rows<T, CPT, R, V>(X, K, i0, hi, col0, C(0), x);  // padding is never written out
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (i0 + r >= hi) continue;
#pragma unroll
            for (int k = 0; k < CPT; ++k) {
                if constexpr (EFT) {
                    const float u = fmaf(apair.hi, x[r][k], fi[r]);  // picks the shift only
                    if (u > M[k]) {
                        Z[k] = (M[k] == NINF) ? 0.0f : Z[k] * Num<float>::exp_(M[k] - u);
                        M[k] = u;
                    }
                    // forbidden (u = -inf): d = -inf, adds 0; M = -inf only if u = -inf too
                    Z[k] += Num<float>::exp_(acc_shift(apair, x[r][k], fi[r], flo[r], M[k]));
                } else {
                    const C u = alpha * x[r][k] + fi[r];
                    // u = -inf (forbidden) adds nothing; padding columns are never written out.
                    if (u > M[k]) {
                        Z[k] = (M[k] == NINF) ? C(1) : Z[k] * Num<C>::exp_(M[k] - u) + C(1);
                        M[k] = u;
                    } else if (u != NINF) {
                        Z[k] += Num<C>::exp_(u - M[k]);
                    }
                }
            }
        }
    }
    C* mp = Mpart + static_cast<i64>(blockIdx.x) * K;
    C* zp = Zpart + static_cast<i64>(blockIdx.x) * K;
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
        for (int v = 0; v < V; ++v) {
            const i64 c = col0[j] + v;
            if (c < K) { mp[c] = M[j * V + v]; zp[c] = Z[j * V + v]; }
        }
}

__device__ __forceinline__ void init_state(State* st) {
    st->done = 0;
    st->it = 0;
    st->f_best = 1;
    st->g_cur = 0;
    st->g_best = 0;
    st->counter = 0;
    st->pad0 = st->pad1 = 0;
    st->best_err = 0;
    st->best_qx = 0;
    st->pad3 = 0;
    st->pad2 = 0;
}

// L_y = log sum_i exp(alpha X_iy + f_i) from the partials; optionally g_y = rho_b (logb_y - L_y)
// into g_out, and (block 0) a fresh loop state.  256 threads: 32 columns x 8 slices.
template <class C>
__global__ void __launch_bounds__(256)
column_lse_finish_kernel(const C* __restrict__ Mpart, const C* __restrict__ Zpart, int nrb,
                         i64 K, double* __restrict__ L_out, const double* __restrict__ logb,
                         double rho_b, double* __restrict__ g_out, State* state) {
    const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
    const i64 y = static_cast<i64>(blockIdx.x) * 32 + lane;
    const double NINF = Num<double>::ninf();
    __shared__ double sm_M[8][32];
    __shared__ double sm_Z[8][32];
    double M = NINF, Z = 0;
    if (y < K) {
        for (int b = slice; b < nrb; b += 8) {
            const double mb = static_cast<double>(Mpart[static_cast<i64>(b) * K + y]);
            const double zb = static_cast<double>(Zpart[static_cast<i64>(b) * K + y]);
            if (mb == NINF) continue;
            if (mb > M) { Z = Z * exp(M - mb) + zb; M = mb; }  // exp(-inf) = 0 when M = -inf
            else Z += zb * exp(mb - M);
        }
    }
    sm_M[slice][lane] = M;
    sm_Z[slice][lane] = Z;
    __syncthreads();
    if (slice == 0 && y < K) {
        double mx = NINF;
        for (int k = 0; k < 8; ++k) mx = fmax(mx, sm_M[k][lane]);
        double z = 0;
        if (mx != NINF)
            for (int k = 0; k < 8; ++k)
                if (sm_M[k][lane] != NINF) z += sm_Z[k][lane] * exp(sm_M[k][lane] - mx);
        const double L = mx + log(z);  // -inf for a column with every entry forbidden
        if (L_out) L_out[y] = L;
        if (g_out) g_out[y] = rho_b * (logb[y] - L);
    }
    if (state && blockIdx.x == 0 && threadIdx.x == 0) init_state(state);
}

// Loop state plus a copy of the initial g (warm start) into g slot 0.
__global__ void start_kernel(const double* __restrict__ g0, double* __restrict__ g_out, i64 K,
                             State* state) {
    const i64 y = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (g0 && y < K) g_out[y] = g0[y];
    if (state && blockIdx.x == 0 && threadIdx.x == 0) init_state(state);
}

// Stand-alone column update (the backend primitive column_update): next g and |col - target|.
__global__ void column_update_kernel(const double* __restrict__ g, const double* __restrict__ logb,
                                     const double* __restrict__ col,
                                     const double* __restrict__ colmax, i64 K,
                                     double log_n_rows, double rho_b, double* __restrict__ g_next,
                                     double* __restrict__ err_terms) {
    const i64 y = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (y >= K) return;
    err_terms[y] = fabs(col[y] - column_target(logb[y], g[y], rho_b));
    g_next[y] = next_g(g[y], logb[y], col[y], colmax[y], log_n_rows, rho_b);
}

// ---------------------------------------------------------------------------------------------
// Validation scan (same answers as cpu::check_matrix): first invalid flat index (NaN or the
// wrong infinity), rows / columns with at least one allowed entry, max |finite entry|.
template <class T, int CPT, int V>
__global__ void __launch_bounds__(512)
check_matrix_kernel(const T* __restrict__ X, i64 N, i64 K, double forbidden_d,
                    u64* __restrict__ first_invalid, unsigned char* __restrict__ row_ok,
                    unsigned char* __restrict__ col_ok, u64* __restrict__ max_bits) {
    typedef typename In<T>::C C;
    constexpr int NV = CPT / V;
    const int tid = threadIdx.x, BT = blockDim.x, nrb = gridDim.x, lane = tid & 31;
    const i64 lo = row_lo(N, blockIdx.x, nrb), hi = row_lo(N, blockIdx.x + 1, nrb);
    const int tile0 = static_cast<int>(blockIdx.y) * BT * CPT;
    const C forb = static_cast<C>(forbidden_d), BIG = Num<C>::big();
    int col0[NV];  // column indices fit in int (K < 2^31 - 2^14, checked on the host)
    bool ok[CPT];
#pragma unroll
    for (int j = 0; j < NV; ++j) col0[j] = tile0 + (j * BT + tid) * V;
#pragma unroll
    for (int k = 0; k < CPT; ++k) ok[k] = false;
    C mx = C(0);
    u64 bad_first = ~0ULL;
    constexpr int R = CPT >= 16 ? 1 : 16 / CPT;  // rows loaded before any is examined
    for (i64 i0 = lo; i0 < hi; i0 += R) {
        C x[R][CPT];
        load_rows<T, CPT, R, V>(X, K, i0, hi, col0, forb, x);  // forb: not bad, not allowed
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const i64 i = i0 + r;
            bool any = false;
#pragma unroll
            for (int j = 0; j < NV; ++j)
#pragma unroll
                for (int v = 0; v < V; ++v) {
                    const C xv = x[r][j * V + v];
                    const C a = fabs(xv);
                    const bool fin = a <= BIG;
                    const bool allowed = xv != forb;
                    if (!(fin || !allowed) && bad_first == ~0ULL)
                        bad_first = static_cast<u64>(i * K + col0[j] + v);
                    any |= allowed;
                    ok[j * V + v] |= allowed;
                    mx = fmax(mx, fin ? a : C(0));
                }
            const bool wany = __any_sync(0xffffffffu, any);
            if (lane == 0 && wany && i < hi) row_ok[i] = 1;
        }
    }
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
        for (int v = 0; v < V; ++v)
            if (col0[j] + v < K && ok[j * V + v]) col_ok[col0[j] + v] = 1;
    if (bad_first != ~0ULL) atomicMin(first_invalid, bad_first);
    double m = static_cast<double>(mx);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (lane == 0 && m > 0) atomicMax(max_bits, static_cast<u64>(__double_as_longlong(m)));
}

// The check's result words: [first invalid flat index, first empty row, first empty column]
// (~0 = none, atomicMin) and the bits of max |finite entry| (0 = none, atomicMax).
__global__ void check_matrix_init_kernel(u64* __restrict__ res) {
    if (threadIdx.x < 3) res[threadIdx.x] = ~0ULL;
    else if (threadIdx.x == 3) res[3] = 0ULL;
}

// First row / column without an allowed entry (the flags written by check_matrix_kernel) into
// res[1] / res[2], so that the host reads the whole check back in one 32-byte copy.
__global__ void check_matrix_finish_kernel(const unsigned char* __restrict__ row_ok, i64 N,
                                    const unsigned char* __restrict__ col_ok, i64 K,
                                    u64* __restrict__ res) {
    const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
    const i64 t = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    u64 fr = ~0ULL, fc = ~0ULL;
    for (i64 i = t; i < N; i += stride)
        if (!row_ok[i]) { fr = static_cast<u64>(i); break; }  // increasing i: the first
    for (i64 i = t; i < K; i += stride)
        if (!col_ok[i]) { fc = static_cast<u64>(i); break; }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const u64 o1 = __shfl_xor_sync(0xffffffffu, fr, off);
        const u64 o2 = __shfl_xor_sync(0xffffffffu, fc, off);
        fr = o1 < fr ? o1 : fr;
        fc = o2 < fc ? o2 : fc;
    }
    if ((threadIdx.x & 31) == 0) {
        if (fr != ~0ULL) atomicMin(res + 1, fr);
        if (fc != ~0ULL) atomicMin(res + 2, fc);
    }
}

// ---------------------------------------------------------------------------------------------
// Labels: the first argmax over y of alpha X_iy + g_y, with t formed exactly as the pass forms
// it (float compute: t = alpha x + float(g)), so the labels are those a pass with LAB at this g
// writes.  For the device loop's best pass, run after the loop (its passes skip the argmax).
// Same column layout as the single-tile pass: CPT columns a thread, R rows at a time.
template <class T, int CPT, int R, int V>
__global__ void __launch_bounds__(512)
labels_kernel(const T* __restrict__ X, i64 N, i64 K, double alpha_d,
              const double* __restrict__ g, i64* __restrict__ lab) {
    typedef typename In<T>::C C;
    constexpr int NV = CPT / V;
    const int tid = threadIdx.x, BT = blockDim.x, nrb = gridDim.x;
    const i64 lo = row_lo(N, blockIdx.x, nrb), hi = row_lo(N, blockIdx.x + 1, nrb);
    const C alpha = static_cast<C>(alpha_d);
    const C NINF = Num<C>::ninf();
    __shared__ C sm_m[R * 32];
    __shared__ int sm_a[R * 32];
    int col0[NV];
    C gr[CPT];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
        col0[j] = (j * BT + tid) * V;
#pragma unroll
        for (int v = 0; v < V; ++v) {
            const i64 c = col0[j] + v;
            gr[j * V + v] = c < K ? static_cast<C>(g[c]) : NINF;
        }
    }
    for (i64 i0 = lo; i0 < hi; i0 += R) {
        C x[R][CPT];
        load_rows<T, CPT, R, V>(X, K, i0, hi, col0, C(0), x);
        C m[R];
        int a[R];
        thread_row_max<C, CPT, R, V, true>(x, gr, col0, alpha, m, a);
        block_max_arg<C, R, 16>(m, a, sm_m, sm_a);
        if (tid == 0)
#pragma unroll
            for (int r = 0; r < R; ++r)
                if (i0 + r < hi) lab[i0 + r] = a[r];
        __syncthreads();  // sm_m / sm_a are reused by the next group
    }
}

// ---------------------------------------------------------------------------------------------
// Ties of the labels, for the host's tie-break (sinkhorn_ot._hard.tie_break): the number of
// columns of row i whose score alpha X_iy + g_y, formed in float64 as the host forms it, is
// within tau + 1e-12 (1 + |best|) of the row's best.  Rows with two or more tie; the host
// reads how many there are (one read) and, only when some do, those rows.  One warp a row,
// every lane of a warp on the same row (the shuffles are warp-uniform).
template <class T>
__global__ void tie_count_kernel(const T* __restrict__ X, i64 N, i64 K, double alpha,
                                 const double* __restrict__ g, double tau,
                                 int* __restrict__ count) {
    typedef typename In<T>::C C;
    const int lane = threadIdx.x & 31;
    const i64 w0 = (static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const i64 nw = (static_cast<i64>(gridDim.x) * blockDim.x) >> 5;
    for (i64 i = w0; i < N; i += nw) {
        const T* row = X + i * K;
        double m = Num<double>::ninf();
        for (i64 y = lane; y < K; y += 32) {
            C x;
            In<T>::load1(row + y, &x);
            m = fmax(m, alpha * static_cast<double>(x) + g[y]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, off));
        const double lim = m - tau - 1e-12 * (1.0 + fabs(m));
        int c = 0;
        for (i64 y = lane; y < K; y += 32) {
            C x;
            In<T>::load1(row + y, &x);
            c += alpha * static_cast<double>(x) + g[y] >= lim;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) c += __shfl_xor_sync(0xffffffffu, c, off);
        if (lane == 0) count[i] = c;
    }
}

// ---------------------------------------------------------------------------------------------
// The plan exp(alpha X + f_i + g_y), computed in float64, stored as O (float or double).
template <class T, class O>
__global__ void plan_kernel(const T* __restrict__ X, i64 N, i64 K, double alpha,
                            const double* __restrict__ f, const double* __restrict__ g,
                            O* __restrict__ out) {
    const i64 total = N * K;
    for (i64 idx = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
         idx += static_cast<i64>(gridDim.x) * blockDim.x) {
        const i64 i = idx / K, y = idx - i * K;
        typename In<T>::C x;
        In<T>::load1(X + idx, &x);
        out[idx] = static_cast<O>(exp(alpha * static_cast<double>(x) + f[i] + g[y]));
    }
}

}  // namespace cuda
}  // namespace sinkhorn_ot
