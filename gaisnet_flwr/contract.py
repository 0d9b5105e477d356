"""The messages between the ServerApp (its edge servers and the cloud) and the client clusters.

One module holds what travels and how it is read back, so the ServerApp, the strategies, the
ClientApp (and, for a deployed hierarchy, an edge or cloud process) share one definition:

  * the message types and error codes;
  * every metric a reply carries, with how it aggregates over clusters (`METRICS`): a counter
    a cluster reports that is not declared here is refused, never silently averaged;
  * a node's identity (`query.identity`) and the cluster task the ServerApp builds for it once
    (`ClusterTask`: its edge, data share, block ranges, devices, links and the plan's static
    costs), which travels with every message, so no ClientApp re-derives a plan;
  * the typed requests and replies with their record conversions;
  * the global modules' layout, `edge<e>/<module>` side by side;
  * the foundation checkpoint on the wire (`query.foundation`, by SHA-256) and the files a node
    holds (its identity reply's `held`);
  * the cloud and its edge servers as processes of their own: an edge's identity, the cloud's
    request to it (`EdgeRequest`) and its answer (`EdgeReport`).

It imports Flower's records and the plain dataclasses of the plan and the device profiles: no
torch, so an edge or cloud process can import it cheaply.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from gaisnet_flwr.costs.profiles import ClusterProfile, DeviceProfile, LinkProfile
from gaisnet_flwr.deploy.shipping import ShippedFile
from gaisnet_flwr.split.plan import SplitPlan

# -- message types, record names, error codes ----------------------------------------------------
TRAIN = MessageType.TRAIN
EVALUATE = MessageType.EVALUATE
IDENTITY = "identity"  # ClientApp query action: who is this node (message type query.identity)
INFER = "infer"  # ClientApp query action: serve an SL inference request (query.infer)
FOUNDATION = "foundation"  # ClientApp query action: take the foundation checkpoint shipped
QUERY_IDENTITY = f"{MessageType.QUERY}.{IDENTITY}"
QUERY_INFER = f"{MessageType.QUERY}.{INFER}"
QUERY_FOUNDATION = f"{MessageType.QUERY}.{FOUNDATION}"

ARRAYS, METRICS_RECORD, CONFIG, TASK = "arrays", "metrics", "config", "task"  # RecordDict keys
MODEL, INPUTS, PREDICTIONS, IMAGES = "model", "inputs", "predictions", "images"
HELD, FILE, FAILURES = "held", "file", "failures"  # the foundation's files; an edge's failures

INFERENCE_REQUEST_ERROR = 400  # this request cannot be served (the reason says why)
CLUSTER_DATA = 412  # the cluster's data cannot be formed (the reason names the key to change)
NON_FINITE = 422  # the cluster's training went to NaN / inf: it stopped, this cluster failed
PEER_FAILURE = 503  # a D2D peer was down, too slow or refused: this cluster failed
NO_REPLY = -1  # a failure record's code for a node that did not answer in time
NON_FINITE_AGGREGATE = -2  # ... for an edge whose aggregate is not finite (node -1)
FOUNDATION_REFUSED = 409  # a shipped foundation whose bytes do not hash to what came with them
EDGE_FAILED = 504  # an edge server stopped, or missed the cloud round's deadline

# Keys the Flower strategies put in a train message's ConfigRecord (FedAvg, FedProx).
SERVER_ROUND, PROXIMAL_MU = "server-round", "proximal-mu"
# A cloud message to an edge server (`EdgeRequest`), and an edge's node-config.
FIRST_ROUND, LAST_ROUND, FINAL, TIMEOUT = "first-round", "last-round", "final", "timeout-s"
SHARED_CONFIG = "shared-config"  # the run-config every tier must share, as JSON
EDGE_DIR = "edge-dir"


# -- metrics and how they aggregate ---------------------------------------------------------------
class Aggregation(enum.Enum):
    """How the edge combines one metric of its clusters' replies into the round's value."""

    SUM = "sum"  # counters add up over clusters
    MAX = "max"  # clusters run in parallel: the slowest (largest) sets the round's value
    MEAN = "mean"  # averaged, weighted by num-examples
    KEEP = "keep"  # who the cluster is: not aggregated


@dataclass(frozen=True)
class Metric:
    """A metric a reply carries: its key, how it aggregates, and its meaning. `per_node`: the
    reply also carries `<key>/<node>` for every node of the chain (start, peer1, ..., end)."""

    key: str
    aggregation: Aggregation
    doc: str
    per_node: bool = False


S, X, M, K = Aggregation.SUM, Aggregation.MAX, Aggregation.MEAN, Aggregation.KEEP
LATENCY = "latency-s"
BOTTLENECK = "bottleneck-s"
SENSING_S, COMPUTE_S, D2D_S = "sensing-s", "compute-s", "d2d-s"
ENERGY = "energy-j"
SENSING_J, COMPUTE_J, TX_J = "sensing-j", "compute-j", "tx-j"
CS_BYTES = "cs-bytes"
MEMORY_MAX, MEMORY = "memory-max-bytes", "memory-bytes"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS, TRAIN_ACC = "train-loss", "train-acc"
D2D_FWD, D2D_BWD = "d2d-bytes-fwd", "d2d-bytes-bwd"
UPLOAD, DOWNLOAD = "upload-bytes", "download-bytes"
COMPUTE_FLOPS = "compute-flops"
PARTITION_ID, EDGE_ID, CLUSTER_ID, NUM_PARTITIONS = (
    "partition-id",
    "edge-id",
    "cluster-id",
    "num-partitions",
)
TRAIN_TIME = "train-time-s"
EVAL_LOSS, EVAL_ACC = "eval-loss", "eval-acc"
NUM_SAMPLES, D2D_BYTES, ACCURACY = "num-samples", "d2d-bytes", "accuracy"
# The edge server's part of a chain where it holds a segment (run-config edge-offload)
EDGE_FLOPS, EDGE_COMPUTE_S, EDGE_ENERGY, EDGE_HOP_BYTES = (
    "edge-flops",
    "edge-compute-s",
    "edge-energy-j",
    "edge-hop-bytes",
)

METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        # the cost model's price of the cluster's round (paper Sec. III-C.2)
        Metric(LATENCY, X, "simulated round latency of the cluster (the round's: the slowest)"),
        Metric(BOTTLENECK, X, "the busiest node's compute and send time"),
        Metric(SENSING_S, X, "the start point's sensing time"),
        Metric(COMPUTE_S, X, "compute time summed over the chain's nodes"),
        Metric(D2D_S, X, "D2D send time summed over the hops"),
        Metric(ENERGY, S, "energy of every node (also per node)", per_node=True),
        Metric(SENSING_J, S, "sensing energy"),
        Metric(COMPUTE_J, S, "compute energy"),
        Metric(TX_J, S, "transmit energy"),
        Metric(CS_BYTES, S, "client-server bytes: the modules down and up"),
        Metric(MEMORY_MAX, X, "the largest memory any node of the chain needs"),
        Metric(MEMORY, X, "memory per node (per node only)", per_node=True),
        # what the chain did
        Metric(NUM_EXAMPLES, S, "training samples: the FedAvg weight"),
        Metric(TRAIN_LOSS, M, "mean training loss"),
        Metric(TRAIN_ACC, M, "training accuracy"),
        Metric(D2D_FWD, S, "smashed-data bytes the hops carried forward"),
        Metric(D2D_BWD, S, "gradient bytes the hops carried back"),
        Metric(UPLOAD, S, "bytes of the uploaded modules"),
        Metric(COMPUTE_FLOPS, S, "FLOPs the chain computed"),
        Metric(TRAIN_TIME, X, "wall time of the cluster's round"),
        Metric(EVAL_LOSS, M, "the cluster's validation loss"),
        Metric(EVAL_ACC, M, "the cluster's validation accuracy"),
        # the edge server as a node of the chain (edge-offload='auto'): apart from the devices'
        Metric(EDGE_FLOPS, S, "FLOPs the edge server computed for the cluster's chain"),
        Metric(EDGE_COMPUTE_S, X, "the edge server's time on the chain's segment (its share)"),
        Metric(EDGE_ENERGY, S, "the edge server's energy on the chain's segment and its sends"),
        Metric(EDGE_HOP_BYTES, S, "client-edge bytes of the hops into and out of the edge"),
        # who the cluster is
        Metric(PARTITION_ID, K, "the cluster's partition within its edge"),
        Metric(EDGE_ID, K, "the cluster's edge server"),
        Metric(CLUSTER_ID, K, "the population cluster it runs"),
    )
}
NUM_CLUSTERS = "num-clusters"  # added by the aggregation: the clusters it combined
# What the hierarchy adds to a round's metrics: per edge (`edge<e>/<key>`) the clusters that
# trained and whether its aggregate was refused; for the round, whether the cloud aggregated,
# the failures, and the simulated latency through the hierarchy.
CLUSTERS, AGGREGATE_REFUSED = "clusters", "aggregate-refused"
CLOUD_ROUND, FAILED_CLUSTERS, FAILED_AGGREGATES = (
    "cloud-round",
    "failed-clusters",
    "failed-aggregates",
)
ROUND_LATENCY = "round-latency-s"
# What the deployed cloud adds (apps/cloud_app.py): per edge its weight in the cloud's average
# (`edge<e>/edge-weight`), and for the cloud round the edges that contributed or failed.
EDGE_WEIGHT, EDGES_CONTRIBUTED, EDGES_FAILED = "edge-weight", "edges-contributed", "edges-failed"
# ... and per edge the cost model's price of its rounds in the cloud round (the sums of their
# `round-latency-s` and `energy-j`), from which the cloud's row takes its totals: the edges run
# their rounds side by side, so the cloud round takes the slowest edge's time and every edge's
# energy (`edge<e>/edge-rounds-latency-s`, `edge<e>/edge-rounds-energy-j`).
EDGE_ROUNDS_LATENCY, EDGE_ROUNDS_ENERGY = "edge-rounds-latency-s", "edge-rounds-energy-j"
# An integrated round's row (integrated.json, strategies/integrated.py): its profit, so far and
# in all, and the accuracy of the request it served.
PROFIT, CUMULATIVE_PROFIT, SERVED_ACCURACY = "profit", "cumulative-profit", "served-accuracy"
# A results row (metrics.json, apps/recorder.py): the round's aggregated train metrics under
# `train/<key>`, its clusters' aggregated validation under `evaluate/<key>`, its measured wall
# time and the ServerApp process's CPU time over it (in process, the ClientApps' work too: a
# figure that a busy machine moves less than the wall time).
TRAIN_ROW, EVALUATE_ROW, ROUND_TIME = "train", "evaluate", "round-time-s"
ROUND_CPU = "round-cpu-s"
# ... and the wall time of its central evaluation (every edge model on its test set), part of
# the round's: what a benchmark states as the evaluation's share of a round.
CENTRAL_EVAL_TIME = "central-eval-s"
# ... and the fine-tuning so far as the cost model prices it (the sums of `train/round-latency-s`
# and `train/energy-j` through the round): the paper's convergence latency and energy cost
# (Sec. III-C.2) at the round the run stops.
TOTAL_LATENCY, TOTAL_ENERGY = "total-latency-s", "total-energy-j"
# ... and, on the round after which fine-tuning stopped before num-rounds, why (the rule met).
STOPPED = "stopped"


class UndeclaredMetricError(ValueError):
    """A reply carries a metric `METRICS` does not declare: how it aggregates is unknown."""


def aggregate_metrics(records: Sequence[RecordDict], weighting_key: str) -> MetricRecord:
    """The round's metrics from the clusters' replies, each as `METRICS` declares: counters
    summed, times and memory the largest, loss and accuracy weighted by `weighting_key`; a key
    some reply lacks is left out of the weighted means. Used as a Flower strategy's
    `train_metrics_aggr_fn`."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = np.array([float(cast(float, m[weighting_key])) for m in metrics])
    out: dict[str, Any] = {NUM_CLUSTERS: len(metrics)}
    # every key any cluster sent (`<key>/edge` comes only from the chains the edge is part of)
    for key in dict.fromkeys(k for m in metrics for k in m):
        family, _, node = key.partition("/")
        declared = METRICS.get(family)
        if declared is None or (node and not declared.per_node):
            raise UndeclaredMetricError(
                f"reply metric {key!r} is not declared in gaisnet_flwr/contract.py METRICS; "
                f"declare how it aggregates (sum, max, mean or keep)"
            )
        values = [m[key] for m in metrics if key in m]
        if declared.aggregation is Aggregation.SUM:
            out[key] = sum(values)  # type: ignore[arg-type]
        elif declared.aggregation is Aggregation.MAX:
            out[key] = max(values)  # type: ignore[type-var]
        elif declared.aggregation is Aggregation.MEAN and _every(values, metrics, weights):
            out[key] = float(np.average(np.asarray(values, dtype=float), weights=weights))
    return MetricRecord(out)


def _every(values: list[Any], metrics: list[Any], weights: np.ndarray) -> bool:
    """A weighted mean is over every cluster (or none), with some weight."""
    return len(values) == len(metrics) and bool(weights.sum() > 0)


# -- who a node is ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeIdentity:
    """What a node says about itself (its node-config), answering `query.identity`.

    Simulation sets `partition-id` / `num-partitions` over all N nodes; a deployment's
    SuperNode may add `edge-id` (then the partition is within that edge) and `cluster-id` (the
    population cluster it runs)."""

    partition_id: int
    num_partitions: int
    edge_id: int | None = None
    cluster_id: int | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeIdentity:
        try:
            pid, num = int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS])
        except KeyError as err:
            raise ValueError(
                f"node-config lacks {err.args[0]!r}: a cluster needs 'partition-id' and "
                f"'num-partitions' (simulation sets both; deployment: flower-supernode "
                f'--node-config "edge-id=0 partition-id=0 num-partitions=4")'
            ) from err
        if not 0 <= pid < num:
            raise ValueError(f"partition-id={pid} must be in [0, num-partitions={num})")
        cluster = node_config.get(CLUSTER_ID)
        if cluster is not None and int(cluster) < 0:
            raise ValueError(f"cluster-id={cluster} must be >= 0")
        edge = node_config.get(EDGE_ID)
        return cls(
            pid, num, None if edge is None else int(edge), None if cluster is None else int(cluster)
        )

    def to_record(self) -> RecordDict:
        metrics = {PARTITION_ID: self.partition_id, NUM_PARTITIONS: self.num_partitions}
        if self.edge_id is not None:
            metrics[EDGE_ID] = self.edge_id
        if self.cluster_id is not None:
            metrics[CLUSTER_ID] = self.cluster_id
        return RecordDict({METRICS_RECORD: MetricRecord(metrics)})  # type: ignore[arg-type]

    @classmethod
    def from_record(cls, content: RecordDict) -> NodeIdentity:
        m = content.metric_records[METRICS_RECORD]
        edge, cluster = m.get(EDGE_ID), m.get(CLUSTER_ID)
        return cls(
            int(cast(int, m[PARTITION_ID])),
            int(cast(int, m[NUM_PARTITIONS])),
            None if edge is None else int(cast(int, edge)),
            None if cluster is None else int(cast(int, cluster)),
        )

    def place(self, num_edges: int) -> tuple[int, int, int]:
        """(edge, partition within the edge, clusters of the edge). Without `edge-id`, node p of
        N belongs to edge p * E // N: contiguous blocks of nodes per edge."""
        if self.edge_id is not None:
            if not 0 <= self.edge_id < num_edges:
                raise ValueError(
                    f"edge-id={self.edge_id} must be in [0, {num_edges}) (edge-domains)"
                )
            return self.edge_id, self.partition_id, self.num_partitions
        num = self.num_partitions
        if num < num_edges:
            raise ValueError(
                f"{num} client clusters for {num_edges} edge servers: every edge needs one"
            )
        edge = self.partition_id * num_edges // num
        members = [p for p in range(num) if p * num_edges // num == edge]
        return edge, members.index(self.partition_id), len(members)


# -- what a cluster needs, built once by the ServerApp ---------------------------------------------
@dataclass(frozen=True)
class ClusterTask:
    """One cluster's part of the run, built once in the ServerApp's preparation and sent with
    every message: which edge and share of its data, which population cluster, the split plan
    (block ranges), the devices and links of the chain (the cost model's profile), and the
    plan's static costs (per-sample FLOPs and training memory of each node)."""

    edge: int
    domain: str  # the edge's data domain
    shares: tuple[float, ...]  # every edge's share of the data (the edges split one pool)
    partition: int  # within the edge
    num_partitions: int  # clusters of the edge
    cluster: int  # the population's fine-tuning cluster (or the partition)
    plan: SplitPlan
    profile: ClusterProfile
    flops: tuple[tuple[int, int], ...]  # per node: forward and backward FLOPs per sample
    memory: tuple[int, ...]  # per node: bytes a training step needs

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                EDGE_ID: self.edge,
                "domain": self.domain,
                "shares": list(self.shares),
                PARTITION_ID: self.partition,
                NUM_PARTITIONS: self.num_partitions,
                CLUSTER_ID: self.cluster,
                "plan": self.plan.sizes(),
                "profile": json.dumps(_profile_dict(self.profile)),
                "flops": [f for pair in self.flops for f in pair],
                "memory": list(self.memory),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> ClusterTask:
        """Read and check a received task (a malformed one raises ValueError with the reason)."""
        try:
            plan = SplitPlan.from_sizes([int(s) for s in cast(list, record["plan"])])
            profile = _profile_of(json.loads(str(record["profile"])))
            flops = [int(f) for f in cast(list, record["flops"])]
            task = cls(
                edge=int(cast(int, record[EDGE_ID])),
                domain=str(record["domain"]),
                shares=tuple(float(s) for s in cast(list, record["shares"])),
                partition=int(cast(int, record[PARTITION_ID])),
                num_partitions=int(cast(int, record[NUM_PARTITIONS])),
                cluster=int(cast(int, record[CLUSTER_ID])),
                plan=plan,
                profile=profile,
                flops=tuple(zip(flops[::2], flops[1::2], strict=True)),
                memory=tuple(int(m) for m in cast(list, record["memory"])),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed cluster task: {type(err).__name__}: {err}") from err
        nodes = plan.num_peers + 2
        if not (len(profile.devices) == len(task.flops) == len(task.memory) == nodes):
            raise ValueError(
                f"malformed cluster task: a plan of {plan.num_peers} peers needs {nodes} "
                f"devices, FLOPs and memory entries; got {len(profile.devices)}, "
                f"{len(task.flops)}, {len(task.memory)}"
            )
        if not 0 <= task.edge < len(task.shares) or not 0 <= task.partition < task.num_partitions:
            raise ValueError(
                f"malformed cluster task: edge {task.edge}, partition {task.partition}"
            )
        return task


def _profile_dict(profile: ClusterProfile) -> dict[str, Any]:
    return {
        "devices": [dataclasses.asdict(d) for d in profile.devices],
        "hops": [dataclasses.asdict(h) for h in profile.hops],
        "uplink": dataclasses.asdict(profile.uplink),
        "result_link": None
        if profile.result_link is None
        else dataclasses.asdict(profile.result_link),
        "edge": profile.edge,  # the node the edge server runs (edge-offload), or None
        "edge_share": profile.edge_share,
    }


def _profile_of(data: Mapping[str, Any]) -> ClusterProfile:
    result = data["result_link"]
    return ClusterProfile(
        devices=tuple(DeviceProfile(**d) for d in data["devices"]),
        hops=tuple(LinkProfile(**h) for h in data["hops"]),
        uplink=LinkProfile(**data["uplink"]),
        result_link=None if result is None else LinkProfile(**result),
        edge=data.get("edge"),
        edge_share=int(data.get("edge_share", 1)),
    )


def attach_task(message: Message, task: ClusterTask) -> Message:
    """Put `task` into a message a Flower strategy built (any strategy's train or evaluate).
    Flower's strategies give every message of a round one RecordDict: the message gets its
    own (holding the same records, not copies of them) before the task goes in."""
    message.content = RecordDict({**message.content, TASK: task.to_record()})
    return message


# -- requests and replies -------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainRequest:
    """A train message as the ClientApp reads it: the edge's modules, the round, FedProx's mu
    (0 without), and the cluster's task."""

    arrays: ArrayRecord
    server_round: int
    proximal_mu: float
    task: ClusterTask

    @classmethod
    def from_message(cls, message: Message) -> TrainRequest:
        content = message.content
        task = task_of(content)
        config = content.config_records.get(CONFIG, ConfigRecord())
        return cls(
            content.array_records[ARRAYS],
            int(cast(int, config.get(SERVER_ROUND, 0))),
            float(cast(float, config.get(PROXIMAL_MU, 0.0))),
            task,
        )


def task_of(content: RecordDict) -> ClusterTask:
    if TASK not in content.config_records:
        raise ValueError(
            "the message carries no cluster task: the ServerApp sends one with every message "
            "(contract.attach_task)"
        )
    return ClusterTask.from_record(content.config_records[TASK])


def reply_content(arrays: ArrayRecord | None, metrics: Mapping[str, int | float]) -> RecordDict:
    """A reply: the modules (train) and the metrics, Flower's message shape."""
    records: dict[str, Any] = {} if arrays is None else {ARRAYS: arrays}
    records[METRICS_RECORD] = MetricRecord(dict(metrics))  # type: ignore[arg-type]
    return RecordDict(records)


def reply_metrics(message: Message) -> Mapping[str, Any]:
    return message.content.metric_records[METRICS_RECORD]


def num_examples(message: Message) -> int:
    return int(cast(int, reply_metrics(message)[NUM_EXAMPLES]))


@dataclass(frozen=True)
class InferRequest:
    """A `query.infer` message: the model the edge delivers (the tunable modules, or with
    distribution "full" every weight), optional images float32 [N, 3, H, W] (else the start
    point's own held-out images), and the cluster that serves: the node's own task, or the
    inference cluster formed around the requesting device."""

    model: ArrayRecord
    distribution: str
    task: ClusterTask
    requester: str = ""
    inputs: ArrayRecord | None = None

    def to_message(self, node: int) -> Message:
        config: dict[str, Any] = {"distribution": self.distribution}
        if self.requester:
            config["requester"] = self.requester
        records: dict[str, Any] = {
            MODEL: self.model,
            CONFIG: ConfigRecord(config),
            TASK: self.task.to_record(),
        }
        if self.inputs is not None:
            records[INPUTS] = self.inputs
        return Message(RecordDict(records), dst_node_id=node, message_type=QUERY_INFER)

    @classmethod
    def from_message(cls, message: Message) -> InferRequest:
        content = message.content
        config = content.config_records.get(CONFIG, ConfigRecord())
        return cls(
            content.array_records.get(MODEL, ArrayRecord()),
            str(config.get("distribution", "efficient")),
            task_of(content),
            str(config.get("requester", "")),
            content.array_records.get(INPUTS),
        )


def predictions_content(predictions: np.ndarray, metrics: Mapping[str, float | int]) -> RecordDict:
    """An inference reply: the predicted classes and the request's metrics."""
    return RecordDict(
        {
            PREDICTIONS: ArrayRecord({PREDICTIONS: Array(predictions)}),
            METRICS_RECORD: MetricRecord(dict(metrics)),  # type: ignore[arg-type]
        }
    )


def predictions_of(message: Message) -> list[int]:
    return message.content.array_records[PREDICTIONS][PREDICTIONS].numpy().tolist()  # type: ignore[no-any-return]


# -- the failures of a round ----------------------------------------------------------------------
def failure(node: int, edge: int, code: int, reason: str) -> dict[str, int | str]:
    """A failure record (metrics.json `failures`): node -1 is an edge's refused aggregate."""
    return {"node": node, "edge": edge, "code": code, "reason": reason}


def failures_of(
    replies: Iterable[Message], sent_nodes: Iterable[int], edge: int
) -> list[dict[str, int | str]]:
    """The clusters that failed a round: an error reply (e.g. a dead D2D peer; the reply
    carries code and reason) or no reply at all from a node the round was sent to."""
    replies = list(replies)
    failures = [
        failure(r.metadata.src_node_id, edge, int(r.error.code), str(r.error.reason))
        for r in replies
        if r.has_error()
    ]
    answered = {r.metadata.src_node_id for r in replies}
    failures += [
        failure(node, edge, NO_REPLY, "no reply within the round's timeout")
        for node in sent_nodes
        if node not in answered
    ]
    return failures


# -- the global modules: every edge's side by side -------------------------------------------------
def edge_key(edge: int, key: str) -> str:
    return f"edge{edge}/{key}"


def split_edges(arrays: ArrayRecord) -> dict[int, ArrayRecord]:
    """`edge{e}/<key>` -> {e: ArrayRecord(<key>: ...)}."""
    per_edge: dict[int, dict[str, Array]] = {}
    for key, value in arrays.items():
        prefix, _, module = key.partition("/")
        if not prefix.startswith("edge") or not module:
            raise ValueError(f"array key {key!r} is not of the form 'edge<e>/<module>'")
        per_edge.setdefault(int(prefix[4:]), {})[module] = value
    return {e: ArrayRecord(dict(v)) for e, v in sorted(per_edge.items())}


def arrays_of(modules: Mapping[str, np.ndarray]) -> ArrayRecord:
    """NumPy arrays by name as an ArrayRecord (in their order)."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in modules.items()})


def join_edges(per_edge: Mapping[int, ArrayRecord]) -> ArrayRecord:
    return ArrayRecord(
        {edge_key(e, k): v for e, rec in sorted(per_edge.items()) for k, v in rec.items()}
    )


# -- the foundation on the wire: cloud -> edge -> start point, by SHA-256 --------------------------
def ship_message(file: ShippedFile, node: int) -> Message:
    """A `query.foundation` message: the checkpoint's bytes, its name and SHA-256."""
    return Message(
        RecordDict(
            {
                FILE: ArrayRecord({FILE: Array(np.frombuffer(file.payload, dtype=np.uint8))}),
                CONFIG: ConfigRecord({"name": file.name, "sha256": file.sha256}),
            }
        ),
        dst_node_id=node,
        message_type=QUERY_FOUNDATION,
    )


def shipped_of(content: RecordDict) -> ShippedFile:
    """The file a `query.foundation` message carries (ValueError when it carries none)."""
    try:
        config = content.config_records[CONFIG]
        payload = content.array_records[FILE][FILE].numpy().tobytes()
        return ShippedFile(str(config["name"]), str(config["sha256"]), payload)
    except (KeyError, TypeError) as err:
        raise ValueError(f"a query.foundation message without its file: {err}") from err


def with_held(content: RecordDict, held: Mapping[str, str]) -> RecordDict:
    """An identity reply with the foundation checkpoints the node holds (name -> SHA-256)."""
    return RecordDict({**content, HELD: ConfigRecord(dict(held))})


def held_of(content: RecordDict) -> dict[str, str]:
    record = content.config_records.get(HELD, ConfigRecord())
    return {str(k): str(v) for k, v in record.items()}


# -- the cloud and its edge servers as processes of their own (tier 'cloud' / 'edge') -------------
# Run-config keys each process of a deployed hierarchy sets for itself; every other key must be
# the cloud's (an edge checks: apps/edge_app.check_shared), or the edges would train another run.
OWN_KEYS = frozenset({
    "tier", EDGE_ID, EDGE_DIR, "output-dir", "foundation-dir", "resume", "min-clusters",
    "cloud-timeout-s", "max-in-flight", "device", "mlflow-tracking-uri", "inference-requests",
    "peers-per-cluster",  # an edge's chains are its own (the cloud sees only modules)
})  # fmt: skip


def shared_keys(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run-config the cloud and its edge servers must share (all but `OWN_KEYS`)."""
    return {k: v for k, v in sorted(run_config.items()) if k not in OWN_KEYS}


@dataclass(frozen=True)
class EdgeIdentity:
    """What an edge server's cloud-facing SuperNode says about itself (its node-config): which
    edge it is, and the folder it shares with the edge's ServerApp (`apps/bridge.py`)."""

    edge: int
    edge_dir: str = ""

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> EdgeIdentity:
        missing = [k for k in (EDGE_ID, EDGE_DIR) if k not in node_config]
        if missing:
            raise ValueError(
                f"node-config lacks {missing}: the cloud's SuperNodes are edge servers "
                f"(flower-supernode --node-config \"edge-id=0 edge-dir='/srv/edge0'\", the "
                f"edge-dir its ServerApp serves from)"
            )
        edge = int(node_config[EDGE_ID])
        if edge < 0:
            raise ValueError(f"edge-id={edge} must be >= 0")
        return cls(edge, str(node_config[EDGE_DIR]))

    def to_record(self) -> RecordDict:
        return RecordDict({METRICS_RECORD: MetricRecord({EDGE_ID: self.edge})})

    @classmethod
    def from_record(cls, content: RecordDict) -> EdgeIdentity:
        return cls(int(cast(int, content.metric_records[METRICS_RECORD][EDGE_ID])))


@dataclass(frozen=True)
class EdgeRequest:
    """What the cloud asks of an edge server in cloud round `cloud_round`: "train" the
    hierarchy's rounds `first`..`last` from `modules` (what the cloud holds for that edge), or
    "evaluate": take the cloud's delivery `modules` and report its accuracy; `final` marks the
    last cloud round; the edge has `timeout_s` from the message's creation. `shared` is the
    cloud's run-config without the keys each tier sets for itself (config.shared_keys), which
    the edge checks against its own."""

    kind: str
    cloud_round: int
    first: int
    last: int
    final: bool
    timeout_s: float
    modules: ArrayRecord
    shared: Mapping[str, Any] = field(default_factory=dict)

    def to_message(self, node: int) -> Message:
        config = ConfigRecord(
            {
                CLOUD_ROUND: self.cloud_round,
                FIRST_ROUND: self.first,
                LAST_ROUND: self.last,
                FINAL: self.final,
                TIMEOUT: self.timeout_s,
                SHARED_CONFIG: json.dumps(dict(self.shared), sort_keys=True),
            }
        )
        return Message(
            RecordDict({ARRAYS: self.modules, CONFIG: config}),
            dst_node_id=node,
            message_type=TRAIN if self.kind == "train" else EVALUATE,
            group_id=str(self.cloud_round),
        )

    @classmethod
    def from_message(cls, message: Message) -> EdgeRequest:
        content, kind = message.content, message.metadata.message_type
        try:
            config = content.config_records[CONFIG]
            return cls(
                "train" if kind == TRAIN else "evaluate",
                int(cast(int, config[CLOUD_ROUND])),
                int(cast(int, config[FIRST_ROUND])),
                int(cast(int, config[LAST_ROUND])),
                bool(config[FINAL]),
                float(cast(float, config[TIMEOUT])),
                content.array_records[ARRAYS],
                json.loads(str(config.get(SHARED_CONFIG, "{}"))),
            )
        except KeyError as err:
            raise ValueError(f"a cloud {kind} message without {err.args[0]!r}") from err


@dataclass(frozen=True)
class EdgeReport:
    """An edge server's answer: its modules after its rounds (train; none for evaluate), its
    weight in the cloud's average (the training examples of the clusters that trained in its
    last round), its metrics (`edge<e>/<key>`) and its clusters' failures."""

    modules: ArrayRecord | None
    weight: float
    metrics: Mapping[str, float | int]
    failures: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def of(
        cls,
        modules: Mapping[str, np.ndarray],
        weight: float,
        metrics: Mapping[str, float | int],
        failures: Sequence[Mapping[str, Any]],
    ) -> EdgeReport:
        return cls(arrays_of(modules) if modules else None, weight, dict(metrics), tuple(failures))

    def content(self) -> RecordDict:
        records: dict[str, Any] = {} if self.modules is None else {ARRAYS: self.modules}
        records[METRICS_RECORD] = MetricRecord({**self.metrics, EDGE_WEIGHT: self.weight})  # type: ignore[dict-item]
        records[FAILURES] = ConfigRecord({FAILURES: json.dumps(list(self.failures))})
        return RecordDict(records)

    @classmethod
    def from_content(cls, content: RecordDict) -> EdgeReport:
        metrics = dict(content.metric_records[METRICS_RECORD])
        weight = float(cast(float, metrics.pop(EDGE_WEIGHT)))
        failures = json.loads(str(content.config_records[FAILURES][FAILURES]))
        return cls(content.array_records.get(ARRAYS), weight, metrics, tuple(failures))  # type: ignore[arg-type]
