"""The split chain trains and infers exactly like the unsplit model (DESIGN invariants)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from gaisnet_flwr.split.chain import SplitChain
from gaisnet_flwr.split.flops import model_forward_flops, segment_flops
from gaisnet_flwr.split.link import (
    Direction,
    InProcessLink,
    LinkError,
    deserialize_tensor,
    serialize_tensor,
)
from gaisnet_flwr.split.measure import flop_counter
from gaisnet_flwr.split.plan import SplitPlan, plan_even
from gaisnet_flwr.split.segments import describe_segments
from gaisnet_flwr.vit.model import PromptedViT, build_prompted_vit
from tests.conftest import TINY, VARIANTS

# Split and unsplit run the same float32 ops in the same order; we allow float rounding anyway.
TOL = dict(rtol=1e-5, atol=1e-6)

OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
}


def build(mode: str, variant: str = "cls-token") -> PromptedViT:
    name, overrides = VARIANTS[variant]
    prompts = 3 if mode.startswith("vpt") else 0
    return build_prompted_vit(
        name, mode=mode, num_prompts=prompts, num_classes=5, **{**TINY, **overrides}
    )


def random_plan(rng: random.Random, num_peers: int, depth: int = 6) -> SplitPlan:
    cuts = sorted(rng.sample(range(1, depth), num_peers - 1))
    bounds = [0, *cuts, depth]
    return SplitPlan(depth, tuple(zip(bounds[:-1], bounds[1:], strict=True)))


def unsplit_steps(model: PromptedViT, batches, make_opt) -> tuple[list[float], dict]:
    opt = make_opt(model.tunable_parameters())
    model.train()
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    grads = {k: p.grad.clone() for k, p in model.named_tunable_parameters()}
    return losses, grads


@pytest.mark.parametrize("mode", ["vpt-deep", "vpt-shallow", "linear", "full"])
@pytest.mark.parametrize("num_peers", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_split_training_equals_unsplit(mode: str, num_peers: int, optimizer: str) -> None:
    rng = random.Random(1000 * num_peers + len(mode))
    plan = random_plan(rng, num_peers)
    whole = build(mode)
    split = copy.deepcopy(whole)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))) for _ in range(3)]

    ref_losses, ref_grads = unsplit_steps(whole, batches, OPTIMIZERS[optimizer])
    chain = SplitChain(split, plan, OPTIMIZERS[optimizer])
    losses = [chain.train_step(x, y).loss for x, y in batches]

    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for key, param in split.named_tunable_parameters():
        torch.testing.assert_close(param.grad, ref_grads[key], **TOL, msg=f"grad {key}")
        torch.testing.assert_close(
            param, dict(whole.named_tunable_parameters())[key], **TOL, msg=f"param {key}"
        )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_split_training_equals_unsplit_for_every_token_layout(variant: str) -> None:
    whole = build("vpt-deep", variant)
    split = copy.deepcopy(whole)
    batch = [(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))]
    ref_losses, _ = unsplit_steps(whole, batch, OPTIMIZERS["adamw"])
    loss = (
        SplitChain(split, SplitPlan.from_sizes([2, 1, 3]), OPTIMIZERS["adamw"])
        .train_step(*batch[0])
        .loss
    )
    assert loss == pytest.approx(ref_losses[0], rel=1e-6)
    for key, param in split.named_tunable_parameters():
        torch.testing.assert_close(param, dict(whole.named_tunable_parameters())[key], **TOL)


def test_backbone_gets_no_gradient_and_does_not_change() -> None:
    model = build("vpt-deep")
    before = copy.deepcopy(model.backbone.state_dict())
    chain = SplitChain(model, plan_even(6, 3), OPTIMIZERS["sgd-momentum"])
    for _ in range(2):
        chain.train_step(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))
    for name, param in model.backbone.named_parameters():
        if not name.startswith("head."):
            assert param.grad is None, name
            assert torch.equal(param, before[name]), name


def test_each_segment_owns_its_optimizer_over_its_own_parameters() -> None:
    model = build("vpt-deep")
    chain = SplitChain(model, SplitPlan.from_sizes([2, 4]), OPTIMIZERS["adamw"])
    owned = {
        seg.name: [p for g in seg.optimizer.param_groups for p in g["params"]]
        if seg.optimizer
        else []
        for seg in chain.segments
    }
    assert owned["start"] == []
    assert owned["peer1"] == [model.prompts[0].tokens, model.prompts[1].tokens]
    assert owned["peer2"] == [model.prompts[i].tokens for i in range(2, 6)]
    assert owned["end"] == [model.backbone.head.weight, model.backbone.head.bias]


def test_bytes_per_hop_are_the_serialized_smashed_data() -> None:
    model = build("vpt-deep")
    chain = SplitChain(model, SplitPlan.from_sizes([2, 4]), OPTIMIZERS["adamw"])
    chain.train_step(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))
    # vpt-deep hands on [B, P + N, D] at every cut (prompt outputs are discarded), float32,
    # plus a header of 2 + 8 * ndim bytes.
    smashed = 4 * (1 + 16) * 32 * 4 + 2 + 8 * 3
    stats = chain.stats()
    assert stats.hop_bytes_forward == [smashed] * 3
    # No gradient is sent back to the frozen start point; every other hop carries one back.
    assert stats.hop_bytes_backward == [0, smashed, smashed]


def test_vpt_shallow_hands_prompt_tokens_on() -> None:
    model = build("vpt-shallow")
    chain = SplitChain(model, SplitPlan.from_sizes([3, 3]), OPTIMIZERS["adamw"])
    chain.train_step(torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,)))
    header = 2 + 8 * 3
    assert chain.stats().hop_bytes_forward == [
        2 * 17 * 32 * 4 + header,
        2 * 20 * 32 * 4 + header,
        2 * 20 * 32 * 4 + header,
    ]


@pytest.mark.parametrize("sizes", [[6], [1, 5], [2, 2, 2], [1, 1, 1, 1, 1, 1]])
def test_split_inference_equals_unsplit_predictions(sizes: list[int]) -> None:
    model = build("vpt-deep")
    x = torch.randn(8, 3, 32, 32)
    expected = model.eval()(x)
    chain = SplitChain(model, SplitPlan.from_sizes(sizes))
    logits = chain.infer(x)
    assert torch.equal(logits, expected)
    assert chain.result_link.stats.bytes_forward == 8 * 5 * 4 + 2 + 16


def test_plan_must_match_model_depth() -> None:
    with pytest.raises(ValueError, match="plan covers 4 blocks, the model has 6"):
        SplitChain(build("vpt-deep"), plan_even(4, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_tensor_serialization_round_trips(dtype: torch.dtype) -> None:
    t = (torch.randn(2, 3, 4) * 10).to(dtype)
    back = deserialize_tensor(serialize_tensor(t))
    assert back.dtype == dtype and torch.equal(back, t)
    assert deserialize_tensor(serialize_tensor(torch.tensor(3.5))).item() == 3.5


def test_a_hop_keeps_the_memory_layout() -> None:
    # A prefix-free ViT's tokens leave the patch convolution as [B, N, D] with strides
    # (N*D, 1, N); the unsplit model keeps that layout, so a hop must too (docs/vits.md,
    # "Exactness").
    model = build("linear", "avg-pool")
    h = model.embed(torch.randn(2, 3, 32, 32)).detach()
    assert not h.is_contiguous()
    back = deserialize_tensor(serialize_tensor(h))
    assert back.stride() == h.stride() and torch.equal(back, h)
    assert len(serialize_tensor(h)) == len(serialize_tensor(h.contiguous())) + 3  # the dim order
    sliced = h[:, ::2]  # not dense: sent as a contiguous copy
    assert torch.equal(deserialize_tensor(serialize_tensor(sliced)), sliced)


def test_corrupt_payloads_are_rejected() -> None:
    payload = serialize_tensor(torch.zeros(2, 3))
    with pytest.raises(LinkError, match="needs 24"):
        deserialize_tensor(payload[:-4])
    with pytest.raises(LinkError, match="unknown dtype code 200"):
        deserialize_tensor(bytes([200]) + payload[1:])
    with pytest.raises(LinkError, match="shorter than the header"):
        deserialize_tensor(b"\x00")


def test_link_counts_directions_apart() -> None:
    link = InProcessLink()
    link.send(torch.zeros(10), "forward")
    link.send(torch.zeros(5), "backward")
    assert (link.stats.bytes_forward, link.stats.bytes_backward) == (40 + 10, 20 + 10)
    assert (link.stats.messages_forward, link.stats.messages_backward) == (1, 1)


# -- FLOPs: the measured count against torch's own counter on real tensors --------------------


def _count(fn) -> int:
    with flop_counter() as counter:  # torch's counter, with the CPU's fused attention
        fn()
    return counter.get_total_flops()


# Every block type timm's ViT-like families build: the plain Block (class token, attention pool),
# Eva's RoPE block (EVA-02: SwiGLU), SwiGLU (AIMv2), ParallelScalingBlock, ParallelThingsBlock,
# DiffParallelScalingBlock; and NaFlexVit's embedding (a linear projection of the patchified
# image, a resized position table) before plain Blocks and an attention pool.
FLOP_MODELS = {
    "naflexvit-map": ("naflexvit_base_patch16_map", {}),
    "cls-token": ("vit_tiny_patch16_224", {}),
    "map-pool": ("vit_base_patch16_siglip_224", {}),
    "eva02": ("eva02_tiny_patch14_224", {}),
    "aimv2": ("aimv2_large_patch14_224", {}),
    "parallel-scaling": ("vit_pwee_patch16_reg1_gap_256", {}),
    "parallel-things": ("vit_small_patch16_18x2_224", {}),
    "diff-parallel": ("vit_dpwee_patch16_reg1_gap_256", {}),
}


@pytest.mark.parametrize("mode", ["vpt-deep", "vpt-shallow", "linear", "full"])
@pytest.mark.parametrize("family", sorted(FLOP_MODELS))
def test_segment_flops_equal_torch_counter(family: str, mode: str) -> None:
    name, overrides = FLOP_MODELS[family]
    model = build_prompted_vit(
        name,
        mode=mode,
        num_prompts=3 if mode.startswith("vpt") else 0,
        num_classes=5,
        **{**TINY, **overrides},
    )
    plan = SplitPlan.from_sizes([2, 4])
    batch = 3
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 5, (batch,))

    measured_forward = _count(lambda: model.eval()(x))
    assert measured_forward == batch * model_forward_flops(model)
    chain = SplitChain(model, plan, OPTIMIZERS["sgd-momentum"])
    measured_step = _count(lambda: chain.train_step(x, y))
    assert sum(chain.stats().segment_flops.values()) == measured_step
    # ... and node by node: the end point alone (attention pool, head, loss)
    end = describe_segments(model, plan)[-1]
    h = model.run_blocks(model.embed(x), 0, model.depth).detach()
    h.requires_grad_(end.input_needs_grad)
    model.train()
    flops = segment_flops(model, plan)[-1]
    assert _count(lambda: F.cross_entropy(model.head_forward(h), y).backward()) == batch * (
        flops.forward + flops.backward
    )


def test_vit_b16_flops_match_torch_counter_on_the_meta_device() -> None:
    # ViT-B/16 at 224 px, 102 classes, VPT-deep with 10 prompts; shapes only (no weights). On
    # the meta device fused attention runs as plain matmuls, which torch's own counter counts.
    with torch.device("meta"):
        model = build_prompted_vit(
            "vit_base_patch16_224", mode="vpt-deep", num_prompts=10, num_classes=102
        )
        x = torch.empty(1, 3, 224, 224)
        with FlopCounterMode(display=False) as counter:
            model.eval()(x)
        measured_forward = counter.get_total_flops()
        model.train()
        with FlopCounterMode(display=False) as counter:
            model(x).sum().backward()
        measured_step = counter.get_total_flops()
    assert measured_forward == model_forward_flops(model)
    counted = segment_flops(model, plan_even(12, 3))
    # The unsplit step computes the same gradients the chain does (no input gradient at the
    # start point), so its FLOPs are the sum over segments.
    assert measured_step == sum(f.forward + f.backward for f in counted)
    assert model_forward_flops(model) == pytest.approx(2 * 17.6e9 * 207 / 197, rel=0.05)


# -- the segment description agrees with what the chain and autograd do ------------------------
class RecordingLink(InProcessLink):
    """An in-process link that also records the shape of every tensor it carries."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, tuple[int, ...]]] = []

    def send(self, tensor: torch.Tensor, direction: Direction) -> torch.Tensor:
        self.sent.append((direction, tuple(tensor.shape)))
        return super().send(tensor, direction)


def _grad_flows_into_blocks(model: PromptedViT, x: torch.Tensor) -> list[bool]:
    """Per block, whether plain autograd (no chain) makes its input require a gradient."""
    flows: list[bool] = []
    hooks = [
        block.register_forward_pre_hook(lambda _m, args: flows.append(args[0].requires_grad))
        for block in model.backbone.blocks
    ]
    try:
        model.train()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return flows


DESCRIPTION_CASES = [
    *(("registers", sizes) for sizes in ([6], [1, 5], [2, 2, 2], [3, 1, 2], [1] * 6)),
    *(("map-pool", sizes) for sizes in ([6], [3, 1, 2])),
]


@pytest.mark.parametrize("mode", ["vpt-deep", "vpt-shallow", "linear", "full"])
@pytest.mark.parametrize(("variant", "sizes"), DESCRIPTION_CASES)
def test_segment_description_agrees_with_what_happens(
    variant: str, sizes: list[int], mode: str
) -> None:
    model = build(mode, variant)
    plan = SplitPlan.from_sizes(sizes)
    spec = describe_segments(model, plan)
    named = dict(model.named_parameters())
    batch = 3
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 5, (batch,))

    # Every parameter is held by exactly one segment; `trainable` is what requires a gradient.
    held = [n for seg in spec for n in seg.params]
    assert sorted(held) == sorted(named)
    assert {n for seg in spec for n in seg.trainable} == {
        n for n, p in named.items() if p.requires_grad
    }
    assert [seg.name for seg in spec] == [
        "start",
        *(f"peer{k + 1}" for k in range(len(sizes))),
        "end",
    ]

    # Plain autograd on the unsplit model, cut by cut: whether the smashed data requires a
    # gradient, its shape, and which blocks a gradient flows through.
    h = model.train().embed(x)
    for k, (lo, hi) in enumerate(plan.ranges):
        assert tuple(h.shape[1:]) == spec[k].out_shape == spec[k + 1].in_shape
        assert h.requires_grad == spec[k + 1].input_needs_grad == spec.hop_sends_grad(k)
        h = model.run_blocks(h, lo, hi)
    assert tuple(h.shape[1:]) == spec[-2].out_shape == spec[-1].in_shape
    assert h.requires_grad == spec[-1].input_needs_grad
    assert tuple(model.head_forward(h).shape[1:]) == spec[-1].out_shape
    flows = _grad_flows_into_blocks(model, x)
    assert [sum(flows[lo:hi]) for lo, hi in plan.ranges] == [s.grad_blocks for s in spec[1:-1]]
    assert spec.first_grad_block == (flows.index(True) if any(flows) else model.depth)

    # The chain: its segments are the description, hops carry the described tensors, and a
    # step leaves gradients on exactly the described trainable parameters.
    links = [RecordingLink() for _ in range(plan.num_peers + 1)]
    chain = SplitChain(model, plan, OPTIMIZERS["sgd-momentum"], links=links)
    assert [s.spec for s in chain.segments] == list(spec)
    for seg, described in zip(chain.segments, spec, strict=True):
        owned = (
            [p for g in seg.optimizer.param_groups for p in g["params"]] if seg.optimizer else []
        )
        assert owned == [named[n] for n in described.trainable]
    for p in model.parameters():
        p.grad = None
    chain.train_step(x, y)
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert with_grad == {n for seg in spec for n in seg.trainable}
    for k, link in enumerate(links):
        sent = (batch, *spec.hop_shape(k))
        expected = [("forward", sent)] + ([("backward", sent)] if spec.hop_sends_grad(k) else [])
        assert link.sent == expected, f"hop {k}"
    for seg, flops in zip(spec, segment_flops(model, plan), strict=True):
        assert (flops.backward > 0) == seg.runs_backward, seg.name
    blocks_with_grad = {
        i
        for i, block in enumerate(model.backbone.blocks)
        if any(p.grad is not None for p in block.parameters())
    }
    assert len(blocks_with_grad) == sum(s.weight_grad_blocks for s in spec)


def test_segment_description_tokens_count_prompts_where_they_travel() -> None:
    plan = SplitPlan.from_sizes([2, 4])
    deep = describe_segments(build("vpt-deep"), plan)  # 1 class token + 16 patches, 3 prompts
    assert [(s.tokens_in, s.tokens_out, s.block_tokens) for s in deep] == [
        (0, 17, 0),
        (17, 17, 20),
        (17, 17, 20),
        (17, 0, 0),
    ]
    assert [s.edits_input for s in deep] == [False, True, True, False]
    shallow = describe_segments(build("vpt-shallow"), plan)
    assert [(s.tokens_in, s.tokens_out, s.block_tokens) for s in shallow] == [
        (0, 17, 0),
        (17, 20, 20),
        (20, 20, 20),
        (20, 0, 0),
    ]
    assert [s.edits_input for s in shallow] == [False, True, False, True]
    assert [s.sends_grad for s in shallow] == [False, False, True, True]
    linear = describe_segments(build("linear"), plan)
    assert [s.block_tokens for s in linear] == [0, 17, 17, 0]
    assert [s.trains for s in linear] == [False, False, False, True]
    assert not any(s.input_needs_grad for s in linear) and linear.first_grad_block == 6
    full = describe_segments(build("full"), plan)
    assert [s.num_trainable for s in full] == [s.num_params for s in full]
    assert [s.weight_grad_blocks for s in full] == [0, 2, 4, 0]
    with pytest.raises(ValueError, match="plan covers 4 blocks, the model has 6"):
        describe_segments(build("linear"), plan_even(4, 2))
