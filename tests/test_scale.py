"""Many client clusters (issue 16): what the ClientApp keeps between messages equals what it would
build afresh and follows the run-config; a fixed number of images per cluster; a light
ClientApp import; at most K messages in flight; what `flwr_local` does with fractional CPUs."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from torch.utils.data import Subset

from clients.split_client import ClusterData, EdgeDataKey, TrainPool
from gaisnet_flwr.apps.cluster_node import ClientCache
from gaisnet_flwr.apps.inprocess import assign_message_id
from gaisnet_flwr.apps.server_app import TaskBuilder
from gaisnet_flwr.cloud.foundation import CheckpointError, Foundation, save_checkpoint
from gaisnet_flwr.config import ConfigError, RunConfig
from gaisnet_flwr.contract import ClusterTask, NodeIdentity
from gaisnet_flwr.data.cluster_sample import cluster_sample
from gaisnet_flwr.data.digits_file import load_digits
from gaisnet_flwr.data.images import DataError, DataSpec
from gaisnet_flwr.derived import data_spec, derive
from gaisnet_flwr.experiments.flwr_local import federation_config
from strategies.edge import DEPLOYED_PULL_INTERVAL_S, PULL_INTERVAL_S, GridView
from tests.conftest import python_json

REPO = Path(__file__).resolve().parents[1]
TINY = dict(depth=2, embed_dim=32, num_heads=2, peers_per_cluster=2, img_size=16, patch_size=8)


def task(cfg: RunConfig, pid: int, num: int) -> ClusterTask:
    """Node `pid` of `num`'s cluster task, as the ServerApp builds it."""
    derived = derive(cfg)
    assert derived.plan is not None
    place = NodeIdentity(pid, num).place(len(cfg.hierarchy.edge_domains))
    return TaskBuilder(derived).task(place, pid, derived.plan, derived.cluster)


def cached(cache: ClientCache, cfg: RunConfig, t: ClusterTask, pool: TrainPool | None = None):  # type: ignore[no-untyped-def]
    return cache.cluster_data(data_spec(cfg), t, cfg.data.cluster_samples, pool)


def fresh(cfg: RunConfig, t: ClusterTask, pool: TrainPool | None = None) -> ClusterData:
    key = EdgeDataKey.of(data_spec(cfg), t, pool)
    return ClusterData.build(key, t.partition, t.num_partitions, cfg.data.cluster_samples)


def indices(dataset: object) -> list[int]:
    assert isinstance(dataset, Subset)
    return list(dataset.indices)


def same_cluster(a: ClusterData, b: ClusterData) -> None:
    assert indices(a.train_set) == indices(b.train_set)
    assert indices(a.val_set) == indices(b.val_set)
    assert np.array_equal(a.data.train_labels, b.data.train_labels)
    xa = torch.stack([a.train_set[i][0] for i in range(len(a.train_set))])  # type: ignore[arg-type]
    xb = torch.stack([b.train_set[i][0] for i in range(len(b.train_set))])  # type: ignore[arg-type]
    assert torch.equal(xa, xb)


# -- the digits without scikit-learn ---------------------------------------------------------------
def test_digits_file_equals_scikit_learns_load_digits() -> None:
    from sklearn.datasets import load_digits as sklearn_digits

    ours, theirs = load_digits(), sklearn_digits()
    assert np.array_equal(ours.images, theirs.images)
    assert np.array_equal(ours.target, theirs.target)
    assert ours.images.shape == (1797, 8, 8)


# -- a fixed number of images per cluster ---------------------------------------------------------
LABELS = np.repeat(np.arange(10), 20)  # 200 images, 20 per class


@pytest.mark.parametrize("partitioning", ["iid", "classes", "dirichlet"])
def test_cluster_sample_is_k_images_replayable_and_per_cluster(partitioning: str) -> None:
    spec = DataSpec(partitioning=partitioning, classes_per_cluster=3, seed=4)
    a = cluster_sample(LABELS, 16, 5, spec)
    assert len(a) == 16 and np.all(np.diff(a) >= 0)
    assert np.array_equal(a, cluster_sample(LABELS, 16, 5, spec))  # replayable
    assert not np.array_equal(a, cluster_sample(LABELS, 16, 6, spec))  # another cluster
    assert not np.array_equal(a, cluster_sample(LABELS, 16, 5, spec, edge_id=1))  # another edge
    seeded = dataclasses.replace(spec, seed=5)
    assert not np.array_equal(a, cluster_sample(LABELS, 16, 5, seeded))  # another run seed


def test_cluster_sample_classes_holds_its_classes_only_first_class_as_the_split() -> None:
    spec = DataSpec(partitioning="classes", classes_per_cluster=2)
    for pid in (0, 7, 13, 999):
        labels = set(LABELS[cluster_sample(LABELS, 12, pid, spec)].tolist())
        assert pid % 10 in labels and len(labels) <= 2


def test_cluster_sample_draws_distinct_images_while_the_pool_allows() -> None:
    iid = DataSpec(partitioning="iid")
    assert len(set(cluster_sample(LABELS, 200, 3, iid).tolist())) == 200  # the whole pool
    big = cluster_sample(LABELS, 500, 3, iid)  # more than the pool: with replacement
    assert len(big) == 500 and set(big.tolist()) <= set(range(200))


def test_cluster_sample_refuses_bad_counts_and_classes() -> None:
    with pytest.raises(DataError, match="cluster-samples=0 must be >= 1"):
        cluster_sample(LABELS, 0, 0, DataSpec())
    with pytest.raises(DataError, match="classes_per_cluster=11 must be in \\[1, 10\\]"):
        cluster_sample(LABELS, 4, 0, DataSpec(partitioning="classes", classes_per_cluster=11))


def test_cluster_samples_is_range_checked() -> None:
    with pytest.raises(ConfigError, match="cluster-samples"):
        RunConfig.of(cluster_samples=-1)
    with pytest.raises(ConfigError, match="max-in-flight"):
        RunConfig.of(max_in_flight=-1)


# -- the ClientApp's per-process cache ------------------------------------------------------------
@pytest.mark.parametrize(
    "settings",
    [
        {},  # a share of the edge's pool split among the clusters (flwr-datasets)
        {"partitioning": "dirichlet"},
        {"cluster_samples": 12},  # a fixed number of images per cluster
        {"cluster_samples": 12, "partitioning": "classes", "edge_domains": "none,invert"},
    ],
)
def test_cached_cluster_data_equals_freshly_built(settings: dict) -> None:
    cfg = RunConfig.of(**TINY, **settings)
    cache = ClientCache()
    edges = len(cfg.hierarchy.edge_domains)
    for pid in (0, 5, 9):
        t = task(cfg, pid, 10)
        first = cached(cache, cfg, t)
        same_cluster(first, fresh(cfg, t))  # cached == fresh
        assert cached(cache, cfg, t) is first  # and served from the cache
    # one load, one edge's data (or two), one partitioning of the pool for all clusters
    info = cache.info()
    assert info["datasets"][2] == 1 and info["edges"][2] == edges
    assert info["partitions"][2] == (0 if cfg.data.cluster_samples else edges)


def test_a_changed_run_config_changes_the_data_used() -> None:
    cache = ClientCache()
    base = RunConfig.of(**TINY, cluster_samples=12)
    ident = task(base, 3, 10)
    used = indices(cached(cache, base, ident).train_set)
    for change in (
        {"seed": 1},
        {"cluster_samples": 20},
        {"cluster_samples": 0},
        {"partitioning": "classes"},
        {"val_fraction": 0.5},
    ):
        other = base.replace(**change)
        got = cached(cache, other, ident)
        assert indices(got.train_set) != used, change
        same_cluster(got, fresh(other, ident))
    # another number of clusters, another node train pool: other partitions as well
    split = base.replace(cluster_samples=0)
    for ident2, pool in ((task(split, 3, 11), None), (ident, TrainPool(classes=2, images=40))):
        got = cached(cache, split, ident2, pool)
        same_cluster(got, fresh(split, ident2, pool))
    # a changed img-size changes the images themselves
    small = cached(cache, base.replace(img_size=8, patch_size=4), ident)
    assert small.train_set[0][0].shape[-1] == 8


def test_the_caches_are_bounded() -> None:
    cache = ClientCache(max_clusters=3)
    cfg = RunConfig.of(**TINY, cluster_samples=4)
    for pid in range(10):
        cached(cache, cfg, task(cfg, pid, 10))
    assert cache.info()["clusters"][0] == 3


def test_a_changed_image_folder_is_read_again(tmp_path: Path) -> None:
    """An image added to a class folder, or a class folder added, is a new entry: the cache
    reads the folder again instead of serving what it held."""
    import time

    from PIL import Image

    root = tmp_path / "images"
    for folder in ("cat", "dog"):
        (root / folder).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (20, 12), (i, 0, 0)).save(root / folder / f"{i}.png")
    spec = DataSpec(dataset="imagefolder", data_dir=str(root), img_size=16)
    t, cache = task(RunConfig.of(**TINY), 0, 2), ClientCache()

    def images() -> int:
        data = cache.cluster_data(spec, t, 0, None)
        assert cache.cluster_data(spec, t, 0, None) is data  # unchanged: served
        return len(data.data.train) + len(data.data.test)

    assert images() == 16
    for folder in ("cat", "bird"):  # an image more; a class more
        time.sleep(0.05)  # past the file system's clock tick
        (root / folder).mkdir(exist_ok=True)
        Image.new("RGB", (20, 12)).save(root / folder / "new.png")
        assert images() == 17 + (folder == "bird")
    assert cache.info()["datasets"][2] == 3  # each version of the folder read once


@pytest.fixture
def cloud_cfg(tmp_path: Path) -> RunConfig:
    """A 'cloud' foundation whose checkpoint is written here (not pre-trained: weights of a
    seeded build, saved as the cloud would)."""
    cfg = RunConfig.of(**TINY, foundation_dir=str(tmp_path))
    write_checkpoint(cfg, seed=0)
    return cfg


def write_checkpoint(cfg: RunConfig, seed: int) -> Path:
    foundation = Foundation.of(cfg)
    torch.manual_seed(seed)
    shipped = foundation.shipped(foundation.build(foundation.cloud_classes()))
    state = {k: v.clone() for k, v in shipped.items()}
    for v in state.values():
        if v.is_floating_point():
            v.add_(torch.randn_like(v) * 0.01 * (seed + 1))
    path = foundation.checkpoint_path()
    save_checkpoint(path, state, foundation.meta())
    return path


def test_cached_foundation_equals_freshly_loaded(cloud_cfg: RunConfig) -> None:
    cache, foundation = ClientCache(), Foundation.of(cloud_cfg)
    cached = cache.model(foundation, 5)
    fresh = foundation.load(5)
    after_fresh = torch.get_rng_state()
    again = cache.model(foundation, 5)
    assert torch.equal(torch.get_rng_state(), after_fresh)  # the RNG as a fresh build leaves it
    for model in (cached, again):
        ours, theirs = model.state_dict(), fresh.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert again is cached  # one model per process: every message loads its modules into it
    assert cache.info()["models"] == (1, 1, 1)  # read and verified once


def test_a_rewritten_checkpoint_is_read_again_and_a_corrupt_one_refused(
    cloud_cfg: RunConfig,
) -> None:
    cache, foundation = ClientCache(), Foundation.of(cloud_cfg)
    before = cache.model(foundation, 5).backbone.state_dict()
    path = write_checkpoint(cloud_cfg, seed=1)  # the cloud re-trained it
    after = cache.model(foundation, 5).backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(
        torch.equal(after[k], v) for k, v in foundation.load(5).backbone.state_dict().items()
    )
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte; the sidecar is unchanged
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))  # even with an old mtime: the size or inode tells, not only time
    with pytest.raises(CheckpointError, match="SHA-256"):
        cache.model(foundation, 5)


def test_another_foundation_config_is_another_entry(cloud_cfg: RunConfig) -> None:
    cache = ClientCache()
    a = cache.model(Foundation.of(cloud_cfg), 5)
    b = cache.model(Foundation.of(cloud_cfg.replace(foundation="none", seed=3)), 5)
    assert any(
        not torch.equal(x, y)
        for x, y in zip(
            a.backbone.state_dict().values(), b.backbone.state_dict().values(), strict=True
        )
    )
    assert cache.info()["models"][2] == 2


@pytest.mark.usefixtures("task_identity")
def test_a_fresh_copy_of_the_client_app_per_message_still_hits_the_process_cache(
    tmp_path: Path,
) -> None:
    """Flower's simulation engine pickles the ClientApp with every message it hands a Ray actor:
    what is cached must outlive the app object, in the process."""
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from ray import cloudpickle

    from gaisnet_flwr.apps.client_app import create_client_app
    from gaisnet_flwr.apps.cluster_node import PROCESS_CACHE

    run_config = {
        "depth": 2, "embed-dim": 32, "num-heads": 2, "peers-per-cluster": 2,
        "foundation": "none", "cluster-samples": 8, "seed": 12345, "output-dir": str(tmp_path),
    }  # fmt: skip
    cfg = RunConfig.from_run_config(run_config)
    arrays = ArrayRecord(Foundation.of(cfg).load(5).tunable_state())
    app = create_client_app()

    def app_fn():  # what Flower's simulation engine sends along with each message
        return app

    PROCESS_CACHE.clear()  # other tests of this process use it too
    cluster = task(cfg, 2, 500).to_record()
    for n in range(3):
        fresh = cloudpickle.loads(cloudpickle.dumps(app_fn))()
        assert fresh is not app
        config = ConfigRecord({"server-round": 1})
        msg = Message(
            RecordDict({"arrays": arrays, "config": config, "task": cluster}),
            dst_node_id=5,
            message_type="train",
        )
        assign_message_id(msg, f"m{n}")
        ctx = Context(
            run_id=1,
            node_id=5,
            node_config={"partition-id": 2, "num-partitions": 500},
            state=RecordDict(),
            run_config=run_config,
        )
        reply = fresh(message=msg, context=ctx)
        assert not reply.has_error(), reply.error
    info = PROCESS_CACHE.info()
    for table in ("clusters", "models"):  # built once, then served twice
        assert info[table][1:] == (2, 1), table


@pytest.mark.usefixtures("task_identity", "one_thread")  # bit for bit: one thread
def test_a_message_leaves_nothing_in_the_cached_model(cloud_cfg: RunConfig) -> None:
    """The ClientApp keeps one model per process (no copy per message): a message loads its
    complete tunable state and trains only that, so the frozen backbone never changes and a
    message's reply is what a fresh model gives, whatever came before it."""
    from flwr.app import Array, ArrayRecord

    from clients.split_client import SplitClusterClient
    from gaisnet_flwr.contract import TrainRequest

    cfg, t = cloud_cfg, task(cloud_cfg, 0, 2)
    cache, foundation = ClientCache(), Foundation.of(cfg)
    data = cached(cache, cfg, t)
    start = foundation.load(5).tunable_state()

    def frozen() -> dict[str, torch.Tensor]:  # every weight but the tunable modules (the head)
        state = cache.model(foundation, 5).backbone.state_dict()
        return {k: v.clone() for k, v in state.items() if k not in start}

    backbone = frozen()

    def request(shift: float) -> TrainRequest:
        arrays = ArrayRecord({k: Array((v + shift).numpy()) for k, v in start.items()})
        return TrainRequest(arrays, 1, 0.0, t)

    def train(model) -> dict:  # type: ignore[no-untyped-def]
        content = SplitClusterClient(cfg, t, data, model).train(request(0.5))
        return {k: v.numpy() for k, v in content.array_records["arrays"].items()}

    SplitClusterClient(cfg, t, data, cache.model(foundation, 5)).train(request(-0.3))  # before
    after_another = train(cache.model(foundation, 5))
    alone = train(foundation.load(5))  # a fresh model, as a copy per message gave
    assert after_another.keys() == alone.keys()
    assert all(np.array_equal(after_another[k], alone[k]) for k in alone)
    now = frozen()
    assert now.keys() == backbone.keys() and len(now) > 10
    assert all(torch.equal(now[k], v) for k, v in backbone.items())  # the frozen part: untouched


@pytest.mark.usefixtures("task_identity", "one_thread")  # bit for bit: one thread
def test_one_frozen_foundation_per_process(cloud_cfg: RunConfig) -> None:
    """In process, the ServerApp's model and the ClientApps' cache's share one frozen backbone
    (issue 28: no needless model copies), each with tunable modules of its own: a train
    message through the cache's model leaves the other bitwise as it was, and replies what a
    model with a backbone of its own replies."""
    from flwr.app import Array, ArrayRecord

    from clients.split_client import SplitClusterClient
    from gaisnet_flwr.contract import TrainRequest

    cfg, t = cloud_cfg, task(cloud_cfg, 0, 2)
    foundation, cache = Foundation.of(cfg), ClientCache()
    server = foundation.load(5)  # the ServerApp's
    client = cache.model(foundation, 5)  # the ClientApps' cache's
    mine = dict(server.named_parameters())
    theirs = dict(client.named_parameters())
    tunable = set(server.tunable_state())
    assert mine.keys() == theirs.keys() and len(mine) > len(tunable) > 0
    for name in mine:  # the frozen storage is one; Parameters and tunable modules are each's
        shared = mine[name].data_ptr() == theirs[name].data_ptr()
        assert shared == (name.removeprefix("backbone.") not in tunable and "prompt" not in name)
        assert mine[name] is not theirs[name]
    before = {k: v.clone() for k, v in server.state_dict().items()}
    start = server.tunable_state()
    arrays = ArrayRecord({k: Array((v + 0.5).numpy()) for k, v in start.items()})
    data = cached(cache, cfg, t)

    def train(model: object) -> dict[str, np.ndarray]:
        content = SplitClusterClient(cfg, t, data, model).train(TrainRequest(arrays, 1, 0.0, t))  # type: ignore[arg-type]
        return {k: v.numpy() for k, v in content.array_records["arrays"].items()}

    got = train(client)
    after = server.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the server's: untouched
    alone = foundation.build(5)  # a backbone of its own (build shares nothing)
    alone.backbone.load_state_dict(client.backbone.state_dict())
    ptrs = {p.data_ptr() for p in mine.values()}
    assert not any(p.data_ptr() in ptrs for p in alone.parameters())
    expected = train(alone)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_only_bitwise_equal_foundations_are_shared(tmp_path: Path) -> None:
    """Another seed's backbone, or one whose every weight is tuned (mode 'full'), shares
    nothing; the process keeps no model alive for sharing's sake."""
    import gc
    import weakref

    cfg = RunConfig.of(**TINY, foundation="none", foundation_dir=str(tmp_path))
    a = Foundation.of(cfg).load(5)
    b = Foundation.of(cfg.replace(seed=1)).load(5)  # 'none': the run seed draws the backbone
    pos = "backbone.pos_embed"
    params = [dict(m.named_parameters())[pos] for m in (a, b)]
    assert not torch.equal(*params) and params[0].data_ptr() != params[1].data_ptr()
    c = Foundation.of(cfg).load(5)
    assert dict(c.named_parameters())[pos].data_ptr() == params[0].data_ptr()
    full = Foundation.of(cfg.replace(mode="full", num_prompts=0)).load(5)
    assert dict(full.named_parameters())[pos].data_ptr() != params[0].data_ptr()
    ref = weakref.ref(a)
    del a, c, params
    gc.collect()
    assert ref() is None  # the process keeps no model alive for sharing's sake


# -- a light ClientApp ----------------------------------------------------------------------------
HEAVY = (
    "matplotlib",
    "seaborn",
    "pandas",
    "scipy",
    "sklearn",
    "datasets",
    "flwr_datasets",
    "pyarrow",
)

LIGHT_SCRIPT = """
import json, sys
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
import gaisnet_flwr.apps.client_app as client_app
heavy = json.loads(sys.argv[1])
on_import = sorted(m for m in [*heavy, "torch", "timm"] if m in sys.modules)
from gaisnet_flwr.apps.inprocess import assign_message_id, task_identity
from gaisnet_flwr.contract import QUERY_IDENTITY
# the identity query, the run's first message, is answered without torch
with task_identity(1, 1):
    who = Message(RecordDict(), dst_node_id=5, message_type=QUERY_IDENTITY)
assign_message_id(who, "m0")
ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 1000},
              state=RecordDict(), run_config={})
answer = client_app.app(message=who, context=ctx)
assert not answer.has_error(), answer.error
on_identity = sorted(m for m in [*heavy, "torch", "timm"] if m in sys.modules)
from gaisnet_flwr.apps.inprocess import assign_message_id, task_identity
from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.costs.profiles import ClusterProfile, load_profiles
from gaisnet_flwr.contract import ClusterTask
from gaisnet_flwr.split.plan import SplitPlan
run_config = json.loads(sys.argv[2])
cfg = RunConfig.from_run_config(run_config)
arrays = ArrayRecord(Foundation.of(cfg).load(5).tunable_state())
# the cluster's task as the ServerApp sends it (built here without its planning code)
devices = ["phone-mid", "phone-high", "phone-mid", "phone-mid"]
profile = ClusterProfile.from_names(load_profiles(), devices, "d2d-50m", "uplink-1mhz")
task = ClusterTask(0, "none", (1.0,), 0, 1000, 0, SplitPlan.from_sizes([1, 1]), profile,
                   ((1, 0), (1, 1), (1, 1), (1, 1)), (1, 1, 1, 1))
with task_identity(1, 1):
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1}),
                              "task": task.to_record()}), dst_node_id=5, message_type="train")
assign_message_id(msg, "m1")
ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 1000},
              state=RecordDict(), run_config=run_config)
reply = client_app.app(message=msg, context=ctx)
assert not reply.has_error(), reply.error
on_message = sorted(m for m in heavy if m in sys.modules)
print(json.dumps({"import": on_import, "identity": on_identity, "message": on_message,
                  "examples": reply.content.metric_records["metrics"]["num-examples"]}))
"""


@pytest.mark.slow
def test_the_client_app_imports_no_plotting_and_no_unused_dataset_stack(tmp_path: Path) -> None:
    run_config = {
        "depth": 2,
        "embed-dim": 32,
        "num-heads": 2,
        "peers-per-cluster": 2,
        "foundation": "none",
        "cluster-samples": 10,
        "output-dir": str(tmp_path),
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    got = python_json(LIGHT_SCRIPT, json.dumps(HEAVY), json.dumps(run_config), env=env)
    # loading the ClientApp (Flower does it in the simulation process before Ray starts, and
    # in every actor) imports not even torch; the first message imports what it needs
    assert got["import"] == [], f"importing the ClientApp imported {got['import']}"
    assert got["identity"] == [], f"the identity query imported {got['identity']}"
    assert got["message"] == [], f"a train message imported {got['message']}"
    assert got["examples"] == 8  # cluster-samples=10, 2 held out for validation


# -- at most K messages in flight -----------------------------------------------------------------
class CountingGrid(Grid):
    """A Grid that answers one message per pull and records how many were in flight."""

    def __init__(self) -> None:
        self.in_flight: list[str] = []
        self.most = 0
        self.pushed: list[int] = []
        self.pulls = 0

    def set_run(self, run: Run) -> None:  # pragma: no cover - not used
        pass

    @property
    def run(self) -> Run:  # pragma: no cover - not used
        return Run.create_empty(1)

    def create_message(self, *args: object, **kwargs: object) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return range(1, 101)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            mid = f"m{m.metadata.dst_node_id}"
            assign_message_id(m, mid)
            self.in_flight.append(mid)
            self.pushed.append(m.metadata.dst_node_id)
            ids.append(mid)
        self.most = max(self.most, len(self.in_flight))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        wanted = set(message_ids)
        done = [m for m in self.in_flight if m in wanted][:1]
        for mid in done:
            self.in_flight.remove(mid)
        return [Message(RecordDict(), reply_to=_sent(int(mid[1:]), mid)) for mid in done]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        return [r for _ in ids for r in self.pull_messages(ids)]


def _sent(node: int, mid: str) -> Message:
    msg = Message(RecordDict(), dst_node_id=node, message_type="train")
    assign_message_id(msg, mid)
    return msg


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("window", [1, 7, 64])
def test_in_flight_window_keeps_at_most_k_and_returns_every_reply(window: int) -> None:
    grid = CountingGrid()
    wrapped = GridView(grid, max_in_flight=window, pull_interval_s=0.0)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in range(1, 51)]
    replies = list(wrapped.send_and_receive(messages, timeout=60))
    assert grid.most == min(window, 50)
    assert grid.pushed == list(range(1, 51))  # in the caller's order
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        f"m{n}" for n in range(1, 51)
    )
    assert list(wrapped.get_node_ids()) == list(range(1, 101))  # the rest is the grid's


@pytest.mark.usefixtures("task_identity")
def test_in_flight_window_zero_is_flowers_all_at_once_and_timeout_is_kept() -> None:
    grid = CountingGrid()
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in range(1, 11)]
    assert len(list(GridView(grid, max_in_flight=0).send_and_receive(messages))) == 10
    assert grid.most == 10
    never = CountingGrid()
    never.pull_messages = lambda ids: []  # type: ignore[method-assign]
    got = GridView(never, max_in_flight=3, pull_interval_s=0.01).send_and_receive(
        [Message(RecordDict(), dst_node_id=n, message_type="train") for n in range(1, 11)],
        timeout=0.1,
    )
    assert list(got) == [] and never.most == 3  # the rest was never sent
    with pytest.raises(ValueError, match="max-in-flight=-1"):
        GridView(grid, max_in_flight=-1)


@pytest.mark.usefixtures("task_identity")
def test_a_deployed_grid_sends_every_message_at_once_and_pulls_ten_times_less_often() -> None:
    """Deployed (Flower's HttpGrid), every SuperNode is a device of its own: no window, and each
    pull, an HTTP request to the SuperLink, 0.2 s apart (Flower's own waits 3 s). In simulation
    the window holds and the in-memory grid is pulled every 0.02 s."""
    from flwr.superlink.grid import HttpGrid

    class DeployedGrid(HttpGrid, CountingGrid):  # Flower's class, this test's messages
        def __init__(self) -> None:
            CountingGrid.__init__(self)

        push_messages = CountingGrid.push_messages
        pull_messages = CountingGrid.pull_messages

    deployed = DeployedGrid()
    view = GridView(deployed, max_in_flight=4, pull_interval_s=0.0)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in range(1, 21)]
    assert len(list(view.send_and_receive(messages, timeout=60))) == 20
    assert deployed.most == 20  # all at once, though max-in-flight=4
    assert GridView(deployed, max_in_flight=4).pull_interval_s == DEPLOYED_PULL_INTERVAL_S == 0.2
    assert GridView(HttpGrid("127.0.0.1:9091", insecure=True, token="t")).deployed
    simulated = GridView(CountingGrid(), max_in_flight=4)
    assert not simulated.deployed and simulated.pull_interval_s == PULL_INTERVAL_S == 0.02


# -- CPUs per ClientApp ---------------------------------------------------------------------------
def test_whole_cpus_go_to_flower_as_they_are() -> None:
    assert federation_config(8, 1, 0.0, cores=2) == (
        "num-supernodes=8 client-resources-num-cpus=1 client-resources-num-gpus=0.0"
    )


def test_fractional_cpus_become_more_ray_cpus() -> None:
    # 0.5 CPU each on 2 cores = 4 ClientApps at once: Ray is told of 4 CPUs, each takes 1
    assert federation_config(8, 0.5, 0.0, cores=2) == (
        "num-supernodes=8 client-resources-num-cpus=1 client-resources-num-gpus=0.0 "
        "init-args-num-cpus=4"
    )


def test_bad_cpus_are_refused_with_what_works() -> None:
    with pytest.raises(ValueError, match="client-cpus=0 must be > 0"):
        federation_config(8, 0, 0.0, cores=2)
    with pytest.raises(ValueError, match="RAY_ADDRESS"):
        federation_config(8, 0.5, 0.0, cores=2, ray_address="127.0.0.1:6379")
