"""scripts/bench_server_threads.py: the ServerApp's evaluation at 1 thread vs all cores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from gaisnet_flwr.experiments import bench_server_threads


def test_it_times_the_servers_evaluation_at_both_counts_and_restores_torchs_threads(
    tmp_path: Path,
) -> None:
    before = torch.get_num_threads()
    out = tmp_path / "threads" / "bench.json"
    assert bench_server_threads.main(["--models", "tiny default", "--repeats", "2",
                                      "--out", str(out)]) == 0  # fmt: skip
    row = json.loads(out.read_text())["tiny default"]
    assert row["images"] == 400  # the whole test set of the embedded default
    assert row["threads"] == {"1 thread": 1, "all cores": before}
    assert all(len(t) == 2 and min(t) > 0 for t in row["seconds"].values())
    assert row["same accuracy"] is True
    assert (out.parent / "provenance.json").is_file()
    assert torch.get_num_threads() == before


def test_an_unknown_model_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench_server_threads.main(["--models", "vit-huge"])
    assert exit_.value.code == 2
    assert "unknown ['vit-huge']; choose from tiny default, ViT-S/16, ViT-B/16" in (
        capsys.readouterr().err
    )


def test_busy_processes_run_while_it_times_and_are_stopped_after(tmp_path: Path) -> None:
    import multiprocessing

    out = tmp_path / "bench.json"
    args = ["--models", "tiny default", "--repeats", "1", "--busy", "1", "--out", str(out)]
    assert bench_server_threads.main(args) == 0
    assert json.loads(out.read_text())["tiny default"]["busy processes"] == 1
    assert multiprocessing.active_children() == []  # the spinner was stopped


def test_busy_spinners_keep_a_core_busy_inside_the_block() -> None:
    import multiprocessing
    import time

    with bench_server_threads.busy_cores(1):
        (child,) = multiprocessing.active_children()
        stat = Path(f"/proc/{child.pid}/stat")
        deadline, cpu = time.monotonic() + 60, 0.0  # generous: a loaded machine shares the core
        while stat.exists() and cpu < 0.2 and time.monotonic() < deadline:
            time.sleep(0.1)  # Linux: the spinner's own CPU time (utime, in clock ticks)
            cpu = int(stat.read_text().rsplit(")", 1)[1].split()[11]) / os.sysconf("SC_CLK_TCK")
        assert child.is_alive() and (cpu >= 0.2 or not stat.exists())  # it computes
    assert not child.is_alive()
