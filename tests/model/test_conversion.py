from dataclasses import replace

import numpy as np
import pytest
import torch

from geomoe.data.synthetic import SyntheticConfig, SyntheticGeoSpecies
from geomoe.model.config import ModelConfig
from geomoe.model.conversion import (
    ConversionConfig,
    collect_patches,
    convert_to_moe,
    representative_patches,
    resample_classes,
)
from geomoe.model.moe_layer import unit
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
    train_epochs(dense, loader, TrainConfig(epochs=4, lr_rest=2e-3, lr_head=2e-3), seed=0)
    images = torch.stack([data[i][0] for i in train[:400]])
    labels = torch.from_numpy(data.labels[train[:400]])
    test_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, test.tolist()), batch_size=200)
    return dense, images, labels, test_loader


@pytest.mark.parametrize("clustering", ["ward", "kmeans"])
def test_conversion_gives_nonempty_experts_and_keeps_accuracy(trained_dense, clustering):
    dense, images, labels, test_loader = trained_dense
    eight = ModelConfig(num_classes=12, num_experts=8)
    moe = convert_to_moe(dense, images, labels, ConversionConfig(clustering=clustering), eight, seed=0)
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


def test_a_low_rank_gate_is_fitted_to_the_centroids(trained_dense):
    """With rank = experts the fitted projection spans every centroid, so each sample patch goes to the expert the
    full-width cosine router sends it to (a random projection to 8 of 64+ dimensions routes a third of them
    elsewhere); at rank 4 the model still classifies as the full-width conversion does."""
    dense, images, labels, test_loader = trained_dense
    conversion, eight = ConversionConfig(), ModelConfig(num_classes=12, num_experts=8)
    samples = collect_patches(dense, images, labels, conversion, eight.moe_layers)
    for rank in (8, 4):
        low_rank = GeoMoENet(ModelConfig(num_classes=12, moe_layers=(), gate_rank=rank))
        low_rank.load_state_dict(dense.state_dict())
        moe = convert_to_moe(low_rank, images, labels, conversion, replace(eight, gate_rank=rank), seed=0)
        if rank == 8:
            for layer, module in moe.moe_layers().items():
                embeddings = samples[layer].embeddings
                full_width = (unit(module.scale(embeddings)) @ unit(module.centroids).T).argmax(dim=-1)
                assert torch.equal(module.route(embeddings[None]).choice[0], full_width), layer
    full_accuracy = evaluate(convert_to_moe(dense, images, labels, conversion, eight, seed=0), test_loader)["accuracy"]
    assert evaluate(moe, test_loader)["accuracy"] >= full_accuracy - 0.05
