"""`geomoe sim`: the federated job on Flower's simulation engine (Ray backend).

One virtual SuperNode per client (an S2 cell); each ClientApp instance learns its client from the
`partition-id` Flower gives it. The world (dataset, partition, clients) is built and written to its
world file before Ray starts, so bad data fails fast and the number of clients is known.
Set `ray_address` to run on an existing Ray cluster.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path

from flwr.simulation import run_simulation

from geomoe.client.client_app import app as client_app
from geomoe.server.federation import REPORT
from geomoe.server.server_app import make_server_app
from geomoe.sim.world import World
from geomoe.wire.run_config import RunConfig

log = logging.getLogger("geomoe.runner.simulation")


def start_ray(init_args: dict, attempts: int = 3) -> None:
    """Start Ray, retrying a start that times out.

    On a loaded small machine (or right after the previous run's Ray went down) the raylet can take longer
    than Ray's fixed 30 s to register; a second try then succeeds. A run must not fail for that.
    """
    import ray

    if ray.is_initialized():
        return
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**init_args)
            return
        except Exception as error:  # noqa: BLE001 - Ray raises a bare Exception on a startup timeout
            ray.shutdown()
            if attempt == attempts:
                raise RuntimeError(f"Ray did not start in {attempts} attempts: {error}") from None
            log.warning("Ray did not start (%s); trying again", str(error).splitlines()[0])
            time.sleep(5 * attempt)


def simulate(
    cfg: RunConfig,
    resume: bool = False,
    ray_address: str | None = None,
    cpus_per_client: float = 1.0,
    verbose: bool = False,
) -> dict:
    """Run the job to completion and return its report (also written to `cfg.out/report.json`)."""
    if importlib.util.find_spec("ray") is None:
        raise RuntimeError("local simulation needs Ray: pip install 'geomoe[simulation]' (device images leave it out)")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    world, _, _ = World.cached(cfg.world, Path(cfg.cache) if cfg.cache else Path(cfg.out) / "cache")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per virtual client: Ray runs them side by side
    # Ray's future default (leave CUDA_VISIBLE_DEVICES alone at num_gpus=0); setting it silences its FutureWarning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    init_args: dict = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    if ray_address:
        init_args["address"] = ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    start_ray(init_args)  # Flower's backend uses a running Ray as it finds it
    try:
        run_simulation(
            server_app=make_server_app(cfg, resume),
            client_app=client_app,
            num_supernodes=len(world.locations),
            backend_config={
                "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                "init_args": init_args,
            },
            verbose_logging=verbose,
        )
    finally:
        import ray

        ray.shutdown()  # also when the run failed: the next run in this process starts a fresh Ray
    report_path = Path(cfg.out) / REPORT
    if not report_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {report_path}; rerun with --verbose to see why")
    return json.loads(report_path.read_text())
