"""The run's configuration, in sections: read once at the app boundary, validated, typed.

Flower hands the apps one flat run-config (`[tool.flwr.app.config]` in pyproject.toml, keys with
hyphens). `RunConfig.from_run_config` sorts each key into the section that owns it (a field
`num_prompts` of `ModelConfig` <-> the key `num-prompts`), and refuses unknown keys, wrong types
and invalid values *before* any model is built or any data is read, naming the key and the valid
choices. Each part of the code takes only the section it needs:

    model       the timm ViT and how it is prompted            -> vit, split, costs
    cloud       where the frozen foundation comes from          -> cloud
    cluster     D2D peers per cluster and how the plan is made  -> split (planner)
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

import torch

from gaisnet_flwr.costs.pricing import ClusterProfile
from gaisnet_flwr.costs.profiles import (
    CostConfigError,
    DeviceProfile,
    LinkProfile,
    Profiles,
    load_profiles,
)
from gaisnet_flwr.data.images import DATASETS, DOMAINS, PARTITIONINGS, DataSpec
from gaisnet_flwr.service.scheduler import POLICIES
from gaisnet_flwr.split.chain import OPTIMIZERS
from gaisnet_flwr.split.plan import PLANNERS, SplitPlan, make_plan
from gaisnet_flwr.vit.model import MODES

FOUNDATIONS = ("cloud", "timm", "file", "none")
SERVICES = ("fine-tuning", "integrated")
CLOUD_MODULES = ("prompts", "all")
DEVICES = ("auto", "cpu", "cuda")
# How the edge ships a model for SL inference: the tunable modules only, or every weight.
DISTRIBUTIONS = ("efficient", "full")


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


def parse_overrides(text: str) -> dict[str, Any]:
    """Flower's `--run-config` syntax for scripts: "num-rounds=3 mode='vpt-shallow'"."""
    overrides: dict[str, Any] = {}
    for item in re.findall(r"""[^\s=]+\s*=\s*(?:'[^']*'|"[^"]*"|\S+)""", text):
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
    if len(values) != count or not all(math.isfinite(v) and v > 0 for v in values):
        what = {"peer-speeds": "peer", "edge-shares": "edge in edge-domains"}[key]
        raise ConfigError(
            f"{key}={text!r} must list {count} positive numbers (one per {what}), or be empty"
        )


def _key(name: str) -> str:
    return name.replace("_", "-")


def _field(key: str) -> str:
    return key.replace("-", "_")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{_key(name)}={value!r} is not valid; choose one of {', '.join(choices)}"
        )


def _at_least(section: Any, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(section, name) < minimum:
            raise ConfigError(f"{_key(name)} must be >= {minimum}, got {getattr(section, name)}")


def _positive(section: Any, *names: str) -> None:
    for name in names:
        if not getattr(section, name) > 0:
            raise ConfigError(f"{_key(name)} must be > 0, got {getattr(section, name)}")


def _cast(key: str, value: Any, kind: type) -> Any:
    # TOML gives int/float/bool/str; accept an int where a float is wanted, nothing else.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


# -- sections -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """A timm ViT by name, with shape overrides, and its prompt tuning (paper Sec. III-A)."""

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
        _at_least(self, 1, "img_size", "patch_size", "depth", "embed_dim", "num_heads")
        _at_least(self, 0, "num_prompts")
        if self.mode in ("linear", "full") and self.num_prompts:
            raise ConfigError(f"mode {self.mode!r} trains no prompts: set num-prompts=0")


@dataclass(frozen=True)
class FoundationConfig:
    """The frozen foundation model: one of FOUNDATIONS (see gaisnet_flwr/cloud/foundation.py)."""

    foundation: str = "cloud"
    checkpoint_path: str = ""  # weights file for foundation = "file"
    foundation_dir: str = ""  # where cloud checkpoints live; "" = ~/.cache/gaisnet-flwr
    pretrain_epochs: int = 30  # cloud pre-training of the full model on the cloud corpus
    pretrain_lr: float = 1e-3

    def __post_init__(self) -> None:
        _choice("foundation", self.foundation, FOUNDATIONS)
        _at_least(self, 0, "pretrain_epochs")
        _positive(self, "pretrain_lr")

    def directory(self) -> Path:
        if self.foundation_dir:
            return Path(self.foundation_dir).expanduser().resolve()
        return Path.home() / ".cache" / "gaisnet-flwr"


@dataclass(frozen=True)
class ClusterConfig:
    """A client cluster: start point -> `peers_per_cluster` D2D peers -> end point (Fig. 4)."""

    peers_per_cluster: int = 3
    peer_speeds: str = ""  # relative compute speeds, e.g. "1,2,1"; "" = the peers' devices
    planner: str = "minmax"  # one of PLANNERS

    def __post_init__(self) -> None:
        _choice("planner", self.planner, PLANNERS)
        _at_least(self, 1, "peers_per_cluster")
        if self.peer_speeds.strip():
            _positive_list("peer-speeds", self.peer_speeds, self.speeds(), self.peers_per_cluster)

    def speeds(self) -> list[float]:
        """The speeds the user gave (empty: the cost model's devices decide)."""
        return _number_list("peer-speeds", self.peer_speeds, float)


@dataclass(frozen=True)
class TrainingConfig:
    """One cluster's local optimisation over its split chain, per round."""

    local_epochs: int = 1
    optimizer: str = "sgd"  # one of OPTIMIZERS
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _at_least(self, 1, "local_epochs", "batch_size")
        _positive(self, "lr")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class DataConfig:
    """The dataset and how the edge's data is partitioned into clusters."""

    dataset: str = "digits"  # one of DATASETS; digits ships with scikit-learn (no download)
    data_dir: str = ""
    partitioning: str = "iid"  # one of PARTITIONINGS
    classes_per_cluster: int = 2
    dirichlet_alpha: float = 0.5
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        _choice("dataset", self.dataset, DATASETS)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"val-fraction={self.val_fraction} must be in the open interval (0, 1)"
            )
        _choice("partitioning", self.partitioning, PARTITIONINGS)


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
    edge_device: str = "edge-server"  # runs each edge's (and the cloud's) aggregation
    backhaul_link: str = "backhaul-1gbps"  # edge <-> cloud

    @functools.cached_property
    def profiles(self) -> Profiles:
        """The presets, plus and overridden by `cost-profiles` (read once per section: a
        changed section is a new object, so the cache never goes stale)."""
        return load_profiles(Path(self.cost_profiles).expanduser() if self.cost_profiles else None)

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
    """SL inference after fine-tuning (paper Sec. III-D)."""

    inference_requests: int = 2  # requests served after fine-tuning (round-robin over clusters)
    distribution: str = "efficient"  # ship the tunable modules only, or "full": every weight

    def __post_init__(self) -> None:
        _choice("distribution", self.distribution, DISTRIBUTIONS)
        _at_least(self, 0, "inference_requests")


@dataclass(frozen=True)
class ServiceConfig:
    """Integrated fine-tuning and inference (paper Sec. IV-C): each round fine-tune or serve."""

    service: str = "fine-tuning"  # or "integrated": the scheduler decides each round
    policy: str = "mlcp"  # one of POLICIES: rs, msip, mlcp
    demand: str = ""  # integrated: the edge each round's request needs, e.g. "0,0,1,1,1"
    service_value: float = 100.0  # a served request earns service-value x its accuracy
    finetune_cost: float = 20.0  # one fine-tuning round's fixed cost
    energy_price: float = 1.0  # profit units per joule (cost model) charged to every action

    def __post_init__(self) -> None:
        _choice("service", self.service, SERVICES)
        _choice("policy", self.policy, POLICIES)

    def demand_list(self) -> list[int]:
        return _number_list("demand", self.demand, int)


@dataclass(frozen=True)
class HierarchyConfig:
    """Rounds, edge servers (one domain each), the cloud, and each edge's aggregation
    (paper Sec. III-B)."""

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

    def __post_init__(self) -> None:
        _at_least(self, 1, "num_rounds")
        _at_least(self, 0, "min_clusters")
        _choice("cloud_modules", self.cloud_modules, CLOUD_MODULES)
        for domain in self.domains():
            _choice("edge_domains", domain, DOMAINS)
        if self.edge_shares.strip():
            _positive_list("edge-shares", self.edge_shares, self.shares(), self.num_edges())
        if self.cloud_every < 0 or not 0 <= self.cloud_mix <= 1:
            raise ConfigError("cloud-every must be >= 0 and cloud-mix in [0, 1]")
        if not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        self.strategy_kwargs()  # parse errors surface now

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
    """What the whole run shares: its seed, its torch device and where results go (files and
    TensorBoard events in output-dir; an MLflow run too when mlflow-tracking-uri is set)."""

    seed: int = 0
    device: str = "auto"  # one of DEVICES; auto = cuda when available
    output_dir: str = "outputs"
    # "" = no MLflow; e.g. "file:///abs/mlruns" (offline) or a tracking server's http(s) URI
    mlflow_tracking_uri: str = ""

    def __post_init__(self) -> None:
        _choice("device", self.device, DEVICES)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


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
        if self.cluster.peers_per_cluster > self.model.depth:
            raise ConfigError(
                f"peers-per-cluster={self.cluster.peers_per_cluster} exceeds depth="
                f"{self.model.depth}: each peer needs at least one Transformer block"
            )
        if self.scheduling.service == "integrated":
            demand, edges = self.scheduling.demand_list(), self.hierarchy.num_edges()
            if not demand or any(not 0 <= e < edges for e in demand):
                raise ConfigError(
                    f"demand={self.scheduling.demand!r} must list, per round, an edge index in "
                    f"[0, {edges}) (edges come from edge-domains)"
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
        """What needs files or devices: the data folder, the cost profiles, a checkpoint file,
        CUDA."""
        try:
            self.data_spec().validate()
        except ValueError as err:
            # DataSpec names its own fields; the user typed run-config keys.
            message = re.sub(r"DataSpec\.(\w+)", lambda m: _key(m.group(1)), str(err))
            raise ConfigError(message) from err
        try:
            self.cluster_profile()
            self.costs.hierarchy_profiles()
        except (CostConfigError, OSError) as err:
            raise ConfigError(f"cost model: {err}") from err
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
        if self.run.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")

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
        """The cluster's split plan: `peers_per_cluster` contiguous block ranges."""
        speeds = self.peer_speeds()
        assert len(speeds) == self.cluster.peers_per_cluster  # checked at the boundary
        return make_plan(self.cluster.planner, self.model.depth, speeds)

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
        )

    def _sections(self) -> Iterator[Any]:
        return (getattr(self, f.name) for f in fields(self))
