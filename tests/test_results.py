"""The result objects' ``repr``: a one-line summary, never the arrays."""
import numpy as np

import sinkhorn_ot


def _logp(n, k, seed=0):
    return np.log(np.random.default_rng(seed).dirichlet(np.ones(k), n))


def test_repr_is_a_short_summary():
    logp = _logp(2000, 30)
    res = sinkhorn_ot.balanced_assign(logp, lam=25.0)
    text = repr(res)
    assert text == (f"Assignment(shape=(2000, 30), n_iter={res.n_iter}, "
                    f"err={res.err:.3g}, converged={bool(res.converged)})")
    assert str(res) == text and len(text) < 100


def test_repr_of_every_result_type():
    C = -_logp(50, 7)
    assert repr(sinkhorn_ot.sinkhorn(C, reg=0.1)).startswith("OTResult(shape=(50, 7), n_iter=")
    un = sinkhorn_ot.sinkhorn_unbalanced(C, reg=0.1, reg_m=1.0)
    assert repr(un).startswith("UnbalancedResult(shape=(50, 7), n_iter=")
    lp = sinkhorn_ot.emd(C)
    assert repr(lp) == f"EMDResult(shape=(50, 7), cost={lp.cost:.6g}, method={lp.method!r})"
