"""Benchmarks measured as ratios within one run (the machines are shared and noisy)."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from geomoe.model.compute import Precision, autocast, resolve_device, reuse_freed_memory
from geomoe.model.config import ModelConfig
from geomoe.model.network import GeoMoENet
from geomoe.wire.run_config import RunConfig

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


def upload_per_client_round(report: dict) -> float:
    """Mean bytes one client uploads in one round."""
    values = [t["up"] for row in report["rounds"] for t in row["traffic"].values()]
    return sum(values) / max(len(values), 1)


def accuracy_by_upload(report: dict) -> list[tuple[float, float]]:
    """(cumulative upload bytes per client, accuracy of the model after that much upload), round 0 first."""
    points, total = [], 0.0
    evaluations = report["evaluations"]
    if "0" in evaluations:
        points.append((0.0, evaluations["0"]["accuracy"]))
    for row in report["rounds"]:
        total += sum(t["up"] for t in row["traffic"].values()) / max(len(row["traffic"]), 1)
        if str(row["round"]) in evaluations:
            points.append((total, evaluations[str(row["round"])]["accuracy"]))
    return points


def accuracy_at_budget(points: list[tuple[float, float]], budget: float) -> float:
    """Best accuracy reached with at most `budget` bytes uploaded per client."""
    return max(acc for spent, acc in points if spent <= budget)


def compare_strategies(reports: dict[str, dict]) -> dict:
    """Upload ratios to full-model FedAvg (`reports["fedavg"]`) and, when run, to dense FedAvg of the same
    trainable parts (`reports["fedavg-parts"]`: what slicing by location saves on its own), and accuracy at
    equal upload, for every run."""
    dense_points = accuracy_by_upload(reports["fedavg"])
    budget = dense_points[1][0]  # what dense FedAvg uploads per client in its first round
    dense_upload = upload_per_client_round(reports["fedavg"])
    ratios = {}
    if "fedavg-parts" in reports:
        parts_upload = upload_per_client_round(reports["fedavg-parts"])
        ratios["upload_ratio_to_fedavg_parts"] = {
            name: upload_per_client_round(r) / parts_upload for name, r in reports.items()
        }
    return {
        "upload_per_client_round": {name: upload_per_client_round(r) for name, r in reports.items()},
        "upload_ratio_to_fedavg": {name: upload_per_client_round(r) / dense_upload for name, r in reports.items()},
        **ratios,
        "final_accuracy": {name: r["final_accuracy"] for name, r in reports.items()},
        "equal_upload_budget_bytes": budget,
        "accuracy_at_equal_upload": {
            name: accuracy_at_budget(accuracy_by_upload(r), budget) for name, r in reports.items()
        },
        "curves": {name: accuracy_by_upload(r) for name, r in reports.items()},
    }


FEDPROX_MU = 0.01  # FedProx's proximal weight in the baseline (Li et al. 2020 use 0.001 to 1)


def comm_variants(compressed: str) -> dict[str, tuple[str, str, str, float]]:
    """The runs `bench comm` compares: name -> (strategy, trainable, upload pipeline, FedProx mu). Full-model
    FedAvg; dense FedAvg and FedProx of the same parts the per-expert runs train (every expert and the whole
    head), so the gain of slicing by location shows on its own; per-expert, plain and compressed."""
    return {
        "fedavg": ("fedavg", "all", "none", 0.0),
        "fedavg-parts": ("fedavg", "experts+head", "none", 0.0),
        "fedprox-parts": ("fedavg", "experts+head", "none", FEDPROX_MU),
        "expert": ("expert", "experts+head", "none", 0.0),
        "expert-compressed": ("expert", "experts+head", compressed, 0.0),
    }


def bench_comm(out: Path, rounds: int, compressed: str, seed: int, announce: Callable[[str], None] = print) -> dict:
    """The `comm_variants` runs on the same partitions, seed and initial model (one shared cache); writes
    `out/bench_comm.json` and returns it."""
    from geomoe.runner.simulation import simulate

    reports = {}
    for name, (strategy, trainable, codec, mu) in comm_variants(compressed).items():
        cfg = RunConfig(out=str(out / name), cache=str(out / "cache"), seed=seed)
        cfg.federation = replace(
            cfg.federation, strategy=strategy, trainable=trainable, rounds=rounds, upload_compression=codec
        )
        cfg.train = replace(cfg.train, prox_mu=mu)
        announce(f"{name}: {strategy} of {trainable}, upload {codec}, FedProx mu {mu:g}, {rounds} rounds")
        reports[name] = simulate(cfg)
    result = {**compare_strategies(reports), "compressed_pipeline": compressed}
    (out / "bench_comm.json").write_text(json.dumps(result, indent=2))
    return result


def _photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like (height, width, 3) uint8 image: smooth colour fields with texture, as JPEGs of nature are."""
    coarse = rng.random((height // 32 + 2, width // 32 + 2, 3))
    field = np.kron(coarse, np.ones((32, 32, 1)))[:height, :width]
    texture = rng.normal(0, 0.06, (height, width, 1))
    return (np.clip(field + texture, 0, 1) * 255).astype(np.uint8)


def bench_data(images: int, size: int, source_width: int, source_height: int, repeats: int, folder: Path) -> dict:
    """Images/s on one core: full JPEG decode + resize, DCT-scaled decode, and reading the decoded cache.

    The three are timed in interleaved repeats (medians), so machine load hits them alike.
    """
    from PIL import Image

    from geomoe.data.images import DecodedCache, ImageConfig, ImageFiles, decode, to_tensor

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    files = [f"{i:05d}.jpg" for i in range(images)]
    for name in files:
        Image.fromarray(_photo(rng, source_width, source_height)).save(folder / name, quality=90)
    started = time.perf_counter()
    DecodedCache(folder / "cache", folder, files, size)
    build_s = time.perf_counter() - started
    labels = np.zeros(images, dtype=np.int64)
    plain_cfg = ImageConfig(size=size)
    reduced = ImageFiles(folder, files, labels, plain_cfg)
    cached = ImageFiles(folder, files, labels, ImageConfig(size=size, cache=str(folder / "cache")))
    passes = {  # each yields model-ready tensors
        "plain_decode": lambda: [to_tensor(decode(folder / f, size, reduced=False), plain_cfg) for f in files],
        "reduced_decode": lambda: [reduced[i] for i in range(images)],
        "cached": lambda: [cached[i] for i in range(images)],
    }
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rates = {name: images / sorted(t)[len(t) // 2] for name, t in times.items()}
    return {
        "images": images,
        "size": size,
        "source": [source_width, source_height],
        "repeats": repeats,
        "threads": 1,
        "images_per_s_per_core": rates,
        "cache_build_s": build_s,
        "cached_over_plain": rates["cached"] / rates["plain_decode"],
        "reduced_over_plain": rates["reduced_decode"] / rates["plain_decode"],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
