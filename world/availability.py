"""When a simulated field device's link is up: always, daily windows in its local solar time, a duty cycle, or a
recorded trace.

A spec is one of
- `always`;
- `daily:HH-HH[,HH-HH]`: windows every day, in hours of the node's local solar time (UTC + longitude / 15), so that
  cameras round the globe are not all online at once (`daily:6-6.5,18-18.5`, or `daily:06:00-06:30`; a window may
  run past midnight, `22-2`);
- `duty:P`: online in each simulated hour with probability P, drawn from the run's seed, the node and the hour;
- a CSV file (`node,start_s,end_s`, a header line, then one online interval per row; `node` is the cell name the
  report gives): nodes the trace does not list are always online.
`share` of the nodes (drawn per node from the seed) follow the spec; the rest are always online.
Simulated time is seconds from the run's start, which is midnight UTC.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

DAY_S = 86_400.0
HOUR_S = 3_600.0
HORIZON_S = 366 * DAY_S  # a node not online within a year of simulated time is taken as never online again

Interval = tuple[float, float]  # (start_s, end_s), end exclusive


def _draw(seed: int, *parts: object) -> float:
    """A uniform number in [0, 1) from the seed and `parts`: the same for a node and hour in every run and process."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _hours(text: str, spec: str) -> float:
    """Hours of the day from `H`, `H.5` or `HH:MM`."""
    try:
        if ":" in text:
            hours, minutes = text.split(":")
            value = int(hours) + int(minutes) / 60
        else:
            value = float(text)
    except ValueError:
        raise ValueError(f"availability {spec!r}: {text!r} is not an hour of the day (6, 6.5 or 06:30)") from None
    if not 0 <= value <= 24:
        raise ValueError(f"availability {spec!r}: hour {text!r} is not within 0..24")
    return value


def _daily(spec: str) -> list[Interval]:
    windows = []
    for part in spec.removeprefix("daily:").split(","):
        start, dash, end = part.strip().partition("-")
        if not dash:
            raise ValueError(f"availability {spec!r}: window {part!r} is not HH-HH")
        a, b = _hours(start, spec) * HOUR_S, _hours(end, spec) * HOUR_S
        if a == b:
            raise ValueError(f"availability {spec!r}: window {part!r} is empty")
        windows += [(a, b)] if a < b else [(a, DAY_S), (0.0, b)]  # past midnight: two pieces of the day
    return sorted(windows)


def merged(pieces: list[Interval]) -> list[Interval]:
    """Sorted intervals with those that touch or overlap joined: a window past midnight, or a trace's rows that
    meet, are one stretch online (a transfer may span them)."""
    out: list[Interval] = []
    for start, end in sorted(pieces):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def read_trace(path: Path) -> dict[str, list[Interval]]:
    """node -> its sorted online intervals, from a `node,start_s,end_s` CSV; a bad row names the file and line."""
    if not path.is_file():
        raise ValueError(f"availability trace {path} does not exist")
    trace: dict[str, list[Interval]] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"node", "start_s", "end_s"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: the header must name node,start_s,end_s (got {reader.fieldnames})")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                start, end = float(row["start_s"]), float(row["end_s"])
            except (TypeError, ValueError):
                raise ValueError(f"{where}: start_s and end_s must be seconds, got {row}") from None
            if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
                raise ValueError(f"{where}: need 0 <= start_s < end_s, got {start}, {end}")
            if not row["node"]:
                raise ValueError(f"{where}: node is empty")
            trace.setdefault(row["node"], []).append((start, end))
    return {node: merged(intervals) for node, intervals in trace.items()}


@dataclass
class Availability:
    """Which nodes are online when. Nodes are named as in the report (their cell), and placed by longitude."""

    spec: str = "always"
    share: float = 1.0  # share of the nodes that follow `spec`; the others are always online
    seed: int = 0
    _daily: list[Interval] = field(default_factory=list, init=False, repr=False)
    _trace: dict[str, list[Interval]] = field(default_factory=dict, init=False, repr=False)
    _duty: float = field(default=1.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.share <= 1:
            raise ValueError(f"world.availability_share must lie in [0, 1], got {self.share}")
        if self.spec.startswith("daily:"):
            self._daily = _daily(self.spec)
        elif self.spec.startswith("duty:"):
            try:
                self._duty = float(self.spec.removeprefix("duty:"))
            except ValueError:
                raise ValueError(f"availability {self.spec!r}: P must be a number in (0, 1]") from None
            if not 0 < self._duty <= 1:
                raise ValueError(f"availability {self.spec!r}: P must lie in (0, 1]")
        elif self.spec.endswith(".csv"):
            self._trace = read_trace(Path(self.spec))
        elif self.spec != "always":
            raise ValueError(
                f"world.availability={self.spec!r}: use always, daily:HH-HH[,HH-HH], duty:P or a .csv trace"
            )

    def follows(self, node: str) -> bool:
        """Whether `node` follows the spec (else it is always online)."""
        return self.spec != "always" and (self.share >= 1 or _draw(self.seed, "share", node) < self.share)

    def window(self, node: str, longitude: float, t: float) -> Interval | None:
        """The first online interval of `node` that ends after `t`, starting at `t` at the earliest; None: never
        online again (within a year)."""
        if not self.follows(node):
            return (t, math.inf)
        if self._daily:
            return self._next_daily(longitude, t)
        if self._trace:
            return self._next_traced(node, t)
        return self._next_duty(node, t)

    def online(self, node: str, longitude: float, t: float) -> bool:
        found = self.window(node, longitude, t)
        return found is not None and found[0] <= t

    def _next_daily(self, longitude: float, t: float) -> Interval | None:
        offset = longitude / 15 * HOUR_S  # local solar time = UTC + offset
        day = math.floor((t + offset) / DAY_S)
        pieces = [(d * DAY_S + a - offset, d * DAY_S + b - offset) for d in range(day - 1, day + 3)
                  for a, b in self._daily]  # fmt: skip
        return next(((max(start, t), end) for start, end in merged(pieces) if end > t), None)

    def _next_traced(self, node: str, t: float) -> Interval | None:
        if node not in self._trace:
            return (t, math.inf)
        for start, end in self._trace[node]:
            if end > t:
                return (max(start, t), end)
        return None

    def _next_duty(self, node: str, t: float) -> Interval | None:
        hour = math.floor(t / HOUR_S)
        while hour * HOUR_S < t + HORIZON_S:
            if _draw(self.seed, "duty", node, hour) < self._duty:
                end = hour + 1
                while _draw(self.seed, "duty", node, end) < self._duty and end * HOUR_S < t + HORIZON_S:
                    end += 1
                return (max(hour * HOUR_S, t), end * HOUR_S)
            hour += 1
        return None
