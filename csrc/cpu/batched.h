// Many problems in one call (C++/OpenMP): a batch of small balanced problems solved one per
// thread, and several column marginals against one matrix sharing its read.
#pragma once
#include <cstdint>

#include "sinkhorn_cpu.h"

namespace sinkhorn_ot::cpu {

// B balanced problems X[p] (N x K, row-major, `x_stride` entries apart; 0: one matrix shared
// by all), each solved by the log-domain loop of _solver.sinkhorn_loop on one thread:
// from g0[p] (or the column normalisation of exp(S)) until err <= tol[p], or exactly
// `n_iter` passes when n_iter > 0, with the epsilon scaling of _solver.solve in tolerance mode
// without a warm start.  A row (column) of zero mass has loga (logb) = -inf and
// gets f (g) = -inf.  `memory` > 0: Anderson mixing of g as _solver.Anderson (tolerance mode
// only), given up after `stall_window` passes that cut the best err by less than 5%
// (stalled[p] = 1: the caller solves that problem again by other means).  Each problem's
// entries are read once first for the validation facts (flags, max_abs).
struct BatchedArgs {
    int64_t B = 0, N = 0, K = 0;
    int64_t x_stride = 0;
    double alpha = 0;
    const double* loga = nullptr;  // (B, N), or (N) when a_stride == 0
    int64_t a_stride = 0;
    const double* logb = nullptr;  // (B, K), or (K) when b_stride == 0
    int64_t b_stride = 0;
    const double* g0 = nullptr;    // (B, K) warm starts, or null
    const double* tol = nullptr;   // (B)
    double forbidden = 0;          // the infinity of a forbidden pair (-inf: logP, +inf: cost)
    int64_t max_iter = 1000;
    int64_t n_iter = 0;
    int memory = 0;
    double rel_slack = 1e-13;      // dual decrease Anderson tolerates (relative)
    int64_t stall_window = 100;
    int eps_stages = 0;            // epsilon-scaling stages before alpha (as _solver.solve)
};

// The returned iterate of each problem: the best pass (lowest err); err is the L1 column
// violation of the plan exp(S + f + g) of the returned potentials, measured by that pass.
struct BatchedOut {
    double* f = nullptr;        // (B, N)
    double* g = nullptr;        // (B, K)
    int64_t* n_iter = nullptr;  // (B) passes run
    double* err = nullptr;      // (B)
    double* cost = nullptr;     // (B) sum Q X over the allowed pairs
    int64_t* labels = nullptr;  // (B, N) first argmax_y (S_iy + g_y), or null
    uint8_t* stalled = nullptr; // (B)
    uint8_t* flags = nullptr;   // (B) bit 0: a NaN or wrong infinity (not solved), bit 1: a
                                // forbidden entry
    double* max_abs = nullptr;  // (B) largest |finite entry| (bounds the Anderson iterates)
};

template <class T>
bool batched_solve(const T* X, const BatchedArgs& args, BatchedOut& out, int n_threads,
                   const Interrupted& interrupted);

// One pass over X (N x K) for k column potentials G (k x K, row-major) and one row marginal:
// F (k x N) the row potentials f^t = log a - LSE_y(S_y + g^t_y), col (k x K) the column sums
// of each plan exp(S + f^t + g^t), and with `cost` (k) sum Q^t X.  One exponential per entry
// serves every target: exp(S + g^t - m) = exp(S + gbar - m) exp(g^t - gbar) with gbar the
// columnwise max of G; a row whose factorised sum underflows for a target is recomputed
// exactly for that target.  A column that underflows is reported in `underflow` (k) for the
// caller to measure exactly.
template <class T>
bool multi_pass(const T* X, int64_t N, int64_t K, double alpha, const double* G, int64_t k,
                const double* loga, double* F, double* col, double* cost, uint8_t* underflow,
                int n_threads, const Interrupted& interrupted);

}  // namespace sinkhorn_ot::cpu
