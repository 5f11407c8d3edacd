"""Where a node's base model comes from: the message, its node state, or (virtual nodes only) the server's file."""

import hashlib
import io

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from geomoe.client import client_app
from geomoe.wire import messages as msg


@pytest.fixture
def base_file(tmp_path):
    base = {"backbone.w": torch.arange(6.0).reshape(2, 3)}
    buffer = io.BytesIO()
    torch.save(base, buffer)
    path = tmp_path / "base.pt"
    path.write_bytes(buffer.getvalue())
    return base, path, hashlib.sha256(buffer.getvalue()).hexdigest()


def empty(node_id: int = 7) -> Message:
    return Message(RecordDict(), dst_node_id=node_id, message_type="train")


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_a_virtual_node_reads_the_servers_base_file_once_per_process(base_file, task_identity):
    base, path, sha = base_file
    world = {"base_file": path, "base_sha256": sha}
    node = context({"partition-id": 0})
    assert client_app.file_base(node, world) is not None
    first = client_app._base(empty(), node, world)
    torch.testing.assert_close(first["backbone.w"], base["backbone.w"])
    other = context({"partition-id": 1})
    assert client_app.shared_base(path, sha) is first  # every virtual node of this process shares the copy
    assert client_app._base(empty(8), other, world) is first
    assert msg.BASE not in node.state  # nothing per node


def test_a_device_or_another_file_does_not_use_the_servers_base(base_file, task_identity):
    _, path, sha = base_file
    assert client_app.file_base(context({"lat": 1.0, "lon": 2.0}), {"base_file": path, "base_sha256": sha}) is None
    other = {"base_file": path, "base_sha256": "0" * 64}
    assert client_app.file_base(context({"partition-id": 0}), other) is None
    missing = {"base_file": path.with_name("gone.pt"), "base_sha256": "1" * 64}
    with pytest.raises(RuntimeError, match="no base model"):
        client_app._base(empty(), context({"partition-id": 0}), missing)
