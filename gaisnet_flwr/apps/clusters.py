"""The ServerApp's side of a population run: which SuperNode runs which formed cluster, what
each cluster's round is predicted to cost, and `clusters.json` (paper Sec. III-C/D, IV-B).

The ServerApp forms the clusters once (`derived.derive`) and sends each node its cluster's
devices, links and plan in every message (`contract.ClusterTask`); a SuperNode needs neither
the population file nor the cost profiles. Fine-tuning cluster c runs on the node whose
cluster-id is c (simulation: partition-id; a deployment: node-config `cluster-id`). Nodes
without a cluster and clusters without a node are reported in clusters.json and the log, never
dropped silently; so are the devices the clustering could not place.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.common.logger import log

from clients.split_client import ClusterData, EdgeDataKey
from gaisnet_flwr.contract import ClusterTask, NodeIdentity
from gaisnet_flwr.data.images import ImageData, partition_indices
from gaisnet_flwr.derived import Derived
from gaisnet_flwr.population.layout import ClusterLayout, round_summary
from gaisnet_flwr.population.planning import (
    RangeCosts,
    Workload,
    predicted_inference_cost,
    predicted_round_cost,
)
from gaisnet_flwr.split.precision import SMASHED_DTYPES
from gaisnet_flwr.vit.model import PromptedViT


@dataclass
class PopulationRun:
    """A population run's clusters on its nodes (see the module docstring)."""

    layout: ClusterLayout
    node_clusters: dict[int, int]  # node id -> fine-tuning cluster index
    idle_nodes: dict[int, str]  # node id -> why it runs no cluster
    unserved: list[int]  # fine-tuning clusters no node runs
    cluster_ids: dict[int, int]  # node id -> the cluster-id it gave
    _requesters: Iterator[str] = field(init=False)

    def __post_init__(self) -> None:
        self._requesters = itertools.cycle([c.start.name for c in self.layout.inference])

    def next_requester(self) -> str:
        """The device the next inference request comes from (the requesters in turn); "" when
        no inference cluster was formed (the request then runs on the node's own cluster)."""
        return next(self._requesters, "")


def assign_nodes(layout: ClusterLayout, identities: Mapping[int, NodeIdentity]) -> PopulationRun:
    """Map nodes to fine-tuning clusters by their cluster-id (simulation: partition-id)."""
    node_clusters: dict[int, int] = {}
    idle: dict[int, str] = {}
    owner: dict[int, int] = {}
    ids = {
        n: i.partition_id if i.cluster_id is None else i.cluster_id
        for n, i in sorted(identities.items())
    }
    for node, cluster in ids.items():
        if cluster >= len(layout.fine_tuning):
            idle[node] = (
                f"cluster-id {cluster}: the population formed {len(layout.fine_tuning)} "
                f"fine-tuning cluster(s)"
            )
        elif cluster in owner:
            raise RuntimeError(f"nodes {owner[cluster]} and {node} both say cluster-id={cluster}")
        else:
            owner[cluster] = node
            node_clusters[node] = cluster
    unserved = [c for c in range(len(layout.fine_tuning)) if c not in owner]
    return PopulationRun(layout, node_clusters, idle, unserved, ids)


def cluster_report(
    derived: Derived,
    run: PopulationRun,
    model: PromptedViT,
    edges: list[ImageData],
    tasks: Mapping[int, ClusterTask],
) -> dict[str, Any]:
    """clusters.json: every formed cluster (members, links, plan), the node that runs it and
    its predicted round by the cost model (sensing, compute and communication side by side),
    the inference clusters with a one-image request, and what was left out."""
    cfg, layout = derived.cfg, run.layout
    t = cfg.training
    modules = ArrayRecord(model.tunable_state()).count_bytes()  # download = upload
    element = SMASHED_DTYPES[cfg.run.smashed_dtype].itemsize
    by_cluster = {c: n for n, c in run.node_clusters.items()}
    split: dict[tuple[int, int], list[np.ndarray]] = {}  # (edge, clusters) -> partitions
    fine_tuning = []
    for cluster in layout.fine_tuning:
        row = cluster.describe()
        node = by_cluster.get(cluster.index)
        row["node"] = node
        if node is not None:
            task = tasks[node]
            # The ClientApp's own rule (cluster-samples, or its share of the edge's split),
            # with each edge's partitions computed once, not once per cluster.
            part = (task.edge, task.num_partitions)
            if not cfg.data.cluster_samples and part not in split:
                split[part] = partition_indices(
                    edges[task.edge].train_labels, part[1], derived.spec
                )
            partitions = functools.partial(split.__getitem__, part)
            data = ClusterData.build(
                EdgeDataKey.of(derived.spec, task, None),
                task.partition,
                task.num_partitions,
                cfg.data.cluster_samples,
                edge_data=edges[task.edge],
                partitions=partitions,
            )
            samples = len(data.train_set)  # type: ignore[arg-type]  # a Subset
            workload = Workload(
                samples, t.batch_size, t.local_epochs, t.optimizer, t.momentum, element
            )
            costs = RangeCosts(derived.meta, workload)
            cost = predicted_round_cost(costs, cluster.profile, cluster.plan, modules, modules)
            row.update(edge=task.edge, samples=samples, predicted_round=round_summary(cost))
        fine_tuning.append(row)
    inference = []
    for cluster in layout.inference:
        row = cluster.describe()
        cost = predicted_inference_cost(
            derived.meta, cluster.profile, cluster.plan, 1, modules, element
        )
        row["predicted_request_one_image"] = round_summary(cost)
        inference.append(row)
    latencies = [r["predicted_round"]["latency_s"] for r in fine_tuning if "predicted_round" in r]
    return {
        "population": layout.population.source,
        "devices": len(layout.population),
        "planner": layout.planner,
        "edge_offload": layout.edge_offload,  # "auto": members with role "edge" ran on it
        "peers_per_cluster": cfg.cluster.peers_per_cluster,
        # clusters train in parallel: the round waits for the slowest (paper Fig. 4)
        "predicted_round_latency_s": max(latencies),
        "fine_tuning": fine_tuning,
        "inference": inference,
        "unplaced_devices": dict(layout.unplaced),
        "idle_nodes": {str(n): why for n, why in run.idle_nodes.items()},
        "clusters_without_node": run.unserved,
    }


def log_report(report: Mapping[str, Any]) -> None:
    """The clusters in the log: one line each, then whatever was left out."""
    log(
        INFO,
        "population %s: %d devices -> %d fine-tuning cluster(s), %d inference cluster(s) "
        "(planner %s); predicted round latency %.3f s (the slowest cluster)",
        report["population"],
        report["devices"],
        len(report["fine_tuning"]),
        len(report["inference"]),
        report["planner"],
        report["predicted_round_latency_s"],
    )
    for row in report["fine_tuning"]:
        members = " -> ".join(m["device"] for m in row["members"])
        predicted = row.get("predicted_round", {}).get("latency_s", float("nan"))
        server = row.get("edge_server")
        on_edge = (
            f", edge server: blocks {server['blocks']}, 1/{server['share']} of it" if server else ""
        )
        log(
            INFO,
            "  fine-tuning %d on node %s: %s, plan %s%s, predicted round %.3f s",
            row["index"], row["node"], members, row["plan"], on_edge, predicted,
        )  # fmt: skip
    for row in report["inference"]:
        members = " -> ".join(m["device"] for m in row["members"])
        log(INFO, "  inference around %s: %s -> back, plan %s", row["start"], members, row["plan"])
    for device, why in report["unplaced_devices"].items():
        log(WARNING, "  device %s in no cluster: %s", device, why)
    for node, why in report["idle_nodes"].items():
        log(WARNING, "  node %s runs no cluster: %s", node, why)
    if report["clusters_without_node"]:
        log(
            WARNING,
            "  fine-tuning cluster(s) %s have no SuperNode to run them (start more nodes: "
            "num-supernodes, or node-config cluster-id)",
            report["clusters_without_node"],
        )
