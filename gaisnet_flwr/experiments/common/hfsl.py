"""HFSL rounds for the experiments: the real ServerApp, strategies and ClientApps on an
in-process grid (`gaisnet_flwr.apps.inprocess`), read from the result object the run returns;
and the centralised training they are compared with."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.apps.recorder import RunResult
from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.data.images import cluster_datasets, edge_image_data, load_image_data
from gaisnet_flwr.derived import data_spec
from gaisnet_flwr.split.precision import resolve_device
from gaisnet_flwr.training.loops import evaluate, train_centralised
from gaisnet_flwr.vit.model import PromptedViT


@dataclass
class RoundRow:
    """One HFSL round at one edge: central test accuracy after aggregation and what it cost."""

    round: int
    accuracy: float
    loss: float
    wall_s: float = 0.0  # measured: the round in the ServerApp (clusters in series, FedAvg, eval)
    d2d_forward_bytes: int = 0  # smashed data, summed over clusters (real serialized bytes)
    d2d_backward_bytes: int = 0  # gradients of smashed data
    upload_bytes: int = 0  # the tunable modules every cluster uploads (Flower's byte count)
    num_examples: int = 0  # training samples over all clusters


def hfsl_rounds(
    cfg: RunConfig,
    rounds: int,
    clusters: int,
    *,
    node_configs: Sequence[dict[str, Any]] | None = None,
    test: Dataset | None = None,
    on_round: Callable[[RoundRow], None] | None = None,
) -> list[RoundRow]:
    """`rounds` HFSL rounds of one edge (paper Sec. III-C.1): the real ServerApp, strategies and
    ClientApps over `clusters` nodes in this process (`run_inprocess`), read from the result
    object it returns. Row 0 is the start model.

    Every cluster starts the round from the edge's modules and fine-tunes over its split chain;
    the edge aggregates per module and evaluates on its domain's test set (or, with `test`,
    each round's saved modules are evaluated on that set instead). `node_configs` give the
    clusters fixed partitions or a train pool (see `clients.split_client.TrainPool`). No
    federated evaluation and no inference requests: only the rounds. `on_round` sees each
    round once the run is over.
    """
    settings = {
        **cfg.to_dict(),
        "num-rounds": rounds,
        "inference-requests": 0,
        "fraction-evaluate": 0.0,
    }
    run = quiet_run(settings, clusters, node_configs)
    rows = [
        RoundRow(
            r,
            run.accuracy(r),
            run.loss(r),
            run.round_time(r),
            int(run.train(r, c.D2D_FWD, 0)),
            int(run.train(r, c.D2D_BWD, 0)),
            int(run.train(r, c.UPLOAD, 0)),
            int(run.train(r, c.NUM_EXAMPLES, 0)),
        )
        for r in range(len(run.rows))
    ]
    if test is not None:
        model = Foundation.of(cfg).load(load_image_data(data_spec(cfg)).num_classes)
        for row in rows:
            modules = run.modules(row.round)
            model.load_tunable_state(
                {k.removeprefix("edge0/"): torch.from_numpy(v) for k, v in modules.items()}
            )
            result = evaluate(model, test, device=resolve_device(cfg.run.device))
            row.accuracy, row.loss = result.accuracy, result.loss
    for row in rows[1:]:
        if on_round:
            on_round(row)
    return rows


def quiet_run(
    settings: dict[str, Any],
    clusters: int,
    node_configs: Sequence[dict[str, Any]] | None = None,
) -> RunResult:
    """The real apps in this process (`run_inprocess`, torch's --threads per ClientApp) in a
    folder of their own whose run.log takes Flower's log lines: the terminal shows the
    experiment's progress, not Flower's per-run report. The folder goes when the run completes
    (the experiment keeps what it reads from the result); a failed run's folder stays, with
    its run.log and FAILED.txt, and the error names it."""
    folder = Path(tempfile.mkdtemp(prefix="hfsl-"))
    try:
        run = run_inprocess(
            {**settings, "output-dir": str(folder)},
            clusters,
            node_configs,
            client_threads=torch.get_num_threads(),  # --threads
            log_file=folder / "run.log",
        )
    except Exception as err:
        raise RuntimeError(
            f"an in-process run of {clusters} cluster(s) failed: {err} (kept: {folder}, "
            f"with its run.log and FAILED.txt)"
        ) from err
    shutil.rmtree(folder, ignore_errors=True)
    return run


def pooled_edge_data(cfg: RunConfig, clusters: int) -> tuple[Dataset, Dataset]:
    """Edge 0's training data as `clusters` clusters hold it (their training splits, pooled:
    what centralised training on the same data sees) and its test set."""
    spec = data_spec(cfg)
    edge = edge_image_data(
        load_image_data(spec), 0, [1.0], cfg.hierarchy.edge_domains[0], seed=cfg.run.seed
    )
    pool: ConcatDataset = ConcatDataset(
        [cluster_datasets(edge, k, clusters, spec)[0] for k in range(clusters)]
    )
    return pool, edge.test


def centralised_curve(cfg: RunConfig, clusters: int, epochs: int) -> list[float]:
    """Test accuracy before and after each epoch of centralised training (the run-config's
    mode) on edge 0's data as `clusters` clusters hold it, pooled (`pooled_edge_data`)."""
    train, test = pooled_edge_data(cfg, clusters)
    model = Foundation.of(cfg).load(load_image_data(data_spec(cfg)).num_classes)
    device = resolve_device(cfg.run.device)
    accuracy = [evaluate(model, test, device=device).accuracy]
    train_centralised(
        model,
        train,
        cfg.training,
        epochs,
        cfg.run.seed,
        on_epoch=lambda _, m: accuracy.append(evaluate(m, test, device=device).accuracy),
        device=device,
    )
    return accuracy


def fresh_head_config(cfg: RunConfig, folder: Path, seed: int) -> RunConfig:
    """`cfg` on the same foundation with a fresh classifier head (VPT re-creates the head for
    the downstream task), as a checkpoint file the apps load (`foundation = "file"`)."""
    model = Foundation.of(cfg).load(load_image_data(data_spec(cfg)).num_classes)
    reset_head(model, seed)
    path = folder / "foundation-fresh-head.pt"
    torch.save(model.backbone.state_dict(), path)
    return cfg.replace(foundation="file", checkpoint_path=str(path))


def reset_head(model: PromptedViT, seed: int) -> None:
    """A fresh classifier head (VPT re-creates the head for the downstream task), seeded."""
    torch.manual_seed(seed)
    for head in model.head_modules().values():
        head.reset_parameters()  # type: ignore[operator]
