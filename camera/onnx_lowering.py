"""How some operations of the exported models are written in ONNX: the same arithmetic in fewer or faster operations
than the exporter's defaults, for the camera's ONNX Runtime. Training and TorchScript are untouched.

- A one-group GroupNorm with no affine (the experts' shared normalisation) becomes a bare InstanceNormalization:
  the default adds a multiply by ones and an add of zeros, 18 us of a 306 us layer on one camera image.
- A mean over the pixel axis of (B, C, P, N) patches becomes an AveragePool with a (P, 1) kernel: ONNX Runtime's
  mean over a middle axis is a slow reduction (25 us with its transpose against 17).
- MobileViT's unfold and fold of square patches (timm: a reshape to six axes and a permute) become SpaceToDepth and
  DepthToSpace on each channel as its own one-channel image: ONNX Runtime's six-axis Transpose is generic and slow
  (270 us for the first block's 64 x 28 x 28 map on one thread, against 60). This one is in the dense model too.
- A maximum with its index (the router's best held expert) becomes one TopK with k = 1 in place of a ReduceMax
  beside an ArgMax; both take the first index among equal values.
- A vector scaled to unit length (the router's query: a ReduceL2, a Clip of the norm to at least 1e-12, a Div) becomes
  one LpNormalization (`fuse_unit_length`, on the exported graph: the three are separate aten operations). ONNX
  Runtime's sets a zero vector to zero, as the clipped division does.
- A fused export's MoE layer (`camera/fused_moe.py`) becomes the one node of geomoe's own operator.

On a pruned model with experts in all nine transformer layers, the last two took its latency on one camera image
(ONNX Runtime, one thread) from 0.896 to 0.884 of the dense model's in one interleaved run: 27 operations fewer.

Used by `torch.onnx.export(..., custom_translation_table=LOWERINGS)` (the dynamo exporter; needs onnxscript), then
`fuse_unit_length` on the saved model.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxscript import opset18 as op
from onnxscript import values
from onnxscript.function_libs.torch_lib.ops.core import aten_mean_dim, aten_permute
from onnxscript.function_libs.torch_lib.ops.nn import aten_group_norm

import geomoe.camera.fused_moe  # noqa: F401  registers torch.ops.geomoe.folded_moe, lowered below
from geomoe.camera.native_ops import DOMAIN

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


def max_dim(self, dim: int, keepdim: bool = False):
    """aten.max.dim; the largest value along `dim` and the first index holding it, from one TopK."""
    values, indices = op.TopK(self, op.Constant(value_ints=[1]), axis=dim, largest=1, sorted=1)
    if not keepdim:
        axes = op.Constant(value_ints=[dim])
        values, indices = op.Squeeze(values, axes), op.Squeeze(indices, axes)
    return values, indices


def _folded_moe_schema() -> onnx.defs.OpSchema:
    """geomoe's own operator (camera/ops/folded_moe.cc, which its library adds to ONNX Runtime), as the exporter
    needs it described."""
    schema = onnx.defs.OpSchema
    tensor = [schema.FormalParameter(name, "T") for name in ("x", "weight1", "bias1", "keys", "weight2")]
    ints = ("num_held", "hidden", "image_routing", "remove_absent")
    attributes = [schema.Attribute(name, schema.AttrType.INT, "") for name in ints]
    return schema("FoldedMoE", DOMAIN, 1, inputs=tensor, outputs=[schema.FormalParameter("y", "T")],
                  type_constraints=[("T", ["tensor(float)"], "")],
                  attributes=[*attributes, schema.Attribute("eps", schema.AttrType.FLOAT, "")])  # fmt: skip


FOLDED_MOE = values.Op(values.Opset(DOMAIN, 1), "FoldedMoE", _folded_moe_schema())


def folded_moe(x, weight1, bias1, keys, weight2, num_held: int, hidden: int, eps: float, image_routing: bool,
               remove_absent: bool):  # fmt: skip
    """geomoe::folded_moe (a FusedMoE layer); the one ai.geomoe.FoldedMoE node."""
    return FOLDED_MOE(x, weight1, bias1, keys, weight2, num_held=num_held, hidden=hidden, eps=eps,
                      image_routing=int(image_routing), remove_absent=int(remove_absent))  # fmt: skip


LOWERINGS = {
    torch.ops.aten.permute.default: permute,
    torch.ops.aten.group_norm.default: group_norm,
    torch.ops.aten.mean.dim: mean_dim,
    torch.ops.aten.max.dim: max_dim,
    torch.ops.geomoe.folded_moe.default: folded_moe,
}

UNIT_LENGTH_FLOOR = 1e-12  # the least norm `geomoe.model.moe_layer.unit` divides by


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of the graph's initializers and Constant nodes, by output name."""
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def fuse_unit_length(model: onnx.ModelProto) -> None:
    """Div(x, Clip(ReduceL2(x, axes=[-1], keepdims=1), min=1e-12)) -> LpNormalization(x, axis=-1, p=2) in the main
    graph, in place, where the norm and its clip feed nothing else; constants left unused go too."""
    graph = model.graph
    constants = _constants(graph)
    producer = {name: node for node in graph.node for name in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    def constant_is(name: str, expected: float) -> bool:
        value = constants.get(name)
        return value is not None and value.size == 1 and float(value.reshape(-1)[0]) == expected

    nodes, removed = [], set()  # the graph's nodes with each fused Div replaced, and the norms and clips it absorbed
    for node in graph.node:
        clip = producer.get(node.input[1]) if node.op_type == "Div" else None
        norm = producer.get(clip.input[0]) if clip is not None and clip.op_type == "Clip" else None
        if (
            norm is None
            or norm.op_type != "ReduceL2"
            or norm.input[0] != node.input[0]
            or len(norm.input) != 2
            or not constant_is(norm.input[1], -1)
            or any(a.name == "keepdims" and a.i == 0 for a in norm.attribute)
            or len(clip.input) != 2
            or not constant_is(clip.input[1], np.float32(UNIT_LENGTH_FLOOR))
            or uses[norm.output[0]] != 1
            or uses[clip.output[0]] != 1
        ):
            nodes.append(node)
            continue
        removed.update((id(norm), id(clip)))
        unit = onnx.helper.make_node("LpNormalization", [node.input[0]], list(node.output), axis=-1, p=2)
        nodes.append(unit)
    kept = [node for node in nodes if id(node) not in removed]
    used = {name for node in kept for name in node.input} | {output.name for output in graph.output}
    kept = [node for node in kept if node.op_type != "Constant" or node.output[0] in used]
    del graph.node[:]
    graph.node.extend(kept)
    unused = [tensor for tensor in graph.initializer if tensor.name not in used]  # the norms' axes, the clips' floor
    for tensor in unused:
        graph.initializer.remove(tensor)
