"""Starting the simulation engine: a Ray start that times out is retried, a persistent failure is named."""

import pytest

ray = pytest.importorskip("ray")

from geomoe.runner import simulation  # noqa: E402


def test_a_slow_ray_start_is_retried(monkeypatch):
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise Exception("The current node timed out during startup.")  # what Ray raises

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(simulation.time, "sleep", lambda s: None)
    simulation.start_ray({"num_cpus": 1})
    assert calls == [{"num_cpus": 1}, {"num_cpus": 1}]


def test_ray_that_never_starts_is_a_clear_error(monkeypatch):
    def init(**kwargs):
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(simulation.time, "sleep", lambda s: None)
    with pytest.raises(RuntimeError, match="Ray did not start in 3 attempts: The current node timed out"):
        simulation.start_ray({})
