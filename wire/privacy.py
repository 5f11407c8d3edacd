"""Client-level differential privacy: the settings and the maths both sides apply to an update.

A node's update is every floating-point tensor it sends (experts, head rows, shared tensors; not the `*.ids`
arrays that name rows). Its L2 norm over all of them is clipped to C on the device, before compression, so that
compression and error feedback see the clipped update; the server clips again after decoding, which makes the
bound exact whatever a node sends. Noise is Gaussian with standard deviation z * C: added by the server to each
aggregated sum ("central"), or by each device to its own clipped update ("local", for nodes that trust nobody).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

NoiseSide = Literal["central", "local"]
BudgetAction = Literal["stop", "warn"]
NOISE_SIDES, BUDGET_ACTIONS = get_args(NoiseSide), get_args(BudgetAction)


@dataclass
class PrivacyConfig:
    """Client-level (epsilon, delta) differential privacy of the federated updates (off by default)."""

    __pydantic_config__ = {"extra": "forbid"}  # unknown keys are refused when pydantic builds it from a file

    clip_norm: float = 0.0  # C: bound on the L2 norm of each node's whole update per round; 0 = off (no DP)
    noise_multiplier: float = 0.0  # z: noise std / C; 0 = clipping only (bounded influence, no guarantee)
    noise: NoiseSide = "central"  # who adds the noise: the server to each sum, or each device to its update
    adaptive_clip: bool = False  # move C towards a quantile of the update norms (Andrew et al. 2021; central only)
    target_quantile: float = 0.5  # that quantile: the share of nodes whose update should fit unclipped
    clip_lr: float = 0.2  # geometric step of C per round towards the quantile
    clip_count_stddev: float | None = None  # noise on the count of unclipped nodes; None: expected nodes a round / 20
    delta: float = 1e-5  # the delta of the reported (epsilon, delta) guarantee
    epsilon_budget: float | None = None  # epsilon the run may spend; None: no budget
    on_budget: BudgetAction = "stop"  # a round that would exceed the budget: stop training, or warn and go on

    def __post_init__(self) -> None:
        for name in ("clip_norm", "noise_multiplier", "clip_lr", "clip_count_stddev", "epsilon_budget"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"privacy.{name} must be a finite number >= 0, got {value}")
        if self.noise not in NOISE_SIDES:
            raise ValueError(f"privacy.noise={self.noise!r} is not one of {NOISE_SIDES}")
        if self.on_budget not in BUDGET_ACTIONS:
            raise ValueError(f"privacy.on_budget={self.on_budget!r} is not one of {BUDGET_ACTIONS}")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"privacy.target_quantile must be in (0, 1), got {self.target_quantile}")
        if self.noise_multiplier > 0 and self.clip_norm == 0:
            raise ValueError("privacy.noise_multiplier needs privacy.clip_norm > 0 (noise is scaled to the clip)")
        if self.adaptive_clip and self.noise == "local":
            raise ValueError('privacy.adaptive_clip needs privacy.noise = "central" (the clip count is noised there)')
        if self.adaptive_clip and self.clip_norm == 0:
            raise ValueError("privacy.adaptive_clip needs privacy.clip_norm > 0 as its starting value")

    @property
    def enabled(self) -> bool:
        """Updates are clipped (and noised when z > 0)."""
        return self.clip_norm > 0

    @property
    def accounted(self) -> bool:
        """The run has a privacy guarantee to report."""
        return self.clip_norm > 0 and self.noise_multiplier > 0


def update_norm(update: dict[str, torch.Tensor]) -> float:
    """L2 norm of all floating-point tensors of an update together."""
    squares = [v.double().pow(2).sum() for v in update.values() if v.is_floating_point()]
    return math.sqrt(float(sum(squares))) if squares else 0.0


def clip_update(update: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """The update scaled to L2 norm <= `clip_norm` as a whole (row ids untouched), and its norm before."""
    norm = update_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = {k: v * scale if v.is_floating_point() else v for k, v in update.items()}
    return clipped, norm


def add_noise(
    update: dict[str, torch.Tensor], std: float, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Gaussian noise of standard deviation `std` on every floating-point value of the update."""
    return {
        k: v + torch.randn(v.shape, generator=generator, dtype=torch.float64).to(v.dtype) * std
        if v.is_floating_point()
        else v
        for k, v in update.items()
    }
