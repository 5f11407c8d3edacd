"""The server's trust boundary: the one module that reads what a node sends.

A node may be buggy or adversarial. Every reply (query, train, evaluate) is checked against what the server sent
that node and what it knows of the run, and comes out as a typed object whose numbers are bounded: tensors are
exactly the ones sent (names, shapes, dtypes, row ids), finite and of bounded norm; the codec is the run's (a
budgeted link may only tighten its top-k), and sizes are checked before anything is decoded; counts that weigh an
update are finite, non-negative and no larger than the node's declared examples can produce; a location must be one
of the run's, with its own cell. Anything else raises RejectedReply with the reason; the caller logs it and goes on
without that reply.

Longer than 300 lines because it is the server's whole trust boundary: one parser per boundary (DESIGN.md), so
that a reviewer reads every check a node's bytes meet in one file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from geomoe.model.importance import RoutingStats
from geomoe.wire import messages as msg
from geomoe.wire.bounded import bounded_json, check_text, printable, read_npy
from geomoe.wire.compression import (
    MAX_DESCRIPTION_CHARS,
    Pipeline,
    check_layouts,
    decode_all,
    group_layouts,
    packed_bound,
)
from geomoe.wire.privacy import update_norm
from geomoe.wire.run_config import RunConfig

REPLY_ALLOWANCE = 64 * 1024  # bytes a reply may carry besides its update (metrics, routing counts)
NORM_FLOOR = 1.0  # the update-norm bound never falls below max_update_norm times this (tensors sent near zero)
ROW_NORM_FLOOR = 0.5  # nor does the bound of one expert's or head row's update below max_row_update_norm times this
MAX_LOSS = 1e4  # a training loss above this is no loss a node can report (cross-entropy of a sane model is ~10)
MAX_NAME_CHARS = 200  # a species name, a reason for skipping images, a cell
MAX_SOURCE_CHARS = 500  # where a node's data comes from
MAX_TABLE_ENTRIES = 1000  # names in a node's table of unknown species or skipped images
MAX_TABLE_CHARS = 256 * 1024  # JSON of one such table
MAX_COUNT = 10**9  # any count of images or examples
REPLY_RECORDS = {  # what each kind of reply may hold; anything else is refused before it is read
    "query": {msg.INFO, msg.TOKENS},
    "train": {msg.UPDATE, msg.UPDATE + msg.CODEC, msg.TOKENS, msg.METRICS},
    "evaluate": {msg.METRICS},
}


class RejectedReply(ValueError):
    """A reply that must not be used; the message says why."""


@dataclass
class SentSpec:
    """What a node was sent to train: tensor name -> (shape, dtype), ids arrays by name, bytes and norms sent."""

    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    ids: dict[str, torch.Tensor]
    trainable_bytes: int
    norm: float  # L2 norm of the floating-point tensors sent
    row_norms: dict[str, torch.Tensor] = field(default_factory=dict)  # ids name -> L2 norm of each row sent


def spec_of(tensors: dict[str, torch.Tensor]) -> SentSpec:
    ids = {k: v.clone() for k, v in tensors.items() if k.endswith(".ids")}
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    return SentSpec(shapes, ids, size, update_norm(tensors), row_norms(tensors, ids))


def row_group(name: str) -> str | None:
    """The ids array naming the rows of a row-sliced tensor (an expert parameter or a head row), else None."""
    if name.startswith("moe.") and not name.endswith(".ids"):
        return name.rsplit(".", 1)[0] + ".ids"
    if name.startswith("head.") and name != msg.HEAD_IDS:
        return msg.HEAD_IDS
    return None


def row_norms(tensors: dict[str, torch.Tensor], ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """L2 norm of each row (one expert of a layer, one species' head row and bias) over every tensor of its group."""
    squared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        group = row_group(name)
        if group in ids and tensor.is_floating_point() and tensor.dim() >= 1 and len(tensor) == len(ids[group]):
            rows = tensor.double().reshape(len(tensor), -1).pow(2).sum(dim=1)
            squared[group] = squared[group] + rows if group in squared else rows
    return {group: rows.sqrt() for group, rows in squared.items()}


@dataclass
class QueryReply:
    """Where a node is and what it holds (its query reply)."""

    location: int  # index into the run's client cells
    cell: str
    has_base: bool  # the node holds the initial shared state
    species: list[int]  # distinct species of its training data, in 0..classes-1
    train_examples: int
    test_examples: int = 0
    source: str = ""
    unknown_species: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    routing: RoutingStats | None = None  # how its validation images route (when it was sent the model)
    name: str = ""  # how reports name the node: its cell, or cell~node-id when another node reports that cell
    base_from_file: bool = False  # a virtual node that read the base from the server's file (was not sent it)
    device: str = ""  # a field node's own id, kept in its state folder: the same device after a reboot

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
    examples: float  # training examples seen (epochs x train examples, at most the examples cap)
    train_loss: float
    received: Evaluation | None  # accuracy of the model it received, on its test split
    unknown_species_images: float
    skipped_images: float
    unclipped: float = 1.0  # under DP: 1 if its update fitted under the round's clip before clipping, else 0
    compute_seconds: float = 0.0  # what it says its evaluation + training took (the framework's share is the rest)
    link_topk: float | None = None  # the top-k its budgeted link made it tighten the run's codec to; None: not
    link_windows: int = 1  # online windows its upload takes over a budgeted link (more than 1: it was deferred)


def link_use(replies: list[TrainReply]) -> dict[str, int]:
    """How many of `replies` a budgeted link made tighten their top-k to fit a window, and how many were deferred
    (their upload took more than one window)."""
    return {
        "compressed": sum(r.link_topk is not None for r in replies),
        "deferred": sum(r.link_windows > 1 for r in replies),
    }


class ReplyReader:
    """Reads replies for one run: knows its cells, classes, MoE layout, codec and bounds."""

    def __init__(self, cfg: RunConfig, cells: list[str], tokens_per_image: dict[int, int]) -> None:
        self.cfg, self.cells, self.tokens_per_image = cfg, cells, tokens_per_image
        self.num_classes = cfg.model.num_classes
        self.num_experts = cfg.model.num_experts
        self.layers = list(cfg.model.moe_layers)
        self.upload = cfg.federation.upload_compression
        counts = {f"counts.{layer}": (self.num_experts,) for layer in self.layers}
        edges = {f"edges.{layer}": (self.num_experts, self.num_experts) for layer in self.layers[:-1]}
        self.routing_shapes = {name: (shape, torch.float32) for name, shape in (counts | edges).items()}
        routing_bytes = sum(4 * math.prod(shape) for shape, _ in self.routing_shapes.values())
        self.query_limit = (
            routing_bytes + MAX_SOURCE_CHARS + 2 * MAX_TABLE_CHARS + 12 * self.num_classes + REPLY_ALLOWANCE
        )

    # --- query -----------------------------------------------------------------------------------
    def query(self, reply: Message) -> QueryReply:
        _no_error(reply)
        _records(reply, "query", self.query_limit)
        info = _record(reply, msg.INFO, ConfigRecord)
        location = _int(info, "location", 0, len(self.cells) - 1)
        cell = _text(info, "cell", MAX_NAME_CHARS)
        if cell != self.cells[location]:
            raise RejectedReply(f"claims location {location} with cell {printable(cell, 40)}; that location's cell "
                                f"is {self.cells[location]!r}")  # fmt: skip
        species = _json(info, "species", list, 12 * self.num_classes + 64)
        if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < self.num_classes for s in species):
            raise RejectedReply(f"species must be ids in 0..{self.num_classes - 1}")
        if len(set(species)) != len(species):
            raise RejectedReply("species ids repeat")
        has_base, from_file = info.get("has-base"), info.get("base-from-file", False)
        for key, value in (("has-base", has_base), ("base-from-file", from_file)):
            if not isinstance(value, bool):
                raise RejectedReply(f"{key} must be true or false, got {printable(value, 40)}")
        routing = self._routing(reply, full=True) if msg.TOKENS in reply.content else None
        return QueryReply(
            location=location,
            cell=cell,
            has_base=has_base or routing is not None,  # it was sent the base with the model
            base_from_file=from_file and has_base,
            species=sorted(species),
            train_examples=_int(info, "train-examples", 0, MAX_COUNT),
            test_examples=_int(info, "test-examples", 0, MAX_COUNT),
            source=_text(info, "source", MAX_SOURCE_CHARS, required=False),
            unknown_species=_counts(info, "unknown-species"),
            skipped=_counts(info, "skipped"),
            routing=routing,
            device=_text(info, "device", MAX_NAME_CHARS, required=False),
        )

    # --- train -----------------------------------------------------------------------------------
    def train(self, reply: Message, sent: SentSpec, node: QueryReply, examples_cap: int) -> TrainReply:
        """A training reply of `node`, which was sent `sent`; its examples count at most `examples_cap` (its declared
        training examples, or fewer: see GeoExpertStrategy.examples_cap) per local epoch."""
        _no_error(reply)
        limit = self.cfg.federation.max_update_ratio * sent.trainable_bytes + REPLY_ALLOWANCE
        _records(reply, "train", limit)
        update, packed_with = self._update(reply, sent)
        metrics = _record(reply, msg.METRICS, MetricRecord)
        examples = _number(metrics, "examples", 0, examples_cap * self.cfg.train.epochs)
        counts = self._routing(reply, full=False).expert_counts
        for layer, per_expert in counts.items():
            bound = examples_cap * self.tokens_per_image.get(layer, 0)
            if per_expert.sum() > bound:
                raise RejectedReply(f"counts.{layer} sum to {per_expert.sum():.0f}, more than its {examples_cap} "
                                    f"examples can route ({bound})")  # fmt: skip
        looked_at = (self.cfg.train.epochs + 3) * (node.train_examples + node.test_examples)  # each try counts
        return TrainReply(
            update=update,
            token_counts={layer: torch.from_numpy(c) for layer, c in counts.items()},
            examples=examples,
            train_loss=_number(metrics, "train_loss", 0, MAX_LOSS),
            received=self._evaluation(metrics, "received-", node) if "received-accuracy" in metrics else None,
            unknown_species_images=_number(
                metrics, "unknown-species-images", 0, sum(node.unknown_species.values()), default=0.0
            ),  # fmt: skip
            skipped_images=_number(metrics, "skipped-images", 0, looked_at, default=0.0),
            unclipped=self._unclipped(metrics),
            compute_seconds=_number(metrics, "compute-seconds", 0, self._longest_training(), default=0.0),
            link_topk=packed_with.topk if packed_with != Pipeline.parse(self.upload) else None,
            link_windows=int(_number(metrics, "link-windows", 1, MAX_COUNT, default=1)),
        )

    def _longest_training(self) -> float:
        """How long a node may say it trained: a round (sync), or a message's life (async)."""
        fed = self.cfg.federation
        return fed.round_timeout_s if fed.mode == "sync" else fed.message_ttl_s

    def idle(self, reply: Message) -> bool:
        """Whether an asynchronous reply says the node had nothing newer to train on (and carries no update)."""
        if reply.has_error() or msg.METRICS not in reply.content or msg.UPDATE in reply.content:
            return False
        metrics = reply.content[msg.METRICS]
        return isinstance(metrics, MetricRecord) and metrics.get("idle") == 1.0

    def trained_from(self, reply: Message) -> int:
        """The model version an asynchronous update says it was trained from (its train message's `version`)."""
        _no_error(reply)
        return _int(_record(reply, msg.METRICS, MetricRecord), "trained-from", 0, MAX_COUNT)

    def _unclipped(self, metrics: MetricRecord) -> float:
        """The adaptive clip's bit: 0 or 1 exactly (a node cannot move the clip more than one vote)."""
        if not self.cfg.privacy.enabled:
            return 1.0
        value = _number(metrics, "unclipped", 0, 1)
        if value not in (0.0, 1.0):
            raise RejectedReply(f"metrics.unclipped must be 0 or 1, got {value}")
        return value

    def _update(self, reply: Message, sent: SentSpec) -> tuple[dict[str, torch.Tensor], Pipeline]:
        """The update, decoded only with the run's codec (or, from a node on a budgeted link, the run's codec with a
        tighter top-k) and only to the shapes sent, then checked; and the codec it came in. Names are checked before
        any array is read, and each array's declared size against what its name was sent, so what decoding
        allocates is bounded by what the server sent (Flower sends identical arrays once)."""
        content = reply.content
        if msg.UPDATE not in content:
            raise RejectedReply("no update")
        record = _record(reply, msg.UPDATE, ArrayRecord)
        codec = msg.UPDATE + msg.CODEC
        run_pipeline = Pipeline.parse(self.upload)
        try:
            if codec not in content:
                if not run_pipeline.identity:
                    raise RejectedReply(f"an uncompressed update; this run uploads {self.upload!r}")
                update, pipeline = _arrays(record, msg.UPDATE, sent.shapes, required=sent.shapes), run_pipeline
            else:
                described = _record(reply, codec, ConfigRecord)
                named = _text(described, "pipeline", MAX_NAME_CHARS)
                pipeline = Pipeline.parse(named)
                if pipeline.identity or not run_pipeline.admits(pipeline):
                    raise RejectedReply(f"codec {printable(repr(named), 60)}; this run uploads {self.upload!r} (a "
                                        "node may only tighten its top-k)")  # fmt: skip
                groups = group_layouts(_text(described, "tensors", MAX_DESCRIPTION_CHARS), pipeline)
                check_layouts({n: x for group in groups.values() for n, x in group.layouts.items()}, sent.shapes)
                unknown = sorted(set(record) - set(groups))
                if unknown:
                    raise RejectedReply(f"packed groups {printable(unknown[:3])} that the codec does not describe")
                arrays = {
                    name: read_npy(
                        record[name].data, f"update.{name}", np.uint8, max_bytes=packed_bound(group, pipeline)
                    )
                    for name, group in groups.items()
                    if name in record
                }
                update = decode_all(arrays, groups, pipeline, sent.shapes)
        except ValueError as error:
            if isinstance(error, RejectedReply):
                raise
            raise RejectedReply(f"update does not decode: {error}") from None
        check_update(update, sent, self.cfg.federation.max_update_norm, self.cfg.federation.max_row_update_norm)
        return update, pipeline

    # --- routing ---------------------------------------------------------------------------------
    def _routing(self, reply: Message, full: bool) -> RoutingStats:
        """Routing counts (and with `full`, co-routing edges) of every MoE layer: finite, non-negative, shaped."""
        record = _record(reply, msg.TOKENS, ArrayRecord)
        required = [n for n in self.routing_shapes if full or n.startswith("counts.")]
        try:
            tensors = _arrays(record, "routing", self.routing_shapes, required)
        except ValueError as error:
            raise RejectedReply(str(error)) from None
        for name, tensor in tensors.items():
            if not torch.isfinite(tensor).all() or (tensor < 0).any():
                raise RejectedReply(f"{name}: counts must be finite and non-negative")
        return msg.stats_from_tensors(tensors)

    # --- evaluate --------------------------------------------------------------------------------
    def evaluation(self, reply: Message, node: QueryReply) -> Evaluation:
        _no_error(reply)
        _records(reply, "evaluate", REPLY_ALLOWANCE + 12 * self.num_classes)
        return self._evaluation(_record(reply, msg.METRICS, MetricRecord), "", node)

    def _evaluation(self, metrics: MetricRecord, prefix: str, node: QueryReply) -> Evaluation:
        """An evaluation on the node's test split: no more examples than it declared at query time."""
        recall = metrics.get(f"{prefix}recall", [])
        if not isinstance(recall, list) or len(recall) > self.num_classes:
            raise RejectedReply(f"{prefix}recall must be a list of at most {self.num_classes} values")
        if not all(isinstance(r, float) and (r == -1.0 or 0.0 <= r <= 1.0) for r in recall):
            raise RejectedReply(f"{prefix}recall values must lie in [0, 1] (-1: species absent)")
        return Evaluation(
            accuracy=_number(metrics, f"{prefix}accuracy", 0, 1),
            examples=_number(metrics, f"{prefix}examples", 0, node.test_examples),
            recall={str(s): r for s, r in enumerate(recall) if r >= 0},
        )


def check_update(update: dict[str, torch.Tensor], sent: SentSpec, max_norm: float, max_row_norm: float) -> None:
    """Raise RejectedReply unless `update` matches what was sent: same tensors, shapes, dtypes and row ids, all
    finite, its norm at most `max_norm` times that of the tensors sent (a floor of NORM_FLOOR), and each row (an
    expert, a species' head row with its bias) at most `max_row_norm` times that row's norm sent (floor
    ROW_NORM_FLOOR): the whole-update bound alone let one node spend it all on one head bias."""
    unknown = sorted(set(update) - set(sent.shapes))
    if unknown:
        raise RejectedReply(f"unknown or unsent tensors: {printable(unknown[:3])}")
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
    moved = row_norms(update, sent.ids)
    for group, norms in moved.items():
        bounds = max_row_norm * sent.row_norms[group].clamp(min=ROW_NORM_FLOOR)
        over = (norms > bounds).nonzero().flatten().tolist()
        if over:
            row = over[0]
            raise RejectedReply(f"{group.removesuffix('.ids')} row {int(sent.ids[group][row])} moves by "
                                f"{float(norms[row]):.3g}, over {float(bounds[row]):.3g} ({max_row_norm:g} x that "
                                f"row's norm sent, at least {ROW_NORM_FLOOR:g})")  # fmt: skip


def _no_error(reply: Message) -> None:
    if reply.has_error():
        raise RejectedReply(f"client error: {printable(reply.error.reason, 200)}")


def _records(reply: Message, kind: str, max_bytes: float) -> None:
    """Only the records a `kind` reply may hold, and at most `max_bytes` of them as Flower serialised them; checked
    before any record is read."""
    unknown = sorted(set(reply.content) - REPLY_RECORDS[kind])
    if unknown:
        raise RejectedReply(f"records this {kind} reply may not hold: {printable(unknown[:3])}")
    size = sum(msg.content_bytes(reply.content).values())
    if size > max_bytes:
        raise RejectedReply(f"{kind} reply of {size} bytes exceeds {max_bytes:.0f}")


def _arrays(
    record: ArrayRecord,
    what: str,
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    required: Iterable[str],
) -> dict[str, torch.Tensor]:
    """The arrays of `record`, whose names must all be in `expected` and include `required`, each read only if its
    header declares the expected shape and dtype and its bytes hold exactly that."""
    unknown = sorted(set(record) - set(expected))
    missing = sorted(set(required) - set(record))
    if unknown or missing:
        raise RejectedReply(f"{what} tensors: missing {missing[:3]}, unknown {printable(unknown[:3])}")
    return {
        name: torch.from_numpy(
            read_npy(record[name].data, f"{what}.{name}", _numpy_dtype(expected[name][1]), expected[name][0])
        )  # fmt: skip
        for name in record
    }


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _record(reply: Message, name: str, kind: type):
    record = reply.content.get(name)
    if not isinstance(record, kind):
        raise RejectedReply(f"no {name} record")
    return record


def _int(record, key: str, low: int, high: int) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RejectedReply(f"{key} must be an integer in {low}..{high}, got {printable(value, 40)}")
    return value


def _number(record, key: str, low: float, high: float, default: float | None = None) -> float:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RejectedReply(f"{key} must be a finite number, got {printable(value, 40)}")
    if not low <= value <= high:
        raise RejectedReply(f"{key}={value:.6g} lies outside [{low}, {high}]")
    return float(value)


def _text(record, key: str, max_chars: int, required: bool = True) -> str:
    try:
        return check_text(record.get(key, None if required else ""), key, max_chars)
    except ValueError as error:
        raise RejectedReply(str(error)) from None


def _json(record, key: str, kind: type, max_chars: int):
    try:
        value = bounded_json(_text(record, key, max_chars), key, max_chars)
    except ValueError as error:
        raise RejectedReply(str(error)) from None
    if not isinstance(value, kind):
        raise RejectedReply(f"{key} must be a JSON {kind.__name__}")
    return value


def _counts(record, key: str) -> dict[str, int]:
    """A JSON table of name -> count (images left out, by species or reason): at most MAX_TABLE_ENTRIES names of
    printable text, each count in 0..MAX_COUNT."""
    if key not in record:
        return {}
    value = _json(record, key, dict, MAX_TABLE_CHARS)
    if len(value) > MAX_TABLE_ENTRIES:
        raise RejectedReply(f"{key} names {len(value)} entries, more than {MAX_TABLE_ENTRIES}")
    for name, count in value.items():
        _text({"name": name}, "name", MAX_NAME_CHARS)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_COUNT:
            raise RejectedReply(f"{key} must map names to counts in 0..{MAX_COUNT}")
    return value
