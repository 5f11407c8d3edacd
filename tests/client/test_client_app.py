"""Where a node's base model comes from (the message, its node state, or, virtual nodes only, the server's file),
and what a node accepts from a message: downloads bounded by its model, its image cache where it says."""

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from geomoe.client import client_app
from geomoe.data.images import ImageConfig
from geomoe.wire import messages as msg
from geomoe.wire.run_config import RunConfig


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


def test_a_device_caches_decoded_images_only_where_it_says_never_where_the_run_config_points():
    images = ImageConfig(cache="/etc/anywhere")
    assert client_app.device_images(images, {"data": "/data/labelled"}).cache is None  # decodes each time
    assert client_app.device_images(images, {"data": "/data/labelled", "cache": "/data/cache"}).cache == "/data/cache"
    assert client_app.device_images(images, {}).size == images.size  # everything else is the run's


def test_a_compressed_download_describing_a_trillion_values_is_refused_before_it_is_decoded(task_identity):
    cfg = RunConfig()
    content = RecordDict()
    msg.pack(content, msg.EXPERTS, {"moe.1.w1": torch.zeros(4, 8)}, "int8+zstd")
    codec = content[msg.EXPERTS + msg.CODEC]
    codec["tensors"] = json.dumps({"experts": {"moe.1.w1": [[10**6, 10**6], "float32"]}})
    with pytest.raises(ValueError, match="more than the"):
        client_app._received(Message(content, dst_node_id=7, message_type="train"), cfg)


def test_a_download_whose_npy_header_claims_more_than_it_holds_is_refused(task_identity):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    record = ArrayRecord({"moe.1.w1": Array(dtype="float32", shape=(10**12,), stype="numpy.ndarray",
                                            data=header.getvalue())})  # fmt: skip
    content = RecordDict({msg.EXPERTS: record})
    with pytest.raises(ValueError, match="more than"):
        client_app._received(Message(content, dst_node_id=7, message_type="train"), RunConfig())
