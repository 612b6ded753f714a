"""sinkhorn-ot: fast, log-domain stable Sinkhorn optimal transport and balanced
self-labelling, with a C++/OpenMP core and CUDA kernels."""
from ._api import balanced_assign, sinkhorn
from ._codes import codes
from ._hard import round_to_marginals, target_sizes
from ._lp import ASSIGNMENT_MAX_N, EMD_MAX_ENTRIES, emd
from ._results import Assignment, EMDResult, OTResult, UnbalancedResult
from ._unbalanced import sinkhorn_unbalanced

__all__ = ["sinkhorn", "balanced_assign", "codes", "OTResult", "Assignment",
           "sinkhorn_unbalanced", "UnbalancedResult", "emd", "EMDResult", "EMD_MAX_ENTRIES",
           "ASSIGNMENT_MAX_N", "round_to_marginals", "target_sizes"]
__version__ = "0.1.0"


def __getattr__(name):
    # sinkhorn_ot.torch (the differentiable costs) imports PyTorch: loaded on first use only
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
