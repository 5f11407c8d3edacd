"""`geomoe bench data`: the image pipeline's throughput (full decode, DCT-scaled decode, decoded cache)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def _photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like (height, width, 3) uint8 image: smooth colour fields with texture, as JPEGs of nature are."""
    coarse = rng.random((height // 32 + 2, width // 32 + 2, 3))
    field = np.kron(coarse, np.ones((32, 32, 1)))[:height, :width]
    texture = rng.normal(0, 0.06, (height, width, 1))
    return (np.clip(field + texture, 0, 1) * 255).astype(np.uint8)


def bench_data(images: int, size: int, source_width: int, source_height: int, repeats: int, folder: Path) -> dict:
    """Images/s on one core: full JPEG decode + resize, DCT-scaled decode, and reading the decoded cache.

    The three are timed in interleaved repeats (medians), so machine load hits them alike.
    """
    from PIL import Image

    from geomoe.data.images import DecodedCache, ImageConfig, ImageFiles, decode, to_tensor

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    files = [f"{i:05d}.jpg" for i in range(images)]
    for name in files:
        Image.fromarray(_photo(rng, source_width, source_height)).save(folder / name, quality=90)
    started = time.perf_counter()
    DecodedCache(folder / "cache", folder, files, size)
    build_s = time.perf_counter() - started
    labels = np.zeros(images, dtype=np.int64)
    plain_cfg = ImageConfig(size=size)
    reduced = ImageFiles(folder, files, labels, plain_cfg)
    cached = ImageFiles(folder, files, labels, ImageConfig(size=size, cache=str(folder / "cache")))
    passes = {  # each yields model-ready tensors
        "plain_decode": lambda: [to_tensor(decode(folder / f, size, reduced=False), plain_cfg) for f in files],
        "reduced_decode": lambda: [reduced[i] for i in range(images)],
        "cached": lambda: [cached[i] for i in range(images)],
    }
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rates = {name: images / sorted(t)[len(t) // 2] for name, t in times.items()}
    return {
        "images": images,
        "size": size,
        "source": [source_width, source_height],
        "repeats": repeats,
        "threads": 1,
        "images_per_s_per_core": rates,
        "cache_build_s": build_s,
        "cached_over_plain": rates["cached"] / rates["plain_decode"],
        "reduced_over_plain": rates["reduced_decode"] / rates["plain_decode"],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
