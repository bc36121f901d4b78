"""Is the store reachable from every node? Checked before any actor starts.

Solver tasks run on whichever node has room and write their payloads under ``store.uri``;
the driver then commits the manifest and the marker under the same URI on its own node. A
node-local path (``/data/runs``) on a cluster of several machines would scatter one run over
several disks: the driver would commit a manifest naming files it cannot see. So a local
path is accepted only when every node runs on one host (one machine's disk: a laptop, a
single VM, ``ray.cluster_utils.Cluster``) and no autoscaler can add another, or when the user
declares it one filesystem mounted on every node (``store.shared_fs: true``: NFS, EFS,
Lustre). Hosts are counted by node IP address. Object stores (``s3://``) are shared by
construction.
"""

from __future__ import annotations

from engram_ray.config import StoreConfig
from engram_ray.io.storage import is_remote

__all__ = ["StoreLocationError", "check_store_location"]


class StoreLocationError(ValueError):
    """A node-local store on a cluster of several nodes; the message names the URI and the
    fix."""


def check_store_location(store: StoreConfig, hosts: int, may_grow: bool = False) -> None:
    """Raise :class:`StoreLocationError` when ``store.uri`` is a local path and the cluster's
    nodes are on (or, autoscaling, may spread to) more than one host, unless
    ``store.shared_fs``. A ``memory://`` store is refused whatever the cluster: it lives in
    one process, and the Ray pipeline's solver tasks run in others."""
    if store.uri.startswith("memory://"):
        raise StoreLocationError(
            f"store.uri {store.uri!r} lives in one process's memory: the Ray pipeline's solver "
            "tasks run in other processes and could not write the run there. Use --local (the "
            "single-process engine) for memory://, or a store every node reaches")
    if is_remote(store.uri) or store.shared_fs or (hosts <= 1 and not may_grow):
        return
    if "://" in store.uri and not store.uri.startswith("file://"):
        return  # another fsspec URL (gs://, abfs://…): a shared service, not a node's disk
    where = f"nodes on {hosts} hosts" if hosts > 1 else "one host"
    grow = " and may add nodes (parallel.autoscale_max_cpus)" if may_grow else ""
    raise StoreLocationError(
        f"store.uri {store.uri!r} is a path on this machine's disk, but the Ray cluster has "
        f"{where}{grow}: solver tasks on other nodes would write parts of the run where the driver "
        "cannot see them. Use an s3:// URI, or set store.shared_fs: true if that path is one "
        "filesystem mounted on every node (NFS, EFS, …)")
