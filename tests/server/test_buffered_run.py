"""The asynchronous loop's handling of a node that leaves the SuperLink while its reply is on the way: the reply is
read (an error is refused and counted), and the node is neither sent a new message nor waited on until it is back.
One run on a real SuperLink ended this way before: the node's "unavailable" error arrived in the same step as its
removal from the node list, and the loop looked up the slice it had just forgotten."""

from collections import Counter
from types import SimpleNamespace

from flwr.app import Error, Message, RecordDict

from geomoe.server.acceptance import Rejections
from geomoe.server.buffered_run import BufferedRun
from geomoe.server.field import Arrival, Out
from geomoe.server.replies import ReplyReader
from geomoe.wire.run_config import RunConfig


def loop_without(node_id: int) -> BufferedRun:
    """A loop whose `join` has just dropped `node_id` (no slice out, not waiting)."""
    run = BufferedRun.__new__(BufferedRun)
    run.strategy = SimpleNamespace(
        roster=SimpleNamespace(nodes={node_id: SimpleNamespace(name="cam-7")}),
        reader=ReplyReader(RunConfig(), [], {}),
        rejections=Rejections(),
    )
    run.pieces, run.waiting, run.traffic, run.refused, run.settled, run.version = {}, set(), {}, Counter(), {}, 3
    return run


def test_an_error_from_a_node_that_left_is_refused_and_the_node_is_not_sent_again(task_identity):
    run = loop_without(7)
    sent = Message(RecordDict(), dst_node_id=7, message_type="train")
    unavailable = Message(Error(code=0, reason="Node Unavailable"), reply_to=sent)
    run.receive(Arrival(Out(7, "cam-7", 0.0, 10.0, "m", 0.0, 100), unavailable, 5.0))
    assert run.refused == Counter(invalid=1) and "Node Unavailable" in run.strategy.rejections.rows[0]["reason"]
    assert run.waiting == set() and run.pieces == {}
