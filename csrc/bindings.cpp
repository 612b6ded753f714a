// pybind11 module sinkhorn_ot._core.  Python validates every input before it gets here
// (src/sinkhorn_ot/_validation.py); these checks only guard the buffer contract.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "cpu/sinkhorn_cpu.h"

namespace py = pybind11;
using namespace sinkhorn_ot;

namespace {

using F64 = py::array_t<double, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;

void require(bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(what);
}

bool is_matrix(const py::array& X) {
    return X.ndim() == 2 && (X.flags() & py::array::c_style);
}

// Checks for Ctrl-C from inside a solve; called on the thread that released the GIL.
bool interrupted() {
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0;
}

// Calls f<float> or f<double> for X's dtype.
template <class F>
auto dispatch(const py::array& X, const char* name, F&& f) {
    if (!is_matrix(X))
        throw std::invalid_argument(std::string(name) + ": X must be a C-contiguous 2-d array");
    if (py::isinstance<py::array_t<float>>(X)) return f(static_cast<const float*>(nullptr));
    if (py::isinstance<py::array_t<double>>(X)) return f(static_cast<const double*>(nullptr));
    throw std::invalid_argument(std::string(name) + ": X must be float32 or float64");
}

// The plan rows to write: `out` (n, K) of X's dtype, rows row0.. or the sorted `rows`.
template <class T>
cpu::PlanOut<T> plan_out(py::object out, py::object rows, int64_t row0, double scale,
                         int64_t N, int64_t K, py::array& keep_out, I64& keep_rows) {
    cpu::PlanOut<T> p;
    keep_out = out.cast<py::array>();
    require(py::isinstance<py::array_t<T>>(keep_out) && is_matrix(keep_out) &&
                keep_out.shape(1) == K && keep_out.writeable(),
            "plan: out must be a writable C-contiguous (n, K) array of X's dtype");
    p.out = static_cast<T*>(keep_out.mutable_data());
    p.n_rows = keep_out.shape(0);
    p.scale = scale;
    if (!rows.is_none()) {
        keep_rows = rows.cast<I64>();
        require(keep_rows.size() == p.n_rows, "plan: rows and out differ in length");
        p.rows = keep_rows.data();
        for (int64_t k = 0; k < p.n_rows; ++k)
            require(p.rows[k] >= 0 && p.rows[k] < N && (k == 0 || p.rows[k] > p.rows[k - 1]),
                    "plan: rows must be increasing indices into X");
    } else {
        require(row0 >= 0 && row0 + p.n_rows <= N, "plan: row range out of bounds");
        p.row0 = row0;
    }
    return p;
}

py::tuple fused_pass(const py::array& X, double alpha, const F64& g, const F64& loga,
                     double rho_a, F64& f, py::object labels, int n_threads, py::object plan,
                     int64_t plan_row0, py::object plan_rows, double plan_scale, double fast,
                     py::object lse, py::object lse_prev, py::object g_prev) {
    return dispatch(X, "fused_pass", [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        const int64_t N = X.shape(0), K = X.shape(1);
        require(g.size() == K && loga.size() == N && f.size() == N, "fused_pass: size mismatch");
        F64 col(K), colmax(K);
        cpu::PassOut out{f.mutable_data(), nullptr, col.mutable_data(), colmax.mutable_data(),
                         0.0, 0.0};
        I64 lab;
        if (!labels.is_none()) {
            lab = labels.cast<I64>();
            require(lab.size() == N, "fused_pass: labels size mismatch");
            out.labels = lab.mutable_data();
        }
        py::array keep_out;
        I64 keep_rows;
        cpu::PlanOut<T> p;
        if (!plan.is_none())
            p = plan_out<T>(plan, plan_rows, plan_row0, plan_scale, N, K, keep_out, keep_rows);
        cpu::RowShifts sh;
        F64 lse_a, lse_p, g_p;
        if (!lse.is_none()) {
            lse_a = lse.cast<F64>();
            require(lse_a.size() == N && lse_a.writeable(), "fused_pass: lse size mismatch");
            sh.lse = lse_a.mutable_data();
            if (!lse_prev.is_none() && !g_prev.is_none()) {
                lse_p = lse_prev.cast<F64>();
                g_p = g_prev.cast<F64>();
                require(lse_p.size() == N && g_p.size() == K,
                        "fused_pass: lse_prev or g_prev size mismatch");
                sh.lse_prev = lse_p.data();
                sh.g_prev = g_p.data();
            }
        }
        bool done;
        {
            py::gil_scoped_release nogil;
            done = cpu::fused_pass<T>(static_cast<const T*>(X.data()), N, K, alpha, g.data(),
                                      loga.data(), rho_a, out, plan.is_none() ? nullptr : &p,
                                      fast, lse.is_none() ? nullptr : &sh, n_threads,
                                      interrupted);
        }
        if (!done) throw py::error_already_set();
        return py::make_tuple(col, colmax, out.cost, out.slack);
    });
}

void plan(const py::array& X, double alpha, const F64& f, const F64& g, py::object out,
          double scale, py::object rows, int64_t row0, int n_threads) {
    dispatch(X, "plan", [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        const int64_t N = X.shape(0), K = X.shape(1);
        require(f.size() == N && g.size() == K, "plan: size mismatch");
        py::array keep_out;
        I64 keep_rows;
        cpu::PlanOut<T> p = plan_out<T>(out, rows, row0, scale, N, K, keep_out, keep_rows);
        bool done;
        {
            py::gil_scoped_release nogil;
            done = cpu::plan<T>(static_cast<const T*>(X.data()), N, K, alpha, f.data(),
                                g.data(), p, n_threads, interrupted);
        }
        if (!done) throw py::error_already_set();
        return 0;
    });
}

py::dict check_dict(const cpu::CheckOut& c) {
    py::dict d;
    d["first_invalid"] = c.first_invalid;
    d["first_empty_row"] = c.first_empty_row;
    d["first_empty_col"] = c.first_empty_col;
    d["max_abs"] = c.max_abs;
    return d;
}

py::object column_lse(const py::array& X, double alpha, py::object f, int n_threads,
                      py::object forbidden) {
    return dispatch(X, "column_lse", [&](auto tag) -> py::object {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        const int64_t N = X.shape(0), K = X.shape(1);
        F64 L(K), fa;
        const double* fp = nullptr;
        if (!f.is_none()) {
            fa = f.cast<F64>();
            require(fa.size() == N, "column_lse: f size mismatch");
            fp = fa.data();
        }
        const bool chk = !forbidden.is_none();
        const double forb = chk ? forbidden.cast<double>() : 0.0;
        cpu::CheckOut c;
        bool done;
        {
            py::gil_scoped_release nogil;
            done = cpu::column_lse<T>(static_cast<const T*>(X.data()), N, K, alpha, fp,
                                      L.mutable_data(), chk ? &c : nullptr, forb, n_threads,
                                      interrupted);
        }
        if (!done) throw py::error_already_set();
        if (!chk) return std::move(L);
        return py::make_tuple(L, check_dict(c));
    });
}

py::dict check_matrix(const py::array& X, double forbidden, int n_threads) {
    return dispatch(X, "check_matrix", [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        cpu::CheckOut c;
        {
            py::gil_scoped_release nogil;
            c = cpu::check_matrix<T>(static_cast<const T*>(X.data()), X.shape(0), X.shape(1),
                                     forbidden, n_threads);
        }
        return check_dict(c);
    });
}

py::tuple column_update(const F64& g, const F64& logb, const F64& col, const F64& colmax,
                        double log_n_rows, double rho_b) {
    const int64_t K = g.size();
    require(logb.size() == K && col.size() == K && colmax.size() == K,
            "column_update: size mismatch");
    F64 out(K);
    double err = cpu::column_update(g.data(), logb.data(), col.data(), colmax.data(), K,
                                    log_n_rows, rho_b, out.mutable_data());
    return py::make_tuple(out, err);
}

int scaling_codes(const py::array& X, double alpha, bool probs, py::object b, int n_iter,
                  double scale, py::array out, int n_threads) {
    return dispatch(X, "scaling_codes", [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        const int64_t N = X.shape(0), K = X.shape(1);
        require(N > 0 && K > 0 && n_iter > 0, "scaling_codes: empty matrix or n_iter < 1");
        require(py::isinstance<py::array_t<T>>(out) && is_matrix(out) && out.shape(0) == N &&
                    out.shape(1) == K && out.writeable(),
                "scaling_codes: out must be a writable C-contiguous array like X");
        F64 bw;
        if (!b.is_none()) {
            bw = b.cast<F64>();
            require(bw.size() == K, "scaling_codes: b size mismatch");
        }
        int st;
        {
            py::gil_scoped_release nogil;
            st = cpu::scaling_codes<T>(static_cast<const T*>(X.data()), N, K, alpha, probs,
                                       b.is_none() ? nullptr : bw.data(), n_iter, scale,
                                       static_cast<T*>(out.mutable_data()), n_threads,
                                       interrupted);
        }
        if (st < 0) throw py::error_already_set();
        return st;
    });
}

void labels(const py::array& X, double alpha, const F64& g, I64& out, int n_threads) {
    dispatch(X, "labels", [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        const int64_t N = X.shape(0), K = X.shape(1);
        require(g.size() == K, "labels: g size mismatch");
        require(out.size() == N, "labels: out size mismatch");
        int64_t* o = out.mutable_data();
        py::gil_scoped_release nogil;
        cpu::labels<T>(static_cast<const T*>(X.data()), N, K, alpha, g.data(), o, n_threads);
        return 0;
    });
}

I64 near_ties(const py::array& X, double alpha, const F64& g, const I64& rows, double tau,
              int n_threads) {
    return dispatch(X, "near_ties", [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        const int64_t N = X.shape(0), K = X.shape(1), n = rows.size();
        require(g.size() == K, "near_ties: g size mismatch");
        for (int64_t k = 0; k < n; ++k)
            require(rows.data()[k] >= 0 && rows.data()[k] < N, "near_ties: row out of range");
        I64 count(n);
        {
            py::gil_scoped_release nogil;
            cpu::near_ties<T>(static_cast<const T*>(X.data()), N, K, alpha, g.data(),
                              rows.data(), n, tau, count.mutable_data(), n_threads);
        }
        return count;
    });
}

F64 row_hashes(const py::array& X, const F64& r0, const F64& r1, int n_threads) {
    return dispatch(X, "row_hashes", [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        const int64_t N = X.shape(0), K = X.shape(1);
        require(r0.size() == K && r1.size() == K, "row_hashes: weights size mismatch");
        F64 h(N);
        {
            py::gil_scoped_release nogil;
            cpu::row_hashes<T>(static_cast<const T*>(X.data()), N, K, r0.data(), r1.data(),
                               h.mutable_data(), n_threads);
        }
        return h;
    });
}

}  // namespace

void register_batched(py::module_& m);  // csrc/batched_bindings.cpp

PYBIND11_MODULE(_core, m) {
    m.doc() = "Compiled CPU core of sinkhorn_ot (private; use the functions in sinkhorn_ot).";
    m.def("fused_pass", &fused_pass, py::arg("X"), py::arg("alpha"), py::arg("g"),
          py::arg("loga"), py::arg("rho_a"), py::arg("f").noconvert(), py::arg("labels"),
          py::arg("n_threads"), py::arg("plan") = py::none(), py::arg("plan_row0") = 0,
          py::arg("plan_rows") = py::none(), py::arg("plan_scale") = 1.0,
          py::arg("fast") = 0.0, py::arg("lse") = py::none(),
          py::arg("lse_prev") = py::none(), py::arg("g_prev") = py::none(),
          "One fused pass: writes f (labels, plan rows, and into lse the row log-sum-exps, "
          "which with g the next pass takes as lse_prev and g_prev for its row shifts), "
          "returns (col, colmax, sum Q*X, slack), slack the bound on the relative error of "
          "the plan entries measured.");
    m.def("plan", &plan, py::arg("X"), py::arg("alpha"), py::arg("f"), py::arg("g"),
          py::arg("out"), py::arg("scale") = 1.0, py::arg("rows") = py::none(),
          py::arg("row0") = 0, py::arg("n_threads") = 0,
          "Writes exp(alpha X + f + g) * scale of the chosen rows into out.");
    m.def("column_lse", &column_lse, py::arg("X"), py::arg("alpha"), py::arg("f"),
          py::arg("n_threads"), py::arg("forbidden") = py::none(),
          "log sum_i exp(alpha X_iy + f_i) for every column y; with forbidden, also the "
          "validation facts of check_matrix from the same read: (L, facts).");
    m.def("column_update", &column_update, py::arg("g"), py::arg("logb"), py::arg("col"),
          py::arg("colmax"), py::arg("log_n_rows"), py::arg("rho_b"),
          "(next g, L1 column error) from one pass's column sums.");
    m.def("check_matrix", &check_matrix, py::arg("X"), py::arg("forbidden"),
          py::arg("n_threads"), "Validation scan: invalid entries, empty rows and columns.");
    m.def("scaling_codes", &scaling_codes, py::arg("X"), py::arg("alpha"), py::arg("probs"),
          py::arg("b"), py::arg("n_iter"), py::arg("scale"), py::arg("out"),
          py::arg("n_threads"),
          "The plan times scale of n_iter fixed iterations by scaling passes, into out; "
          "returns 0 (done), 1 (invalid entry or empty row) or 2 (out of float64 range).");
    m.def("labels", &labels, py::arg("X"), py::arg("alpha"), py::arg("g"),
          py::arg("out").noconvert(), py::arg("n_threads") = 0,
          "Writes into out the first argmax over y of alpha X_iy + g_y of every row.");
    m.def("near_ties", &near_ties, py::arg("X"), py::arg("alpha"), py::arg("g"),
          py::arg("rows"), py::arg("tau"), py::arg("n_threads") = 0,
          "Per listed row: entries whose score alpha X + g is within tau of the row's best.");
    m.def("row_hashes", &row_hashes, py::arg("X"), py::arg("r0"), py::arg("r1"),
          py::arg("n_threads") = 0,
          "Per row: sum_y (X_iy > -inf ? X_iy r0_y : r1_y), in a fixed order (equal rows, "
          "equal hashes).");
    m.def("max_threads", &cpu::max_threads, "Threads OpenMP would use by default.");
    m.def("isa", &cpu::isa_name, "Instruction set of the kernels in use.");
    register_batched(m);
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}
