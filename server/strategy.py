"""Per-expert federated averaging as a Flower Strategy, and the dense FedAvg baseline.

The strategy holds the global model itself, because every node gets a different slice of it:
its location's keep set of experts, the centroids of the others, the head rows of its species and
whatever shared parameters are trainable in this run. Flower's stock FedAvg rejects replies with
different keys and normalises over all replies; here each expert is averaged over the clients that
hold it. `strategy="fedavg"` sends every expert and head row to everyone (and with trainable="all" every shared
tensor too): dense FedAvg of the same trainable parts, or of the whole model.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from geomoe.data.cells import coarsened
from geomoe.model.counting import tokens_per_image
from geomoe.model.experts import KeepSet, global_centroids, shared_state, take_expert_state
from geomoe.model.importance import keep_set
from geomoe.model.moe_layer import EXPERT_PARAMS
from geomoe.model.network import GeoMoENet
from geomoe.server.aggregation import RowUpdate, mean_row_delta, noisy_row_mean, robust_row_delta
from geomoe.server.privacy import RoundMechanism, epsilon, local_epsilon, next_clip, update_noise_multiplier
from geomoe.server.replies import Evaluation, QueryReply, RejectedReply, ReplyReader, SentSpec, TrainReply, spec_of
from geomoe.server.server_optimizer import ServerOptimizer
from geomoe.wire import messages as msg
from geomoe.wire.bounded import printable
from geomoe.wire.privacy import clip_update, update_norm
from geomoe.wire.run_config import RunConfig

log = logging.getLogger("geomoe.server")
HEAD_ROWS = ("head.fc.weight", "head.fc.bias")


@dataclass
class ServerState:
    """Everything that must survive a crash besides the model (checkpointed after every round)."""

    completed_round: int = 0
    keep: dict[int, KeepSet] = field(default_factory=dict)  # location -> keep set
    optimizer: dict = field(default_factory=lambda: {"moments": {}})
    rounds: list[dict] = field(default_factory=list)  # report rows, one per completed round
    evaluations: dict[int, dict] = field(default_factory=dict)  # rounds done -> accuracy of that model
    clip_norm: float = 0.0  # the clip of the next round (privacy.clip_norm, then moved by adaptive clipping)
    mechanisms: list[dict] = field(default_factory=list)  # per noised round: sampling rate q, noise multiplier z
    rounds_taken: dict[str, int] = field(default_factory=dict)  # node -> rounds it sent an update (local noise)
    stopped: str = ""  # why training stopped before federation.rounds (the privacy budget), if it did


class GeoExpertStrategy(Strategy):
    """Sends each node its slice of the global model and aggregates per expert / per row."""

    def __init__(
        self, cfg: RunConfig, model: GeoMoENet, base: dict[str, torch.Tensor], state: ServerState, world: dict
    ):
        """`world` holds what every node is told in its query (msg.WORLD_KEYS: species, cells, world file)."""
        self.cfg, self.model, self.base, self.state, self.world = cfg, model, base, state, world
        self.fed, self.privacy = cfg.federation, cfg.privacy
        self.optimizer = ServerOptimizer(self.fed.server_optimizer, self.fed.server_lr)
        self.optimizer.load_state_dict(state.optimizer)
        self.nodes: dict[int, QueryReply] = {}
        self.sent: dict[int, SentSpec] = {}
        self.base_sent: set[int] = set()  # nodes sent the base whose reply has not yet confirmed it arrived
        self.rejections: list[dict] = []
        self.received: dict[str, Evaluation] = {}  # cell -> accuracy of the model its node received this round
        tokens = tokens_per_image(model, cfg.world.input_size())
        cells = list(world.get(msg.CELLS, []))
        self.reader = ReplyReader(cfg, coarsened(cells, self.fed.location_level)[0], tokens)
        if self.privacy.enabled and not state.clip_norm:
            state.clip_norm = self.privacy.clip_norm
        # DP noise and DP sampling must not be predictable from the run's seed.
        self.secret_seed = int.from_bytes(os.urandom(6), "little")
        self.noise = torch.Generator().manual_seed(self.secret_seed)
        self.population: list[int] = []  # nodes that could have been sampled this round (fixed DP denominators)
        self.sampling_rate = 1.0  # q of this round
        self.thin_rows_told = False  # DP rows that expect under one holder a round: said once (tell_of_thin_rows)
        self.asked_to_evaluate: set[int] = set()  # nodes sent this evaluation's messages

    # --- what a node receives ------------------------------------------------------------------
    @property
    def dense(self) -> bool:
        return self.fed.strategy == "fedavg"

    def keep_for(self, node: QueryReply) -> KeepSet:
        if self.dense:
            return {layer: list(range(self.cfg.model.num_experts)) for layer in self.cfg.model.moe_layers}
        return self.state.keep[node.location]

    def head_rows_for(self, node: QueryReply) -> list[int]:
        """Head rows a node trains: none under trainable="experts"; else every row (fedavg) or its species'."""
        if self.fed.trainable == "experts":
            return []
        return list(range(self.cfg.model.num_classes)) if self.dense else node.species

    def shared_trainable(self) -> list[str]:
        """Shared float tensors sent (and trained) every round: all of them under trainable="all", else none."""
        if self.fed.trainable != "all":
            return []
        return [k for k, v in shared_state(self.model).items() if v.is_floating_point() and k not in HEAD_ROWS]

    def node_content(self, node_id: int, server_round: int, train: bool) -> RecordDict:
        node = self.nodes[node_id]
        keep = self.keep_for(node)
        experts = take_expert_state(self.model, keep)
        router = {
            f"moe.{layer}.absent_centroids": global_centroids(module)[
                sorted(set(range(module.num_global_experts)) - set(keep[layer]))
            ]
            for layer, module in self.model.moe_layers().items()
        }
        state = self.model.state_dict()
        rows = torch.tensor(self.head_rows_for(node), dtype=torch.long)
        head = (
            {
                "head.fc.weight": state["head.fc.weight"][rows],
                "head.fc.bias": state["head.fc.bias"][rows],
                msg.HEAD_IDS: rows,
            }
            if len(rows)
            else {}
        )
        shared = {k: state[k].clone() for k in self.shared_trainable()}
        content = RecordDict(
            {
                # The run config went with the query (the node keeps it): a round's message says only what changes.
                msg.CONFIG: msg.config_record(
                    {"round": server_round, "location": node.location}
                    | ({msg.CLIP_NORM: self.state.clip_norm} if self.privacy.enabled else {})
                ),
                msg.ROUTER: msg.to_record(router),
            }
        )
        codec = self.fed.download_compression
        msg.pack(content, msg.EXPERTS, experts, codec)
        if head:
            msg.pack(content, msg.HEAD, head, codec)
        if shared:
            msg.pack(content, msg.SHARED, shared, codec)
        if not node.has_base:  # until a reply shows it arrived: a node that timed out or failed gets it again
            content[msg.BASE] = msg.to_record(self.base)
            self.base_sent.add(node_id)
        if train:
            self.sent[node_id] = spec_of({**experts, **head, **shared})
        return content

    # --- Strategy interface --------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node with its slice (`arrays` is unused: the strategy holds the model)."""
        online = self.online(grid)
        self.population = [n for n in online if self.keep_known(n)]
        self.sampling_rate = self.rate(len(online))
        return [
            Message(self.node_content(node_id, server_round, train=True), dst_node_id=node_id, message_type="train")
            for node_id in self.sample(server_round, online)
            if self.has_keep(node_id)
        ]

    def keep_known(self, node_id: int) -> bool:
        """Whether the node's location has a keep set (never-sampled cells, or a routing reply rejected or lost,
        have none)."""
        return self.dense or self.nodes[node_id].location in self.state.keep

    def has_keep(self, node_id: int) -> bool:
        """`keep_known`, logging a node left out of training for lack of one."""
        if self.keep_known(node_id):
            return True
        log.warning("node %s (%s) has no keep set yet: left out of this round", node_id, self.nodes[node_id].cell)
        return False

    def round_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """The nodes sampled for `server_round` (deterministic, so the loop can prepare them first)."""
        return self.sample(server_round, self.online(grid))

    def online(self, grid: Grid) -> list[int]:
        """Registered nodes the SuperLink still lists, by location: a node gone for good gets no more messages."""
        connected = set(grid.get_node_ids())
        return sorted((n for n in self.nodes if n in connected), key=lambda n: self.nodes[n].location)

    def rate(self, online: int) -> float:
        """Share of the online nodes a round samples."""
        count = self.fed.clients_per_round or max(1, round(self.fed.fraction_train * online))
        return min(1.0, count / max(online, 1))

    def sample(self, server_round: int, ordered: list[int]) -> list[int]:
        """Nodes for this round among `ordered`, deterministic given the seed and round (so the loop can prepare
        them first). Under DP each node is drawn independently with the round's rate (Poisson sampling, what the
        accountant assumes) from a seed the run's config does not reveal."""
        q = self.rate(len(ordered))
        if self.privacy.accounted:
            generator = torch.Generator().manual_seed(self.secret_seed * 1000 + server_round)
            draws = torch.rand(len(ordered), generator=generator).tolist()
            return [n for n, u in zip(ordered, draws, strict=True) if u < q]
        count = round(q * len(ordered))
        if count >= len(ordered):
            return ordered
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + server_round)
        return sorted(ordered[i] for i in torch.randperm(len(ordered), generator=generator)[:count].tolist())

    def accept(self, server_round: int, replies: Iterable[Message]) -> list[tuple[QueryReply, TrainReply]]:
        """Valid replies, one per node, as (node, reply) ordered by location; the others are logged. Whatever goes
        wrong while one node's reply is read is that reply's rejection: no reply can end the round."""
        accepted, seen = {}, set()
        self.received = {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            try:
                if node_id in seen:
                    raise RejectedReply("a second reply in this round")
                seen.add(node_id)
                if node_id not in self.sent:
                    raise RejectedReply("reply from a node that was not sent a training message")
                node = self.nodes[node_id]
                parsed = self.reader.train(reply, self.sent[node_id], node, self.examples_cap(node_id))
            except Exception as error:  # noqa: BLE001 - one node's reply fails alone, whatever it held
                self.reject(server_round, node_id, unreadable(error), "train")
                accepted.pop(node_id, None)  # a node that replies twice has neither reply counted
                continue
            self.confirm_base(node_id)
            if self.privacy.enabled:  # exact bound on every node's influence, whatever it sent
                parsed.update, _ = clip_update(parsed.update, self.state.clip_norm)
            accepted[node_id] = (node, parsed)
            if parsed.received is not None:
                self.received[node.name] = parsed.received
        self.drop_outliers(server_round, accepted)
        return sorted(accepted.values(), key=lambda item: item[0].location)

    def examples_cap(self, node_id: int) -> int:
        """The training examples a node's update may count: what it declared at query time, but at most
        `federation.max_examples_factor` times the median of the other registered nodes' declarations, so that a
        node declaring 10^9 examples cannot outweigh every honest holder of a shared expert."""
        declared = self.nodes[node_id].train_examples
        others = [node.train_examples for other, node in self.nodes.items() if other != node_id]
        if not others:
            return declared
        return min(declared, max(1, math.floor(self.fed.max_examples_factor * statistics.median(others))))

    def drop_outliers(self, server_round: int, accepted: dict[int, tuple[QueryReply, TrainReply]]) -> None:
        """With `outlier_factor` set, leave out replies whose update norm exceeds it times the round's median."""
        if not self.fed.outlier_factor or not accepted:
            return
        norms = {node_id: update_norm(reply.update) for node_id, (_, reply) in accepted.items()}
        bound = self.fed.outlier_factor * statistics.median(norms.values())
        for node_id, norm in norms.items():
            if norm > bound:
                self.reject(server_round, node_id, f"update norm {norm:.3g} is over {bound:.3g} (outlier_factor x "
                                                   "the median)")  # fmt: skip
                del accepted[node_id]

    def reject(self, server_round: int, node_id: int, reason: str, kind: str = "train") -> None:
        """Record and log a refused reply; the reason is bounded and escaped (it may quote what the node sent)."""
        reason = printable(reason)
        self.rejections.append({"round": server_round, "node": node_id, "kind": kind, "reason": reason})
        log.warning("round %d: rejected %s reply of node %s: %s", server_round, kind, node_id, reason)

    def confirm_base(self, node_id: int) -> None:
        """A node that replied well to a message carrying the base holds it now."""
        if node_id in self.base_sent:
            self.base_sent.discard(node_id)
            self.nodes[node_id].has_base = True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accept(server_round, replies)
        if self.privacy.enabled:
            self.apply_private_round(accepted)  # noise is released even when no node took part
        if not accepted:
            return None, None
        if not self.privacy.enabled:
            self.apply_updates(accepted)
        examples = sum(r.examples for _, r in accepted)
        loss = sum(r.train_loss * r.examples for _, r in accepted) / max(examples, 1)
        left_out = {
            "unknown_species_images": sum(r.unknown_species_images for _, r in accepted),
            "skipped_images": sum(r.skipped_images for _, r in accepted),
            "compute_seconds": sum(r.compute_seconds for _, r in accepted),
        }
        return ArrayRecord(), MetricRecord(
            {"train_loss": loss, "examples": examples, "replies": len(accepted), **left_out}
        )

    def row_holders(self) -> dict[str, torch.Tensor]:
        """How many nodes of the round's population hold each expert of each MoE layer (`moe.{layer}`) and each
        head row (`head`)."""
        population = [self.nodes[n] for n in self.population]
        holders = {}
        for layer, module in self.model.moe_layers().items():
            holders[f"moe.{layer}"] = torch.zeros(module.num_global_experts)
            for node in population:
                holders[f"moe.{layer}"][self.keep_for(node)[layer]] += 1
        holders["head"] = torch.zeros(self.cfg.model.num_classes)
        for node in population:
            holders["head"][self.head_rows_for(node)] += 1
        return holders

    def row_groups(
        self, accepted: list[tuple[QueryReply, TrainReply]]
    ) -> Iterator[tuple[str, torch.Tensor, list[RowUpdate], torch.Tensor]]:
        """Every tensor a round may change, as rows: (name, target, the replies' row updates, how many nodes of
        the round's population hold each row). Experts and head rows are rows of their stacked tensors; a
        shared tensor is one row. Update weights are the reader's bounded counts: routed tokens, or examples."""
        holders = self.row_holders()
        for layer, module in self.model.moe_layers().items():
            ids_key = f"moe.{layer}.ids"
            for param in EXPERT_PARAMS:
                updates = [
                    RowUpdate(r.update[ids_key], r.update[f"moe.{layer}.{param}"], self.expert_weight(r, layer))
                    for _, r in accepted
                    if ids_key in r.update
                ]
                yield f"moe.{layer}.{param}", getattr(module, param).data, updates, holders[f"moe.{layer}"]
        for name in HEAD_ROWS:
            updates = [
                RowUpdate(rows, r.update[name], torch.full((len(rows),), r.examples))
                for _, r in accepted
                if (rows := r.update.get(msg.HEAD_IDS)) is not None
            ]
            yield name, self.model.get_parameter(name).data, updates, holders["head"]
        state = self.model.state_dict()
        for name in self.shared_trainable():
            updates = [
                RowUpdate(torch.zeros(1, dtype=torch.long), r.update[name].unsqueeze(0), torch.tensor([r.examples]))
                for _, r in accepted
                if name in r.update
            ]
            yield name, state[name].unsqueeze(0), updates, torch.tensor([float(len(self.population))])

    def expert_weight(self, reply: TrainReply, layer: int) -> torch.Tensor:
        ids = reply.update[f"moe.{layer}.ids"]
        if self.fed.weighting == "tokens":
            return reply.token_counts[layer][ids].float()
        return torch.full((len(ids),), reply.examples)

    def apply_updates(self, accepted: list[tuple[QueryReply, TrainReply]]) -> None:
        """Per-row weighted mean (or coordinate-wise median / trimmed mean) over each row's holders, through
        the server optimiser."""
        for name, target, updates, _ in self.row_groups(accepted):
            if self.fed.aggregator == "mean":
                delta, touched = mean_row_delta(target.shape[0], updates)
            else:
                delta, touched = robust_row_delta(
                    target.shape[0], updates, self.fed.aggregator, self.fed.trim_fraction, self.fed.robust_min_holders
                )
            if delta is not None:
                self.optimizer.apply(name, target, delta, touched)
        self.state.optimizer = self.optimizer.state_dict()

    def apply_private_round(self, accepted: list[tuple[QueryReply, TrainReply]]) -> None:
        """One DP round: noisy per-row sums of the clipped updates over fixed denominators, then the accounting
        and (with adaptive clipping) the next round's clip."""
        expected_nodes = self.sampling_rate * len(self.population)
        if not self.thin_rows_told:
            self.tell_of_thin_rows()
        z = update_noise_multiplier(self.privacy, expected_nodes)
        std = z * self.state.clip_norm if self.privacy.noise == "central" else 0.0  # local: the devices added it
        for name, target, updates, holders in self.row_groups(accepted):
            delta, touched = noisy_row_mean(tuple(target.shape), updates, holders * self.sampling_rate, std, self.noise)
            self.optimizer.apply(name, target, delta, touched)
        self.state.optimizer = self.optimizer.state_dict()
        if self.privacy.accounted and self.privacy.noise == "central":
            mechanism = RoundMechanism(self.sampling_rate, self.privacy.noise_multiplier)
            self.state.mechanisms.append(vars(mechanism))
        for node, _ in accepted:
            self.state.rounds_taken[node.name] = self.state.rounds_taken.get(node.name, 0) + 1
        if self.privacy.adaptive_clip:
            unclipped = sum(reply.unclipped for _, reply in accepted)
            self.state.clip_norm = next_clip(self.privacy, self.state.clip_norm, unclipped, expected_nodes, self.noise)

    def tell_of_thin_rows(self) -> None:
        """Say, once a run, how many held rows expect fewer than one holder a round under DP. Their noise is not
        averaged down (its denominator is 1), and in many rounds no holder of theirs is sampled: at 300 cells and
        q = 0.1 the species rows held by few cells took the global model's accuracy from 0.39 to 0.01 (README)."""
        self.thin_rows_told = True
        expected = {name: counts * self.sampling_rate for name, counts in self.row_holders().items()}
        head = expected.pop("head")
        experts = torch.cat(list(expected.values()))
        held_experts, held_rows = int((experts > 0).sum()), int((head > 0).sum())
        thin_experts, thin_rows = int(((experts > 0) & (experts < 1)).sum()), int(((head > 0) & (head < 1)).sum())
        if thin_experts or thin_rows:
            log.warning(
                "DP at q = %.2g: %d of %d held experts and %d of %d held species rows expect fewer than one holder a "
                "round: their noise is not averaged down, and in many rounds it is all that moves them; sample more "
                'nodes a round, or leave the head rows out of training (federation.trainable = "experts")',
                self.sampling_rate, thin_experts, held_experts, thin_rows, held_rows,
            )  # fmt: skip

    def over_budget(self, server_round: int, online: int) -> str | None:
        """Why the round would exceed privacy.epsilon_budget (with `online` nodes to sample from), or None."""
        if not (self.privacy.accounted and self.privacy.epsilon_budget):
            return None
        projected = self.epsilon(next_round_rate=self.rate(online))
        if projected <= self.privacy.epsilon_budget:
            return None
        return (f"round {server_round} would bring epsilon to {projected:.3g}, over privacy.epsilon_budget="
                f"{self.privacy.epsilon_budget:g}")  # fmt: skip

    def epsilon(self, next_round_rate: float | None = None) -> float | None:
        """The run's epsilon at privacy.delta so far (or, given `next_round_rate`, after one more round sampling at
        that rate): the client-level guarantee of the sampled Gaussian rounds, or under local noise the guarantee
        of the device that sent most updates. None without a noised run."""
        if not self.privacy.accounted:
            return None
        if self.privacy.noise == "local":
            most = max(self.state.rounds_taken.values(), default=0) + int(next_round_rate is not None)
            return local_epsilon(self.privacy.noise_multiplier, most, self.privacy.delta)
        rounds = [RoundMechanism(**m) for m in self.state.mechanisms]
        if next_round_rate is not None:
            rounds.append(RoundMechanism(next_round_rate, self.privacy.noise_multiplier))
        return epsilon(rounds, self.privacy.delta)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        asked = [node_id for node_id in self.online(grid) if self.keep_known(node_id)]
        self.asked_to_evaluate = set(asked)
        return [
            Message(self.node_content(node_id, server_round, train=False), dst_node_id=node_id, message_type="evaluate")
            for node_id in asked
        ]

    def per_cell_evaluation(self, server_round: int, replies: Iterable[Message]) -> dict[str, dict]:
        """Accuracy, test examples and per-species recall of each replying node's cell (one reply per node asked)."""
        per_cell: dict[str, dict] = {}
        seen = set()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            try:
                if node_id not in self.asked_to_evaluate or node_id in seen:
                    raise RejectedReply("an evaluation reply it was not asked for")
                seen.add(node_id)
                evaluation = self.reader.evaluation(reply, self.nodes[node_id])
            except Exception as error:  # noqa: BLE001 - one node's reply fails alone, whatever it held
                self.reject(server_round, node_id, unreadable(error), "evaluate")
                continue
            self.confirm_base(node_id)
            per_cell[self.nodes[node_id].name] = vars(evaluation)
        return per_cell

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        per_cell = self.per_cell_evaluation(server_round, replies)
        if not per_cell:
            return None
        return MetricRecord(weighted_accuracy(per_cell) | {"cells": len(per_cell)})

    def summary(self) -> None:
        log.info(
            "GeoExpertStrategy: strategy=%s trainable=%s weighting=%s optimizer=%s keep=%s",
            self.fed.strategy,
            self.fed.trainable,
            self.fed.weighting,
            self.fed.server_optimizer,
            self.fed.keep,
        )

    # --- setting up nodes ----------------------------------------------------------------------
    def configure_query(self, node_ids: list[int], with_model: bool) -> list[Message]:
        """Ask nodes where they are; with the full model attached they also report how they route."""
        messages = []
        for node_id in node_ids:
            content = RecordDict({msg.CONFIG: msg.config_record({"run": self.cfg.to_json(), **self.world})})
            if with_model:
                full = {layer: list(range(self.cfg.model.num_experts)) for layer in self.cfg.model.moe_layers}
                content[msg.EXPERTS] = msg.to_record(take_expert_state(self.model, full))
                content[msg.ROUTER] = msg.to_record(
                    {
                        f"moe.{layer}.absent_centroids": torch.zeros(0, m.dim)
                        for layer, m in self.model.moe_layers().items()
                    }
                )
                if not (node_id in self.nodes and self.nodes[node_id].has_base):  # it said so in its first query
                    content[msg.BASE] = msg.to_record(self.base)
            messages.append(Message(content, dst_node_id=node_id, message_type="query"))
        return messages

    def register(self, server_round: int, replies: Iterable[Message]) -> None:
        """Record each node's location and, from its routing statistics, its location's keep set. A query reply
        that cannot be read leaves its node unregistered (asked again next round), never the run ended."""
        for reply in replies:
            node_id = reply.metadata.src_node_id
            try:
                node = self.reader.query(reply)
                if node.routing is not None and node.location not in self.state.keep:
                    self.state.keep[node.location] = keep_set(node.routing, self.fed.keep)
            except Exception as error:  # noqa: BLE001 - one node's reply fails alone, whatever it held
                self.reject(server_round, node_id, unreadable(error), "query")
                continue
            if node.unknown_species:
                names = ", ".join(f"{name} ({n})" for name, n in sorted(node.unknown_species.items()))
                log.warning("node %s (%s): images of species this run does not know: %s", node_id, node.cell, names)
            if node.skipped:
                log.warning("node %s (%s): left out of its data: %s", node_id, node.cell, node.skipped)
            if any(other.name == node.cell for other_id, other in self.nodes.items() if other_id != node_id):
                node.name = f"{node.cell}~{node_id}"  # two devices in one cell (or one coarse cell) stay apart
            self.nodes[node_id] = node
            node.routing = None  # used once; thousands of nodes need not keep their routing graphs


def unreadable(error: Exception) -> str:
    """The reason a reply was refused: the reader's own words, or what broke while reading it."""
    if isinstance(error, RejectedReply):
        return str(error)
    return f"could not be read ({type(error).__name__}: {error})"


def weighted_accuracy(per_cell: dict[str, dict[str, float]]) -> dict[str, float]:
    """Example-weighted global accuracy over cells."""
    examples = sum(c["examples"] for c in per_cell.values())
    return {
        "accuracy": sum(c["accuracy"] * c["examples"] for c in per_cell.values()) / max(examples, 1),
        "examples": examples,
    }
