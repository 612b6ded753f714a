// Update formulas shared by the C++/OpenMP core and the CUDA kernels, so the twins cannot
// drift.  Notation (docs/algorithms.rst): S = alpha * X (alpha = lam for logP, -1/reg for a
// cost), Q[i, y] = exp(S[i, y] + f[i] + g[y]).  One fused pass, for row i and the current g:
//   t_y = S_iy + g_y,   m = max_y t_y,   s = sum_y exp(t_y - m)
//   f_i = rho_a * (log a_i - m - log s)              (rho_a = 1: balanced rows)
//   Q_iy = exp(t_y - m) * r_i,  r_i = exp(m + f_i) = exp(log a_i - log s) when balanced
// The column sums col_y = sum_i Q_iy then give the next g (see next_g).  Entries whose
// exp(t_y - m) underflows are dropped from col_y; colmax_y = max_i log Q_iy (the CPU core), or
// an upper bound of it (the CUDA pass: looser by at most log K), keeps the information needed
// when a whole column underflows.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#include <cmath>
#endif

namespace sinkhorn_ot {

// Column sums below this are treated as underflowed: entries smaller than the smallest normal
// float (1.2e-38) were dropped from them, so only sums far above that are trusted.
constexpr double kColumnUnderflow = 1e-25;

// log r_i: the log of the factor that turns exp(t_y - m) into Q_iy.
SK_HD double log_row_factor(double loga_i, double m, double log_s, double rho_a) {
    // f_i + m with f_i = rho_a * (log a_i - m - log s)
    return rho_a * (loga_i - log_s) + (1.0 - rho_a) * m;
}

SK_HD double row_potential(double loga_i, double m, double log_s, double rho_a) {
    return rho_a * (loga_i - m - log_s);
}

// Next column potential from the column sums of the plan at (f, g).  LSE_i(S_iy + f_i) is
// log(col_y) - g_y; when the column underflowed, colmax_y - g_y + log(n_rows) bounds it from
// above, so the step taken is a partial step towards the exact one and never overshoots.
// log_col = log(col) is read only where col > kColumnUnderflow.
SK_HD double next_g_of_log(double g, double logb, double col, double log_col, double colmax,
                           double log_n_rows, double rho_b) {
    double lse = (col > kColumnUnderflow) ? log_col - g : colmax - g + log_n_rows;
    return rho_b * (logb - lse);
}

SK_HD double next_g(double g, double logb, double col, double colmax, double log_n_rows,
                    double rho_b) {
    return next_g_of_log(g, logb, col, col > kColumnUnderflow ? log(col) : 0.0, colmax,
                         log_n_rows, rho_b);
}

// The column sums the plan must reach at the current g: b_y for a balanced side (rho_b = 1),
// b_y * exp(g_y (1 - 1 / rho_b)) for a KL-relaxed one (the fixed point of next_g).
SK_HD double column_target(double logb, double g, double rho_b) {
    return rho_b == 1.0 ? exp(logb) : exp(logb + g * (1.0 - 1.0 / rho_b));
}

}  // namespace sinkhorn_ot
