"""`gaisnet-bench-gpu` runs end to end (--smoke: a tiny ViT on the CPU) and, without a GPU,
says that it needs one (issue 14). Its real figures need a GPU: docs/gpu.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gaisnet_flwr.experiments.bench_gpu import main


def test_the_smoke_run_covers_every_part(tmp_path: Path) -> None:
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert report["meta"]["smoke"] and report["device"] == "cpu"
    steps = report["steps"]
    assert [(r["batch"], r["precision"]) for r in steps] == [
        (b, p) for b in (2, 4) for p in ("fp32", "tf32", "bf16")
    ]
    for row in steps:
        for peers in (1, 3, 6):
            assert row[f"split {peers} peers ms"] > 0
            assert row[f"split {peers} peers / unsplit"] == pytest.approx(
                row[f"split {peers} peers ms"] / row["unsplit ms"]
            )
    assert all(
        "split 3 peers, serializing links ms" in r for r in steps if r["precision"] == "fp32"
    )
    assert [r["precision"] for r in report["inference"]] == ["fp32", "tf32", "bf16"]
    assert {(r["batch"], r["precision"]) for r in report["modes"]} == {
        (b, p) for b in (2, 4) for p in ("fp32", "bf16")
    }
    memory = {r["mode"]: r["trainable parameters"] for r in report["memory"]}
    assert memory["full"] > memory["vpt-deep"] > memory["linear"] > 0
    rounds = {r["mode"]: r for r in report["rounds"]}
    assert set(rounds) == {"vpt-deep", "full"}
    for row in rounds.values():  # a round of the real apps (the ServerApp's own figures)
        assert row["training images"] == 4 * 8  # 4 clusters drawing 10, 2 held out each
        assert 0.0 <= row["test accuracy after the round"] <= 1.0
        assert row["round s (clusters in turn, central evaluation)"] >= row["slowest cluster s"]
        assert row["slowest cluster s"] > 0
    assert rounds["vpt-deep"]["D2D bytes"] > 0 and rounds["full"]["D2D bytes"] > 0
    text = (tmp_path / "bench_gpu.md").read_text()
    assert "Smoke run" in text and "HFSL rounds completed: 2 of 2" in text


def test_without_a_gpu_it_says_it_needs_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU and none is available" in err and "--smoke" in err
    assert not (tmp_path / "bench_gpu.json").exists()


def test_the_memory_benchmark_runs_a_round_and_reports_the_peak(tmp_path: Path) -> None:
    from gaisnet_flwr.experiments.bench_memory import main as memory_main

    out = tmp_path / "memory.json"
    assert memory_main(["--smoke", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["peak resident bytes"] > 100e6  # this process: torch alone is more
    assert figures["round s"] > 0 and figures["slowest cluster train s"] > 0
    # the central evaluation is part of the round, and its share is computed, not typed
    assert 0 < figures["central evaluation s"] < figures["round s"]
    share = figures["central evaluation s"] / figures["round s"]
    assert figures["central evaluation share"] == share
    assert (tmp_path / "provenance.json").is_file()


def test_bench_rounds_vit_b16_setting_is_a_valid_run_config() -> None:
    from gaisnet_flwr.config import RunConfig, parse_overrides
    from gaisnet_flwr.experiments.bench_round import VIT_B16

    cfg = RunConfig.from_run_config(parse_overrides(VIT_B16))
    assert (cfg.model.model_name, cfg.model.img_size, cfg.model.embed_dim) == (
        "vit_base_patch16_224",
        224,
        768,
    )
    assert cfg.cloud.foundation == "none" and cfg.data.cluster_samples == 10
