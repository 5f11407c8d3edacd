"""Location awareness (Mensah et al. 2025): Space2Vec-grid encoder and a contrastive loss.

The encoder (Mai et al. 2020) maps (lon, lat) to 256-d through multi-scale sinusoids and a small
MLP. It is frozen; here its MLP is a fixed, seeded random projection, since the TorchSpatial
weights cannot be downloaded. Per-block projections (256 -> 64/96/128, ReLU, dropout 0.3) are
trained with a supervised contrastive loss (Khosla et al. 2020) that pulls pooled pre-MLP image
features and the location embedding of images of the same class together, at every transformer
layer. Nothing of it is used at inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOCATION_DIM = 256


class Space2VecGrid(nn.Module):
    """Frozen (lon, lat) in degrees -> 256-d embedding."""

    def __init__(self, num_scales: int = 32, min_radius: float = 1e-3, max_radius: float = 2 * math.pi, seed: int = 0):
        super().__init__()
        ratio = max_radius / min_radius
        scales = min_radius * ratio ** (torch.arange(num_scales) / max(num_scales - 1, 1))
        self.register_buffer("inv_wavelengths", 1.0 / scales)
        generator = torch.Generator().manual_seed(seed)
        self.mlp = nn.Sequential(
            nn.Linear(4 * num_scales, LOCATION_DIM), nn.ReLU(), nn.Linear(LOCATION_DIM, LOCATION_DIM)
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                # randn with a generator, not init.normal_(generator=): torch 1.13 (the device image) lacks that.
                weight = torch.randn(layer.weight.shape, generator=generator) / math.sqrt(layer.in_features)
                with torch.no_grad():
                    layer.weight.copy_(weight)
                nn.init.zeros_(layer.bias)
        self.requires_grad_(False)

    def forward(self, lonlat_deg: torch.Tensor) -> torch.Tensor:
        radians = torch.deg2rad(lonlat_deg.float())  # (B, 2)
        angles = radians[:, :, None] * self.inv_wavelengths  # (B, 2, S)
        features = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (B, 4S)
        return self.mlp(features)


def supervised_contrastive(
    anchors: torch.Tensor, views: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """SupCon loss over two views (B, D) each; positives share a label (self excluded)."""
    features = F.normalize(torch.cat([anchors, views]), dim=-1)  # (2B, D)
    targets = torch.cat([labels, labels])
    logits = features @ features.T / temperature
    self_mask = torch.eye(len(targets), dtype=torch.bool, device=features.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (targets[:, None] == targets[None, :]) & ~self_mask
    mean_log_prob = log_prob.masked_fill(~positives, 0).sum(1) / positives.sum(1).clamp_min(1)
    return -mean_log_prob.mean()


class LocationSupervision(nn.Module):
    """Encoder + per-block projections; `loss` sums SupCon over the captured transformer layers."""

    def __init__(self, block_widths: list[int], layer_blocks: list[int], dropout: float = 0.3):
        super().__init__()
        self.encoder = Space2VecGrid()
        self.norm = nn.LayerNorm(LOCATION_DIM)
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Linear(LOCATION_DIM, width), nn.ReLU(), nn.Dropout(dropout)) for width in block_widths
        )
        self.layer_blocks = layer_blocks

    def loss(self, pre_mlp: dict[int, torch.Tensor], lonlat_deg: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embedding = self.norm(self.encoder(lonlat_deg))
        total = torch.zeros((), device=lonlat_deg.device)
        for layer, tokens in pre_mlp.items():
            pooled = tokens.mean(dim=(2, 3))  # [B, C, P, N] --> [B, C]
            total = total + supervised_contrastive(
                pooled, self.projections[self.layer_blocks[layer]](embedding), labels
            )
        return total
