"""The MoE layer as one ONNX operator for export: `ai.geomoe.FoldedMoE`, which geomoe's operator library
(`camera/ops/folded_moe.cc`, built by `camera/native_ops.py`) runs inside ONNX Runtime.

`FusedMoE` holds a `FoldedMoE`'s weights in the operator's layout and calls the torch operator `geomoe::folded_moe`,
which exists to be exported: torch's exporter traces it by its output shape alone and `onnx_lowering` writes it as
the ONNX node. Torch never runs it (it raises); torch runs `FoldedMoE`, and the tests hold the operator's outputs
in ONNX Runtime to FoldedMoE's.

The operator's inputs besides the tokens:
- weight1 (C, E*H + R): the experts' first layers, then the router's projection with the min-max scale folded in
  (its minimum, projected, in bias1), which the operator applies to each patch's mean token;
- weight2 (E*H + E, C): the experts' second layers, then each expert's output shift, which it adds once per patch,
  times the gate;
- keys (R, E_all), as FoldedMoE holds them.
"""

from __future__ import annotations

import torch
from torch import nn

from geomoe.model.folded_moe import FoldedMoE, with_layers_replaced
from geomoe.model.moe_layer import MoEMlp


@torch.library.custom_op("geomoe::folded_moe", mutates_args=())
def folded_moe(
    x: torch.Tensor,
    weight1: torch.Tensor,
    bias1: torch.Tensor,
    keys: torch.Tensor,
    weight2: torch.Tensor,
    num_held: int,
    hidden: int,
    eps: float,
    image_routing: bool,
    remove_absent: bool,
) -> torch.Tensor:
    raise RuntimeError("geomoe::folded_moe runs in ONNX Runtime only (ai.geomoe.FoldedMoE); torch runs FoldedMoE")


@folded_moe.register_fake
def _folded_moe_shape(x: torch.Tensor, *args) -> torch.Tensor:
    return torch.empty_like(x)


class FusedMoE(nn.Module):
    """A `FoldedMoE` as one `ai.geomoe.FoldedMoE` node; input and output (B, C, P, N)."""

    def __init__(self, folded: FoldedMoE) -> None:
        super().__init__()
        held, units = folded.num_held, folded.weight1.shape[0]
        self.attributes = dict(
            num_held=held,
            hidden=units // held,
            eps=float(folded.eps),
            image_routing=folded.routing == "image",
            remove_absent=folded.remove_absent,
        )
        with torch.no_grad():
            first = folded.weight1[:, :, 0, 0].T  # (C, E*H)
            query_bias = -(folded.scale_min @ folded.query_weight)  # (R,)
            shift = folded.shift.reshape(held, units // held, -1)[:, 0]  # (E, C): on each expert's first unit
            self.register_buffer("weight1", torch.cat([first, folded.query_weight], dim=1).contiguous())
            self.register_buffer("bias1", torch.cat([folded.bias1, query_bias]).contiguous())
            self.register_buffer("keys", folded.keys.clone())
            self.register_buffer("weight2", torch.cat([folded.weight2[:, :, 0, 0].T, shift]).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return folded_moe(x, self.weight1, self.bias1, self.keys, self.weight2, **self.attributes)


def fuse_for_export(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with each MoE layer folded and fused; `model` itself is untouched."""
    return with_layers_replaced(model, MoEMlp, lambda layer: FusedMoE(FoldedMoE(layer)))
