"""The paper's Table III (Sec. V-D): accuracy after the first and the last round vs the number of
classes in the fine-tuning data (non-IID), HFSL over client clusters.

Two readings, both run:

* **A, the paper's.** Its numbers are almost exactly k/5 (0.200, 0.397, 0.575, 0.753, 0.933):
  the test set holds 5 classes and the fine-tuning data k of them, the same amount of data for
  every k ("under the condition of the same amount of fine-tuning data"). We take the first 5
  classes of the edge, fine-tune on a fixed number of images drawn evenly from classes 0..k-1,
  split IID over the clusters, and test on all 5. The head starts fresh, as when a new task
  meets a pre-trained backbone (the paper's Flowers on ImageNet ViT-B/16): it can only learn the
  classes it sees.
* **B, federated non-IID.** Every cluster holds k classes (`partitioning='classes'`,
  `classes-per-cluster=k`, one cluster per class so every class is held by some cluster), a
  fresh head again, the edge's full test set (all classes): how far FedAvg over skewed clusters
  gets when together they hold every class.

    python scripts/table3_noniid.py            # 10 rounds, outputs/section5/table3
    python scripts/table3_noniid.py --quick    # 2 rounds
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from torch.utils.data import Subset

from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.data.images import ImageData, edge_image_data, load_image_data
from gaisnet_flwr.experiments.section5_common import (
    PAPER,
    Progress,
    add_common_arguments,
    fmt,
    fresh_head_config,
    hfsl_rounds,
    md_table,
    save,
    script_main,
    with_defaults,
    write_csv,
)

NAME = "table3"
TITLE = "Table III: accuracy vs number of classes in the fine-tuning data (non-IID)"
ROUNDS = {"quick": 2, "full": 10}
TEST_CLASSES = 5  # the paper's test set, as its numbers imply (k/5)
CLUSTERS_A = 4
# Reading A fine-tunes on this many images for every k: divisible by 1..5, and within what one
# class offers (about 86 training images per digit on the edge; fewer where a class has fewer,
# e.g. Flowers102's 20 per class, then k = 3 gets 3 x 6 = 18).
IMAGES_A = 60
# Reading B: one cluster per class, at most this many (Flowers102 has 102 classes).
MAX_CLUSTERS_B = 10
# The paper's batch size: with 60 images over 4 clusters, the embedded default of 32 would give
# each cluster a single SGD step per round.
DEFAULTS = {"batch_size": 10}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "outputs/section5/table3")
    parser.add_argument("--rounds", type=int, default=0, help="default: 10 (2 with --quick)")
    return parser


def labels_of(dataset: object) -> np.ndarray:
    return np.array([int(y) for _, y in dataset])  # type: ignore[attr-defined]


def images_a(edge: ImageData) -> int:
    """Fine-tuning images per k in reading A: IMAGES_A, or what the smallest class offers."""
    return min(IMAGES_A, *(int((edge.train_labels == c).sum()) for c in range(TEST_CLASSES)))


def reading_a(
    cfg: RunConfig, test: Subset, k: int, images: int, rounds: int, progress: Progress
) -> list:
    """k of the first TEST_CLASSES classes in the fine-tuning data (node-config train pool:
    `images` drawn evenly from classes 0..k-1, split IID); test on all TEST_CLASSES classes."""
    pool = {"train-classes": k, "train-images": images}
    return hfsl_rounds(
        cfg.replace(partitioning="iid"),
        rounds,
        CLUSTERS_A,
        node_configs=[
            {"partition-id": c, "num-partitions": CLUSTERS_A, **pool} for c in range(CLUSTERS_A)
        ],
        test=test,
        on_round=lambda r: progress.step(f"A k={k} round {r.round}: accuracy {r.accuracy:.4f}"),
    )


def reading_b(cfg: RunConfig, edge: ImageData, k: int, rounds: int, progress: Progress) -> list:
    """Every cluster holds k classes; one cluster per class; test on every class."""
    return hfsl_rounds(
        cfg.replace(partitioning="classes", classes_per_cluster=k),
        rounds,
        min(edge.num_classes, MAX_CLUSTERS_B),
        on_round=lambda r: progress.step(f"B k={k} round {r.round}: accuracy {r.accuracy:.4f}"),
    )


def run(cfg: RunConfig, args: argparse.Namespace, out: Path) -> str:
    cfg = with_defaults(cfg, args, **DEFAULTS)
    rounds = args.rounds or ROUNDS["quick" if args.quick else "full"]
    ks = list(range(1, TEST_CLASSES + 1))
    progress = Progress(NAME, 2 * len(ks) * rounds)
    data = load_image_data(cfg.data_spec())
    Foundation.of(cfg).ensure(data, cfg.run.torch_device())
    edge = edge_image_data(data, 0, [1.0], cfg.hierarchy.domains()[0], seed=cfg.run.seed)
    # the edge's test images of the first TEST_CLASSES classes (labels read once: for image
    # folders this decodes every test image)
    test_labels = labels_of(edge.test)
    test = Subset(edge.test, np.flatnonzero(test_labels < TEST_CLASSES).tolist())
    with tempfile.TemporaryDirectory(prefix="table3-") as tmp:
        # A fresh head on the cloud's foundation, as a checkpoint the apps load.
        fresh = fresh_head_config(cfg, Path(tmp), cfg.run.seed)
        a = {k: reading_a(fresh, test, k, images_a(edge), rounds, progress) for k in ks}
        b = {k: reading_b(fresh, edge, k, rounds, progress) for k in ks}
    rows = []
    for k in ks:
        for reading, runs in (("A", a), ("B", b)):
            rows += [[reading, k, r.round, r.accuracy, r.loss] for r in runs[k]]
    write_csv(out / "table3_noniid.csv", ["reading", "classes", "round", "accuracy", "loss"], rows)

    first = {name: [runs[k][1].accuracy for k in ks] for name, runs in (("A", a), ("B", b))}
    end = {name: [runs[k][-1].accuracy for k in ks] for name, runs in (("A", a), ("B", b))}
    paper_first = [PAPER["table3"][k][0] for k in ks]
    paper_end = [PAPER["table3"][k][1] for k in ks]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    width = 0.2
    x = np.arange(len(ks))
    ax.bar(x - 1.5 * width, paper_first, width, label="paper, first epoch", color="#bbbbbb")
    ax.bar(x - 0.5 * width, paper_end, width, label="paper, end", color="#777777")
    ax.bar(x + 0.5 * width, first["A"], width, label="ours (A), round 1", color="#9ecae1")
    ax.bar(x + 1.5 * width, end["A"], width, label=f"ours (A), round {rounds}", color="#3182bd")
    ax.plot(x, end["B"], "D", color="#e6550d", label=f"ours (B, 10-class test), round {rounds}")
    ax.set_xticks(x, [str(k) for k in ks])
    ax.set_xlabel("classes in the fine-tuning data (A) / per cluster (B)")
    ax.set_ylabel("test accuracy (fraction)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Table III: accuracy vs number of classes (non-IID)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    save(fig, out / "table3_noniid.png")

    def pairs(firsts: list[float], ends: list[float]) -> list[str]:
        return [f"{f:.3f} / {e:.3f}" for f, e in zip(firsts, ends, strict=True)]

    table = md_table(
        ["", *(str(k) for k in ks)],
        [
            ["paper, first / end", *pairs(paper_first, paper_end)],
            ["ours A (5-class test), first / end", *pairs(first["A"], end["A"])],
            ["k / 5 (A's ceiling)", *(f"{k / TEST_CLASSES:.3f}" for k in ks)],
            ["ours B (10-class test), first / end", *pairs(first["B"], end["B"])],
        ],
    )
    gap = max(abs(e - p) for e, p in zip(end["A"], paper_end, strict=True))
    monotone = all(b_ >= a_ - 0.02 for a_, b_ in zip(end["A"], end["A"][1:], strict=False))
    verdict = (
        f"**Reading A agrees with the paper:** end accuracy rises with the number of classes and "
        f"tracks k/5; the largest gap to the paper's end values is {100 * gap:.1f} points."
        if monotone and gap < 0.1
        else f"**Reading A only partly agrees with the paper:** the largest gap to its end values "
        f"is {100 * gap:.1f} points{'' if monotone else ', and accuracy is not monotone in k'}."
    )
    # a round of reading A: each cluster's share of the images, less validation, in batches
    steps = math.ceil(
        images_a(edge) / CLUSTERS_A * (1 - cfg.data.val_fraction) / cfg.training.batch_size
    )
    close = [k for k, f, e in zip(ks, first["A"], end["A"], strict=True) if abs(e - f) <= 0.02]
    late = max(ks, key=lambda k: end["A"][k - 1] - first["A"][k - 1])
    first_vs_end = (
        "As in the paper, first and end are close for every k: with a pre-trained backbone, one "
        "round already learns what the data's classes allow, and more rounds cannot teach the "
        "classes that are not there."
        if len(close) == len(ks)
        else f"First and end are within 2 points for k = {', '.join(map(str, close)) or 'none'} "
        f"(the paper: within 3.4 points for every k); for k = {late} the first round is "
        f"{100 * (end['A'][late - 1] - first['A'][late - 1]):.1f} points short of the end, "
        f"because a round here is about {steps} SGD step(s) per cluster on a fresh head, where "
        f"the paper's first epoch over its flowers is many more. The end values carry the "
        f"comparison: more rounds cannot teach the classes that are not there."
    )
    mix = ", ".join(f"{images_a(edge) // k} x {k}" for k in ks)
    skew_cost = end["B"][-1] - end["B"][0]
    skew_note = (
        f"class skew across clusters costs only {100 * skew_cost:.1f} points here, because the "
        f"frozen pre-trained backbone already separates the classes and each cluster's head "
        f"update moves mainly its own classes' weights, which FedAvg then combines"
        if skew_cost < 0.05
        else f"class skew across clusters costs {100 * skew_cost:.1f} points"
    )
    return f"""
HFSL ({cfg.cluster.peers_per_cluster} peers per cluster, {cfg.model.mode},
{cfg.training.optimizer} lr {cfg.training.lr}, batch {cfg.training.batch_size}, {rounds} rounds
of {cfg.training.local_epochs} local epoch(s)). "First" is the
central test accuracy after round 1, "end" after round {rounds} (the paper: after the first and
the last epoch).

**Our interpretation.** The paper's numbers are almost exactly k/5 of its 5-class accuracy
(0.967), so its test set can only hold 5 classes: a model fine-tuned on k of them answers the
other 5 - k wrong. Reading A reproduces that setting: {images_a(edge)} fine-tuning images for
every k ({mix} per class x classes), split IID over {CLUSTERS_A} clusters, a fresh head, the
edge's test images of classes 0-4 ({len(test)} images). Reading B is the federated meaning of
non-IID: {min(edge.num_classes, MAX_CLUSTERS_B)} clusters, each holding k of the
{edge.num_classes} classes (`partitioning='classes'`), a fresh head, the full test set.

![Table III](table3_noniid.png)

{table}

{verdict} {first_vs_end}

Reading B: together the clusters hold every class, and averaging clusters that each saw k
classes ends at {fmt(end["B"][0])} for k = 1 and {fmt(end["B"][-1])} for k = {ks[-1]}
(fresh head: {fmt(b[1][0].accuracy)} before round 1): {skew_note}.
Why A does not match to the digit:
{len(test)} test images (one image is {100 / len(test):.1f} points) and a
{cfg.model.depth}-block ViT at {cfg.model.img_size} px on `{cfg.data.dataset}` instead of
ViT-B/16 on flowers.
CSV (every round): [table3_noniid.csv](table3_noniid.csv).
"""


def main(argv: list[str] | None = None) -> None:
    script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
