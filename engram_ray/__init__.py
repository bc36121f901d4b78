"""engram-ray: find and edit the memory traces (engrams) of trained networks, on Ray.

The method (Kwon et al., *AI Engram*, ICML 2026): for a linear layer ``W`` with uncentered input
second moments Σ_c over a concept's inputs and Σ_total over all inputs, the concept's engram is
``W⁺_c = W Σ_c Σ_total⁺``; subtracting ``α Σ_{c∈U} W⁺_c`` forgets the concepts in U.

This namespace is what a user calls; everything else stays importable from its own module
(``engram_ray.core`` for the math, ``engram_ray.io`` for storage, ``engram_ray.distributed``
for Ray).
"""

from engram_ray.config import (
    DataConfig,
    ExtractConfig,
    ModelSpec,
    ParallelConfig,
    SelectConfig,
    SolverConfig,
    StoreConfig,
    load_config,
)
from engram_ray.core.batch import Batch
from engram_ray.core.edit import EditPlan, apply_edit, plan_edit
from engram_ray.io.store import Run, open_run
from engram_ray.local import extract
from engram_ray.runinfo import VERSION as __version__

__all__ = [
    "Batch",
    "DataConfig",
    "EditPlan",
    "ExtractConfig",
    "ModelSpec",
    "ParallelConfig",
    "Run",
    "SelectConfig",
    "SolverConfig",
    "StoreConfig",
    "__version__",
    "apply_edit",
    "extract",
    "load_config",
    "open_run",
    "plan_edit",
]
