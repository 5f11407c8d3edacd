"""Shared fixtures: small models and a tiny synthetic world, built once per session."""

from __future__ import annotations

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

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


@pytest.fixture
def task_identity():
    """Flower builds messages only inside a task: this gives the test one."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
