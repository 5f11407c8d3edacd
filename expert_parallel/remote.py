"""Client side of expert-parallel mode: send the tokens routed to a peer's experts to that peer.

Per MoE layer, all tokens for one peer go in one request; requests to different peers are in
flight at once. An autograd function sends the gradient back along the same path, so training
through peers is exact. Every call has a deadline; a peer that fails or times out is marked
unhealthy with exponential backoff, and its tokens fall back to the layer's policy (best held
expert, or the papers' removal); such tokens are counted.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import grpc
import torch

from geomoe.expert_parallel.service import MAX_MESSAGE_BYTES, SESSION_KEY, TlsFiles
from geomoe.expert_parallel.tensors import from_proto, to_proto
from geomoe.model.moe_layer import MoEMlp, Routing
from geomoe.model.network import GeoMoENet
from geomoe.protos import expert_pb2, expert_pb2_grpc


class PeerError(RuntimeError):
    """A call to a peer failed; the peer is now in backoff."""


@dataclass
class PeerStats:
    """What crossed the link to one peer."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0
    failures: int = 0


class PeerClient:
    """One peer's expert service, with deadlines, auth, optional TLS and health backoff."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls: TlsFiles | None = None,
        deadline_s: float = 5.0,
        codec: str = "",
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        server_name: str | None = None,
    ) -> None:
        self.address, self.deadline_s, self.codec = address, deadline_s, codec
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.session = uuid.uuid4().hex  # the server keeps this client's gradients apart from other callers'
        self.metadata = ((SESSION_KEY, self.session),) + ((("authorization", f"Bearer {token}"),) if token else ())
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=tls.root_ca)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = expert_pb2_grpc.ExpertServiceStub(self.channel)
        self.stats = PeerStats()
        self._consecutive_failures = 0
        self._unhealthy_until = 0.0

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._unhealthy_until

    def _failed(self, error: Exception) -> PeerError:
        self._consecutive_failures += 1
        self.stats.failures += 1
        delay = min(self.backoff_s * 2 ** (self._consecutive_failures - 1), self.max_backoff_s)
        self._unhealthy_until = time.monotonic() + delay
        return PeerError(f"{self.address}: {error}")

    def _sending(self, request) -> None:
        self.stats.calls += 1
        self.stats.bytes_sent += request.ByteSize()

    def _answered(self, reply):
        self._consecutive_failures = 0
        self.stats.bytes_received += reply.ByteSize()
        return reply

    def _call(self, method, request):
        self._sending(request)
        try:
            return self._answered(method(request, timeout=self.deadline_s, metadata=self.metadata))
        except grpc.RpcError as error:
            raise self._failed(error) from None

    def describe(self) -> dict[int, list[int]]:
        reply = self._call(self.stub.Describe, expert_pb2.DescribeRequest())
        return {layer.layer: list(layer.expert_ids) for layer in reply.layers}

    def forward_async(self, layer: int, expert_ids: torch.Tensor, tokens: torch.Tensor):
        """Start a Forward call; `.result()` on what it returns gives the outputs or raises PeerError."""
        request = expert_pb2.ForwardRequest(
            layer=layer, expert_ids=expert_ids.tolist(), tokens=to_proto(tokens, self.codec), reply_codec=self.codec
        )
        self._sending(request)
        future = self.stub.Forward.future(request, timeout=self.deadline_s, metadata=self.metadata)
        return _PendingForward(self, future, tuple(tokens.shape))

    def backward(
        self, layer: int, expert_ids: torch.Tensor, tokens: torch.Tensor, grad_outputs: torch.Tensor
    ) -> torch.Tensor:
        request = expert_pb2.BackwardRequest(
            layer=layer, expert_ids=expert_ids.tolist(), tokens=to_proto(tokens), grad_outputs=to_proto(grad_outputs)
        )
        return _checked(self, self._call(self.stub.Backward, request).grad_tokens, tuple(tokens.shape))

    def step(self, lr: float) -> int:
        return self._call(self.stub.Step, expert_pb2.StepRequest(lr=lr)).parameters_updated

    def close(self) -> None:
        self.channel.close()


def _checked(peer: PeerClient, message, shape: tuple[int, ...]) -> torch.Tensor:
    """A peer's tensor, decoded and of the shape asked for; anything else is that peer's fault (PeerError, so
    the caller falls back), never a crash of the caller."""
    try:
        tensor = from_proto(message)
    except ValueError as error:
        raise peer._failed(error) from None
    if tuple(tensor.shape) != shape:
        raise peer._failed(ValueError(f"answered shape {tuple(tensor.shape)} for tokens {shape}"))
    return tensor


class _PendingForward:
    def __init__(self, peer: PeerClient, future, shape: tuple[int, ...]) -> None:
        self.peer, self.future, self.shape = peer, future, shape

    def result(self) -> torch.Tensor:
        try:
            reply = self.peer._answered(self.future.result())
        except grpc.RpcError as error:
            raise self.peer._failed(error) from None
        return _checked(self.peer, reply.outputs, self.shape)


class RemoteExperts(torch.autograd.Function):
    """Identity on the outputs a peer computed; backward asks the same peer for the token gradient."""

    @staticmethod
    def forward(ctx, tokens, outputs, peer: PeerClient, layer: int, expert_ids: torch.Tensor):
        ctx.save_for_backward(tokens)
        ctx.peer, ctx.layer, ctx.expert_ids = peer, layer, expert_ids
        return outputs.clone()

    @staticmethod
    def backward(ctx, grad_outputs):
        (tokens,) = ctx.saved_tensors
        grad_tokens = ctx.peer.backward(ctx.layer, ctx.expert_ids, tokens.detach(), grad_outputs.contiguous())
        return grad_tokens, None, None, None, None


@dataclass
class LayerDispatch:
    """Which peer runs which absent expert of one layer, and what happened to the tokens sent there."""

    layer: int
    serving: dict[int, PeerClient]  # global expert id -> peer
    sent_patches: int = 0
    fallback_patches: int = 0  # wanted a peer's expert, but the peer was down or failed
    errors: list[str] = field(default_factory=list)

    def send(self, module: MoEMlp, tokens: torch.Tensor, routing: Routing) -> list[PendingPeer]:
        """Start a call to every healthy peer that runs the best expert of some patches; the layer computes its own
        experts while they are in flight. Tokens are (B, C, P, N), the layer's layout; peers speak (T, P, C)."""
        wanted = module.absent_ids[routing.absent_choice]  # (B, N) global id of the best absent expert
        per_patch = tokens.permute(0, 3, 2, 1)  # [B, C, P, N] --> [B, N, P, C]
        pending = []
        for peer in {id(p): p for p in self.serving.values()}.values():
            ids = torch.tensor([e for e, p in self.serving.items() if p is peer], dtype=torch.long)
            mask = routing.wants_absent & torch.isin(wanted, ids)
            if not mask.any():
                continue
            if not peer.healthy:
                self.fallback_patches += int(mask.sum())
                continue
            expert_ids, peer_tokens = wanted[mask], per_patch[mask]  # (T,), (T, P, C)
            call = peer.forward_async(self.layer, expert_ids, peer_tokens.detach())
            pending.append(PendingPeer(peer, mask, expert_ids, peer_tokens, call))
        return pending

    def receive(
        self, pending: list[PendingPeer], routing: Routing, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`out` (B, C, P, N) with the patches peers answered for replaced by their gated outputs, and the mask of
        those patches; a peer that failed leaves its patches to the layer's policy."""
        served = torch.zeros_like(routing.wants_absent)
        out = out.permute(0, 3, 2, 1)  # [B, C, P, N] --> [B, N, P, C]
        for call in pending:
            try:
                outputs = call.call.result()
            except PeerError as error:
                self.fallback_patches += int(call.mask.sum())
                self.errors.append(str(error))
                continue
            outputs = RemoteExperts.apply(call.tokens, outputs, call.peer, self.layer, call.expert_ids)
            out = out.index_put((call.mask,), outputs * routing.absent_gate[call.mask][:, None, None])
            served = served | call.mask
            self.sent_patches += int(call.mask.sum())
        return out.permute(0, 3, 2, 1), served


@dataclass
class PendingPeer:
    """One peer's call in flight for one layer: which patches it answers for, and with what."""

    peer: PeerClient
    mask: torch.Tensor  # (B, N) patches sent
    expert_ids: torch.Tensor  # (T,) their experts
    tokens: torch.Tensor  # (T, P, C) what was sent (backward sends it again)
    call: _PendingForward


def attach_peers(model: GeoMoENet, peers: list[PeerClient]) -> dict[int, LayerDispatch]:
    """Route each MoE layer's absent experts to the peers that serve them (first peer listed wins)."""
    offers = [(peer, peer.describe()) for peer in peers]
    dispatches = {}
    for layer, module in model.moe_layers().items():
        serving: dict[int, PeerClient] = {}
        for peer, layers in offers:
            for expert in layers.get(layer, []):
                if expert in module.absent_ids.tolist():
                    serving.setdefault(expert, peer)
        module.remote = dispatches[layer] = LayerDispatch(layer, serving)
        module.absent_centroids.requires_grad_(bool(serving))  # the router trains these rows too
    return dispatches


def step_peers(peers: list[PeerClient], lr: float) -> int:
    """Apply the gradients peers kept from backward calls (the remote half of an optimiser step)."""
    return sum(peer.step(lr) for peer in peers if peer.healthy)
