"""Gradients of sinkhorn_ot.torch: the cost and the debiased divergence.

References: torch.autograd.gradcheck (central finite differences of re-solved problems),
POT's Sinkhorn solvers on torch tensors differentiated by autograd through their unrolled
iterations, the primal objectives of the library's own results, and GeomLoss's dual formula
of the divergence evaluated on independently solved potentials.
"""
import math
import tracemalloc
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sinkhorn_ot  # noqa: E402
from sinkhorn_ot.torch import sinkhorn_cost, sinkhorn_divergence  # noqa: E402

INF = math.inf
RELAXED = [0.7, (INF, 0.5), (0.5, INF)]  # both sides, columns only, rows only
TIGHT = 1e-13


def problem(n, m, seed, dtype=torch.float64, forbidden=0):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(n, m, generator=g, dtype=torch.float64)
    for k in range(forbidden):  # off the diagonal: every row and column keeps a pair
        C[k, (k + 1) % m] = INF
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.2
    return C.to(dtype), (a / a.sum()).to(dtype), (b / b.sum()).to(dtype)


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def balanced_fn(reg):
    # the balanced cost needs sum(a) = sum(b): perturb a and b through a normalisation
    return lambda C, x, y: sinkhorn_cost(C, x / x.sum(), y / y.sum(), reg=reg, tol=TIGHT)


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("forbidden", [0, 3])
def test_gradcheck_balanced(forbidden):
    C, a, b = problem(5, 4, seed=1, forbidden=forbidden)
    assert torch.autograd.gradcheck(balanced_fn(0.3), tuple(leaves(C, a, b)),
                                    atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("forbidden", [0, 3])
@pytest.mark.parametrize("reg_m", RELAXED)
def test_gradcheck_relaxed(reg_m, forbidden):
    C, a, b = problem(5, 4, seed=2, forbidden=forbidden)
    a, b = 0.7 * a, 1.3 * b  # unequal totals: the relaxed sides move mass
    fn = lambda C, a, b: sinkhorn_cost(C, a, b, reg=0.3, reg_m=reg_m, tol=TIGHT)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(leaves(C, a, b)), atol=1e-6, rtol=1e-4)


def test_forbidden_pairs_have_zero_gradient():
    C, a, b = problem(6, 5, seed=3, forbidden=4)
    C, a, b = leaves(C, a, b)
    sinkhorn_cost(C, a, b, reg=0.2, tol=TIGHT).backward()
    assert torch.isfinite(C.grad).all() and torch.isfinite(a.grad).all()
    assert (C.grad[torch.isinf(C)] == 0).all()


# ----------------------------------------------------------------------------- POT
ot = pytest.importorskip("ot")


def kl(x, y):
    """Generalised KL, sum x log(x / y) - sum x + sum y (x > 0 everywhere here)."""
    return (x * torch.log(x / y) - x + y).sum()


def pot_objective(C, a, b, reg, reg_m):
    """POT's plan on torch tensors (autograd through its iterations) and the objective of
    sinkhorn_cost evaluated on it."""
    if reg_m is None:
        P = ot.bregman.sinkhorn_log(a, b, C, reg, numItermax=20000, stopThr=1e-15)
        tau = (INF, INF)
    else:
        P = ot.unbalanced.sinkhorn_unbalanced(a, b, C, reg, reg_m, method="sinkhorn",
                                              reg_type="kl", numItermax=20000,
                                              stopThr=1e-15)
        tau = reg_m if isinstance(reg_m, tuple) else (reg_m, reg_m)
    obj = (P * C).sum() + reg * kl(P, a[:, None] * b[None, :])
    if tau[0] < INF:
        obj = obj + tau[0] * kl(P.sum(1), a)
    if tau[1] < INF:
        obj = obj + tau[1] * kl(P.sum(0), b)
    return obj


@pytest.mark.parametrize("reg_m", [None] + RELAXED)
def test_matches_pot_autograd(reg_m):
    C, a, b = problem(7, 5, seed=4)
    if reg_m is not None:
        a, b = 0.8 * a, 1.1 * b
    reg = 0.25
    ours = leaves(C, a, b)
    v = sinkhorn_cost(*ours, reg=reg, reg_m=reg_m, tol=TIGHT)
    v.backward()
    ref = leaves(C, a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = pot_objective(*ref, reg, reg_m)
    w.backward()
    np.testing.assert_allclose(v.item(), w.item(), rtol=1e-10)
    np.testing.assert_allclose(ours[0].grad, ref[0].grad, rtol=0, atol=1e-10)
    for t, r in zip(ours[1:], ref[1:]):
        g = r.grad
        if reg_m is None:  # balanced: the gradients of a and b are defined up to a constant
            g = g - g.mean()
            np.testing.assert_allclose(t.grad.mean().item(), 0.0, atol=1e-13)
        np.testing.assert_allclose(t.grad, g, rtol=0, atol=1e-8)


def test_matches_pot_solve_and_sinkhorn2():
    """``ot.solve`` (reg_type="KL", autodiff through its iterations) has the same value and
    gradients; ``ot.sinkhorn2`` reports the linear part ``<P, C>`` of the plan alone."""
    C, a, b = problem(7, 5, seed=4)
    reg = 0.25
    ours = leaves(C, a, b)
    v = sinkhorn_cost(*ours, reg=reg, tol=TIGHT)
    v.backward()
    ref = leaves(C, a, b)
    r = ot.solve(*ref, reg=reg, grad="autodiff", tol=1e-15, max_iter=20000)
    r.value.backward()
    np.testing.assert_allclose(v.item(), r.value.item(), rtol=1e-12)
    np.testing.assert_allclose(ours[0].grad, ref[0].grad, rtol=0, atol=1e-12)
    for t, g in ((ours[1], ref[1].grad), (ours[2], ref[2].grad)):
        np.testing.assert_allclose(t.grad, g - g.mean(), rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = ot.sinkhorn2(a, b, C, reg, stopThr=1e-15, numItermax=20000)
    np.testing.assert_allclose((ours[0].grad * C).sum().item(), lin.item(), rtol=1e-12)


def test_pot_envelope_gradient_of_a_is_the_entropy_objectives():
    """What docs/migration.rst says of POT: ``ot.solve(grad="envelope")`` returns for ``a``
    reg times its centred log u, which differs from the gradient of its KL value by
    reg (log a - mean log a)."""
    C, a, b = problem(7, 5, seed=4)
    reg = 0.25
    ours = leaves(C, a, b)
    sinkhorn_cost(*ours, reg=reg, tol=TIGHT).backward()
    ref = leaves(C, a, b)
    ot.solve(*ref, reg=reg, grad="envelope", tol=1e-15, max_iter=20000).value.backward()
    la = torch.log(a)
    np.testing.assert_allclose(ref[1].grad - ours[1].grad, reg * (la - la.mean()), atol=1e-12)


def test_plan_gradient_is_the_library_plan():
    C, a, b = problem(30, 20, seed=5)
    Cg = C.clone().requires_grad_(True)
    sinkhorn_cost(Cg, a, b, reg=0.1, tol=1e-10).backward()
    res = sinkhorn_ot.sinkhorn(C, a, b, reg=0.1, tol=1e-10)
    np.testing.assert_allclose(Cg.grad, res.plan(), rtol=1e-12, atol=1e-15)


def test_value_is_the_primal_objective_at_convergence():
    C, a, b = problem(30, 20, seed=6)
    reg = 0.1
    res = sinkhorn_ot.sinkhorn(C, a, b, reg=reg, tol=TIGHT)
    P = res.plan()
    primal = (P * C).sum() + reg * kl(P, a[:, None] * b[None, :])
    np.testing.assert_allclose(sinkhorn_cost(C, a, b, reg=reg, tol=TIGHT).item(),
                               primal.item(), rtol=1e-11)
    u = sinkhorn_ot.sinkhorn_unbalanced(C, 0.5 * a, b, reg=reg, reg_m=(INF, 0.3), tol=TIGHT)
    v = sinkhorn_cost(C, 0.5 * a, b, reg=reg, reg_m=(INF, 0.3), tol=TIGHT)
    np.testing.assert_allclose(v.item(), u.objective, rtol=1e-10)


@pytest.mark.parametrize("reg_m", [None, 0.7, (INF, 0.5)])
def test_exact_for_the_dual_of_a_stopped_solve(reg_m):
    """Three passes, far from converged: the value is the dual objective D(F, G) of the
    returned potentials and the gradient is D's with F and G held fixed (written out here
    in torch and differentiated by autograd)."""
    C, a, b = problem(8, 6, seed=22)
    a, b = (a, b) if reg_m is None else (0.8 * a, 1.2 * b)
    reg = 0.2
    tau = (INF, INF) if reg_m is None else (reg_m if isinstance(reg_m, tuple) else (reg_m,) * 2)
    ours = leaves(C, a, b)
    v = sinkhorn_cost(*ours, reg=reg, reg_m=reg_m, n_iter=3)
    v.backward()
    if reg_m is None:
        res = sinkhorn_ot.sinkhorn(C, a, b, reg=reg, n_iter=3)
    else:
        res = sinkhorn_ot.sinkhorn_unbalanced(C, a, b, reg=reg, reg_m=reg_m, n_iter=3)
    assert res.err > 1e-4  # really stopped early
    F, G = reg * (res.f - torch.log(a)), reg * (res.g - torch.log(b))  # constants

    def phi(P, t):
        return P if t == INF else t * (1 - torch.exp(-P / t))

    ref = leaves(C, a, b)
    Cr, ar, br = ref
    D = ((ar * phi(F, tau[0])).sum() + (br * phi(G, tau[1])).sum()
         - reg * (ar[:, None] * br[None, :] * (torch.exp((F[:, None] + G[None, :] - Cr) / reg)
                                                - 1)).sum())
    D.backward()
    np.testing.assert_allclose(v.item(), D.item(), rtol=1e-13)
    np.testing.assert_allclose(ours[0].grad, Cr.grad, rtol=1e-12, atol=1e-15)
    for t, r in zip(ours[1:], (ar, br)):
        g = r.grad - r.grad.mean() if reg_m is None else r.grad
        np.testing.assert_allclose(t.grad, g, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------- finite differences
@pytest.mark.parametrize("reg_m", [None, 0.5])
def test_float32_gradient_against_float64_finite_differences(reg_m):
    """The float32 gradient (default tol, 1e-5 of the mass) along random directions, against
    central differences of float64 solves to 1e-13: within 1e-4 of the derivative's scale."""
    C, a, b = problem(40, 30, seed=7)
    reg = 0.1
    C32 = C.float().requires_grad_(True)
    a32 = a.float().requires_grad_(True)
    out = sinkhorn_cost(C32, a32, b.float(), reg=reg, reg_m=reg_m)
    assert out.dtype == torch.float32
    out.backward()
    assert C32.grad.dtype == torch.float32 and a32.grad.dtype == torch.float32
    g = torch.Generator().manual_seed(8)
    h = 1e-5
    for _ in range(3):
        D = torch.randn(C.shape, generator=g, dtype=torch.float64)
        da = torch.randn(a.shape, generator=g, dtype=torch.float64)
        if reg_m is None:
            da -= da.mean()  # keep the total
        val = lambda t: sinkhorn_cost(C + t * D, a + t * da, b, reg=reg, reg_m=reg_m,  # noqa: E731
                                      tol=TIGHT).item()
        fd = (val(h) - val(-h)) / (2 * h)
        ours = (C32.grad.double() * D).sum().item() + (a32.grad.double() * da).sum().item()
        scale = (C32.grad.double().abs() * D.abs()).sum().item()
        np.testing.assert_allclose(ours, fd, rtol=0, atol=1e-4 * scale)


def test_zero_weight_gradients_are_one_sided_derivatives():
    C, a, b = problem(6, 5, seed=9)
    reg, h = 0.3, 1e-6
    a = a.clone()
    a[2] = 0.0
    a = a / a.sum()
    # relaxed: the derivative in a_2 alone
    A = a.clone().requires_grad_(True)
    sinkhorn_cost(C, A, b, reg=reg, reg_m=0.5, tol=TIGHT).backward()
    e = torch.zeros_like(a)
    e[2] = 1.0
    val = lambda w: sinkhorn_cost(C, w, b, reg=reg, reg_m=0.5, tol=TIGHT).item()  # noqa: E731
    np.testing.assert_allclose(A.grad[2].item(), (val(a + h * e) - val(a)) / h, atol=1e-5)
    # balanced: along e_2 - e_0, which keeps the total
    A = a.clone().requires_grad_(True)
    sinkhorn_cost(C, A, b, reg=reg, tol=TIGHT).backward()
    d = e.clone()
    d[0] = -1.0
    val = lambda w: sinkhorn_cost(C, w, b, reg=reg, tol=TIGHT).item()  # noqa: E731
    np.testing.assert_allclose((A.grad * d).sum().item(), (val(a + h * d) - val(a)) / h,
                               atol=1e-5)
    # a zero column weight (the c-transform of f), relaxed and balanced
    bz = b.clone()
    bz[1] = 0.0
    bz = bz / bz.sum()
    e = torch.zeros_like(b)
    e[1], e[0] = 1.0, -1.0
    for reg_m, d in ((0.5, e.abs() * (e > 0)), (None, e)):
        B = bz.clone().requires_grad_(True)
        sinkhorn_cost(C, a, B, reg=reg, reg_m=reg_m, tol=TIGHT).backward()
        v0, v1 = (sinkhorn_cost(C, a, w, reg=reg, reg_m=reg_m, tol=TIGHT).item()
                  for w in (bz, bz + h * d))
        np.testing.assert_allclose((B.grad * d).sum().item(), (v1 - v0) / h, atol=1e-5)


# ----------------------------------------------------------------------------- divergence
def sqdist(x, y):
    return ((x[:, None] - y[None]) ** 2).sum(-1) / 2


def clouds(n, m, seed, shift=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.randn(m, 2, generator=g, dtype=torch.float64) * 0.7 + shift
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    return x, y, a / a.sum(), b / b.sum()


def divergence(x, y, a, b, **kw):
    return sinkhorn_divergence(sqdist(x, y), sqdist(x, x), sqdist(y, y), a, b, **kw)


@pytest.mark.parametrize("reg_m", [None, 1.0])
@pytest.mark.parametrize("reg", [0.05, 0.5])
def test_divergence_is_nonnegative(reg, reg_m):
    for seed in range(4):
        x, y, a, b = clouds(20, 15, seed, shift=0.3 * seed)
        if reg_m is not None:
            b = b * (0.5 + 0.4 * seed)  # different masses
        S = divergence(x, y, a, b, reg=reg, reg_m=reg_m, tol=1e-9).item()
        assert S > 1e-6, (seed, S)


@pytest.mark.parametrize("reg_m", [None, 1.0])
def test_divergence_vanishes_at_equal_measures(reg_m):
    x, _, a, _ = clouds(25, 1, seed=10)
    X = x.clone().requires_grad_(True)
    S = divergence(X, x, a, a, reg=0.1, reg_m=reg_m, tol=1e-12)
    assert abs(S.item()) <= 1e-13
    S.backward()
    np.testing.assert_allclose(X.grad, 0.0, atol=1e-9)
    # the same measure with its points listed in another order: the solves differ
    perm = torch.randperm(25, generator=torch.Generator().manual_seed(1))
    S = divergence(x, x[perm], a, a[perm], reg=0.1, reg_m=reg_m, tol=1e-12)
    assert abs(S.item()) <= 1e-10


@pytest.mark.parametrize("reg_m", [None, 0.5])
def test_self_transport_symmetric_update(reg_m):
    """The self-transport terms use the symmetric update: the same value as the general
    solve, in far fewer passes where the alternating updates oscillate (this cloud's at
    reg 0.05: 31 symmetric passes to 1e-12, the general solve stalls near 4e-7)."""
    from sinkhorn_ot.torch import _options, _solve
    x, _, a, _ = clouds(20, 1, seed=0)
    reg, tau = _options(0.05, reg_m)
    C = sqdist(x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sym = _solve(C, a, a, reg, tau, 1e-12, 300, None, None, symmetric=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = _solve(C, a, a, reg, tau, 1e-12, 20000, None, None)
    np.testing.assert_allclose(sym.value, gen.value, rtol=1e-7 if reg_m is None else 1e-12)
    if reg_m is None:
        with pytest.warns(UserWarning, match="did not converge"):
            _solve(C, a, a, reg, tau, 1e-12, 300, None, None)


def test_asymmetric_self_costs_take_the_general_solve():
    x, y, a, b = clouds(12, 9, seed=3)
    C_aa = sqdist(x, x)
    C_aa[0, 1] += 1e-3  # no longer symmetric: the averaged update would not be its solve
    S = sinkhorn_divergence(sqdist(x, y), C_aa, sqdist(y, y), a, b, reg=0.3, tol=TIGHT)
    ref = (sinkhorn_cost(sqdist(x, y), a, b, reg=0.3, tol=TIGHT)
           - 0.5 * sinkhorn_cost(C_aa, a, a, reg=0.3, tol=TIGHT)
           - 0.5 * sinkhorn_cost(sqdist(y, y), b, b, reg=0.3, tol=TIGHT))
    np.testing.assert_allclose(S.item(), ref.item(), rtol=1e-12)


def _potentials(C, w1, w2, reg, reg_m):
    """F, G = reg (f - log w) of the library's solve (NumPy, tight tolerance)."""
    C, w1, w2 = (t.detach().numpy() for t in (C, w1, w2))
    if reg_m is None:
        r = sinkhorn_ot.sinkhorn(C, w1, w2, reg=reg, tol=TIGHT)
    else:
        r = sinkhorn_ot.sinkhorn_unbalanced(C, w1, w2, reg=reg, reg_m=reg_m, tol=TIGHT)
    return reg * (r.f - np.log(w1)), reg * (r.g - np.log(w2))


@pytest.mark.parametrize("reg_m", [None, 0.8])
def test_divergence_matches_geomloss_dual_formula(reg_m):
    """GeomLoss's sinkhorn_cost (debias=True): <a, f_ba - f_aa> + <b, g_ab - g_bb>, and in
    the unbalanced case (rho + eps / 2) (<a, e^{-f_aa/rho} - e^{-f_ba/rho}> + <b, e^{-g_bb/rho}
    - e^{-g_ab/rho}>), with self potentials symmetric (f_aa = g_aa)."""
    x, y, a, b = clouds(18, 12, seed=11)
    if reg_m is not None:
        b = 1.4 * b
    reg = 0.2
    F, G = _potentials(sqdist(x, y), a, b, reg, reg_m)
    Faa = np.mean(_potentials(sqdist(x, x), a, a, reg, reg_m), axis=0)
    Gbb = np.mean(_potentials(sqdist(y, y), b, b, reg, reg_m), axis=0)
    an, bn = a.numpy(), b.numpy()
    if reg_m is None:
        ref = an @ (F - Faa) + bn @ (G - Gbb)
    else:
        w = reg_m + reg / 2
        e = lambda t: np.exp(-t / reg_m)  # noqa: E731
        ref = w * (an @ (e(Faa) - e(F)) + bn @ (e(Gbb) - e(G)))
    S = divergence(x, y, a, b, reg=reg, reg_m=reg_m, tol=TIGHT).item()
    np.testing.assert_allclose(S, ref, rtol=1e-9)


@pytest.mark.parametrize("reg_m", [None, 0.6])
def test_gradcheck_divergence_in_the_points(reg_m):
    x, y, a, b = clouds(6, 5, seed=12)
    if reg_m is not None:
        b = 1.3 * b
    fn = lambda X, A: divergence(X, y, A, b, reg=0.3, reg_m=reg_m, tol=TIGHT)  # noqa: E731
    if reg_m is None:
        fn = lambda X, A: divergence(X, y, A / A.sum(), b, reg=0.3, tol=TIGHT)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(leaves(x, a)), atol=1e-6, rtol=1e-4)


def test_divergence_errors():
    x, y, a, b = clouds(4, 3, seed=0)
    with pytest.raises(ValueError, match="one number"):
        divergence(x, y, a, b, reg=0.1, reg_m=(1.0, INF))
    with pytest.raises(ValueError, match="C_bb must have shape"):
        sinkhorn_divergence(sqdist(x, y), sqdist(x, x), sqdist(x, x), reg=0.1)
    with pytest.raises(TypeError, match="C_aa must be a torch.Tensor"):
        sinkhorn_divergence(sqdist(x, y), sqdist(x, x).numpy(), sqdist(y, y), reg=0.1)


# ----------------------------------------------------------------------------- memory
def _saved(fn):
    """(bytes, data pointer) of every tensor autograd saves while ``fn`` builds a graph."""
    saved = []

    def pack(t):
        saved.append((t.numel() * t.element_size(), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_saved_tensors_are_the_input_and_vectors_only():
    n, m = 300, 200
    C, a, b = problem(n, m, seed=13)
    C, a, b = leaves(C, a, b)
    sizes = {}
    for n_iter in (2, 200):
        out, saved = _saved(lambda: sinkhorn_cost(C, a, b, reg=0.05, n_iter=n_iter))
        big = [s for s in saved if s[0] > 8 * (n + m)]
        # the matrix by reference (no copy), everything else O(n + m)
        assert big == [(C.numel() * 8, C.untyped_storage().data_ptr())]
        assert sum(s[0] for s in saved) - big[0][0] <= 8 * 2 * (n + m)
        sizes[n_iter] = sorted(s[0] for s in saved)
        out.backward()
    assert sizes[2] == sizes[200]


def test_backward_memory_is_one_gradient_and_does_not_grow_with_iterations():
    n, m = 400, 300
    C, a, b = problem(n, m, seed=14)
    peaks = {}
    for n_iter in (3, 300):
        Cg, ag, bg = leaves(C, a, b)
        out = sinkhorn_cost(Cg, ag, bg, reg=0.05, n_iter=n_iter)
        tracemalloc.start()
        out.backward()
        peaks[n_iter] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    for peak in peaks.values():  # the plan (the gradient of C) and O(n + m) besides
        assert n * m * 8 <= peak <= n * m * 8 + 64 * (n + m) + 65536, peaks
    assert abs(peaks[3] - peaks[300]) <= 8192, peaks


# ----------------------------------------------------------------------------- API
def test_inputs_are_checked():
    C, a, b = problem(4, 3, seed=15)
    with pytest.raises(TypeError, match="C must be a torch.Tensor"):
        sinkhorn_cost(C.numpy(), reg=0.1)
    with pytest.raises(ValueError, match=r"a must have shape \(4,\)"):
        sinkhorn_cost(C, a[:3], b, reg=0.1)
    with pytest.raises(ValueError, match="reg must be positive"):
        sinkhorn_cost(C, a, b, reg=-1.0)
    with pytest.raises(ValueError, match="equal totals"):
        sinkhorn_cost(C, 2 * a, b, reg=0.1)


def test_non_convergence_warns_at_the_callers_line():
    C, a, b = problem(30, 20, seed=16)
    with pytest.warns(UserWarning, match="did not converge") as rec:
        sinkhorn_cost(C, a, b, reg=0.01, max_iter=2)
    assert rec[0].filename == __file__


def test_marginals_as_arrays_are_constants():
    C, a, b = problem(5, 4, seed=17)
    Cg = C.clone().requires_grad_(True)
    out = sinkhorn_cost(Cg, a.numpy(), list(b.numpy()), reg=0.2)
    out.backward()
    np.testing.assert_allclose(out.item(), sinkhorn_cost(C, a, b, reg=0.2).item(),
                               rtol=1e-14)
    assert Cg.grad is not None


def test_main_solvers_stay_constant():
    C, a, b = problem(5, 4, seed=18)
    res = sinkhorn_ot.sinkhorn(C.requires_grad_(True), reg=0.2)
    assert isinstance(res.cost, float) and res.f.grad_fn is None


# ----------------------------------------------------------------------------- CUDA backend
def _emulation_available():
    import platform
    import shutil
    return platform.machine().lower() in ("x86_64", "amd64") and shutil.which("g++")


@pytest.mark.skipif(not _emulation_available(), reason="the kernel emulation needs g++ on x86-64")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("reg_m", [None, 0.6, (INF, 0.5)])
def test_cuda_backend_on_the_kernel_emulation(dtype, reg_m):
    """The forward and backward code of a CUDA tensor (the CUDA backend's solve, plan,
    column LSE and pass), run on the kernel emulation of tests/cuda_emu: the gradients of
    its potentials equal the CPU core's at the same potentials, and its value the CPU
    solve's to the tolerance."""
    import cuda_emu
    from sinkhorn_ot import _validation as V
    from sinkhorn_ot._arrays import to_host, to_native
    from sinkhorn_ot._backend import select_backend
    from sinkhorn_ot.torch import _gradients, _options, _solve

    C, a, b = problem(40, 30, seed=19, forbidden=2)
    a = a.clone()
    a[3] = 0.0  # a zero weight: its gradient takes the c-transform pass
    a, b = (a / a.sum()).numpy(), b.numpy()
    Cn = C.numpy().astype(dtype)
    reg, tau = _options(0.2, reg_m)
    tol = 1e-11 if dtype == "float64" else 1e-5

    devices = []

    def backward(X, s):
        be = select_backend(to_native(X, "C"), None)
        devices.append(be.device)
        X = V.matrix(to_native(X, "C"), "C", be.xp)
        xp = be.xp
        args = [xp.asarray(to_host(t)) for t in (s.f, s.g, s.wa, s.wb)]
        return [to_host(t) for t in _gradients(be, X, *args, reg, tau, (True, True, True),
                                               -1.5)]

    cpu = _solve(Cn, a, b, reg, tau, tol, 1000, None, None)
    with cuda_emu.installed() as cp:
        Xd = cp.asarray(Cn)
        dev = _solve(Xd, a, b, reg, tau, tol, 1000, None, None)
        g_dev = backward(Xd, dev)
    g_cpu = backward(Cn, dev)  # the CPU core at the device solve's potentials
    assert devices == ["cuda", "cpu"]
    rtol = 1e-12 if dtype == "float64" else 2e-6
    for gd, gc in zip(g_dev, g_cpu):
        np.testing.assert_allclose(gd, gc, rtol=rtol, atol=rtol * np.abs(gc).max())
    np.testing.assert_allclose(dev.value, cpu.value, rtol=1e-9 if dtype == "float64" else 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs PyTorch with a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reg_m", [None, 0.6])
def test_cuda_tensors_match_the_cpu(dtype, reg_m):
    pytest.importorskip("cupy")
    C, a, b = problem(300, 200, seed=20)
    Cd = C.to(dtype).cuda()
    reg = 0.2
    ours = leaves(Cd, a.cuda(), b.cuda())
    v = sinkhorn_cost(*ours, reg=reg, reg_m=reg_m)
    v.backward()
    assert v.device.type == "cuda" and v.dtype == dtype
    assert ours[0].grad.device.type == "cuda" and ours[0].grad.dtype == dtype
    ref = leaves(Cd.float().cpu().double(), a, b)  # the CPU core on the same rounded costs
    sinkhorn_cost(*ref, reg=reg, reg_m=reg_m, tol=TIGHT).backward()
    rtol = {torch.float64: 1e-6, torch.float32: 1e-4}.get(dtype, 1e-2)
    for t, r in zip(ours, ref):
        np.testing.assert_allclose(t.grad.double().cpu(), r.grad, rtol=rtol,
                                   atol=rtol * r.grad.abs().max().item())


@pytest.mark.skipif(not _emulation_available(), reason="the kernel emulation needs g++ on x86-64")
@pytest.mark.parametrize("reg_m", [None, 0.5])
def test_symmetric_update_on_the_kernel_emulation(reg_m):
    import cuda_emu
    from sinkhorn_ot.torch import _options, _solve
    x, _, a, _ = clouds(20, 1, seed=0)
    reg, tau = _options(0.05, reg_m)
    C, a = sqdist(x, x).numpy(), a.numpy()
    cpu = _solve(C, a, a, reg, tau, 1e-12, 300, None, None, symmetric=True)
    with cuda_emu.installed() as cp, warnings.catch_warnings():
        warnings.simplefilter("error")
        dev = _solve(cp.asarray(C), a, a, reg, tau, 1e-12, 300, None, None, symmetric=True)
    np.testing.assert_allclose(dev.value, cpu.value, rtol=1e-12)


def test_non_contiguous_and_half_inputs():
    C, a, b = problem(6, 5, seed=21)
    ref = leaves(C)[0]
    sinkhorn_cost(ref, a, b, reg=0.2, tol=TIGHT).backward()
    T = C.t().contiguous().requires_grad_(True)  # C as a transposed view: copied, not refused
    sinkhorn_cost(T.t(), a, b, reg=0.2, tol=TIGHT).backward()
    np.testing.assert_allclose(T.grad.t(), ref.grad, rtol=0, atol=1e-15)
    H = C.half().requires_grad_(True)  # the CPU core reads float16 as float32
    v = sinkhorn_cost(H, a, b, reg=0.2)
    v.backward()
    assert v.dtype == H.grad.dtype == torch.float16
    np.testing.assert_allclose(H.grad.double(), ref.grad, rtol=0, atol=2e-3 * ref.grad.max())


def test_import_sinkhorn_ot_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, sinkhorn_ot; assert 'torch' not in sys.modules; "
            "sinkhorn_ot.torch.sinkhorn_cost; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
