"""Shared pieces of the Section V reproduction scripts (`scripts/section5.py` runs them all).

One job each: the command line every script shares (`--quick`, `--out`, `--run-config`,
`--preset`), building the validated RunConfig from presets and overrides, a one-line-per-step
progress display, CSV / PNG / markdown writers, the paper's reference numbers, and the HFSL
rounds the figures and tables drive: the real ServerApp, strategies and ClientApps on an
in-process grid (`gaisnet_flwr.apps.inprocess`).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import matplotlib

matplotlib.use("Agg")  # files only, no display: runs headless on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch.utils.data import ConcatDataset, Dataset  # noqa: E402

from gaisnet_flwr.apps.inprocess import run_inprocess  # noqa: E402
from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.config import ConfigError, RunConfig, parse_overrides  # noqa: E402
from gaisnet_flwr.data.images import (  # noqa: E402
    cluster_datasets,
    edge_image_data,
    load_image_data,
)
from gaisnet_flwr.training.loops import evaluate, train_centralised  # noqa: E402
from gaisnet_flwr.vit.model import PromptedViT  # noqa: E402

REPO = Path(__file__).resolve().parents[2]  # the checkout (an editable install): conf/ presets
CONF = REPO / "conf"

# The paper's Section V numbers (ViT-B/16 on Oxford Flowers, RTX 4060, lr 0.001, batch 10,
# train:val 4:1), as quoted in the text; see ../shared/notes/anchors.md. These are the reference
# the report compares against, never results of ours.
PAPER: dict[str, Any] = {
    "fig6_pretrained_epoch1": 0.968,
    "fig6_pretrained_epoch10": 0.975,
    "fig6_random_converged": 0.570,
    "fig7_prompt_epoch_s": 35.0,
    "fig7_full_epoch_s": 210.0,
    # Table III: classes in the fine-tuning data -> (first, end) accuracy
    "table3": {
        1: (0.200, 0.200),
        2: (0.397, 0.397),
        3: (0.575, 0.595),
        4: (0.753, 0.767),
        5: (0.933, 0.967),
    },  # fmt: skip
    "table5": {"rs": -75.0, "msip": 500.0, "mlcp": 650.0},
}


# Every Section V setting runs this many seeds (run-config `seed`, `seed + 1`, ...): the edges'
# fresh heads, prompts, partitions and shuffles; the cloud's foundation has its own
# `pretrain-seed`, so one foundation serves them all.
SEEDS = 3


# -- seeds, spreads and verdicts ------------------------------------------------------------------


def run_seeds(cfg: RunConfig, args: argparse.Namespace) -> list[int]:
    """The seeds a setting runs: `--seeds` of them from the run-config's `seed` on."""
    return [cfg.run.seed + i for i in range(getattr(args, "seeds", SEEDS))]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, sd


def pm(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± sd' over seeds, e.g. '0.612 ± 0.014' (scale=100: points)."""
    mean, sd = mean_sd([scale * v for v in values])
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def beyond_noise(effects: Sequence[float]) -> bool:
    """Whether per-seed effects (differences measured seed by seed) stand out of their own
    spread: |mean| > 2 sd. With identical effects (sd 0) any non-zero mean does."""
    mean, sd = mean_sd(effects)
    return abs(mean) > 2 * sd and mean != 0


def verdict(effects: Sequence[float], paper_sign: int) -> str:
    """'agrees' / 'differs' with the paper's direction (`paper_sign` +1 or -1) when the
    per-seed effects exceed their spread (`beyond_noise`), else 'within noise'."""
    if not beyond_noise(effects):
        return "within noise"
    return "agrees" if mean_sd(effects)[0] * paper_sign > 0 else "differs"


NOISE_RULE = (
    "A verdict compares per-seed effects with their own spread: *agrees* or *differs* (with the "
    "paper's direction) only when |mean| > 2 sd over the seeds, else *within noise*."
)


# -- command line ---------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="a few epochs/rounds: checks the pipeline in seconds"
    )
    parser.add_argument("--out", type=Path, default=Path(default_out), help="output folder")
    parser.add_argument(
        "--preset",
        action="append",
        default=[],
        metavar="TOML",
        help="run-config overlay (flat key = value TOML, e.g. conf/paper-vitb16-flowers102.toml);"
        " repeatable, later ones win",
    )
    parser.add_argument(
        "--run-config",
        default="",
        help='overrides in flwr\'s syntax, applied after the presets, e.g. "lr=0.01 seed=1"',
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=SEEDS,
        help=f"run seeds per setting, from the run-config's seed on (default {SEEDS}); tables "
        "report mean ± sd over them and a verdict only when an effect exceeds their spread",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the embedded models are too small to gain from more, "
        "and on a 2-core machine shared with another busy process two spin-waiting threads were "
        "measured 5x slower than one)",
    )


def read_preset(path: Path) -> dict[str, Any]:
    """A run-config overlay: flat `key = value` TOML, as `flwr run --run-config FILE` reads."""
    if not path.is_file():
        available = sorted(str(p.relative_to(REPO)) for p in CONF.glob("*.toml"))
        raise ConfigError(
            f"preset {str(path)!r} is not a file; presets in this repository: "
            f"{', '.join(available) or '(none)'}"
        )
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"preset {str(path)!r} is not valid TOML: {err}") from err
    nested = sorted(k for k, v in table.items() if isinstance(v, dict))
    if nested:
        raise ConfigError(
            f"preset {str(path)!r} has tables {nested}; a run-config overlay is flat key = value"
        )
    return table


def run_config_values(presets: Sequence[Path], overrides: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for preset in presets:
        values.update(read_preset(Path(preset)))
    values.update(parse_overrides(overrides))
    return values


def parse_or_exit(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    check: Callable[[RunConfig], object] | None = None,
) -> tuple:
    """Arguments and the validated RunConfig; a bad preset, key or value exits with status 2
    and a message naming it (and the valid choices) before any work. `args.set_keys` holds the
    run-config keys the user set, so an experiment can keep its own default for the others."""
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        values = run_config_values(args.preset, args.run_config)
        cfg = RunConfig.from_run_config(values)
        if check:
            check(cfg)  # the experiment's own requirements on the config
    except ConfigError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
    args.set_keys = set(values)
    return args, cfg


# -- progress -------------------------------------------------------------------------------------


class Progress:
    """One line per finished step with elapsed time and ETA (the mean step time so far)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, max(total, 1), 0
        self.started = time.perf_counter()

    def step(self, note: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        print(
            f"[{self.label}] {self.done}/{self.total} {note} | {elapsed:.0f} s elapsed, "
            f"ETA {eta:.0f} s",
            flush=True,
        )


class Turns:
    """Runs jobs in their own threads but one at a time, round robin: a job calls
    `yield_turn(i)` at the end of each step (e.g. an epoch) and waits there for its next turn.

    Two trainings timed this way alternate epoch by epoch, so load from other processes on the
    machine hits both alike; their results are what running them one after the other gives.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs, self.turn = jobs, 0
        self.done: set[int] = set()
        self.cond = threading.Condition()

    def _pass(self, i: int) -> None:  # caller holds the condition
        for k in range(1, self.jobs + 1):
            if (j := (i + k) % self.jobs) not in self.done:
                self.turn = j
                break
        self.cond.notify_all()

    def yield_turn(self, i: int) -> None:
        with self.cond:
            self._pass(i)
            self.cond.wait_for(lambda: self.turn == i)

    def run(self, job: Callable[[int], None]) -> None:
        """`job(i)` for i in range(jobs), taking turns; re-raises the first job's error."""
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            with self.cond:
                self.cond.wait_for(lambda: self.turn == i)
            try:
                job(i)
            except BaseException as err:  # noqa: BLE001 - handed to the caller below
                errors.append(err)
            finally:
                with self.cond:
                    self.done.add(i)
                    self._pass(i)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(self.jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]


# -- files ----------------------------------------------------------------------------------------


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for tables: floats to `digits` decimals, NaN/None as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells go through `fmt`."""
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row needs {len(header)} cells: {rows}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-o"
    sd: Sequence[float] | None = None  # drawn as a band of mean ± sd over seeds


def seed_series(
    label: str, x: Sequence[float], runs: Sequence[Sequence[float]], style: str = "-o"
) -> Series:
    """The mean over seeds of `runs` (one sequence per seed), with its sd band."""
    stats = [mean_sd(values) for values in zip(*runs, strict=True)]
    return Series(label, x, [m for m, _ in stats], style, [sd for _, sd in stats])


def line_plot(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: Sequence[Series],
    ax: Any = None,
    ylim: tuple[float, float] | None = None,
    logy: bool = False,
) -> Path:
    """One readable line chart (title, axis labels with units, legend) saved as PNG; pass `ax`
    to draw into a panel of a larger figure instead (the caller saves it)."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in series:
        (line,) = ax.plot(s.x, s.y, s.style, label=s.label, markersize=4)
        if s.sd is not None and any(s.sd):
            low = [m - d for m, d in zip(s.y, s.sd, strict=True)]
            high = [m + d for m, d in zip(s.y, s.sd, strict=True)]
            ax.fill_between(list(s.x), low, high, color=line.get_color(), alpha=0.2)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, rounds, peers: whole numbers
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if own:
        save(fig, path)
    return path


def save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- one experiment = one command = one section of the report ------------------------------------


class Experiment(Protocol):
    NAME: str  # output sub-folder and report anchor, e.g. "fig7"
    TITLE: str

    def build_parser(self) -> argparse.ArgumentParser: ...

    def run(self, cfg: RunConfig, args: argparse.Namespace, out: Path) -> str: ...


@dataclass
class SectionResult:
    name: str
    title: str
    markdown: str  # the section, links relative to its own folder
    seconds: float
    files: list[Path] = field(default_factory=list)


def execute(
    experiment: Experiment, cfg: RunConfig, args: argparse.Namespace, out: Path
) -> SectionResult:
    """Run one experiment into `out`, time it and write its section as `out/report.md`."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    body = experiment.run(cfg, args, out)
    seconds = time.perf_counter() - started
    variant = "quick variant" if args.quick else "full variant"
    markdown = (
        f"## {experiment.TITLE}\n\n{body.strip()}\n\n"
        f"*Measured wall time: {seconds:.0f} s ({variant}, {cfg.run.torch_device()}, "
        f"torch threads: {torch.get_num_threads()}, seeds "
        f"{', '.join(map(str, run_seeds(cfg, args)))}; {foundation_note(cfg)}).*\n"
    )
    (out / "report.md").write_text(markdown)
    files = sorted(p for p in out.iterdir() if p.suffix in (".csv", ".png"))
    return SectionResult(experiment.NAME, experiment.TITLE, markdown, seconds, files)


def foundation_note(cfg: RunConfig) -> str:
    """Which foundation the numbers stand on: its kind and the SHA-256 of its weights (the
    same at any thread count, `Foundation.fingerprint`), after making sure it exists."""
    data = load_image_data(cfg.data_spec())
    foundation = Foundation.of(cfg)
    foundation.ensure(data, cfg.run.torch_device())
    digest = foundation.fingerprint(data.num_classes)
    return f"foundation `{cfg.cloud.foundation}`, weights sha256 `{digest[:16]}`"


def script_main(experiment: Experiment, argv: Sequence[str] | None = None) -> SectionResult:
    """The body of every script's `main`: parse, validate, run, say where the files went."""
    args, cfg = parse_or_exit(experiment.build_parser(), argv, getattr(experiment, "check", None))
    torch.set_num_threads(args.threads)
    result = execute(experiment, cfg, args, args.out)
    print(
        f"{experiment.TITLE}: done in {result.seconds:.0f} s; report {args.out / 'report.md'}, "
        f"files: {', '.join(p.name for p in result.files)}",
        flush=True,
    )
    return result


# -- HFSL rounds: the real apps, in this process ---------------------------------------------------


@dataclass
class RoundRow:
    """One HFSL round at one edge: central test accuracy after aggregation and what it cost."""

    round: int
    accuracy: float
    loss: float
    wall_s: float = 0.0  # measured: the round in the ServerApp (clusters in series, FedAvg, eval)
    d2d_forward_bytes: int = 0  # smashed data, summed over clusters (real serialized bytes)
    d2d_backward_bytes: int = 0  # gradients of smashed data
    upload_bytes: int = 0  # the tunable modules every cluster uploads (Flower's byte count)
    num_examples: int = 0  # training samples over all clusters


def hfsl_rounds(
    cfg: RunConfig,
    rounds: int,
    clusters: int,
    *,
    node_configs: Sequence[dict[str, Any]] | None = None,
    test: Dataset | None = None,
    on_round: Callable[[RoundRow], None] | None = None,
) -> list[RoundRow]:
    """`rounds` HFSL rounds of one edge (paper Sec. III-C.1): the real ServerApp, strategies and
    ClientApps over `clusters` nodes in this process (`run_inprocess`), read back from the files
    the app writes. Row 0 is the start model.

    Every cluster starts the round from the edge's modules and fine-tunes over its split chain;
    the edge aggregates per module and evaluates on its domain's test set (or, with `test`,
    each round's saved modules are evaluated on that set instead). `node_configs` give the
    clusters fixed partitions or a train pool (see `clients.split_client.TrainPool`). No
    federated evaluation and no inference requests: only the rounds. `on_round` sees each
    round once the run is over.
    """
    settings = {
        **cfg.to_dict(),
        "num-rounds": rounds,
        "inference-requests": 0,
        "fraction-evaluate": 0.0,
    }
    with tempfile.TemporaryDirectory(prefix="hfsl-") as tmp:
        run = run_inprocess(
            {**settings, "output-dir": tmp},
            clusters,
            node_configs,
            client_threads=torch.get_num_threads(),  # --threads
        )
        metrics = run.metrics()
        rows = [
            RoundRow(
                int(m["round"]),
                float(m["accuracy"]),
                float(m["loss"]),
                float(m.get("round-time-s", 0.0)),
                int(m.get("train/d2d-bytes-fwd", 0)),
                int(m.get("train/d2d-bytes-bwd", 0)),
                int(m.get("train/upload-bytes", 0)),
                int(m.get("train/num-examples", 0)),
            )
            for m in metrics
        ]
        if test is not None:
            model = Foundation.of(cfg).load(load_image_data(cfg.data_spec()).num_classes)
            for row in rows:
                modules = run.modules(row.round)
                model.load_tunable_state(
                    {k.removeprefix("edge0/"): torch.from_numpy(v) for k, v in modules.items()}
                )
                result = evaluate(model, test, device=cfg.run.torch_device())
                row.accuracy, row.loss = result.accuracy, result.loss
    for row in rows[1:]:
        if on_round:
            on_round(row)
    return rows


def pooled_edge_data(cfg: RunConfig, clusters: int) -> tuple[Dataset, Dataset]:
    """Edge 0's training data as `clusters` clusters hold it (their training splits, pooled:
    what centralised training on the same data sees) and its test set."""
    spec = cfg.data_spec()
    edge = edge_image_data(
        load_image_data(spec), 0, [1.0], cfg.hierarchy.domains()[0], seed=cfg.run.seed
    )
    pool: ConcatDataset = ConcatDataset(
        [cluster_datasets(edge, c, clusters, spec)[0] for c in range(clusters)]
    )
    return pool, edge.test


def centralised_curve(cfg: RunConfig, clusters: int, epochs: int) -> list[float]:
    """Test accuracy before and after each epoch of centralised training (the run-config's
    mode) on edge 0's data as `clusters` clusters hold it, pooled (`pooled_edge_data`)."""
    train, test = pooled_edge_data(cfg, clusters)
    model = Foundation.of(cfg).load(load_image_data(cfg.data_spec()).num_classes)
    device = cfg.run.torch_device()
    accuracy = [evaluate(model, test, device=device).accuracy]
    train_centralised(
        model,
        train,
        cfg.training,
        epochs,
        cfg.run.seed,
        on_epoch=lambda _, m: accuracy.append(evaluate(m, test, device=device).accuracy),
        device=device,
    )
    return accuracy


def fresh_head_config(cfg: RunConfig, folder: Path, seed: int) -> RunConfig:
    """`cfg` on the same foundation with a fresh classifier head (VPT re-creates the head for
    the downstream task), as a checkpoint file the apps load (`foundation = "file"`)."""
    model = Foundation.of(cfg).load(load_image_data(cfg.data_spec()).num_classes)
    reset_head(model, seed)
    path = folder / "foundation-fresh-head.pt"
    torch.save(model.backbone.state_dict(), path)
    return cfg.replace(foundation="file", checkpoint_path=str(path))


def reset_head(model: PromptedViT, seed: int) -> None:
    """A fresh classifier head (VPT re-creates the head for the downstream task), seeded."""
    torch.manual_seed(seed)
    for head in model.head_modules().values():
        head.reset_parameters()  # type: ignore[operator]


def relative_links(text: str, folder: str) -> str:
    """Prefix the section's local links (images, CSVs) with its folder, for the joint report."""
    return re.sub(r"\]\((?!https?://|#|/)([^)]+)\)", lambda m: f"]({folder}/{m.group(1)})", text)


def with_defaults(cfg: RunConfig, args: argparse.Namespace, **defaults: Any) -> RunConfig:
    """An experiment's own defaults (field names), for the keys the user did not set."""
    keep: set[str] = getattr(args, "set_keys", set())
    return cfg.replace(**{k: v for k, v in defaults.items() if k.replace("_", "-") not in keep})


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
