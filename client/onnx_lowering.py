"""How three operations of the exported models are written in ONNX: the same arithmetic in fewer or faster operations
than the exporter's defaults, for the camera's ONNX Runtime. Training and TorchScript are untouched.

- A one-group GroupNorm with no affine (the experts' shared normalisation) becomes a bare InstanceNormalization:
  the default adds a multiply by ones and an add of zeros, 18 us of a 306 us layer on one camera image.
- A mean over the pixel axis of (B, C, P, N) patches becomes an AveragePool with a (P, 1) kernel: ONNX Runtime's
  mean over a middle axis is a slow reduction (25 us with its transpose against 17).
- MobileViT's unfold and fold of square patches (timm: a reshape to six axes and a permute) become SpaceToDepth and
  DepthToSpace on each channel as its own one-channel image: ONNX Runtime's six-axis Transpose is generic and slow
  (270 us for the first block's 64 x 28 x 28 map on one thread, against 60). This one is in the dense model too.

Used by `torch.onnx.export(..., custom_translation_table=LOWERINGS)` (the dynamo exporter; needs onnxscript).
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops.core import aten_mean_dim, aten_permute
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


UNFOLD = [0, 1, 3, 5, 2, 4]  # (B, C, n_h, p_h, n_w, p_w) -> (B, C, p_h, p_w, n_h, n_w): pixels of each patch first
FOLD = [0, 1, 4, 2, 5, 3]  # (B, C, p_h, p_w, n_h, n_w) -> (B, C, n_h, p_h, n_w, p_w): back to the feature map


def permute(self, dims):
    """aten.permute; MobileViT's unfold (fold) of square patches, a SpaceToDepth (DepthToSpace) over every channel:
    each channel as a one-channel image, so the block's depth index is the pixel's place in its patch."""
    dims = [axis + len(dims) if axis < 0 else axis for axis in dims]
    shape = self.shape
    sizes = list(shape)[1:] if shape is not None and len(shape) == 6 else []
    static = len(sizes) == 5 and all(isinstance(size, int) for size in sizes)
    if static and dims == UNFOLD and sizes[2] == sizes[4]:
        channels, rows, patch, cols, _ = sizes
        image = op.Reshape(self, op.Constant(value_ints=[-1, 1, rows * patch, cols * patch]))
        blocks = op.SpaceToDepth(image, blocksize=patch)
        return op.Reshape(blocks, op.Constant(value_ints=[-1, channels, patch, patch, rows, cols]))
    if static and dims == FOLD and sizes[1] == sizes[2]:
        channels, patch, _, rows, cols = sizes
        blocks = op.Reshape(self, op.Constant(value_ints=[-1, patch * patch, rows, cols]))
        image = op.DepthToSpace(blocks, blocksize=patch, mode="DCR")
        return op.Reshape(image, op.Constant(value_ints=[-1, channels, rows, patch, cols, patch]))
    return aten_permute(self, dims)


LOWERINGS = {
    torch.ops.aten.permute.default: permute,
    torch.ops.aten.group_norm.default: group_norm,
    torch.ops.aten.mean.dim: mean_dim,
}
