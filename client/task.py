"""What a client does with the tensors it receives; knows nothing of Flower.

A client builds a compact model from the initial shared state ("base", sent once and cached),
the experts it holds, the centroids of the experts it does not hold, and the rows of the head it
trains. It never materialises an expert it was not sent. It returns deltas for exactly the
tensors it was sent to train.
"""

from __future__ import annotations

import functools
import json
import os
import zlib
from dataclasses import dataclass

import torch

from geomoe.client.data import LocalData
from geomoe.data.cells import cell_holding
from geomoe.model.compute import on_device, resolve_device
from geomoe.model.config import ModelConfig
from geomoe.model.experts import KeepSet, merge_expert_state, shared_state, take_expert_state
from geomoe.model.importance import RoutingStats, routing_stats
from geomoe.model.location import LocationSupervision
from geomoe.model.moe_layer import EXPERT_PARAMS, MoEMlp
from geomoe.model.network import GeoMoENet
from geomoe.model.training import evaluate, train_epochs
from geomoe.wire.privacy import PrivacyConfig, add_noise, clip_update
from geomoe.wire.run_config import RunConfig


def coordinates(node_config: dict, local: LocalData | None = None) -> tuple[float, float]:
    """The node's (lat, lon): from its node config, else from its data (manifest, Camtrap DP deployments)."""
    if "lat" in node_config and "lon" in node_config:
        return float(node_config["lat"]), float(node_config["lon"])
    if local is not None and local.lat is not None and local.lon is not None:
        return local.lat, local.lon
    raise ValueError("node config needs 'lat' and 'lon' (e.g. --node-config \"lat=12.3 lon=45.6\")")


def locate(cells: list[str], node_config: dict, local: LocalData | None = None) -> int:
    """Index of this node's client cell: `partition-id` in simulation, else the cell holding its coordinates."""
    if "partition-id" in node_config:
        index = int(node_config["partition-id"])
        if not 0 <= index < len(cells):
            raise ValueError(f"partition-id {index} has no location (the run has {len(cells)})")
        return index
    lat, lon = coordinates(node_config, local)
    index = cell_holding(cells, lat, lon)
    if index is not None:
        return index
    shown = ", ".join(cells[:20]) + (f" and {len(cells) - 20} more" if len(cells) > 20 else "")
    raise ValueError(f"lat={lat} lon={lon} lies in none of the run's cells ({shown})")


@dataclass
class Received:
    """Tensors of one message, by role."""

    experts: dict[str, torch.Tensor]  # moe.{layer}.{param}, moe.{layer}.ids
    absent_centroids: dict[str, torch.Tensor]  # moe.{layer}.absent_centroids
    head: dict[str, torch.Tensor]  # head.fc.weight, head.fc.bias rows + head.ids
    shared: dict[str, torch.Tensor]  # shared parameters by state-dict name


def keep_of(experts: dict[str, torch.Tensor]) -> KeepSet:
    return {int(k.split(".")[1]): v.tolist() for k, v in experts.items() if k.endswith(".ids")}


def download_limit(model_cfg: ModelConfig) -> int:
    """The most bytes of tensors one message may bring this node: twice the full model's state (every expert, every
    head row), enough for float64 models; a message describing more is refused before anything is decoded."""
    return 2 * _state_bytes(json.dumps(model_cfg.to_dict(), sort_keys=True))


@functools.cache
def _state_bytes(model_json: str) -> int:
    cfg = ModelConfig.from_dict({**json.loads(model_json), "pretrained": False, "pretrained_file": None})
    return sum(v.numel() * v.element_size() for v in GeoMoENet(cfg).state_dict().values())


def build_model(model_cfg: ModelConfig, base: dict[str, torch.Tensor], received: Received) -> GeoMoENet:
    """The compact model: base shared state + received experts, router rows, head rows, shared tensors."""
    keep = keep_of(received.experts)
    # Weights come from the server (base + what was sent): never load pretrained ones on the node.
    cfg = ModelConfig.from_dict(
        {**model_cfg.to_dict(), "expert_ids": keep, "pretrained": False, "pretrained_file": None}
    )
    model = GeoMoENet(cfg)
    expected = set(shared_state(model))
    if set(base) != expected:
        raise ValueError(f"base state does not fit the model: {sorted(set(base) ^ expected)[:3]}")
    model.load_state_dict(base, strict=False)
    merge_expert_state(model, received.experts)
    for layer, module in model.moe_layers().items():
        with torch.no_grad():
            module.absent_centroids.copy_(received.absent_centroids[f"moe.{layer}.absent_centroids"])
    if received.head:
        rows = received.head["head.ids"]
        with torch.no_grad():
            model.head.fc.weight[rows] = received.head["head.fc.weight"]
            model.head.fc.bias[rows] = received.head["head.fc.bias"]
    model.load_state_dict(received.shared, strict=False)
    return model


def trainable_names(model: GeoMoENet, received: Received) -> set[str]:
    """Held experts' parameters, plus the head and shared tensors the node was sent."""
    names = {
        f"{prefix}.{param}" for prefix, m in model.named_modules() if isinstance(m, MoEMlp) for param in EXPERT_PARAMS
    }
    if received.head:
        names |= {"head.fc.weight", "head.fc.bias"}
    return names | {n for n in received.shared if n in dict(model.named_parameters())}


def training_seed(run_seed: int, server_round: int, location: int) -> int:
    return zlib.crc32(f"{run_seed}/{server_round}/{location}".encode())


def train_and_delta(
    cfg: RunConfig,
    model: GeoMoENet,
    received: Received,
    local: LocalData,
    server_round: int,
    index: int,
    projections: dict[str, torch.Tensor] | None = None,
    superclasses: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float], RoutingStats, dict[str, torch.Tensor] | None]:
    """Train locally; deltas for the sent tensors, metrics, routing statistics on the training set, and (with
    the location loss on) the node's location projections after this round, to keep for the next one.
    `superclasses` (class -> super-class, per-image routing) turns on the super-class router loss."""
    seed = training_seed(cfg.seed, server_round, index)
    use_location = cfg.train.location_weight > 0
    loader = local.loader("train", cfg.train.batch_size, shuffle=True, seed=seed, with_location=use_location)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    backbone_trained = any(n.startswith("backbone.") for n in received.shared)
    location = location_supervision(model, cfg.seed, projections) if use_location else None
    metrics = train_epochs(
        model,
        loader,
        cfg.train,
        seed,
        trainable_names(model, received),
        location=location,
        freeze_norm_stats=not backbone_trained,
        superclasses=superclasses,
    )
    after = model.state_dict()
    now = take_expert_state(model, keep_of(received.experts))
    deltas = {k: v if k.endswith(".ids") else now[k] - v for k, v in received.experts.items()}
    if received.head:
        rows = received.head["head.ids"]
        deltas["head.fc.weight"] = after["head.fc.weight"][rows] - received.head["head.fc.weight"]
        deltas["head.fc.bias"] = after["head.fc.bias"][rows] - received.head["head.fc.bias"]
        deltas["head.ids"] = rows
    for name in received.shared:
        deltas[name] = (after[name] - before[name]).to(received.shared[name].dtype)
    with on_device(resolve_device(cfg.train.device), model):
        stats = routing_stats(model, local.loader("train", 128))
    kept = {k: v.detach().clone() for k, v in location.state_dict().items()} if location is not None else None
    return deltas, metrics, stats, kept


def location_supervision(
    model: GeoMoENet, run_seed: int, projections: dict[str, torch.Tensor] | None
) -> LocationSupervision:
    """The node's per-block location projections: what it trained in earlier rounds (kept in its node state;
    they never leave the node), or on its first round a fresh initialisation from the run's seed."""
    torch.manual_seed(run_seed)
    supervision = LocationSupervision(sorted(set(model.widths)), model.blocks)
    if projections is not None:
        supervision.load_state_dict(projections)
    return supervision


def evaluate_local(cfg: RunConfig, model: GeoMoENet, local: LocalData) -> dict[str, float | list[float]]:
    with on_device(resolve_device(cfg.train.device), model):
        return evaluate(model, local.loader("test", 128), cfg.model.num_classes)


def routing_on_validation(cfg: RunConfig, model: GeoMoENet, local: LocalData) -> RoutingStats:
    """How the node's validation images route (its training images when it has no validation split)."""
    with on_device(resolve_device(cfg.train.device), model):
        return routing_stats(model, local.loader("val" if len(local.val) else "train", 128))


def privatise(
    privacy: PrivacyConfig, deltas: dict[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """The update clipped to `clip_norm` as a whole and, under local noise, with this device's own Gaussian noise
    (std z * C, from a seed nobody else knows); and 1.0 if it fitted under the clip unclipped (adaptive clipping's
    vote), else 0.0."""
    clipped, norm = clip_update(deltas, clip_norm)
    if privacy.noise == "local" and privacy.noise_multiplier > 0:
        secret = torch.Generator().manual_seed(int.from_bytes(os.urandom(6), "little"))
        clipped = add_noise(clipped, privacy.noise_multiplier * clip_norm, secret)
    return clipped, float(norm <= clip_norm)
