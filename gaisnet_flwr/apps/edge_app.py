"""One edge server as a process of its own (run-config tier = 'edge'; paper Sec. III-B, edge-end).

The edge's own SuperLink runs this ServerApp over the SuperNodes of its clusters (node-config
`edge-id` = this edge's, `partition-id` within the edge). It prepares as the one-ServerApp
hierarchy prepares an edge (`server_app.prepare`: its clusters' identities and tasks, its
domain's data, the edge model; the foundation shipped on to any start point that lacks it), then
serves the cloud's requests, which its cloud-facing SuperNode hands over through the edge's
folder (run-config `edge-dir`, apps/bridge.py):

  train     (cloud round c: the hierarchy's rounds first..last, from the modules the cloud holds
            for this edge) runs those rounds over its clusters with the edge's strategy, by the
            code one ServerApp runs (`EdgeServer`, inside a `CloudEdgeStrategy` over this one
            edge, for the same metrics and records), and answers with the edge's modules, its
            weight (`EdgeServer.last.weight`), the round's metrics and failures;
  evaluate  (the cloud's delivery) evaluates the delivered modules on the edge's test set and
            records the round, as one ServerApp records a cloud round (after the delivery);
            after the final one the edge saves its final modules, serves any
            `inference-requests` with them, and finishes. A cloud that stops fine-tuning
            before num-rounds (`target-accuracy`, `patience`) sends its last delivery again,
            marked final.

A request carries everything it needs (rounds and modules), so an edge that restarts simply
serves the next one: it rejoins with the cloud's current modules, keeps the rows its earlier
process recorded in its output-dir for the same run-config, and a strategy that keeps state on
the server (FedAdam, FedAvgM, ...) gets back the state saved after the cloud's last delivery
(`EdgeRun.pick_up`).

The foundation: the cloud ships its checkpoint into edge-dir/foundation (through the relay); this
process waits for it there, checks it as every checkpoint is checked, and ships it on.

Results in output-dir: what one ServerApp writes, for this edge (metrics.json with one row per
round, rounds/, final_tunable.npz, clusters.json with a population, TensorBoard events).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps.bridge import BridgeReply, BridgeRequest, EdgeBridge
from gaisnet_flwr.apps.recorder import RoundRecorder, RunResult, round_file
from gaisnet_flwr.apps.resume import STATE, check_resumable, restore_server_state
from gaisnet_flwr.apps.server_app import HfslRun, output_folder, prepare
from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.config import ConfigError, differing
from gaisnet_flwr.contract import OWN_KEYS, shared_keys
from gaisnet_flwr.deploy.shipping import held
from gaisnet_flwr.derived import Derived
from strategies.cloud_edge import cloud_chunks
from strategies.edge import RoundOffset


def wait_for_foundation(derived: Derived, timeout_s: float) -> None:
    """Until the cloud's foundation checkpoint is in the edge's folder, whole and matching its
    SHA-256 (the cloud ships it as soon as it meets the edge)."""
    cfg = derived.cfg
    if cfg.cloud.foundation != "cloud":
        return  # timm's named weights, a file, or a seeded random backbone: nothing travels
    path = Foundation.of(cfg).checkpoint_path()
    deadline = time.monotonic() + timeout_s
    while path.name not in held(path.parent):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"edge {cfg.hierarchy.edge_id}: the cloud's foundation {path.name} did not arrive "
                f"in {path.parent} within {timeout_s:.0f} s (is the cloud's run started, and "
                f"this edge's cloud-facing SuperNode connected to it with this edge-dir?)"
            )
        time.sleep(0.5)
    log(INFO, "edge %d: the cloud's foundation %s is here", cfg.hierarchy.edge_id, path.name)


def earlier_rows(output_dir: Path, run_config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows an earlier process of this edge server recorded in `output_dir` (metrics.json)
    for the same run-config (config.json, read before this process writes its own); none
    otherwise."""
    try:
        same = json.loads((output_dir / "config.json").read_text()) == dict(run_config)
        rows = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return []
    return list(rows) if same and isinstance(rows, list) else []


def last_delivery(rounds: Iterable[int], num_rounds: int, cloud_every: int) -> int:
    """The last of `rounds` after which the cloud delivers (the end of a cloud round, or round
    0: the initial modules): the modules the cloud sends an edge are of such a round."""
    ends = {0} | {last for _, last in cloud_chunks(num_rounds, cloud_every)}
    return max((r for r in rounds if r in ends), default=0)


class EdgeRun:
    """The edge's rounds, requests and records (module docstring)."""

    def __init__(self, grid: Grid, run: HfslRun, earlier: Sequence[dict[str, Any]] = ()) -> None:
        self.grid = grid
        self.run = run
        self.earlier = list(earlier)  # rows of an earlier process of this edge (`pick_up`)
        self.edge = run.cfg.hierarchy.edge_id
        h = run.cfg.hierarchy
        self.recorder = RoundRecorder(
            run.output_dir,
            h.num_rounds,
            run.run_config,
            run.cfg.run.mlflow_tracking_uri,
            run.result,
        )
        self.strategy = run.hierarchy(self.recorder, require_training=False)
        self.central = run.evaluate_fn(self.recorder)
        self.recorded: set[int] = set()
        self.final: ArrayRecord | None = None

    def pick_up(self, first: int) -> None:
        """The first request of this process, for rounds `first`.. : an edge server restarted
        (or serving a resumed cloud) goes on from where its earlier process was. Its rows before
        round `first` stay in metrics.json, and a strategy that keeps state on the server gets
        back the state it saved after the cloud's last delivery before `first` (the cloud
        sends the modules of that delivery)."""
        # A request for round 1 starts a run: a finished run's rows in the folder are not kept.
        kept = [r for r in self.earlier if r["round"] < first] if first > 1 else []
        self.earlier = []
        if not kept:
            return
        self.recorder.rows.extend(kept)
        self.recorded.update(r["round"] for r in kept)
        log(INFO, "edge %d: going on before round %d; %d earlier row(s) kept", self.edge, first,
            len(kept))  # fmt: skip
        for strategy in self.run.strategies.values():
            check_resumable(type(strategy))  # a user's class: state of its own starts afresh
        if not self.run.stateful:
            return
        h = self.run.cfg.hierarchy
        delivered = last_delivery(self.recorded, h.num_rounds, h.cloud_every)
        path = round_file(self.run.output_dir, delivered, STATE)
        if not path.is_file():
            log(WARNING, "edge %d: no %s: the strategy's server state starts afresh", self.edge,
                path)  # fmt: skip
            return
        with np.load(path) as data:
            restore_server_state(self.run.strategies, {k: data[k] for k in data.files})
        log(INFO, "edge %d: the strategy's server state after round %d restored", self.edge,
            delivered)  # fmt: skip

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """The round's row, once (one ServerApp's central evaluation)."""
        if server_round in self.recorded:
            return None
        self.recorded.add(server_round)
        return self.central(server_round, arrays)

    def train(self, request: BridgeRequest) -> BridgeReply:
        """The rounds first..last from the cloud's modules. The last is recorded when the
        cloud's delivery arrives (or, if it never does, when the next request starts from it)."""
        log(INFO, "edge %d: cloud round %d, rounds %d-%d", self.edge, request.cloud_round,
            request.first, request.last)  # fmt: skip
        offset = request.first - 1
        rounds = RoundOffset(self.strategy, offset)
        evaluate = rounds.evaluate(self.evaluate)

        def before_delivery(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            return None if server_round == request.last - offset else evaluate(server_round, arrays)

        result = rounds.start(
            grid=self.grid,
            initial_arrays=self.modules(request),
            num_rounds=request.last - offset,
            timeout=max(1.0, request.deadline - time.time()),
            evaluate_fn=before_delivery,
        )
        server = self.strategy.edges[self.edge]
        last = result.train_metrics_clientapp.get(request.last - offset, MetricRecord())
        own = c.edge_key(self.edge, "")
        metrics = {k: v for k, v in last.items() if k.startswith(own) and _scalar(v)}
        if c.ROUND_LATENCY in last:
            metrics[c.edge_key(self.edge, c.ROUND_LATENCY)] = last[c.ROUND_LATENCY]
        trained = result.train_metrics_clientapp  # the cost model's price of each round
        for key, price in ((c.EDGE_ROUNDS_LATENCY, c.ROUND_LATENCY),
                           (c.EDGE_ROUNDS_ENERGY, c.ENERGY)):  # fmt: skip
            metrics[c.edge_key(self.edge, key)] = sum(
                float(cast(float, trained[r].get(price, 0.0))) for r in sorted(trained)
            )
        modules = c.split_edges(result.arrays)[self.edge]
        return BridgeReply(
            {k: v.numpy() for k, v in modules.items()},
            server.last.weight,
            metrics,  # type: ignore[arg-type]
            [dict(f) for f in server.last.failures],
        )

    def deliver(self, request: BridgeRequest) -> BridgeReply:
        """The cloud's delivery after round `request.last`: recorded with its evaluation."""
        arrays = self.modules(request)
        self.evaluate(request.last, arrays)
        row = self.recorder.rows[-1] if self.recorder.rows else {}
        metrics = {k: row[k] for k in (c.edge_key(self.edge, c.ACCURACY),
                                      c.edge_key(self.edge, "loss")) if k in row}  # fmt: skip
        if request.final:
            self.final = arrays
            if request.last < self.run.cfg.hierarchy.num_rounds and self.recorder.rows:
                why = f"the cloud stopped fine-tuning after cloud round {request.cloud_round}"
                log(INFO, "edge %d: %s (its metrics.json says why)", self.edge, why)
                self.recorder.stopped(why)
        return BridgeReply(metrics=metrics)

    def modules(self, request: BridgeRequest) -> ArrayRecord:
        """The request's modules, under this edge's keys (`edge<e>/<module>`)."""
        return c.join_edges({self.edge: c.arrays_of(request.modules)})


def check_shared(edge: int, own: Mapping[str, Any], cloud: Mapping[str, Any]) -> None:
    """The run-config this edge was given must be the cloud's (but for the keys each tier sets
    for itself: config.OWN_KEYS); otherwise its modules would come from another run."""
    if keys := differing(shared_keys(own), cloud):
        raise ConfigError(
            f"edge {edge}: its run-config differs from the cloud's in {keys}; submit the edge's "
            f"run with the cloud's values (only {sorted(OWN_KEYS)} may differ)"
        )


def _scalar(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def serve(bridge: EdgeBridge, edge: EdgeRun) -> None:
    """Answer the cloud's requests until its final delivery."""
    handlers: dict[str, Callable[[BridgeRequest], BridgeReply]] = {
        "train": edge.train,
        "evaluate": edge.deliver,
    }
    while edge.final is None:
        request = bridge.next_request()
        assert request is not None  # no timeout: it waits
        try:
            check_shared(edge.edge, edge.run.run_config, request.shared)
            if edge.earlier:
                edge.pick_up(request.first)
            reply = handlers[request.kind](request)
        except Exception as err:  # the cloud hears why; this edge server stops
            bridge.reply(request, BridgeReply(error=f"{type(err).__name__}: {err}"))
            raise
        bridge.reply(request, reply)


def run_edge(grid: Grid, derived: Derived) -> RunResult:
    """The edge server's run (module docstring)."""
    h = derived.cfg.hierarchy
    bridge = EdgeBridge(h.edge_dir)
    bridge.open()
    # The edge's foundation is the cloud's, in its own folder (never made here).
    cfg = derived.cfg.replace(foundation_dir=str(bridge.foundation_dir))
    derived = dataclasses.replace(derived, cfg=cfg)
    log(INFO, "edge %d: serving from %s (pid in server.json)", h.edge_id, bridge.dir)
    wait_for_foundation(derived, h.cloud_timeout_s)
    earlier = earlier_rows(output_folder(cfg), cfg.to_dict())  # before prepare writes config.json
    run = prepare(grid, derived, edge=h.edge_id)
    edge = EdgeRun(grid, run, earlier)
    try:
        serve(bridge, edge)
    except BaseException:
        edge.recorder.close(failed=True)
        raise
    assert edge.final is not None
    path = edge.recorder.save_modules({k: v.numpy() for k, v in edge.final.items()})
    edge.recorder.close()
    if cfg.inference.inference_requests:  # SL inference with the edge's final model
        run.serving_strategy().start(
            grid=grid,
            initial_arrays=edge.final,
            num_rounds=cfg.inference.inference_requests,
            timeout=300,
        )
    last = edge.recorder.rows[-1] if edge.recorder.rows else {}
    log(INFO, "FINAL: edge %d, central test accuracy %.4f after %d rounds; results in %s "
        "(modules: %s)", h.edge_id, last.get(c.ACCURACY, float("nan")), last.get("round", 0),
        shlex.quote(str(run.output_dir)), path.name)  # fmt: skip
    return run.result
