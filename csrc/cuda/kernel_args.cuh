// Structures shared by the CUDA kernels and their Python launchers.  The launchers
// (src/sinkhorn_ot/_cuda/launch.py) read the struct definitions below and build NumPy
// structured dtypes from them, so each field list is written once; keep every struct to the
// field types that parser knows (int, unsigned, long long, double, and pointers), one field a
// line.  tests/test_nvrtc.py compiles the offsets the Python side computes against the compiler's.
#pragma once

// Loop-control state of the device-side solve (mirrors _solver.sinkhorn_loop).
struct State {
    int done;          // set when converged (err <= tol, tolerance mode) or err is not finite
    int it;            // passes completed
    int f_best;        // slot (0/1) of f and labels of the best pass; passes write slot 1 - f_best
    int g_cur;         // slot (0..2) of the g the next pass uses
    int g_best;        // slot of the g of the best pass
    unsigned counter;  // last-block ticket of fused_pass_finish_kernel (reset by the last block)
    int pad0;
    int pad1;
    double best_err;
    double best_qx;
    double pad2;
    double pad3;
};
static_assert(sizeof(State) == 64, "State: one 64-byte read of the loop state");

// Arguments of one launch of fused_pass_kernel / fused_pass_pipe_kernel.  Pointers whose type
// depends on the instance (the input type T, the compute type C) are void here.
struct PassArgs {
    const void* X;           // (N, K) of T, row-major
    long long N;
    long long K;
    double alpha;            // S = alpha X
    const double* gslots;    // [3, K]: the pass reads g from slot state->g_cur
    const double* loga;      // [N]: log a / rho_a
    double rho_a;
    double* fslots;          // [2, N]: f goes to slot 1 - state->f_best
    long long* labslots;     // [2, N] or null: the labels likewise
    void* colpart;           // [nrb, K] of C: column sums of the plan per row block
    void* cmpart;            // [nrb, K] of C: bound on the column max of log Q per row block
    double* qxpart;          // [ntiles * nrb]: sum Q X per block
    void* st_m;              // [ntiles, N] of C (column-tiled passes): row max per tile
    void* st_s;              // [ntiles, N] of C: row sum of exp(t - m) per tile
    int* st_a;               // [ntiles, N]: row argmax per tile
    State* state;
};
static_assert(sizeof(PassArgs) == 128, "PassArgs: sixteen 8-byte fields");

// Arguments of fused_pass_finish_kernel: the pass partials reduced, the column update applied.
struct FinishArgs {
    const void* colpart;     // [nrb, K] of C, from the pass
    const void* cmpart;      // [nrb, K] of C
    const double* qxpart;    // [nq]
    double* gslots;          // [3, K]: reads slot g_cur, writes the next slot
    const double* logb;      // [K]: log b / rho_b
    double* errpart;         // [ceil(K / 32)]: column error per block
    double* col_out;         // [K] or null: the column sums (the fused_pass primitive)
    double* colmax_out;      // [K] or null: the column maxima
    State* state;
    long long K;
    double log_n_rows;
    double rho_b;
    double tol;
    int nrb;
    int nq;
    int fixed;               // 1: fixed n_iter (every pass is the best)
    int pad;
};
static_assert(sizeof(FinishArgs) == 120, "FinishArgs: thirteen 8-byte, four 4-byte fields");
