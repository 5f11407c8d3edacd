"""Shared fixtures: small models and a tiny synthetic world, built once per session."""

from __future__ import annotations

import pytest
import torch

from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet

torch.set_num_threads(2)


@pytest.fixture
def moe_model() -> GeoMoENet:
    torch.manual_seed(0)
    model = GeoMoENet(ModelConfig(num_classes=10, num_experts=8))
    model.eval()
    return model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
