"""The run's configuration: read once at the app boundary, validated, typed.

Every field maps to one key of `[tool.flwr.app.config]` in pyproject.toml (underscores become
hyphens: `num_prompts` <-> `num-prompts`). `RunConfig.from_run_config` rejects unknown keys,
wrong types and invalid values *before* any model is built or any data is read, naming the key
and the valid choices.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from gaisnet_flwr.costs.pricing import (
    ClusterProfile,
    CostConfigError,
    DeviceProfile,
    LinkProfile,
    Profiles,
    load_profiles,
)
from gaisnet_flwr.data.images import DATASETS, DOMAINS, PARTITIONINGS, DataSpec
from gaisnet_flwr.service.scheduler import POLICIES
from gaisnet_flwr.split.chain import OPTIMIZERS
from gaisnet_flwr.split.plan import PLANNERS
from gaisnet_flwr.vit.model import MODES

FOUNDATIONS = ("cloud", "timm", "file", "none")
SERVICES = ("fine-tuning", "integrated")
CLOUD_MODULES = ("prompts", "all")
DEVICES = ("auto", "cpu", "cuda")
# How the edge ships a model for SL inference: the tunable modules only, or every weight.
DISTRIBUTIONS = ("efficient", "full")


class ConfigError(ValueError):
    """An invalid run-config value; the message names the key and what is allowed."""


@dataclass(frozen=True)
class RunConfig:
    # -- model: a timm ViT by name, with shape overrides (0 keeps timm's default) -----------
    model_name: str = "vit_tiny_patch16_224"
    img_size: int = 32
    patch_size: int = 8
    depth: int = 6
    embed_dim: int = 64
    num_heads: int = 4
    # the frozen foundation model: one of FOUNDATIONS (see gaisnet_flwr/cloud.py)
    foundation: str = "cloud"
    checkpoint_path: str = ""  # weights file for foundation = "file"
    foundation_dir: str = ""  # where cloud checkpoints live; "" = ~/.cache/gaisnet-flwr
    pretrain_epochs: int = 30  # cloud pre-training of the full model on the cloud corpus
    pretrain_lr: float = 1e-3
    mode: str = "vpt-deep"  # one of MODES
    num_prompts: int = 10  # prompt tokens per prompt module (VPT)
    # -- client cluster: D2D peers between the start point and the end point -----------------
    peers_per_cluster: int = 3
    peer_speeds: str = ""  # relative compute speeds, e.g. "1,2,1"; "" = the peers' devices
    planner: str = "minmax"  # one of PLANNERS
    # -- training -------------------------------------------------------------------------------
    num_rounds: int = 5
    local_epochs: int = 1
    optimizer: str = "sgd"  # one of OPTIMIZERS
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    # -- data -----------------------------------------------------------------------------------
    dataset: str = "digits"  # one of DATASETS; digits ships with scikit-learn (no download)
    data_dir: str = ""
    partitioning: str = "iid"  # one of PARTITIONINGS
    classes_per_cluster: int = 2
    dirichlet_alpha: float = 0.5
    val_fraction: float = 0.2
    # -- cost model (gaisnet_flwr/costs.py): profile names, presets or from cost-profiles ------
    cost_profiles: str = ""  # TOML file adding/overriding [devices.NAME] / [links.NAME]
    start_device: str = "phone-mid"
    peer_devices: str = "phone-high,phone-mid,phone-low"  # cycled over the peers
    end_device: str = "phone-mid"
    d2d_link: str = "d2d-50m"
    uplink: str = "uplink-1mhz"
    edge_device: str = "edge-server"  # runs each edge's (and the cloud's) aggregation
    backhaul_link: str = "backhaul-1gbps"  # edge <-> cloud
    # -- SL inference (paper Sec. III-D) ---------------------------------------------------------
    inference_requests: int = 2  # requests served after fine-tuning (round-robin over clusters)
    distribution: str = "efficient"  # ship the tunable modules only, or "full": every weight
    # -- integrated fine-tuning and inference (paper Sec. IV-C) --------------------------------
    service: str = "fine-tuning"  # or "integrated": each round fine-tune or serve (scheduler)
    policy: str = "mlcp"  # one of POLICIES: rs, msip, mlcp
    demand: str = ""  # integrated: the edge each round's request needs, e.g. "0,0,1,1,1"
    service_value: float = 100.0  # a served request earns service-value x its accuracy
    finetune_cost: float = 20.0  # one fine-tuning round's fixed cost
    energy_price: float = 1.0  # profit units per joule (cost model) charged to every action
    # -- edge servers and the cloud (paper Sec. III-B) ------------------------------------------
    edge_domains: str = "none"  # one domain per edge server, comma-separated (DOMAINS)
    edge_shares: str = ""  # relative data share per edge, e.g. "1,1,0.2"; "" = equal
    cloud_every: int = 1  # cloud aggregates across edges every K rounds; 0 = never (isolated)
    cloud_mix: float = 0.5  # delivered = mix * cloud + (1 - mix) * edge's own modules
    cloud_modules: str = "prompts"  # what the cloud aggregates: one of CLOUD_MODULES
    # -- aggregation ----------------------------------------------------------------------------
    strategy: str = "module-fedavg"  # a registry name or "package.module:Class"
    strategy_options: str = ""  # extra strategy kwargs as TOML, e.g. "proximal_mu=0.1"
    fraction_evaluate: float = 1.0
    # -- deployment -----------------------------------------------------------------------------
    min_clusters: int = 0  # wait for this many SuperNodes before round 1; 0 = whoever is there
    # -- run ------------------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # one of DEVICES; auto = cuda when available
    output_dir: str = "outputs"

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("planner", self.planner, PLANNERS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("partitioning", self.partitioning, PARTITIONINGS)
        _choice("device", self.device, DEVICES)
        _choice("foundation", self.foundation, FOUNDATIONS)
        _choice("cloud_modules", self.cloud_modules, CLOUD_MODULES)
        _choice("distribution", self.distribution, DISTRIBUTIONS)
        _choice("service", self.service, SERVICES)
        _choice("policy", self.policy, POLICIES)
        if self.service == "integrated":
            demand = self.demand_list()
            if not demand or any(not 0 <= e < self.num_edges() for e in demand):
                raise ConfigError(
                    f"demand={self.demand!r} must list, per round, an edge index in "
                    f"[0, {self.num_edges()}) (edges come from edge-domains)"
                )
        if self.inference_requests < 0:
            raise ConfigError(f"inference-requests must be >= 0, got {self.inference_requests}")
        for domain in self.domains():
            _choice("edge_domains", domain, DOMAINS)
        if self.dataset != "digits" and set(self.domains()) != {"none"}:
            raise ConfigError("edge-domains other than 'none' need the embedded digits dataset")
        shares = self.shares()
        if len(shares) != self.num_edges() or any(s <= 0 for s in shares):
            raise ConfigError(
                f"edge-shares={self.edge_shares!r} must list {self.num_edges()} positive numbers "
                f"(one per edge in edge-domains), or be empty"
            )
        if self.cloud_every < 0 or not 0 <= self.cloud_mix <= 1:
            raise ConfigError("cloud-every must be >= 0 and cloud-mix in [0, 1]")
        if self.foundation == "cloud" and self.dataset != "digits":
            raise ConfigError(
                f"foundation='cloud' pre-trains on the embedded digits corpus, which dataset="
                f"{self.dataset!r} does not have; use foundation='timm' (pretrained weights, "
                f"needs internet once), 'file' (checkpoint-path) or 'none'"
            )
        if self.foundation == "file" and not Path(self.checkpoint_path).expanduser().is_file():
            raise ConfigError(
                f"foundation='file' needs checkpoint-path to name a weights file; "
                f"{self.checkpoint_path!r} is not a file"
            )
        if self.pretrain_epochs < 0 or self.pretrain_lr <= 0:
            raise ConfigError("pretrain-epochs must be >= 0 and pretrain-lr > 0")
        for key in (
            "img_size",
            "depth",
            "embed_dim",
            "num_heads",
            "peers_per_cluster",
            "num_rounds",
            "local_epochs",
            "batch_size",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"{_key(key)} must be >= 1, got {getattr(self, key)}")
        if self.num_prompts < 0:
            raise ConfigError(f"num-prompts must be >= 0, got {self.num_prompts}")
        if self.min_clusters < 0:
            raise ConfigError(f"min-clusters must be >= 0, got {self.min_clusters}")
        if self.mode in ("linear", "full") and self.num_prompts:
            raise ConfigError(f"mode {self.mode!r} trains no prompts: set num-prompts=0")
        if self.peers_per_cluster > self.depth:
            raise ConfigError(
                f"peers-per-cluster={self.peers_per_cluster} exceeds depth={self.depth}: "
                f"each peer needs at least one Transformer block"
            )
        try:
            self.cluster_profile()
            self.hierarchy_profiles()
        except (CostConfigError, OSError) as err:
            raise ConfigError(f"cost model: {err}") from err
        speeds = self.speeds()
        if len(speeds) != self.peers_per_cluster or any(s <= 0 for s in speeds):
            raise ConfigError(
                f"peer-speeds={self.peer_speeds!r} must list {self.peers_per_cluster} positive "
                f"numbers (one per peer), or be empty"
            )
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        self.strategy_kwargs()  # parse errors surface now
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        try:
            self.data_spec().validate()
        except ValueError as err:
            # DataSpec names its own fields; the user typed run-config keys.
            message = re.sub(r"DataSpec\.(\w+)", lambda m: _key(m.group(1)), str(err))
            raise ConfigError(message) from err

    # -- derived views ------------------------------------------------------------------------
    def speeds(self) -> list[float]:
        """Peer compute speeds for the planner: peer-speeds, else the peers' device FLOP/s."""
        if not self.peer_speeds.strip():
            return [d.flops_per_second for d in self.cluster_profile().devices[1:-1]]
        return _number_list("peer-speeds", self.peer_speeds, float)

    def demand_list(self) -> list[int]:
        return _number_list("demand", self.demand, int)

    def domains(self) -> list[str]:
        return [d.strip() for d in self.edge_domains.split(",")]

    def num_edges(self) -> int:
        return len(self.domains())

    def shares(self) -> list[float]:
        if not self.edge_shares.strip():
            return [1.0] * self.num_edges()
        return _number_list("edge-shares", self.edge_shares, float)

    @functools.cached_property
    def profiles(self) -> Profiles:
        """The cost model's presets, plus and overridden by `cost-profiles` when given (read
        once per config: `replace()` makes a new config, so the cache never goes stale)."""
        return load_profiles(Path(self.cost_profiles).expanduser() if self.cost_profiles else None)

    def cluster_profile(self) -> ClusterProfile:
        """Devices in chain order (start, peers cycled, end), D2D hops and the uplink."""
        peers = [p.strip() for p in self.peer_devices.split(",") if p.strip()]
        if not peers:
            raise CostConfigError("peer-devices names no device profile")
        devices = [
            self.start_device,
            *(peers[k % len(peers)] for k in range(self.peers_per_cluster)),
            self.end_device,
        ]
        profiles = self.profiles
        return ClusterProfile.from_names(profiles, devices, self.d2d_link, self.uplink)

    def hierarchy_profiles(self) -> tuple[DeviceProfile, LinkProfile]:
        """The edge server's device and the edge-cloud backhaul link."""
        profiles = self.profiles
        backhaul = profiles.link(self.backhaul_link)
        if backhaul.kind != "edge-cloud":
            raise CostConfigError(
                f"backhaul-link {self.backhaul_link!r} is a {backhaul.kind} "
                f"link; it must be an edge-cloud link"
            )
        return profiles.device(self.edge_device), backhaul

    def strategy_kwargs(self) -> dict[str, Any]:
        try:
            return tomllib.loads(self.strategy_options.replace(",", "\n"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(
                f"strategy-options={self.strategy_options!r} is not 'key=value' pairs "
                f'(TOML values, e.g. "proximal_mu=0.1, eta=0.01"): {err}'
            ) from err

    def model_kwargs(self) -> dict[str, Any]:
        return dict(
            model_name=self.model_name,
            mode=self.mode,
            num_prompts=self.num_prompts,
            pretrained=self.foundation == "timm",
            checkpoint_path=self.checkpoint_path if self.foundation == "file" else "",
            img_size=self.img_size,
            patch_size=self.patch_size,
            depth=self.depth,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
        )

    def data_spec(self) -> DataSpec:
        return DataSpec(
            dataset=self.dataset,
            data_dir=self.data_dir,
            img_size=self.img_size,
            partitioning=self.partitioning,
            classes_per_cluster=self.classes_per_cluster,
            dirichlet_alpha=self.dirichlet_alpha,
            val_fraction=self.val_fraction,
            seed=self.seed,
        )

    def foundation_path(self) -> Path:
        if self.foundation_dir:
            return Path(self.foundation_dir).expanduser().resolve()
        return Path.home() / ".cache" / "gaisnet-flwr"

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}

    # -- the app boundary -----------------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's `context.run_config` (hyphenated keys); missing keys default."""
        known = {_key(f.name): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(f"unknown run-config key(s) {unknown}; valid keys: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            f = known[key]
            values[f.name] = _cast(key, value, type(getattr(cls, f.name)))
        return cls(**values)


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


def _key(name: str) -> str:
    return name.replace("_", "-")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{_key(name)}={value!r} is not valid; choose one of {', '.join(choices)}"
        )


def _cast(key: str, value: Any, kind: type) -> Any:
    # TOML gives int/float/bool/str; accept an int where a float is wanted, nothing else.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value
