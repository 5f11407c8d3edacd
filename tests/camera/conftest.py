"""A small pruned model exported for the camera runtime."""

from pathlib import Path

import pytest
import torch

from geomoe.camera.export import export_torchscript
from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet, prune_head
from tests.camera.species import species_labels


@pytest.fixture
def exported(tmp_path) -> Path:
    torch.manual_seed(0)
    model = prune_head(GeoMoENet(ModelConfig(num_classes=8, num_experts=4)), [1, 4, 6])
    return export_torchscript(model, tmp_path / "model.pt", 64, species_labels(model))
