import numpy as np
import torch

from geomoe.model.importance import KeepPolicy, RoutingStats, keep_set, per_expert_importance, routing_stats


def hand_stats() -> RoutingStats:
    edges = np.zeros((4, 4))
    edges[0, 1] = 0.6  # the heavy path 0 -> 1
    edges[2, 3] = 0.3
    edges[3, 0] = 0.1
    return RoutingStats([1, 3], {1: np.array([6.0, 0, 3, 1]), 3: np.array([1.0, 6, 0, 3])}, {1: edges})


def test_keep_set_from_hand_made_graph():
    assert keep_set(hand_stats(), KeepPolicy(percentile=97)) == {1: [0], 3: [1]}
    assert keep_set(hand_stats(), KeepPolicy(percentile=90)) == {1: [0, 2], 3: [1, 3]}  # threshold 0.2
    assert keep_set(hand_stats(), KeepPolicy(percentile=80)) == {1: [0, 2, 3], 3: [0, 1, 3]}  # every used edge


def test_keep_set_caps_and_always_keeps():
    keep = keep_set(hand_stats(), KeepPolicy(percentile=90, max_per_layer=1, always_keep={3: [2]}))
    assert keep == {1: [0], 3: [1, 2]}


def test_importance_selects_fewer_experts_as_the_percentile_rises(moe_model):
    batches = [(torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    stats = routing_stats(moe_model, batches)
    sizes = [sum(len(v) for v in keep_set(stats, KeepPolicy(percentile=q)).values()) for q in (0, 50, 90, 99)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_per_expert_importance_covers_every_held_expert(moe_model):
    batches = [(torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.arange(8))]
    drops = per_expert_importance(moe_model, batches)
    assert set(drops) == set(moe_model.cfg.moe_layers)
    assert all(set(d) == set(range(8)) for d in drops.values())
