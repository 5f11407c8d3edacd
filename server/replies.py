"""The server's trust boundary: the one module that reads what a node sends.

A node may be buggy or adversarial. Every reply (query, train, evaluate) is checked against what the server sent
that node and what it knows of the run, and comes out as a typed object whose numbers are bounded: tensors are
exactly the ones sent (names, shapes, dtypes, row ids), finite and of bounded norm; the codec is the run's, and
sizes are checked before anything is decoded; counts that weigh an update are finite, non-negative and no larger
than the node's declared examples can produce; a location must be one of the run's, with its own cell. Anything
else raises RejectedReply with the reason; the caller logs it and goes on without that reply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from geomoe.model.importance import RoutingStats
from geomoe.wire import messages as msg
from geomoe.wire.compression import Pipeline, decode_all
from geomoe.wire.privacy import update_norm
from geomoe.wire.run_config import RunConfig

REPLY_ALLOWANCE = 64 * 1024  # bytes a reply may carry besides its update (metrics, routing counts)
NORM_FLOOR = 1.0  # the update-norm bound never falls below max_update_norm times this (tensors sent near zero)


class RejectedReply(ValueError):
    """A reply that must not be used; the message says why."""


@dataclass
class SentSpec:
    """What a node was sent to train: tensor name -> (shape, dtype), ids arrays by name, bytes and norm sent."""

    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    ids: dict[str, torch.Tensor]
    trainable_bytes: int
    norm: float  # L2 norm of the floating-point tensors sent


def spec_of(tensors: dict[str, torch.Tensor]) -> SentSpec:
    ids = {k: v.clone() for k, v in tensors.items() if k.endswith(".ids")}
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return SentSpec(shapes, ids, sum(v.numel() * v.element_size() for v in tensors.values()), update_norm(tensors))


@dataclass
class QueryReply:
    """Where a node is and what it holds (its query reply)."""

    location: int  # index into the run's client cells
    cell: str
    has_base: bool  # the node holds the initial shared state
    species: list[int]  # distinct species of its training data, in 0..classes-1
    train_examples: int
    source: str = ""
    unknown_species: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    routing: RoutingStats | None = None  # how its validation images route (when it was sent the model)
    name: str = ""  # how reports name the node: its cell, or cell~node-id when another node reports that cell
    base_from_file: bool = False  # a virtual node that read the base from the server's file (was not sent it)

    def __post_init__(self) -> None:
        self.name = self.name or self.cell


@dataclass
class Evaluation:
    """A node's evaluation of a model on its test split."""

    accuracy: float
    examples: float
    recall: dict[str, float]  # species id -> recall, species present only


@dataclass
class TrainReply:
    """A node's training reply: its update and how much each of its rows may weigh."""

    update: dict[str, torch.Tensor]
    token_counts: dict[int, torch.Tensor]  # layer -> patches routed to each expert on its training set
    examples: float  # training examples seen (epochs x train examples)
    train_loss: float
    received: Evaluation | None  # accuracy of the model it received, on its test split
    unknown_species_images: float
    skipped_images: float
    unclipped: float = 1.0  # under DP: 1 if its update fitted under the round's clip before clipping, else 0
    compute_seconds: float = 0.0  # what it says its evaluation + training took (the framework's share is the rest)


class ReplyReader:
    """Reads replies for one run: knows its cells, classes, MoE layout, codec and bounds."""

    def __init__(self, cfg: RunConfig, cells: list[str], tokens_per_image: dict[int, int]) -> None:
        self.cfg, self.cells, self.tokens_per_image = cfg, cells, tokens_per_image
        self.num_classes = cfg.model.num_classes
        self.num_experts = cfg.model.num_experts
        self.layers = list(cfg.model.moe_layers)
        self.upload = cfg.federation.upload_compression

    # --- query -----------------------------------------------------------------------------------
    def query(self, reply: Message) -> QueryReply:
        _no_error(reply)
        info = _record(reply, msg.INFO, ConfigRecord)
        location = _int(info, "location", 0, len(self.cells) - 1)
        cell = _str(info, "cell")
        if cell != self.cells[location]:
            raise RejectedReply(f"claims location {location} with cell {cell!r}; that location's cell is "
                                f"{self.cells[location]!r}")  # fmt: skip
        species = _json(info, "species", list)
        if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < self.num_classes for s in species):
            raise RejectedReply(f"species must be ids in 0..{self.num_classes - 1}")
        if len(set(species)) != len(species):
            raise RejectedReply("species ids repeat")
        has_base, from_file = info.get("has-base"), info.get("base-from-file", False)
        for key, value in (("has-base", has_base), ("base-from-file", from_file)):
            if not isinstance(value, bool):
                raise RejectedReply(f"{key} must be true or false, got {value!r}")
        routing = self._routing(reply, full=True) if msg.TOKENS in reply.content else None
        return QueryReply(
            location=location,
            cell=cell,
            has_base=has_base or routing is not None,  # it was sent the base with the model
            base_from_file=from_file and has_base,
            species=sorted(species),
            train_examples=_int(info, "train-examples", 0, 10**9),
            source=_str(info, "source", required=False),
            unknown_species=_counts(info, "unknown-species"),
            skipped=_counts(info, "skipped"),
            routing=routing,
        )

    # --- train -----------------------------------------------------------------------------------
    def train(self, reply: Message, sent: SentSpec, declared_examples: int) -> TrainReply:
        _no_error(reply)
        size = sum(msg.content_bytes(reply.content).values())
        limit = self.cfg.federation.max_update_ratio * sent.trainable_bytes + REPLY_ALLOWANCE
        if size > limit:
            raise RejectedReply(f"reply of {size} bytes exceeds {limit:.0f} (sent {sent.trainable_bytes} to train)")
        update = self._update(reply, sent)
        metrics = _record(reply, msg.METRICS, MetricRecord)
        most = declared_examples * self.cfg.train.epochs
        examples = _number(metrics, "examples", 0, most)
        counts = self._routing(reply, full=False).expert_counts
        for layer, per_expert in counts.items():
            bound = declared_examples * self.tokens_per_image.get(layer, 0)
            if per_expert.sum() > bound:
                raise RejectedReply(f"counts.{layer} sum to {per_expert.sum():.0f}, more than its {declared_examples} "
                                    f"examples can route ({bound})")  # fmt: skip
        return TrainReply(
            update=update,
            token_counts={layer: torch.from_numpy(c) for layer, c in counts.items()},
            examples=examples,
            train_loss=_number(metrics, "train_loss", 0, math.inf),
            received=self._evaluation(metrics, "received-") if "received-accuracy" in metrics else None,
            unknown_species_images=_number(metrics, "unknown-species-images", 0, 10**9, default=0.0),
            skipped_images=_number(metrics, "skipped-images", 0, 10**9, default=0.0),
            unclipped=self._unclipped(metrics),
            compute_seconds=_number(metrics, "compute-seconds", 0, 10**7, default=0.0),
        )

    def _unclipped(self, metrics: MetricRecord) -> float:
        """The adaptive clip's bit: 0 or 1 exactly (a node cannot move the clip more than one vote)."""
        if not self.cfg.privacy.enabled:
            return 1.0
        value = _number(metrics, "unclipped", 0, 1)
        if value not in (0.0, 1.0):
            raise RejectedReply(f"metrics.unclipped must be 0 or 1, got {value}")
        return value

    def _update(self, reply: Message, sent: SentSpec) -> dict[str, torch.Tensor]:
        """The update, decoded only with the run's codec and only to the shapes sent, then checked."""
        content = reply.content
        if msg.UPDATE not in content:
            raise RejectedReply("no update")
        record = _record(reply, msg.UPDATE, ArrayRecord)
        codec = msg.UPDATE + msg.CODEC
        try:
            if Pipeline.parse(self.upload).identity:
                if codec in content:
                    raise RejectedReply(f"a compressed update; this run uploads uncompressed ({self.upload})")
                update = msg.from_record(record)
            else:
                described = _record(reply, codec, ConfigRecord)
                if described.get("pipeline") != self.upload:
                    raise RejectedReply(f"codec {described.get('pipeline')!r}; this run uploads {self.upload!r}")
                arrays = {k: v.numpy() for k, v in record.items()}
                update = decode_all(arrays, str(described.get("tensors")), Pipeline.parse(self.upload), sent.shapes)
        except (ValueError, TypeError, KeyError) as error:
            if isinstance(error, RejectedReply):
                raise
            raise RejectedReply(f"update does not decode: {error}") from None
        check_update(update, sent, self.cfg.federation.max_update_norm)
        return update

    # --- routing ---------------------------------------------------------------------------------
    def _routing(self, reply: Message, full: bool) -> RoutingStats:
        """Routing counts (and with `full`, co-routing edges) of every MoE layer: finite, non-negative, shaped."""
        tensors = msg.from_record(_record(reply, msg.TOKENS, ArrayRecord))
        counts = {f"counts.{layer}": (self.num_experts,) for layer in self.layers}
        edges = {f"edges.{layer}": (self.num_experts, self.num_experts) for layer in self.layers[:-1]}
        missing = sorted((set(counts) | (set(edges) if full else set())) - set(tensors))
        unknown = sorted(set(tensors) - set(counts) - set(edges))
        if missing or unknown:
            raise RejectedReply(f"routing tensors: missing {missing[:3]}, unknown {unknown[:3]}")
        wanted = {name: shape for name, shape in (counts | edges).items() if name in tensors}
        for name, shape in wanted.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != shape or not tensor.is_floating_point():
                raise RejectedReply(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, expected {shape}")
            if not torch.isfinite(tensor).all() or (tensor < 0).any():
                raise RejectedReply(f"{name}: counts must be finite and non-negative")
        return msg.stats_from_tensors(tensors)

    # --- evaluate --------------------------------------------------------------------------------
    def evaluation(self, reply: Message) -> Evaluation:
        _no_error(reply)
        return self._evaluation(_record(reply, msg.METRICS, MetricRecord), "")

    def _evaluation(self, metrics: MetricRecord, prefix: str) -> Evaluation:
        recall = metrics.get(f"{prefix}recall", [])
        if not isinstance(recall, list) or len(recall) > self.num_classes:
            raise RejectedReply(f"{prefix}recall must be a list of at most {self.num_classes} values")
        if not all(isinstance(r, float) and (r == -1.0 or 0.0 <= r <= 1.0) for r in recall):
            raise RejectedReply(f"{prefix}recall values must lie in [0, 1] (-1: species absent)")
        return Evaluation(
            accuracy=_number(metrics, f"{prefix}accuracy", 0, 1),
            examples=_number(metrics, f"{prefix}examples", 0, 10**9),
            recall={str(s): r for s, r in enumerate(recall) if r >= 0},
        )


def check_update(update: dict[str, torch.Tensor], sent: SentSpec, max_norm: float) -> None:
    """Raise RejectedReply unless `update` matches what was sent: same tensors, shapes, dtypes and row ids, all
    finite, and its norm at most `max_norm` times that of the tensors sent (a floor of NORM_FLOOR)."""
    unknown = sorted(set(update) - set(sent.shapes))
    if unknown:
        raise RejectedReply(f"unknown or unsent tensors: {unknown[:3]}")
    missing = sorted(set(sent.shapes) - set(update))
    if missing:
        raise RejectedReply(f"missing tensors: {missing[:3]}")
    squared = 0.0
    for name, tensor in update.items():
        shape, dtype = sent.shapes[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RejectedReply(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, sent {shape} {dtype}")
        if name in sent.ids:
            if not torch.equal(tensor, sent.ids[name]):
                raise RejectedReply(f"{name}: reply names rows {tensor.tolist()[:5]} it was not given")
        elif tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                raise RejectedReply(f"{name}: contains NaN or Inf")
            squared += float(tensor.double().pow(2).sum())
    bound = max_norm * max(sent.norm, NORM_FLOOR)
    if math.sqrt(squared) > bound:
        raise RejectedReply(f"update norm {math.sqrt(squared):.3g} exceeds {bound:.3g} "
                            f"({max_norm:g} x the norm sent, {sent.norm:.3g})")  # fmt: skip


def _no_error(reply: Message) -> None:
    if reply.has_error():
        raise RejectedReply(f"client error: {reply.error.reason}")


def _record(reply: Message, name: str, kind: type):
    record = reply.content.get(name)
    if not isinstance(record, kind):
        raise RejectedReply(f"no {name} record")
    return record


def _int(record, key: str, low: int, high: int) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RejectedReply(f"{key} must be an integer in {low}..{high}, got {value!r}")
    return value


def _number(record, key: str, low: float, high: float, default: float | None = None) -> float:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RejectedReply(f"{key} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise RejectedReply(f"{key}={value} lies outside [{low}, {high}]")
    return float(value)


def _str(record, key: str, required: bool = True) -> str:
    value = record.get(key, None if required else "")
    if not isinstance(value, str):
        raise RejectedReply(f"{key} must be a string, got {value!r}")
    return value


def _json(record, key: str, kind: type):
    try:
        value = json.loads(_str(record, key))
    except json.JSONDecodeError:
        raise RejectedReply(f"{key} is not JSON") from None
    if not isinstance(value, kind):
        raise RejectedReply(f"{key} must be a JSON {kind.__name__}")
    return value


def _counts(record, key: str) -> dict[str, int]:
    """A JSON table of name -> non-negative count (images left out, by species or reason)."""
    if key not in record:
        return {}
    value = _json(record, key, dict)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value.values()):
        raise RejectedReply(f"{key} must map names to non-negative counts")
    return value
