"""sinkhorn-ot: fast, log-domain stable Sinkhorn optimal transport and balanced
self-labelling, with a C++/OpenMP core and CUDA kernels."""
from ._api import balanced_assign, sinkhorn
from ._results import Assignment, OTResult

__all__ = ["sinkhorn", "balanced_assign", "OTResult", "Assignment"]
__version__ = "0.1.0"
