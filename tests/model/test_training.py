"""Local training: FedProx's proximal term keeps the trained parameters near the round's start."""

import torch

from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet
from geomoe.model.training import TrainConfig, train_epochs


def distance_moved(prox_mu: float) -> float:
    torch.manual_seed(0)
    model = GeoMoENet(ModelConfig(num_classes=4, moe_layers=(1,), num_experts=2))
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = [(torch.rand(8, 3, 64, 64), torch.randint(0, 4, (8,))) for _ in range(3)]
    cfg = TrainConfig(epochs=2, lr_moe=0.05, lr_head=0.05, lr_rest=0.05, prox_mu=prox_mu)
    train_epochs(model, batches, cfg, 0, trainable={"head.fc.weight", "head.fc.bias"})
    moved = [(p.detach() - start[k]).pow(2).sum() for k, p in model.named_parameters() if k.startswith("head.fc.")]
    return float(torch.stack(moved).sum().sqrt())


def test_the_proximal_term_keeps_the_update_closer_to_the_received_model():
    plain, proximal = distance_moved(0.0), distance_moved(50.0)
    assert 0 < proximal < 0.8 * plain
