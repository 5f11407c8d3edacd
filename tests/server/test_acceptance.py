"""Which replies count, without Flower's runtime (messages built by hand)."""

import pytest
from flwr.app import Message, Metadata, RecordDict

from geomoe.server.acceptance import Rejections, outliers, read_once
from geomoe.server.replies import RejectedReply, TrainReply


def reply_from(node_id: int) -> Message:
    metadata = Metadata(run_id=1, message_id="", src_node_id=node_id, dst_node_id=0, reply_to_message_id="x",
                        group_id="", created_at=0.0, ttl=60.0, message_type="train")  # fmt: skip
    return Message(metadata=metadata, content=RecordDict())


def test_a_node_not_asked_and_a_node_answering_twice_are_refused_and_a_failing_read_fails_alone():
    rejections = Rejections()

    def read(node_id, _):
        if node_id == 4:
            raise MemoryError("a hostile header")
        if node_id == 5:
            raise RejectedReply("holds a tensor it was not sent")
        return node_id * 10

    replies = [reply_from(n) for n in (1, 2, 2, 3, 4, 5)]
    assert read_once(7, replies, asked=[1, 2, 4, 5], read=read, rejections=rejections, kind="train") == {1: 10}
    reasons = {row["node"]: row["reason"] for row in rejections.of_round(7)}
    assert set(reasons) == {2, 3, 4, 5} and "second reply" in reasons[2] and "not sent" in reasons[3]
    assert reasons[4] == "could not be read (MemoryError: a hostile header)" and reasons[5].startswith("holds")
    assert rejections.of_round(8) == []


@pytest.mark.parametrize("factor", [None, 3.0])
def test_outliers_are_the_updates_over_a_factor_of_the_median_norm(factor):
    import torch

    def update(norm):
        return TrainReply({"w": torch.tensor([norm])}, {}, 1.0, 0.0, None, 0.0, 0.0)

    updates = {1: update(1.0), 2: update(1.2), 3: update(10.0)}
    assert set(outliers(updates, factor)) == ({3} if factor else set())
