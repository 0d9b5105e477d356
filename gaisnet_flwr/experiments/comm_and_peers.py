"""Beyond the paper's figures: communication per HFSL round (D2D smashed data vs the upload to the
edge) and a cluster's round latency and energy vs the number of D2D peers it is split over.

Two scales, side by side:
  * the embedded model, measured: real HFSL rounds; bytes are what the chain's links
    serialized and what Flower counts for the uploaded modules; latency and energy are the cost
    model's price of exactly those FLOPs and bytes (gaisnet_flwr/costs/pricing.py, the run-config's
    device and link profiles);
  * ViT-B/16 (224 px, 102 classes, 10 prompts), analytic: the same cost model on the model's
    shape (as `scripts/cost_report.py`), 100 samples per round at the paper's batch 10.

    python scripts/comm_and_peers.py            # outputs/section5/comm
    python scripts/comm_and_peers.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord

from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.experiments.common.cli import add_common_arguments, run_seeds
from gaisnet_flwr.experiments.common.output import Series, line_plot, md_table, save, write_csv
from gaisnet_flwr.experiments.common.progress import Progress
from gaisnet_flwr.experiments.common.report import script_main
from gaisnet_flwr.split.plan import plan_min_max

if TYPE_CHECKING:
    from gaisnet_flwr.costs.pricing import RoundCost

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.

NAME = "comm"
TITLE = "Beyond the paper: communication per round and latency/energy vs peers per cluster"
CLUSTERS = 4
MAX_PEERS = 6
REPEATS = {"quick": 1, "full": 3}  # timed cluster rounds per peer count (median)
VIT_SAMPLES, VIT_BATCH = 100, 10  # per cluster round, as scripts/cost_report.py
MB = 1e6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "outputs/section5/comm")
    return parser


def embedded_round(cfg: RunConfig, seeds: list[int], progress: Progress) -> dict[str, float]:
    """One measured HFSL round over CLUSTERS clusters (the real apps) per seed: bytes on each
    link. The bytes depend on the shapes and the data sizes, not on the seed: checked here."""
    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.data.images import load_image_data
    from gaisnet_flwr.derived import data_spec
    from gaisnet_flwr.experiments.common.hfsl import hfsl_rounds
    from gaisnet_flwr.split.precision import resolve_device

    Foundation.of(cfg).ensure(load_image_data(data_spec(cfg)), resolve_device(cfg.run.device))
    rows = [hfsl_rounds(cfg.replace(seed=seed), 1, CLUSTERS)[-1] for seed in seeds]
    row = rows[0]
    counted = {(r.d2d_forward_bytes, r.d2d_backward_bytes, r.upload_bytes) for r in rows}
    if len(counted) != 1:
        raise RuntimeError(f"the bytes of one HFSL round differ between seeds: {sorted(counted)}")
    progress.step(
        f"embedded HFSL round, {len(seeds)} seeds: D2D {row.d2d_forward_bytes / MB:.1f} MB "
        f"forward, the same for every seed"
    )
    return {
        "d2d_forward": row.d2d_forward_bytes,
        "d2d_backward": row.d2d_backward_bytes,
        "upload": row.upload_bytes,
        "download": row.upload_bytes,  # the edge sends every cluster the same modules back
        "samples": row.num_examples,
    }


def vit_b16_round() -> dict[str, float]:
    """The same quantities for CLUSTERS ViT-B/16 clusters (3 peers, min-max plan), analytic."""
    from gaisnet_flwr.experiments.cost_report import build_model as vit_b16_meta
    from gaisnet_flwr.experiments.cost_report import hop_bytes, state_wire_bytes

    model = vit_b16_meta(10, 102)
    plan = plan_min_max([1.0] * model.depth, [1.0, 1.0, 1.0])
    fwd, bwd = hop_bytes(model, plan, VIT_SAMPLES, VIT_BATCH)
    modules = state_wire_bytes(model.tunable_state())
    return {
        "d2d_forward": CLUSTERS * sum(fwd),
        "d2d_backward": CLUSTERS * sum(bwd),
        "upload": CLUSTERS * modules,
        "download": CLUSTERS * modules,
        "samples": CLUSTERS * VIT_SAMPLES,
    }


def embedded_peers(cfg: RunConfig, k: int, repeats: int) -> tuple[RoundCost, float]:
    """Cluster 0's round split over k peers: the cost model's price and the measured wall time."""
    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.costs.pricing import fine_tuning_round_cost
    from gaisnet_flwr.data.images import cluster_datasets, edge_image_data, load_image_data
    from gaisnet_flwr.derived import data_spec, derive
    from gaisnet_flwr.split.flops import segment_flops
    from gaisnet_flwr.split.precision import resolve_device
    from gaisnet_flwr.training.loops import train_cluster

    cfg = cfg.replace(peers_per_cluster=k, peer_speeds="")
    data = load_image_data(data_spec(cfg))
    edge = edge_image_data(data, 0, [1.0], cfg.hierarchy.edge_domains[0], seed=cfg.run.seed)
    train = cluster_datasets(edge, 0, CLUSTERS, data_spec(cfg))[0]
    derived = derive(cfg)
    assert derived.plan is not None
    plan = derived.plan
    walls, cost = [], None
    for rep in range(repeats):
        model = Foundation.of(cfg).load(data.num_classes)
        started = time.perf_counter()
        result = train_cluster(
            model, plan, train, cfg.training, seed=rep, device=resolve_device(cfg.run.device)
        )
        walls.append(time.perf_counter() - started)
        modules = ArrayRecord(model.tunable_state()).count_bytes()
        cost = fine_tuning_round_cost(
            derived.cluster,
            segment_flops(model, plan),
            result.chain.hop_bytes_forward,
            result.chain.hop_bytes_backward,
            samples=result.num_examples * cfg.training.local_epochs,
            upload_bytes=modules,
            download_bytes=modules,
        )
    assert cost is not None
    return cost, statistics.median(walls)


def vit_b16_peers(cfg: RunConfig, k: int) -> RoundCost:
    from gaisnet_flwr.costs.pricing import fine_tuning_round_cost
    from gaisnet_flwr.derived import check_profiles, cluster_profile
    from gaisnet_flwr.experiments.cost_report import build_model as vit_b16_meta
    from gaisnet_flwr.experiments.cost_report import hop_bytes, state_wire_bytes
    from gaisnet_flwr.split.flops import segment_flops

    model = vit_b16_meta(10, 102)
    cluster = cluster_profile(cfg.costs, check_profiles(cfg.costs), k)
    plan = plan_min_max([1.0] * model.depth, [d.flops_per_second for d in cluster.devices[1:-1]])
    fwd, bwd = hop_bytes(model, plan, VIT_SAMPLES, VIT_BATCH)
    modules = state_wire_bytes(model.tunable_state())
    return fine_tuning_round_cost(
        cluster, segment_flops(model, plan), fwd, bwd, VIT_SAMPLES, modules, modules
    )


def run(cfg: RunConfig, args: argparse.Namespace, out: Path) -> str:
    import matplotlib.pyplot as plt

    peers = list(range(1, min(MAX_PEERS, cfg.model.depth) + 1))
    repeats = REPEATS["quick" if args.quick else "full"]
    progress = Progress(NAME, 1 + len(peers))
    comm = {
        "embedded (measured)": embedded_round(cfg, run_seeds(cfg, args), progress),
        "ViT-B/16 (analytic)": vit_b16_round(),
    }
    kinds = ("d2d_forward", "d2d_backward", "upload", "download")
    write_csv(
        out / "comm_per_round.csv",
        ["model", *(f"{k}_bytes" for k in kinds), "samples"],
        [[m, *(c[k] for k in kinds), c["samples"]] for m, c in comm.items()],
    )
    costs = []
    for k in peers:
        small, wall = embedded_peers(cfg, k, repeats)
        big = vit_b16_peers(cfg, k)
        costs.append((k, small, wall, big))
        progress.step(
            f"{k} peer(s): embedded {small.latency_s * 1e3:.0f} ms, {wall:.2f} s wall; "
            f"ViT-B/16 {big.latency_s:.0f} s"
        )
    write_csv(
        out / "peers_latency_energy.csv",
        ["peers", "model", "latency_s", "compute_s", "d2d_s", "bottleneck_s", "energy_j",
         "d2d_bytes"],
        [
            row
            for k, small, _, big in costs
            for row in (
                [k, "embedded", small.latency_s, small.compute_s, small.d2d_s, small.bottleneck_s,
                 small.energy_j, small.d2d_bytes],
                [k, "vit-b16", big.latency_s, big.compute_s, big.d2d_s, big.bottleneck_s,
                 big.energy_j, big.d2d_bytes],
            )
        ],
    )  # fmt: skip
    # wall times vary with the machine's load: a file of their own
    write_csv(
        out / "peers_wall.csv", ["peers", "embedded_wall_s"], [[k, w] for k, _, w, _ in costs]
    )

    fig, (ax_comm, ax_lat, ax_en) = plt.subplots(1, 3, figsize=(15, 4.4))
    width = 0.2
    for i, kind in enumerate(kinds):
        ax_comm.bar(
            [j + (i - 1.5) * width for j in range(len(comm))],
            [c[kind] / MB for c in comm.values()],
            width,
            label=kind.replace("_", " "),
        )
    ax_comm.set_xticks(range(len(comm)), list(comm))
    ax_comm.set_yscale("log")
    ax_comm.set_ylabel("bytes per round, all clusters (MB, log scale)")
    ax_comm.set_title(f"communication per HFSL round ({CLUSTERS} clusters)")
    ax_comm.grid(axis="y", alpha=0.3)
    ax_comm.legend(fontsize=8)
    line_plot(
        out / "comm_and_peers.png",
        "cluster round latency vs peers (cost model)",
        "D2D peers per cluster",
        "latency (s, log scale)",
        [
            Series("embedded", peers, [c[1].latency_s for c in costs]),
            Series("embedded, busiest node", peers, [c[1].bottleneck_s for c in costs], "--o"),
            Series("ViT-B/16", peers, [c[3].latency_s for c in costs], "-s"),
            Series("ViT-B/16, busiest node", peers, [c[3].bottleneck_s for c in costs], "--s"),
        ],
        ax=ax_lat,
        logy=True,
    )  # fmt: skip
    line_plot(
        out / "comm_and_peers.png",
        "cluster round energy vs peers (cost model)",
        "D2D peers per cluster",
        "energy, all nodes (J, log scale)",
        [
            Series("embedded", peers, [s.energy_j for _, s, _, _ in costs]),
            Series("ViT-B/16", peers, [b.energy_j for _, _, _, b in costs], "-s"),
        ],
        ax=ax_en,
        logy=True,
    )
    save(fig, out / "comm_and_peers.png")

    comm_table = md_table(
        ["model", "D2D forward", "D2D backward", "upload", "download", "D2D / upload"],
        [
            [m, *(f"{c[k] / MB:.2f} MB" for k in kinds),
             f"{(c['d2d_forward'] + c['d2d_backward']) / c['upload']:.0f}x"]
            for m, c in comm.items()
        ],
    )  # fmt: skip
    peer_table = md_table(
        ["peers", "embedded latency", "busiest node", "energy", "D2D", "measured wall",
         "ViT-B/16 latency", "busiest node", "energy", "D2D"],
        [
            [k, f"{s.latency_s * 1e3:.1f} ms", f"{s.bottleneck_s * 1e3:.1f} ms",
             f"{s.energy_j:.3f} J", f"{s.d2d_bytes / MB:.1f} MB", f"{wall:.2f} s",
             f"{b.latency_s:.0f} s", f"{b.bottleneck_s:.0f} s", f"{b.energy_j:.0f} J",
             f"{b.d2d_bytes / MB:.0f} MB"]
            for k, s, wall, b in costs
        ],
    )  # fmt: skip
    best_big = min(costs, key=lambda c: c[3].bottleneck_s)[0]
    best_small = min(costs, key=lambda c: c[1].bottleneck_s)[0]
    walls = [c[2] for c in costs]
    wall_note = (
        "every hop serializes its tensor"
        if walls[-1] > 1.1 * walls[0]
        else "in process the extra hops cost little next to the compute"
    )
    busiest = max(costs[0][1].nodes, key=lambda n: n.compute_s + n.tx_s)
    tx_share = busiest.tx_s / (busiest.compute_s + busiest.tx_s)
    dominated = all(c["d2d_forward"] + c["d2d_backward"] > c["upload"] for c in comm.values())
    return f"""
The paper states HFSL's metrics (communication on client-server and D2D links, latency, energy)
without numbers; these are ours, from the cost model's device and link profiles
(start `{cfg.costs.start_device}`, peers `{cfg.costs.peer_devices}` cycled,
end `{cfg.costs.end_device}`, hops
`{cfg.costs.d2d_link}`, uplink `{cfg.costs.uplink}`). Embedded: one measured HFSL round
of {CLUSTERS} clusters ({comm["embedded (measured)"]["samples"]} training images). ViT-B/16:
{CLUSTERS} clusters of {VIT_SAMPLES} samples at batch {VIT_BATCH}, 3 peers.

![communication and peers](comm_and_peers.png)

{comm_table}

{"D2D smashed data dominates" if dominated else "The upload is not dominated by D2D traffic"}
communication, not the upload of the tunable modules, as the anchors predict for split learning
(ViT-B/16: 605 KB per sample per hop, every hop, forward and backward, against 0.68 MB of
prompts and head per cluster). Upload and download are the same modules both ways.

Latency and energy of one cluster round vs the number of peers it is split over (the planner
gives each peer blocks in proportion to its device's speed; latency is the serial critical path,
"busiest node" the floor a pipelined schedule could reach; the wall time is this machine's, in
series, one cluster):

{peer_table}

More peers add a hop each, so serial latency, D2D bytes and transmit energy grow with the
chain; what a longer chain can buy is a lighter busiest node (memory and the pipelined floor):
lowest at {best_big} peer(s) for ViT-B/16, whose blocks dominate the work, and at {best_small}
peer(s) for the embedded model, where sending smashed data rather than computing sets the pace
(with 1 peer its busiest node, `{busiest.name}`, spends {100 * tx_share:.0f} % of its time
transmitting). Measured wall time {walls[0]:.2f} s with 1 peer, {walls[-1]:.2f} s with
{peers[-1]} ({wall_note}).
The bytes are the same for every seed ({", ".join(map(str, run_seeds(cfg, args)))}: checked);
the cost model is deterministic. CSV: [comm_per_round.csv](comm_per_round.csv),
[peers_latency_energy.csv](peers_latency_energy.csv), [peers_wall.csv](peers_wall.csv).
"""


def main(argv: list[str] | None = None) -> None:
    script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
