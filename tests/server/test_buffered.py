"""Buffered asynchronous aggregation's bookkeeping: per-row staleness, discounting, and which updates may count."""

import pytest
import torch

from geomoe.server.buffered import Ledger, Refused, RowVersions, Sent, discount, stalest
from geomoe.server.replies import TrainReply, spec_of


def update(experts: list[int], head: list[int]) -> dict[str, torch.Tensor]:
    return {
        "moe.1.ids": torch.tensor(experts),
        "moe.1.w1": torch.ones(len(experts), 4, 2),
        "head.ids": torch.tensor(head),
        "head.fc.weight": torch.ones(len(head), 4),
        "head.fc.bias": torch.ones(len(head)),
    }


def reply(experts: list[int], head: list[int]) -> TrainReply:
    return TrainReply(update(experts, head), {}, 10.0, 0.5, None, 0.0, 0.0)


def sent(versions: RowVersions, experts: list[int], head: list[int]) -> Sent:
    spec = spec_of(update(experts, head))
    return Sent(spec, versions.snapshot(spec), 0.0)


def test_an_expert_nobody_else_touched_does_not_go_stale():
    versions = RowVersions.start({1: 4}, num_classes=3)
    mine = sent(versions, experts=[0, 1], head=[0])
    versions.advance([reply(experts=[2, 3], head=[1])])  # another node's experts and species
    assert stalest(versions.staleness(mine)) == 0
    versions.advance([reply(experts=[1], head=[2])])
    staleness = versions.staleness(mine)
    assert staleness["moe.1"].tolist() == [0, 1] and staleness["head"].tolist() == [0]


def test_stale_rows_are_scaled_down_and_fresh_ones_are_not():
    answer = reply(experts=[0, 1], head=[0])
    discount(answer, {"moe.1": torch.tensor([0, 3]), "head": torch.tensor([1])}, exponent=0.5)
    assert torch.allclose(answer.update["moe.1.w1"][0], torch.ones(4, 2))
    assert torch.allclose(answer.update["moe.1.w1"][1], torch.full((4, 2), 0.5))  # (1 + 3)^-0.5
    assert torch.allclose(answer.update["head.fc.bias"], torch.tensor([2**-0.5]))
    assert answer.update["moe.1.ids"].tolist() == [0, 1]  # ids untouched


def test_an_update_counts_once_and_only_for_a_version_sent_to_its_node():
    versions, ledger = RowVersions.start({1: 4}, num_classes=3), Ledger()
    ledger.record("a", 0, sent(versions, [0], [0]))
    with pytest.raises(Refused, match="ahead of the server") as future:
        ledger.claim("a", 5, current=1)
    assert future.value.kind == "future"
    with pytest.raises(Refused, match="never sent this node") as unsent:
        ledger.claim("b", 0, current=1)
    assert unsent.value.kind == "unsent"
    assert ledger.claim("a", 0, current=1).spec.ids["moe.1.ids"].tolist() == [0]
    ledger.take("a", 0)
    with pytest.raises(Refused, match="duplicate delivery") as duplicate:
        ledger.claim("a", 0, current=1)
    assert duplicate.value.kind == "duplicate"


def test_a_send_whose_update_could_no_longer_count_is_forgotten_and_refused_as_stale():
    versions, ledger = RowVersions.start({1: 4}, num_classes=3), Ledger()
    ledger.record("a", 0, sent(versions, [0], [0]))
    ledger.record("b", 0, sent(versions, [3], [2]))
    for _ in range(3):
        versions.advance([reply(experts=[0], head=[1])])
    ledger.forget_stale(versions, max_staleness=2)
    assert ("a", 0) not in ledger.sent and ("b", 0) in ledger.sent  # b's rows did not change
    with pytest.raises(Refused, match="staler than federation.max_staleness") as stale:
        ledger.claim("a", 0, current=3)
    assert stale.value.kind == "stale"
