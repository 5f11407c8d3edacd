"""The server's round loop: set up nodes, run rounds, measure every message, checkpoint, report.

Flower's `Strategy.start` cannot resume or checkpoint and sends the same arrays to everyone, so
the loop lives here and calls the strategy's hooks. After every round the global model and the
server state are written atomically; `resume` continues from the last completed round.

Longer than 300 lines because the round loop is kept whole in one place (as nanoGPT keeps its training loop):
set-up, rounds, evaluation, traffic, checkpoint and report read in the order they happen.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from rich.console import Console
from rich.table import Table

from geomoe.data.atomic_file import atomic_write
from geomoe.model.compute import on_device, resolve_device
from geomoe.model.experts import shared_state
from geomoe.model.training import evaluate
from geomoe.server.buffered_run import BufferedRun
from geomoe.server.checkpoint import load_model, save_model
from geomoe.server.initial_model import initial_model
from geomoe.server.progress import phase
from geomoe.server.round_clock import SimulatedRounds
from geomoe.server.state import ServerState
from geomoe.server.strategy import GeoExpertStrategy, weighted_accuracy
from geomoe.wire import messages as msg
from geomoe.wire.bounded import finite_json
from geomoe.wire.run_config import RunConfig
from geomoe.world.world import World

log = logging.getLogger("geomoe.server")
CHECKPOINT = "checkpoint.pt"
REPORT = "report.json"


def same_run(saved_json: str, cfg: RunConfig) -> bool:
    """A checkpoint may be resumed by the same run, with more rounds or another cache folder."""
    saved, now = json.loads(saved_json), json.loads(cfg.to_json())
    for data in (saved, now):
        data["federation"].pop("rounds")
        data.pop("cache")
    return saved == now


def merge_traffic(a: dict | None, b: dict) -> dict:
    """Sum of two traffic entries of one node (totals and categories)."""
    if a is None:
        return b
    out = {"down": a["down"] + b["down"], "up": a["up"] + b["up"]}
    for side in ("down_by", "up_by"):
        out[side] = {k: a[side].get(k, 0) + b[side].get(k, 0) for k in set(a[side]) | set(b[side])}
    return out


def publish_base(base: dict[str, torch.Tensor], cache_dir: Path) -> tuple[Path, str]:
    """The base written once where nodes on this host (virtual nodes in a simulation) read it, and its SHA-256:
    a thousand virtual nodes then share one copy per process instead of each holding its own in node state."""
    buffer = io.BytesIO()
    torch.save(base, buffer)
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    path = cache_dir / f"base-{sha[:16]}.pt"
    if not path.is_file():
        atomic_write(path, data)
    return path, sha


def evaluation_sample(world: World, limit: int, seed: int) -> np.ndarray:
    """The clients' test images the server scores the global model on: all of them, or `limit` (> 0) drawn once
    with the run's seed, so that every round is scored on the same images."""
    indices = np.concatenate([location.test for location in world.locations])
    if 0 < limit < len(indices):
        indices = np.sort(np.random.default_rng(seed).choice(indices, limit, replace=False))
    return indices


ROUTING_BATCH = 100  # nodes sent the full model at once by a routing query


class PhaseClock:
    """Seconds of a round's consecutive phases (query, configure, train, server_evaluation, aggregate)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = now - self._last
        self._last = now


def registered_locations(grid: Grid) -> dict[int, tuple[float, float]]:
    """SuperNodes the SuperLink lists with a registered location (`flwr supernode register --location`, which
    `geomoe deploy register` runs from the fleet file): node id -> (lat, lon). The server takes such a node's cell
    from here rather than from what the node says."""
    found = {}
    for info in grid.get_nodes():
        if info.HasField("location"):
            lat, lon = (float(part) for part in info.location.split(","))  # Flower checked "<lat>,<lon>"
            found[info.node_id] = (lat, lon)
    return found


class Federation:
    """Runs one federated training job against a Flower Grid."""

    def __init__(self, grid: Grid, cfg: RunConfig, resume: bool = False, console: Console | None = None):
        self.grid = grid
        self.simulated = isinstance(grid, InMemoryGrid)  # virtual nodes: the field's clock is simulated too
        self.out = Path(cfg.out)
        self.console = console or Console(stderr=True)
        cache_dir = cfg.cache_dir
        started = time.monotonic()
        with phase("loading the world (dataset, partition, clients)", self.console):
            self.world, world_file, world_sha = World.cached(cfg.world, cache_dir)
        seconds = {"world": time.monotonic() - started}
        self.cfg = cfg = cfg.with_classes(self.world.num_classes)
        checkpoint = self.out / CHECKPOINT
        if resume and checkpoint.is_file():
            model, extra = load_model(checkpoint)
            if not same_run(extra["run_config"], cfg):
                raise ValueError(f"{checkpoint} was written by a run with another configuration; use a new --out")
            self.base, self.state, self.setup = extra["base"], ServerState(**extra["server_state"]), extra["setup"]
            self.console.print(f"resuming {checkpoint} after round {self.state.completed_round}")
        else:
            started = time.monotonic()
            model, metrics = initial_model(cfg, self.world, cache_dir)
            self.setup = {**metrics, "seconds": {**seconds, "initial_model": time.monotonic() - started}}
            self.base, self.state = {k: v.clone() for k, v in shared_state(model).items()}, ServerState()
        base_file, base_sha = publish_base(self.base, cache_dir)
        world_info = {
            msg.BASE_FILE: str(base_file.resolve()),
            msg.BASE_SHA256: base_sha,
            msg.SPECIES_NAMES: self.world.data.class_names,
            msg.CELLS: [location.cell for location in self.world.locations],
            msg.WORLD_FILE: str(world_file.resolve()),
            msg.WORLD_SHA256: world_sha,
            msg.SUPERCLASSES: self.setup.get("superclasses", []),
        }
        self.strategy = GeoExpertStrategy(cfg, model, self.base, self.state, world_info)
        self.base_bytes = msg.content_traffic(RecordDict({msg.BASE: msg.to_record(self.base)}))["total"]
        self.base_counted: set[int] = set()  # nodes whose copy of the base the traffic has counted

    # --- messaging with byte accounting --------------------------------------------------------
    def exchange(self, messages: list[Message], phase: str) -> tuple[list[Message], dict[int, dict]]:
        """Send, wait up to the round timeout, and count each node's bytes down and up, by category."""
        traffic: dict[int, dict] = {}
        for message in messages:
            down = msg.content_traffic(message.content)
            traffic[message.metadata.dst_node_id] = {"down": down.pop("total"), "up": 0, "down_by": down, "up_by": {}}
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout_s))
        for reply in replies:
            entry = traffic.setdefault(reply.metadata.src_node_id, {"down": 0, "up": 0, "down_by": {}, "up_by": {}})
            if not reply.has_error():
                up = msg.content_traffic(reply.content)
                entry["up"], entry["up_by"] = up.pop("total"), up
        missing = len(messages) - len(replies)
        if missing:
            log.warning(
                "%s: %d node(s) did not reply within %.0f s", phase, missing, self.cfg.federation.round_timeout_s
            )
        return replies, traffic

    def wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.federation.round_timeout_s
        needed = max(self.cfg.federation.min_nodes, 1)
        while len(nodes := sorted(self.grid.get_node_ids())) < needed:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of {needed} nodes connected within {self.cfg.federation.round_timeout_s} s"
                )
            time.sleep(1)
        return nodes

    def set_up_nodes(self) -> dict[int, dict[str, int]]:
        """Wait for the first nodes and query them; at least one must answer."""
        traffic = self.query_new(self.wait_for_nodes(), self.state.completed_round)
        if not self.strategy.roster.nodes:
            raise RuntimeError("no node answered the query")
        return traffic

    def query_new(self, nodes: list[int], server_round: int) -> dict[int, dict]:
        """Query nodes for their location and data; with location clients, also route the full model.

        Runs at set-up and at the start of every round for nodes that joined since (or whose query failed).
        With every cell a client, a cell routes the full model only when first sampled (`route_new`):
        sending 4 MB to thousands of nodes at set-up would dwarf the training traffic.
        """
        if not nodes:
            return {}
        with phase(f"querying {len(nodes)} nodes", self.console):
            replies, traffic = self.exchange(self.strategy.configure_query(nodes, with_model=False), "query")
        self.strategy.register(server_round, replies, registered_locations(self.grid), set(self.grid.get_node_ids()))
        self.charge_shared_base(traffic)
        if self.cfg.world.clients == "locations":
            for node, t in self.route_new([n for n in nodes if n in self.strategy.roster.nodes], server_round).items():
                traffic[node] = merge_traffic(traffic.get(node), t)
        return traffic

    def charge_shared_base(self, traffic: dict[int, dict]) -> None:
        """Virtual nodes read the base from the server's file instead of being sent it (memory: one copy per
        process, not one per node); their set-up traffic still counts it, once per run, as a device's would."""
        for node_id, entry in traffic.items():
            node = self.strategy.roster.nodes.get(node_id)
            if node is not None and node.base_from_file and node_id not in self.base_counted:
                self.base_counted.add(node_id)
                entry["down"] += self.base_bytes
                entry["down_by"]["base"] = entry["down_by"].get("base", 0) + self.base_bytes

    def route_new(self, nodes: list[int], server_round: int) -> dict[int, dict]:
        """Nodes of locations without a keep set route the full model on their validation images."""
        needs_keep = [n for n in nodes if self.strategy.roster.nodes[n].location not in self.state.keep]
        if not needs_keep or self.strategy.slicer.dense:
            return {}
        traffic: dict[int, dict] = {}
        registered = registered_locations(self.grid)  # once: the node list does not change within this query
        with phase(f"routing query: {len(needs_keep)} nodes route the full model", self.console):
            for start in range(0, len(needs_keep), ROUTING_BATCH):  # a batch's messages in memory, not all of them
                batch = needs_keep[start : start + ROUTING_BATCH]
                replies, batch_traffic = self.exchange(
                    self.strategy.configure_query(batch, with_model=True), "routing query"
                )
                self.strategy.register(server_round, replies, registered, set(self.grid.get_node_ids()))
                traffic |= batch_traffic
        return traffic

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> dict:
        fed = self.cfg.federation
        started = time.monotonic()
        setup_traffic = self.set_up_nodes()
        self.setup.setdefault("seconds", {})[f"query_{self.state.completed_round}"] = time.monotonic() - started
        self.setup.setdefault("traffic", {})
        self.setup["traffic"][str(self.state.completed_round)] = self._by_cell(setup_traffic)
        extra = {}
        if fed.mode == "async":
            self.route_new(list(self.strategy.roster.nodes), self.state.completed_round)  # every node, at once
            buffered = BufferedRun(self, simulated=self.simulated)
            buffered.run()
            extra = buffered.report()
        else:
            self.run_rounds()
        self.strategy.reachable = None  # the final evaluation asks every node the SuperLink lists
        self.final_evaluation()
        self.checkpoint()
        report = self.report() | extra
        atomic_write(self.out / REPORT, json.dumps(finite_json(report), indent=2, allow_nan=False).encode())
        return report

    def run_rounds(self) -> None:
        """Synchronous rounds: sample, send, wait up to the round timeout, aggregate, checkpoint."""
        fed = self.cfg.federation
        field = None
        if self.simulated:
            args = (fed.round_timeout_s, fed.message_ttl_s, self.cfg.train.epochs, self.state.clock_s)
            field = SimulatedRounds(self.cfg.world.field_clock(), *args)
        for server_round in range(self.state.completed_round + 1, fed.rounds + 1):
            if field is not None and fed.max_sim_hours is not None and field.now > fed.max_sim_hours * 3600:
                self.state.stopped = f"simulated time reached {fed.max_sim_hours} hours"
                break
            started = time.monotonic()
            clock = PhaseClock()
            new_nodes = sorted(set(self.grid.get_node_ids()) - set(self.strategy.roster.nodes))
            joined = self._by_cell(self.query_new(new_nodes, server_round))
            if not self.within_budget(server_round):
                break
            if field is not None:
                self.strategy.reachable = field.online(self.strategy.roster.nodes)
            sampled = self.strategy.round_nodes(server_round, self.grid)
            routed = {**joined, **self._by_cell(self.route_new(sampled, server_round))}
            clock.lap("query")
            if routed:
                setup = self.setup["traffic"].setdefault(str(server_round - 1), {})
                for cell, t in routed.items():
                    setup[cell] = merge_traffic(setup.get(cell), t)
            clip_norm = self.state.clip_norm  # what this round's nodes clip to (adaptive clipping moves it after)
            messages = list(self.strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), self.grid))
            clock.lap("configure")
            replies, traffic = self.exchange(messages, f"round {server_round}")
            wasted = 0.0
            if field is not None:
                replies, wasted = field.in_time(replies, traffic, self.strategy.roster.nodes)
                self.state.clock_s = field.now
            clock.lap("train")
            # The model the nodes received, before this update: measured only when some node replied.
            received_model_accuracy = self.server_accuracy() if any(not r.has_error() for r in replies) else None
            clock.lap("server_evaluation")
            _, train_metrics = self.strategy.aggregate_train(server_round, replies)
            clock.lap("aggregate")
            # Train replies report the accuracy of the model they received: the model after the previous round.
            received = {cell: vars(e) for cell, e in self.strategy.received.items()}
            self._store_evaluation(server_round - 1, received, received_model_accuracy)
            row = {
                "round": server_round,
                "seconds": time.monotonic() - started,
                "phases": clock.laps,
                "client_compute_seconds": float(train_metrics["compute_seconds"]) if train_metrics else 0.0,
                "train_loss": float(train_metrics["train_loss"]) if train_metrics else None,
                "replies": int(train_metrics["replies"]) if train_metrics else 0,
                "traffic": self._by_cell(traffic),
                "experts_held": {
                    self.strategy.roster.nodes[n].name: sum(
                        len(v) for v in self.strategy.slicer.keep_for(self.strategy.roster.nodes[n]).values()
                    )
                    for n in traffic
                    if n in self.strategy.roster.nodes
                },
                "rejected": self.strategy.rejections.of_round(server_round),
                "sampled": [self.strategy.roster.nodes[n].name for n in sampled],
                "unknown_species_images": int(train_metrics["unknown_species_images"]) if train_metrics else 0,
                "skipped_images": int(train_metrics["skipped_images"]) if train_metrics else 0,
                "link": {
                    k: int(train_metrics[f"link_{k}"]) if train_metrics else 0 for k in ("compressed", "deferred")
                },
            }
            if field is not None:
                row |= {"sim_hours": field.now / 3600, "wasted_node_hours": wasted}
            if self.cfg.privacy.enabled:
                row |= {"clip_norm": clip_norm, "epsilon": self.strategy.epsilon()}
            self.state.rounds.append(row)
            self.state.completed_round = server_round
            self.checkpoint()
            self.console.print(self._round_line(row))

    def within_budget(self, server_round: int) -> bool:
        """Whether the round may run under privacy.epsilon_budget; over it, stop (or warn and go on)."""
        reason = self.strategy.over_budget(server_round, len(self.strategy.online(self.grid)))
        if reason is None:
            return True
        log.warning(reason)
        if self.cfg.privacy.on_budget == "warn":
            self.console.print(f"warning: {reason}")
            return True
        self.console.print(f"stopped: {reason}")
        self.state.stopped = reason
        return False

    def final_evaluation(self) -> None:
        done = self.state.completed_round
        messages = list(self.strategy.configure_evaluate(done, ArrayRecord(), ConfigRecord(), self.grid))
        replies, _ = self.exchange(messages, "evaluation")
        self._store_evaluation(done, self.strategy.per_cell_evaluation(done, replies))

    def _store_evaluation(self, rounds_done: int, per_cell: dict, server_accuracy: float | None = None) -> None:
        if per_cell:
            self.state.evaluations[rounds_done] = {
                **weighted_accuracy(per_cell),
                "per_cell": per_cell,
                "server_accuracy": self.server_accuracy() if server_accuracy is None else server_accuracy,
            }

    def server_accuracy(self) -> float:
        """The full global model on the union of the clients' test splits, or on a fixed sample of
        `federation.server_eval_images` of them (the same images every round: thousands of cells hold tens of
        thousands, and this runs every round)."""
        indices = evaluation_sample(self.world, self.cfg.federation.server_eval_images, self.cfg.seed)
        model = self.strategy.model
        with on_device(resolve_device(self.cfg.train.device), model):
            return float(evaluate(model, self.world.loader(indices, 256))["accuracy"])

    def _by_cell(self, traffic: dict[int, dict[str, int]]) -> dict[str, dict[str, int]]:
        return {self.strategy.roster.name(n): t for n, t in traffic.items()}

    def checkpoint(self) -> None:
        save_model(
            self.strategy.model,
            self.out / CHECKPOINT,
            base=self.base,
            server_state=asdict(self.state),
            setup=self.setup,
            run_config=self.cfg.to_json(),
            species=self.world.data.class_names,  # what the classes are called, for exports to cameras
        )

    def _round_line(self, row: dict) -> str:
        up = sum(t["up"] for t in row["traffic"].values()) / max(len(row["traffic"]), 1)
        acc = self.state.evaluations.get(row["round"] - 1, {}).get("accuracy")
        acc_text = f"{acc:.3f}" if acc is not None else "-"
        return (
            f"round {row['round']}/{self.cfg.federation.rounds}: {row['replies']} replies, "
            f"train loss {row['train_loss'] or float('nan'):.3f}, accuracy before round {acc_text}, "
            f"upload {up / 1e3:.1f} kB/client, {row['seconds']:.1f} s"
            + (f", {row['unknown_species_images']} images of unknown species" if row["unknown_species_images"] else "")
            + (f", {row['skipped_images']} unreadable images skipped" if row["skipped_images"] else "")
            + (f", epsilon {row['epsilon']:.3g}" if row.get("epsilon") is not None else "")
        )

    def report(self) -> dict:
        evaluations = {int(k): v for k, v in self.state.evaluations.items()}
        return {
            "config": json.loads(self.cfg.to_json()),
            "strategy": self.cfg.federation.strategy,
            "setup": self.setup,
            "locations": [
                {
                    "cell": n.cell,
                    "name": n.name,
                    "species": n.species,
                    "train_examples": n.train_examples,
                    "source": n.source,
                    "unknown_species": n.unknown_species,
                    "skipped": n.skipped,
                    "keep": self.strategy.slicer.keep_for(n) if self.strategy.slicer.keep_known(n) else None,
                }
                for n in sorted(self.strategy.roster.nodes.values(), key=lambda n: n.location)
            ],
            "rounds": self.state.rounds,
            "evaluations": {str(k): evaluations[k] for k in sorted(evaluations)},
            "final_accuracy": evaluations.get(self.state.completed_round, {}).get("accuracy"),
            "rejected": self.strategy.rejections.rows,
            "privacy": {
                "epsilon": self.strategy.epsilon(),
                "delta": self.cfg.privacy.delta,
                "noise": self.cfg.privacy.noise,
                "stopped": self.state.stopped,
            },
        }


def cell(value: object) -> str:
    """A table cell: floats to 3 significant digits, nothing as a dash."""
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def summary_table(report: dict) -> Table:
    """Per round: accuracy of the model after it, mean bytes per client, images the nodes left out (species the
    run does not know, unreadable files) and the privacy spent (epsilon), the last three only when there are any."""
    table = Table(title=f"geomoe {report['strategy']}: {len(report['rounds'])} rounds")
    optional = {
        key: title
        for key, title in (
            ("unknown_species_images", "unknown sp. imgs"),
            ("skipped_images", "unreadable imgs"),
            ("epsilon", "epsilon"),
            ("sim_hours", "sim. hours"),
            ("wasted_node_hours", "wasted node-h"),
        )
        if any(row.get(key) for row in report["rounds"])
    }
    columns = ("round", "accuracy", "server acc.", "up kB/client", "down kB/client", "experts/client")
    for column in (*columns, *optional.values()):
        table.add_column(column, justify="right")
    evaluations = report["evaluations"]
    first = evaluations.get("0")
    if first:
        dashes = ["-"] * (3 + len(optional))
        accuracy = f"{first['accuracy']:.3f}" if "accuracy" in first else "-"
        table.add_row("0", accuracy, f"{first['server_accuracy']:.3f}", *dashes)
    for row in report["rounds"]:
        ev = evaluations.get(str(row["round"]), {})
        traffic = row["traffic"].values()
        n = max(len(row["traffic"]), 1)
        held = row["experts_held"].values()
        table.add_row(
            str(row["round"]),
            f"{ev['accuracy']:.3f}" if ev else "-",
            f"{ev['server_accuracy']:.3f}" if ev else "-",
            f"{sum(t['up'] for t in traffic) / n / 1e3:.1f}",
            f"{sum(t['down'] for t in row['traffic'].values()) / n / 1e3:.1f}",
            f"{sum(held) / max(len(held), 1):.1f}",
            *(cell(row.get(key)) for key in optional),
        )
    return table
