"""What server and client say to each other: record names and the torch <-> Flower codec.

The server and client apps never import each other; both speak through these names. Tensors
travel in ArrayRecords keyed by parameter name. Row-sliced parameters (experts of a layer, rows
of the classifier) travel stacked with an `*.ids` array naming the global rows they hold.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from geomoe.model.importance import RoutingStats
from geomoe.wire.bounded import read_npy
from geomoe.wire.compression import ErrorFeedback, Pipeline, decode_all, group_layouts

# RecordDict entries
EXPERTS = "experts"  # held experts' stacked state (moe.{layer}.{param}, moe.{layer}.ids)
ROUTER = "router"  # centroids of experts the node does not hold (moe.{layer}.absent_centroids)
HEAD = "head"  # classifier rows: head.fc.weight, head.fc.bias, head.ids
SHARED = "shared"  # shared (non-expert) parameters by state-dict name
BASE = "base"  # the full initial shared state, sent once so a node can build its model
UPDATE = "update"  # reply: deltas for exactly the tensors the node was sent to train
TOKENS = "tokens"  # reply: routing statistics on the training set (counts.{layer}, edges.{layer})
CODEC = ".codec"  # suffix of the ConfigRecord describing a compressed record
INFO = "info"  # query reply: where the node is and what it has
CONFIG = "config"  # ConfigRecord: the run config (json, in queries only: nodes keep it), round, location
METRICS = "metrics"  # reply: MetricRecord
HEAD_IDS = "head.ids"
CLIP_NORM = "clip-norm"  # train config under DP: the L2 bound the node clips its whole update to this round
# query config: what a node needs to know of the run's world (kept in its node state)
SPECIES_NAMES = "species-names"  # JSON list: the run's species, by class index
CELLS = "cells"  # JSON list: the client cells, by client index
WORLD_FILE = "world-file"  # absolute path of the world file (simulated cells read it)
WORLD_SHA256 = "world-sha256"  # its SHA-256: a node refuses any other file
SUPERCLASSES = "superclasses"  # JSON list: super-class of each class (per-image routing), else []
BASE_FILE = "base-file"  # the base as a file on the server's host: nodes there read it instead of being sent it
BASE_SHA256 = "base-sha256"  # its SHA-256: a node uses no other file
WORLD_KEYS = (SPECIES_NAMES, CELLS, WORLD_FILE, WORLD_SHA256, SUPERCLASSES, BASE_FILE, BASE_SHA256)


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, keep_input=True)


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def config_record(values: dict[str, Any]) -> ConfigRecord:
    """A ConfigRecord; nested values travel as JSON strings."""
    return ConfigRecord({k: json.dumps(v) if isinstance(v, (dict, list, tuple)) else v for k, v in values.items()})


def serialised_bytes(obj: Any) -> int:
    """Bytes of a record (or array) and everything inside it as Flower deflates them (identical chunks once).

    The one place that uses Flower's private serialisation API (`flwr.supercore.inflatable`): Flower
    offers no public way to ask what a message costs on the wire. tests/test_messages.py fails if it moves.
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def content_bytes(content: RecordDict) -> dict[str, int]:
    """Bytes of each record of `content` as Flower serialises it."""
    return {name: serialised_bytes(record) for name, record in content.items()}


CATEGORIES = ("experts", "router", "head", "shared", "base", "control")


def key_category(key: str) -> str:
    """What a tensor name (or a compressed record's packed group, named by category) is, for accounting:
    experts, router, head or shared."""
    if key in CATEGORIES:
        return key
    if key.endswith("centroids"):
        return "router"
    if key.startswith("moe."):
        return "experts"
    if key.startswith("head."):
        return "head"
    return "shared"


def content_traffic(content: RecordDict) -> dict[str, int]:
    """Serialised bytes of `content` by category; `total` counts shared chunks once, as Flower sends them."""
    traffic = dict.fromkeys(CATEGORIES, 0)
    for name, record in content.items():
        if isinstance(record, ArrayRecord) and name not in (TOKENS, BASE):
            for key, array in record.items():
                traffic[key_category(key)] += serialised_bytes(array)
            traffic["control"] += len(record.deflate())
        else:
            traffic["base" if name == BASE else "control"] += serialised_bytes(record)
    traffic["total"] = sum(content_bytes(content).values())
    return traffic


def pack(
    content: RecordDict,
    name: str,
    tensors: dict[str, torch.Tensor],
    pipeline: str = "none",
    feedback: ErrorFeedback | None = None,
) -> None:
    """Put `tensors` into `content[name]`, compressed by `pipeline` (described in `content[name.codec]`)."""
    parsed = Pipeline.parse(pipeline)
    if parsed.identity:
        content[name] = to_record(tensors)
        return
    arrays, description = (feedback or ErrorFeedback()).compress(tensors, parsed, key_category)
    content[name] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    content[name + CODEC] = ConfigRecord({"pipeline": pipeline, "tensors": description})


def read_record(record: ArrayRecord, what: str, max_bytes: int) -> dict[str, torch.Tensor]:
    """Tensors of an untrusted ArrayRecord holding at most `max_bytes` in all, each array's `.npy` header checked
    against its bytes before anything is allocated (`np.load` would allocate what a header claims)."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"{what} is not an array record")
    tensors, left = {}, max_bytes
    for key, array in record.items():
        tensors[key] = torch.from_numpy(read_npy(array.data, f"{what}.{key}", max_bytes=left))
        left -= tensors[key].numel() * tensors[key].element_size()
    return tensors


def unpack(content: RecordDict, name: str, max_bytes: int) -> dict[str, torch.Tensor]:
    """Tensors of `content[name]` (at most `max_bytes` of them), decompressed if they were packed compressed; {} if
    absent. The receiver's side of a download: sizes are checked before anything is decoded."""
    if name not in content:
        return {}
    if name + CODEC not in content:
        return read_record(content[name], name, max_bytes)
    codec = content[name + CODEC]
    pipeline = Pipeline.parse(str(codec["pipeline"]))
    packed = read_record(content[name], name, max_bytes)
    groups = group_layouts(str(codec["tensors"]), pipeline)
    return decode_all({k: v.numpy() for k, v in packed.items()}, groups, pipeline, max_bytes=max_bytes)


def stats_to_tensors(stats: RoutingStats, edges: bool = True) -> dict[str, torch.Tensor]:
    """Routing statistics as named arrays (counts.{layer} and, with `edges`, edges.{layer})."""
    out = {f"counts.{k}": torch.from_numpy(v.astype(np.float32)) for k, v in stats.expert_counts.items()}
    if edges:
        out.update({f"edges.{k}": torch.from_numpy(v.astype(np.float32)) for k, v in stats.edges.items()})
    return out


def stats_from_tensors(tensors: dict[str, torch.Tensor]) -> RoutingStats:
    layers = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("counts."))
    counts = {layer: tensors[f"counts.{layer}"].double().numpy() for layer in layers}
    edges = {int(k.split(".")[1]): v.double().numpy() for k, v in tensors.items() if k.startswith("edges.")}
    return RoutingStats(layers, counts, edges)
