"""What the ClientApp does with each message, once its heavy parts are imported.

`apps/client_app.py` imports only Flower and the message contract, so loading the ClientApp is
instant (Flower's simulation engine loads it once in its own process before starting Ray, and
every Ray actor loads it again) and it answers the identity query itself; this module, with
torch, timm and the model code, is imported for the first message that needs it (in a Ray
actor, in the background from the identity query on). Its handlers `train`, `evaluate` and
`infer` take the message, its context and the node's run-config (`client_app.node_run_config`),
as `apps/edge_relay.py`'s do for a cloud-facing node: each reads its request (`contract`: the
cluster's task, the modules), takes the cluster's data and model from the per-process cache of
what does not change within a run (the run-config itself parsed once per process), and hands
the work to `clients.SplitClusterClient`.

The cache (`ClientCache`). In simulation one Ray actor runs the ClientApp for message after
message, of every node; each of these is built once per process and reused:

- the loaded dataset, per `DataSpec` and the files behind it;
- an edge's data, per `EdgeDataKey` (spec, edge, shares, domain, node train pool);
- the partitions of an edge's pool among its N clusters, per (edge key, N);
- a cluster's train / validation views, per (edge key, partition, N, cluster-samples);
- the edge model on the frozen foundation, per (`Foundation`, classes, the checkpoint's
  fingerprint: path, size, mtime, inode and the recorded SHA-256), verified when first read;
  every message loads its own tunable modules into it.

Every key holds all that determines its value, so a different run-config is a different entry,
never a wrong one; a rewritten checkpoint (or image folder) changes its fingerprint and is read
and verified again. Each table is a bounded LRU: at most 2 loaded datasets, 8 edges (each with
its partitions and up to 4096 clusters' views, dropped with it) and 2 models. In a deployment
each message starts a fresh ClientApp process: the caches start empty, nothing stale is served.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict

from clients.split_client import ClusterData, EdgeDataKey, SplitClusterClient, TrainPool
from gaisnet_flwr import contract as c
from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.contract import ClusterTask, InferRequest, TrainRequest
from gaisnet_flwr.data.images import (
    DataError,
    DataSpec,
    ImageData,
    load_image_data,
    partition_indices,
)
from gaisnet_flwr.deploy.remote import PeerError, PeerSettings
from gaisnet_flwr.deploy.shipping import recorded_sha256, sidecar
from gaisnet_flwr.derived import data_spec
from gaisnet_flwr.training.loops import NonFiniteError
from gaisnet_flwr.vit.model import PromptedViT


@functools.lru_cache(maxsize=8)
def run_config_of(items: tuple[tuple[str, Any], ...]) -> tuple[RunConfig, DataSpec, Foundation]:
    """Parse a run-config once per process, not once per message: keyed by every key and
    value, so another run's config never gets this one's."""
    cfg = RunConfig.from_run_config(dict(items))
    return cfg, data_spec(cfg), Foundation.of(cfg)


# What a failure costs: this cluster's reply, an error with the reason (no traceback per
# message); the node serves on. The ServerApp checks what it can know before round 1
# (data/capacity.py); a dead or slow peer, or a loss or module gone NaN / inf, costs only this
# cluster's contribution to the round.
WORK_ERRORS: tuple[tuple[type[Exception], int], ...] = (
    (DataError, c.CLUSTER_DATA),  # a setting this cluster's data cannot meet
    (PeerError, c.PEER_FAILURE),
    (NonFiniteError, c.NON_FINITE),
)
# An inference request that cannot be served (malformed, or asks what this node cannot give)
# costs only itself.
INFER_ERRORS: tuple[tuple[type[Exception], int], ...] = (
    (ValueError, c.INFERENCE_REQUEST_ERROR),  # InferenceRequestError and DataError among them
    (PeerError, c.PEER_FAILURE),
)


def cluster_client(
    context: Context, run_config: Mapping[str, Any], task: ClusterTask
) -> SplitClusterClient:
    """The cluster `task` names, on this node: its data and the edge model from the process's
    cache, the D2D peers from node-config (a lab deployment) or in process."""
    cfg, spec, foundation = run_config_of(tuple(sorted(run_config.items())))
    node_config = context.node_config
    pool = TrainPool.from_node_config(node_config)
    data = PROCESS_CACHE.cluster_data(spec, task, cfg.data.cluster_samples, pool)
    model = PROCESS_CACHE.model(foundation, data.data.num_classes)
    peers = PeerSettings.from_node_config(node_config) if _has_peers(node_config) else None
    return SplitClusterClient(cfg, task, data, model, peers)


# The handlers: each reads its request, builds the cluster's client and replies.
def train(msg: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    request = TrainRequest.from_message(msg)  # a malformed message raises: Flower replies
    return reply(
        msg, lambda: cluster_client(context, run_config, request.task).train(request), WORK_ERRORS
    )


def evaluate(msg: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    task, arrays = c.task_of(msg.content), msg.content.array_records[c.ARRAYS]
    return reply(
        msg, lambda: cluster_client(context, run_config, task).evaluate(arrays), WORK_ERRORS
    )


def infer(msg: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    def work() -> RecordDict:
        request = InferRequest.from_message(msg)  # a malformed request: its error reply
        return cluster_client(context, run_config, request.task).infer(request)

    return reply(msg, work, INFER_ERRORS)


def reply(
    msg: Message, work: Callable[[], RecordDict], errors: tuple[tuple[type[Exception], int], ...]
) -> Message:
    """The reply to `msg`: what `work` returns, or the error of the first of `errors` it
    raised (its code, its reason); any other exception is Flower's to report."""
    try:
        return Message(content=work(), reply_to=msg)
    except tuple(kind for kind, _ in errors) as err:
        code = next(code for kind, code in errors if isinstance(err, kind))
        return Message(Error(code=code, reason=str(err)), reply_to=msg)


def _has_peers(node_config: Mapping[str, Any]) -> bool:
    """Whether node-config names D2D peers (a lab deployment): only then is the peer
    transport read."""
    return any(str(k).startswith("peer") for k in node_config)


# -- the per-process cache ------------------------------------------------------------------------
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
    seeds torch): restored for every message, so a cached model is a fresh one in every way."""

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
        self, spec: DataSpec, task: ClusterTask, cluster_samples: int, pool: TrainPool | None
    ) -> ClusterData:
        key = EdgeDataKey.of(spec, task, pool)
        stamp = source_stamp(spec)

        def new_edge() -> _Edge:
            data = key.build(self.datasets.get((spec, stamp), lambda: load_image_data(spec)))
            return _Edge(data, Lru(4), Lru(self.max_clusters))

        edge = self.edges.get((key, stamp), new_edge)
        n = task.num_partitions

        def split() -> list[np.ndarray]:
            return edge.partitions.get(
                n, lambda: partition_indices(edge.data.train_labels, n, spec)
            )

        def build() -> ClusterData:
            return ClusterData.build(
                key, task.partition, n, cluster_samples, edge_data=edge.data, partitions=split
            )

        return edge.clusters.get((task.partition, n, cluster_samples), build)

    def model(self, foundation: Foundation, num_classes: int) -> PromptedViT:
        """The edge model on the frozen foundation: read and verified once per checkpoint
        fingerprint, then the same model for every message, with the torch RNG state a fresh
        build leaves. Not a copy: a message loads its complete tunable state into it, the
        frozen backbone never changes (tests/test_scale.py checks both), and a deep copy was
        9 % of a tiny train message (issue 30)."""

        def build() -> _Model:
            model = foundation.load(num_classes)
            return _Model(model, torch.get_rng_state())

        entry = self.models.get((foundation, num_classes, foundation_stamp(foundation)), build)
        torch.set_rng_state(entry.rng_state)
        return entry.model

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


def file_stamp(path: Path) -> tuple[object, ...]:
    """A file or folder with its size, mtime and inode (None when it cannot be read): what
    rewriting or replacing it changes, and for a folder adding or removing an entry."""
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def foundation_stamp(foundation: Foundation) -> tuple[object, ...]:
    """What changes when the foundation's weights file changes: a checkpoint, its sidecar and
    the SHA-256 the sidecar records (a 64-byte read, true whatever the file system's clock);
    a weights file; nothing for timm's named weights or a seeded random backbone."""
    cloud = foundation.cloud
    if cloud.foundation == "cloud":
        path = foundation.checkpoint_path()
        return (*file_stamp(path), *file_stamp(sidecar(path)), recorded_sha256(path))
    if cloud.foundation == "file":
        return file_stamp(Path(cloud.checkpoint_path).expanduser())
    return ()


def source_stamp(spec: DataSpec) -> tuple[object, ...]:
    """What changes when the files behind `spec` change: nothing for the embedded digits; the
    folder and its sub-folders for an image folder or Flowers102 (a file added or removed
    changes its folder's mtime)."""
    if spec.dataset == "digits" or not spec.data_dir:
        return ()
    root = Path(spec.data_dir)
    try:
        subdirs = sorted(Path(e.path) for e in os.scandir(root) if e.is_dir())
    except OSError:
        subdirs = []
    return tuple(file_stamp(p) for p in (root, *subdirs))


# One per process. Flower's simulation engine pickles the ClientApp with every message it hands
# a Ray actor (`RayBackend.process_message` -> `ClientAppActor.run(app_fn, ...)`), so each message
# meets a fresh copy of the app: a cache held by the app would start empty every time. This one
# lives as long as the actor's process (and, in a deployment, that is one message).
PROCESS_CACHE = ClientCache()
