"""The folded MoE layer computes what the training layer computes, for every routing and absent-expert policy."""

import pytest
import torch

from geomoe.model.config import ModelConfig
from geomoe.model.experts import prune_model
from geomoe.model.folded_moe import FoldedMoE, fold_for_inference
from geomoe.model.moe_layer import MoEMlp
from geomoe.model.network import GeoMoENet


def trained_like_layer(routing: str, policy: str, gate_rank: int | None) -> MoEMlp:
    """A layer holding 3 of 8 experts with every parameter away from its initial value, so that each folded term
    (scale, projection, temperature, affine, gamma, bias, correction) shows in the output if it is wrong."""
    torch.manual_seed(0)
    layer = MoEMlp(12, [1, 4, 6], 8, expert_hidden=3, gate_rank=gate_rank, absent_policy=policy, routing=routing)
    with torch.no_grad():
        for p in (layer.norm_weight, layer.norm_bias, layer.b1, layer.b2, layer.x_corr, layer.absent_centroids):
            p.normal_()
        layer.gamma.uniform_(0.2, 0.8)
        layer.scale_min.uniform_(-1.0, 0.0)
        layer.scale_max.uniform_(0.5, 2.0)
        layer.log_temperature.fill_(-1.0)
    return layer.eval()


@pytest.mark.parametrize("routing", ["patch", "image"])
@pytest.mark.parametrize("policy", ["best_present", "remove"])
@pytest.mark.parametrize("gate_rank", [None, 4])
def test_folded_layer_gives_the_training_layers_output(routing, policy, gate_rank):
    layer = trained_like_layer(routing, policy, gate_rank)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 12, 5, 7, generator=generator) + 3 * torch.randn(6, 12, 1, 1, generator=generator)  # far apart
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(FoldedMoE(layer)(x), expected, rtol=1e-5, atol=1e-5)
    choice = layer.last_choice
    assert len(choice.unique()) > 1, "one decision for every patch and image: routing went untested"
    if policy == "remove":
        assert (choice == -1).any() and (choice != -1).any(), "removal went untested"


def test_a_model_folded_for_inference_keeps_its_logits_and_the_original_its_layers():
    torch.manual_seed(0)
    model = GeoMoENet(ModelConfig(num_classes=5, num_experts=4, gate_rank=8)).eval()
    model = prune_model(model, {1: [0, 2], 3: [1], 5: [3], 7: [0, 1]}, absent_policy="remove").eval()
    images = torch.rand(2, 3, 64, 64)
    folded = fold_for_inference(model)
    assert sum(isinstance(m, FoldedMoE) for m in folded.modules()) == 4
    assert not any(isinstance(m, MoEMlp) for m in folded.modules())
    assert len(model.moe_layers()) == 4 and all(isinstance(m, MoEMlp) for m in model.moe_layers().values())
    with torch.no_grad():
        torch.testing.assert_close(folded(images), model(images), rtol=1e-5, atol=1e-5)


def test_an_expert_parallel_layer_is_refused():
    layer = trained_like_layer("patch", "best_present", 0)
    layer.remote = object()
    with pytest.raises(ValueError, match="expert-parallel"):
        FoldedMoE(layer)


@pytest.mark.parametrize("patches", [1, 7])
def test_folded_layer_runs_in_onnx_runtime_as_in_torch(tmp_path, patches):
    """A single patch is what the last transformer block has at 64 px (the synthetic default)."""
    ort = pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")
    pytest.importorskip("onnxscript", reason="the export extra (onnxscript) is not installed")
    from geomoe.camera.export import write_onnx

    folded = FoldedMoE(trained_like_layer("patch", "remove", 4))
    x = torch.randn(1, 12, 5, patches, generator=torch.Generator().manual_seed(2))
    session = ort.InferenceSession(str(write_onnx(folded, x, tmp_path / "layer.onnx", "x", "y")))
    batch = torch.randn(3, 12, 5, patches, generator=torch.Generator().manual_seed(3))  # the batch axis is dynamic
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"x": batch.numpy()})[0]), folded(batch))
