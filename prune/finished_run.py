"""A finished run seen from one location: its keep set, its compact model, and the experts a fleet of devices
needs. `geomoe experts importance`, `geomoe prune` and `geomoe expert-server plan` are thin shells over these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geomoe.data.world_file import Location
from geomoe.expert_parallel.placement import DeviceNeeds, FleetDevice, Plan, plan_placement
from geomoe.model.counting import expert_bytes, parameter_count, tokens_per_patch
from geomoe.model.experts import KeepSet, prune_model
from geomoe.model.importance import KeepPolicy, RoutingStats, keep_set, routing_stats
from geomoe.model.network import GeoMoENet, prune_head
from geomoe.model.training import evaluate
from geomoe.server.checkpoint import load_model
from geomoe.wire.run_config import RunConfig
from geomoe.world.world import World

HEADS = ("local", "all")
BATCH = 128  # images per forward pass while routing or evaluating


@dataclass
class FinishedRun:
    """A run's final model and the world it was trained on."""

    model: GeoMoENet
    cfg: RunConfig
    world: World

    @classmethod
    def open(cls, run_dir: Path) -> FinishedRun:
        model, extra = load_model(run_dir / "checkpoint.pt")
        cfg = RunConfig.from_json(extra["run_config"])
        world, _, _ = World.cached(cfg.world, cfg.cache_dir)
        return cls(model, cfg, world)

    def location(self, cell: str) -> Location:
        """The client location at S2 `cell`; an error lists the run's cells."""
        for location in self.world.locations:
            if location.cell == cell:
                return location
        cells = ", ".join(loc.cell for loc in self.world.locations)
        raise ValueError(f"cell {cell!r} is not a location of this run ({cells})")

    def nearest(self, lat: float, lon: float) -> Location:
        return min(self.world.locations, key=lambda loc: (loc.lat - lat) ** 2 + (loc.lon - lon) ** 2)

    def routing(self, location: Location) -> RoutingStats:
        """How the location's validation images route through the global model."""
        return routing_stats(self.model, self.world.loader(location.val, BATCH))


@dataclass
class PrunedLocation:
    """A location's compact model and how it compares with the global one on the location's test images."""

    model: GeoMoENet
    keep: KeepSet
    parameters: int
    full_parameters: int
    accuracy: float
    full_accuracy: float


def prune_for_location(run: FinishedRun, cell: str, percentile: float, absent_policy: str, head: str) -> PrunedLocation:
    """Keep the experts the location routes to (edge weights above `percentile`), and with head "local" only the
    head rows of its training species (plus "other")."""
    if head not in HEADS:
        raise ValueError(f"head {head!r} is not one of {', '.join(HEADS)}")
    location = run.location(cell)
    keep = keep_set(run.routing(location), KeepPolicy(percentile=percentile))
    pruned = prune_model(run.model, keep, absent_policy=absent_policy)
    if head == "local":
        pruned = prune_head(pruned, run.world.species(location.train))
    test = run.world.loader(location.test, BATCH)
    return PrunedLocation(
        model=pruned,
        keep=keep,
        parameters=parameter_count(pruned),
        full_parameters=parameter_count(run.model),
        accuracy=float(evaluate(pruned, test)["accuracy"]),
        full_accuracy=float(evaluate(run.model, test)["accuracy"]),
    )


def fleet_plan(run: FinishedRun, devices: list[FleetDevice], rtt_ms: dict[tuple[str, str], float]) -> Plan:
    """Expert placement for `devices`: each needs what the run's nearest location routes its images to."""
    needs = []
    for device in devices:
        location = run.nearest(device.lat, device.lon)
        images = max(len(location.val), 1)
        per_image = {
            layer: {e: float(c) / images for e, c in enumerate(counts)}
            for layer, counts in run.routing(location).expert_counts.items()
        }
        needs.append(
            DeviceNeeds(device.name, device.lat, device.lon, device.memory_kb * 1024, per_image, device.address)
        )
    tokens = tokens_per_patch(run.model, run.cfg.world.input_size())
    widths = {layer: run.model.widths[layer] for layer in run.model.cfg.moe_layers}
    return plan_placement(needs, rtt_ms, expert_bytes(run.model), tokens, widths)
