"""`geomoe sim`: the federated job on Flower's simulation runtime, the path `flwr run` takes.

A SuperLink in simulation mode starts on free loopback ports; `flwr run` submits the app to it with one virtual
SuperNode per client; the SuperLink's SuperExec starts `flwr-simulation`, which runs the ServerApp and the
ClientApps on Ray; the ServerApp writes `OUT/report.json`. The world (dataset, partition, clients) is built and
written to its world file first, so bad data fails fast and the number of clients is known. Everything Flower
and Ray print goes to `OUT/flower/`, shown only with `verbose`; the run's own progress is streamed from it.
Set `ray_address` to run the clients on an existing Ray cluster.

Longer than 300 lines because the processes it starts (SuperLink, `flwr run`, Ray) and their teardown belong
together: whatever starts one must be seen to stop it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from geomoe.server.federation import REPORT
from geomoe.server.server_app import SERVER_THREADS
from geomoe.wire.run_config import RunConfig, to_toml
from geomoe.world.world import World

log = logging.getLogger("geomoe.simulation")
CONNECTION = "geomoe-sim"
RAY_ATTEMPTS = 3
STARTUP_TIMEOUT_S = 60.0
SERVER_APP = "geomoe.server.server_app:app"
CLIENT_APP = "geomoe.client.client_app:app"
# The app's manifest: the FAB carries no code, the apps are the installed geomoe package.
APP_MANIFEST = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "geomoe-sim"
version = "0.1.0"
description = "geomoe's ServerApp and ClientApp, as installed"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "geomoe"

[tool.flwr.app.components]
serverapp = "{server_app}"
clientapp = "{client_app}"

[tool.flwr.app.config]
config = ""
resume = false
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_bin(name: str) -> str:
    """A Flower executable of this environment (next to its Python), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: install flwr[simulation] (pip install 'geomoe[simulation]')")
    return found


class LocalSuperLink:
    """A SuperLink in simulation mode on 127.0.0.1, owned by this process: started, waited for, stopped."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.port = free_port()
        self.log = folder / "superlink.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LocalSuperLink:
        command = [
            flower_bin("flower-superlink"),
            "--insecure",
            "--simulation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        with self.log.open("w") as log:
            # In this process's group: a kill of `geomoe sim` (even SIGKILL of the group) takes the SuperLink down.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the SuperLink exited at start: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"the SuperLink did not start in {STARTUP_TIMEOUT_S:.0f} s; see {self.log}")

    def __exit__(self, *_: object) -> None:
        """Stop the SuperLink; what it started (SuperExec, flwr-simulation with Ray) watches its parent and follows."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass(frozen=True)
class ClientResources:
    """What Ray reserves for each virtual client. A fractional `gpus` lets clients share a GPU: 0.25 runs four
    clients on each GPU at once; 0 keeps them on the CPU (Ray then hides the GPUs from them)."""

    cpus: int = 1
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.cpus < 1:
            raise ValueError(f"--cpus-per-client must be >= 1, got {self.cpus}")
        if self.gpus < 0 or (self.gpus > 1 and not float(self.gpus).is_integer()):
            raise ValueError(f"--gpus-per-client must be a share of one GPU (0..1) or a whole number, got {self.gpus}")

    @classmethod
    def default(cls) -> ClientResources:
        """One CPU each and, on a machine with a GPU, a fifth of it (five clients train on it at once)."""
        return cls(gpus=DEFAULT_GPU_SHARE if visible_gpus() else 0.0)


DEFAULT_GPU_SHARE = 0.2


def visible_gpus() -> int:
    """CUDA devices this process sees (torch is imported only to ask)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def federation_options(clients: int, resources: ClientResources, ray_address: str | None, verbose: bool) -> list[str]:
    """`--federation-config` of the run: virtual SuperNodes, their resources, Ray's start-up."""
    options = {
        "num-supernodes": clients,
        "client-resources-num-cpus": resources.cpus,
        "client-resources-num-gpus": resources.gpus,
        "init-args-log-to-driver": verbose,
        "init-args-logging-level": "info" if verbose else "warning",
        "verbose": verbose,
    }
    if not ray_address:  # on a cluster Ray sizes itself; naming CPUs there is an error
        options["init-args-num-cpus"] = os.cpu_count() or 1
    return [f"{key}={json.dumps(value)}" for key, value in options.items()]


def simulate(
    cfg: RunConfig,
    resume: bool = False,
    ray_address: str | None = None,
    resources: ClientResources | None = None,
    verbose: bool = False,
    client_app: str = CLIENT_APP,
) -> dict:
    """Run the job to completion and return its report (also written to `cfg.out/report.json`). `resources`
    (default: `ClientResources.default()`) is what each virtual client reserves; `client_app` names another
    ClientApp object to run on the virtual nodes (benchmarks run hostile ones)."""
    if importlib.util.find_spec("ray") is None:
        raise RuntimeError("local simulation needs Ray: pip install 'geomoe[simulation]' (device images leave it out)")
    gpus_here = visible_gpus()
    resources = resources or ClientResources.default()
    if resources.gpus > 0 and not ray_address and not gpus_here:
        raise ValueError(f"--gpus-per-client {resources.gpus} but this machine has no CUDA device (Ray would wait "
                         "for one forever); use 0, or --ray-address for a cluster with GPUs")  # fmt: skip
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    world, _, _ = World.cached(cfg.world, cfg.cache_dir)  # before Ray starts
    flower = out / "flower"
    app = flower / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(APP_MANIFEST.format(server_app=SERVER_APP, client_app=client_app))
    config_file = flower / "run.toml"
    cache = cfg.cache_dir.resolve()
    config_file.write_text(to_toml(replace(cfg, out=str(out), cache=str(cache))))
    (out / REPORT).unlink(missing_ok=True)
    env = {
        **os.environ,
        # The SuperLink starts SuperExec and flwr-simulation by name: this environment's, before any other.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flower / "home"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # one thread per virtual client
        SERVER_THREADS: os.environ.get(SERVER_THREADS, str(os.cpu_count() or 1)),  # the server's work: every core
        # glibc gives every thread of a Ray worker its own malloc arena; a long-lived actor building a model per
        # message then holds memory it freed long ago. Two arenas keep an actor near what it uses.
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),
        # At num_gpus=0 Ray hides the GPUs from a client only with this on ("1"): clients asked to stay on the CPU
        # must not take the GPU the ServerApp trains on. Without a GPU there is nothing to hide, and "0" (Ray's
        # future default) silences its warning about the change.
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1" if resources.gpus == 0 and gpus_here else "0",
        # The ServerApp's tables are drawn as wide as this console (rich reads COLUMNS), not 80 columns.
        "COLUMNS": str(shutil.get_terminal_size((140, 24)).columns),
        "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "default" if verbose else "ignore"),
    }
    # Without an address, a Ray of the run's own: Ray would otherwise join the cluster of the last `ray start` on
    # this machine (its address stays in /tmp/ray after the cluster is gone) and refuse the run's CPU count.
    env["RAY_ADDRESS"] = ray_address or "local"
    options = federation_options(len(world.locations), resources, ray_address, verbose)
    for attempt in range(1, RAY_ATTEMPTS + 1):
        try:
            with _terminate_as_interrupt():
                _run_on_local_superlink(flower, env, app, config_file, resume, options, verbose)
            break
        except RuntimeError as error:
            link_log = flower / "superlink.log"
            failure = f"{error}\n{link_log.read_text()[-5000:] if link_log.is_file() else ''}"
            if attempt == RAY_ATTEMPTS or not RAY_START_FAILURE.search(failure) or (out / REPORT).is_file():
                raise
            # A loaded small machine (or one whose previous Ray is still going down) can take longer than Ray's
            # fixed start-up timeout; the next try succeeds. A run must not fail for that.
            log.warning("Ray did not start (attempt %d of %d); trying again", attempt, RAY_ATTEMPTS)
            time.sleep(5 * attempt)
    report_path = out / REPORT
    if not report_path.is_file():
        raise RuntimeError(
            f"the simulation ended without writing {report_path}; see {flower}/flwr-run.log and superlink.log"
        )
    return json.loads(report_path.read_text())


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill PID`, a job scheduler) unwinds like Ctrl-C: `flwr run` and the SuperLink are stopped on the
    way out instead of outliving this process (the default SIGTERM exits without running any cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


FLOWER_LOG_LINE = re.compile(r"^(\x1b\[\d+m)?(INFO|WARNING|DEBUG)\s*(\x1b\[0m)?\s*:")
FLWR_STATUS = ("Using SuperLink:", "Successfully started run", "Successfully installed", "Flower App configuration")
RAY_START_FAILURE = re.compile(r"(?i)raylet|\bGCS\b|timed out during startup")


def shown(line: str, verbose: bool) -> bool:
    """Whether a line of `flwr run --stream` reaches the console: the run's own output (phases, rounds, the
    summary table) and errors always; Flower's INFO/WARNING log lines and its CLI's status lines only with
    `verbose`."""
    if verbose:
        return True
    return not (FLOWER_LOG_LINE.match(line) or line.startswith(FLWR_STATUS) or line.startswith("- Recommended"))


def _run_on_local_superlink(
    flower: Path, env: dict[str, str], app: Path, config_file: Path, resume: bool, options: list[str], verbose: bool
) -> None:
    """Start a SuperLink, submit the run with `flwr run`, stream it to its end, stop the SuperLink."""
    with LocalSuperLink(flower, env) as link:
        home = flower / "home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link.port}"\ninsecure = true\n'
        )
        run_config = f'config="{config_file}" resume={str(resume).lower()}'
        command = [flower_bin("flwr"), "run", str(app), CONNECTION, "--run-config", run_config, "--stream"]
        for option in options:
            command += ["--federation-config", option]
        _run_streaming(command, env, flower / "flwr-run.log", verbose)


def _run_streaming(command: list[str], env: dict[str, str], log: Path, verbose: bool) -> None:
    """Run `flwr run ... --stream` to its end; its output goes to `log`, and what `shown` lets through to the
    console."""
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)

        def copy() -> None:
            for line in process.stdout:
                sink.write(line)
                sink.flush()
                if shown(line, verbose):
                    sys.stderr.write(line)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            process.wait()
        except KeyboardInterrupt:
            process.terminate()
            raise
        finally:
            reader.join(timeout=5)
    if process.returncode != 0:
        raise RuntimeError(f"flwr run failed (exit {process.returncode}): {log.read_text()[-1500:]}")
