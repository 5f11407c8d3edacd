"""The image pipeline: JPEG files to model-ready tensors, cheap enough for 579k iNat images on a small box.

Decoding is the cost. A JPEG is decoded at reduced size where the format allows it (libjpeg's DCT
scaling, through PIL's `draft`: an 800 px photo wanted at 224 px is decoded at 400 px, about a quarter
of the work), then resized (short side) and centre-cropped to the model input. Optionally the decoded
uint8 images are written once to an on-disk cache and memory-mapped, so epochs after the first read
pixels instead of decoding JPEGs. Train augmentation follows the papers (random crop, horizontal flip
at p=0.5, optional RandAugment) and works on torch 1.13 too (the device image's Debian torch).

A file that cannot be decoded fails alone: `BadImage` names it, and datasets count it as a skip.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, get_args

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from geomoe.data.atomic_file import atomic_write

Augmentation = Literal["none", "flip", "crop+flip", "crop+flip+randaugment"]
AUGMENTATIONS = get_args(Augmentation)


class BadImage(ValueError):
    """An image file that is missing, truncated or not an image; the message names the file."""


@dataclass
class ImageConfig:
    """How image files become model input."""

    __pydantic_config__ = {"extra": "forbid"}  # unknown keys are refused when pydantic builds it from a file

    size: int = 64  # side of the model input, pixels (224 in the papers)
    augment: Augmentation = "crop+flip"  # train augmentation: none | flip | crop+flip | crop+flip+randaugment
    crop_scale: float = 0.5  # smallest area share a random crop keeps
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # MobileViTV2 takes [0, 1] pixels (timm, the paper)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)  # use ImageNet's mean/std for backbones trained so
    cache: str | None = None  # folder of decoded uint8 caches (memory-mapped); None: decode every time

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"images.augment={self.augment!r} is not one of {AUGMENTATIONS}")
        if self.size < 8:
            raise ValueError(f"images.size must be >= 8, got {self.size}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)


def decode(path: Path, size: int, reduced: bool = True) -> np.ndarray:
    """(size, size, 3) uint8: short side resized to `size`, centre crop; `reduced` uses DCT scaling."""
    try:
        with Image.open(path) as image:
            if reduced:
                image.draft("RGB", (size, size))  # JPEG only: decode at the smallest scale >= size
            image = image.convert("RGB")
            width, height = image.size
            scale = size / min(width, height)
            resized = (max(size, round(width * scale)), max(size, round(height * scale)))
            image = image.resize(resized, Image.BILINEAR, reducing_gap=None if reduced else 3.0)
            left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
            return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except FileNotFoundError:
        raise BadImage(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"{path}: cannot be decoded ({error})") from None


def to_tensor(pixels: np.ndarray, cfg: ImageConfig) -> torch.Tensor:
    """(H, W, 3) uint8 -> normalised (3, H, W) float32."""
    image = torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1).float().div_(255)
    if cfg.mean != (0.0, 0.0, 0.0) or cfg.std != (1.0, 1.0, 1.0):
        image.sub_(torch.tensor(cfg.mean).view(3, 1, 1)).div_(torch.tensor(cfg.std).view(3, 1, 1))
    return image


def augmenter(cfg: ImageConfig, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """Train augmentation of a (3, S, S) uint8 tensor, drawing from `generator` (reproducible per node)."""
    randaugment = None
    if cfg.augment.endswith("randaugment"):
        from torchvision.transforms import RandAugment

        randaugment = RandAugment()

    def apply(image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        if cfg.augment.startswith("crop"):
            area = float(torch.empty(1).uniform_(cfg.crop_scale, 1.0, generator=generator))
            side_h, side_w = max(1, round(height * area**0.5)), max(1, round(width * area**0.5))
            top = int(torch.randint(0, height - side_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - side_w + 1, (1,), generator=generator))
            crop = image[:, top : top + side_h, left : left + side_w].float().unsqueeze(0)
            image = torch.nn.functional.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
            image = image.squeeze(0).round().clamp(0, 255).to(torch.uint8)
        if cfg.augment != "none" and float(torch.rand(1, generator=generator)) < 0.5:
            image = image.flip(-1)
        if randaugment is not None:
            image = randaugment(image)
        return image

    return apply


def cache_key(root: Path, files: Sequence[str], size: int) -> str:
    """Identity of a cache: which files, from where, at what size."""
    digest = hashlib.sha256(f"{Path(root).resolve()}\n{size}\n".encode())
    for name in files:
        digest.update(name.encode() + b"\n")
    return digest.hexdigest()[:20]


class DecodedCache:
    """Decoded (N, S, S, 3) uint8 images of a file list, built once, then memory-mapped read-only.

    Built under a file lock (several simulated clients may ask for it at once) and written atomically
    (`atomic_write`), so a crash never leaves a half-written cache behind. Files that fail to decode
    are listed in the sidecar JSON and stay zero.
    """

    def __init__(self, folder: Path, root: Path, files: Sequence[str], size: int, progress: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        key = cache_key(root, files, size)
        self.path = folder / f"{key}.npy"
        self.meta_path = folder / f"{key}.json"
        if not self.meta_path.is_file():
            with (folder / f"{key}.lock").open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not self.meta_path.is_file():
                    self._build(root, files, size, progress)
        self.bad: dict[int, str] = {int(k): v for k, v in json.loads(self.meta_path.read_text())["bad"].items()}
        self.pixels = np.load(self.path, mmap_mode="r")

    def _build(self, root: Path, files: Sequence[str], size: int, progress: bool) -> None:
        bad: dict[int, str] = {}
        indices: Sequence[int] | object = range(len(files))
        if progress:
            from rich.progress import track

            indices = track(range(len(files)), description=f"decoding {len(files)} images into the cache")

        def write(out: BinaryIO) -> None:  # the .npy header, then one decoded image after another
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (len(files), size, size, 3)}  # fmt: skip
            np.lib.format.write_array_header_1_0(out, header)
            for index in indices:  # type: ignore[attr-defined]
                try:
                    out.write(np.ascontiguousarray(decode(root / files[index], size), dtype=np.uint8).tobytes())
                except BadImage as error:
                    bad[index] = str(error)
                    out.write(bytes(size * size * 3))

        atomic_write(self.path, write)
        atomic_write(self.meta_path, json.dumps({"files": len(files), "size": size, "bad": bad}).encode())


class ImageFiles(torch.utils.data.Dataset):
    """Labelled image files under a root; items are (image, label), or None for a file that fails.

    `skipped` counts failures by reason; `collate` drops the Nones, so a bad file costs one example,
    never a round. With `train`, items are augmented.
    """

    def __init__(
        self,
        root: Path,
        files: Sequence[str],
        labels: np.ndarray,
        cfg: ImageConfig,
        train: bool = False,
        seed: int = 0,
    ) -> None:
        self.root, self.files, self.labels, self.cfg, self.train = Path(root), list(files), labels, cfg, train
        self.cache = DecodedCache(Path(cfg.cache), self.root, self.files, cfg.size) if cfg.cache is not None else None
        self.augment = augmenter(cfg, torch.Generator().manual_seed(seed)) if train and cfg.augment != "none" else None
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.files)

    def pixels(self, index: int) -> np.ndarray:
        if self.cache is not None:
            if index in self.cache.bad:
                raise BadImage(self.cache.bad[index])
            return self.cache.pixels[index]
        return decode(self.root / self.files[index], self.cfg.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        try:
            pixels = self.pixels(index)
        except BadImage:
            self.skipped["unreadable image"] += 1
            return None
        if self.augment is not None:
            image = self.augment(torch.from_numpy(np.array(pixels)).permute(2, 0, 1))
            pixels = image.permute(1, 2, 0).numpy()
        return to_tensor(pixels, self.cfg), int(self.labels[index])


def collate(batch: list) -> list[torch.Tensor] | None:
    """Default collation of the items that loaded; a batch of only failures becomes None."""
    kept = [item for item in batch if item is not None]
    return torch.utils.data.default_collate(kept) if kept else None
