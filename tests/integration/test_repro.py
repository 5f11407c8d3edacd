"""`geomoe repro` on files in the published formats (iNat 2017 + a Hsu et al. split, written by `geomoe data
export`), at small scale: the papers' settings with fewer experts and images."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from geomoe.cli.main import app
from geomoe.world.export import export_world

from .conftest import SMALL_RUN, small_config

pytestmark = pytest.mark.integration


def test_repro_writes_the_papers_table_for_every_cell(tmp_path, model_cache):
    cfg = small_config(tmp_path / "run", model_cache)
    export_world(cfg.world, "hsu", tmp_path / "files")
    small = ["federation.rounds=1", "federation.pretrain_epochs=1", 'world.clients="locations"']
    overrides = [*SMALL_RUN, *small, f'cache="{tmp_path / "cache"}"']
    files = tmp_path / "files"
    args = ["repro", "--inat", str(files), "--train-split", str(files / "federated_train_geo.csv"),
            "--test-split", str(files / "test.csv"), "--out", str(tmp_path / "repro")]  # fmt: skip
    result = CliRunner().invoke(app, [*args, *(a for item in overrides for a in ("--set", item))])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    table = (tmp_path / "repro" / "repro.md").read_text().splitlines()
    compared = json.loads((tmp_path / "repro" / "repro.json").read_text())
    assert len(compared["cells"]) == 3 and len(table) == 2 + 3 * 3
    for row in compared["cells"]:
        dense, moe, pruned = row["models"]
        assert [m["model"] for m in row["models"]] == ["dense", "moe", "pruned"]
        assert pruned["parameters"] < moe["parameters"] and pruned["mflops"] <= moe["mflops"]
        assert all(0.0 <= m["accuracy"] <= 1.0 for m in row["models"])
    assert compared["settings"][0] == 'world.dataset="hsu"'
    run_toml = (tmp_path / "repro" / "flower" / "run.toml").read_text()
    assert '"bottleneck"' in run_toml and "gate_rank = 8" in run_toml
