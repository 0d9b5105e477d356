"""The Section V reproduction (scripts/section5.py and the scripts it runs).

Fast: the report helpers, presets and the command line's refusals of bad input (before any
work). Slow: the quick variant of the whole set, end to end in a subprocess, checked file by
file and number by number (only what holds robustly: ranges, exact scheduler profits, analytic
FLOPs, byte counts; no timing comparisons).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gaisnet_flwr.config import ConfigError, RunConfig
from gaisnet_flwr.derived import derive
from gaisnet_flwr.experiments.common import (
    cli,  # noqa: E402
    output,  # noqa: E402
    progress,  # noqa: E402
    stats,  # noqa: E402
)

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
PAPER_PRESET = REPO / "conf" / "paper-vitb16-flowers102.toml"

EXPECTED = {
    "fig6": ["fig6_pretraining.csv", "fig6_pretraining.png"],
    "fig7": [
        "fig7_frozen_vs_full.csv",
        "fig7_epoch_times.csv",
        "fig7_paper_scale.csv",
        "fig7_frozen_vs_full.png",
    ],
    "table3": ["table3_noniid.csv", "table3_noniid.png"],
    "table4": ["table4_clusters.csv", "table4_clusters.png"],
    "table5": ["table5_scheduling.csv", "table5_rs_seeds.csv", "fig8_cumulative_profit.png"],
    "comm": ["comm_per_round.csv", "peers_latency_energy.csv", "comm_and_peers.png"],
    "hfsl": ["hfsl_vs_central.csv", "cloud_edge.csv", "hfsl_vs_central.png"],
}
TITLES = (
    "Fig. 6",
    "Fig. 7",
    "Table III",
    "Table IV",
    "Table V and Fig. 8",
    "Beyond the paper",
    "HFSL vs centralised",
)
SEEDS = 2  # the slow test's seeds (the commands' default is 3)


# -- pure helpers ---------------------------------------------------------------------------------


def test_md_table_formats_floats_and_keeps_strings() -> None:
    table = output.md_table(["k", "acc", "note"], [[1, 0.123456, "x"], [2, float("nan"), None]])
    assert table.splitlines() == [
        "| k | acc | note |",
        "|---|---|---|",
        "| 1 | 0.1235 | x |",
        "| 2 | – | – |",
    ]


def test_md_table_rejects_a_ragged_row() -> None:
    with pytest.raises(ValueError, match="3 cells"):
        output.md_table(["a", "b", "c"], [[1, 2]])


def test_relative_links_prefix_local_files_only() -> None:
    text = "![F](f.png) [csv](a.csv) [web](https://x.org/a) [top](#fig-6) [abs](/etc/x)"
    assert output.relative_links(text, "fig6") == (
        "![F](fig6/f.png) [csv](fig6/a.csv) [web](https://x.org/a) [top](#fig-6) [abs](/etc/x)"
    )


def test_mean_sd_and_pm_over_seeds() -> None:
    assert stats.mean_sd([0.5]) == (0.5, 0.0)
    mean, sd = stats.mean_sd([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and sd == pytest.approx(0.1)
    assert stats.pm([0.1, 0.2, 0.3]) == "0.200 ± 0.100"
    assert stats.pm([0.1, 0.2, 0.3], 1, 100) == "20.0 ± 10.0"


@pytest.mark.parametrize(
    ("effects", "sign", "expected"),
    [
        ([0.10, 0.12, 0.11], +1, "agrees"),  # mean 0.11, sd 0.01: far beyond 2 sd
        ([0.10, 0.12, 0.11], -1, "differs"),
        ([0.05, -0.03, 0.01], +1, "within noise"),  # mean 0.01, sd 0.04
        ([0.02, 0.02, 0.02], +1, "agrees"),  # no spread at all: any effect counts
        ([0.0, 0.0, 0.0], +1, "within noise"),  # but no effect is none
    ],
)
def test_verdicts_need_an_effect_beyond_two_sd_of_the_seeds(
    effects: list[float], sign: int, expected: str
) -> None:
    assert stats.verdict(effects, sign) == expected


def test_seeds_count_from_the_run_configs_seed() -> None:
    class Args:
        seeds = 3

    assert cli.run_seeds(RunConfig.of(seed=5), Args()) == [5, 6, 7]  # type: ignore[arg-type]


@pytest.mark.slow
def test_an_experiment_reproduces_its_numbers_bit_for_bit(tmp_path: Path) -> None:
    """The same command twice: the same CSV, byte for byte (a tiny model, one epoch)."""
    from gaisnet_flwr.experiments import fig6_pretraining

    tiny = (
        "depth=2 embed-dim=32 num-heads=2 peers-per-cluster=2 img-size=16 pretrain-epochs=1 "
        f"foundation-dir='{tmp_path / 'fd'}'"
    )
    csvs = []
    for run in ("a", "b"):
        out = tmp_path / run
        fig6_pretraining.main(
            ["--epochs", "1", "--seeds", "2", "--out", str(out), "--run-config", tiny]
        )
        csvs.append((out / "fig6_pretraining.csv").read_bytes())
    assert csvs[0] == csvs[1]
    assert len(csvs[0].splitlines()) == 1 + 2 * 2  # header, 2 seeds x (start + epoch 1)


def test_with_defaults_applies_only_to_keys_the_user_did_not_set() -> None:
    class Args:
        set_keys = {"lr"}

    cfg = cli.with_defaults(RunConfig.of(lr=0.2), Args(), lr=0.01, batch_size=10)  # type: ignore[arg-type]
    assert (cfg.training.lr, cfg.training.batch_size) == (0.2, 10)


def test_progress_prints_elapsed_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress.Progress("x", 4)
    bar.step("epoch 1")
    line = capsys.readouterr().out
    assert re.fullmatch(r"\[x\] 1/4 epoch 1 \| \d+ s elapsed, ETA \d+ s\n", line)


def test_turns_alternate_steps_and_let_the_longer_job_finish() -> None:
    order: list[tuple[int, int]] = []
    turns = progress.Turns(2)

    def job(i: int) -> None:
        for step in range(3 if i == 0 else 1):
            order.append((i, step))
            turns.yield_turn(i)

    turns.run(job)
    assert order == [(0, 0), (1, 0), (0, 1), (0, 2)]


def test_turns_reraise_a_jobs_error_after_the_others_finish() -> None:
    finished = []
    turns = progress.Turns(2)

    def job(i: int) -> None:
        if i == 0:
            raise RuntimeError("boom")
        turns.yield_turn(i)
        finished.append(i)

    with pytest.raises(RuntimeError, match="boom"):
        turns.run(job)
    assert finished == [1]


# -- presets and bad input ------------------------------------------------------------------------


def test_paper_preset_is_the_papers_setting_and_validates(tmp_path: Path) -> None:
    values = cli.read_preset(PAPER_PRESET)
    (tmp_path / "flowers-102").mkdir()  # DataSpec only checks the folder exists and is not empty
    cfg = RunConfig.from_run_config({**values, "data-dir": str(tmp_path)})
    assert (cfg.model.model_name, cfg.model.img_size, cfg.model.patch_size) == (
        "vit_base_patch16_224",
        224,
        16,
    )
    assert (cfg.model.depth, cfg.model.embed_dim, cfg.model.num_heads) == (12, 768, 12)
    assert (cfg.cloud.foundation, cfg.data.dataset, cfg.training.lr, cfg.training.batch_size) == (
        "timm",
        "flowers102",
        1e-3,
        10,
    )
    assert cfg.data.val_fraction == pytest.approx(0.2)  # train:val 4:1


def test_paper_preset_without_the_data_names_data_dir() -> None:
    with pytest.raises(ConfigError, match="data-dir"):
        derive(RunConfig.from_run_config(cli.read_preset(PAPER_PRESET)))


def test_unknown_preset_names_the_presets_there_are(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="paper-vitb16-flowers102.toml"):
        cli.read_preset(tmp_path / "nope.toml")


def test_nested_preset_is_refused(tmp_path: Path) -> None:
    preset = tmp_path / "nested.toml"
    preset.write_text("[tool]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match="flat key = value"):
        cli.read_preset(preset)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--run-config", "no-such-key=1"], "unknown run-config key 'no-such-key'; valid"),
        (["--run-config", "mode='deep'"], "choose one of"),
        (["--preset", "conf/missing.toml"], "presets in this repository"),
        (["--only", "fig9"], r"unknown experiment\(s\) \['fig9'\]"),
    ],
)
def test_bad_input_stops_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    import gaisnet_flwr.experiments.section5 as section5

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        section5.main(["--quick", "--out", str(out), *argv])
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()  # nothing was started


# -- what a person reads: progress, not Flower's per-run report ------------------------------------
QUIET = {"depth": 2, "embed-dim": 32, "num-heads": 2, "peers-per-cluster": 1, "img-size": 16,
         "patch-size": 8, "foundation": "none", "device": "cpu"}  # fmt: skip


def test_an_experiments_run_keeps_flowers_lines_out_of_the_terminal_and_leaves_nothing(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from gaisnet_flwr.experiments.common.hfsl import hfsl_rounds

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the run's folder goes
    rows = hfsl_rounds(RunConfig.from_run_config(QUIET), 1, 2)
    assert len(rows) == 2 and 0 <= rows[1].accuracy <= 1
    captured = capfd.readouterr()
    assert "FINAL" not in captured.out + captured.err
    assert "Final results" not in captured.out + captured.err
    assert list(tmp_path.iterdir()) == []  # the run's folder (and its run.log) went with it


def test_a_failed_experiment_run_keeps_its_folder_and_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from gaisnet_flwr.experiments.common import hfsl

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = RunConfig.from_run_config({**QUIET, "strategy": "bulyan"})  # 2 clusters: too few
    with pytest.raises(RuntimeError, match=r"an in-process run of 2 cluster\(s\) failed: ") as info:
        hfsl.hfsl_rounds(cfg, 1, 2)
    (folder,) = tmp_path.iterdir()
    assert str(folder) in str(info.value)
    assert "Bulyan needs at least" in (folder / "FAILED.txt").read_text()
    assert "RUN FAILED" in (folder / "run.log").read_text()


# -- the quick variant of the whole set -----------------------------------------------------------


rows = output.read_csv


def accuracies(path: Path, *columns: str) -> list[float]:
    return [float(r[c]) for r in rows(path) for c in columns if r[c] != ""]


@pytest.mark.slow
def test_quick_variant_writes_every_figure_table_and_the_report(tmp_path: Path) -> None:
    out = tmp_path / "section5"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "section5.py"),
            "--quick",
            "--seeds",
            str(SEEDS),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # what a person reads: one progress line per step, the report's path; Flower's lines in
    # flower.log, each in-process run's report gone with its folder (issue 26)
    assert "Final results" not in done.stdout + done.stderr
    assert "FINAL" not in done.stdout + done.stderr + (out / "flower.log").read_text()
    assert len(done.stderr.splitlines()) < 10, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].startswith(f"Section V report: {out / 'report.md'}")

    for name, files in EXPECTED.items():
        assert (out / name / "report.md").is_file(), name
        for file in files:
            path = out / name / file
            assert path.is_file() and path.stat().st_size > 0, path
            if path.suffix == ".png":
                assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path

    report = (out / "report.md").read_text()
    assert "FAILED" not in report
    for title in TITLES:
        assert f"## {title}" in report, title
    for name, files in EXPECTED.items():  # figures linked from the joint report
        for file in files:
            if file.endswith(".png"):
                assert f"]({name}/{file})" in report
    total = re.search(r"\*\*(\d+) s \(([\d.]+) min\)\*\*", report)
    assert total, "the report states the total wall time"
    print(f"quick variant of Section V: {total.group(1)} s")

    # Fig. 6 and Fig. 7: accuracies are fractions, one row per seed and epoch (quick: 2 + start)
    fig6 = out / "fig6" / "fig6_pretraining.csv"
    assert len(rows(fig6)) == SEEDS * 3
    fig7 = out / "fig7" / "fig7_frozen_vs_full.csv"
    for path, cols in (
        (fig6, ("pretrained", "random_frozen", "scratch")),
        (fig7, ("prompt_accuracy", "full_accuracy")),
    ):
        assert all(0.0 <= a <= 1.0 for a in accuracies(path, *cols))
    assert all(float(r["prompt_epoch_s"]) > 0 for r in rows(out / "fig7" / "fig7_epoch_times.csv"))
    scale = {r["mode"]: r for r in rows(out / "fig7" / "fig7_paper_scale.csv")}
    # analytic: full fine-tuning also computes every weight gradient
    assert float(scale["full"]["vitb16_train_gflops_per_sample"]) > float(
        scale["prompt"]["vitb16_train_gflops_per_sample"]
    )
    assert all(float(r["vitb16_step_s"]) > 0 for r in scale.values())

    # Table III: fractions; in reading A one class of five ends well below all five
    t3 = rows(out / "table3" / "table3_noniid.csv")
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in t3)
    end = {
        (int(r["seed"]), int(r["classes"])): float(r["accuracy"]) for r in t3 if r["reading"] == "A"
    }
    assert all(end[(seed, 1)] < end[(seed, 5)] for seed in range(SEEDS))

    # Table IV: every cluster count and domain ran every round
    t4 = rows(out / "table4" / "table4_clusters.csv")
    assert {int(r["clusters"]) for r in t4} == {1, 2, 4, 8}
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in t4)

    # Table V: the paper's MSIP 500 and MLCP 650, exactly
    t5 = rows(out / "table5" / "table5_scheduling.csv")
    assert float(t5[-1]["msip_cumulative"]) == 500.0
    assert float(t5[-1]["mlcp_cumulative"]) == 650.0
    assert [r["mlcp_decision"] for r in t5][:3] == ["A", "c", "c"]
    assert all(
        math.isfinite(float(r["rs_total"])) for r in rows(out / "table5" / "table5_rs_seeds.csv")
    )  # noqa: E501

    # communication: D2D smashed data outweighs the upload of the tunable modules
    for r in rows(out / "comm" / "comm_per_round.csv"):
        d2d = float(r["d2d_forward_bytes"]) + float(r["d2d_backward_bytes"])
        assert d2d > float(r["upload_bytes"]) > 0
    # HFSL vs centralised and the cloud tier: fractions for every seed and round
    hfsl = rows(out / "hfsl" / "hfsl_vs_central.csv")
    assert {int(r["seed"]) for r in hfsl} == set(range(SEEDS))
    assert all(0.0 <= float(r["hfsl_accuracy"]) <= 1.0 for r in hfsl)
    tiers = rows(out / "hfsl" / "cloud_edge.csv")
    assert {r["aggregation"] for r in tiers} == {"cloud-edge", "isolated"}
    peers = rows(out / "comm" / "peers_latency_energy.csv")
    assert {int(r["peers"]) for r in peers} == set(range(1, 7))
    assert all(float(r["latency_s"]) > 0 and float(r["energy_j"]) > 0 for r in peers)
