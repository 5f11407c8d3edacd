"""The world is computed once, written to a file, and read back identically (checked by hash)."""

import numpy as np
import pytest
import torch

from geomoe.client.data import cell_data
from geomoe.data.images import ImageConfig
from geomoe.data.world_file import read_world_file
from geomoe.world.config import WorldConfig
from geomoe.world.world import World


def test_a_world_round_trips_through_its_file(tmp_path):
    cfg = WorldConfig()
    built, path, sha = World.cached(cfg, tmp_path)
    loaded, same_path, same_sha = World.cached(cfg, tmp_path)
    assert (same_path, same_sha) == (path, sha) and path.name == f"world-{cfg.key()}.npz"
    np.testing.assert_array_equal(loaded.data.labels, built.data.labels)
    assert list(loaded.cells) == list(built.cells) and loaded.data.class_names == built.data.class_names
    for a, b in zip(loaded.locations, built.locations, strict=True):
        assert (a.cell, a.lat, a.lon) == (b.cell, b.lat, b.lon)
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(getattr(a, split), getattr(b, split))
    image, label = loaded.data.images(built.locations[1].train[:1], cfg.images)[0]
    assert torch.equal(image, built.data.images(built.locations[1].train[:1], cfg.images)[0][0])


def test_a_client_refuses_a_world_file_the_server_did_not_write(tmp_path):
    _, path, sha = World.cached(WorldConfig(), tmp_path)
    local = cell_data(path, sha, 2, ImageConfig())
    assert local.source.startswith("cell ") and len(local.train) > 0
    with pytest.raises(ValueError, match="another run wrote it"):
        read_world_file(path, "0" * 64)
    with pytest.raises(FileNotFoundError, match="no world file"):
        read_world_file(tmp_path / "absent.npz", sha)
    with pytest.raises(ValueError, match="partition-id 9 has no client"):
        cell_data(path, sha, 9, ImageConfig())


def test_every_cell_a_client():
    world = World(WorldConfig(clients="cells", min_examples=20))
    cells = [location.cell for location in world.locations]
    assert len(cells) == len(set(cells)) > 6
    counts = {c: int((world.cells == c).sum()) for c in set(world.cells)}
    assert all(counts[c] >= 20 for c in cells)


def test_a_world_built_from_older_files_is_not_reused(tmp_path):
    import os

    from geomoe.world.export import export_world

    cfg = WorldConfig(num_locations=2)
    cfg.synthetic.num_observations = 800
    cfg.n_max = 80
    summary = export_world(cfg, "inat2017", tmp_path / "files")
    cfg.dataset = "inat2017"
    cfg.files.root = str(tmp_path / "files")
    cfg.files.annotations = [str(tmp_path / "files" / summary["annotations"])]
    cfg.files.locations = [str(tmp_path / "files" / summary["locations"])]
    _, first, _ = World.cached(cfg, tmp_path / "cache")
    assert World.cached(cfg, tmp_path / "cache")[1] == first
    os.utime(cfg.files.annotations[0], ns=(1, 1))  # the annotations changed since
    assert World.cached(cfg, tmp_path / "cache")[1] != first
