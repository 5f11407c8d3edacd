"""Which device holds which experts, given where devices are, what fits, and how far peers are.

Each device first keeps the experts its own location routes most patches to, as many as its
memory allows. An expert a device needs but cannot hold goes to the nearest peer (by measured
round-trip time) that holds it, or else to the nearest peer with room. What nobody can hold
falls back on the device (best held expert or removal). The plan says, per device, what it
holds, whom it asks for what, and the bytes per image that asking costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BYTES_PER_VALUE = 4  # float32 tokens on the wire (fp16 halves it)


@dataclass
class DeviceNeeds:
    """One device: its budget and how many patches per image its location routes to each expert."""

    name: str
    lat: float
    lon: float
    budget_bytes: int  # memory for experts
    patches_per_image: dict[int, dict[int, float]]  # layer -> expert -> patches per image
    address: str | None = None  # where its expert server listens


@dataclass
class Plan:
    holds: dict[str, dict[int, list[int]]]  # device -> layer -> experts it holds
    asks: dict[str, dict[int, dict[int, str]]]  # device -> layer -> expert -> peer that runs it
    unserved: dict[str, dict[int, list[int]]]  # device -> layer -> needed experts nobody runs
    bytes_per_image: dict[str, dict[str, float]] = field(default_factory=dict)  # device -> peer -> bytes


def plan_placement(
    devices: list[DeviceNeeds],
    rtt_ms: dict[tuple[str, str], float],
    expert_bytes: dict[int, int],
    tokens_per_patch: dict[int, int],
    widths: dict[int, int],
) -> Plan:
    """Place experts (`expert_bytes` per layer) on devices; `rtt_ms` is symmetric, missing pairs unreachable."""
    holds = {d.name: {layer: [] for layer in expert_bytes} for d in devices}
    free = {d.name: d.budget_bytes for d in devices}
    for device in devices:  # 1. own experts, most used first
        wanted = sorted(
            ((n, layer, e) for layer, per in device.patches_per_image.items() for e, n in per.items() if n > 0),
            reverse=True,
        )
        for _, layer, expert in wanted:
            if free[device.name] >= expert_bytes[layer]:
                holds[device.name][layer].append(expert)
                free[device.name] -= expert_bytes[layer]

    def rtt(a: str, b: str) -> float:
        return rtt_ms.get((a, b), rtt_ms.get((b, a), float("inf")))

    asks: dict[str, dict[int, dict[int, str]]] = {d.name: {} for d in devices}
    unserved: dict[str, dict[int, list[int]]] = {d.name: {} for d in devices}
    for device in devices:  # 2. the rest from the nearest peer
        peers = sorted(
            (d for d in devices if d.name != device.name and rtt(device.name, d.name) < float("inf")),
            key=lambda d: rtt(device.name, d.name),
        )
        for layer, per in device.patches_per_image.items():
            for expert in sorted(e for e, n in per.items() if n > 0 and e not in holds[device.name][layer]):
                holder = next((p for p in peers if expert in holds[p.name][layer]), None)
                if holder is None:
                    holder = next((p for p in peers if free[p.name] >= expert_bytes[layer]), None)
                    if holder is not None:
                        holds[holder.name][layer].append(expert)
                        free[holder.name] -= expert_bytes[layer]
                if holder is None:
                    unserved[device.name].setdefault(layer, []).append(expert)
                else:
                    asks[device.name].setdefault(layer, {})[expert] = holder.name
    plan = Plan({n: {layer: sorted(ids) for layer, ids in h.items()} for n, h in holds.items()}, asks, unserved)
    for device in devices:  # 3. what asking costs per image: tokens there and outputs back
        costs: dict[str, float] = {}
        for layer, per_expert in asks[device.name].items():
            for expert, peer in per_expert.items():
                patches = device.patches_per_image[layer][expert]
                costs[peer] = (
                    costs.get(peer, 0.0) + 2 * patches * tokens_per_patch[layer] * widths[layer] * BYTES_PER_VALUE
                )
        plan.bytes_per_image[device.name] = costs
    return plan


@dataclass
class FleetDevice:
    """A device as placement sees it (deploy's fleet file describes them: `expert_memory_kb`, `expert_address`)."""

    name: str
    lat: float
    lon: float
    memory_kb: int  # memory it gives experts
    address: str | None = None  # host:port of its expert server
