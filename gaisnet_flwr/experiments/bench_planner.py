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

    python scripts/bench_planner.py                      # ViT-B/16, the paper's workload
    python scripts/bench_planner.py --csv docs/planner/bench_planner.csv
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gaisnet_flwr.costs.profiles import ClusterProfile, Profiles, load_profiles
from gaisnet_flwr.population.devices import PopulationDevice, generate_population

if TYPE_CHECKING:
    from gaisnet_flwr.costs.pricing import RoundCost
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
    args = parser.parse_args(argv)
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
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        print(f"rows: {args.csv}")
    return 1 if worse else 0


if __name__ == "__main__":
    raise SystemExit(main())
