"""`geomoe bench device`: what a camera runs, measured in one run: the dense model, the global MoE and a cell's
pruned MoE (the papers' 5089-class bottleneck head and rank-8 gate by default), each exported to TorchScript and to
ONNX and timed on single images (a camera classifies one at a time) with both runtimes, interleaved. Models with
MoE layers are also exported fused (`export_onnx(..., fused=True)`: each MoE layer one node of geomoe's own
ONNX Runtime operator, built here) and timed as "onnx_fused"; their ratio to dense is against dense's ONNX time.

Two expert layouts are pruned: the papers' experts at transformer layers 1, 3, 5, 7 ("pruned"), and experts in
place of every transformer MLP ("pruned-all", the layout of Mensah et al.'s Table 3 MoE-MLP2), because the first
leaves five dense MLPs whole and cannot go below 0.92x the dense model's FLOPs however few experts a cell keeps.

A bound is timed beside them ("mlp-free"): the dense model with every transformer MLP taken out. No model that
replaces MLPs with experts, however few or fast, can run faster than it, so its latency over dense is the floor for
any expert layout's.

Where the time goes, layer by layer: the first transformer layer of each block is exported alone three times, as
the dense model's `norm2 -> mlp` branch, as the pruned MoE layer that replaces it (folded, as exports have it) and as
that layer fused, and all are timed under ONNX Runtime on that layer's input for one image. They say how far the MoE
layers are from what a target needs, which a whole-model ratio (the MLPs are a seventh of the model's time) hides in
its spread."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from geomoe.bench.model import pair_ratios
from geomoe.camera.export import export_onnx, export_torchscript, labels_for, write_onnx
from geomoe.camera.fused_moe import FusedMoE
from geomoe.camera.inference import RUNTIMES, load_exported, onnx_session
from geomoe.model.config import ModelConfig
from geomoe.model.counting import forward_flops, parameter_count
from geomoe.model.experts import prune_model
from geomoe.model.folded_moe import FoldedMoE
from geomoe.model.network import GeoMoENet, prune_head, transformer_layers

EVERY_LAYER = tuple(range(9))  # MobileViTV2's nine transformer layers
TIMED_LAYERS = (0, 2, 6)  # the first transformer layer of each of the three blocks (784, 196, 64 pixels at 224 px)
GATE_RANK = 8  # the geographic paper's low-rank gate
WARM_UP_CALLS = 5
CALLS_PER_ROUND = 5  # one image at a time, timed together: a single call's time swings 3x on a shared machine
CALLS_PER_LAYER = 20  # a layer alone takes tens of microseconds: more calls per timed round
FUSED = "onnx_fused"  # ONNX Runtime on a fused export: each MoE layer one node of geomoe's operator (client/ops)
FUSED_MODELS = ("moe", "pruned", "pruned-all")  # those with MoE layers


class _NoMlp(nn.Module):
    """Stands in for a transformer MLP that costs nothing: its residual branch adds zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def mlp_free(dense: GeoMoENet) -> GeoMoENet:
    """The dense model with every transformer MLP (and its norm) taken out: a latency floor, not a classifier."""
    bound = copy.deepcopy(dense)
    for block in transformer_layers(bound.backbone):
        block.norm2, block.mlp = nn.Identity(), _NoMlp()
    return bound


class _MlpBranch(nn.Module):
    """A transformer layer's `norm2 -> mlp` branch alone: what an MoE layer replaces (its norm2 is an Identity)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm2, self.mlp = block.norm2, block.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))


def device_models(num_classes: int, num_experts: int, keep_per_layer: int, species: int) -> dict[str, GeoMoENet]:
    """Dense MobileViTV2, its MoE (experts at 1, 3, 5, 7), a cell's pruned MoE in both layouts (`keep_per_layer`
    experts per layer and a head of `species` classes + "other"), and the MLP-free bound."""

    def moe(layers: tuple[int, ...]) -> GeoMoENet:
        return GeoMoENet(
            ModelConfig(num_classes, num_experts=num_experts, head="bottleneck", moe_layers=layers, gate_rank=GATE_RANK)
        )

    def pruned(model: GeoMoENet) -> GeoMoENet:
        keep = {layer: list(range(keep_per_layer)) for layer in model.cfg.moe_layers}
        return prune_head(prune_model(model, keep), list(range(species)))

    torch.manual_seed(0)
    dense = GeoMoENet(ModelConfig(num_classes=num_classes, moe_layers=(), head="bottleneck"))
    papers = moe(ModelConfig.moe_layers)
    models = {
        "dense": dense,
        "moe": papers,
        "pruned": pruned(papers),
        "pruned-all": pruned(moe(EVERY_LAYER)),
        "mlp-free": mlp_free(dense),
    }
    return {name: model.eval() for name, model in models.items()}


def bench_device(
    folder: Path,
    image_size: int = 224,
    repeats: int = 30,
    num_classes: int = 5089,
    num_experts: int = 64,
    keep_per_layer: int = 8,
    species: int = 100,
    threads: int = 0,
) -> dict:
    """Parameters and median single-image latency (ms) of each model under each runtime, on `threads` threads
    (0: torch's current number). Ratios are taken per round (every model and runtime once, in an order reversed
    every other round), then the median and spread over rounds: on a shared machine the load moves between rounds
    more than within one."""
    models = device_models(num_classes, num_experts, keep_per_layer, species)
    previous_threads = torch.get_num_threads()
    threads = threads or previous_threads
    try:  # loading a TorchScript export sets torch's threads for the whole process: put them back after
        result = _timed(models, folder, image_size, repeats, threads)
        result["layers"] = layer_latency(models["dense"], models["pruned-all"], folder, image_size, repeats, threads)
    finally:
        torch.set_num_threads(previous_threads)
    result.update(num_classes=num_classes, num_experts=num_experts, keep_per_layer=keep_per_layer, species=species)
    return result


def interleaved(calls: dict, repeats: int, calls_per_round: int) -> dict:
    """Seconds per call of each callable, one value per round: every callable warmed up (TorchScript's profiling
    executor optimises a graph after its first calls), then `repeats` rounds running each `calls_per_round` times,
    in an order reversed every other round."""
    for call in calls.values():
        for _ in range(WARM_UP_CALLS):
            call()
    times: dict = {key: [] for key in calls}
    order = list(calls)
    for round_ in range(repeats):
        for key in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(calls_per_round):
                calls[key]()
            times[key].append((time.perf_counter() - start) / calls_per_round)
    return times


def _timed(models: dict[str, GeoMoENet], folder: Path, image_size: int, repeats: int, threads: int) -> dict:
    """Each model exported to both runtimes (and each with MoE layers, fused too) and timed, interleaved; sizes,
    latencies and ratios to dense."""
    loaded = {}
    for name, model in models.items():
        labels = labels_for(model, [f"class {k}" for k in range(model.cfg.num_classes)])  # a bench model has no run
        torchscript = export_torchscript(model, folder / f"{name}.pt", image_size, labels)
        loaded[(name, "torchscript")] = load_exported(torchscript, threads=threads)
        onnx = export_onnx(model, folder / f"{name}.onnx", image_size, labels)
        loaded[(name, "onnx")] = load_exported(onnx, threads=threads)
        if name in FUSED_MODELS:
            fused = export_onnx(model, folder / f"{name}-fused.onnx", image_size, labels, fused=True)
            loaded[(name, FUSED)] = load_exported(fused, threads=threads)
    image = np.random.default_rng(0).random((1, 3, image_size, image_size), dtype=np.float32)
    calls = {key: (lambda model=model: model.predict(image)) for key, model in loaded.items()}
    times = interleaved(calls, repeats, CALLS_PER_ROUND)
    ms = {key: float(np.median(t)) * 1e3 for key, t in times.items()}
    result: dict = {
        "image_size": image_size,
        "rounds": repeats,
        "calls_per_round": CALLS_PER_ROUND,
        "threads": threads,
        "models": {
            name: {
                "parameters": parameter_count(model),
                "flops": forward_flops(model, image_size),
                **{f"{rt}_ms": ms[(name, rt)] for rt in (*RUNTIMES, FUSED) if (name, rt) in ms},
            }
            for name, model in models.items()
        },
    }
    dense = result["models"]["dense"]
    result["over_dense"] = {
        name: {
            "parameters": result["models"][name]["parameters"] / dense["parameters"],
            **{f"{rt}_latency": pair_ratios(times[("dense", rt)], times[(name, rt)]) for rt in RUNTIMES},
            **(
                {f"{FUSED}_latency": pair_ratios(times[("dense", "onnx")], times[(name, FUSED)])}
                if name in FUSED_MODELS
                else {}
            ),
        }
        for name in ("pruned", "pruned-all", "mlp-free")
    }
    result["onnx_over_torchscript"] = {
        name: pair_ratios(times[(name, "torchscript")], times[(name, "onnx")]) for name in models
    }
    return result


def layer_latency(
    dense: GeoMoENet, moe: GeoMoENet, folder: Path, image_size: int, repeats: int, threads: int
) -> dict[str, dict]:
    """Per timed layer: microseconds of the dense MLP branch and of the MoE layer in its place, each exported alone
    to ONNX and run on that layer's normalised tokens for one image (rounds of CALLS_PER_LAYER calls, interleaved),
    and the MoE layer's time over the branch's per round."""
    image = torch.rand(1, 3, image_size, image_size)
    with torch.no_grad():
        inputs = dense.forward_with_pre_mlp(image)[1]
    dense_blocks, moe_blocks = transformer_layers(dense.backbone), transformer_layers(moe.backbone)
    result = {}
    for layer in TIMED_LAYERS:
        tokens = inputs[layer]
        folded = FoldedMoE(moe_blocks[layer].mlp)
        modules = (("dense", _MlpBranch(dense_blocks[layer])), ("moe", folded), ("fused", FusedMoE(folded)))
        sessions = {
            name: onnx_session(write_onnx(module, tokens, folder / f"{name}-layer{layer}.onnx", "x", "y"), threads)
            for name, module in modules
        }
        feed = {"x": tokens.numpy()}
        calls = {name: (lambda run=session.run, feed=feed: run(None, feed)) for name, session in sessions.items()}
        times = interleaved(calls, repeats, CALLS_PER_LAYER)
        _, channels, pixels, patches = tokens.shape
        result[str(layer)] = {
            "channels": channels,
            "pixels": pixels * patches,
            **{f"{name}_us": float(np.median(t)) * 1e6 for name, t in times.items()},
            "moe_over_dense": pair_ratios(times["dense"], times["moe"]),
            "fused_over_dense": pair_ratios(times["dense"], times["fused"]),
        }
    return result
