"""A field node's store-and-forward state: updates kept whole until settled, training again only on news."""

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from geomoe.client.outbox import Outbox


def reply(value: float) -> RecordDict:
    return RecordDict({"update": ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))}),
                       "metrics": MetricRecord({"trained-from": 1})})  # fmt: skip


def test_a_kept_update_survives_a_restart_until_the_server_settles_it(tmp_path):
    Outbox(tmp_path).keep(2, reply(0.5), "data-a")
    restarted = Outbox(tmp_path)  # a new process on the same state folder
    version, content = restarted.kept()
    assert version == 2 and content["update"]["w"].numpy().tolist() == [0.5, 0.5, 0.5]
    restarted.settle(through=1)
    assert restarted.kept()[0] == 2  # not settled yet: sent again with the next reply
    restarted.settle(through=2)
    assert restarted.kept() is None


def test_the_oldest_unsettled_update_goes_first(tmp_path):
    outbox = Outbox(tmp_path)
    outbox.keep(3, reply(3.0), "d")
    outbox.keep(1, reply(1.0), "d")
    assert outbox.kept()[0] == 1


def test_a_half_written_file_is_never_taken_for_an_update(tmp_path):
    outbox = Outbox(tmp_path)
    (outbox.folder / ".update-4.pb.partial").write_bytes(b"\x00half")  # a crash mid-write leaves only this
    assert outbox.kept() is None


def test_a_node_trains_again_only_on_a_newer_model_or_new_images(tmp_path):
    outbox = Outbox(tmp_path)
    assert outbox.fresh(0, "data-a")  # never trained
    outbox.keep(2, reply(0.1), "data-a")
    assert not outbox.fresh(2, "data-a") and not outbox.fresh(1, "data-a")
    assert outbox.fresh(3, "data-a") and outbox.fresh(2, "data-b")


def test_the_error_feedback_after_the_last_kept_update_survives_a_restart(tmp_path):
    Outbox(tmp_path).keep(2, reply(0.5), "d", {"w": torch.full((3,), 0.25)})
    Outbox(tmp_path).keep(3, reply(0.5), "d", {"w": torch.full((3,), 0.75)})
    restarted = Outbox(tmp_path)
    assert restarted.feedback()["w"].tolist() == [0.75, 0.75, 0.75]
    assert [p.name for p in restarted.folder.glob("feedback-*")] == ["feedback-3.pt"]  # older ones are gone


def test_a_crash_before_the_update_is_kept_leaves_the_feedback_of_the_last_one_kept(tmp_path):
    outbox = Outbox(tmp_path)
    outbox.keep(2, reply(0.5), "d", {"w": torch.full((3,), 0.25)})
    torch.save({"w": torch.full((3,), 9.0)}, outbox.folder / "feedback-3.pt")  # written, then the power went
    assert Outbox(tmp_path).feedback()["w"].tolist() == [0.25, 0.25, 0.25]
    assert Outbox(tmp_path / "new").feedback() == {}  # never trained: nothing left out yet
