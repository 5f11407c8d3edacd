import pytest
import torch

from geomoe.client.task import Received, build_model, locate
from geomoe.model.experts import global_centroids, shared_state, take_expert_state
from geomoe.model.network import GeoMoENet
from geomoe.wire.run_config import RunConfig
from geomoe.world.world import World


@pytest.fixture(scope="module")
def cells():
    return [location.cell for location in World(RunConfig().world).locations]


def test_a_node_finds_its_location_by_partition_or_coordinates(cells):
    from geomoe.data.cells import centre

    assert locate(cells, {"partition-id": 2, "num-partitions": 6}) == 2
    lat, lon = centre(cells[1])
    assert locate(cells, {"lat": lat, "lon": lon}) == 1
    assert locate(["cluster-4", *cells], {"lat": lat, "lon": lon}) == 2  # client ids that are no S2 cell are passed


@pytest.mark.parametrize(
    "node_config,message",
    [
        ({"partition-id": 9}, "partition-id 9 has no location"),
        ({"lat": 1.0}, "needs 'lat' and 'lon'"),
        ({"lat": 89.0, "lon": 10.0}, "lies in none of the run's cells"),
    ],
)
def test_a_node_outside_the_run_is_told_why(cells, node_config, message):
    with pytest.raises(ValueError, match=message):
        locate(cells, node_config)


def test_the_compact_model_holds_only_what_was_sent():
    cfg = RunConfig()
    full = GeoMoENet(cfg.model).eval()
    keep = {layer: [1, 4] for layer in cfg.model.moe_layers}
    router = {
        f"moe.{layer}.absent_centroids": global_centroids(m)[[i for i in range(16) if i not in (1, 4)]]
        for layer, m in full.moe_layers().items()
    }
    compact = build_model(cfg.model, shared_state(full), Received(take_expert_state(full, keep), router, {}, {})).eval()
    assert all(m.expert_ids.tolist() == [1, 4] for m in compact.moe_layers().values())
    assert compact(torch.rand(2, 3, 64, 64)).shape == (2, cfg.model.num_classes)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in full.parameters())
    with pytest.raises(ValueError, match="base state does not fit"):
        build_model(cfg.model, {"bogus": torch.zeros(1)}, Received(take_expert_state(full, keep), router, {}, {}))


def an_update():
    return {"moe.1.w1": torch.full((2, 4, 2), 1.0), "moe.1.ids": torch.tensor([0, 3]), "head.fc.bias": torch.ones(3)}


def test_a_dp_node_clips_its_whole_update_and_votes_whether_it_fitted():
    from geomoe.client.task import privatise
    from geomoe.wire.privacy import PrivacyConfig, update_norm

    clipped, fitted = privatise(PrivacyConfig(clip_norm=0.5), an_update(), 0.5)
    assert update_norm(clipped) == pytest.approx(0.5) and fitted == 0.0
    assert clipped["moe.1.ids"].tolist() == [0, 3]
    small, fitted = privatise(PrivacyConfig(clip_norm=100.0), an_update(), 100.0)
    assert torch.equal(small["moe.1.w1"], an_update()["moe.1.w1"]) and fitted == 1.0


def test_local_noise_is_added_on_the_device_at_z_times_c():
    from geomoe.client.task import privatise
    from geomoe.wire.privacy import PrivacyConfig

    big = {"w": torch.zeros(20000)}
    noised, _ = privatise(PrivacyConfig(clip_norm=2.0, noise_multiplier=1.5, noise="local"), big, 2.0)
    assert float(noised["w"].std()) == pytest.approx(3.0, rel=0.05)
    again, _ = privatise(PrivacyConfig(clip_norm=2.0, noise_multiplier=1.5, noise="local"), big, 2.0)
    assert not torch.equal(noised["w"], again["w"])  # a fresh secret seed each time, not the run's seed


def test_compression_sees_the_clipped_update_and_keeps_the_residual_on_the_device():
    """int8+zstd of the clipped update: what arrives is within quantisation of norm C, and the error feedback
    residual (which never leaves the node) is what quantisation dropped from the clipped update."""
    from flwr.app import RecordDict

    from geomoe.client.task import privatise
    from geomoe.wire import messages as msg
    from geomoe.wire.compression import ErrorFeedback
    from geomoe.wire.privacy import PrivacyConfig, update_norm

    torch.manual_seed(0)
    update = {"moe.1.w1": torch.randn(2, 64, 8) * 10, "moe.1.ids": torch.tensor([0, 3])}
    clipped, _ = privatise(PrivacyConfig(clip_norm=1.0), update, 1.0)
    content, feedback = RecordDict(), ErrorFeedback()
    msg.pack(content, msg.UPDATE, clipped, "int8+zstd", feedback)
    arrived = msg.unpack(content, msg.UPDATE, 1 << 30)
    assert update_norm(arrived) == pytest.approx(1.0, rel=0.02)
    torch.testing.assert_close(feedback.residuals["moe.1.w1"], clipped["moe.1.w1"] - arrived["moe.1.w1"])
    assert msg.UPDATE + "-residual" not in content and set(content) == {msg.UPDATE, msg.UPDATE + msg.CODEC}


def test_location_projections_carry_over_from_round_to_round():
    """Round 2 starts from round 1's trained projections: its result differs from a fresh start, and it is
    exactly round 1's end plus round 2's training (same seed, same data)."""
    from geomoe.client.data import LocalData
    from geomoe.client.task import location_supervision, train_and_delta
    from geomoe.wire.run_config import build_run_config

    cfg = build_run_config(
        None, {}, ["world.synthetic.num_observations=600", "world.num_locations=2", "model.num_experts=4",
                   "train.location_weight=0.5", "train.batch_size=16"],
    )  # fmt: skip
    world = World(cfg.world)
    loc = world.locations[0]
    local = LocalData(world.data, loc.train[:32], loc.val, loc.test, loc.lat, loc.lon, cfg.world.images, "cell")
    torch.manual_seed(0)
    full = GeoMoENet(cfg.model)
    keep = {layer: [0, 1] for layer in cfg.model.moe_layers}
    router = {f"moe.{layer}.absent_centroids": global_centroids(m)[[2, 3]] for layer, m in full.moe_layers().items()}

    def train_round(server_round, projections):
        received = Received(take_expert_state(full, keep), router, {}, {})
        model = build_model(cfg.model, shared_state(full), received)
        return train_and_delta(cfg, model, received, local, server_round, 0, projections)[3]

    fresh = location_supervision(full, cfg.seed, None).state_dict()
    after_round_1 = train_round(1, None)
    after_round_2 = train_round(2, after_round_1)
    changed = [k for k in fresh if not torch.equal(fresh[k], after_round_1[k])]
    assert changed and all(k.startswith(("projections.", "norm.")) for k in changed)  # the encoder stays frozen
    assert any(not torch.equal(after_round_2[k], after_round_1[k]) for k in changed)
    for key, value in train_round(2, after_round_1).items():
        torch.testing.assert_close(value, after_round_2[key], rtol=0, atol=0)
    from_scratch = train_round(2, None)
    assert any(not torch.equal(from_scratch[k], after_round_2[k]) for k in changed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_node_trains_on_its_gpu_and_sends_cpu_deltas_like_the_cpu_ones():
    """Same tensors, on the CPU, of the CPU's size (not equal: the location projections' dropout draws other masks
    on the GPU; exactness on CUDA is tested in tests/model/test_compute.py)."""
    from geomoe.client.data import LocalData
    from geomoe.client.task import train_and_delta
    from geomoe.wire.run_config import build_run_config

    settings = ["world.synthetic.num_observations=600", "world.num_locations=2", "model.num_experts=4",
                "train.location_weight=0.5", "train.batch_size=16"]  # fmt: skip
    world = World(build_run_config(None, {}, settings).world)
    loc = world.locations[0]
    torch.manual_seed(0)
    full = GeoMoENet(build_run_config(None, {}, settings).model)
    keep = {layer: [0, 1] for layer in full.cfg.moe_layers}
    router = {f"moe.{layer}.absent_centroids": global_centroids(m)[[2, 3]] for layer, m in full.moe_layers().items()}

    def deltas_on(device: str) -> dict[str, torch.Tensor]:
        cfg = build_run_config(None, {}, [*settings, f'train.device="{device}"'])
        local = LocalData(world.data, loc.train[:32], loc.val, loc.test, loc.lat, loc.lon, cfg.world.images, "c")
        received = Received(take_expert_state(full, keep), router, {}, {})
        model = build_model(cfg.model, shared_state(full), received)
        return train_and_delta(cfg, model, received, local, 1, 0)[0]

    on_cpu, on_gpu = deltas_on("cpu"), deltas_on("cuda")
    assert set(on_gpu) == set(on_cpu)
    for name, delta in on_cpu.items():
        assert on_gpu[name].device.type == "cpu" and on_gpu[name].shape == delta.shape, name
        if delta.is_floating_point() and delta.norm() > 0:
            assert 0.5 < float(on_gpu[name].norm() / delta.norm()) < 2, name
