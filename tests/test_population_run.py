"""A run over a generated population of 60 devices: the real ServerApp and ClientApp (in
process) form the clusters, report them, train, and price each round at the slowest cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.derived import derive
from gaisnet_flwr.population.planning import predicted_inference_cost
from tests.conftest import flwr_run_local

pytestmark = pytest.mark.slow

RUN = {
    "population": "generated:60:0",
    "planner": "comm-aware",
    "depth": 4,
    "embed-dim": 32,
    "num-heads": 2,
    "peers-per-cluster": 3,
    "num-rounds": 2,
    "batch-size": 64,
    "foundation": "none",  # random backbone: no pre-training, the run is about the clusters
    "device": "cpu",
    "inference-requests": 3,
}


def test_a_population_run_forms_reports_trains_and_prices_its_clusters(tmp_path: Path) -> None:
    config = {**RUN, "output-dir": str(tmp_path)}
    cfg = RunConfig.from_run_config(config)
    layout = derive(cfg).layout
    assert layout is not None
    formed = len(layout.fine_tuning)
    assert formed >= 4
    # One node more than there are clusters: it is reported idle, the others train.
    run = run_inprocess(config, formed + 1)

    report = json.loads((tmp_path / "clusters.json").read_text())
    assert report["devices"] == 60 and report["planner"] == "comm-aware"
    assert len(report["fine_tuning"]) == formed and len(report["idle_nodes"]) == 1
    assert report["clusters_without_node"] == []
    placed = {
        m["device"] for c in report["fine_tuning"] + report["inference"] for m in c["members"]
    }
    assert placed.isdisjoint(report["unplaced_devices"])
    assert len(placed) + len(report["unplaced_devices"]) == 60  # nobody dropped silently
    for cluster in report["fine_tuning"]:
        assert cluster["node"] is not None and sum(cluster["plan"]) == 4
        assert [m["role"] for m in cluster["members"]] == [
            "start",
            "peer1",
            "peer2",
            "peer3",
            "end",
        ]
        predicted = cluster["predicted_round"]
        assert predicted["sensing_s"] > 0 and predicted["compute_s"] > 0 and predicted["d2d_s"] > 0
    assert len({tuple(c["plan"]) for c in report["fine_tuning"]}) > 1  # their own plans
    slowest = max(c["predicted_round"]["latency_s"] for c in report["fine_tuning"])
    assert report["predicted_round_latency_s"] == slowest

    rows = run.metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        # the round's latency is the slowest cluster's, exactly as the cost model priced it
        assert row["train/latency-s"] == pytest.approx(slowest, rel=1e-12)
        assert row["train/round-latency-s"] >= row["train/latency-s"]
        assert row["train/num-clusters"] == formed
        assert row["train/sensing-j"] > 0 and row["train/compute-j"] > 0 and row["train/tx-j"] > 0
    assert run.modules(2) and any(
        (run.modules(1)[k] != run.modules(2)[k]).any() for k in run.modules(1)
    )  # it trained

    # Inference requests come from the requesting devices, each over its own cluster.
    served = run.inference()
    assert [r["requester"] for r in served] == [
        c.start.name for c in (*layout.inference, *layout.inference)
    ][: len(served)]
    modules = report["fine_tuning"][0]["predicted_round"]["cs_bytes"] // 2
    for row in served:
        assert "error" not in row
        cluster = layout.inference_for(row["requester"])
        price = predicted_inference_cost(
            derive(cfg).meta, cluster.profile, cluster.plan, row["num-samples"], modules
        )
        assert row["latency-s"] == pytest.approx(price.latency_s, rel=1e-12)


def test_the_cluster_report_counts_the_images_the_clusters_train_on(tmp_path: Path) -> None:
    """With `cluster-samples`, each ClientApp draws its own K images: clusters.json predicts
    from that K (the ClientApp's rule), so the priced round still equals the prediction."""
    config = {
        **RUN,
        "cluster-samples": 8,
        "num-rounds": 1,
        "inference-requests": 0,
        "output-dir": str(tmp_path),
    }
    layout = derive(RunConfig.from_run_config(config)).layout
    assert layout is not None
    formed = len(layout.fine_tuning)
    run = run_inprocess(config, formed)
    report = json.loads((tmp_path / "clusters.json").read_text())
    (row,) = [r for r in run.metrics() if r["round"] == 1]
    # what the server predicted from is what the clusters reported training on
    assert sum(c["samples"] for c in report["fine_tuning"]) == row["train/num-examples"]
    assert row["train/latency-s"] == pytest.approx(report["predicted_round_latency_s"], rel=1e-12)


@pytest.mark.simulation
def test_flwr_run_ray_clientapps_run_the_clusters_they_are_sent(tmp_path: Path) -> None:
    """A real `flwr run` (Ray simulation, 2 SuperNodes): the ServerApp forms the clusters and
    sends each ClientApp process its own (devices, links, plan); the 2 nodes run clusters 0
    and 1, the other clusters are reported without a node, and each round's latency is the
    slowest running cluster's prediction."""
    settings = {**RUN, "num-rounds": 1, "inference-requests": 1}
    text = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
    result, out = flwr_run_local(tmp_path, text)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "clusters.json").read_text())
    running = [c for c in report["fine_tuning"] if c["node"] is not None]
    assert [c["index"] for c in running] == [0, 1]
    assert report["clusters_without_node"] == list(range(2, len(report["fine_tuning"])))
    (row,) = [r for r in json.loads((out / "metrics.json").read_text()) if r["round"] == 1]
    slowest = max(c["predicted_round"]["latency_s"] for c in running)
    assert row["train/latency-s"] == pytest.approx(slowest, rel=1e-12)
    (served,) = json.loads((out / "inference.json").read_text())
    assert served["requester"] == report["inference"][0]["start"] and "error" not in served
