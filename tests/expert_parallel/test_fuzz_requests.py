"""Fuzzing the expert server: Forward, Backward and Step requests generated from expert.proto's fields, sent to a
real server on 127.0.0.1. Whatever arrives, the server answers with a status that names the caller's mistake (never
UNKNOWN or INTERNAL), keeps serving, and its experts stay finite."""

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from geomoe.expert_parallel.host import ExpertHost
from geomoe.expert_parallel.service import SESSION_KEY, background_server
from geomoe.protos import expert_pb2, expert_pb2_grpc

from .conftest import full_model, split

pytestmark = [pytest.mark.fuzz, pytest.mark.integration]
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def server():
    host = ExpertHost(split(full_model(), [[0], [1, 2, 3, 4, 5]])[1][0])
    with background_server(host, batch_window_s=0.002) as running, grpc.insecure_channel(running.address) as channel:
        yield expert_pb2_grpc.ExpertServiceStub(channel), host


@st.composite
def tensors(draw):
    """A Tensor message: sometimes honest (bytes matching dtype and shape), sometimes not in any field."""
    dtype = draw(st.sampled_from(["float32", "float64", "float16", "int8", "float128", "", "object"]))
    shape = draw(st.lists(st.integers(-2, 70), max_size=4))
    honest = draw(st.booleans())
    if honest and dtype in ("float32", "float64", "float16", "int8") and all(d >= 0 for d in shape):
        scale = draw(st.sampled_from([0.0, 1.0, 1e4, 3e38, float("inf"), float("nan")]))
        values = np.full(shape, scale).astype(dtype)
        data = values.tobytes()
    else:
        data = draw(st.binary(max_size=2048))
    codec = draw(st.sampled_from(["", "fp16", "int8", "zstd"]))
    scale = draw(st.floats(allow_nan=True, allow_infinity=True))
    return expert_pb2.Tensor(data=data, dtype=dtype, shape=shape, codec=codec, scale=scale)


requests = st.one_of(
    st.builds(
        lambda layer, ids, tokens, codec: ("Forward", expert_pb2.ForwardRequest(
            layer=layer, expert_ids=ids, tokens=tokens, reply_codec=codec)),
        st.sampled_from([1, 3, 0, -1, 2**31 - 1]), st.lists(st.integers(-1, 7), max_size=6), tensors(),
        st.sampled_from(["", "fp16", "int8", "bogus"]),
    ),
    st.builds(
        lambda layer, ids, tokens, grads: ("Backward", expert_pb2.BackwardRequest(
            layer=layer, expert_ids=ids, tokens=tokens, grad_outputs=grads)),
        st.sampled_from([1, 3, 9]), st.lists(st.integers(-1, 7), max_size=6), tensors(), tensors(),
    ),
    st.builds(lambda lr: ("Step", expert_pb2.StepRequest(lr=lr)), st.floats(allow_nan=True, allow_infinity=True)),
)  # fmt: skip


@given(
    calls=st.lists(requests, min_size=1, max_size=5),
    session=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
)
def test_no_request_breaks_the_server_or_its_experts(server, calls, session):
    stub, host = server
    metadata = ((SESSION_KEY, session),)
    for method, request in calls:
        try:
            getattr(stub, method)(request, timeout=10, metadata=metadata)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
        assert code in ACCEPTABLE, (method, code)
    assert all(torch.isfinite(p).all() for p in host.model.parameters())
    honest = expert_pb2.ForwardRequest(
        layer=1, expert_ids=[1, 2], tokens=expert_pb2.Tensor(data=np.ones((2, 4, 64), np.float32).tobytes(),
                                                             dtype="float32", shape=[2, 4, 64]),
    )  # fmt: skip
    reply = stub.Forward(honest, timeout=10)
    assert np.isfinite(np.frombuffer(reply.outputs.data, np.float32)).all()
