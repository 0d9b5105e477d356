"""What made a result: the command, the commit, the packages, the CPU, the threads and the load.

A figure in README or docs comes from a committed output; `provenance.json` beside it says
where and how it was made, because that is what the figure holds for: the foundation's bytes
and so every accuracy depend on the CPU (the kernels MKL and oneDNN choose for its instruction
sets: docs/reproducibility.md), and every time on the load.

    record = Provenance.start("bash scripts/run.sh", repo)   # load average before
    ...                                                      # the work
    record.write(folder)                                     # load after, wall time
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PACKAGES = (
    "torch", "torchvision", "timm", "flwr", "ray", "numpy", "scikit-learn", "pillow",
)  # fmt: skip
# The instruction sets that decide which kernels MKL (matmuls) and oneDNN (convolutions) run,
# and so the last bits of every float result on a CPU.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16")
# Environment variables that choose those kernels or the threads (recorded when set).
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_", "ONEDNN_", "DNNL_", "OMP_", "KMP_", "CUDA_VISIBLE")
FILE = "provenance.json"


def cpu() -> dict[str, Any]:
    """The CPU's model name, its family/model/stepping (a hypervisor may hide the name) and
    the instruction sets among CPU_FLAGS (Linux; elsewhere the platform's processor string)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {"model": platform.processor() or platform.machine(), "flags": []}
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    ident = "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return {
        "model": fields.get("model name", ""),
        "family/model/stepping": ident,
        "flags": [f for f in CPU_FLAGS if f in flags],
    }


def commit(repo: Path) -> str:
    """The checkout's commit, `+changes` when tracked files differ from it ("" outside git)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{head}+changes" if changed else head


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


@dataclass
class Provenance:
    command: str
    commit: str
    started_utc: str
    python: str
    packages: dict[str, str]
    cpu: dict[str, Any]
    cores: int
    # torch's intra-op threads here, and OMP_NUM_THREADS as the processes started from here see
    # it (Ray gives each ClientApp actor its num_cpus; the cloud pre-trains at 1 thread)
    torch_threads: int | None
    omp_num_threads: str
    kernel_env: dict[str, str]
    load_average_start: list[float]
    load_average_end: list[float] = field(default_factory=list)
    run_config: dict[str, Any] = field(default_factory=dict)  # the overrides given, if any
    wall_s: float = 0.0
    _started: float = field(default=0.0, repr=False)

    @classmethod
    def start(cls, command: str, repo: Path) -> Provenance:
        try:
            import torch

            threads: int | None = torch.get_num_threads()
        except ImportError:
            threads = None
        return cls(
            command=command,
            commit=commit(repo),
            started_utc=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            python=platform.python_version(),
            packages=versions(),
            cpu=cpu(),
            cores=os.cpu_count() or 0,
            torch_threads=threads,
            omp_num_threads=os.environ.get("OMP_NUM_THREADS", ""),
            kernel_env={k: v for k, v in os.environ.items() if k.startswith(KERNEL_ENV)},
            load_average_start=[round(x, 2) for x in os.getloadavg()],
            _started=time.monotonic(),
        )

    def write_beside(self, out: Path, data: Any) -> None:
        """A benchmark's figures: `data` as JSON in `out`, this record beside it
        (`out`'s folder/provenance.json), and a line saying so."""
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {out} and {self.write(out.parent)}")

    def write(self, folder: Path) -> Path:
        """Finish the record (load now, wall time) and write it as `folder/provenance.json`."""
        self.load_average_end = [round(x, 2) for x in os.getloadavg()]
        self.wall_s = round(time.monotonic() - self._started, 1)
        record = {k.replace("_", "-"): v for k, v in asdict(self).items() if k != "_started"}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / FILE
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path
