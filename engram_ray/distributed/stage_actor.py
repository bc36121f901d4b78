"""The stage actor: one contiguous slice of the model, and the Σ accumulators of its modules.

Each actor loads only its slice's weights (``models.load_stage``), hooks the selected modules
inside it with the same :class:`~engram_ray.core.capture.Capture` the single-process engine uses,
and passes hidden states on to the next stage. The driver owns the actor, so after the stream
ends it can read the partial Σ back out per input group (Ray Data offers no way to read state
out of ``map_batches`` workers, which is why accumulation lives in Ray Core actors).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import ray
import torch

from engram_ray.config import ModelSpec, SelectConfig
from engram_ray.core.capture import Capture
from engram_ray.core.layers import weight_matrix
from engram_ray.core.moments import ModuleInfo, Moments
from engram_ray.core.select import select_modules
from engram_ray.runinfo import fingerprint_parts

__all__ = ["StageActor"]


@ray.remote
class StageActor:
    """Stage ``index`` of ``n_stages`` in replica ``replica``."""

    def __init__(
        self,
        model: ModelSpec,
        index: int,
        n_stages: int,
        replica: int,
        select: SelectConfig,
        *,
        dtype: str | None = None,
        storage_options: Mapping | None = None,
        tracker=None,
    ) -> None:
        from engram_ray.models.stages import load_stage

        self.index, self.n_stages, self.replica = index, n_stages, replica
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.stage = load_stage(model, index, n_stages, dtype=dtype, device=self.device,
                                storage_options=storage_options)
        modules = select_modules(self.stage, select.target_modules, select.layers_to_transform,
                                 allow_empty=True)
        self.capture = Capture(modules, select)
        self.tracker = tracker
        self.rows = self.tokens = 0
        self.busy_s = 0.0

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def selected(self) -> list[str]:
        return sorted(self.capture.modules)

    def forward(self, payload: Mapping[str, torch.Tensor], concepts: Sequence[str | None],
                mask: torch.Tensor | None):
        """Run the slice on one micro-batch, accumulating Σ; return the next stage's payload.

        The last stage returns only the number of rows, so logits never cross the network.
        """
        t0 = time.perf_counter()
        inputs = {k: v.to(self.device) for k, v in payload.items()}
        with torch.no_grad(), self.capture.observe(concepts, mask):
            out = self.stage(**inputs)
        n_rows = len(concepts)
        n_tok = int(mask.sum()) if mask is not None else n_rows
        dt = time.perf_counter() - t0
        self.rows, self.tokens, self.busy_s = self.rows + n_rows, self.tokens + n_tok, self.busy_s + dt
        if self.tracker is not None:
            self.tracker.stage.remote(self.index, self.replica, n_rows, n_tok, dt)
        if self.index == self.n_stages - 1:
            return n_rows
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    def module_infos(self) -> dict[str, ModuleInfo]:
        return self.capture.module_infos()

    def group_dims(self) -> dict[str, int]:
        return {g: m.dim for g, m in self.capture.groups.items()}

    def summaries(self) -> dict[str, tuple[int, dict[str, int]]]:
        return {g: m.summary() for g, m in self.capture.groups.items()}

    def partial(self, group: str) -> Moments:
        """This replica's Σ for one input group, tagged so it can only be merged once."""
        m = self.capture.groups[group].to("cpu")
        m.sources = frozenset({f"replica-{self.replica}"})
        return m

    def group_weights(self, group: str) -> dict[str, torch.Tensor]:
        """The (out, D) float64 matrices of the group's modules, for the solver task."""
        infos = self.capture.module_infos()
        return {n: weight_matrix(self.stage.get_submodule(n), i.bias).cpu()
                for n, i in infos.items() if i.group == group}

    def fingerprint(self) -> dict[str, str]:
        return fingerprint_parts(self.stage.state_dict().items())

    def counters(self) -> dict:
        return {"rows": self.rows, "tokens": self.tokens, "busy_s": self.busy_s}
