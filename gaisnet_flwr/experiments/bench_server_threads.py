"""The ServerApp's central evaluation at 1 thread vs all cores, side by side (run-config
`server-threads`): what the default (1) and the ViT-B/16 preset (0: all cores) rest on.

For each model, the ServerApp's own evaluation call (`training.loops.evaluate` on the edge's
test set, as `HfslRun.evaluate_edge` makes it; random weights, the embedded digits at the
model's image size) runs at 1 thread and at torch's default (all cores) in turn, the order
alternating, `--repeats` times. Printed and written: each count's median wall time, the ratio
all cores / 1 thread per turn (median and range), and whether both counts gave the same loss and
accuracy (float sums are split by thread, so the loss may differ in its last bits).

With `--busy N`, N other processes keep a core each busy throughout (another job on the
machine, or ClientApps training beside the ServerApp): what the default of 1 thread guards
against, since torch's all-core threads then wait on cores that are taken.

  python scripts/bench_server_threads.py --out docs/threads/bench_server_threads.json
  python scripts/bench_server_threads.py --busy 1 --out docs/threads-busy/bench_server_threads.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import statistics
import sys
import time
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from gaisnet_flwr.experiments.bench_memory import VIT_B16

# name -> run-config keys of the model (the rest: the embedded default's)
MODELS: dict[str, dict[str, int | str]] = {
    "tiny default": {},
    "ViT-S/16": {
        **VIT_B16,
        "model-name": "vit_small_patch16_224",
        "embed-dim": 384,
        "num-heads": 6,
    },
    "ViT-B/16": VIT_B16,
}


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """`count` processes that each keep a core busy inside the block (stopped after it)."""
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(count)]
    for p in spinners:
        p.start()
    try:
        yield
    finally:
        for p in spinners:
            p.terminate()
            p.join()


def one_model(keys: dict[str, int | str], images: int, repeats: int) -> dict[str, Any]:
    import torch
    from torch.utils.data import Subset

    from gaisnet_flwr.apps.server_app import edge_pools
    from gaisnet_flwr.config import RunConfig
    from gaisnet_flwr.derived import derive
    from gaisnet_flwr.split.precision import torch_threads
    from gaisnet_flwr.training.loops import build_model, evaluate

    cfg = RunConfig.from_run_config({**keys, "foundation": "none", "device": "cpu"})
    data, edges = edge_pools(derive(cfg))
    test = edges[0].test
    total = len(cast(Sized, test))  # the in-memory digits
    count = min(images, total) if images else total
    test = Subset(test, range(count))
    model = build_model(cfg.model, cfg.cloud, data.num_classes, cfg.run.seed)
    counts = {"1 thread": 1, "all cores": torch.get_num_threads()}
    times: dict[str, list[float]] = {name: [] for name in counts}
    results: dict[str, tuple[float, float]] = {}
    evaluate(model, Subset(test, range(2)))  # the first call's one-off costs, for neither
    for turn in range(repeats):
        for name in list(counts) if turn % 2 == 0 else list(counts)[::-1]:
            with torch_threads(counts[name]):
                started = time.perf_counter()
                result = evaluate(model, test)
                times[name].append(time.perf_counter() - started)
            results[name] = (result.loss, result.accuracy)
    ratios = [a / b for a, b in zip(times["all cores"], times["1 thread"], strict=True)]
    return {
        "images": count,
        "threads": counts,
        "seconds": times,
        "median s": {name: statistics.median(t) for name, t in times.items()},
        "all cores / 1 thread (median)": statistics.median(ratios),
        "all cores / 1 thread (range)": [min(ratios), max(ratios)],
        "same accuracy": results["1 thread"][1] == results["all cores"][1],
        "loss difference": abs(results["1 thread"][0] - results["all cores"][0]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gaisnet-bench-server-threads", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=3, help="turns per model")
    parser.add_argument("--models", default=",".join(MODELS), help=f"of: {', '.join(MODELS)}")
    parser.add_argument("--images", type=int, default=56,
                        help="test images per evaluation of the ViTs at 224 px (0: all 400); "
                        "the tiny default always tests all")  # fmt: skip
    parser.add_argument("--busy", type=int, default=0,
                        help="other processes keeping a core each busy meanwhile")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",")]
    if unknown := [n for n in names if n not in MODELS]:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.repeats < 1 or args.images < 0 or args.busy < 0:
        parser.error("--repeats must be >= 1, --images and --busy >= 0")

    from gaisnet_flwr.experiments.provenance import Provenance

    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "scripts/bench_server_threads.py", *given])
    record = Provenance.start(command, Path("."))
    figures: dict[str, Any] = {}
    for name in names:
        with busy_cores(args.busy):
            row = one_model(MODELS[name], 0 if not MODELS[name] else args.images, args.repeats)
        figures[name] = {**row, "busy processes": args.busy}
        low, high = row["all cores / 1 thread (range)"]
        one, every = row["median s"]["1 thread"], row["median s"]["all cores"]
        print(f"{name:<13} {row['images']:>3} images: 1 thread {one:.2f} s, all "
              f"{row['threads']['all cores']} cores {every:.2f} s: "
              f"{row['all cores / 1 thread (median)']:.2f}x [{low:.2f}, {high:.2f}]; same "
              f"accuracy: {row['same accuracy']}", flush=True)  # fmt: skip
    if args.out is not None:
        record.write_beside(args.out, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
