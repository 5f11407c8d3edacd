"""`bench privacy`: the run matrix, its summary and figure (runner replaced), and the hostile node's mod."""

import json

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from geomoe.bench.hostile import corrupting
from geomoe.wire import messages as msg
from geomoe.wire.run_config import RunConfig


def fake_report(accuracy: float, epsilon=None, nodes: int = 6) -> dict:
    rounds = [{"round": 1, "clip_norm": 0.8, "epsilon": epsilon}]
    return {
        "locations": [{"cell": f"{k}/"} for k in range(nodes)],
        "rounds": rounds,
        "evaluations": {"0": {"accuracy": 0.1}, "1": {"accuracy": accuracy, "server_accuracy": accuracy / 2}},
        "final_accuracy": accuracy,
        "privacy": {"epsilon": epsilon, "delta": 1e-5},
        "rejected": [],
    }


def test_bench_privacy_runs_the_matrix_on_one_cache_and_writes_json_and_plot(tmp_path, monkeypatch):
    from geomoe.bench.privacy import bench_privacy
    from geomoe.sim import simulation

    seen = {}

    def fake_simulate(cfg, client_app=simulation.CLIENT_APP):
        name = cfg.out.rsplit("/", 1)[-1]
        seen[name] = (cfg, client_app)
        z = cfg.privacy.noise_multiplier
        return fake_report(0.5 - z if z else (0.2 if "scaled-mean" in name else 0.5), epsilon=1 / z if z else None)

    monkeypatch.setattr(simulation, "simulate", fake_simulate)
    result = bench_privacy(tmp_path, RunConfig(), (0.1, 1.0), ("scaled",), ("mean", "median"), announce=lambda _: 0)
    assert sorted(seen) == ["dp-z0.1", "dp-z1", "honest-median", "plain", "scaled-mean", "scaled-median"]
    assert {cfg.cache for cfg, _ in seen.values()} == {str(tmp_path / "cache")}
    assert seen["scaled-median"][1] == "geomoe.bench.hostile:scaled" and seen["plain"][1] == simulation.CLIENT_APP
    assert seen["scaled-median"][0].federation.aggregator == "median"
    private = seen["dp-z1"][0].privacy
    assert (private.noise_multiplier, private.adaptive_clip, private.clip_norm > 0) == (1.0, True, True)
    assert [row["epsilon"] for row in result["dp"]] == [10.0, 1.0]
    assert [row["final_server_accuracy"] for row in result["dp"]] == [0.2, pytest.approx(-0.25)]
    assert result["no_dp_server_accuracy"] == 0.25
    assert result["robustness"] == {"honest": {"mean": 0.5, "median": 0.5}, "scaled": {"mean": 0.2, "median": 0.5}}
    assert json.loads((tmp_path / "bench_privacy.json").read_text()) == result
    assert (tmp_path / "bench_privacy.png").stat().st_size > 10_000


def test_a_dp_only_run_draws_one_panel(tmp_path, monkeypatch):
    """Without attacks or other aggregators there is nothing to compare on the right: the figure is the DP curve."""
    from PIL import Image

    from geomoe.bench.privacy import bench_privacy
    from geomoe.sim import simulation

    def fake_simulate(cfg, client_app=simulation.CLIENT_APP):
        z = cfg.privacy.noise_multiplier
        return fake_report(0.5 - z, epsilon=1 / z if z else None, nodes=300)

    monkeypatch.setattr(simulation, "simulate", fake_simulate)
    result = bench_privacy(tmp_path, RunConfig(), (0.3,), (), ("mean",), announce=lambda _: 0)
    assert result["robustness"] == {"honest": {"mean": 0.5}} and result["nodes"] == 300
    with Image.open(tmp_path / "bench_privacy.png") as figure:
        assert figure.width < figure.height * 2, "one panel, not two side by side"


def test_unknown_attacks_and_aggregators_are_named():
    from geomoe.bench.privacy import privacy_runs

    with pytest.raises(ValueError, match="unknown attack 'gaussian'"):
        privacy_runs((), ("gaussian",), ("mean",))
    with pytest.raises(ValueError, match="unknown aggregator 'krum'"):
        privacy_runs((), (), ("krum",))


@pytest.mark.parametrize(("partition", "kind", "factor"), [(0, "train", -4.0), (1, "train", 1.0), (0, "query", 1.0)])
def test_only_partition_0s_training_update_is_corrupted(task_identity, partition, kind, factor):
    cfg = RunConfig()
    cfg.federation.upload_compression = "int8+zstd"
    content = RecordDict({msg.CONFIG: ConfigRecord({"run": cfg.to_json()})})
    message = Message(content, dst_node_id=1, message_type=kind)
    update = {"moe.1.w1": torch.linspace(-1, 1, 64).reshape(2, 32), "moe.1.ids": torch.tensor([0, 3])}

    def honest(message, context):
        reply = RecordDict({msg.METRICS: MetricRecord({"examples": 1.0})})
        msg.pack(reply, msg.UPDATE, update, "int8+zstd")
        return Message(reply, reply_to=message)

    context = Context(run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(), run_config={})
    reply = corrupting(-4.0)(message, context, honest)
    sent = msg.unpack(reply.content, msg.UPDATE, 1 << 30)
    torch.testing.assert_close(sent["moe.1.w1"], update["moe.1.w1"] * factor, atol=0.05, rtol=0)
    assert sent["moe.1.ids"].tolist() == [0, 3]
