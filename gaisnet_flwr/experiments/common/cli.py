"""The command line every Section V script shares: `--quick`, `--out`, `--preset`, `--run-config`,
`--seeds`, `--threads`, and the validated RunConfig built from presets and overrides."""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gaisnet_flwr.config import ConfigError, RunConfig, parse_overrides

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.

# Every Section V setting runs this many seeds (run-config `seed`, `seed + 1`, ...): the edges'
# fresh heads, prompts, partitions and shuffles; the cloud's foundation has its own
# `pretrain-seed`, so one foundation serves them all.
SEEDS = 3


def run_seeds(cfg: RunConfig, args: argparse.Namespace) -> list[int]:
    """The seeds a setting runs: `--seeds` of them from the run-config's `seed` on."""
    return [cfg.run.seed + i for i in range(getattr(args, "seeds", SEEDS))]


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
        available = sorted(str(p) for p in Path("conf").glob("*.toml"))
        raise ConfigError(
            f"preset {str(path)!r} is not a file; presets in this repository (./conf): "
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
    from gaisnet_flwr.derived import derive

    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        values = run_config_values(args.preset, args.run_config)
        cfg = RunConfig.from_run_config(values)
        derive(cfg)  # what needs the environment: data, profiles, the model, folders
        if check:
            check(cfg)  # the experiment's own requirements on the config
    except ConfigError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
    args.set_keys = set(values)
    return args, cfg


def with_defaults(cfg: RunConfig, args: argparse.Namespace, **defaults: Any) -> RunConfig:
    """An experiment's own defaults (field names), for the keys the user did not set."""
    keep: set[str] = getattr(args, "set_keys", set())
    return cfg.replace(**{k: v for k, v in defaults.items() if k.replace("_", "-") not in keep})
