import numpy as np
import pytest

from geomoe.world.config import WorldConfig
from geomoe.world.world import World, _great_circle_deg


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig())


def test_locations_are_well_separated_cells_with_enough_data(world):
    assert len(world.locations) == 6
    for i, a in enumerate(world.locations):
        assert len(a.train) + len(a.val) + len(a.test) >= world.cfg.min_examples * 0.9
        for b in world.locations[i + 1 :]:
            assert _great_circle_deg((a.lat, a.lon), (b.lat, b.lon)) >= world.cfg.min_separation_deg


def test_splits_are_disjoint_and_test_keeps_only_species_seen_in_training(world):
    labels = world.data.labels
    for location in world.locations:
        assert not set(location.train) & set(location.val) and not set(location.train) & set(location.test)
        assert set(labels[location.test]) <= set(labels[location.train])
        assert np.all(world.cells[location.train] == location.cell)
    server = set(world.server_indices.tolist())
    assert not server & {int(i) for loc in world.locations for i in loc.train}


def test_too_many_locations_is_a_clear_error():
    with pytest.raises(ValueError, match="num_locations=40"):
        World(WorldConfig(num_locations=40))
