"""The math, with no I/O and no Ray: batches, Σ capture, moments, the solver, edits.

Every numeric formula of the method lives here; the drivers (``local.py``,
``distributed/``) and the storage layer (``io/``) only move its inputs and outputs.
"""
