"""A fixed number of images per client cluster, drawn from its edge's pool: data that stays
meaningful however many clusters there are, at a cost that does not depend on their number.

Splitting an edge's pool among N clusters (`images.partition_indices`) gives each cluster
`pool / N` images: at the embedded default's ~860 edge images, 100 clusters hold 8 images each
and 1000 clusters cannot be made at all, and building the split costs O(N) per cluster. With
run-config `cluster-samples = K` every cluster instead draws its own K images, seeded by
(seed, edge, partition), from the whole pool:

- ``iid``: K images drawn at random from the pool;
- ``classes``: from the cluster's ``classes_per_cluster`` classes only (its first class is
  ``partition % num_classes`` as in the split, the others drawn with the cluster's seed);
- ``dirichlet``: per-class counts from Multinomial(K, p) with p ~ Dir(alpha), the cluster's
  own draw.

Within a cluster an image is drawn at most once while its pool allows (a pool smaller than K is
drawn with replacement); clusters draw independently, so two clusters may share an image, as
devices that photograph the same scene do. The work is O(K + pool) per cluster, whatever N.
"""

from __future__ import annotations

import numpy as np

from gaisnet_flwr.data.images import DataError, DataSpec

# Seed stream that keeps these draws apart from every other use of the run seed.
_STREAM = 16


def cluster_sample(
    labels: np.ndarray, count: int, partition_id: int, spec: DataSpec, edge_id: int = 0
) -> np.ndarray:
    """Positions (into ``labels``) of the ``count`` images cluster ``partition_id`` of edge
    ``edge_id`` holds; sorted, deterministic for the same arguments."""
    labels = np.asarray(labels, dtype=np.int64)
    if count < 1:
        raise DataError(f"cluster-samples={count} must be >= 1 (0 splits the pool instead)")
    if len(labels) == 0:
        raise DataError("the edge's pool is empty: no images to draw for a cluster")
    rng = np.random.default_rng([spec.seed, _STREAM, edge_id, partition_id])
    classes = np.unique(labels)
    if spec.partitioning == "iid":
        return np.sort(_draw(rng, np.arange(len(labels)), count))
    if spec.partitioning == "classes":
        if not 1 <= spec.classes_per_cluster <= len(classes):
            raise DataError(
                f"DataSpec.classes_per_cluster={spec.classes_per_cluster} must be in "
                f"[1, {len(classes)}] (the number of classes in the edge's pool)"
            )
        first = classes[partition_id % len(classes)]
        others = rng.permutation(classes[classes != first])[: spec.classes_per_cluster - 1]
        mine = np.flatnonzero(np.isin(labels, [first, *others]))
        return np.sort(_draw(rng, mine, count))
    if spec.partitioning == "dirichlet":
        shares = rng.dirichlet(np.full(len(classes), spec.dirichlet_alpha))
        counts = rng.multinomial(count, shares)
        parts = [
            _draw(rng, np.flatnonzero(labels == c), n)
            for c, n in zip(classes, counts, strict=True)
            if n
        ]
        return np.sort(np.concatenate(parts))
    raise DataError(
        f"DataSpec.partitioning={spec.partitioning!r} is not supported; "
        f"valid choices: iid, classes, dirichlet"
    )


def _draw(rng: np.random.Generator, members: np.ndarray, count: int) -> np.ndarray:
    """``count`` of ``members``: without replacement while there are enough, else with."""
    return rng.choice(members, size=count, replace=count > len(members))
