"""Hostile nodes for the robustness benchmark: geomoe's own ClientApp with one node's updates corrupted.

The node of partition 0 trains honestly, then sends its update scaled (x10, a model-replacement attempt) or
sign-flipped (x-4, pushing the model away from what its data says). Corrupting after training keeps the attack
inside the server's bounds on what a reply may be (sizes, shapes, codec), so what decides its effect is the
aggregator. A third kind replays its first update forever (duplicate deliveries, for asynchronous runs). Run them
with `geomoe.sim.simulation.simulate(..., client_app=HOSTILE_APPS[name])`, or on a real SuperLink in tests, where the
hostile node is the one whose node config says `hostile=true`; never deployed.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from geomoe.client import client_app as honest
from geomoe.client.client_app import run_config
from geomoe.client.task import download_limit
from geomoe.wire import messages as msg

HOSTILE_PARTITION = 0  # the one corrupted node of a simulation (1 of 6 on the synthetic default)
ATTACK_FACTORS = {"scaled": 10.0, "sign_flipped": -4.0}  # what multiplies its honest update


def hostile(context: Context) -> bool:
    """Whether this node is the hostile one: partition 0 of a simulation, or a SuperNode started with
    `hostile=true` in its node config."""
    config = context.node_config
    return int(config.get("partition-id", -1)) == HOSTILE_PARTITION or config.get("hostile") is True


def corrupting(factor: float):
    """A Flower mod that multiplies the hostile node's training update by `factor`, re-packed with the run's
    upload codec (its honest error feedback stays as it was)."""

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        if message.metadata.message_type != "train" or not hostile(context) or reply.has_error():
            return reply
        cfg = run_config(message, context)
        update = msg.unpack(reply.content, msg.UPDATE, download_limit(cfg.model))
        corrupted = {k: v * factor if v.is_floating_point() else v for k, v in update.items()}
        msg.pack(reply.content, msg.UPDATE, corrupted, cfg.federation.upload_compression)
        return reply

    return mod


def replaying(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower mod: the hostile node answers every train message after its first with its first update again, as a
    store-and-forward node whose acknowledgements never arrive would (the server must count it once). The first
    reply is kept in node state, which follows the node from one simulation worker to another."""
    if message.metadata.message_type != "train" or not hostile(context):
        return call_next(message, context)
    kept = [name for name in context.state if name.startswith(REPLAYED)]
    if not kept:
        content = call_next(message, context).content
        for name, record in content.items():
            context.state[REPLAYED + name] = record
        return Message(content, reply_to=message)
    return Message(RecordDict({name.removeprefix(REPLAYED): context.state[name] for name in kept}), reply_to=message)


REPLAYED = "replayed:"  # node state: partition 0's first reply, record by record


def hostile_app(attack: str) -> ClientApp:
    """geomoe's ClientApp (same query, train and evaluate) with `attack` applied to the hostile node's updates."""
    app = ClientApp(mods=[replaying] if attack == "replaying" else [corrupting(ATTACK_FACTORS[attack])])
    app.query()(honest.query)
    app.train()(honest.train)
    app.evaluate()(honest.evaluate)
    return app


scaled = hostile_app("scaled")
sign_flipped = hostile_app("sign_flipped")
replayed = hostile_app("replaying")
HOSTILE_APPS = {name: f"geomoe.bench.hostile:{name}" for name in ATTACK_FACTORS} | {
    "replaying": "geomoe.bench.hostile:replayed"
}
