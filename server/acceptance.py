"""Which replies of a round count: one reply per node that was asked, each read by the reply reader, outliers left
out on request. Whatever goes wrong while one node's reply is read is that reply's rejection, logged and listed
in the report: no reply can end the round. Flower-free apart from the messages themselves."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable

from flwr.app import Message

from geomoe.server.replies import Evaluation, QueryReply, RejectedReply, TrainReply
from geomoe.wire.bounded import printable
from geomoe.wire.privacy import update_norm

log = logging.getLogger("geomoe.server")


class Rejections:
    """Refused replies, as report rows: {round, node, kind, reason}."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def reject(self, server_round: int, node_id: int, reason: str, kind: str) -> None:
        """Record and log a refused reply; the reason is bounded and escaped (it may quote what the node sent)."""
        reason = printable(reason)
        self.rows.append({"round": server_round, "node": node_id, "kind": kind, "reason": reason})
        log.warning("round %d: rejected %s reply of node %s: %s", server_round, kind, node_id, reason)

    def of_round(self, server_round: int) -> list[dict]:
        return [row for row in self.rows if row["round"] == server_round]


def unreadable(error: Exception) -> str:
    """The reason a reply was refused: the reader's own words, or what broke while reading it."""
    if isinstance(error, RejectedReply):
        return str(error)
    return f"could not be read ({type(error).__name__}: {error})"


def read_once(
    server_round: int,
    replies: Iterable[Message],
    asked: Iterable[int],
    read: Callable[[int, Message], TrainReply | Evaluation | QueryReply],
    rejections: Rejections,
    kind: str,
) -> dict[int, TrainReply | Evaluation | QueryReply]:
    """Each reply read by `read(node_id, reply)`, by node id. A reply from a node not `asked`, a second reply of a
    node (which leaves neither counted) and one `read` fails on are rejected."""
    asked, read_ok, seen = set(asked), {}, set()
    for reply in replies:
        node_id = reply.metadata.src_node_id
        try:
            if node_id in seen:
                raise RejectedReply("a second reply in this round")
            seen.add(node_id)
            if node_id not in asked:
                raise RejectedReply(f"a {kind} reply from a node that was not sent a {kind} message")
            read_ok[node_id] = read(node_id, reply)
        except Exception as error:  # noqa: BLE001 - one node's reply fails alone, whatever it held
            rejections.reject(server_round, node_id, unreadable(error), kind)
            read_ok.pop(node_id, None)
    return read_ok


def outliers(updates: dict[int, TrainReply], factor: float | None) -> dict[int, str]:
    """Nodes whose update norm exceeds `factor` times the round's median, with the reason (none when factor is
    None)."""
    if factor is None or not updates:
        return {}
    norms = {node_id: update_norm(reply.update) for node_id, reply in updates.items()}
    bound = factor * statistics.median(norms.values())
    return {
        node_id: f"update norm {norm:.3g} is over {bound:.3g} (outlier_factor x the median)"
        for node_id, norm in norms.items()
        if norm > bound
    }
