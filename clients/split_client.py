"""The split-client wrapper: one Flower node = one fine-tuning client cluster (paper Fig. 4).

The node is the cluster's start point: it holds the cluster's private data partition and the
embedding, and drives the D2D chain of prompt segments down to the end point (head). In
simulation the D2D peers are in-process segments, each with its own slice of the model and its
own optimizer; every hop still serializes its tensor, so the D2D bytes reported are real.

Contract of a `train` reply (what the edge's strategy may rely on):
  * one ArrayRecord "arrays" holding ONLY the tunable modules (`prompt.i`, `head.*`);
  * one MetricRecord "metrics" with `num-examples` (the FedAvg weight), `train-loss`,
    `train-acc`, `d2d-bytes-fwd`, `d2d-bytes-bwd`, `upload-bytes`, `compute-flops`,
    `partition-id`, `cluster-id` and `train-time-s`, and the cost model's price of the round
    (`latency-s`, `bottleneck-s`; sensing, compute and D2D time and energy side by side).

With a device population (run-config `population`) the cluster's devices, links and split plan
are those of its formed cluster (`population.layout`), derived from the run-config as the
ServerApp derives them; an inference request that names a `requester` runs over that device's
own inference cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch.utils.data import Dataset

from clients.inference import InferenceRequestError, load_delivered_model, request_images, serve
from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.costs.memory import segment_memory
from gaisnet_flwr.costs.pricing import ClusterProfile, fine_tuning_round_cost
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
from gaisnet_flwr.population.layout import ClusterLayout, FormedCluster
from gaisnet_flwr.split.flops import segment_flops
from gaisnet_flwr.split.plan import SplitPlan
from gaisnet_flwr.training.loops import (
    NonFiniteError,
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
class ClusterIdentity:
    """Which edge server this cluster belongs to and which share of that edge's data it holds.

    Deployment: node-config "edge-id=1 partition-id=0 num-partitions=3" (partition within the
    edge). Simulation sets only partition-id / num-partitions over all N nodes; node p then
    belongs to edge p * E // N (contiguous blocks of nodes per edge).

    With a device population (run-config `population`), the node runs fine-tuning cluster
    `cluster_id` of the population's layout: node-config `cluster-id` in deployment, else the
    simulation's partition-id over all nodes.
    """

    edge_id: int
    partition_id: int  # within the edge
    num_partitions: int  # clusters of this edge
    cluster_id: int = 0  # the population's fine-tuning cluster this node runs

    @classmethod
    def from_node_config(cls, node_config: dict, num_edges: int = 1) -> ClusterIdentity:
        try:
            pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        except KeyError as err:
            raise ValueError(
                f"node-config lacks {err.args[0]!r}: a cluster needs 'partition-id' and "
                f"'num-partitions' (simulation sets both; deployment: flower-supernode "
                f'--node-config "edge-id=0 partition-id=0 num-partitions=4")'
            ) from err
        if not 0 <= pid < num:
            raise ValueError(f"partition-id={pid} must be in [0, num-partitions={num})")
        cluster = int(node_config.get("cluster-id", pid))
        if cluster < 0:
            raise ValueError(f"cluster-id={cluster} must be >= 0")
        if "edge-id" in node_config:
            edge = int(node_config["edge-id"])
            if not 0 <= edge < num_edges:
                raise ValueError(f"edge-id={edge} must be in [0, {num_edges}) (edge-domains)")
            return cls(edge, pid, num, cluster)
        if num < num_edges:
            raise ValueError(
                f"{num} client clusters for {num_edges} edge servers: every edge needs one"
            )
        edge = pid * num_edges // num
        members = [p for p in range(num) if p * num_edges // num == edge]
        return cls(edge, members.index(pid), len(members), cluster)

    def record(self, layout: ClusterLayout | None = None) -> RecordDict:
        """Answer to the edge's `query.identity`: which edge, partition and cluster this node
        is, and (with a population) the digest of the layout it derived, which the ServerApp
        checks against its own."""
        metrics: dict[str, int] = {
            "edge-id": self.edge_id,
            "partition-id": self.partition_id,
            "num-partitions": self.num_partitions,
            "cluster-id": self.cluster_id,
        }
        if layout is not None:
            metrics["layout-digest"] = layout.digest()
        return RecordDict({"metrics": MetricRecord(metrics)})  # type: ignore[arg-type]


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
    def from_node_config(cls, node_config: dict) -> TrainPool | None:
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
    def of(cls, cfg: RunConfig, edge: int, pool: TrainPool | None) -> EdgeDataKey:
        h = cfg.hierarchy
        return cls(cfg.data_spec(), edge, tuple(h.shares()), h.domains()[edge], pool)

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
        cfg: RunConfig,
        identity: ClusterIdentity,
        pool: TrainPool | None = None,
        *,
        edge_data: ImageData | None = None,
        partitions: Callable[[], list[np.ndarray]] | None = None,
    ) -> ClusterData:
        """Build from scratch, or from the edge's data and its clusters' partitions when the
        caller has them (the ClientApp's per-process cache: apps/client_cache.py).

        `cluster-samples = K > 0`: the cluster draws its own K images (O(K), whatever the
        number of clusters); 0: its share of the edge's pool split among the edge's clusters."""
        key = EdgeDataKey.of(cfg, identity.edge_id, pool)
        data = edge_data if edge_data is not None else key.build()
        pid = identity.partition_id
        if cfg.data.cluster_samples:
            part = cluster_sample(
                data.train_labels, cfg.data.cluster_samples, pid, key.spec, identity.edge_id
            )
        elif partitions is not None:
            part = partitions()[pid]
        else:
            part = partition_indices(data.train_labels, identity.num_partitions, key.spec)[pid]
        train, val = cluster_split(data, part, pid, key.spec)
        return cls(data, train, val)


class SplitClusterClient:
    """The cluster's work for one message: build the edge model, load the modules, run.

    `peers` (from node-config in a lab deployment) puts the D2D peers and the end point on
    other devices, reached over gRPC; without it they are in-process segments (simulation).
    The chain code is the same either way. `data` and `foundation` (the edge model on the
    frozen foundation, by number of classes) default to building afresh; the ClientApp passes
    its per-process caches of both.
    """

    def __init__(
        self,
        cfg: RunConfig,
        identity: ClusterIdentity,
        peers: PeerSettings | None = None,
        pool: TrainPool | None = None,
        *,
        data: ClusterData | None = None,
        foundation: Callable[[int], PromptedViT] | None = None,
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.peers = peers
        self.device = cfg.run.torch_device()  # auto: the GPU Ray gave this node, if any
        self.precision = cfg.run.torch_precision()
        cluster = data if data is not None else ClusterData.build(cfg, identity, pool)
        self.data: ImageData = cluster.data
        self.train_set: Dataset = cluster.train_set
        self.val_set: Dataset = cluster.val_set
        self.foundation = foundation or Foundation.of(cfg).load
        # With a population, this node runs its own formed cluster (devices, links, plan);
        # without one, every cluster is the run-config's identical cluster.
        self.layout = cfg.cluster_layout()
        self.formed: FormedCluster | None = None
        if self.layout is not None:
            clusters = self.layout.fine_tuning
            if identity.cluster_id >= len(clusters):
                raise ValueError(
                    f"cluster-id={identity.cluster_id}: the population "
                    f"{self.layout.population.source!r} formed {len(clusters)} fine-tuning "
                    f"cluster(s) (0..{len(clusters) - 1})"
                )
            self.formed = clusters[identity.cluster_id]

    def plan_and_profile(self, requester: str = "") -> tuple[SplitPlan, ClusterProfile]:
        """The split plan and cost-model profile of the cluster that runs: the requester's
        inference cluster, this node's formed cluster, or the run-config's identical one."""
        if requester:
            if self.layout is None:
                raise InferenceRequestError(
                    f"the request names requester {requester!r}, but the run has no population"
                )
            try:
                formed = self.layout.inference_for(requester)
            except ValueError as err:
                raise InferenceRequestError(str(err)) from err
            return formed.plan, formed.profile
        if self.formed is not None:
            return self.formed.plan, self.formed.profile
        return self.cfg.plan(), self.cfg.cluster_profile()

    def _model(self, arrays: ArrayRecord) -> PromptedViT:
        model = self.foundation(self.data.num_classes)
        model.load_tunable_state(arrays.to_torch_state_dict())
        return model

    def _remote(self, num_classes: int, profile: ClusterProfile) -> NetworkPeers | None:
        """The members after the start point on other machines (node-config `peers`, in the
        order of `profile`'s chain: a segment on the edge server is a gaisnet-peer there)."""
        if self.peers is None:
            return None
        spec = model_spec(model_kwargs(self.cfg.model, self.cfg.cloud), num_classes)
        return NetworkPeers(
            self.peers,
            spec,
            optimizer_spec(self.cfg.training),
            precision=self.precision,
            members=profile.names[1:],
        )

    def _seed(self, server_round: int) -> int:
        ident = self.identity
        return round_seed(self.cfg.run.seed, ident.edge_id, ident.partition_id, server_round)

    def train(self, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        started = time.perf_counter()
        model = self._model(arrays)
        server_round = int(cast(int, config.get("server-round", 0)))
        plan, profile = self.plan_and_profile()
        result = train_cluster(
            model,
            plan,
            self.train_set,
            self.cfg.training,
            seed=self._seed(server_round),
            proximal_mu=float(cast(float, config.get("proximal-mu", 0.0))),
            device=self.device,
            remote=self._remote(self.data.num_classes, profile),
            precision=self.precision,
        )
        state = model.tunable_state()
        bad = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
        if bad:
            raise NonFiniteError(
                f"local training left non-finite values in module(s) {bad[:4]}: the cluster's "
                f"round stopped (lr={self.cfg.training.lr}, "
                f"weight-decay={self.cfg.training.weight_decay})"
            )
        upload = ArrayRecord(state)
        # The paper's metrics (Sec. III-C.2) for this cluster's round, priced by the cost model
        # from the FLOPs and the bytes the chain actually moved.
        cost = fine_tuning_round_cost(
            profile,
            segment_flops(model, plan),
            result.chain.hop_bytes_forward,
            result.chain.hop_bytes_backward,
            samples=result.num_examples * self.cfg.training.local_epochs,
            upload_bytes=upload.count_bytes(),
            download_bytes=arrays.count_bytes(),
            sensed_samples=result.num_examples,  # each training sample captured once a round
        )
        memory = segment_memory(
            model,
            plan,
            self.cfg.training.batch_size,
            self.cfg.training.optimizer,
            momentum=self.cfg.training.momentum,
        )
        per_node: dict[str, float | int] = {}
        for node, footprint in zip(cost.nodes, memory, strict=True):
            per_node[f"energy-j/{node.name}"] = node.energy_j
            per_node[f"memory-bytes/{node.name}"] = footprint.training
        # The segment the edge server ran (edge-offload): its part apart from the devices'.
        flops = list(result.chain.segment_flops.values())  # in chain order
        edge_flops = flops[profile.edge] if profile.edge is not None else 0
        edge: dict[str, float | int] = {}
        if self.cfg.cluster.edge_offload != "never":
            edge = {
                "edge-flops": edge_flops,
                "edge-compute-s": cost.edge_compute_s,
                "edge-energy-j": cost.edge_energy_j,
                "edge-hop-bytes": cost.cs_hop_bytes,
            }
        metrics = MetricRecord(
            {
                "latency-s": cost.latency_s,
                "bottleneck-s": cost.bottleneck_s,
                # the paper's costs side by side: sensing, computing, communicating
                "sensing-s": cost.sensing_s,
                "compute-s": cost.compute_s,
                "d2d-s": cost.d2d_s,
                "energy-j": cost.energy_j,
                "sensing-j": cost.sensing_j,
                "compute-j": cost.compute_j,
                "tx-j": cost.tx_j,
                "cs-bytes": cost.cs_bytes,
                "memory-max-bytes": max(
                    m.training for k, m in enumerate(memory) if k != profile.edge
                ),  # the devices' (memory-bytes/edge: the edge server's)
                **per_node,
                **edge,
                "num-examples": result.num_examples,
                "train-loss": result.loss,
                "train-acc": result.accuracy,
                # D2D hops only: the hops to and from the edge server are in cs-bytes
                "d2d-bytes-fwd": cost.d2d_forward_bytes,
                "d2d-bytes-bwd": cost.d2d_backward_bytes,
                "upload-bytes": upload.count_bytes(),
                "compute-flops": sum(flops) - edge_flops,  # the devices'; the edge's apart
                "partition-id": self.identity.partition_id,
                "edge-id": self.identity.edge_id,
                "cluster-id": self.identity.cluster_id,
                "train-time-s": time.perf_counter() - started,
            }
        )
        return RecordDict({"arrays": upload, "metrics": metrics})

    def infer(self, request: RecordDict) -> RecordDict:
        """Serve one `query.infer` request (see clients/inference.py for its contract)."""
        config = request.config_records.get("config", ConfigRecord())
        distribution = str(config.get("distribution", "efficient"))
        plan, profile = self.plan_and_profile(str(config.get("requester", "")))
        delivered = request.array_records.get("model")
        images = request_images(request.array_records.get("inputs"), self.cfg.model.img_size)
        # The frozen foundation is already on the devices (synchronised independently).
        model = self.foundation(self.data.num_classes)
        load_delivered_model(model, delivered, distribution)
        labels = None
        if images is None:  # the start point's own sensing data; its labels only score it
            batch = [self.val_set[i] for i in range(len(self.val_set))]  # type: ignore[arg-type]
            images = torch.stack([x for x, _ in batch])
            labels = torch.tensor([int(y) for _, y in batch])
        assert delivered is not None  # load_delivered_model refused an empty delivery
        reply = serve(
            model,
            plan,
            profile,
            images,
            labels,
            download_bytes=delivered.count_bytes(),
            remote=self._remote(self.data.num_classes, profile),
            device=self.device,
            precision=self.precision,
        )
        metrics = reply.metric_records["metrics"]
        metrics["edge-id"] = self.identity.edge_id
        metrics["partition-id"] = self.identity.partition_id
        return reply

    def evaluate(self, arrays: ArrayRecord) -> RecordDict:
        result = evaluate(
            self._model(arrays), self.val_set, device=self.device, precision=self.precision
        )
        return RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "num-examples": result.num_examples,
                        "eval-loss": result.loss,
                        "eval-acc": result.accuracy,
                        "partition-id": self.identity.partition_id,
                    }
                )
            }
        )
