"""Sharded solves: samples (rows) split across processes, over MPI or torch.distributed.

Each process holds a block of rows of ``logP`` (or of the cost ``C``); block sizes may
differ and a process may hold no rows at all.  Per iteration every process runs the fused
pass over its own rows, then the processes combine the pass's K column sums (a sum), K
column maxima (a max) and the scalar ``sum Q * X`` (a sum) with one collective; the next
``g`` and the error follow identically on every rank, so ``g``, ``err``, ``n_iter`` and
``converged`` agree everywhere and each rank keeps its own rows' ``f`` and labels.

>>> from mpi4py import MPI                                     # doctest: +SKIP
>>> res = sinkhorn_ot.balanced_assign(my_rows, lam=25.0, comm=MPI.COMM_WORLD)  # doctest: +SKIP

Neither mpi4py nor torch is a dependency of sinkhorn-ot; both are imported lazily.
"""
from __future__ import annotations

import abc
import math
import pickle

import numpy as np

from ._arrays import is_cupy, to_host

__all__ = ["Comm", "MPIComm", "TorchComm", "as_comm"]


class Comm(abc.ABC):
    """What the solver needs from a communicator.

    Subclasses implement :meth:`allreduce_sum`, :meth:`allreduce_max` and
    :meth:`bcast_object` and set ``rank`` and ``size``; the rest derives from them.  Arrays
    are float64 NumPy or CuPy vectors; results come back in the same family (new arrays,
    the inputs are not modified).
    """

    rank: int = 0
    size: int = 1

    @abc.abstractmethod
    def allreduce_sum(self, x):
        """Implemented by each engine."""

    @abc.abstractmethod
    def allreduce_max(self, x):
        """Implemented by each engine."""

    @abc.abstractmethod
    def bcast_object(self, obj, root: int):
        """Implemented by each engine."""

    def allreduce_lse(self, L):
        """Combine per-process column log-sum-exps: ``log sum_p exp(L_p)``, stably (the
        maximum first, then a sum of ``exp(L_p - max)``)."""
        xp = _xp(L)
        M = self.allreduce_max(L)
        Mf = xp.where(xp.isfinite(M), M, 0.0)   # a column empty everywhere stays -inf
        s = self.allreduce_sum(xp.exp(L - Mf))
        with np.errstate(divide="ignore"):
            return Mf + xp.log(s)

    def allreduce_pass(self, col, colmax, qx):
        """Combine one fused pass: column sums (sum), column maxima (max), ``sum Q*X``
        (sum).  Two collectives by default; engines that can do it in one override this."""
        xp = _xp(col)
        K = col.shape[0]
        buf = xp.empty(K + 1)
        buf[:K] = col
        buf[K] = qx
        buf = self.allreduce_sum(buf)
        colmax = self.allreduce_max(colmax)
        return buf[:K], colmax, float(buf[K])


def _xp(x):
    if is_cupy(x):
        import cupy

        return cupy
    return np


def _like(host, ref):
    if is_cupy(ref):
        import cupy

        return cupy.asarray(host)
    return host


# --------------------------------------------------------------------------- MPI
def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "sinkhorn_ot.distributed.MPIComm needs mpi4py and an MPI library: "
            "pip install mpi4py mpich (or mpi4py built against your cluster's MPI)") from exc
    return MPI


class MPIComm(Comm):
    """Adapter for an mpi4py communicator (any MPI implementation).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The communicator whose processes share the rows (default ``MPI.COMM_WORLD``).
    cuda_aware : bool, default False
        Hand CuPy buffers to MPI directly (needs a CUDA-aware MPI build).  Otherwise CuPy
        buffers are copied to the host, reduced and copied back (2K+1 doubles a pass).

    Per pass the K column sums, the scalar cost and the K column maxima travel in one
    ``MPI_Allreduce`` of 2K+1 doubles, with a user-defined operation (sum on the first K+1
    entries, max on the rest) over a contiguous datatype, so MPI never splits the vector;
    above K = 8192 (``single_collective_max_k``), where bandwidth rather than latency
    dominates, as two built-in all-reduces (a sum of K+1 and a max of K values).
    """

    def __init__(self, comm=None, *, cuda_aware: bool = False):
        MPI = _import_mpi()
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.cuda_aware = bool(cuda_aware)
        self._pass_ops = {}
        self._bufs = {}
        self.single_collective_max_k = 8192

    def _work(self, key, n):
        """A host buffer kept between calls: a fresh buffer each pass costs MPICH far more
        than the reduction (measured 850 us against 150 us for 64K doubles on loopback)."""
        buf = self._bufs.get((key, n))
        if buf is None:
            buf = self._bufs[(key, n)] = np.empty(n)
        return buf

    def _allreduce(self, x, op):
        if is_cupy(x) and self.cuda_aware:
            import cupy

            buf = cupy.array(x, dtype=cupy.float64, copy=True)
            cupy.cuda.get_current_stream().synchronize()
            self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=op)
            return buf
        host = np.asarray(to_host(x), dtype=np.float64)
        buf = self._work("r", host.size)
        buf[:] = host.reshape(-1)
        self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=op)
        return _like(buf.reshape(host.shape).copy(), x)

    def allreduce_sum(self, x):
        return self._allreduce(x, self._MPI.SUM)

    def allreduce_max(self, x):
        return self._allreduce(x, self._MPI.MAX)

    def bcast_object(self, obj, root: int):
        return self.comm.bcast(obj, root=root)

    def _pass_op(self, K):
        if K not in self._pass_ops:
            MPI = self._MPI
            dtype = MPI.DOUBLE.Create_contiguous(2 * K + 1).Commit()

            def combine(inbuf, inoutbuf, datatype, K=K):
                a = np.frombuffer(inbuf, dtype=np.float64).reshape(-1, 2 * K + 1)
                b = np.frombuffer(inoutbuf, dtype=np.float64).reshape(-1, 2 * K + 1)
                b[:, :K + 1] += a[:, :K + 1]
                np.maximum(b[:, K + 1:], a[:, K + 1:], out=b[:, K + 1:])

            self._pass_ops[K] = (dtype, MPI.Op.Create(combine, commute=True))
        return self._pass_ops[K]

    def allreduce_pass(self, col, colmax, qx):
        K = col.shape[0]
        if K > self.single_collective_max_k or (self.cuda_aware and is_cupy(col)):
            # Large K: bandwidth, not latency, dominates, and one unsplittable element
            # keeps MPI from its reduce-scatter + all-gather algorithms across nodes (on
            # loopback both ways measured about 0.55 ms at K = 65_536).
            return Comm.allreduce_pass(self, col, colmax, qx)
        buf = self._work("pass", 2 * K + 1)
        buf[:K] = to_host(col)
        buf[K] = qx
        buf[K + 1:] = to_host(colmax)
        dtype, op = self._pass_op(K)
        self.comm.Allreduce(self._MPI.IN_PLACE, [buf, 1, dtype], op=op)
        return _like(buf[:K].copy(), col), _like(buf[K + 1:].copy(), colmax), float(buf[K])


# --------------------------------------------------------------------------- torch
def _import_dist():
    try:
        import torch
        import torch.distributed as dist
    except ImportError as exc:
        raise ImportError(
            "sinkhorn_ot.distributed.TorchComm needs PyTorch: pip install torch") from exc
    if not dist.is_available():
        raise ImportError("this PyTorch build has no torch.distributed support")
    return torch, dist


class TorchComm(Comm):
    """Adapter for a ``torch.distributed`` process group (gloo, NCCL, ...).

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The group whose processes share the rows (default: the default group, which must be
        initialised with ``torch.distributed.init_process_group``).

    Buffers are reduced in place as tensors made from the NumPy / CuPy arrays with DLPack:
    NumPy buffers with gloo and CuPy buffers with NCCL travel without a host copy.  NCCL
    gets NumPy buffers (the setup's few small vectors) on the current CUDA device; gloo gets
    CuPy buffers through the host.  Per pass: a sum of K+1 values and a max of K values.
    """

    def __init__(self, group=None):
        self._torch, self._dist = _import_dist()
        dist = self._dist
        if not dist.is_initialized():
            raise RuntimeError("TorchComm: call torch.distributed.init_process_group first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        self._nccl = "nccl" in backend
        self._gloo = "gloo" in backend

    def _reduce(self, x, op):
        torch, dist = self._torch, self._dist
        if is_cupy(x):
            import cupy

            if self._nccl:
                buf = cupy.array(x, dtype=cupy.float64, copy=True)
                # The collective runs on torch's stream: let it see CuPy's finished work,
                # and let CuPy's stream see the reduced values afterwards.
                cupy.cuda.get_current_stream().synchronize()
                t = torch.from_dlpack(buf)
                dist.all_reduce(t, op=op, group=self.group)
                torch.cuda.current_stream(t.device).synchronize()
                return buf
            host = np.array(x.get(), dtype=np.float64, copy=True)
            dist.all_reduce(torch.from_numpy(host), op=op, group=self.group)
            return cupy.asarray(host)
        host = np.array(x, dtype=np.float64, copy=True)
        t = torch.from_numpy(host)
        if self._nccl:
            dev = torch.device("cuda", torch.cuda.current_device())
            td = t.to(dev)
            dist.all_reduce(td, op=op, group=self.group)
            return td.cpu().numpy()
        dist.all_reduce(t, op=op, group=self.group)
        return host

    def allreduce_sum(self, x):
        return self._reduce(x, self._dist.ReduceOp.SUM)

    def allreduce_max(self, x):
        return self._reduce(x, self._dist.ReduceOp.MAX)

    def bcast_object(self, obj, root: int):
        lst = [obj]
        src = root if self.group is None else self._dist.get_global_rank(self.group, root)
        self._dist.broadcast_object_list(lst, src=src, group=self.group)
        return lst[0]


def as_comm(obj) -> Comm:
    """An adapter for ``obj``: a :class:`Comm` (returned as is), an mpi4py communicator,
    a ``torch.distributed`` process group, or the string ``"torch"`` (the default group)."""
    if isinstance(obj, Comm):
        return obj
    if isinstance(obj, str):
        if obj == "torch":
            return TorchComm()
        if obj == "mpi":
            return MPIComm()
        raise ValueError(f"comm must be 'torch', 'mpi', a communicator or a Comm, got {obj!r}")
    mod = type(obj).__module__.split(".")[0]
    if mod == "mpi4py":
        return MPIComm(obj)
    if mod == "torch":
        return TorchComm(obj)
    raise TypeError(f"comm must be an mpi4py communicator, a torch.distributed process "
                    f"group, 'torch', or a sinkhorn_ot.distributed.Comm; got "
                    f"{type(obj).__name__}")


# --------------------------------------------------------------------------- the solve
class Sharded:
    """The reducer of a solve whose rows are split across the ranks of ``comm`` (the
    interface of ``_reducer.Local``): the loop's reductions are collectives, and the
    preparation's two exchanges make every rank raise the same error or none."""

    local = False
    sharded = True

    def __init__(self, comm):
        self._comm = as_comm(comm)
        self.n_rows_total = 0
        self._offset = 0      # global index of this rank's first row

    # -- preparation --------------------------------------------------------------------
    def agreed(self, fn, *args):
        return agreed(self._comm, fn, *args)

    def agree_shape(self, exc, N: int, total_a, params, name: str) -> tuple:
        """One all-reduce: error flags, the row counts, the masses of ``a`` and both signs
        of every parameter that must agree (max of q and of -q: equal iff the same)."""
        comm = self._comm
        P, rank = comm.size, comm.rank
        nums = []
        for what, q in params:
            if q is None or hasattr(q, "shape"):  # a vector (b, init): two checksums
                nums += [(what, v) for v in _checksum(q)]
            else:
                nums.append((what, float(q)))
        vec = np.full(3 * P + 2 * len(nums), -math.inf)
        vec[:3 * P] = 0.0
        vec[rank] = exc is not None
        if exc is None:
            vec[P + rank] = N
            vec[2 * P + rank] = 0.0 if total_a is None else total_a
            for k, (_, q) in enumerate(nums):
                vec[3 * P + 2 * k] = q
                vec[3 * P + 2 * k + 1] = -q
        vec = comm.allreduce_max(vec)
        _agree_on_errors(comm, exc, vec)
        for k, (what, _) in enumerate(nums):
            hi, lo = vec[3 * P + 2 * k], -vec[3 * P + 2 * k + 1]
            if hi != lo:
                raise ValueError(f"comm: the {what} differs across ranks ({lo:g} to {hi:g}); "
                                 "every rank must pass the same K, dtype, options, b and init")
        counts = vec[P:2 * P].astype(np.int64)
        self.n_rows_total = n_total = int(counts.sum())
        self._offset = int(counts[:rank].sum())
        if n_total == 0:
            raise ValueError(f"{name} is empty on every rank (K = {params[0][1]})")
        if total_a is None and exc is None:
            return n_total, 1.0
        sum_a = float(vec[2 * P:3 * P].sum())
        if not sum_a > 0:
            raise ValueError("a sums to zero over all ranks")
        return n_total, sum_a

    def agree_scan(self, exc, chk: dict, Xs, forbidden: float) -> dict:
        """One all-reduce of the validation scans: the first invalid entry and empty row in
        global row order, the columns allowed on some rank, the largest |entry|."""
        comm = self._comm
        P, rank = comm.size, comm.rank
        N, K = Xs.shape
        allowed = np.zeros(K)
        if exc is None and N > 0:
            if int(chk["first_empty_col"]) < 0:
                allowed[:] = 1.0
            else:
                allowed = to_host((Xs != forbidden).any(axis=0)).astype(np.float64)
        vec = np.full(P + 3 + K, -math.inf)
        vec[:P] = 0.0
        vec[rank] = exc is not None
        if exc is None:
            fi = int(chk["first_invalid"])
            if fi >= 0:
                i, j = divmod(fi, K)
                vec[P] = -float((self._offset + i) * K + j)
            r = int(chk["first_empty_row"])
            if r >= 0:
                vec[P + 1] = -float(self._offset + r)
            vec[P + 2] = float(chk["max_abs"])
            vec[P + 3:] = allowed
        vec = comm.allreduce_max(vec)
        _agree_on_errors(comm, exc, vec)
        return {
            "first_invalid": -int(vec[P]) if math.isfinite(vec[P]) else -1,
            "first_empty_row": -int(vec[P + 1]) if math.isfinite(vec[P + 1]) else -1,
            "first_empty_col": int(np.argmin(vec[P + 3:])) if bool(
                (vec[P + 3:] <= 0).any()) else -1,
            "max_abs": max(float(vec[P + 2]), 0.0),
        }

    def loop_backend(self, backend, N: int):
        return backend if N > 0 else _EmptyBlock(backend)

    def sum_counts(self, counts):
        """Integer counts (cluster sizes) summed over every rank."""
        xp = _xp(counts)
        return self._comm.allreduce_sum(counts.astype(xp.float64)).astype(xp.int64)

    # -- the loop -----------------------------------------------------------------------
    def allreduce_sum(self, x):
        return self._comm.allreduce_sum(x)

    def allreduce_max(self, x):
        return self._comm.allreduce_max(x)

    def allreduce_lse(self, x):
        return self._comm.allreduce_lse(x)

    def allreduce_pass(self, col, colmax, qx):
        return self._comm.allreduce_pass(col, colmax, float(qx))


class _EmptyBlock:
    """A backend for a process with no rows: the primitives' answers for N = 0 without
    calling the kernels (whose launch configuration may not allow an empty grid)."""

    def __init__(self, backend):
        self._b = backend
        self.xp = backend.xp
        self.mixed_precision = backend.mixed_precision
        self.slack = 0.0  # no rows: no error

    def column_lse(self, X, alpha, f):
        return self.xp.full(X.shape[1], -math.inf)

    def fused_pass(self, X, alpha, g, loga, rho_a, f_out, labels_out, plan=None, fast=0.0):
        K = X.shape[1]
        return self.xp.zeros(K), self.xp.full(K, -math.inf), 0.0

    def column_update(self, *args):
        return self._b.column_update(*args)

    def labels(self, X, alpha, g, out):
        return out


def _agree_on_errors(comm: Comm, exc, flags_max):
    """Raise on every rank the error of the lowest rank that had one (no rank may leave a
    collective that the others enter)."""
    P = comm.size
    bad = np.nonzero(flags_max[:P] > 0)[0]
    if bad.size == 0:
        return
    root = int(bad[0])
    payload = None
    if comm.rank == root:
        try:
            payload = pickle.dumps(exc)
        except Exception:  # an unpicklable exception: send its text
            payload = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    got = pickle.loads(comm.bcast_object(payload, root))
    if comm.rank == root:
        got = exc
    if P > 1 and type(got) in (ValueError, TypeError, ImportError) and len(got.args) == 1:
        raise type(got)(f"on rank {root}: {got.args[0]}") from got
    raise got


def agreed(comm, fn, *args):
    """``fn(*args)`` on every rank; if it raises on any rank, every rank raises the error of
    the lowest such rank (one all-reduce of ``size`` flags)."""
    comm = as_comm(comm)
    exc = out = None
    try:
        out = fn(*args)
    except Exception as e:
        exc = e
    flags = np.zeros(comm.size)
    flags[comm.rank] = exc is not None
    _agree_on_errors(comm, exc, comm.allreduce_max(flags))
    return out


def _checksum(v):
    """Two numbers that differ when two ranks pass different vectors (b, init)."""
    if v is None:
        return (0.0, 0.0)
    h = to_host(v)
    h = np.where(np.isfinite(h), h, 0.0)
    return (float(h.sum()), float((h * np.cos(np.arange(h.shape[0]))).sum()))
