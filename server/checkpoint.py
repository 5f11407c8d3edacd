"""Atomic checkpoints of the global model and server state: a crash never leaves half a file, and loading one
runs no code (tensors and plain data only)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from geomoe.data.atomic_file import atomic_write
from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_model(model: GeoMoENet, path: Path, **extra: Any) -> None:
    """A model file that loads on its own: config + state (+ anything in `extra`)."""
    atomic_save({"model_config": model.cfg.to_dict(), "model_state": model.state_dict(), **extra}, path)


def load_model(path: Path) -> tuple[GeoMoENet, dict[str, Any]]:
    """The model in a file written by `save_model`, and the file's other entries."""
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:  # weights_only: a pickled object (code) in a model or checkpoint file fails to load instead of running
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds more than tensors and plain data; refusing to load it: {error}") from None
    if "model_config" not in data:
        raise ValueError(f"{path} is not a geomoe model file (no model_config)")
    model = GeoMoENet(ModelConfig.from_dict(data.pop("model_config")))
    model.load_state_dict(data.pop("model_state"))
    return model, data
