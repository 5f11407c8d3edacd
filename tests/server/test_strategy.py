"""Prepare / Execute / Assert on hand-built replies, as Flower's own strategy tests do."""

import pytest
import torch
from flwr.app import Error, Message, MetricRecord, RecordDict

from geomoe.model.experts import shared_state
from geomoe.model.network import GeoMoENet
from geomoe.server.replies import QueryReply
from geomoe.server.state import ServerState
from geomoe.server.strategy import GeoExpertStrategy
from geomoe.wire import messages as msg
from geomoe.wire.privacy import PrivacyConfig
from geomoe.wire.run_config import RunConfig


@pytest.fixture(autouse=True)
def in_a_task(task_identity):
    """Every test here builds messages."""


class ListedNodes:
    """The one thing the strategy asks of a Grid here: which nodes the SuperLink lists."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids


GRID = ListedNodes([101, 202])


def make_strategy(strategy: str = "expert", privacy: dict | None = None, cells=("0/", "4/"), **federation):
    """Nodes 101 (location 0) and 202 (location 1) registered, each with its keep set; `privacy` and `federation`
    set fields of those config tables."""
    cfg = RunConfig()
    cfg.model.num_experts = 4
    cfg.federation.strategy = strategy
    cfg.federation.weighting = "examples"
    cfg.federation.max_update_norm = 1e6  # replies move every tensor by +1: exact expectations, not realistic norms
    cfg.federation.max_row_update_norm = 1e6
    for key, value in federation.items():
        setattr(cfg.federation, key, value)
    cfg.privacy = PrivacyConfig(**(privacy or {}))
    cfg.__post_init__()
    torch.manual_seed(0)
    model = GeoMoENet(cfg.model)
    keep = {0: {1: [0, 1], 3: [2], 5: [3], 7: [0]}, 1: {1: [1, 2], 3: [2], 5: [0], 7: [1]}}
    s = GeoExpertStrategy(cfg, model, shared_state(model), ServerState(keep=keep), world={msg.CELLS: list(cells)})
    s.roster.nodes.update(
        {101: QueryReply(0, "0/", True, [1, 2], 50, 20), 202: QueryReply(1, "4/", True, [2, 5], 150, 60)}
    )
    return s


def reply_to(message: Message, change=None, examples: float = 50.0, **metrics) -> Message:
    """A well-formed reply: every sent tensor moved by +1 (ids unchanged)."""
    sent = {}
    for name in (msg.EXPERTS, msg.HEAD, msg.SHARED):
        if name in message.content:
            sent.update(msg.from_record(message.content[name]))
    update = {k: v if k.endswith(".ids") else torch.ones_like(v) for k, v in sent.items()}
    if change:
        change(update)
    counts = {f"counts.{layer}": torch.ones(4) for layer in (1, 3, 5, 7)}
    content = RecordDict(
        {
            msg.UPDATE: msg.to_record(update),
            msg.TOKENS: msg.to_record(counts),
            msg.METRICS: MetricRecord({"examples": examples, "train_loss": 1.0, **metrics}),
        }
    )
    return Message(content, reply_to=message)


def test_each_node_gets_only_its_experts_and_species_rows():
    strategy = make_strategy()
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, None, None, GRID)}
    experts = msg.from_record(messages[101].content[msg.EXPERTS])
    assert experts["moe.1.ids"].tolist() == [0, 1] and experts["moe.1.w1"].shape[0] == 2
    router = msg.from_record(messages[101].content[msg.ROUTER])
    assert router["moe.1.absent_centroids"].shape[0] == 2  # the other two experts' centroids only
    assert msg.from_record(messages[202].content[msg.HEAD])["head.ids"].tolist() == [2, 5]
    assert msg.SHARED not in messages[101].content and msg.BASE not in messages[101].content


def test_the_run_config_travels_once_with_the_query_not_with_every_round():
    strategy = make_strategy()
    [query] = strategy.configure_query([101], with_model=False)
    assert RunConfig.from_json(str(query.content[msg.CONFIG]["run"])).model.num_experts == 4
    train = strategy.configure_train(1, None, None, GRID)[0]
    assert set(train.content[msg.CONFIG]) == {"round", "location"}


def test_experts_average_over_their_holders_only():
    strategy = make_strategy()
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, None, None, GRID)}
    replies = [reply_to(messages[101], examples=50), reply_to(messages[202], examples=150)]  # at most declared
    strategy.aggregate_train(1, replies)
    w1 = strategy.model.moe_layers()[1].w1.detach()
    w1_before = before["backbone.stages.2.1.transformer.1.mlp.w1"]
    assert torch.allclose(w1[[0, 1, 2]], w1_before[[0, 1, 2]] + 1)  # held by one or both: mean of +1 is +1
    assert torch.equal(w1[3], w1_before[3])  # held by nobody
    head = strategy.model.head.fc.weight.detach()
    assert torch.allclose(head[[1, 2, 5]], before["head.fc.weight"][[1, 2, 5]] + 1)
    assert torch.equal(head[0], before["head.fc.weight"][0])
    assert not strategy.rejections.rows


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda u: u.update({"moe.1.ids": torch.tensor([0, 3])}), "not given"),
        (lambda u: u.update({"backbone.stem.conv.weight": torch.zeros(3)}), "unknown"),
        (lambda u: u["moe.1.w1"].__setitem__((0, 0, 0), float("nan")), "NaN"),
        (lambda u: u.update({"moe.1.w1": torch.ones(2, 64, 3)}), "shape (2, 64, 3)"),
    ],
)
def test_a_bad_reply_is_rejected_and_the_round_goes_on(change, reason):
    strategy = make_strategy()
    before = strategy.model.moe_layers()[5].w1.detach().clone()
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, None, None, GRID)}
    strategy.aggregate_train(1, [reply_to(messages[101], change), reply_to(messages[202])])
    assert len(strategy.rejections.rows) == 1 and reason in strategy.rejections.rows[0]["reason"]
    assert strategy.rejections.rows[0]["node"] == 101
    after = strategy.model.moe_layers()[5].w1.detach()
    assert torch.allclose(after[0], before[0] + 1)  # node 202's expert 0 of layer 5 was still applied
    assert torch.equal(after[3], before[3])  # node 101's was not


def test_error_replies_and_missing_nodes_do_not_stall_the_round():
    strategy = make_strategy()
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, None, None, GRID)}
    failed = Message(Error(code=1, reason="out of memory"), reply_to=messages[101])
    arrays, metrics = strategy.aggregate_train(1, [failed])
    assert arrays is None and "out of memory" in strategy.rejections.rows[0]["reason"]
    _, metrics = strategy.aggregate_train(1, [reply_to(messages[202])])
    assert metrics["replies"] == 1


def test_dense_fedavg_of_the_same_parts_sends_every_expert_and_head_row_but_no_shared_tensor():
    strategy = make_strategy("fedavg")  # trainable "experts+head", as the per-expert runs
    message = strategy.configure_train(1, None, None, GRID)[0]
    assert msg.from_record(message.content[msg.EXPERTS])["moe.5.ids"].tolist() == [0, 1, 2, 3]
    assert msg.from_record(message.content[msg.HEAD])["head.ids"].tolist() == list(
        range(strategy.cfg.model.num_classes)
    )
    assert msg.SHARED not in message.content


def test_dense_fedavg_of_the_whole_model_sends_everything_and_averages_by_examples():
    strategy = make_strategy("fedavg", trainable="all")
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, None, None, GRID)}
    shared = msg.from_record(messages[101].content[msg.SHARED])
    assert "backbone.stem.conv.weight" in shared
    assert msg.from_record(messages[101].content[msg.EXPERTS])["moe.1.ids"].tolist() == [0, 1, 2, 3]
    before = strategy.model.state_dict()["backbone.stem.conv.weight"].clone()

    def plus_three(u):
        u["backbone.stem.conv.weight"] = torch.full_like(u["backbone.stem.conv.weight"], 3.0)

    strategy.aggregate_train(
        1, [reply_to(messages[101], examples=50), reply_to(messages[202], plus_three, examples=150)]
    )
    after = strategy.model.state_dict()["backbone.stem.conv.weight"]
    assert torch.allclose(after, before + (1 * 50 + 3 * 150) / 200)


def test_nodes_the_superlink_no_longer_lists_get_no_messages():
    strategy = make_strategy()
    messages = strategy.configure_train(2, None, None, ListedNodes([202, 999]))
    assert [m.metadata.dst_node_id for m in messages] == [202]
    assert [m.metadata.dst_node_id for m in strategy.configure_evaluate(2, None, None, ListedNodes([101]))] == [101]
