"""Deadlines, failover, auth, TLS, health and malformed tensors against real servers on 127.0.0.1."""

import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from geomoe.deploy.certs import issue, make_ca
from geomoe.expert_parallel.host import ExpertHost
from geomoe.expert_parallel.remote import PeerClient, PeerError, attach_peers
from geomoe.expert_parallel.service import ExpertServer, TlsFiles, background_server
from geomoe.expert_parallel.tensors import to_proto
from geomoe.protos import expert_pb2

from .conftest import full_model, split


def test_a_call_without_the_token_is_refused(cluster):
    _, _, _, servers, _ = cluster(full_model(), [[0], [1, 2, 3, 4, 5]], token="s3cret")
    anonymous = PeerClient(servers[0].address)
    with pytest.raises(PeerError, match="UNAUTHENTICATED"):
        anonymous.describe()
    wrong = PeerClient(servers[0].address, token="guess")
    with pytest.raises(PeerError, match="UNAUTHENTICATED"):
        wrong.describe()
    assert PeerClient(servers[0].address, token="s3cret").describe()[1] == [1, 2, 3, 4, 5]


def test_health_service_reports_serving(cluster):
    _, _, _, servers, _ = cluster(full_model(), [[0], [1, 2, 3, 4, 5]])
    with grpc.insecure_channel(servers[0].address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="geomoe.expert.v1.ExpertService"), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "request_fields,reason",
    [
        ({"layer": 2}, "not an MoE layer"),
        ({"expert_ids": [0, 0, 0]}, "experts \\[0\\] of layer 1 are not served"),
        ({"expert_ids": [1, 2]}, "2 expert ids for 3 tokens"),
        ({"tokens": expert_pb2.Tensor(data=b"123", dtype="float32", shape=[3, 4, 64])}, "needs 3072 bytes"),
        ({"tokens": expert_pb2.Tensor(data=b"", dtype="complex64", shape=[0])}, "dtype 'complex64'"),
        ({"tokens": to_proto(torch.zeros(3, 4, 32))}, "width 64"),
    ],
)
def test_malformed_requests_get_a_clear_status_and_the_server_keeps_serving(cluster, request_fields, reason):
    _, _, peers, _, _ = cluster(full_model(), [[0], [1, 2, 3, 4, 5]])
    fields = {"layer": 1, "expert_ids": [1, 2, 3], "tokens": to_proto(torch.zeros(3, 4, 64)), **request_fields}
    with pytest.raises(grpc.RpcError) as error:
        peers[0].stub.Forward(expert_pb2.ForwardRequest(**fields), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason.replace("\\", "") in error.value.details()
    good = peers[0].forward_async(1, torch.tensor([1, 2, 3]), torch.zeros(3, 4, 64)).result()
    assert good.shape == (3, 4, 64)


def test_a_killed_server_means_fallback_and_a_restarted_one_is_used_again():
    model = full_model()
    device, (server_model,) = split(model, [[0, 1, 2], [3, 4, 5]])
    host = ExpertHost(server_model)
    server = ExpertServer(host)
    address = server.start()
    peer = PeerClient(address, deadline_s=2.0, backoff_s=0.2)
    dispatches = attach_peers(device, [peer])
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(device(images), expected, rtol=1e-4, atol=1e-5)
        sent = sum(d.sent_patches for d in dispatches.values())
        assert sent > 0

        server.stop(grace_s=0)
        degraded = device(images)  # the device keeps going, with the fallback policy
        fallback = sum(d.fallback_patches for d in dispatches.values())
        assert fallback > 0 and not peer.healthy
        assert degraded.shape == expected.shape and torch.isfinite(degraded).all()

        restarted = ExpertServer(host, address=address)
        restarted.start()
        try:
            deadline = time.monotonic() + 15  # the peer's backoff and gRPC's reconnect delay both pass
            while time.monotonic() < deadline:
                recovered = device(images)
                if peer.healthy and torch.allclose(recovered, expected, rtol=1e-4, atol=1e-5):
                    break
                time.sleep(0.3)
            torch.testing.assert_close(recovered, expected, rtol=1e-4, atol=1e-5)
            assert sum(d.sent_patches for d in dispatches.values()) > sent
        finally:
            restarted.stop()


def test_tls_with_the_fleet_ca(tmp_path):
    ca = make_ca()
    server_cert = issue(ca, "expert-server", ["127.0.0.1", "localhost"])
    model = full_model()
    _, (server_model,) = split(model, [[0], [1, 2, 3, 4, 5]])
    tls = TlsFiles(certificate=server_cert.certificate, private_key=server_cert.private_key)
    with background_server(ExpertHost(server_model), tls=tls, token="t") as server:
        trusted = PeerClient(server.address, token="t", tls=TlsFiles(root_ca=ca.certificate))
        assert trusted.describe()[1] == [1, 2, 3, 4, 5]
        stranger_ca = make_ca("someone else")
        untrusted = PeerClient(server.address, token="t", tls=TlsFiles(root_ca=stranger_ca.certificate), deadline_s=2)
        with pytest.raises(PeerError):
            untrusted.describe()
        plaintext = PeerClient(server.address, token="t", deadline_s=2)
        with pytest.raises(PeerError):
            plaintext.describe()


def test_every_call_has_a_deadline(cluster):
    _, _, peers, servers, _ = cluster(full_model(), [[0], [1, 2, 3, 4, 5]], deadline_s=0.3)
    servers[0].servicer.batch_window_s = 1.0  # the server now answers later than the deadline
    with pytest.raises(PeerError, match="DEADLINE_EXCEEDED"):
        peers[0].forward_async(1, torch.tensor([1]), torch.zeros(1, 4, 64)).result()
    assert not peers[0].healthy
