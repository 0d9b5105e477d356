"""What the network transport costs: the split chain in-process vs over `gaisnet-peer` processes.

Starts K + 1 real `gaisnet-peer` processes on loopback (K peers and the end point), then times
training steps of the same chain both ways, interleaved, median of the repeats, and checks that
both ways train to the same modules. On loopback the difference is serialization, gRPC and
process hops, not radio: the cost model prices the radio (scripts/cost_report.py).

    python scripts/bench_network.py --models tiny vit-b16 --peers 3 --batch 8 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

from gaisnet_flwr.experiments.bench_chain import MODELS  # noqa: E402  (the same two model shapes)
from gaisnet_flwr.experiments.lab import Lab  # noqa: E402  (starts, waits for and stops the peer processes)
from gaisnet_flwr.split.plan import plan_even

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.


def run(name: str, peers: int, batch: int, repeats: int, addresses: list[str]) -> None:
    import torch

    from gaisnet_flwr.deploy.remote import NetworkPeers, PeerSettings, TransportSettings
    from gaisnet_flwr.split.chain import OptimizerSpec, SplitChain
    from gaisnet_flwr.vit.model import build_prompted_vit

    cfg = dict(MODELS[name])
    torch.manual_seed(0)
    model = build_prompted_vit(mode="vpt-deep", **cfg)
    img = model.img_size[0]
    plan = plan_even(model.depth, peers)
    spec = OptimizerSpec("sgd", lr=1e-3, momentum=0.9)
    local_model, remote_model = model, copy.deepcopy(model)
    build_spec = dict(cfg) | {"mode": "vpt-deep"}
    remote = NetworkPeers(PeerSettings(tuple(addresses), TransportSettings()), build_spec, spec)
    local = SplitChain(local_model, plan, spec.factory())
    started = time.perf_counter()
    network = SplitChain(remote_model, plan, spec.factory(), remote=remote)
    opened = time.perf_counter() - started  # includes shipping each peer its frozen weights
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=gen)
    y = torch.randint(0, cfg["num_classes"], (batch,), generator=gen)
    times: dict[str, list[float]] = {"in-process": [], "network": []}
    local.train_step(x, y)  # warm-up, the same step on both
    network.train_step(x, y)
    for _ in range(repeats):  # interleaved so drift in machine load hits both alike
        for label, chain in (("in-process", local), ("network", network)):
            start = time.perf_counter()
            chain.train_step(x, y)
            times[label].append(time.perf_counter() - start)
    network.close()
    diff = max(
        float((remote_model.tunable_state()[k] - v).abs().max())
        for k, v in local_model.tunable_state().items()
    )
    t_local, t_net = (statistics.median(times[k]) for k in ("in-process", "network"))
    d2d = sum(network.stats().hop_bytes_forward) + sum(network.stats().hop_bytes_backward)
    steps = repeats + 1
    print(
        f"{name}: {peers} peers, batch {batch}, median of {repeats}: in-process "
        f"{t_local * 1e3:.1f} ms, network {t_net * 1e3:.1f} ms, ratio {t_net / t_local:.3f}x | "
        f"D2D {d2d / steps / 1e6:.2f} MB per step | session open (weights shipped) "
        f"{opened:.2f} s | max module difference after {steps} steps {diff:.1e}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=list(MODELS))
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} threads here and in each peer; {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(Path(tmp), clusters=1, peers_per_cluster=args.peers,
                  peer_args=("--threads", str(threads)))  # fmt: skip
        try:
            members = range(1, args.peers + 2)
            for m in members:
                lab.start_peer(0, m)
            lab.wait_for_peers()
            addresses = [lab.peer_address(0, m) for m in members]
            for name in args.models:
                run(name, args.peers, args.batch, args.repeats, addresses)
        finally:
            lab.down()


if __name__ == "__main__":
    main()
