"""Per-expert federated averaging as a Flower Strategy, and the dense FedAvg baseline.

The strategy is an adapter: Flower's hooks (configure / aggregate, train / evaluate, plus the set-up query) over
Flower-free units, each tested on its own. `Roster` knows the nodes, `Sampler` picks a round's nodes, `Slicer`
cuts what each node is sent, `ReplyReader` and `read_once` decide what replies count, `ModelUpdater` moves the
model, `privacy` accounts. The strategy holds the global model itself, because every node gets a different slice;
Flower's stock FedAvg rejects replies with different keys and normalises over all replies, where here each expert
is averaged over the nodes that hold it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from geomoe.data.cells import cell_holding, coarsened
from geomoe.model.counting import tokens_per_image
from geomoe.model.importance import keep_set
from geomoe.model.network import GeoMoENet
from geomoe.server.acceptance import Rejections, outliers, read_once
from geomoe.server.privacy import over_budget, run_epsilon
from geomoe.server.replies import (
    Evaluation,
    QueryReply,
    RejectedReply,
    ReplyReader,
    SentSpec,
    TrainReply,
    link_use,
    spec_of,
)
from geomoe.server.roster import Roster
from geomoe.server.sampling import Sampler
from geomoe.server.slicing import NodeSlice, Slicer
from geomoe.server.state import ServerState
from geomoe.server.updating import ModelUpdater
from geomoe.wire import messages as msg
from geomoe.wire.privacy import clip_update
from geomoe.wire.run_config import RunConfig

log = logging.getLogger("geomoe.server")


class GeoExpertStrategy(Strategy):
    """Sends each node its slice of the global model and aggregates per expert / per row."""

    def __init__(
        self, cfg: RunConfig, model: GeoMoENet, base: dict[str, torch.Tensor], state: ServerState, world: dict
    ):
        """`world` holds what every node is told in its query (msg.WORLD_KEYS: species, cells, world file)."""
        self.cfg, self.model, self.base, self.state, self.world = cfg, model, base, state, world
        self.fed, self.privacy = cfg.federation, cfg.privacy
        self.roster = Roster(self.fed.max_examples_factor)
        self.sampler = Sampler(self.fed, self.privacy, cfg.seed)
        self.slicer = Slicer(cfg, model, state.keep)
        self.updater = ModelUpdater(self.slicer, state)
        self.rejections = Rejections()
        self.cells = list(world.get(msg.CELLS, []))  # the run's client cells
        self.reported, self.coarse = coarsened(self.cells, self.fed.location_level)  # what nodes report, per cell
        tokens = tokens_per_image(model, cfg.world.input_size())
        self.reader = ReplyReader(cfg, self.reported, tokens)
        if self.privacy.enabled and not state.clip_norm:
            state.clip_norm = self.privacy.clip_norm
        self.sent: dict[int, SentSpec] = {}  # node -> what its training message held
        self.received: dict[str, Evaluation] = {}  # node name -> accuracy of the model it received this round
        self.population: list[int] = []  # nodes that could have been sampled this round (fixed DP denominators)
        self.sampling_rate = 1.0  # q of this round
        self.asked_to_evaluate: set[int] = set()
        self.reachable: set[int] | None = None  # simulated clock: the nodes whose link is up now; None: all listed

    # --- who takes part ------------------------------------------------------------------------
    def online(self, grid: Grid) -> list[int]:
        """Registered nodes the SuperLink lists (and, on a simulated clock, whose link is up: `reachable`)."""
        listed = grid.get_node_ids()
        return self.roster.online(listed if self.reachable is None else set(listed) & self.reachable)

    def round_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """The nodes sampled for `server_round` (deterministic, so the loop can prepare them first)."""
        return self.sampler.sample(server_round, self.online(grid))

    def keep_known(self, node_id: int) -> bool:
        return self.slicer.keep_known(self.roster.nodes[node_id])

    # --- messages ------------------------------------------------------------------------------
    def message(self, node_id: int, server_round: int, kind: str, piece: NodeSlice | None = None) -> Message:
        """A node's slice (`piece`, else cut now) as a train or evaluate message; the base rides along until the
        node has confirmed it."""
        node = self.roster.nodes[node_id]
        piece = piece or self.slicer.slice_for(node)
        config = {"round": server_round, "location": node.location}
        if self.privacy.enabled:
            config[msg.CLIP_NORM] = self.state.clip_norm
        # The run config went with the query (the node keeps it): a round's message says only what changes.
        content = self.records(msg.config_record(config), piece, self.fed.download_compression)
        if not node.has_base:
            content[msg.BASE] = msg.to_record(self.base)
            self.roster.base_goes_to(node_id)
        if kind == "train":
            self.sent[node_id] = spec_of(piece.trained())
        return Message(content, dst_node_id=node_id, message_type=kind)

    @staticmethod
    def records(config: ConfigRecord, piece: NodeSlice, codec: str) -> RecordDict:
        content = RecordDict({msg.CONFIG: config, msg.ROUTER: msg.to_record(piece.router)})
        msg.pack(content, msg.EXPERTS, piece.experts, codec)
        for name, tensors in ((msg.HEAD, piece.head), (msg.SHARED, piece.shared)):
            if tensors:
                msg.pack(content, name, tensors, codec)
        return content

    # --- Strategy interface --------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node with its slice (`arrays` is unused: the strategy holds the model)."""
        online = self.online(grid)
        self.population = [n for n in online if self.keep_known(n)]
        self.sampling_rate = self.sampler.rate(len(online))
        self.sent = {}
        messages = []
        for node_id in self.sampler.sample(server_round, online):
            if self.keep_known(node_id):
                messages.append(self.message(node_id, server_round, "train"))
            else:
                log.warning("node %s (%s) has no keep set yet: left out of this round", node_id,
                            self.roster.nodes[node_id].cell)  # fmt: skip
        return messages

    def accept(self, server_round: int, replies: Iterable[Message]) -> list[tuple[QueryReply, TrainReply]]:
        """Valid train replies as (node, reply) ordered by location; each update clipped under DP."""
        nodes = self.roster.nodes
        parsed = read_once(
            server_round, replies, self.sent,
            lambda n, reply: self.reader.train(reply, self.sent[n], nodes[n], self.roster.examples_cap(n)),
            self.rejections, "train",
        )  # fmt: skip
        for node_id, reason in outliers(parsed, self.fed.outlier_factor).items():
            self.rejections.reject(server_round, node_id, reason, "train")
            del parsed[node_id]
        self.received = {}
        for node_id, reply in parsed.items():
            self.roster.confirm_base(node_id)
            if self.privacy.enabled:  # exact bound on every node's influence, whatever it sent
                reply.update, _ = clip_update(reply.update, self.state.clip_norm)
            if reply.received is not None:
                self.received[nodes[node_id].name] = reply.received
        return sorted(((nodes[n], r) for n, r in parsed.items()), key=lambda item: item[0].location)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accept(server_round, replies)
        population = [self.roster.nodes[n] for n in self.population]
        if self.privacy.enabled:
            self.updater.apply_private(accepted, population, self.sampling_rate)
        if not accepted:
            return None, None
        if not self.privacy.enabled:
            self.updater.apply(accepted, population)
        examples = sum(r.examples for _, r in accepted)
        metrics = {
            "train_loss": sum(r.train_loss * r.examples for _, r in accepted) / max(examples, 1),
            "examples": examples,
            "replies": len(accepted),
            "unknown_species_images": sum(r.unknown_species_images for _, r in accepted),
            "skipped_images": sum(r.skipped_images for _, r in accepted),
            "compute_seconds": sum(r.compute_seconds for _, r in accepted),
            **{f"link_{k}": n for k, n in link_use([r for _, r in accepted]).items()},
        }
        return ArrayRecord(), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        asked = [node_id for node_id in self.online(grid) if self.keep_known(node_id)]
        self.asked_to_evaluate = set(asked)
        return [self.message(node_id, server_round, "evaluate") for node_id in asked]

    def per_cell_evaluation(self, server_round: int, replies: Iterable[Message]) -> dict[str, dict]:
        """Accuracy, test examples and per-species recall of each replying node's cell."""
        nodes = self.roster.nodes
        parsed = read_once(
            server_round, replies, self.asked_to_evaluate,
            lambda n, reply: self.reader.evaluation(reply, nodes[n]), self.rejections, "evaluate",
        )  # fmt: skip
        for node_id in parsed:
            self.roster.confirm_base(node_id)
        return {nodes[n].name: vars(evaluation) for n, evaluation in parsed.items()}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        per_cell = self.per_cell_evaluation(server_round, replies)
        if not per_cell:
            return None
        return MetricRecord(weighted_accuracy(per_cell) | {"cells": len(per_cell)})

    def summary(self) -> None:
        fed = self.fed
        log.info("GeoExpertStrategy: strategy=%s trainable=%s weighting=%s optimizer=%s keep=%s",
                 fed.strategy, fed.trainable, fed.weighting, fed.server_optimizer, fed.keep)  # fmt: skip

    # --- privacy -------------------------------------------------------------------------------
    def epsilon(self) -> float | None:
        return run_epsilon(self.privacy, self.state)

    def over_budget(self, server_round: int, online: int) -> str | None:
        """Why the round would exceed privacy.epsilon_budget (with `online` nodes to sample from), or None."""
        return over_budget(self.privacy, self.state, server_round, self.sampler.rate(online))

    # --- setting up nodes ----------------------------------------------------------------------
    def configure_query(self, node_ids: list[int], with_model: bool) -> list[Message]:
        """Ask nodes where they are; with the full model attached they also report how they route."""
        messages = []
        for node_id in node_ids:
            config = msg.config_record({"run": self.cfg.to_json(), **self.world})
            if with_model:
                content = self.records(config, self.slicer.full_model(), "none")
                known = self.roster.nodes.get(node_id)
                if not (known and known.has_base):  # it said so in its first query
                    content[msg.BASE] = msg.to_record(self.base)
            else:
                content = RecordDict({msg.CONFIG: config})
            messages.append(Message(content, dst_node_id=node_id, message_type="query"))
        return messages

    def placed(self, node_id: int, node: QueryReply, registered: tuple[float, float] | None) -> QueryReply:
        """`node` in the cell that holds the location its SuperNode was registered with, where it was registered
        with one: an administrator's word counts over the node's own."""
        if registered is None:
            return node
        index = cell_holding(self.cells, *registered)
        if index is None:
            raise RejectedReply("the location its SuperNode was registered with lies in none of the run's cells")
        location = self.coarse[index]
        if location != node.location:
            cell = self.reported[location]
            log.warning("node %s says it is in %s but was registered in %s: the registered location counts",
                        node_id, node.cell, cell)  # fmt: skip
            node.location, node.cell, node.name = location, cell, cell
        return node

    def register(
        self,
        server_round: int,
        replies: Iterable[Message],
        registered: dict[int, tuple[float, float]] | None = None,
        connected: set[int] | None = None,
    ) -> None:
        """Record each node's location and, from its routing statistics, its location's keep set. A node in
        `registered` (node id -> the (lat, lon) it was registered with on the SuperLink) is placed by that, not by
        what it says; `connected` (the SuperLink's node list) lets a rebooted device take its old place (`Roster.add`).
        A query reply that cannot be read leaves its node unregistered (asked again next round),
        never the run ended."""
        replies, registered = list(replies), registered or {}
        parsed = read_once(
            server_round, replies, [r.metadata.src_node_id for r in replies],
            lambda n, reply: self.placed(n, self.reader.query(reply), registered.get(n)), self.rejections, "query",
        )  # fmt: skip
        for node_id, node in parsed.items():
            if node.routing is not None and node.location not in self.state.keep:
                self.state.keep[node.location] = keep_set(node.routing, self.fed.keep)
            self.roster.add(node_id, node, connected)


def weighted_accuracy(per_cell: dict[str, dict[str, float]]) -> dict[str, float]:
    """Example-weighted global accuracy over cells."""
    examples = sum(c["examples"] for c in per_cell.values())
    return {
        "accuracy": sum(c["accuracy"] * c["examples"] for c in per_cell.values()) / max(examples, 1),
        "examples": examples,
    }
