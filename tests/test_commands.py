"""Every console command in pyproject's [project.scripts] answers --help with its options.

In process (`main(["--help"])`, each module imported once: seconds for all of them), plus one
installed script run for real, so the wrapper pip generates is exercised too.
"""

from __future__ import annotations

import importlib
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import python_json

REPO = Path(__file__).resolve().parents[1]
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_commands_users_run_are_there() -> None:
    wanted = {"gaisnet-lab", "gaisnet-section5", "gaisnet-fig6", "gaisnet-bench-chain"}
    wanted |= {"gaisnet-bench-round", "gaisnet-bench-network", "gaisnet-cost-report"}
    wanted |= {"gaisnet-centralised", "gaisnet-peer", "gaisnet-bench-scale"}
    assert wanted <= set(SCRIPTS)
    # scripts/ keeps a thin wrapper of each experiment command (and the shell entry points)
    for target in SCRIPTS.values():
        module = target.split(":")[0]
        if module.startswith("gaisnet_flwr.experiments."):
            assert (REPO / "scripts" / f"{module.rsplit('.', 1)[1]}.py").is_file(), module


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_lists_the_options(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module, function = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out and "options:" in out, out[:300]


def test_an_installed_command_runs() -> None:
    exe = shutil.which("gaisnet-table5", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the package is not installed into this interpreter's environment")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "--run-config" in out.stdout


# Each command's --help in a fresh interpreter: argparse answers before torch, timm or
# matplotlib is imported (they are imported by the functions that do the work), so --help is
# instant (0.1-1.5 s each on 2 loaded cores, load 7-8; it took 7-30 s with torch first). What
# the test asserts is what makes it fast: nothing heavy imported. The timeout is generous.
HEAVY_FOR_HELP = ("torch", "timm", "matplotlib", "flwr_datasets", "datasets", "ray", "scipy")
HELP_SCRIPT = """
import contextlib, importlib, io, json, sys, time
started = time.perf_counter()
module, function = sys.argv[1].split(":")
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        getattr(importlib.import_module(module), function)(["--help"])
    except SystemExit as exit:
        code = exit.code
heavy = sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)
print(json.dumps({"code": code, "out": out.getvalue(), "heavy": heavy,
                  "seconds": time.perf_counter() - started}))
"""


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_imports_nothing_heavy(name: str) -> None:
    got = python_json(HELP_SCRIPT, SCRIPTS[name], json.dumps(HEAVY_FOR_HELP))
    assert got["code"] == 0 and got["out"].startswith("usage:"), got["out"][:300]
    assert got["heavy"] == [], f"{name} --help imported {got['heavy']}"
    # The target is 2 s; 10 s is generous on a loaded machine and still well below
    # what importing torch first costs there (7-30 s).
    assert got["seconds"] < 10, f"{name} --help took {got['seconds']:.1f} s"


def test_an_environment_path_with_a_space_is_avoided_or_refused_before_any_install(
    tmp_path: Path,
) -> None:
    """Flower 1.42's SuperLink fails ('no such table: fab') when it is installed under a path with
    a space: a checkout named with spaces gets an environment named without; a home with a space
    is refused with the way out, before anything is created."""
    checkout = tmp_path / "my gaisnet (2)"
    checkout.mkdir()

    def ensure(home: Path) -> subprocess.CompletedProcess[str]:
        cmd = f"source {shlex.quote(str(REPO / 'scripts/_venv.sh'))} && venv_home && ensure_venv ''"
        env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
        return subprocess.run(["bash", "-c", cmd], cwd=checkout, env=env, capture_output=True,
                              text=True)  # fmt: skip

    refused = ensure(tmp_path / "Jane Doe")
    assert refused.returncode == 1, refused.stderr
    place = refused.stdout.strip()
    assert place.startswith(f"{tmp_path}/Jane Doe/.cache/gaisnet-flwr/venvs/my-gaisnet--2--")
    assert "a path with a space" in refused.stderr and "GAISNET_VENV_DIR" in refused.stderr
    assert not (tmp_path / "Jane Doe").exists() and not (checkout / ".venv").exists()


def test_the_environment_lives_outside_the_app_folder(tmp_path: Path) -> None:
    """scripts/_venv.sh puts the environment outside the checkout, `.venv` a link to it, because
    `flwr run .` walks every file of the app folder but never enters a symlinked folder."""
    from flwr.cli.utils import collect_files

    def home(env: dict[str, str]) -> str:
        cmd = f"source {shlex.quote(str(REPO / 'scripts/_venv.sh'))} && venv_home"
        done = subprocess.run(
            ["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    place = Path(home({"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}))
    assert place.is_relative_to(tmp_path / "home" / ".cache" / "gaisnet-flwr")
    assert place.name.startswith(f"{tmp_path.name}-")
    # Without GNU's sha256sum (macOS has shasum): the same place.
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "tr", "cut", "basename", "shasum", "perl"):
        if found := shutil.which(tool):
            (tools / tool).symlink_to(found)
    if (tools / "shasum").exists():
        assert home({"HOME": str(tmp_path / "home"), "PATH": str(tools)}) == str(place)
    assert home({"GAISNET_VENV_DIR": "/elsewhere/env", "PATH": "/usr/bin:/bin"}) == "/elsewhere/env"

    (tmp_path / "env" / "lib").mkdir(parents=True)
    (tmp_path / "env" / "lib" / "big.py").write_text("")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "pyproject.toml").write_text("")
    (tmp_path / "app" / ".venv").symlink_to(tmp_path / "env")
    assert set(collect_files(tmp_path / "app")) == {"pyproject.toml"}  # Flower 1.42's walk
