"""The byte accounting measures what Flower serialises, and the codec round-trips through records."""

import torch
from flwr.app import ConfigRecord, RecordDict

from geomoe.wire import messages as msg


def test_accounting_matches_the_array_bytes_it_contains():
    experts = {"moe.1.w1": torch.zeros(4, 64, 2), "moe.1.centroids": torch.ones(4, 64), "moe.1.ids": torch.arange(4)}
    head = {"head.fc.weight": torch.full((3, 256), 2.0), "head.fc.bias": torch.zeros(3), "head.ids": torch.arange(3)}
    content = RecordDict({msg.CONFIG: ConfigRecord({"round": 1})})
    msg.pack(content, msg.EXPERTS, experts)
    msg.pack(content, msg.HEAD, head)
    traffic = msg.content_traffic(content)
    payload = {
        k: sum(v.numel() * v.element_size() for n, v in t.items() if msg.key_category(n) == k)
        for k, t in (("experts", experts), ("router", experts), ("head", head))
    }
    for category, size in payload.items():
        assert size <= traffic[category] <= size + 400 * 3, category  # array bytes plus per-array framing
    assert traffic["total"] >= sum(payload.values())
    assert traffic["total"] <= sum(v for k, v in traffic.items() if k != "total")


def test_compressed_records_measure_fewer_bytes_and_unpack():
    tensors = {"moe.1.w1": torch.randn(16, 96, 2), "moe.1.ids": torch.arange(16)}
    plain, packed = RecordDict(), RecordDict()
    msg.pack(plain, msg.UPDATE, tensors)
    msg.pack(packed, msg.UPDATE, tensors, "int8+zstd")
    assert msg.content_traffic(packed)["total"] < 0.4 * msg.content_traffic(plain)["total"]
    back = msg.unpack(packed, msg.UPDATE, 1 << 30)
    assert torch.equal(back["moe.1.ids"], tensors["moe.1.ids"])
    assert (back["moe.1.w1"] - tensors["moe.1.w1"]).abs().max() < 0.05


def test_byte_counts_are_what_flower_deflates():
    """Tripwire for a Flower upgrade: the private serialisation API the accounting uses must still give the
    bytes of the deflated objects, each identical chunk once."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    one = np.arange(1000, dtype=np.float32)
    record = ArrayRecord({"a": Array(one)})
    alone = msg.serialised_bytes(record)
    assert one.nbytes < alone < one.nbytes + 1000
    twice = ArrayRecord({"a": Array(one), "b": Array(one.copy())})
    assert msg.serialised_bytes(twice) < alone + one.nbytes  # the identical chunk is sent once
