"""The node's data: one interface for a simulated cell and a device folder; no simulator on a device."""

import subprocess
import sys

import numpy as np
import pytest

from geomoe.client.data import device_data
from geomoe.data.images import ImageConfig

from ..data.test_images import write_photo

SPECIES = ["species_00", "species_01", "species_02"]


def test_the_client_app_imports_no_simulator_and_no_clustering():
    """A device loads only what it runs: neither the simulator nor scikit-learn (a second per process start; the
    server clusters, clients never do)."""
    unwanted = "m.startswith(('geomoe.sim', 'sklearn'))"
    code = f"import sys, geomoe.client.client_app; print(sorted(m for m in sys.modules if {unwanted}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture
def folder(tmp_path):
    for label, name in enumerate(SPECIES):
        for i in range(12):
            write_photo(tmp_path / name / f"{label}-{i}.jpg", 48, 48, seed=label * 100 + i)
    write_photo(tmp_path / "Lynx lynx" / "x.jpg", 48, 48)
    (tmp_path / SPECIES[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    return tmp_path


def test_a_device_folder_as_local_data(folder):
    local = device_data(folder, SPECIES, (0.6, 0.2, 0.2), ImageConfig(size=32), lat=10.0, lon=20.0)
    assert len(local.train) + len(local.val) + len(local.test) <= 37
    assert set(local.species()) <= {0, 1, 2} and local.unknown_species == {"Lynx lynx": 1}
    images, labels, lonlat = next(iter(local.loader("train", 64, shuffle=True, with_location=True)))
    assert images.shape[1:] == (3, 32, 32) and images.shape[0] == labels.shape[0] == lonlat.shape[0]
    assert lonlat[0].tolist() == [20.0, 10.0]
    seen = sum(len(batch[1]) for split in ("train", "val", "test") for batch in local.loader(split, 8))
    broken_in_use = any("broken" in local.data.files[r] for r in np.concatenate([local.train, local.val, local.test]))
    assert local.skipped_images() == int(broken_in_use) and seen == sum(
        map(len, (local.train, local.val, local.test))
    ) - int(broken_in_use)


def test_a_device_with_no_training_image_says_so(tmp_path):
    write_photo(tmp_path / "species_00" / "only.jpg", 32, 32)
    with pytest.raises(ValueError, match="none of its 1 images falls in the training split"):
        device_data(tmp_path, SPECIES, (0.0, 0.5, 0.5), ImageConfig(size=32))
