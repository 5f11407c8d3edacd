"""Synchronous rounds on the simulated clock of a field (`world.availability`, link, device speed): a round samples
the nodes online when it starts, and counts only the replies that reach the server by its deadline
(`federation.round_timeout_s` after it starts). What the others trained is wasted: it is reported as node-hours
trained and never aggregated. The next round starts when the last counted reply arrived, or at the deadline.
Flower-free: node ids, names and traffic in, the replies that count out."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Message

from geomoe.data.cells import cell_longitude
from geomoe.server.replies import QueryReply
from geomoe.world.clock import FieldClock

log = logging.getLogger("geomoe.server")


class SimulatedRounds:
    """The simulated time of a synchronous run (`now`, seconds from its start)."""

    def __init__(self, clock: FieldClock, timeout_s: float, ttl_s: float, epochs: int, now: float) -> None:
        self.clock, self.timeout_s, self.ttl_s, self.epochs, self.now = clock, timeout_s, ttl_s, epochs, now

    def online(self, nodes: dict[int, QueryReply]) -> set[int]:
        """Nodes online now; when none is, the clock first moves on to the moment the first one comes online."""
        windows = {
            n: self.clock.availability.window(q.name, cell_longitude(q.cell), self.now) for n, q in nodes.items()
        }
        starts = [w[0] for w in windows.values() if w is not None]
        if starts and min(starts) > self.now:
            self.now = min(starts)
        return {n for n, w in windows.items() if w is not None and w[0] <= self.now}

    def in_time(
        self, replies: Iterable[Message], traffic: dict[int, dict], nodes: dict[int, QueryReply]
    ) -> tuple[list[Message], float]:
        """The replies that reach the server by the round's deadline, and the node-hours of training wasted on the
        others; the clock moves to the round's end."""
        deadline = self.now + self.timeout_s
        kept, wasted, last = [], 0.0, self.now
        for reply in replies:
            node_id = reply.metadata.src_node_id
            node, sent = nodes.get(node_id), traffic.get(node_id, {})
            if node is None:
                kept.append(reply)  # not a registered node: the strategy refuses it, with its reason
                continue
            examples = node.train_examples * self.epochs
            trip = self.clock.trip(node.name, cell_longitude(node.cell), self.now, sent.get("down", 0),
                                   sent.get("up", 0), examples, self.ttl_s)  # fmt: skip
            if trip.arrived_at is not None and trip.arrived_at <= deadline:
                kept.append(reply)
                last = max(last, trip.arrived_at)
            else:
                wasted += self.clock.training_s(examples) / 3600
                log.info("node %s: its reply would arrive after the round's deadline; not counted", node.name)
        self.now = last if len(kept) == len(traffic) else deadline
        return kept, wasted
