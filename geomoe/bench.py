"""Benchmarks measured as ratios within one run (the machines are shared and noisy)."""

from __future__ import annotations

import platform
import time

import torch
import torch.nn.functional as F

from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet


def _step_time(model: GeoMoENet, images: torch.Tensor, labels: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward+backward pass."""
    times = []
    for i in range(repeats + 2):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        F.cross_entropy(model(images), labels).backward()
        if images.is_cuda:
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up passes
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_model(batch_size: int, image_size: int, repeats: int) -> dict:
    """Dense vs MoE (16 experts at 1,3,5,7, d_e 2) forward+backward, interleaved, per device."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result: dict = {
        "batch_size": batch_size,
        "image_size": image_size,
        "repeats": repeats,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "devices": {},
    }
    for device in devices:
        torch.manual_seed(0)
        dense = GeoMoENet(ModelConfig(num_classes=182, moe_layers=())).to(device).train()
        moe = GeoMoENet(ModelConfig(num_classes=182)).to(device).train()
        images = torch.randn(batch_size, 3, image_size, image_size, device=device)
        labels = torch.randint(0, 182, (batch_size,), device=device)
        dense_s, moe_s = [], []
        for _ in range(3):  # interleave so that load changes hit both models alike
            dense_s.append(_step_time(dense, images, labels, repeats))
            moe_s.append(_step_time(moe, images, labels, repeats))
        d, m = min(dense_s), min(moe_s)
        name = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"
        result["devices"][device] = {"name": name, "dense_s": d, "moe_s": m, "ratio": m / d}
    return result
