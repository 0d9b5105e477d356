"""Reproduce the paper's Section V in one command: Fig. 6, Fig. 7, Table III, Table IV, Table V with
Fig. 8, and the communication / peers study, each into its own folder (CSV, PNG, report.md),
joined into one report.md that puts our numbers next to the paper's and states each command's
measured wall time.

The experiments run in this process one after another (Python and torch start once); each is
also a command of its own (`python scripts/fig7_frozen_vs_full.py --quick`, ...).

    python scripts/section5.py --quick        # every experiment, a few epochs/rounds each
    python scripts/section5.py                # the full set, outputs/section5/full/report.md
    python scripts/section5.py --only fig6,table5 --run-config "seed=1"
    python scripts/section5.py --preset conf/paper-vitb16-flowers102.toml --run-config \\
        "data-dir='/data'"                    # the paper's setting (internet once, a GPU)
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports, so their cost is measured too

import argparse  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import gaisnet_flwr.experiments.comm_and_peers as comm_and_peers  # noqa: E402
import gaisnet_flwr.experiments.fig6_pretraining as fig6_pretraining  # noqa: E402
import gaisnet_flwr.experiments.fig7_frozen_vs_full as fig7_frozen_vs_full  # noqa: E402
import gaisnet_flwr.experiments.hfsl_vs_central as hfsl_vs_central  # noqa: E402
import gaisnet_flwr.experiments.table3_noniid as table3_noniid  # noqa: E402
import gaisnet_flwr.experiments.table4_clusters as table4_clusters  # noqa: E402
import gaisnet_flwr.experiments.table5_scheduling as table5_scheduling  # noqa: E402
from gaisnet_flwr.apps.inprocess import flower_log_to  # noqa: E402
from gaisnet_flwr.config import RunConfig  # noqa: E402
from gaisnet_flwr.experiments.common import cli, output, progress, report, stats  # noqa: E402

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.

EXPERIMENTS = {
    m.NAME: m
    for m in (
        fig6_pretraining,
        fig7_frozen_vs_full,
        table3_noniid,
        table4_clusters,
        table5_scheduling,
        comm_and_peers,
        hfsl_vs_central,
    )
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_common_arguments(parser, "")
    parser.set_defaults(out=None)  # None: outputs/section5/quick or outputs/section5/full
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of: {', '.join(EXPERIMENTS)} (default: all)",
    )
    return parser


def selected(parser: argparse.ArgumentParser, only: str) -> list[str]:
    names = [n.strip() for n in only.split(",") if n.strip()] or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"--only: unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS)}")
    return names


def sub_argv(args: argparse.Namespace, out: Path) -> list[str]:
    argv = ["--out", str(out), "--threads", str(args.threads), "--seeds", str(args.seeds)]
    if args.quick:
        argv.append("--quick")
    for preset in args.preset:
        argv += ["--preset", str(preset)]
    if args.run_config:
        argv += ["--run-config", args.run_config]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg = cli.parse_or_exit(parser, argv)  # bad preset/key/value: exit before any work
    import torch

    names = selected(parser, args.only)
    out = args.out or Path("outputs/section5") / ("quick" if args.quick else "full")
    subs = {
        n: cli.parse_or_exit(
            EXPERIMENTS[n].build_parser(),
            sub_argv(args, out / n),
            getattr(EXPERIMENTS[n], "check", None),
        )
        for n in names
    }
    torch.set_num_threads(args.threads)  # after every check: bad input changes nothing
    out.mkdir(parents=True, exist_ok=True)
    foundation = report.foundation_note(cfg)  # pre-trains it once, before the timed parts
    startup = time.perf_counter() - START
    results, failures = [], []
    flower_log = out / "flower.log"  # Flower's lines (each in-process run keeps its own)
    flower_log.unlink(missing_ok=True)
    print(
        f"Section V: {', '.join(names)} into {out} (start-up {startup:.0f} s; Flower's log: "
        f"{flower_log})",
        flush=True,
    )
    for name in names:
        module = EXPERIMENTS[name]
        sub_args, sub_cfg = subs[name]
        try:
            with flower_log_to(flower_log):
                result = report.execute(module, sub_cfg, sub_args, out / name)
        except Exception:  # noqa: BLE001 - report it, run the others, fail at the end
            failures.append((name, traceback.format_exc()))
            print(f"[{name}] FAILED\n{failures[-1][1]}", flush=True)
            continue
        results.append((module, result))
        print(f"[{name}] done in {result.seconds:.0f} s", flush=True)
    total = time.perf_counter() - START
    write_report(out / "report.md", args, cfg, argv, results, failures, startup, total, foundation)
    print(f"Section V report: {out / 'report.md'} ({total:.0f} s in all)", flush=True)
    return 1 if failures else 0


def write_report(
    path: Path,
    args: argparse.Namespace,
    cfg: RunConfig,
    argv: list[str] | None,
    results: list,
    failures: list[tuple[str, str]],
    startup: float,
    total: float,
    foundation: str,
) -> None:
    import torch

    command = shlex.join(
        ["python", "scripts/section5.py", *(sys.argv[1:] if argv is None else argv)]
    )
    variant = "quick variant" if args.quick else "full variant"
    timing = output.md_table(
        ["experiment", "standalone command", "wall time"],
        [
            [
                f"[{r.title}](#{anchor(r.title)})",
                f"`python scripts/{Path(m.__file__).name}{' --quick' if args.quick else ''}`",
                f"{r.seconds:.0f} s",
            ]
            for m, r in results
        ]
        + [["Python start-up, imports and the foundation (once; every standalone command "
            "pays them too)", "", f"{startup:.0f} s"]]
        + [["**all of the above**", f"`{command}`", f"**{total:.0f} s ({total / 60:.1f} min)**"]],
    )  # fmt: skip
    failed = "".join(f"\n\n**{name} FAILED:**\n\n```\n{tb}```" for name, tb in failures)
    cores = progress.cpu_count()
    sections = "\n\n".join(output.relative_links(r.markdown, r.name) for _, r in results)
    path.write_text(
        f"""# GaisNet on Flower: the paper's Section V, reproduced ({variant})

Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {platform.machine()},
{cores} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s),
{"a GPU" if torch.cuda.is_available() else "no GPU"}. Every number below was measured by that
command (the paper's numbers are quoted from its Section V). The paper ran ViT-B/16 on Oxford
Flowers on an RTX 4060; this run: `{cfg.model.model_name}` at {cfg.model.img_size} px (depth {
            cfg.model.depth
        },
width {cfg.model.embed_dim}), {foundation}, dataset `{cfg.data.dataset}`{
            DIGITS_NOTE[cfg.data.edge_task] if cfg.data.dataset == "digits" else ""
        }. Every setting ran {args.seeds} seeds ({
            ", ".join(map(str, cli.run_seeds(cfg, args)))
        }); tables give mean ± sd over them. {stats.NOISE_RULE}

{timing}{failed}

{sections}
"""
    )


DIGITS_NOTE = {
    "new-classes": (
        " (the embedded default: scikit-learn's 8x8 digits, resized; with `foundation='cloud'` "
        "the cloud pre-trains the backbone on digits 0-4 and ships it without its head; the "
        "edges learn digits 5-9 on a fresh head from `shots` images per class per cluster and "
        "are tested on a fixed 400 images)"
    ),
    "same-classes": (
        " (the earlier setting, `edge-task='same-classes'`: the cloud pre-trains on a share of "
        "all ten digits that no edge sees and ships its head too)"
    ),
}


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


if __name__ == "__main__":
    sys.exit(main())
