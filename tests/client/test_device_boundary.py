"""The camera runtime's trust boundary: whatever lands in the watched folder or the results file, each bad
case is recorded as failed and skipped, the good images are classified, and good results are never lost."""

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from geomoe.client.device_runtime import MAX_PIXELS, repair_results

from .test_device_runtime import results, runtime_for, write_images


def aged(path):
    old = time.time() - 5
    os.utime(path, (old, old))
    return path


def bomb(folder):
    """A PNG of a few kB that claims 144 megapixels."""
    Image.new("1", (12_000, 12_000)).save(folder / "bomb.png", optimize=True)
    return aged(folder / "bomb.png")


def empty(folder):
    (folder / "empty.jpg").write_bytes(b"")
    return aged(folder / "empty.jpg")


def truncated(folder):
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(folder / "cut.jpg")
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 3])
    return aged(folder / "cut.jpg")


def not_an_image(folder):
    (folder / "notes.png").write_text("field notes, not a picture")
    return aged(folder / "notes.png")


CASES = [
    ("decompression bomb", bomb, f"exceed the {MAX_PIXELS}"),
    ("0-byte JPEG", empty, "UnidentifiedImageError"),
    ("truncated JPEG", truncated, "OSError"),
    ("text named .png", not_an_image, "UnidentifiedImageError"),
]


@pytest.mark.parametrize(("case", "make", "reason"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_image_is_recorded_as_failed_and_the_good_ones_classified(tmp_path, exported, case, make, reason):
    write_images(tmp_path / "watch", 3)
    bad = make(tmp_path / "watch")
    runtime = runtime_for(tmp_path, exported)
    assert runtime.run_once() == 4
    assert runtime.run_once() == 0  # recorded once, never retried
    rows = {r["image"]: r for r in results(tmp_path)}
    assert reason in rows[bad.name]["error"]
    assert all("top" in rows[f"img_{i:04d}.png"] for i in range(3))


def test_an_image_the_model_fails_on_is_recorded_not_a_crash_loop(tmp_path, exported):
    write_images(tmp_path / "watch", 3)
    runtime = runtime_for(tmp_path, exported)
    predict = runtime.model.predict

    def fragile(images):
        if images.mean() > 0.6:
            raise RuntimeError("kernel failed on this input")
        return predict(images)

    bright = tmp_path / "watch" / "bright.png"
    Image.new("RGB", (64, 64), (250, 250, 250)).save(bright)
    aged(bright)
    runtime.model.predict = fragile
    assert runtime.run_once() == 4
    rows = {r["image"]: r for r in results(tmp_path)}
    assert rows["bright.png"]["error"] == "RuntimeError: kernel failed on this input"
    assert sum("top" in r for r in rows.values()) == 3


def test_a_corrupt_line_in_the_middle_loses_no_good_result(tmp_path):
    path = tmp_path / "results.jsonl"
    lines = [json.dumps({"image": f"img_{i}.png", "top": []}) for i in range(4)]
    path.write_bytes(
        "\n".join([lines[0], lines[1], "\x00\x00garbage{", lines[2], '{"no image key": 1}', lines[3]]).encode() + b"\n"
    )
    assert repair_results(path) == {f"img_{i}.png" for i in range(4)}
    assert path.read_text().splitlines() == lines  # the good lines, in order; nothing after the bad one lost
    assert repair_results(path) == {f"img_{i}.png" for i in range(4)}  # and stable
