"""Atomic checkpoints of the global model and server state: a crash never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: GeoMoENet, path: Path, **extra: Any) -> None:
    """A model file that loads on its own: config + state (+ anything in `extra`)."""
    atomic_save({"model_config": model.cfg.to_dict(), "model_state": model.state_dict(), **extra}, path)


def load_model(path: Path) -> tuple[GeoMoENet, dict[str, Any]]:
    """The model in a file written by `save_model`, and the file's other entries."""
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    data = torch.load(path, map_location="cpu", weights_only=False)
    if "model_config" not in data:
        raise ValueError(f"{path} is not a geomoe model file (no model_config)")
    model = GeoMoENet(ModelConfig.from_dict(data.pop("model_config")))
    model.load_state_dict(data.pop("model_state"))
    return model, data
