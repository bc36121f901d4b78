"""engram-ray: find and edit the memory traces (engrams) of trained networks, on Ray.

The method (Kwon et al., *AI Engram*, ICML 2026): for a linear layer ``W`` with uncentered input
second moments Σ_c over a concept's inputs and Σ_total over all inputs, the concept's engram is
``W⁺_c = W Σ_c Σ_total⁺``; subtracting ``α Σ_{c∈U} W⁺_c`` forgets the concepts in U.

This namespace is what a user calls; everything else stays importable from its own module
(``engram_ray.core`` for the math, ``engram_ray.io`` for storage, ``engram_ray.distributed``
for Ray).
"""

import importlib

# Where each public name lives. Imported on first use (PEP 562), because every Ray worker that
# unpickles anything of this package imports the package first: a read or encode task, or Ray
# Data's coordinator unpickling the dataset, would otherwise import torch (~2 s of CPU each) for
# work that needs only pyarrow and a tokenizer.
_LAZY = {
    "DataConfig": "engram_ray.config",
    "ExtractConfig": "engram_ray.config",
    "ModelSpec": "engram_ray.config",
    "ParallelConfig": "engram_ray.config",
    "SelectConfig": "engram_ray.config",
    "SolverConfig": "engram_ray.config",
    "StoreConfig": "engram_ray.config",
    "load_config": "engram_ray.config",
    "Batch": "engram_ray.core.batch",
    "EditPlan": "engram_ray.core.edit",
    "apply_edit": "engram_ray.core.edit",
    "plan_edit": "engram_ray.core.edit",
    "Run": "engram_ray.io.store",
    "open_run": "engram_ray.runs",
    "extract": "engram_ray.local",
}

__version__ = "0.1.0"

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


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'engram_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
