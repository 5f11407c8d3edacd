"""The nodes a run knows: where each is, what it declared, whether it holds the base. Flower-free: it sees node
ids and parsed query replies, so the server loop and tests share one account of who is in the federation."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable

from geomoe.server.replies import QueryReply

log = logging.getLogger("geomoe.server")


class Roster:
    """Registered nodes by Flower node id, and which of them were sent the base but have not confirmed it."""

    def __init__(self, max_examples_factor: float) -> None:
        self.max_examples_factor = max_examples_factor
        self.nodes: dict[int, QueryReply] = {}
        self.base_sent: set[int] = set()  # nodes sent the base whose reply has not yet confirmed it arrived

    def add(self, node_id: int, node: QueryReply, connected: set[int] | None = None) -> None:
        """Register (or re-register) a node, naming it apart when another node reports the same cell. Where that
        other node is no longer `connected` (the SuperLink's list), or says it is the same device (the id a field
        node keeps in its state folder), the newcomer is that device back under a new node id (a reboot, a new
        SuperNode process): it takes the old node's place and name."""
        if node.unknown_species:
            names = ", ".join(f"{name} ({n})" for name, n in sorted(node.unknown_species.items()))
            log.warning("node %s (%s): images of species this run does not know: %s", node_id, node.cell, names)
        if node.skipped:
            log.warning("node %s (%s): left out of its data: %s", node_id, node.cell, node.skipped)
        itself = next((other for other, known in self.nodes.items()
                       if other != node_id and node.device and known.device == node.device), None)  # fmt: skip
        holder = next((other for other, known in self.nodes.items() if other != node_id and known.name == node.cell),
                      None)  # fmt: skip
        if itself is not None:  # its state folder says it is a device the run knows: back after a reboot
            log.info("node %s is device %s (node %s before): it takes its old place", node_id, node.device, itself)
            node.name = self.nodes.pop(itself).name
        elif holder is not None and connected is not None and holder not in connected:
            log.info("node %s (%s) takes the place of node %s, gone from the SuperLink", node_id, node.cell, holder)
            del self.nodes[holder]
        elif holder is not None:
            node.name = f"{node.cell}~{node_id}"  # two devices in one cell (or one coarse cell) stay apart
        node.routing = None  # used once; thousands of nodes need not keep their routing graphs
        self.nodes[node_id] = node

    def online(self, connected: Iterable[int]) -> list[int]:
        """Registered nodes among `connected` (what the SuperLink still lists), ordered by location: a node gone
        for good gets no more messages."""
        connected = set(connected)
        return sorted((n for n in self.nodes if n in connected), key=lambda n: self.nodes[n].location)

    def name(self, node_id: int) -> str:
        """How reports name a node: its registered name, or its id before it registered."""
        return self.nodes[node_id].name if node_id in self.nodes else str(node_id)

    def examples_cap(self, node_id: int) -> int:
        """The training examples a node's update may count: what it declared at query time, but at most
        `max_examples_factor` times the median of the other registered nodes' declarations, so that a node
        declaring 10^9 examples cannot outweigh every honest holder of a shared expert."""
        declared = self.nodes[node_id].train_examples
        others = [node.train_examples for other, node in self.nodes.items() if other != node_id]
        if not others:
            return declared
        return min(declared, max(1, math.floor(self.max_examples_factor * statistics.median(others))))

    def base_goes_to(self, node_id: int) -> None:
        """The base is attached to a message for this node: until a reply confirms it, it is sent again."""
        self.base_sent.add(node_id)

    def confirm_base(self, node_id: int) -> None:
        """A node that replied well to a message carrying the base holds it now."""
        if node_id in self.base_sent:
            self.base_sent.discard(node_id)
            self.nodes[node_id].has_base = True
