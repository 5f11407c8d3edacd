"""`geomoe bench device`: what a camera runs, measured in one run: the dense model, the global MoE and a cell's
pruned MoE (the papers' 5089-class bottleneck head by default), each exported to TorchScript and to ONNX and
timed on single images (a camera classifies one at a time) with both runtimes, interleaved."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from geomoe.client.export import export_onnx, export_torchscript
from geomoe.client.inference import RUNTIMES, load_exported
from geomoe.model.config import ModelConfig
from geomoe.model.counting import parameter_count
from geomoe.model.experts import prune_model
from geomoe.model.network import GeoMoENet, prune_head


def device_models(num_classes: int, num_experts: int, keep_per_layer: int, species: int) -> dict[str, GeoMoENet]:
    """Dense MobileViTV2, its MoE (experts at 1, 3, 5, 7), and a cell's pruned MoE: `keep_per_layer` experts per
    layer and a head of `species` classes (+ "other")."""
    torch.manual_seed(0)
    dense = GeoMoENet(ModelConfig(num_classes=num_classes, moe_layers=(), head="bottleneck")).eval()
    moe = GeoMoENet(ModelConfig(num_classes=num_classes, num_experts=num_experts, head="bottleneck")).eval()
    keep = {layer: list(range(keep_per_layer)) for layer in moe.cfg.moe_layers}
    pruned = prune_head(prune_model(moe, keep), list(range(species))).eval()
    return {"dense": dense, "moe": moe, "pruned": pruned}


def bench_device(
    folder: Path,
    image_size: int = 224,
    repeats: int = 30,
    num_classes: int = 5089,
    num_experts: int = 64,
    keep_per_layer: int = 8,
    species: int = 100,
) -> dict:
    """Parameters and median single-image latency (ms) of each model under each runtime; ratios in one run."""
    models = device_models(num_classes, num_experts, keep_per_layer, species)
    loaded = {}
    for name, model in models.items():
        loaded[(name, "torchscript")] = load_exported(export_torchscript(model, folder / f"{name}.pt", image_size))
        loaded[(name, "onnx")] = load_exported(export_onnx(model, folder / f"{name}.onnx", image_size))
    image = np.random.default_rng(0).random((1, 3, image_size, image_size), dtype=np.float32)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in loaded}
    for key in loaded:  # warm-up
        loaded[key].predict(image)
    for _ in range(repeats):  # interleaved: a load change on the machine hits every model and runtime alike
        for key, exported in loaded.items():
            start = time.perf_counter()
            exported.predict(image)
            times[key].append(time.perf_counter() - start)
    ms = {key: float(np.median(t)) * 1e3 for key, t in times.items()}
    result: dict = {
        "image_size": image_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "num_classes": num_classes,
        "num_experts": num_experts,
        "keep_per_layer": keep_per_layer,
        "species": species,
        "models": {
            name: {"parameters": parameter_count(model), **{f"{rt}_ms": ms[(name, rt)] for rt in RUNTIMES}}
            for name, model in models.items()
        },
    }
    dense = result["models"]["dense"]
    result["pruned_over_dense"] = {
        "parameters": result["models"]["pruned"]["parameters"] / dense["parameters"],
        **{f"{rt}_latency": ms[("pruned", rt)] / ms[("dense", rt)] for rt in RUNTIMES},
    }
    result["onnx_over_torchscript"] = {name: ms[(name, "onnx")] / ms[(name, "torchscript")] for name in models}
    return result
