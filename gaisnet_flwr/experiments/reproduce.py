"""Re-run the default (`bash scripts/run.sh`: 4 clusters, 5 rounds) and compare it with the
committed reference, within what the reference says holds (docs/reproducibility.md).

On one machine a seed gives the same bytes every time: the same foundation (weights SHA-256)
and the same accuracy every round. On another CPU the foundation's bytes differ (MKL and oneDNN
choose other kernels for its instruction sets), and so does every accuracy after it: there a
run can only be compared with how far other CPUs' foundations moved the same seed (the
reference's `across-cpus`, measured by emulating other CPUs' kernel choices; without it, its
spread over seeds). This command runs the same
ServerApp and ClientApps as `flwr run` in one process (`apps/inprocess.py`: the same modules
bit for bit, tests/test_flwr_run.py) and says which of the two holds:

    python scripts/reproduce.py                   # seed 0 vs docs/reproduce/reference.json
    python scripts/reproduce.py --seeds 0 1 2          # more seeds
    python scripts/reproduce.py --seeds 0 1 2 3 4 --write docs/reproduce/reference.json
    python scripts/reproduce.py --across docs/reproduce/cpu-kernels/*/reference.json

Exit status 0 when every seed is bit-identical to the reference, or (another foundation) within
its spread; 1 otherwise. `--foundation-only` pre-trains the foundation afresh and prints its
SHA-256 with the images' and the CPU kernel settings: how docs/reproducibility.md found what
changes its bytes (e.g. `MKL_ENABLE_INSTRUCTIONS=AVX2 python scripts/reproduce.py
--foundation-only`).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reproduce" / "reference.json"
CLUSTERS = 4  # scripts/run.sh's GAISNET_CLUSTERS
FP32 = ("fp32", "fp32")  # precision, smashed-dtype of the default


def run_default(seed: int, foundation_dir: str) -> dict[str, Any]:
    """One run of the default run-config with `seed` (in process, 1 torch thread per ClientApp
    call as `flwr run` gives each): accuracy before fine-tuning and after the last round, and
    the foundation's weights SHA-256."""
    from gaisnet_flwr.apps.inprocess import run_inprocess
    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.config import RunConfig
    from gaisnet_flwr.data.images import dataset_classes

    with tempfile.TemporaryDirectory() as out:
        config: dict[str, int | str] = {
            "seed": seed,
            "output-dir": out,
            "foundation-dir": foundation_dir,
        }
        rows = run_inprocess(config, num_clusters=CLUSTERS).metrics()
        cfg = RunConfig.from_run_config(config)
        digest = Foundation.of(cfg).fingerprint(dataset_classes(cfg.data_spec()))
    return {
        "before": rows[0]["accuracy"],
        "after": rows[-1]["accuracy"],
        "rounds": len(rows) - 1,
        "foundation-sha256": digest[:16],
    }


def foundation_bytes() -> dict[str, Any]:
    """Pre-train the default foundation afresh (in a temporary folder, never the cache) and
    say what its bytes are: the weights' SHA-256, the SHA-256 of the images it and the edges
    use (the data preparation), torch's CPU capability and the kernel environment variables."""
    import hashlib
    import os
    import time

    import torch

    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.config import RunConfig
    from gaisnet_flwr.data.images import load_image_data
    from gaisnet_flwr.experiments.provenance import KERNEL_ENV

    with tempfile.TemporaryDirectory() as folder:
        cfg = RunConfig.from_run_config({"foundation-dir": folder})
        data = load_image_data(cfg.data_spec())
        images = hashlib.sha256()
        for part in (data.cloud, data.train, data.test):
            images.update(part.tensors[0].contiguous().numpy().tobytes())  # type: ignore[union-attr]
        started = time.perf_counter()
        foundation = Foundation.of(cfg)
        foundation.ensure(data, torch.device("cpu"))
        digest = foundation.fingerprint(data.num_classes)
    return {
        "foundation-sha256": digest[:16],
        "images-sha256": images.hexdigest()[:16],
        "cpu-capability": torch.backends.cpu.get_cpu_capability(),
        "kernel-env": {k: v for k, v in os.environ.items() if k.startswith(KERNEL_ENV)},
        "pretrain-s": round(time.perf_counter() - started, 1),
    }


def spread(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """max - min over the seeds, before fine-tuning and after the last round."""
    return {
        key: round(max(r[key] for r in results.values()) - min(r[key] for r in results.values()), 6)
        for key in ("before", "after")
    }


def across_cpus(reference: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """How far another foundation moved the same seed: the largest |other - reference| over
    the seeds both ran and the other references (each run on another CPU's kernels), before
    fine-tuning and after the last round."""
    width = {}
    for key in ("before", "after"):
        gaps = [
            abs(other["seeds"][seed][key] - ref[key])
            for other in others
            for seed, ref in reference["seeds"].items()
            if key in other["seeds"].get(seed, {})
        ]
        width[key] = round(max(gaps, default=reference["spread"][key]), 6)
    foundations = sorted({s["foundation-sha256"] for o in others for s in o["seeds"].values()})
    return {**width, "foundations": foundations}


def read_other(path: Path) -> dict[str, Any]:
    """Another machine's (or emulated CPU's) results: a reference JSON written by --write, or a
    precision report's CSV (`gaisnet-precision`), whose fp32 rows give each seed's accuracy
    after the last round of the default."""
    if path.suffix != ".csv":
        return cast(dict[str, Any], json.loads(path.read_text()))
    with path.open(newline="") as file:
        rows = [r for r in csv.DictReader(file) if (r["precision"], r["smashed-dtype"]) == FP32]
    unknown = f"unknown ({path.name})"
    return {
        "seeds": {
            r["seed"]: {"after": float(r["accuracy"]), "foundation-sha256": unknown} for r in rows
        }
    }


def compare(seed: str, got: dict[str, Any], reference: dict[str, Any]) -> tuple[bool, str]:
    """Bit-identical (same foundation, same accuracies) or, on another foundation, within what
    another foundation was seen to move the same seed (`across-cpus`; without it, the
    reference's spread over seeds)."""
    ref = reference["seeds"].get(seed)
    if ref is None:
        return False, f"seed {seed}: no reference (reference seeds: {sorted(reference['seeds'])})"
    same = got["foundation-sha256"] == ref["foundation-sha256"]
    line = (
        f"seed {seed}: {got['before']:.4f} -> {got['after']:.4f} (reference {ref['before']:.4f}"
        f" -> {ref['after']:.4f}), foundation {got['foundation-sha256']}"
    )
    if same:
        exact = got["before"] == ref["before"] and got["after"] == ref["after"]
        verdict = "bit-identical" if exact else "DIFFERENT although the foundation is the same"
        return exact, f"{line}: {verdict}"
    width, what = reference["spread"], "the spread over seeds"
    if "across-cpus" in reference:
        width, what = reference["across-cpus"], "what other CPUs' foundations moved a seed"
    ok = all(abs(got[k] - ref[k]) <= width[k] for k in ("before", "after"))
    verdict = (
        f"another foundation than the reference's {ref['foundation-sha256']} (another CPU?): "
        f"{'within' if ok else 'OUTSIDE'} {what} ({width['before']:.4f} before, "
        f"{width['after']:.4f} after)"
    )
    return ok, f"{line}: {verdict}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument(
        "--write", type=Path, default=None, help="write the runs as a new reference here"
    )
    parser.add_argument(
        "--foundation-dir",
        default="",
        help="where the cloud's checkpoint is kept (default: ~/.cache)",
    )
    parser.add_argument(
        "--across",
        type=Path,
        nargs="+",
        default=None,
        help="add to --reference how far these results of other CPUs moved each seed "
        "(reference JSONs, or a precision report's CSV)",
    )
    parser.add_argument(
        "--foundation-only",
        action="store_true",
        help="only pre-train the default foundation afresh and print what its bytes are",
    )
    args = parser.parse_args(argv)
    if args.foundation_only:
        print(json.dumps(foundation_bytes()))
        return 0
    if args.write is None and not args.reference.is_file():
        parser.error(f"no reference at {args.reference}; make one with --write")
    if args.across:
        reference = json.loads(args.reference.read_text())
        others = [read_other(path) for path in args.across]
        reference["across-cpus"] = {
            **across_cpus(reference, others),
            "from": [str(path) for path in args.across],
        }
        args.reference.write_text(json.dumps(reference, indent=2) + "\n")
        print(f"{args.reference}: across-cpus {reference['across-cpus']}")
        return 0

    from gaisnet_flwr.experiments.provenance import Provenance

    record = Provenance.start(
        "python scripts/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        Path(__file__).resolve().parents[2],
    )
    results = {}
    for seed in args.seeds:
        results[str(seed)] = run_default(seed, args.foundation_dir)
        print(f"seed {seed}: {json.dumps(results[str(seed)])}", flush=True)
    if args.write is not None:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        reference = {"seeds": results, "spread": spread(results)}
        args.write.write_text(json.dumps(reference, indent=2) + "\n")
        provenance = record.write(args.write.parent)
        print(f"wrote {args.write} (spread {reference['spread']}) and {provenance}")
        return 0
    reference = json.loads(args.reference.read_text())
    verdicts = [compare(seed, got, reference) for seed, got in results.items()]
    for _, line in verdicts:
        print(line)
    return 0 if all(ok for ok, _ in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
