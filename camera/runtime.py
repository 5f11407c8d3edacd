"""The camera-trap runtime: classify every new image in a folder, surviving power loss.

- Results go to an append-only JSON-lines file, one fsync'ed line per image. A line torn by power
  loss, or one corrupted in the middle, is dropped at start-up (the file rewritten atomically), keeping
  every good result before and after it.
- An image that cannot be classified (empty or truncated file, a decompression bomb, one the model
  fails on) is recorded as failed, with the reason, and never retried: no crash loop.
- Images already in the results file are skipped on restart: the run resumes where it stopped.
- Only regular files are read: a symlink (dangling, looping or not), a FIFO or a device in the watched folder is
  recorded as skipped and never opened (opening a FIFO would hang the camera); a file that vanishes between
  listing and reading is passed over.
- Results lines are bounded before they are parsed (length, nesting, number length): one crafted line cannot stop
  the runtime at start.
- Disk use is bounded: once the watched folder exceeds its budget, the oldest classified images go.
- Model updates are written to a temporary file, checked, fsync'ed, then renamed over the model:
  a crash leaves either the old or the new model, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from geomoe.camera.inference import OTHER, OTHER_MEANING, ExportedModel, load_exported, runtime_of
from geomoe.wire.bounded import bounded_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LEGACY_IMAGE_SIZE = 64  # the side of TorchScript exports that do not record theirs
MAX_RESULT_CHARS = 64 * 1024  # a results line longer than this is corrupt (a real one is a few hundred characters)
MAX_PIXELS = 40_000_000  # larger images are refused before decoding (a small file can claim gigapixels)


@dataclass
class DeviceConfig:
    """One camera trap's runtime settings."""

    watch: Path  # folder the camera writes images to
    model: Path  # export of the location's pruned model: TorchScript, or ONNX (`.onnx`, run by ONNX Runtime)
    results: Path  # append-only JSON lines: one result per image
    max_watch_mb: float = 512.0  # budget of the watched folder; oldest classified images are deleted beyond it
    top_k: int = 3  # species reported per image
    image_size: int | None = None  # side images are resized to; None: the export's own (it must agree if given)
    poll_s: float = 2.0  # how often to look for new images
    settle_s: float = 1.0  # an image younger than this may still be being written: wait for it
    threads: int = 0  # the model's threads (0: one per core); fewer leave cores to capture and upload


def input_side(model: ExportedModel, asked: int | None, path: Path) -> int:
    """The side images are resized to for `model` (loaded from `path`): its own, since a traced model runs only the
    side it was traced at; `asked` must agree. For an export too old to say: `asked`, else LEGACY_IMAGE_SIZE."""
    if model.image_size is None:
        return asked or LEGACY_IMAGE_SIZE
    if asked is not None and asked != model.image_size:
        raise ValueError(f"image size {asked} does not fit {path}: it was exported for {model.image_size} px images")
    return model.image_size


def install_model(source: BinaryIO, target: Path, check: Callable[[Path], object] | None = None) -> None:
    """Copy `source` next to `target`, check that it loads, fsync, then rename it over `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out:
            shutil.copyfileobj(source, out, length=1 << 20)
            out.flush()
            os.fsync(out.fileno())
        if check is None:  # it must load as what its target is (the part file's suffix says nothing)
            load_exported(tmp, runtime_of(target))
        else:
            check(tmp)
        os.replace(tmp, target)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def kind(status: os.stat_result) -> str:
    """What a folder entry is, in words (for the record of a skipped one)."""
    for test, name in (
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "folder"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(status.st_mode):
            return name
    return "special file"  # fmt: skip


def repair_results(path: Path) -> set[str]:
    """Drop torn or corrupt lines from the results file (rewritten atomically, the good lines kept in order);
    return the images it holds."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    done, good = set(), []
    for line in data.split(b"\n"):
        try:
            result = bounded_json(line.decode(), "a results line", MAX_RESULT_CHARS)
            if not isinstance(result, dict) or not isinstance(result.get("image"), str):
                continue
            done.add(result["image"])
            good.append(line)
        except (ValueError, UnicodeDecodeError):  # torn by power loss, or corrupt (JSONDecodeError is a ValueError)
            continue
    kept = b"".join(line + b"\n" for line in good)
    if kept != data:
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(handle, "wb") as f:
            f.write(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return done


class DeviceRuntime:
    """Classifies images as they arrive; `run_once` handles what is there now."""

    def __init__(self, cfg: DeviceConfig) -> None:
        self.cfg = cfg
        self.done = repair_results(cfg.results)
        for leftover in cfg.model.parent.glob(f".{cfg.model.name}.*.part"):  # an update cut short
            leftover.unlink()
        self._model_mtime = -1.0
        self._load_model()

    def _load_model(self) -> None:
        mtime = self.cfg.model.stat().st_mtime
        if mtime != self._model_mtime:
            self.model = load_exported(self.cfg.model, threads=self.cfg.threads)
            self.image_size = input_side(self.model, self.cfg.image_size, self.cfg.model)
            self._model_mtime = mtime

    def _image(self, path: Path) -> np.ndarray:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:  # checked on the header, before a single pixel is decoded
                raise ValueError(f"{width}x{height} pixels exceed the {MAX_PIXELS} this device decodes")
            image.draft("RGB", (self.image_size, self.image_size))  # JPEG: decode at a reduced scale
            rgb = image.convert("RGB").resize((self.image_size, self.image_size))
        return np.ascontiguousarray((np.asarray(rgb, dtype=np.float32) / 255.0).transpose(2, 0, 1))  # (3, H, W)

    def classify(self, path: Path) -> dict:
        logits = self.model.predict(self._image(path)[None])[0].astype(np.float64)
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        top = np.argsort(-probabilities, kind="stable")[: self.cfg.top_k]
        return {"image": path.name, "time": time.time(), "model": self.model.labels.model,
                "top": [self.named(self.model.class_ids[i], float(probabilities[i])) for i in top]}  # fmt: skip

    def named(self, class_id: int, score: float) -> dict:
        """One ranked answer: the class id, its scientific name, and for the pruned head's 'other' what it means."""
        answer = {"species": class_id, "scientificName": self.model.labels.name_of(class_id), "score": round(score, 5)}
        if class_id == OTHER:
            answer["meaning"] = OTHER_MEANING
        return answer

    def _append(self, result: dict) -> None:
        with self.cfg.results.open("ab") as f:
            f.write((json.dumps(result) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.done.add(result["image"])

    def _entries(self) -> list[tuple[Path, os.stat_result]]:
        """Each entry of the watched folder with its own status (links not followed); entries gone are left out."""
        entries = []
        for path in self.cfg.watch.iterdir():
            try:
                entries.append((path, path.lstat()))
            except FileNotFoundError:  # deleted between listing and stat
                continue
        return entries

    def _unclassified(self) -> list[tuple[Path, os.stat_result]]:
        """Entries with an image name that no result line records yet."""
        return [
            (path, status) for path, status in self._entries()
            if path.suffix.lower() in IMAGE_SUFFIXES and path.name not in self.done
        ]  # fmt: skip

    def unsettled(self) -> int:
        """Images not yet classified that are younger than `settle_s` (maybe still being written): left for later."""
        settled = time.time() - self.cfg.settle_s
        return sum(stat.S_ISREG(s.st_mode) and s.st_mtime > settled for _, s in self._unclassified())

    def pending(self) -> list[Path]:
        """Images not yet classified that have settled, oldest first. Image names that are not regular files are
        recorded as skipped (once) and never opened."""
        settled = time.time() - self.cfg.settle_s
        files = []
        for path, status in self._unclassified():
            if not stat.S_ISREG(status.st_mode):
                self._append(
                    {"image": path.name, "time": time.time(), "skipped": f"not a regular file ({kind(status)})"}
                )
            elif status.st_mtime <= settled:
                files.append((status.st_mtime, path.name, path))
        return [path for _, _, path in sorted(files)]

    def enforce_budget(self) -> list[Path]:
        """Delete the oldest classified images until the watched folder fits its budget."""
        files = sorted(
            ((status.st_mtime, path.name, path, status.st_size) for path, status in self._entries()
             if stat.S_ISREG(status.st_mode)),
        )  # fmt: skip
        total = sum(size for *_, size in files)
        removed = []
        for _, name, path, size in files:
            if total <= self.cfg.max_watch_mb * 1e6:
                break
            if name in self.done:
                total -= size
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def run_once(self) -> int:
        """Classify every pending image; returns how many."""
        self._load_model()
        count = 0
        for path in self.pending():
            try:
                result = self.classify(path)
            except FileNotFoundError:  # deleted since it was listed: nothing left to classify or record
                continue
            except Exception as error:  # noqa: BLE001 - any image that fails is recorded, never retried
                result = {"image": path.name, "time": time.time(), "error": f"{type(error).__name__}: {error}"}
            self._append(result)
            count += 1
        self.enforce_budget()
        return count

    def run_forever(self) -> None:
        while True:
            self.run_once()
            time.sleep(self.cfg.poll_s)
