"""The paper's key metrics for ViT-B/16 on device and link profiles (paper Sec. III-C.2, III-D.2).

Analytic, no weights and no training: the model is built on PyTorch's meta device, so only its
shapes exist. Prints

  1. model distribution: the full model (full fine-tuning) vs the tunable modules (VPT-deep
     prompts + head), in wire bytes and in seconds on each link;
  2. one fine-tuning round of one cluster for 1..N peers (split by the min-max planner):
     latency, compute, energy, communication and the largest per-node memory, and the edge
     round with several identical clusters in parallel plus FedAvg on the edge server;
  3. one inference request (one image) for the same clusters;
  4. memory per node for one cluster size.

    python scripts/cost_report.py
    python scripts/cost_report.py --profiles conf/profiles.toml --d2d d2d-500m --samples 500
"""

from __future__ import annotations

import argparse
import itertools
from typing import TYPE_CHECKING

from gaisnet_flwr.config import SMASHED_DTYPE_NAMES
from gaisnet_flwr.costs.profiles import Profiles, load_profiles
from gaisnet_flwr.split.plan import SplitPlan, plan_min_max

if TYPE_CHECKING:
    import torch

    from gaisnet_flwr.costs.pricing import ClusterProfile, RoundCost
    from gaisnet_flwr.vit.model import PromptedViT

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.

MB = 1e6  # decimal megabytes, as split-learning papers quote sizes (346 MB, 682 KB)


def build_model(num_prompts: int, num_classes: int) -> PromptedViT:
    """The paper's ViT-B/16, 224 px, VPT-deep: 197 tokens + 10 prompts, d = 768, 12 blocks."""
    import torch

    from gaisnet_flwr.vit.model import build_prompted_vit

    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        return build_prompted_vit(
            "vit_base_patch16_224",
            mode="vpt-deep",
            num_prompts=num_prompts,
            num_classes=num_classes,
        )


def state_wire_bytes(state: dict[str, torch.Tensor]) -> int:
    from gaisnet_flwr.costs.pricing import tensor_wire_bytes

    return sum(tensor_wire_bytes(t.shape, t.element_size()) for t in state.values())


def batch_sizes(samples: int, batch_size: int) -> list[int]:
    full, rest = divmod(samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def hop_bytes(
    model: PromptedViT, plan: SplitPlan, samples: int, batch_size: int, element_size: int = 4
) -> tuple[list[int], list[int]]:
    """Bytes per hop over a round: one smashed tensor [B, tokens, D] per batch forward, and its
    gradient backward wherever the segment description says one is sent back; `element_size`
    bytes per value (4: fp32 smashed data; 2: bf16 / fp16)."""
    from gaisnet_flwr.costs.pricing import tensor_wire_bytes
    from gaisnet_flwr.split.segments import describe_segments

    chain = describe_segments(model, plan)
    hops = range(plan.num_peers + 1)
    per_round = [
        sum(
            tensor_wire_bytes((b, *chain.hop_shape(k)), element_size)
            for b in batch_sizes(samples, batch_size)
        )
        for k in hops
    ]
    backward = [per_round[k] if chain.hop_sends_grad(k) else 0 for k in hops]
    return per_round, backward


def cluster_for(profiles: Profiles, args: argparse.Namespace, num_peers: int) -> ClusterProfile:
    from gaisnet_flwr.costs.pricing import ClusterProfile

    peers = list(itertools.islice(itertools.cycle(args.peers.split(",")), num_peers))
    return ClusterProfile.from_names(
        profiles, [args.start, *peers, args.end], args.d2d, args.uplink
    )


def print_distribution(model: PromptedViT, profiles: Profiles, links: list[str]) -> int:
    from gaisnet_flwr.costs.pricing import tx_time_s

    full = state_wire_bytes(model.backbone.state_dict())
    tunable = state_wire_bytes(model.tunable_state())
    rows = [
        (
            "full model (full fine-tuning)",
            sum(p.numel() for p in model.backbone.parameters()),
            full,
        ),
        (f"tunable: {len(model.prompts)} prompts + head (VPT-deep)", model.num_tunable(), tunable),
    ]
    print("1. Model distribution per cluster and round (download; the upload is the same size)")
    head = f"{'':40} {'params':>11} {'MB':>9}" + "".join(f" {name + ' s':>20}" for name in links)
    print(head)
    for label, params, num_bytes in rows:
        seconds = "".join(f" {tx_time_s(num_bytes, profiles.link(n)):20.2f}" for n in links)
        print(f"{label:40} {params:11,d} {num_bytes / MB:9.3f}{seconds}")
    print(
        f"  -> the tunable modules are {full / tunable:.0f}x smaller ({100 * tunable / full:.3f} %)"
    )
    print(
        "  link rates: "
        + ", ".join(f"{n} {profiles.link(n).rate_bps() / 1e6:.2f} Mbit/s" for n in links)
    )
    return tunable


def main(argv: list[str] | None = None) -> None:

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--profiles", default=None, help="TOML file of [devices.X] / [links.X] tables"
    )
    parser.add_argument("--samples", type=int, default=100, help="training samples per round")
    parser.add_argument("--batch-size", type=int, default=10, help="the paper's batch size")
    parser.add_argument("--max-peers", type=int, default=6)
    parser.add_argument("--start", default="phone-mid", help="start point's device profile")
    parser.add_argument(
        "--peers", default="phone-high,phone-mid,phone-low", help="cycled over the peers"
    )
    parser.add_argument("--end", default="phone-mid", help="end point's device profile")
    parser.add_argument("--d2d", default="d2d-50m", help="link profile of every hop")
    parser.add_argument("--uplink", default="uplink-1mhz", help="the cluster's client-edge link")
    parser.add_argument("--edge", default="edge-server", help="device that runs FedAvg")
    parser.add_argument("--clusters", type=int, default=5, help="identical clusters per edge round")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument(
        "--smashed-dtype",
        default="fp32",
        choices=list(SMASHED_DTYPE_NAMES),
        help="what the D2D hops carry (run-config smashed-dtype)",
    )
    parser.add_argument("--memory-peers", type=int, default=3, help="cluster size of table 4")
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=102, help="Oxford Flowers102")
    args = parser.parse_args(argv)
    from gaisnet_flwr.costs.memory import segment_memory
    from gaisnet_flwr.costs.pricing import (
        fedavg_time_s,
        fine_tuning_round_cost,
        hierarchy_round_latency,
        inference_cost,
        tensor_wire_bytes,
    )
    from gaisnet_flwr.split.flops import segment_flops
    from gaisnet_flwr.split.precision import SMASHED_DTYPES
    from gaisnet_flwr.split.segments import ViTShape

    profiles = load_profiles(args.profiles)
    model = build_model(args.num_prompts, args.num_classes)
    s = ViTShape.of(model)
    print(
        f"ViT-B/16 VPT-deep: {s.num_prefix_tokens + s.num_patches} tokens + {s.num_prompts} "
        f"prompts, d={s.embed_dim}, {s.depth} blocks, {s.num_classes} classes; "
        f"{args.smashed_dtype} smashed data; "
        f"MB = 1e6 bytes\n"
    )
    tunable_bytes = print_distribution(model, profiles, [args.uplink, args.d2d, "backhaul-1gbps"])

    print(
        f"\n2. One fine-tuning round of one cluster: {args.samples} samples (all local epochs), "
        f"batch {args.batch_size}, start {args.start}, peers {args.peers} (cycled), "
        f"end {args.end}, hops {args.d2d}, uplink {args.uplink}, blocks by the min-max planner"
        f"\n   latency = download + sensing + every segment's compute + every hop + upload, in "
        f"series (one local epoch: each sample sensed once); "
        f"bottleneck = busiest node (the floor for a pipelined schedule)"
    )
    cols = (
        f"{'K':>2} {'blocks':<14} {'latency s':>10} {'sensing s':>10} {'compute s':>10} "
        f"{'D2D s':>8} {'CS s':>6} {'bottlnk s':>10} {'sensing J':>10} {'compute J':>10} "
        f"{'tx J':>7} {'D2D fwd MB':>11} {'D2D bwd MB':>11} "
        f"{'CS MB':>6} {'max node mem MB':>17} {'edge round s':>13}"
    )
    print(cols)
    edge = profiles.device(args.edge)
    backhaul = profiles.link("backhaul-1gbps")
    aggregation_s = fedavg_time_s(model.num_tunable(), args.clusters, edge)
    inference: list[tuple[int, RoundCost]] = []
    for k in range(1, args.max_peers + 1):
        cluster = cluster_for(profiles, args, k)
        speeds = [d.flops_per_second for d in cluster.devices[1:-1]]
        plan = plan_min_max([1.0] * s.depth, speeds)
        flops = segment_flops(model, plan)
        itemsize = SMASHED_DTYPES[args.smashed_dtype].itemsize
        fwd, bwd = hop_bytes(model, plan, args.samples, args.batch_size, itemsize)
        cost = fine_tuning_round_cost(
            cluster,
            flops,
            fwd,
            bwd,
            args.samples,
            upload_bytes=tunable_bytes,
            download_bytes=tunable_bytes,
            sensed_samples=args.samples,
        )
        memory = segment_memory(model, plan, args.batch_size, args.optimizer)
        biggest = max(memory, key=lambda m: m.training)
        edge_s = hierarchy_round_latency(
            cost.latency_s, model.num_tunable(), args.clusters, 1, False, edge, backhaul
        )
        print(
            f"{k:2d} {'-'.join(map(str, plan.sizes())):<14} {cost.latency_s:10.1f} "
            f"{cost.sensing_s:10.1f} {cost.compute_s:10.1f} "
            f"{cost.d2d_s:8.1f} {cost.download_s + cost.upload_s:6.2f} {cost.bottleneck_s:10.1f} "
            f"{cost.sensing_j:10.1f} {cost.compute_j:10.1f} {cost.tx_j:7.1f} "
            f"{cost.d2d_forward_bytes / MB:11.1f} "
            f"{cost.d2d_backward_bytes / MB:11.1f} {cost.cs_bytes / MB:6.2f} "
            f"{f'{biggest.training / MB:.0f} ({biggest.name})':>17} {edge_s:13.1f}"
        )
        one = tensor_wire_bytes((1, s.num_prefix_tokens + s.num_patches, s.embed_dim), itemsize)
        result = tensor_wire_bytes((1, s.num_classes))
        inference.append((k, inference_cost(cluster, flops, [one] * (k + 1), result)))
    print(
        f"   edge round = slowest of {args.clusters} identical clusters + FedAvg of "
        f"{model.num_tunable():,} params x {args.clusters} on {args.edge} "
        f"({aggregation_s * 1e3:.3f} ms)"
    )

    print(
        "\n3. One inference request (one image, sensed by the start point; the result hop goes "
        "end -> start)"
    )
    print(
        f"{'K':>2} {'latency s':>10} {'sensing s':>10} {'compute s':>10} {'D2D s':>8} "
        f"{'energy J':>9} {'D2D MB':>8}"
    )
    for k, cost in inference:
        print(
            f"{k:2d} {cost.latency_s:10.2f} {cost.sensing_s:10.3f} {cost.compute_s:10.2f} "
            f"{cost.d2d_s:8.2f} {cost.energy_j:9.2f} {cost.d2d_bytes / MB:8.2f}"
        )

    k = args.memory_peers
    cluster = cluster_for(profiles, args, k)
    plan = plan_min_max([1.0] * s.depth, [d.flops_per_second for d in cluster.devices[1:-1]])
    print(
        f"\n4. Memory per node, K={k} (blocks {plan.sizes()}), batch {args.batch_size}, "
        f"{args.optimizer}; MB"
    )
    print(
        f"{'node':<6} {'device':<11} {'weights':>8} {'grads':>7} {'optim':>7} {'activ.':>8} "
        f"{'smashed':>8} {'training':>9} {'inference':>10} {'device mem':>11}"
    )
    for device, m in zip(
        cluster.devices, segment_memory(model, plan, args.batch_size, args.optimizer), strict=True
    ):
        print(
            f"{m.name:<6} {device.name:<11} {m.weights / MB:8.1f} {m.gradients / MB:7.3f} "
            f"{m.optimizer_state / MB:7.3f} {m.activations / MB:8.1f} {m.smashed / MB:8.1f} "
            f"{m.training / MB:9.1f} {m.inference / MB:10.1f} {device.memory_bytes / MB:11.0f}"
        )
    print(
        "   activations: what autograd saves for backward, measured on fake tensors (equal to "
        "saved_tensors_hooks on real runs in tests);\n"
        "   inference: weights + the largest working set of one piece (a block) of a no-grad "
        "forward, measured on fake tensors + smashed data"
    )


if __name__ == "__main__":
    main()
