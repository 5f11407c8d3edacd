"""Where an asynchronous run's train messages wait for their replies: a simulated field (virtual nodes under the
simulated clock of `world.availability`, link and device speed) or the live one (devices on a SuperLink, the wall
clock). Both push one message per node with Flower's `Grid.push_messages` and pull replies with `pull_messages`;
the server loop takes one arrival at a time, in the field's time order.

In a simulation the virtual nodes train at once; each reply is then held until the simulated moment it would reach
the server (`FieldClock.trip`) and released in that order. A reply is released only when no message still out could
arrive earlier (it was sent later than the reply arrives), so the order, and the model, do not depend on which
virtual node the machine happened to finish first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid

from geomoe.wire import messages as msg
from geomoe.world.clock import FieldClock, Trip

log = logging.getLogger("geomoe.server")
POLL_S = 0.05  # how often the server asks the SuperLink for replies
IDLE_S = 2.0  # a live field with no reply for this long hands control back (new nodes may have joined)


@dataclass
class Out:
    """A train message out to one node."""

    node_id: int
    name: str
    longitude: float
    examples: float  # training examples x epochs, for the simulated training time
    message_id: str
    sent_at: float
    down_bytes: int
    up_bytes: int = 0
    reply: Message | None = None
    trip: Trip | None = None


@dataclass
class Arrival:
    """A reply as it reaches the server."""

    out: Out
    reply: Message
    at: float  # field time (seconds from the run's start)


class Field:
    """Messages out and their replies; `now` is the field's time in seconds."""

    def __init__(self, grid: Grid, ttl_s: float, now: float) -> None:
        self.grid, self.ttl_s, self.now = grid, ttl_s, now
        self.out: dict[int, Out] = {}  # node id -> its message out
        self.lost: list[Out] = []  # messages whose reply can never arrive (simulated: the link never carries it)

    def send(self, node_id: int, name: str, longitude: float, examples: float, message: Message,
             sent_at: float) -> Out:  # fmt: skip
        """Push `message`, sent at field time `sent_at` (now, or when a resumed run first sent it)."""
        message.metadata.ttl = self.ttl_s
        down = msg.content_traffic(message.content)["total"]
        (message_id,) = self.grid.push_messages([message])
        out = Out(node_id, name, longitude, examples, message_id, sent_at, down)
        self.out[node_id] = out
        return out

    def _pull(self) -> None:
        waiting = {out.message_id: out for out in self.out.values() if out.reply is None}
        if waiting:
            for reply in self.grid.pull_messages(list(waiting)):
                out = waiting.get(reply.metadata.reply_to_message_id)
                if out is not None and out.reply is None:
                    out.reply = reply
                    out.up_bytes = 0 if reply.has_error() else msg.content_traffic(reply.content)["total"]
                    self.arrived(out)

    def arrived(self, out: Out) -> None:
        """A reply came back from the node (hook for the simulated clock)."""

    def tick(self) -> float:
        """The field's time now (the wall clock moves by itself; the simulated one moves with arrivals)."""
        return self.now

    def next(self) -> Arrival | None:
        """The next reply to reach the server, waiting for it; None when there is none to wait for."""
        raise NotImplementedError


class SimulatedField(Field):
    """Virtual nodes under the simulated clock."""

    def __init__(self, grid: Grid, ttl_s: float, now: float, clock: FieldClock) -> None:
        super().__init__(grid, ttl_s, now)
        self.clock = clock

    def arrived(self, out: Out) -> None:
        out.trip = self.clock.trip(
            out.name, out.longitude, out.sent_at, out.down_bytes, out.up_bytes, out.examples, self.ttl_s
        )

    def next(self) -> Arrival | None:
        while self.out:
            self._pull()
            for out in [o for o in self.out.values() if o.trip is not None and o.trip.arrived_at is None]:
                log.warning("node %s is never online long enough to carry its reply: it drops out", out.name)
                self.lost.append(self.out.pop(out.node_id))
            known = [o for o in self.out.values() if o.trip is not None]
            pending = [o.sent_at for o in self.out.values() if o.trip is None]
            if known:
                first = min(known, key=lambda o: (o.trip.arrived_at, o.name))
                if not pending or first.trip.arrived_at <= min(pending):
                    del self.out[first.node_id]
                    self.now = max(self.now, first.trip.arrived_at)
                    return Arrival(first, first.reply, first.trip.arrived_at)
            if pending:
                time.sleep(POLL_S)
        return None


class LiveField(Field):
    """Devices on a SuperLink, on the wall clock. A message unanswered within its TTL is given up (Flower drops it
    and any late reply) and `resend(node_id)` sends the node a new one: a store-and-forward node answers that with
    the update it kept."""

    def __init__(self, grid: Grid, ttl_s: float, now: float, resend: Callable[[int], None]) -> None:
        super().__init__(grid, ttl_s, now)
        self.started, self.resend = time.monotonic() - now, resend

    def tick(self) -> float:
        self.now = time.monotonic() - self.started
        return self.now

    def next(self) -> Arrival | None:
        """The first reply in, waiting at most `IDLE_S`; None when none came (the loop may take in new nodes)."""
        waited = time.monotonic() + IDLE_S
        while time.monotonic() < waited:
            self._pull()
            self.tick()
            answered = [o for o in self.out.values() if o.reply is not None]
            if answered:
                first = min(answered, key=lambda o: o.sent_at)
                del self.out[first.node_id]
                return Arrival(first, first.reply, self.now)
            for out in [o for o in self.out.values() if self.now > o.sent_at + self.ttl_s]:
                log.warning("node %s did not answer within the message TTL (%.0f s): sent again", out.name, self.ttl_s)
                del self.out[out.node_id]
                self.resend(out.node_id)
            time.sleep(POLL_S * 20)
        return None

    def drop(self, node_id: int) -> None:
        """A node gone from the SuperLink: its message out is given up."""
        self.out.pop(node_id, None)
