"""The Flower ServerApp. `flwr run .` reads the run config from pyproject.toml
([tool.flwr.app.config], dotted keys such as `federation.rounds`); `geomoe sim` builds its own."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from geomoe.server.federation import Federation, summary_table
from geomoe.wire.run_config import RunConfig, from_flat


def make_server_app(cfg: RunConfig | None = None, resume: bool = False) -> ServerApp:
    """A ServerApp running `cfg`, or, when None, the config Flower passes in the context."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        report = Federation(grid, cfg or from_flat(context.run_config), resume=resume).run()
        if cfg is None:  # under `flwr run`; `geomoe sim` prints the table itself
            Console(stderr=True).print(summary_table(report))

    return server_app


app = make_server_app()
