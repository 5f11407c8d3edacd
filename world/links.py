"""Link profiles for field devices: how long a client's bytes take over LoRa, LTE-M, 3G, satellite, Wi-Fi.

time = messages * latency + (bytes + messages * overhead) * 8 / bandwidth. Energy per byte is a
rough radio figure, there to compare strategies, not to budget batteries.

A link may carry a byte budget per online window (`lora@10kB`): what a LoRa-class device may send in one window
under its duty-cycle limit. It bounds uploads only (the limit is on what the device transmits); a node compresses
its update to fit it (`client/link_budget.py`), and what still does not fit goes out over the following windows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LinkProfile:
    """One kind of uplink/downlink."""

    name: str
    bandwidth_bps: float  # payload bits per second
    latency_s: float  # per message, one way
    overhead_bytes: int  # framing per message (headers, TLS records)
    energy_j_per_byte: float  # radio energy per byte sent or received
    budget_bytes: int | None = None  # bytes a node may send per online window (LoRa class); None: no limit

    def seconds(self, payload_bytes: float, messages: int = 1) -> float:
        return messages * self.latency_s + (payload_bytes + messages * self.overhead_bytes) * 8 / self.bandwidth_bps

    def joules(self, payload_bytes: float, messages: int = 1) -> float:
        return (payload_bytes + messages * self.overhead_bytes) * self.energy_j_per_byte


LINKS = {
    p.name: p
    for p in (
        LinkProfile("lora", 5_000, 1.0, 13, 2e-4),
        LinkProfile("iridium", 2_400, 1.5, 50, 5e-4),
        LinkProfile("3g", 384_000, 0.15, 80, 5e-6),
        LinkProfile("lte-m", 1_000_000, 0.1, 80, 3e-6),
        LinkProfile("wifi", 20_000_000, 0.005, 80, 1e-7),
    )
}


def parse_link(text: str) -> LinkProfile:
    """A named profile, or a custom one: `name:bandwidth_bps:latency_s:overhead_bytes[:joules_per_byte]`; either
    with `@BYTES` (or `@NkB`) for a budget per online window, as in `lora@10kB`."""
    text, at, budget = text.partition("@")
    if at:
        return replace(parse_link(text), budget_bytes=parse_budget(budget))
    if text in LINKS:
        return LINKS[text]
    fields = text.split(":")
    if len(fields) not in (4, 5):
        raise ValueError(f"unknown link {text!r}: use one of {', '.join(LINKS)} or name:bps:latency_s:overhead_bytes")
    try:
        energy = float(fields[4]) if len(fields) == 5 else 0.0
        return LinkProfile(fields[0], float(fields[1]), float(fields[2]), int(fields[3]), energy)
    except ValueError:
        raise ValueError(f"bad link {text!r}: bandwidth, latency, overhead and energy must be numbers") from None


def parse_budget(text: str) -> int:
    """Bytes per window: `10000`, `10kB` (1000 bytes) or `1MB`."""
    number, scale = text.strip(), 1
    for suffix, factor in (("kB", 1000), ("MB", 1000_000), ("B", 1)):
        if number.endswith(suffix):
            number, scale = number.removesuffix(suffix), factor
            break
    try:
        budget = round(float(number) * scale)
    except (ValueError, OverflowError):
        raise ValueError(f"bad link budget {text!r}: write bytes per window, e.g. 10000 or 10kB") from None
    if budget < 1:
        raise ValueError(f"a link budget must be at least 1 byte per window, got {text!r}")
    return budget
