"""Fuzzing the camera runtime: watched folders of anything a card or a careless script leaves (images, junk bytes
under image names, symlinks dangling, looping or not, FIFOs, folders) and results files with any lines. Whatever is
there, `run_once` returns, every good image is classified, every regular file is recorded once, and no good
result already in the results file is lost."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from geomoe.camera.export import export_torchscript
from geomoe.camera.runtime import DeviceConfig, DeviceRuntime
from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet, prune_head
from tests.camera.species import species_labels

pytestmark = pytest.mark.fuzz
KINDS = ("image", "junk", "dangling", "loop", "link", "fifo", "folder")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = prune_head(GeoMoENet(ModelConfig(num_classes=8, num_experts=4)), [1, 4, 6])
    return export_torchscript(model, tmp_path_factory.mktemp("model") / "model.pt", 64, species_labels(model))


entries = st.lists(
    st.tuples(st.sampled_from(KINDS), st.sampled_from([".jpg", ".png", ".JPEG", ".txt"]), st.binary(max_size=64)),
    max_size=8,
)
lines = st.lists(st.one_of(st.text(max_size=80), st.sampled_from(["[" * 5000, '{"image": 1}', '{"image": "z.png"}'])),
                 max_size=4)  # fmt: skip


def populate(folder, planned) -> tuple[set[str], set[str]]:
    """Make the entries; return the names of good images and of every entry with an image suffix."""
    good, named = set(), set()
    old = time.time() - 10
    for index, (kind, suffix, data) in enumerate(planned):
        path = folder / f"e{index}{suffix}"
        if kind == "image":
            Image.fromarray(np.full((32, 32, 3), index * 20, np.uint8)).save(path, format="PNG")
            if suffix.lower() in (".jpg", ".png", ".jpeg"):
                good.add(path.name)
        elif kind == "junk":
            path.write_bytes(data)
        elif kind == "dangling":
            path.symlink_to(folder / "missing")
        elif kind == "loop":
            path.symlink_to(path)
        elif kind == "link":
            path.symlink_to(folder / "e0.png")
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            path.mkdir()
        if path.exists() and not path.is_symlink():
            os.utime(path, (old, old))
        if suffix.lower() in (".jpg", ".png", ".jpeg"):
            named.add(path.name)
    return good, named


@given(planned=entries, previous=lines)
def test_whatever_is_in_the_folder_the_runtime_goes_on_and_loses_no_good_result(tmp_path_factory, model_file,
                                                                                planned, previous):  # fmt: skip
    root = tmp_path_factory.mktemp("camera")
    watch = root / "watch"
    watch.mkdir()
    good, named = populate(watch, planned)
    kept = json.dumps({"image": "earlier.png", "top": []})
    (root / "results.jsonl").write_text("\n".join([kept, *previous]) + "\n")
    runtime = DeviceRuntime(DeviceConfig(watch, model_file, root / "results.jsonl", settle_s=0.0))
    runtime.run_once()
    assert runtime.run_once() == 0  # everything recorded once, nothing retried
    rows = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    by_name = {row["image"]: row for row in rows if isinstance(row, dict) and "image" in row}
    assert "earlier.png" in by_name
    assert all("top" in by_name[name] for name in good)
    assert named <= set(by_name) | runtime.done
    shutil.rmtree(root)
