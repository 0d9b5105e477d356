"""The in-process link hands tensors on without copying, to the receiving node's device, and
counts exactly the bytes the wire format carries; precision and smashed-data dtype (issue 14).

No GPU here: that a link delivers to the receiving node's device is checked by the device each
link is given (from the receiving segment's parameters, under a fake device mapping too) and by
a link delivering to PyTorch's meta device, a second device every CPU build has.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gaisnet_flwr.split.chain as chain_module
from gaisnet_flwr.config import ConfigError, RunConfig
from gaisnet_flwr.costs.pricing import fine_tuning_round_cost, tensor_wire_bytes
from gaisnet_flwr.deploy.peer import check_device, parse_args
from gaisnet_flwr.derived import derive
from gaisnet_flwr.experiments.flwr_local import check_client_gpus
from gaisnet_flwr.split.chain import SplitChain
from gaisnet_flwr.split.flops import segment_flops
from gaisnet_flwr.split.link import (
    Direction,
    InProcessLink,
    LinkError,
    dim_order,
    serialize_tensor,
    wire_bytes,
)
from gaisnet_flwr.split.plan import SplitPlan
from gaisnet_flwr.split.precision import SMASHED_DTYPES, Precision, resolve_device, to_wire
from gaisnet_flwr.vit.model import PromptedViT, build_prompted_vit
from tests.conftest import TINY, VARIANTS

SGD = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731


def build(mode: str = "vpt-deep", variant: str = "cls-token") -> PromptedViT:
    name, overrides = VARIANTS[variant]
    prompts = 3 if mode.startswith("vpt") else 0
    torch.manual_seed(0)
    return build_prompted_vit(
        name, mode=mode, num_prompts=prompts, num_classes=5, **{**TINY, **overrides}
    )


class CheckingLink(InProcessLink):
    """An in-process link that also serializes what it put on the wire and checks that the
    bytes it counted are that payload's length."""

    def __init__(self, device: torch.device, wire_dtype: torch.dtype | None) -> None:
        super().__init__(device, wire_dtype)
        self.seen: list[tuple[torch.dtype, tuple[int, ...], bool]] = []

    def send(self, tensor: torch.Tensor, direction: Direction) -> torch.Tensor:
        before = self.stats.bytes_forward + self.stats.bytes_backward
        out = super().send(tensor, direction)
        counted = self.stats.bytes_forward + self.stats.bytes_backward - before
        wire = self.wire_dtype or tensor.dtype
        on_wire = to_wire(tensor.detach(), wire)
        assert counted == len(serialize_tensor(on_wire)), (tensor.dtype, tuple(tensor.shape))
        self.seen.append((on_wire.dtype, tuple(tensor.shape), dim_order(tensor) is not None))
        return out


# -- counted bytes == serialized bytes ------------------------------------------------------------
SHAPES = [(), (7,), (10, 5), (3, 17, 64), (2, 4, 3, 3), (0, 4)]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]
)
@pytest.mark.parametrize("shape", SHAPES)
def test_wire_bytes_is_the_serialized_length(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = torch.ones(shape).to(dtype)
    assert wire_bytes(t) == len(serialize_tensor(t))
    if len(shape) == 3:  # a permuted layout (a prefix-free ViT's tokens) adds its dim order
        permuted = torch.ones(shape[0], shape[2], shape[1]).to(dtype).transpose(1, 2)
        assert dim_order(permuted) is not None
        assert wire_bytes(permuted) == len(serialize_tensor(permuted)) == wire_bytes(t) + 3
    sliced = torch.ones(4, 6).to(dtype)[:, ::2]  # not dense: sent as a packed copy
    assert wire_bytes(sliced) == len(serialize_tensor(sliced))
    # The cost model's projection uses the same header.
    size = dtype.itemsize
    assert tensor_wire_bytes(shape, size) == wire_bytes(t)


def test_wire_bytes_refuses_what_the_wire_cannot_carry() -> None:
    with pytest.raises(LinkError, match="complex64 cannot be sent"):
        wire_bytes(torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize("smashed", list(SMASHED_DTYPES))
@pytest.mark.parametrize("compute", ["fp32", "bf16"])
@pytest.mark.parametrize(("mode", "variant"), [("vpt-deep", "cls-token"), ("full", "avg-pool")])
def test_every_tensor_a_chain_sends_is_counted_as_serialized(
    compute: str, smashed: str, mode: str, variant: str
) -> None:
    # Smashed data forward, gradients back, logits to the start point, in every precision;
    # avg-pool (no prefix token) sends tokens in a permuted layout.
    model = build(mode, variant)
    precision = Precision(compute, smashed)
    plan = SplitPlan.from_sizes([2, 1, 3])
    wire = precision.wire_dtype
    links = [CheckingLink(torch.device("cpu"), wire) for _ in range(plan.num_peers + 1)]
    result = CheckingLink(torch.device("cpu"), None)
    chain = SplitChain(model, plan, SGD, links=links, result_link=result, precision=precision)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    chain.train_step(x, y)
    chain.infer(x)
    sent = {s for link in links for s in link.seen}
    assert {dtype for dtype, _, _ in sent} == {wire}
    assert len(sent) >= 1 and all(shape[0] == 4 for _, shape, _ in sent)
    if variant == "avg-pool":
        assert any(permuted for _, _, permuted in sent)
    # Results are not smashed data: logits travel as the end point computed them.
    logits = torch.bfloat16 if compute == "bf16" else torch.float32
    assert result.seen and result.seen[0][:2] == (logits, (4, 5))
    # the labels the network transport sends with the smashed data (deploy/remote.py)
    assert wire_bytes(y) == len(serialize_tensor(y))


# -- no copy, detached, on the receiver's device --------------------------------------------------
def test_an_in_process_hop_hands_the_tensor_on_without_copying() -> None:
    h = torch.randn(3, 5, 8, requires_grad=True) * 2  # part of the sender's graph
    link = InProcessLink("cpu")
    got = link.send(h, "forward")
    assert got.data_ptr() == h.data_ptr()  # the same memory: no copy
    assert got is not h and not got.requires_grad and got.grad_fn is None  # detached
    assert link.stats.bytes_forward == len(serialize_tensor(h))
    permuted = torch.randn(2, 8, 5).transpose(1, 2)
    assert link.send(permuted, "forward").stride() == permuted.stride()  # its layout kept
    sliced = torch.randn(4, 6)[:, ::2]
    packed = link.send(sliced, "forward")
    assert packed.is_contiguous() and torch.equal(packed, sliced)  # as the wire delivers it


@pytest.mark.parametrize(("smashed", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_smashed_data_travel_rounded_and_arrive_in_their_own_dtype(
    smashed: str, dtype: torch.dtype
) -> None:
    h = torch.randn(4, 17, 64)
    link = InProcessLink("cpu", SMASHED_DTYPES[smashed])
    got = link.send(h, "forward")
    assert got.dtype == torch.float32 and torch.equal(got, h.to(dtype).float())
    assert link.stats.bytes_forward == len(serialize_tensor(h.to(dtype)))
    labels = torch.arange(4)
    assert link.send(labels, "forward").dtype == torch.int64  # not smashed data: as it is


def test_a_link_delivers_to_its_device() -> None:
    # The meta device stands in for a GPU: the link moves what it hands on to its device.
    link = InProcessLink("meta", torch.bfloat16)
    got = link.send(torch.randn(2, 3), "forward")
    assert got.device.type == "meta" and got.dtype == torch.float32
    assert link.stats.bytes_forward == 2 + 16 + 2 * 3 * 2


def test_links_deliver_to_the_receiving_segments_device(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build()
    plan = SplitPlan.from_sizes([2, 2, 2])
    chain = SplitChain(model, plan, SGD, precision=Precision(smashed="bf16"))
    devices = [s.device for s in chain.segments]
    assert devices == [torch.device("cpu")] * 5
    assert [link.device for link in chain.links] == devices[1:]  # type: ignore[attr-defined]
    assert [link.wire_dtype for link in chain.links] == [torch.bfloat16] * 4  # type: ignore[attr-defined]
    assert chain.result_link.device == devices[0]  # type: ignore[attr-defined]

    # A fake placement, node k on "cuda:k" (no GPU needed to build the chain): each link is
    # given the device of the segment it delivers to, the result link the start point's.
    def fake(params: list[torch.nn.Parameter], fallback: torch.device) -> torch.device:
        node = next(k for k, ids in enumerate(owned) if id(params[0]) in ids)
        return torch.device("cuda", node)

    named = dict(model.named_parameters())
    owned = [
        {id(named[n]) for n in spec.params} for spec in chain_module.describe_segments(model, plan)
    ]
    monkeypatch.setattr(chain_module, "tensor_device", fake)
    placed = SplitChain(model, plan, SGD)
    cuda = [torch.device("cuda", k) for k in range(5)]
    assert [s.device for s in placed.segments] == cuda
    assert [link.device for link in placed.links] == cuda[1:]  # type: ignore[attr-defined]
    assert placed.result_link.device == cuda[0]  # type: ignore[attr-defined]


def test_a_segment_on_two_devices_is_refused() -> None:
    from gaisnet_flwr.split.precision import tensor_device

    a = torch.nn.Parameter(torch.zeros(1))
    b = torch.nn.Parameter(torch.zeros(1, device="meta"))
    with pytest.raises(ValueError, match="several devices"):
        tensor_device([a, b], torch.device("cpu"))


# -- precision ------------------------------------------------------------------------------------
def unsplit_step(model: PromptedViT, x, y, precision: Precision) -> float:
    opt = SGD(model.tunable_parameters())
    opt.zero_grad(set_to_none=True)
    model.train()
    device = torch.device("cpu")
    with precision.forward(device):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    with precision.backward(device):
        loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("compute", ["tf32", "bf16"])
def test_with_fp32_smashed_data_the_chain_equals_the_unsplit_model_in_every_precision(
    compute: str,
) -> None:
    # CPU: tf32 is fp32; bf16 autocast runs the same casts in the same ops split or not, and
    # the residual stream (what the hops carry) stays float32.
    model = build()
    other = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    precision = Precision(compute)
    for _ in range(2):
        expected = unsplit_step(model, x, y, precision)
        got = SplitChain(other, SplitPlan.from_sizes([2, 1, 3]), SGD, precision=precision)
        step = got.train_step(x, y)
        assert step.loss == expected
    for key, value in model.tunable_state().items():
        assert torch.equal(other.tunable_state()[key], value), key
        assert value.dtype == torch.float32  # prompts and head stay float32


def test_bf16_autocast_keeps_parameters_and_optimizer_state_in_fp32() -> None:
    model = build()
    chain = SplitChain(model, SplitPlan.from_sizes([3, 3]), SGD, precision=Precision("bf16"))
    chain.train_step(torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,)))
    for segment in chain.segments:
        for p in segment.params:
            assert p.dtype == torch.float32 and p.grad is not None
            assert p.grad.dtype == torch.float32
        if segment.optimizer is not None:
            for state in segment.optimizer.state.values():
                assert state["momentum_buffer"].dtype == torch.float32


def test_bf16_smashed_data_halve_the_counted_and_priced_d2d_bytes() -> None:
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    plan = SplitPlan.from_sizes([2, 2, 2])
    cluster = derive(RunConfig()).cluster
    stats, costs = {}, {}
    for smashed in ("fp32", "bf16", "fp16"):
        model = build()
        chain = SplitChain(model, plan, SGD, precision=Precision(smashed=smashed))
        chain.train_step(x, y)
        stats[smashed] = chain.stats()
        costs[smashed] = fine_tuning_round_cost(
            cluster,
            segment_flops(model, plan),
            stats[smashed].hop_bytes_forward,
            stats[smashed].hop_bytes_backward,
            samples=8,
            upload_bytes=0,
            download_bytes=0,
        )
    full = stats["fp32"]
    for half in (stats["bf16"], stats["fp16"]):
        # Every message's data is halved; its header (2 + 8 * 3 bytes) is not.
        messages = sum(1 for b in full.hop_bytes_forward + full.hop_bytes_backward if b)
        headers = 26 * messages
        assert (
            half.d2d_bytes_forward + half.d2d_bytes_backward - headers
            == (full.d2d_bytes_forward + full.d2d_bytes_backward - headers) // 2
        )
    # The cost model prices what travelled.
    assert costs["bf16"].d2d_bytes == stats["bf16"].d2d_bytes_forward + (
        stats["bf16"].d2d_bytes_backward
    )
    assert costs["bf16"].d2d_bytes < 0.51 * costs["fp32"].d2d_bytes
    assert costs["bf16"].d2d_s < 0.51 * costs["fp32"].d2d_s


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("precision", "fp16", "precision='fp16' is not valid; choose one of fp32, tf32, bf16"),
        ("smashed-dtype", "int8", "smashed-dtype='int8' is not valid; choose one of fp32, bf16"),
    ],
)
def test_bad_precision_values_are_refused_up_front(key: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        RunConfig.from_run_config({key: value})


def test_precision_comes_from_the_run_config() -> None:
    cfg = RunConfig.from_run_config({"precision": "bf16", "smashed-dtype": "fp16"})
    assert Precision(cfg.run.precision, cfg.run.smashed_dtype) == Precision("bf16", "fp16")
    run = RunConfig().run
    assert Precision(run.precision, run.smashed_dtype) == Precision("fp32", "fp32")


# -- devices: auto, and a peer's --device ---------------------------------------------------------
def test_auto_uses_the_gpu_this_process_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under Ray, a ClientApp with client-resources-num-gpus > 0 sees its GPU as cuda:0.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(RunConfig().run.device) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(RunConfig().run.device) == torch.device("cpu")


def test_a_peer_checks_its_device_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is available here"):
        check_device("cuda:0")
    with pytest.raises(ValueError, match="not a torch device"):
        check_device("gpu0")
    with pytest.raises(ValueError, match="runs on cpu or cuda"):
        check_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"has 2 CUDA device\(s\): cuda:0..cuda:1"):
        check_device("cuda:2")


def test_gaisnet_peer_refuses_cuda_without_a_gpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        parse_args(["--listen", "127.0.0.1:0", "--insecure", "--device", "cuda:0"])
    assert "no CUDA device is available here" in capsys.readouterr().err


def test_the_simulation_asks_ray_only_for_gpus_that_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    check_client_gpus(0.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU is available here"):
        check_client_gpus(0.25)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_client_gpus(0.25)  # four clusters share the GPU
    check_client_gpus(1.0)
    with pytest.raises(ValueError, match="a fraction of one GPU"):
        check_client_gpus(1.5)
    with pytest.raises(ValueError, match="this machine has 1 GPU"):
        check_client_gpus(2.0)
    with pytest.raises(ValueError, match="finite number >= 0"):
        check_client_gpus(-1.0)
