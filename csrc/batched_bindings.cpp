// pybind11 wrappers of the batched and multi-target solves (csrc/cpu/batched.h), registered
// into sinkhorn_ot._core by csrc/bindings.cpp.  Python validated every input.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu/batched.h"

namespace py = pybind11;
using namespace sinkhorn_ot;

namespace {

using F64 = py::array_t<double, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;
using U8 = py::array_t<uint8_t, py::array::c_style>;

void require(bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(what);
}

bool interrupted() {
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0;
}

template <class F>
auto dispatch(const py::array& X, const char* name, F&& f) {
    if (!(X.flags() & py::array::c_style))
        throw std::invalid_argument(std::string(name) + ": X must be C-contiguous");
    if (py::isinstance<py::array_t<float>>(X)) return f(static_cast<const float*>(nullptr));
    if (py::isinstance<py::array_t<double>>(X)) return f(static_cast<const double*>(nullptr));
    throw std::invalid_argument(std::string(name) + ": X must be float32 or float64");
}

// X: (B, N, K), or (N, K) shared by B problems.  loga: (B, N) or (N,); logb: (B, K) or (K,).
py::tuple batched_solve(const py::array& X, int64_t B, double alpha, const F64& loga,
                        const F64& logb, py::object g0, const F64& tol, double forbidden,
                        int64_t max_iter, int64_t n_iter, int memory, double rel_slack,
                        int64_t stall_window, int eps_stages, bool want_labels,
                        int n_threads) {
    return dispatch(X, "batched_solve", [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        require(X.ndim() == 3 || X.ndim() == 2, "batched_solve: X must be 2-d or 3-d");
        const bool shared = X.ndim() == 2;
        require(shared || X.shape(0) == B, "batched_solve: B mismatch");
        const int64_t N = X.shape(shared ? 0 : 1), K = X.shape(shared ? 1 : 2);
        cpu::BatchedArgs a;
        a.B = B;
        a.N = N;
        a.K = K;
        a.x_stride = shared ? 0 : N * K;
        a.alpha = alpha;
        require((loga.ndim() == 1 && loga.shape(0) == N) ||
                    (loga.ndim() == 2 && loga.shape(0) == B && loga.shape(1) == N),
                "batched_solve: loga shape");
        require((logb.ndim() == 1 && logb.shape(0) == K) ||
                    (logb.ndim() == 2 && logb.shape(0) == B && logb.shape(1) == K),
                "batched_solve: logb shape");
        a.loga = loga.data();
        a.a_stride = loga.ndim() == 2 ? N : 0;
        a.logb = logb.data();
        a.b_stride = logb.ndim() == 2 ? K : 0;
        F64 g0a;
        if (!g0.is_none()) {
            g0a = g0.cast<F64>();
            require(g0a.ndim() == 2 && g0a.shape(0) == B && g0a.shape(1) == K,
                    "batched_solve: g0 shape");
            a.g0 = g0a.data();
        }
        require(tol.size() == B, "batched_solve: tol size");
        a.tol = tol.data();
        a.forbidden = forbidden;
        a.max_iter = max_iter;
        a.n_iter = n_iter;
        a.memory = memory;
        a.rel_slack = rel_slack;
        a.stall_window = stall_window;
        a.eps_stages = eps_stages;
        F64 f({B, N}), g({B, K}), err(B), cost(B), max_abs(B);
        I64 it(B), labels;
        U8 stalled(B), flags(B);
        cpu::BatchedOut o;
        o.f = f.mutable_data();
        o.g = g.mutable_data();
        o.err = err.mutable_data();
        o.cost = cost.mutable_data();
        o.n_iter = it.mutable_data();
        o.stalled = stalled.mutable_data();
        o.flags = flags.mutable_data();
        o.max_abs = max_abs.mutable_data();
        if (want_labels) {
            labels = I64({B, N});
            o.labels = labels.mutable_data();
        }
        bool done;
        {
            py::gil_scoped_release nogil;
            done = cpu::batched_solve<T>(static_cast<const T*>(X.data()), a, o, n_threads,
                                         interrupted);
        }
        if (!done) throw py::error_already_set();
        py::object lab = want_labels ? py::object(labels) : py::object(py::none());
        return py::make_tuple(f, g, it, err, cost, lab, stalled, flags, max_abs);
    });
}

py::tuple multi_pass(const py::array& X, double alpha, const F64& G, const F64& loga,
                     bool want_cost, int n_threads) {
    return dispatch(X, "multi_pass", [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        require(X.ndim() == 2, "multi_pass: X must be 2-d");
        const int64_t N = X.shape(0), K = X.shape(1);
        require(G.ndim() == 2 && G.shape(1) == K, "multi_pass: G must be (k, K)");
        require(loga.size() == N, "multi_pass: loga size");
        const int64_t k = G.shape(0);
        F64 F({k, N}), col({k, K}), cost(k);
        U8 under(k);
        bool done;
        {
            py::gil_scoped_release nogil;
            done = cpu::multi_pass<T>(static_cast<const T*>(X.data()), N, K, alpha, G.data(),
                                      k, loga.data(), F.mutable_data(), col.mutable_data(),
                                      want_cost ? cost.mutable_data() : nullptr,
                                      under.mutable_data(), n_threads, interrupted);
        }
        if (!done) throw py::error_already_set();
        return py::make_tuple(F, col, want_cost ? py::object(cost) : py::object(py::none()),
                              under);
    });
}

}  // namespace

void register_batched(py::module_& m) {
    m.def("batched_solve", &batched_solve, py::arg("X"), py::arg("B"), py::arg("alpha"),
          py::arg("loga"), py::arg("logb"), py::arg("g0"), py::arg("tol"), py::arg("forbidden"),
          py::arg("max_iter"), py::arg("n_iter"), py::arg("memory"), py::arg("rel_slack"),
          py::arg("stall_window"), py::arg("eps_stages"), py::arg("want_labels"),
          py::arg("n_threads"),
          "B balanced problems, one per thread: (f, g, n_iter, err, cost, labels, stalled, "
          "flags, max_abs).");
    m.def("multi_pass", &multi_pass, py::arg("X"), py::arg("alpha"), py::arg("G"),
          py::arg("loga"), py::arg("want_cost"), py::arg("n_threads"),
          "One pass for k column potentials sharing the read of X: (F, col, cost, underflow).");
}
