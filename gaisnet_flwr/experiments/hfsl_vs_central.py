"""HFSL against centralised prompt tuning at equal epochs, and the cloud tier over several edges
(paper Sec. III-B, III-C): the real ServerApp, strategies and ClientApps in process.

* **HFSL vs centralised.** C clusters (4 and 8) fine-tune for R rounds of one local epoch each;
  centralised prompt tuning trains the same model for R epochs on the same images pooled (the
  clusters' training splits). Both are tested on the edge's fixed test set; "converged" is the
  mean of the last 3 rounds / epochs.
* **The cloud tier.** Three edge servers with their own domain shift (`none`, `rotate`,
  `invert`) and the third data-poor (`edge-shares='1,1,0.2'`), two clusters each, under the
  cloud-edge strategy: the cloud aggregates the edges' prompts every round (`cloud-every=1`)
  vs every edge on its own (`cloud-every=0`).

Every setting runs over several seeds (`--seeds`, 3 by default).

    python scripts/hfsl_vs_central.py            # 15 rounds, outputs/section5/hfsl
    python scripts/hfsl_vs_central.py --quick    # 1 round, 4 clusters
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.experiments.common.cli import add_common_arguments, run_seeds
from gaisnet_flwr.experiments.common.output import line_plot, md_table, seed_series, write_csv
from gaisnet_flwr.experiments.common.progress import Progress
from gaisnet_flwr.experiments.common.report import script_main
from gaisnet_flwr.experiments.common.stats import NOISE_RULE, mean_sd, pm, verdict

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.

NAME = "hfsl"
TITLE = "HFSL vs centralised prompt tuning, and the cloud tier over three edges"
ROUNDS = {"quick": 1, "full": 15}
CLUSTERS = (4, 8)
LAST = 3  # rounds / epochs averaged for "converged"
EDGES = {"edge-domains": "none,rotate,invert", "edge-shares": "1,1,0.2"}
CLUSTERS_PER_EDGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "outputs/section5/hfsl")
    parser.add_argument("--rounds", type=int, default=0, help="default: 15 (1 with --quick)")
    return parser


def cloud_edge(cfg: RunConfig, rounds: int, cloud_every: int) -> list[dict]:
    """metrics.json of a run over the three edges (the real apps, in process)."""
    from gaisnet_flwr.experiments.common.hfsl import quiet_run

    settings = {
        **cfg.to_dict(),
        **EDGES,
        "cloud-every": cloud_every,
        "num-rounds": rounds,
        "inference-requests": 0,
        "fraction-evaluate": 0.0,
    }
    clusters = CLUSTERS_PER_EDGE * len(EDGES["edge-domains"].split(","))
    return quiet_run(settings, clusters).metrics()


def converged(accuracy: list[float], last: int) -> float:
    return statistics.mean(accuracy[-last:])


def run(cfg: RunConfig, args: argparse.Namespace, out: Path) -> str:
    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.data.images import load_image_data
    from gaisnet_flwr.derived import data_spec
    from gaisnet_flwr.experiments.common.hfsl import centralised_curve, hfsl_rounds
    from gaisnet_flwr.split.precision import resolve_device

    rounds = args.rounds or ROUNDS["quick" if args.quick else "full"]
    seeds = run_seeds(cfg, args)
    last = min(LAST, rounds)
    progress = Progress(NAME, len(seeds) * (2 * (1 if args.quick else len(CLUSTERS)) + 2))
    Foundation.of(cfg).ensure(load_image_data(data_spec(cfg)), resolve_device(cfg.run.device))
    iid = cfg.replace(partitioning="iid", edge_domains="none", edge_shares="")
    counts = CLUSTERS[:1] if args.quick else CLUSTERS
    hfsl: dict[int, list[list[float]]] = {c: [] for c in counts}
    central: dict[int, list[list[float]]] = {c: [] for c in counts}
    for seed in seeds:
        for c in counts:
            s = iid.replace(seed=seed)
            hfsl[c].append([r.accuracy for r in hfsl_rounds(s, rounds, c)])
            progress.step(f"seed {seed}: HFSL, {c} clusters: {hfsl[c][-1][-1]:.4f}")
            central[c].append(centralised_curve(s, c, rounds))
            progress.step(f"seed {seed}: centralised, {c} clusters' data: {central[c][-1][-1]:.4f}")
    edges = EDGES["edge-domains"].split(",")
    tiers: dict[str, list[list[dict]]] = {"cloud-edge": [], "isolated": []}
    for seed in seeds:
        for label, every in (("cloud-edge", 1), ("isolated", 0)):
            tiers[label].append(cloud_edge(cfg.replace(seed=seed), rounds, every))
            progress.step(f"seed {seed}: {label}: {tiers[label][-1][-1]['accuracy']:.4f}")

    write_csv(
        out / "hfsl_vs_central.csv",
        ["clusters", "seed", "round", "hfsl_accuracy", "centralised_accuracy"],
        [
            [c, seed, r, h[r], z[r]]
            for c in counts
            for seed, h, z in zip(seeds, hfsl[c], central[c], strict=True)
            for r in range(rounds + 1)
        ],
    )
    write_csv(
        out / "cloud_edge.csv",
        ["aggregation", "seed", "round", *(f"edge{e}_accuracy" for e in range(len(edges)))],
        [
            [label, seed, m["round"], *(m[f"edge{e}/accuracy"] for e in range(len(edges)))]
            for label, runs in tiers.items()
            for seed, metrics in zip(seeds, runs, strict=True)
            for m in metrics
        ],
    )
    xs = range(rounds + 1)
    line_plot(
        out / "hfsl_vs_central.png",
        f"HFSL vs centralised at equal epochs (mean ± sd, {len(seeds)} seeds)",
        "round (HFSL) = epoch (centralised)",
        "test accuracy (fraction)",
        [
            series
            for c in counts
            for series in (
                seed_series(f"HFSL, {c} clusters", xs, hfsl[c]),
                seed_series(f"centralised, the same data ({c} clusters')", xs, central[c], "--s"),
            )
        ],
        ylim=(0, 1.02),
    )
    gaps = {
        c: [
            converged(z, last) - converged(h, last)
            for h, z in zip(hfsl[c], central[c], strict=True)
        ]
        for c in counts
    }
    table = md_table(
        ["clusters", "start", f"HFSL, converged (last {last})", "centralised, converged",
         "centralised - HFSL (points)", "within 2 points?"],
        [
            [c, pm([h[0] for h in hfsl[c]]), pm([converged(h, last) for h in hfsl[c]]),
             pm([converged(z, last) for z in central[c]]), pm(gaps[c], 1, 100),
             "yes" if abs(mean_sd(gaps[c])[0]) <= 0.02 else "no"]
            for c in counts
        ],
    )  # fmt: skip

    def final(label: str, e: int) -> list[float]:
        return [converged([m[f"edge{e}/accuracy"] for m in run], last) for run in tiers[label]]

    shares = EDGES["edge-shares"].split(",")
    tier_rows, tier_notes = [], []
    for e, domain in enumerate(edges):
        helped = [a - b for a, b in zip(final("cloud-edge", e), final("isolated", e), strict=True)]
        start = [run[0][f"edge{e}/accuracy"] for run in tiers["isolated"]]
        tier_rows.append(
            [e, domain, shares[e], pm(start), pm(final("cloud-edge", e)), pm(final("isolated", e)),
             pm(helped, 1, 100), verdict(helped, +1)]
        )  # fmt: skip
        tier_notes.append(helped)
    tier_table = md_table(
        ["edge", "domain", "data share", "start", "cloud-edge (every round)", "isolated",
         "cloud - isolated (points)", "verdict"],
        tier_rows,
    )  # fmt: skip
    return f"""
HFSL ({cfg.cluster.peers_per_cluster} peers per cluster, {cfg.model.mode},
{cfg.training.optimizer} lr {cfg.training.lr}, batch {cfg.training.batch_size}, {rounds} rounds
of {cfg.training.local_epochs} local epoch(s), {cfg.data.shots} images per class per cluster)
through the real ServerApp, strategies and ClientApps, against centralised prompt tuning of the
same model for as many epochs on the same images pooled; seeds {", ".join(map(str, seeds))}.

![HFSL vs centralised](hfsl_vs_central.png)

{table}

Centralised minus HFSL at {", ".join(map(str, counts))} clusters:
{"; ".join(f"{c} clusters {pm(gaps[c], 1, 100)} points ({verdict(gaps[c], +1)})" for c in counts)}
(a verdict here: whether centralised is ahead beyond the seeds' spread). FedAvg averages
clusters that each took a few steps on their own few shots, where the centralised run takes
those steps in sequence over all the images.

**The cloud tier** ({len(edges)} edges: domains {", ".join(edges)}, data shares
{", ".join(shares)}, {CLUSTERS_PER_EDGE} clusters each, cloud-edge strategy with
`cloud-modules='{cfg.hierarchy.cloud_modules}'` and `cloud-mix={cfg.hierarchy.cloud_mix}`), each
edge's converged accuracy on its own domain's test set:

{tier_table}

{NOISE_RULE}
CSV (every seed and round): [hfsl_vs_central.csv](hfsl_vs_central.csv),
[cloud_edge.csv](cloud_edge.csv).
"""


def main(argv: list[str] | None = None) -> None:
    script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
