"""A model split across 2-3 expert servers computes what the same model computes on its own."""

import pytest
import torch
import torch.nn.functional as F

from geomoe.expert_parallel.remote import step_peers
from geomoe.model.moe_layer import EXPERT_PARAMS

from .conftest import LAYERS, full_model


def assert_float_close(actual, expected, name):
    """Equal up to float64 summation order: 1e-10 of the gradient's own scale, plus 1e-12.

    The check runs in float64 end to end (model, wire, experts): in float32 the summation-order error of
    a sum over many patches (a BatchNorm bias gradient) is not bounded by the gradient's own scale, and a
    float32 bound loose enough for every draw would also pass real mistakes."""
    assert actual.dtype == expected.dtype == torch.float64, name
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= 1e-10 * scale + 1e-12, f"{name}: max error {error:.2e} at scale {scale:.2e}"


SPLITS = {"two servers": [[0, 1], [2, 3], [4, 5]], "three servers": [[0], [1, 2], [3], [4, 5]]}


@pytest.mark.parametrize("shares", SPLITS.values(), ids=SPLITS.keys())
def test_outputs_and_every_gradient_match_the_local_model(cluster, shares):
    model = full_model().double()
    device, hosts, peers, _, dispatches = cluster(model, shares)
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = torch.arange(6)

    local_logits = model(images)
    F.cross_entropy(local_logits, labels).backward()
    split_logits = device(images)
    F.cross_entropy(split_logits, labels).backward()

    assert split_logits.dtype == torch.float64
    torch.testing.assert_close(split_logits, local_logits, rtol=1e-10, atol=1e-12)
    assert sum(d.sent_patches for d in dispatches.values()) > 0, "no token went to a peer: the test proves nothing"
    local = dict(model.named_parameters())
    for name, param in device.named_parameters():  # shared parameters and the device's own experts
        if name.endswith("absent_centroids"):  # router rows of the experts peers run
            module = device.get_submodule(name.rsplit(".", 1)[0])
            expected = local[name.replace("absent_centroids", "centroids")].grad[module.absent_ids]
        elif name.endswith(tuple(EXPERT_PARAMS)) and ".mlp." in name:
            module = device.get_submodule(name.rsplit(".", 1)[0])
            expected = local[name].grad[module.expert_ids]
        else:
            expected = local[name].grad
        assert_float_close(param.grad, expected, name)
    for host in hosts:  # the experts that ran on peers
        for layer in LAYERS:
            module = host.layers[layer]
            full = model.moe_layers()[layer]
            for param, grad in host.gradients(layer).items():
                if param == "centroids":
                    continue  # routing happens on the device; the server's centroid rows are unused
                expected = getattr(full, param).grad[module.expert_ids]
                grad = torch.zeros_like(expected) if grad is None else grad  # no token reached this server
                assert_float_close(grad, expected, f"{layer}.{param}")

    assert step_peers(peers, lr=0.1) > 0
    assert all(g is None for h in hosts for layer in LAYERS for g in h.gradients(layer).values())


def test_concurrent_forward_requests_are_batched(cluster):
    import threading

    model = full_model()
    _, hosts, peers, servers, _ = cluster(model, [[0], [1, 2, 3, 4, 5]])
    servers[0].servicer.batch_window_s = 0.2
    tokens = torch.randn(4, 4, 64)
    results = []

    def call():
        results.append(peers[0].forward_async(1, torch.tensor([1, 2, 3, 4]), tokens).result())

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert servers[0].servicer.requests_served == 3 and servers[0].servicer.batches_run == 1
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("codec,tolerance", [("fp16", 2e-2), ("int8", 1e-1)])
def test_compressed_token_transfer_is_close_and_smaller(cluster, codec, tolerance):
    model = full_model()
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    exact_device, _, exact_peers, _, _ = cluster(model, [[0, 1], [2, 3, 4, 5]])
    with torch.no_grad():
        exact = exact_device(images)
    device, _, peers, _, _ = cluster(model, [[0, 1], [2, 3, 4, 5]], codec=codec)
    with torch.no_grad():
        approx = device(images)
    assert (approx - exact).abs().max() < tolerance * exact.abs().max()
    assert peers[0].stats.bytes_sent < 0.7 * exact_peers[0].stats.bytes_sent
