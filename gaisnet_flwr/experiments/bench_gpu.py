"""`gaisnet-bench-gpu`: the paper's workload on one GPU, split vs unsplit, in one run (issue 14).

ViT-B/16 at 224 px, 102 classes, VPT-deep with 10 prompts, random weights (speed and memory do
not depend on the values), SGD with momentum unless stated. Every comparison is measured side
by side in this one run: the variants of a row take turns step by step (interleaved, the
order rotating), and each gets the median of its repeats. It prints, and writes as JSON and
Markdown into --out:

  1. training step, unsplit vs the split chain over 1, 3 and 6 peers (and, in fp32, over 3
     peers with links that serialize every hop as the network transport does), at batch 10
     and 64, in fp32, TF32 and bf16 autocast;
  2. inference, unsplit vs split (3 peers), batch 64, in each precision;
  3. full fine-tuning vs VPT-deep vs linear (head only): step time at batch 10 and 64 in fp32
     and bf16, and peak GPU memory of a batch-64 AdamW step;
  4. one HFSL round of ViT-B/16 over 4 clusters (3 peers each, batch 10, 1 local epoch, AdamW)
     through the real apps: the GaisNet ServerApp and its ClientApps on Flower's in-process
     grid (`apps.inprocess`), the clusters in turn on the GPU, the edge's per-module FedAvg
     and the central evaluation, as a run does; data: the embedded digits at 224 px, each
     cluster drawing 255 images (1,020 in all, Flowers102's training split); the round's time
     and its slowest cluster next to the paper's RTX 4060 epoch (35 s frozen foundation, 210 s
     full fine-tuning, paper Sec. V), for VPT-deep and full.

Acceptance (issue 14): split / unsplit <= 1.05x at batch 10 and 64 in every precision, split
inference <= 1.05x, the round completes. Sized for under 5 minutes on one H200-class GPU:
from issue 14's H200 step times the timed parts come to about a minute, model building and
the synthetic data to well under a minute. Not yet run on a GPU (docs/gpu.md).

    python scripts/bench_gpu.py                   # on a CUDA GPU: everything above
    python scripts/bench_gpu.py --smoke           # a tiny ViT on the CPU, seconds: checks the
                                                  # script end to end (figures mean nothing)
    python scripts/bench_gpu.py --device cpu      # ViT-B/16 on the CPU (very slow)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gaisnet_flwr import contract
from gaisnet_flwr.split.plan import plan_even

if TYPE_CHECKING:
    import torch

    from gaisnet_flwr.split.link import Direction
    from gaisnet_flwr.split.precision import Precision
    from gaisnet_flwr.vit.model import PromptedViT

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.

# The paper's time per epoch on an RTX 4060 (Sec. V): frozen foundation (prompt tuning) and
# full fine-tuning of ViT-B/16 on Flowers102.
PAPER_EPOCH_S = {"vpt-deep": 35.0, "full": 210.0}
TARGET = 1.05  # split / unsplit, issue 14


@dataclass(frozen=True)
class Setup:
    """What one run measures: the model's shape and the sizes, repeats and data of each part."""

    model: dict[str, Any]
    batches: tuple[int, ...] = (10, 64)
    peers: tuple[int, ...] = (1, 3, 6)
    repeats: int = 10
    warmup: int = 3
    inference_batch: int = 64
    memory_batch: int = 64
    round_images: int = 1020  # Flowers102's training split
    round_clusters: int = 4
    round_peers: int = 3
    round_batch: int = 10  # the paper's batch size

    @property
    def img_size(self) -> int:
        return int(self.model.get("img_size", 224))

    @property
    def classes(self) -> int:
        return int(self.model["num_classes"])


VIT_B16 = Setup(dict(model_name="vit_base_patch16_224", num_classes=102))
SMOKE = Setup(
    dict(
        model_name="vit_tiny_patch16_224",
        num_classes=102,
        img_size=32,
        patch_size=8,
        depth=6,
        embed_dim=32,
        num_heads=2,
    ),
    batches=(2, 4),
    repeats=1,
    warmup=0,
    inference_batch=4,
    memory_batch=4,
    round_images=40,
    round_batch=10,
)


@dataclass
class Report:
    device: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    inference: list[dict[str, Any]] = field(default_factory=list)
    modes: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


# -- timing ---------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    variants: dict[str, Callable[[], object]], setup: Setup, device: torch.device
) -> dict[str, float]:
    """Median milliseconds per call of each variant, the variants taking turns (the order
    rotating every repeat) so that clocks, heat and neighbours hit them alike."""
    names = list(variants)
    for _ in range(setup.warmup):
        for name in names:
            variants[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(setup.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            started = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(1000 * (time.perf_counter() - started))
    return {name: statistics.median(t) for name, t in times.items()}


# -- the model and its steps ----------------------------------------------------------------------
def build(setup: Setup, mode: str, device: torch.device) -> PromptedViT:
    import torch

    from gaisnet_flwr.vit.model import build_prompted_vit

    torch.manual_seed(0)
    prompts = 10 if mode.startswith("vpt") else 0
    return build_prompted_vit(mode=mode, num_prompts=prompts, **setup.model).to(device)


def sgd(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import torch

    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def unsplit_step(
    model: PromptedViT, opt: torch.optim.Optimizer, precision: Precision, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One step of the unsplit model, as `training.loops.train_centralised` takes it."""
    import torch.nn.functional as F

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with precision.forward(device):
            logits = model(x)
        with precision.backward(device):
            F.cross_entropy(logits.float(), y).backward()
        opt.step()

    return step


class SerializingLink:
    """The link before issue 14: every hop serialized to host bytes and back (as the network
    transport does), for the comparison only."""

    def __init__(self, device: torch.device) -> None:
        from gaisnet_flwr.split.link import LinkStats

        self.device = device
        self.stats = LinkStats()

    def send(self, tensor: torch.Tensor, direction: Direction) -> torch.Tensor:
        from gaisnet_flwr.split.link import deserialize_tensor, serialize_tensor

        payload = serialize_tensor(tensor)
        self.stats.add(direction, len(payload))
        return deserialize_tensor(payload, self.device)


def batch(setup: Setup, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    gen = torch.Generator().manual_seed(size)
    x = torch.randn(size, 3, setup.img_size, setup.img_size, generator=gen)
    y = torch.randint(0, setup.classes, (size,), generator=gen)
    return x.to(device), y.to(device)


# -- the parts ------------------------------------------------------------------------------------
def steps(setup: Setup, device: torch.device, report: Report) -> None:
    from gaisnet_flwr.split.chain import SplitChain
    from gaisnet_flwr.split.precision import PRECISIONS, Precision

    model = build(setup, "vpt-deep", device)
    depth = model.depth
    for size in setup.batches:
        x, y = batch(setup, size, device)
        for name in PRECISIONS:
            precision = Precision(name)
            unsplit = unsplit_step(model, sgd(model.tunable_parameters()), precision, device)
            variants: dict[str, Callable[[], object]] = {"unsplit": partial(unsplit, x, y)}
            for k in setup.peers:
                if k <= depth:
                    chain = SplitChain(model, plan_even(depth, k), sgd, precision=precision)
                    variants[f"split {k} peers"] = partial(chain.train_step, x, y)
            if name == "fp32":
                k = min(3, depth)
                links = [SerializingLink(device) for _ in range(k + 1)]
                serial = SplitChain(model, plan_even(depth, k), sgd, links=links)
                variants[f"split {k} peers, serializing links"] = partial(serial.train_step, x, y)
            ms = interleaved(variants, setup, device)
            row = {"batch": size, "precision": name, **{f"{k} ms": v for k, v in ms.items()}}
            row |= {f"{k} / unsplit": v / ms["unsplit"] for k, v in ms.items() if k != "unsplit"}
            report.steps.append(row)
            print_row("step", row)


def inference(setup: Setup, device: torch.device, report: Report) -> None:
    import torch

    from gaisnet_flwr.split.chain import SplitChain
    from gaisnet_flwr.split.precision import PRECISIONS, Precision

    model = build(setup, "vpt-deep", device).eval()
    x, _ = batch(setup, setup.inference_batch, device)
    k = min(3, model.depth)
    for name in PRECISIONS:
        precision = Precision(name)

        def unsplit(p: Precision = precision) -> None:
            with torch.no_grad(), p.forward(device):
                model(x)

        chain = SplitChain(model, plan_even(model.depth, k), train=False, precision=precision)
        ms = interleaved(
            {"unsplit": unsplit, f"split {k} peers": partial(chain.infer, x)}, setup, device
        )
        row = {
            "batch": setup.inference_batch,
            "precision": name,
            **{f"{key} ms": v for key, v in ms.items()},
            "split / unsplit": ms[f"split {k} peers"] / ms["unsplit"],
        }
        report.inference.append(row)
        print_row("inference", row)


def modes(setup: Setup, device: torch.device, report: Report) -> None:
    mode_steps(setup, device, report)  # its models are gone when it returns
    for mode in ("full", "vpt-deep", "linear"):  # one model at a time: its own peak
        report.memory.append(peak_memory(setup, mode, device))
        print_row("memory", report.memory[-1])


def mode_steps(setup: Setup, device: torch.device, report: Report) -> None:
    from gaisnet_flwr.split.precision import Precision

    models = {mode: build(setup, mode, device) for mode in ("full", "vpt-deep", "linear")}
    for size in setup.batches:
        x, y = batch(setup, size, device)
        for name in ("fp32", "bf16"):
            precision = Precision(name)
            variants: dict[str, Callable[[], object]] = {}
            for mode, model in models.items():
                step = unsplit_step(model, sgd(model.tunable_parameters()), precision, device)
                variants[mode] = partial(step, x, y)
            ms = interleaved(variants, setup, device)
            row: dict[str, Any] = {
                "batch": size,
                "precision": name,
                **{f"{m} ms": v for m, v in ms.items()},
            }
            row["full / vpt-deep"] = ms["full"] / ms["vpt-deep"]
            report.modes.append(row)
            print_row("modes", row)


def peak_memory(setup: Setup, mode: str, device: torch.device) -> dict[str, Any]:
    """Peak allocated GPU memory over two AdamW steps of the unsplit model at the memory batch
    (the model, its gradients, AdamW's state and the activations; nothing else is alive)."""
    import torch

    from gaisnet_flwr.split.precision import Precision

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(setup, mode, device)
    opt = torch.optim.AdamW(model.tunable_parameters(), lr=1e-3)
    x, y = batch(setup, setup.memory_batch, device)
    step = unsplit_step(model, opt, Precision(), device)
    for _ in range(2):  # AdamW's state exists from the first step on
        step(x, y)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "mode": mode,
        "batch": setup.memory_batch,
        "optimizer": "adamw",
        "trainable parameters": sum(p.numel() for p in model.tunable_parameters()),
        "peak GB": "n/a (CPU)" if peak is None else peak / 1e9,
    }


def round_config(setup: Setup, mode: str, device: torch.device, out: str) -> dict[str, Any]:
    """The run-config of one round of the real apps: the setup's model with random weights
    (foundation 'none'), the paper's optimizer and batch (conf/paper-vitb16-flowers102.toml),
    the embedded digits resized to the model's input, each cluster drawing its share of the
    round's images, on `device`."""
    shape = {k: v for k, v in setup.model.items() if k != "num_classes"}
    keys = {"model_name": "model-name", "img_size": "img-size", "patch_size": "patch-size",
            "depth": "depth", "embed_dim": "embed-dim", "num_heads": "num-heads"}  # fmt: skip
    if "img_size" not in shape:  # timm's ViT-B/16: 224 px, patch 16, 12 x 768, 12 heads
        shape.update(img_size=224, patch_size=16, depth=12, embed_dim=768, num_heads=12)
    return {
        **{keys[k]: v for k, v in shape.items()},
        "mode": mode,
        "num-prompts": 10 if mode.startswith("vpt") else 0,
        "foundation": "none",
        "optimizer": "adamw",
        "lr": 0.001,
        "batch-size": setup.round_batch,
        "peers-per-cluster": setup.round_peers,
        "cluster-samples": setup.round_images // setup.round_clusters,
        "num-rounds": 1,
        "inference-requests": 0,
        "fraction-evaluate": 0.0,
        "device": device.type,
        "output-dir": out,
    }


def hfsl_round(setup: Setup, device: torch.device, report: Report) -> None:
    """One round of the real GaisNet apps (ServerApp and ClientApps on the in-process grid,
    `apps.inprocess.run_inprocess`: the clusters' ClientApps in turn on this device, the edge's
    per-module aggregation, the central evaluation), for VPT-deep and full fine-tuning. Its
    data: the embedded digits at the model's size, each cluster drawing round_images /
    clusters (the round trains on as many images as Flowers102's training split)."""
    import tempfile

    from gaisnet_flwr.apps.inprocess import run_inprocess

    for mode in ("vpt-deep", "full"):
        with tempfile.TemporaryDirectory(prefix="bench-gpu-round-") as out:
            settings = round_config(setup, mode, device, out)
            sync(device)
            run = run_inprocess(settings, setup.round_clusters, client_threads=None)
            sync(device)
        row = {
            "mode": mode,
            "clusters": setup.round_clusters,
            "peers per cluster": setup.round_peers,
            "training images": int(run.train(1, contract.NUM_EXAMPLES, 0)),
            "round s (clusters in turn, central evaluation)": run.round_time(1),
            "slowest cluster s": float(run.train(1, contract.TRAIN_TIME, 0.0)),
            "paper epoch s (RTX 4060)": PAPER_EPOCH_S[mode],
            "D2D bytes": int(run.train(1, contract.D2D_FWD, 0) + run.train(1, contract.D2D_BWD, 0)),
            "test accuracy after the round": float(run.rows[1][contract.ACCURACY]),
        }
        report.rounds.append(row)
        print_row("HFSL round", row)


# -- output ---------------------------------------------------------------------------------------
def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def print_row(part: str, row: dict[str, Any]) -> None:
    print(f"{part:>10}: " + ", ".join(f"{k} {fmt(v)}" for k, v in row.items()), flush=True)


def table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return lines


def verdicts(report: Report) -> list[str]:
    """The issue's acceptance checks on this run's figures."""
    over = [
        f"step batch {r['batch']} {r['precision']}: {k} = {v:.3f}"
        for r in report.steps
        for k, v in r.items()
        if k.endswith("/ unsplit") and "serializing" not in k and v > TARGET
    ]
    over += [
        f"inference {r['precision']}: {r['split / unsplit']:.3f}"
        for r in report.inference
        if r["split / unsplit"] > TARGET
    ]
    lines = [f"split / unsplit over {TARGET}x: " + ("; ".join(over) if over else "none")]
    lines.append(f"HFSL rounds completed: {len(report.rounds)} of 2")
    return lines


def markdown(report: Report) -> str:
    meta = report.meta
    lines = [
        "# bench_gpu: ViT-B/16 HFSL on one GPU" if not meta["smoke"] else "# bench_gpu --smoke",
        "",
        f"`{meta['command']}` on {meta['device name']} ({meta['device']}), {meta['date']}, "
        f"torch {meta['torch']}, {meta['seconds']:.0f} s in all. Medians of {meta['repeats']} "
        "interleaved repeats, milliseconds.",
        "",
    ]
    if meta["smoke"]:
        lines += [
            "Smoke run: a tiny ViT on the CPU. It checks that every part runs; its figures "
            "measure nothing about the paper's workload.",
            "",
        ]
    for title, rows in (
        ("Training step, unsplit vs split", report.steps),
        ("Inference", report.inference),
        ("Full vs VPT-deep vs linear, step (unsplit, SGD)", report.modes),
        ("Peak memory, AdamW step", report.memory),
        ("One HFSL round of the apps, 4 clusters, 1,020 images", report.rounds),
    ):
        lines += [f"## {title}", "", *table(rows), ""]
    lines += ["## Acceptance (issue 14)", "", *(f"- {v}" for v in verdicts(report)), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gaisnet-bench-gpu", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny ViT, few repeats, on the CPU unless --device"
    )
    parser.add_argument("--device", default="", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_gpu"))
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats per variant")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["steps", "inference", "modes", "round"],
        choices=["steps", "inference", "modes", "round"],
    )
    args = parser.parse_args(argv)
    import torch

    text = args.device or ("cpu" if args.smoke else "cuda")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"gaisnet-bench-gpu: error: this benchmark needs a CUDA GPU and none is available "
            f"here (torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a "
            "GPU machine, or give --smoke (a tiny model on the CPU, to check the script) or "
            "--device cpu (ViT-B/16 on the CPU, very slow).",
            file=sys.stderr,
        )
        return 2
    setup = SMOKE if args.smoke else VIT_B16
    if device.type == "cpu":
        torch.set_num_threads(1)  # a busy machine's spin-waiting threads only add noise
    if args.repeats:
        setup = Setup(**{**asdict(setup), "repeats": args.repeats})
    started = time.perf_counter()
    report = Report(device=str(device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    report.meta = {
        "command": "python scripts/bench_gpu.py " + " ".join(argv or sys.argv[1:]),
        "device": str(device),
        "device name": name or "CPU",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "repeats": setup.repeats,
        "model": setup.model,
    }
    print(f"bench_gpu on {report.meta['device name']} ({device}), torch {torch.__version__}")
    parts = {"steps": steps, "inference": inference, "modes": modes, "round": hfsl_round}
    for part in args.parts:
        parts[part](setup, device, report)
    report.meta["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps(asdict(report), indent=1))
    text_report = markdown(report)
    (args.out / "bench_gpu.md").write_text(text_report)
    print()
    print(text_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
