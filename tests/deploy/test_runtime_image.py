"""The runtime-only camera image for real: built from deploy/Dockerfile.runtime on the local Debian base, under
400 MB, without torch, timm, torchvision or OpenCV, and classifying a folder of camera frames with a fused ONNX
export (geomoe's operator, built into the image) exactly as this machine's ONNX Runtime does."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

from geomoe.camera.runtime import DeviceConfig, DeviceRuntime
from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet, prune_head
from tests.camera.species import species_labels

from ..camera.test_runtime import write_images
from .test_fleet import docker_client, image_build

pytestmark = [pytest.mark.docker, pytest.mark.integration]
SIZE_LIMIT_MB = 400
TRAINING_STACK = ("torch", "timm", "torchvision", "cv2", "flwr")


@pytest.fixture
def camera_folder():
    """/data of the camera: an ONNX export and its frames, readable by the image's own (non-root) user."""
    pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")
    from geomoe.camera.export import export_onnx

    folder = Path(tempfile.mkdtemp(prefix="geomoe-camera-"))
    try:
        torch.manual_seed(0)
        model = prune_head(GeoMoENet(ModelConfig(num_classes=8, num_experts=4)), [1, 4, 6])
        export_onnx(model, folder / "model.onnx", 64, species_labels(model), fused=True)
        write_images(folder / "images", 5)
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o777 if path.is_dir() else 0o644)  # the runtime writes results and prunes images
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_runtime_image_is_small_has_no_training_stack_and_classifies_like_this_machine(camera_folder, tmp_path):
    client, base = docker_client()
    tag = f"geomoe-camera-test:{uuid.uuid4().hex[:8]}"
    image, _ = client.images.build(**image_build(base, "deploy/Dockerfile.runtime", tag))
    try:
        size_mb = image.attrs["Size"] / 1e6
        assert size_mb < SIZE_LIMIT_MB, f"runtime image is {size_mb:.0f} MB"
        probe = f"import importlib.util as u; print([m for m in {TRAINING_STACK!r} if u.find_spec(m)])"
        found = client.containers.run(tag, ["-c", probe], entrypoint="python", network_mode="none", remove=True)
        assert found.decode().strip() == "[]"

        # The image's own entry point and role, one pass over the frames (the camera would keep watching).
        client.containers.run(
            tag,
            ["runtime", "--once", "--settle-s", "0", "--image-size", "64"],
            volumes={str(camera_folder): {"bind": "/data", "mode": "rw"}},
            network_mode="none",
            remove=True,
        )
        rows = [json.loads(line) for line in (camera_folder / "results.jsonl").read_text().splitlines()]
        in_image = {Path(r["image"]).name: r["top"] for r in rows}

        write_images(tmp_path / "watch", 5)
        here = DeviceRuntime(DeviceConfig(tmp_path / "watch", camera_folder / "model.onnx", tmp_path / "r.jsonl"))
        assert here.run_once() == 5
        rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
        on_host = {Path(r["image"]).name: r["top"] for r in rows}
        assert in_image.keys() == on_host.keys() and len(in_image) == 5
        for name, top in on_host.items():
            assert [t["species"] for t in in_image[name]] == [t["species"] for t in top]
            assert [t["score"] for t in in_image[name]] == pytest.approx([t["score"] for t in top], abs=1e-4)
    finally:
        client.images.remove(tag, force=True)
