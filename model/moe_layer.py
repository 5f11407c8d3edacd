"""Per-patch mixture of tiny expert MLPs for MobileViTV2 (Mensah et al. 2024, arXiv:2411.07834).

Replaces `norm2 -> mlp` of a timm `LinearTransformerBlock`. All P pixels of a patch go to one
expert, chosen by cosine similarity between the min-max-scaled patch embedding and expert
centroids. Experts are stacked along a leading expert dimension and dispatched in one matmul:
experts are so small (E * d_e hidden units in all, fewer than the dense MLP's 2C) that computing
every expert's hidden units and masking to the routed one is cheaper than gathering weights.

The layer may hold any subset of the global experts (`expert_ids`). Centroids of the experts it
does not hold stay as a frozen buffer so that gate values, and the decision that a patch belongs
to an absent expert, are the same as in the full model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# Parameters stored per expert, leading dimension = held experts. Together they are "an expert".
EXPERT_PARAMS = ("norm_weight", "norm_bias", "w1", "b1", "w2", "b2", "gamma", "x_corr", "centroids")


def unit(x: torch.Tensor) -> torch.Tensor:
    """`x` scaled to unit length along its last axis, as F.normalize, but by broadcasting: F.normalize's expand
    exports as two more operations per call."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def low_rank_gate(centroids: torch.Tensor, rank: int) -> torch.Tensor:
    """(C, rank) projection for a low-rank cosine gate: the top right singular vectors of the unit-length centroid
    matrix, whose span holds its best rank-r approximation (Eckart-Young); Mensah et al. 2025 reduce the gate to
    rank 8. Compared in that span, queries pick the expert the full gate picks when rank >= the number of experts,
    and far more often than through a random projection below it (docs: Model, "Low-rank gate")."""
    return torch.linalg.svd(unit(centroids), full_matrices=True)[2][:rank].T


@dataclass
class Routing:
    """Per-patch routing decisions, all (B, N)."""

    gate: torch.Tensor  # softmax gate of the best held expert
    choice: torch.Tensor  # local index of the best held expert
    wants_absent: torch.Tensor  # the best expert overall is one this layer does not hold
    absent_gate: torch.Tensor  # softmax gate of the best absent expert
    absent_choice: torch.Tensor  # index into absent_ids of the best absent expert

    def expand(self, B: int, N: int) -> Routing:
        """Per-image decisions (B, 1) broadcast to every patch."""
        return Routing(*(getattr(self, f.name).expand(B, N) for f in fields(self)))


class MoEMlp(nn.Module):
    """Top-1 per-patch MoE over stacked experts; input and output (B, C, P, N)."""

    def __init__(
        self,
        dim: int,
        expert_ids: list[int],
        num_global_experts: int,
        expert_hidden: int = 2,
        gate_rank: int | None = None,
        gate_temperature: float = 0.01,
        gamma_init: float = 0.9,
        absent_policy: str = "best_present",
        routing: str = "patch",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        num_held, hidden = len(expert_ids), expert_hidden
        if gate_rank is not None and gate_rank > dim:
            raise ValueError(f"gate_rank {gate_rank} exceeds the width {dim} of the layer it projects")
        self.dim, self.expert_hidden, self.eps = dim, hidden, eps
        self.num_global_experts = num_global_experts
        self.absent_policy = absent_policy
        self.routing = routing
        self.register_buffer("expert_ids", torch.tensor(sorted(expert_ids), dtype=torch.long))
        absent = sorted(set(range(num_global_experts)) - set(expert_ids))
        self.register_buffer("absent_ids", torch.tensor(absent, dtype=torch.long))
        # Expert parameters, stacked: (E, ...)
        self.norm_weight = nn.Parameter(torch.ones(num_held, dim))
        self.norm_bias = nn.Parameter(torch.zeros(num_held, dim))
        self.w1 = nn.Parameter(torch.randn(num_held, dim, hidden) / math.sqrt(dim))
        self.b1 = nn.Parameter(torch.zeros(num_held, hidden))
        self.w2 = nn.Parameter(torch.randn(num_held, hidden, dim) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(num_held, dim))
        self.gamma = nn.Parameter(torch.full((num_held,), gamma_init))
        self.x_corr = nn.Parameter(torch.zeros(num_held, dim))
        self.centroids = nn.Parameter(F.normalize(torch.randn(num_held, dim), dim=-1))
        # Router state shared by all experts of the layer.
        # Centroids of experts held elsewhere: frozen on a device that only routes around them, trained
        # when peers run those experts (expert-parallel), so the router stays exact either way.
        self.absent_centroids = nn.Parameter(torch.zeros(len(absent), dim), requires_grad=False)
        self.register_buffer("scale_min", torch.zeros(dim))
        self.register_buffer("scale_max", torch.ones(dim))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(gate_temperature)))
        # Low-rank gate (C, r): orthonormal columns, fitted to the centroids at conversion (low_rank_gate).
        self.gate_proj = (
            nn.Parameter(torch.linalg.qr(torch.randn(dim, gate_rank))[0]) if gate_rank is not None else None
        )
        self.last_choice: torch.Tensor | None = None  # (B, N) global id per patch, -1 where removed
        self.last_logits: torch.Tensor | None = None  # (B, E_held) per-image router logits (routing="image")
        self.remote = None  # expert-parallel dispatch to peers (geomoe.expert_parallel), None: local only

    @property
    def num_held(self) -> int:
        return int(self.expert_ids.numel())

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Shared pre-MLP normalisation (GroupNorm with one group, no affine: the affine is per expert)."""
        return F.group_norm(x, 1, eps=self.eps)

    def scale(self, patch_embedding: torch.Tensor) -> torch.Tensor:
        """Min-max scaling fitted once on the clustering sample; only the router sees it."""
        return (patch_embedding - self.scale_min) / (self.scale_max - self.scale_min).clamp_min(1e-6)

    def route(self, patch_embedding: torch.Tensor) -> Routing:
        """Routing decisions from (B, N, C) patch embeddings (over held and absent experts alike). One softmax over
        all experts gives every gate: a log-sum-exp beside two maxima cost an exported camera model 25 us a layer,
        a softmax over the last axis 5."""
        query = self.scale(patch_embedding)
        keys = torch.cat([self.centroids, self.absent_centroids])  # (E_held + E_absent, C): held first
        if self.gate_proj is not None:  # low-rank gate: compare in an r-dim projection
            query, keys = query @ self.gate_proj, keys @ self.gate_proj
        inv_temperature = self.log_temperature.neg().exp()
        logits = unit(query) @ unit(keys).T * inv_temperature  # (B, N, E_all)
        if self.routing == "image":
            self.last_logits = logits[:, 0, : self.num_held]  # (B, E): for router supervision
        probs = logits.softmax(dim=-1)
        gate, choice = probs[..., : self.num_held].max(dim=-1)  # the largest gate is the largest logit's
        if self.absent_ids.numel():
            absent_gate, absent_choice = probs[..., self.num_held :].max(dim=-1)
        else:
            absent_gate, absent_choice = torch.zeros_like(gate), torch.zeros_like(choice)
        return Routing(gate, choice, absent_gate > gate, absent_gate, absent_choice)

    def folded_first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts' first layer with their LayerNorm affine folded in, as a 1x1 convolution: (E*H, C, 1, 1)
        and (E*H,)."""
        weight = self.w1 * self.norm_weight[:, :, None]  # (E, C, H)
        bias = self.b1 + torch.einsum("ec,ech->eh", self.norm_bias, self.w1)  # (E, H)
        return weight.permute(0, 2, 1).reshape(-1, self.dim)[:, :, None, None], bias.reshape(-1)

    def expert_outputs(self, tokens: torch.Tensor, choice: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """gate * ((1 - gamma) * MLP_e(x) + gamma * x_corr_e) for tokens (B, C, P, N), the routed expert `choice` and
        its `gate` (B, N). Both expert layers are 1x1 convolutions over every expert's hidden units, in the block's
        own channel-first layout: a token-last layout costs two full-tensor transposes per layer, which on one
        camera image took longer than the experts themselves. The gate rides on the routing mask, 1 - gamma on the
        second layer's weights, and its bias and the correction on one per-patch shift, so past the two
        convolutions the (B, C, P, N) tensor is touched once."""
        weight1, bias1 = self.folded_first_layer()
        B, C, P, N = tokens.shape
        hidden = F.silu(F.conv2d(tokens, weight1, bias1)).view(B, self.num_held, -1, P, N)  # (B, E, H, P, N)
        experts = torch.arange(self.num_held, device=choice.device)
        routed = torch.where(choice[..., None] == experts, gate[..., None], 0.0).to(hidden.dtype).transpose(1, 2)
        shift = ((1 - self.gamma)[:, None] * self.b2 + self.gamma[:, None] * self.x_corr).T @ routed  # (B, C, N)
        weight2 = (self.w2 * (1 - self.gamma)[:, None, None]).reshape(-1, C).T[:, :, None, None]  # (C, E*H, 1, 1)
        masked = hidden * routed[:, :, None, None, :]  # (B, E, H, P, N)
        return F.conv2d(masked.view(B, -1, P, N), weight2) + shift[:, :, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, P, N = x.shape
        tokens = self.normalize(x)  # (B, C, P, N)
        patch_embedding = tokens.mean(dim=2).transpose(1, 2)  # [B, C, N] --> [B, N, C]
        if self.routing == "image":  # Mobile V-MoE: one decision per image from pooled features
            routing = self.route(patch_embedding.mean(dim=1, keepdim=True)).expand(B, N)
        else:
            routing = self.route(patch_embedding)  # one decision per patch: (B, N)
        # Expert-parallel: peers run the absent experts, in flight while this layer computes its own.
        pending = self.remote.send(self, tokens, routing) if self.remote is not None else []
        out = self.expert_outputs(tokens, routing.choice, routing.gate)  # (B, C, P, N)
        served = torch.zeros_like(routing.wants_absent)
        if pending:
            out, served = self.remote.receive(pending, routing, out)
        removed = routing.wants_absent & ~served if self.absent_policy == "remove" else torch.zeros_like(served)
        held_choice = torch.where(removed, -1, self.expert_ids[routing.choice])
        if self.absent_ids.numel():
            held_choice = torch.where(served, self.absent_ids[routing.absent_choice], held_choice)
        self.last_choice = held_choice.detach()
        if self.absent_policy == "remove":  # static per model, so exports trace it correctly
            out = torch.where(removed[:, None, None, :], -x, out)  # MLP_e(x) <- -x zeroes the patch
        return out

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, experts={self.expert_ids.tolist()} of {self.num_global_experts}, "
            f"hidden={self.expert_hidden}, policy={self.absent_policy}, routing={self.routing}"
        )
