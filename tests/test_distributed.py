"""Sharded solves over 2 processes (mpiexec + mpi4py, torch.distributed + gloo) against the
single-process solve of the concatenated matrix: float64 results agree to 1e-10 relative,
labels exactly; ragged blocks, an empty rank, and errors raised on every rank alike.

Each run is a subprocess with a timeout, so a deadlock fails the test instead of hanging CI.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest

import sinkhorn_ot
import sinkhorn_ot.distributed
import _dist_worker as W

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")
TIMEOUT = 240


def _mpiexec():
    exe = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep +
                       os.environ.get("PATH", ""))
    return exe


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    return env


def _single(name, fn, M, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return getattr(sinkhorn_ot, fn)(M, n_threads=1, **kw)


def _close(actual, desired, rtol, name):
    """Normwise relative agreement: |actual - desired| <= rtol * max|desired| (entries near
    zero, e.g. potentials in their gauge, get the scale of the vector, not their own)."""
    actual, desired = np.asarray(actual, dtype=np.float64), np.asarray(desired, np.float64)
    fin = np.isfinite(desired)
    np.testing.assert_array_equal(np.isfinite(actual), fin, err_msg=name)
    np.testing.assert_array_equal(actual[~fin], desired[~fin], err_msg=name)
    scale = float(np.abs(desired[fin]).max()) if fin.any() else 1.0
    np.testing.assert_allclose(actual[fin], desired[fin], rtol=0, atol=rtol * scale,
                               err_msg=name)


def _compare(outdir):
    parts = [np.load(os.path.join(outdir, f"rank{r}.npz")) for r in range(2)]
    for name, fn, M, split, kw in W.cases():
        ref = _single(name, fn, M, kw)
        blocks = [(0, split), (split, M.shape[0])]
        f64 = M.dtype == np.float64
        rtol = 1e-10 if f64 else 1e-6
        for r, (lo, hi) in enumerate(blocks):
            p = parts[r]
            n_iter, err, conv, cost = p[f"{name}.scalars"]
            assert int(n_iter) == ref.n_iter, name
            assert bool(conv) == ref.converged, name
            # err is a difference of nearly equal column sums (total mass 1): compare it on
            # the scale of the mass, not of itself; rounding in the order of the column sums
            # (threads vs ranks) moves it by ~1e-12 once Anderson extrapolates.
            np.testing.assert_allclose(err, ref.err, rtol=0, atol=rtol, err_msg=name)
            _close(cost, ref.cost, rtol, name)
            _close(p[f"{name}.g"], ref.g, rtol, name)
            f = p[f"{name}.f"]
            assert f.shape == (hi - lo,), name
            _close(f, np.asarray(ref.f)[lo:hi], rtol, name)
            if hi > lo:
                _close(p[f"{name}.plan"], ref.plan()[lo:hi], 100 * rtol, name)
            if fn == "balanced_assign":
                np.testing.assert_array_equal(p[f"{name}.labels"],
                                              np.asarray(ref.labels)[lo:hi], err_msg=name)
                np.testing.assert_array_equal(p[f"{name}.sizes"], np.asarray(ref.sizes),
                                              err_msg=name)
        # ranks agree with each other exactly, not only to tolerance
        for key in ("g", "scalars"):
            np.testing.assert_array_equal(parts[0][f"{name}.{key}"],
                                          parts[1][f"{name}.{key}"], err_msg=name)
    errs = [json.load(open(os.path.join(outdir, f"rank{r}.json"))) for r in range(2)]
    for name in errs[0]:
        assert errs[0][name] is not None, name
        assert errs[0][name] == errs[1][name], (name, errs)
    assert "(23, 2)" in errs[0]["err_nan"][1]           # the global row, not rank 1's 3
    assert "column 2" in errs[0]["err_dead_column"][1]
    assert "differs across ranks" in errs[0]["err_K"][1]
    assert errs[0]["err_lam_rank1"][0] == "ValueError"


def _check(procs, outdir):
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed run timed out (deadlock?)")
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    _compare(outdir)


def test_mpi_two_processes(tmp_path):
    pytest.importorskip("mpi4py")
    exe = _mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    p = subprocess.Popen([exe, "-n", "2", sys.executable, WORKER, "mpi", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=_env())
    _check([p], str(tmp_path))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torch_gloo_two_processes(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch built without torch.distributed")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, "torch", str(tmp_path), str(port),
                               str(r)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_env()) for r in range(2)]
    _check(procs, str(tmp_path))


class _Loopback(sinkhorn_ot.distributed.Comm):
    """A one-process communicator: the sharded code path without another process."""

    def allreduce_sum(self, x):
        return x.copy()

    def allreduce_max(self, x):
        return x.copy()

    def bcast_object(self, obj, root):
        return obj


def test_single_rank_comm_matches_plain(rng):
    logP = W._log_softmax(rng.standard_normal((200, 7)))
    ref = sinkhorn_ot.balanced_assign(logP, lam=5.0)
    got = sinkhorn_ot.balanced_assign(logP, lam=5.0, comm=_Loopback())
    assert got.n_iter == ref.n_iter
    np.testing.assert_allclose(np.asarray(got.g), np.asarray(ref.g), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(got.labels), np.asarray(ref.labels))
    np.testing.assert_array_equal(np.asarray(got.sizes), np.asarray(ref.sizes))


def test_single_rank_empty_is_an_error():
    with pytest.raises(ValueError, match="empty on every rank"):
        sinkhorn_ot.balanced_assign(np.zeros((0, 4)), comm=_Loopback())
    with pytest.raises(ValueError, match="empty"):
        sinkhorn_ot.balanced_assign(np.zeros((0, 4)))   # without comm: still an error


def test_as_comm_rejects_unknown():
    with pytest.raises(TypeError, match="mpi4py communicator"):
        sinkhorn_ot.distributed.as_comm(object())
    with pytest.raises(ValueError):
        sinkhorn_ot.distributed.as_comm("nccl")


def test_missing_engines_name_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match="pip install mpi4py mpich"):
        sinkhorn_ot.distributed.MPIComm()
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "torch.distributed", None)
    with pytest.raises(ImportError, match="pip install torch"):
        sinkhorn_ot.distributed.as_comm("torch")
