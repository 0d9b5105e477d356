"""One experiment = one command = one section of the report: run it, time it, write its section."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.experiments.common.cli import parse_or_exit, run_seeds

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.


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
    import torch

    from gaisnet_flwr.split.precision import resolve_device

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    body = experiment.run(cfg, args, out)
    seconds = time.perf_counter() - started
    variant = "quick variant" if args.quick else "full variant"
    markdown = (
        f"## {experiment.TITLE}\n\n{body.strip()}\n\n"
        f"*Measured wall time: {seconds:.0f} s ({variant}, {resolve_device(cfg.run.device)}, "
        f"torch threads: {torch.get_num_threads()}, seeds "
        f"{', '.join(map(str, run_seeds(cfg, args)))}; {foundation_note(cfg)}).*\n"
    )
    (out / "report.md").write_text(markdown)
    files = sorted(p for p in out.iterdir() if p.suffix in (".csv", ".png"))
    return SectionResult(experiment.NAME, experiment.TITLE, markdown, seconds, files)


def foundation_note(cfg: RunConfig) -> str:
    """Which foundation the numbers stand on: its kind and the SHA-256 of its weights (the
    same at any thread count, `Foundation.fingerprint`), after making sure it exists."""
    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.data.images import load_image_data
    from gaisnet_flwr.derived import data_spec
    from gaisnet_flwr.split.precision import resolve_device

    data = load_image_data(data_spec(cfg))
    foundation = Foundation.of(cfg)
    foundation.ensure(data, resolve_device(cfg.run.device))
    digest = foundation.fingerprint(data.num_classes)
    return f"foundation `{cfg.cloud.foundation}`, weights sha256 `{digest[:16]}`"


def script_main(experiment: Experiment, argv: Sequence[str] | None = None) -> SectionResult:
    """The body of every script's `main`: parse, validate, run, say where the files went."""
    args, cfg = parse_or_exit(experiment.build_parser(), argv, getattr(experiment, "check", None))
    import torch

    torch.set_num_threads(args.threads)
    result = execute(experiment, cfg, args, args.out)
    print(
        f"{experiment.TITLE}: done in {result.seconds:.0f} s; report {args.out / 'report.md'}, "
        f"files: {', '.join(p.name for p in result.files)}",
        flush=True,
    )
    return result
