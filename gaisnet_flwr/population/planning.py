"""How to split the model over one cluster's own devices and links (paper Sec. IV-A).

For a cluster (devices and links in chain order, `costs.pricing.ClusterProfile`) and a model,
`RangeCosts` says what holding blocks [a, b) costs a peer in one round: its FLOPs, its memory
while training, and the bytes it sends (the smashed data [B, tokens, D] its last block produces,
forward; the gradient of what it received, backward, where one flows). All of it is read off the
segment description (`split.segments`) of the plan [0, a) [a, b) [b, L), which does not depend
on how the other blocks are split.

The planners:
  * compute-only ("minmax", "even"): `split.plan.make_plan` over the peers' FLOP/s;
  * communication-aware ("comm-aware"): `split.plan.plan_min_max_stages` with each peer's
    time = its compute + every byte it sends over its own links (the cost model's formulas),
    and a range that does not fit the peer's memory is not allowed. It minimises the busiest
    peer, so the round's bottleneck (`RoundCost.bottleneck_s`) is never worse than compute-only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from gaisnet_flwr.costs.memory import segment_memory
from gaisnet_flwr.costs.pricing import (
    ClusterProfile,
    RoundCost,
    fine_tuning_round_cost,
    inference_cost,
    node_compute_s,
    tensor_wire_bytes,
    tx_time_s,
)
from gaisnet_flwr.split.flops import SegmentFlops, chain_flops
from gaisnet_flwr.split.measure import CostMeter
from gaisnet_flwr.split.plan import PlanError, SplitPlan, make_plan, plan_min_max_stages
from gaisnet_flwr.split.segments import ChainSpec, SegmentSpec, describe_segments
from gaisnet_flwr.vit.model import PromptedViT


def batch_sizes(samples: int, batch_size: int) -> list[int]:
    """The batches a loader without drop_last makes of `samples` samples."""
    full, rest = divmod(samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class Workload:
    """What one fine-tuning round asks of a cluster: `samples` training samples per epoch in
    batches of `batch_size`, for `epochs` epochs, with `optimizer` (and `momentum`); the D2D
    hops carry `element_size` bytes per value (4: fp32 smashed data; 2: bf16 / fp16)."""

    samples: int
    batch_size: int
    epochs: int = 1
    optimizer: str = "sgd"
    momentum: float = 0.9
    element_size: int = 4

    def hop_bytes(self, sample_shape: tuple[int, ...]) -> int:
        """Wire bytes of one tensor per batch of a round (`link.serialize_tensor`'s format)."""
        per_epoch = sum(
            tensor_wire_bytes((b, *sample_shape), self.element_size)
            for b in batch_sizes(self.samples, self.batch_size)
        )
        return self.epochs * per_epoch


@dataclass(frozen=True)
class SegmentCost:
    """One segment's share of a round: per-sample FLOPs, training memory (one batch), and the
    bytes it sends forward (smashed data) and backward (the gradient of its input) per round."""

    flops: SegmentFlops
    memory_bytes: int
    inference_memory_bytes: int
    forward_bytes: int
    backward_bytes: int


class RangeCosts:
    """What every possible segment of `model` costs under `workload` (cached per range; each
    distinct block is measured once, `split.measure`)."""

    def __init__(self, model: PromptedViT, workload: Workload) -> None:
        self.model = model
        self.workload = workload
        self.depth = model.depth
        self.meter = CostMeter(model)
        self._ranges: dict[tuple[int, int], SegmentCost] = {}

    def _segment(self, chain: ChainSpec, plan: SplitPlan, index: int) -> SegmentCost:
        w = self.workload
        seg: SegmentSpec = chain[index]
        memory = segment_memory(
            self.model, plan, w.batch_size, w.optimizer, momentum=w.momentum, meter=self.meter
        )
        forward = w.hop_bytes(seg.out_shape) if seg.role != "end" else 0
        backward = w.hop_bytes(seg.in_shape) if seg.sends_grad else 0
        return SegmentCost(
            flops=chain_flops(chain, self.meter, w.batch_size)[index],
            memory_bytes=memory[index].training,
            inference_memory_bytes=memory[index].inference,
            forward_bytes=forward,
            backward_bytes=backward,
        )

    def peer(self, start: int, stop: int) -> SegmentCost:
        """A peer holding blocks [start, stop)."""
        key = (start, stop)
        if key not in self._ranges:
            sizes = [n for n in (start, stop - start, self.depth - stop) if n > 0]
            plan = SplitPlan.from_sizes(sizes)
            chain = describe_segments(self.model, plan)
            self._ranges[key] = self._segment(chain, plan, 1 + (start > 0))
        return self._ranges[key]

    @cached_property
    def _ends(self) -> tuple[SegmentCost, SegmentCost]:
        plan = SplitPlan.from_sizes([self.depth])
        chain = describe_segments(self.model, plan)
        return self._segment(chain, plan, 0), self._segment(chain, plan, 2)

    @property
    def start(self) -> SegmentCost:
        return self._ends[0]

    @property
    def end(self) -> SegmentCost:
        return self._ends[1]

    def smallest_peer_memory(self) -> int:
        """The least memory any one-block peer needs (what a device must hold to take part)."""
        return min(self.peer(b, b + 1).memory_bytes for b in range(self.depth))


def peer_time_s(
    costs: RangeCosts, cluster: ClusterProfile, peer: int, start: int, stop: int
) -> float:
    """Peer `peer` (0-based among the peers; node peer + 1) holding blocks [start, stop): its
    compute for the round plus what it sends, forward on hop peer + 1 and backward on hop peer,
    each over that hop's link (the cost model's formulas); `inf` if it does not fit its memory."""
    device = cluster.devices[peer + 1]
    seg = costs.peer(start, stop)
    if seg.memory_bytes > device.memory_bytes:
        return math.inf
    w = costs.workload
    flops = (seg.flops.forward + seg.flops.backward) * w.samples * w.epochs
    return (
        node_compute_s(cluster, peer + 1, flops)  # the edge server's, at its share
        + tx_time_s(seg.forward_bytes, cluster.hops[peer + 1])
        + tx_time_s(seg.backward_bytes, cluster.hops[peer])
    )


def plan_cluster(
    planner: str, costs: RangeCosts, cluster: ClusterProfile, speeds: Sequence[float] | None = None
) -> SplitPlan:
    """The split plan of one cluster by `planner` (see the module docstring).

    Compute-only planners take `speeds` (default: the peers' FLOP/s) and ignore links and
    memory; "comm-aware" plans over the peers' devices and links and refuses, with the reason,
    a cluster in which no plan fits every peer's memory.
    """
    num_peers = len(cluster.devices) - 2
    if planner != "comm-aware":
        peer_speeds = speeds or [d.flops_per_second for d in cluster.devices[1:-1]]
        return make_plan(planner, costs.depth, peer_speeds)
    try:
        return plan_min_max_stages(
            costs.depth,
            num_peers,
            lambda k, a, b: peer_time_s(costs, cluster, k, a, b),
        )
    except PlanError as err:
        memory = ", ".join(
            f"{d.name} {d.memory_bytes / 2**20:.0f} MiB" for d in cluster.devices[1:-1]
        )
        raise PlanError(f"{err}; peers' memory: {memory}") from err


def fits_memory(costs: RangeCosts, cluster: ClusterProfile, plan: SplitPlan) -> list[str]:
    """The nodes of `cluster` whose segment under `plan` needs more memory than their device
    has, as "name (device): needs X MiB, has Y MiB"; empty when everything fits."""
    segments = [costs.start, *(costs.peer(a, b) for a, b in plan.ranges), costs.end]
    return [
        f"{name} ({device.name}): needs {seg.memory_bytes / 2**20:.1f} MiB, has "
        f"{device.memory_bytes / 2**20:.0f} MiB"
        for name, device, seg in zip(cluster.names, cluster.devices, segments, strict=True)
        if seg.memory_bytes > device.memory_bytes
    ]


def predicted_round_cost(
    costs: RangeCosts,
    cluster: ClusterProfile,
    plan: SplitPlan,
    upload_bytes: int,
    download_bytes: int,
) -> RoundCost:
    """The cost model's price of one fine-tuning round of this cluster, from the model's shape:
    the same FLOPs and, per hop, the same bytes the chain counts when it runs (tested)."""
    w = costs.workload
    segments = [costs.start, *(costs.peer(a, b) for a, b in plan.ranges), costs.end]
    return fine_tuning_round_cost(
        cluster,
        [s.flops for s in segments],
        [s.forward_bytes for s in segments[:-1]],
        [s.backward_bytes for s in segments[1:]],
        samples=w.samples * w.epochs,
        upload_bytes=upload_bytes,
        download_bytes=download_bytes,
        sensed_samples=w.samples,
    )


def predicted_inference_cost(
    model: PromptedViT,
    cluster: ClusterProfile,
    plan: SplitPlan,
    samples: int,
    download_bytes: int,
    element_size: int = 4,
) -> RoundCost:
    """The cost model's price of one inference request of `samples` inputs, one batch, its
    hops carrying `element_size` bytes per value (the logits go back as float32)."""
    chain = describe_segments(model, plan)
    flops = chain_flops(chain, CostMeter.of(model))
    hops = [
        tensor_wire_bytes((samples, *chain.hop_shape(k)), element_size)
        for k in range(plan.num_peers + 1)
    ]
    result = tensor_wire_bytes((samples, *chain[-1].out_shape))  # the logits, back to the start
    return inference_cost(cluster, flops, hops, result, samples, download_bytes)
