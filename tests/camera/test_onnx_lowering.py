"""The ONNX lowerings write the MoE layer's norm, patch mean, best expert and unit-length query, and MobileViT's unfold
and fold, in other operations with the same results, and leave every other norm, mean, permute and division to the
exporter's defaults."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript", reason="the export extra (onnxscript) is not installed")

from geomoe.camera.export import write_onnx  # noqa: E402
from geomoe.model.moe_layer import unit  # noqa: E402


class Apply(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def exported_ops_and_outputs(tmp_path, module: nn.Module, x: torch.Tensor) -> tuple[list[str], np.ndarray]:
    """Operation types of the ONNX export as a camera gets it (lowered, then fused) and what ONNX Runtime computes
    from `x`."""
    path = write_onnx(module, x, tmp_path / "m.onnx", "x", "y")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ops, session.run(None, {"x": x.numpy()})[0]


X = torch.randn(2, 8, 4, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1  # (B, C, P, N)


def test_affine_free_one_group_norm_is_a_bare_instance_norm(tmp_path):
    ops, out = exported_ops_and_outputs(tmp_path, Apply(lambda x: F.group_norm(x, 1, eps=1e-5)), X)
    assert ops.count("InstanceNormalization") == 1 and "Mul" not in ops and "Add" not in ops
    np.testing.assert_allclose(out, F.group_norm(X, 1, eps=1e-5).numpy(), rtol=1e-5, atol=1e-5)


def test_a_norm_with_an_affine_or_several_groups_keeps_the_default(tmp_path):
    norm = nn.GroupNorm(2, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0), norm.bias.uniform_(-1.0, 1.0)
    ops, out = exported_ops_and_outputs(tmp_path, norm, X)
    assert "Mul" in ops and "Add" in ops
    with torch.no_grad():
        np.testing.assert_allclose(out, norm(X).numpy(), rtol=1e-5, atol=1e-5)


def test_mean_over_the_pixel_axis_is_an_average_pool(tmp_path):
    ops, out = exported_ops_and_outputs(tmp_path, Apply(lambda x: x.mean(dim=2)), X)
    assert "AveragePool" in ops and "ReduceMean" not in ops
    np.testing.assert_allclose(out, X.mean(dim=2).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dims", [(2, 3), 3, 1])
def test_other_means_keep_the_default(tmp_path, dims):
    ops, out = exported_ops_and_outputs(tmp_path, Apply(lambda x: x.mean(dim=dims)), X)
    assert "AveragePool" not in ops and "ReduceMean" in ops
    np.testing.assert_allclose(out, X.mean(dim=dims).numpy(), rtol=1e-6, atol=1e-6)


def unfold(x: torch.Tensor, patch_h: int, patch_w: int) -> torch.Tensor:
    """timm's MobileViTV2 unfold: (B, C, H, W) -> (B, C, P, N)."""
    B, C, H, W = x.shape
    rows, cols = H // patch_h, W // patch_w
    return x.reshape(B, C, rows, patch_h, cols, patch_w).permute(0, 1, 3, 5, 2, 4).reshape(B, C, -1, rows * cols)


def fold(x: torch.Tensor, patch_h: int, patch_w: int, rows: int, cols: int) -> torch.Tensor:
    """timm's MobileViTV2 fold: (B, C, P, N) -> (B, C, H, W)."""
    B, C = x.shape[:2]
    x = x.reshape(B, C, patch_h, patch_w, rows, cols).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(B, C, rows * patch_h, cols * patch_w)


MAP = torch.randn(2, 8, 6, 10, generator=torch.Generator().manual_seed(1))  # (B, C, H, W)


def test_unfold_of_square_patches_is_a_space_to_depth(tmp_path):
    ops, out = exported_ops_and_outputs(tmp_path, Apply(lambda x: unfold(x, 2, 2)), MAP)
    assert "SpaceToDepth" in ops and "Transpose" not in ops
    np.testing.assert_array_equal(out, unfold(MAP, 2, 2).numpy())


def test_fold_of_square_patches_is_a_depth_to_space(tmp_path):
    patches = unfold(MAP, 2, 2)
    ops, out = exported_ops_and_outputs(tmp_path, Apply(lambda x: fold(x, 2, 2, 3, 5)), patches)
    assert "DepthToSpace" in ops and "Transpose" not in ops
    np.testing.assert_array_equal(out, MAP.numpy())


@pytest.mark.parametrize("permuted", [lambda x: unfold(x, 2, 5), lambda x: x.permute(0, 2, 3, 1)])
def test_other_permutes_keep_the_default(tmp_path, permuted):
    ops, out = exported_ops_and_outputs(tmp_path, Apply(permuted), MAP)
    assert "Transpose" in ops and "SpaceToDepth" not in ops
    np.testing.assert_array_equal(out, permuted(MAP).numpy())


TIED = torch.randint(0, 3, (2, 8, 4, 6), generator=torch.Generator().manual_seed(2)).float()  # many equal maxima


@pytest.mark.parametrize("keepdim", [True, False])
def test_maximum_with_its_index_is_one_top_k_taking_the_first_of_equals(tmp_path, keepdim):
    def best(x: torch.Tensor) -> torch.Tensor:
        values, indices = x.max(dim=-1, keepdim=keepdim)
        return torch.stack([values, indices.to(x.dtype)])

    ops, out = exported_ops_and_outputs(tmp_path, Apply(best), TIED)
    assert ops.count("TopK") == 1 and "ArgMax" not in ops and "ReduceMax" not in ops
    np.testing.assert_array_equal(out, best(TIED).numpy())


QUERIES = torch.cat([torch.randn(2, 1, 5, 8, generator=torch.Generator().manual_seed(3)), torch.zeros(2, 1, 1, 8)], 2)


def test_unit_length_is_one_lp_normalization_and_keeps_zero_vectors_zero(tmp_path):
    ops, out = exported_ops_and_outputs(tmp_path, Apply(unit), QUERIES)
    assert ops == ["LpNormalization"]
    np.testing.assert_allclose(out, unit(QUERIES).numpy(), rtol=1e-6, atol=1e-7)
    assert (out[:, :, -1] == 0).all()


@pytest.mark.parametrize(
    "scaled",
    [
        lambda x: x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12),  # another axis
        lambda x: x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-3),  # another floor
        lambda x: unit(x) + torch.linalg.vector_norm(x, dim=-1, keepdim=True),  # the norm is used again
    ],
)
def test_other_divisions_by_a_norm_keep_the_default(tmp_path, scaled):
    ops, out = exported_ops_and_outputs(tmp_path, Apply(scaled), QUERIES)
    assert "LpNormalization" not in ops and "Div" in ops
    np.testing.assert_allclose(out, scaled(QUERIES).numpy(), rtol=1e-5, atol=1e-6)
