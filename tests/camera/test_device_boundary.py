"""The camera runtime's trust boundary: whatever lands in the watched folder or the results file, each bad
case is recorded as failed and skipped, the good images are classified, and good results are never lost."""

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from geomoe.camera.runtime import MAX_PIXELS, repair_results

from .test_runtime import results, runtime_for, write_images


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


def dangling_link(folder):
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    return folder / "dangling.jpg"


def looping_link(folder):
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    return folder / "loop.jpg"


def fifo(folder):
    os.mkfifo(folder / "pipe.jpg")  # opening it for reading would block until a writer comes: forever
    return folder / "pipe.jpg"


def link_to_a_good_image(folder):
    (folder / "elsewhere.png").symlink_to(folder / "img_0000.png")
    return folder / "elsewhere.png"


SPECIAL = [
    ("dangling symlink", dangling_link, "symbolic link"),
    ("symlink to itself", looping_link, "symbolic link"),
    ("FIFO", fifo, "FIFO"),
    ("symlink to an image", link_to_a_good_image, "symbolic link"),
]


@pytest.mark.parametrize(("case", "make", "what"), SPECIAL, ids=[c[0] for c in SPECIAL])
def test_anything_but_a_regular_file_is_recorded_as_skipped_never_opened(tmp_path, exported, case, make, what):
    write_images(tmp_path / "watch", 3)
    special = make(tmp_path / "watch")
    runtime = runtime_for(tmp_path, exported, max_watch_mb=0.0)  # the budget pass walks the folder too
    assert runtime.run_once() == 3
    assert runtime.run_once() == 0
    rows = {r["image"]: r for r in results(tmp_path)}
    assert rows[special.name] == {"image": special.name, "time": rows[special.name]["time"],
                                  "skipped": f"not a regular file ({what})"}  # fmt: skip
    assert all("top" in rows[f"img_{i:04d}.png"] for i in range(3))
    assert os.path.lexists(special)  # the budget deletes classified images, never what it did not read


def test_a_file_deleted_between_listing_and_reading_is_passed_over(tmp_path, exported, monkeypatch):
    write_images(tmp_path / "watch", 3)
    runtime = runtime_for(tmp_path, exported)
    listed = runtime.pending()
    monkeypatch.setattr(runtime, "pending", lambda: listed)
    listed[1].unlink()
    assert runtime.run_once() == 2
    assert sorted(r["image"] for r in results(tmp_path)) == ["img_0000.png", "img_0002.png"]


@pytest.mark.parametrize(
    "line",
    ['{"image": "x.png", "n": ' + "9" * 5000 + "}", "[" * 100_000, '{"image": "' + "y" * 100_000 + '"}', '["a"]'],
    ids=["5,000-digit number", "100,000 levels deep", "a 100 kB line", "not an object"],
)
def test_a_crafted_results_line_is_dropped_and_the_runtime_starts(tmp_path, exported, line):
    path = tmp_path / "results.jsonl"
    good = [json.dumps({"image": f"img_{i:04d}.png", "top": []}) for i in range(2)]
    path.write_text("\n".join([good[0], line, good[1]]) + "\n")
    write_images(tmp_path / "watch", 3)
    runtime = runtime_for(tmp_path, exported)
    assert runtime.done == {"img_0000.png", "img_0001.png"}
    assert runtime.run_once() == 1
