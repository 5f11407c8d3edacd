"""`geomoe repro`: the geographic MoE paper's comparison (Mensah et al. 2025, Table 3 and the per-cell results)
on the user's iNaturalist 2017 files and Hsu et al.'s published iNat-Geo split.

The papers' configuration: 64 experts in transformer layers 1, 3, 5, 7 with d_e = 2 hidden units and a rank-8 gate,
the bottleneck head (256 -> 1024 -> 256 -> classes), N_max = 10,000. The dense MobileViTV2 is pretrained on the
server's share, converted, trained federated over the split's cells; then for each cell the dense model, the global
MoE and the cell's pruned MoE (its experts at the 90th percentile, its species' head rows) are compared on the
cell's test images, with parameter and FLOP counts, so that a user with the data can read it against the paper line
by line.
"""

from __future__ import annotations

import json
from pathlib import Path

from geomoe.model.counting import forward_flops, parameter_count
from geomoe.model.training import evaluate
from geomoe.prune.finished_run import BATCH, FinishedRun, prune_for_location
from geomoe.server.checkpoint import load_model
from geomoe.server.initial_model import dense_model_path
from geomoe.wire.run_config import RunConfig, build_run_config

PAPER_SETTINGS = [
    'world.dataset="hsu"',
    "world.n_max=10000",
    "model.num_experts=64",
    "model.moe_layers=[1, 3, 5, 7]",
    "model.expert_hidden=2",
    'model.head="bottleneck"',
    "model.gate_rank=8",
]
PERCENTILE = 90.0


def paper_config(inat: Path, train_split: Path, test_split: Path, out: Path, overrides: list[str]) -> RunConfig:
    """The papers' run on the iNat 2017 folder `inat` (train_val_images/, train2017.json and its locations file,
    val2017.json and its locations file when present) and a Hsu et al. split; `overrides` (KEY=VALUE) last."""
    for path in (inat / "train2017.json", inat / "train2017_locations.json", train_split, test_split):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    annotations = [str(inat / name) for name in ("train2017.json", "val2017.json") if (inat / name).exists()]
    locations = [str(inat / f"{name}_locations.json") for name in ("train2017", "val2017")
                 if (inat / f"{name}_locations.json").exists()]  # fmt: skip
    files = [
        f'world.files.root="{inat}"',
        f"world.files.annotations={json.dumps(annotations)}",
        f"world.files.locations={json.dumps(locations)}",
        f'world.files.train_split="{train_split}"',
        f'world.files.test_split="{test_split}"',
        f'out="{out}"',
    ]
    return build_run_config(None, {}, [*PAPER_SETTINGS, *files, *overrides])


def model_row(name: str, model, loader_accuracy: float, image_size: int) -> dict:
    return {"model": name, "accuracy": loader_accuracy, "parameters": parameter_count(model),
            "mflops": forward_flops(model, image_size) / 1e6}  # fmt: skip


def compare(run_dir: Path, cells: list[str] | None = None, percentile: float = PERCENTILE) -> dict:
    """Per cell of a finished run: dense, global MoE and pruned MoE on the cell's test images."""
    run = FinishedRun.open(run_dir)
    cache = run.cfg.cache_dir
    dense, _ = load_model(dense_model_path(run.cfg, cache))
    size = run.cfg.world.input_size()
    chosen = cells or [location.cell for location in run.world.locations]
    rows = []
    for cell in chosen:
        test = list(run.world.loader(run.location(cell).test, BATCH))
        pruned = prune_for_location(run, cell, percentile, "best_present", "local")
        rows.append({
            "cell": cell,
            "test_images": len(run.location(cell).test),
            "models": [
                model_row("dense", dense, float(evaluate(dense, test)["accuracy"]), size),
                model_row("moe", run.model, pruned.full_accuracy, size),
                model_row("pruned", pruned.model, pruned.accuracy, size),
            ],
        })  # fmt: skip
    return {"run": str(run_dir), "percentile": percentile, "settings": PAPER_SETTINGS, "cells": rows}


def write_table(result: dict, path: Path) -> str:
    """The comparison as a Markdown table (one line per cell and model), written to `path` and returned."""
    lines = ["| cell | model | test accuracy | parameters | MFLOPs |", "|---|---|---:|---:|---:|"]
    for row in result["cells"]:
        for model in row["models"]:
            lines.append(f"| {row['cell']} | {model['model']} | {model['accuracy']:.3f} | {model['parameters']:,} | "
                         f"{model['mflops']:.0f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return text
