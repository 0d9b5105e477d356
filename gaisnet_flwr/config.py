"""The run's configuration, in sections: read once at the app boundary, validated, typed.

Flower hands the apps one flat run-config (`[tool.flwr.app.config]` in pyproject.toml, keys with
hyphens). `RunConfig.from_run_config` sorts each key into the section that owns it (a field
`num_prompts` of `ModelConfig` <-> the key `num-prompts`), and refuses unknown keys, wrong types
and invalid values *before* any model is built or any data is read, naming the key and the valid
choices. Each part of the code takes only the section it needs:

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
    run         seed, device, outputs, tracking                 -> everyone

Sections check their own values (pure, no I/O). What needs the environment (the cost-profile
TOML, a checkpoint file, a CUDA device) is checked once by `RunConfig.check_environment`, which
`from_run_config` runs: nothing reads files or probes devices on construction.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from gaisnet_flwr.costs.pricing import ClusterProfile
from gaisnet_flwr.costs.profiles import (
    CostConfigError,
    DeviceProfile,
    LinkProfile,
    Profiles,
    load_profiles,
)
from gaisnet_flwr.data.images import (
    DATASETS,
    DOMAINS,
    EDGE_TASKS,
    PARTITIONINGS,
    DataSpec,
    dataset_classes,
)
from gaisnet_flwr.population.devices import PopulationError, check_spec, load_spec
from gaisnet_flwr.population.edge_offload import EDGE_OFFLOAD, EdgeServer
from gaisnet_flwr.population.layout import ClusterLayout, form_layout
from gaisnet_flwr.population.planning import RangeCosts, Workload, plan_cluster
from gaisnet_flwr.service.scheduler import POLICIES
from gaisnet_flwr.split.chain import OPTIMIZERS
from gaisnet_flwr.split.plan import COMPUTE_PLANNERS, PLANNERS, PlanError, SplitPlan, make_plan
from gaisnet_flwr.split.precision import PRECISIONS, SMASHED_DTYPES, Precision
from gaisnet_flwr.vit.checkpoint import CheckpointFileError, check_weights_file
from gaisnet_flwr.vit.model import (
    MAX_PATCHES,
    MODES,
    SHAPE_LIMITS,
    ModelError,
    PromptedViT,
    build_prompted_vit,
)

FOUNDATIONS = ("cloud", "timm", "file", "none")
SERVICES = ("fine-tuning", "integrated")
CLOUD_MODULES = ("prompts", "all")
DEVICES = ("auto", "cpu", "cuda")
# How the edge ships a model for SL inference: the tunable modules only, or every weight.
DISTRIBUTIONS = ("efficient", "full")
SEED_MAX = 2**32 - 1  # numpy's seed range (and torch's, with the offsets the loops add)
# The largest model the run may build: ViT-g/14 has about 1.0e9 parameters (4 GB in float32).
MAX_PARAMETERS = 1_000_000_000


class ConfigError(ValueError):
    """An invalid run-config value; the message names the key and what is allowed."""


# -- helpers --------------------------------------------------------------------------------------
@functools.cache
def _owners() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat field name -> (section attribute, field); names are unique across sections."""
    owners: dict[str, tuple[str, dataclasses.Field]] = {}
    for section in fields(RunConfig):
        for f in fields(section.default):  # type: ignore[arg-type]
            assert f.name not in owners, f"{f.name} in two sections"
            owners[f.name] = (section.name, f)
    return owners


def _owner(name: str) -> tuple[str, dataclasses.Field]:
    try:
        return _owners()[name]
    except KeyError:
        raise ConfigError(
            f"unknown run-config key {_key(name)!r}; valid keys: {sorted(map(_key, _owners()))}"
        ) from None


def _known(run_config: Mapping[str, Any]) -> Mapping[str, Any]:
    unknown = sorted(k for k in run_config if k.replace("-", "_") not in _owners() or "_" in k)
    if unknown:
        valid = sorted(map(_key, _owners()))
        raise ConfigError(f"unknown run-config key(s) {unknown}; valid keys: {valid}")
    return run_config


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


def _number_list(key: str, text: str, kind: type[int] | type[float]) -> list[Any]:
    """A comma-separated run-config list such as "1,2,1"; empty items are skipped."""
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError as err:
        raise ConfigError(
            f"{key}={text!r} is not a comma-separated list of {kind.__name__} values"
        ) from err


def _positive_list(key: str, text: str, values: list[float], count: int) -> None:
    """`values` (read from `text`) must be `count` finite positive numbers."""
    what = {"peer-speeds": "peer", "edge-shares": "edge in edge-domains"}[key]
    valid = f"must list {count} finite positive numbers (one per {what}), or be empty"
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ConfigError(f"{key}={text!r}: {bad[0]!r} is not a finite number > 0; {valid}")
    if len(values) != count:
        raise ConfigError(f"{key}={text!r} lists {len(values)} number(s); {valid}")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _field(key: str) -> str:
    return key.replace("-", "_")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{_key(name)}={value!r} is not valid; choose one of {', '.join(choices)}"
        )


def _ints(section: Any, low: int, high: int, *names: str) -> None:
    """Each int field in [low, high]."""
    for name in names:
        value = getattr(section, name)
        if not low <= value <= high:
            raise ConfigError(
                f"{_key(name)}={value!r} is out of range: must be >= {low} and <= {high}"
            )


def _floats(
    section: Any,
    low: float,
    high: float | None,
    *names: str,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Each float field finite (nan and inf refused by name) and within the bounds."""
    for name in names:
        value = getattr(section, name)
        above = value > low if low_open else value >= low
        below = high is None or (value < high if high_open else value <= high)
        if not (math.isfinite(value) and above and below):
            raise ConfigError(
                f"{_key(name)}={value!r} is not valid: must be a finite number "
                f"{_bounds(low, high, low_open, high_open)}"
            )


def _bounds(low: float, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is not None and not low_open and not high_open:
        return f"in [{low:g}, {high:g}]"
    text = f"> {low:g}" if low_open else f">= {low:g}"
    if high is not None:
        text += f" and < {high:g}" if high_open else f" and <= {high:g}"
    return text


def _divisors(n: int, at_most: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _folder(key: str, value: str, path: Path) -> None:
    """`path` must be a folder or creatable as one: the nearest existing path at or above it
    must be a directory."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{key}={value!r}: {existing} is a file, not a folder; {key} must name a folder "
            f"(created if missing)"
        )


def _cast(key: str, value: Any, kind: type) -> Any:
    # TOML gives int/float/bool/str; accept an int where a float is wanted, nothing else.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}={value!r} is too large for a float") from None
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    if isinstance(value, str) and "\x00" in value:  # no name, path or list holds one
        raise ConfigError(f"{key}={value!r} is not valid: it contains a NUL character")
    return value


# -- sections -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """A timm ViT by name, with shape overrides, and its prompt tuning (paper Sec. III-A).

    Limits (`vit.model.SHAPE_LIMITS`, shared with a D2D peer's model spec): img-size 1..1024,
    patch-size 1..img-size and a divisor of it, at most 4096 patches ((img-size / patch-size)^2),
    depth 1..48, embed-dim 1..4096, num-heads 1..64 and a divisor of embed-dim, num-prompts
    0..1024, and at most 1e9 parameters in all.
    `RunConfig.check_environment` builds the model on the meta device (no memory) to prove that
    model-name is a timm VisionTransformer that takes these shapes.
    """

    model_name: str = "vit_tiny_patch16_224"
    img_size: int = 32
    patch_size: int = 8
    depth: int = 6
    embed_dim: int = 64
    num_heads: int = 4
    mode: str = "vpt-deep"  # one of MODES
    num_prompts: int = 10  # prompt tokens per prompt module (VPT)

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        if not self.model_name.strip():
            raise ConfigError(
                "model-name='' is not valid: name a timm ViT, e.g. vit_tiny_patch16_224"
            )
        _ints(self, 1, SHAPE_LIMITS["img_size"], "img_size")
        if not 1 <= self.patch_size <= self.img_size:
            raise ConfigError(
                f"patch-size={self.patch_size} is out of range: must be >= 1 and <= "
                f"img-size={self.img_size}, and divide it"
            )
        _ints(self, 1, SHAPE_LIMITS["depth"], "depth")
        _ints(self, 1, SHAPE_LIMITS["embed_dim"], "embed_dim")
        _ints(self, 1, SHAPE_LIMITS["num_heads"], "num_heads")
        _ints(self, 0, SHAPE_LIMITS["num_prompts"], "num_prompts")
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
class FoundationConfig:
    """The frozen foundation model: one of FOUNDATIONS (see gaisnet_flwr/cloud/foundation.py).

    Limits: pretrain-epochs 0..1000, pretrain-lr a finite number in (0, 10], pretrain-seed
    in [0, 2**32 - 1]; foundation-dir
    must be a folder (or creatable as one).
    """

    foundation: str = "cloud"
    checkpoint_path: str = ""  # weights file for foundation = "file"
    foundation_dir: str = ""  # where cloud checkpoints live; "" = ~/.cache/gaisnet-flwr
    # cloud pre-training of the full model: epochs over the cloud corpus (with the default
    # new-classes task, over its 11 views: 4 epochs see each image 44 times)
    pretrain_epochs: int = 4
    pretrain_lr: float = 1e-3
    # the cloud's own seed: one foundation serves runs of every `seed` (which seeds the edges:
    # fresh heads, prompts, partitions, shuffles), so seeds measure fine-tuning's spread
    pretrain_seed: int = 0

    def __post_init__(self) -> None:
        _choice("foundation", self.foundation, FOUNDATIONS)
        _ints(self, 0, 1000, "pretrain_epochs")
        _ints(self, 0, SEED_MAX, "pretrain_seed")
        _floats(self, 0, 10, "pretrain_lr", low_open=True)

    def directory(self) -> Path:
        if self.foundation_dir:
            return Path(self.foundation_dir).expanduser().resolve()
        return Path.home() / ".cache" / "gaisnet-flwr"


@dataclass(frozen=True)
class ClusterConfig:
    """A client cluster: start point -> `peers_per_cluster` D2D peers -> end point (Fig. 4).

    `population` "" makes every cluster the same (the cost model's start/peer/end devices);
    otherwise clusters are formed from a device population (gaisnet_flwr/population: a TOML or
    CSV file, or "generated:N:SEED"), each with its own devices, links and plan. The planner
    "comm-aware" also counts the hops each peer sends and its memory; "minmax" and "even" are
    compute-only. `edge_offload` "auto" lets a population's chains hold the edge server as a node
    where that shortens the round (its busiest node, then its latency; population/edge_offload.py;
    needs planner "comm-aware", a population and one edge).

    Limits: peers-per-cluster 1..48 (and at most depth); peer-speeds finite numbers > 0.
    """

    peers_per_cluster: int = 3
    peer_speeds: str = ""  # relative compute speeds, e.g. "1,2,1"; "" = the peers' devices
    planner: str = "minmax"  # one of PLANNERS
    population: str = ""  # "" | "generated:N:SEED" | a .toml / .csv file of devices
    edge_offload: str = "never"  # one of EDGE_OFFLOAD: may the edge server hold a segment

    def __post_init__(self) -> None:
        _choice("planner", self.planner, PLANNERS)
        _choice("edge_offload", self.edge_offload, EDGE_OFFLOAD)
        try:
            check_spec(self.population)
        except PopulationError as err:
            raise ConfigError(str(err)) from err
        _ints(self, 1, SHAPE_LIMITS["depth"], "peers_per_cluster")  # one block each at least
        if self.peer_speeds.strip():
            _positive_list("peer-speeds", self.peer_speeds, self.speeds(), self.peers_per_cluster)

    def speeds(self) -> list[float]:
        """The speeds the user gave (empty: the cost model's devices decide)."""
        return _number_list("peer-speeds", self.peer_speeds, float)


@dataclass(frozen=True)
class TrainingConfig:
    """One cluster's local optimisation over its split chain, per round.

    Limits: local-epochs 1..1000, batch-size 1..4096, lr a finite number in (0, 10], momentum
    in [0, 1), weight-decay in [0, 1].
    """

    local_epochs: int = 1
    optimizer: str = "sgd"  # one of OPTIMIZERS
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 10  # the paper's (Sec. V); a cluster's few shots make a few batches

    def __post_init__(self) -> None:
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _ints(self, 1, 1000, "local_epochs")
        _ints(self, 1, 4096, "batch_size")
        _floats(self, 0, 10, "lr", low_open=True)
        _floats(self, 0, 1, "momentum", high_open=True)
        _floats(self, 0, 1, "weight_decay")


@dataclass(frozen=True)
class DataConfig:
    """The dataset and how the edge's data is partitioned into clusters.

    Limits: classes-per-cluster >= 1 (with partitioning='classes', at most the dataset's
    classes: digits 5 with edge-task 'new-classes' and 10 with 'same-classes', flowers102 102,
    imagefolder its class folders), dirichlet-alpha a finite number in (0, 1e6], val-fraction
    in (0, 1), cluster-samples and shots 0..100000.
    """

    dataset: str = "digits"  # one of DATASETS; digits ships with scikit-learn (no download)
    data_dir: str = ""
    partitioning: str = "iid"  # one of PARTITIONINGS
    classes_per_cluster: int = 2
    dirichlet_alpha: float = 0.5
    val_fraction: float = 0.2
    # 0: the edge's pool is split among its clusters (pool / N images each). K > 0: every
    # cluster draws its own K images from the pool (data/cluster_sample.py), the same amount
    # whatever the number of clusters; what thousands of clusters need.
    cluster_samples: int = 0
    # digits: the edges learn digits the cloud never saw (new-classes: cloud 0-4, edges 5-9) or
    # the cloud's own ten (same-classes, the earlier default); one of EDGE_TASKS
    edge_task: str = "new-classes"
    shots: int = 10  # at most this many training images per class in each cluster; 0 = all

    def __post_init__(self) -> None:
        _choice("dataset", self.dataset, DATASETS)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"val-fraction={self.val_fraction} must be in the open interval (0, 1)"
            )
        _choice("partitioning", self.partitioning, PARTITIONINGS)
        _choice("edge_task", self.edge_task, EDGE_TASKS)
        _ints(self, 1, 100_000, "classes_per_cluster")
        _ints(self, 0, 100_000, "cluster_samples")
        _ints(self, 0, 100_000, "shots")
        _floats(self, 0, 1e6, "dirichlet_alpha", low_open=True)


@dataclass(frozen=True)
class CostConfig:
    """Device and link profile names of the cost model (presets in gaisnet_flwr/costs, or
    from the `cost_profiles` TOML)."""

    cost_profiles: str = ""  # TOML file adding/overriding [devices.NAME] / [links.NAME]
    start_device: str = "phone-mid"
    peer_devices: str = "phone-high,phone-mid,phone-low"  # cycled over the peers
    end_device: str = "phone-mid"
    d2d_link: str = "d2d-50m"
    uplink: str = "uplink-1mhz"
    edge_device: str = "edge-server"  # runs aggregation, and chain segments (edge-offload)
    backhaul_link: str = "backhaul-1gbps"  # edge <-> cloud

    @functools.cached_property
    def profiles(self) -> Profiles:
        """The presets, plus and overridden by `cost-profiles` (read once per section: a
        changed section is a new object, so the cache never goes stale)."""
        return load_profiles(Path(self.cost_profiles).expanduser() if self.cost_profiles else None)

    def check(self) -> None:
        """Read `cost-profiles` and resolve every profile name, each refusal naming its key
        (`start-device='nope': unknown device profile 'nope'; valid: ...`)."""
        path = self.cost_profiles
        if path:
            file = Path(path).expanduser()
            what = "a TOML file of [devices.NAME] / [links.NAME] tables, or '' for the presets"
            if not file.exists():
                raise ConfigError(f"cost-profiles={path!r}: no such file; it must name {what}")
            if not file.is_file():
                raise ConfigError(f"cost-profiles={path!r} is not a file; it must name {what}")
            try:
                self.profiles  # noqa: B018 - reads and checks the file once
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
                raise ConfigError(f"cost-profiles={path!r} is not valid TOML: {err}") from err
            except OSError as err:
                raise ConfigError(f"cost-profiles={path!r} cannot be read: {err}") from err
            except CostConfigError as err:
                raise ConfigError(f"cost model: cost-profiles={path!r}: {err}") from err
        names = [
            (f.name, name.strip())
            for f in fields(self)
            if f.name.endswith(("_device", "_devices", "_link", "uplink"))
            for name in getattr(self, f.name).split(",")
            if name.strip() or f.name != "peer_devices"
        ]
        for field, name in names:
            lookup = self.profiles.device if "device" in field else self.profiles.link
            try:
                lookup(name)
            except CostConfigError as err:
                raise ConfigError(
                    f"cost model: {_key(field)}={getattr(self, field)!r}: {err}"
                ) from err
        for field, kind in (("d2d_link", "d2d"), ("uplink", "client-edge")):
            link = self.profiles.link(getattr(self, field))
            if link.kind != kind:
                raise ConfigError(
                    f"cost model: {_key(field)}={link.name!r} is a {link.kind} link; it must be "
                    f"a {kind} link (valid: "
                    f"{', '.join(n for n, p in self.profiles.links.items() if p.kind == kind)})"
                )

    def cluster_profile(self, num_peers: int) -> ClusterProfile:
        """Devices in chain order (start, peers cycled, end), D2D hops and the uplink."""
        peers = [p.strip() for p in self.peer_devices.split(",") if p.strip()]
        if not peers:
            raise CostConfigError("peer-devices names no device profile")
        devices = [
            self.start_device,
            *(peers[k % len(peers)] for k in range(num_peers)),
            self.end_device,
        ]
        return ClusterProfile.from_names(self.profiles, devices, self.d2d_link, self.uplink)

    def hierarchy_profiles(self) -> tuple[DeviceProfile, LinkProfile]:
        """The edge server's device and the edge-cloud backhaul link."""
        backhaul = self.profiles.link(self.backhaul_link)
        if backhaul.kind != "edge-cloud":
            raise CostConfigError(
                f"backhaul-link {self.backhaul_link!r} is a {backhaul.kind} "
                f"link; it must be an edge-cloud link"
            )
        return self.profiles.device(self.edge_device), backhaul


@dataclass(frozen=True)
class InferenceConfig:
    """SL inference after fine-tuning (paper Sec. III-D). Limits: inference-requests 0..10000."""

    inference_requests: int = 2  # requests served after fine-tuning (round-robin over clusters)
    distribution: str = "efficient"  # ship the tunable modules only, or "full": every weight

    def __post_init__(self) -> None:
        _choice("distribution", self.distribution, DISTRIBUTIONS)
        _ints(self, 0, 10_000, "inference_requests")


@dataclass(frozen=True)
class ServiceConfig:
    """Integrated fine-tuning and inference (paper Sec. IV-C): each round fine-tune or serve.

    Limits: service-value, finetune-cost and energy-price finite numbers >= 0; demand at most
    10000 rounds.
    """

    service: str = "fine-tuning"  # or "integrated": the scheduler decides each round
    policy: str = "mlcp"  # one of POLICIES: rs, msip, mlcp
    demand: str = ""  # integrated: the edge each round's request needs, e.g. "0,0,1,1,1"
    service_value: float = 100.0  # a served request earns service-value x its accuracy
    finetune_cost: float = 20.0  # one fine-tuning round's fixed cost
    energy_price: float = 1.0  # profit units per joule (cost model) charged to every action

    def __post_init__(self) -> None:
        _choice("service", self.service, SERVICES)
        _choice("policy", self.policy, POLICIES)
        _floats(self, 0, None, "service_value", "finetune_cost", "energy_price")
        if len(self.demand_list()) > 10_000:
            raise ConfigError(f"demand lists {len(self.demand_list())} rounds; at most 10000")

    def demand_list(self) -> list[int]:
        return _number_list("demand", self.demand, int)


@dataclass(frozen=True)
class HierarchyConfig:
    """Rounds, edge servers (one domain each), the cloud, and each edge's aggregation
    (paper Sec. III-B).

    Limits: num-rounds 1..10000, cloud-every 0..10000, cloud-mix and fraction-evaluate in
    [0, 1], min-clusters 0..10000, max-in-flight 0..1000000, at most 64 edge-domains,
    edge-shares finite numbers > 0, strategy-options values finite numbers, strings or
    booleans. The strategy's name and options are resolved by the apps (`apps/hfsl.py:
    check_run_config`: building the strategy once), which may import the strategies.
    """

    num_rounds: int = 5
    edge_domains: str = "none"  # one domain per edge server, comma-separated (DOMAINS)
    edge_shares: str = ""  # relative data share per edge, e.g. "1,1,0.2"; "" = equal
    cloud_every: int = 1  # cloud aggregates across edges every K rounds; 0 = never (isolated)
    cloud_mix: float = 0.5  # delivered = mix * cloud + (1 - mix) * edge's own modules
    cloud_modules: str = "prompts"  # what the cloud aggregates: one of CLOUD_MODULES
    strategy: str = "module-fedavg"  # a registry name or "package.module:Class"
    strategy_options: str = ""  # extra strategy kwargs as TOML, e.g. "proximal_mu=0.1"
    fraction_evaluate: float = 1.0
    min_clusters: int = 0  # deployment: wait for this many SuperNodes; 0 = whoever is there
    # Messages the ServerApp keeps in flight at once (apps/in_flight.py); 0 = all of a round at
    # once, as Flower's own send_and_receive. Flower's simulation loop scans every stored
    # message for every node each 0.1 s, so all N in flight cost O(N^2) per scan. 16 keeps the
    # actors of a 2-core machine busy; at N = 1000, 64 doubled the cost of Flower's loop
    # (docs/running.md#many-clusters).
    max_in_flight: int = 16

    def __post_init__(self) -> None:
        _ints(self, 1, 10_000, "num_rounds")
        _ints(self, 0, 10_000, "min_clusters", "cloud_every")
        _ints(self, 0, 1_000_000, "max_in_flight")
        _choice("cloud_modules", self.cloud_modules, CLOUD_MODULES)
        if self.num_edges() > 64:
            raise ConfigError(f"edge-domains lists {self.num_edges()} edges; at most 64")
        for domain in self.domains():
            _choice("edge_domains", domain, DOMAINS)
        if self.edge_shares.strip():
            _positive_list("edge-shares", self.edge_shares, self.shares(), self.num_edges())
        _floats(self, 0, 1, "cloud_mix", "fraction_evaluate")
        if not self.strategy.strip():
            raise ConfigError(
                "strategy='' is not valid: name a registry strategy (e.g. module-fedavg) or "
                "'package.module:Class'"
            )
        for option, value in self.strategy_kwargs().items():  # parse errors surface now
            scalar = isinstance(value, bool | str) or (
                isinstance(value, int | float) and math.isfinite(value)
            )
            if not scalar:
                raise ConfigError(
                    f"strategy-options={self.strategy_options!r}: {option}={value!r} is not "
                    f"valid: an option value must be a finite number, a string or a boolean"
                )

    def domains(self) -> list[str]:
        return [d.strip() for d in self.edge_domains.split(",")]

    def num_edges(self) -> int:
        return len(self.domains())

    def shares(self) -> list[float]:
        if not self.edge_shares.strip():
            return [1.0] * self.num_edges()
        return _number_list("edge-shares", self.edge_shares, float)

    def strategy_kwargs(self) -> dict[str, Any]:
        try:
            return tomllib.loads(self.strategy_options.replace(",", "\n"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(
                f"strategy-options={self.strategy_options!r} is not 'key=value' pairs "
                f'(TOML values, e.g. "proximal_mu=0.1, eta=0.01"): {err}'
            ) from err


@dataclass(frozen=True)
class RunSection:
    """What the whole run shares: its seed, its torch device and numeric precision, and where
    results go (files and TensorBoard events in output-dir; an MLflow run too when
    mlflow-tracking-uri is set).

    precision (split/precision.py): fp32, tf32 (CUDA tensor cores; fp32 on a CPU) or bf16
    (autocast; prompts, head and optimizer state stay float32); smashed-dtype: the dtype the
    D2D hops carry smashed data and gradients in (fp32, bf16 or fp16; bf16/fp16 halve the D2D
    bytes the cost model prices).

    Limits: seed in [0, 2**32 - 1] (numpy's range); output-dir must be a folder (or creatable
    as one)."""

    seed: int = 0
    device: str = "auto"  # one of DEVICES; auto = cuda when available
    precision: str = "fp32"  # one of PRECISIONS
    smashed_dtype: str = "fp32"  # one of SMASHED_DTYPES: what the D2D hops carry
    output_dir: str = "outputs"
    # "" = no MLflow; e.g. "file:///abs/mlruns" (offline) or a tracking server's http(s) URI
    mlflow_tracking_uri: str = ""

    def __post_init__(self) -> None:
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("smashed_dtype", self.smashed_dtype, tuple(SMASHED_DTYPES))
        _ints(self, 0, SEED_MAX, "seed")
        if not self.output_dir.strip():
            raise ConfigError("output-dir='' is not valid: name a folder for the results")

    def torch_device(self) -> torch.device:
        """auto: the GPU this process sees, if any. Under Flower's Ray simulation that is the
        one Ray assigned this ClientApp (client-resources-num-gpus > 0 sets
        CUDA_VISIBLE_DEVICES; with 0 GPUs Ray hides them all and the node runs on the CPU)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_precision(self) -> Precision:
        return Precision(self.precision, self.smashed_dtype)


# -- the model --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def check_model(model: ModelConfig) -> None:
    """Prove that model-name is a timm VisionTransformer that takes the shape overrides and the
    prompts, by building it on the meta device (shapes only, no memory; cached per section)."""
    name = model.model_name
    valid = "a timm Vision Transformer such as vit_tiny_patch16_224 (timm.list_models('vit_*'))"
    if not timm.is_model(name):
        raise ConfigError(f"model-name={name!r} is not a timm model; valid: {valid}")
    shape: dict[str, Any] = dict(
        img_size=model.img_size,
        patch_size=model.patch_size,
        depth=model.depth,
        embed_dim=model.embed_dim,
        num_heads=model.num_heads,
    )
    try:
        with torch.device("meta"):
            vit = build_prompted_vit(
                name, mode=model.mode, num_prompts=model.num_prompts, num_classes=10, **shape
            )
    except Exception as err:  # noqa: BLE001 - timm or torch refusing the model: say which
        with torch.device("meta"):
            try:
                plain = timm.create_model(name, num_classes=10)
            except Exception:  # noqa: BLE001
                plain = None
        if plain is not None and not isinstance(plain, VisionTransformer):
            raise ConfigError(
                f"model-name={name!r} is a {type(plain).__name__}, not a VisionTransformer; "
                f"valid: {valid}"
            ) from err
        given = ", ".join(f"{_key(k)}={v}" for k, v in shape.items())
        reason = str(err) if isinstance(err, ModelError) else f"{type(err).__name__}: {err}"
        raise ConfigError(f"model-name={name!r} cannot be built with {given}: {reason}") from err
    parameters = sum(p.numel() for p in vit.parameters())
    if parameters > MAX_PARAMETERS:
        raise ConfigError(
            f"model-name={name!r} with depth={model.depth}, embed-dim={model.embed_dim} has "
            f"{parameters:.3g} parameters; at most {MAX_PARAMETERS:.0e} (lower depth or "
            f"embed-dim)"
        )


@functools.lru_cache(maxsize=8)
def _meta_model(model: ModelConfig, num_classes: int) -> PromptedViT:
    with torch.device("meta"):
        return build_prompted_vit(
            model.model_name,
            mode=model.mode,
            num_prompts=model.num_prompts,
            num_classes=num_classes,
            img_size=model.img_size,
            patch_size=model.patch_size,
            depth=model.depth,
            embed_dim=model.embed_dim,
            num_heads=model.num_heads,
        )


def _checkpoint_file(path: str, model: PromptedViT) -> None:
    try:
        check_weights_file(path, model.backbone)
    except CheckpointFileError as err:
        raise ConfigError(f"checkpoint-path: {err}") from err


@functools.lru_cache(maxsize=8)
def _range_costs(model: PromptedViT, workload: Workload) -> RangeCosts:
    return RangeCosts(model, workload)


@functools.lru_cache(maxsize=8)
def _layout(cfg: RunConfig) -> ClusterLayout:
    """Form the clusters once per config (the ClientApp asks on every message)."""
    c = cfg.costs
    profiles = c.profiles
    edge = None  # the edge server as a chain node: its profile, the client-edge link both ways
    if cfg.cluster.edge_offload == "auto":
        edge = EdgeServer(profiles.device(c.edge_device), profiles.link(c.uplink))
    return form_layout(
        load_spec(cfg.cluster.population, profiles),
        profiles,
        profiles.link(c.d2d_link),
        profiles.link(c.uplink),
        cfg.cluster.peers_per_cluster,
        cfg.cluster.planner,
        cfg.range_costs(),
        edge,
    )


# -- the whole run --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """Every section of one run; the checks that span sections live here."""

    model: ModelConfig = ModelConfig()
    cloud: FoundationConfig = FoundationConfig()
    cluster: ClusterConfig = ClusterConfig()
    training: TrainingConfig = TrainingConfig()
    data: DataConfig = DataConfig()
    costs: CostConfig = CostConfig()
    inference: InferenceConfig = InferenceConfig()
    scheduling: ServiceConfig = ServiceConfig()
    hierarchy: HierarchyConfig = HierarchyConfig()
    run: RunSection = RunSection()

    def __post_init__(self) -> None:
        if self.cluster.population.strip() and self.cluster.peer_speeds.strip():
            raise ConfigError(
                f"peer-speeds={self.cluster.peer_speeds!r} is for identical clusters; with "
                f"population={self.cluster.population!r} each cluster's devices set its speeds "
                f"(set peer-speeds='')"
            )
        if self.cluster.edge_offload != "never":
            self._check_edge_offload()
        if self.cluster.peers_per_cluster > self.model.depth:
            raise ConfigError(
                f"peers-per-cluster={self.cluster.peers_per_cluster} exceeds depth="
                f"{self.model.depth}: each peer needs at least one Transformer block"
            )
        if self.scheduling.service == "integrated":
            demand, edges = self.scheduling.demand_list(), self.hierarchy.num_edges()
            if not demand or any(not 0 <= e < edges for e in demand):
                raise ConfigError(
                    f"service='integrated' needs demand: demand={self.scheduling.demand!r} must "
                    f"list, per round, an edge index in [0, {edges}) (edges come from "
                    f"edge-domains)"
                )
        digits = self.data.dataset == "digits"
        if not digits and set(self.hierarchy.domains()) != {"none"}:
            raise ConfigError("edge-domains other than 'none' need the embedded digits dataset")
        if self.cloud.foundation == "cloud" and not digits:
            raise ConfigError(
                f"foundation='cloud' pre-trains on the embedded digits corpus, which dataset="
                f"{self.data.dataset!r} does not have; use foundation='timm' (pretrained weights, "
                f"needs internet once), 'file' (checkpoint-path) or 'none'"
            )

    def _check_edge_offload(self) -> None:
        c = self.cluster
        given = f"edge-offload={c.edge_offload!r}"
        if c.planner != "comm-aware":
            raise ConfigError(
                f"{given} prices the hops into and out of the edge server: it needs "
                f"planner='comm-aware' (planner={c.planner!r} prices compute alone)"
            )
        if not c.population.strip():
            raise ConfigError(
                f"{given} shares the edge server among the clusters formed from a device "
                f"population: set population (a .toml/.csv file or 'generated:N:SEED')"
            )
        if self.hierarchy.num_edges() != 1:
            raise ConfigError(
                f"{given}: a population is one cell whose clusters share one edge server; "
                f"edge-domains={self.hierarchy.edge_domains!r} lists "
                f"{self.hierarchy.num_edges()} edges (use one, or edge-offload='never')"
            )

    # -- the app boundary -----------------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's `context.run_config` (hyphenated keys; missing keys default) and
        check what needs the environment, before any work."""
        cfg = cls.of(**{_field(key): value for key, value in _known(run_config).items()})
        cfg.check_environment()
        return cfg

    @classmethod
    def of(cls, **values: Any) -> RunConfig:
        """From flat field names (`lr=0.1, depth=4`), each cast and sent to its section."""
        return RunConfig().replace(**values)

    def replace(self, **values: Any) -> RunConfig:
        """A copy with flat fields changed (`cfg.replace(mode="full", num_prompts=0)`)."""
        changes: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            section, field = _owner(name)
            kind = type(field.default)
            changes.setdefault(section, {})[name] = _cast(_key(name), value, kind)
        return dataclasses.replace(
            self,
            **{s: dataclasses.replace(getattr(self, s), **c) for s, c in changes.items()},
        )

    def check_environment(self) -> None:
        """What needs files, devices or libraries: the data folder and its classes, the cost
        profiles, the model (built on the meta device), a checkpoint file, the folders, CUDA."""
        try:
            self.data_spec().validate()
        except ValueError as err:
            # DataSpec names its own fields; the user typed run-config keys.
            message = re.sub(r"DataSpec\.(\w+)", lambda m: _key(m.group(1)), str(err))
            raise ConfigError(message) from err
        classes = dataset_classes(self.data_spec())
        if self.data.partitioning == "classes" and self.data.classes_per_cluster > classes:
            raise ConfigError(
                f"classes-per-cluster={self.data.classes_per_cluster} is out of range: "
                f"dataset={self.data.dataset!r} has {classes} classes; must be >= 1 and "
                f"<= {classes}"
            )
        self.costs.check()
        try:
            self.cluster_profile()
            self.costs.hierarchy_profiles()
        except (CostConfigError, OSError) as err:
            raise ConfigError(f"cost model: {err}") from err
        check_model(self.model)
        if self.cloud.foundation == "cloud":
            _folder("foundation-dir", self.cloud.foundation_dir, self.cloud.directory())
        _folder("output-dir", self.run.output_dir, Path(self.run.output_dir).expanduser())
        if not self.cluster.peer_speeds.strip():
            # The peers' devices set the speeds: they must be positive numbers too.
            speeds = self.peer_speeds()
            _positive_list("peer-speeds", "", speeds, self.cluster.peers_per_cluster)
        path = self.cloud.checkpoint_path
        if self.cloud.foundation == "file" and not Path(path).expanduser().is_file():
            raise ConfigError(
                f"foundation='file' needs checkpoint-path to name a weights file; "
                f"{path!r} is not a file"
            )
        if self.cloud.foundation == "file":  # format, names, shapes, dtypes, finite: named
            _checkpoint_file(path, self.meta_model())
        if self.run.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        on_cuda = self.run.torch_device().type == "cuda"
        if self.run.precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                "precision='bf16' but this GPU has no bfloat16 support; use 'tf32' or 'fp32'"
            )
        if self.cluster.planner == "comm-aware" and not self.cluster.population.strip():
            try:
                self.plan()
            except PlanError as err:
                raise ConfigError(f"planner='comm-aware': {err}") from err
        if self.cluster.population.strip():
            spec = self.cluster.population
            try:
                layout = self.cluster_layout()
            except (PopulationError, CostConfigError, PlanError, OSError) as err:
                raise ConfigError(f"population={spec!r}: {err}") from err
            assert layout is not None
            if not layout.fine_tuning:
                unplaced = "; ".join(f"{d}: {why}" for d, why in list(layout.unplaced.items())[:5])
                raise ConfigError(
                    f"population={spec!r} forms no fine-tuning cluster of "
                    f"{self.cluster.peers_per_cluster + 2} devices ({unplaced})"
                )

    def to_dict(self) -> dict[str, Any]:
        """The flat run-config (hyphenated keys), as Flower and config.json have it."""
        return {_key(f.name): getattr(s, f.name) for s in self._sections() for f in fields(s)}

    # -- views that combine sections ------------------------------------------------------------
    def cluster_profile(self) -> ClusterProfile:
        return self.costs.cluster_profile(self.cluster.peers_per_cluster)

    def peer_speeds(self) -> list[float]:
        """Peer compute speeds for the planner: peer-speeds, else the peers' device FLOP/s."""
        return self.cluster.speeds() or [
            d.flops_per_second for d in self.cluster_profile().devices[1:-1]
        ]

    def plan(self) -> SplitPlan:
        """The identical clusters' split plan: `peers_per_cluster` contiguous block ranges
        (compute-only over peer-speeds or the peers' devices; comm-aware over their links too)."""
        if self.cluster.planner not in COMPUTE_PLANNERS:
            return plan_cluster(self.cluster.planner, self.range_costs(), self.cluster_profile())
        speeds = self.peer_speeds()
        assert len(speeds) == self.cluster.peers_per_cluster  # checked at the boundary
        return make_plan(self.cluster.planner, self.model.depth, speeds)

    def meta_model(self) -> PromptedViT:
        """The model on the meta device (shapes only): what planning and prediction read."""
        return _meta_model(self.model, dataset_classes(self.data_spec()))

    def range_costs(self) -> RangeCosts:
        """What each range of blocks costs a peer. Plans are sized on one batch: a round's
        compute and hop bytes grow together with its batches, so one batch decides the split,
        and every party (ServerApp, ClientApps) sizes it the same way without the data."""
        t = self.training
        workload = Workload(
            t.batch_size, t.batch_size, 1, t.optimizer, t.momentum, self.smashed_element_size()
        )
        return _range_costs(self.meta_model(), workload)

    def smashed_element_size(self) -> int:
        """Bytes per value the D2D hops carry (smashed-dtype)."""
        return SMASHED_DTYPES[self.run.smashed_dtype].itemsize

    def cluster_layout(self) -> ClusterLayout | None:
        """The clusters formed from `population` (None without one); one per config."""
        return _layout(self) if self.cluster.population.strip() else None

    def data_spec(self) -> DataSpec:
        d = self.data
        return DataSpec(
            dataset=d.dataset,
            data_dir=d.data_dir,
            img_size=self.model.img_size,
            partitioning=d.partitioning,
            classes_per_cluster=d.classes_per_cluster,
            dirichlet_alpha=d.dirichlet_alpha,
            val_fraction=d.val_fraction,
            seed=self.run.seed,
            edge_task=d.edge_task,
            shots=d.shots,
        )

    def _sections(self) -> Iterator[Any]:
        return (getattr(self, f.name) for f in fields(self))
