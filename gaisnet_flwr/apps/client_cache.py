"""What a ClientApp process keeps between messages: what does not change within a run.

In simulation one Ray actor runs the ClientApp for message after message, of every node; before
this cache every `train` message rebuilt the edge's data and all N partitions of it to use one
(O(N) per message, O(N^2) per round) and read and SHA-256-hashed the foundation checkpoint.
Now each is built once per process and reused:

- the loaded dataset, per `DataSpec` and the files behind it;
- an edge's data, per `EdgeDataKey` (spec, edge, shares, domain, node train pool);
- the partitions of an edge's pool among its N clusters, per (edge key, N);
- a cluster's train / validation views, per (edge key, partition, N, cluster-samples);
- the edge model on the frozen foundation, per (`Foundation`, classes, the checkpoint's
  fingerprint: path, size, mtime, inode and the recorded SHA-256), verified when first read;
  each message gets its own deep copy (training changes the tunable modules).

The run-config itself is parsed and checked once per process (`cluster_node.run_config_of`), and
the cost model's device and link profiles are read once per cost section (`CostConfig.profiles`,
a cached property of that frozen section), so neither is redone per message either. The
process-wide instance is `cluster_node.PROCESS_CACHE` (it says why not one per ClientApp).

Every key holds all that determines its value, so a different run-config is a different entry,
never a wrong one; a rewritten checkpoint (or image folder) changes its fingerprint and is read
and verified again. Each table is a bounded LRU, so a long-lived process does not grow without
limit: at most 2 loaded datasets, 8 edges (each with its partitions and up to 4096 clusters'
index views, dropped with it) and 2 models. In a deployment each message starts a fresh
ClientApp process: the caches start empty, and nothing stale can be served.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch

from clients.split_client import ClusterData, ClusterIdentity, EdgeDataKey, TrainPool
from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.data.images import DataSpec, ImageData, load_image_data, partition_indices
from gaisnet_flwr.vit.model import PromptedViT

V = TypeVar("V")


class Lru(Generic[V]):
    """A bounded least-recently-used table; `get` builds what is missing."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.entries: OrderedDict[Hashable, V] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable, build: Callable[[], V]) -> V:
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = build()  # an exception caches nothing
        self.entries[key] = value
        if len(self.entries) > self.maxsize:
            self.entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class _Edge:
    """An edge's data with what is derived from it, so that evicting the edge frees them all."""

    data: ImageData
    partitions: Lru[list[np.ndarray]]  # per number of clusters N
    clusters: Lru[ClusterData]  # per (partition, N, cluster-samples)


@dataclass
class _Model:
    """A verified edge model and the torch RNG state a fresh build leaves behind (building
    seeds torch): restored with every copy, so a cached model is a fresh one in every way."""

    model: PromptedViT
    rng_state: torch.Tensor


class ClientCache:
    """The per-process caches of one ClientApp (see the module docstring)."""

    def __init__(
        self,
        max_datasets: int = 2,
        max_edges: int = 8,
        max_clusters: int = 4096,
        max_models: int = 2,
    ) -> None:
        self.sizes = (max_datasets, max_edges, max_clusters, max_models)
        self.clear()

    def clear(self) -> None:
        """Forget everything (and the counts)."""
        max_datasets, max_edges, self.max_clusters, max_models = self.sizes
        self.datasets: Lru[ImageData] = Lru(max_datasets)
        self.edges: Lru[_Edge] = Lru(max_edges)
        self.models: Lru[_Model] = Lru(max_models)

    def cluster_data(
        self, cfg: RunConfig, identity: ClusterIdentity, pool: TrainPool | None
    ) -> ClusterData:
        key = EdgeDataKey.of(cfg, identity.edge_id, pool)
        stamp = source_stamp(key.spec)

        def load() -> ImageData:
            return load_image_data(key.spec)

        def new_edge() -> _Edge:
            data = key.build(self.datasets.get((key.spec, stamp), load))
            return _Edge(data, Lru(4), Lru(self.max_clusters))

        edge = self.edges.get((key, stamp), new_edge)
        n = identity.num_partitions

        def split() -> list[np.ndarray]:
            return edge.partitions.get(
                n, lambda: partition_indices(edge.data.train_labels, n, key.spec)
            )

        return edge.clusters.get(
            (identity, cfg.data.cluster_samples),
            lambda: ClusterData.build(cfg, identity, pool, edge_data=edge.data, partitions=split),
        )

    def model(self, foundation: Foundation, num_classes: int) -> PromptedViT:
        """The edge model on the frozen foundation: read and verified once per checkpoint
        fingerprint, then a deep copy per call."""

        def build() -> _Model:
            model = foundation.load(num_classes)
            return _Model(model, torch.get_rng_state())

        entry = self.models.get(
            (foundation, num_classes, foundation_stamp(foundation, num_classes)), build
        )
        torch.set_rng_state(entry.rng_state)
        return copy.deepcopy(entry.model)

    def info(self) -> dict[str, tuple[int, int, int]]:
        """(entries, hits, misses) per table; partitions and clusters summed over the edges
        held now."""
        edges = list(self.edges.entries.values())

        def total(tables: list[Lru]) -> tuple[int, int, int]:
            return (
                sum(len(t) for t in tables),
                sum(t.hits for t in tables),
                sum(t.misses for t in tables),
            )

        return {
            "datasets": total([self.datasets]),
            "edges": total([self.edges]),
            "partitions": total([e.partitions for e in edges]),
            "clusters": total([e.clusters for e in edges]),
            "models": total([self.models]),
        }


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def foundation_stamp(foundation: Foundation, num_classes: int) -> tuple[object, ...]:
    """What changes when the foundation's weights file changes: a checkpoint's path, its stat
    and its recorded SHA-256 (a 64-byte read); a weights file's path and stat; nothing for
    timm's named weights or a seeded random backbone."""
    cloud = foundation.cloud
    if cloud.foundation == "cloud":
        path = foundation.checkpoint_path()
        sidecar = path.with_name(path.name + ".sha256")
        try:
            recorded = sidecar.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            recorded = None
        return (str(path), _stat(path), recorded, _stat(sidecar))
    if cloud.foundation == "file":
        path = Path(cloud.checkpoint_path).expanduser()
        return (str(path), _stat(path))
    return ()


def source_stamp(spec: DataSpec) -> tuple[object, ...]:
    """What changes when the files behind `spec` change: nothing for the embedded digits; the
    folder's and its sub-folders' mtimes for an image folder or Flowers102 (a file added or
    removed changes its folder's mtime)."""
    if spec.dataset == "digits" or not spec.data_dir:
        return ()
    root = Path(spec.data_dir)
    try:
        subdirs = sorted(e.path for e in os.scandir(root) if e.is_dir())
    except OSError:
        return (str(root), None)
    return (str(root), _stat(root), *((p, _stat(Path(p))) for p in subdirs))
