"""Server-side optimisers on the aggregated pseudo-gradient (Reddi et al. 2021): FedAvg, FedAdam, FedYogi.

Applied per row: only rows some client updated move, and only their moment estimates change, so
an expert nobody held this round keeps both its value and its optimiser state.
"""

from __future__ import annotations

import torch


class ServerOptimizer:
    """x <- x + lr * step(delta) on touched rows; state kept per tensor name."""

    def __init__(self, kind: str, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def apply(self, name: str, target: torch.Tensor, delta: torch.Tensor, touched: torch.Tensor | None = None) -> None:
        """Move `target` (in place) along `delta` on the rows where `touched` is true (every row if None)."""
        if target.dim() == 0:  # a scalar is one row
            target, delta = target.view(1), delta.view(1)
        if touched is None:
            touched = torch.ones(target.shape[0], dtype=torch.bool)
        if not touched.any():
            return
        if self.kind == "fedavg":
            target[touched] += (self.lr * delta[touched]).to(target.dtype)
            return
        m, v = self.moments.get(name, (torch.zeros_like(target), torch.full_like(target, self.tau**2)))
        d = delta[touched].to(target.dtype)
        m[touched] = self.beta1 * m[touched] + (1 - self.beta1) * d
        if self.kind == "fedadam":
            v[touched] = self.beta2 * v[touched] + (1 - self.beta2) * d**2
        else:  # fedyogi
            v[touched] = v[touched] - (1 - self.beta2) * d**2 * torch.sign(v[touched] - d**2)
        self.moments[name] = (m, v)
        target[touched] += self.lr * m[touched] / (v[touched].sqrt() + self.tau)

    def state_dict(self) -> dict:
        return {"moments": self.moments}

    def load_state_dict(self, state: dict) -> None:
        self.moments = state["moments"]
