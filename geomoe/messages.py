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
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from geomoe.model.importance import RoutingStats

# RecordDict entries
EXPERTS = "experts"  # held experts' stacked state (moe.{layer}.{param}, moe.{layer}.ids)
ROUTER = "router"  # centroids of experts the node does not hold (moe.{layer}.absent_centroids)
HEAD = "head"  # classifier rows: head.fc.weight, head.fc.bias, head.ids
SHARED = "shared"  # shared (non-expert) parameters by state-dict name
BASE = "base"  # the full initial shared state, sent once so a node can build its model
UPDATE = "update"  # reply: deltas for exactly the tensors the node was sent to train
TOKENS = "tokens"  # reply: routing statistics on the training set (counts.{layer}, edges.{layer})
INFO = "info"  # query reply: where the node is and what it has
CONFIG = "config"  # ConfigRecord: run config (json), round, what is trainable
METRICS = "metrics"  # reply: MetricRecord
HEAD_IDS = "head.ids"


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, keep_input=True)


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def config_record(values: dict[str, Any]) -> ConfigRecord:
    """A ConfigRecord; nested values travel as JSON strings."""
    return ConfigRecord({k: json.dumps(v) if isinstance(v, (dict, list, tuple)) else v for k, v in values.items()})


def content_bytes(content: RecordDict) -> dict[str, int]:
    """Bytes of each record of `content` as Flower serialises it (deflated objects, shared chunks once)."""
    sizes = {}
    for name, record in content.items():
        objects = get_all_nested_objects(record)
        sizes[name] = sum(len(obj.deflate()) for obj in objects.values())
    return sizes


def stats_to_tensors(stats: RoutingStats) -> dict[str, torch.Tensor]:
    """Routing statistics as named arrays (counts.{layer}, edges.{layer})."""
    out = {f"counts.{k}": torch.from_numpy(v.astype(np.float32)) for k, v in stats.expert_counts.items()}
    out.update({f"edges.{k}": torch.from_numpy(v.astype(np.float32)) for k, v in stats.edges.items()})
    return out


def stats_from_tensors(tensors: dict[str, torch.Tensor]) -> RoutingStats:
    layers = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("counts."))
    counts = {layer: tensors[f"counts.{layer}"].double().numpy() for layer in layers}
    edges = {int(k.split(".")[1]): v.double().numpy() for k, v in tensors.items() if k.startswith("edges.")}
    return RoutingStats(layers, counts, edges)
