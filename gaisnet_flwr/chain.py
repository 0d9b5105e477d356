"""The split chain inside one client cluster (paper Sec. III-C, Fig. 4; Sec. III-D, Fig. 5).

    start point --smashed data--> peer 1 --> ... --> peer K --> end point (head, loss)
                <----gradients---         <-- ... <--        <--

Each segment runs on its own device, owns an optimizer over its own tunable parameters (the end
point owns the head) and steps it as soon as its gradient is known. Every hop goes through a
`Link`, which serializes what it carries and counts the bytes. A hop backwards is only made where
something upstream trains: under prompt tuning the start point's embedding is frozen, so no
gradient is ever sent back to it.

One training step of the chain equals one step of the unsplit `PromptedViT` with the same
optimizer (tests/test_chain.py): the optimizers are per-parameter, the loss is the same mean
cross-entropy, and the end point's step happens after all gradients of the step are computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gaisnet_flwr.flops import SegmentFlops, segment_flops
from gaisnet_flwr.link import InProcessLink, Link
from gaisnet_flwr.model import PromptedViT
from gaisnet_flwr.split import SplitPlan

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class Segment:
    """One stage of the chain: a slice of the model, its tunable parameters and its optimizer.

    `forward` keeps what `backward` needs (its input and output) for one step at a time.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[torch.Tensor], torch.Tensor],
        params: list[nn.Parameter],
        make_optimizer: OptimizerFactory | None,
        needs_input_grad: bool,
        flops: SegmentFlops,
    ) -> None:
        self.name = name
        self.fn = fn
        self.params = params
        self.optimizer = make_optimizer(params) if (params and make_optimizer) else None
        self.needs_input_grad = needs_input_grad
        self.flops = flops
        self.flops_done = 0
        self.proximal_mu = 0.0
        self._anchor: list[torch.Tensor] = []
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    @property
    def trains(self) -> bool:
        return self.optimizer is not None

    def set_proximal(self, mu: float) -> None:
        """FedProx: add mu/2 * ||w - w_round_start||^2 to this segment's own parameters."""
        self.proximal_mu = mu
        self._anchor = [p.detach().clone() for p in self.params] if mu > 0 else []

    def forward(self, h: torch.Tensor, train: bool) -> torch.Tensor:
        if not train:
            with torch.no_grad():
                out = self.fn(h)
            self.flops_done += self.flops.forward * h.shape[0]
            return out
        if self.needs_input_grad:
            h = h.requires_grad_(True)
        out = self.fn(h)
        self._input, self._output = h, out
        self.flops_done += self.flops.forward * h.shape[0]
        return out

    def backward(
        self, grad_output: torch.Tensor | None, loss: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Backpropagate from `grad_output` (or from `loss` at the end point), step the optimizer
        and return the gradient for the previous segment (None if nothing upstream trains)."""
        assert self._input is not None and self._output is not None, "backward before forward"
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self.trains or self.needs_input_grad:
            if loss is not None:
                loss.backward()
            else:
                self._output.backward(grad_output)
            self.flops_done += self.flops.backward * self._input.shape[0]
        grad_input = self._input.grad if self.needs_input_grad else None
        if self.optimizer is not None:
            if self.proximal_mu > 0:
                with torch.no_grad():
                    for p, anchor in zip(self.params, self._anchor, strict=True):
                        if p.grad is not None:
                            p.grad.add_(p - anchor, alpha=self.proximal_mu)
            self.optimizer.step()
        self._input = self._output = None
        return grad_input


@dataclass
class StepResult:
    loss: float
    correct: int
    num_examples: int


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
        links: K + 1 links (start->peer 1, ..., peer K->end); in-process links by default.
        result_link: end point -> start point link for inference results (paper Fig. 5).
    """

    def __init__(
        self,
        model: PromptedViT,
        plan: SplitPlan,
        make_optimizer: OptimizerFactory | None = None,
        links: Sequence[Link] | None = None,
        result_link: Link | None = None,
    ) -> None:
        if plan.num_blocks != model.depth:
            raise ValueError(f"plan covers {plan.num_blocks} blocks, the model has {model.depth}")
        self.model = model
        self.plan = plan
        self.links: list[Link] = (
            list(links)
            if links is not None
            else [InProcessLink() for _ in range(plan.num_peers + 1)]
        )
        if len(self.links) != plan.num_peers + 1:
            raise ValueError(f"need {plan.num_peers + 1} links, got {len(self.links)}")
        self.result_link: Link = result_link or InProcessLink()
        self.segments = self._build_segments(make_optimizer)

    def _build_segments(self, make_optimizer: OptimizerFactory | None) -> list[Segment]:
        m = self.model
        flops = segment_flops(m, self.plan)
        names = ["start", *(f"peer{k + 1}" for k in range(self.plan.num_peers)), "end"]
        fns: list[Callable[[torch.Tensor], torch.Tensor]] = [
            m.embed,
            *(_blocks_fn(m, lo, hi) for lo, hi in self.plan.ranges),
            m.head_forward,
        ]
        groups = list(zip(names, fns, segment_parameters(m, self.plan), strict=True))

        segments, upstream_trains = [], False
        for (name, fn, params), seg_flops in zip(groups, flops, strict=True):
            trainable = [p for p in params if p.requires_grad]
            segments.append(
                Segment(name, fn, trainable, make_optimizer, upstream_trains, seg_flops)
            )
            upstream_trains = upstream_trains or bool(trainable)
        return segments

    # -- fine-tuning ---------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """One split-learning step on a batch held by the start point (labels too, which the
        end point needs for the loss; the paper's start point shares labels along the chain)."""
        self.model.train()
        h = x
        for k, segment in enumerate(self.segments):
            h = segment.forward(h, train=True)
            if k < len(self.links):
                h = self.links[k].send(h, "forward")
        logits = h
        labels = y.to(logits.device)
        loss = F.cross_entropy(logits, labels)
        grad = self.segments[-1].backward(None, loss=loss)
        for k in range(len(self.segments) - 2, -1, -1):
            if grad is None:  # nothing upstream trains: no more hops backwards
                break
            grad = self.links[k].send(grad, "backward")
            grad = self.segments[k].backward(grad)
        correct = int((logits.detach().argmax(dim=1) == labels).sum())
        return StepResult(float(loss.detach()), correct, int(labels.shape[0]))

    def set_proximal(self, mu: float) -> None:
        for segment in self.segments:
            segment.set_proximal(mu)

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """SL inference: start -> peers -> end point, logits sent back to the start point."""
        self.model.eval()
        h = x
        for k, segment in enumerate(self.segments):
            h = segment.forward(h, train=False)
            if k < len(self.links):
                h = self.links[k].send(h, "forward")
        return self.result_link.send(h, "forward")

    # -- accounting ----------------------------------------------------------------------------
    def stats(self) -> ChainStats:
        return ChainStats(
            hop_bytes_forward=[link.stats.bytes_forward for link in self.links],
            hop_bytes_backward=[link.stats.bytes_backward for link in self.links],
            segment_flops={s.name: s.flops_done for s in self.segments},
        )


def segment_parameters(model: PromptedViT, plan: SplitPlan) -> list[list[nn.Parameter]]:
    """Parameters each node holds, in chain order: the start point the embedding (patch and
    position embeddings, prefix tokens, norm_pre), each peer its blocks and their prompts, the end
    point norm, fc_norm and the head(s). Together they are every parameter exactly once."""
    bb = model.backbone
    start = [p for mod in (bb.patch_embed, bb.norm_pre) for p in mod.parameters()]
    start += [
        p
        for p in (bb.cls_token, bb.pos_embed, bb.reg_token, getattr(bb, "dist_token", None))
        if p is not None
    ]
    peers = []
    for lo, hi in plan.ranges:
        params = [model.prompt(i).tokens for i in range(lo, hi) if i < len(model.prompts)]
        peers.append(params + [p for i in range(lo, hi) for p in bb.blocks[i].parameters()])
    end_modules = [bb.norm, bb.fc_norm, *model.head_modules().values()]
    groups = [start, *peers, [p for mod in end_modules for p in mod.parameters()]]
    if sorted(id(p) for g in groups for p in g) != sorted(id(p) for p in model.parameters()):
        raise RuntimeError("segments do not hold the model's parameters exactly once")
    return groups


def _blocks_fn(model: PromptedViT, start: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(h: torch.Tensor) -> torch.Tensor:
        return model.run_blocks(h, start, stop)

    return run
