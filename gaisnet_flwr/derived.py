"""What a run derives from its configuration, built once: in the ServerApp's preparation.

`derive(cfg)` checks what the plain config cannot (the data folder and its classes, the cost
profiles and their file, the model built on the meta device, a checkpoint file, the folders,
CUDA) and builds what every later step reads: the data spec, the cost model's profiles, the
identical clusters' devices, links and split plan, the clusters formed from a device population,
the edge server's device and backhaul (and, with edge-offload 'auto', the edge server as a node
of the chains: which chains share it is known once the nodes are, `apps/server_app.py`). The
ServerApp sends each cluster its own part (its block ranges, devices and links:
`contract.ClusterTask`); nothing here runs on a client. Errors are `ConfigError`s naming the
run-config key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import timm
import torch

from gaisnet_flwr.config import (
    COMPUTE_PLANNERS,
    MAX_PARAMETERS,
    ConfigError,
    CostsSection,
    HierarchySection,
    ModelSection,
    RunConfig,
)
from gaisnet_flwr.costs.profiles import (
    ClusterProfile,
    CostConfigError,
    DeviceProfile,
    LinkProfile,
    Profiles,
    load_profiles,
)
from gaisnet_flwr.data.images import DataSpec, dataset_classes, run_config_words
from gaisnet_flwr.population.devices import PopulationError, load_spec
from gaisnet_flwr.population.edge_offload import EdgeServer, place_cluster
from gaisnet_flwr.population.layout import ClusterLayout, form_layout
from gaisnet_flwr.population.planning import RangeCosts, Workload, plan_cluster
from gaisnet_flwr.split.plan import PlanError, SplitPlan, make_plan
from gaisnet_flwr.split.precision import SMASHED_DTYPES, resolve_device
from gaisnet_flwr.vit.checkpoint import CheckpointFileError, check_weights_file
from gaisnet_flwr.vit.families import class_refusal, family_of
from gaisnet_flwr.vit.model import ModelError, PromptedViT, build_prompted_vit


@dataclass(frozen=True)
class Derived:
    """What the run's steps read, derived once from its config (module docstring)."""

    cfg: RunConfig
    spec: DataSpec
    num_classes: int
    profiles: Profiles
    cluster: ClusterProfile  # the identical clusters' devices (start, peers, end) and links
    plan: SplitPlan | None  # the identical clusters' plan (None: comm-aware with a population)
    layout: ClusterLayout | None  # the clusters formed from `population`, if any
    shares: tuple[float, ...]  # each edge's share of the data (edge-shares, or equal)
    edge_device: DeviceProfile  # runs each edge's (and the cloud's) aggregation
    backhaul: LinkProfile  # edge <-> cloud
    meta: PromptedViT  # the edge model on the meta device: shapes for FLOPs and memory
    costs: RangeCosts | None = None  # what a range of blocks costs (comm-aware or population)
    edge: EdgeServer | None = None  # edge-offload 'auto': the edge server as a chain node


def derive(cfg: RunConfig) -> Derived:
    """Check the environment and build the derived objects (module docstring)."""
    spec = data_spec(cfg)
    try:
        spec.validate()
    except ValueError as err:
        # DataSpec names its own fields; the user typed run-config keys.
        raise ConfigError(run_config_words(str(err))) from err
    classes = dataset_classes(spec)
    if cfg.data.partitioning == "classes" and cfg.data.classes_per_cluster > classes:
        raise ConfigError(
            f"classes-per-cluster={cfg.data.classes_per_cluster} is out of range: "
            f"dataset={cfg.data.dataset!r} has {classes} classes; must be >= 1 and <= {classes}"
        )
    profiles = check_profiles(cfg.costs)
    try:
        cluster = cluster_profile(cfg.costs, profiles, cfg.cluster.peers_per_cluster)
        edge_device, backhaul = hierarchy_profiles(cfg.costs, profiles)
    except CostConfigError as err:
        raise ConfigError(f"cost model: {err}") from err
    meta = meta_model(cfg.model, classes)  # proves the model can be built, shapes only
    if cfg.cloud.foundation == "cloud":
        _folder("foundation-dir", cfg.cloud.foundation_dir)
    _folder("output-dir", cfg.run.output_dir)
    path = cfg.cloud.checkpoint_path
    if cfg.cloud.foundation == "file" and not Path(path).expanduser().is_file():
        raise ConfigError(
            f"foundation='file' needs checkpoint-path to name a weights file; "
            f"{path!r} is not a file"
        )
    if cfg.cloud.foundation == "file":  # format, names, shapes, dtypes, finite: named
        try:
            check_weights_file(path, meta.backbone)
        except CheckpointFileError as err:
            raise ConfigError(f"checkpoint-path: {err}") from err
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    on_cuda = resolve_device(cfg.run.device).type == "cuda"
    if cfg.run.precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "precision='bf16' but this GPU has no bfloat16 support; use 'tf32' or 'fp32'"
        )
    population = cfg.cluster.population.strip()
    costs = (
        range_costs(cfg, meta)
        if population or cfg.cluster.planner not in COMPUTE_PLANNERS
        else None
    )
    edge = None
    if cfg.cluster.edge_offload == "auto":  # its device, the client-edge link both ways
        edge = EdgeServer(edge_device, profiles.link(cfg.costs.uplink))
    plan = None
    if not (population and costs is not None and cfg.cluster.planner not in COMPUTE_PLANNERS):
        try:
            plan = cluster_plan(cfg, cluster, costs)
        except PlanError as err:
            # With the edge server the devices need not fit alone: the edge's share per round
            # is placed once the nodes are known (server_app.cluster_tasks).
            if edge is None:
                raise ConfigError(f"planner={cfg.cluster.planner!r}: {err}") from err
            assert costs is not None
            try:
                place_cluster(costs, cluster, edge)
            except PlanError as edge_err:
                raise ConfigError(
                    f"planner={cfg.cluster.planner!r}, edge-offload='auto': {edge_err}"
                ) from edge_err
    layout = None
    if population:
        assert costs is not None
        try:
            layout = form_layout(
                load_spec(population, profiles),
                profiles,
                profiles.link(cfg.costs.d2d_link),
                profiles.link(cfg.costs.uplink),
                cfg.cluster.peers_per_cluster,
                cfg.cluster.planner,
                costs,
                edge,
            )
        except (PopulationError, CostConfigError, PlanError, OSError) as err:
            raise ConfigError(f"population={population!r}: {err}") from err
        if not layout.fine_tuning:
            unplaced = "; ".join(f"{d}: {why}" for d, why in list(layout.unplaced.items())[:5])
            raise ConfigError(
                f"population={population!r} forms no fine-tuning cluster of "
                f"{cfg.cluster.peers_per_cluster + 2} devices ({unplaced})"
            )
    shares = edge_shares(cfg.hierarchy)
    return Derived(
        cfg, spec, classes, profiles, cluster, plan, layout, shares, edge_device, backhaul, meta,
        costs, edge,
    )  # fmt: skip


# -- the pieces -----------------------------------------------------------------------------
def data_spec(cfg: RunConfig) -> DataSpec:
    """The data section as the data code takes it: its fields (all but cluster-samples, which
    the capacity check reads), and the image size and seed it depends on."""
    section = {f.name: getattr(cfg.data, f.name) for f in fields(cfg.data)}
    shared = {f.name: section[f.name] for f in fields(DataSpec) if f.name in section}
    return DataSpec(**shared, img_size=cfg.model.img_size, seed=cfg.run.seed)


def edge_shares(hierarchy: HierarchySection) -> tuple[float, ...]:
    """Each edge's share of the data: edge-shares, or equal shares."""
    return hierarchy.edge_shares or (1.0,) * len(hierarchy.edge_domains)


def check_profiles(costs: CostsSection) -> Profiles:
    """The presets plus `cost-profiles`, with every profile name resolved; each refusal names
    its key (`start-device='nope': unknown device profile 'nope'; valid: ...`)."""
    path = costs.cost_profiles
    if path:
        file = Path(path).expanduser()
        what = "a TOML file of [devices.NAME] / [links.NAME] tables, or '' for the presets"
        if not file.exists():
            raise ConfigError(f"cost-profiles={path!r}: no such file; it must name {what}")
        if not file.is_file():
            raise ConfigError(f"cost-profiles={path!r} is not a file; it must name {what}")
    try:
        profiles = load_profiles(Path(path).expanduser() if path else None)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"cost-profiles={path!r} is not valid TOML: {err}") from err
    except OSError as err:
        raise ConfigError(f"cost-profiles={path!r} cannot be read: {err}") from err
    except CostConfigError as err:
        raise ConfigError(f"cost model: cost-profiles={path!r}: {err}") from err
    for f in fields(costs):
        value = getattr(costs, f.name)
        if not f.name.endswith(("_device", "_devices", "_link", "uplink")):
            continue
        lookup = profiles.device if "device" in f.name else profiles.link
        for name in value if isinstance(value, tuple) else (value,):
            try:
                lookup(name)
            except CostConfigError as err:
                shown = ",".join(value) if isinstance(value, tuple) else value
                raise ConfigError(
                    f"cost model: {f.name.replace('_', '-')}={shown!r}: {err}"
                ) from err
    for name, kind in (("d2d_link", "d2d"), ("uplink", "client-edge")):
        link = profiles.link(getattr(costs, name))
        if link.kind != kind:
            valid = ", ".join(n for n, p in profiles.links.items() if p.kind == kind)
            raise ConfigError(
                f"cost model: {name.replace('_', '-')}={link.name!r} is a {link.kind} link; it "
                f"must be a {kind} link (valid: {valid})"
            )
    return profiles


def cluster_profile(costs: CostsSection, profiles: Profiles, num_peers: int) -> ClusterProfile:
    """Devices in chain order (start, peers cycled, end), D2D hops and the uplink."""
    peers = costs.peer_devices
    devices = [
        costs.start_device,
        *(peers[k % len(peers)] for k in range(num_peers)),
        costs.end_device,
    ]
    return ClusterProfile.from_names(profiles, devices, costs.d2d_link, costs.uplink)


def hierarchy_profiles(
    costs: CostsSection, profiles: Profiles
) -> tuple[DeviceProfile, LinkProfile]:
    """The edge server's device and the edge-cloud backhaul link."""
    backhaul = profiles.link(costs.backhaul_link)
    if backhaul.kind != "edge-cloud":
        raise CostConfigError(
            f"backhaul-link {costs.backhaul_link!r} is a {backhaul.kind} link; it must be an "
            f"edge-cloud link"
        )
    return profiles.device(costs.edge_device), backhaul


def cluster_plan(cfg: RunConfig, cluster: ClusterProfile, costs: RangeCosts | None) -> SplitPlan:
    """The identical clusters' split plan: compute-only over peer-speeds or the peers' devices,
    comm-aware over their links and memory too."""
    if cfg.cluster.planner not in COMPUTE_PLANNERS:
        assert costs is not None
        return plan_cluster(cfg.cluster.planner, costs, cluster)
    speeds = cfg.cluster.peer_speeds or [d.flops_per_second for d in cluster.devices[1:-1]]
    return make_plan(cfg.cluster.planner, cfg.model.depth, speeds)


def range_costs(cfg: RunConfig, meta: PromptedViT) -> RangeCosts:
    """What each range of blocks costs a peer. Plans are sized on one batch: a round's compute
    and hop bytes grow together with its batches, so one batch decides the split."""
    t = cfg.training
    element = SMASHED_DTYPES[cfg.run.smashed_dtype].itemsize
    return RangeCosts(
        meta, Workload(t.batch_size, t.batch_size, 1, t.optimizer, t.momentum, element)
    )


def model_shape(model: ModelSection) -> dict[str, Any]:
    """What `build_prompted_vit` takes from the model section, besides the weights' source."""
    return dict(
        model_name=model.model_name,
        mode=model.mode,
        num_prompts=model.num_prompts,
        img_size=model.img_size,
        patch_size=model.patch_size,
        depth=model.depth,
        embed_dim=model.embed_dim,
        num_heads=model.num_heads,
    )


def meta_model(model: ModelSection, num_classes: int) -> PromptedViT:
    """The model on the meta device (shapes only, no memory): proves that model-name is a timm ViT
    PromptedViT runs (docs/vit-support.md) that takes the shape overrides and the prompts, within
    MAX_PARAMETERS."""
    name = model.model_name
    valid = (
        "a timm ViT such as vit_tiny_patch16_224 or eva02_tiny_patch14_224 (the supported "
        "families: docs/vit-support.md)"
    )
    if not timm.is_model(name):
        raise ConfigError(f"model-name={name!r} is not a timm model; valid: {valid}")
    try:
        with torch.device("meta"):
            vit = build_prompted_vit(num_classes=num_classes, **model_shape(model))
    except Exception as err:  # noqa: BLE001 - timm or torch refusing the model: say which
        with torch.device("meta"):
            try:
                plain = timm.create_model(name, num_classes=10)
            except Exception:  # noqa: BLE001
                plain = None
        if plain is not None and family_of(plain) is None:
            raise ConfigError(
                f"model-name={name!r} is a {type(plain).__name__}, not a ViT PromptedViT runs "
                f"({class_refusal(plain)}); valid: {valid}"
            ) from err
        given = ", ".join(
            f"{k.replace('_', '-')}={v}"
            for k, v in model_shape(model).items()
            if k in ("img_size", "patch_size", "depth", "embed_dim", "num_heads")
        )
        reason = str(err) if isinstance(err, ModelError) else f"{type(err).__name__}: {err}"
        raise ConfigError(f"model-name={name!r} cannot be built with {given}: {reason}") from err
    parameters = sum(p.numel() for p in vit.parameters())
    if parameters > MAX_PARAMETERS:
        raise ConfigError(
            f"model-name={name!r} with depth={model.depth}, embed-dim={model.embed_dim} has "
            f"{parameters:.3g} parameters; at most {MAX_PARAMETERS:.0e} (lower depth or embed-dim)"
        )
    return vit


def _folder(key: str, value: str) -> None:
    """`value` must be a folder or creatable as one: the nearest existing path at or above it
    must be a directory."""
    existing = Path(value).expanduser() if value else Path.home()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{key}={value!r}: {existing} is a file, not a folder; {key} must name a folder "
            f"(created if missing)"
        )
