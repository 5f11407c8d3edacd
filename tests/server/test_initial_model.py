"""The server's pretraining and conversion on a GPU give a CPU model with the same layout (skipped without one)."""

import pytest
import torch

from geomoe.model.compute import model_device
from geomoe.server.initial_model import initial_model
from geomoe.wire.run_config import build_run_config
from geomoe.world.world import World


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pretraining_and_conversion_run_on_the_gpu_and_hand_back_a_cpu_model(tmp_path):
    cfg = build_run_config(
        None, {}, ["world.synthetic.num_observations=1500", "world.num_locations=3", "model.num_experts=4",
                   "federation.pretrain_epochs=2", 'train.device="cuda"', 'train.precision="bf16"',
                   'model.routing="image"'],
    )  # fmt: skip
    model, metrics = initial_model(cfg, World(cfg.world), tmp_path)
    assert model_device(model) == torch.device("cpu")
    assert all(module.num_held == 4 for module in model.moe_layers().values())
    assert 0 < metrics["dense_accuracy"] <= 1 and 0 < metrics["converted_accuracy"] <= 1
    assert len(metrics["superclasses"]) == cfg.model.num_classes
