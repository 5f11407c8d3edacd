"""The server's trust boundary, one row per hole: what an adversarial or broken node sends is rejected with a
reason, the round goes on with the good replies, and the global model stays finite."""

import json
import math

import numpy as np
import pytest
import torch
import zstandard
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from geomoe.server.checkpoint import atomic_write, load_model, save_model
from geomoe.wire import messages as msg
from geomoe.wire.compression import ErrorFeedback, Pipeline

from .test_strategy import GRID, in_a_task, make_strategy, reply_to  # noqa: F401 - fixture


def train_messages(strategy):
    return {m.metadata.dst_node_id: m for m in strategy.configure_train(1, None, None, GRID)}


def with_metrics(**metrics):
    def change(content: RecordDict) -> None:
        content[msg.METRICS] = MetricRecord({"examples": 50.0, "train_loss": 1.0, **metrics})

    return change


def with_counts(layer_value):
    def change(content: RecordDict) -> None:
        counts = {f"counts.{layer}": torch.ones(4) for layer in (1, 3, 5, 7)}
        counts["counts.1"] = layer_value
        content[msg.TOKENS] = msg.to_record(counts)

    return change


def huge_delta(content: RecordDict) -> None:
    update = msg.from_record(content[msg.UPDATE])
    update["moe.1.w1"] = torch.full_like(update["moe.1.w1"], 1e30)
    content[msg.UPDATE] = msg.to_record(update)


def compressed(pipeline: str, tamper=None):
    """The update packed with `pipeline`; `tamper(arrays, description)` edits what travels."""

    def change(content: RecordDict) -> None:
        update = msg.from_record(content[msg.UPDATE])
        arrays, description = ErrorFeedback().compress(update, Pipeline.parse(pipeline), msg.key_category)
        metas = json.loads(description)
        if tamper:
            tamper(arrays, metas)
        content[msg.UPDATE] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        content[msg.UPDATE + msg.CODEC] = ConfigRecord({"pipeline": pipeline, "tensors": json.dumps(metas)})

    return change


def topk_shape(arrays, metas):
    metas["experts"]["moe.1.w1"][0] = [100_000, 1_000_000]  # 1e11 values: must be refused before allocating


def topk_bitmap(arrays, metas):
    arrays["experts"] = np.full_like(arrays["experts"], 255)  # every position kept: more than top-k keeps


def zstd_bomb(arrays, metas):
    bomb = zstandard.ZstdCompressor().compress(bytes(50_000_000))  # 50 MB of zeros in a few kB
    arrays["experts"] = np.frombuffer(bomb, dtype=np.uint8)


def zstd_garbage(arrays, metas):
    arrays["experts"] = np.frombuffer(b"not a zstd frame at all", dtype=np.uint8)


TRAIN_CASES = [
    # (case, upload pipeline of the run, change to node 101's reply, reason)
    ("examples infinite", "none", with_metrics(examples=math.inf), "examples must be a finite number"),
    ("examples negative", "none", with_metrics(examples=-50.0), "outside"),
    ("examples beyond what it declared", "none", with_metrics(examples=1e12), "outside"),
    ("examples a list", "none", with_metrics(examples=[1.0, 2.0]), "examples must be a finite number"),
    ("no metrics", "none", lambda c: c.__delitem__(msg.METRICS), "no metrics record"),
    ("token counts infinite", "none", with_counts(torch.tensor([math.inf, 1, 1, 1])), "finite and non-negative"),
    ("token counts negative", "none", with_counts(torch.tensor([-5.0, 1, 1, 1])), "finite and non-negative"),
    ("token counts misshapen", "none", with_counts(torch.ones(9)), "counts.1: got (9,)"),
    ("token counts beyond its examples", "none", with_counts(torch.full((4,), 1e9)), "more than its 50 examples"),
    ("a finite but huge update", "none", huge_delta, "update norm"),
    ("compressed when the run is not", "none", compressed("int8+zstd"), "this run uploads uncompressed"),
    ("another codec than the run's", "int8+zstd", compressed("fp16"), "codec 'fp16'"),
    ("top-k shape of 1e11", "topk0.5", compressed("topk0.5", topk_shape), "described shape"),
    ("top-k bitmap keeping too much", "topk0.5", compressed("topk0.5", topk_bitmap), "top-k bitmap"),
    ("zstd bomb", "zstd", compressed("zstd", zstd_bomb), "their description says"),
    ("bad zstd frame", "zstd", compressed("zstd", zstd_garbage), "does not decode"),
]


@pytest.mark.parametrize(("case", "pipeline", "change", "reason"), TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_a_bad_train_reply_is_rejected_and_the_rest_applied(case, pipeline, change, reason):
    strategy = make_strategy()
    strategy.cfg.train.epochs = 1
    strategy.reader.upload = pipeline
    strategy.fed.max_update_norm = 1e6 if case != "a finite but huge update" else 10.0
    before = strategy.model.moe_layers()[5].w1.detach().clone()
    messages = train_messages(strategy)
    bad = reply_to(messages[101], examples=50)
    change(bad.content)
    good = reply_to(messages[202], examples=150)
    if pipeline != "none":
        compressed(pipeline)(good.content)
    strategy.aggregate_train(1, [bad, good])
    assert [r["node"] for r in strategy.rejections] == [101], strategy.rejections
    assert reason in strategy.rejections[0]["reason"]
    after = strategy.model.moe_layers()[5].w1.detach()
    assert torch.isfinite(after).all()
    if Pipeline.parse(pipeline).lossy:
        assert not torch.equal(after[0], before[0])  # node 202's expert 0 of layer 5 still applied
    else:
        assert torch.allclose(after[0], before[0] + 1)
    assert torch.equal(after[3], before[3])  # node 101's was not


def test_a_node_replying_twice_has_neither_reply_counted():
    strategy = make_strategy()
    messages = train_messages(strategy)
    _, metrics = strategy.aggregate_train(
        1,
        [
            reply_to(messages[101], examples=50),
            reply_to(messages[101], examples=50),
            reply_to(messages[202], examples=150),
        ],
    )
    assert metrics["replies"] == 1 and "second reply" in strategy.rejections[0]["reason"]


def test_the_base_is_sent_again_until_a_reply_shows_it_arrived():
    strategy = make_strategy()
    strategy.nodes[101].has_base = False
    first = train_messages(strategy)
    assert msg.BASE in first[101].content and msg.BASE not in first[202].content
    strategy.aggregate_train(1, [Message(Error(code=1, reason="timed out"), reply_to=first[101])])
    second = train_messages(strategy)
    assert msg.BASE in second[101].content  # the failed node gets it again
    strategy.aggregate_train(2, [reply_to(second[101], examples=50)])
    assert msg.BASE not in train_messages(strategy)[101].content


def query_reply(message: Message, **changes) -> Message:
    info = {"location": 0, "cell": "0/", "has-base": True, "species": "[1, 2]", "train-examples": 50, **changes}
    info = {k: v for k, v in info.items() if v is not None}
    return Message(RecordDict({msg.INFO: ConfigRecord(info)}), reply_to=message)


QUERY_CASES = [
    ("another location's cell", {"cell": "4/"}, "that location's cell is '0/'"),
    ("a location that does not exist", {"location": 7}, "location must be an integer in 0..1"),
    ("species out of range", {"species": "[1, 99999]"}, "species must be ids in 0..23"),
    ("species repeated", {"species": json.dumps([5] * 1000)}, "species ids repeat"),
    ("species not a list", {"species": '{"a": 1}'}, "species must be a JSON list"),
    ("no train-examples", {"train-examples": None}, "train-examples must be an integer"),
    ("no location", {"location": None}, "location must be an integer"),
    ("has-base not a bool", {"has-base": "yes"}, "has-base must be true or false"),
    ("negative left-out counts", {"skipped": '{"bad": -3}'}, "skipped must map names to non-negative counts"),
]


@pytest.mark.parametrize(("case", "changes", "reason"), QUERY_CASES, ids=[c[0] for c in QUERY_CASES])
def test_a_bad_query_reply_is_not_registered(case, changes, reason, caplog):
    strategy = make_strategy()
    strategy.nodes = {}
    [query] = strategy.configure_query([101], with_model=False)
    strategy.register([query_reply(query, **changes)])
    assert strategy.nodes == {}
    assert reason in caplog.text


def test_a_query_reply_with_nan_routing_sets_no_keep_set(caplog):
    strategy = make_strategy()
    strategy.nodes, strategy.state.keep = {}, {}
    [query] = strategy.configure_query([101], with_model=True)
    reply = query_reply(query)
    routing = {f"counts.{layer}": torch.ones(4) for layer in (1, 3, 5, 7)}
    routing |= {f"edges.{layer}": torch.ones(4, 4) for layer in (1, 3, 5)}
    routing["counts.3"][0] = math.nan
    reply.content[msg.TOKENS] = msg.to_record(routing)
    strategy.register([reply])
    assert strategy.nodes == {} and strategy.state.keep == {}
    assert "counts.3: counts must be finite" in caplog.text


def test_a_good_query_reply_is_registered():
    strategy = make_strategy()
    strategy.nodes = {}
    [query] = strategy.configure_query([101], with_model=False)
    strategy.register([query_reply(query, skipped='{"unreadable": 2}')])
    node = strategy.nodes[101]
    assert (node.location, node.cell, node.species, node.train_examples, node.skipped) == (
        0,
        "0/",
        [1, 2],
        50,
        {"unreadable": 2},
    )


class Payload:
    """Runs code when unpickled: a checkpoint must never do that."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_a_checkpoint_carrying_code_fails_to_load_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    strategy = make_strategy()
    save_model(strategy.model, tmp_path / "checkpoint.pt", server_state={"completed_round": 1})
    load_model(tmp_path / "checkpoint.pt")  # tensors and plain data load
    data = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    data["setup"] = Payload()
    torch.save(data, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to load it"):
        load_model(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "report.json"
    atomic_write(path, b'{"round": 1}')

    def crash(f):
        f.write(b'{"round": 2, "trunc')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_bytes() == b'{"round": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind
