import os
import subprocess
import sys

import pytest
import torch

from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet, layer_widths, transformer_layers


def test_nine_transformer_layers_in_three_blocks():
    model = GeoMoENet(ModelConfig(num_classes=5, moe_layers=()))
    assert len(transformer_layers(model.backbone)) == 9
    assert layer_widths(model.backbone) == [64, 64, 96, 96, 96, 96, 128, 128, 128]
    assert model.blocks == [0, 0, 1, 1, 1, 1, 2, 2, 2]


def test_moe_layers_replace_the_chosen_mlps_and_capture_pre_mlp_tokens():
    model = GeoMoENet(ModelConfig(num_classes=5, moe_layers=(0, 8), num_experts=4))
    assert sorted(model.moe_layers()) == [0, 8]
    logits, pre_mlp = model.forward_with_pre_mlp(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 5) and sorted(pre_mlp) == list(range(9))
    assert pre_mlp[0].shape[:2] == (2, 64) and pre_mlp[8].shape[:2] == (2, 128)


def test_bottleneck_head():
    model = GeoMoENet(ModelConfig(num_classes=7, head="bottleneck"))
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 7)
    assert model.head.body[0].out_features == 1024


def test_missing_pretrained_weights_say_what_to_do():
    code = (
        "from geomoe.model.config import ModelConfig\n"
        "from geomoe.model.network import GeoMoENet\n"
        "GeoMoENet(ModelConfig(pretrained=True))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-geomoe-test"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert (
        result.returncode != 0 and "pretrained weights of mobilevitv2_050 are not in the local cache" in result.stderr
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_weights_from_a_local_file(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    source = timm.create_model("mobilevitv2_050", num_classes=1000)  # timm's own files carry the classifier
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = GeoMoENet(ModelConfig(num_classes=7, moe_layers=(), pretrained_file=str(path)))
    torch.testing.assert_close(model.backbone.stem.conv.weight, source.stem.conv.weight, rtol=0, atol=0)


def test_a_weights_file_that_is_missing_or_does_not_fit_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.pretrained_file: .*absent.pth: no such file"):
        GeoMoENet(ModelConfig(pretrained_file=str(tmp_path / "absent.pth")))
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    with pytest.raises(ValueError, match=r"resnet.pth does not fit the backbone mobilevitv2_050: .*Missing key"):
        GeoMoENet(ModelConfig(pretrained_file=str(other)))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00 not weights")
    with pytest.raises(ValueError, match=r"junk.pth cannot be read as weights"):
        GeoMoENet(ModelConfig(pretrained_file=str(junk)))
