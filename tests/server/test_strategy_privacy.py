"""Client-level DP, outlier rejection and the privacy budget in the strategy, on hand-built replies."""

import pytest
import torch

from geomoe.model.moe_layer import EXPERT_PARAMS
from geomoe.server.privacy import RoundMechanism, epsilon
from geomoe.server.replies import QueryReply
from geomoe.wire import messages as msg
from geomoe.wire.privacy import clip_update, update_norm

from .test_strategy import GRID, ListedNodes, in_a_task, make_strategy, reply_to  # noqa: F401 - fixture


def sent_to(strategy, server_round=1, grid=GRID):
    return {m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, None, None, grid)}


def trained_state(strategy):
    """Every row-sliced tensor by its message name (moe.{layer}.{param}, head.fc.*), copied."""
    model = strategy.model
    state = {f"moe.{layer}.{p}": getattr(m, p) for layer, m in model.moe_layers().items() for p in EXPERT_PARAMS}
    state |= {name: model.get_parameter(name) for name in ("head.fc.weight", "head.fc.bias")}
    return {k: v.detach().clone() for k, v in state.items()}


def scaled(factor):
    def change(update):
        for key, value in update.items():
            if value.is_floating_point():
                update[key] = value * factor

    return change


def rows_sent(message):
    """(tensor name, global row id) -> holders of that row, for the experts and head rows of a message."""
    tensors = msg.from_record(message.content[msg.EXPERTS]) | msg.from_record(message.content[msg.HEAD])
    for key, ids in tensors.items():
        if not key.endswith(".ids"):
            continue
        prefix = key.removesuffix(".ids")
        params = ("head.fc.weight", "head.fc.bias") if prefix == "head" else [f"{prefix}.{p}" for p in EXPERT_PARAMS]
        for param in params:
            for row in ids.tolist():
                yield param, row


def holders_of(messages) -> dict:
    """(tensor name, row) -> how many of the round's nodes were sent that row."""
    holders: dict = {}
    for message in messages.values():
        for key in rows_sent(message):
            holders[key] = holders.get(key, 0) + 1
    return holders


def test_clipping_bounds_each_nodes_influence_exactly():
    """Node 101 alone replies with a huge update; what it adds to the per-row sums has norm exactly C."""
    strategy = make_strategy(privacy={"clip_norm": 0.5})
    before = trained_state(strategy)
    messages = sent_to(strategy)
    holders = holders_of(messages)
    strategy.aggregate_train(1, [reply_to(messages[101], scaled(1000.0), unclipped=0.0)])
    after = trained_state(strategy)
    contribution = [(after[p][r] - before[p][r]).double() * holders[(p, r)] for p, r in rows_sent(messages[101])]
    assert float(torch.cat([c.flatten() for c in contribution]).norm()) == pytest.approx(0.5, rel=1e-5)


def test_without_noise_dp_aggregation_is_plain_aggregation_of_clipped_updates():
    private, plain = make_strategy(privacy={"clip_norm": 0.5}), make_strategy()
    for strategy, clip_first in ((private, False), (plain, True)):
        messages = sent_to(strategy)

        def change(factor, clip_first=clip_first):
            def apply(update):
                scaled(factor)(update)
                if clip_first:
                    update.update(clip_update(update, 0.5)[0])

            return apply

        strategy.aggregate_train(
            1,
            [
                reply_to(messages[101], change(3.0), unclipped=0.0),
                reply_to(messages[202], change(-0.001), unclipped=1.0),
            ],
        )
    for key, value in trained_state(plain).items():
        torch.testing.assert_close(trained_state(private)[key], value, msg=key)


def test_central_noise_has_the_calibrated_scale_and_spares_rows_nobody_holds():
    """No reply at all: each row some node holds still moves by N(0, (zC)^2) / its expected holders."""
    strategy = make_strategy(privacy={"clip_norm": 1.0, "noise_multiplier": 2.0})
    before = trained_state(strategy)
    messages = sent_to(strategy)
    holders = holders_of(messages)
    strategy.aggregate_train(1, [])
    after = trained_state(strategy)
    noise = torch.cat([((after[p][r] - before[p][r]) * n).flatten() for (p, r), n in holders.items()])
    assert noise.numel() > 5000 and float(noise.std()) == pytest.approx(2.0, rel=0.05)
    assert torch.equal(after["head.fc.weight"][0], before["head.fc.weight"][0])  # species 0: nobody's
    assert torch.equal(after["moe.1.w1"][3], before["moe.1.w1"][3])  # expert 3 of layer 1: nobody holds it


def test_epsilon_after_each_round_is_the_accountants_for_the_rounds_sampling():
    strategy = make_strategy(privacy={"clip_norm": 1.0, "noise_multiplier": 1.0}, clients_per_round=1)
    for server_round in (1, 2):
        messages = sent_to(strategy, server_round)
        strategy.aggregate_train(server_round, [reply_to(m, unclipped=1.0) for m in messages.values()])
        assert strategy.epsilon() == pytest.approx(epsilon([RoundMechanism(0.5, 1.0)] * server_round, 1e-5))


def test_dp_rounds_sample_each_node_independently_at_the_rate():
    strategy = make_strategy(privacy={"clip_norm": 1.0, "noise_multiplier": 1.0}, clients_per_round=1)
    sizes = [len(strategy.round_nodes(r, GRID)) for r in range(1, 201)]
    assert set(sizes) == {0, 1, 2}  # Poisson sampling: the count varies round to round
    assert sum(sizes) / len(sizes) == pytest.approx(1.0, abs=0.25)
    assert strategy.round_nodes(7, GRID) == strategy.round_nodes(7, GRID)  # fixed within a round


def test_a_round_over_the_budget_is_refused():
    strategy = make_strategy(privacy={"clip_norm": 1.0, "noise_multiplier": 1.0, "epsilon_budget": 1.0})
    reason = strategy.over_budget(1, 2)
    assert "round 1 would bring epsilon to" in reason and "over privacy.epsilon_budget=1" in reason
    generous = make_strategy(privacy={"clip_norm": 1.0, "noise_multiplier": 1.0, "epsilon_budget": 1e6})
    assert generous.over_budget(1, 2) is None


def test_adaptive_clipping_lowers_the_clip_when_every_update_fits():
    strategy = make_strategy(privacy={"clip_norm": 1.0, "adaptive_clip": True, "clip_count_stddev": 1e-9})
    messages = sent_to(strategy)
    assert float(messages[101].content[msg.CONFIG][msg.CLIP_NORM]) == 1.0
    strategy.aggregate_train(1, [reply_to(m, scaled(1e-6), unclipped=1.0) for m in messages.values()])
    assert strategy.state.clip_norm < 1.0
    assert float(sent_to(strategy, 2)[101].content[msg.CONFIG][msg.CLIP_NORM]) == strategy.state.clip_norm


def test_a_dp_reply_must_vote_zero_or_one():
    strategy = make_strategy(privacy={"clip_norm": 1.0})
    messages = sent_to(strategy)
    strategy.aggregate_train(1, [reply_to(messages[101], unclipped=0.5), reply_to(messages[202])])
    reasons = [r["reason"] for r in strategy.rejections.rows]
    assert any("unclipped must be 0 or 1" in r for r in reasons) and any("unclipped" in r for r in reasons)


def test_an_update_far_above_the_rounds_median_norm_is_left_out():
    strategy = make_strategy(outlier_factor=3.0)
    strategy.roster.nodes[303] = QueryReply(0, "0/", True, [1], 80)
    grid = ListedNodes([101, 202, 303])
    messages = sent_to(strategy, grid=grid)
    replies = [reply_to(messages[101], scaled(100.0)), reply_to(messages[202]), reply_to(messages[303])]
    strategy.aggregate_train(1, replies)
    assert [r["node"] for r in strategy.rejections.rows] == [101]
    assert "over" in strategy.rejections.rows[0]["reason"] and "outlier_factor" in strategy.rejections.rows[0]["reason"]


def test_a_coarse_location_level_registers_nodes_by_their_coarse_cell():
    """Cells 2/0123 and 2/0130 share the level-2 cell 2/01: both nodes report it and the reader takes it."""
    strategy = make_strategy(cells=("2/0123", "2/0130"), location_level=2)
    strategy.roster.nodes = {}
    queries = strategy.configure_query([101, 202], with_model=False)
    from .test_replies import query_reply

    strategy.register(0, [query_reply(queries[0], cell="2/01"), query_reply(queries[1], cell="2/01")])
    assert [n.cell for n in strategy.roster.nodes.values()] == ["2/01", "2/01"]
    assert sorted(n.name for n in strategy.roster.nodes.values()) == ["2/01", "2/01~202"]  # reports keep them apart
    strategy.roster.nodes = {}
    strategy.register(0, [query_reply(queries[0], cell="2/0123")])  # the fine cell is not what this run reports
    assert strategy.roster.nodes == {}


def test_update_norm_counts_every_float_tensor_and_no_ids():
    update = {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]]), "a.ids": torch.tensor([100])}
    assert update_norm(update) == 5.0
    clipped, norm = clip_update(update, 1.0)
    assert norm == 5.0 and update_norm(clipped) == pytest.approx(1.0) and clipped["a.ids"].item() == 100


def test_rows_that_expect_under_one_holder_a_round_are_named_once(caplog):
    """q = 0.5 over two nodes: a row held by one of them expects half a holder a round, a row both hold one."""
    strategy = make_strategy(privacy={"clip_norm": 1.0, "noise_multiplier": 1.0}, clients_per_round=1)
    with caplog.at_level("WARNING", logger="geomoe.server"):
        for server_round in (1, 2):
            messages = sent_to(strategy, server_round)
            strategy.aggregate_train(server_round, [reply_to(m, unclipped=1.0) for m in messages.values()])
    said = [r.getMessage() for r in caplog.records if "holder a round" in r.getMessage()]
    # experts held: layer 1: 0, 1 (both nodes), 2; layer 3: 2 (both); layers 5 and 7: two each. Species 1, 2 (both), 5.
    assert said == [
        "DP at q = 0.5: 6 of 8 held experts and 2 of 3 held species rows expect fewer than one holder a round: their "
        "noise is not averaged down, and in many rounds it is all that moves them; sample more nodes a round, or "
        'leave the head rows out of training (federation.trainable = "experts")'
    ]


def test_every_node_in_every_round_leaves_no_row_under_one_holder(caplog):
    strategy = make_strategy(privacy={"clip_norm": 1.0, "noise_multiplier": 1.0})
    with caplog.at_level("WARNING", logger="geomoe.server"):
        strategy.aggregate_train(1, [reply_to(m, unclipped=1.0) for m in sent_to(strategy).values()])
    assert not [r for r in caplog.records if "holder a round" in r.getMessage()]
