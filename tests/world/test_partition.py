import numpy as np
import pytest

from geomoe.data.cells import cell_from_path
from geomoe.data.synthetic import SyntheticConfig, SyntheticGeoSpecies
from geomoe.world.partition import adaptive_partition, summarise


@pytest.fixture(scope="module")
def world():
    return SyntheticGeoSpecies(SyntheticConfig(num_observations=4000))


@pytest.mark.parametrize("n_max", [100, 400, 2000])
def test_partition_invariants(world, n_max):
    cells = adaptive_partition(world.lat, world.lon, world.labels, n_max)
    assert cells.shape == world.labels.shape  # every example in exactly one cell
    tokens = set(cells.tolist())
    ids = [cell_from_path(t) for t in tokens]
    for a in ids:  # cells never overlap: no cell contains another
        assert not any(a != b and a.contains(b) for b in ids)
    for row in summarise(cells, world.labels):
        if row.top_count > n_max:  # only where the data does not allow a split
            assert row.level == 20
    assert np.array_equal(cells, adaptive_partition(world.lat, world.lon, world.labels, n_max))  # deterministic


def test_larger_n_max_gives_fewer_cells(world):
    counts = [len(set(adaptive_partition(world.lat, world.lon, world.labels, n).tolist())) for n in (50, 200, 1000)]
    assert counts[0] > counts[1] > counts[2]


def test_split_stops_where_top_species_fits(world):
    cells = adaptive_partition(world.lat, world.lon, world.labels, 300)
    for row in summarise(cells, world.labels):
        assert row.top_count <= 300
        if row.level > 0:  # its parent had to be split
            parent = row.cell[:-1]
            parent_labels = world.labels[np.char.startswith(cells.astype(str), parent)]
            assert np.bincount(parent_labels).max() > 300
