"""`federation.mode = "async"`: buffered asynchronous aggregation (FedBuff) for devices online only sometimes.

Every registered node has one train message out. A node trains when it has one and answers whenever its link next
allows; the server takes answers one at a time, in the order they reach it (`server/field.py`), and aggregates per
expert every `federation.buffer_size` accepted updates. An update is weighed by the staleness of each of its rows
(`server/buffered.py`), and refused when staler than `federation.max_staleness`, trained from a version this node
was never sent or from the future, or delivered twice. A node that answers is sent its current slice at once if
its rows have changed since; otherwise it waits for the next aggregation that changes them (a node trains again only
on a newer model). Every `federation.eval_every` aggregations the server evaluates and checkpoints, with the slices
still out, so that `--resume` sends the same messages again and ends with the model of an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict

from flwr.app import Message

from geomoe.data.cells import cell_longitude
from geomoe.server.acceptance import outliers, unreadable
from geomoe.server.buffered import Buffered, Ledger, Refused, RowVersions, Sent, discount, stalest
from geomoe.server.field import Arrival, Field, LiveField, SimulatedField
from geomoe.server.replies import Evaluation, link_use, spec_of
from geomoe.server.slicing import NodeSlice
from geomoe.server.strategy import weighted_accuracy

log = logging.getLogger("geomoe.server")


class BufferedRun:
    """The asynchronous loop of one `Federation` (which holds the world, strategy, state, checkpoint and report)."""

    def __init__(self, federation, simulated: bool) -> None:  # noqa: ANN001 - Federation imports this module
        self.federation, self.strategy = federation, federation.strategy
        self.cfg, self.fed = federation.cfg, federation.cfg.federation
        saved = federation.state.buffered
        model = self.strategy.model
        layers = {layer: module.num_global_experts for layer, module in model.moe_layers().items()}
        self.versions = (
            RowVersions(saved["versions"]) if saved else RowVersions.start(layers, self.cfg.model.num_classes)
        )
        self.version = federation.state.completed_round  # aggregations done: the model version now
        self.ledger = Ledger()
        self.ledger.aggregated = {(name, v) for name, v in saved.get("taken", [])}
        self.ledger.retired = {(name, v) for name, v in saved.get("retired", [])}
        self.refused = Counter(saved.get("refused", {}))
        self.settled: dict[str, int] = dict(saved.get("settled", {}))  # node -> newest version of its update settled
        now, self.simulated = federation.state.clock_s, simulated
        self.field: Field = (
            SimulatedField(federation.grid, self.fed.message_ttl_s, now, self.cfg.world.field_clock())
            if simulated
            else LiveField(federation.grid, self.fed.message_ttl_s, now, self.send)
        )
        self.pieces: dict[int, tuple[int, NodeSlice, Sent]] = {}  # node -> its last message: version, slice, rows
        self.waiting: set[int] = set()  # nodes that answered and have nothing newer to train yet
        self.buffer: list[Buffered] = []  # accepted updates waiting for the next aggregation
        self.latest: dict[str, Evaluation] = {}  # node -> accuracy of the last slice it received
        self.initial: dict[str, Evaluation] = {}  # node -> accuracy of the initial model's slice (version 0)
        self.initial_accuracy: float | None = None  # the server's score of the initial model
        self.traffic: dict[int, dict] = {}  # node -> bytes since the last aggregation
        self.started = time.monotonic()

    # --- messages ------------------------------------------------------------------------------
    def send(self, node_id: int, saved: dict | None = None) -> None:
        """Send a node its current slice, or on resume the message it had out at the checkpoint (`saved`)."""
        node = self.strategy.roster.nodes[node_id]
        if saved is None:
            version, piece = self.version, self.strategy.slicer.slice_for(node)
            spec = spec_of(piece.trained())
            sent = Sent(spec, self.versions.snapshot(spec), self.field.tick())
        else:
            version, piece = saved["version"], NodeSlice(**saved["piece"])
            sent = Sent(spec_of(piece.trained()), saved["rows"], saved["sent_at"])
        message = self.strategy.message(node_id, version + 1, "train", piece)
        message.content["config"]["version"] = version
        message.content["config"]["settled"] = self.settled.get(node.name, -1)  # a field node drops these
        self.ledger.record(node.name, version, sent)
        self.pieces[node_id] = (version, piece, sent)
        examples = node.train_examples * self.cfg.train.epochs
        out = self.field.send(node_id, node.name, cell_longitude(node.cell), examples, message, sent.sent_at)
        self.count(node_id, "down", out.down_bytes)
        self.waiting.discard(node_id)

    def count(self, node_id: int, side: str, nbytes: int) -> None:
        entry = self.traffic.setdefault(node_id, {"down": 0, "up": 0, "down_by": {}, "up_by": {}})
        entry[side] += nbytes

    def changed_since(self, node_id: int) -> bool:
        """Whether any row of the node's slice is newer than the slice it was last sent."""
        _, _, sent = self.pieces[node_id]
        now = self.versions.snapshot(sent.spec)
        return any(bool((now[group] > rows).any()) for group, rows in sent.rows.items())

    # --- replies -------------------------------------------------------------------------------
    def receive(self, arrival: Arrival) -> None:
        """Take one reply; then the node's next message, unless it left the SuperLink meanwhile (`join` dropped it,
        and sends it again when it is back)."""
        node_id, reply = arrival.out.node_id, arrival.reply
        if not reply.has_error():
            self.count(node_id, "up", arrival.out.up_bytes)
        idle = self.strategy.reader.idle(reply)  # a field node with nothing newer to train on
        if not idle:
            self.take(node_id, reply)
        if node_id in self.pieces:
            if not idle and self.changed_since(node_id):
                self.send(node_id)
            else:
                self.waiting.add(node_id)

    def take(self, node_id: int, reply: Message) -> None:
        """An update into the buffer, or refused with its reason (whatever the reply held, it fails alone)."""
        node = self.strategy.roster.nodes[node_id]
        try:
            version = self.strategy.reader.trained_from(reply)
            self.settled[node.name] = max(self.settled.get(node.name, -1), min(version, self.version))
            sent = self.ledger.claim(node.name, version, self.version)
            parsed = self.strategy.reader.train(reply, sent.spec, node, self.strategy.roster.examples_cap(node_id))
            staleness = self.versions.staleness(sent)
            if (stale := stalest(staleness)) > self.fed.max_staleness:
                raise Refused("stale", f"staleness {stale} is over federation.max_staleness={self.fed.max_staleness}")
        except Exception as error:  # noqa: BLE001 - one node's reply fails alone, whatever it held
            self.refused[error.kind if isinstance(error, Refused) else "invalid"] += 1
            self.strategy.rejections.reject(self.version + 1, node_id, unreadable(error), "train")
        else:
            self.ledger.take(node.name, version)
            self.strategy.roster.confirm_base(node_id)
            discount(parsed, staleness, self.fed.staleness_exponent)
            self.buffer.append(Buffered(node, parsed, stale, version))
            if parsed.received is not None:
                self.latest[node.name] = parsed.received
                if version == 0:
                    self.initial[node.name] = parsed.received

    # --- aggregation ---------------------------------------------------------------------------
    def aggregate(self) -> None:
        """One model version from the buffer: per-row (robust) means of the discounted updates."""
        parsed = {index: item.reply for index, item in enumerate(self.buffer)}
        left_out = outliers(parsed, self.fed.outlier_factor)
        for index, reason in left_out.items():
            self.strategy.rejections.reject(self.version + 1, -1, f"{self.buffer[index].node.name}: {reason}", "train")
        kept = [item for index, item in enumerate(self.buffer) if index not in left_out]
        accepted = [(item.node, item.reply) for item in kept]
        roster = self.strategy.roster
        population = [node for node in roster.nodes.values() if self.strategy.slicer.keep_known(node)]
        if accepted:
            self.strategy.updater.apply(accepted, population)
            self.versions.advance([item.reply for item in kept])
        self.version += 1
        self.ledger.forget_stale(self.versions, self.fed.max_staleness)
        self.record(kept)
        self.buffer = []
        for node_id in sorted(self.waiting):
            if self.changed_since(node_id):
                self.send(node_id)

    def record(self, kept: list[Buffered]) -> None:
        """The aggregation's report row, in the sync rows' shape (a row per model version)."""
        replies = [item.reply for item in kept]
        examples = sum(reply.examples for reply in replies)
        slicer = self.strategy.slicer
        row = {
            "round": self.version,
            "seconds": time.monotonic() - self.started,
            "sim_hours": self.field.now / 3600 if self.simulated else None,
            "phases": {},
            "client_compute_seconds": sum(reply.compute_seconds for reply in replies),
            "train_loss": sum(r.train_loss * r.examples for r in replies) / examples if examples else None,
            "replies": len(kept),
            "staleness": [item.staleness for item in kept],
            "updates": [[item.node.name, item.version, item.staleness] for item in kept],  # node, trained from, s
            "traffic": {self.strategy.roster.name(n): t for n, t in self.traffic.items()},
            "experts_held": {item.node.name: sum(len(v) for v in slicer.keep_for(item.node).values()) for item in kept},
            "rejected": self.strategy.rejections.of_round(self.version),
            "sampled": [item.node.name for item in kept],
            "unknown_species_images": int(sum(reply.unknown_species_images for reply in replies)),
            "skipped_images": int(sum(reply.skipped_images for reply in replies)),
            "link": link_use(replies),
        }
        self.federation.state.rounds.append(row)
        self.federation.state.completed_round = self.version
        self.traffic, self.started = {}, time.monotonic()
        self.federation.console.print(
            f"aggregation {self.version}/{self.fed.rounds}: {len(kept)} updates, staleness "
            f"{max(row['staleness'], default=0)} at most"
            + (f", {row['sim_hours']:.1f} simulated hours" if self.simulated else "")
        )

    # --- evaluation and checkpoint ---------------------------------------------------------------
    def evaluate_and_checkpoint(self) -> None:
        """The nodes' last received slices (as they scored them) and the global model on the server's sample; then
        the checkpoint, with the slices still out so that a resumed run sends them again."""
        evaluations = self.federation.state.evaluations
        if 0 not in evaluations and self.initial_accuracy is not None and self.initial:
            initial = {name: vars(e) for name, e in self.initial.items()}
            evaluations[0] = {**weighted_accuracy(initial), "per_cell": initial,
                              "server_accuracy": self.initial_accuracy, "sim_hours": 0.0}  # fmt: skip
        per_cell = {name: vars(e) for name, e in self.latest.items()}
        evaluations[self.version] = {
            **(weighted_accuracy(per_cell) if per_cell else {}),
            "per_cell": per_cell,
            "server_accuracy": self.federation.server_accuracy(),
            "sim_hours": self.field.now / 3600 if self.simulated else None,
        }
        names = self.strategy.roster.name
        self.federation.state.clock_s = self.field.now
        self.federation.state.buffered = {
            "versions": self.versions.versions,
            "taken": sorted(self.ledger.aggregated),
            "retired": sorted(self.ledger.retired),
            "refused": dict(self.refused),
            "settled": dict(self.settled),
            "out": {
                names(node_id): {
                    "version": version,
                    "sent_at": self.field.out[node_id].sent_at,
                    "piece": asdict(piece),
                    "rows": sent.rows,
                }
                for node_id, (version, piece, sent) in self.pieces.items()
                if node_id in self.field.out
            },
            "waiting": sorted(names(node_id) for node_id in self.waiting),
        }
        self.federation.checkpoint()

    # --- the run -------------------------------------------------------------------------------
    def start(self) -> None:
        """Every registered node with a keep set gets a message; on resume, the messages out at the checkpoint."""
        roster = self.strategy.roster
        by_name = {node.name: node_id for node_id, node in roster.nodes.items()}
        saved = self.federation.state.buffered
        for name, out in sorted(saved.get("out", {}).items(), key=lambda item: item[1]["sent_at"]):
            if name in by_name:
                self.send(by_name[name], out)
        self.waiting = {by_name[name] for name in saved.get("waiting", []) if name in by_name}
        for node_id in sorted(roster.nodes, key=lambda n: roster.nodes[n].location):
            if node_id not in self.pieces and node_id not in self.waiting and self.strategy.keep_known(node_id):
                self.send(node_id)

    def run(self) -> None:
        """Aggregate until `federation.rounds` versions, the simulated-time limit, or no node left to answer."""
        limit_s = self.fed.max_sim_hours * 3600 if self.fed.max_sim_hours is not None else float("inf")
        if self.version == 0:
            self.initial_accuracy = self.federation.server_accuracy()
        self.start()
        quiet_since = time.monotonic()
        while self.version < self.fed.rounds:
            arrival = self.field.next()
            if not self.simulated:
                self.join()
            if arrival is None:
                quiet = time.monotonic() - quiet_since
                if self.simulated or (not self.field.out and quiet > self.fed.round_timeout_s):
                    self.federation.console.print("stopped: no node has a message out that it can answer")
                    self.federation.state.stopped = "no node left to answer"
                    break
                continue
            quiet_since = time.monotonic()
            if arrival.at > limit_s:
                self.federation.state.stopped = f"simulated time reached {self.fed.max_sim_hours} hours"
                break
            self.receive(arrival)
            if len(self.buffer) >= self.fed.buffer_size:
                self.aggregate()
                if self.version % self.fed.eval_every == 0 or self.version == self.fed.rounds:
                    self.evaluate_and_checkpoint()
        if self.version % self.fed.eval_every and self.version != self.fed.rounds:
            self.evaluate_and_checkpoint()

    def join(self) -> None:
        """Live: forget nodes the SuperLink no longer lists, and query, route and send to nodes that joined (a
        device switched on, or back after a reboot under a new id: it takes its old place, `Roster.add`)."""
        listed = set(self.federation.grid.get_node_ids())
        new = sorted(listed - set(self.strategy.roster.nodes))
        if new:
            self.federation.query_new(new, self.version)
            self.federation.route_new([n for n in new if n in self.strategy.roster.nodes], self.version)
        for node_id in [n for n in self.pieces if n not in listed or n not in self.strategy.roster.nodes]:
            self.field.drop(node_id)  # gone, or replaced by a newcomer in its place
            del self.pieces[node_id]
            self.waiting.discard(node_id)
        for node_id in new:
            if node_id in self.strategy.roster.nodes and self.strategy.keep_known(node_id):
                self.send(node_id)

    def report(self) -> dict:
        """What the report adds for an asynchronous run."""
        stale = [s for row in self.federation.state.rounds for s in row.get("staleness", [])]
        return {
            "refused": dict(self.refused),
            "staleness": {"mean": sum(stale) / len(stale) if stale else None, "max": max(stale, default=None)},
            "sim_hours": self.field.now / 3600 if self.simulated else None,
            "lost_nodes": [out.name for out in self.field.lost],
        }
