"""The camera-trap runtime: resumes after a kill, never half-writes, bounded disk, atomic updates."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from geomoe.camera.export import export_torchscript
from geomoe.camera.runtime import DeviceConfig, DeviceRuntime, install_model, repair_results
from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet, prune_head
from tests.camera.species import species_labels


def write_images(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        pixels = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        path = folder / f"img_{i:04d}.png"
        Image.fromarray(pixels).save(path)
        old = time.time() - 10 + i * 0.001  # written a while ago, in order
        os.utime(path, (old, old))
        paths.append(path)
    return paths


def runtime_for(tmp_path: Path, model: Path, **kwargs) -> DeviceRuntime:
    return DeviceRuntime(DeviceConfig(tmp_path / "watch", model, tmp_path / "results.jsonl", **kwargs))


def results(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]


def test_each_image_is_classified_once_with_top_species(tmp_path, exported):
    write_images(tmp_path / "watch", 5)
    runtime = runtime_for(tmp_path, exported)
    assert runtime.run_once() == 5
    write_images(tmp_path / "watch", 2, start=5)
    assert runtime.run_once() == 2
    rows = results(tmp_path)
    assert [r["image"] for r in rows] == [f"img_{i:04d}.png" for i in range(7)]
    assert all(len(r["top"]) == 3 and {t["species"] for t in r["top"]} <= {1, 4, 6, -1} for r in rows)


def test_results_name_the_species_the_model_and_what_other_means(tmp_path, exported):
    write_images(tmp_path / "watch", 3)
    runtime_for(tmp_path, exported, top_k=4).run_once()  # all four outputs: 1, 4, 6 and other
    for row in results(tmp_path):
        assert row["model"].startswith("geomoe ") and len(row["model"].split()[-1]) == 12  # name, weights' digest
        by_id = {answer["species"]: answer for answer in row["top"]}
        assert {k: by_id[k]["scientificName"] for k in (1, 4, 6)} == {k: f"Testus species{k}" for k in (1, 4, 6)}
        assert by_id[-1]["scientificName"] is None and "does not hold" in by_id[-1]["meaning"]


def test_images_still_being_written_are_counted_and_left_for_later(tmp_path, exported):
    write_images(tmp_path / "watch", 2)
    fresh = write_images(tmp_path / "watch", 1, start=2)[0]
    now = time.time()
    os.utime(fresh, (now, now))  # just written
    runtime = runtime_for(tmp_path, exported, settle_s=5)  # the others were written 10 s ago
    assert runtime.run_once() == 2 and runtime.unsettled() == 1
    os.utime(fresh, (now - 120, now - 120))
    assert runtime.unsettled() == 0 and runtime.run_once() == 1


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_images_are_fed_at_the_side_the_model_was_exported_for(tmp_path, suffix):
    """An export records its side (a traced MobileViT runs no other): the camera resizes to it without being told,
    and a side given that disagrees with it is refused, naming both."""
    if suffix == ".onnx":
        pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")
    from geomoe.camera.export import export_onnx

    torch.manual_seed(0)
    model = prune_head(GeoMoENet(ModelConfig(num_classes=8, num_experts=4)), [1, 4, 6])
    path = (export_onnx if suffix == ".onnx" else export_torchscript)(
        model, tmp_path / f"model{suffix}", 96, species_labels(model)
    )
    write_images(tmp_path / "watch", 2)  # 64 x 64 frames
    assert runtime_for(tmp_path, path, settle_s=0).run_once() == 2
    assert all(len(r["top"]) == 3 for r in results(tmp_path))
    with pytest.raises(ValueError, match=r"image size 64 does not fit .*model.* exported for 96 px"):
        runtime_for(tmp_path, path, image_size=64)


def test_a_camera_can_leave_cores_to_capture_and_upload(tmp_path, exported):
    """`threads` caps the model's threads (TorchScript's are torch's, the process's) and changes no result."""
    write_images(tmp_path / "watch", 3)
    assert runtime_for(tmp_path, exported).run_once() == 3
    everywhere = results(tmp_path)
    (tmp_path / "results.jsonl").unlink()
    threads = torch.get_num_threads()
    try:
        assert runtime_for(tmp_path, exported, threads=1).run_once() == 3
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert [(r["image"], r["top"]) for r in results(tmp_path)] == [(r["image"], r["top"]) for r in everywhere]


def test_a_torn_result_line_is_cut_and_the_run_resumes(tmp_path, exported):
    write_images(tmp_path / "watch", 4)
    runtime_for(tmp_path, exported).run_once()
    with (tmp_path / "results.jsonl").open("ab") as f:
        f.write(b'{"image": "img_0004.png", "top": [{"spec')  # power lost mid-line
    write_images(tmp_path / "watch", 1, start=4)
    assert repair_results(tmp_path / "results.jsonl") == {f"img_{i:04d}.png" for i in range(4)}
    runtime = runtime_for(tmp_path, exported)
    assert runtime.run_once() == 1
    assert [r["image"] for r in results(tmp_path)] == [f"img_{i:04d}.png" for i in range(5)]


def test_resume_after_a_kill(tmp_path, exported):
    write_images(tmp_path / "watch", 200)
    command = [
        sys.executable,
        "-m",
        "geomoe.cli",
        "device",
        "run",
        "--watch",
        str(tmp_path / "watch"),
        "--model",
        str(exported),
        "--results",
        str(tmp_path / "results.jsonl"),
        "--settle-s",
        "0",
    ]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        path = tmp_path / "results.jsonl"
        if path.exists() and path.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(repair_results(tmp_path / "results.jsonl"))
    assert 5 <= done_before < 200, "the kill must land mid-run"
    runtime_for(tmp_path, exported, settle_s=0).run_once()
    names = [r["image"] for r in results(tmp_path)]
    assert sorted(names) == [f"img_{i:04d}.png" for i in range(200)]  # every image exactly once


def test_disk_use_stays_within_budget_and_unclassified_images_stay(tmp_path, exported):
    paths = write_images(tmp_path / "watch", 10)
    size = paths[0].stat().st_size
    runtime = runtime_for(tmp_path, exported, max_watch_mb=4.5 * size / 1e6)
    runtime.run_once()
    left = sorted(p.name for p in (tmp_path / "watch").iterdir())
    assert left == [f"img_{i:04d}.png" for i in range(6, 10)]  # oldest classified images went first
    assert len(results(tmp_path)) == 10


def test_model_update_is_atomic(tmp_path, exported):
    write_images(tmp_path / "watch", 1)
    runtime = runtime_for(tmp_path, exported)
    original = exported.read_bytes()

    class Interrupted(io.BytesIO):
        def read(self, *args):
            raise ConnectionError("link dropped mid-download")

    with pytest.raises(ConnectionError):
        install_model(Interrupted(), exported)
    with pytest.raises(RuntimeError):
        install_model(io.BytesIO(b"not a model"), exported)
    assert exported.read_bytes() == original
    assert not list(tmp_path.glob(".model.pt.*"))  # no temporary file left behind

    torch.manual_seed(1)
    newer_model = prune_head(GeoMoENet(ModelConfig(num_classes=8, num_experts=4)), [2, 3])
    newer = export_torchscript(newer_model, tmp_path / "new.pt", 64, species_labels(newer_model))
    with newer.open("rb") as f:
        install_model(f, exported)
    os.utime(exported, (time.time() + 5, time.time() + 5))  # make the change visible to a coarse clock
    runtime.run_once()
    assert runtime.model.class_ids == [2, 3, -1]


def test_onnx_runtime_classifies_as_torchscript_does_and_needs_no_torch(tmp_path, exported):
    """The same pruned model exported both ways: ONNX Runtime gives the TorchScript species and scores, with the
    class ids from the ONNX file's own metadata; and a camera running it works with torch, timm and torchvision
    made unimportable (the runtime-only device: onnxruntime, numpy, Pillow)."""
    from geomoe.camera.export import export_onnx

    onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")
    pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")
    torch.manual_seed(0)
    model = prune_head(GeoMoENet(ModelConfig(num_classes=8, num_experts=4)), [1, 4, 6])  # what `exported` holds
    onnx_model = export_onnx(model, tmp_path / "model.onnx", 64, species_labels(model))
    assert [p.name for p in tmp_path.glob("model.onnx*")] == ["model.onnx"]  # weights inside: one file to install
    onnx.checker.check_model(onnx.load(str(onnx_model)))
    assert {p.key: p.value for p in onnx.load(str(onnx_model)).metadata_props}["class_ids"] == "[1, 4, 6, -1]"
    write_images(tmp_path / "watch", 4)
    by_runtime = {}
    for name, path in (("torchscript", exported), ("onnx", onnx_model)):
        results = tmp_path / f"{name}.jsonl"
        runtime = DeviceRuntime(DeviceConfig(tmp_path / "watch", path, results, settle_s=0))
        assert runtime.model.runtime == name and runtime.run_once() == 4
        by_runtime[name] = {r["image"]: r["top"] for r in map(json.loads, results.read_text().splitlines())}
    for image, top in by_runtime["torchscript"].items():
        onnx_top = by_runtime["onnx"][image]
        assert [t["species"] for t in onnx_top] == [t["species"] for t in top]
        assert [t["score"] for t in onnx_top] == pytest.approx([t["score"] for t in top], abs=1e-4)

    code = (
        "import sys\n"
        "for name in ('torch', 'timm', 'torchvision'): sys.modules[name] = None  # importing them now fails\n"
        "from pathlib import Path\n"
        "from geomoe.camera.runtime import DeviceConfig, DeviceRuntime\n"
        f"folder = Path({str(tmp_path)!r})\n"
        "config = DeviceConfig(folder / 'watch', folder / 'model.onnx', folder / 'bare.jsonl', settle_s=0)\n"
        "print(DeviceRuntime(config).run_once())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    bare = {r["image"]: r["top"] for r in map(json.loads, (tmp_path / "bare.jsonl").read_text().splitlines())}
    assert result.stdout.strip() == "4" and bare == by_runtime["onnx"]


def test_the_camera_runtime_needs_no_training_stack():
    """A Pi running exported models has torch but not timm (nor torchvision): the runtime must import without."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('timm', 'torchvision'): sys.modules[name] = None  # importing them now fails\n"
        "import geomoe.camera.runtime\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
