"""A model split across expert servers on 127.0.0.1 (real grpcio servers, port 0)."""

from __future__ import annotations

import copy
from contextlib import ExitStack

import pytest
import torch

from geomoe.expert_parallel.host import ExpertHost
from geomoe.expert_parallel.remote import PeerClient, attach_peers
from geomoe.expert_parallel.service import background_server
from geomoe.model.config import ModelConfig
from geomoe.model.experts import prune_model
from geomoe.model.network import GeoMoENet

LAYERS = (1, 3, 5, 7)


def full_model() -> GeoMoENet:
    torch.manual_seed(0)
    model = GeoMoENet(ModelConfig(num_classes=6, num_experts=6, drop_rate=0.0))
    with torch.no_grad():  # distinct experts, so that every one of them matters
        for module in model.moe_layers().values():
            for p in (module.b2, module.x_corr, module.norm_bias):
                p.normal_(std=0.5)
    return model.eval()


def split(model: GeoMoENet, shares: list[list[int]]) -> tuple[GeoMoENet, list[GeoMoENet]]:
    """Device model holding shares[0] of every layer; one server model per further share (in the model's dtype)."""
    dtype = next(model.parameters()).dtype
    device = prune_model(copy.deepcopy(model), {layer: shares[0] for layer in LAYERS}).to(dtype).eval()
    servers = [
        prune_model(copy.deepcopy(model), {layer: share for layer in LAYERS}).to(dtype).eval() for share in shares[1:]
    ]
    return device, servers


@pytest.fixture
def cluster():
    """Yields a function that starts servers for a split and returns (device, hosts, peers, servers)."""
    with ExitStack() as stack:

        def start(model: GeoMoENet, shares: list[list[int]], token: str | None = None, **peer_kwargs):
            device, server_models = split(model, shares)
            hosts = [ExpertHost(m) for m in server_models]
            servers = [stack.enter_context(background_server(h, token=token)) for h in hosts]
            peers = [PeerClient(s.address, token=token, **peer_kwargs) for s in servers]
            for peer in peers:
                stack.callback(peer.close)
            dispatches = attach_peers(device, peers)
            return device, hosts, peers, servers, dispatches

        yield start
