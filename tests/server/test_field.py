"""The simulated field releases replies in simulated-arrival order, whatever order the machine finished them in."""

import threading
import time

from flwr.app import ConfigRecord, Message, RecordDict

from geomoe.server.field import SimulatedField
from geomoe.world.availability import Availability
from geomoe.world.clock import FieldClock
from geomoe.world.links import LinkProfile


class SlowGrid:
    """Pushes messages; a node's reply becomes pullable after `delays[node]` real seconds."""

    def __init__(self, delays: dict[int, float]) -> None:
        self.delays, self.replies, self.lock = delays, {}, threading.Lock()

    def push_messages(self, messages):
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            message.metadata.__dict__["_message_id"] = f"m{node}"  # what the SuperLink assigns on push
            reply = Message(RecordDict({"c": ConfigRecord({"x": 1})}), reply_to=message)

            def ready(node=node, reply=reply):
                time.sleep(self.delays[node])
                with self.lock:
                    self.replies[f"m{node}"] = reply

            threading.Thread(target=ready, daemon=True).start()
            ids.append(f"m{node}")
        return ids

    def pull_messages(self, message_ids):
        with self.lock:
            return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def test_replies_come_out_in_simulated_order_not_in_the_order_they_finished(task_identity):
    clock = FieldClock(Availability("always"), LinkProfile("l", 8e6, 0.0, 0, 0.0), 1.0, seconds_per_example=1.0)
    # node 1 finishes first on this machine but trains 100 simulated seconds; node 2 finishes later, trains 10
    grid = SlowGrid({1: 0.0, 2: 0.3})
    field = SimulatedField(grid, ttl_s=1e6, now=0.0, clock=clock)
    for node, examples in ((1, 100), (2, 10)):
        message = Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")
        field.send(node, f"n{node}", 0.0, examples, message, sent_at=0.0)
    first, second = field.next(), field.next()
    assert (first.out.node_id, second.out.node_id) == (2, 1)
    assert first.at < second.at and field.now == second.at
    assert field.next() is None  # nothing out
