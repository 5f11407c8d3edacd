"""`geomoe experts graph|affinity|sweep` on a small finished run: figures written, JSON values as stated."""

import json

import pytest
import torch
from typer.testing import CliRunner

from geomoe.cli.main import app
from geomoe.model.network import GeoMoENet
from geomoe.server.checkpoint import save_model
from geomoe.wire.run_config import build_run_config
from geomoe.world.world import World

SMALL = ["world.synthetic.num_observations=1200", "world.num_locations=3", "world.n_max=300",
         "model.num_experts=6", "model.moe_layers=[1, 3, 5]"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    cfg = build_run_config(None, {}, [*SMALL, f'out="{folder}"', f'cache="{folder / "cache"}"'])
    torch.manual_seed(0)
    save_model(GeoMoENet(cfg.model).eval(), folder / "checkpoint.pt", run_config=cfg.to_json())
    return folder


@pytest.fixture(scope="module")
def cell(run_dir):
    cfg = build_run_config(None, {}, SMALL)
    return World(cfg.world).locations[0].cell


def invoke(*args):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_graph_edge_shares_of_each_layer_pair_sum_to_one(run_dir, cell):
    invoke("experts", "graph", "--run", str(run_dir), "--cell", cell)
    stem = run_dir / "figures" / f"graph-{cell.replace('/', '_')}"
    graph = json.loads(stem.with_suffix(".json").read_text())
    assert [(p["from_layer"], p["to_layer"]) for p in graph["pairs"]] == [(1, 3), (3, 5)]
    for pair in graph["pairs"]:
        assert sum(e["share"] for e in pair["edges"]) == pytest.approx(1.0)
        for edge in pair["edges"]:
            expected = "above 99.9th" if edge["share"] >= pair["p99_9"] else (
                "90th to 99.9th" if edge["share"] >= pair["p90"] else "below 90th")  # fmt: skip
            assert edge["band"] == expected
    assert stem.with_suffix(".png").stat().st_size > 5000


def test_sweep_drops_more_experts_as_the_percentile_rises(run_dir, cell):
    output = invoke("experts", "sweep", "--run", str(run_dir), "--cell", cell, "--percentiles", "0,50,90,99.9")
    sweep = json.loads((run_dir / "figures" / f"sweep-{cell.replace('/', '_')}.json").read_text())
    dropped = [row["experts_dropped"] for row in sweep["rows"]]
    assert dropped == sorted(dropped) and dropped[-1] > dropped[0] and sweep["experts_total"] == 18
    for row in sweep["rows"]:
        assert row["experts_kept"] + row["experts_dropped"] == 18
        assert set(row["accuracy"]) == {"best_present", "remove"}
        assert all(0 <= a <= 1 for a in row["accuracy"].values())
    assert "99.9" in output and (run_dir / "figures" / f"sweep-{cell.replace('/', '_')}.png").is_file()


def test_affinity_rows_are_distributions_over_the_cells(run_dir):
    invoke("experts", "affinity", "--run", str(run_dir), "--epochs", "1")
    result = json.loads((run_dir / "figures" / "affinity.json").read_text())
    assert result["layer"] == 5 and len(result["cells"]) == 3 and result["temperature"] == 0.001
    assert len(result["class_cell"]) == len(result["classes"]) > 1
    assert len(result["expert_cell"]) == 6
    for row in result["class_cell"] + result["expert_cell"]:
        assert len(row) == 3 and sum(row) == pytest.approx(1.0)
    assert (run_dir / "figures" / "affinity.png").stat().st_size > 5000


def test_an_unknown_cell_is_named(run_dir):
    result = CliRunner().invoke(app, ["experts", "sweep", "--run", str(run_dir), "--cell", "9/9"])
    assert "cell '9/9' is not a location of this run (" in str(result.exception)  # main() prints it in one line
