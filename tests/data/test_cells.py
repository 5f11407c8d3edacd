import numpy as np
import pytest
import s2sphere

from geomoe.data.cells import (
    cell_at,
    cell_from_path,
    centre,
    leaf_ids,
    neighbours,
    parent_ids,
    path_at,
    path_from_cell,
    polygon,
)


@pytest.mark.parametrize("token", ["2/1", "2/2", "2/0", "0/", "1/", "4/2", "3/301", "5/0123"])
def test_tokens_of_the_papers_round_trip(token):
    cell = cell_from_path(token)
    assert path_from_cell(cell) == token
    assert cell.level() == len(token.split("/")[1])
    assert cell.face() == int(token[0])


def test_token_is_the_child_path_of_s2():
    face = s2sphere.CellId.from_face_pos_level(4, 0, 0)
    children = list(face.children())
    assert [path_from_cell(c) for c in children] == ["4/0", "4/1", "4/2", "4/3"]


@pytest.mark.parametrize("lat,lon", [(0.0, 0.0), (47.6, -122.3), (-33.9, 18.4), (89.9, 10.0), (-60.0, 179.9)])
@pytest.mark.parametrize("level", [0, 1, 4, 9])
def test_latlon_to_cell_to_token_to_cell(lat, lon, level):
    token = path_at(lat, lon, level)
    cell = cell_from_path(token)
    assert cell == cell_at(lat, lon, level)
    assert cell.contains(s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(lat, lon)))


def test_vectorised_parents_match_s2sphere():
    lat, lon = np.array([10.0, -45.0, 80.0]), np.array([20.0, 170.0, -60.0])
    leaves = leaf_ids(lat, lon)
    for level in (0, 3, 7):
        expected = [cell_at(a, b, level).id() for a, b in zip(lat, lon, strict=True)]
        assert parent_ids(leaves, level).tolist() == expected


def test_geometry_helpers():
    assert centre("0/") == pytest.approx((0.0, 0.0))
    assert len(polygon("4/2")) == 4
    assert sorted(neighbours("0/")) == ["1/", "2/", "4/", "5/"]


@pytest.mark.parametrize("bad", ["6/", "2", "2/4", "x/1", ""])
def test_bad_tokens_are_refused(bad):
    with pytest.raises(ValueError, match="S2 cell token"):
        cell_from_path(bad)


def test_bad_coordinates_are_refused():
    with pytest.raises(ValueError, match="lat=95"):
        cell_at(95, 0, 3)


def test_cells_coarsen_to_a_level_and_keep_their_index():
    from geomoe.data.cells import coarsened

    cells, index = coarsened(["2/0123", "2/0130", "4/", "3/2"], 2)
    assert cells == ["2/01", "4/", "3/2"] and index == [0, 0, 1, 2]  # cells at or above the level stay
    assert coarsened(["2/0123"], None) == (["2/0123"], [0])
    with pytest.raises(ValueError, match="location_level=2 needs S2 cells; client 'cluster-4'"):
        coarsened(["cluster-4"], 2)
