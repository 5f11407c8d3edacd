"""The simulated clock of a field: how long a device trains, when its messages get through its link, and when the
reply to a message sent at a given time reaches the server.

Training time is counted work, not measured time: examples x epochs x `seconds_per_example` (this machine) x
`device_speed`. A wall-clock measurement would make the order of arrivals, and so the model, depend on how busy the
machine was, and a resumed run could not reproduce an uninterrupted one. A message goes whole within one online
stretch of its node (a link that drops mid-message loses it and it is sent again whole), so it waits for a stretch
long enough to carry it; an upload over a link with a budget per window (LoRa class) goes a piece per window
instead. A device trains whether or not its link is up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from geomoe.world.availability import HORIZON_S, Availability
from geomoe.world.links import LinkProfile


@dataclass(frozen=True)
class Trip:
    """One train message's way out and its reply's way back, in simulated seconds from the run's start."""

    sent_at: float
    downloaded_at: float
    trained_at: float
    arrived_at: float | None  # None: the node's link never carried the reply (it is never online long enough)
    resends: int  # times the message expired before its reply got through and was sent again (store-and-forward)


@dataclass(frozen=True)
class FieldClock:
    """Durations on simulated devices and their links."""

    availability: Availability
    link: LinkProfile
    device_speed: float  # how many times slower than this machine the device trains
    seconds_per_example: float  # this machine's training time per example and epoch

    def training_s(self, examples: float) -> float:
        return examples * self.seconds_per_example * self.device_speed

    def carried(
        self, node: str, longitude: float, t: float, payload_bytes: float, upload: bool = False
    ) -> float | None:
        """When a message of `payload_bytes` that may go from `t` on has arrived, or None if no online stretch of
        the node within a year is long enough to carry it. An upload over a link with a budget per window goes out
        a piece per window (the device keeps the rest for the next one): at most the budget, and what the window's
        length carries. Each upload counts the window it starts in as its own."""
        budget = self.link.budget_bytes if upload else None
        left, limit = payload_bytes, t + HORIZON_S
        while t < limit and (window := self.availability.window(node, longitude, t)) is not None:
            start, end = window
            if budget is None or math.isinf(end):  # whole within one stretch (always online: no windows to count)
                if end - start >= self.link.seconds(left):
                    return start + self.link.seconds(left)
            else:
                fits = ((end - start) - self.link.latency_s) * self.link.bandwidth_bps / 8 - self.link.overhead_bytes
                piece = min(left, budget, fits)
                if piece > 0:
                    left -= piece
                    if left <= 0:
                        return start + self.link.seconds(piece)
            t = end
        return None

    def trip(
        self, node: str, longitude: float, sent_at: float, down_bytes: float, up_bytes: float, examples: float,
        ttl_s: float,
    ) -> Trip:  # fmt: skip
        """A train message sent at `sent_at`: the node downloads it when its link allows, trains, and uploads its
        reply when its link allows. Flower drops a message (and a reply to it) older than `ttl_s`; the server then
        sends the node a new one, and a store-and-forward node answers that with the update it kept, so the reply
        still arrives, one download later, and counts as the reply to the newest message."""
        downloaded = self.carried(node, longitude, sent_at, down_bytes)
        if downloaded is None:
            return Trip(sent_at, math.inf, math.inf, None, 0)
        resends, expires = 0, sent_at + ttl_s
        while downloaded > expires:  # it expired before the node was online to fetch it: sent again at expiry
            if expires > sent_at + HORIZON_S:
                return Trip(sent_at, math.inf, math.inf, None, resends)
            resends, sent = resends + 1, expires
            expires = sent + ttl_s
            downloaded = self.carried(node, longitude, sent, down_bytes)
            if downloaded is None:
                return Trip(sent_at, math.inf, math.inf, None, resends)
        trained = downloaded + self.training_s(examples)
        arrived = self.carried(node, longitude, trained, up_bytes, upload=True)
        while arrived is not None and arrived > expires:  # the reply's message expired: the kept update goes out
            if expires > sent_at + HORIZON_S:
                return Trip(sent_at, downloaded, trained, None, resends)
            resends, sent = resends + 1, expires  # with the reply to the next message, after that one's download
            expires = sent + ttl_s
            fetched = self.carried(node, longitude, sent, down_bytes)
            arrived = (
                None if fetched is None else self.carried(node, longitude, max(fetched, trained), up_bytes, upload=True)
            )
        return Trip(sent_at, downloaded, trained, arrived, resends)
