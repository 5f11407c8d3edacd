import pytest
import torch

from tests.analysis.test_comm_report import report


def test_bench_comm_runs_the_three_variants_on_one_cache_and_seed(tmp_path, monkeypatch):
    """The matrix alone: the simulation runner is replaced by one that records each run's config (the runs
    themselves are covered by the simulation tests)."""
    import json

    from geomoe.bench import comm as bench
    from geomoe.sim import simulation

    seen = []

    def fake_simulate(cfg):
        seen.append(cfg)
        return report([100, 100] if cfg.federation.strategy == "fedavg" else [5, 5], [0.1, 0.2, 0.3])

    monkeypatch.setattr(simulation, "simulate", fake_simulate)
    result = bench.bench_comm(tmp_path, rounds=2, compressed="int8c+zstd", seed=3, announce=lambda _: None)
    assert [(c.federation.strategy, c.federation.trainable, c.federation.upload_compression, c.train.prox_mu)
            for c in seen] == [
        ("fedavg", "all", "none", 0.0),
        ("fedavg", "experts+head", "none", 0.0),
        ("fedavg", "experts+head", "none", 0.01),
        ("expert", "experts+head", "none", 0.0),
        ("expert", "experts+head", "int8c+zstd", 0.0),
    ]  # fmt: skip
    assert {c.cache for c in seen} == {str(tmp_path / "cache")} and {c.seed for c in seen} == {3}
    assert {c.federation.rounds for c in seen} == {2}
    assert result["upload_ratio_to_fedavg"]["expert-compressed"] == 0.05
    assert result["upload_ratio_to_fedavg_parts"]["expert"] == 0.05
    assert json.loads((tmp_path / "bench_comm.json").read_text())["compressed_pipeline"] == "int8c+zstd"


def test_model_ratio_is_the_median_over_pairs_with_its_spread():
    from geomoe.bench.model import pair_ratios

    ratios = pair_ratios([1.0, 1.0, 2.0, 1.0, 1.0], [1.0, 0.9, 4.0, 1.1, 0.8])
    assert ratios["median"] == 1.0 and ratios["min"] == 0.8 and ratios["max"] == 2.0
    assert ratios["p10"] < ratios["median"] < ratios["p90"]


def test_bench_device_times_every_model_under_both_runtimes(tmp_path, ops_built):
    """Small sizes, on one thread: the JSON has both runtimes per model, and the pruned model is the smallest;
    the process keeps its own thread count."""
    from geomoe.bench.device import bench_device

    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    threads = torch.get_num_threads()
    result = bench_device(tmp_path, image_size=64, repeats=2, num_classes=50, num_experts=8, keep_per_layer=2,
                          species=5, threads=1)  # fmt: skip
    assert result["threads"] == 1 and torch.get_num_threads() == threads
    assert set(result["models"]) == {"dense", "moe", "pruned", "pruned-all", "mlp-free"}
    for row in result["models"].values():
        assert row["torchscript_ms"] > 0 and row["onnx_ms"] > 0
    assert [name for name, row in result["models"].items() if "onnx_fused_ms" in row] == ["moe", "pruned", "pruned-all"]
    assert all(result["models"][name]["onnx_fused_ms"] > 0 for name in ("moe", "pruned", "pruned-all"))
    assert result["over_dense"]["pruned-all"]["onnx_fused_latency"]["median"] > 0
    assert result["models"]["pruned"]["parameters"] < result["models"]["moe"]["parameters"]
    flops = {name: row["flops"] for name, row in result["models"].items()}
    assert flops["mlp-free"] < flops["pruned-all"] < flops["pruned"] < flops["dense"]
    ratios = result["over_dense"]
    assert 0 < ratios["pruned-all"]["parameters"] < ratios["pruned"]["parameters"] < 1  # fewer dense MLPs left
    layers = result["layers"]  # the first layer of each transformer block, dense MLP branch and MoE layer alone
    assert list(layers) == ["0", "2", "6"]
    assert [row["channels"] for row in layers.values()] == [64, 96, 128]
    assert [row["pixels"] for row in layers.values()] == [(64 // 8) ** 2, (64 // 16) ** 2, (64 // 32) ** 2]  # strides
    for row in layers.values():
        assert row["dense_us"] > 0 and row["moe_us"] > 0 and row["moe_over_dense"]["median"] > 0
        assert row["fused_us"] > 0 and row["fused_over_dense"]["median"] > 0
