"""Real-format loaders on fixtures written in the published formats (tests/fixtures/)."""

import json
from pathlib import Path

import pytest

from geomoe.data.inat import load_inat
from geomoe.data.wilds import camera_clusters, load_wilds

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_inat2017_with_its_locations_file():
    records = load_inat(FIXTURES / "inat2017/train2017.json", FIXTURES / "inat2017/train2017_locations.json")
    assert records.image_ids == ["1", "2", "4"]
    assert records.skipped == {"without coordinates": 1}
    assert records.class_names == ["Sciurus niger", "Turdus migratorius", "Sitta carolinensis"]
    assert records.labels.tolist() == [1, 1, 0]
    assert records.lat.tolist() == [47.61, 40.71, 30.27]
    assert "1 without coordinates" in records.report()


def test_inat2021_with_coordinates_on_images():
    records = load_inat(FIXTURES / "inat2021/train_mini.json")
    assert records.image_ids == ["a3c0f5d0-0001", "a3c0f5d0-0002"]
    assert records.lon.tolist() == [-79.38, 151.21]
    assert records.skipped == {"without coordinates": 1}


def edited(tmp_path: Path, name: str, edit) -> Path:
    data = json.loads((FIXTURES / name).read_text())
    edit(data)
    path = tmp_path / Path(name).name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.pop("annotations"), "missing list 'annotations'"),
        (lambda d: d["annotations"][1].update(image_id=99), "annotations\\[1\\], field 'image_id': 99"),
        (lambda d: d["annotations"][0].pop("category_id"), "annotations\\[0\\]: missing field 'category_id'"),
        (lambda d: d["images"][0].update(latitude=123.0), "field 'latitude': 123.0 is outside"),
        (lambda d: d["images"][1].update(longitude="east"), "field 'longitude': 'east' is not a number"),
    ],
)
def test_inat_bad_input_names_file_record_and_field(tmp_path, edit, message):
    path = edited(tmp_path, "inat2021/train_mini.json", edit)
    with pytest.raises(ValueError, match=message) as error:
        load_inat(path)
    assert "train_mini.json" in str(error.value)


def test_inat2017_image_without_location_record(tmp_path):
    locations = edited(tmp_path, "inat2017/train2017_locations.json", lambda d: d.pop(1))
    with pytest.raises(ValueError, match="image id 2 .* has no location record"):
        load_inat(FIXTURES / "inat2017/train2017.json", locations)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_inat(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        load_wilds(tmp_path / "metadata.csv", FIXTURES / "wilds/gps_locations.json")


def test_wilds_metadata_with_gps_and_camera_clusters():
    records = load_wilds(FIXTURES / "wilds/metadata.csv", FIXTURES / "wilds/gps_locations.json", cluster_km=50)
    assert records.file_names == ["8b6d2f4a-001.jpg", "8b6d2f4a-002.jpg", "8b6d2f4a-003.jpg", "8b6d2f4a-004.jpg"]
    assert records.skipped == {"camera without coordinates": 1}
    assert records.class_names == ["0", "71", "146"] and records.labels.tolist() == [2, 2, 0, 1]
    assert records.groups[0] == records.groups[2] != records.groups[3]  # cameras 104 and 105 are 1 km apart


def test_wilds_bad_column_and_value(tmp_path):
    bad = tmp_path / "metadata.csv"
    bad.write_text((FIXTURES / "wilds/metadata.csv").read_text().replace(",y,", ",label,"))
    with pytest.raises(ValueError, match="missing column\\(s\\) \\['y'\\]"):
        load_wilds(bad, FIXTURES / "wilds/gps_locations.json")
    bad.write_text((FIXTURES / "wilds/metadata.csv").read_text().replace(",146,8b6d2f4a-002", ",bird,8b6d2f4a-002"))
    with pytest.raises(ValueError, match="row 3, field 'y': 'bird'"):
        load_wilds(bad, FIXTURES / "wilds/gps_locations.json")
    gps = tmp_path / "gps.json"
    gps.write_text('{"104": {"latitude": 95.0, "longitude": 1.0}}')
    with pytest.raises(ValueError, match="location '104', field 'latitude': 95.0"):
        load_wilds(FIXTURES / "wilds/metadata.csv", gps)


def test_camera_clusters_by_distance():
    clusters = camera_clusters([0.0, 0.1, 10.0], [0.0, 0.1, 10.0], radius_km=50)
    assert clusters[0] == clusters[1] != clusters[2]
