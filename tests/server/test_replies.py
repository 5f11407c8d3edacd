"""The server's trust boundary, one row per hole: what an adversarial or broken node sends is rejected with a
reason, the round goes on with the good replies, and the global model stays finite."""

import io
import json
import math

import numpy as np
import pytest
import torch
import zstandard
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from geomoe.data.atomic_file import atomic_write
from geomoe.server.checkpoint import load_model, save_model
from geomoe.wire import messages as msg
from geomoe.wire.bounded import finite_json
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
    ("token counts misshapen", "none", with_counts(torch.ones(9)), "counts.1: shape (9,)"),
    ("token counts beyond its examples", "none", with_counts(torch.full((4,), 1e9)), "more than its 50 examples"),
    ("a finite but huge update", "none", huge_delta, "update norm"),
    ("compressed when the run is not", "none", compressed("int8+zstd"), "this run uploads 'none'"),
    ("another codec than the run's", "int8+zstd", compressed("fp16"), "codec 'fp16'"),
    ("uncompressed when the run compresses", "int8+zstd", lambda c: None, "an uncompressed update"),
    ("a looser top-k than the run's", "topk0.1+int8", compressed("topk0.5+int8"), "may only tighten"),
    ("a tighter top-k with another quantizer", "int8+zstd", compressed("topk0.1+fp16+zstd"), "may only tighten"),
    ("link windows zero", "none", with_metrics(**{"link-windows": 0}), "link-windows=0"),
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
    strategy.fed.max_update_norm = 1e6 if case != "a finite but huge update" else 100.0
    before = strategy.model.moe_layers()[5].w1.detach().clone()
    messages = train_messages(strategy)
    bad = reply_to(messages[101], examples=50)
    change(bad.content)
    good = reply_to(messages[202], examples=150)
    if pipeline != "none":
        compressed(pipeline)(good.content)
    strategy.aggregate_train(1, [bad, good])
    assert [r["node"] for r in strategy.rejections.rows] == [101], strategy.rejections.rows
    assert reason in strategy.rejections.rows[0]["reason"]
    after = strategy.model.moe_layers()[5].w1.detach()
    assert torch.isfinite(after).all()
    if Pipeline.parse(pipeline).lossy:
        assert not torch.equal(after[0], before[0])  # node 202's expert 0 of layer 5 still applied
    else:
        assert torch.allclose(after[0], before[0] + 1)
    assert torch.equal(after[3], before[3])  # node 101's was not


def test_a_node_on_a_budgeted_link_may_tighten_the_runs_top_k_and_is_counted_as_compressed():
    strategy = make_strategy()
    strategy.cfg.train.epochs = 1
    strategy.reader.upload = "int8+zstd"
    messages = train_messages(strategy)
    tightened, deferred = reply_to(messages[101], examples=50), reply_to(messages[202], examples=150)
    compressed("topk0.25+int8+zstd")(tightened.content)
    compressed("int8+zstd")(deferred.content)
    deferred.content[msg.METRICS]["link-windows"] = 3.0
    _, metrics = strategy.aggregate_train(1, [tightened, deferred])
    assert strategy.rejections.rows == []
    assert (metrics["link_compressed"], metrics["link_deferred"]) == (1, 1)


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
    assert metrics["replies"] == 1 and "second reply" in strategy.rejections.rows[0]["reason"]


def test_the_base_is_sent_again_until_a_reply_shows_it_arrived():
    strategy = make_strategy()
    strategy.roster.nodes[101].has_base = False
    first = train_messages(strategy)
    assert msg.BASE in first[101].content and msg.BASE not in first[202].content
    strategy.aggregate_train(1, [Message(Error(code=1, reason="timed out"), reply_to=first[101])])
    second = train_messages(strategy)
    assert msg.BASE in second[101].content  # the failed node gets it again
    strategy.aggregate_train(2, [reply_to(second[101], examples=50)])
    assert msg.BASE not in train_messages(strategy)[101].content


def query_reply(message: Message, **changes) -> Message:
    info = {
        "location": 0,
        "cell": "0/",
        "has-base": True,
        "species": "[1, 2]",
        "train-examples": 50,
        "test-examples": 20,
        **changes,
    }
    info = {k: v for k, v in info.items() if v is not None}
    return Message(RecordDict({msg.INFO: ConfigRecord(info)}), reply_to=message)


QUERY_CASES = [
    ("another location's cell", {"cell": "4/"}, "that location's cell is '0/'"),
    ("a location that does not exist", {"location": 7}, "location must be an integer in 0..1"),
    ("species out of range", {"species": "[1, 99999]"}, "species must be ids in 0..23"),
    ("species repeated", {"species": "[5, 5]"}, "species ids repeat"),
    ("species not a list", {"species": '{"a": 1}'}, "species must be a JSON list"),
    ("no train-examples", {"train-examples": None}, "train-examples must be an integer"),
    ("no location", {"location": None}, "location must be an integer"),
    ("has-base not a bool", {"has-base": "yes"}, "has-base must be true or false"),
    ("negative left-out counts", {"skipped": '{"bad": -3}'}, "skipped must map names to counts"),
]


@pytest.mark.parametrize(("case", "changes", "reason"), QUERY_CASES, ids=[c[0] for c in QUERY_CASES])
def test_a_bad_query_reply_is_not_registered(case, changes, reason, caplog):
    strategy = make_strategy()
    strategy.roster.nodes = {}
    [query] = strategy.configure_query([101], with_model=False)
    strategy.register(0, [query_reply(query, **changes)])
    assert strategy.roster.nodes == {}
    assert reason in caplog.text


def test_a_query_reply_with_nan_routing_sets_no_keep_set(caplog):
    strategy = make_strategy()
    strategy.roster.nodes, strategy.state.keep = {}, {}
    [query] = strategy.configure_query([101], with_model=True)
    reply = query_reply(query)
    routing = {f"counts.{layer}": torch.ones(4) for layer in (1, 3, 5, 7)}
    routing |= {f"edges.{layer}": torch.ones(4, 4) for layer in (1, 3, 5)}
    routing["counts.3"][0] = math.nan
    reply.content[msg.TOKENS] = msg.to_record(routing)
    strategy.register(0, [reply])
    assert strategy.roster.nodes == {} and strategy.state.keep == {}
    assert "counts.3: counts must be finite" in caplog.text


def test_a_good_query_reply_is_registered():
    strategy = make_strategy()
    strategy.roster.nodes = {}
    [query] = strategy.configure_query([101], with_model=False)
    strategy.register(0, [query_reply(query, skipped='{"unreadable": 2}')])
    node = strategy.roster.nodes[101]
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


# --- holes found by probing as an attacker would (issue 33): each one ended or distorted the run -------------------


def small_steps(update: dict[str, torch.Tensor]) -> None:
    """Every tensor moved by 0.01 instead of 1: within the default norm bounds."""
    update.update({k: v * 0.01 for k, v in update.items() if v.is_floating_point()})


def npy_claiming(shape: tuple[int, ...]) -> Array:
    """A 128-byte `.npy` whose header claims `shape` of float32 (np.load would allocate all of it)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=buffer.getvalue())


def deep_codec(content: RecordDict) -> None:
    compressed("int8+zstd")(content)
    content[msg.UPDATE + msg.CODEC] = ConfigRecord({"pipeline": "int8+zstd", "tensors": "[" * 5000})


def claimed_update(content: RecordDict) -> None:
    content[msg.UPDATE]["moe.1.w1"] = npy_claiming((10**12,))


def claimed_counts(content: RecordDict) -> None:
    content[msg.TOKENS]["counts.3"] = npy_claiming((10**12,))


def renamed_copies(content: RecordDict) -> None:
    """One array under 60 extra names: Flower sends it once, a reader that copies every name decodes it 61 times."""
    record = content[msg.UPDATE]
    for index in range(60):
        record[f"moe.1.w1.copy{index}"] = record["moe.1.w1"]


def moved_head_bias(content: RecordDict) -> None:
    """Within the whole-update norm, all of it spent on one species' bias: one node moves a head bias by ~30."""
    update = msg.from_record(content[msg.UPDATE])
    update = {k: v if k.endswith(".ids") else torch.zeros_like(v) for k, v in update.items()}
    update["head.fc.bias"][0] = 30.0
    content[msg.UPDATE] = msg.to_record(update)


HOLE_CASES = [
    ("a codec description 5,000 levels deep", "int8+zstd", deep_codec, "nests 5000 levels"),
    ("an update tensor whose header claims 10^12 values", "none", claimed_update, "shape (1000000000000,)"),
    ("routing counts whose header claims 10^12 values", "none", claimed_counts, "shape (1000000000000,)"),
    ("one array under 60 more names", "none", renamed_copies, "unknown ['moe.1.w1.copy0'"),
    ("a loss of 1e308", "none", with_metrics(train_loss=1e308), "train_loss=1e+308 lies outside"),
    ("a received evaluation over more examples than it has", "none",
     with_metrics(**{"received-accuracy": 1.0, "received-examples": 1e9}), "received-examples=1e+09 lies outside"),
    ("a head bias moved by 30", "none", moved_head_bias, "head row 1 moves by 30"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "pipeline", "change", "reason"), HOLE_CASES, ids=[c[0] for c in HOLE_CASES])
def test_a_reply_that_used_to_end_or_distort_the_run_is_rejected_alone(case, pipeline, change, reason):
    strategy = make_strategy(max_update_norm=1.0, max_row_update_norm=2.0)
    strategy.cfg.train.epochs = 1
    strategy.reader.upload = pipeline
    messages = train_messages(strategy)
    bad = reply_to(messages[101], small_steps, examples=50)
    change(bad.content)
    good = reply_to(messages[202], small_steps, examples=150)
    if pipeline != "none":
        compressed(pipeline)(good.content)
    _, metrics = strategy.aggregate_train(1, [bad, good])
    assert [r["node"] for r in strategy.rejections.rows] == [101], strategy.rejections.rows
    assert reason in strategy.rejections.rows[0]["reason"]
    assert metrics["replies"] == 1
    assert all(torch.isfinite(v).all() for v in strategy.model.state_dict().values() if v.is_floating_point())


def test_a_node_declaring_a_billion_examples_weighs_at_most_ten_times_the_median_of_the_others():
    strategy = make_strategy()
    strategy.roster.nodes[101].train_examples = 10**9
    assert strategy.roster.examples_cap(101) == 10 * 150  # node 202 declared 150
    assert strategy.roster.examples_cap(202) == 150  # an honest node keeps its own count
    messages = train_messages(strategy)
    strategy.aggregate_train(1, [reply_to(messages[101], examples=1e9), reply_to(messages[202], examples=150)])
    assert "examples=1e+09 lies outside [0, 1500]" in strategy.rejections.rows[0]["reason"]


def test_an_evaluation_reply_counts_at_most_the_test_examples_its_node_declared():
    strategy = make_strategy()
    asked = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(1, None, None, GRID)}
    honest = Message(RecordDict({msg.METRICS: MetricRecord({"accuracy": 0.5, "examples": 20.0})}), reply_to=asked[101])
    inflated = Message(RecordDict({msg.METRICS: MetricRecord({"accuracy": 1.0, "examples": 1e9})}), reply_to=asked[202])
    metrics = strategy.aggregate_evaluate(1, [honest, inflated])
    assert metrics["accuracy"] == 0.5 and metrics["examples"] == 20.0
    assert "examples=1e+09 lies outside [0, 60]" in strategy.rejections.rows[0]["reason"]


QUERY_HOLES = [
    ("species 5,000 levels deep", {"species": "[" * 5000}, "species is 5000 characters"),
    ("a species id of 5,000 digits", {"species": "[" + "9" * 5000 + "]"}, "species is 5002 characters"),
    ("unknown species 5,000 levels deep", {"unknown-species": '{"a": ' + "[" * 5000 + "}"}, "nests 5001 levels"),
    ("a count of 5,000 digits", {"skipped": '{"bad": ' + "9" * 5000 + "}"}, "number of 5000 characters"),
    ("a 10 MB species name", {"unknown-species": json.dumps({"x" * 10_000_000: 1})}, "exceeds"),
    ("a 1 MB source", {"source": "s" * 1_000_000}, "exceeds"),
    ("a species name forging a log line", {"unknown-species": json.dumps({"Lynx\nround 9: \x1b[32mok": 1})},
     "control characters"),
    ("an unasked record", {}, "records this query reply may not hold"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "changes", "reason"), QUERY_HOLES, ids=[c[0] for c in QUERY_HOLES])
def test_a_query_reply_that_used_to_end_the_run_or_forge_its_log_is_refused(case, changes, reason, caplog):
    strategy = make_strategy()
    strategy.roster.nodes = {}
    [query] = strategy.configure_query([101], with_model=False)
    reply = query_reply(query, **changes)
    if case == "an unasked record":
        reply.content["extra"] = ArrayRecord({f"copy{i}": Array(np.zeros(1000, np.float32)) for i in range(50)})
    strategy.register(0, [reply])
    assert strategy.roster.nodes == {}
    assert reason in strategy.rejections.rows[0]["reason"] and strategy.rejections.rows[0]["kind"] == "query"
    assert "\x1b" not in caplog.text and caplog.text.count("\n") == len(caplog.records)  # one line per record
    assert len(caplog.text) < 2000


def test_any_exception_while_reading_one_reply_is_that_replys_rejection(monkeypatch):
    strategy = make_strategy()
    messages = train_messages(strategy)

    def broken(reply, *args):
        if reply.metadata.src_node_id == 101:
            raise MemoryError("what a reader bug would raise")
        return original(reply, *args)

    original = strategy.reader.train
    monkeypatch.setattr(strategy.reader, "train", broken)
    _, metrics = strategy.aggregate_train(1, [reply_to(messages[101]), reply_to(messages[202])])
    assert metrics["replies"] == 1
    assert "could not be read (MemoryError" in strategy.rejections.rows[0]["reason"]


def test_a_report_with_an_infinite_number_is_written_as_strict_json():
    report = {"train_loss": math.inf, "rounds": [{"loss": math.nan, "ok": 1.5}]}
    text = json.dumps(finite_json(report), allow_nan=False)
    assert json.loads(text) == {"train_loss": None, "rounds": [{"loss": None, "ok": 1.5}]}


def test_a_node_registered_with_a_location_is_placed_by_it_not_by_what_it_says(caplog):
    strategy = make_strategy()
    strategy.roster.nodes = {}
    [query] = strategy.configure_query([101], with_model=False)
    strategy.register(0, [query_reply(query)], registered={101: (0.0, -90.0)})  # registered in face 4
    node = strategy.roster.nodes[101]
    assert (node.location, node.cell, node.name) == (1, "4/", "4/")
    assert "node 101 says it is in 0/ but was registered in 4/" in caplog.text
    [query] = strategy.configure_query([202], with_model=False)
    strategy.register(0, [query_reply(query)], registered={202: (0.0, 0.0)})  # registered where it says it is
    assert (strategy.roster.nodes[202].location, strategy.roster.nodes[202].cell) == (0, "0/")


def test_a_node_registered_outside_every_cell_of_the_run_is_refused():
    strategy = make_strategy()
    strategy.roster.nodes = {}
    [query] = strategy.configure_query([101], with_model=False)
    strategy.register(0, [query_reply(query)], registered={101: (89.0, 0.0)})  # face 2: not a cell of this run
    assert strategy.roster.nodes == {}
    assert "registered with lies in none of the run's cells" in strategy.rejections.rows[0]["reason"]
