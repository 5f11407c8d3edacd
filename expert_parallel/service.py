"""The expert server: a grpcio service over an ExpertHost, with deadlines, auth, TLS and health.

Concurrent Forward calls for a layer whose tokens have the same patch count, width and dtype are batched:
the first caller waits `batch_window_s` for others, then all their tokens go through one dispatch; if that
fails, each runs alone and only the bad one fails. Waiters are always released. Malformed requests get
INVALID_ARGUMENT with the reason and the server keeps serving; calls without the shared token (compared in
constant time) get UNAUTHENTICATED; off loopback a server refuses to start without a token. Memory is
bounded: concurrent RPCs, message size (a Pi's budget) and tensor elements are capped before decoding.
"""

from __future__ import annotations

import hmac
import ipaddress
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
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one request or reply; a Raspberry Pi serves a few of these at once
MAX_CONCURRENT_RPCS = 32  # calls beyond this are refused (RESOURCE_EXHAUSTED) rather than queued in memory
MAX_TOKEN_ELEMENTS = 1 << 22  # values in one tensor of a request (16 MB of float32)
SESSION_KEY = "geomoe-session"  # metadata naming the caller's training session (its gradients and steps)


@dataclass
class TlsFiles:
    """PEM bytes for a TLS server (certificate chain and key) or a client (CA that signed the server)."""

    certificate: bytes | None = None
    private_key: bytes | None = None
    root_ca: bytes | None = None


class TokenAuth(grpc.ServerInterceptor):
    """Refuses every call whose `authorization` metadata is not `Bearer <token>` (health checks included)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

        def refuse(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token in 'authorization' metadata")

        self.refusal = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if not hmac.compare_digest(given, self.expected):  # constant time: the token is not guessed byte by byte
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
        key = (layer, tuple(tokens.shape[1:]), tokens.dtype)  # only requests whose tokens concatenate share a batch
        with self._lock:
            batch = self._open.get(key)
            leader = batch is None
            if leader:
                batch = self._open[key] = _ForwardBatch()
            index = len(batch.items)
            batch.items.append((ids, tokens))
        if leader:
            try:
                time.sleep(self.batch_window_s)
                with self._lock:
                    del self._open[key]
                batch.results = self._run_batch(layer, batch.items)
                self.batches_run += 1
                self.requests_served += len(batch.items)
            except BaseException as error:  # never leave followers waiting, whatever happened
                batch.results = [error] * len(batch.items)
                raise
            finally:
                batch.done.set()
        else:
            batch.done.wait()
        result = batch.results[index]
        if isinstance(result, BaseException):
            raise ValueError(str(result)) if not isinstance(result, ValueError) else result
        return result

    def _run_batch(self, layer: int, items: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        """Outputs per request; if the joint dispatch fails, each request runs alone and fails alone."""
        try:
            outputs = self.host.forward(layer, torch.cat([i for i, _ in items]), torch.cat([t for _, t in items]))
            return list(outputs.split([len(t) for _, t in items]))
        except Exception:  # noqa: BLE001 - one bad request must not fail the others
            results: list = []
            for ids, tokens in items:
                try:
                    results.append(self.host.forward(layer, ids, tokens))
                except Exception as single:  # noqa: BLE001 - reported to that caller only
                    results.append(single)
            return results

    def Forward(self, request, context):
        try:
            tokens = from_proto(request.tokens, max_elements=MAX_TOKEN_ELEMENTS)
            ids = torch.tensor(list(request.expert_ids), dtype=torch.long)
            self.host.check(request.layer, ids, tokens)  # before it joins a batch beside other callers' tokens
            outputs = self._batched_forward(request.layer, ids, tokens)
            return expert_pb2.ForwardReply(outputs=to_proto(outputs, request.reply_codec))
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def Backward(self, request, context):
        try:
            tokens = from_proto(request.tokens, max_elements=MAX_TOKEN_ELEMENTS)
            grad = from_proto(request.grad_outputs, max_elements=MAX_TOKEN_ELEMENTS)
            ids = torch.tensor(list(request.expert_ids), dtype=torch.long)
            grad_tokens = self.host.backward(
                request.layer, ids, tokens, grad, session=_session(context), caller=context.peer()
            )
            return expert_pb2.BackwardReply(grad_tokens=to_proto(grad_tokens))
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def Step(self, request, context):
        try:
            updated = self.host.step(request.lr, session=_session(context), caller=context.peer())
            return expert_pb2.StepReply(parameters_updated=updated)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def Describe(self, request, context):
        layers = [
            expert_pb2.LayerExperts(layer=layer, expert_ids=ids, dim=self.host.layers[layer].dim)
            for layer, ids in self.host.describe().items()
        ]
        return expert_pb2.DescribeReply(layers=layers, device=self.device)


def _session(context) -> str:
    """The caller's training session, as its client names it in metadata (kept apart per connection by the host)."""
    metadata = dict(context.invocation_metadata() or ())
    return str(metadata.get(SESSION_KEY, ""))[:64]


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS,
    ) -> None:
        host_part = address.rsplit(":", 1)[0]
        if token is None and not is_loopback(host_part):
            raise ValueError(f"an expert server on {address} (off loopback) needs a token: give --token-file")
        self.servicer = ExpertServicer(host, device, batch_window_s)
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        interceptors = [TokenAuth(token)] if token else []
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            options=options,
            interceptors=interceptors,
            maximum_concurrent_rpcs=max_concurrent_rpcs,
        )
        expert_pb2_grpc.add_ExpertServiceServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
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
