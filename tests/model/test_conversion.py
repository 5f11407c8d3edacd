import numpy as np
import pytest
import torch

from geomoe.data.synthetic import SyntheticConfig, SyntheticGeoSpecies
from geomoe.model.config import ModelConfig
from geomoe.model.conversion import ConversionConfig, convert_to_moe, representative_patches, resample_classes
from geomoe.model.network import GeoMoENet
from geomoe.model.training import TrainConfig, evaluate, train_epochs


def test_representative_patches_pick_the_tight_group():
    tight = torch.tensor([1.0, 0.0]) + 0.01 * torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    outliers = torch.tensor([[0.0, 1.0], [-1.0, 0.2], [0.3, -1.0]])
    chosen = representative_patches(torch.cat([tight, outliers]), k=10, steps=5)
    assert len(chosen) == 10 and chosen.max() < 20


def test_resampling_lifts_rare_classes_to_the_minimum():
    labels = np.array([0] * 30 + [1] * 2 + [2])
    counts = np.bincount(labels[resample_classes(labels, 10, seed=0)])
    assert counts.tolist() == [30, 10, 10]


@pytest.fixture(scope="module")
def trained_dense():
    """A dense model trained briefly on the synthetic world, with held-out data."""
    torch.manual_seed(0)
    data = SyntheticGeoSpecies(SyntheticConfig(num_species=12, num_observations=2400))
    order = np.random.default_rng(0).permutation(len(data))
    train, test = order[:1800], order[1800:]
    dense = GeoMoENet(ModelConfig(num_classes=12, moe_layers=()))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(data, train.tolist()),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    train_epochs(dense, loader, TrainConfig(epochs=4, lr_rest=2e-3, lr_head=2e-3))
    images = torch.stack([data[i][0] for i in train[:400]])
    labels = torch.from_numpy(data.labels[train[:400]])
    test_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, test.tolist()), batch_size=200)
    return dense, images, labels, test_loader


@pytest.mark.parametrize("clustering", ["ward", "kmeans"])
def test_conversion_gives_nonempty_experts_and_keeps_accuracy(trained_dense, clustering):
    dense, images, labels, test_loader = trained_dense
    moe = convert_to_moe(dense, images, labels, ConversionConfig(num_experts=8, clustering=clustering))
    dense_accuracy = evaluate(dense, test_loader)["accuracy"]
    moe_accuracy = evaluate(moe, test_loader)["accuracy"]
    assert dense_accuracy > 0.4, "the dense model must have learnt something for the comparison to mean anything"
    assert moe_accuracy >= dense_accuracy - 0.08
    moe(images)
    for module in moe.moe_layers().values():
        assert module.num_held == 8
        assert torch.all(module.scale_max >= module.scale_min)
    used = moe.moe_layers()[1].last_choice.unique()
    assert len(used) == 8, "every expert of the first MoE layer receives patches"
