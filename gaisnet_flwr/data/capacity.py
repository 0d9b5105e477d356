"""Whether an edge's training pool can be formed into its client clusters: checked once by the
ServerApp, after the nodes are known and before any pre-training or round, so that a setting
every ClientApp would fail on is refused once, naming the run-config key that fixes it.

The rules are those the ClientApps apply (`images.partition_indices`, `cluster_sample`):

- ``cluster-samples = 0``: the edge's N clusters split its pool, at least one image each, so
  N <= pool; ``iid`` cuts equal shards (so that is all), while ``dirichlet`` and ``classes``
  run the same seeded partitioner the clusters will, which may still fail or leave a cluster
  empty (a Dirichlet draw redrawn too often, a class shared by more clusters than it has
  images);
- ``cluster-samples = K > 0``: every cluster draws its own K images whatever N is; it needs a
  non-empty pool and, with ``classes``, ``classes-per-cluster`` classes in it.

A node's own train pool (node-config ``train-classes`` / ``train-images``, the Table III
experiments) is not known to the ServerApp; the ClientApp still checks that one itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from gaisnet_flwr.data.images import DataError, DataSpec, partition_indices, run_config_words


def check_cluster_count(
    pools: Sequence[np.ndarray], num_clusters: int, spec: DataSpec, cluster_samples: int
) -> None:
    """Before any node has said where it belongs: `num_clusters` clusters in distinct places
    over edges whose pools hold the labels `pools` need, with cluster-samples=0, at most as
    many as the pools' images (else some edge has more clusters than images). A bound that
    holds for any placement; `check_edge_clusters` checks each edge once the places are known."""
    total = sum(len(p) for p in pools)
    if cluster_samples or num_clusters <= total:
        return
    edges = f"{len(pools)} edges' pools hold" if len(pools) > 1 else "the edge's pool holds"
    raise DataError(
        f"{num_clusters} client clusters (SuperNodes), but {edges} {total} training image(s): "
        f"with cluster-samples=0 the clusters split the pool, at least one image each; "
        f"{_draw(spec, pools[0])}, or run at most {total} clusters (num-supernodes)"
    )


def check_edge_clusters(
    labels: np.ndarray,
    num_clusters: int,
    spec: DataSpec,
    cluster_samples: int,
    edge: int = 0,
    evaluates: bool = True,
) -> None:
    """Raise `DataError` naming the run-config keys (and the fix) when edge `edge`'s pool,
    `labels`, cannot be formed into `num_clusters` clusters as the ClientApps will form them.
    `evaluates` (fraction-evaluate > 0): some cluster must also hold a validation image (a
    cluster of one image holds none), or the evaluation's weighted mean divides by zero."""
    pool = len(labels)
    classes = len(np.unique(labels))
    where = f"edge {edge} has {num_clusters} client cluster(s) and {pool} training image(s)"
    if pool == 0:
        raise DataError(f"{where}: its pool is empty; give it a larger share (edge-shares)")
    if spec.partitioning == "classes" and spec.classes_per_cluster > classes:
        raise DataError(
            f"{where} of {classes} class(es): classes-per-cluster={spec.classes_per_cluster} "
            f"must be <= {classes}"
        )
    no_validation = (
        "no cluster holds a validation image (val-fraction holds one out of clusters of 2 or "
        "more), so federated evaluation has nothing to weigh; set fraction-evaluate=0 or "
    )
    if cluster_samples:  # (K = 1 with federated evaluation: refused by RunConfig)
        return
    draw = _draw(spec, labels)
    if num_clusters > pool:
        raise DataError(
            f"{where}: with cluster-samples=0 the clusters split the pool, at least one image "
            f"each; {draw}, or run at most {pool} clusters per edge (num-supernodes)"
        )
    if spec.partitioning == "iid":  # equal shards of at least one image each
        if evaluates and num_clusters == pool:  # every shard a single image
            raise DataError(f"{where}: {no_validation}use fewer clusters per edge")
        return
    with warnings.catch_warnings():  # the partitioner warns once per redraw; the error says it
        warnings.simplefilter("ignore")
        try:
            parts = partition_indices(labels, num_clusters, spec)
        except DataError as err:  # its message names the key to change; one more way out
            raise DataError(f"{where}: {run_config_words(str(err))}; or {draw}") from None
    if evaluates and max(len(part) for part in parts) < 2:
        raise DataError(f"{where}: {no_validation}use fewer clusters")
    empty = [k for k, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise DataError(
            f"{where}: partitioning={spec.partitioning!r} leaves {len(empty)} cluster(s) "
            f"without an image (partitions {empty[:5]}{' ...' if len(empty) > 5 else ''}); "
            f"use fewer clusters or {draw}"
        )


def _draw(spec: DataSpec, labels: np.ndarray) -> str:
    """The fix that serves any number of clusters, with a K that matches the few-shot setting:
    `shots` images of each class in the pool (or a fair share of it)."""
    classes = len(np.unique(labels))
    k = spec.shots * classes if spec.shots else max(2, min(len(labels), 100))
    return (
        f"set cluster-samples=K so that every cluster draws its own K images whatever their "
        f"number (e.g. cluster-samples={k})"
    )
