"""Fuzzing the server's trust boundary: replies generated from the message schema, starting from an honest reply and
corrupting any field, name, array header or codec description. Whatever arrives, no exception escapes the strategy,
every reply is either aggregated or rejected with a reason, the model stays finite, and no row moves further than
the reader's bounds allow."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from geomoe.server.replies import NORM_FLOOR
from geomoe.wire import messages as msg
from geomoe.wire.compression import ErrorFeedback, Pipeline

from .test_replies import query_reply, small_steps
from .test_strategy import GRID, in_a_task, make_strategy, reply_to  # noqa: F401 - fixture

pytestmark = pytest.mark.fuzz

METRIC_NAMES = ["examples", "train_loss", "received-accuracy", "received-examples", "received-recall",
                "unknown-species-images", "skipped-images", "compute-seconds", "unclipped"]  # fmt: skip
SENT_NAMES = ["moe.1.w1", "moe.1.ids", "head.fc.weight", "head.fc.bias", "head.ids", "moe.5.b2"]
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.booleans(),
    st.text(max_size=20),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=30),
)
names = st.one_of(st.sampled_from(SENT_NAMES + ["counts.1", "counts.3", "edges.1"]), st.text(max_size=12))


def npy(shape: tuple[int, ...], dtype: str, data_bytes: int) -> Array:
    """An array whose `.npy` header claims `shape` and `dtype`, followed by `data_bytes` bytes (honest or not)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False, "shape": shape})
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=header.getvalue() + bytes(data_bytes))


arrays = st.one_of(
    st.builds(
        lambda shape, dtype, scale: Array(np.full(shape, scale, dtype=dtype)),
        st.lists(st.integers(0, 5), max_size=3).map(tuple),
        st.sampled_from(["float32", "float64", "int64", "uint8", "float16"]),
        st.floats(-1e6, 1e6),
    ),
    st.builds(
        npy,
        st.lists(st.integers(0, 10**12), min_size=1, max_size=3).map(tuple),
        st.sampled_from(["<f4", "<i8", "|u1", "<f8"]),
        st.integers(0, 4096),
    ),
)


@st.composite
def corruptions(draw):
    """One change to a reply: a metric, a record's array under some name, a name removed, a codec description, a
    scale on every delta, or a whole record dropped."""
    kind = draw(st.sampled_from(["metric", "array", "remove", "scale", "codec", "drop", "extra"]))
    if kind == "metric":
        return kind, draw(st.one_of(st.sampled_from(METRIC_NAMES), st.text(max_size=10))), draw(values)
    if kind == "array":
        return kind, draw(st.sampled_from([msg.UPDATE, msg.TOKENS])), draw(names), draw(arrays)
    if kind == "remove":
        return kind, draw(st.sampled_from([msg.UPDATE, msg.TOKENS])), draw(names), None
    if kind == "scale":
        return kind, draw(st.sampled_from([0.0, -1.0, 1e3, 1e30, float("nan"), float("inf")])), None
    if kind == "codec":
        return kind, draw(st.one_of(st.text(max_size=60), st.recursive(
            st.one_of(st.integers(), st.text(max_size=5), st.none()),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
            max_leaves=30,
        ).map(json.dumps))), None  # fmt: skip
    if kind == "drop":
        return kind, draw(st.sampled_from([msg.UPDATE, msg.TOKENS, msg.METRICS])), None
    return kind, draw(st.text(max_size=8)), None


def corrupt(content: RecordDict, change) -> None:
    kind = change[0]
    needed = {"metric": msg.METRICS, "array": change[1], "remove": change[1], "scale": msg.UPDATE, "drop": change[1]}
    if kind in needed and needed[kind] not in content:  # an earlier change dropped it
        return
    if kind == "metric":
        metrics = dict(content[msg.METRICS])
        metrics[change[1]] = change[2]
        with contextlib.suppress(TypeError, ValueError):  # Flower itself refuses the value: it cannot travel
            content[msg.METRICS] = MetricRecord(metrics)
    elif kind in ("array", "remove"):
        record = dict(content[change[1]])
        if kind == "array":
            record[change[2]] = change[3]
        else:
            record.pop(change[2], None)
        content[change[1]] = ArrayRecord(record)
    elif kind == "scale":
        try:  # an earlier change may have left arrays no reader should decode: then there is nothing to scale
            update = msg.read_record(content[msg.UPDATE], "update", 1 << 24)
        except ValueError:
            return
        content[msg.UPDATE] = msg.to_record({k: v if k.endswith(".ids") else v * change[1] for k, v in update.items()})
    elif kind == "codec":
        content[msg.UPDATE + msg.CODEC] = ConfigRecord({"pipeline": "int8+zstd", "tensors": change[1]})
    elif kind == "drop":
        del content[change[1]]
    else:
        content[change[1] or "x"] = ArrayRecord({"a": Array(np.zeros(4, np.float32))})


def pack_compressed(content: RecordDict) -> None:
    update = msg.from_record(content[msg.UPDATE])
    arrays, description = ErrorFeedback().compress(update, Pipeline.parse("int8+zstd"), msg.key_category)
    content[msg.UPDATE] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    content[msg.UPDATE + msg.CODEC] = ConfigRecord({"pipeline": "int8+zstd", "tensors": description})


@given(changes=st.lists(corruptions(), min_size=1, max_size=4), compressed=st.booleans())
def test_no_train_reply_escapes_the_reader_or_moves_a_row_beyond_its_bound(changes, compressed):
    strategy = make_strategy(max_update_norm=1.0, max_row_update_norm=2.0)
    strategy.reader.upload = "int8+zstd" if compressed else "none"
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, None, None, GRID)}
    sent = strategy.sent[101]
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    reply = reply_to(messages[101], small_steps, examples=50)
    if compressed:
        pack_compressed(reply.content)
    for change in changes:
        corrupt(reply.content, change)
    _, metrics = strategy.aggregate_train(1, [reply])
    replies = int(metrics["replies"]) if metrics else 0
    assert replies + len(strategy.rejections.rows) == 1
    after = strategy.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    if replies:  # what was aggregated stays inside the bounds the reader promises
        moved = sum(float((after[k].double() - before[k].double()).pow(2).sum()) for k in after
                    if after[k].is_floating_point())  # fmt: skip
        assert moved**0.5 <= 1.0 * max(sent.norm, NORM_FLOOR) * (1 + 1e-4)
    else:
        assert strategy.rejections.rows[0]["reason"] and "\n" not in strategy.rejections.rows[0]["reason"]


info_values = st.one_of(values, st.recursive(
    st.one_of(st.integers(-5, 30), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
).map(json.dumps), st.text(max_size=300))  # fmt: skip
INFO_KEYS = ["location", "cell", "has-base", "base-from-file", "species", "train-examples", "test-examples", "source",
             "unknown-species", "skipped"]  # fmt: skip


@given(st.dictionaries(st.one_of(st.sampled_from(INFO_KEYS), st.text(max_size=8)), info_values, max_size=6))
def test_no_query_reply_escapes_the_reader_and_a_registered_node_is_within_bounds(changes):
    strategy = make_strategy()
    strategy.roster.nodes = {}
    [query] = strategy.configure_query([101], with_model=False)
    try:
        reply = query_reply(query, **changes)
    except (TypeError, ValueError):  # Flower refuses the value itself
        return
    strategy.register(0, [reply])
    if 101 in strategy.roster.nodes:
        node = strategy.roster.nodes[101]
        assert all(0 <= s < strategy.cfg.model.num_classes for s in node.species)
        assert 0 <= node.train_examples <= 10**9 and 0 <= node.test_examples <= 10**9
        for text in [node.cell, node.source, *node.unknown_species, *node.skipped]:
            assert text.isprintable() and len(text) <= 500
    else:
        assert len(strategy.rejections.rows) == 1 and "\n" not in strategy.rejections.rows[0]["reason"]
