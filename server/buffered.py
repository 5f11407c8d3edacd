"""The bookkeeping of buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022), per expert: which model
version each node was sent, how stale each row of an update is when it arrives, and which updates may count.

A row (an expert of one MoE layer, a head row, or the shared tensors as one row) has a version: how many
aggregations changed it. An update's staleness is counted per row, in versions of that row since it was sent, so
an expert nobody else holds does not go stale while others train. Its rows are scaled by (1 + s)^-a before they
join the buffer: a stale update moves the model less, whoever else holds the row. Flower-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from geomoe.model.moe_layer import EXPERT_PARAMS
from geomoe.server.replies import QueryReply, RejectedReply, SentSpec, TrainReply
from geomoe.server.slicing import HEAD_ROWS
from geomoe.wire import messages as msg


@dataclass
class Buffered:
    """An accepted update waiting for the next aggregation."""

    node: QueryReply
    reply: TrainReply  # its rows already discounted for staleness
    staleness: int  # of its stalest row
    version: int  # the model version it was trained from


class Refused(RejectedReply):
    """An update refused for when it was trained or delivered; `kind` counts it in the report."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind  # future | duplicate | stale | unsent


SHARED = "shared"  # the row group of the shared tensors (trainable = "all"): one row, changed by every aggregation


def group_ids(spec: SentSpec) -> dict[str, torch.Tensor]:
    """Row group -> the row ids a node was sent: `moe.{layer}` experts, `head` rows, and the shared row."""
    groups = {name.removesuffix(".ids"): ids for name, ids in spec.ids.items() if name != msg.HEAD_IDS}
    if msg.HEAD_IDS in spec.ids:
        groups["head"] = spec.ids[msg.HEAD_IDS]
    if any(name not in spec.ids and not name.startswith(("moe.", *HEAD_ROWS)) for name in spec.shapes):
        groups[SHARED] = torch.zeros(1, dtype=torch.long)
    return groups


@dataclass
class Sent:
    """What one node was sent to train from one model version."""

    spec: SentSpec
    rows: dict[str, torch.Tensor]  # row group -> the versions of the rows sent, when they were sent
    sent_at: float  # clock seconds


class RowVersions:
    """How many aggregations changed each row (checkpointed as plain tensors in `versions`)."""

    def __init__(self, versions: dict[str, torch.Tensor]) -> None:
        self.versions = versions

    @classmethod
    def start(cls, layers: dict[int, int], num_classes: int) -> RowVersions:
        """Every row at version 0; `layers` maps each MoE layer to its expert count."""
        versions = {f"moe.{layer}": torch.zeros(n, dtype=torch.long) for layer, n in layers.items()}
        return cls(
            versions | {"head": torch.zeros(num_classes, dtype=torch.long), SHARED: torch.zeros(1, dtype=torch.long)}
        )

    def snapshot(self, spec: SentSpec) -> dict[str, torch.Tensor]:
        return {group: self.versions[group][ids].clone() for group, ids in group_ids(spec).items()}

    def staleness(self, sent: Sent) -> dict[str, torch.Tensor]:
        """Row group -> aggregations that changed each row sent since it was sent."""
        return {group: self.versions[group][ids] - sent.rows[group] for group, ids in group_ids(sent.spec).items()}

    def advance(self, updates: list[TrainReply]) -> None:
        """One aggregation of `updates`: every row one of them carried is a version newer."""
        touched = {group: torch.zeros_like(v, dtype=torch.bool) for group, v in self.versions.items()}
        for update in updates:
            for name, ids in update.update.items():
                if name == msg.HEAD_IDS:
                    touched["head"][ids] = True
                elif name.endswith(".ids"):
                    touched[name.removesuffix(".ids")][ids] = True
                elif not name.startswith(("moe.", *HEAD_ROWS)):
                    touched[SHARED][0] = True
        for group, mask in touched.items():
            self.versions[group] += mask.long()


def discount(reply: TrainReply, staleness: dict[str, torch.Tensor], exponent: float) -> None:
    """Scale each row of the update by (1 + s)^-exponent, s its row's staleness (in place)."""
    factors = {group: (1.0 + s.double()).pow(-exponent).float() for group, s in staleness.items()}
    for name, delta in reply.update.items():
        if name.endswith(".ids"):
            continue
        if name in HEAD_ROWS:
            factor = factors["head"]  # (k,): one per head row sent
        elif name.startswith("moe.") and name.rsplit(".", 1)[1] in EXPERT_PARAMS:
            factor = factors[name.rsplit(".", 1)[0]]  # (k,): one per expert sent
        else:
            factor = factors[SHARED][0]  # a shared tensor is one row
        reply.update[name] = delta * factor.reshape(-1, *([1] * (delta.dim() - 1))) if factor.dim() else delta * factor


def stalest(staleness: dict[str, torch.Tensor]) -> int:
    """An update's staleness: that of its stalest row."""
    return max((int(s.max()) for s in staleness.values() if len(s)), default=0)


class Ledger:
    """Every train message the server sent, by (node, version), and which of their updates were aggregated: an
    update counts once, and only for a version this node was sent."""

    def __init__(self) -> None:
        self.sent: dict[tuple[str, int], Sent] = {}
        self.aggregated: set[tuple[str, int]] = set()
        self.retired: set[tuple[str, int]] = set()  # sends forgotten because their update would be too stale

    def record(self, node: str, version: int, sent: Sent) -> None:
        self.sent[(node, version)] = sent

    def claim(self, node: str, version: int, current: int) -> Sent:
        """What `node` was sent at `version`, for the update it says it trained from that; refused (RejectedReply,
        with the reason) when the version is ahead of the server, was never sent to this node, was taken already
        or has gone too stale."""
        if version > current:
            raise Refused("future", f"trained from version {version}, ahead of the server's {current}")
        if (node, version) in self.aggregated:
            raise Refused("duplicate", f"its update of version {version} was already taken (a duplicate delivery)")
        if (node, version) in self.retired:
            raise Refused("stale", f"trained from version {version}, now staler than federation.max_staleness")
        if (node, version) not in self.sent:
            raise Refused("unsent", f"trained from version {version}, which the server never sent this node")
        return self.sent[(node, version)]

    def take(self, node: str, version: int) -> None:
        """The update joins the buffer: forget what was sent, refuse it from now on."""
        self.aggregated.add((node, version))
        self.sent.pop((node, version), None)

    def forget_stale(self, versions: RowVersions, max_staleness: int) -> None:
        """Drop what was sent where its update could no longer count (a row staler than `max_staleness`); an
        update for it is then refused as too stale (`retired`)."""
        for key in [key for key, sent in self.sent.items() if stalest(versions.staleness(sent)) > max_staleness]:
            del self.sent[key]
            self.retired.add(key)
