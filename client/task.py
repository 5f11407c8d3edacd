"""What a client does with the tensors it receives; knows nothing of Flower.

A client builds a compact model from the initial shared state ("base", sent once and cached),
the experts it holds, the centroids of the experts it does not hold, and the rows of the head it
trains. It never materialises an expert it was not sent. It returns deltas for exactly the
tensors it was sent to train.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, replace

import torch

from geomoe.model.config import ModelConfig
from geomoe.model.experts import KeepSet, merge_expert_state, shared_state, take_expert_state
from geomoe.model.importance import RoutingStats, routing_stats
from geomoe.model.location import LocationSupervision
from geomoe.model.moe_layer import EXPERT_PARAMS, MoEMlp
from geomoe.model.network import GeoMoENet
from geomoe.model.training import evaluate, train_epochs
from geomoe.run_config import RunConfig
from geomoe.sim.cells import cell_at, cell_from_path
from geomoe.sim.world import Location, World

_WORLDS: dict[str, World] = {}  # one world per config in a process: rebuilding it per message is waste


def world_for(cfg: RunConfig) -> World:
    key = json.dumps(asdict(cfg.world), sort_keys=True)
    if key not in _WORLDS:
        _WORLDS.clear()
        _WORLDS[key] = World(cfg.world)
    return _WORLDS[key]


def locate(world: World, node_config: dict) -> int:
    """Index of this node's location: `partition-id` in simulation, else the cell holding `lat`/`lon`."""
    if "partition-id" in node_config:
        index = int(node_config["partition-id"])
        if not 0 <= index < len(world.locations):
            raise ValueError(f"partition-id {index} has no location (the run has {len(world.locations)})")
        return index
    if "lat" not in node_config or "lon" not in node_config:
        raise ValueError("node config needs 'lat' and 'lon' (e.g. --node-config \"lat=12.3 lon=45.6\")")
    point = cell_at(float(node_config["lat"]), float(node_config["lon"]), 30)
    for index, location in enumerate(world.locations):
        if cell_from_path(location.cell).contains(point):
            return index
    cells = ", ".join(loc.cell for loc in world.locations)
    raise ValueError(f"lat={node_config['lat']} lon={node_config['lon']} lies in none of the run's cells ({cells})")


@dataclass
class Received:
    """Tensors of one message, by role."""

    experts: dict[str, torch.Tensor]  # moe.{layer}.{param}, moe.{layer}.ids
    absent_centroids: dict[str, torch.Tensor]  # moe.{layer}.absent_centroids
    head: dict[str, torch.Tensor]  # head.fc.weight, head.fc.bias rows + head.ids
    shared: dict[str, torch.Tensor]  # shared parameters by state-dict name


def keep_of(experts: dict[str, torch.Tensor]) -> KeepSet:
    return {int(k.split(".")[1]): v.tolist() for k, v in experts.items() if k.endswith(".ids")}


def build_model(model_cfg: ModelConfig, base: dict[str, torch.Tensor], received: Received) -> GeoMoENet:
    """The compact model: base shared state + received experts, router rows, head rows, shared tensors."""
    keep = keep_of(received.experts)
    cfg = ModelConfig.from_dict({**model_cfg.to_dict(), "expert_ids": keep})
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
    cfg: RunConfig, model: GeoMoENet, received: Received, location: Location, server_round: int, index: int
) -> tuple[dict[str, torch.Tensor], dict[str, float], RoutingStats]:
    """Train locally; deltas for the sent tensors, metrics, and routing statistics on the training set."""
    world = world_for(cfg)
    seed = training_seed(cfg.seed, server_round, index)
    train_cfg = replace(cfg.train, seed=seed)
    use_location = train_cfg.location_weight > 0
    loader = world.loader(location.train, train_cfg.batch_size, shuffle=True, seed=seed, with_location=use_location)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    backbone_trained = any(n.startswith("backbone.") for n in received.shared)
    metrics = train_epochs(
        model,
        loader,
        train_cfg,
        trainable_names(model, received),
        location=location_supervision(model, seed) if use_location else None,
        freeze_norm_stats=not backbone_trained,
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
    stats = routing_stats(model, world.loader(location.train, 128))
    return deltas, metrics, stats


def location_supervision(model: GeoMoENet, seed: int) -> LocationSupervision:
    """Fresh per-block projections for this round's local training (they never leave the node)."""
    torch.manual_seed(seed)
    widths = sorted(set(model.widths))
    return LocationSupervision(widths, model.blocks)


def evaluate_location(cfg: RunConfig, model: GeoMoENet, location: Location) -> dict[str, float | list[float]]:
    return evaluate(model, world_for(cfg).loader(location.test, 128), cfg.model.num_classes)


def routing_on_validation(cfg: RunConfig, model: GeoMoENet, location: Location) -> RoutingStats:
    return routing_stats(model, world_for(cfg).loader(location.val, 128))
