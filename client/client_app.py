"""The Flower ClientApp: one camera-trap device or one simulated S2 cell.

The same code runs in simulation (`partition-id` in the node config) and on a device (`lat`,
`lon` in the node config). The run's configuration arrives with every message from the server.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from geomoe import messages as msg
from geomoe.client.task import (
    Received,
    build_model,
    evaluate_location,
    locate,
    routing_on_validation,
    train_and_delta,
    world_for,
)
from geomoe.compression import ErrorFeedback
from geomoe.run_config import RunConfig

app = ClientApp()
FEEDBACK = "error-feedback"  # node state: what compression dropped from the last update


def _run_config(message: Message) -> RunConfig:
    return RunConfig.from_json(str(message.content[msg.CONFIG]["run"]))


def _base(message: Message, context: Context) -> dict[str, torch.Tensor]:
    """The initial shared state: from this message if it carries it (then cached), else the cache."""
    if msg.BASE in message.content:
        context.state[msg.BASE] = message.content[msg.BASE]
    if msg.BASE not in context.state:
        raise RuntimeError("this node has no base model cached and the message carries none")
    return msg.from_record(context.state[msg.BASE])


def _received(message: Message) -> Received:
    content = message.content
    return Received(*(msg.unpack(content, name) for name in (msg.EXPERTS, msg.ROUTER, msg.HEAD, msg.SHARED)))


def evaluation_metrics(result: dict) -> dict:
    """An evaluation as MetricRecord values; recall NaN (species absent here) travels as -1."""
    recall = [r if r == r else -1.0 for r in result["recall"]]
    return {"accuracy": result["accuracy"], "loss": result["loss"], "examples": result["examples"], "recall": recall}


@app.query()
def query(message: Message, context: Context) -> Message:
    """Say where this node is, whether it has the base cached, and (if sent a model) how it routes."""
    cfg = _run_config(message)
    world = world_for(cfg)
    index = locate(world, dict(context.node_config))
    location = world.locations[index]
    info = {
        "location": index,
        "cell": location.cell,
        "has-base": msg.BASE in context.state,
        "species": json.dumps(world.species(location.train)),
        "train-examples": len(location.train),
    }
    content = RecordDict({msg.INFO: ConfigRecord(info)})
    if msg.EXPERTS in message.content:
        model = build_model(cfg.model, _base(message, context), _received(message))
        content[msg.TOKENS] = msg.to_record(msg.stats_to_tensors(routing_on_validation(cfg, model, location)))
    return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Evaluate what was received, train it locally, and send back deltas of what was sent."""
    cfg = _run_config(message)
    config = message.content[msg.CONFIG]
    index = int(config["location"])
    location = world_for(cfg).locations[index]
    received = _received(message)
    model = build_model(cfg.model, _base(message, context), received)
    before = evaluate_location(cfg, model, location)
    deltas, metrics, stats = train_and_delta(cfg, model, received, location, int(config["round"]), index)
    reply = RecordDict(
        {
            msg.TOKENS: msg.to_record(msg.stats_to_tensors(stats)),
            msg.METRICS: MetricRecord(
                {**metrics, **{f"received-{k}": v for k, v in evaluation_metrics(before).items()}}
            ),
        }
    )
    feedback = ErrorFeedback(msg.from_record(context.state[FEEDBACK]) if FEEDBACK in context.state else {})
    msg.pack(reply, msg.UPDATE, deltas, cfg.federation.upload_compression, feedback)
    if feedback.residuals:
        context.state[FEEDBACK] = msg.to_record(feedback.residuals)
    return Message(reply, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Accuracy, loss and per-species recall of the received model on the local test split."""
    cfg = _run_config(message)
    location = world_for(cfg).locations[int(message.content[msg.CONFIG]["location"])]
    model = build_model(cfg.model, _base(message, context), _received(message))
    metrics = MetricRecord(evaluation_metrics(evaluate_location(cfg, model, location)))
    return Message(RecordDict({msg.METRICS: metrics}), reply_to=message)
