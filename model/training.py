"""Local training and evaluation loops shared by the server (pretraining) and clients.

Knows nothing of Flower. Per-group learning rates follow Mensah et al. 2024 (MoE parameters,
classifier, rest); the optional location loss follows Mensah et al. 2025.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from geomoe.model.compute import (
    PRECISIONS,
    Precision,
    autocast,
    model_device,
    on_device,
    resolve_device,
    reuse_freed_memory,
    to_device,
)
from geomoe.model.location import LocationSupervision
from geomoe.model.moe_layer import MoEMlp
from geomoe.model.network import GeoMoENet
from geomoe.model.superclasses import router_supervision_loss


@dataclass
class TrainConfig:
    """Local optimisation settings."""

    __pydantic_config__ = {"extra": "forbid"}  # unknown keys are refused when pydantic builds it from a file

    epochs: int = 1  # passes over the local training data
    batch_size: int = 32  # images per step
    lr_moe: float = 5e-3  # MoE layers (experts and router), as in the paper
    lr_head: float = 1e-3  # classifier head (the paper's 1e-5 assumes a long fine-tune)
    lr_rest: float = 5e-4  # everything else (the paper's 5e-5 assumes a long fine-tune)
    weight_decay: float = 0.0  # AdamW weight decay
    location_weight: float = 0.0  # weight of the location contrastive loss (0.01 in the paper); 0 = off
    superclass_weight: float = 0.1  # weight of the super-class router loss when model.routing = "image"
    prox_mu: float = 0.0  # FedProx: mu/2 * ||w - w_received||^2 on the trained parameters; 0 = plain local SGD
    device: str = "auto"  # where this process trains and evaluates: auto (CUDA when visible) | cpu | cuda | cuda:N
    precision: Precision = "fp32"  # "bf16": training steps under bf16 autocast (GPUs with bf16; slower on most CPUs)
    reuse_cpu_memory: bool = True  # CPU: malloc keeps freed activations for the next step (compute.reuse_freed_memory)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} is not one of {PRECISIONS}")


def parameter_groups(model: GeoMoENet, cfg: TrainConfig, trainable: set[str] | None = None) -> list[dict]:
    """AdamW groups (MoE / head / rest); parameters outside `trainable` (names) are frozen."""
    moe_prefixes = tuple(name + "." for name, m in model.named_modules() if isinstance(m, MoEMlp))
    groups: dict[str, list[torch.nn.Parameter]] = {"moe": [], "head": [], "rest": []}
    for name, param in model.named_parameters():
        if trainable is not None and name not in trainable:
            param.requires_grad_(False)
            continue
        param.requires_grad_(True)
        group = "moe" if name.startswith(moe_prefixes) else "head" if name.startswith("head.") else "rest"
        groups[group].append(param)
    lrs = {"moe": cfg.lr_moe, "head": cfg.lr_head, "rest": cfg.lr_rest}
    return [{"params": p, "lr": lrs[g], "name": g} for g, p in groups.items() if p]


def train_epochs(
    model: GeoMoENet,
    loader: DataLoader,
    cfg: TrainConfig,
    seed: int,
    trainable: set[str] | None = None,
    location: LocationSupervision | None = None,
    freeze_norm_stats: bool = False,
    superclasses: torch.Tensor | None = None,
) -> dict[str, float]:
    """Train in place on `cfg.device` (the model, and `location`, come back where they were); returns mean loss and
    examples seen. `loader` yields (images, labels[, lonlat]); `seed` seeds dropout (the loader has its own order).

    With `freeze_norm_stats`, BatchNorm running statistics stay fixed, so a frozen backbone stays
    exactly the global one.
    """
    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.reuse_cpu_memory:
        reuse_freed_memory()
    with on_device(device, model, location):
        return _train_on(device, model, loader, cfg, seed, trainable, location, freeze_norm_stats, superclasses)


def _train_on(
    device: torch.device,
    model: GeoMoENet,
    loader: DataLoader,
    cfg: TrainConfig,
    seed: int,
    trainable: set[str] | None,
    location: LocationSupervision | None,
    freeze_norm_stats: bool,
    superclasses: torch.Tensor | None,
) -> dict[str, float]:
    torch.manual_seed(seed)
    params = parameter_groups(model, cfg, trainable)
    if location is not None and cfg.location_weight > 0:
        params.append(
            {"params": [p for p in location.parameters() if p.requires_grad], "lr": cfg.lr_rest, "name": "location"}
        )
    optimizer = torch.optim.AdamW(params, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    model.train()
    if freeze_norm_stats:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    total_loss, seen = torch.zeros((), device=device), 0
    trained = [p for group in params if group["name"] != "location" for p in group["params"]]
    anchors = [(p, p.detach().clone()) for p in trained] if cfg.prox_mu > 0 else []  # FedProx's w_received
    for _ in range(cfg.epochs):
        for batch in loader:
            batch = to_device(batch, device)
            with autocast(device, cfg.precision):
                loss = batch_loss(model, batch, cfg, location, superclasses)
            if cfg.prox_mu > 0:  # FedProx (Li et al. 2020): stay near the model the round started from
                loss = loss + cfg.prox_mu / 2 * sum((p - a).pow(2).sum() for p, a in anchors)
            labels = batch[1]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach().float() * labels.numel()  # summed on the device: no sync per step
            seen += labels.numel()
    return {"train_loss": float(total_loss) / max(seen, 1), "examples": float(seen)}


def batch_loss(
    model: GeoMoENet,
    batch: tuple,
    cfg: TrainConfig,
    location: LocationSupervision | None = None,
    superclasses: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy, plus the location loss (Mensah et al. 2025) and, with per-image routing and `superclasses`
    (class -> super-class id), the super-class router loss (Mobile V-MoE) at their weights."""
    images, labels = batch[0], head_targets(batch[1], model.head.class_ids)
    if location is not None and cfg.location_weight > 0:
        logits, pre_mlp = model.forward_with_pre_mlp(images)
        loss = F.cross_entropy(logits.float(), labels) + cfg.location_weight * location.loss(pre_mlp, batch[2], labels)
    else:
        loss = F.cross_entropy(model(images).float(), labels)
    if superclasses is not None and model.cfg.routing == "image" and cfg.superclass_weight > 0:
        loss = loss + cfg.superclass_weight * router_supervision_loss(model, batch[1], superclasses)
    return loss


@torch.no_grad()
def evaluate(model: GeoMoENet, loader: Iterable, num_classes: int | None = None) -> dict[str, float | list[float]]:
    """Accuracy, loss and per-class recall of `model` (outputs mapped to global ids by the head), computed where
    the model is."""
    model.eval()
    device = model_device(model)
    class_ids = model.head.class_ids
    correct, total, loss_sum = 0, 0, 0.0
    num_classes = num_classes or int(class_ids.max()) + 1
    hits, counts = np.zeros(num_classes), np.zeros(num_classes)
    for batch in loader:
        images, labels = batch[0].to(device), batch[1]
        logits = model(images)
        local_targets = head_targets(labels, class_ids)
        loss_sum += float(F.cross_entropy(logits, local_targets, reduction="sum"))
        predicted = class_ids[logits.argmax(dim=1)].cpu()
        ok = (predicted == labels).numpy()
        correct += int(ok.sum())
        total += labels.numel()
        np.add.at(hits, labels.numpy(), ok)
        np.add.at(counts, labels.numpy(), 1)
    recall = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
    return {
        "accuracy": correct / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "examples": float(total),
        "recall": [float(r) for r in recall],
    }


def head_targets(labels: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """Head output index of each global label (on the head's device); labels a pruned head lacks map to its "other"
    output."""
    known = class_ids >= 0
    other = int((~known).nonzero()[0]) if (~known).any() else 0
    size = max(int(labels.max()) if labels.numel() else 0, int(class_ids.max())) + 1
    lookup = torch.full((size,), other, dtype=torch.long, device=class_ids.device)
    lookup[class_ids[known]] = known.nonzero().squeeze(1)
    return lookup[labels.to(class_ids.device)]
