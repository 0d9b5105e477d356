"""The split client: one Flower node = one fine-tuning client cluster (paper Fig. 4).

The node is the cluster's start point: it holds the cluster's private data partition and the
embedding, and drives the D2D chain of prompt segments down to the end point (head). In
simulation the D2D peers are in-process segments, each with its own slice of the model and its
own optimizer; every hop still counts the bytes its wire format carries, so the D2D bytes
reported are real.

What the cluster runs comes in the message: its `contract.ClusterTask` (edge, data share, block
ranges, devices and links, the plan's FLOPs and memory), built once by the ServerApp. The node
checks it and derives nothing. A train reply holds ONLY the tunable modules (`prompt.i`,
`head.*`: the cluster's complete tunable state, which per-module FedAvg relies on) and the
metrics `contract.METRICS` declares: `num-examples` (the FedAvg weight), loss and accuracy, the
D2D and client-server bytes, the FLOPs and wall time, and the cost model's price of the round
(latency, energy per node, memory per node; sensing, compute and D2D side by side).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch.utils.data import Dataset

from clients.inference import load_delivered_model, request_images, serve
from gaisnet_flwr import contract as c
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.contract import ClusterTask, InferRequest, TrainRequest
from gaisnet_flwr.costs.pricing import fine_tuning_round_cost
from gaisnet_flwr.data.cluster_sample import cluster_sample
from gaisnet_flwr.data.images import (
    DataSpec,
    ImageData,
    class_pool,
    cluster_split,
    edge_image_data,
    load_image_data,
    partition_indices,
)
from gaisnet_flwr.deploy.remote import NetworkPeers, PeerSettings, model_spec
from gaisnet_flwr.split.flops import SegmentFlops
from gaisnet_flwr.split.precision import Precision, non_finite, resolve_device
from gaisnet_flwr.training.loops import (
    NonFiniteError,
    TrainResult,
    evaluate,
    model_kwargs,
    optimizer_spec,
    train_cluster,
)
from gaisnet_flwr.vit.model import PromptedViT


def round_seed(seed: int, edge: int, partition: int, server_round: int) -> int:
    """A distinct, replayable data shuffle per (run seed, edge, cluster, round)."""
    return ((seed * 7919 + edge) * 131 + partition) * 1009 + server_round


@dataclass(frozen=True)
class TrainPool:
    """node-config `train-classes=K train-images=N`: the edge's train pool shrinks to N images
    drawn evenly from its first K classes (seeded by the run seed and K) before the clusters
    split it (`data.images.class_pool`). The paper's Table III: k classes, the same amount of
    fine-tuning data for every k. Every cluster of the edge must be given the same values."""

    classes: int
    images: int

    KEYS = ("train-classes", "train-images")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> TrainPool | None:
        given = [k for k in cls.KEYS if k in node_config]
        if not given:
            return None
        if len(given) != len(cls.KEYS):
            raise ValueError(f"node-config sets {given}; a train pool needs both {cls.KEYS}")
        return cls(int(node_config["train-classes"]), int(node_config["train-images"]))


@dataclass(frozen=True)
class EdgeDataKey:
    """Everything an edge's data depends on (hashable: the ClientApp caches by it)."""

    spec: DataSpec
    edge: int
    shares: tuple[float, ...]
    domain: str
    pool: TrainPool | None

    @classmethod
    def of(cls, spec: DataSpec, task: ClusterTask, pool: TrainPool | None) -> EdgeDataKey:
        return cls(spec, task.edge, task.shares, task.domain, pool)

    def build(self, loaded: ImageData | None = None) -> ImageData:
        """The edge's data: its share of the train pool and the test split in its domain,
        shrunk to the node's train pool if it has one. `loaded`: `load_image_data(spec)`."""
        data = edge_image_data(
            loaded if loaded is not None else load_image_data(self.spec),
            self.edge,
            list(self.shares),
            self.domain,
            seed=self.spec.seed,
        )
        if self.pool is not None:
            data = class_pool(data, self.pool.classes, self.pool.images, seed=self.spec.seed)
        return data


@dataclass(frozen=True)
class ClusterData:
    """One cluster's data: its edge's data and its own train / validation views of it."""

    data: ImageData
    train_set: Dataset
    val_set: Dataset

    @classmethod
    def build(
        cls,
        edge: EdgeDataKey,
        partition: int,
        num_partitions: int,
        cluster_samples: int = 0,
        *,
        edge_data: ImageData | None = None,
        partitions: Callable[[], list[np.ndarray]] | None = None,
    ) -> ClusterData:
        """Cluster `partition` of the `num_partitions` of edge `edge`; from scratch, or from the
        edge's data and its clusters' partitions when the caller has them (the ClientApp's
        per-process cache, the ServerApp's cluster report).

        `cluster_samples = K > 0`: the cluster draws its own K images (O(K), whatever the
        number of clusters); 0: its share of the edge's pool split among the edge's clusters."""
        data = edge_data if edge_data is not None else edge.build()
        spec = edge.spec
        if cluster_samples:
            part = cluster_sample(data.train_labels, cluster_samples, partition, spec, edge.edge)
        elif partitions is not None:
            part = partitions()[partition]
        else:
            part = partition_indices(data.train_labels, num_partitions, spec)[partition]
        train, val = cluster_split(data, part, partition, spec)
        return cls(data, train, val)


def round_metrics(
    task: ClusterTask,
    result: TrainResult,
    cfg: RunConfig,
    upload: ArrayRecord,
    download: ArrayRecord,
) -> dict[str, float | int]:
    """The paper's metrics (Sec. III-C.2) of one cluster's round (`upload`: the modules it
    replies, `download`: those it received), `contract.METRICS` declares how each aggregates:
    the cost model's price of the round, from the plan's FLOPs and the bytes the chain
    actually moved (latency, energy per node, memory per node; sensing, compute and D2D side
    by side), and what the chain did."""
    upload_bytes = upload.count_bytes()
    cost = fine_tuning_round_cost(
        task.profile,
        [SegmentFlops(*f) for f in task.flops],
        result.chain.hop_bytes_forward,
        result.chain.hop_bytes_backward,
        samples=result.num_examples * cfg.training.local_epochs,
        upload_bytes=upload_bytes,
        download_bytes=download.count_bytes(),
        sensed_samples=result.num_examples,  # each training sample captured once a round
    )
    per_node: dict[str, float | int] = {}
    for node, memory in zip(cost.nodes, task.memory, strict=True):
        per_node[f"{c.ENERGY}/{node.name}"] = node.energy_j
        per_node[f"{c.MEMORY}/{node.name}"] = memory
    # The segment the edge server ran (edge-offload): its part apart from the devices'.
    flops = list(result.chain.segment_flops.values())  # in chain order
    edge = task.profile.edge
    edge_flops = flops[edge] if edge is not None else 0
    edge_part: dict[str, float | int] = {}
    if cfg.cluster.edge_offload != "never":  # every cluster reports it (0 if none)
        edge_part = {
            c.EDGE_FLOPS: edge_flops,
            c.EDGE_COMPUTE_S: cost.edge_compute_s,
            c.EDGE_ENERGY: cost.edge_energy_j,
            c.EDGE_HOP_BYTES: cost.cs_hop_bytes,
        }
    return {
        c.LATENCY: cost.latency_s,
        c.BOTTLENECK: cost.bottleneck_s,
        # the paper's costs side by side: sensing, computing, communicating
        c.SENSING_S: cost.sensing_s,
        c.COMPUTE_S: cost.compute_s,
        c.D2D_S: cost.d2d_s,
        c.ENERGY: cost.energy_j,
        c.SENSING_J: cost.sensing_j,
        c.COMPUTE_J: cost.compute_j,
        c.TX_J: cost.tx_j,
        c.CS_BYTES: cost.cs_bytes,
        # the devices' (memory-bytes/edge: the edge server's)
        c.MEMORY_MAX: max(m for k, m in enumerate(task.memory) if k != edge),
        **per_node,
        **edge_part,
        c.NUM_EXAMPLES: result.num_examples,
        c.TRAIN_LOSS: result.loss,
        c.TRAIN_ACC: result.accuracy,
        # D2D hops only: the hops to and from the edge server are in cs-bytes
        c.D2D_FWD: cost.d2d_forward_bytes,
        c.D2D_BWD: cost.d2d_backward_bytes,
        c.UPLOAD: upload_bytes,
        c.COMPUTE_FLOPS: sum(flops) - edge_flops,  # the devices'; the edge's apart
        c.PARTITION_ID: task.partition,
        c.EDGE_ID: task.edge,
        c.CLUSTER_ID: task.cluster,
    }


class SplitClusterClient:
    """The cluster's work for one message: load the modules into the edge model, run the chain.

    `model` is the edge model on the frozen foundation (the ClientApp's verified, cached one):
    every message loads its complete tunable state, so nothing of an earlier message remains
    (tests/test_scale.py checks it). `peers` (node-config in a lab deployment) puts the D2D
    peers and the end point on other devices, reached over gRPC; without it they are in-process
    segments (simulation). The chain code is the same either way.
    """

    def __init__(
        self,
        cfg: RunConfig,
        task: ClusterTask,
        data: ClusterData,
        model: PromptedViT,
        peers: PeerSettings | None = None,
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.data, self.train_set, self.val_set = data.data, data.train_set, data.val_set
        self.model = model
        self.peers = peers
        self.device = resolve_device(cfg.run.device)  # auto: the GPU Ray gave this node, if any
        self.precision = Precision(cfg.run.precision, cfg.run.smashed_dtype)

    def _remote(self) -> NetworkPeers | None:
        """The members after the start point on other machines (node-config `peers`, in the
        order of the task's chain: a segment on the edge server is a gaisnet-peer there)."""
        if self.peers is None:
            return None
        spec = model_spec(model_kwargs(self.cfg.model, self.cfg.cloud), self.data.num_classes)
        return NetworkPeers(
            self.peers,
            spec,
            optimizer_spec(self.cfg.training),
            precision=self.precision,
            members=self.task.profile.names[1:],
        )

    def train(self, request: TrainRequest) -> RecordDict:
        """One round of the cluster: load the edge's modules, fine-tune them along the chain,
        check them (a module gone NaN / inf stops the round), reply them with the round's
        metrics."""
        started = time.perf_counter()
        task, training = self.task, self.cfg.training
        self.model.load_tunable_state(request.arrays.to_torch_state_dict())
        result = train_cluster(
            self.model,
            task.plan,
            self.train_set,
            training,
            seed=round_seed(self.cfg.run.seed, task.edge, task.partition, request.server_round),
            proximal_mu=request.proximal_mu,
            device=self.device,
            remote=self._remote(),
            precision=self.precision,
        )
        state = self.model.tunable_state()
        if bad := non_finite(state):
            raise NonFiniteError(
                f"local training left non-finite values in module(s) {bad[:4]}: the cluster's "
                f"round stopped (lr={training.lr}, weight-decay={training.weight_decay})"
            )
        upload = ArrayRecord(state)
        metrics = round_metrics(task, result, self.cfg, upload, request.arrays)
        metrics[c.TRAIN_TIME] = time.perf_counter() - started
        return c.reply_content(upload, metrics)

    def infer(self, request: InferRequest) -> RecordDict:
        """Serve one `query.infer` request (clients/inference.py says what it may hold) over
        the cluster it names: this node's, or a requester's inference cluster."""
        images = request_images(request.inputs, self.cfg.model.img_size)
        # The frozen foundation is already on the devices (synchronised independently); a full
        # delivery replaces every weight, so it gets a model of its own.
        model = copy.deepcopy(self.model) if request.distribution == "full" else self.model
        load_delivered_model(model, request.model, request.distribution)
        labels = None
        if images is None:  # the start point's own sensing data; its labels only score it
            batch = [self.val_set[i] for i in range(len(self.val_set))]  # type: ignore[arg-type]
            images = torch.stack([x for x, _ in batch])
            labels = torch.tensor([int(y) for _, y in batch])
        predictions, metrics = serve(
            model,
            self.task.plan,
            self.task.profile,
            images,
            labels,
            download_bytes=request.model.count_bytes(),
            remote=self._remote(),
            device=self.device,
            precision=self.precision,
        )
        metrics[c.EDGE_ID] = self.task.edge
        metrics[c.PARTITION_ID] = self.task.partition
        return c.predictions_content(predictions, metrics)

    def evaluate(self, arrays: ArrayRecord) -> RecordDict:
        self.model.load_tunable_state(arrays.to_torch_state_dict())
        result = evaluate(self.model, self.val_set, device=self.device, precision=self.precision)
        metrics = {
            c.NUM_EXAMPLES: result.num_examples,
            c.EVAL_LOSS: result.loss,
            c.EVAL_ACC: result.accuracy,
            c.PARTITION_ID: self.task.partition,
        }
        return c.reply_content(None, metrics)


__all__ = [
    "ClusterData",
    "EdgeDataKey",
    "SplitClusterClient",
    "TrainPool",
    "round_metrics",
    "round_seed",
]
