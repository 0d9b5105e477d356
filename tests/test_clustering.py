"""Client clustering from a D2D device graph (paper Sec. IV-B)."""

from __future__ import annotations

import pytest

from gaisnet_flwr.service.clustering import Device, form_clusters, reachable


def line(n: int, spacing: float = 50.0, data: tuple[int, ...] = (0,)) -> list[Device]:
    """Devices on a line, `spacing` m apart (range 100 m: each reaches its two neighbours)."""
    return [
        Device(f"d{i}", i * spacing, 0.0, flops_per_second=1e9 * (1 + i % 3), has_data=i in data)
        for i in range(n)
    ]


def test_fine_tuning_chain_follows_d2d_links_and_is_planned() -> None:
    devices = line(5)
    result = form_clusters(devices, peers_per_cluster=3, num_blocks=12)
    (cluster,) = result.clusters
    assert cluster.kind == "fine-tuning" and cluster.start.name == "d0"
    assert all(reachable(a, b) for a, b in zip(cluster.chain, cluster.chain[1:], strict=False))
    assert len(cluster.peers) == 3 and cluster.plan.num_blocks == 12
    assert cluster.plan.num_peers == 3
    assert result.unplaced == {}


def test_inference_cluster_closes_the_loop_to_its_start_point() -> None:
    # Four devices on a 60 m square: a ring where every corner reaches its two neighbours.
    square = [
        Device(n, x, y, 1e9) for n, x, y in [("s", 0, 0), ("p", 60, 0), ("q", 60, 60), ("e", 0, 60)]
    ]
    result = form_clusters(square, peers_per_cluster=2, num_blocks=4, inference_starts=["s"])
    (cluster,) = result.clusters
    assert cluster.kind == "inference" and cluster.start.name == "s"
    assert reachable(cluster.end, cluster.start)
    # On a straight line the end point is too far from the start: no inference cluster.
    result = form_clusters(
        line(4, spacing=90.0, data=()), peers_per_cluster=2, num_blocks=4, inference_starts=["d0"]
    )
    assert result.clusters == []
    assert "whose end point reaches it back" in result.unplaced["d0"]


def test_devices_that_cannot_be_placed_are_reported() -> None:
    devices = [*line(4), Device("far", 5000.0, 0.0, 1e9, has_data=True)]
    result = form_clusters(devices, peers_per_cluster=2, num_blocks=6)
    assert [c.start.name for c in result.clusters] == ["d0"]
    assert result.unplaced["far"].startswith("fine-tuning start point: no D2D chain")
    assert set(result.unplaced) == {"far"}


def test_bad_requests_fail_clearly() -> None:
    with pytest.raises(ValueError, match="need 1 <= peers_per_cluster <= 4 blocks"):
        form_clusters(line(3), peers_per_cluster=5, num_blocks=4)
    with pytest.raises(ValueError, match=r"inference start\(s\) \['zz'\] are not devices"):
        form_clusters(line(3), 1, 4, inference_starts=["zz"])
