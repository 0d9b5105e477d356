"""ServerApp: the cloud and its edge servers running HFSL fine-tuning (paper Sec. III-B, III-C).

Preparation (`prepare`), once: the run-config read and what derives from it built
(`derived.derive`: the data spec, cost profiles, plans, a population's clusters); every node
asked who it is (`query.identity`) and each cluster's task built (`contract.ClusterTask`: its
edge, data share, block ranges, devices and links, the plan's FLOPs and memory), which travels
with every message; one `EdgeServer` per edge with the configured strategy; the data, the
foundation and the edge model. Then Flower's `Strategy.start` runs the rounds: clusters
fine-tune their edge's tunable modules over their split chains, each edge aggregates its
clusters, every `cloud-every` rounds the cloud aggregates across edges, and each edge model is
evaluated on its own domain's test set; results go to `output-dir` (`apps/recorder.py`). With
`service = "integrated"` the integrated strategy decides, round by round, to fine-tune an edge
model or serve a request instead.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps.clusters import PopulationRun, assign_nodes, cluster_report, log_report
from gaisnet_flwr.apps.convergence import Converged, stop_if_converged
from gaisnet_flwr.apps.failed import clear_failed, mark_failed
from gaisnet_flwr.apps.recorder import (
    RoundRecorder,
    RunResult,
    quiet_strategy_log,
    round_file,
    save_npz,
)
from gaisnet_flwr.apps.resume import (
    STATE,
    STATEFUL,
    Resumed,
    check_resumable,
    restore_server_state,
    server_state,
)
from gaisnet_flwr.apps.tracking import Tracking, check_mlflow
from gaisnet_flwr.cloud.foundation import Foundation, check_timm_weights
from gaisnet_flwr.config import ConfigError, RunConfig
from gaisnet_flwr.contract import ClusterTask, InferRequest, NodeIdentity
from gaisnet_flwr.costs.memory import segment_memory
from gaisnet_flwr.costs.pricing import hierarchy_round_latency
from gaisnet_flwr.costs.profiles import ClusterProfile
from gaisnet_flwr.data.capacity import check_cluster_count, check_edge_clusters
from gaisnet_flwr.data.images import DataError, ImageData, edge_image_data, load_image_data
from gaisnet_flwr.deploy.shipping import ShippedFile, recorded_sha256
from gaisnet_flwr.derived import Derived, derive
from gaisnet_flwr.population.edge_offload import plan_round
from gaisnet_flwr.population.layout import share_edge
from gaisnet_flwr.service.scheduler import QualityModel
from gaisnet_flwr.split.flops import segment_flops
from gaisnet_flwr.split.plan import SplitPlan
from gaisnet_flwr.split.precision import Precision, resolve_device, torch_threads
from gaisnet_flwr.training.loops import evaluate
from gaisnet_flwr.vit.model import PromptedViT
from strategies.cloud_edge import Cloud, CloudEdgeStrategy
from strategies.edge import EdgeServer, GridView, RoundOffset
from strategies.integrated import IntegratedStrategy
from strategies.options import unknown_ranges
from strategies.registry import EdgeStrategy, UnknownStrategyError, check_strategy
from strategies.serving import ServeRequests


# -- the boundary -------------------------------------------------------------------------------
def check_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, Derived]:
    """The ServerApp's boundary: every key (`RunConfig.from_run_config`), the environment and
    what derives from it (`derived.derive`), and the edge strategy's options checked and the
    strategy built once (their counts against the clusters once the nodes are known). Before
    any data is read or model trained."""
    cfg = RunConfig.from_run_config(run_config)
    derived = derive(cfg)
    strategy = edge_strategy(cfg)
    build_edge_strategy(cfg, strategy, None)  # the class's own checks of its arguments
    for note in unknown_ranges(strategy.cls, dict(cfg.hierarchy.strategy_options)):
        log(INFO, "strategy option %s", note)  # what cannot be checked here, stated once
    if cfg.cloud.foundation == "timm":  # offline: seconds, not a minute of download retries
        check_timm_weights(cfg.model.model_name)
    if cfg.hierarchy.resume and cfg.hierarchy.tier == "hierarchy":  # what it resumes, readable
        check_resumable(strategy.cls)
        stateful = issubclass(strategy.cls, STATEFUL)
        Resumed.load(output_folder(cfg), cfg.to_dict(), cfg.hierarchy.num_rounds, stateful)
    return cfg, derived


def output_folder(cfg: RunConfig) -> Path:
    return Path(cfg.run.output_dir).expanduser().resolve()


def edge_strategy(cfg: RunConfig) -> EdgeStrategy:
    """The edges' strategy with its options checked (`check_strategy`); a strategy or options
    it cannot build -> ConfigError naming the key (strategy, or strategy-options), the value
    and the reason."""
    h = cfg.hierarchy
    try:
        return check_strategy(
            h.strategy, fraction_evaluate=h.fraction_evaluate, options=dict(h.strategy_options)
        )
    except UnknownStrategyError as err:
        raise ConfigError(f"strategy={h.strategy!r}: {err}") from err
    except ValueError as err:
        raise _options_error(cfg, None, err) from err


def build_edge_strategy(
    cfg: RunConfig, strategy: EdgeStrategy, num_clusters: int | None
) -> Strategy:
    """One edge's instance of the checked `strategy` (`num_clusters` None: not known yet); counts
    its clusters cannot meet -> ConfigError as `edge_strategy`'s."""
    try:
        return strategy.build(num_clusters)
    except ValueError as err:
        raise _options_error(cfg, num_clusters, err) from err


def _options_error(cfg: RunConfig, num_clusters: int | None, err: ValueError) -> ConfigError:
    given = cfg.to_dict()["strategy-options"]  # as the user wrote it (an error path only)
    clusters = "" if num_clusters is None else f", {num_clusters} cluster(s) per edge"
    return ConfigError(
        f"strategy-options={given!r} (strategy={cfg.hierarchy.strategy!r}{clusters}): {err}"
    )


# -- the nodes and their tasks ------------------------------------------------------------------
def wait_for_clusters(grid: Grid, minimum: int = 1, timeout_s: float = 120.0) -> list[int]:
    """Nodes connected now (all of them in simulation). Deployment SuperNodes connect in their
    own time: wait until `minimum` of them are there (run-config min-clusters)."""
    minimum = max(minimum, 1)
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < minimum and time.monotonic() < deadline:
        time.sleep(0.5)
    if len(nodes) < minimum:
        raise RuntimeError(
            f"{len(nodes)} client cluster(s) connected within {timeout_s:.0f} s; "
            f"min-clusters={minimum} needed (are the SuperNodes running and reaching the "
            f"SuperLink's Fleet API?)"
        )
    return nodes


def query_identities(
    grid: Grid, nodes: list[int], held: dict[int, dict[str, str]] | None = None
) -> dict[int, NodeIdentity]:
    """Ask every node who it is (its node-config: partition, edge, population cluster); `held`
    gets the foundation checkpoints each one holds (file name -> SHA-256)."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type=c.QUERY_IDENTITY) for n in nodes]
    identities: dict[int, NodeIdentity] = {}
    for reply in grid.send_and_receive(messages, timeout=120):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise RuntimeError(f"node {node} could not identify itself: {reply.error.reason}")
        identities[node] = NodeIdentity.from_record(reply.content)
        if held is not None:
            held[node] = c.held_of(reply.content)
    missing = sorted(set(nodes) - set(identities))
    if missing:
        raise RuntimeError(f"node(s) {missing} did not answer the identity query")
    return identities


def ship_foundation(grid: Grid, path: Path, held: Mapping[int, Mapping[str, str]]) -> None:
    """The foundation checkpoint at `path` to every node that lacks it (deployment: a start
    point on another device; the cloud's ServerApp to an edge's). A node that lacked it when
    it identified itself is asked again first: one that shares this process's folder (the
    simulation) holds it now that it is made, and gets nothing. The receiver checks the bytes
    against their SHA-256; a node that refuses them, or does not answer, is named in the log,
    and its cluster fails its rounds with the reason (`Foundation.load`). The file's bytes are
    read (and checked against its sidecar) only when a node lacks it."""
    digest = recorded_sha256(path)

    def lacks(files: Mapping[str, str]) -> bool:
        return digest is None or files.get(path.name) != digest

    lacking = sorted(n for n, files in held.items() if lacks(files))
    if lacking:
        again: dict[int, dict[str, str]] = {}
        query_identities(grid, lacking, again)
        lacking = [n for n in lacking if lacks(again.get(n, {}))]
    if not lacking:
        return
    shipped = ShippedFile.read(path)
    started = time.perf_counter()
    replies = grid.send_and_receive([c.ship_message(shipped, n) for n in lacking], timeout=600)
    refused = {r.metadata.src_node_id: r.error.reason for r in replies if r.has_error()}
    for node, reason in refused.items():
        log(ERROR, "node %s refused the foundation: %s", node, reason)
    log(
        INFO,
        "foundation %s (%.1f MB, SHA-256 %s...) shipped to %d node(s) in %.1f s",
        shipped.name,
        len(shipped.payload) / 1e6,
        shipped.sha256[:16],
        len(lacking) - len(refused),
        time.perf_counter() - started,
    )


class TaskBuilder:
    """Each cluster's task: its place in the hierarchy, its chain and the chain's static costs
    (per-sample FLOPs, training memory), computed once per distinct plan."""

    def __init__(self, derived: Derived) -> None:
        self.derived = derived
        self.model = derived.meta  # FLOPs and memory need the shapes only
        self._costs: dict[SplitPlan, tuple[tuple[tuple[int, int], ...], tuple[int, ...]]] = {}

    def costs(self, plan: SplitPlan) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
        if plan not in self._costs:
            t = self.derived.cfg.training
            flops = tuple((f.forward, f.backward) for f in segment_flops(self.model, plan))
            memory = segment_memory(
                self.model, plan, t.batch_size, t.optimizer, momentum=t.momentum
            )
            self._costs[plan] = (flops, tuple(m.training for m in memory))
        return self._costs[plan]

    def task(
        self, place: tuple[int, int, int], cluster: int, plan: SplitPlan, profile: ClusterProfile
    ) -> ClusterTask:
        edge, partition, num_partitions = place
        flops, memory = self.costs(plan)
        domain = self.derived.cfg.hierarchy.edge_domains[edge]
        shares = self.derived.shares
        return ClusterTask(
            edge, domain, shares, partition, num_partitions, cluster, plan, profile, flops, memory
        )


def cluster_tasks(
    derived: Derived, identities: Mapping[int, NodeIdentity], builder: TaskBuilder
) -> tuple[dict[int, ClusterTask], PopulationRun | None]:
    """node id -> its cluster's task, for the nodes that run a cluster: every node with
    identical clusters; with a population, the node whose cluster-id (simulation: partition-id)
    names a formed fine-tuning cluster runs it. With edge-offload 'auto' each edge server's
    clusters share it (`edge_offload.plan_round` over the clusters that run on that edge)."""
    num_edges = len(derived.cfg.hierarchy.edge_domains)
    places = {n: ident.place(num_edges) for n, ident in identities.items()}
    if derived.layout is None:
        clusters = {
            n: i.partition_id if i.cluster_id is None else i.cluster_id
            for n, i in identities.items()
        }
        chains = {n: (derived.plan, derived.cluster) for n in places}
        if derived.edge is not None:
            assert derived.costs is not None
            for e in range(num_edges):
                nodes = sorted(n for n, p in places.items() if p[0] == e)
                shared = plan_round(derived.costs, [derived.cluster] * len(nodes), derived.edge)
                chains.update((n, (p.plan, p.profile)) for n, p in zip(nodes, shared, strict=True))
        tasks = {}
        for n, place in places.items():
            plan, profile = chains[n]
            assert plan is not None  # derive made one, or the edge's placement did
            tasks[n] = builder.task(place, clusters[n], plan, profile)
        return tasks, None
    population = assign_nodes(derived.layout, identities)
    if not population.node_clusters:
        raise RuntimeError(
            f"no node runs a formed cluster: {len(identities)} node(s), "
            f"{len(derived.layout.fine_tuning)} fine-tuning cluster(s) (cluster-ids: "
            f"{sorted(population.cluster_ids.values())})"
        )
    if derived.edge is not None:
        assert derived.costs is not None
        groups = [
            sorted(i for n, i in population.node_clusters.items() if places[n][0] == e)
            for e in range(num_edges)
        ]
        population.layout = share_edge(population.layout, groups, derived.costs, derived.edge)
    tasks = {}
    for node, index in population.node_clusters.items():
        formed = population.layout.fine_tuning[index]
        tasks[node] = builder.task(places[node], index, formed.plan, formed.profile)
    return tasks, population


def check_cluster_data(
    derived: Derived, edges: list[ImageData], per_edge: Mapping[int, dict[int, ClusterTask]]
) -> None:
    """Every edge's clusters can be formed from its pool as the ClientApps will form them
    (`data/capacity.py`); otherwise one ConfigError naming the key that fixes it, instead of
    the same failure in every ClientApp after pre-training."""
    for e, tasks in per_edge.items():
        for num_clusters in sorted({t.num_partitions for t in tasks.values()}):
            try:
                check_edge_clusters(
                    edges[e].train_labels,
                    num_clusters,
                    derived.spec,
                    derived.cfg.data.cluster_samples,
                    e,
                    evaluates=derived.cfg.hierarchy.fraction_evaluate > 0,
                )
            except DataError as err:
                raise ConfigError(str(err)) from None


# -- one run ------------------------------------------------------------------------------------
@dataclass
class HfslRun:
    """Everything one run's rounds need, built once by `prepare`."""

    derived: Derived
    run_config: dict[str, Any]  # the flat run-config (config.json)
    output_dir: Path
    model: PromptedViT  # the edge model on the frozen foundation (modules loaded as needed)
    edges: list[ImageData]  # per edge server: its domain's data (the test split evaluates it)
    tasks: dict[int, ClusterTask]  # node id -> the task of the cluster it runs
    edge_servers: dict[int, EdgeServer]  # one per edge, with the configured strategy
    builder: TaskBuilder
    population: PopulationRun | None = None  # with run-config population: who runs what
    resumed: Resumed | None = None  # with run-config resume: the earlier run's last round
    result: RunResult = field(init=False)
    _requester: str = ""  # the device the latest inference request came from

    def __post_init__(self) -> None:
        self.result = RunResult(self.output_dir)
        self.strategies = {e: s.strategy for e, s in self.edge_servers.items()}
        # what a resumed run needs besides the modules (apps/resume.py)
        self.stateful = any(isinstance(s, STATEFUL) for s in self.strategies.values())

    @property
    def cfg(self) -> RunConfig:
        return self.derived.cfg

    @property
    def node_edges(self) -> dict[int, int]:
        return {n: t.edge for n, t in self.tasks.items()}

    def initial_modules(self) -> ArrayRecord:
        return c.join_edges(
            {e: ArrayRecord(self.model.tunable_state()) for e in range(len(self.edges))}
        )

    # -- central evaluation ---------------------------------------------------------------------
    def evaluate_edge(self, edge: int, modules: ArrayRecord) -> tuple[float, float]:
        """Accuracy and loss of edge `edge`'s model on its domain's test set (on the server's
        GPU when there is one, device='auto')."""
        self.model.load_tunable_state(modules.to_torch_state_dict())
        run = self.cfg.run
        result = evaluate(
            self.model,
            self.edges[edge].test,
            device=resolve_device(run.device),
            precision=Precision(run.precision, run.smashed_dtype),
        )
        return result.accuracy, result.loss

    def central_evaluation(self, arrays: ArrayRecord) -> dict[str, float]:
        """Every edge model on its own test set, and the mean over the edges."""
        row: dict[str, float] = {}
        edges = c.split_edges(arrays)  # all of them, or a deployed edge's own
        for e, modules in edges.items():
            row[c.edge_key(e, c.ACCURACY)], row[c.edge_key(e, "loss")] = self.evaluate_edge(
                e, modules
            )
        row[c.ACCURACY] = sum(row[c.edge_key(e, c.ACCURACY)] for e in edges) / len(edges)
        row["loss"] = sum(row[c.edge_key(e, "loss")] for e in edges) / len(edges)
        return row

    def evaluate_fn(
        self, recorder: RoundRecorder
    ) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """Flower's central evaluation: keep the round's modules, record the round (with its
        accuracy on the rounds `central-eval-every` names, round 0 and the last), and stop
        fine-tuning where a rule of apps/convergence.py says so."""
        h = self.cfg.hierarchy

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            recorder.save_round_modules(server_round, {k: v.numpy() for k, v in arrays.items()})
            if self.stateful:
                path = round_file(self.output_dir, server_round, STATE)
                save_npz(path, server_state(self.strategies))
            if server_round % h.central_eval_every and server_round != h.num_rounds:
                recorder.record(server_round, {})  # the round's row, without accuracy
                return None
            started = time.perf_counter()
            row = self.central_evaluation(arrays)
            seconds = time.perf_counter() - started  # in metrics.json, not in Flower's record
            recorder.record(server_round, {**row, c.CENTRAL_EVAL_TIME: seconds})
            if (h.target_accuracy or h.patience) and h.tier == "hierarchy":  # deployed, the
                stop_if_converged(recorder.rows, h, server_round, arrays)  # cloud decides
            return MetricRecord(row)  # type: ignore[arg-type]

        return central_evaluate

    def hierarchy(
        self, recorder: RoundRecorder, require_training: bool = True
    ) -> CloudEdgeStrategy:
        """The edges under the cloud (a deployed edge: its own alone, `require_training` off:
        the cloud fails a cloud round no edge contributed to)."""
        h = self.cfg.hierarchy
        cloud = Cloud(h.cloud_every, h.cloud_mix, h.cloud_modules)
        edges = self.edge_servers
        clusters = max(len(e.nodes) for e in edges.values())

        def round_latency(server_round: int, train: Mapping[str, Any]) -> float:
            """The slowest cluster, then the busiest edge's FedAvg (the edges aggregate in
            parallel), then on cloud rounds the cloud's."""
            return hierarchy_round_latency(
                float(train[c.LATENCY]),
                self.model.num_tunable(),
                clusters,
                len(self.edges),
                cloud.is_round(server_round),
                self.derived.edge_device,
                self.derived.backhaul,
            )

        return CloudEdgeStrategy(
            edges,
            cloud,
            round_latency,
            recorder.train_round,
            require_training,
            on_evaluate=recorder.evaluate_round,
        )

    # -- SL inference (strategies.serving.Serving) ----------------------------------------------
    def request(self, modules: ArrayRecord, node: int) -> Message:
        """A request to `node` carrying its edge's model; with a population it comes from the
        next requesting device and runs over that device's inference cluster."""
        self._requester = self.population.next_requester() if self.population else ""
        task = self.tasks[node]
        if self._requester:
            assert self.derived.layout is not None
            formed = self.derived.layout.inference_for(self._requester)
            place = (task.edge, task.partition, task.num_partitions)
            task = self.builder.task(place, task.cluster, formed.plan, formed.profile)
        distribution = self.cfg.inference.distribution
        if distribution == "full":  # every weight: the foundation plus the modules
            self.model.load_tunable_state(modules.to_torch_state_dict())
            modules = ArrayRecord(self.model.state_dict())
        return InferRequest(modules, distribution, task, self._requester).to_message(node)

    def report(self, reply: Message | None, node: int, edge: int, index: int) -> dict[str, Any]:
        """The row of a served request (logged); a failed request is reported in its row."""
        row: dict[str, Any] = {"request": index, "node": node, "edge": edge}
        if reply is None:
            row["error"] = "no reply"
        else:
            row["distribution"] = self.cfg.inference.distribution
            if reply.has_error():
                row["error"] = reply.error.reason
                log(INFO, "[inference %d] node %d failed: %s", index, node, reply.error.reason)
            else:
                metrics = dict(c.reply_metrics(reply))
                row.update(metrics)
                row[c.PREDICTIONS] = c.predictions_of(reply)
                log(
                    INFO,
                    "[inference %d] edge %d, node %d: %d samples, accuracy %.4f | %s "
                    "distribution %.1f kB | sim latency %.2f s, energy %.2f J | D2D %.2f MB",
                    index,
                    edge,
                    node,
                    metrics[c.NUM_SAMPLES],
                    metrics.get(c.ACCURACY, float("nan")),
                    row["distribution"],
                    metrics[c.DOWNLOAD] / 1e3,
                    metrics[c.LATENCY],
                    metrics[c.ENERGY],
                    metrics[c.D2D_BYTES] / 1e6,
                )
        if self._requester:
            row["requester"] = self._requester
        return row

    def serving_strategy(self) -> ServeRequests:
        """`inference-requests` SL inference requests after fine-tuning; inference.json keeps
        each as soon as it is served."""

        def write(row: dict[str, Any]) -> None:
            self.result.served.append(row)
            path = self.output_dir / "inference.json"
            path.write_text(json.dumps(self.result.served, indent=2))

        return ServeRequests(self.node_edges, self, write)

    def integrated_strategy(self, tracking: Tracking | None = None) -> IntegratedStrategy:
        cfg = self.cfg

        def write(row: dict[str, Any]) -> None:
            self.result.decisions.append(row)
            path = self.output_dir / "integrated.json"
            path.write_text(json.dumps(self.result.decisions, indent=2))
            if tracking is not None:
                tracking.log_row(row)

        return IntegratedStrategy(
            self.edge_servers,
            policy=cfg.scheduling.policy,
            demand=cfg.scheduling.demand,
            quality=QualityModel(
                value=cfg.scheduling.service_value, finetune_cost=cfg.scheduling.finetune_cost
            ),
            energy_price=cfg.scheduling.energy_price,
            evaluate_edge=lambda e, modules: self.evaluate_edge(e, modules)[0],
            serving=self,
            seed=cfg.run.seed,
            on_round=write,
        )


def edge_pools(derived: Derived) -> tuple[ImageData, list[ImageData]]:
    """The dataset and each edge's data (its share of the pool, in its domain): labels and
    in-memory digits, cheap next to what follows."""
    cfg = derived.cfg
    data = load_image_data(derived.spec)
    edges = [
        edge_image_data(data, e, list(derived.shares), d, seed=cfg.run.seed)
        for e, d in enumerate(cfg.hierarchy.edge_domains)
    ]
    return data, edges


@dataclass
class Clusters:
    """Who runs which cluster, and each edge's server over its clusters."""

    tasks: dict[int, ClusterTask]  # node id -> the task of the cluster it runs
    population: PopulationRun | None
    per_edge: dict[int, dict[int, ClusterTask]]  # edge -> its clusters (a deployed edge: its own)
    servers: dict[int, EdgeServer]


def form_clusters(
    derived: Derived,
    identities: Mapping[int, NodeIdentity],
    builder: TaskBuilder,
    edges: list[ImageData],
    edge: int | None = None,
) -> Clusters:
    """The nodes' clusters and the edges' servers, checked: every edge has a cluster, its
    strategy's counts fit its clusters, its clusters can be formed from its pool. Raises
    ConfigError (RuntimeError for nodes that form nothing) before any model is trained.
    `edge`: a deployed edge server's (tier 'edge'): its own clusters, and only those."""
    cfg = derived.cfg
    tasks, population = cluster_tasks(derived, identities, builder)
    domains = cfg.hierarchy.edge_domains
    served = range(len(domains)) if edge is None else [edge]
    if edge is not None and (others := sorted(n for n, t in tasks.items() if t.edge != edge)):
        raise RuntimeError(
            f"edge server {edge}: node(s) {others} say they belong to another edge (node-config "
            f"edge-id); only edge {edge}'s clusters may connect to its SuperLink"
        )
    per_edge = {e: {n: t for n, t in tasks.items() if t.edge == e} for e in served}
    if empty := [e for e, t in per_edge.items() if not t]:
        raise RuntimeError(
            f"edge(s) {empty} have no client cluster ({len(tasks)} node(s) for "
            f"{len(domains)} edge-domains)"
        )
    strategy = edge_strategy(cfg)
    servers = {
        e: EdgeServer(e, build_edge_strategy(cfg, strategy, len(t)), t) for e, t in per_edge.items()
    }
    check_cluster_data(derived, edges, per_edge)
    return Clusters(tasks, population, per_edge, servers)


def check_simulation(derived: Derived, num_supernodes: int) -> Clusters:
    """What `prepare` refuses once `num_supernodes` simulated SuperNodes (partition-id i of N,
    as Flower's simulation engine sets them) have answered: for a driver to check before it
    starts a SuperLink (experiments/flwr_local.py). Returns the clusters they would run."""
    from gaisnet_flwr.apps.inprocess import simulation_node_configs

    configs = simulation_node_configs(num_supernodes)
    identities = {n: NodeIdentity.from_node_config(c) for n, c in enumerate(configs)}
    return form_clusters(derived, identities, TaskBuilder(derived), edge_pools(derived)[1])


def prepare(grid: Grid, derived: Derived, edge: int | None = None) -> HfslRun:
    """Start-up: config.json, the nodes, the edges' data, the clusters and the edges'
    strategies (cheap, and what can still be refused), then the foundation (shipped to every
    node that lacks it) and the edge models. `edge`: a deployed edge server's own (tier
    'edge'): its clusters only, and the foundation the cloud shipped it, never one made here."""
    cfg = derived.cfg
    run_config = cfg.to_dict()  # the flat run-config, as config.json and the trackers keep it
    output_dir = output_folder(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    resumed = None
    if cfg.hierarchy.resume and edge is None:  # read before config.json is written again
        resumed = Resumed.load(output_dir, run_config, cfg.hierarchy.num_rounds)
        done = "no round" if resumed is None else f"round {resumed.completed}"
        log(INFO, "resume: %s holds %s completed; going on from there", output_dir, done)
    clear_failed(output_dir)
    (output_dir / "config.json").write_text(json.dumps(run_config, indent=2))
    nodes = wait_for_clusters(grid, cfg.hierarchy.min_clusters)
    data, edges = edge_pools(derived)
    served = range(len(edges)) if edge is None else [edge]
    if derived.layout is None:  # before asking every node who it is (1000 nodes: ~30 s)
        try:
            pools = [edges[e].train_labels for e in served]
            check_cluster_count(pools, len(nodes), derived.spec, cfg.data.cluster_samples)
        except DataError as err:
            raise ConfigError(str(err)) from None
    builder = TaskBuilder(derived)
    held: dict[int, dict[str, str]] = {}
    clusters = form_clusters(derived, query_identities(grid, nodes, held), builder, edges, edge)
    tasks, population, per_edge = clusters.tasks, clusters.population, clusters.per_edge
    domains = cfg.hierarchy.edge_domains
    foundation = Foundation.of(cfg)
    if edge is None:
        made = foundation.ensure(data, resolve_device(cfg.run.device))
    else:  # the cloud's, which apps/edge_app.py waited for
        made = foundation.checkpoint_path() if cfg.cloud.foundation == "cloud" else None
    model = foundation.load(data.num_classes)
    if made is not None:
        ship_foundation(grid, made, held)
    log(
        INFO,
        "GaisNet HFSL: %s %s, %d prompts; %d tunable of %d parameters (%.3f %%)",
        cfg.model.model_name,
        cfg.model.mode,
        cfg.model.num_prompts,
        model.num_tunable(),
        model.num_total(),
        100 * model.num_tunable() / model.num_total(),
    )
    for e in served:
        log(
            INFO,
            "edge %d: domain %r, %d clusters, %d training images",
            e,
            domains[e],
            len(per_edge[e]),
            len(edges[e].train_labels),
        )
    if population is not None:
        report = cluster_report(derived, population, model, edges, tasks)
        (output_dir / "clusters.json").write_text(json.dumps(report, indent=2))
        log_report(report)
    else:
        plan = next(iter(tasks.values())).plan
        log(
            INFO,
            "each cluster: start point -> %d peers %s -> end point",
            plan.num_peers,
            plan.sizes(),
        )
    servers = clusters.servers
    return HfslRun(
        derived, run_config, output_dir, model, edges, tasks, servers, builder, population, resumed
    )


# -- the modes ----------------------------------------------------------------------------------
def fine_tune(grid: Grid, run: HfslRun) -> RunResult:
    cfg = run.cfg
    recorder = RoundRecorder(
        run.output_dir,
        cfg.hierarchy.num_rounds,
        run.run_config,
        cfg.run.mlflow_tracking_uri,
        run.result,
    )
    strategy: Strategy = run.hierarchy(recorder)
    initial, evaluate_fn, done = run.initial_modules(), run.evaluate_fn(recorder), 0
    if run.resumed is not None:  # rounds done+1.. from the folder's last round (apps/resume.py)
        done, initial, central = run.resumed.completed, run.resumed.modules, evaluate_fn
        recorder.rows.extend(run.resumed.rows)
        restore_server_state(run.strategies, run.resumed.server_state)
        strategy = offset = RoundOffset(strategy, done)
        evaluate_fn = offset.evaluate(lambda r, arrays: None if r == done else central(r, arrays))
    stopped: Converged | None = None
    try:
        final = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.hierarchy.num_rounds - done,
            evaluate_fn=evaluate_fn,
        ).arrays
    except Converged as stop:  # before num-rounds (target-accuracy, patience)
        final, stopped = stop.arrays, stop
        recorder.stopped(stop.why)
    except BaseException:
        recorder.close(failed=True)  # the rounds so far: summary.png, trackers marked failed
        raise
    path = recorder.save_modules({k: v.numpy() for k, v in final.items()})
    failed = [int(r.get(c.FAILED_CLUSTERS, 0)) for r in recorder.rows[1:]]
    summary = recorder.close()
    if cfg.inference.inference_requests:  # SL inference with the fine-tuned edge models
        run.serving_strategy().start(
            grid=grid,
            initial_arrays=final,
            num_rounds=cfg.inference.inference_requests,
            timeout=300,
        )
    last = recorder.rows[-1]
    if stopped is not None:
        log(INFO, "stopped after round %d of %d: %s", last["round"], cfg.hierarchy.num_rounds,
            stopped.why)  # fmt: skip
    log(
        INFO,
        "FINAL: central test accuracy %.4f after %d rounds (%d edge(s), %d clusters; "
        "%d cluster failure(s) in %d round(s)); results in %s",
        last[c.ACCURACY],
        last["round"],
        len(run.edges),
        len(run.tasks),
        sum(failed),
        sum(n > 0 for n in failed),
        shlex.quote(str(run.output_dir)),  # shell-quoted: a folder may have spaces
    )
    # a line of its own, so that each stays short (what is where, and how to look)
    log(
        INFO,
        "  modules: %s, picture: %s, TensorBoard: tensorboard --logdir %s",
        path.name,
        summary.name,
        shlex.quote(str(run.output_dir.parent)),
    )
    log(INFO, "  cost model, fine-tuning in all: latency %.1f s, energy %.1f J (%s, %s)",
        last[c.TOTAL_LATENCY], last[c.TOTAL_ENERGY], c.TOTAL_LATENCY, c.TOTAL_ENERGY)  # fmt: skip
    return run.result


def integrated(grid: Grid, run: HfslRun) -> RunResult:
    # TensorBoard (and MLflow) get each round's decision row: profit, energy, accuracies.
    tracking = Tracking(run.output_dir, run.run_config, run.cfg.run.mlflow_tracking_uri)
    strategy = run.integrated_strategy(tracking)
    try:
        strategy.start(
            grid=grid, initial_arrays=run.initial_modules(), num_rounds=len(strategy.demand)
        )
    finally:
        names = ("integrated.json", "config.json")
        tracking.close([run.output_dir / n for n in names], failed=sys.exc_info()[0] is not None)
    log(
        INFO,
        "FINAL: %s cumulative profit %.1f over %d rounds; results in %s "
        "(TensorBoard: tensorboard --logdir %s)",
        run.cfg.scheduling.policy,
        strategy.cumulative,
        len(strategy.demand),
        shlex.quote(str(run.output_dir)),  # shell-quoted: a folder may have spaces
        shlex.quote(str(run.output_dir.parent)),
    )
    return run.result


def deployed(tier: str) -> Callable[[Grid, Derived], RunResult]:
    """The run of tier 'cloud' (apps/cloud_app.py) or 'edge' (apps/edge_app.py)."""
    if tier == "cloud":
        from gaisnet_flwr.apps.cloud_app import run_cloud

        return run_cloud
    from gaisnet_flwr.apps.edge_app import run_edge  # it builds on this module's prepare

    return run_edge


def create_server_app(
    fallback_config: Mapping[str, Any] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> ServerApp:
    """A ServerApp; `fallback_config` serves `run_simulation`, which passes no run-config;
    `on_result` receives the run's results (the in-process run returns them)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        started_cpu = time.thread_time()
        output_dir: Path | None = None  # known once the run-config is
        try:
            cfg, derived = check_run_config(context.run_config or fallback_config or {})
            output_dir = output_folder(cfg)
            check_mlflow(cfg.run.mlflow_tracking_uri)  # before any work
            # At most max-in-flight messages at once: Flower's simulation loop scans every
            # stored message for every node (strategies/edge.py: GridView).
            grid = GridView(grid, max_in_flight=cfg.hierarchy.max_in_flight)
            # The server's own threads, on purpose (server-threads), and a round in one line.
            threads = cfg.run.server_threads or None
            with torch_threads(threads), quiet_strategy_log():
                if cfg.hierarchy.tier == "hierarchy":
                    run = prepare(grid, derived)
                    cpu = time.thread_time() - started_cpu
                    log(INFO, "ServerApp thread CPU %.2f s at start-up", cpu)
                    mode = integrated if cfg.scheduling.service == "integrated" else fine_tune
                    result = mode(grid, run)
                else:  # the cloud, or one edge server, as a process of its own (docs/deploy.md)
                    result = deployed(cfg.hierarchy.tier)(grid, derived)
            if on_result is not None:
                on_result(result)
        except Exception as err:
            # One line the drivers (flwr_local, lab) pick out of the stream; then Flower marks
            # the run failed (`flwr ls`: finished:failed).
            reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
            log(ERROR, "RUN FAILED: %s", reason)
            if output_dir is not None:  # the folder says so too (apps/failed.py)
                mark_failed(output_dir, f"the ServerApp failed: {reason}")
            raise
        finally:
            # The ServerApp's own CPU time (this thread): what the scale benchmark subtracts
            # from the simulation process's to tell Flower's loop apart from ours.
            log(INFO, "ServerApp thread CPU %.2f s", time.thread_time() - started_cpu)

    return server


app = create_server_app()
