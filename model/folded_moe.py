"""The MoE layer folded for inference: what a camera runs, in TorchScript and ONNX exports.

`MoEMlp` computes its routing and experts from the trained parameters on every call, in the layout training wants.
A camera only ever runs the same frozen layer, so, as a BatchNorm is folded into its convolution before deployment,
everything that depends on parameters alone is done once here:

- the router's min-max scaling and low-rank projection become one (C, r) matrix after one subtraction;
- the keys are stored unit-length with the temperature in them;
- the routing mask is built per hidden unit (E * H), not per expert, so it multiplies the experts' hidden
  activations without reshaping them to (B, E, H, P, N) and back;
- each expert's output shift (its second-layer bias and correction) rides on the mask: a (E * H, C) matrix whose
  first row per expert holds it, so one product with the (B, 1, N, E * H) mask gives every patch's. (An extra hidden
  unit per expert held constant would carry it with no operation of its own, but takes 16 units to 24, which ONNX
  Runtime's blocked convolutions pad to 32 on AVX-512, which made the first layer slower. A 1x1 convolution of the mask
  was as fast, but torch.export cannot export one on a single patch.)

The routing runs with patches on the second-to-last axis and experts last, as the training layer's does: ONNX
Runtime's softmax over a middle axis transposes internally. Every decision (the argmax
over held experts' gates, its tie-breaking, the removal of patches whose best expert is absent) is the training
layer's; outputs agree to float rounding. On one camera image (ONNX Runtime, one thread) a folded layer takes 0.43-0.58
of the dense MLP branch's time where the training layer took 0.55-0.72: 23 exported operations where it had 34.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from geomoe.model.moe_layer import MoEMlp, unit


class FoldedMoE(nn.Module):
    """A frozen `MoEMlp` with its parameter-only arithmetic done once; input and output (B, C, P, N)."""

    def __init__(self, layer: MoEMlp) -> None:
        super().__init__()
        if layer.remote is not None:
            raise ValueError("an expert-parallel MoE layer cannot be folded: its peers' experts are not in the model")
        held, hidden, dim = layer.num_held, layer.expert_hidden, layer.dim
        self.num_held, self.eps = held, layer.eps
        self.routing = layer.routing
        self.remove_absent = layer.absent_policy == "remove" and layer.absent_ids.numel() > 0
        with torch.no_grad():
            span = 1 / (layer.scale_max - layer.scale_min).clamp_min(1e-6)  # the min-max scale's divisor, inverted
            projection = layer.gate_proj if layer.gate_proj is not None else torch.eye(dim)
            keys = torch.cat([layer.centroids, layer.absent_centroids]) @ projection  # (E_all, r): held first
            inverse_temperature = layer.log_temperature.neg().exp()
            weight1, bias1 = layer.folded_first_layer()  # (E*H, C, 1, 1), (E*H,)
            weight2 = layer.w2 * (1 - layer.gamma)[:, None, None]  # (E, H, C)
            shift = torch.zeros(held, hidden, dim)  # on the first of each expert's units: exact, no sum of shares
            shift[:, 0] = (1 - layer.gamma)[:, None] * layer.b2 + layer.gamma[:, None] * layer.x_corr
            self.register_buffer("scale_min", layer.scale_min.clone())
            self.register_buffer("query_weight", span[:, None] * projection)  # (C, r)
            self.register_buffer("keys", (unit(keys) * inverse_temperature).T.contiguous())  # (r, E_all)
            self.register_buffer("weight1", weight1.clone())
            self.register_buffer("bias1", bias1.clone())
            self.register_buffer("weight2", weight2.reshape(-1, dim).T.contiguous()[:, :, None, None])  # (C, E*H, 1, 1)
            self.register_buffer("shift", shift.reshape(-1, dim))  # (E*H, C)
            self.register_buffer("unit_expert", torch.arange(held).repeat_interleave(hidden))  # (E*H,) local expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = F.group_norm(x, 1, eps=self.eps)  # (B, C, P, N)
        patch_embedding = tokens.mean(dim=2, keepdim=True)  # (B, C, 1, N)
        if self.routing == "image":  # one decision per image from pooled features, broadcast to every patch
            patch_embedding = patch_embedding.mean(dim=3, keepdim=True)  # (B, C, 1, 1)
        query = (patch_embedding.permute(0, 2, 3, 1) - self.scale_min) @ self.query_weight  # (B, 1, N, r)
        probs = (unit(query) @ self.keys).softmax(dim=-1)  # (B, 1, N, E_all)
        gate, choice = probs[..., : self.num_held].max(dim=-1, keepdim=True)  # (B, 1, N, 1)
        routed = torch.where(choice == self.unit_expert, gate, 0.0)  # (B, 1, N, E*H)
        shift = (routed @ self.shift).permute(0, 3, 1, 2)  # (B, C, 1, N)
        hidden = F.silu(F.conv2d(tokens, self.weight1, self.bias1))  # (B, E*H, P, N)
        out = F.conv2d(hidden * routed.permute(0, 3, 1, 2), self.weight2) + shift  # (B, C, P, N)
        if self.remove_absent:  # MLP_e(x) <- -x zeroes a patch whose best expert this model does not hold
            removed = probs[..., self.num_held :].amax(dim=-1, keepdim=True) > gate  # (B, 1, N, 1)
            out = torch.where(removed.permute(0, 3, 1, 2), -x, out)
        return out


def fold_for_inference(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with each MoE layer folded; `model` itself is untouched."""
    return with_layers_replaced(model, MoEMlp, FoldedMoE)


def with_layers_replaced(model: nn.Module, kind: type[nn.Module], replace) -> nn.Module:
    """A copy of `model` in eval mode with every submodule of type `kind` replaced by `replace(it)`."""
    copied = copy.deepcopy(model).eval()
    for parent in list(copied.modules()):
        for name, child in parent.named_children():
            if isinstance(child, kind):
                setattr(parent, name, replace(child))
    return copied
