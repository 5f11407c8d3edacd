"""The server's side of client-level differential privacy: the accountant and the adaptive clip.

Each round is a Poisson-sampled Gaussian mechanism on the sum of clipped updates: every online node takes part
with probability q, and a node added or removed changes the vector of all per-row sums by at most C in L2 (its
whole update is clipped to C). Google's `dp-accounting` composes the rounds (its RDP accountant at its default
orders; at small noise it skips orders whose series do not converge and says so on absl's logger at WARNING,
which is kept quiet: the epsilon is still a valid bound over the remaining orders). With adaptive clipping
(Andrew et al. 2021) the noisy count of unclipped nodes is a second Gaussian query; splitting the noise as
z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2) keeps the pair equal to one Gaussian mechanism of multiplier z, so
the accountant needs only z.

What the guarantee covers: the model updates. Which experts and head rows a node holds is decided at set-up from
its query (its cell and species) and is not protected; nor is Mersenne-Twister noise hardened against
floating-point attacks (Mironov 2012). The README's security section says the same.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import dp_accounting
import torch
from dp_accounting import rdp

from geomoe.server.state import ServerState
from geomoe.wire.privacy import PrivacyConfig


@contextmanager
def _quiet_accountant():
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


@dataclass
class RoundMechanism:
    """One round as the accountant sees it."""

    sampling_rate: float  # q: probability that a node takes part
    noise_multiplier: float  # z of the round (the clip may differ between rounds; z does not)


def epsilon(rounds: list[RoundMechanism], delta: float) -> float:
    """Client-level epsilon at `delta` after `rounds` (add/remove one node's whole data)."""
    if not rounds:
        return 0.0
    accountant = rdp.RdpAccountant()
    alike = Counter((min(max(m.sampling_rate, 0.0), 1.0), m.noise_multiplier) for m in rounds)
    for (q, z), count in alike.items():  # each distinct round once, self-composed: fast for thousands of rounds
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), count)
    with _quiet_accountant():
        return float(accountant.get_epsilon(delta))


def local_epsilon(noise_multiplier: float, rounds_taken: int, delta: float) -> float:
    """What a device's own noise guarantees it against anyone, the server included: each of its updates is a
    Gaussian release of a vector that may change by 2C (any data for any other), with no sampling to hide in."""
    if rounds_taken == 0:
        return 0.0
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier / 2), rounds_taken)
    with _quiet_accountant():
        return float(accountant.get_epsilon(delta))


def count_stddev(cfg: PrivacyConfig, expected_nodes: float) -> float:
    """sigma_b: noise on the count of unclipped nodes (Andrew et al. suggest expected nodes / 20; never below z,
    so the update keeps most of the noise budget)."""
    if cfg.clip_count_stddev is not None:
        return cfg.clip_count_stddev
    return max(expected_nodes / 20, cfg.noise_multiplier)


def update_noise_multiplier(cfg: PrivacyConfig, expected_nodes: float) -> float:
    """The z applied to the update sums: all of z without adaptive clipping, else what the count leaves."""
    z = cfg.noise_multiplier
    if not cfg.adaptive_clip or z == 0:
        return z
    sigma_b = count_stddev(cfg, expected_nodes)
    if 2 * sigma_b <= z:
        raise ValueError(
            f"privacy.clip_count_stddev={sigma_b} is too small for noise_multiplier={z}: it must exceed {z / 2}"
        )
    return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


def next_clip(
    cfg: PrivacyConfig,
    clip: float,
    unclipped: int,
    expected_nodes: float,
    generator: torch.Generator,
) -> float:
    """C <- C * exp(-eta * (b - gamma)), b the noisy share of nodes whose update fitted under C (geometric
    update of Andrew et al. 2021: C rises while fewer than the target quantile fit, falls while more do)."""
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * count_stddev(cfg, expected_nodes)
    share = (unclipped + noise) / max(expected_nodes, 1e-12)
    return clip * math.exp(-cfg.clip_lr * (share - cfg.target_quantile))


def run_epsilon(cfg: PrivacyConfig, state: ServerState, next_round_rate: float | None = None) -> float | None:
    """The run's epsilon at `cfg.delta` so far (or, given `next_round_rate`, after one more round sampling at that
    rate): the client-level guarantee of the sampled Gaussian rounds, or under local noise the guarantee of the
    device that sent most updates. None without a noised run."""
    if not cfg.accounted:
        return None
    if cfg.noise == "local":
        most = max(state.rounds_taken.values(), default=0) + int(next_round_rate is not None)
        return local_epsilon(cfg.noise_multiplier, most, cfg.delta)
    rounds = [RoundMechanism(**m) for m in state.mechanisms]
    if next_round_rate is not None:
        rounds.append(RoundMechanism(next_round_rate, cfg.noise_multiplier))
    return epsilon(rounds, cfg.delta)


def over_budget(cfg: PrivacyConfig, state: ServerState, server_round: int, next_round_rate: float) -> str | None:
    """Why the round would exceed `cfg.epsilon_budget` sampling at `next_round_rate`, or None."""
    if not cfg.accounted or cfg.epsilon_budget is None:
        return None
    projected = run_epsilon(cfg, state, next_round_rate)
    if projected <= cfg.epsilon_budget:
        return None
    budget = cfg.epsilon_budget
    return f"round {server_round} would bring epsilon to {projected:.3g}, over privacy.epsilon_budget={budget:g}"
