"""The communication-aware planner against the compute-only one, on the same devices, for
several D2D link rates (paper Sec. IV-A: "how to split model?").

Analytic, no training: the model is built on PyTorch's meta device (shapes only) and each
plan is priced by the cost model (`population.planning.predicted_round_cost`: the FLOPs and the
per-hop bytes a real chain counts). For each D2D bandwidth, one fine-tuning round of one
cluster (start point, 3 peers, end point; devices and hop distances fixed below) is split by
the compute-only min-max planner ("minmax": the peers' FLOP/s only) and by the
communication-aware one ("comm-aware": each peer's compute plus the hops it sends, within its
memory), and the busiest node's compute + send time is printed for both. The start point's
sensing is the same under every plan and is printed apart. Then the same over every
fine-tuning cluster of a generated population (each with its own devices and distances).

Then the edge server as a cooperative node (`edge-offload='auto'`, population/edge_offload.py):
the planner's choice (the devices alone, or the edge server, `edge-server` over `uplink-1mhz`,
holding a segment) against the devices-only comm-aware chain, at the same D2D bandwidths; for
the fixed cluster (the edge to itself) and for the population's round (its clusters share the
edge: each offloader gets 1/m of it). Both the busiest node (what the planner minimises) and
the serial round latency (`RoundCost.latency_s`) are printed.

    python scripts/bench_planner.py                      # ViT-B/16, the paper's workload
    python scripts/bench_planner.py --csv docs/planner/bench_planner.csv \
        --edge-csv docs/planner/bench_edge.csv
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gaisnet_flwr.costs.profiles import ClusterProfile, Profiles, load_profiles
from gaisnet_flwr.population.devices import PopulationDevice, generate_population

if TYPE_CHECKING:
    from gaisnet_flwr.costs.pricing import RoundCost
    from gaisnet_flwr.population.edge_offload import EdgeServer, Placement
    from gaisnet_flwr.population.planning import RangeCosts
    from gaisnet_flwr.vit.model import PromptedViT

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.

# The fixed cluster: a chain of phones along a street, distances in metres (within 100 m).
CHAIN = (
    ("start", "phone-mid", 0.0),
    ("peer1", "phone-high", 20.0),
    ("peer2", "phone-mid", 80.0),
    ("peer3", "phone-low", 175.0),
    ("end", "phone-mid", 215.0),
)
BANDWIDTHS_MHZ = (20.0, 5.0, 1.0, 0.2, 0.05)
MODELS = {
    # the paper's workload: ViT-B/16 at 224 px, VPT-deep with 10 prompts, Flowers102's classes
    "vit-b16": dict(model_name="vit_base_patch16_224", num_prompts=10, num_classes=102),
    # the run-config default (pyproject): a tiny ViT on 32 px digits
    "tiny": dict(
        model_name="vit_tiny_patch16_224",
        num_prompts=10,
        num_classes=10,
        img_size=32,
        patch_size=8,
        depth=6,
        embed_dim=64,
        num_heads=4,
    ),  # fmt: skip
}


def meta_model(name: str) -> PromptedViT:
    import torch

    from gaisnet_flwr.vit.model import build_prompted_vit

    spec = dict(MODELS[name])
    with torch.device("meta"):
        return build_prompted_vit(
            str(spec.pop("model_name")),
            mode="vpt-deep",
            **spec,  # type: ignore[arg-type]
        )


def busiest(cost: RoundCost) -> float:
    """The busiest node's compute + send time (sensing, at the start point, is plan-free)."""
    return max(n.compute_s + n.tx_s for n in cost.nodes)


def fixed_cluster(profiles: Profiles, bandwidth_hz: float) -> ClusterProfile:
    from gaisnet_flwr.population.layout import cluster_profile

    members = [PopulationDevice(name, x, 0.0, profile) for name, profile, x in CHAIN]
    d2d = dataclasses.replace(profiles.link("d2d-50m"), bandwidth_hz=bandwidth_hz)
    return cluster_profile(members, profiles, d2d, profiles.link("uplink-1mhz"), loop=False)


def compare(costs: RangeCosts, cluster: ClusterProfile, modules: int) -> dict[str, Any]:
    """Both plans of `cluster` and what the cost model says of each."""
    from gaisnet_flwr.population.planning import plan_cluster, predicted_round_cost

    row: dict[str, Any] = {}
    for planner in ("minmax", "comm-aware"):
        plan = plan_cluster(planner, costs, cluster)
        cost = predicted_round_cost(costs, cluster, plan, modules, modules)
        key = planner.replace("-", "_")
        row[f"plan_{key}"] = "-".join(map(str, plan.sizes()))
        row[f"busiest_{key}_s"] = busiest(cost)
        row["sensing_s"] = cost.sensing_s
    row["ratio"] = row["busiest_comm_aware_s"] / row["busiest_minmax_s"]
    return row


def plan_text(placed: Placement) -> str:
    """Blocks per middle node, the edge server's marked: "1-1-E9-1"."""
    sizes = [str(n) for n in placed.plan.sizes()]
    if placed.profile.edge is not None:
        sizes[placed.profile.edge - 1] = "E" + sizes[placed.profile.edge - 1]
    return "-".join(sizes)


def with_edge_row(
    costs: RangeCosts, alone: Placement, placed: Placement, modules: int
) -> dict[str, Any]:
    """The devices-only chain and the planner's choice, priced by the cost model."""
    from gaisnet_flwr.population.planning import predicted_round_cost

    row: dict[str, Any] = {}
    for key, chosen in (("devices", alone), ("edge", placed)):
        cost = predicted_round_cost(costs, chosen.profile, chosen.plan, modules, modules)
        row[f"plan_{key}"] = plan_text(chosen)
        row[f"busiest_{key}_s"] = cost.bottleneck_s
        row[f"latency_{key}_s"] = cost.latency_s
    row["edge_blocks"] = "-".join(map(str, placed.edge_blocks or ()))
    row["edge_share"] = placed.profile.edge_share if placed.profile.edge is not None else 0
    return row


def edge_tables(
    costs: RangeCosts,
    profiles: Profiles,
    bandwidths: list[float],
    population: str,
    modules: int,
) -> list[dict[str, Any]]:
    """The planner with the edge server against the devices alone (module docstring)."""
    from gaisnet_flwr.population.edge_offload import EdgeServer, place_cluster, plan_round
    from gaisnet_flwr.population.layout import form_layout

    edge = EdgeServer(profiles.device("edge-server"), profiles.link("uplink-1mhz"))
    rows: list[dict[str, Any]] = []
    print(
        "\nthe edge server as a cooperative node (edge-server over uplink-1mhz, "
        f"{edge.link.rate_bps() / 1e6:.2f} Mbit/s each way), the same cluster:"
    )
    print("  D2D MHz  devices alone: busiest  latency  plan     with edge: busiest  latency  plan")
    for bandwidth in bandwidths:
        cluster = fixed_cluster(profiles, bandwidth)
        alone = place_cluster(costs, cluster, None)
        placed = place_cluster(costs, cluster, edge)
        row = {"table": "edge-cluster", "bandwidth_mhz": bandwidth / 1e6}
        row |= with_edge_row(costs, alone, placed, modules)
        rows.append(row)
        print(
            f"  {bandwidth / 1e6:7g}  {row['busiest_devices_s']:20.1f} s "
            f"{row['latency_devices_s']:7.1f} s {row['plan_devices']:8s} "
            f"{row['busiest_edge_s']:16.1f} s {row['latency_edge_s']:7.1f} s {row['plan_edge']}"
        )
    n, seed = (int(v) for v in population.split(":")[1:])
    cell = generate_population(n, seed, profiles)
    print(f"\n{population}: a round of its fine-tuning clusters, which share the edge server")
    print("(the round's busiest node and latency: its slowest cluster's; best set: exhaustive "
          "search over every set of offloaders, each at its share)")  # fmt: skip
    print("  D2D MHz  clusters  offload  round busiest: devices  with edge   latency: devices  "
          "with edge   best set: busiest  latency")  # fmt: skip
    for bandwidth in bandwidths:
        d2d = dataclasses.replace(profiles.link("d2d-50m"), bandwidth_hz=bandwidth)
        layout = form_layout(cell, profiles, d2d, edge.link, 3, "comm-aware", costs)
        clusters = [c.profile for c in layout.fine_tuning]
        alones = [place_cluster(costs, c, None) for c in clusters]
        shared = plan_round(costs, clusters, edge)
        cluster_rows: list[dict[str, Any]] = []
        for index, (a, p) in enumerate(zip(alones, shared, strict=True)):
            row = {"table": "edge-population", "bandwidth_mhz": bandwidth / 1e6, "cluster": index}
            row |= with_edge_row(costs, a, p, modules)
            cluster_rows.append(row)
        rows += cluster_rows
        offload = sum(1 for p in shared if p.profile.edge is not None)
        seconds = [k for k in cluster_rows[0] if k.endswith("_s")]
        worst = {k: max(r[k] for r in cluster_rows) for k in seconds}
        best = best_offload_set(costs, clusters, alones, edge)
        rows.append(
            {
                "table": "edge-round",
                "bandwidth_mhz": bandwidth / 1e6,
                "clusters": len(clusters),
                "offload": offload,
                **worst,
                "busiest_best_set_s": best[0],
                "latency_best_set_s": best[1],
            }
        )
        print(
            f"  {bandwidth / 1e6:7g}  {len(clusters):8d}  {offload:7d}  "
            f"{worst['busiest_devices_s']:15.1f} s {worst['busiest_edge_s']:9.1f} s "
            f"{worst['latency_devices_s']:12.1f} s {worst['latency_edge_s']:9.1f} s "
            f"{best[0]:13.1f} s {best[1]:7.1f} s"
        )
    return rows


def best_offload_set(
    costs: RangeCosts, clusters: list[ClusterProfile], alone: list[Placement], edge: EdgeServer
) -> tuple[float, float]:
    """The fastest round (its slowest busiest node, then its slowest latency) over every set of
    clusters that could offload, each offloader at 1/|set| of the edge: what `plan_round`'s
    rule (the m slowest, for the best m) is checked against."""
    from gaisnet_flwr.population.edge_offload import faster, place_cluster

    best = (math.inf, math.inf)
    for m in range(len(clusters) + 1):
        shared = [place_cluster(costs, c, edge, share=max(m, 1), devices=False) for c in clusters]
        for chosen in itertools.combinations(range(len(clusters)), m):
            placed = [shared[i] if i in chosen else alone[i] for i in range(len(clusters))]
            key = (max(p.busiest_s for p in placed), max(p.latency_s for p in placed))
            if faster(key, best):
                best = key
    return best


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(f"rows: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="vit-b16")
    parser.add_argument("--samples", type=int, default=256, help="training samples per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--bandwidths-mhz",
        default=",".join(f"{b:g}" for b in BANDWIDTHS_MHZ),
        help="D2D bandwidths to compare at (the rate follows by Shannon at each hop's distance)",
    )
    parser.add_argument(
        "--population", default="generated:60:0", help="generated:N:SEED for the second table"
    )
    parser.add_argument("--csv", type=Path, help="write both tables' rows here")
    parser.add_argument("--edge-csv", type=Path, help="write the edge server's tables' rows here")
    args = parser.parse_args(argv)
    from gaisnet_flwr.population.edge_offload import faster
    from gaisnet_flwr.population.layout import form_layout
    from gaisnet_flwr.population.planning import RangeCosts, Workload

    bandwidths = [float(b) * 1e6 for b in args.bandwidths_mhz.split(",") if b.strip()]
    profiles = load_profiles()
    model = meta_model(args.model)
    costs = RangeCosts(model, Workload(args.samples, args.batch_size))
    modules = sum(4 * p.numel() for p in model.tunable_parameters())

    print(
        f"{args.model}, VPT-deep, {args.samples} samples in batches of {args.batch_size}, "
        f"one fine-tuning round; busiest node = its compute + send time (cost model)"
    )
    print("cluster: " + " -> ".join(f"{n} {p} @{x:g} m" for n, p, x in CHAIN))
    rows: list[dict[str, Any]] = []
    header = "  D2D MHz  hop rates (Mbit/s)           compute-only        comm-aware          ratio"
    print(header)
    for bandwidth in bandwidths:
        cluster = fixed_cluster(profiles, bandwidth)
        row = {
            "table": "cluster",
            "bandwidth_mhz": bandwidth / 1e6,
            **compare(costs, cluster, modules),
        }
        row["hop_rates_mbps"] = " ".join(f"{h.rate_bps() / 1e6:.2f}" for h in cluster.hops)
        rows.append(row)
        print(
            f"  {bandwidth / 1e6:7g}  {row['hop_rates_mbps']:28s} "
            f"{row['busiest_minmax_s']:9.2f} s {row['plan_minmax']:8s} "
            f"{row['busiest_comm_aware_s']:9.2f} s {row['plan_comm_aware']:8s} {row['ratio']:.3f}"
        )
    print(f"  (the start point's sensing, {rows[0]['sensing_s']:.2f} s, is the same under both)")

    n, seed = (int(v) for v in args.population.split(":")[1:])
    population = generate_population(n, seed, profiles)
    print(f"\nevery fine-tuning cluster of {args.population} (its own devices and distances):")
    print("  D2D MHz  clusters  comm-aware / compute-only: worst   mean    best")
    for bandwidth in bandwidths:
        d2d = dataclasses.replace(profiles.link("d2d-50m"), bandwidth_hz=bandwidth)
        layout = form_layout(
            population, profiles, d2d, profiles.link("uplink-1mhz"), 3, "minmax", costs
        )
        ratios = []
        for c in layout.fine_tuning:
            row = {"table": "population", "bandwidth_mhz": bandwidth / 1e6, "cluster": c.index}
            row |= compare(costs, c.profile, modules)
            rows.append(row)
            ratios.append(row["ratio"])
        print(
            f"  {bandwidth / 1e6:7g}  {len(ratios):8d}  {'':24s}{max(ratios):.3f}  "
            f"{math.fsum(ratios) / len(ratios):.3f}  {min(ratios):.3f}"
        )
    worse = [r for r in rows if r["busiest_comm_aware_s"] > r["busiest_minmax_s"] * (1 + 1e-12)]
    print(f"\ncomm-aware worse than compute-only in {len(worse)} of {len(rows)} comparisons")
    if args.csv:
        write_csv(args.csv, rows)

    edge_rows = edge_tables(costs, profiles, bandwidths, args.population, modules)

    # The planner's choice is never slower than the devices alone: for the cluster, and for
    # the population's round (its slowest cluster): the busiest node, then the latency.
    def key(r: dict[str, Any], side: str) -> tuple[float, float]:
        return (r[f"busiest_{side}_s"], r[f"latency_{side}_s"])

    slower = [r for r in edge_rows if faster(key(r, "devices"), key(r, "edge"))]
    print(
        f"\nthe planner with the edge slower than the devices alone in {len(slower)} of "
        f"{len(edge_rows)} comparisons (each cluster, and each round: busiest node, then latency)"
    )
    if args.edge_csv:
        write_csv(args.edge_csv, edge_rows)
    return 1 if worse or slower else 0


if __name__ == "__main__":
    raise SystemExit(main())
