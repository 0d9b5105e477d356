"""What one in-process HFSL round executes: the project files and distinct lines a newcomer reads.

One round of the embedded default (2 clusters, 1 round, no inference requests), the foundation
already made and the ClientApp's process cache warm (a first run in the same process), traced
with `sys.settrace` from the ServerApp's start to its end: every `call` and `line` event in a
file of `gaisnet_flwr/`, `strategies/` or `clients/`. The README states the figures this test
measures; run `python -m tests.test_round_trace` for the per-file table.

Before issue 30 (0074bbe) the same measure gave 31 files and 2,121 distinct lines (files of
8,346 lines).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gaisnet_flwr", "strategies", "clients")
MAX_FILES = 31
MAX_LINES = 2121

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def trace_round(tmp: Path) -> dict[Path, set[int]]:
    """{file: its executed line numbers} for one round (see the module docstring)."""
    from gaisnet_flwr.apps.inprocess import run_inprocess

    settings: dict[str, Any] = {
        "num-rounds": 1,
        "inference-requests": 0,
        "foundation-dir": str(tmp / "foundation"),
    }
    run_inprocess({**settings, "output-dir": str(tmp / "warm")}, 2)  # foundation, caches
    prefixes = tuple(f"{REPO / p}/" for p in PACKAGES)
    lines: set[tuple[str, int]] = set()

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line":
            lines.add((frame.f_code.co_filename, frame.f_lineno))
        return local

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        if not frame.f_code.co_filename.startswith(prefixes):
            return None
        lines.add((frame.f_code.co_filename, frame.f_lineno))
        return local

    previous = sys.gettrace()
    sys.settrace(calls)
    threading.settrace(calls)
    try:
        run_inprocess({**settings, "output-dir": str(tmp / "traced")}, 2)
    finally:
        sys.settrace(previous)
        threading.settrace(None)  # type: ignore[arg-type]
    per_file: dict[Path, set[int]] = {}
    for name, line in lines:
        per_file.setdefault(Path(name).relative_to(REPO), set()).add(line)
    return dict(sorted(per_file.items()))


def table(per_file: dict[Path, set[int]]) -> Iterator[str]:
    sizes = {f: len((REPO / f).read_text().splitlines()) for f in per_file}
    for f, executed in per_file.items():
        yield f"{len(executed):5d} of {sizes[f]:5d}  {f}"
    total, size = sum(len(e) for e in per_file.values()), sum(sizes.values())
    yield f"{len(per_file)} files, {total:,} distinct lines (files of {size:,} lines)"


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, set[int]]:
    return trace_round(tmp_path_factory.mktemp("trace"))


def test_one_round_reads_few_files_and_lines(traced: dict[Path, set[int]]) -> None:
    print("\n".join(table(traced)))
    lines = sum(len(e) for e in traced.values())
    assert len(traced) <= MAX_FILES, "\n".join(table(traced))
    assert lines <= MAX_LINES, "\n".join(table(traced))


if __name__ == "__main__":
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(table(trace_round(Path(tmp)))))
