import pytest
import torch

from geomoe.model.config import ModelConfig
from geomoe.model.counting import expert_bytes, parameter_count, size_comparison, tokens_per_patch
from geomoe.model.moe_layer import EXPERT_PARAMS
from geomoe.model.network import GeoMoENet

SMALL = ModelConfig(num_classes=10, moe_layers=(1, 3), num_experts=4)


def test_expert_bytes_follow_the_dtype_the_model_holds():
    model = GeoMoENet(SMALL)
    per_layer = {layer: sum(getattr(m, p)[0].numel() for p in EXPERT_PARAMS) for layer, m in model.moe_layers().items()}
    assert expert_bytes(model) == {layer: 4 * n for layer, n in per_layer.items()}
    assert expert_bytes(model.to(torch.float64)) == {layer: 8 * n for layer, n in per_layer.items()}


def test_a_patch_holds_the_same_pixel_tokens_at_any_image_size():
    model = GeoMoENet(SMALL)
    assert tokens_per_patch(model, 64) == tokens_per_patch(model, 128) == {1: 4, 3: 4}  # MobileViT's 2x2 patches


def test_size_comparison_orders_dense_moe_and_pruned():
    sizes = size_comparison(SMALL, keep=2, image_size=64)
    assert list(sizes) == ["dense", "moe", "pruned_2"]
    assert sizes["dense"]["expert_parameters"] == 0
    assert sizes["pruned_2"]["expert_parameters"] * 2 == sizes["moe"]["expert_parameters"]
    assert sizes["moe"]["parameters"] == parameter_count(GeoMoENet(SMALL))
    with pytest.raises(ValueError, match="keep must lie in 1..4"):
        size_comparison(SMALL, keep=5, image_size=64)
