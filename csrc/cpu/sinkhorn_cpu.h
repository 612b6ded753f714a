// Fused log-domain Sinkhorn passes on the CPU (C++/OpenMP).  No Python here: the bindings in
// csrc/bindings.cpp validate nothing (Python did) and only move buffers.
#pragma once
#include <cstdint>
#include <functional>

namespace sinkhorn_ot::cpu {

using Interrupted = std::function<bool()>;

// Optional output of a pass: the plan Q_iy * scale of rows row0 .. row0 + n_rows - 1 (or of
// the rows listed in `rows`), written in the input's precision while the pass runs.
template <class T>
struct PlanOut {
    T* out = nullptr;             // (n_rows, K), row-major
    int64_t row0 = 0;             // first row written (when rows is null)
    int64_t n_rows = 0;
    const int64_t* rows = nullptr;  // sorted row indices, or null for a contiguous range
    double scale = 1.0;
};

// Output of one fused pass over X (N x K, row-major).
struct PassOut {
    double* f;          // (N) row potentials, written
    int64_t* labels;    // (N) argmax_y (S_iy + g_y), written when not null
    double* col;        // (K) column sums of the plan at (f, g), written
    double* colmax;     // (K) an upper bound of max_i log Q_iy (exact where col underflows)
    double cost;        // sum_iy Q_iy X_iy (forbidden entries skipped), written
    double slack = 0;   // bound on the relative error of the plan entries measured, written
};

// The row shifts of consecutive passes over the same X and alpha: `lse` (written, N) gets
// each row's log sum_y exp(alpha X_iy + g_y); given the previous pass's (`lse_prev`, at
// `g_prev`), a pass shifts row i's exponentials by lse_prev_i + max_y (g_y - g_prev_y), an
// upper bound of the row's maximum, instead of finding the maximum in a sweep of its own,
// where that bound exceeds the maximum by at most log K + the range of g - g_prev <= 30.
struct RowShifts {
    const double* lse_prev = nullptr;
    const double* g_prev = nullptr;
    double* lse = nullptr;
};

// One fused pass.  `fast` (float32 input): rows whose entries and row sum can be formed with
// float32 arithmetic (t - m in float32 without labels, or only the exponentials and row sums)
// within a relative plan error `fast` are (out.slack: the largest such bound); 0 keeps every
// row in float64, exponentials included.  `shifts` may be null.  Returns false if
// `interrupted` (called from the calling thread only, about every 0.2 s) reported an
// interruption; the outputs are then incomplete.
template <class T>
bool fused_pass(const T* X, int64_t N, int64_t K, double alpha, const double* g,
                const double* loga, double rho_a, PassOut& out, const PlanOut<T>* plan,
                double fast, const RowShifts* shifts, int n_threads,
                const Interrupted& interrupted);

// The plan exp(alpha X_iy + f_i + g_y) * scale of the rows of `plan`, in X's precision.
template <class T>
bool plan(const T* X, int64_t N, int64_t K, double alpha, const double* f, const double* g,
          const PlanOut<T>& plan, int n_threads, const Interrupted& interrupted);

// What a validation read of X found.  `forbidden` is the infinity that marks a forbidden pair
// (-inf in logP, +inf in a cost); NaN and the other infinity are invalid.
struct CheckOut {
    int64_t first_invalid = -1;        // flat index of the first NaN or wrong infinity
    int64_t first_empty_row = -1;      // first row whose entries are all forbidden
    int64_t first_empty_col = -1;      // first column whose entries are all forbidden
    double max_abs = 0;                // largest |finite entry|
};

// L_y = log sum_i exp(alpha X_iy + f_i) in one read (f may be null: f = 0).  With `check`,
// the same read also validates X (as check_matrix does).
template <class T>
bool column_lse(const T* X, int64_t N, int64_t K, double alpha, const double* f, double* L,
                CheckOut* check, double forbidden, int n_threads,
                const Interrupted& interrupted);

// The plan times `scale` of a balanced problem with uniform rows (a = 1/N) and columns `b`
// (null: uniform), after `n_iter` iterations (a column then a row normalisation each)
// starting from the kernel, written to `out` (N x K): the codes of a fixed-iteration solve,
// by scaling passes on the kernel stored once in `out` (E_iy = exp(alpha (X_iy - max_y
// X_iy)), -inf a forbidden pair) or on X itself when `probs` (X holds the kernel: a
// probability matrix, 0 a forbidden pair).  One read of X, then one of E per iteration.
// Returns 0 when done; 1 for an invalid entry, a row with every pair forbidden or |alpha X|
// above a sixteenth of T's largest value (what the log-domain kernels' validation refuses);
// 2 when a scaling or sum left [1e-280, 1e280], or when the entries of E that underflowed
// could have carried more than 1e-7 (float64: 1e-15) of the smallest marginal entry (the
// log-domain passes are then needed); -1 when interrupted.  With a nonzero return `out`
// holds no result.
template <class T>
int scaling_codes(const T* X, int64_t N, int64_t K, double alpha, bool probs, const double* b,
                  int n_iter, double scale, T* out, int n_threads,
                  const Interrupted& interrupted);

// out_i = the first argmax over y of alpha X_iy + g_y, in float64 (0 for a row with no
// allowed entry).
template <class T>
void labels(const T* X, int64_t N, int64_t K, double alpha, const double* g, int64_t* out,
            int n_threads);

// For each listed row, the number of entries whose score alpha X_iy + g_y is within tau (and
// a rounding margin of 1e-12 relative) of the row's best score: a count above 1 is a tie.
template <class T>
void near_ties(const T* X, int64_t N, int64_t K, double alpha, const double* g,
               const int64_t* rows, int64_t n, double tau, int64_t* count, int n_threads);

// A float64 hash of each row (r0, r1: K random weights for allowed and forbidden entries):
// equal rows hash equal, bit for bit.
template <class T>
void row_hashes(const T* X, int64_t N, int64_t K, const double* r0, const double* r1,
                double* h, int n_threads);

// One read of X for validation only.
template <class T>
CheckOut check_matrix(const T* X, int64_t N, int64_t K, double forbidden, int n_threads);

// next_g on every column, and the L1 column error of the plan at (f, g) (returned).
double column_update(const double* g, const double* logb, const double* col,
                     const double* colmax, int64_t K, double log_n_rows, double rho_b,
                     double* g_next);

int max_threads();

// The instruction set of the kernels in use: "avx512", "avx2" or "baseline".
const char* isa_name();

}  // namespace sinkhorn_ot::cpu
