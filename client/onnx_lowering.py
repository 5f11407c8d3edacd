"""How two of the MoE layer's operations are written in ONNX: the same arithmetic in fewer or faster operations
than the exporter's defaults, for the camera's ONNX Runtime. Training and TorchScript are untouched.

- A one-group GroupNorm with no affine (the experts' shared normalisation) becomes a bare InstanceNormalization:
  the default adds a multiply by ones and an add of zeros, 18 us of a 306 us layer on one camera image.
- A mean over the pixel axis of (B, C, P, N) patches becomes an AveragePool with a (P, 1) kernel: ONNX Runtime's
  mean over a middle axis is a slow reduction (25 us with its transpose against 17).

Used by `torch.onnx.export(..., custom_translation_table=LOWERINGS)` (the dynamo exporter; needs onnxscript).
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops.core import aten_mean_dim
from onnxscript.function_libs.torch_lib.ops.nn import aten_group_norm

PIXEL_AXIS = 2  # of the MoE layer's (B, C, P, N) tokens


def group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5, cudnn_enabled: bool = True):
    """aten.group_norm; without an affine and with one group, an InstanceNormalization over the flattened image."""
    if weight is not None or bias is not None or num_groups != 1:
        return aten_group_norm(input, num_groups, weight, bias, eps, cudnn_enabled)
    flat = op.Reshape(input, op.Constant(value_ints=[0, 1, -1]))
    one, zero = op.CastLike(op.Constant(value_floats=[1.0]), input), op.CastLike(op.Constant(value_floats=[0.0]), input)
    return op.Reshape(op.InstanceNormalization(flat, one, zero, epsilon=eps), op.Shape(input))


def mean_dim(self, dim, keepdim: bool = False, dtype: int = -1):
    """aten.mean.dim; over the pixel axis of a 4-d tensor with a known pixel count, an AveragePool."""
    axes = [dim] if isinstance(dim, int) else list(dim or [])
    shape = self.shape
    pixels = shape[PIXEL_AXIS] if shape is not None and len(shape) == 4 else None
    if not isinstance(pixels, int) or dtype not in (-1, None) or axes not in ([PIXEL_AXIS], [PIXEL_AXIS - 4]):
        return aten_mean_dim(self, dim, keepdim, dtype)
    pooled = op.AveragePool(self, kernel_shape=[pixels, 1])
    return pooled if keepdim else op.Squeeze(pooled, op.Constant(value_ints=[PIXEL_AXIS]))


LOWERINGS = {
    torch.ops.aten.group_norm.default: group_norm,
    torch.ops.aten.mean.dim: mean_dim,
}
