"""The global model before federation: a dense MobileViTV2 pretrained on the server's share of the
data, converted to experts (Mensah et al. 2024). Cached, since both strategies of a comparison
must start from the same model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from geomoe.model.compute import on_device, resolve_device
from geomoe.model.config import ModelConfig
from geomoe.model.conversion import convert_to_moe
from geomoe.model.network import GeoMoENet
from geomoe.model.superclasses import superclasses_of
from geomoe.model.training import TrainConfig, evaluate, train_epochs
from geomoe.server.checkpoint import load_model, save_model
from geomoe.server.progress import phase, progress
from geomoe.wire.run_config import RunConfig
from geomoe.world.world import World

CONVERSION_SAMPLE = 600  # images of the server's share used to initialise routers and experts


def cache_key(cfg: RunConfig) -> str:
    relevant = {
        "world": cfg.world.key(),  # includes the input files' sizes and times
        "images": {k: v for k, v in asdict(cfg.world.images).items() if k != "cache"},  # not the cache folder
        "model": cfg.model.to_dict(),
        "conversion": asdict(cfg.conversion),
        "pretrain": [cfg.federation.pretrain_epochs, cfg.federation.pretrain_lr, cfg.train.batch_size],
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def dense_model_path(cfg: RunConfig, cache_dir: Path) -> Path:
    """Where the pretrained dense model of `cfg` is kept (beside the converted one), for comparisons."""
    return cache_dir / f"dense-{cache_key(cfg)}.pt"


def initial_model(cfg: RunConfig, world: World, cache_dir: Path) -> tuple[GeoMoENet, dict[str, Any]]:
    """Pretrained + converted global model, the dense/MoE accuracies on the server's held-out images and, with
    per-image routing, each class's super-class (from the dense model's confusion there, Mobile V-MoE)."""
    path = cache_dir / f"initial-{cache_key(cfg)}.pt"
    if path.is_file():
        model, extra = load_model(path)
        if cfg.model.routing != "image" or "superclasses" in extra["metrics"]:  # else: cached before they existed
            return model, extra["metrics"]
    torch.manual_seed(cfg.seed)
    dense = GeoMoENet(ModelConfig.from_dict({**cfg.model.to_dict(), "moe_layers": [], "expert_ids": {}}))
    indices = world.server_indices
    held_out, train = indices[: len(indices) // 6], indices[len(indices) // 6 :]
    train_cfg = TrainConfig(
        batch_size=cfg.train.batch_size,
        lr_head=cfg.federation.pretrain_lr,
        lr_rest=cfg.federation.pretrain_lr,
        device=cfg.train.device,
        precision=cfg.train.precision,
    )
    device = resolve_device(cfg.train.device)
    with progress() as display:
        task = display.add_task(
            f"pretraining the dense model on the server's {len(train)} images", total=cfg.federation.pretrain_epochs
        )
        for epoch in range(cfg.federation.pretrain_epochs):
            train_epochs(
                dense,
                world.loader(train, cfg.train.batch_size, shuffle=True, seed=cfg.seed + epoch, train=True),
                train_cfg,
                cfg.seed + epoch,
            )
            display.advance(task)
    images, labels = world.tensors(train[:CONVERSION_SAMPLE])
    with phase(f"converting to {cfg.model.num_experts} experts per layer (router init, clustering, MoEfication)"):
        moe = convert_to_moe(dense, images, labels, cfg.conversion, cfg.model, cfg.seed, device)
    with on_device(device, dense, moe):
        metrics: dict[str, Any] = {
            "dense_accuracy": float(evaluate(dense, world.loader(held_out, 128))["accuracy"]),
            "converted_accuracy": float(evaluate(moe, world.loader(held_out, 128))["accuracy"]),
        }
        if cfg.model.routing == "image":  # one super-class per expert: the router loss sends its images there
            count = cfg.model.num_experts
            groups = superclasses_of(dense, world.loader(held_out, 128), world.num_classes, count)
            metrics["superclasses"] = groups.tolist()
    save_model(dense, dense_model_path(cfg, cache_dir), metrics=metrics)
    save_model(moe, path, metrics=metrics)
    return moe, metrics
