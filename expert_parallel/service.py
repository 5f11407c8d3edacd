"""The expert server: a grpcio service over an ExpertHost, with deadlines, auth, TLS and health.

Concurrent Forward calls for a layer are batched: the first caller waits `batch_window_s` for
others, then all their tokens go through one dispatch. Malformed requests get INVALID_ARGUMENT
with the reason and the server keeps serving; calls without the shared token get UNAUTHENTICATED.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from geomoe.expert_parallel.host import ExpertHost
from geomoe.expert_parallel.tensors import from_proto, to_proto
from geomoe.protos import expert_pb2, expert_pb2_grpc

SERVICE_NAME = "geomoe.expert.v1.ExpertService"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class TlsFiles:
    """PEM bytes for a TLS server (certificate chain and key) or a client (CA that signed the server)."""

    certificate: bytes | None = None
    private_key: bytes | None = None
    root_ca: bytes | None = None


class TokenAuth(grpc.ServerInterceptor):
    """Refuses every call whose `authorization` metadata is not `Bearer <token>` (health checks included)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}"

        def refuse(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token in 'authorization' metadata")

        self.refusal = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get("authorization") != self.expected:
            return self.refusal
        return continuation(handler_call_details)


class _ForwardBatch:
    """Forward requests of one layer that arrived within one batching window."""

    def __init__(self) -> None:
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.results: list[torch.Tensor | Exception] = []
        self.done = threading.Event()


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    def __init__(self, host: ExpertHost, device: str, batch_window_s: float) -> None:
        self.host, self.device, self.batch_window_s = host, device, batch_window_s
        self._open: dict[int, _ForwardBatch] = {}
        self._lock = threading.Lock()
        self.batches_run = 0  # how many dispatches served how many requests: for tests and benchmarks
        self.requests_served = 0

    def _batched_forward(self, layer: int, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        with self._lock:
            batch = self._open.get(layer)
            leader = batch is None
            if leader:
                batch = self._open[layer] = _ForwardBatch()
            index = len(batch.items)
            batch.items.append((ids, tokens))
        if leader:
            time.sleep(self.batch_window_s)
            with self._lock:
                del self._open[layer]
            try:
                outputs = self.host.forward(
                    layer, torch.cat([i for i, _ in batch.items]), torch.cat([t for _, t in batch.items])
                )
                batch.results = list(outputs.split([len(t) for _, t in batch.items]))
            except ValueError:  # one bad request must not fail the others: run them alone
                batch.results = []
                for i, t in batch.items:
                    try:
                        batch.results.append(self.host.forward(layer, i, t))
                    except ValueError as single:
                        batch.results.append(single)
            self.batches_run += 1
            self.requests_served += len(batch.items)
            batch.done.set()
        else:
            batch.done.wait()
        result = batch.results[index]
        if isinstance(result, Exception):
            raise result
        return result

    def Forward(self, request, context):
        try:
            tokens = from_proto(request.tokens)
            ids = torch.tensor(list(request.expert_ids), dtype=torch.long)
            outputs = self._batched_forward(request.layer, ids, tokens)
            return expert_pb2.ForwardReply(outputs=to_proto(outputs, request.reply_codec))
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def Backward(self, request, context):
        try:
            tokens, grad = from_proto(request.tokens), from_proto(request.grad_outputs)
            ids = torch.tensor(list(request.expert_ids), dtype=torch.long)
            return expert_pb2.BackwardReply(grad_tokens=to_proto(self.host.backward(request.layer, ids, tokens, grad)))
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def Step(self, request, context):
        return expert_pb2.StepReply(parameters_updated=self.host.step(request.lr))

    def Describe(self, request, context):
        layers = [
            expert_pb2.LayerExperts(layer=layer, expert_ids=ids, dim=self.host.layers[layer].dim)
            for layer, ids in self.host.describe().items()
        ]
        return expert_pb2.DescribeReply(layers=layers, device=self.device)


class ExpertServer:
    """Lifecycle of one expert server: start() binds and returns the address, stop() ends it."""

    def __init__(
        self,
        host: ExpertHost,
        address: str = "127.0.0.1:0",
        token: str | None = None,
        tls: TlsFiles | None = None,
        device: str = "expert-server",
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        batch_window_s: float = 0.002,
        workers: int = 8,
    ) -> None:
        self.servicer = ExpertServicer(host, device, batch_window_s)
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        interceptors = [TokenAuth(token)] if token else []
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers), options=options, interceptors=interceptors
        )
        expert_pb2_grpc.add_ExpertServiceServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        host_part = address.rsplit(":", 1)[0]
        if tls is not None:
            credentials = grpc.ssl_server_credentials([(tls.private_key, tls.certificate)])
            port = self.server.add_secure_port(address, credentials)
        else:
            port = self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"could not bind {address}")
        self.address = f"{host_part}:{port}"

    def start(self) -> str:
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.address

    def stop(self, grace_s: float = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()


@contextmanager
def background_server(host: ExpertHost, **kwargs) -> Iterator[ExpertServer]:
    """A started server, stopped on exit; `.address` is what it bound (port 0 picks a free port)."""
    server = ExpertServer(host, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()
