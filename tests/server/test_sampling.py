"""Who trains in a round, without Flower."""

from geomoe.server.sampling import Sampler
from geomoe.wire.privacy import PrivacyConfig
from geomoe.wire.run_config import FederationConfig


def test_a_round_samples_its_share_the_same_way_every_time_for_one_seed():
    fed = FederationConfig(clients_per_round=3)
    nodes = list(range(10))
    first, again = Sampler(fed, PrivacyConfig(), seed=4), Sampler(fed, PrivacyConfig(), seed=4)
    assert first.rate(10) == 0.3
    picked = first.sample(2, nodes)
    assert len(picked) == 3 and picked == sorted(picked) and set(picked) <= set(nodes)
    assert again.sample(2, nodes) == picked


def test_a_round_asking_for_more_than_are_online_takes_all():
    sampler = Sampler(FederationConfig(clients_per_round=50), PrivacyConfig(), seed=0)
    assert sampler.rate(4) == 1.0 and sampler.sample(1, [3, 1, 2]) == [3, 1, 2]


def test_accounted_sampling_draws_from_the_secret_seed_not_the_configs(monkeypatch):
    privacy = PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0)
    fed = FederationConfig(clients_per_round=50)
    nodes = list(range(200))
    monkeypatch.setattr("os.urandom", lambda n: bytes(range(1, n + 1)))
    one, other = Sampler(fed, privacy, seed=0), Sampler(fed, privacy, seed=7)
    assert one.sample(1, nodes) == other.sample(1, nodes)  # the config's seed plays no part
    monkeypatch.setattr("os.urandom", lambda n: bytes(range(2, n + 2)))
    assert Sampler(fed, privacy, seed=0).sample(1, nodes) != one.sample(1, nodes)
