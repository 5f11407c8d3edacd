"""The expert server's trust boundary against real servers on 127.0.0.1: one test per hole, then a soak test of
8 peers sending good and malformed requests at once."""

import hmac
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from geomoe.expert_parallel.host import MAX_STEP_NORM, ExpertHost
from geomoe.expert_parallel.remote import PeerClient, PeerError
from geomoe.expert_parallel.service import MAX_MESSAGE_BYTES, SESSION_KEY, ExpertServer, background_server
from geomoe.expert_parallel.tensors import from_proto, to_proto
from geomoe.model.moe_layer import EXPERT_PARAMS
from geomoe.protos import expert_pb2, expert_pb2_grpc

from .conftest import full_model, split

SERVED = [1, 2, 3, 4, 5]


@pytest.fixture
def served():
    """A server holding experts 1..5 of every layer (batch window 0.2 s, so concurrent calls meet) and its host."""
    _, [model] = split(full_model(), [[0], SERVED])
    host = ExpertHost(model)
    with background_server(host, batch_window_s=0.2) as server:
        yield server, host


def forward(address: str, tokens: torch.Tensor, ids=(1, 2, 3), timeout: float = 10.0):
    peer = PeerClient(address, deadline_s=timeout)
    try:
        return peer.forward_async(1, torch.tensor(list(ids)), tokens).result()
    finally:
        peer.close()


def healthy(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_requests_with_different_patch_counts_in_one_window_both_succeed(served):
    """Today's batching concatenates them, fails, and leaves the follower waiting forever."""
    server, _ = served
    with ThreadPoolExecutor(4) as pool:
        four = pool.submit(forward, server.address, torch.randn(3, 4, 64))
        time.sleep(0.02)
        two = pool.submit(forward, server.address, torch.randn(3, 2, 64))
        assert four.result(timeout=10).shape == (3, 4, 64)
        assert two.result(timeout=10).shape == (3, 2, 64)
    assert healthy(server.address)


def test_a_request_that_fails_unexpectedly_fails_alone_and_releases_the_batch(served, monkeypatch):
    server, host = served
    real = host.forward

    def flaky(layer, ids, tokens):
        if (tokens == 7.0).any():
            raise RuntimeError("expert kernel crashed")
        return real(layer, ids, tokens)

    monkeypatch.setattr(host, "forward", flaky)
    with ThreadPoolExecutor(4) as pool:
        bad = pool.submit(forward, server.address, torch.full((3, 4, 64), 7.0))
        good = [pool.submit(forward, server.address, torch.randn(3, 4, 64)) for _ in range(3)]
        with pytest.raises(PeerError, match="expert kernel crashed"):
            bad.result(timeout=10)
        assert all(f.result(timeout=10).shape == (3, 4, 64) for f in good)


def test_off_loopback_a_server_refuses_to_start_without_a_token():
    host = ExpertHost(split(full_model(), [[0], SERVED])[1][0])
    with pytest.raises(ValueError, match="off loopback\\) needs a token"):
        ExpertServer(host, address="0.0.0.0:0")
    ExpertServer(host, address="0.0.0.0:0", token="t").stop()  # with one it binds
    ExpertServer(host, address="[::1]:0").stop()  # loopback needs none


def test_tokens_are_compared_in_constant_time(monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    host = ExpertHost(split(full_model(), [[0], SERVED])[1][0])
    with background_server(host, token="s3cret") as server, pytest.raises(PeerError, match="UNAUTHENTICATED"):
        PeerClient(server.address, token="guess").describe()
    assert compared


@pytest.mark.parametrize("lr", [1e9, float("nan"), float("inf"), -0.5])
def test_a_step_with_an_unbounded_learning_rate_is_refused(served, lr):
    server, host = served
    peer = PeerClient(server.address)
    tokens = torch.randn(3, 4, 64)
    peer.backward(1, torch.tensor([1, 2, 3]), tokens, torch.ones_like(tokens))
    before = host.layers[1].w1.detach().clone()
    with pytest.raises(PeerError, match="INVALID_ARGUMENT"):
        peer.step(lr)
    assert torch.equal(host.layers[1].w1.detach(), before)
    peer.close()


def test_two_callers_steps_do_not_mix(served):
    server, host = served
    first, second = PeerClient(server.address), PeerClient(server.address)
    tokens = torch.randn(3, 4, 64)
    first.backward(1, torch.tensor([1, 1, 1]), tokens, torch.ones_like(tokens))  # gradients on expert 1 only
    second.backward(1, torch.tensor([2, 2, 2]), tokens, torch.ones_like(tokens))  # on expert 2 only
    before = host.layers[1].w1.detach().clone()
    assert first.step(0.1) > 0
    after = host.layers[1].w1.detach()
    assert not torch.equal(after[0], before[0])  # expert 1 (row 0) moved by the first caller's step
    assert torch.equal(after[1], before[1])  # expert 2 waits for its own caller's step
    assert second.step(0.1) > 0 and not torch.equal(host.layers[1].w1.detach()[1], before[1])
    first.close(), second.close()


def test_calls_beyond_the_concurrency_cap_are_refused_not_queued():
    host = ExpertHost(split(full_model(), [[0], SERVED])[1][0])
    with background_server(host, batch_window_s=0.5, max_concurrent_rpcs=1) as server, ThreadPoolExecutor(2) as pool:
        slow = pool.submit(forward, server.address, torch.randn(3, 4, 64))
        time.sleep(0.1)
        with pytest.raises(PeerError, match="RESOURCE_EXHAUSTED"):
            forward(server.address, torch.randn(3, 4, 64))
        assert slow.result(timeout=10).shape == (3, 4, 64)


def test_a_message_over_the_cap_is_refused_before_it_is_decoded(served):
    server, _ = served
    peer = PeerClient(server.address)
    request = expert_pb2.ForwardRequest(
        layer=1, expert_ids=[1], tokens=expert_pb2.Tensor(data=bytes(MAX_MESSAGE_BYTES + 1), dtype="float32")
    )
    with pytest.raises(grpc.RpcError) as error:
        peer.stub.Forward(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    peer.close()


def test_a_peer_answering_the_wrong_shape_is_a_peer_fault(served, monkeypatch):
    server, host = served
    monkeypatch.setattr(host, "forward", lambda layer, ids, tokens: tokens[:1])
    with pytest.raises(PeerError, match="answered shape \\(1, 4, 64\\) for tokens \\(3, 4, 64\\)"):
        forward(server.address, torch.randn(3, 4, 64))


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


MALFORMED = [
    {"layer": 2},  # not an MoE layer
    {"expert_ids": [0, 0, 0]},  # experts it does not serve
    {"tokens": to_proto(torch.zeros(3, 4, 32))},  # wrong width
    {"tokens": to_proto(torch.full((3, 4, 64), float("nan")))},  # NaN
    {"tokens": expert_pb2.Tensor(data=b"12", dtype="float32", shape=[10**6, 4, 64])},  # lies about its size
]


@pytest.mark.integration
def test_soak_eight_peers_good_and_malformed_for_a_bounded_time(served):
    server, _ = served
    server.servicer.batch_window_s = 0.005
    stop_at = time.monotonic() + 8.0
    failures: list[str] = []
    good_done = [0]
    lock = threading.Lock()

    def peer_loop(seed: int) -> None:
        rng = random.Random(seed)
        peer = PeerClient(server.address, deadline_s=10)
        while time.monotonic() < stop_at:
            if rng.random() < 0.5:
                tokens = torch.randn(3, rng.choice([2, 4]), 64)  # two patch counts meet in the batching windows
                try:
                    out = peer.forward_async(1, torch.tensor([1, 2, 3]), tokens).result()
                    assert out.shape == tokens.shape
                    peer.backward(1, torch.tensor([1, 2, 3]), tokens, torch.ones_like(tokens))
                    peer.step(0.0)
                    with lock:
                        good_done[0] += 1
                except Exception as error:  # noqa: BLE001 - collected and asserted below
                    failures.append(repr(error))
            else:
                fields = {"layer": 1, "expert_ids": [1, 2, 3], "tokens": to_proto(torch.zeros(3, 4, 64))}
                fields |= rng.choice(MALFORMED)
                try:
                    peer.stub.Forward(expert_pb2.ForwardRequest(**fields), timeout=10)
                    failures.append(f"malformed request accepted: {fields.get('layer')}")
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        failures.append(f"malformed request got {error.code()}")
        peer.close()

    start_rss = rss_mb()
    threads = [threading.Thread(target=peer_loop, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a peer hung"
    assert not failures, failures[:5]
    assert good_done[0] > 50
    assert rss_mb() - start_rss < 300  # bounded: no per-request growth
    assert healthy(server.address)
    assert forward(server.address, torch.randn(3, 4, 64)).shape == (3, 4, 64)


# --- a token holder attacking the served experts or other callers (issue 33) ----------------------------------------


def raw_call(address: str, method: str, request, session: str = "attacker"):
    """One call on its own connection, as a hostile token holder would make it (no client-side checks)."""
    with grpc.insecure_channel(address) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        return getattr(stub, method)(request, timeout=10, metadata=((SESSION_KEY, session),))


def test_gradients_that_overflow_are_refused_and_the_served_experts_stay_finite(served):
    server, host = served
    tokens = torch.randn(3, 4, 64)
    request = expert_pb2.BackwardRequest(layer=1, expert_ids=[1, 2, 3], tokens=to_proto(tokens),
                                         grad_outputs=to_proto(torch.full_like(tokens, 3e38)))  # fmt: skip
    with pytest.raises(grpc.RpcError) as error:
        raw_call(server.address, "Backward", request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not finite" in error.value.details()
    raw_call(server.address, "Step", expert_pb2.StepRequest(lr=1.0))
    assert all(torch.isfinite(p).all() for p in host.model.parameters())
    assert torch.isfinite(forward(server.address, tokens)).all()


def test_a_step_is_capped_in_norm_and_one_that_would_leave_experts_non_finite_is_undone():
    host = ExpertHost(split(full_model(), [[0], SERVED])[1][0])
    tokens = torch.randn(3, 4, 64)
    host.backward(1, torch.tensor([1, 2, 3]), tokens, torch.full_like(tokens, 1e6), session="s", caller="c")
    before = {name: getattr(host.layers[1], name).detach().clone() for name in EXPERT_PARAMS}
    host.step(1.0, session="s", caller="c")
    moved = math.sqrt(sum(float((getattr(host.layers[1], n).detach() - before[n]).double().pow(2).sum())
                          for n in EXPERT_PARAMS))  # fmt: skip
    assert 0 < moved <= MAX_STEP_NORM * (1 + 1e-5)
    host.backward(1, torch.tensor([1]), tokens[:1], torch.ones_like(tokens[:1]), session="s", caller="c")
    host.callers["c"]["s"][(1, "w1")][0, 0, 0] = math.nan  # what no backward keeps: the last line of defence
    kept = host.layers[1].w1.detach().clone()
    with pytest.raises(ValueError, match="refused and undone"):
        host.step(1.0, session="s", caller="c")
    assert torch.equal(host.layers[1].w1.detach(), kept)


def test_ids_that_do_not_match_their_tokens_never_join_a_victims_batch(served):
    server, host = served
    tokens = torch.randn(3, 4, 64)
    expected = host.forward(1, torch.tensor([1, 2, 3]), tokens)
    crafted = [
        expert_pb2.ForwardRequest(layer=1, expert_ids=[1, 2], tokens=to_proto(torch.randn(1, 4, 64))),
        expert_pb2.ForwardRequest(layer=1, expert_ids=[], tokens=to_proto(torch.randn(1, 4, 64))),
    ]
    with ThreadPoolExecutor(3) as pool:
        victim = pool.submit(forward, server.address, tokens)
        attacks = [pool.submit(raw_call, server.address, "Forward", request) for request in crafted]
        for attack in attacks:
            with pytest.raises(grpc.RpcError) as error:
                attack.result(timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expert ids for" in error.value.details()
        assert torch.allclose(victim.result(timeout=10), expected, atol=1e-6)


def test_another_caller_opening_many_sessions_cannot_evict_a_callers_gradients(served):
    server, host = served
    victim = PeerClient(server.address)
    tokens = torch.randn(3, 4, 64)
    victim.backward(1, torch.tensor([1, 1, 1]), tokens, torch.ones_like(tokens))
    with grpc.insecure_channel(server.address) as channel:  # one connection, many fresh session names
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        request = expert_pb2.BackwardRequest(layer=1, expert_ids=[2, 2, 2], tokens=to_proto(tokens),
                                             grad_outputs=to_proto(torch.ones_like(tokens)))  # fmt: skip
        for index in range(16):
            stub.Backward(request, timeout=10, metadata=((SESSION_KEY, f"fresh-{index}"),))
    before = host.layers[1].w1.detach().clone()
    assert victim.step(0.1) > 0
    assert not torch.equal(host.layers[1].w1.detach()[0], before[0])  # expert 1 moved: its gradients were kept
    victim.close()


def test_a_scalar_int8_tensor_decodes_to_a_tensor_not_a_crash():
    """Found by the fuzzer: a 0-d int8 tensor came out of the scale as a numpy scalar, and the server answered
    UNKNOWN."""
    message = expert_pb2.Tensor(data=np.int8(5).tobytes(), dtype="int8", shape=[], codec="int8", scale=0.5)
    assert from_proto(message).item() == 2.5
