"""Shared fixtures: small models and a tiny synthetic world, built once per session."""

from __future__ import annotations

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, settings

from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet

torch.set_num_threads(2)

# The fuzzers (tests marked `fuzz`) run in the default tier on a fixed, derandomized set of examples, so that a run
# passes or fails the same way every time; `pytest -m fuzz` runs them alone for much longer on fresh random examples
# (failures found are kept in .hypothesis/ and replayed first next time).
settings.register_profile(
    "default", max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "fuzz", max_examples=2000, derandomize=False, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def pytest_configure(config: pytest.Config) -> None:
    settings.load_profile("fuzz" if config.getoption("markexpr", "") == "fuzz" else "default")


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


@pytest.fixture(scope="session")
def ops_built():
    """geomoe's operator library, built by its explicit step (loading a fused export never builds it); the tests of
    fused exports skip, saying why, where it cannot be built (no C++ compiler, no headers)."""
    from geomoe.camera.native_ops import OpsBuildError, build_ops

    try:
        return build_ops()
    except OpsBuildError as error:
        pytest.skip(f"geomoe's operator library cannot be built here: {str(error).splitlines()[0]}")
