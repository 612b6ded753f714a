"""Every bad input raises ValueError or TypeError with a message that names the problem."""
import warnings

import numpy as np
import pytest

import sinkhorn_ot as so
from reference import random_logP

LOGP = random_logP(6, 4, seed=0)
C = -LOGP


def _with(X, i, j, v):
    X = X.copy()
    X[i, j] = v
    return X


# ---------------------------------------------------------------- matrix values
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "+inf"])
def test_logP_nan_or_plus_inf_names_the_entry(bad, dtype):
    X = _with(LOGP, 4, 2, bad).astype(dtype)
    with pytest.raises(ValueError, match=r"logP.*\(4, 2\)"):
        so.balanced_assign(X, 25.0)


@pytest.mark.parametrize("bad", [np.nan, -np.inf], ids=["nan", "-inf"])
def test_C_nan_or_minus_inf_names_the_entry(bad):
    X = _with(C, 1, 3, bad)
    with pytest.raises(ValueError, match=r"C.*\(1, 3\)"):
        so.sinkhorn(X, reg=0.1)


def test_first_bad_entry_is_reported():
    X = _with(_with(LOGP, 5, 0, np.nan), 2, 3, np.nan)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        so.balanced_assign(X, 25.0)


def test_nan_hidden_among_forbidden_entries_is_found():
    X = LOGP.copy()
    X[1, :] = -np.inf
    X[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"\(1, 0\)"):
        so.balanced_assign(X, 25.0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_all_forbidden_row_names_the_row(dtype):
    X = LOGP.copy().astype(dtype)
    X[3, :] = -np.inf
    with pytest.raises(ValueError, match=r"row 3"):
        so.balanced_assign(X, 25.0)
    with pytest.raises(ValueError, match=r"row 3"):
        so.sinkhorn(-X, reg=0.1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_all_forbidden_column_names_the_column(dtype):
    X = LOGP.copy().astype(dtype)
    X[:, 2] = -np.inf
    with pytest.raises(ValueError, match=r"column 2"):
        so.balanced_assign(X, 25.0)
    with pytest.raises(ValueError, match=r"column 2"):
        so.sinkhorn(-X, reg=0.1)


def test_row_allowed_only_in_massless_columns_is_infeasible():
    X = LOGP.copy()
    X[2, :] = -np.inf
    X[2, 1] = -1.0
    with pytest.raises(ValueError, match=r"row 2"):
        so.balanced_assign(X, 25.0, b=[0.5, 0.0, 0.25, 0.25])


# -------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5), ()], ids=["1d", "4d", "0d"])
def test_wrong_ndim(shape):  # (3-d is a batch of problems: tests/test_batched.py)
    X = np.zeros(shape)
    with pytest.raises(ValueError, match=r"2-d"):
        so.balanced_assign(X, 25.0)
    with pytest.raises(ValueError, match=r"2-d"):
        so.sinkhorn(X, reg=0.1)


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 0)])
def test_empty_arrays(shape):
    X = np.zeros(shape)
    with pytest.raises(ValueError, match=r"empty"):
        so.balanced_assign(X, 25.0)
    with pytest.raises(ValueError, match=r"empty"):
        so.sinkhorn(X, reg=0.1)


@pytest.mark.parametrize("which", ["a", "b"])
@pytest.mark.parametrize("bad", [np.full(5, 0.2), np.full(7, 1 / 7), np.full((6, 1), 1 / 6)],
                         ids=["short", "long", "2d"])
def test_marginal_shape_mismatch(which, bad):
    a, b = np.full(6, 1 / 6), np.full(4, 1 / 4)
    kw = {"a": a, "b": b}
    if which == "b" and bad.shape == (6, 1):  # (b of shape (4, k) is k targets)
        bad = np.full((5, 1), 1 / 5)
    kw[which] = bad
    with pytest.raises(ValueError, match=rf"\b{which}\b.*shape"):
        so.sinkhorn(C, kw["a"], kw["b"], reg=0.1)


def test_balanced_assign_b_shape_mismatch():
    with pytest.raises(ValueError, match=r"\bb\b.*shape"):
        so.balanced_assign(LOGP, 25.0, b=np.full(5, 0.2))


# ----------------------------------------------------------------- marginals
@pytest.mark.parametrize("which", ["a", "b"])
def test_negative_marginal_names_the_index(which):
    v = np.full(6 if which == "a" else 4, 0.5)
    v[2] = -0.5
    v[-1] += 1.0  # keep the total so only the sign is wrong
    kw = {"a": None, "b": None, which: v / v.sum()}
    if which == "a":
        kw["b"] = np.full(4, 1 / 4)
    with pytest.raises(ValueError, match=rf"{which}.*negative.*2"):
        so.sinkhorn(C, kw["a"], kw["b"], reg=0.1)


@pytest.mark.parametrize("which", ["a", "b"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_marginal(which, bad):
    v = np.full(6 if which == "a" else 4, 0.25)
    v[1] = bad
    kw = {"a": None, "b": None, which: v}
    with pytest.raises(ValueError, match=rf"{which}.*non-finite.*1"):
        so.sinkhorn(C, kw["a"], kw["b"], reg=0.1)


@pytest.mark.parametrize("which", ["a", "b"])
def test_all_zero_marginal(which):
    v = np.zeros(6 if which == "a" else 4)
    kw = {"a": None, "b": None, which: v}
    with pytest.raises(ValueError, match=rf"{which}.*zero"):
        so.sinkhorn(C, kw["a"], kw["b"], reg=0.1)
    if which == "b":
        with pytest.raises(ValueError, match=r"b.*zero"):
            so.balanced_assign(LOGP, 25.0, b=v)


def test_unequal_totals():
    with pytest.raises(ValueError, match=r"equal totals"):
        so.sinkhorn(C, np.full(6, 1 / 6), np.full(4, 0.3), reg=0.1)
    with pytest.raises(ValueError, match=r"equal totals"):
        so.balanced_assign(LOGP, 25.0, b=np.full(4, 0.5))


def test_totals_equal_within_relative_1e6_are_accepted():
    b = np.full(4, 0.25) * (1 + 5e-7)
    res = so.sinkhorn(C, None, b, reg=0.5)
    assert np.all(np.isfinite(res.f)) and np.all(np.isfinite(res.g))
    with pytest.raises(ValueError, match=r"equal totals"):
        so.sinkhorn(C, None, np.full(4, 0.25) * (1 + 5e-6), reg=0.5)


@pytest.mark.parametrize("which", ["a", "b"])
def test_complex_or_bool_marginal_is_a_type_error(which):
    n = 6 if which == "a" else 4
    for v in (np.full(n, 1 / n, dtype=complex), np.ones(n, dtype=bool)):
        kw = {"a": None, "b": None, which: v}
        with pytest.raises(TypeError, match=rf"{which}"):
            so.sinkhorn(C, kw["a"], kw["b"], reg=0.1)


# ----------------------------------------------------------------- scalars
@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, -np.inf, np.nan])
def test_lam_and_reg_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match=r"lam"):
        so.balanced_assign(LOGP, bad)
    with pytest.raises(ValueError, match=r"reg"):
        so.sinkhorn(C, reg=bad)


@pytest.mark.parametrize("bad", ["1", None, True, 1j])
def test_lam_and_reg_of_wrong_type(bad):
    with pytest.raises(TypeError, match=r"lam"):
        so.balanced_assign(LOGP, bad)
    with pytest.raises(TypeError, match=r"reg"):
        so.sinkhorn(C, reg=bad)


def test_reg_is_required_and_keyword_only():
    with pytest.raises(TypeError):
        so.sinkhorn(C)
    with pytest.raises(TypeError):
        so.sinkhorn(C, None, None, 0.1)
    with pytest.raises(TypeError):
        so.balanced_assign(LOGP, 25.0, None)


@pytest.mark.parametrize("name,bad,exc", [
    ("tol", 0.0, ValueError), ("tol", -1e-6, ValueError), ("tol", np.nan, ValueError),
    ("max_iter", 0, ValueError), ("max_iter", 2.5, TypeError),
    ("n_iter", 0, ValueError), ("n_iter", -3, ValueError), ("n_iter", 3.0, TypeError),
    ("n_threads", 0, ValueError), ("n_threads", -1, ValueError),
])
def test_options_are_validated(name, bad, exc):
    with pytest.raises(exc, match=name):
        so.balanced_assign(LOGP, 25.0, **{name: bad})
    with pytest.raises(exc, match=name):
        so.sinkhorn(C, reg=0.1, **{name: bad})


def test_init_of_wrong_shape_or_non_finite():
    with pytest.raises(ValueError, match=r"init.*shape"):
        so.balanced_assign(LOGP, 25.0, init=np.zeros(5))
    with pytest.raises(ValueError, match=r"init"):
        so.balanced_assign(LOGP, 25.0, init=np.array([0.0, np.nan, 0.0, 0.0]))
    prev = so.balanced_assign(random_logP(6, 5, seed=1), 25.0, n_iter=2)
    with pytest.raises(ValueError, match=r"init.*shape"):
        so.balanced_assign(LOGP, 25.0, init=prev)


# --------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.complex128, np.complex64,
                                   np.bool_])
def test_non_real_float_dtypes_are_type_errors(dtype):
    X = np.ones((6, 4), dtype=dtype)
    with pytest.raises(TypeError, match=r"logP.*floating"):
        so.balanced_assign(X, 25.0)
    with pytest.raises(TypeError, match=r"C.*floating"):
        so.sinkhorn(X, reg=0.1)


def test_object_dtype_is_a_type_error():
    X = np.array([[1.0, "x"], [0.0, 1.0]], dtype=object)
    with pytest.raises(TypeError):
        so.sinkhorn(X, reg=0.1)


def test_float16_input_is_solved_in_float32():
    X = LOGP.astype(np.float16)
    res = so.balanced_assign(X, 5.0, tol=1e-6)
    ref = so.balanced_assign(X.astype(np.float32), 5.0, tol=1e-6)
    np.testing.assert_allclose(res.plan().astype(np.float64),
                               ref.plan().astype(np.float64), rtol=1e-6, atol=1e-9)


def test_overflowing_scale_is_reported():
    X = np.array([[0.0, -3e35], [-3e35, 0.0]], dtype=np.float32)
    with pytest.raises(ValueError, match=r"overflow"):
        so.balanced_assign(X, 1e4)


def test_errors_leave_inputs_untouched():
    X = _with(LOGP, 0, 0, np.nan)
    X0 = X.copy()
    b = np.full(4, 0.5)
    with pytest.raises(ValueError):
        so.balanced_assign(X, 25.0, b=b)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(b, np.full(4, 0.5))


def test_overflow_check_emits_no_runtime_warning():
    X = np.array([[0.0, -3e35], [-3e35, 0.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match=r"overflow"):
            so.balanced_assign(X, 1e4)


# ------------------------------------------------ options checked before the matrix
@pytest.mark.parametrize("bad,exc", [(2.7, TypeError), (-3, ValueError), ("yes", TypeError),
                                     (None, TypeError), (np.float64(2.0), TypeError)])
def test_eps_scaling_takes_a_bool_or_a_number_of_stages(bad, exc):
    with pytest.raises(exc, match="eps_scaling"):
        so.balanced_assign(LOGP, 25.0, eps_scaling=bad)
    with pytest.raises(exc, match="eps_scaling"):
        so.sinkhorn(C, reg=0.1, eps_scaling=bad)


@pytest.mark.parametrize("good", [True, False, 0, 3, np.int64(1)])
def test_eps_scaling_accepts_bools_and_ints(good):
    res = so.balanced_assign(LOGP, 25.0, eps_scaling=good)
    assert res.converged


@pytest.mark.parametrize("name,bad", [("acceleration", "yes"), ("acceleration", True),
                                      ("eps_scaling", 2.7), ("tol", -1.0),
                                      ("max_iter", 0), ("n_iter", 1.5), ("n_threads", 0)])
def test_options_are_checked_before_the_matrix(name, bad):
    """An invalid option is reported even when the matrix is invalid too (it is checked
    first, before any scan of the matrix)."""
    X = _with(LOGP, 1, 1, np.nan)
    with pytest.raises((ValueError, TypeError), match=name):
        so.balanced_assign(X, 25.0, **{name: bad})
    if name not in ("acceleration", "eps_scaling"):
        with pytest.raises((ValueError, TypeError), match=name):
            so.sinkhorn_unbalanced(-X, reg=0.1, reg_m=1.0, **{name: bad})


# ------------------------------------------------------- warnings name the caller
@pytest.mark.parametrize("kw", [dict(), dict(acceleration=None, eps_scaling=False)],
                         ids=["generic-loop", "backend-loop"])
def test_non_convergence_warning_points_at_the_caller(kw):
    X = random_logP(200, 7, seed=3)
    calls = [lambda: so.balanced_assign(X, 50.0, max_iter=2, tol=1e-12, **kw),
             lambda: so.sinkhorn(-X, reg=0.02, max_iter=2, tol=1e-12, **kw),
             lambda: so.sinkhorn_unbalanced(-X, reg=0.02, reg_m=1.0, max_iter=2, tol=1e-12)]
    for call in calls:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            res = call()
        assert not res.converged
        hits = [x for x in w if "did not converge" in str(x.message)]
        assert len(hits) == 1, [str(x.message) for x in w]
        assert hits[0].filename == __file__
