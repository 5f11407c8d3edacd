"""The embedded default: a synthetic geo-species dataset that needs no download.

Species live in spherical caps whose areas follow a power law (a few near-global species, many
local ones, as in iNaturalist-Geo). Observations cluster in hotspots, like community-science
data. Each image is generated from (seed, index) alone: a class-specific foreground sprite on a
background texture that depends on the region, so that both foreground and background patches
exist, as in camera-trap images. Generation is lazy and reproducible across processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class SyntheticConfig:
    """Parameters of the synthetic world."""

    __pydantic_config__ = {"extra": "forbid"}  # unknown keys are refused when pydantic builds it from a file

    num_species: int = 24  # species (classes)
    num_observations: int = 6000  # images in the whole world
    num_hotspots: int = 10  # observation clusters (cities, parks)
    hotspot_spread_deg: float = 6.0  # std of an observation around its hotspot, degrees
    range_exponent: float = 1.5  # power law of range radii: larger -> more local species
    min_range_deg: float = 15.0  # radius of the most local species' range, degrees
    image_size: int = 64  # side of a generated image, pixels
    sprite_fraction: float = 0.4  # side of the foreground sprite over the image side
    noise: float = 0.08  # pixel noise std
    seed: int = 0  # which synthetic dataset: part of its identity, like a real dataset's name


def _unit_vectors(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def _random_points(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    xyz = rng.normal(size=(n, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    return np.degrees(np.arcsin(xyz[:, 2])), np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))


class SyntheticGeoSpecies(Dataset):
    """Observations (lat, lon, label) with images made on demand; `images(idx)` batches them."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        self.hotspot_lat, self.hotspot_lon = _random_points(rng, cfg.num_hotspots)
        hotspot_weight = rng.dirichlet(np.full(cfg.num_hotspots, 2.0))
        # Species ranges: centred on hotspots (where observers are), radii from a power law.
        home = rng.integers(cfg.num_hotspots, size=cfg.num_species)
        self.range_lat = np.clip(self.hotspot_lat[home] + rng.normal(0, 5, cfg.num_species), -89, 89)
        self.range_lon = (self.hotspot_lon[home] + rng.normal(0, 5, cfg.num_species) + 180) % 360 - 180
        self.range_radius_deg = np.minimum(
            180.0, cfg.min_range_deg * rng.pareto(cfg.range_exponent, cfg.num_species) + cfg.min_range_deg
        )
        abundance = rng.lognormal(0, 1, cfg.num_species)
        # Observations: a hotspot, a jittered location, a species whose range covers it.
        spot = rng.choice(cfg.num_hotspots, size=cfg.num_observations, p=hotspot_weight)
        lat = np.clip(self.hotspot_lat[spot] + rng.normal(0, cfg.hotspot_spread_deg, spot.size), -89.9, 89.9)
        lon = (self.hotspot_lon[spot] + rng.normal(0, cfg.hotspot_spread_deg, spot.size) + 180) % 360 - 180
        cos_dist = _unit_vectors(lat, lon) @ _unit_vectors(self.range_lat, self.range_lon).T  # (n, S)
        inside = cos_dist >= np.cos(np.radians(self.range_radius_deg))
        weight = inside * abundance
        nearest = cos_dist.argmax(axis=1)  # a point in nobody's range sees the nearest species
        weight[weight.sum(axis=1) == 0, nearest[weight.sum(axis=1) == 0]] = 1.0
        cumulative = np.cumsum(weight / weight.sum(axis=1, keepdims=True), axis=1)
        self.labels = (cumulative < rng.random((spot.size, 1))).sum(axis=1).clip(max=cfg.num_species - 1)
        self.lat, self.lon = lat.astype(np.float32), lon.astype(np.float32)
        # Appearance: each species a coloured sprite; each hotspot region a background palette.
        self.sprites = rng.random((cfg.num_species, 4, 4, 3)).astype(np.float32)
        self.sprite_masks = rng.random((cfg.num_species, 4, 4)) < 0.7
        self.region_colour = rng.random((cfg.num_hotspots, 3)).astype(np.float32) * 0.6 + 0.2
        self.region = (_unit_vectors(lat, lon) @ _unit_vectors(self.hotspot_lat, self.hotspot_lon).T).argmax(axis=1)

    def __len__(self) -> int:
        return int(self.labels.size)

    def image(self, index: int) -> np.ndarray:
        """The (3, H, W) float32 image of observation `index`, from (seed, index) alone."""
        cfg = self.cfg
        rng = np.random.default_rng((cfg.seed, index))
        size = cfg.image_size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        freq = 2 + self.region[index] % 5
        phase = rng.random() * 6.28
        texture = 0.5 + 0.5 * np.sin(freq * 6.28 * (xx + 0.5 * yy) + phase)
        base = self.region_colour[self.region[index]]
        image = base[:, None, None] * (0.7 + 0.3 * texture[None])
        sprite_side = max(4, int(size * cfg.sprite_fraction) // 4 * 4)
        label = self.labels[index]
        cell = sprite_side // 4
        sprite = np.repeat(np.repeat(self.sprites[label], cell, 0), cell, 1).transpose(2, 0, 1)
        mask = np.repeat(np.repeat(self.sprite_masks[label], cell, 0), cell, 1)
        top, left = rng.integers(0, size - sprite_side + 1, size=2)
        window = image[:, top : top + sprite_side, left : left + sprite_side]
        window[:, mask] = sprite[:, mask]
        image = image + rng.normal(0, cfg.noise, image.shape)
        return np.clip(image, 0, 1).astype(np.float32)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.image(index)), int(self.labels[index])
