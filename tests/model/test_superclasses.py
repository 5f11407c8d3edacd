import numpy as np
import torch

from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet
from geomoe.model.superclasses import confusion_matrix, router_supervision_loss, superclasses


def test_confused_classes_share_a_superclass():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3] * 5)
    predictions = np.array([1, 0, 0, 1, 3, 2, 2, 3] * 5)  # 0<->1 and 2<->3 are confused
    groups = superclasses(confusion_matrix(labels, predictions, 4), 2)
    assert groups[0] == groups[1] != groups[2] == groups[3]


def test_per_image_routing_sends_a_whole_image_to_one_expert():
    torch.manual_seed(0)
    model = GeoMoENet(ModelConfig(num_classes=4, num_experts=4, routing="image")).eval()
    model(torch.rand(3, 3, 64, 64))
    for module in model.moe_layers().values():
        assert all(len(set(row.tolist())) == 1 for row in module.last_choice)


def test_router_supervision_trains_the_router():
    torch.manual_seed(0)
    model = GeoMoENet(ModelConfig(num_classes=4, num_experts=2, routing="image"))
    images, labels = torch.rand(8, 3, 64, 64), torch.tensor([0, 1, 2, 3] * 2)
    mapping = torch.tensor([0, 0, 1, 1])
    optimizer = torch.optim.Adam(
        [p for n, p in model.named_parameters() if "centroids" in n or "temperature" in n], lr=0.05
    )
    losses = []
    for _ in range(30):
        model(images)
        loss = router_supervision_loss(model, labels, mapping)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_the_superclass_loss_changes_the_routers_gradients():
    """Per-image routing: the same batch with and without the super-class loss moves the router differently;
    with patch routing the loss is off."""
    from geomoe.model.config import ModelConfig
    from geomoe.model.training import TrainConfig, batch_loss

    torch.manual_seed(0)
    model = GeoMoENet(
        ModelConfig(num_classes=6, moe_layers=(1, 3), num_experts=4, routing="image")
    ).eval()  # no dropout
    batch = (torch.rand(8, 3, 64, 64), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]))
    superclasses = torch.tensor([0, 0, 1, 2, 3, 3])

    def router_grads(weight: float) -> list[torch.Tensor]:
        model.zero_grad()
        batch_loss(model, batch, TrainConfig(superclass_weight=weight), superclasses=superclasses).backward()
        return [m.centroids.grad.clone() for m in model.moe_layers().values()]

    plain, guided = router_grads(0.0), router_grads(1.0)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, guided, strict=True))
    model.cfg.routing = "patch"
    assert all(torch.allclose(a, b) for a, b in zip(plain, router_grads(1.0), strict=True))
