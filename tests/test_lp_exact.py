"""emd is exact: differential test against POT's network simplex (ot.emd) over hundreds of
random problems of several marginal families, sizes 2..300, plus the properties POT is not
needed for (marginals to round-off, complementary slackness, no false infeasibility)."""
import numpy as np
import pytest

import sinkhorn_ot

ot = pytest.importorskip("ot")


def _marginal(rng, n, family):
    if family == "uniform":
        w = np.ones(n)
    elif family == "random":
        w = rng.random(n) + 0.05
    elif family == "gauss1d":  # 1-D Gaussian histograms: tails far below HiGHS's tolerances
        x = np.linspace(0, 1, n)
        w = np.exp(-(x - rng.random()) ** 2 / (2 * (0.02 + 0.2 * rng.random()) ** 2))
        w = np.maximum(w, 1e-300)
    elif family == "tiny":  # a few entries near 1e-7
        w = rng.random(n) + 0.05
        w[rng.integers(0, n, max(1, n // 10))] = 1e-7 * rng.random()
    elif family == "zeros":
        w = rng.random(n)
        w[rng.random(n) < 0.3] = 0.0
        w[rng.integers(n)] = 1.0
    else:  # "integer": hard="exact"-like counts
        w = rng.integers(1, 5, n).astype(float)
    return w


FAMILIES = ["uniform", "random", "gauss1d", "tiny", "zeros", "integer"]


def _problem(seed):
    rng = np.random.default_rng(seed)
    big = seed % 20 == 0
    n = int(rng.integers(2, 301 if big else 41))
    m = int(rng.integers(2, 301 if big else 41))
    fam = FAMILIES[seed % len(FAMILIES)]
    a, b = _marginal(rng, n, fam), _marginal(rng, m, fam)
    if fam == "integer":  # equal integral totals
        d = int(a.sum() - b.sum())
        (b if d > 0 else a)[0] += abs(d)
    else:
        a, b = a / a.sum(), b / b.sum()
    kind = seed % 3
    if kind == 0:
        x, y = np.linspace(0, 1, n), np.linspace(0, 1, m)
        C = (x[:, None] - y[None, :]) ** 2
    elif kind == 1:
        x, y = rng.standard_normal((n, 2)), rng.standard_normal((m, 2))
        C = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))
    else:  # integer costs: many ties, degenerate vertices
        C = rng.integers(0, 5, (n, m)).astype(float)
    return C, a, b


def _check(res, C, a, b, finite=None):
    P = res.plan()
    assert P.min() >= 0 and P.nnz <= C.shape[0] + C.shape[1] - 1
    scale = a.sum()
    # marginals to round-off: 1e-12 of the mass in L1
    err = np.abs(P.sum(axis=1) - a).sum() + np.abs(P.sum(axis=0) - b * (a.sum() / b.sum()))
    assert err.sum() <= 1e-12 * scale, err.sum()
    # duals: feasible on allowed pairs and tight on the support (complementary slackness)
    Cf = C if finite is None else np.where(finite, C, np.inf)
    cmax = np.abs(C[np.isfinite(Cf)]).max() + 1.0
    R = Cf - res.f[:, None] - res.g[None, :]
    assert R.min() >= -1e-10 * cmax
    Pc = P.tocoo()
    np.testing.assert_allclose(R[Pc.row, Pc.col], 0.0, atol=1e-10 * cmax)
    np.testing.assert_allclose(res.f @ a + res.g @ (b * a.sum() / b.sum()), res.cost,
                               rtol=1e-10, atol=1e-12 * cmax * scale)
    np.testing.assert_allclose((P.toarray() * np.where(P.toarray() > 0, C, 0)).sum(),
                               res.cost, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("block", range(10))
def test_matches_pot_on_hundreds_of_problems(block):
    """300 problems (30 a block), 6 marginal families, 3 cost kinds, sizes 2..300: cost equal
    to ot.emd's to 1e-10 relative, plan exact on its marginals, duals certify it."""
    for seed in range(30 * block, 30 * block + 30):
        C, a, b = _problem(seed)
        res = sinkhorn_ot.emd(C, a, b)
        ref = float(np.sum(ot.emd(a, b * (a.sum() / b.sum()), C, numItermax=10**7) * C))
        np.testing.assert_allclose(res.cost, ref, rtol=1e-10, atol=1e-14 * a.sum(),
                                   err_msg=f"seed {seed}")
        _check(res, C, a, b)


def test_square_uniform_path_has_certifying_duals():
    rng = np.random.default_rng(7)
    for n in (2, 5, 40, 120):
        C = rng.random((n, n))
        res = sinkhorn_ot.emd(C)
        assert res.method == "assignment"
        a = np.full(n, 1.0 / n)
        np.testing.assert_allclose(res.cost, ot.emd2(a, a, C), rtol=1e-10)
        _check(res, C, a, a)


def test_forbidden_pairs_against_pot_with_a_huge_cost():
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        n, m = rng.integers(2, 60, 2)
        C = rng.random((n, m))
        allowed = rng.random((n, m)) < 0.6
        allowed[np.arange(n), rng.integers(0, m, n)] = True
        # marginals from a plan on the allowed pattern: feasible by construction
        Q = np.where(allowed, rng.random((n, m)), 0.0)
        Q /= Q.sum()
        a, b = Q.sum(1), Q.sum(0)
        keep = b > 0
        C, allowed, b = C[:, keep], allowed[:, keep], b[keep]
        Cinf = np.where(allowed, C, np.inf)
        res = sinkhorn_ot.emd(Cinf, a, b)
        M = np.where(allowed, C, 1e6)
        np.testing.assert_allclose(res.cost, np.sum(ot.emd(a, b, M) * M), rtol=1e-10)
        assert res.plan().toarray()[~allowed].sum() == 0
        _check(res, Cinf, a, b, finite=allowed)


def test_true_infeasibility_still_raises():
    C = np.array([[0.0, np.inf, np.inf], [0.0, np.inf, np.inf], [0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="infeasible"):
        sinkhorn_ot.emd(C, a=[1 / 3] * 3, b=[0.1, 0.45, 0.45])


def test_perturbation_fallback_keeps_the_answer_exact(monkeypatch):
    """With a perturbation far too large, the perturbed optimum's tree is not feasible for
    the marginals as given: the pivots run again on them, and the answer is unchanged."""
    from sinkhorn_ot import _simplex

    rng = np.random.default_rng(11)
    for seed in range(6):
        C, a, b = _problem(900 + seed)
        plain = sinkhorn_ot.emd(C, a, b)
        monkeypatch.setattr(_simplex, "PERTURBATION", 0.5)
        res = sinkhorn_ot.emd(C, a, b)
        monkeypatch.undo()
        np.testing.assert_allclose(res.cost, plain.cost, rtol=1e-12, atol=1e-15)
        _check(res, C, a, b)
    n, m = rng.integers(5, 30, 2)
    C, a, b = rng.random((n, m)), rng.random(n), rng.random(m)
    a, b = a / a.sum(), b / b.sum()
    for perturb in (False, True):
        rows, cols, x, f, g = _simplex.finish(C, a, b, _simplex._northwest(a, b),
                                              perturb=perturb)
        np.testing.assert_allclose(float(x @ C[rows, cols]), float(np.sum(ot.emd(a, b, C) * C)),
                                   rtol=1e-12)
