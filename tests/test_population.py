"""A device population, the clusters formed from it, the communication-aware planner and the
sensing cost (paper Sec. III-B to III-D, IV-A/B)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from gaisnet_flwr.apps.clusters import assign_nodes
from gaisnet_flwr.apps.server_app import check_run_config
from gaisnet_flwr.config import ConfigError, RunConfig, TrainingSection
from gaisnet_flwr.contract import NodeIdentity
from gaisnet_flwr.costs.pricing import RoundCost, fine_tuning_round_cost, inference_cost
from gaisnet_flwr.costs.profiles import (
    ClusterProfile,
    DeviceProfile,
    LinkProfile,
    Profiles,
    load_profiles,
)
from gaisnet_flwr.derived import derive
from gaisnet_flwr.population.devices import (
    GENERATED_PROFILES,
    PopulationError,
    generate_population,
    load_population,
)
from gaisnet_flwr.population.layout import check_memory, form_layout
from gaisnet_flwr.population.planning import (
    RangeCosts,
    Workload,
    peer_time_s,
    plan_cluster,
    predicted_round_cost,
)
from gaisnet_flwr.split.flops import SegmentFlops
from gaisnet_flwr.split.plan import PlanError, SplitPlan, plan_bottleneck, plan_min_max_stages
from gaisnet_flwr.split.precision import Precision
from gaisnet_flwr.training.loops import train_cluster
from gaisnet_flwr.vit.model import PromptedViT, build_prompted_vit
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "conf" / "population-example.toml"
PROFILES = load_profiles()


def write(tmp_path: Path, text: str, suffix: str = ".toml") -> Path:
    path = tmp_path / f"cell{suffix}"
    path.write_text(text)
    return path


def device(name: str, x: float, y: float = 0.0, **extra: object) -> str:
    lines = [f'name = "{name}"', f"x_m = {x}", f"y_m = {y}"]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()]
    return "[[device]]\n" + "\n".join(lines) + "\n"


LINE = '[defaults]\nprofile = "phone-mid"\n' + "".join(device(f"d{i}", 50.0 * i) for i in range(3))


# -- the population file ------------------------------------------------------------------------
def test_the_example_files_hold_the_same_devices() -> None:
    toml = load_population(EXAMPLE, PROFILES)
    csv = load_population(EXAMPLE.with_suffix(".csv"), PROFILES)
    assert toml.devices == csv.devices
    assert len(toml) == 15 and toml.requesters == ["cam-r"]
    assert [d.name for d in toml.devices if d.data] == ["cam-a", "hub"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('x_m = "north"', "device 'bad': bad position: x_m='north' is not a finite number"),
        ("y_m = nan", "device 'bad': bad position: y_m=nan is not a finite number"),
        ("x_m = inf", "device 'bad': bad position: x_m=inf"),
        ('profile = "phone-xl"', "device 'bad': unknown device profile 'phone-xl'; valid: "),
        ("d2d_range_m = 0", "device 'bad': d2d_range_m=0 must be > 0 metres"),
        ('data = "yes"', "device 'bad': data='yes' must be true or false"),
        ("colour = 1", "device 'bad': unknown key(s) ['colour']; valid: name, x_m"),
    ],
)
def test_a_bad_device_is_refused_by_name(tmp_path: Path, row: str, message: str) -> None:
    bad = '[[device]]\nname = "bad"\nx_m = 60.0\ny_m = 0.0\nprofile = "phone-mid"\n'
    lines = [line for line in bad.splitlines() if not line.startswith(row.split(" ")[0])]
    text = LINE + "\n".join([*lines, row]) + "\n"
    with pytest.raises(PopulationError, match=re.escape(message)):
        load_population(write(tmp_path, text), PROFILES)


def test_a_device_no_cluster_can_take_is_refused_by_name(tmp_path: Path) -> None:
    far = device("far", 5000.0, profile="phone-mid")
    with pytest.raises(PopulationError, match=r"device 'far' at \(5000, 0\) m reaches no other"):
        load_population(write(tmp_path, LINE + far), PROFILES)
    # Within reach of one device but out of its (shorter) range: still no D2D.
    shy = device("shy", 180.0, profile="phone-mid", d2d_range_m=20.0)
    with pytest.raises(PopulationError, match=r"'shy'.*nearest: 'd2' at 80 m.*no cluster can"):
        load_population(write(tmp_path, LINE + shy), PROFILES)


def test_a_device_without_memory_for_any_segment_is_refused_by_name(tmp_path: Path) -> None:
    tiny = DeviceProfile("tiny", 1e9, 8, memory_bytes=1024)
    profiles = Profiles({**PROFILES.devices, "tiny": tiny}, PROFILES.links)
    population = load_population(
        write(tmp_path, LINE + device("mote", 100.0, 50.0, profile="tiny")), profiles
    )
    with pytest.raises(PopulationError, match=r"device 'mote' \(tiny\) has 0.0 MiB.*no cluster"):
        check_memory(population, profiles, RangeCosts(meta_model(), Workload(8, 8)))


def test_other_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PopulationError, match="appears twice"):
        load_population(write(tmp_path, LINE + device("d1", 75.0, profile="phone-mid")), PROFILES)
    with pytest.raises(PopulationError, match="lacks profile"):
        load_population(write(tmp_path, device("a", 0.0)), PROFILES)
    with pytest.raises(PopulationError, match="2 device.*needs at least 3"):
        text = '[defaults]\nprofile = "phone-mid"\n' + device("a", 0) + device("b", 10)
        load_population(write(tmp_path, text), PROFILES)
    with pytest.raises(PopulationError, match="line 3 has more values"):
        csv = "name,x_m,y_m,profile\na,0,0,phone-mid\nb,1,1,phone-mid,extra\n"
        load_population(write(tmp_path, csv, ".csv"), PROFILES)
    with pytest.raises(PopulationError, match="no such file"):
        load_population(tmp_path / "missing.toml", PROFILES)


# -- CSVs parsed strictly (issue 29): each header problem named as such ---------------------------
CSV_ROWS = "a,0,0,phone-mid\nb,50,0,phone-mid\nc,100,0,phone-mid\n"
CSV_CASES = [
    ("name,x_m,y_m,profile,x_m\n" + CSV_ROWS.replace("\n", ",7\n"),
     "column(s) ['x_m'] appear more than once in the header"),
    ("name,x_m,y_m,profile,colour\n" + CSV_ROWS.replace("\n", ",red\n"),
     "unknown column(s) ['colour']; valid: name, x_m, y_m, profile, d2d_range_m, data, requests"),
    ("name,x_m,profile\na,0,phone-mid\n",
     "lacks column(s) y_m (required: name, x_m, y_m, profile)"),
    ("name;x_m;y_m;profile\n" + CSV_ROWS.replace(",", ";"),
     "the header 'name;x_m;y_m;profile' is one column: the file is separated by semicolons (';'); "
     "a population CSV is separated by commas"),
    ("name\tx_m\ty_m\tprofile\n" + CSV_ROWS.replace(",", "\t"), "separated by tabs"),
    ("\ufeffname,x_m,y_m,profile\n" + CSV_ROWS, "starts with a UTF-8 byte-order mark (BOM"),
    ("name,x_m,,profile\n" + CSV_ROWS, "header column 3 has no name"),
    ("", "is empty; a population CSV starts with a header row such as name,x_m,y_m,profile"),
    ("name,x_m,y_m,profile\na,0,0\n", "line 2 has 3 value(s), the header 4 columns"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), CSV_CASES, ids=[m[:30] for _, m in CSV_CASES])
def test_a_csv_header_problem_is_named_as_such(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text, ".csv")
    with pytest.raises(PopulationError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        load_population(path, PROFILES)
    # Through the run-config: the key, the file and the problem.
    with pytest.raises(ConfigError, match=re.escape(f"population='{path}'") + ".*" + re.escape(
        message
    )):  # fmt: skip
        derive(RunConfig.from_run_config({"population": str(path), "peers-per-cluster": 1}))


def test_a_bom_in_a_toml_and_a_file_not_in_utf8_are_named(tmp_path: Path) -> None:
    path = tmp_path / "cell.toml"
    path.write_bytes(b"\xef\xbb\xbf" + LINE.encode())
    with pytest.raises(PopulationError, match="byte-order mark"):
        load_population(path, PROFILES)
    path = tmp_path / "cell.csv"
    path.write_bytes("name,x_m,y_m,profile\n".encode("utf-16"))
    with pytest.raises(PopulationError, match=r"is not UTF-8 text \(byte 0: b'\\xff'\)"):
        load_population(path, PROFILES)


def test_a_csv_with_spaces_blank_lines_and_empty_cells_still_reads(tmp_path: Path) -> None:
    text = "name, x_m, y_m, profile, data\n\na, 0, 0, phone-mid,\nb,50,0,phone-mid,false\n"
    text += "c,100,0,phone-mid,\n\n"
    population = load_population(write(tmp_path, text, ".csv"), PROFILES)
    assert [(d.name, d.x_m, d.data) for d in population.devices] == [
        ("a", 0.0, True), ("b", 50.0, False), ("c", 100.0, True)
    ]  # fmt: skip


def test_the_run_config_refuses_a_bad_population_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="population='cells.txt' is not valid; give ''"):
        RunConfig.of(population="cells.txt")
    with pytest.raises(ConfigError, match=r"N must be in \[3, 2000\]"):
        RunConfig.of(population="generated:2:0")
    with pytest.raises(ConfigError, match="whole numbers N and SEED"):
        RunConfig.of(population="generated:sixty:0")
    with pytest.raises(ConfigError, match="peer-speeds='1,2,1' is for identical clusters"):
        RunConfig.of(population="generated:60:0", peer_speeds="1,2,1")
    with pytest.raises(ConfigError, match=r"population='.*cell.toml': .*device 'far'"):
        check_run_config(
            {"population": str(write(tmp_path, LINE + device("far", 9e3, profile="phone-mid")))}
        )
    with pytest.raises(ConfigError, match="forms no fine-tuning cluster of 5 devices"):
        check_run_config({"population": str(write(tmp_path, LINE))})


# -- generated populations ----------------------------------------------------------------------
def test_a_generated_population_is_replayable_and_follows_its_distributions() -> None:
    a, b = generate_population(200, 7, PROFILES), generate_population(200, 7, PROFILES)
    assert a == b and a != generate_population(200, 8, PROFILES)
    assert {d.profile for d in a.devices} == set(GENERATED_PROFILES)
    assert 0.35 < sum(d.data for d in a.devices) / len(a) < 0.65  # probability 1/2
    assert len(a.requesters) == 10 and not any(d.data for d in a.devices if d.requests)
    side = 100 * math.sqrt(200 * math.pi / 8)
    assert all(0 <= d.x_m <= side and 0 <= d.y_m <= side for d in a.devices)
    assert all(any(d.reaches(e) for e in a.devices if e is not d) for d in a.devices)


# -- the layout ---------------------------------------------------------------------------------
def meta_model(depth: int = 6) -> PromptedViT:
    with torch.device("meta"):
        return build_prompted_vit(
            "vit_tiny_patch16_224", mode="vpt-deep", num_prompts=4, num_classes=10,
            **{**TINY, "depth": depth},
        )  # fmt: skip


def test_clusters_are_formed_with_their_own_links_and_inference_loops_close() -> None:
    cfg = RunConfig.from_run_config({"population": "generated:60:0", "planner": "comm-aware"})
    layout = derive(cfg).layout
    assert layout is not None and layout.fine_tuning and layout.inference
    placed = [m.name for c in (*layout.fine_tuning, *layout.inference) for m in c.members]
    assert len(placed) == len(set(placed))  # nobody in two clusters
    assert set(placed) | set(layout.unplaced) == {d.name for d in layout.population.devices}
    for cluster in (*layout.fine_tuning, *layout.inference):
        members = cluster.members
        assert all(a.reaches(b) for a, b in itertools.pairwise(members))
        for a, b, link in zip(members, members[1:], cluster.profile.hops, strict=False):
            assert link.distance_m == pytest.approx(max(a.distance_m(b), 1.0))
        assert cluster.profile.devices[0].name == members[0].profile
    for cluster in layout.inference:
        assert cluster.start.requests  # formed around the requester ...
        assert cluster.members[-1].reaches(cluster.start)  # ... who gets the result back
        assert cluster.profile.result.distance_m == pytest.approx(
            max(cluster.members[-1].distance_m(cluster.start), 1.0)
        )
    assert [c.start.name for c in layout.inference] == layout.population.requesters
    assert layout.inference_for(layout.population.requesters[0]).kind == "inference"
    with pytest.raises(PopulationError, match="device 'd000' has no inference cluster"):
        layout.inference_for("d000")


def test_a_chain_no_plan_fits_is_passed_over() -> None:
    """Peers with too little memory for even one block's training are never used as peers."""
    costs = RangeCosts(meta_model(), Workload(32, 32))
    need = costs.smallest_peer_memory()
    small = DeviceProfile("small", 2e9, 16, memory_bytes=max(costs.start.memory_bytes, need - 1))
    profiles = Profiles({**PROFILES.devices, "small": small}, PROFILES.links)
    population = generate_population(40, 3)
    population = dataclasses.replace(
        population,
        devices=tuple(
            dataclasses.replace(d, profile="small") if i % 2 else d
            for i, d in enumerate(population.devices)
        ),
    )
    layout = form_layout(
        population, profiles, PROFILES.link("d2d-50m"), PROFILES.link("uplink-1mhz"), 2,
        "comm-aware", costs,
    )  # fmt: skip
    peers = [m for c in layout.fine_tuning for m in c.members[1:-1]]
    assert peers and all(m.profile != "small" for m in peers)


def test_nodes_take_the_cluster_of_their_cluster_id() -> None:
    # The ServerApp sends each node its cluster (issue 30): no node derives a layout, so no
    # node can derive another one (the digest check this test had is gone with it).
    layout = derive(RunConfig.from_run_config({"population": "generated:60:0"})).layout
    assert layout is not None
    n = len(layout.fine_tuning)
    ids = {100 + c: NodeIdentity(0, 1, edge_id=0, cluster_id=c) for c in range(n + 1)}
    run = assign_nodes(layout, ids)
    assert run.node_clusters == {100 + c: c for c in range(n)}
    assert list(run.idle_nodes) == [100 + n] and run.unserved == []
    assert assign_nodes(layout, {100: ids[100]}).unserved == list(range(1, n))


# -- the communication-aware planner ------------------------------------------------------------
def brute_force(blocks: int, peers: int, stage) -> float:  # type: ignore[no-untyped-def]
    """The least bottleneck over every split of `blocks` into `peers` non-empty ranges."""
    best = math.inf
    for cuts in itertools.combinations(range(1, blocks), peers - 1):
        bounds = [0, *cuts, blocks]
        best = min(best, max(stage(k, bounds[k], bounds[k + 1]) for k in range(peers)))
    return best


@pytest.mark.parametrize("case", range(60))
def test_the_stage_planner_is_optimal_against_exhaustive_search(case: int) -> None:
    rng = random.Random(case)
    blocks, peers = rng.randint(1, 9), 0
    peers = rng.randint(1, blocks)
    costs = [rng.uniform(0.5, 2.0) for _ in range(blocks)]
    speed = [rng.uniform(0.2, 3.0) for _ in range(peers)]
    hop = [rng.uniform(0.0, 2.0) for _ in range(blocks + 1)]  # time to send after block b
    memory = [rng.randint(1, blocks) for _ in range(peers)]  # most blocks a peer can hold

    def stage(k: int, a: int, b: int) -> float:
        if b - a > memory[k]:
            return math.inf
        return sum(costs[a:b]) / speed[k] + hop[b] * (k + 1) / peers

    best = brute_force(blocks, peers, stage)
    if math.isinf(best):
        with pytest.raises(PlanError, match="fits every peer"):
            plan_min_max_stages(blocks, peers, stage)
        return
    plan = plan_min_max_stages(blocks, peers, stage)
    assert plan.num_blocks == blocks and plan.num_peers == peers
    assert plan_bottleneck(plan, stage) == pytest.approx(best, rel=1e-12)


def cluster_with(
    rate_bps: list[float], peers: tuple[str, ...] = ("phone-mid",) * 3
) -> ClusterProfile:
    """start, `peers`, end (phone-mid); hop k a D2D link of fixed rate (exact rates)."""
    devices = [PROFILES.device(n) for n in ("phone-mid", *peers, "phone-mid")]
    hops = [LinkProfile(f"h{k}", "d2d", wired_rate_bps=r) for k, r in enumerate(rate_bps)]
    return ClusterProfile(devices, hops, PROFILES.link("uplink-1mhz"))


def busiest_compute_and_send(cost: RoundCost) -> float:
    """The busiest node's compute + send time (the start point's sensing is the same under
    every plan)."""
    return max(n.compute_s + n.tx_s for n in cost.nodes)


@pytest.mark.parametrize(
    "name",
    [
        "aimv2_large_patch14_224",  # SwiGLU
        "vit_pwee_patch16_reg1_gap_256",  # ParallelScalingBlock
        "vit_small_patch16_18x2_224",  # ParallelThingsBlock
        "vit_dpwee_patch16_reg1_gap_256",  # DiffParallelScalingBlock
        "eva02_tiny_patch14_224",  # Eva: RoPE attention, SwiGLU
    ],
)
def test_comm_aware_planning_reads_any_block(name: str) -> None:
    # The costs of a range of blocks are measured off what the blocks run (no Block attribute
    # names): every block type plans, with memory and FLOPs that grow with the range.
    with torch.device("meta"):
        model = build_prompted_vit(name, mode="vpt-deep", num_prompts=4, num_classes=5, **TINY)
    costs = RangeCosts(model, Workload(32, 32))
    plan = plan_cluster("comm-aware", costs, cluster_with([1e7] * 4))
    assert plan.num_blocks == TINY["depth"] and plan.num_peers == 3
    one, two = costs.peer(1, 2), costs.peer(1, 3)
    assert one.flops.forward > 0 and two.flops.forward == 2 * one.flops.forward
    assert 0 < one.memory_bytes < two.memory_bytes


def test_comm_aware_is_optimal_on_the_cluster_never_worse_and_better_on_slow_links() -> None:
    """Identical peers, hop 2 four times slower: peers 2 and 3 send over it (smashed data
    forward, its gradient back), peer 1 sends no gradient back (the start point trains
    nothing), so on slow links the busiest peers should hold fewer blocks."""
    costs = RangeCosts(meta_model(depth=6), Workload(64, 32))
    for rate in (1e12, 1e10, 1e8, 1e7, 1e6):
        cluster = cluster_with([rate, rate, rate / 4, rate])
        aware = plan_cluster("comm-aware", costs, cluster)
        compute = plan_cluster("minmax", costs, cluster)

        def stage(k: int, a: int, b: int, cluster: ClusterProfile = cluster) -> float:
            return peer_time_s(costs, cluster, k, a, b)

        assert plan_bottleneck(aware, stage) == pytest.approx(brute_force(6, 3, stage))
        busiest = [
            busiest_compute_and_send(predicted_round_cost(costs, cluster, plan, 1000, 1000))
            for plan in (aware, compute)
        ]
        assert busiest[0] <= busiest[1] * (1 + 1e-12)
        if rate <= 1e8:  # slow links: the hops weigh, and the compute-only split pays
            assert busiest[0] < busiest[1] and aware.sizes() != compute.sizes()
        else:
            assert aware.sizes() == compute.sizes() == [2, 2, 2]


def test_comm_aware_respects_memory_and_says_when_nothing_fits() -> None:
    costs = RangeCosts(meta_model(depth=6), Workload(32, 32))
    two_blocks = costs.peer(0, 2).memory_bytes
    capped = DeviceProfile("capped", 1e12, 16, memory_bytes=two_blocks)  # fastest, 2 blocks max
    cluster = cluster_with([1e9] * 4)
    cluster = dataclasses.replace(
        cluster, devices=(*cluster.devices[:1], capped, *cluster.devices[2:])
    )
    plan = plan_cluster("comm-aware", costs, cluster)
    assert plan.sizes()[0] <= 2  # compute-only would give the fastest peer more
    assert plan_cluster("minmax", costs, cluster).sizes()[0] > 2
    tight = dataclasses.replace(
        cluster, devices=(*cluster.devices[:1], *[capped] * 3, cluster.devices[-1])
    )
    with pytest.raises(PlanError, match=r"fits every peer.*memory: capped \d+ MiB"):
        plan_cluster("comm-aware", RangeCosts(meta_model(depth=9), Workload(32, 32)), tight)


@pytest.mark.parametrize("smashed", ["fp32", "bf16"])
def test_predicted_hop_bytes_and_flops_equal_what_the_chain_counts(smashed: str) -> None:
    """The planner prices exactly what a real chain moves: per hop, forward and backward, in
    the smashed-data dtype the hops carry."""
    model = build_prompted_vit(
        "vit_tiny_patch16_224", mode="vpt-deep", num_prompts=4, num_classes=10, **TINY
    )
    data = TensorDataset(torch.randn(37, 3, 32, 32), torch.randint(0, 10, (37,)))
    training = TrainingSection(local_epochs=2, batch_size=16)
    plan = SplitPlan.from_sizes([1, 3, 2])
    precision = Precision("fp32", smashed)
    result = train_cluster(model, plan, data, training, seed=0, precision=precision)
    element_size = precision.wire_dtype.itemsize
    costs = RangeCosts(model, Workload(37, 16, epochs=2, element_size=element_size))
    segments = [costs.start, *(costs.peer(a, b) for a, b in plan.ranges), costs.end]
    assert [s.forward_bytes for s in segments[:-1]] == result.chain.hop_bytes_forward
    assert [s.backward_bytes for s in segments[1:]] == result.chain.hop_bytes_backward
    flops = [2 * 37 * (s.flops.forward + s.flops.backward) for s in segments]
    assert sum(flops) == sum(result.chain.segment_flops.values())


# -- sensing ------------------------------------------------------------------------------------
def test_sensing_is_priced_at_the_start_point_beside_compute_and_communication() -> None:
    sensor = DeviceProfile("cam", 1e9, 10, sensing_s_per_sample=0.5, sensing_j_per_sample=0.25)
    plain = DeviceProfile("plain", 1e9, 10)
    link = LinkProfile("w", "d2d", wired_rate_bps=8e6)
    cluster = ClusterProfile(
        [sensor, plain, plain], [link, link], LinkProfile("u", "client-edge", wired_rate_bps=8e6)
    )
    flops = [SegmentFlops(10, 0), SegmentFlops(1e9, 1e9), SegmentFlops(10, 10)]
    args = dict(hop_bytes_forward=[0, 0], hop_bytes_backward=[0, 0], samples=8,
                upload_bytes=0, download_bytes=0)  # fmt: skip
    none = fine_tuning_round_cost(cluster, flops, **args)  # type: ignore[arg-type]
    sensed = fine_tuning_round_cost(cluster, flops, **args, sensed_samples=4)  # type: ignore[arg-type]
    assert sensed.sensing_s == 2.0 and sensed.sensing_j == 1.0
    assert sensed.latency_s == pytest.approx(none.latency_s + 2.0)
    assert sensed.energy_j == pytest.approx(none.energy_j + 1.0)
    assert sensed.nodes[0].sensing_s == 2.0 and sensed.nodes[1].sensing_s == 0.0
    assert sensed.compute_s == none.compute_s and sensed.d2d_s == none.d2d_s
    request = inference_cost(cluster, flops, [0, 0], result_bytes=0, samples=3)
    assert request.sensing_s == 1.5 and request.sensing_j == 0.75  # every input is sensed
    assert PROFILES.device("phone-mid").sensing_s_per_sample == pytest.approx(1 / 30)


def test_the_planner_benchmark_finds_comm_aware_never_worse(tmp_path: Path) -> None:
    from gaisnet_flwr.experiments.bench_planner import main

    out = tmp_path / "rows.csv"
    args = ["--model", "tiny", "--samples", "64", "--bandwidths-mhz", "1,0.05", "--csv", str(out)]
    assert main(args) == 0  # exit 1 if comm-aware were worse anywhere
    assert len(out.read_text().splitlines()) > 3


def test_a_node_says_which_cluster_it_runs() -> None:
    simulated = NodeIdentity.from_node_config({"partition-id": 3, "num-partitions": 4})
    assert simulated.place(2)[:2] == (1, 1) and simulated.cluster_id is None  # partition-id: 3
    deployed = NodeIdentity.from_node_config(
        {"partition-id": 0, "num-partitions": 1, "edge-id": 0, "cluster-id": 7}
    )
    assert deployed.cluster_id == 7
    record = deployed.to_record().metric_records["metrics"]
    assert record["cluster-id"] == 7 and "layout-digest" not in record
    assert NodeIdentity.from_record(deployed.to_record()) == deployed
    with pytest.raises(ValueError, match="cluster-id=-1 must be >= 0"):
        NodeIdentity.from_node_config({"partition-id": 0, "num-partitions": 1, "cluster-id": -1})
