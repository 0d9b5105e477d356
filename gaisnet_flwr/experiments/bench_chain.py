"""Benchmark the split chain against the unsplit model (issue: foundation).

Prints, for a ViT-B/16-shaped model (random weights; shapes are what matter) and a tiny one:
  * tunable parameters and bytes vs the full model (parameter-efficient fine-tuning),
  * smashed-data bytes per sample per hop, forward and backward,
  * the split chain's training-step time over the unsplit model's, measured side by side in one
    run (interleaved repeats, median), target <= 1.05x.

    python scripts/bench_chain.py                 # both models
    python scripts/bench_chain.py --models tiny   # seconds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import TYPE_CHECKING, Any

from gaisnet_flwr.split.plan import plan_even

if TYPE_CHECKING:
    import torch

    from gaisnet_flwr.split.chain import SplitChain
    from gaisnet_flwr.vit.model import PromptedViT

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.

MODELS: dict[str, dict[str, Any]] = {
    # ViT-B/16 at 224 px, 102 classes (Flowers102), VPT-deep with 10 prompts: the paper's model.
    "vit-b16": dict(model_name="vit_base_patch16_224", num_classes=102, num_prompts=10),
    # The embedded default's shape class: 32 px digits.
    "tiny": dict(
        model_name="vit_tiny_patch16_224",
        num_classes=10,
        num_prompts=10,
        img_size=32,
        patch_size=4,
        depth=6,
        embed_dim=96,
        num_heads=3,
    ),
}


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    from gaisnet_flwr.split.link import serialize_tensor

    return sum(len(serialize_tensor(t)) for t in state.values())


def time_steps(
    model: PromptedViT, chain: SplitChain, batch: int, repeats: int, img: int, classes: int
) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.tunable_parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)

    def unsplit() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def split() -> None:
        chain.train_step(x, y)

    unsplit()  # warm-up
    split()
    times: dict[str, list[float]] = {"unsplit": [], "split": []}
    for _ in range(repeats):  # interleaved so drift in machine load hits both alike
        for name, fn in (("unsplit", unsplit), ("split", split)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["unsplit"]), statistics.median(times["split"])


def run(name: str, batch: int, repeats: int, peers: int) -> None:
    import torch

    from gaisnet_flwr.split.chain import SplitChain
    from gaisnet_flwr.vit.model import build_prompted_vit

    cfg = dict(MODELS[name])
    model = build_prompted_vit(mode="vpt-deep", **cfg)
    img = model.img_size[0]
    full = {k: v.detach() for k, v in model.state_dict().items()}
    tunable = model.tunable_state()
    print(
        f"\n== {name}: {cfg['model_name']} img {img}, depth {model.depth}, "
        f"dim {model.backbone.embed_dim}, {cfg['num_prompts']} prompts, "
        f"{cfg['num_classes']} classes, vpt-deep"
    )
    print(
        f"parameters  full {model.num_total():>12,}   tunable {model.num_tunable():>10,}   "
        f"({100 * model.num_tunable() / model.num_total():.3f} %)"
    )
    fb, tb = state_bytes(full), state_bytes(tunable)
    print(f"bytes       full {fb:>12,}   tunable {tb:>10,}   ({fb / tb:.0f}x smaller)")

    reference = copy.deepcopy(model)
    chain = SplitChain(
        model, plan_even(model.depth, peers), lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)
    )
    one = torch.randn(1, 3, img, img)
    chain.train_step(one, torch.zeros(1, dtype=torch.long))
    stats = chain.stats()
    print(f"smashed data per sample per hop ({peers} peers, hops start->p1 .. p{peers}->end):")
    print(f"  forward  {stats.hop_bytes_forward}")
    print(f"  backward {stats.hop_bytes_backward}")
    print(f"  FLOPs per segment (1 sample, fwd+bwd): {stats.segment_flops}")

    # Fresh chain over a copy so both routes train the same starting weights.
    chain = SplitChain(
        model, plan_even(model.depth, peers), lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)
    )
    t_unsplit, t_split = time_steps(reference, chain, batch, repeats, img, cfg["num_classes"])
    print(
        f"training step, batch {batch}, median of {repeats}: unsplit {t_unsplit * 1e3:.1f} ms, "
        f"split {t_split * 1e3:.1f} ms, ratio {t_split / t_unsplit:.3f}x (target <= 1.05x)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--peers", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models:
        run(name, args.batch, args.repeats, args.peers)


if __name__ == "__main__":
    main()
