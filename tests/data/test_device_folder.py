import shutil
from pathlib import Path

import numpy as np
import pytest

from geomoe.data.device_folder import read_device_images, split_of

from .test_images import write_photo

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RUN_SPECIES = ["species_00", "species_01", "species_02"]


def test_species_folders_map_onto_the_run_and_unknown_species_are_counted(tmp_path):
    for name, count in (("species_01", 2), ("Species 02", 1), ("Panthera leo", 3)):
        for i in range(count):
            write_photo(tmp_path / name / f"{i}.jpg", 32, 32)
    (tmp_path / "species_00").mkdir()
    images = read_device_images(tmp_path, RUN_SPECIES)
    assert images.layout == "folders"
    assert sorted(zip(images.files, images.labels.tolist(), strict=True)) == [
        ("Species 02/0.jpg", 2),
        ("species_01/0.jpg", 1),
        ("species_01/1.jpg", 1),
    ]
    assert images.unknown_species == {"Panthera leo": 3}
    assert images.skipped == {"empty species folder 'species_00'": 1}


def test_a_manifest_with_coordinates(tmp_path):
    write_photo(tmp_path / "a.jpg", 32, 32)
    write_photo(tmp_path / "b.jpg", 32, 32)
    (tmp_path / "manifest.csv").write_text(
        "file,species,lat,lon\na.jpg,species_00,10.0,20.0\nb.jpg,Vulpes vulpes,12.0,22.0\n"
    )
    images = read_device_images(tmp_path, RUN_SPECIES)
    assert (images.layout, images.files, images.labels.tolist()) == ("manifest", ["a.jpg"], [0])
    assert (images.lat, images.lon) == (11.0, 21.0)  # where the device's images were taken, known species or not
    assert images.unknown_species == {"Vulpes vulpes": 1}


@pytest.mark.parametrize(
    "manifest,message",
    [
        ("file,label\na.jpg,x\n", "missing column.*species"),
        ("file,species\nnope.jpg,species_00\n", r"manifest.csv, row 2, field 'file': .*nope.jpg does not exist"),
        ("file,species,lat,lon\na.jpg,species_00,95,0\n", r"row 2, field 'lat': 95.0 is outside"),
    ],
)
def test_manifest_errors_name_file_row_and_field(tmp_path, manifest, message):
    write_photo(tmp_path / "a.jpg", 32, 32)
    (tmp_path / "manifest.csv").write_text(manifest)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_device_images(tmp_path, RUN_SPECIES)


def test_a_camtrap_dp_package(tmp_path):
    package = tmp_path / "package"
    shutil.copytree(FIXTURES / "camtrap-dp", package)
    for path in (
        "media/dep1/IMG_0001.JPG",
        "media/dep1/IMG_0002.JPG",
        "media/dep1/IMG_0003.JPG",
        "media/dep2/IMG_0001.JPG",
        "media/dep2/IMG_0002.JPG",
    ):
        write_photo(package / path, 32, 32)
    images = read_device_images(package, RUN_SPECIES)
    assert images.layout == "camtrap-dp"
    assert images.files == ["media/dep1/IMG_0001.JPG", "media/dep1/IMG_0002.JPG", "media/dep2/IMG_0002.JPG"]
    assert images.labels.tolist() == [1, 2, 2]
    assert images.unknown_species == {"Panthera leo": 1}
    # the event-level observation and the blank have no label; the remote file is not on the device
    assert images.skipped == {"observation without media or species": 2, "remote media (URL)": 1}
    assert images.lat == pytest.approx(np.mean([-1.40, -1.40, -1.44, -1.44]))  # the deployments of labelled media


def test_a_folder_with_no_species_of_the_run_is_a_clear_error(tmp_path):
    write_photo(tmp_path / "Panthera leo" / "0.jpg", 32, 32)
    with pytest.raises(ValueError, match="no image of a species of this run.*Panthera leo"):
        read_device_images(tmp_path, RUN_SPECIES)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_device_images(tmp_path / "absent", RUN_SPECIES)


def test_splits_depend_on_the_file_name_only():
    names = [f"species_00/{i}.jpg" for i in range(2000)]
    splits = np.array([split_of(n, (0.6, 0.2, 0.2)) for n in names])
    assert [split_of(n, (0.6, 0.2, 0.2)) for n in names[:50]] == splits[:50].tolist()
    shares = np.bincount(splits) / splits.size
    np.testing.assert_allclose(shares, [0.6, 0.2, 0.2], atol=0.04)


def test_a_labelled_folder_of_ones_own_as_a_dataset(tmp_path):
    from geomoe.data.datasets import DataFiles, load_dataset
    from geomoe.data.synthetic import SyntheticConfig

    for i in range(3):
        write_photo(tmp_path / f"{i}.jpg", 32, 32)
    (tmp_path / "manifest.csv").write_text(
        "file,species,lat,lon\n0.jpg,Vulpes vulpes,10,20\n1.jpg,Lynx lynx,11,21\n2.jpg,Lynx lynx,,\n"
    )
    data = load_dataset("folder", SyntheticConfig(), DataFiles(folder=str(tmp_path)))
    assert data.class_names == ["Lynx lynx", "Vulpes vulpes"] and data.labels.tolist() == [1, 0]
    assert data.lat.tolist() == [10.0, 11.0] and data.skipped == {"without coordinates": 1}
    for name in ("Lynx lynx", "Vulpes vulpes"):
        write_photo(tmp_path / "tree" / name / "a.jpg", 32, 32)
    with pytest.raises(ValueError, match="gives no coordinates"):
        load_dataset("folder", SyntheticConfig(), DataFiles(folder=str(tmp_path / "tree")))
