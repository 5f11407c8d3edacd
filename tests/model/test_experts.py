import pytest
import torch

from geomoe.model.counting import parameter_count
from geomoe.model.experts import merge_expert_state, prune_model, take_expert_state


def test_subset_state_round_trips_exactly(moe_model):
    keep = {1: [0, 3, 5], 3: [2], 5: [1, 7], 7: [4]}
    state = take_expert_state(moe_model, keep)
    target = prune_model(moe_model, keep)
    with torch.no_grad():
        for module in target.moe_layers().values():
            for p in (module.w1, module.b2, module.centroids):
                p.zero_()
    merge_expert_state(target, state)
    again = take_expert_state(target)
    assert state.keys() == again.keys()
    for key in state:
        assert torch.equal(state[key], again[key]), key


def test_pruned_model_is_physically_smaller_and_holds_only_its_experts(moe_model):
    keep = {layer: [0, 1] for layer in moe_model.cfg.moe_layers}
    pruned = prune_model(moe_model, keep)
    assert parameter_count(pruned) < parameter_count(moe_model)
    for module in pruned.moe_layers().values():
        assert module.w1.shape[0] == 2 and module.expert_ids.tolist() == [0, 1]
        assert module.absent_centroids.shape[0] == 6


def test_pruned_model_matches_full_model_on_images_whose_experts_were_kept(moe_model, images):
    full_logits = moe_model(images)
    used = {layer: sorted(set(m.last_choice[0].tolist())) for layer, m in moe_model.moe_layers().items()}
    pruned = prune_model(moe_model, used).eval()
    logits = pruned(images)
    torch.testing.assert_close(logits[0], full_logits[0], rtol=1e-5, atol=1e-5)


def test_merging_an_expert_the_model_does_not_hold_fails(moe_model):
    pruned = prune_model(moe_model, {1: [0]})
    with pytest.raises(KeyError, match="not held"):
        merge_expert_state(pruned, take_expert_state(moe_model, {1: [2]}))


def test_pruned_head_keeps_local_species_and_an_other_output(moe_model, images):
    from geomoe.model.network import prune_head
    from geomoe.model.training import head_targets

    full = moe_model(images)
    pruned = prune_head(moe_model, [2, 7]).eval()
    assert pruned.head.class_ids.tolist() == [2, 7, -1]
    logits = pruned(images)
    torch.testing.assert_close(logits[:, :2], full[:, [2, 7]], rtol=1e-5, atol=1e-5)
    assert head_targets(torch.tensor([7, 3, 2]), pruned.head.class_ids).tolist() == [1, 2, 0]
    assert parameter_count(pruned) < parameter_count(moe_model)
