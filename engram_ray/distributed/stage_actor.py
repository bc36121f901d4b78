"""The stage actor: one contiguous slice of the model, and the Σ accumulators of its modules.

Each actor loads only its slice's weights (``models.load_stage``: torch and safetensors; the
common HF decoders run as pure-torch modules, ``models/native.py``, so the actor never imports
transformers for them, nor ever its tokenizers) in a thread of its own, so
that stage 0 already pulls its first rows (which starts Ray Data's executor) while it loads; it
hooks the selected modules
inside it with the same :class:`~engram_ray.core.capture.Capture` the single-process engine
uses, and passes hidden states on to the next stage as numpy (zero-copy through the object
store, ``wire.py``). Stage 0 of each replica pulls its rows itself (:meth:`consume`,
``feed.py``). The driver owns the actor, so after the stream it reduces the partial Σ between
the actors (:meth:`export` / :meth:`absorb`, ``reduce.py``) and hands each group to a solver.

Threads: Ray sets ``OMP_NUM_THREADS`` to the actor's CPU reservation, so torch would run one
thread on a 1-CPU actor. The actor starts with as many threads as it reserves, and the driver
raises that to every core of the node when the actor is alone there (:meth:`configure`); the
compute thread applies it before its next micro-batch. Status calls (counters, configure) run
in their own concurrency group, so they answer while a stream is being computed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import ray
import torch

from engram_ray.config import ModelSpec, SelectConfig
from engram_ray.core.capture import Capture
from engram_ray.core.layers import weight_matrix
from engram_ray.core.moments import ModuleInfo
from engram_ray.core.select import select_modules
from engram_ray.devices import resolve_device
from engram_ray.distributed.cluster import normal_priority
from engram_ray.distributed.feed import FeedCounters, feed
from engram_ray.distributed.reduce import SigmaBlocks
from engram_ray.distributed.wire import from_wire, payload_nbytes, to_wire
from engram_ray.runinfo import fingerprint_parts

__all__ = ["StageActor"]


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _gpus() -> int:
    """GPUs Ray gave this worker (0 outside one: ``ray.get_gpu_ids`` would start or join a
    Ray there)."""
    if not ray.is_initialized():
        return 0
    try:
        return len(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - not in a worker: no GPUs given
        return 0


@ray.remote(concurrency_groups={"status": 1})
class StageActor:
    """Stage ``index`` of ``n_stages`` in replica ``replica``."""

    def __init__(self, model: ModelSpec, index: int, n_stages: int, replica: int,
                 select: SelectConfig, *, dtype: str | None = None,
                 storage_options: Mapping | None = None, threads: int = 1,
                 device: str = "auto") -> None:
        self.t_created = time.time()
        self.nice = normal_priority()  # Ray starts workers at niceness 15 (cluster.py)
        self._threads = threads
        self._tuned: set[int] = set()  # compute threads already at normal priority
        torch.set_num_threads(threads)
        self.index, self.n_stages, self.replica = index, n_stages, replica
        # parallel.device "auto": CUDA when Ray gave this actor a GPU (engram_ray/devices.py).
        self.device = resolve_device(device, _gpus())
        self.rows = self.tokens = self.batches = 0
        self.busy_s = self.reduce_s = 0.0
        self.wire_bytes = self.reduce_bytes = 0  # received: hidden states; partial Σ
        self.feed = FeedCounters()
        self.reducing: dict[str, SigmaBlocks] = {}
        # The slice loads in a thread (building it, reading its tensors; 2-3 s more when it must
        # import transformers' model classes for an architecture native.py does not cover), so
        # that ``consume`` can start pulling the split at once: Ray Data's executor starts
        # only when a consumer first iterates, and its read and encode workers then start
        # side by side with the load instead of after it. Every method that needs the slice
        # waits for it (:meth:`_ready`); a load error is raised by the first of them.
        if index == 0:
            # Stage 0 receives its split next (``consume``): unpickling it imports Ray Data
            # (~1 s). Imports hold the GIL, so done beside the load they would only slow each
            # other; done first, the split starts Ray Data's executor before the load begins.
            import ray.data  # noqa: F401
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self.ready_at = None
        threading.Thread(target=self._load, args=(model, select, dtype, storage_options),
                         name="stage-load", daemon=True).start()

    def _load(self, model: ModelSpec, select: SelectConfig, dtype: str | None,
              storage_options: Mapping | None) -> None:
        try:
            from engram_ray.models.stages import load_stage

            self.stage = load_stage(model, self.index, self.n_stages, dtype=dtype,
                                    device=self.device, storage_options=storage_options)
            modules = select_modules(self.stage, select.target_modules,
                                     select.layers_to_transform, allow_empty=True)
            self.capture = Capture(modules, select)
            self.ready_at = time.time()
        except BaseException as e:  # noqa: BLE001 - re-raised by the first call that needs it
            self._load_error = e
        finally:
            self._loaded.set()

    def _ready(self) -> None:
        """Wait until the slice is loaded; raise its load error if it failed."""
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    @ray.method(concurrency_group="status")
    def node_info(self) -> dict:
        """Where this actor runs: node id, the cores it may use, when it became ready (the
        slice loaded)."""
        self._ready()
        return {"node": ray.get_runtime_context().get_node_id(), "cores": cores(),
                "ready_at": self.ready_at, "load_s": self.ready_at - self.t_created,
                "nice": self.nice}

    @ray.method(concurrency_group="status")
    def configure(self, threads: int) -> int:
        """Run torch with ``threads`` threads from the next micro-batch on."""
        self._threads = max(1, int(threads))
        return self._threads

    @ray.method(concurrency_group="status")
    def counters(self) -> dict:
        return {"rows": self.rows, "tokens": self.tokens, "batches": self.batches,
                "busy_s": self.busy_s, "reduce_s": self.reduce_s, "threads": self._threads,
                "nice": self.nice,
                "wire_bytes": self.wire_bytes, "reduce_bytes": self.reduce_bytes,
                "feed": self.feed.as_dict()}

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def selected(self) -> list[str]:
        self._ready()
        return sorted(self.capture.modules)

    def _run(self, inputs: Mapping[str, torch.Tensor], concepts: Sequence[str | None],
             mask: torch.Tensor | None):
        """One micro-batch through the slice, accumulating Σ; the slice's output (or, for the
        last stage, only the number of rows, so logits never leave the actor)."""
        self._ready()
        if threading.get_ident() not in self._tuned:  # a concurrency group's own thread
            self.nice = normal_priority()
            self._tuned.add(threading.get_ident())
        if torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)  # from the thread that computes
        t0 = time.perf_counter()
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad(), self.capture.observe(concepts, mask):
            out = self.stage(**inputs)
        self.rows += len(concepts)
        self.batches += 1
        self.tokens += int(mask.sum()) if mask is not None else len(concepts)
        self.busy_s += time.perf_counter() - t0
        return len(concepts) if self.index == self.n_stages - 1 else out

    def forward(self, payload: Mapping, concepts: Sequence[str | None], mask: np.ndarray | None):
        """Stages ≥ 1: the previous stage's numpy payload in, this stage's payload out."""
        self.wire_bytes += payload_nbytes(payload) + (mask.nbytes if mask is not None else 0)
        tmask = from_wire({"m": mask})["m"] if mask is not None else None
        out = self._run(from_wire(payload), concepts, tmask)
        return out if isinstance(out, int) else to_wire(out)

    def consume(self, split, rest: list, pad_id: int | list, batch_tokens: int,
                max_in_flight: int, prefetch: int) -> dict:
        """Stage 0: pull this replica's split and push every row through the replica's chain
        (this stage, then ``rest``); returns what was fed (``feed.py``). ``pad_id`` is the id
        or ``[ref]`` to it: wrapped, Ray does not wait for the tokenizer task before calling
        this, so pulling starts at once and the id is fetched with the first block."""
        def first(batch):
            inputs = dict(batch.inputs) if isinstance(batch.inputs, dict) else {"x": batch.inputs}
            return self._run(inputs, batch.concepts, batch.token_mask())

        pad = pad_id if isinstance(pad_id, int) else (lambda: int(ray.get(pad_id[0])))
        self.feed = FeedCounters()  # one slice's feed (a checkpointed run feeds several)
        return feed(split, first, rest, batch_tokens=batch_tokens, pad_id=pad,
                    max_in_flight=max_in_flight, prefetch=prefetch, counters=self.feed,
                    ready=self._ready)

    def module_infos(self) -> dict[str, ModuleInfo]:
        self._ready()
        return self.capture.module_infos()

    def group_dims(self) -> dict[str, int]:
        self._ready()
        return {g: m.dim for g, m in self.capture.groups.items()}

    def summaries(self) -> dict[str, tuple[int, dict[str, int]]]:
        self._ready()
        return {g: m.summary() for g, m in self.capture.groups.items()}

    def _partial(self, group: str, in_place: bool) -> SigmaBlocks:
        """This replica's Σ of ``group`` as numpy blocks, tagged so it can merge only once."""
        self._ready()
        if group not in self.reducing:
            m = self.capture.groups[group]
            m.sources = frozenset({f"replica-{self.replica}"})
            self.reducing[group] = SigmaBlocks.from_moments(m, in_place=in_place)
        return self.reducing[group]

    def absorb(self, group: str, incoming: SigmaBlocks, in_place: bool = False) -> None:
        """Add another replica's partial of ``group`` into this one's (``reduce.py``).
        ``in_place``: the final reduction may add into the accumulators themselves."""
        t0 = time.perf_counter()
        self.reduce_bytes += incoming.nbytes()
        self._partial(group, in_place).absorb(incoming)
        self.reduce_s += time.perf_counter() - t0

    def export(self, group: str, in_place: bool = False) -> SigmaBlocks:
        """This actor's (possibly already merged) partial of ``group``, handed on once."""
        t0 = time.perf_counter()
        out = self._partial(group, in_place)
        del self.reducing[group]
        self.reduce_s += time.perf_counter() - t0
        return out

    def group_weights(self, group: str) -> dict[str, np.ndarray]:
        """The (out, D) float64 matrices of the group's modules, as numpy for the solver."""
        self._ready()
        infos = self.capture.module_infos()
        return {n: weight_matrix(self.stage.get_submodule(n), i.bias).cpu().numpy()
                for n, i in infos.items() if i.group == group}

    def fingerprint(self) -> dict[str, str]:
        self._ready()
        return fingerprint_parts(self.stage.state_dict().items())
