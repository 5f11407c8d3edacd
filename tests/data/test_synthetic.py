import numpy as np

from geomoe.data.synthetic import SyntheticConfig, SyntheticGeoSpecies


def test_same_seed_same_world_and_images_in_any_order():
    a, b = SyntheticGeoSpecies(SyntheticConfig()), SyntheticGeoSpecies(SyntheticConfig())
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.lat, b.lat)
    assert np.array_equal(a.image(123), b.image(123))
    b.image(5)
    assert np.array_equal(a.image(7), b.image(7))


def test_range_areas_follow_a_power_law():
    world = SyntheticGeoSpecies(SyntheticConfig(num_species=400))
    radii = world.range_radius_deg
    assert np.median(radii) < 0.5 * np.percentile(radii, 95)  # many local species, few wide ones
    assert radii.min() >= world.cfg.min_range_deg


def test_images_have_the_configured_size_and_range():
    world = SyntheticGeoSpecies(SyntheticConfig(image_size=32))
    image, label = world[3]
    assert image.shape == (3, 32, 32) and image.min() >= 0 and image.max() <= 1
    assert label == world.labels[3]


def test_observations_are_clustered_in_hotspots():
    world = SyntheticGeoSpecies(SyntheticConfig())
    counts = np.bincount(world.region, minlength=world.cfg.num_hotspots)
    assert counts.max() > 3 * np.median(counts[counts > 0]) or (counts > 0).sum() <= world.cfg.num_hotspots
    assert len(np.unique(np.round(world.lat))) < 0.2 * len(world)
