// Fused log-domain Sinkhorn passes on the CPU (C++/OpenMP).  No Python here: the bindings in
// csrc/bindings.cpp validate nothing (Python did) and only move buffers.
#pragma once
#include <cstdint>
#include <functional>

namespace sinkhorn_ot::cpu {

// Output of one fused pass over X (N x K, row-major).
struct PassOut {
    double* f;          // (N) row potentials, written
    int64_t* labels;    // (N) argmax_y (S_iy + g_y), written when not null
    double* col;        // (K) column sums of the plan at (f, g), written
    double* colmax;     // (K) max_i log Q_iy, written
    double cost;        // sum_iy Q_iy X_iy (forbidden entries skipped), written
};

// Returns false if `interrupted` (called from the calling thread only, about every 0.2 s)
// reported an interruption; the outputs are then incomplete.
template <class T>
bool fused_pass(const T* X, int64_t N, int64_t K, double alpha, const double* g,
                const double* loga, double rho_a, PassOut& out, int n_threads,
                const std::function<bool()>& interrupted);

// L_y = log sum_i exp(alpha X_iy + f_i), exactly, in one read (online log-sum-exp per column).
// f may be null (then f = 0).
template <class T>
bool column_lse(const T* X, int64_t N, int64_t K, double alpha, const double* f, double* L,
                int n_threads, const std::function<bool()>& interrupted);

// One read of X for validation.  `forbidden` is the infinity that marks a forbidden pair
// (-inf in logP, +inf in a cost); NaN and the other infinity are invalid.
struct CheckOut {
    int64_t first_invalid = -1;        // flat index of the first NaN or wrong infinity
    int64_t first_empty_row = -1;      // first row whose entries are all forbidden
    int64_t first_empty_col = -1;      // first column whose entries are all forbidden
    double max_abs = 0;                // largest |finite entry|
};
template <class T>
CheckOut check_matrix(const T* X, int64_t N, int64_t K, double forbidden, int n_threads);

int max_threads();

}  // namespace sinkhorn_ot::cpu
