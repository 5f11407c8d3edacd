"""Exports give the eager model's outputs on inputs other than the one they were traced with."""

import warnings

import pytest
import torch

from geomoe.camera.export import export_torchscript, load_torchscript
from geomoe.model.config import ModelConfig
from geomoe.model.experts import prune_model
from geomoe.model.network import GeoMoENet, prune_head
from tests.camera.species import species_labels


@pytest.mark.parametrize("policy", ["best_present", "remove"])
def test_torchscript_export_matches_the_eager_model(tmp_path, policy):
    torch.manual_seed(0)
    model = GeoMoENet(ModelConfig(num_classes=8, num_experts=6))
    model = prune_head(
        prune_model(model, {1: [0, 1], 3: [2, 3], 5: [4], 7: [5]}, absent_policy=policy), [1, 2, 5]
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a camera's log and the command line stay quiet
        path = export_torchscript(model, tmp_path / "m.ts", 64, species_labels(model))
        module, class_ids, image_size, labels = load_torchscript(path)
    assert class_ids == [1, 2, 5, -1] and image_size == 64
    assert labels.name_of(5) == "Testus species5" and labels.name_of(-1) is None and labels.model.startswith("geomoe")
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(module(images), model(images), rtol=1e-5, atol=1e-5)
    if policy == "remove":
        assert any((m.last_choice == -1).any() for m in model.moe_layers().values()), "no patch was removed"
