"""Issue 17 ("Hardening"), outside the config sections: the strategy resolved at the app
boundary, non-finite numbers stopping the work, unreadable checkpoint sidecars, and runs that
fail (no cluster trained, the ServerApp raised) reported as failed."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from torch.utils.data import Subset

import clients.split_client as split_client
from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.apps.server_app import check_run_config
from gaisnet_flwr.cloud.foundation import CheckpointError, Foundation, save_checkpoint
from gaisnet_flwr.config import ConfigError, RunConfig
from gaisnet_flwr.contract import NON_FINITE_AGGREGATE, join_edges, split_edges
from gaisnet_flwr.data.images import ImageData, load_image_data
from gaisnet_flwr.derived import data_spec
from gaisnet_flwr.experiments import flwr_local
from gaisnet_flwr.split.plan import make_plan
from gaisnet_flwr.split.precision import resolve_device
from gaisnet_flwr.training.loops import NonFiniteError, build_model, train_cluster
from strategies.cloud_edge import Cloud, CloudEdgeStrategy, RunFailedError
from strategies.registry import ModuleFedAvg
from tests.conftest import edge_servers, make_reply

TINY: dict[str, Any] = {
    "depth": 2,
    "embed-dim": 32,
    "num-heads": 2,
    "peers-per-cluster": 2,
    "img-size": 16,
    "patch-size": 8,
    "num-rounds": 2,
    "batch-size": 64,
    "inference-requests": 0,
    "foundation": "none",
    "device": "cpu",
}


# -- the strategy, at the ServerApp's boundary ---------------------------------------------------
STRATEGY_CASES = [
    ({"strategy": "nope"}, "strategy='nope': Unknown strategy 'nope'. Valid names: module-fedavg"),
    ({"strategy": "nomodule:Thing"}, "strategy='nomodule:Thing': Strategy path"),
    (
        {"strategy": "fedprox", "strategy-options": "bogus=1"},
        "strategy-options='bogus=1' (strategy='fedprox'): Strategy 'fedprox' (FedProx): "
        "unknown option 'bogus'; valid options: fraction_evaluate,",
    ),
    (
        {"strategy": "qfedavg"},
        "strategy-options='' (strategy='qfedavg'): Strategy 'qfedavg' "
        "(QFedAvg) requires client_learning_rate",
    ),
    ({"strategy": ""}, "strategy='' is not valid: name a registry strategy"),
]


@pytest.mark.parametrize(
    "overrides, message", STRATEGY_CASES, ids=[repr(o) for o, _ in STRATEGY_CASES]
)
def test_bad_strategies_are_refused_at_the_boundary(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        check_run_config(overrides)
    assert message in str(err.value)


def test_the_server_app_refuses_a_bad_strategy_before_loading_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gaisnet_flwr.apps.server_app as server_app

    loaded: list[int] = []
    monkeypatch.setattr(server_app, "load_image_data", lambda spec: loaded.append(1))
    config = {**TINY, "output-dir": str(tmp_path), "strategy": "fedprox",
              "strategy-options": "bogus=1"}  # fmt: skip
    with pytest.raises(ConfigError, match="strategy-options='bogus=1'"):
        run_inprocess(config, num_clusters=2)
    assert not loaded
    # Bulyan needs 4f + 3 clusters per edge: known once the nodes are (after the edges' pools
    # are read: 1000 nodes on 496 images are refused before asking each who it is), still
    # before any foundation is pre-trained or loaded.
    monkeypatch.undo()
    trained: list[int] = []
    monkeypatch.setattr(Foundation, "ensure", lambda *args: trained.append(1))
    config = {**TINY, "output-dir": str(tmp_path), "strategy": "bulyan"}
    with pytest.raises(ConfigError, match=r"strategy='bulyan', 2 cluster\(s\) per edge"):
        run_inprocess(config, num_clusters=2)
    assert not trained


# -- non-finite numbers stop the work ------------------------------------------------------------
def test_a_nan_loss_stops_the_clusters_round_with_the_reason() -> None:
    cfg = RunConfig.of(**{k.replace("-", "_"): v for k, v in TINY.items()})
    model = build_model(cfg.model, cfg.cloud, 10, 0)
    with torch.no_grad():
        model.prompt(0).tokens.fill_(math.nan)
    data = [(torch.rand(3, 16, 16), torch.tensor(i % 10)) for i in range(8)]
    with pytest.raises(NonFiniteError, match=r"training loss is nan at epoch 1, batch 1: .*lr="):
        train_cluster(model, make_plan("even", 2, [1.0, 1.0]), data, cfg.training, seed=0)


@pytest.fixture
def failing_clusters(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[int]]:
    """Partitions listed here train to NaN (as a diverging optimizer would)."""
    failing: set[int] = set()
    real = split_client.train_cluster

    def train(model, plan, dataset, training, seed, **kwargs):  # type: ignore[no-untyped-def]
        result = real(model, plan, dataset, training, seed, **kwargs)
        if failing and model_partition[0] in failing:
            with torch.no_grad():
                model.prompt(0).tokens.fill_(math.inf)
        return result

    model_partition = [0]
    real_train = split_client.SplitClusterClient.train

    def client_train(self, request):  # type: ignore[no-untyped-def]
        model_partition[0] = self.task.partition
        return real_train(self, request)

    monkeypatch.setattr(split_client, "train_cluster", train)
    monkeypatch.setattr(split_client.SplitClusterClient, "train", client_train)
    yield failing


def test_some_clusters_failing_completes_and_says_how_many(
    tmp_path: Path, failing_clusters: set[int], caplog: pytest.LogCaptureFixture
) -> None:
    failing_clusters.add(0)
    run = run_inprocess({**TINY, "output-dir": str(tmp_path)}, num_clusters=2)
    rows = run.metrics()
    assert [r["failed-clusters"] for r in rows[1:]] == [1, 1]
    reason = rows[1]["failures"][0]["reason"]
    assert rows[1]["failures"][0]["code"] == 422 and "non-finite values in module(s)" in reason
    assert all(np.isfinite(v).all() for v in run.modules().values())
    # The run completed; its FINAL line counts the failures.
    (final,) = [r.getMessage() for r in caplog.records if "FINAL:" in r.getMessage()]
    assert "(1 edge(s), 2 clusters; 2 cluster failure(s) in 2 round(s))" in final


def test_a_round_in_which_no_cluster_trained_fails_the_run(
    tmp_path: Path, failing_clusters: set[int]
) -> None:
    failing_clusters.update({0, 1})
    with pytest.raises(RunFailedError, match=r"round 1: no cluster trained \(2 sent, 2 failed; "):
        run_inprocess({**TINY, "output-dir": str(tmp_path)}, num_clusters=2)
    # The folder says so, with the reason, beside what the run wrote (apps/failed.py) ...
    marker = (tmp_path / "FAILED.txt").read_text()
    assert marker.startswith("the ServerApp failed: RunFailedError: round 1: no cluster trained")
    assert (tmp_path / "config.json").is_file() and (tmp_path / "metrics.json").is_file()
    # ... until a run in the same folder completes.
    failing_clusters.clear()
    run_inprocess({**TINY, "output-dir": str(tmp_path), "num-rounds": 1}, num_clusters=2)
    assert not (tmp_path / "FAILED.txt").exists()


def test_a_run_refused_at_its_config_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(ConfigError):
        run_inprocess({**TINY, "output-dir": str(out), "lr": -1}, num_clusters=2)
    assert not out.exists()


def test_an_integrated_fine_tuning_round_in_which_no_cluster_trained_fails_the_run(
    tmp_path: Path, failing_clusters: set[int]
) -> None:
    failing_clusters.update({0, 1})
    # MLCP facing ten requests, with fine-tuning free, fine-tunes the imperfect start model first.
    config = {**TINY, "output-dir": str(tmp_path), "service": "integrated", "policy": "mlcp",
              "demand": ",".join(["0"] * 10), "finetune-cost": 0.0,
              "energy-price": 0.0}  # fmt: skip
    with pytest.raises(RunFailedError, match=r"round 1: no cluster of edge 0 trained \(2 sent; "):
        run_inprocess(config, num_clusters=2)


def test_a_non_finite_aggregate_keeps_the_edges_modules(task_identity: None) -> None:
    def modules(value: float) -> dict[str, np.ndarray]:
        return {"prompt.0": np.full((2, 2), value, np.float32)}

    rounds: list[list] = []
    strategy = CloudEdgeStrategy(
        edge_servers(
            {100: 0, 101: 1}, lambda n: ModuleFedAvg(min_train_nodes=1, min_available_nodes=1)
        ),
        Cloud(every=1, mix=0.5, modules="all"),
        on_round=lambda r, metrics, failures: rounds.append(failures),
    )
    start = join_edges(
        {e: ArrayRecord({k: Array(v) for k, v in modules(1.0).items()}) for e in (0, 1)}
    )
    list(strategy.configure_train(1, start, ConfigRecord(), Mock(spec=Grid)))
    replies = [make_reply(modules(math.inf), 10, 0, node_id=100),
               make_reply(modules(3.0), 10, 0, node_id=101)]  # fmt: skip
    out, metrics = strategy.aggregate_train(1, replies)
    edges = split_edges(out)
    # Edge 0 keeps its 1.0 and weighs nothing in the cloud (= edge 1's 3.0): 0.5 * 3 + 0.5 * 1.
    np.testing.assert_allclose(edges[0]["prompt.0"].numpy(), 2.0)
    np.testing.assert_allclose(edges[1]["prompt.0"].numpy(), 3.0)
    assert metrics is not None and metrics["failed-aggregates"] == 1
    assert metrics["edge0/aggregate-refused"] == 1 and "edge1/aggregate-refused" not in metrics
    ((failure,),) = rounds
    assert failure["edge"] == 0 and failure["code"] == NON_FINITE_AGGREGATE
    assert "edge 0's aggregate is not finite" in str(failure["reason"])


# -- the foundation: non-finite weights and unreadable sidecars are corrupt ----------------------
@pytest.fixture
def cfg(tmp_path: Path) -> RunConfig:
    return RunConfig.of(depth=2, embed_dim=32, num_heads=2, peers_per_cluster=2, img_size=16,
                        patch_size=8, pretrain_epochs=1, foundation_dir=str(tmp_path))  # fmt: skip


@pytest.fixture
def data(cfg: RunConfig) -> ImageData:
    full = load_image_data(data_spec(cfg))
    return dataclasses.replace(full, cloud=Subset(full.cloud, range(64)))


def test_a_foundation_with_non_finite_weights_is_refused_and_rebuilt(
    cfg: RunConfig, data: ImageData
) -> None:
    path = Foundation.of(cfg).ensure(data, resolve_device(cfg.run.device))
    assert path is not None
    state = torch.load(path, weights_only=True)
    poisoned = {k: v.clone() for k, v in state["state"].items()}
    next(iter(poisoned.values())).view(-1)[0] = math.nan
    save_checkpoint(path, poisoned, state["meta"])  # a valid checksum over bad weights
    with pytest.raises(CheckpointError, match="tensor 'cls_token' holds 1 non-finite value"):
        Foundation.of(cfg).load(5)
    Foundation.of(cfg).ensure(data, resolve_device(cfg.run.device))  # the cloud rebuilds it
    Foundation.of(cfg).load(5)


@pytest.mark.parametrize("sidecar", [b"\xff\xfe\x00garbage", b"", None])
def test_an_unreadable_sidecar_is_a_corrupt_checkpoint(
    cfg: RunConfig, data: ImageData, sidecar: bytes | None
) -> None:
    path = Foundation.of(cfg).ensure(data, resolve_device(cfg.run.device))
    assert path is not None
    side = path.with_name(path.name + ".sha256")
    side.unlink()
    if sidecar is None:
        side.mkdir()  # a directory where the sidecar should be: unreadable
    else:
        side.write_bytes(sidecar)
    wrong = "is a folder, where its sidecar goes" if sidecar is None else "does not match its SHA"
    with pytest.raises(CheckpointError, match=wrong):
        Foundation.of(cfg).load(5)  # a client refuses it
    if sidecar is None:
        side.rmdir()
    Foundation.of(cfg).ensure(data, resolve_device(cfg.run.device))  # the cloud rebuilds it
    Foundation.of(cfg).load(5)


def test_pretraining_refuses_to_save_a_non_finite_backbone(
    cfg: RunConfig, data: ImageData, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pretrain-lr=10 is accepted; a step that blows the weights up must not become a foundation.
    real_step = torch.optim.AdamW.step

    def blow_up(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(math.inf)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", blow_up)
    hot = cfg.replace(pretrain_lr=10.0)
    with pytest.raises(NonFiniteError, match=r"pretrain-lr=10.0\); lower pretrain-lr"):
        Foundation.of(hot).ensure(data, resolve_device(hot.run.device))
    assert not Foundation.of(hot).checkpoint_path().exists()


# -- what the drivers report ----------------------------------------------------------------------
def test_the_servers_reason_is_the_first_problem_and_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = (
        "print('INFO :      Successfully started run 7');"
        "print('ERROR :     RUN FAILED: RunFailedError: round 1: no cluster trained (2 sent, 2 "
        "failed; first: node 1 (edge 0): boom)')"
    )
    outcome = flwr_local.stream_run([sys.executable, "-c", script], tmp_path / "run.log", False)
    assert outcome.run_id == "7"
    assert outcome.failure == (
        "RunFailedError: round 1: no cluster trained (2 sent, 2 failed; first: node 1 (edge 0): "
        "boom)"
    )
    monkeypatch.setattr(flwr_local, "run_status", lambda *args, **kwargs: "finished:failed")
    outcome.check(Path("flwr"), default_results=tmp_path)
    assert not outcome.ok
    assert outcome.why.startswith("the ServerApp failed: RunFailedError: round 1: no cluster")
    assert "\n" not in outcome.why


def test_a_quiet_stream_still_shows_how_far_the_run_got(tmp_path: Path) -> None:
    # gaisnet-lab run streams to its log only; these lines reach the terminal as they come.
    lines = [
        "Starting local SuperLink",
        "\x1b[92mINFO \x1b[0m:      Successfully started run 7",
        "\x1b[92mINFO \x1b[0m:      cloud: reusing foundation checkpoint /x.pt",
        "\x1b[92mINFO \x1b[0m:      GaisNet HFSL: vit_tiny_patch16_224 vpt-deep, 10 prompts",
        "\x1b[92mINFO \x1b[0m:      [ROUND 1/2]",
        "\x1b[92mINFO \x1b[0m:      \t└──> Aggregated MetricRecord: {'train-acc': 0.5}",
        "\x1b[92mINFO \x1b[0m:      [round 1/2] acc 0.2000 loss 1.6117 | 0.8 s",
        "\x1b[92mINFO \x1b[0m:      FINAL: central test accuracy 0.2 after 2 rounds; results in /x",
    ]
    script = "import sys; sys.stdout.write(sys.argv[1])"
    shown: list[str] = []
    cmd = [sys.executable, "-c", script, "\n".join(lines) + "\n"]
    outcome = flwr_local.stream_run(cmd, tmp_path / "run.log", False, progress=shown.append)
    assert shown == [
        "Successfully started run 7",
        "GaisNet HFSL: vit_tiny_patch16_224 vpt-deep, 10 prompts",
        "[round 1/2] acc 0.2000 loss 1.6117 | 0.8 s",
        "FINAL: central test accuracy 0.2 after 2 rounds; results in /x",
    ]
    assert outcome.run_id == "7" and outcome.final is not None
    assert (tmp_path / "run.log").read_text().count("\n") == len(lines)  # the log: everything


def test_the_final_line_names_a_results_folder_with_spaces_so_that_it_is_found(
    tmp_path: Path,
) -> None:
    # The ServerApp's FINAL line, as a real run writes it, read back by the drivers (flwr_local,
    # the labs): a checkout or home folder with spaces must not hide the run's results.
    out = tmp_path / "my runs (2026)" / "it's here"
    config = {**TINY, "num-rounds": 1, "output-dir": str(out)}
    run_inprocess(config, num_clusters=2, log_file=tmp_path / "run.log")
    final = next(ln for ln in (tmp_path / "run.log").read_text().splitlines() if "FINAL:" in ln)
    assert flwr_local.final_results(final[final.index("FINAL:") :]) == out
    assert (out / "metrics.json").is_file()
    assert flwr_local.final_results("FINAL: x; results in /a/b (modules: m.npz)") == Path("/a/b")
    assert flwr_local.final_results("FINAL: served 3 requests; results in /x") == Path("/x")
    assert flwr_local.final_results("FINAL: no folder named") is None


def test_flower_installed_under_a_path_with_a_space_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Flower 1.42's SuperLink fails there with "no such table: fab" (its alembic migration
    # folders are space-separated); the drivers say so before starting any process.
    flwr_local.check_flower_install()  # this environment's
    spaced = "/Users/Jane Doe/venv/lib/python3.11/site-packages/flwr"
    with pytest.raises(ValueError, match="a path with a space") as err:
        flwr_local.check_flower_install(spaced)
    assert spaced in str(err.value) and "no such table: fab" in str(err.value)
    from importlib.machinery import ModuleSpec

    found = ModuleSpec("flwr", None, origin=f"{spaced}/__init__.py")
    monkeypatch.setattr(flwr_local.importlib.util, "find_spec", lambda name: found)
    started: list[Path] = []
    monkeypatch.setattr(flwr_local, "stop_local_superlink", lambda home: started.append(home))
    with pytest.raises(SystemExit, match="error: Flower is installed under '/Users/Jane Doe/"):
        flwr_local.main(["run", "--output-dir", str(tmp_path / "out")])
    assert not started and not (tmp_path / "out").exists()
    from gaisnet_flwr.experiments import lab

    with pytest.raises(SystemExit, match="error: Flower is installed under '/Users/Jane Doe/"):
        lab.main(["run", "--dir", str(tmp_path / "lab")])
    assert not (tmp_path / "lab").exists()  # no process, no folder


def test_a_completed_run_says_how_many_clusters_failed(tmp_path: Path) -> None:
    final = (
        "FINAL: central test accuracy 0.5 after 5 rounds (1 edge(s), 4 clusters; 3 cluster "
        "failure(s) in 2 round(s)); results in /x"
    )
    outcome = flwr_local.RunOutcome(0, "1", "finished:completed", final, tmp_path, tmp_path)
    assert outcome.cluster_failures == "3 cluster failure(s) in 2 round(s)"
    outcome.final = final.replace("3 cluster failure(s) in 2", "0 cluster failure(s) in 0")
    assert outcome.cluster_failures == "every cluster trained every round"
    outcome.final = "FINAL: served 3 requests; results in /x"  # no count: not "every cluster ..."
    assert outcome.cluster_failures == "cluster failures: not reported"
    json.dumps(outcome.cluster_failures)
