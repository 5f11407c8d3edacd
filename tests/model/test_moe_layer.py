import pytest
import torch
import torch.nn.functional as F

from geomoe.model.config import ModelConfig
from geomoe.model.moe_layer import MoEMlp


def make_layer(**kwargs) -> MoEMlp:
    torch.manual_seed(0)
    layer = MoEMlp(dim=8, expert_ids=list(range(4)), num_global_experts=4, expert_hidden=2, **kwargs)
    with torch.no_grad():  # distinct experts, so that routing matters
        for p in (layer.norm_weight, layer.norm_bias, layer.b1, layer.b2, layer.x_corr):
            p.normal_()
    return layer


def reference_forward(layer: MoEMlp, x: torch.Tensor) -> torch.Tensor:
    """Per-patch loop over experts with an explicit LayerNorm affine: the definition, slowly."""
    B, C, P, N = x.shape
    x_hat = F.group_norm(x, 1, eps=layer.eps)
    out = torch.zeros_like(x)
    routing = layer.route(x_hat.permute(0, 3, 2, 1).mean(2))
    gate, choice = routing.gate, routing.choice
    for b in range(B):
        for n in range(N):
            e = int(choice[b, n])
            tokens = x_hat[b, :, :, n].T * layer.norm_weight[e] + layer.norm_bias[e]  # (P, C)
            mlp = F.silu(tokens @ layer.w1[e] + layer.b1[e]) @ layer.w2[e] + layer.b2[e]
            g = layer.gamma[e]
            out[b, :, :, n] = (gate[b, n] * ((1 - g) * mlp + g * layer.x_corr[e])).T
    return out


def test_batched_dispatch_equals_per_patch_definition():
    layer = make_layer()
    x = torch.randn(3, 8, 4, 5)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)


def test_every_pixel_of_a_patch_goes_to_one_expert():
    layer = make_layer()
    x = torch.randn(2, 8, 4, 6)
    out = layer(x)
    x_hat = F.group_norm(x, 1, eps=layer.eps)
    gate = layer.route(x_hat.permute(0, 3, 2, 1).mean(2)).gate
    for b in range(2):
        for n in range(6):
            tokens = x_hat[b, :, :, n].T  # (P, C): the patch's pixels
            matching_per_pixel = []
            for p in range(4):
                matching = set()
                for e in range(4):
                    t = tokens[p] * layer.norm_weight[e] + layer.norm_bias[e]
                    mlp = F.silu(t @ layer.w1[e] + layer.b1[e]) @ layer.w2[e] + layer.b2[e]
                    y = gate[b, n] * ((1 - layer.gamma[e]) * mlp + layer.gamma[e] * layer.x_corr[e])
                    if torch.allclose(y, out[b, :, p, n], atol=1e-5):
                        matching.add(e)
                matching_per_pixel.append(matching)
            assert int(layer.last_choice[b, n]) in set.intersection(*matching_per_pixel)


def test_gradients_reach_only_the_experts_used():
    layer = make_layer()
    x = torch.randn(1, 8, 4, 3)
    layer(x).sum().backward()
    used = set(layer.last_choice.flatten().tolist())
    assert len(used) < 4, "the test needs at least one unused expert"
    for e in range(4):
        grads = {
            name: getattr(layer, name).grad[e]
            for name in ("w1", "b1", "w2", "b2", "norm_weight", "norm_bias", "gamma", "x_corr")
        }
        if e in used:
            assert all(grads[n].abs().sum() > 0 for n in ("w1", "w2", "b2", "x_corr", "gamma"))
        else:
            assert all(torch.all(g == 0) for g in grads.values()), e


def test_remove_policy_zeroes_patches_of_absent_experts():
    full = make_layer()
    x = torch.randn(2, 8, 4, 6)
    full(x)
    choice = full.last_choice
    kept = [int(choice[0, 0])]
    pruned = MoEMlp(8, kept, 4, 2, absent_policy="remove")
    pruned.load_state_dict(
        {
            **{
                k: v[kept]
                if k in ("norm_weight", "norm_bias", "w1", "b1", "w2", "b2", "gamma", "x_corr", "centroids")
                else v
                for k, v in full.state_dict().items()
            },
            "expert_ids": torch.tensor(kept),
            "absent_ids": torch.tensor([i for i in range(4) if i not in kept]),
            "absent_centroids": full.centroids.detach()[[i for i in range(4) if i not in kept]],
        }
    )
    out = pruned(x) + x  # the block adds the residual
    removed = choice != kept[0]
    assert removed.any()
    assert torch.all(out.permute(0, 3, 1, 2)[removed] == 0)


def test_routing_is_a_softmax_over_every_experts_cosine_similarity_and_the_best_held_expert_wins():
    """The papers' router, written out: cosine similarity between the min-max-scaled patch embedding and each
    centroid over a temperature, a softmax over all global experts; a layer holding some of them routes to its best
    one with the gate it has in that softmax, and knows when an expert it lacks would have won."""
    full = make_layer(gate_temperature=0.3)
    with torch.no_grad():
        full.scale_min.uniform_(-2, -1)
        full.scale_max.uniform_(1, 2)
    held, absent = [1, 3], [0, 2]
    layer = MoEMlp(dim=8, expert_ids=held, num_global_experts=4, gate_temperature=0.3)
    layer.load_state_dict({**layer.state_dict(), "scale_min": full.scale_min, "scale_max": full.scale_max})
    with torch.no_grad():
        layer.centroids.copy_(full.centroids[held])
        layer.absent_centroids.copy_(full.centroids[absent])
    patch_embedding = torch.randn(3, 40, 8)
    scaled = (patch_embedding - full.scale_min) / (full.scale_max - full.scale_min)
    probs = (F.cosine_similarity(scaled[..., None, :], full.centroids, dim=-1) / 0.3).softmax(dim=-1)  # (B, N, 4)

    routing = layer.route(patch_embedding)
    gate, local = probs[..., held].max(dim=-1)
    torch.testing.assert_close(routing.choice, local)
    torch.testing.assert_close(routing.gate, gate)
    torch.testing.assert_close(routing.absent_gate, probs[..., absent].max(dim=-1).values)
    wants_absent = torch.isin(probs.argmax(dim=-1), torch.tensor(absent))
    assert torch.equal(routing.wants_absent, wants_absent) and 0 < wants_absent.sum() < wants_absent.numel()
    torch.testing.assert_close(full.route(patch_embedding).gate, probs.max(dim=-1).values)


def test_a_gate_rank_wider_than_the_layer_or_below_one_is_refused():
    with pytest.raises(ValueError, match="gate_rank 9 exceeds the width 8"):
        make_layer(gate_rank=9)
    with pytest.raises(ValueError, match="gate_rank must be None"):
        ModelConfig(gate_rank=0)
