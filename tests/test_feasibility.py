"""Infeasible supports (every row and column keeps an allowed pair, yet no plan exists) are
found before the first pass where that is cheap, with an error naming the violating block;
the check is exact (Hall's condition by brute force over the row patterns as the reference)
and costs the common path (no forbidden pair) one reduction."""
import itertools
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import sinkhorn_ot
from sinkhorn_ot import _feasibility


def _class_mask(rng, n, m, n_classes, p_allow=0.4, every_column=True):
    """Rows of ``n_classes`` classes, each class allowing the same random set of columns;
    ``every_column``: then a random row allows each column (a few more patterns)."""
    cls = rng.integers(0, n_classes, n)
    allow = rng.random((n_classes, m)) < p_allow
    allow[np.arange(n_classes), rng.integers(0, m, n_classes)] = True
    mask = allow[cls]
    if every_column:
        mask[rng.integers(0, n, m), np.arange(m)] = True
    return mask


def _hall_feasible(mask, a, b, margin):
    """Gale / Hall: a plan exists iff every set S of row patterns holds at most the mass of
    the columns S allows.  Returns (feasible, smallest slack over the sets)."""
    pats, inv = np.unique(mask, axis=0, return_inverse=True)
    inv = inv.ravel()
    mass = np.bincount(inv, weights=a, minlength=len(pats))
    slack = np.inf
    for k in range(1, len(pats) + 1):
        for S in itertools.combinations(range(len(pats)), k):
            cols = pats[list(S)].any(axis=0)
            slack = min(slack, b[cols].sum() - mass[list(S)].sum())
    return slack >= -margin, slack


@settings(max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 60), m=st.integers(2, 12),
       n_classes=st.integers(1, 6), p_allow=st.sampled_from([0.3, 0.6, 0.9]))
def test_verdict_matches_halls_condition(seed, n, m, n_classes, p_allow):
    """check_support against Hall's condition enumerated over every set of row patterns."""
    rng = np.random.default_rng(seed)
    mask = _class_mask(rng, n, m, n_classes, p_allow, every_column=False)
    a = rng.random(n) + 0.1
    b = rng.random(m) + 0.1
    a, b = a / a.sum(), b / b.sum()
    feasible, slack = _hall_feasible(mask, a, b, 0.0)
    assume(abs(slack) > 1e-6)  # the integer flow rounds masses to 2**-28
    if feasible:
        _feasibility.check_support(mask, a, b, "X")
    else:
        with pytest.raises(ValueError, match="infeasible"):
            _feasibility.check_support(mask, a, b, "X")


def _blocked():
    # rows 1, 4, 5 (class A, mass 1/2) allow only columns 0 and 3 (mass 2/5 together)
    n, m = 6, 5
    logP = np.log(np.random.default_rng(0).dirichlet(np.ones(m), n))
    A = [1, 4, 5]
    logP[np.ix_(A, [1, 2, 4])] = -np.inf
    return logP


def test_raises_before_the_first_pass_naming_rows_and_columns():
    logP = _blocked()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "did not converge" warning would mean it solved
        with pytest.raises(ValueError, match=r"rows 1, 4, 5 of logP \(3 rows, mass 0.5\) "
                                             r"allow only columns 0, 3 \(2 columns"):
            sinkhorn_ot.balanced_assign(logP, 25.0, max_iter=10**6)
        with pytest.raises(ValueError, match=r"rows 1, 4, 5 of C .* columns 0, 3 "):
            sinkhorn_ot.sinkhorn(-logP, reg=0.1, max_iter=10**6)
    # the same support with room enough in columns 0 and 3: solved
    res = sinkhorn_ot.balanced_assign(logP, 25.0, b=[0.3, 0.1, 0.2, 0.3, 0.1])
    assert res.converged


def test_names_the_callers_rows_and_columns_around_dropped_ones():
    # a zero-mass row with every pair forbidden (dropped before the solve) and a
    # zero-mass column: the error still names the rows and columns of the input
    C = -_blocked()
    C = np.vstack([np.full((1, C.shape[1]), np.inf), C])
    C = np.hstack([np.zeros((C.shape[0], 1)), C])
    a = np.r_[0.0, np.full(6, 1 / 6)]
    b = np.r_[0.0, np.full(5, 0.2)]
    with pytest.raises(ValueError, match=r"rows 2, 5, 6 of C .* columns 1, 4 "):
        sinkhorn_ot.sinkhorn(C, a, b, reg=0.1)


def test_no_forbidden_pair_costs_no_mask(monkeypatch):
    def fail(*args, **kw):
        raise AssertionError("the support was merged without a forbidden pair")

    monkeypatch.setattr(_feasibility, "_Merged", fail)
    logP = np.log(np.random.default_rng(1).dirichlet(np.ones(7), 50))
    assert sinkhorn_ot.balanced_assign(logP, 25.0).converged


def test_large_merged_support_is_left_to_the_diagnosis(monkeypatch):
    # above UPFRONT_PAIRS nothing runs before the solve; the unconverged solve diagnoses
    monkeypatch.setattr(_feasibility, "UPFRONT_PAIRS", 0)
    logP = _blocked()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"rows 1, 4, 5 of logP"):
            sinkhorn_ot.balanced_assign(logP, 25.0, max_iter=200)
    assert any("did not converge" in str(w.message) for w in caught)


def test_class_masks_merge_to_a_few_nodes():
    rng = np.random.default_rng(3)
    mask = _class_mask(rng, 5000, 40, 4, p_allow=0.5)
    merged = _feasibility._Merged(mask)
    assert merged.allowed.shape[0] <= 4 + 40  # the classes, plus rows the columns fixed
    assert merged.pairs <= _feasibility.UPFRONT_PAIRS
    np.testing.assert_array_equal(merged.allowed[merged.ir][:, merged.ic], mask)


def test_emd_names_the_violating_block():
    C = -_blocked()
    with pytest.raises(ValueError, match=r"rows 1, 4, 5 of C \(3 rows, mass 0.5\) allow only "
                                         r"columns 0, 3 "):
        sinkhorn_ot.emd(C)
