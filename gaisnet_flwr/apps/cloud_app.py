"""The cloud as a process of its own (run-config tier = 'cloud'; paper Sec. III-B, cloud-edge).

The cloud's SuperLink has one SuperNode per edge server (the edge machine's cloud-facing
SuperNode, whose ClientApp relays to the edge's own ServerApp: `apps/edge_relay.py`,
`apps/bridge.py`). Its ServerApp:

  1. makes (or reuses) the foundation and the edges' initial tunable modules, as the
     one-ServerApp hierarchy does (`Foundation`);
  2. finds its edges (`EdgeDirectory`): asks each node it has not met who it is (edge-id and the
     foundation checkpoints it holds) and ships the checkpoint to an edge that lacks it (checked
     by SHA-256 on arrival); this runs before every cloud round, so a restarted edge, which
     comes back as a new node, is met, given the foundation if it lost it, and sent the current
     cloud modules with the round's request;
  3. runs the cloud rounds (`CloudServer`, strategies/cloud_edge.py): every edge trains its
     rounds from the modules the cloud holds for it and answers with its modules and weight;
     the cloud aggregates with `Cloud.deliver`, the code the one-ServerApp hierarchy runs, and
     delivers back; an edge that fails or misses the deadline costs only its contribution,
     named in the log and in metrics.json; a cloud round no edge contributed to fails the run;
  4. stops after a cloud round whose accuracy meets `target-accuracy` or `patience`
     (apps/convergence.py), and sends every edge that round's delivery again, marked final;
  5. keeps its state after every completed cloud round (output-dir/cloud-state.json and
     cloud-state.npz), and with run-config `resume = true` goes on after the last completed
     one: nothing completed is lost.

Results in output-dir: metrics.json / metrics.csv (one row per cloud round: each edge's weight,
its training totals and, after the delivery, its accuracy; the failures; the cost model's
`total-latency-s` and `total-energy-j` so far, as one ServerApp's rows), rounds/round-NNN.npz
(the modules the cloud delivered), final_tunable.npz, and TensorBoard events.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps.convergence import Converged, stop_if_converged
from gaisnet_flwr.apps.recorder import RunResult, round_file, save_npz, write_rows
from gaisnet_flwr.apps.tracking import Tracking
from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.config import differing
from gaisnet_flwr.contract import EdgeIdentity, shared_keys
from gaisnet_flwr.data.images import load_image_data
from gaisnet_flwr.deploy.shipping import ShippedFile, write_atomic
from gaisnet_flwr.derived import Derived
from gaisnet_flwr.split.precision import resolve_device
from strategies.cloud_edge import Cloud, CloudRound, CloudServer, cloud_chunks

STATE = "cloud-state"  # output-dir/cloud-state.json (+ .npz): the last completed cloud round


# -- the edges: who is who ----------------------------------------------------------------------
class EdgeDirectory:
    """Which SuperNode is which edge server (module docstring, step 2)."""

    def __init__(self, num_edges: int, foundation: ShippedFile | None) -> None:
        self.num_edges = num_edges
        self.foundation = foundation
        self.nodes: dict[int, int] = {}  # edge -> the node that last claimed it
        self.met: set[int] = set()  # every node asked

    def __call__(self, grid: Grid) -> dict[int, int]:
        new = sorted(set(grid.get_node_ids()) - self.met)
        if new:
            self.meet(grid, new)
        return dict(sorted(self.nodes.items()))

    def meet(self, grid: Grid, nodes: list[int]) -> None:
        self.met.update(nodes)
        asks = [Message(RecordDict(), dst_node_id=n, message_type=c.QUERY_IDENTITY) for n in nodes]
        needs: list[int] = []
        for reply in grid.send_and_receive(asks, timeout=120):
            node = reply.metadata.src_node_id
            if reply.has_error():  # e.g. a cluster's SuperNode on the cloud's SuperLink
                log(WARNING, "cloud: node %s is not an edge server: %s", node, reply.error.reason)
                continue
            edge = EdgeIdentity.from_record(reply.content).edge
            if not 0 <= edge < self.num_edges:
                log(WARNING, "cloud: node %s says edge-id=%s; edge-domains lists %d edge(s)",
                    node, edge, self.num_edges)  # fmt: skip
                continue
            if edge in self.nodes:
                log(INFO, "cloud: edge %d is back as node %s (was node %s)", edge, node,
                    self.nodes[edge])  # fmt: skip
            self.nodes[edge] = node
            held = c.held_of(reply.content)
            if self.foundation is not None and held.get(self.foundation.name) != (
                self.foundation.sha256
            ):
                needs.append(node)
        if needs:
            self.ship(grid, needs)

    def ship(self, grid: Grid, nodes: list[int]) -> None:
        """The foundation checkpoint to each node that lacks it: its bytes go once."""
        assert self.foundation is not None
        started = time.perf_counter()
        messages = [c.ship_message(self.foundation, n) for n in nodes]
        for reply in grid.send_and_receive(messages, timeout=600):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "cloud: node %s refused the foundation: %s", node, reply.error.reason)
        log(INFO, "cloud: shipped %s (%.1f MB, SHA-256 %s...) to %d edge(s) in %.1f s",
            self.foundation.name, len(self.foundation.payload) / 1e6,
            self.foundation.sha256[:16], len(nodes), time.perf_counter() - started)  # fmt: skip

    def wait_for_edges(self, grid: Grid, timeout_s: float) -> None:
        """Until every edge has a node (or the timeout: then the edges missing are named)."""
        deadline = time.monotonic() + timeout_s
        while len(self(grid)) < self.num_edges and time.monotonic() < deadline:
            time.sleep(1.0)
        missing = sorted(set(range(self.num_edges)) - set(self.nodes))
        if missing:
            raise RuntimeError(
                f"edge server(s) {missing} did not connect to the cloud within {timeout_s:.0f} s "
                f"(is each edge's cloud-facing SuperNode running, with node-config edge-id and "
                f"edge-dir?)"
            )


# -- the record: a row per cloud round, the state to resume from ----------------------------------
@dataclass
class CloudRecorder:
    """The cloud's results (module docstring) and its state after every completed cloud round."""

    output_dir: Path
    run_config: dict[str, Any]
    tracking: Tracking | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    result: RunResult = field(init=False)
    _started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.result = RunResult(self.output_dir)
        self.result.rows = self.rows

    def round(self, record: CloudRound) -> None:
        """A cloud round's train phase: its row (failures named), and the state if it
        completed (some edge contributed)."""
        now = time.perf_counter()
        row: dict[str, Any] = {
            "round": record.number,
            "edge-rounds": f"{record.first}-{record.last}",
            **record.metrics,
            "failures": record.failures,
            "missing-edges": record.missing,
            c.ROUND_TIME: now - self._started,
        }
        self._started = now
        # The fine-tuning so far as the cost model prices it (one ServerApp's totals): the
        # edges' rounds run side by side, the slowest edge's time, every edge's energy.
        before = self.rows[-1] if self.rows else {}
        edges = [c.edge_key(e, "") for e in sorted(record.reports)]
        latency = [record.metrics.get(f"{e}{c.EDGE_ROUNDS_LATENCY}", 0.0) for e in edges]
        energy = [record.metrics.get(f"{e}{c.EDGE_ROUNDS_ENERGY}", 0.0) for e in edges]
        row[c.TOTAL_LATENCY] = before.get(c.TOTAL_LATENCY, 0.0) + max(latency, default=0.0)
        row[c.TOTAL_ENERGY] = before.get(c.TOTAL_ENERGY, 0.0) + sum(energy)
        self.rows.append(row)
        for f in record.failures:
            log(WARNING, "cloud round %d: edge %s left out: %s", record.number, f["edge"],
                f["reason"])  # fmt: skip
        if record.completed:
            modules = {k: v.numpy() for k, v in c.join_edges(record.delivered).items()}
            self.result.round_modules[record.number] = modules
            save_npz(round_file(self.output_dir, record.number), modules)
            self.save_state(record.number, modules)
        self._write()

    def delivered(self, cloud_round: int, metrics: Mapping[str, Any]) -> None:
        """The edges' answers to the delivery: their accuracy on their own domains."""
        row = self.rows[-1]
        row.update(metrics)
        accuracies = [v for k, v in metrics.items() if k.endswith(f"/{c.ACCURACY}")]
        if accuracies:
            row[c.ACCURACY] = float(np.mean(accuracies))
        log(INFO, "cloud round %d: delivered; accuracy %s", cloud_round,
            ", ".join(f"{k.split('/')[0]} {v:.4f}" for k, v in sorted(metrics.items())
                      if k.endswith(f"/{c.ACCURACY}")) or "not reported")  # fmt: skip
        self._write()
        self._write_state_rows()
        if self.tracking is not None:
            self.tracking.log_row(row)

    def save_state(self, completed: int, modules: Mapping[str, np.ndarray]) -> None:
        save_npz(self.output_dir / f"{STATE}.npz", modules)
        state = {"completed": completed, "config": comparable(self.run_config), "rows": self.rows}
        write_atomic(self.output_dir / f"{STATE}.json", json.dumps(state, indent=2).encode())

    def stopped(self, why: str) -> None:
        """Fine-tuning stopped before num-rounds (apps/convergence.py): the last row says why
        (metrics.json and the state)."""
        self.rows[-1][c.STOPPED] = why
        self._write()
        self._write_state_rows()

    def finish(self, modules: Mapping[str, np.ndarray]) -> Path:
        self.result.final_modules = dict(modules)
        return save_npz(self.output_dir / "final_tunable.npz", modules)

    def _write(self) -> None:
        write_rows(self.output_dir, self.rows)

    def _write_state_rows(self) -> None:
        """The rows of the completed cloud rounds, in the state they follow."""
        state = self.output_dir / f"{STATE}.json"
        if state.exists():
            saved = json.loads(state.read_text())
            saved["rows"] = self.rows
            write_atomic(state, json.dumps(saved, indent=2).encode())

    def close(self, failed: bool = False) -> None:
        if self.tracking is not None:
            names = ("metrics.json", "config.json")
            self.tracking.close([self.output_dir / n for n in names], failed)
            self.tracking = None


def comparable(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run-config a resumed cloud must share with the one it resumes (not `resume`)."""
    return {k: v for k, v in run_config.items() if k != "resume"}


@dataclass(frozen=True)
class CloudState:
    """The last completed cloud round, as the cloud saved it."""

    completed: int
    modules: ArrayRecord
    rows: list[dict[str, Any]]

    @classmethod
    def load(cls, output_dir: Path, run_config: Mapping[str, Any]) -> CloudState | None:
        """The saved state (None without one); a state saved for another configuration is
        refused, naming the keys that differ."""
        path = output_dir / f"{STATE}.json"
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        now = comparable(run_config)
        if saved["config"] != now:
            keys = differing(now, saved["config"])
            raise RuntimeError(
                f"resume=true: {path} was saved by a run with another configuration (differs "
                f"in {keys}); resume with the same run-config, or start afresh (resume=false)"
            )
        with np.load(output_dir / f"{STATE}.npz") as data:
            modules = c.arrays_of({k: data[k] for k in data.files})
        return cls(int(saved["completed"]), modules, list(saved["rows"]))


# -- the run ------------------------------------------------------------------------------------
def run_cloud(grid: Grid, derived: Derived) -> RunResult:
    """The cloud's run (module docstring)."""
    cfg = derived.cfg
    h = cfg.hierarchy
    run_config = cfg.to_dict()
    output_dir = Path(cfg.run.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    state = CloudState.load(output_dir, run_config) if h.resume else None
    (output_dir / "config.json").write_text(json.dumps(run_config, indent=2))

    foundation = Foundation.of(cfg)
    data = load_image_data(derived.spec)
    path = foundation.ensure(data, resolve_device(cfg.run.device))
    shipped = ShippedFile.read(path) if path is not None else None
    model = foundation.load(data.num_classes)
    num_edges = len(h.edge_domains)
    initial = c.join_edges({e: ArrayRecord(model.tunable_state()) for e in range(num_edges)})

    edges = EdgeDirectory(num_edges, shipped)
    edges.wait_for_edges(grid, h.cloud_timeout_s)
    chunks = cloud_chunks(h.num_rounds, h.cloud_every)
    recorder = CloudRecorder(
        output_dir, run_config, Tracking(output_dir, run_config, cfg.run.mlflow_tracking_uri)
    )
    done = 0
    if state is not None:
        done, initial = state.completed, state.modules
        recorder.rows.extend(state.rows)
        log(INFO, "cloud: resuming after cloud round %d of %d (state in %s)", done, len(chunks),
            output_dir)  # fmt: skip
    server = CloudServer(
        Cloud(h.cloud_every, h.cloud_mix, h.cloud_modules),
        chunks,
        edges,
        num_edges,
        h.cloud_timeout_s,
        done=done,
        on_round=recorder.round,
        on_delivered=recorder.delivered,
        shared=shared_keys(run_config),
    )

    def converged(server_round: int, arrays: ArrayRecord) -> None:
        """After a cloud round's delivery and the edges' answers (Flower's evaluate_fn)."""
        if server_round:  # not the initial modules (no row of their own)
            stop_if_converged(recorder.rows, h, done + server_round, arrays)

    final = initial
    try:
        if done < len(chunks):
            result = server.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=len(chunks) - done,
                timeout=h.cloud_timeout_s,
                evaluate_fn=converged,
            )
            final = result.arrays  # fmt: skip
    except Converged as stop:  # before num-rounds (target-accuracy, patience)
        final = stop.arrays
        recorder.stopped(stop.why)
        log(INFO, "stopped after cloud round %d of %d: %s", stop.server_round, len(chunks),
            stop.why)  # fmt: skip
        server.stop(grid, final)
    except BaseException:
        recorder.close(failed=True)
        raise
    path_final = recorder.finish({k: v.numpy() for k, v in final.items()})
    recorder.close()
    last = recorder.rows[-1] if recorder.rows else {}
    log(INFO, "FINAL: cloud, %d cloud round(s) over %d edge(s); accuracy %s; results in %s "
        "(modules: %s)", last.get("round", 0), num_edges, last.get(c.ACCURACY, "n/a"),
        shlex.quote(str(output_dir)),
        path_final.name)  # fmt: skip
    log(INFO, "  cost model, fine-tuning in all: latency %.1f s, energy %.1f J (%s, %s)",
        last.get(c.TOTAL_LATENCY, 0.0), last.get(c.TOTAL_ENERGY, 0.0), c.TOTAL_LATENCY,
        c.TOTAL_ENERGY)  # fmt: skip
    return recorder.result
