"""Run the app with `flwr run` on a managed local SuperLink, check it, and always clean up.

`flwr run .` with no SuperLink configured starts a *managed local SuperLink*: a detached
`flower-superlink` (its own session) that outlives `flwr run`, with `flower-superexec` (another
detached session), `flwr-simulation` and Ray (gcs_server, raylet, actors) below it. Ray actors can
be orphaned to PID 1 but keep their process group. So stopping means: find the SuperLink by its
FLWR_HOME paths, take it, its descendants and every process in their process groups, SIGTERM,
wait, SIGKILL what is left, and check again. `scripts/run.sh` and `tests/test_flwr_run.py` both
go through this file, so there is one implementation of start, check and stop.

    python scripts/flwr_local.py run --output-dir DIR [--num-supernodes N] [-- FLWR_RUN_ARGS...]
    python scripts/flwr_local.py stop            # stops the SuperLink of $FLWR_HOME (~/.flwr)

The caller sets FLWR_HOME (absolute) and may set FLWR_LOCAL_SUPERLINK_HTTP_API_PORT /
FLWR_LOCAL_CONTROL_API_PORT so the run never talks to someone else's SuperLink.
Linux and macOS (`ps`); `--stream` exits 0 even when the run fails, so success is checked here.

Every `--run-config` given (a preset `.toml` file or "key=value" items, merged in order, later
ones win) is read here and checked before anything starts: a key the app does not have is named
with its close matches, and the values go through `RunConfig` as the ServerApp will read them.
`flwr run` then gets one TOML file with all of them (it refuses a `.toml` next to key=value
items, and names no key it rejects: "[code: 15] Invalid run configuration."). Ray starts a
cluster of its own unless RAY_ADDRESS names one: without it, `ray.init()` would join whatever
`ray start` cluster ran last on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gaisnet_flwr.apps.failed import clear_failed, mark_failed
from gaisnet_flwr.config import unknown_names
from gaisnet_flwr.experiments.provenance import Provenance

# Process names the managed SuperLink may leave behind (for reporting and for the tests).
FLOWER_AND_RAY = (
    "flower-superlink",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-simulation",
    "flwr-clientapp",
    "raylet",
    "gcs_server",
    "ray::",
)
DEFAULT_PORTS = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": 39091, "FLWR_LOCAL_CONTROL_API_PORT": 39093}


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    stat: str
    args: str

    @property
    def alive(self) -> bool:
        return not self.stat.startswith("Z")  # a zombie has exited; nobody may reap it here


def processes() -> dict[int, Proc]:
    out = subprocess.run(
        ["ps", "-A", "-ww", "-o", "pid=,ppid=,pgid=,stat=,args="],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) >= 4:
            pid, ppid, pgid = (int(p) for p in parts[:3])
            table[pid] = Proc(pid, ppid, pgid, parts[3], parts[4] if len(parts) > 4 else "")
    return table


def flwr_home() -> Path:
    """$FLWR_HOME, or Flower's own default ~/.flwr (where a plain `flwr run .` keeps its
    managed SuperLink)."""
    home = os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
    if not os.path.isabs(home):
        sys.exit(f"error: FLWR_HOME must be an absolute path, got {home!r}")
    return Path(home)


def family(seeds: set[int], groups: set[int] | None = None) -> list[Proc]:
    """`seeds`, their descendants and every process in their process groups (plus the `groups`
    given: orphans stay in theirs after their parents are gone)."""
    table = processes()
    members = {pid for pid in seeds if pid in table}
    groups = set(groups or ())
    while True:  # grow to a fixpoint: members' children and members' process groups
        groups |= {table[pid].pgid for pid in members}
        groups.discard(os.getpgrp())  # never signal our own group (this script and its caller)
        grown = members | {p.pid for p in table.values() if p.ppid in members or p.pgid in groups}
        if grown == members:
            break
        members = grown
    mine = {os.getpid(), os.getppid()}
    return [table[pid] for pid in sorted(members) if pid not in mine]


def superlink_family(home: Path, groups: set[int] | None = None) -> list[Proc]:
    """The managed SuperLink of `home` and everything it started (see `family`)."""
    # Flower passes `--log-file $FLWR_HOME/local-superlink/superlink.log` (and `--database` there).
    marker = f"{home}/local-superlink/"
    seeds = {
        p.pid for p in processes().values() if "flower-superlink" in p.args and marker in p.args
    }
    return family(seeds, groups)


def stop_family(
    find: Callable[[set[int]], list[Proc]], what: str, timeout_s: float = 20.0
) -> list[Proc]:
    """Stop the processes `find(groups)` returns; return what was stopped.

    SIGTERM first (Flower and Ray shut down their children), SIGKILL after `timeout_s`.
    Raises RuntimeError naming the survivors if anything is still alive after that.
    """
    stopped: dict[int, Proc] = {}
    groups: set[int] = set()  # remembered: once a parent is gone, orphans are found by group
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait_s
        signalled: set[int] = set()
        while time.monotonic() < deadline:
            # Re-scan every time: a dying parent may still spawn or orphan children.
            live = [p for p in find(groups) if p.alive]
            if not live:
                return list(stopped.values())
            groups |= {p.pgid for p in live}
            for p in live:
                if p.pid not in signalled:
                    signalled.add(p.pid)
                    stopped.setdefault(p.pid, p)
                    with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                        os.kill(p.pid, sig)
            time.sleep(0.25)
    survivors = [p for p in find(groups) if p.alive]
    if not survivors:
        return list(stopped.values())
    raise RuntimeError(
        f"could not stop {what}: " + "; ".join(f"{p.pid} {p.args[:80]}" for p in survivors)
    )


def stop_local_superlink(home: Path, timeout_s: float = 20.0) -> list[Proc]:
    """Stop the managed SuperLink of `home` and everything it started."""
    return stop_family(
        lambda groups: superlink_family(home, groups),
        "the managed SuperLink's processes",
        timeout_s,
    )


def stop_processes(
    pids: set[int], timeout_s: float = 20.0, groups: set[int] | None = None
) -> list[Proc]:
    """Stop processes we started (by PID) with everything they started (and whatever is left
    in `groups`: process groups we made, whose leader may be gone)."""
    # Children that outlive a parent are found by the process groups seen before it died.
    seen = family(pids, groups)
    seeds = set(pids) | {p.pid for p in seen}
    return stop_family(
        lambda found: family(seeds, found | set(groups or ())), "the lab's processes", timeout_s
    )


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free right now (the OS picks them; all held until all are
    picked, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def private_env(home: Path) -> dict[str, str]:
    """This process's environment for a `flwr run` on a managed SuperLink of its own: FLWR_HOME
    `home`, free ports, this environment's Flower first on PATH, no runtime environment built,
    no telemetry, and a Ray of its own unless RAY_ADDRESS names a cluster (`ray.init()` would
    join the newest `ray start` cluster on the machine)."""
    bindir = Path(sys.executable).parent
    ports = free_ports(2)
    return {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
        "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1]),
        "RAY_ADDRESS": os.environ.get("RAY_ADDRESS") or "local",
    }


def check_flower_install(flower_dir: str | None = None) -> None:
    """Flower 1.42's SuperLink cannot create its database when Flower is installed under a path
    with a space: it hands alembic its migration folders as one space-separated string
    (flwr/supercore/state/alembic/utils.py), none is found, and `flwr run` fails with "no such
    table: fab". Refused (ValueError) before any process starts, with the way out."""
    if flower_dir is None:
        spec = importlib.util.find_spec("flwr")  # found, not imported
        flower_dir = str(Path(spec.origin).parent) if spec and spec.origin else ""
    if any(ch.isspace() for ch in flower_dir):
        raise ValueError(
            f"Flower is installed under {flower_dir!r}, a path with a space: Flower 1.42's "
            "SuperLink cannot start from there (its database migrations are not found: 'no such "
            "table: fab'). Install into an environment whose path has no spaces (scripts/run.sh "
            "does: GAISNET_VENV_DIR picks its place)"
        )


def check_ports_free(ports: list[int]) -> None:
    """Fail early if a port is taken: `flwr run` would silently use whatever SuperLink is there."""
    for port in ports:
        with socket.socket() as s:
            # SO_REUSEADDR: only a live listener counts, not the last run's TIME_WAIT sockets.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                sys.exit(
                    f"error: port {port} on 127.0.0.1 is in use (another Flower SuperLink?). "
                    f"Pick free ports with FLWR_LOCAL_SUPERLINK_HTTP_API_PORT and "
                    f"FLWR_LOCAL_CONTROL_API_PORT."
                )


def run_status(
    flwr: Path, run_id: str, env: dict[str, str] | None = None, superlink: str = ""
) -> str:
    """The run's status from the SuperLink (`finished:completed` on success); `superlink`: the
    `[superlink.<name>]` to ask (default: the config's default)."""
    res = subprocess.run(
        [
            str(flwr),
            "ls",
            *([superlink] if superlink else []),
            "--run-id",
            run_id,
            "--format",
            "json",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    try:
        runs = json.loads(res.stdout).get("runs", [])
    except json.JSONDecodeError:
        return f"unknown (flwr ls said: {(res.stdout + res.stderr).strip()[-300:]})"
    return str(runs[0].get("status", "unknown")) if runs else "unknown (run not listed)"


def final_results(final: str | None) -> Path | None:
    """The results folder a FINAL line names: `results in PATH`, PATH shell-quoted when it has
    spaces (what follows it is not read: only the first word is split off)."""
    _, found, rest = (final or "").partition("results in ")
    words = shlex.shlex(rest, posix=True)
    words.whitespace_split = True
    path = words.get_token() if found else None
    return Path(path) if path else None


@dataclass
class RunOutcome:
    """What one `flwr run --stream` did, and what is wrong with it (empty: it really finished)."""

    rc: int
    run_id: str | None
    status: str
    final: str | None  # the ServerApp's FINAL line
    results: Path
    log: Path
    problems: list[str] = field(default_factory=list)
    failure: str | None = None  # the ServerApp's own "RUN FAILED: ..." reason, if it logged one

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def why(self) -> str:
        """Why the run failed, in one line (the ServerApp's reason first)."""
        return "; ".join(self.problems)

    @property
    def cluster_failures(self) -> str:
        """What the FINAL line says about failed clusters: "every cluster trained every round",
        "3 cluster failure(s) in 2 round(s)", or "cluster failures: not reported" (a FINAL line
        without the count, e.g. the integrated service's, or none at all)."""
        found = re.search(r"(\d+) cluster failure\(s\) in (\d+) round\(s\)", self.final or "")
        if found is None:
            return "cluster failures: not reported"
        if found.group(1) == "0":
            return "every cluster trained every round"
        return found.group(0)

    def check(
        self,
        flwr: Path,
        default_results: Path,
        env: dict[str, str] | None = None,
        superlink: str = "",
    ) -> None:
        """`flwr run --stream` exits 0 even when the run failed, so ask the SuperLink
        (`superlink`, by its config name) for the run's status and check what the run left
        behind. The FINAL line names the results directory (an extra --run-config may have
        moved it)."""
        if self.run_id is not None:
            self.status = run_status(flwr, self.run_id, env=env, superlink=superlink)
        self.results = final_results(self.final) or default_results
        if self.failure is not None:
            self.problems.append(f"the ServerApp failed: {self.failure}")
        if self.rc != 0:
            self.problems.append(f"`flwr run` exited with {self.rc}")
        if self.run_id is None:
            self.problems.append("no run was started")
        elif self.status != "finished:completed":
            self.problems.append(
                f"run {self.run_id} status is {self.status!r}, not 'finished:completed'"
            )
        if self.final is None:
            self.problems.append("the ServerApp logged no 'FINAL:' line")
        elif not any((self.results / n).is_file() for n in ("metrics.json", "integrated.json")):
            self.problems.append(f"no metrics.json (or integrated.json) in {self.results}")


# The lines of a run's stream that say how far it got (`progress` of `stream_run`): the run
# accepted, the ServerApp's preparation done, each round's one-line summary, the end.
PROGRESS = re.compile(r"Successfully started run|GaisNet HFSL:|\[round \d+/\d+\]|FINAL:|RUN FAILED")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def progress_text(line: str) -> str | None:
    """A stream line as a progress line (without colours and Flower's level prefix), or None
    when it is not one (`PROGRESS`)."""
    if not PROGRESS.search(line):
        return None
    text = ANSI.sub("", line).strip()
    return re.sub(r"^(INFO|WARNING|ERROR|DEBUG)\s*:\s*", "", text)


def stream_run(
    cmd: list[str],
    log_path: Path,
    echo: bool,
    env: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    append: bool = False,
) -> RunOutcome:
    """Run `flwr run ... --stream`, tee its output to `log_path` (and stdout if `echo`), and
    pick the run id and the FINAL line out of it. Without `echo`, `progress` gets the lines
    that say how far the run got (`progress_text`). With `append` (a resumed run) the log
    goes on after the earlier run's."""
    run_id, final, failure = None, None, None
    with (
        log_path.open("a" if append else "w") as log,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            if echo:
                sys.stdout.write(line)
            elif progress is not None and (text := progress_text(line)) is not None:
                progress(text)
            log.write(line)
            if m := re.search(r"Successfully started run (\d+)", line):
                run_id = m.group(1)
            if "FINAL:" in line:
                final = line[line.index("FINAL:") :].strip()
            if failure is None and "RUN FAILED: " in line:
                failure = line[line.index("RUN FAILED: ") + len("RUN FAILED: ") :].strip()
        rc = proc.wait()
    return RunOutcome(rc, run_id, "not started", final, log_path.parent, log_path, failure=failure)


def check_client_gpus(gpus: float) -> None:
    """Ray's GPUs per ClientApp (`client-resources-num-gpus`): a fraction lets several
    clusters share one GPU (0.25: four ClientApps per GPU, each with its own CUDA context),
    a whole number gives each that many GPUs. Asking for GPUs that are not there would leave
    Ray waiting for them forever: refuse it before anything starts."""
    if not (math.isfinite(gpus) and gpus >= 0):
        raise ValueError(f"--client-gpus {gpus} must be a finite number >= 0")
    if gpus > 1 and not gpus.is_integer():
        raise ValueError(
            f"--client-gpus {gpus}: Ray takes a fraction of one GPU (<= 1) or whole GPUs"
        )
    if gpus > 0:
        import torch  # only here: the stop command needs no torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"--client-gpus {gpus} (GAISNET_CLIENT_GPUS) but no CUDA GPU is available "
                f"here (torch {torch.__version__}); use 0"
            )
        if gpus > torch.cuda.device_count():
            raise ValueError(
                f"--client-gpus {gpus}: this machine has {torch.cuda.device_count()} GPU(s)"
            )


def federation_config(
    num_supernodes: int,
    cpus: float,
    gpus: float,
    cores: int | None = None,
    ray_address: str | None = None,
) -> str:
    """`--federation-config` for N simulated SuperNodes with `cpus` CPUs per ClientApp.

    Flower 1.42 carries `client-resources-num-cpus` as a whole number (a uint32 in its
    SimulationConfig), so `client-resources-num-cpus=0.5` fails in `flwr run` itself ("'float'
    object cannot be interpreted as an integer"). What 0.5 means, two ClientApps per core, is
    said another way: each ClientApp takes 1 of Ray's CPUs and Ray is told of cores / cpus CPUs
    (`init-args-num-cpus`). Ray may not be told its CPUs when it joins an existing cluster
    (RAY_ADDRESS): there, start each node with `ray start --num-cpus=...` instead."""
    if not cpus > 0:
        raise ValueError(f"client-cpus={cpus} must be > 0 (e.g. 1, 2 or 0.5)")
    base = f"num-supernodes={num_supernodes}"
    if float(cpus).is_integer():
        return f"{base} client-resources-num-cpus={int(cpus)} client-resources-num-gpus={gpus}"
    if ray_address:
        raise ValueError(
            f"client-cpus={cpus} is fractional, which Flower cannot pass on, and RAY_ADDRESS="
            f"{ray_address} joins an existing Ray cluster, whose CPUs the run may not change: "
            f"give whole CPUs, or start the Ray nodes with `ray start --num-cpus=<{1 / cpus:g} x "
            f"their cores>` and use client-cpus=1"
        )
    ray_cpus = max(1, int((cores or os.cpu_count() or 1) / cpus))
    return (
        f"{base} client-resources-num-cpus=1 client-resources-num-gpus={gpus} "
        f"init-args-num-cpus={ray_cpus}"
    )


class RunConfigError(ValueError):
    """A `--run-config` that `flwr run` would refuse or the ServerApp would fail on."""


def split_run_config(args: list[str]) -> tuple[list[str], list[str]]:
    """The values of every `--run-config` / `-c` among `flwr run` arguments, and the rest."""
    values: list[str] = []
    rest: list[str] = []
    items = iter(args)
    for arg in items:
        if arg in ("--run-config", "-c"):
            value = next(items, None)
            if value is None:
                raise RunConfigError(f'{arg} needs a value: "key=value ..." or a .toml file')
            values.append(value)
        elif arg.startswith("--run-config="):
            values.append(arg.partition("=")[2])
        else:
            rest.append(arg)
    return values, rest


# Flower's own pattern for key=value items (flwr.common.config.parse_config_args).
_ITEM = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def read_run_config(values: list[str]) -> dict[str, Any]:
    """The overrides of `--run-config` values, merged in order: each a `.toml` file of flat
    `key = value` lines (as `flwr run` reads one) or "key=value" items with TOML values."""
    merged: dict[str, Any] = {}
    for value in values:
        text = value.strip()
        if text.endswith(".toml") and "=" not in text:
            try:
                with Path(text).expanduser().open("rb") as file:
                    table = tomllib.load(file)
            except (OSError, tomllib.TOMLDecodeError) as err:
                raise RunConfigError(f"cannot read run-config file {text!r}: {err}") from err
            nested = [k for k, v in table.items() if isinstance(v, dict)]
            if nested:
                raise RunConfigError(
                    f"{text}: tables {nested} are not run-config keys; give flat key = value lines"
                )
            merged.update(table)
            continue
        leftover = _ITEM.sub(" ", text).split()
        if leftover:
            raise RunConfigError(
                f"cannot read {' '.join(leftover)!r} in --run-config {value!r}: give key=value "
                "items (e.g. \"num-rounds=3 mode='vpt-shallow'\") or the path of a .toml file"
            )
        for key, raw in _ITEM.findall(text):
            try:
                merged.update(tomllib.loads(f"{json.dumps(key)} = {raw}"))
            except tomllib.TOMLDecodeError as err:
                raise RunConfigError(
                    f"--run-config {key}={raw}: not a TOML value ({err}); strings need quotes, "
                    f"e.g. {key}='{raw}'"
                ) from err
    return merged


def app_run_config(app: Path) -> dict[str, Any]:
    """The app's run-config keys and defaults: `[tool.flwr.app.config]` of its pyproject.toml
    (what Flower checks `--run-config` keys against)."""
    with (app / "pyproject.toml").open("rb") as file:
        config = tomllib.load(file)["tool"]["flwr"]["app"]["config"]
    return dict(config)


def check_keys(app: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Refuse keys the app does not have (Flower would, naming none), with their close matches;
    return the app's defaults."""
    defaults = app_run_config(app)
    unknown = [key for key in overrides if key not in defaults]
    if unknown:
        raise RunConfigError(unknown_names("run-config key", unknown, defaults))
    return defaults


def check_run_config(
    app: Path, overrides: dict[str, Any], num_supernodes: int | None = None
) -> None:
    """Refuse what the run would fail on, before any SuperLink, Ray or model: unknown keys (with
    their close matches; no torch imported for that), then the values, checked as the ServerApp
    checks them first (`apps.server_app.check_run_config`: the config, what it derives and the
    strategy), and, given `num_supernodes`, what its preparation refuses once that many
    simulated nodes answer (their clusters, the strategy's counts, the data for them)."""
    defaults = check_keys(app, overrides)
    # torch, timm and the strategies: only from here
    from gaisnet_flwr.apps.server_app import check_run_config as server_app_check
    from gaisnet_flwr.apps.server_app import check_simulation
    from gaisnet_flwr.apps.tracking import check_mlflow
    from gaisnet_flwr.config import ConfigError

    try:
        cfg, derived = server_app_check({**defaults, **overrides})
        check_mlflow(cfg.run.mlflow_tracking_uri)  # the ServerApp's next check
        if num_supernodes is not None:
            check_simulation(derived, num_supernodes)
    except (ConfigError, RuntimeError) as err:
        raise RunConfigError(str(err)) from err


def write_run_config(overrides: dict[str, Any], directory: Path) -> Path:
    """`overrides` as one TOML file for `flwr run --run-config FILE`."""
    import tomli_w  # a dependency of flwr

    file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - the caller deletes it after the run
        "wb", suffix=".toml", prefix="run-config-", dir=directory, delete=False
    )
    with file:
        tomli_w.dump(overrides, file)
    return Path(file.name)


def run(
    app: Path,
    output_dir: Path,
    num_supernodes: int,
    cpus: float,
    gpus: float,
    extra: list[str],
    check: bool = True,
) -> int:
    home = flwr_home()
    ports = [int(os.environ.get(k, v)) for k, v in DEFAULT_PORTS.items()]
    bindir = Path(sys.executable).parent
    flwr = bindir / "flwr"
    # Flower launches `flower-superlink` by name: make sure it is this environment's.
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"

    try:
        joins = os.environ.get("RAY_ADDRESS", "local") not in ("", "local")
        federation = federation_config(
            num_supernodes, cpus, gpus, ray_address=os.environ["RAY_ADDRESS"] if joins else None
        )
        check_flower_install()
        values, extra = split_run_config(extra)
        overrides = {"output-dir": str(output_dir), **read_run_config(values)}
        if check:
            check_run_config(app, overrides, num_supernodes)
        else:
            check_keys(app, overrides)
    except ValueError as err:
        sys.exit(f"error: {err}")
    # Our own Ray: without RAY_ADDRESS, ray.init() joins the newest `ray start` cluster here.
    os.environ["RAY_ADDRESS"] = os.environ.get("RAY_ADDRESS") or "local"
    # The app runs in this environment: no second one built at run time (`uv sync`, GBs).
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    stale = stop_local_superlink(home)  # a SuperLink left by a killed run would be reused
    if stale:
        print(f"[flwr_local] stopped a stale SuperLink of {home} ({len(stale)} processes)")
    check_ports_free(ports)
    output_dir = Path(overrides["output-dir"]).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    clear_failed(output_dir)  # an earlier run's marker; this run's outcome decides
    log_path = output_dir / "run.log"
    home.mkdir(parents=True, exist_ok=True)
    run_config = write_run_config({**overrides, "output-dir": str(output_dir)}, home)
    cmd = [
        str(flwr), "run", str(app), "--stream",
        "--federation-config", federation,
        "--run-config", str(run_config),
        *extra,
    ]  # fmt: skip
    print(f"[flwr_local] {' '.join(cmd)}\n[flwr_local] log: {log_path}", flush=True)
    started = time.monotonic()
    # What made the results (commit, packages, CPU, threads, load), written beside them.
    record = Provenance.start(
        "flwr " + shlex.join(cmd[1:]).replace(str(run_config), "RUN_CONFIG"), app
    )
    record.run_config = {**overrides, "output-dir": str(output_dir)}
    try:
        resumed = overrides.get("resume") is True  # run.log goes on after the stopped run's
        outcome = stream_run(cmd, log_path, echo=True, append=resumed)
        outcome.check(flwr, default_results=output_dir)  # asks the SuperLink: before stopping it
    finally:
        run_config.unlink(missing_ok=True)
        stopped = stop_local_superlink(home)
        print(f"[flwr_local] stopped the local SuperLink ({len(stopped)} processes)")
        record.write(output_dir)
    problems, run_id, final = outcome.problems, outcome.run_id, outcome.final
    elapsed = time.monotonic() - started
    if problems:
        logs = f"See {log_path} and {home}/local-superlink/superlink.log"
        mark_failed(output_dir, f"{outcome.why}. {logs}")  # replaces the ServerApp's: says more
        print(
            f"[flwr_local] RUN FAILED after {elapsed:.0f} s: {outcome.why}. {logs}", file=sys.stderr
        )
        return 1
    print(
        f"[flwr_local] run {run_id} completed in {elapsed:.0f} s "
        f"({outcome.cluster_failures})\n{final}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="flwr run the app, check it, stop the SuperLink")
    p_run.add_argument("--app", type=Path, default=Path("."))
    p_run.add_argument("--output-dir", type=Path, required=True)
    p_run.add_argument("--num-supernodes", type=int, default=4)
    # Flower takes whole CPUs; a fraction (0.5: two ClientApps per core) goes through Ray's CPU
    # count instead (see federation_config)
    p_run.add_argument("--client-cpus", type=float, default=1)
    p_run.add_argument("--client-gpus", type=float, default=0.0)
    p_run.add_argument(
        "--no-check",
        action="store_true",
        help="leave the run-config's values to the ServerApp (which refuses bad ones as the run's "
        "failure) instead of checking them before anything starts; unknown keys are refused "
        "either way",
    )
    p_run.add_argument("extra", nargs="*", help="more `flwr run` arguments (after --)")
    sub.add_parser("stop", help="stop the managed SuperLink of $FLWR_HOME and its children")
    args = parser.parse_args(argv)

    # SIGTERM (CI timeouts, `kill`) must run the cleanup in `finally` like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.command == "stop":
        try:
            stopped = stop_local_superlink(flwr_home())
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        for p in stopped:
            print(f"[flwr_local] stopped {p.pid} {p.args[:100]}")
        return 0
    try:
        check_client_gpus(args.client_gpus)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return run(
            args.app.resolve(),
            args.output_dir.resolve(),
            args.num_supernodes,
            args.client_cpus,
            args.client_gpus,
            args.extra,
            check=not args.no_check,
        )
    except KeyboardInterrupt:  # the SuperLink was stopped on the way out
        print("[flwr_local] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
