"""The `geomoe` command line. Every command builds its config once and passes it down.

Errors print one line and exit non-zero; `geomoe --debug ...` shows the traceback.
"""

from __future__ import annotations

import typer

from geomoe.cli import bench, comm, data, deploy, device, expert_server, experts, figures, model, repro, sim
from geomoe.cli.options import run_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
app.command()(sim.sim)
app.command()(data.partition)
app.command()(experts.prune)
app.command()(repro.repro)
for name, command in figures.COMMANDS.items():
    experts.app.command(name)(command)
for name, group in (
    ("model", model.app),
    ("experts", experts.app),
    ("comm", comm.app),
    ("deploy", deploy.app),
    ("device", device.app),
    ("expert-server", expert_server.app),
    ("bench", bench.app),
    ("data", data.app),
):
    app.add_typer(group, name=name)
_debug = {"on": False}


@app.callback()
def root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    """geomoe: federated geographic mixture-of-experts species recognition for camera traps."""
    _debug["on"] = debug


def main() -> None:
    """Console entry point: one-line errors unless --debug."""
    run_app(app, lambda: _debug["on"])
