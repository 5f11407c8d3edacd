"""Who trains in a round: a share of the online nodes, drawn deterministically from the run's seed, or under
differential privacy by Poisson sampling from a secret seed (what the accountant assumes, and not predictable from
the run's config)."""

from __future__ import annotations

import os

import torch

from geomoe.wire.privacy import PrivacyConfig
from geomoe.wire.run_config import FederationConfig


class Sampler:
    """Samples nodes for a round; deterministic given the round, so the server can prepare them first."""

    def __init__(self, fed: FederationConfig, privacy: PrivacyConfig, seed: int) -> None:
        self.fed, self.privacy, self.seed = fed, privacy, seed
        self.secret_seed = int.from_bytes(os.urandom(6), "little")

    def rate(self, online: int) -> float:
        """Share of the online nodes a round samples (q)."""
        count = self.fed.clients_per_round or max(1, round(self.fed.fraction_train * online))
        return min(1.0, count / max(online, 1))

    def sample(self, server_round: int, ordered: list[int]) -> list[int]:
        """Nodes for this round among `ordered`."""
        q = self.rate(len(ordered))
        if self.privacy.accounted:
            generator = torch.Generator().manual_seed(self.secret_seed * 1000 + server_round)
            draws = torch.rand(len(ordered), generator=generator).tolist()
            return [n for n, u in zip(ordered, draws, strict=True) if u < q]
        count = round(q * len(ordered))
        if count >= len(ordered):
            return ordered
        generator = torch.Generator().manual_seed(self.seed * 1000 + server_round)
        return sorted(ordered[i] for i in torch.randperm(len(ordered), generator=generator)[:count].tolist())
