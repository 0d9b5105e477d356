"""The split chain inside one client cluster (paper Sec. III-C, Fig. 4; Sec. III-D, Fig. 5).

    start point --smashed data--> peer 1 --> ... --> peer K --> end point (head, loss)
                <----gradients---         <-- ... <--        <--

Each segment runs on its own device, owns an optimizer over its own tunable parameters (the end
point owns the head) and steps it as soon as its gradient is known. Every hop goes through a
`Link`, which delivers what it carries to the receiving node's device (where that segment's
parameters live) and counts the bytes the wire carries. A hop backwards is only made where
something upstream trains: under prompt tuning the start point's embedding is frozen, so no
gradient is ever sent back to it. Each segment computes in the run's `Precision` (fp32, tf32 or
bf16 autocast) and its hops carry smashed data in the chosen dtype (split/precision.py).

One training step of the chain equals one step of the unsplit `PromptedViT` with the same
optimizer (tests/test_chain.py, tests/test_exactness.py; bit for bit on a CPU in fp32 with fp32
smashed data): the optimizers are per-parameter, the loss is the same mean cross-entropy, and the
end point's step happens after all gradients of the step are computed.

A step is a nested call along the chain, as it is on real devices: each `ChainNode` runs its
segment, hands its output to the next node through a `Hop` and gets back the gradient of that
output (the end point computes the loss). In simulation the hop is an `InProcessHop` over a
counted link; in a lab deployment the hop is a gRPC call to the next device (`remote.GrpcHop`),
whose peer process runs the very same `ChainNode` (`peer.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gaisnet_flwr.config import OPTIMIZERS
from gaisnet_flwr.split.flops import SegmentFlops, segment_flops_of
from gaisnet_flwr.split.link import InProcessLink, Link, LinkStats
from gaisnet_flwr.split.measure import CostMeter
from gaisnet_flwr.split.plan import SplitPlan
from gaisnet_flwr.split.precision import FP32, Precision, tensor_device
from gaisnet_flwr.split.segments import SegmentSpec, describe_segments
from gaisnet_flwr.vit.model import PromptedViT

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    """The segments' optimizer, as the start point hands it to remote peers."""

    name: str  # "sgd" | "adamw"
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.name!r} is not one of: {', '.join(OPTIMIZERS)}")

    def factory(self) -> OptimizerFactory:
        def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            if self.name == "adamw":
                return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )

        return make


class Segment:
    """One stage of the chain: a slice of the model, its tunable parameters and its optimizer.

    `spec` describes it (`segments.describe_segments`): its name, whether its input needs a
    gradient. `forward` keeps what `backward` needs (its input and output) for one step at a time.
    `device` is where its parameters (`held`, frozen ones too) live: the node's device, to which
    the hops into this segment deliver. `flops` gives its per-sample FLOPs (measured when first
    asked: `flops_done` counts samples until then).
    """

    def __init__(
        self,
        spec: SegmentSpec,
        fn: Callable[[torch.Tensor], torch.Tensor],
        params: list[nn.Parameter],
        make_optimizer: OptimizerFactory | None,
        flops: Callable[[], SegmentFlops],
        device: torch.device | None = None,
        precision: Precision = FP32,
    ) -> None:
        self.spec = spec
        self.fn = fn
        self.params = params
        self.device = device or tensor_device(params, torch.device("cpu"))
        self.precision = precision
        self.optimizer = make_optimizer(params) if (params and make_optimizer) else None
        self.flops = flops
        self.samples_forward = 0
        self.samples_backward = 0
        self.proximal_mu = 0.0
        self._anchor: list[torch.Tensor] = []
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._input_grad: torch.Tensor | None = None

    @property
    def flops_done(self) -> int:
        """FLOPs of every forward and backward run so far."""
        if not (self.samples_forward or self.samples_backward):
            return 0
        per_sample = self.flops()
        return (
            self.samples_forward * per_sample.forward + self.samples_backward * per_sample.backward
        )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def needs_input_grad(self) -> bool:
        """Something upstream trains: ask for the gradient of the input and send it back."""
        return self.spec.input_needs_grad

    @property
    def trains(self) -> bool:
        return self.optimizer is not None

    def set_proximal(self, mu: float) -> None:
        """FedProx: add mu/2 * ||w - w_round_start||^2 to this segment's own parameters."""
        self.proximal_mu = mu
        self._anchor = [p.detach().clone() for p in self.params] if mu > 0 else []

    def forward(self, h: torch.Tensor, train: bool) -> torch.Tensor:
        if not train:
            with torch.no_grad(), self.precision.forward(self.device):
                out = self.fn(h)
            self.samples_forward += h.shape[0]
            return out
        if self.needs_input_grad:
            h = h.requires_grad_(True)
            # The gradient of the input as autograd computes it, before it is accumulated into
            # `h.grad`: that copies it into `h`'s memory layout (permuted, for a prefix-free
            # ViT's tokens), while the unsplit model hands the previous block the gradient as
            # computed; sums over it (LayerScale's gamma) would round differently (docs/vits.md
            # "Exactness").
            h.register_hook(self._keep_input_grad)
        with self.precision.forward(self.device):
            out = self.fn(h)
        self._input, self._output = h, out
        self.samples_forward += h.shape[0]
        return out

    def _keep_input_grad(self, grad: torch.Tensor) -> None:
        self._input_grad = grad

    def backward(
        self, grad_output: torch.Tensor | None, loss: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Backpropagate from `grad_output` (or from `loss` at the end point), step the optimizer
        and return the gradient for the previous segment (None if nothing upstream trains)."""
        assert self._input is not None and self._output is not None, "backward before forward"
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self.trains or self.needs_input_grad:
            with self.precision.backward(self.device):
                if loss is not None:
                    loss.backward()
                else:
                    self._output.backward(grad_output)
            self.samples_backward += self._input.shape[0]
        grad_input = self._input_grad if self.needs_input_grad else None
        if self.optimizer is not None:
            if self.proximal_mu > 0:
                with torch.no_grad():
                    for p, anchor in zip(self.params, self._anchor, strict=True):
                        if p.grad is not None:
                            p.grad.add_(p - anchor, alpha=self.proximal_mu)
            self.optimizer.step()
        self._input = self._output = self._input_grad = None
        return grad_input

    def discard(self) -> None:
        """Forget the step's saved tensors without a backward pass (nothing here trains)."""
        self._input = self._output = self._input_grad = None


@dataclass
class StepResult:
    loss: float
    correct: int
    num_examples: int


class Hop(Protocol):
    """The rest of the chain as one node sees it: hand the output on, get its gradient back."""

    @property
    def stats(self) -> LinkStats:
        """What this hop carried: smashed data forward, gradients backward."""
        ...

    def train(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, StepResult]:
        """Forward `h` (and the labels, which the end point needs) through the rest of the
        chain; return the gradient of the loss w.r.t. `h` (None if nothing upstream trains)."""
        ...

    def infer(self, h: torch.Tensor) -> torch.Tensor:
        """Forward `h` through the rest of the chain; return the end point's logits."""
        ...


class ChainNode:
    """One device's part of a step: its segment, then the hop to the next device (none at the
    end point, which computes the loss)."""

    def __init__(self, segment: Segment, next_hop: Hop | None) -> None:
        self.segment = segment
        self.next_hop = next_hop

    def train(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, StepResult]:
        out = self.segment.forward(h, train=True)
        if self.next_hop is None:  # end point: the loss, then the first backward
            labels = y.to(out.device)
            loss = F.cross_entropy(out.float(), labels)  # float32 loss under bf16 autocast too
            grad_in = self.segment.backward(None, loss=loss)
            correct = int((out.detach().argmax(dim=1) == labels).sum())
            return grad_in, StepResult(float(loss.detach()), correct, int(labels.shape[0]))
        grad_out, result = self.next_hop.train(out, y)
        if grad_out is None:  # nothing from here upstream trains: no backward, no hop back
            self.segment.discard()
            return None, result
        return self.segment.backward(grad_out), result

    def infer(self, h: torch.Tensor) -> torch.Tensor:
        out = self.segment.forward(h, train=False)
        return out if self.next_hop is None else self.next_hop.infer(out)


class InProcessHop:
    """Simulation: the next node lives in this process; the link serializes and counts."""

    def __init__(self, link: Link, node: ChainNode) -> None:
        self.link = link
        self.node = node

    @property
    def stats(self) -> LinkStats:
        return self.link.stats

    def train(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, StepResult]:
        grad, result = self.node.train(self.link.send(h, "forward"), y)
        return (self.link.send(grad, "backward") if grad is not None else None), result

    def infer(self, h: torch.Tensor) -> torch.Tensor:
        return self.node.infer(self.link.send(h, "forward"))


class RemotePeers(Protocol):
    """The cluster's peers and end point on other devices (a lab deployment, `remote.py`).

    `open` hands each remote node its segment's tunable modules (and, once, its frozen
    weights) and returns the hop to the first peer; `close` takes the trained modules back into
    `model` and reports what the remote nodes did."""

    def open(self, model: PromptedViT, plan: SplitPlan, train: bool, proximal_mu: float) -> Hop: ...

    def close(self, model: PromptedViT) -> RemoteStats: ...


@dataclass
class RemoteStats:
    """What the remote nodes report when a session closes: the bytes each sent on to the next
    node (hops 1..K) and each segment's FLOPs."""

    hop_bytes_forward: list[int]
    hop_bytes_backward: list[int]
    segment_flops: dict[str, int]


@dataclass
class ChainStats:
    """Bytes per hop (hop k goes from segment k to k + 1) and FLOPs per segment."""

    hop_bytes_forward: list[int] = field(default_factory=list)
    hop_bytes_backward: list[int] = field(default_factory=list)
    segment_flops: dict[str, int] = field(default_factory=dict)

    @property
    def d2d_bytes_forward(self) -> int:
        return sum(self.hop_bytes_forward)

    @property
    def d2d_bytes_backward(self) -> int:
        return sum(self.hop_bytes_backward)


class SplitChain:
    """A `PromptedViT` split by `plan` into start point, K peers and end point.

    Args:
        model: the cluster's model; segments share its modules (in simulation the peers are
            in-process objects, each touching only its own slice).
        plan: the peers' block ranges.
        make_optimizer: builds one optimizer per segment over that segment's parameters.
        links: K + 1 links (start->peer 1, ..., peer K->end); by default in-process links, each
            delivering to its receiving segment's device in `precision`'s smashed-data dtype.
        result_link: end point -> start point link for inference results (paper Fig. 5); by
            default in-process, delivering to the start point's device (results are not
            smashed data: they travel in the dtype the end point computed them in).
        remote: peers on other devices (deployment): only the start point's segment runs here;
            call `close()` after the last step to take the trained modules back.
    """

    def __init__(
        self,
        model: PromptedViT,
        plan: SplitPlan,
        make_optimizer: OptimizerFactory | None = None,
        links: Sequence[Link] | None = None,
        result_link: Link | None = None,
        remote: RemotePeers | None = None,
        train: bool = True,
        proximal_mu: float = 0.0,
        precision: Precision = FP32,
    ) -> None:
        if plan.num_blocks != model.depth:
            raise ValueError(f"plan covers {plan.num_blocks} blocks, the model has {model.depth}")
        if remote is not None and links is not None:
            raise ValueError("links are for in-process peers; remote peers bring their own")
        self.model = model
        self.plan = plan
        self.remote = remote
        self.precision = precision
        if remote is not None:  # the start point runs here, everything after it over the network
            self.segments = build_segments(model, plan, make_optimizer, only=0, precision=precision)
            self.links: list[Link] = []
            self.first_hop = remote.open(model, plan, train=train, proximal_mu=proximal_mu)
        else:
            self.segments = build_segments(model, plan, make_optimizer, precision=precision)
            self.links = (
                list(links)
                if links is not None
                else [
                    InProcessLink(receiver.device, precision.wire_dtype)
                    for receiver in self.segments[1:]
                ]
            )
            if len(self.links) != plan.num_peers + 1:
                raise ValueError(f"need {plan.num_peers + 1} links, got {len(self.links)}")
            node = ChainNode(self.segments[-1], None)
            for segment, link in zip(self.segments[-2::-1], self.links[::-1], strict=True):
                hop = InProcessHop(link, node)
                node = ChainNode(segment, hop)
            self.first_hop = hop
        self.result_link: Link = result_link or InProcessLink(self.segments[0].device)
        self.start = ChainNode(self.segments[0], self.first_hop)
        self.set_proximal(proximal_mu)
        self._remote_stats: RemoteStats | None = None

    # -- fine-tuning ---------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """One split-learning step on a batch held by the start point (labels too, which the
        end point needs for the loss; the paper's start point shares labels along the chain).
        The model's mode is set when it changes, not every step: `train()` walks every module
        (most of a tiny model's per-step overhead, issue 30)."""
        if not self.model.training:
            self.model.train()
        _, result = self.start.train(x, y)
        return result

    def set_proximal(self, mu: float) -> None:
        for segment in self.segments:
            segment.set_proximal(mu)

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """SL inference: start -> peers -> end point, logits sent back to the start point."""
        if self.model.training:
            self.model.eval()
        return self.result_link.send(self.start.infer(x), "forward")

    # -- the end of a session --------------------------------------------------------------------
    def close(self) -> None:
        """Remote peers: take the trained modules back into `model` and collect their counts.
        In-process chains share the model already; closing them does nothing."""
        if self.remote is not None and self._remote_stats is None:
            self._remote_stats = self.remote.close(self.model)

    # -- accounting ----------------------------------------------------------------------------
    def stats(self) -> ChainStats:
        if self.remote is None:
            return ChainStats(
                hop_bytes_forward=[link.stats.bytes_forward for link in self.links],
                hop_bytes_backward=[link.stats.bytes_backward for link in self.links],
                segment_flops={s.name: s.flops_done for s in self.segments},
            )
        self.close()
        assert self._remote_stats is not None
        remote = self._remote_stats
        first = self.first_hop.stats
        return ChainStats(
            hop_bytes_forward=[first.bytes_forward, *remote.hop_bytes_forward],
            hop_bytes_backward=[first.bytes_backward, *remote.hop_bytes_backward],
            segment_flops={self.segments[0].name: self.segments[0].flops_done}
            | remote.segment_flops,
        )


def build_segments(
    model: PromptedViT,
    plan: SplitPlan,
    make_optimizer: OptimizerFactory | None,
    only: int | None = None,
    precision: Precision = FP32,
) -> list[Segment]:
    """The chain's segments in order: start point, peers, end point (or just segment `only`,
    the one a device holds), as `describe_segments` describes them: each trains its trainable
    parameters and asks for the gradient of its input only if something upstream trains, and
    computes on the device its parameters lie on (the model's first device if it holds none).
    Their FLOPs are measured (`split.measure`) when the chain's counts are first read."""
    chain = describe_segments(model, plan)
    meter = CostMeter.of(model)
    named = dict(model.named_parameters())
    fallback = next(iter(named.values())).device
    segments = []
    for spec in chain:
        if only is not None and spec.index != only:
            continue
        fn: Callable[[torch.Tensor], torch.Tensor]
        if spec.role == "start":
            fn = model.embed
        elif spec.role == "peer":
            fn = _blocks_fn(model, *spec.blocks)
        else:
            fn = model.head_forward
        params = [named[n] for n in spec.trainable]
        device = tensor_device([named[n] for n in spec.params], fallback)
        flops = functools.partial(segment_flops_of, spec, meter)
        segments.append(
            Segment(spec, fn, params, make_optimizer, flops, device=device, precision=precision)
        )
    return segments


def _blocks_fn(model: PromptedViT, start: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(h: torch.Tensor) -> torch.Tensor:
        return model.run_blocks(h, start, stop)

    return run
