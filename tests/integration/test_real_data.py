"""`geomoe sim` on files in the published formats (written by `geomoe data export`), end to end."""

from __future__ import annotations

import pytest
import torch

from geomoe.sim.simulation import simulate
from geomoe.wire.privacy import PrivacyConfig
from geomoe.wire.run_config import set_override
from geomoe.world.export import export_world

from .conftest import small_config

pytestmark = pytest.mark.integration


def on_files(cfg, dataset: str, out, summary: dict):
    """`cfg` pointed at exported files, as a user with the real ones would."""
    cfg = set_override(cfg, "world.dataset", f'"{dataset}"')
    cfg = set_override(cfg, "world.files.root", f'"{out / summary["root"]}"')
    cfg = set_override(cfg, "world.files.annotations", f'["{out / summary["annotations"]}"]')
    cfg = set_override(cfg, "world.files.locations", f'["{out / summary["locations"]}"]')
    for key in ("train_split", "test_split"):
        if key in summary:
            cfg = set_override(cfg, f"world.files.{key}", f'"{out / summary[key]}"')
    return cfg


def test_a_per_expert_run_on_published_format_files_learns_under_dp_and_uploads_little(tmp_path):
    """Hsu et al.'s split over iNat 2017 files (the inat2017 reader underneath; the every-cell test below runs the
    inat2017 files alone), on Flower's simulation runtime, under client-level DP (clipped on the nodes, noised on
    the server: a negligible noise here, so that learning shows in two rounds)."""
    cfg = small_config(tmp_path / "run", tmp_path / "cache", rounds=2)
    summary = export_world(cfg.world, "hsu", tmp_path / "files")
    cfg = on_files(cfg, "hsu", tmp_path / "files", summary)
    cfg.privacy = PrivacyConfig(clip_norm=1.0, noise_multiplier=0.001)
    report = simulate(cfg)
    evaluations = report["evaluations"]
    assert evaluations["2"]["accuracy"] > evaluations["0"]["accuracy"] > 1 / 24
    assert [row["replies"] for row in report["rounds"]] == [3, 3]
    assert all(loc["source"].startswith("cell ") for loc in report["locations"])
    assert report["config"]["world"]["dataset"] == "hsu"
    assert report["privacy"]["epsilon"] == report["rounds"][-1]["epsilon"] > report["rounds"][0]["epsilon"] > 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model_state"]
    dense_bytes = sum(v.numel() * 4 for v in state.values() if v.is_floating_point())
    assert all(t["up"] < 0.1 * dense_bytes for row in report["rounds"] for t in row["traffic"].values())


def test_every_cell_a_client_with_k_sampled_per_round(tmp_path):
    cfg = small_config(tmp_path / "run", tmp_path / "cache", rounds=3)
    for key, value in {
        "world.synthetic.num_observations": "8000",
        "world.n_max": "15",
        "world.min_examples": "12",
        "world.server_fraction": "0.1",
        "world.clients": '"cells"',
        "federation.clients_per_round": "10",
        "federation.pretrain_epochs": "1",
    }.items():
        cfg = set_override(cfg, key, value)
    summary = export_world(cfg.world, "inat2017", tmp_path / "files")
    cfg = on_files(cfg, "inat2017", tmp_path / "files", summary)
    report = simulate(cfg)
    assert len(report["locations"]) >= 200  # every node answered the query
    assert [row["replies"] for row in report["rounds"]] == [10, 10, 10]
    sampled = [row["sampled"] for row in report["rounds"]]
    assert all(len(set(s)) == 10 for s in sampled) and sampled[0] != sampled[1]
    held = {loc["cell"] for loc in report["locations"] if loc["keep"] is not None}
    assert held == {cell for s in sampled for cell in s}  # only sampled cells routed the full model
    assert report["final_accuracy"] is not None
