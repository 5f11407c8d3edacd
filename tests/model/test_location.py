import torch

from geomoe.model.location import LocationSupervision, Space2VecGrid, supervised_contrastive


def test_encoder_is_frozen_and_deterministic():
    a, b = Space2VecGrid(), Space2VecGrid()
    points = torch.tensor([[10.0, 50.0], [-120.0, -33.0]])
    assert torch.equal(a(points), b(points))
    assert a(points).shape == (2, 256)
    assert not any(p.requires_grad for p in a.parameters())


def test_supcon_prefers_aligned_views():
    labels = torch.tensor([0, 0, 1, 1])
    aligned = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert supervised_contrastive(aligned, aligned, labels) < supervised_contrastive(aligned, aligned.flip(1), labels)


def test_contrastive_loss_falls_on_a_toy_problem():
    torch.manual_seed(0)
    supervision = LocationSupervision(block_widths=[16], layer_blocks=[0])
    features = torch.nn.Parameter(torch.randn(8, 16, 2, 3))  # stands in for pre-MLP tokens (B, C, P, N)
    lonlat = torch.tensor([[10.0, 5.0]] * 4 + [[-100.0, -40.0]] * 4)
    labels = torch.tensor([0] * 4 + [1] * 4)
    optimizer = torch.optim.Adam(
        [features, *supervision.projections.parameters(), *supervision.norm.parameters()], lr=0.05
    )
    supervision.eval()  # no dropout, so the loss is a clean function of the parameters
    losses = []
    for _ in range(60):
        loss = supervision.loss({0: features}, lonlat, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
