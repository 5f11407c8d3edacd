"""The ServerApp leaves a failed run's traceback in the run's folder, where `flwr run --stream` is not listening."""

import pytest
from flwr.app import Context, RecordDict

from geomoe.server import server_app


class FailingFederation:
    def __init__(self, grid, cfg, resume):
        pass

    def run(self):
        raise RuntimeError("the grid went away")


def test_a_failed_run_leaves_its_traceback_in_the_runs_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(server_app, "Federation", FailingFederation)
    run_config = {"out": str(tmp_path / "run"), "federation.rounds": 1}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(RuntimeError, match="the grid went away"):
        server_app.main(None, context)
    error = (tmp_path / "run" / server_app.SERVER_ERROR).read_text()
    assert "RuntimeError: the grid went away" in error and "Traceback" in error
