"""Benchmarks measured as ratios within one run (the machines are shared and noisy)."""

from __future__ import annotations

import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from geomoe.model.compute import Precision, autocast, resolve_device, reuse_freed_memory
from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def _step_time(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: Precision) -> float:
    """Seconds of one forward+backward pass from fresh gradients, as a training step takes it. Under torch.compile's
    "reduce-overhead" each step replays CUDA graphs whose outputs the next one overwrites, gradients included:
    accumulating into them fails (pytorch#169545), and marking the step says the last one's outputs are done with."""
    model.zero_grad(set_to_none=True)
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    torch.compiler.cudagraph_mark_step_begin()  # a no-op outside "reduce-overhead"
    with autocast(images.device, precision):
        logits = model(images)
    F.cross_entropy(logits.float(), labels).backward()
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def pair_ratios(baseline_s: list[float], other_s: list[float]) -> dict[str, float]:
    """Other over baseline per interleaved pair: the median and the spread (10th and 90th percentiles, min, max)."""
    ratios = np.array(other_s) / np.array(baseline_s)
    return {
        "median": float(np.median(ratios)),
        "p10": float(np.percentile(ratios, 10)),
        "p90": float(np.percentile(ratios, 90)),
        "min": float(ratios.min()),
        "max": float(ratios.max()),
    }


def bench_devices(which: str) -> list[str]:
    """ "cpu", "cuda" or "all" (the CPU, and the GPU where there is one)."""
    if which == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    resolve_device(which)  # a GPU asked for and missing is an error
    return [which]


def bench_model(
    batch_size: int,
    image_size: int,
    pairs: int,
    devices: list[str],
    compile_mode: str = "",
    precision: Precision = "fp32",
) -> dict:
    """Dense vs MoE (16 experts at 1,3,5,7, d_e 2) forward+backward per device: `pairs` interleaved dense/MoE
    steps (after warm-up steps), so that a load change on a shared machine hits both sides of a pair; the ratio is
    the median over pairs, with its spread. `compile_mode` (torch.compile's mode: "default", "reduce-overhead",
    "max-autotune"; "" = eager) compiles both; `precision` "bf16" runs them under bf16 autocast. On the CPU, freed
    memory is kept for reuse, as training does by default (`train.reuse_cpu_memory`)."""
    result: dict = {
        "batch_size": batch_size,
        "image_size": image_size,
        "pairs": pairs,
        "compile_mode": compile_mode or "eager",
        "precision": precision,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "devices": {},
    }
    for device in devices:
        if device == "cpu":
            result["cpu_memory_reused"] = reuse_freed_memory()
        torch.manual_seed(0)
        dense = GeoMoENet(ModelConfig(num_classes=182, moe_layers=())).to(device).train()
        moe = GeoMoENet(ModelConfig(num_classes=182)).to(device).train()
        run_dense, run_moe = (
            (torch.compile(dense, mode=compile_mode), torch.compile(moe, mode=compile_mode))
            if compile_mode
            else (dense, moe)
        )
        images = torch.randn(batch_size, 3, image_size, image_size, device=device)
        labels = torch.randint(0, 182, (batch_size,), device=device)
        for _ in range(3 if compile_mode else 2):  # compilation (and CUDA graph capture) happens in the first steps
            _step_time(run_dense, images, labels, precision), _step_time(run_moe, images, labels, precision)
        dense_s, moe_s = [], []
        for k in range(pairs):  # alternate which model goes first, so neither always follows the other
            first, second = (run_dense, run_moe) if k % 2 == 0 else (run_moe, run_dense)
            a, b = _step_time(first, images, labels, precision), _step_time(second, images, labels, precision)
            dense_s.append(a if first is run_dense else b)
            moe_s.append(b if first is run_dense else a)
        name = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"
        result["devices"][device] = {
            "name": name,
            "dense_s": float(np.median(dense_s)),
            "moe_s": float(np.median(moe_s)),
            "dense_images_per_s": batch_size / float(np.median(dense_s)),
            "moe_images_per_s": batch_size / float(np.median(moe_s)),
            "ratio": pair_ratios(dense_s, moe_s),
        }
    return result
