"""The accountant and adaptive clipping against values computed here from the library and the papers."""

import math

import dp_accounting
import pytest
import torch
from dp_accounting import pld, rdp

from geomoe.server.privacy import (
    RoundMechanism,
    epsilon,
    local_epsilon,
    next_clip,
    update_noise_multiplier,
)
from geomoe.wire.privacy import PrivacyConfig


def test_epsilon_of_a_known_setting_matches_the_library_computed_independently():
    """q = 0.1, z = 1.1, 100 rounds, delta 1e-5, composed here as one self-composed event."""
    ours = epsilon([RoundMechanism(0.1, 1.1)] * 100, 1e-5)
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 100)
    assert ours == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert ours == pytest.approx(6.62, abs=0.01)


def test_rounds_of_different_sampling_rates_compose():
    mixed = epsilon([RoundMechanism(0.1, 1.0), RoundMechanism(0.3, 1.0)], 1e-5)
    assert epsilon([RoundMechanism(0.1, 1.0)] * 2, 1e-5) < mixed < epsilon([RoundMechanism(0.3, 1.0)] * 2, 1e-5)


def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise():
    base = epsilon([RoundMechanism(0.2, 1.0)] * 10, 1e-5)
    assert epsilon([RoundMechanism(0.2, 1.0)] * 20, 1e-5) > base
    assert epsilon([RoundMechanism(0.5, 1.0)] * 10, 1e-5) > base
    assert epsilon([RoundMechanism(0.2, 2.0)] * 10, 1e-5) < base
    assert epsilon([], 1e-5) == 0.0


def test_local_epsilon_is_the_gaussian_mechanism_at_sensitivity_two_c():
    """RDP (ours) bounds the tight PLD value of the same Gaussian from above, closely."""
    reference = pld.PLDAccountant(value_discretization_interval=1e-3)
    reference.compose(dp_accounting.GaussianDpEvent(2.0), 5)  # z = 4 on sensitivity 2C
    tight = reference.get_epsilon(1e-5)
    assert tight <= local_epsilon(4.0, 5, 1e-5) <= 1.25 * tight
    assert local_epsilon(4.0, 0, 1e-5) == 0.0


def test_adaptive_clipping_splits_the_noise_as_andrew_et_al():
    cfg = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0, adaptive_clip=True, clip_count_stddev=5.0)
    z_update = update_noise_multiplier(cfg, 100)
    assert z_update == pytest.approx((1.0 - 1 / 100) ** -0.5)  # (z^-2 - (2 sigma_b)^-2)^-1/2
    assert update_noise_multiplier(PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0), 100) == 1.0
    with pytest.raises(ValueError, match="clip_count_stddev=0.4 is too small"):
        update_noise_multiplier(PrivacyConfig(1.0, 1.0, adaptive_clip=True, clip_count_stddev=0.4), 10)


def test_the_clip_moves_geometrically_towards_the_target_quantile():
    cfg = PrivacyConfig(clip_norm=1.0, adaptive_clip=True, clip_count_stddev=1e-9, target_quantile=0.5, clip_lr=0.2)
    generator = torch.Generator().manual_seed(0)
    assert next_clip(cfg, 1.0, 10, 10, generator) == pytest.approx(math.exp(-0.2 * 0.5))  # all fit: C falls
    assert next_clip(cfg, 1.0, 0, 10, generator) == pytest.approx(math.exp(0.2 * 0.5))  # none fit: C rises
    assert next_clip(cfg, 2.0, 5, 10, generator) == pytest.approx(2.0)  # at the quantile: stays
