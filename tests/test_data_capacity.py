"""Data-size errors before work (issue 29, Build 5): clusters the data cannot form are refused by
the ServerApp once, naming the key that fixes it, before the foundation is pre-trained or a
round starts; what every ClientApp would still meet is reported once, not once per message.

Before: 1000 clusters on the default config (496 edge images) started Flower and Ray,
pre-trained, then failed in every ClientApp with "num_partitions=1000 must be in [1, 496]",
18,008 error lines."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.config import ConfigError, RunConfig
from gaisnet_flwr.contract import CLUSTER_DATA, failure
from gaisnet_flwr.data.capacity import check_cluster_count, check_edge_clusters
from gaisnet_flwr.data.images import DataError, DataSpec
from gaisnet_flwr.experiments import flwr_local
from strategies.edge import log_failures
from tests.conftest import flwr_run_local

REPO = Path(__file__).resolve().parents[1]
TINY: dict[str, Any] = {
    "depth": 2, "embed-dim": 32, "num-heads": 2, "peers-per-cluster": 1, "img-size": 16,
    "patch-size": 8, "num-rounds": 1, "inference-requests": 0, "foundation": "none",
    "device": "cpu",
}  # fmt: skip
POOL = np.repeat(np.arange(5), 20)  # 100 images, 5 classes of 20


# -- the rules, on labels ------------------------------------------------------------------------
def test_more_clusters_than_images_names_cluster_samples_and_the_bound() -> None:
    with pytest.raises(DataError) as info:
        check_edge_clusters(POOL, 101, DataSpec(), cluster_samples=0, edge=2)
    assert str(info.value) == (
        "edge 2 has 101 client cluster(s) and 100 training image(s): with cluster-samples=0 the "
        "clusters split the pool, at least one image each; set cluster-samples=K so that every "
        "cluster draws its own K images whatever their number (e.g. cluster-samples=50), or run "
        "at most 100 clusters per edge (num-supernodes)"
    )
    check_edge_clusters(POOL, 101, DataSpec(), cluster_samples=20)  # each draws its own


def test_clusters_of_one_image_leave_evaluation_nothing_to_weigh() -> None:
    with pytest.raises(DataError, match="no cluster holds a validation image"):
        check_edge_clusters(POOL, 100, DataSpec(), cluster_samples=0)
    check_edge_clusters(POOL, 100, DataSpec(), cluster_samples=0, evaluates=False)
    check_edge_clusters(POOL, 99, DataSpec(), cluster_samples=0)  # one cluster holds two
    with pytest.raises(ConfigError, match="cluster-samples=1 leaves no cluster a validation"):
        RunConfig.of(cluster_samples=1)
    RunConfig.of(cluster_samples=1, fraction_evaluate=0.0)


def test_partitioners_that_cannot_split_are_refused_with_the_key_to_change() -> None:
    with pytest.raises(DataError) as info:
        check_edge_clusters(POOL, 40, DataSpec(partitioning="dirichlet"), cluster_samples=0)
    text = str(info.value)
    assert "raise dirichlet-alpha or use fewer partitions" in text and "cluster-samples=" in text
    assert "DataSpec." not in text
    with pytest.raises(DataError, match="classes-per-cluster=6 must be <= 5"):
        check_edge_clusters(
            POOL, 4, DataSpec(partitioning="classes", classes_per_cluster=6), cluster_samples=20
        )
    with pytest.raises(DataError, match="lower classes-per-cluster or use fewer partitions"):
        check_edge_clusters(
            POOL, 60, DataSpec(partitioning="classes", classes_per_cluster=3), cluster_samples=0
        )
    check_edge_clusters(POOL, 5, DataSpec(partitioning="classes"), cluster_samples=0)


def test_an_empty_pool_names_edge_shares() -> None:
    with pytest.raises(DataError, match=r"edge 1 .*its pool is empty.*edge-shares"):
        check_edge_clusters(POOL[:0], 1, DataSpec(), cluster_samples=8, edge=1)


def test_the_count_before_any_node_is_placed_bounds_every_placement() -> None:
    """N clusters in distinct places over pools of 100 + 30 images: more than 130 cannot fit,
    whichever edge each node turns out to belong to."""
    check_cluster_count([POOL, POOL[:30]], 130, DataSpec(), cluster_samples=0)
    with pytest.raises(DataError, match=r"131 client clusters .* 2 edges' pools hold 130"):
        check_cluster_count([POOL, POOL[:30]], 131, DataSpec(), cluster_samples=0)
    check_cluster_count([POOL], 10_000, DataSpec(), cluster_samples=8)


# -- the ServerApp: once, before the foundation, before asking each node who it is -------------
def test_the_server_app_refuses_before_the_identity_query_and_any_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gaisnet_flwr.apps.server_app as server_app
    from gaisnet_flwr.cloud.foundation import Foundation

    asked: list[int] = []
    trained: list[int] = []
    monkeypatch.setattr(server_app, "query_identities", lambda grid, nodes: asked.append(1))
    monkeypatch.setattr(Foundation, "ensure", lambda *args: trained.append(1))
    config = {**TINY, "output-dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="set cluster-samples=K"):
        run_inprocess(config, num_clusters=497)  # the edge's pool: 496 images
    assert not asked and not trained


def test_per_edge_limits_are_checked_once_the_places_are_known(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two edges of 248 images each: 300 clusters pass the count (496) but give each edge 150
    clusters, which a Dirichlet split of 248 images cannot hold."""
    from gaisnet_flwr.cloud.foundation import Foundation

    trained: list[int] = []
    monkeypatch.setattr(Foundation, "ensure", lambda *args: trained.append(1))
    config = {**TINY, "output-dir": str(tmp_path), "edge-domains": "none,invert",
              "partitioning": "dirichlet"}  # fmt: skip
    with pytest.raises(ConfigError, match=r"^edge 0 has 150 client cluster\(s\) and 248 train"):
        run_inprocess(config, num_clusters=300)
    assert not trained


@pytest.mark.slow
def test_the_flwr_run_driver_refuses_1000_supernodes_within_30_s_in_one_line(
    tmp_path: Path,
) -> None:
    """The acceptance: `num-supernodes=1000` on the default config, through the project's
    `flwr run` driver (what scripts/run.sh runs): refused before any SuperLink, in one line
    that names cluster-samples (the ServerApp's own refusal is test_flwr_run.py's)."""
    started = time.monotonic()
    result, out = flwr_run_local(tmp_path, "num-rounds=1", num_supernodes=1000)
    elapsed = time.monotonic() - started
    print(f"\n1000 SuperNodes refused in {elapsed:.1f} s")
    assert result.returncode != 0
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: edge 0 has 1000 client"), lines
    assert "cluster-samples" in lines[0]
    assert not (tmp_path / "flwr-home" / "local-superlink").exists(), "a SuperLink was started"
    assert elapsed < 30, f"{elapsed:.1f} s"


def test_the_driver_checks_the_simulations_clusters_without_starting_anything() -> None:
    overrides = {"partitioning": "dirichlet"}
    with pytest.raises(flwr_local.RunConfigError, match="raise dirichlet-alpha"):
        flwr_local.check_run_config(REPO, overrides, num_supernodes=200)
    flwr_local.check_run_config(REPO, overrides, num_supernodes=4)


# -- what every ClientApp would still meet: one line per reason ----------------------------------
def test_a_thousand_clusters_failing_alike_are_one_line(caplog: pytest.LogCaptureFixture) -> None:
    failures = [failure(n, 0, CLUSTER_DATA, "train-images=9 gives no image") for n in range(1000)]
    failures.append(failure(7777, 0, 503, "peer 2 is down"))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        log_failures("round 1: edge 0", failures)
    assert [r.getMessage() for r in caplog.records] == [
        "round 1: edge 0: 1000 cluster(s) left out (node 0, 1, 2 and 997 more): train-images=9 "
        "gives no image",
        "round 1: edge 0: 1 cluster(s) left out (node 7777): peer 2 is down",
    ]


def test_a_cluster_whose_data_cannot_be_formed_replies_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A node's own train pool (node-config) the ServerApp cannot know: the ClientApp answers
    with the reason (no traceback) and the edge reports it once for all its clusters."""
    config = {**TINY, "output-dir": str(tmp_path), "num-rounds": 1}
    nodes = [
        {"partition-id": k, "num-partitions": 3, "train-classes": 5, "train-images": 2}
        for k in range(3)
    ]
    with caplog.at_level(logging.INFO, logger="flwr"), pytest.raises(Exception, match="no cluster"):
        run_inprocess(config, 3, node_configs=nodes)
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 1 and "3 cluster(s) left out" in left_out[0], left_out
    assert "train-images=2 gives no image" in left_out[0]
    assert not [r for r in caplog.records if "Traceback" in r.getMessage()]
