"""A finished run seen from one location, without the CLI: keep sets, pruned models, fleet placement."""

import pytest
import torch

from geomoe.expert_parallel.placement import FleetDevice
from geomoe.model.network import GeoMoENet
from geomoe.prune.finished_run import FinishedRun, fleet_plan, prune_for_location
from geomoe.wire.run_config import build_run_config
from geomoe.world.world import World

SMALL = ["world.synthetic.num_observations=3000", "world.num_locations=3", "world.n_max=300",
         "model.num_experts=4", "model.moe_layers=[1, 3]"]  # fmt: skip


@pytest.fixture(scope="module")
def run() -> FinishedRun:
    cfg = build_run_config(None, {}, SMALL)
    torch.manual_seed(0)
    return FinishedRun(GeoMoENet(cfg.model).eval(), cfg, World(cfg.world))


def test_an_unknown_cell_is_refused_listing_the_run_cells(run):
    with pytest.raises(ValueError, match=f"cell '9/9' is not a location of this run \\({run.world.locations[0].cell}"):
        run.location("9/9")


@pytest.mark.parametrize("head", ["local", "all"])
def test_the_pruned_model_keeps_the_location_experts_and_its_species(run, head):
    location = run.world.locations[0]
    pruned = prune_for_location(run, location.cell, 50.0, "best_present", head)
    assert set(pruned.keep) == {1, 3}
    for layer, module in pruned.model.moe_layers().items():
        assert module.expert_ids.tolist() == sorted(pruned.keep[layer])
    species = run.world.species(location.train)
    expected_head = [*species, -1] if head == "local" else list(range(run.cfg.model.num_classes))
    assert pruned.model.cfg.head_outputs() == expected_head
    assert pruned.parameters < pruned.full_parameters
    assert 0.0 <= pruned.accuracy <= 1.0 and 0.0 <= pruned.full_accuracy <= 1.0


def test_an_unknown_head_is_refused(run):
    with pytest.raises(ValueError, match="head 'some' is not one of local, all"):
        prune_for_location(run, run.world.locations[0].cell, 90.0, "best_present", "some")


def test_a_fleet_plan_places_each_device_by_its_nearest_location(run):
    near = [run.world.locations[0], run.world.locations[1]]
    devices = [FleetDevice(f"d{k}", loc.lat, loc.lon, memory_kb=1024) for k, loc in enumerate(near)]
    plan = fleet_plan(run, devices, {("d0", "d1"): 5.0})
    assert set(plan.holds) == {"d0", "d1"}
    for device, location in zip(devices, near, strict=True):
        used = {layer for layer, counts in run.routing(location).expert_counts.items() if counts.sum() > 0}
        assert {layer for layer, ids in plan.holds[device.name].items() if ids} == used  # 1 MB holds all it needs
