"""engram-ray: find and edit the memory traces (engrams) of trained networks, on Ray.

The method (Kwon et al., *AI Engram*, ICML 2026): for a linear layer ``W`` with uncentered input
second moments Σ_c over a concept's inputs and Σ_total over all inputs, the concept's engram is
``W⁺_c = W Σ_c Σ_total⁺``; subtracting ``α Σ_{c∈U} W⁺_c`` forgets the concepts in U.
"""

from engram_ray.core.batch import Batch
from engram_ray.core.capture import Capture, collect_statistics, select_modules
from engram_ray.core.edit import EditPlan, apply_edit, compose, plan_edit, union_engram
from engram_ray.core.moments import ModuleInfo, Moments, Statistics
from engram_ray.core.solve import (
    EngramRecord,
    FactoredEngram,
    SolverConfig,
    pseudo_inverse,
    solve_group,
)
from engram_ray.engine import extract, model_fingerprint
from engram_ray.io.store import Run, RunWriter, open_run

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Capture",
    "EditPlan",
    "EngramRecord",
    "FactoredEngram",
    "ModuleInfo",
    "Moments",
    "Run",
    "RunWriter",
    "SolverConfig",
    "Statistics",
    "__version__",
    "apply_edit",
    "collect_statistics",
    "compose",
    "extract",
    "model_fingerprint",
    "open_run",
    "plan_edit",
    "pseudo_inverse",
    "select_modules",
    "solve_group",
    "union_engram",
]
