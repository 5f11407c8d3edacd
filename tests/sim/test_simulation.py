"""`geomoe sim` on Flower's simulation runtime: what reaches the console, the federation options, and a Ray start
that times out is retried while other failures are not (the launcher stubbed; real runs are integration tests)."""

import json

import pytest

from geomoe.sim import simulation
from geomoe.wire.run_config import RunConfig, build_run_config

SMALL = ["world.synthetic.num_observations=3000", "world.num_locations=3", "world.n_max=300"]


@pytest.mark.parametrize(
    ("line", "quiet"),
    [
        ("\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n", False),
        ("\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n", False),
        ("INFO :      Starting logstream\n", False),
        ("Using SuperLink: geomoe-sim (127.0.0.1:4000)\n", False),
        ("Successfully started run 1408\n", False),
        ("round 1/2: 3 replies, train loss 2.792, accuracy before round 0.131\n", True),
        ("\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception\n", True),
        ("│     1 │    0.293 │       0.279 │\n", True),
    ],
)
def test_the_console_shows_the_run_and_errors_not_flowers_logs(line, quiet):
    assert simulation.shown(line, verbose=False) is quiet
    assert simulation.shown(line, verbose=True)


def test_federation_options_name_cpus_only_for_a_local_ray():
    local = simulation.federation_options(7, simulation.ClientResources(), None, verbose=False)
    assert "num-supernodes=7" in local and any(o.startswith("init-args-num-cpus=") for o in local)
    assert "init-args-log-to-driver=false" in local and "client-resources-num-gpus=0.0" in local
    cluster = simulation.federation_options(7, simulation.ClientResources(cpus=2, gpus=0.25), "auto", verbose=True)
    assert not any(o.startswith("init-args-num-cpus=") for o in cluster)
    assert "client-resources-num-cpus=2" in cluster and "verbose=true" in cluster
    assert "client-resources-num-gpus=0.25" in cluster  # four clients share each GPU


@pytest.mark.parametrize("cpus, gpus", [(0, 0.0), (1, -0.5), (1, 1.5)])
def test_client_resources_refuse_what_ray_cannot_reserve(cpus, gpus):
    with pytest.raises(ValueError, match="per-client"):
        simulation.ClientResources(cpus=cpus, gpus=gpus)


def test_clients_share_a_gpu_by_default_only_where_there_is_one(monkeypatch):
    monkeypatch.setattr(simulation, "visible_gpus", lambda: 0)
    assert simulation.ClientResources.default().gpus == 0
    monkeypatch.setattr(simulation, "visible_gpus", lambda: 1)
    assert simulation.ClientResources.default().gpus == simulation.DEFAULT_GPU_SHARE


def test_a_gpu_share_without_a_gpu_is_refused_before_ray_waits_for_one(monkeypatch, tmp_path):
    monkeypatch.setattr(simulation, "visible_gpus", lambda: 0)
    cfg = RunConfig(out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="no CUDA device"):
        simulation.simulate(cfg, resources=simulation.ClientResources(gpus=0.5))


def stub_launcher(monkeypatch, failures: list[str]):
    """Each call fails with the next of `failures`, then one writes the report."""
    calls = []

    def launch(flower, env, app, config_file, resume, options, verbose):
        calls.append(env)
        if len(calls) <= len(failures):
            raise RuntimeError(failures[len(calls) - 1])
        (flower.parent / "report.json").write_text(json.dumps({"final_accuracy": 0.5}))

    monkeypatch.setattr(simulation, "_run_on_local_superlink", launch)
    monkeypatch.setattr(simulation.time, "sleep", lambda s: None)
    return calls


def test_a_slow_ray_start_is_retried(tmp_path, monkeypatch):
    calls = stub_launcher(monkeypatch, ["flwr run failed: The current node timed out during startup."])
    cfg = build_run_config(None, {"out": str(tmp_path / "run")}, SMALL)
    assert simulation.simulate(cfg) == {"final_accuracy": 0.5}
    assert len(calls) == 2


def test_ray_that_never_starts_fails_after_three_attempts(tmp_path, monkeypatch):
    calls = stub_launcher(monkeypatch, ["The current node timed out during startup."] * 3)
    cfg = build_run_config(None, {"out": str(tmp_path / "run")}, SMALL)
    with pytest.raises(RuntimeError, match="timed out during startup"):
        simulation.simulate(cfg)
    assert len(calls) == 3


def test_a_local_run_starts_its_own_ray_even_after_a_ray_start_on_this_machine(tmp_path, monkeypatch):
    """Ray joins the cluster of the last `ray start` (its address file outlives it) unless told "local"."""
    calls = stub_launcher(monkeypatch, [])
    simulation.simulate(build_run_config(None, {"out": str(tmp_path / "run")}, SMALL))
    simulation.simulate(build_run_config(None, {"out": str(tmp_path / "cluster")}, SMALL), ray_address="10.0.0.5:6379")
    assert [env["RAY_ADDRESS"] for env in calls] == ["local", "10.0.0.5:6379"]


def test_other_failures_are_not_retried(tmp_path, monkeypatch):
    calls = stub_launcher(monkeypatch, ["flwr run failed (exit 1): ServerApp raised ValueError"])
    cfg = build_run_config(None, {"out": str(tmp_path / "run")}, SMALL)
    with pytest.raises(RuntimeError, match="ServerApp raised ValueError"):
        simulation.simulate(cfg)
    assert len(calls) == 1


def test_sigterm_unwinds_the_run_like_ctrl_c(tmp_path, monkeypatch):
    """`kill PID` of `geomoe sim` runs the launcher's cleanup (stopping `flwr run` and the SuperLink); after the
    run the default SIGTERM handling is back."""
    import os
    import signal

    cleaned = []

    def launch(flower, env, app, config_file, resume, options, verbose):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode: raises here
        finally:
            cleaned.append(True)

    monkeypatch.setattr(simulation, "_run_on_local_superlink", launch)
    before = signal.getsignal(signal.SIGTERM)
    cfg = build_run_config(None, {"out": str(tmp_path / "run")}, SMALL)
    with pytest.raises(KeyboardInterrupt):
        simulation.simulate(cfg)
    assert cleaned == [True] and signal.getsignal(signal.SIGTERM) is before


def test_the_server_takes_every_core_while_virtual_clients_get_one(monkeypatch):
    """The runner pins one thread per process for the virtual clients; the ServerApp lifts its own to the count
    the runner passes (pretraining and evaluation run while the clients wait)."""
    import torch
    from flwr.app import Context, RecordDict

    from geomoe.server import server_app

    seen = {}

    class Recorder:
        def __init__(self, grid, cfg, resume):
            seen["threads"] = torch.get_num_threads()

        def run(self):
            raise SystemExit

    before = torch.get_num_threads()
    monkeypatch.setattr(server_app, "Federation", Recorder)
    monkeypatch.setenv(server_app.SERVER_THREADS, "3")
    try:
        with pytest.raises(SystemExit):
            server_app.main(None, Context(1, 0, {}, RecordDict(), {}))
        assert seen["threads"] == 3
    finally:
        torch.set_num_threads(before)
