// pybind11 module sinkhorn_ot._core.  Python validates every input before it gets here
// (src/sinkhorn_ot/_validation.py); these checks only guard the buffer contract.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include <cmath>

#include "common/sinkhorn_math.h"
#include "cpu/sinkhorn_cpu.h"

namespace py = pybind11;
using namespace sinkhorn_ot;

namespace {

using F64 = py::array_t<double, py::array::c_style>;

void require(bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(what);
}

template <class T>
const T* matrix_ptr(const py::array& X) {
    return static_cast<const T*>(X.data());
}

bool is_matrix(const py::array& X) {
    return X.ndim() == 2 && (X.flags() & py::array::c_style);
}

// Checks for Ctrl-C from inside a solve; called on the thread that released the GIL.
bool interrupted() {
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0;
}

template <class T>
py::tuple fused_pass_t(const py::array& X, double alpha, const F64& g, const F64& loga,
                       double rho_a, F64& f, py::object labels, int n_threads) {
    const int64_t N = X.shape(0), K = X.shape(1);
    require(g.size() == K && loga.size() == N && f.size() == N, "fused_pass: size mismatch");
    F64 col(K), colmax(K);
    cpu::PassOut out{f.mutable_data(), nullptr, col.mutable_data(), colmax.mutable_data(), 0.0};
    py::array_t<int64_t, py::array::c_style> lab;
    if (!labels.is_none()) {
        lab = labels.cast<py::array_t<int64_t, py::array::c_style>>();
        require(lab.size() == N, "fused_pass: labels size mismatch");
        out.labels = lab.mutable_data();
    }
    bool done;
    {
        py::gil_scoped_release nogil;
        done = cpu::fused_pass<T>(matrix_ptr<T>(X), N, K, alpha, g.data(), loga.data(), rho_a,
                                  out, n_threads, interrupted);
    }
    if (!done) throw py::error_already_set();
    return py::make_tuple(col, colmax, out.cost);
}

template <class T>
F64 column_lse_t(const py::array& X, double alpha, py::object f, int n_threads) {
    const int64_t N = X.shape(0), K = X.shape(1);
    F64 L(K);
    F64 fa;
    const double* fp = nullptr;
    if (!f.is_none()) {
        fa = f.cast<F64>();
        require(fa.size() == N, "column_lse: f size mismatch");
        fp = fa.data();
    }
    bool done;
    {
        py::gil_scoped_release nogil;
        done = cpu::column_lse<T>(matrix_ptr<T>(X), N, K, alpha, fp, L.mutable_data(),
                                  n_threads, interrupted);
    }
    if (!done) throw py::error_already_set();
    return L;
}

py::tuple fused_pass(const py::array& X, double alpha, const F64& g, const F64& loga,
                     double rho_a, F64& f, py::object labels, int n_threads) {
    require(is_matrix(X), "fused_pass: X must be a C-contiguous 2-d array");
    if (py::isinstance<py::array_t<float>>(X))
        return fused_pass_t<float>(X, alpha, g, loga, rho_a, f, labels, n_threads);
    if (py::isinstance<py::array_t<double>>(X))
        return fused_pass_t<double>(X, alpha, g, loga, rho_a, f, labels, n_threads);
    throw std::invalid_argument("fused_pass: X must be float32 or float64");
}

F64 column_lse(const py::array& X, double alpha, py::object f, int n_threads) {
    require(is_matrix(X), "column_lse: X must be a C-contiguous 2-d array");
    if (py::isinstance<py::array_t<float>>(X)) return column_lse_t<float>(X, alpha, f, n_threads);
    if (py::isinstance<py::array_t<double>>(X)) return column_lse_t<double>(X, alpha, f, n_threads);
    throw std::invalid_argument("column_lse: X must be float32 or float64");
}

py::dict check_matrix(const py::array& X, double forbidden, int n_threads) {
    require(is_matrix(X), "check_matrix: X must be a C-contiguous 2-d array");
    const int64_t N = X.shape(0), K = X.shape(1);
    cpu::CheckOut c;
    bool f32 = py::isinstance<py::array_t<float>>(X);
    require(f32 || py::isinstance<py::array_t<double>>(X), "check_matrix: float32 or float64");
    {
        py::gil_scoped_release nogil;
        c = f32 ? cpu::check_matrix<float>(matrix_ptr<float>(X), N, K, forbidden, n_threads)
                : cpu::check_matrix<double>(matrix_ptr<double>(X), N, K, forbidden, n_threads);
    }
    py::dict d;
    d["first_invalid"] = c.first_invalid;
    d["first_empty_row"] = c.first_empty_row;
    d["first_empty_col"] = c.first_empty_col;
    d["max_abs"] = c.max_abs;
    return d;
}

// Applies next_g to every column and measures the column error of the plan at (f, g):
// returns (g_next, sum_y |col_y - column_target_y|).
py::tuple column_update(const F64& g, const F64& logb, const F64& col, const F64& colmax,
                        double log_n_rows, double rho_b) {
    const int64_t K = g.size();
    require(logb.size() == K && col.size() == K && colmax.size() == K,
            "column_update: size mismatch");
    F64 out(K);
    const double *gp = g.data(), *lb = logb.data(), *c = col.data(), *cm = colmax.data();
    double* o = out.mutable_data();
    double err = 0;
    for (int64_t y = 0; y < K; ++y) {
        err += std::abs(c[y] - column_target(lb[y], gp[y], rho_b));
        o[y] = next_g(gp[y], lb[y], c[y], cm[y], log_n_rows, rho_b);
    }
    return py::make_tuple(out, err);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "Compiled CPU core of sinkhorn_ot (private; use the functions in sinkhorn_ot).";
    m.def("fused_pass", &fused_pass, py::arg("X"), py::arg("alpha"), py::arg("g"),
          py::arg("loga"), py::arg("rho_a"), py::arg("f").noconvert(), py::arg("labels"),
          py::arg("n_threads"),
          "One fused pass: writes f (and labels), returns (col, colmax, sum Q*X).");
    m.def("column_lse", &column_lse, py::arg("X"), py::arg("alpha"), py::arg("f"),
          py::arg("n_threads"), "log sum_i exp(alpha X_iy + f_i) for every column y.");
    m.def("column_update", &column_update, py::arg("g"), py::arg("logb"), py::arg("col"),
          py::arg("colmax"), py::arg("log_n_rows"), py::arg("rho_b"),
          "(next g, L1 column error) from one pass's column sums.");
    m.def("check_matrix", &check_matrix, py::arg("X"), py::arg("forbidden"),
          py::arg("n_threads"), "Validation scan: invalid entries, empty rows and columns.");
    m.def("max_threads", &cpu::max_threads, "Threads OpenMP would use by default.");
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}
