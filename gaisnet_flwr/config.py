"""The run's configuration as plain typed data: read once at the app boundary, checked, frozen.

Flower hands the apps one flat run-config (`[tool.flwr.app.config]` in pyproject.toml, keys
with hyphens). `RunConfig.from_run_config` sorts each key into the section that owns it (the
field `num_prompts` of `ModelSection` <-> the key `num-prompts`), casts it, and refuses unknown
keys, wrong types and invalid values before any model is built or any data is read, naming the
key and what is valid. Each section is named after its attribute (`cfg.model: ModelSection`)
and each part of the code takes only the section it needs:

    model       the timm ViT and how it is prompted            -> vit, split, costs
    cloud       where the frozen foundation comes from          -> cloud
    cluster     D2D peers per cluster, the device population,   -> split (planner), population
                and how the plan is made
    training    a cluster's local optimisation                  -> training
    data        dataset and its partitioning                    -> data
    costs       device and link profiles of the cost model      -> costs
    inference   SL inference after fine-tuning                  -> apps (serving)
    scheduling  integrated fine-tuning and inference            -> service (scheduler)
    hierarchy   rounds, edges, the cloud and aggregation        -> strategies, apps
    run         seed, device, precision, outputs, tracking      -> everyone

Every field is declared once, with its default, its bounds or choices and a one-line doc
(`option(...)`); the checks, pyproject's defaults (tests/test_config.py) and the key table of
docs/configure.md (`key_table`) all come from that declaration. This module imports no torch,
timm or project code: the vocabularies here (MODES, PLANNERS, ...) are what the domain modules
dispatch on, and they import them from here. What needs the environment (files, the model built
on the meta device, CUDA) and everything derived from the config (plans, cluster layouts, cost
profiles) is built once in the ServerApp's preparation (`gaisnet_flwr/derived.py`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# -- vocabularies: the choices a key may take, where the domain code dispatches on them ---------
MODES = ("vpt-deep", "vpt-shallow", "linear", "full")  # vit.model
FOUNDATIONS = ("cloud", "timm", "file", "none")  # cloud.foundation
COMPUTE_PLANNERS = ("minmax", "even")  # split.plan: sized by compute alone
PLANNERS = (*COMPUTE_PLANNERS, "comm-aware")  # population.planning: compute, hops and memory
EDGE_OFFLOAD = ("never", "auto")  # population.edge_offload: may the edge server hold a segment
OPTIMIZERS = ("sgd", "adamw")  # split.chain
DATASETS = ("digits", "flowers102", "imagefolder")  # data.images
PARTITIONINGS = ("iid", "classes", "dirichlet")
EDGE_TASKS = ("new-classes", "same-classes")
DOMAINS = ("none", "invert", "rotate", "noise", "blur")  # an edge's data domain
DISTRIBUTIONS = ("efficient", "full")  # SL inference ships the tunable modules, or every weight
SERVICES = ("fine-tuning", "integrated")
# Which part of the hierarchy a ServerApp runs (apps/server_app.py): all of it in one ServerApp
# (the simulation's logical edges), the cloud alone (its SuperNodes are the edge servers:
# apps/cloud_app.py), or one edge server over its clusters' SuperNodes (apps/edge_app.py).
TIERS = ("hierarchy", "cloud", "edge")
POLICIES = ("rs", "msip", "mlcp")  # service.scheduler
CLOUD_MODULES = ("prompts", "all")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")  # split.precision
SMASHED_DTYPE_NAMES = ("fp32", "bf16", "fp16")  # what the D2D hops carry (split.precision)

SEED_MAX = 2**32 - 1  # numpy's seed range (and torch's, with the offsets the loops add)
# The largest shapes the project builds (generous: beyond ViT-g/14 and the paper's ViT-B/16, yet
# each builds in seconds); a D2D peer's model spec (deploy/peer.py) holds to them too.
SHAPE_LIMITS = {
    "img_size": 1_024,
    "depth": 48,
    "embed_dim": 4_096,
    "num_heads": 64,
    "num_prompts": 1_024,
}
MAX_PATCHES = 4_096  # (img_size / patch_size) ** 2: 1024 px at patch 16
MAX_PARAMETERS = 1_000_000_000  # ViT-g/14 has about 1.0e9 parameters (4 GB in float32)
MAX_EDGES = 64
# A device population: "" (identical clusters), generated:N:SEED, or a file.
POPULATION_GENERATED = "generated"
POPULATION_FILES = (".toml", ".csv")
POPULATION_MAX_DEVICES = 2000  # one cell; the distance checks hold an N x N matrix (32 MB)
POPULATION_FORMS = "'' (identical clusters), 'generated:N:SEED', or a path to a .toml or .csv file"


class ConfigError(ValueError):
    """An invalid run-config value; the message names the key and what is allowed."""


def _key(name: str) -> str:
    return name.replace("_", "-")


def _field(key: str) -> str:
    return key.replace("-", "_")


# -- one field's declaration ----------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """What a field may hold: numbers within [low, high] (ends open when asked; floats finite),
    strings among `choices`; for a tuple field (a comma-separated run-config list) the same for
    each item, at most `max_items` of them, or exactly as many as the field `count` names (a
    number, or a tuple's length), one per `unit`."""

    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    nonempty: bool = False  # a string that must name something: `doc` says what
    max_items: int | None = None
    count: str = ""
    unit: str = "item"

    def check(self, key: str, value: Any, section: Any) -> None:
        if not isinstance(value, tuple):
            self.check_item(key, value)
            return
        text = _render(value)
        if self.max_items is not None and len(value) > self.max_items:
            raise ConfigError(f"{key} lists {len(value)} {self.unit}s; at most {self.max_items}")
        if self.count and value:  # a list of positive numbers, one per `unit`
            wanted = getattr(section, self.count)
            wanted = len(wanted) if isinstance(wanted, tuple) else wanted
            valid = f"must list {wanted} finite positive numbers (one per {self.unit}), or be empty"
            bad = [v for v in value if not (math.isfinite(v) and v > 0)]
            if bad:
                raise ConfigError(f"{key}={text!r}: {bad[0]!r} is not a finite number > 0; {valid}")
            if len(value) != wanted:
                raise ConfigError(f"{key}={text!r} lists {len(value)} number(s); {valid}")
        for item in value:
            self.check_item(key, item)

    def check_item(self, key: str, value: Any) -> None:
        if isinstance(value, str):
            if self.choices and value not in self.choices:
                raise ConfigError(
                    f"{key}={value!r} is not valid; choose one of {', '.join(self.choices)}"
                )
            if self.nonempty and not value.strip():
                raise ConfigError(f"{key}='' is not valid: {self.doc}")
            if "\x00" in value:  # no name, path or list holds one
                raise ConfigError(f"{key}={value!r} is not valid: it contains a NUL character")
            return
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if isinstance(value, float) and not (math.isfinite(value) and low_ok and high_ok):
            if self.low_open and self.high_open:
                raise ConfigError(
                    f"{key}={value!r} must be in the open interval ({self.low:g}, {self.high:g})"
                )
            raise ConfigError(
                f"{key}={value!r} is not valid: must be a finite number {self.bounds()}"
            )
        if not (low_ok and high_ok):
            raise ConfigError(
                f"{key}={value!r} is out of range: must be {self.bounds(closed=False)}"
            )

    def bounds(self, closed: bool = True) -> str:
        """The allowed range in words: "in [0, 1]", "> 0 and <= 10", ">= 1 and <= 48"."""
        low, high = _bound(self.low), _bound(self.high)
        if closed and None not in (self.low, self.high) and not (self.low_open or self.high_open):
            return f"in [{low}, {high}]"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {low}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {high}")
        return " and ".join(parts)

    def allowed(self) -> str:
        """What is valid, for the docs table."""
        text = ", ".join(self.choices) if self.choices else self.bounds()
        if self.nonempty:
            text = "not empty"
        if self.count:
            text = f"'' or one finite number {text} per {self.unit}"
        elif self.max_items is not None:
            text = f"at most {self.max_items}, each {text}" if text else f"at most {self.max_items}"
        return text


def _bound(value: float | None) -> str:
    """A bound as the messages write it: whole numbers in full (4294967295), others short."""
    if value is None or isinstance(value, int):
        return str(value)
    return f"{value:g}"


def option(default: Any, doc: str, **rules: Any) -> Any:
    """A section field: its default and its `Option` (bounds, choices, one-line doc)."""
    return dataclasses.field(default=default, metadata={"option": Option(doc, **rules)})


def _render(value: Any) -> Any:
    """A field's value as Flower's flat run-config holds it: a tuple as "a,b,c", options as
    "name=value, name=value" (TOML values)."""
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return ", ".join(f"{name}={_toml(v)}" for name, v in value)
    if isinstance(value, tuple):
        return ",".join(_number(v) if isinstance(v, float) else str(v) for v in value)
    return value


def _toml(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _number(value: float) -> str:
    """1.0 -> "1", 0.2 -> "0.2": exact (repr) and as a user writes it."""
    return str(int(value)) if value.is_integer() else repr(value)


class Section:
    """A section of the run-config: each field checked against its `Option` on construction,
    then the section's own relations (`relations`)."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            f.metadata["option"].check(_key(f.name), getattr(self, f.name), self)
        self.relations()

    def relations(self) -> None:
        """Checks across the section's fields (none by default)."""


# -- values that are small languages of their own -------------------------------------------
def strategy_options(text: str) -> dict[str, Any]:
    """strategy-options as keyword arguments: "proximal_mu=0.1, eta=0.01" (TOML values), each a
    finite number, a string or a boolean."""
    try:
        options = tomllib.loads(text.replace(",", "\n"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(
            f"strategy-options={text!r} is not 'key=value' pairs "
            f'(TOML values, e.g. "proximal_mu=0.1, eta=0.01"): {err}'
        ) from err
    for name, value in options.items():
        scalar = isinstance(value, bool | str) or (
            isinstance(value, int | float) and math.isfinite(value)
        )
        if not scalar:
            raise ConfigError(
                f"strategy-options={text!r}: {name}={value!r} is not valid: an option value "
                f"must be a finite number, a string or a boolean"
            )
    return options


def parse_population(spec: str) -> tuple[int, int] | None:
    """population's form (no file is read): `generated:N:SEED` -> (N, SEED); None for '' or a
    file name."""
    if not spec.strip():
        return None
    if not spec.startswith(POPULATION_GENERATED + ":"):
        if Path(spec).suffix.lower() not in POPULATION_FILES:
            raise ConfigError(f"population={spec!r} is not valid; give {POPULATION_FORMS}")
        return None
    parts = spec.split(":")
    try:
        n, seed = int(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (IndexError, ValueError):
        raise ConfigError(
            f"population={spec!r}: expected 'generated:N:SEED' with whole numbers N and SEED"
        ) from None
    if not 3 <= n <= POPULATION_MAX_DEVICES or not 0 <= seed <= SEED_MAX:
        raise ConfigError(
            f"population={spec!r}: N must be in [3, {POPULATION_MAX_DEVICES}] and SEED in "
            f"[0, 2**32 - 1]"
        )
    return n, seed


# -- sections -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSection(Section):
    """A timm ViT by name, with shape overrides, and its prompt tuning (paper Sec. III-A)."""

    model_name: str = option(
        "vit_tiny_patch16_224", "name a timm ViT, e.g. vit_tiny_patch16_224", nonempty=True
    )
    img_size: int = option(
        32, "input images are resized to img-size x img-size", low=1, high=SHAPE_LIMITS["img_size"]
    )
    patch_size: int = option(8, "patch side, in [1, img-size]; divides img-size")
    depth: int = option(6, "Transformer blocks", low=1, high=SHAPE_LIMITS["depth"])
    embed_dim: int = option(64, "token width", low=1, high=SHAPE_LIMITS["embed_dim"])
    num_heads: int = option(
        4, "attention heads; divides embed-dim", low=1, high=SHAPE_LIMITS["num_heads"]
    )
    mode: str = option(
        "vpt-deep", "what trains: prompts + head, the head, or every weight", choices=MODES
    )
    num_prompts: int = option(
        10,
        "prompt tokens per prompt module (VPT); 0 for linear and full",
        low=0,
        high=SHAPE_LIMITS["num_prompts"],
    )

    def relations(self) -> None:
        if not 1 <= self.patch_size <= self.img_size:
            raise ConfigError(
                f"patch-size={self.patch_size} is out of range: must be >= 1 and <= "
                f"img-size={self.img_size}, and divide it"
            )
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"patch-size={self.patch_size} must divide img-size={self.img_size} (the image "
                f"is cut into patch-size tiles); valid: "
                f"{_divisors(self.img_size, SHAPE_LIMITS['img_size'])}"
            )
        if (patches := (self.img_size // self.patch_size) ** 2) > MAX_PATCHES:
            raise ConfigError(
                f"img-size={self.img_size} with patch-size={self.patch_size} makes {patches} "
                f"patches; at most {MAX_PATCHES} (raise patch-size or lower img-size)"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"num-heads={self.num_heads} must divide embed-dim={self.embed_dim} (each head "
                f"gets embed-dim / num-heads channels); valid: "
                f"{_divisors(self.embed_dim, SHAPE_LIMITS['num_heads'])}"
            )
        if self.mode in ("linear", "full") and self.num_prompts:
            raise ConfigError(f"mode {self.mode!r} trains no prompts: set num-prompts=0")


@dataclass(frozen=True)
class CloudSection(Section):
    """The frozen foundation model (gaisnet_flwr/cloud/foundation.py)."""

    foundation: str = option(
        "cloud", "cloud pre-training, timm's weights, a file, or random", choices=FOUNDATIONS
    )
    checkpoint_path: str = option("", "weights file for foundation='file'")
    foundation_dir: str = option("", "where cloud checkpoints live; '' = ~/.cache/gaisnet-flwr")
    # Epochs over the cloud corpus (with the new-classes task, over its 11 views).
    pretrain_epochs: int = option(4, "cloud pre-training epochs", low=0, high=1000)
    pretrain_lr: float = option(
        1e-3, "cloud pre-training learning rate (AdamW)", low=0, high=10, low_open=True
    )
    # The cloud's own seed: one foundation serves runs of every `seed` (which seeds the edges),
    # so seeds measure fine-tuning's spread.
    pretrain_seed: int = option(0, "the cloud's pre-training seed", low=0, high=SEED_MAX)


def differing(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two run-configs (or that one lacks)."""
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


@dataclass(frozen=True)
class ClusterSection(Section):
    """A client cluster: start point -> `peers_per_cluster` D2D peers -> end point (Fig. 4).

    Without a population every cluster is the same (the cost model's start/peer/end devices);
    with one, clusters are formed from it (gaisnet_flwr/population), each with its own devices,
    links and plan."""

    peers_per_cluster: int = option(
        3,
        "D2D peers between start and end point (at most depth)",
        low=1,
        high=SHAPE_LIMITS["depth"],
    )
    peer_speeds: tuple[float, ...] = option(
        (),
        "relative compute speeds, e.g. '1,2,1'; '' = the peers' devices",
        low=0,
        low_open=True,
        count="peers_per_cluster",
        unit="peer",
    )
    planner: str = option("minmax", "how blocks are split over the peers", choices=PLANNERS)
    population: str = option("", f"device population: {POPULATION_FORMS}")
    edge_offload: str = option(
        "never",
        "'auto': a chain may hold the edge server as a node where that shortens the round",
        choices=EDGE_OFFLOAD,
    )

    def relations(self) -> None:
        parse_population(self.population)
        if self.edge_offload != "never" and self.planner != "comm-aware":
            raise ConfigError(
                f"edge-offload={self.edge_offload!r} prices the hops into and out of the edge "
                f"server: it needs planner='comm-aware' (planner={self.planner!r} prices "
                f"compute alone)"
            )


@dataclass(frozen=True)
class TrainingSection(Section):
    """One cluster's local optimisation over its split chain, per round."""

    local_epochs: int = option(1, "local epochs per round", low=1, high=1000)
    optimizer: str = option("sgd", "each segment's optimizer", choices=OPTIMIZERS)
    lr: float = option(0.05, "learning rate", low=0, high=10, low_open=True)
    momentum: float = option(
        0.9, "SGD momentum (AdamW's beta1 stays torch's)", low=0, high=1, high_open=True
    )
    weight_decay: float = option(0.0, "weight decay", low=0, high=1)
    batch_size: int = option(10, "batch size (the paper's 10)", low=1, high=4096)


@dataclass(frozen=True)
class DataSection(Section):
    """The dataset and how each edge's data is partitioned into clusters."""

    dataset: str = option(
        "digits", "digits ships with scikit-learn (no download)", choices=DATASETS
    )
    data_dir: str = option("", "root of flowers102 / imagefolder data")
    partitioning: str = option(
        "iid", "how an edge's pool is split among its clusters", choices=PARTITIONINGS
    )
    classes_per_cluster: int = option(
        2, "partitioning='classes': classes each cluster sees", low=1, high=100_000
    )
    dirichlet_alpha: float = option(
        0.5, "partitioning='dirichlet': concentration", low=0, high=1e6, low_open=True
    )
    val_fraction: float = option(
        0.2, "share of each cluster's data held out", low=0, high=1, low_open=True, high_open=True
    )
    # 0: the edge's pool is split among its clusters (pool / N images each). K > 0: every cluster
    # draws its own K images (data/cluster_sample.py), whatever the number of clusters.
    cluster_samples: int = option(
        0, "images each cluster draws; 0 = its share of the pool", low=0, high=100_000
    )
    edge_task: str = option(
        "new-classes", "digits: edges learn 5-9 (new) or the cloud's 0-9 (same)", choices=EDGE_TASKS
    )
    shots: int = option(
        10, "at most this many training images per class per cluster; 0 = all", low=0, high=100_000
    )


@dataclass(frozen=True)
class CostsSection(Section):
    """Device and link profile names of the cost model (presets in gaisnet_flwr/costs, or from
    the `cost-profiles` TOML)."""

    cost_profiles: str = option("", "TOML file adding/overriding [devices.NAME] / [links.NAME]")
    start_device: str = option("phone-mid", "the start point's device profile", nonempty=True)
    peer_devices: tuple[str, ...] = option(
        ("phone-high", "phone-mid", "phone-low"), "peers' device profiles, cycled", unit="profile"
    )
    end_device: str = option("phone-mid", "the end point's device profile", nonempty=True)
    d2d_link: str = option("d2d-50m", "the D2D hops' link profile", nonempty=True)
    uplink: str = option("uplink-1mhz", "the start point's client-edge link profile", nonempty=True)
    edge_device: str = option(
        "edge-server", "runs each edge's (and the cloud's) aggregation", nonempty=True
    )
    backhaul_link: str = option("backhaul-1gbps", "edge <-> cloud link profile", nonempty=True)

    def relations(self) -> None:
        if not self.peer_devices:
            raise ConfigError("cost model: peer-devices names no device profile")


@dataclass(frozen=True)
class InferenceSection(Section):
    """SL inference after fine-tuning (paper Sec. III-D)."""

    inference_requests: int = option(
        2, "requests served after fine-tuning (round-robin)", low=0, high=10_000
    )
    distribution: str = option(
        "efficient", "ship the tunable modules only, or every weight", choices=DISTRIBUTIONS
    )


@dataclass(frozen=True)
class SchedulingSection(Section):
    """Integrated fine-tuning and inference (paper Sec. IV-C): each round fine-tune or serve."""

    service: str = option(
        "fine-tuning", "'integrated': the scheduler decides each round", choices=SERVICES
    )
    policy: str = option("mlcp", "the scheduler's policy", choices=POLICIES)
    demand: tuple[int, ...] = option(
        (),
        "integrated: the edge each round's request needs, e.g. '0,0,1'",
        low=0,
        max_items=10_000,
        unit="round",
    )
    service_value: float = option(
        100.0, "a served request earns service-value x its accuracy", low=0
    )
    finetune_cost: float = option(20.0, "one fine-tuning round's fixed cost", low=0)
    energy_price: float = option(1.0, "profit units per joule charged to every action", low=0)


@dataclass(frozen=True)
class HierarchySection(Section):
    """Rounds, edge servers (one domain each), the cloud, and each edge's aggregation
    (paper Sec. III-B). The strategy's name and options are resolved when the ServerApp builds
    the strategies (`apps/server_app.py: check_run_config`)."""

    num_rounds: int = option(5, "rounds", low=1, high=10_000)
    edge_domains: tuple[str, ...] = option(
        ("none",),
        "one data domain per edge server",
        choices=DOMAINS,
        max_items=MAX_EDGES,
        unit="edge",
    )
    edge_shares: tuple[float, ...] = option(
        (),
        "relative data share per edge, e.g. '1,1,0.2'; '' = equal",
        low=0,
        low_open=True,
        count="edge_domains",
        unit="edge in edge-domains",
    )
    cloud_every: int = option(
        1, "the cloud aggregates across edges every K rounds; 0 = never", low=0, high=10_000
    )
    cloud_mix: float = option(
        0.5, "delivered = mix * cloud + (1 - mix) * the edge's own", low=0, high=1
    )
    cloud_modules: str = option("prompts", "what the cloud aggregates", choices=CLOUD_MODULES)
    strategy: str = option(
        "module-fedavg",
        "name a registry strategy (e.g. module-fedavg) or 'package.module:Class'",
        nonempty=True,
    )
    strategy_options: tuple[tuple[str, bool | int | float | str], ...] = option(
        (), "extra strategy kwargs as TOML, e.g. 'proximal_mu=0.1, eta=0.01'"
    )
    fraction_evaluate: float = option(
        1.0, "share of clusters in federated evaluation", low=0, high=1
    )
    # The ServerApp's central evaluation covers each edge's whole test set: at ViT-B/16 on this
    # project's 2-core CPU, Flowers102's 6,149 test images take minutes a round (from the
    # per-image time in docs/measured.md, the ServerApp's threads). The initial model and the
    # last round are always evaluated.
    central_eval_every: int = option(
        1,
        "central evaluation every K rounds (and always before round 1 and after the last)",
        low=1,
        high=10_000,
    )
    # "The above process iterates until the model converges or a predefined number of rounds
    # is reached" (paper Sec. III-C.1): num-rounds is the most; either rule may stop it sooner.
    target_accuracy: float = option(
        0.0, "stop fine-tuning once the central accuracy reaches it; 0 = off", low=0, high=1
    )
    patience: int = option(
        0,
        "stop fine-tuning after this many central evaluations without a better accuracy; 0 = off",
        low=0,
        high=10_000,
    )
    min_clusters: int = option(
        0, "deployment: wait for this many SuperNodes; 0 = whoever is there", low=0, high=10_000
    )
    # Flower's simulation loop scans every stored message for every node each 0.1 s: all N in
    # flight cost O(N^2) per scan. 16 keeps a 2-core machine's actors busy; at N = 1000, 64
    # doubled the cost of Flower's loop (docs/running.md#many-clusters). Deployed, every
    # SuperNode is a device of its own and all are sent at once (strategies/edge.py: GridView).
    max_in_flight: int = option(
        16,
        "simulation: messages the ServerApp keeps in flight; 0 = a whole round",
        low=0,
        high=1_000_000,
    )
    # The hierarchy as processes of their own (docs/deploy.md, "The cloud and its edge servers").
    tier: str = option(
        "hierarchy",
        "what this ServerApp runs: the whole hierarchy, the cloud, or one edge server",
        choices=TIERS,
    )
    edge_id: int = option(0, "tier='edge': which edge server (index in edge-domains)", low=0,
                          high=MAX_EDGES - 1)  # fmt: skip
    edge_dir: str = option(
        "", "tier='edge': the folder shared with the edge's cloud-facing SuperNode (edge-dir)"
    )
    cloud_timeout_s: float = option(
        3600.0, "deployment: how long the cloud waits for an edge in a cloud round", low=0,
        high=1e6, low_open=True,
    )  # fmt: skip
    resume: bool = option(
        False, "go on after the last round saved in output-dir (fine-tuning, or tier='cloud')"
    )

    def relations(self) -> None:
        if not self.edge_domains:
            raise ConfigError("edge-domains='' is not valid: name one domain per edge server")
        if self.tier == "edge":
            if not self.edge_dir.strip():
                raise ConfigError(
                    "tier='edge' needs edge-dir: the folder this edge server shares with its "
                    "cloud-facing SuperNode (that SuperNode's node-config edge-dir)"
                )
            if self.edge_id >= len(self.edge_domains):
                raise ConfigError(
                    f"edge-id={self.edge_id} is out of range: edge-domains lists "
                    f"{len(self.edge_domains)} edge server(s) (0..{len(self.edge_domains) - 1})"
                )


@dataclass(frozen=True)
class RunSection(Section):
    """What the whole run shares: its seed, its torch device and numeric precision, and where
    results go (files and TensorBoard events in output-dir; an MLflow run too with a URI)."""

    seed: int = option(
        0, "seeds the edges: fresh heads, prompts, partitions, shuffles", low=0, high=SEED_MAX
    )
    device: str = option("auto", "auto = the GPU this process sees, if any", choices=DEVICES)
    precision: str = option(
        "fp32", "fp32, tf32 (CUDA tensor cores) or bf16 autocast", choices=PRECISIONS
    )
    smashed_dtype: str = option("fp32", "the dtype the D2D hops carry", choices=SMASHED_DTYPE_NAMES)
    server_threads: int = option(
        1, "torch threads of the ServerApp's work (central evaluation); 0 = torch's default",
        low=0, high=1024,
    )  # fmt: skip
    output_dir: str = option("outputs", "name a folder for the results", nonempty=True)
    mlflow_tracking_uri: str = option("", "'' = no MLflow; e.g. file:///abs/mlruns")


# -- the whole run ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """Every section of one run; the checks that span sections live here."""

    model: ModelSection = ModelSection()
    cloud: CloudSection = CloudSection()
    cluster: ClusterSection = ClusterSection()
    training: TrainingSection = TrainingSection()
    data: DataSection = DataSection()
    costs: CostsSection = CostsSection()
    inference: InferenceSection = InferenceSection()
    scheduling: SchedulingSection = SchedulingSection()
    hierarchy: HierarchySection = HierarchySection()
    run: RunSection = RunSection()

    def __post_init__(self) -> None:
        if self.cluster.population.strip() and self.cluster.peer_speeds:
            raise ConfigError(
                f"peer-speeds={_render(self.cluster.peer_speeds)!r} is for identical clusters; "
                f"with population={self.cluster.population!r} each cluster's devices set its "
                f"speeds (set peer-speeds='')"
            )
        if self.cluster.peers_per_cluster > self.model.depth:
            raise ConfigError(
                f"peers-per-cluster={self.cluster.peers_per_cluster} exceeds depth="
                f"{self.model.depth}: each peer needs at least one Transformer block"
            )
        if self.scheduling.service == "integrated":
            demand, edges = self.scheduling.demand, len(self.hierarchy.edge_domains)
            if not demand or any(not 0 <= e < edges for e in demand):
                raise ConfigError(
                    f"service='integrated' needs demand: demand="
                    f"{_render(self.scheduling.demand)!r} must list, per round, an edge index in "
                    f"[0, {edges}) (edges come from edge-domains)"
                )
        tier = self.hierarchy.tier
        if tier != "hierarchy" and self.scheduling.service == "integrated":
            raise ConfigError(
                f"service='integrated' runs in one ServerApp: it needs tier='hierarchy' "
                f"(tier={tier!r})"
            )
        h = self.hierarchy
        if h.central_eval_every > 1 and self.scheduling.service == "integrated":
            raise ConfigError(
                f"central-eval-every={h.central_eval_every} applies to "
                f"service='finetune': the integrated mode evaluates the fine-tuned edge after "
                f"each of its fine-tuning rounds; leave central-eval-every=1"
            )
        if (h.target_accuracy or h.patience) and self.scheduling.service == "integrated":
            raise ConfigError(
                f"target-accuracy={h.target_accuracy} / patience={h.patience} stop fine-tuning "
                f"(service='finetune'); the integrated mode's scheduler decides each round "
                f"whether to fine-tune (service='integrated'): leave both at 0"
            )
        if h.resume and self.scheduling.service == "integrated":
            raise ConfigError(
                "resume=true goes on with fine-tuning (service='finetune'): the integrated "
                "mode's scheduler keeps its history in memory only; start it afresh "
                "(resume=false)"
            )
        if self.data.cluster_samples == 1 and self.hierarchy.fraction_evaluate > 0:
            raise ConfigError(
                "cluster-samples=1 leaves no cluster a validation image (val-fraction holds one "
                "out of clusters of 2 or more), so federated evaluation has nothing to weigh: "
                "draw cluster-samples >= 2 or set fraction-evaluate=0"
            )
        digits = self.data.dataset == "digits"
        if not digits and set(self.hierarchy.edge_domains) != {"none"}:
            raise ConfigError("edge-domains other than 'none' need the embedded digits dataset")
        if self.cloud.foundation == "cloud" and not digits:
            raise ConfigError(
                f"foundation='cloud' pre-trains on the embedded digits corpus, which dataset="
                f"{self.data.dataset!r} does not have; use foundation='timm' (pretrained weights, "
                f"needs internet once), 'file' (checkpoint-path) or 'none'"
            )

    # -- the app boundary -----------------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """From Flower's `context.run_config` (hyphenated keys; missing keys default)."""
        unknown = [k for k in run_config if k.replace("-", "_") not in _owners() or "_" in k]
        if unknown:
            raise ConfigError(unknown_names("run-config key", unknown, map(_key, _owners())))
        return cls.of(**{_field(key): value for key, value in run_config.items()})

    @classmethod
    def of(cls, **values: Any) -> RunConfig:
        """From flat field names (`lr=0.1, depth=4`), each cast and sent to its section."""
        return RunConfig().replace(**values)

    def replace(self, **values: Any) -> RunConfig:
        """A copy with flat fields changed (`cfg.replace(mode="full", num_prompts=0)`)."""
        changes: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            section, f = _owner(name)
            changes.setdefault(section, {})[name] = _cast(_key(name), value, f)
        return dataclasses.replace(
            self,
            **{s: dataclasses.replace(getattr(self, s), **c) for s, c in changes.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        """The flat run-config (hyphenated keys), as Flower and config.json have it."""
        return {
            _key(f.name): _render(getattr(s, f.name)) for s in self._sections() for f in fields(s)
        }

    def _sections(self) -> Iterator[Any]:
        return (getattr(self, f.name) for f in fields(self))


_OVERRIDE = re.compile(r"""[^\s=]+\s*=\s*(?:'[^']*'|"[^"]*"|\S+)""")


def parse_overrides(text: str) -> dict[str, Any]:
    """Flower's `--run-config` syntax for scripts: "num-rounds=3 mode='vpt-shallow'", or, as in
    `flwr run`, the path of a TOML file of flat `key = value` lines (`conf/*.toml`). Anything
    else is refused, so a mistyped path or item never runs the default silently."""
    stripped = text.strip()
    if stripped.endswith(".toml") and "=" not in stripped:
        try:
            with open(stripped, "rb") as f:
                return tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"cannot read run-config file {stripped!r}: {err}") from err
    leftover = _OVERRIDE.sub(" ", text).split()
    if leftover:
        raise ConfigError(
            f"cannot read {' '.join(leftover)!r} in --run-config {text!r}: give key=value items "
            "(e.g. \"num-rounds=3 mode='vpt-shallow'\") or the path of a .toml file"
        )
    overrides: dict[str, Any] = {}
    for item in _OVERRIDE.findall(text):
        try:
            overrides.update(tomllib.loads(item))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"cannot read {item!r} as key=value (TOML value): {err}") from err
    return overrides


def option_of(name: str) -> Option:
    """The declaration of field `name` (`lr`, `depth`, ...): what other checks of the same value
    hold to (a D2D peer's optimizer, deploy/peer.py)."""
    return _owner(name)[1].metadata["option"]  # type: ignore[no-any-return]


def key_table() -> str:
    """docs/configure.md's table of every key: section, key, default, what is valid, doc."""
    rows = ["| section | key | default | valid | what |", "|---|---|---|---|---|"]
    for section in fields(RunConfig):
        for f in fields(section.default):  # type: ignore[arg-type]
            o: Option = f.metadata["option"]
            default = _render(f.default)
            rows.append(
                f"| {section.name} | `{_key(f.name)}` | `{default!r}` | {o.allowed()} | {o.doc} |"
            )
    return "\n".join(rows)


# -- helpers --------------------------------------------------------------------------------
_OWNERS: dict[str, tuple[str, dataclasses.Field]] = {}


def _owners() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat field name -> (section attribute, field); names are unique across sections."""
    if not _OWNERS:
        for section in fields(RunConfig):
            for f in fields(section.default):  # type: ignore[arg-type]
                assert f.name not in _OWNERS, f"{f.name} in two sections"
                _OWNERS[f.name] = (section.name, f)
    return _OWNERS


def _owner(name: str) -> tuple[str, dataclasses.Field]:
    try:
        return _owners()[name]
    except KeyError:
        raise ConfigError(
            unknown_names("run-config key", [_key(name)], map(_key, _owners()))
        ) from None


# -- names: what a typo most likely meant (also the `flwr run` driver's key check) ----------
def close_matches(name: str, valid: Iterable[str]) -> list[str]:
    """Up to three valid names closest to `name` (difflib's ratio >= 0.6), best first."""
    return difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)


def unknown_names(what: str, unknown: Iterable[str], valid: Iterable[str]) -> str:
    """`unknown run-config key 'num-round' (did you mean 'num-rounds'?); valid keys: ...`.

    `what` names the kind of name ("run-config key"); every unknown name gets its own close
    matches, and the valid names follow, sorted, so the message also serves a name with none."""
    choices = sorted(set(valid))
    parts = []
    for name in sorted(set(unknown)):
        near = close_matches(name, choices)
        hint = f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""
        parts.append(f"{name!r}{hint}")
    plural = "s" if len(parts) > 1 else ""
    return f"unknown {what}{plural} {', '.join(parts)}; valid {what}s: {', '.join(choices)}"


def _divisors(n: int, at_most: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _cast(key: str, value: Any, f: dataclasses.Field) -> Any:
    """TOML gives int/float/bool/str: accept an int where a float is wanted, a comma-separated
    string (or a tuple) where a tuple is wanted, nothing else."""
    default = f.default
    if f.name == "strategy_options":  # keyword arguments: parsed once, here
        if isinstance(value, str):
            return tuple(strategy_options(value).items())
        if isinstance(value, tuple | list) and all(isinstance(v, tuple) for v in value):
            return tuple(value)
        raise ConfigError(f"{key} must be str, got {type(value).__name__} {value!r}")
    if isinstance(default, tuple):
        kind = _ITEM_KIND[f.name]
        if isinstance(value, tuple | list):
            items = list(value)
        elif isinstance(value, str):
            items = [item.strip() for item in value.split(",") if item.strip()]
        else:
            raise ConfigError(f"{key} must be str, got {type(value).__name__} {value!r}")
        try:
            return tuple(
                cast_scalar(key, kind(v) if isinstance(v, str) and kind is not str else v, kind)
                for v in items
            )
        except ValueError as err:
            raise ConfigError(
                f"{key}={value!r} is not a comma-separated list of {kind.__name__} values"
            ) from err
    return cast_scalar(key, value, type(default))


def cast_scalar(key: str, value: Any, kind: type) -> Any:
    """`value` as `kind`: an int where a float is wanted, otherwise exactly `kind` (a bool is
    no int here); ConfigError naming `key` and both types."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}={value!r} is too large for a float") from None
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


# The item type of each tuple field (the annotation, which `from __future__` keeps a string).
_ITEM_KIND: dict[str, type] = {
    "peer_speeds": float,
    "peer_devices": str,
    "demand": int,
    "edge_domains": str,
    "edge_shares": float,
}
