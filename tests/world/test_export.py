"""The synthetic world written in each published format reads back through the dataset registry."""

import json

import numpy as np
import pytest

from geomoe.client.data import device_data
from geomoe.data.datasets import DataFiles, load_dataset
from geomoe.data.device_folder import read_device_images
from geomoe.data.synthetic import SyntheticConfig
from geomoe.world.config import WorldConfig
from geomoe.world.export import export_world
from geomoe.world.world import World

SMALL = WorldConfig(
    synthetic=SyntheticConfig(num_observations=600, image_size=32),
    n_max=60,
    num_locations=2,
    min_examples=30,
    min_separation_deg=10.0,
)


@pytest.fixture(scope="module")
def world():
    return World(SMALL)


def files_of(out, summary) -> DataFiles:
    files = DataFiles(root=str(out / summary["root"]))
    for key in ("annotations", "locations"):
        if key in summary:
            setattr(files, key, [str(out / summary[key])])
    for key in ("train_split", "test_split", "metadata", "gps"):
        if key in summary:
            setattr(files, key, str(out / summary[key]))
    return files


@pytest.mark.parametrize("fmt", ["inat2017", "inat2021"])
def test_inat_exports_read_back_row_for_row(tmp_path, world, fmt):
    summary = export_world(SMALL, fmt, tmp_path)
    data = load_dataset(fmt, SMALL.synthetic, files_of(tmp_path, summary))
    assert data.class_names == world.data.class_names
    np.testing.assert_array_equal(data.labels, world.data.labels)
    np.testing.assert_allclose(data.lat, world.data.lat, atol=1e-4)
    image = data.images(np.array([5]), SMALL.images)[0][0]
    assert image.shape == (3, 64, 64)  # decoded and resized to the run's input size
    assert json.loads((tmp_path / "export.json").read_text())["images"] == 600


def test_hsu_export_reads_back_with_clients_and_a_test_set(tmp_path, world):
    summary = export_world(SMALL, "hsu", tmp_path)
    data = load_dataset("hsu", SMALL.synthetic, files_of(tmp_path, summary))
    assert len(data.labels) == 600 and data.test_rows.size == summary["test_rows"]
    train_rows = np.setdiff1d(np.arange(600), data.test_rows)
    assert set(data.cells[train_rows]) <= set(world.cells)
    hsu_world = World(
        WorldConfig(
            dataset="hsu", files=files_of(tmp_path, summary), num_locations=2, min_examples=30, min_separation_deg=10.0
        )
    )
    for location in hsu_world.locations:
        assert set(location.test) <= set(data.test_rows.tolist())  # test rows come from test.csv
        assert not set(location.train) & set(data.test_rows.tolist())


def test_hsu_rows_without_an_annotation_are_named(tmp_path):
    summary = export_world(SMALL, "hsu", tmp_path)
    with (tmp_path / "test.csv").open("a") as f:
        f.write("999999,3,3\n")
    with pytest.raises(ValueError, match=r"test.csv, row \d+, field 'image_id': '999999' has no annotation"):
        load_dataset("hsu", SMALL.synthetic, files_of(tmp_path, summary))


def test_iwildcam_export_reads_back_with_camera_clusters(tmp_path):
    summary = export_world(SMALL, "iwildcam", tmp_path)
    data = load_dataset("iwildcam", SMALL.synthetic, files_of(tmp_path, summary))
    assert len(data.labels) == 600 and len(set(data.cells)) <= summary["cameras"]
    assert data.images(np.array([0]), SMALL.images)[0] is not None


def test_device_folders_hold_each_location_and_say_where_it_is(tmp_path, world):
    summary = export_world(SMALL, "folders", tmp_path)
    assert summary["devices"] == ["L1", "L2"]
    rows = (tmp_path / "locations.csv").read_text().splitlines()
    assert rows[0] == "name,cell,lat,lon" and rows[1].startswith(f"L1,{world.locations[0].cell},")
    location = world.locations[0]
    rows = np.concatenate([location.train, location.val, location.test])
    images = read_device_images(tmp_path / "L1", world.data.class_names)
    assert sorted(images.labels.tolist()) == sorted(world.data.labels[rows].tolist())
    local = device_data(tmp_path / "L1", world.data.class_names, (0.6, 0.2, 0.2), SMALL.images, 0.0, 0.0)
    assert set(local.species()) <= set(world.data.labels[rows].tolist())
    assert local.source == f"folder {tmp_path / 'L1'} (folders)"


def test_only_the_synthetic_world_is_exported(tmp_path):
    with pytest.raises(ValueError, match="only the synthetic world"):
        export_world(WorldConfig(dataset="inat2017"), "inat2017", tmp_path)
    with pytest.raises(ValueError, match="not one of"):
        export_world(SMALL, "coco", tmp_path)
