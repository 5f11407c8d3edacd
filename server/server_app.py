"""The Flower ServerApp. `flwr run` passes the run config ([tool.flwr.app.config] of the app's pyproject.toml:
`config` names a TOML file, dotted keys such as `federation.rounds` override it, `resume` continues a killed
run from its checkpoint); `geomoe sim` takes the same path. A run that fails leaves its traceback in the run's
folder (`server-error.txt`): Flower streams it only to a `flwr run --stream` that is still listening."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from geomoe.data.atomic_file import atomic_write
from geomoe.server.federation import Federation, summary_table
from geomoe.wire.run_config import from_flat

app = ServerApp()
SERVER_ERROR = "server-error.txt"  # in the run's folder: the traceback of a run that failed
SERVER_THREADS = "GEOMOE_SERVER_THREADS"  # threads of the server's own torch work, where the environment pins fewer


@app.main()
def main(grid: Grid, context: Context) -> None:
    if SERVER_THREADS in os.environ:
        # `geomoe sim` runs every process with one thread (a virtual client per core); the server's pretraining
        # and evaluation run while the clients wait, and take all the cores.
        torch.set_num_threads(int(os.environ[SERVER_THREADS]))
    values = dict(context.run_config)
    resume = values.pop("resume", False)
    if not isinstance(resume, bool):
        raise ValueError(f"run config resume={resume!r} must be true or false")
    cfg = from_flat(values)
    try:
        report = Federation(grid, cfg, resume=resume).run()
    except BaseException:
        atomic_write(Path(cfg.out) / SERVER_ERROR, traceback.format_exc().encode())
        raise
    Console(stderr=True).print(summary_table(report))
