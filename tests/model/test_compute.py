"""Where training and evaluation compute: the device a run names, bf16 autocast, CPU memory kept for reuse between
steps, and (where a GPU exists) CUDA giving what the CPU gives, with models and deltas back on the CPU."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from geomoe.model import compute
from geomoe.model.compute import on_device, resolve_device, to_device
from geomoe.model.config import ModelConfig
from geomoe.model.conversion import ConversionConfig, collect_patches, convert_to_moe
from geomoe.model.network import GeoMoENet
from geomoe.model.training import TrainConfig, batch_loss, evaluate, train_epochs
from geomoe.wire.run_config import build_run_config

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_model() -> GeoMoENet:
    """Without dropout: the CPU and CUDA generators draw different masks from one seed."""
    torch.manual_seed(0)
    model = GeoMoENet(ModelConfig(num_classes=4, moe_layers=(1, 3), num_experts=4))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.fixture
def exact_fp32():
    """CUDA convolutions in true fp32 (cuDNN's default TF32 keeps 10 mantissa bits), to compare with the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def batches(count: int = 3, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.rand(size, 3, 64, 64, generator=generator), torch.randint(0, 4, (size,), generator=generator))
            for _ in range(count)]  # fmt: skip


def test_auto_is_the_gpu_where_one_is_visible_else_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize(
    ("name", "why"),
    [("cuda:7", "sees 0 CUDA device"), ("gpu", "is not a device"), ("meta", "cpu or cuda")],
)
def test_a_device_this_process_cannot_use_is_refused_by_name(monkeypatch, name, why):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"train.device='{name}'.*{why}"):
        resolve_device(name)


def test_precision_is_checked_where_the_run_config_is_built():
    assert build_run_config(None, {}, ['train.precision="bf16"', 'train.device="cpu"']).train.precision == "bf16"
    with pytest.raises(ValueError, match="train.precision"):
        build_run_config(None, {}, ['train.precision="fp16"'])


def test_bf16_autocast_trains_and_keeps_fp32_parameters():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = train_epochs(model, batches(), TrainConfig(device="cpu", precision="bf16", lr_moe=0.05), seed=0)
    assert np.isfinite(metrics["train_loss"]) and metrics["examples"] == 24
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.endswith("w1"))


def test_on_device_moves_modules_back_even_when_the_work_fails():
    model, absent = small_model(), None
    with pytest.raises(RuntimeError, match="boom"), on_device(torch.device("cpu"), model, absent):
        raise RuntimeError("boom")
    assert compute.model_device(model) == torch.device("cpu")


STEPS_PAGE_FAULTS = """
import resource, sys, torch
from geomoe.model.compute import reuse_freed_memory
if sys.argv[1] == "reuse" and not reuse_freed_memory():
    sys.exit(3)
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.ones(n << 20) for n in (10, 20, 30)]  # 40, 80 and 120 MiB, written, as in a 224 px step
    del activations
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[step() for _ in range(12)])
"""


def steps_page_faults(mode: str) -> list[int]:
    """Minor page faults of twelve steps that each allocate, write and free 240 MiB, in a fresh process (the setting
    is the process's)."""
    done = subprocess.run([sys.executable, "-c", STEPS_PAGE_FAULTS, mode], capture_output=True, text=True)
    if done.returncode == 3:
        pytest.skip("this libc is not glibc: freed memory goes back as it always did")
    assert done.returncode == 0, done.stderr
    return [int(count) for count in done.stdout.split()]


def test_kept_freed_memory_is_reused_without_faulting_it_in_again():
    pages = (240 << 20) // 4096
    assert all(count > pages // 2 for count in steps_page_faults("default"))  # glibc unmaps large blocks on free
    # The heap grows over the first steps (a block may not fit the holes the others left), then steps reuse it
    assert sum(steps_page_faults("reuse")[-4:]) < pages // 100


@pytest.mark.parametrize("reuse", [True, False])
def test_cpu_training_keeps_freed_memory_unless_told_not_to(monkeypatch, reuse):
    asked = []
    monkeypatch.setattr("geomoe.model.training.reuse_freed_memory", lambda: asked.append(True))
    train_epochs(small_model(), batches(count=1), TrainConfig(device="cpu", reuse_cpu_memory=reuse), seed=0)
    assert asked == ([True] if reuse else [])


@needs_gpu
def test_a_cuda_step_gives_the_cpu_loss_and_gradients(exact_fp32):
    on_cpu, on_gpu = small_model(), small_model().cuda()
    batch, cfg = batches(count=1)[0], TrainConfig()
    cpu_loss = batch_loss(on_cpu, batch, cfg)
    gpu_loss = batch_loss(on_gpu, to_device(batch, torch.device("cuda")), cfg)
    cpu_loss.backward()
    gpu_loss.backward()
    assert float(gpu_loss) == pytest.approx(float(cpu_loss), rel=1e-4)
    largest = max(float(p.grad.norm()) for p in on_cpu.parameters() if p.grad is not None)
    for (name, a), b in zip(on_cpu.named_parameters(), on_gpu.parameters(), strict=True):
        if a.grad is not None:  # a bias just before a train-mode BatchNorm: zero in exact arithmetic, rounding here
            assert float((b.grad.cpu() - a.grad).norm()) <= 1e-2 * float(a.grad.norm()) + 1e-5 * largest, name


@needs_gpu
def test_training_on_cuda_hands_the_model_back_on_the_cpu(exact_fp32):
    """Whole runs are compared loosely: Adam turns the last bits of near-zero gradients into whole steps."""
    cfg = TrainConfig(epochs=2, lr_moe=0.01, lr_head=0.01, lr_rest=0.01)
    on_cpu, on_gpu = small_model(), small_model()
    cpu_metrics = train_epochs(on_cpu, batches(), TrainConfig(**{**cfg.__dict__, "device": "cpu"}), seed=0)
    gpu_metrics = train_epochs(on_gpu, batches(), TrainConfig(**{**cfg.__dict__, "device": "cuda"}), seed=0)
    assert gpu_metrics["train_loss"] == pytest.approx(cpu_metrics["train_loss"], rel=2e-2)
    assert all(t.device.type == "cpu" for t in on_gpu.state_dict().values())


@needs_gpu
def test_bf16_training_on_cuda_lowers_the_loss():
    model, data = small_model(), batches(count=1, size=16)
    first = train_epochs(model, data, TrainConfig(device="cuda", precision="bf16", lr_moe=0.01, lr_head=0.01), seed=0)
    for _ in range(8):
        last = train_epochs(
            model, data, TrainConfig(device="cuda", precision="bf16", lr_moe=0.01, lr_head=0.01), seed=0
        )
    assert last["train_loss"] < 0.7 * first["train_loss"]


@needs_gpu
def test_evaluation_and_conversion_on_cuda_match_the_cpu(exact_fp32):
    model, data = small_model(), batches()
    on_cpu = evaluate(model, data, 4)
    with on_device(torch.device("cuda"), model):
        on_gpu = evaluate(model, data, 4)
    assert on_gpu["accuracy"] == on_cpu["accuracy"] and on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-4)
    dense = GeoMoENet(ModelConfig(num_classes=4, moe_layers=()))
    images, labels = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    cfg = ConversionConfig(top_k=16, scales=(64,))
    target = ModelConfig(num_classes=4, moe_layers=(1, 3), num_experts=4)
    cpu_sample = collect_patches(dense, images, labels, cfg, target.moe_layers)
    with on_device(torch.device("cuda"), dense):
        gpu_sample = collect_patches(dense, images, labels, cfg, target.moe_layers)
    for layer, sample in cpu_sample.items():
        assert gpu_sample[layer].tokens.device.type == "cpu"
        torch.testing.assert_close(gpu_sample[layer].tokens, sample.tokens, rtol=1e-3, atol=1e-4)
    moe = convert_to_moe(dense, images, labels, cfg, target, 0, torch.device("cuda"))
    assert compute.model_device(moe) == compute.model_device(dense) == torch.device("cpu")
