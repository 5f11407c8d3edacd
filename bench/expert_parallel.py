"""`geomoe bench ep`: one device's model with its experts split over 2 and 3 expert servers on 127.0.0.1, against
the same model run whole, in one run.

Each server is a `geomoe expert-server serve` process of its own, as on a field LAN (servers in the benchmark's
own process would share its interpreter lock and time each other's Python). Setups are timed in interleaved
rounds, one batch each, and the cost of splitting is the median over rounds of split over local, with its
spread: on a shared machine the load moves between rounds more than within one.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from geomoe.bench.model import pair_ratios
from geomoe.expert_parallel.remote import PeerClient, PeerError, attach_peers
from geomoe.model.config import ModelConfig
from geomoe.model.experts import prune_model
from geomoe.model.network import GeoMoENet
from geomoe.server.checkpoint import save_model
from geomoe.sim.simulation import free_port

SERVER_START_S = 120.0  # a server process imports torch and loads its model before it answers


@contextmanager
def expert_server_processes(models: list[GeoMoENet], folder: Path) -> Iterator[list[PeerClient]]:
    """`geomoe expert-server serve` of each model on a free loopback port, each a process of its own, all started
    at once (each imports torch and loads its model first); yields a client per server once all answer, and stops
    the processes on exit."""
    command = [sys.executable, "-c", "from geomoe.cli.main import main; main()", "expert-server", "serve"]
    processes, peers = [], []
    try:
        for index, model in enumerate(models):
            path = folder / f"experts-{index}.pt"
            save_model(model, path)
            address = f"127.0.0.1:{free_port()}"
            processes.append(
                subprocess.Popen([*command, "--model", str(path), "--address", address], stdout=subprocess.DEVNULL)
            )
            peers.append(PeerClient(address, backoff_s=0.0))
        deadline = time.monotonic() + SERVER_START_S
        for peer, process in zip(peers, processes, strict=True):
            while True:
                try:
                    peer.describe()
                    break
                except PeerError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        exit_code = process.poll()
                        raise RuntimeError(f"expert server {peer.address} did not start (exit {exit_code})") from None
                    time.sleep(0.2)
        yield peers
    finally:
        for peer in peers:
            peer.close()
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def _timed_layers(model: GeoMoENet) -> dict[int, list[float]]:
    """Seconds spent in each MoE layer, per forward pass (forward hooks, kept on the model)."""
    times: dict[int, list[float]] = {layer: [] for layer in model.moe_layers()}
    starts: dict[int, float] = {}
    for layer, module in model.moe_layers().items():
        module.register_forward_pre_hook(lambda m, a, layer=layer: starts.__setitem__(layer, time.perf_counter()))
        module.register_forward_hook(
            lambda m, a, o, layer=layer: times[layer].append(time.perf_counter() - starts[layer])
        )
    return times


def bench_expert_parallel(batch_size: int, image_size: int, repeats: int, num_experts: int = 16) -> dict:
    """Images/s and per-layer latency of the whole model and of its split over 2 and 3 servers; the ratio of
    split over local per interleaved round (median and spread) and the bytes each peer moved per image."""
    torch.manual_seed(0)
    full = GeoMoENet(ModelConfig(num_classes=182, num_experts=num_experts)).eval()
    images = torch.randn(batch_size, 3, image_size, image_size)
    layers = full.cfg.moe_layers
    setups: dict[str, GeoMoENet] = {"local": full}
    served: dict[str, list[GeoMoENet]] = {}
    for servers in (2, 3):
        shares = [list(range(num_experts))[i :: servers + 1] for i in range(servers + 1)]  # device + servers
        name = f"split_{servers}"
        setups[name] = prune_model(copy.deepcopy(full), {layer: shares[0] for layer in layers}).eval()
        served[name] = [prune_model(copy.deepcopy(full), {layer: share for layer in layers}) for share in shares[1:]]
    with tempfile.TemporaryDirectory(prefix="geomoe-bench-ep-") as folder:
        every = [model for models in served.values() for model in models]
        with expert_server_processes(every, Path(folder)) as clients:
            peers: dict[str, list[PeerClient]] = {}
            for name, models in served.items():
                peers[name], clients = clients[: len(models)], clients[len(models) :]
                attach_peers(setups[name], peers[name])
            batch_s, layer_times = _timed_rounds(setups, images, repeats, [p for g in peers.values() for p in g])
            sent = {name: [p.stats.bytes_sent + p.stats.bytes_received for p in g] for name, g in peers.items()}
    result: dict = {"batch_size": batch_size, "image_size": image_size, "num_experts": num_experts, "setups": {}}
    for name in setups:
        median_s = sorted(batch_s[name])[len(batch_s[name]) // 2]
        entry = {
            "images_per_s": batch_size / median_s,
            "batch_s": median_s,
            "layer_ms": {str(k): 1e3 * sorted(v)[len(v) // 2] for k, v in layer_times[name].items()},
        }
        if name in peers:
            images_seen = batch_size * repeats
            entry["bytes_per_image_per_peer"] = {
                p.address: moved / images_seen for p, moved in zip(peers[name], sent[name], strict=True)
            }
            entry["over_local"] = pair_ratios(batch_s["local"], batch_s[name])
        result["setups"][name] = entry
    return result


def _timed_rounds(
    setups: dict[str, GeoMoENet], images: torch.Tensor, repeats: int, peers: list[PeerClient]
) -> tuple[dict[str, list[float]], dict[str, dict[int, list[float]]]]:
    """Seconds per batch of each setup over `repeats` interleaved rounds (order reversed every other round), and
    per MoE layer; peers' byte counts restart after the warm-up, so they count the timed rounds only."""
    layer_times = {name: _timed_layers(model) for name, model in setups.items()}
    batch_s: dict[str, list[float]] = {name: [] for name in setups}
    with torch.no_grad():
        for model in setups.values():  # warm-up
            model(images)
        for times in layer_times.values():
            for values in times.values():
                values.clear()
        for peer in peers:
            peer.stats.bytes_sent = peer.stats.bytes_received = 0
        order = list(setups)
        for round_ in range(repeats):
            for name in order if round_ % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                setups[name](images)
                batch_s[name].append(time.perf_counter() - start)
    return batch_s, layer_times
