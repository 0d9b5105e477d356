"""The cost model (paper Sec. III-C.2 / III-D.2 key metrics) against hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gaisnet_flwr.costs.memory import measure_saved_activation_bytes, segment_memory
from gaisnet_flwr.costs.pricing import (
    ClusterProfile,
    compute_energy_j,
    compute_time_s,
    fedavg_time_s,
    fine_tuning_round_cost,
    hierarchy_round_latency,
    inference_cost,
    tensor_wire_bytes,
    tx_energy_j,
    tx_time_s,
)
from gaisnet_flwr.costs.profiles import (
    DEVICE_PRESETS,
    LINK_PRESETS,
    CostConfigError,
    DeviceProfile,
    LinkProfile,
    load_profiles,
    shannon_rate_bps,
)
from gaisnet_flwr.split.chain import SplitChain
from gaisnet_flwr.split.flops import SegmentFlops
from gaisnet_flwr.split.link import serialize_tensor
from gaisnet_flwr.split.plan import SplitPlan, plan_even
from gaisnet_flwr.vit.model import PromptedViT, build_prompted_vit
from tests.conftest import TINY, VARIANTS

pytestmark = pytest.mark.usefixtures("one_thread")


# -- formulas ---------------------------------------------------------------------------------
def snr_db(bandwidth_hz: float, distance_m: float, power_w: float) -> float:
    """The same link budget in dB, written independently: P_tx(dBm) - PL - N0 B (dBm)."""
    p_dbm = 10 * math.log10(power_w * 1000)
    path_loss = 128.1 + 37.6 * math.log10(distance_m / 1000)
    return p_dbm - path_loss - (-174 + 10 * math.log10(bandwidth_hz))


@pytest.mark.parametrize(("distance_m", "anchor_bps"), [(50, 19e6), (500, 6.7e6)])
def test_shannon_rate_matches_the_anchor_examples(distance_m: float, anchor_bps: float) -> None:
    rate = shannon_rate_bps(1e6, distance_m, 0.2)
    expected = 1e6 * math.log2(1 + 10 ** (snr_db(1e6, distance_m, 0.2) / 10))
    assert rate == pytest.approx(expected, rel=1e-12)
    assert rate == pytest.approx(anchor_bps, rel=0.02)  # anchors.md: ~19 and ~6.7 Mbps
    assert LINK_PRESETS[f"d2d-{distance_m}m"].rate_bps() == pytest.approx(rate)


def test_compute_and_transmission_formulas() -> None:
    phone = DeviceProfile("p", clock_hz=1e9, flops_per_cycle=12)
    assert compute_time_s(1.2e10, phone) == pytest.approx(1.0)  # 1.2e10 / (1e9 * 12)
    assert compute_energy_j(1.2e10, phone) == pytest.approx(0.1)  # 1e-28 * 1e9 cycles * 1e18
    wired = LinkProfile("w", "edge-cloud", wired_rate_bps=8e6, tx_power_w=0.5)
    assert wired.rate_bps() == 8e6
    assert tx_time_s(2e6, wired) == pytest.approx(2.0)  # 16 Mbit at 8 Mbit/s
    assert tx_energy_j(2e6, wired) == pytest.approx(1.0)  # 0.5 W * 2 s
    assert tx_energy_j(1e6, LinkProfile("free", "edge-cloud", wired_rate_bps=1e9)) == 0.0


@pytest.mark.parametrize("shape", [(), (7,), (2, 197, 768), (3, 1, 4, 5)])
def test_tensor_wire_bytes_equals_the_serialized_length(shape: tuple[int, ...]) -> None:
    assert tensor_wire_bytes(shape) == len(serialize_tensor(torch.zeros(shape)))
    if len(shape) > 1:  # a permuted layout (prefix-free tokens) also carries its dim order
        permuted = torch.zeros(shape[::-1]).permute(*reversed(range(len(shape))))
        assert tensor_wire_bytes(shape, permuted=True) == len(serialize_tensor(permuted))


# -- a two-peer cluster, by hand --------------------------------------------------------------
def hand_cluster() -> ClusterProfile:
    """Round numbers: 1e10 FLOP/s and 1e-11 J/FLOP per device; D2D 1 MB/s at 0.1 W; uplink
    100 KB/s at 0.2 W."""
    devices = [DeviceProfile(n, clock_hz=1e9, flops_per_cycle=10) for n in "ABCD"]
    d2d = LinkProfile("wire", "d2d", wired_rate_bps=8e6, tx_power_w=0.1)
    uplink = LinkProfile("up", "client-edge", wired_rate_bps=8e5, tx_power_w=0.2)
    return ClusterProfile(devices=devices, hops=[d2d] * 3, uplink=uplink)


G = 10**9
# per sample: the start point runs forward only (its embedding is frozen)
FLOPS = [
    SegmentFlops(G, 0),
    SegmentFlops(2 * G, 4 * G),
    SegmentFlops(3 * G, 6 * G),
    SegmentFlops(G // 10, G // 5),
]


def test_fine_tuning_round_cost_by_hand() -> None:
    cost = fine_tuning_round_cost(
        hand_cluster(),
        FLOPS,
        hop_bytes_forward=[10**6] * 3,
        hop_bytes_backward=[0, 10**6, 10**6],  # the start point trains nothing
        samples=10,
        upload_bytes=10**5,
        download_bytes=2 * 10**5,
    )
    by_name = {n.name: n for n in cost.nodes}
    assert list(by_name) == ["start", "peer1", "peer2", "end"]
    # compute: (fwd + bwd) * 10 samples / 1e10 FLOP/s; energy 1e-11 J per FLOP
    assert [n.compute_s for n in cost.nodes] == pytest.approx([1.0, 6.0, 9.0, 0.3])
    assert [n.compute_j for n in cost.nodes] == pytest.approx([0.1, 0.6, 0.9, 0.03])
    # the sender pays: start sends hop 0 + the upload, peer2 hop 2 and the gradient of hop 1,
    # the end point the gradient of hop 2
    assert [n.tx_bytes for n in cost.nodes] == [1_100_000, 10**6, 2 * 10**6, 10**6]
    assert [n.tx_s for n in cost.nodes] == pytest.approx([2.0, 1.0, 2.0, 1.0])
    assert [n.tx_j for n in cost.nodes] == pytest.approx([0.3, 0.1, 0.2, 0.1])
    assert cost.download_s == pytest.approx(2.0)
    assert cost.upload_s == pytest.approx(1.0)
    assert cost.latency_s == pytest.approx(2.0 + 16.3 + 6.0)  # download + compute + every send
    assert cost.energy_j == pytest.approx(1.63 + 0.7)
    assert cost.compute_flops == pytest.approx(1.63e11)
    assert cost.d2d_s == pytest.approx(5.0)
    assert (cost.cs_download_bytes, cost.cs_upload_bytes, cost.cs_bytes) == (
        200_000,
        100_000,
        300_000,
    )
    assert (cost.d2d_forward_bytes, cost.d2d_backward_bytes) == (3 * 10**6, 2 * 10**6)
    assert cost.bottleneck_s == pytest.approx(11.0)  # peer2: 9 s compute + 2 s sending


def test_inference_cost_by_hand() -> None:
    cost = inference_cost(
        hand_cluster(), FLOPS, hop_bytes=[10**5] * 3, result_bytes=1000, samples=2
    )
    assert [n.compute_s for n in cost.nodes] == pytest.approx([0.2, 0.4, 0.6, 0.02])  # forward only
    assert [n.tx_s for n in cost.nodes] == pytest.approx([0.1, 0.1, 0.1, 0.001])  # end -> start
    assert cost.latency_s == pytest.approx(1.22 + 0.301)
    assert (cost.d2d_forward_bytes, cost.d2d_backward_bytes, cost.cs_bytes) == (301_000, 0, 0)


def test_an_edge_round_is_the_slowest_cluster_plus_fedavg() -> None:
    edge = DeviceProfile("edge", clock_hz=1e9, flops_per_cycle=10)  # 1e10 FLOP/s
    backhaul = LinkProfile("bh", kind="edge-cloud", wired_rate_bps=8e6)
    slow = inference_cost(hand_cluster(), FLOPS, [0] * 3, 0, samples=10)
    # 1,000 tunable parameters from 5 clusters: 2 FLOPs each on the edge.
    assert fedavg_time_s(1000, 5, edge) == pytest.approx(2 * 1000 * 5 / 1e10)
    edge_only = hierarchy_round_latency(slow.latency_s, 1000, 5, 1, False, edge, backhaul)
    assert edge_only == pytest.approx(slow.latency_s + fedavg_time_s(1000, 5, edge))
    with pytest.raises(CostConfigError, match="clusters and edges >= 1"):
        hierarchy_round_latency(slow.latency_s, 1000, 0, 1, False, edge, backhaul)
    with pytest.raises(CostConfigError, match="slowest_cluster_s must be >= 0"):
        hierarchy_round_latency(-1.0, 1000, 5, 1, False, edge, backhaul)


def test_the_chain_counts_one_smashed_tensor_per_step_and_hop() -> None:
    model = build_prompted_vit(mode="vpt-deep", num_prompts=2, num_classes=5, **TINY)
    plan = plan_even(6, 2)
    chain = SplitChain(model, plan, lambda ps: torch.optim.SGD(ps, lr=0.1))
    for _ in range(2):
        chain.train_step(torch.randn(3, 3, 32, 32), torch.randint(0, 5, (3,)))
    stats = chain.stats()
    # one smashed tensor [3, 1 + 16, 32] per step and hop
    assert stats.hop_bytes_forward == [2 * tensor_wire_bytes((3, 17, 32))] * 3


# -- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(kind="d2d", bandwidth_hz=-1.0, distance_m=50, tx_power_w=0.2),
            "'l'.*bandwidth_hz must be > 0",
        ),
        (
            dict(kind="d2d", bandwidth_hz=1e6, distance_m=0, tx_power_w=0.2),
            "'l'.*distance_m must be > 0",
        ),
        (
            dict(kind="wifi", wired_rate_bps=1e6),
            "unknown kind 'wifi'; valid kinds: d2d, client-edge",
        ),
        (dict(kind="d2d", bandwidth_hz=1e6), "'l'.*needs distance_m, tx_power_w"),
        (
            dict(kind="edge-cloud", wired_rate_bps=1e9, distance_m=5),
            "wired link.*takes no distance_m",
        ),
        (dict(kind="edge-cloud", wired_rate_bps=0.0), "wired_rate_bps must be > 0"),
    ],
)
def test_link_validation_names_the_profile_and_field(kwargs: dict, message: str) -> None:
    with pytest.raises(CostConfigError, match=message):
        LinkProfile("l", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(clock_hz=0.0, flops_per_cycle=8), "'d'.*clock_hz must be > 0"),
        (dict(clock_hz=1e9, flops_per_cycle=8, kappa=-1e-28), "'d'.*kappa must be >= 0"),
        (dict(clock_hz=1e9, flops_per_cycle=8, memory_bytes=0), "memory_bytes must be > 0"),
    ],
)
def test_device_validation_names_the_profile_and_field(kwargs: dict, message: str) -> None:
    with pytest.raises(CostConfigError, match=message):
        DeviceProfile("d", **kwargs)


def test_cluster_validation() -> None:
    ok = hand_cluster()
    devices, hops = list(ok.devices), list(ok.hops)
    with pytest.raises(CostConfigError, match="node 'peer2' has no device profile"):
        ClusterProfile([*devices[:2], None, devices[3]], hops, ok.uplink)  # type: ignore[list-item]
    with pytest.raises(CostConfigError, match="4 nodes need 3 hop link"):
        ClusterProfile(devices, hops[:2], ok.uplink)
    with pytest.raises(CostConfigError, match="hop peer1->peer2 has no link profile"):
        ClusterProfile(devices, [hops[0], None, hops[2]], ok.uplink)  # type: ignore[list-item]
    with pytest.raises(CostConfigError, match="uplink: link 'wire' is d2d, not client-edge"):
        ClusterProfile(devices, hops, hops[0])
    loud = LinkProfile("loud", "d2d", bandwidth_hz=1e6, distance_m=50, tx_power_w=1.0)
    with pytest.raises(CostConfigError, match="hop start->peer1: link 'loud' transmits at 1.0 W"):
        ClusterProfile(devices, [loud, *hops[1:]], ok.uplink)
    with pytest.raises(CostConfigError, match="at least one peer"):
        ClusterProfile(devices[:2], hops[:1], ok.uplink)
    with pytest.raises(CostConfigError, match="4 nodes need 4 SegmentFlops"):
        fine_tuning_round_cost(ok, FLOPS[:3], [0] * 3, [0] * 3, 1, 0, 0)
    with pytest.raises(CostConfigError, match="backward hop_bytes\\[1\\] must be >= 0"):
        fine_tuning_round_cost(ok, FLOPS, [0] * 3, [0, -1, 0], 1, 0, 0)


# -- presets and TOML -------------------------------------------------------------------------
def test_presets_follow_the_anchor_ranges() -> None:
    for name in ("phone-low", "phone-mid", "phone-high"):
        phone = DEVICE_PRESETS[name]
        assert 0.5e9 <= phone.clock_hz <= 2e9 and 8 <= phone.flops_per_cycle <= 16
        assert phone.tx_power_w == 0.2
    assert 2.5e9 <= DEVICE_PRESETS["edge-server"].clock_hz <= 3.5e9
    assert LINK_PRESETS["backhaul-1gbps"].rate_bps() == 1e9
    assert LINK_PRESETS["uplink-1mhz"].kind == "client-edge"


def test_unknown_profile_name_lists_the_valid_ones() -> None:
    with pytest.raises(
        CostConfigError, match="unknown device profile 'tablet'; valid: edge-server, phone-high"
    ):
        load_profiles().device("tablet")
    with pytest.raises(
        CostConfigError, match="unknown link profile 'lte'; valid: backhaul-1gbps, d2d-500m"
    ):
        ClusterProfile.from_names(load_profiles(), ["phone-mid"] * 3, "lte", "uplink-1mhz")


def test_toml_adds_and_overrides_profiles(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(
        "[devices.phone-mid]\nclock_hz = 1.5e9\n"  # override one field of a preset
        "[devices.tablet]\nclock_hz = 2e9\nflops_per_cycle = 16\nmemory_bytes = 6e9\n"
        '[links.d2d-100m]\nkind = "d2d"\nbandwidth_hz = 5e6\ndistance_m = 100\ntx_power_w = 0.1\n'
    )
    profiles = load_profiles(path)
    mid = profiles.device("phone-mid")
    assert (mid.clock_hz, mid.flops_per_cycle) == (
        1.5e9,
        DEVICE_PRESETS["phone-mid"].flops_per_cycle,
    )
    assert profiles.device("tablet").memory_bytes == 6 * 10**9
    assert profiles.link("d2d-100m").rate_bps() == pytest.approx(shannon_rate_bps(5e6, 100, 0.1))
    assert profiles.link("d2d-50m") == LINK_PRESETS["d2d-50m"]  # the rest stay
    assert DEVICE_PRESETS["phone-mid"].clock_hz == 1.0e9  # presets are not mutated


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[devices.phone-mid]\nclockhz = 1e9\n",
            r"\[devices.phone-mid\]: unknown key\(s\) \['clockhz'\]",
        ),
        ("[devices.x]\nclock_hz = 1e9\n", r"\[devices.x\]: .*flops_per_cycle"),
        (
            '[links.d2d-50m]\ndistance_m = "far"\n',
            r"\[links.d2d-50m\]: distance_m must be a number",
        ),
        ("[links.d2d-50m]\ndistance_m = -3\n", "link 'd2d-50m': distance_m must be > 0"),
        ("[phones.x]\n", r"unknown table\(s\) \['phones'\]"),
    ],
)
def test_toml_errors_name_the_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(CostConfigError, match=message):
        load_profiles(path)


# -- memory -----------------------------------------------------------------------------------
def measured_activations(model: PromptedViT, plan: SplitPlan, batch: int) -> list[int]:
    """Saved-for-backward bytes per node, measured on the segments as the chain runs them."""
    model.train()
    params = [*model.parameters(), *model.buffers()]  # the model holds them anyway
    x = torch.randn(batch, *model.image_shape)
    y = torch.randint(0, model.backbone.num_classes, (batch,))
    measured = [measure_saved_activation_bytes(model.embed, x, exclude=params)]
    h = model.embed(x).detach()
    trains = model.mode == "full"
    for lo, hi in plan.ranges:
        h_in = h.requires_grad_(
            trains
        )  # the chain asks for a gradient once anything upstream trains
        measured.append(
            measure_saved_activation_bytes(
                lambda t, lo=lo, hi=hi: model.run_blocks(t, lo, hi), h_in, exclude=params
            )
        )
        h = model.run_blocks(h_in, lo, hi).detach()
        trains = trains or any(
            model.prompt(i).tokens.requires_grad for i in range(lo, hi) if i < len(model.prompts)
        )
    loss = lambda t: F.cross_entropy(model.head_forward(t), y)  # noqa: E731
    measured.append(measure_saved_activation_bytes(loss, h.requires_grad_(trains), exclude=params))
    return measured


# Every prefix/pooling layout under vpt-deep; every mode on the class token, on average
# pooling (whose fc_norm replaces the final norm) and on an attention pool (MAP, trained with the
# head); the explicit attention path on two modes; and every other block type timm's ViTs build.
BLOCKS = {
    "eva02": ("eva02_tiny_patch14_224", {}),  # RoPE, SwiGLU
    "dinov3": ("vit_small_patch16_dinov3", {}),
    "aimv2": ("aimv2_large_patch14_224", {}),
    "parallel-scaling": ("vit_pwee_patch16_reg1_gap_256", {}),
    "parallel-things": ("vit_small_patch16_18x2_224", {}),
    "diff-parallel": ("vit_dpwee_patch16_reg1_gap_256", {}),
    "relpos": ("vit_relpos_small_patch16_224", {}),
    "beit": ("beit_base_patch16_224", {}),
    "naflexvit": ("naflexvit_base_patch16_map", {}),  # its own embedding module, attention pool
}
MEMORY_CASES = [
    *((variant, "vpt-deep", True) for variant in sorted(VARIANTS)),
    *(("cls-token", mode, True) for mode in ("vpt-shallow", "linear", "full")),
    *(("avg-pool", mode, True) for mode in ("vpt-shallow", "linear", "full")),
    *(("map-pool", mode, True) for mode in ("vpt-shallow", "linear", "full")),
    *(("cls-token", mode, False) for mode in ("vpt-deep", "full")),
    *(("map-pool", mode, False) for mode in ("vpt-deep", "linear")),
    *((block, "full", True) for block in sorted(BLOCKS)),
    *((block, "vpt-deep", True) for block in sorted(BLOCKS) if block not in ("relpos", "beit")),
]


@pytest.mark.parametrize(("variant", "mode", "fused"), MEMORY_CASES)
def test_activation_estimate_equals_saved_tensors(variant: str, mode: str, fused: bool) -> None:
    # What the meter measures on fake tensors is what autograd saves on the real run, node by
    # node, for every block type.
    name, overrides = {**VARIANTS, **BLOCKS}[variant]
    prompts = 3 if mode.startswith("vpt") else 0
    model = build_prompted_vit(
        name, mode=mode, num_prompts=prompts, num_classes=5, **{**TINY, **overrides}
    )
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    plan = SplitPlan.from_sizes([1, 2, 3])
    estimate = [f.activations for f in segment_memory(model, plan, batch_size=2)]
    torch.manual_seed(0)
    assert estimate == measured_activations(model, plan, batch=2)


def test_activation_estimate_for_vit_b16_blocks() -> None:
    # ViT-B/16 at 224 px with 10 deep prompts: 207 tokens, d = 768; two blocks keep it fast.
    model = build_prompted_vit(
        "vit_base_patch16_224", mode="vpt-deep", num_prompts=10, num_classes=102, depth=2
    )
    plan = plan_even(2, 2)
    estimate = [f.activations for f in segment_memory(model, plan, batch_size=2)]
    measured = measured_activations(model, plan, batch=2)
    assert estimate == measured
    assert measured[1] > 12e6  # a ViT-B block keeps ~6.4 MB per sample for backward


def test_weights_gradients_and_optimizer_state_per_node() -> None:
    model = build_prompted_vit(mode="vpt-deep", num_prompts=3, num_classes=5, **TINY)
    plan = SplitPlan.from_sizes([2, 4])
    sgd = segment_memory(model, plan, batch_size=4, optimizer="sgd")
    adamw = segment_memory(model, plan, batch_size=4, optimizer="adamw")
    plain = segment_memory(model, plan, batch_size=4, optimizer="sgd", momentum=0.0)
    assert [f.name for f in sgd] == ["start", "peer1", "peer2", "end"]
    assert sum(f.weights for f in sgd) == 4 * model.num_total()
    prompt_bytes = 3 * 32 * 4  # one prompt module: 3 tokens x 32 wide, fp32
    head_bytes = 4 * (32 * 5 + 5)
    assert [f.gradients for f in sgd] == [0, 2 * prompt_bytes, 4 * prompt_bytes, head_bytes]
    assert [f.optimizer_state for f in sgd] == [f.gradients for f in sgd]  # momentum: 1x
    assert [f.optimizer_state for f in adamw] == [2 * f.gradients for f in sgd]  # two moments
    assert [f.optimizer_state for f in plain] == [0] * 4
    for f in sgd:
        assert f.training == f.weights + f.gradients + f.optimizer_state + f.activations + f.smashed
        if f.name.startswith("peer"):  # a block's working set is freed block by block
            assert f.inference < f.training
    with pytest.raises(CostConfigError, match="unknown optimizer 'lion'; valid: sgd, adamw"):
        segment_memory(model, plan, batch_size=4, optimizer="lion")


@pytest.mark.parametrize("mode", ["vpt-deep", "vpt-shallow", "linear", "full"])
def test_smashed_data_per_node_is_what_its_hops_carry(mode: str) -> None:
    # vpt-shallow: the start point sends [B, P + N, D]; peer 1 inserts the prompt and sends
    # [B, P + n + N, D] on. Each node holds what it receives and sends (where autograd does not).
    model = build_prompted_vit(
        mode=mode, num_prompts=3 if mode.startswith("vpt") else 0, num_classes=5, **TINY
    )
    plan = SplitPlan.from_sizes([2, 4])
    chain = SplitChain(model, plan, lambda ps: torch.optim.SGD(ps, lr=0.1))
    batch = 4
    chain.train_step(torch.randn(batch, 3, 32, 32), torch.randint(0, 5, (batch,)))
    header = 2 + 8 * 3
    hop = [(b - header) // batch for b in chain.stats().hop_bytes_forward]  # bytes per sample
    start, peer1, *_ = segment_memory(model, plan, batch_size=batch)
    image = batch * 3 * 32 * 32 * 4
    assert start.smashed == (0 if mode == "full" else image) + batch * hop[0]
    # A no-grad embedding holds the images and, at its peak, the convolution's output, the
    # tokens with the class token and their sum with the position embedding.
    assert image + batch * hop[0] <= start.inference_activations <= image + 3 * batch * hop[0]
    received_saved = mode == "full"  # its first LayerNorm keeps the tokens it received
    assert peer1.smashed == (0 if received_saved else batch * hop[0]) + batch * hop[1]


def test_hierarchy_round_latency_by_hand() -> None:
    edge = DeviceProfile("edge", clock_hz=1e9, flops_per_cycle=10)  # 1e10 FLOP/s
    backhaul = LinkProfile("bh", kind="edge-cloud", wired_rate_bps=8e6)  # 1 MB/s
    # 1,000 tunable parameters, 4 clusters, 2 edges.
    plain = hierarchy_round_latency(3.0, 1000, 4, 2, False, edge, backhaul)
    assert plain == pytest.approx(3.0 + 2 * 1000 * 4 / 1e10)
    cloud = hierarchy_round_latency(3.0, 1000, 4, 2, True, edge, backhaul)
    # + each of 2 edges sends 4,000 B up and gets 4,000 B back at 1 MB/s, + the cloud's average.
    assert cloud == pytest.approx(plain + 2 * 2 * 4000 / 1e6 + 2 * 1000 * 2 / 1e10)
    assert hierarchy_round_latency(3.0, 1000, 4, 1, True, edge, backhaul) == pytest.approx(plain)
