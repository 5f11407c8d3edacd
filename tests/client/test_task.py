import pytest
import torch

from geomoe.client.task import Received, build_model, locate
from geomoe.model.experts import global_centroids, shared_state, take_expert_state
from geomoe.model.network import GeoMoENet
from geomoe.sim.world import World
from geomoe.wire.run_config import RunConfig


@pytest.fixture(scope="module")
def cells():
    return [location.cell for location in World(RunConfig().world).locations]


def test_a_node_finds_its_location_by_partition_or_coordinates(cells):
    from geomoe.data.cells import centre

    assert locate(cells, {"partition-id": 2, "num-partitions": 6}) == 2
    lat, lon = centre(cells[1])
    assert locate(cells, {"lat": lat, "lon": lon}) == 1
    assert locate(["cluster-4", *cells], {"lat": lat, "lon": lon}) == 2  # client ids that are no S2 cell are passed


@pytest.mark.parametrize(
    "node_config,message",
    [
        ({"partition-id": 9}, "partition-id 9 has no location"),
        ({"lat": 1.0}, "needs 'lat' and 'lon'"),
        ({"lat": 89.0, "lon": 10.0}, "lies in none of the run's cells"),
    ],
)
def test_a_node_outside_the_run_is_told_why(cells, node_config, message):
    with pytest.raises(ValueError, match=message):
        locate(cells, node_config)


def test_the_compact_model_holds_only_what_was_sent():
    cfg = RunConfig()
    full = GeoMoENet(cfg.model).eval()
    keep = {layer: [1, 4] for layer in cfg.model.moe_layers}
    router = {
        f"moe.{layer}.absent_centroids": global_centroids(m)[[i for i in range(16) if i not in (1, 4)]]
        for layer, m in full.moe_layers().items()
    }
    compact = build_model(cfg.model, shared_state(full), Received(take_expert_state(full, keep), router, {}, {})).eval()
    assert all(m.expert_ids.tolist() == [1, 4] for m in compact.moe_layers().values())
    assert compact(torch.rand(2, 3, 64, 64)).shape == (2, cfg.model.num_classes)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in full.parameters())
    with pytest.raises(ValueError, match="base state does not fit"):
        build_model(cfg.model, {"bogus": torch.zeros(1)}, Received(take_expert_state(full, keep), router, {}, {}))
