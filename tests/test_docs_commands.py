"""Every command in a `bash` block of README.md and docs/*.md works as written, in the activated
`.venv` (the README's quickstart says `source .venv/bin/activate`) from the repository root.

Running them all would take hours (full Section V, a GPU benchmark, deployments on other
machines), so each is checked as far as it can be without doing its work:

- `python scripts/X.py ARGS`: the script exists and its own argument parser accepts ARGS (the
  real `main`, stopped right after it parsed);
- `bash scripts/X.sh ARGS` and `flwr run . ARGS`: the script exists; every `--run-config` (a
  preset or key=value items) reads, names only keys the app has and values `RunConfig` takes,
  and `--federation-config` is what `flwr run` accepts;
- `.venv/bin/X`, `flower-supernode ...`: installed in this environment, with the options named;
- `gaisnet-X ARGS` (this package's commands): installed, and its parser accepts ARGS;
- `export VAR=value`: a plain assignment;
- `pip install -e '.[extra]'`: the extra exists.

A command of any other form fails the test until a rule for it is added here. The commands run
for real elsewhere: `bash scripts/run.sh` (through `flwr_local.py`) in tests/test_flwr_run.py,
`bash scripts/test.sh` in `.ci/run`, and `python scripts/section5.py --help` below, as a user in
the activated environment would type it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gaisnet_flwr.experiments import flwr_local

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
BLOCK = re.compile(r"^[ \t]*```bash\n(.*?)^[ \t]*```", re.S | re.M)
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def documented_commands() -> list[tuple[str, list[str]]]:
    """(page: line, argv) of every command in every bash block, `\\`-continued lines joined,
    comments dropped, $PWD expanded."""
    found = []
    for page in PAGES:
        for block in BLOCK.findall(page.read_text()):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                argv = shlex.split(line.replace("$PWD", str(REPO)), comments=True)
                if argv:
                    found.append((f"{page.name}: {line.strip()[:60]}", argv))
    return found


COMMANDS = documented_commands()


class Parsed(Exception):
    """Raised right after a command's parser accepted its arguments: no work is done."""


def parse_only(main: Any, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise Parsed(real(self, *args, **kwargs))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed) as parsed:
        main(argv)
    return parsed.value.args[0]


def check_run_config(args: list[str]) -> None:
    """The `--run-config` / `--preset` values among `args`: readable, known keys, valid values
    (without the environment: a preset may name data that lives elsewhere)."""
    from gaisnet_flwr.config import RunConfig

    values = []
    items = iter(args)
    for arg in items:
        if arg in ("--run-config", "-c", "--preset"):
            values.append(next(items))
        elif arg.startswith("--run-config="):
            values.append(arg.partition("=")[2])
    overrides = flwr_local.read_run_config(values)
    defaults = flwr_local.app_run_config(REPO)
    assert set(overrides) <= set(defaults), sorted(set(overrides) - set(defaults))
    RunConfig.of(**{k.replace("-", "_"): v for k, v in {**defaults, **overrides}.items()})


def check_federation_config(args: list[str]) -> None:
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    for i, arg in enumerate(args):
        if arg == "--federation-config":
            parsed = parse_config_args([args[i + 1]])
            simulation_config_from_json({k.replace("-", "_"): v for k, v in parsed.items()})


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_works_as_written(
    where: str, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # the docs' paths are relative to the repository root
    head, args = argv[0], argv[1:]
    if head == "python" and args[0].startswith("scripts/"):
        script = REPO / args[0]
        assert script.is_file(), where
        module = re.search(r"from (\S+) import main", script.read_text())
        assert module, f"{script} is not a thin wrapper"
        main = importlib.import_module(module.group(1)).main
        parse_only(main, args[1:], monkeypatch)
        check_run_config(args[1:])
    elif head == "python" and args[0] == "-m" and args[1].startswith("gaisnet_flwr."):
        main = importlib.import_module(args[1]).main  # a module of ours run as a command
        parse_only(main, args[2:], monkeypatch)
        for path in (a for a in args[2:] if a.startswith("docs/")):
            assert (REPO / path).is_file(), f"{where}: {path} is not in the repository"
    elif head == "bash" and args[0].startswith("scripts/"):
        assert (REPO / args[0]).is_file(), where
        check_run_config(args[1:])  # run.sh hands its arguments to `flwr run`
        check_federation_config(args[1:])
    elif argv[:3] == ["flwr", "run", "."]:
        check_run_config(args[2:])
        check_federation_config(args[2:])
    elif head.startswith(".venv/bin/"):
        assert (BIN / Path(head).name).is_file(), f"{where}: {head} is not installed"
        if args[:2] == ["install", "-e"]:
            extra = re.fullmatch(r"\.\[(\w+)\]", args[2])
            assert extra and extra.group(1) in PYPROJECT["project"]["optional-dependencies"]
    elif head.startswith("flower-"):
        exe = BIN / head
        assert exe.is_file(), where
        help_text = subprocess.run(
            [str(exe), "--help"], capture_output=True, text=True, timeout=120
        ).stdout
        for option in (a for a in args if a.startswith("--")):
            assert option in help_text, f"{where}: {head} has no {option}"
    elif head in PYPROJECT["project"]["scripts"]:  # one of ours, e.g. gaisnet-warm-clientapp
        assert (BIN / head).is_file(), f"{where}: {head} is not installed"
        module, _, function = PYPROJECT["project"]["scripts"][head].partition(":")
        parse_only(getattr(importlib.import_module(module), function), args, monkeypatch)
    elif head == "export":
        assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S+", a) for a in args), where
    elif head == "source":
        assert (REPO / args[0]).is_file() or args[0] == ".venv/bin/activate", where
    else:
        pytest.fail(f"{where}: no rule checks `{head}` commands; add one to this test")


def test_the_docs_say_to_activate_the_environment() -> None:
    quickstart = (REPO / "README.md").read_text().split("## ", 2)[1]
    assert "source .venv/bin/activate" in quickstart


def test_a_script_runs_in_the_activated_environment(tmp_path: Path) -> None:
    # The failure: `python scripts/section5.py --help` without the environment. As the
    # activated .venv has it: its bin first on PATH, `python` resolved there.
    path = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "VIRTUAL_ENV": str(BIN.parent)}
    command = ["python", "scripts/section5.py", "--help"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--quick" in result.stdout
