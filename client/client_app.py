"""The Flower ClientApp: one camera-trap device or one simulated S2 cell.

The same code runs in simulation and on devices; only the node config differs:
`partition-id` (a simulated cell of the server's world file), `data=/path` (the device's own
labelled images, with `lat`/`lon`), or only `lat`/`lon` (a cell of the world file found by its
coordinates, for trials on the server's host). The run's configuration and what the query told the node
(species names, client cells, world file) arrive with the query and are kept in its node state. A field device
names a state folder (`state=/path`): in an asynchronous run its finished updates wait there until the server has
settled them (store-and-forward, `client/outbox.py`). A device on a link with a byte budget per window (node config
`link`, e.g. `lora@10kB`; in simulation `world.link`) packs its update to fit (`client/link_budget.py`).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from geomoe.client.data import LocalData, cell_data, device_data
from geomoe.client.link_budget import pack_to_fit, window_budget
from geomoe.client.outbox import Outbox
from geomoe.client.task import (
    Received,
    build_model,
    coordinates,
    download_limit,
    evaluate_local,
    locate,
    privatise,
    routing_on_validation,
    train_and_delta,
)
from geomoe.data.cells import coarsened
from geomoe.data.images import ImageConfig
from geomoe.wire import messages as msg
from geomoe.wire.compression import ErrorFeedback
from geomoe.wire.run_config import RunConfig

app = ClientApp()
FEEDBACK = "error-feedback"  # node state: what compression dropped from the last update
PROJECTIONS = "location-projections"  # node state: the location loss's projections, trained across rounds
RUN = "run-world"  # node state: the query's species names, client cells and world file
RUN_CONFIG = "run-config"  # node state: the run's config as the query carried it
_LOCAL: dict[str, LocalData] = {}  # this process's node data, keyed by source (reading a folder is costly)
_SHARED_BASE: dict[str, dict[str, torch.Tensor]] = {}  # the server's base file as read by this process, by SHA-256


def run_config(message: Message, context: Context) -> RunConfig:
    """The run's config: sent once, with the query (then kept in node state); later messages carry none."""
    config = message.content[msg.CONFIG]
    if "run" in config:
        context.state[RUN_CONFIG] = ConfigRecord({"run": str(config["run"])})
    if RUN_CONFIG not in context.state:
        raise RuntimeError("this node was never queried by this run's server: it does not know the run's config")
    return RunConfig.from_json(str(context.state[RUN_CONFIG]["run"]))


def keep_base(message: Message, context: Context) -> None:
    """The initial shared state, when this message carries it, into node state: the server sends it once."""
    if msg.BASE in message.content:
        context.state[msg.BASE] = message.content[msg.BASE]


def _base(message: Message, context: Context, world: dict) -> dict[str, torch.Tensor]:
    """The initial shared state: from this message if it carries it (then kept in node state), else node state,
    else the server's base file where this node can read it (a virtual node on the server's host)."""
    keep_base(message, context)
    if msg.BASE in context.state:
        return msg.from_record(context.state[msg.BASE])
    base = file_base(context, world)
    if base is None:
        raise RuntimeError("this node has no base model: the message carries none and it cannot read the server's")
    return base


def file_base(context: Context, world: dict) -> dict[str, torch.Tensor] | None:
    """The base a node reads from the server's file: only a virtual node of a simulation without it in its node
    state (a device is always sent it, so that a deployment's traffic is what its devices see); else None."""
    if msg.BASE in context.state or "partition-id" not in context.node_config:
        return None
    return shared_base(world["base_file"], world["base_sha256"])


def shared_base(path: Path, sha256: str) -> dict[str, torch.Tensor] | None:
    """The base in the server's file, if this process can read it and it is the file the server named (by
    SHA-256); read once per process, so every virtual node an actor runs shares it. None: not readable here."""
    if sha256 not in _SHARED_BASE:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            return None
        _SHARED_BASE.clear()  # one run's base at a time
        _SHARED_BASE[sha256] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return _SHARED_BASE[sha256]


def _received(message: Message, cfg: RunConfig) -> Received:
    """The tensors of a message, each record bounded by what this run's model can hold."""
    content, limit = message.content, download_limit(cfg.model)
    return Received(*(msg.unpack(content, name, limit) for name in (msg.EXPERTS, msg.ROUTER, msg.HEAD, msg.SHARED)))


def _world(message: Message, context: Context) -> dict:
    """What the server said of the run's world: from a query (then kept in node state), else the node state."""
    config = message.content[msg.CONFIG]
    if msg.WORLD_FILE in config:
        context.state[RUN] = ConfigRecord({k: config[k] for k in msg.WORLD_KEYS})
    if RUN not in context.state:
        raise RuntimeError("this node was never queried by this run's server: it does not know the run's species")
    record = context.state[RUN]
    return {
        "species": json.loads(str(record[msg.SPECIES_NAMES])),
        "cells": json.loads(str(record[msg.CELLS])),
        "file": Path(str(record[msg.WORLD_FILE])),
        "sha256": str(record[msg.WORLD_SHA256]),
        "superclasses": json.loads(str(record[msg.SUPERCLASSES])),
        "base_file": Path(str(record[msg.BASE_FILE])),
        "base_sha256": str(record[msg.BASE_SHA256]),
    }


def local_data(cfg: RunConfig, world: dict, node_config: dict) -> tuple[LocalData, int]:
    """This node's data and client index, built once per process and source."""
    if "data" in node_config:
        path = Path(str(node_config["data"]))
        key = json.dumps(["device", str(path), world["sha256"], sorted(node_config.items())], default=str)
        if key not in _LOCAL:
            lat, lon = coordinates(node_config) if "lat" in node_config and "lon" in node_config else (None, None)
            _LOCAL.clear()
            images = device_images(cfg.world.images, node_config)
            _LOCAL[key] = device_data(path, world["species"], cfg.world.split, images, lat, lon)
        local = _LOCAL[key]
        return local, locate(world["cells"], node_config, local)
    index = locate(world["cells"], node_config)
    key = json.dumps(["cell", world["sha256"], index])
    if key not in _LOCAL:
        if not world["file"].is_file():
            raise ValueError(
                "this node has no data: set its node config 'data' to a folder of labelled images "
                "(DIR/<species>/*.jpg, manifest.csv or a Camtrap DP package)"
            )
        _LOCAL.clear()
        _LOCAL[key] = cell_data(world["file"], world["sha256"], index, cfg.world.images)
    return _LOCAL[key], index


def device_images(images: ImageConfig, node_config: dict) -> ImageConfig:
    """The image settings a device uses: the run's, except where decoded images are cached, which only the device
    says (node config `cache`): a path in the run config names a folder on the server's host, and a server must not
    make a device write wherever it likes. Without `cache` a device decodes every time."""
    return replace(images, cache=str(node_config["cache"]) if "cache" in node_config else None)


def evaluation_metrics(result: dict) -> dict:
    """An evaluation as MetricRecord values; recall NaN (species absent here) travels as -1."""
    recall = [r if r == r else -1.0 for r in result["recall"]]
    return {"accuracy": result["accuracy"], "loss": result["loss"], "examples": result["examples"], "recall": recall}


@app.query()
def query(message: Message, context: Context) -> Message:
    """Say where this node is, what it holds, what it left out, and (if sent a model) how it routes."""
    cfg = run_config(message, context)
    world = _world(message, context)
    local, index = local_data(cfg, world, dict(context.node_config))
    reported, coarse = coarsened(world["cells"], cfg.federation.location_level)  # never its coordinates
    from_file = file_base(context, world) is not None
    info = {
        "location": coarse[index],
        "cell": reported[coarse[index]],
        "has-base": msg.BASE in context.state or from_file,
        "base-from-file": from_file,
        "species": json.dumps(local.species()),
        "train-examples": len(local.train),
        "test-examples": len(local.test),
        "source": local.source,
        "unknown-species": json.dumps(dict(local.unknown_species)),
        "skipped": json.dumps(dict(local.skipped)),
    }
    if "state" in context.node_config:  # a field device: the id that names it again after a reboot
        info["device"] = Outbox(Path(str(context.node_config["state"]))).device_id()
    content = RecordDict({msg.INFO: ConfigRecord(info)})
    if msg.EXPERTS in message.content:
        model = build_model(cfg.model, _base(message, context, world), _received(message, cfg))
        content[msg.TOKENS] = msg.to_record(msg.stats_to_tensors(routing_on_validation(cfg, model, local)))
    return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Evaluate what was received, train it locally, and send back deltas of what was sent."""
    cfg = run_config(message, context)
    config = message.content[msg.CONFIG]
    world = _world(message, context)
    local, index = local_data(cfg, world, dict(context.node_config))
    outbox = Outbox(Path(str(context.node_config["state"]))) if "state" in context.node_config else None
    field_node = outbox is not None and "version" in config  # asynchronous run: store-and-forward, its feedback too
    if field_node:
        keep_base(message, context)  # answered without training, the message may still bring the base
        outbox.settle(int(config["settled"]))
        if (kept := outbox.kept()) is not None:
            return Message(kept[1], reply_to=message)  # the finished update the server has not settled yet
        if not outbox.fresh(int(config["version"]), local.fingerprint()):
            return Message(RecordDict({msg.METRICS: MetricRecord({"idle": 1.0})}), reply_to=message)
    received = _received(message, cfg)
    model = build_model(cfg.model, _base(message, context, world), received)
    started = time.perf_counter()
    before = evaluate_local(cfg, model, local)
    projections = msg.from_record(context.state[PROJECTIONS]) if PROJECTIONS in context.state else None
    superclasses = torch.tensor(world["superclasses"]) if world["superclasses"] else None
    deltas, metrics, stats, projections = train_and_delta(
        cfg, model, received, local, int(config["round"]), index, projections, superclasses
    )
    metrics["compute-seconds"] = time.perf_counter() - started  # the server tells its own share from the rest
    if "version" in config:  # asynchronous runs: the model version this update was trained from
        metrics["trained-from"] = int(config["version"])
    if projections is not None:
        context.state[PROJECTIONS] = msg.to_record(projections)
    if cfg.privacy.enabled:  # before compression: what is compressed (and its error feedback) is the clipped update
        deltas, metrics["unclipped"] = privatise(cfg.privacy, deltas, float(config[msg.CLIP_NORM]))
    reply = RecordDict(
        {
            msg.TOKENS: msg.to_record(msg.stats_to_tensors(stats, edges=False)),  # the server weighs by counts
            msg.METRICS: MetricRecord(
                {
                    **metrics,
                    **{f"received-{k}": v for k, v in evaluation_metrics(before).items()},
                    "unknown-species-images": float(sum(local.unknown_species.values())),
                    "skipped-images": float(local.skipped_images()),
                }
            ),
        }
    )
    if field_node:
        feedback = ErrorFeedback(outbox.feedback())
    else:
        feedback = ErrorFeedback(msg.from_record(context.state[FEEDBACK]) if FEEDBACK in context.state else {})
    budget = window_budget(context.node_config, cfg.world.link)
    pack_to_fit(reply, deltas, cfg.federation.upload_compression, feedback, budget, cfg.federation.link_min_topk)
    if field_node:  # on disk, whole, before it is sent
        outbox.keep(int(config["version"]), reply, local.fingerprint(), feedback.residuals)
    elif feedback.residuals:
        context.state[FEEDBACK] = msg.to_record(feedback.residuals)
    return Message(reply, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Accuracy, loss and per-species recall of the received model on the local test split."""
    cfg = run_config(message, context)
    world = _world(message, context)
    local, _ = local_data(cfg, world, dict(context.node_config))
    model = build_model(cfg.model, _base(message, context, world), _received(message, cfg))
    metrics = MetricRecord(evaluation_metrics(evaluate_local(cfg, model, local)))
    return Message(RecordDict({msg.METRICS: metrics}), reply_to=message)
