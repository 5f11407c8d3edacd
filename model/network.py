"""MobileViTV2-0.5 (timm) with chosen transformer MLPs swapped for per-patch MoE layers.

A dense model is the same network with no MoE layers (`moe_layers=()`), so conversion, counting
and federated training handle both with one class. The 9 transformer layers are addressed 0..8
across MobileViTV2's three transformer blocks (2, 4 and 3 layers; widths 64, 96, 128).
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from geomoe.model.config import ModelConfig
from geomoe.model.moe_layer import MoEMlp

FEATURE_DIM = 256  # pooled feature width of mobilevitv2_050


def transformer_layers(backbone: nn.Module) -> list[nn.Module]:
    """The LinearTransformerBlocks of a timm MobileViTV2, in forward order (layers 0..8)."""
    return [m for m in backbone.modules() if type(m).__name__ == "LinearTransformerBlock"]


def layer_widths(backbone: nn.Module) -> list[int]:
    return [layer.norm2.num_channels for layer in transformer_layers(backbone)]


def layer_blocks(backbone: nn.Module) -> list[int]:
    """Index of the transformer block (0, 1, 2) each layer belongs to."""
    widths = layer_widths(backbone)
    distinct = sorted(set(widths))
    return [distinct.index(w) for w in widths]


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """timm's MobileViTV2; with `pretrained_file`, weights from that file (machines with no hub access);
    with `pretrained`, timm's ImageNet weights from the local Hugging Face cache."""
    if cfg.pretrained_file:
        return _backbone_from_file(cfg.backbone, Path(cfg.pretrained_file))
    try:
        return timm.create_model(cfg.backbone, pretrained=cfg.pretrained, num_classes=0)
    except (OSError, RuntimeError) as error:
        if not cfg.pretrained:
            raise
        raise RuntimeError(
            f"pretrained weights of {cfg.backbone} are not in the local cache ({type(error).__name__}); "
            f"fetch them once where the Hugging Face hub is reachable "
            f"(timm.create_model('{cfg.backbone}', pretrained=True)), copy ~/.cache/huggingface here, "
            "set model.pretrained_file to a local copy, or set model.pretrained=false"
        ) from None


def _backbone_from_file(name: str, path: Path) -> nn.Module:
    """Weights in any format timm reads (a bare or wrapped state dict, .safetensors); every backbone tensor
    must be there with its shape, and nothing else but the ImageNet classifier timm's own files carry."""
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained_file: {path}: no such file")
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    classifier = str(backbone.pretrained_cfg.get("classifier", "head.fc"))
    try:
        state = timm.models.load_state_dict(str(path))
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, struct.error, pickle.UnpicklingError) as error:
        raise ValueError(f"model.pretrained_file: {path} cannot be read as weights: {error}") from None
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip())[:300]
        raise ValueError(f"model.pretrained_file: {path} does not fit the backbone {name}: {detail}") from None
    return backbone


class ClassifierHead(nn.Module):
    """Linear or bottleneck (256 -> 1024 -> 256 -> classes) head; outputs carry global class ids."""

    def __init__(self, kind: str, class_ids: list[int], drop_rate: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        if kind == "bottleneck":
            self.body: nn.Module = nn.Sequential(
                nn.Linear(FEATURE_DIM, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU()
            )
        else:
            self.body = nn.Identity()
        self.fc = nn.Linear(FEATURE_DIM, len(class_ids))
        # Global class id of each output; -1 marks the "other" output of a pruned head.
        self.register_buffer("class_ids", torch.tensor(class_ids, dtype=torch.long))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.drop(features)))


class GeoMoENet(nn.Module):
    """Backbone + optional MoE layers + classifier head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(cfg)
        self.head = ClassifierHead(cfg.head, cfg.head_outputs(), cfg.drop_rate)
        self.widths = layer_widths(self.backbone)
        self.blocks = layer_blocks(self.backbone)
        for layer in cfg.moe_layers:
            block = transformer_layers(self.backbone)[layer]
            block.norm2 = nn.Identity()  # normalisation moves into the MoE layer (per-expert affine)
            block.mlp = MoEMlp(
                self.widths[layer],
                cfg.held_ids(layer),
                cfg.num_experts,
                cfg.expert_hidden,
                cfg.gate_rank,
                cfg.gate_temperature,
                cfg.gamma_init,
                cfg.absent_policy,
                cfg.routing,
            )
        self._captured: dict[int, torch.Tensor] | None = None
        for index, block in enumerate(transformer_layers(self.backbone)):
            block.norm2.register_forward_pre_hook(self._capture_hook(index))

    def _capture_hook(self, index: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if self._captured is not None:
                self._captured[index] = args[0]

        return hook

    def moe_layers(self) -> dict[int, MoEMlp]:
        """MoE layer modules by transformer layer index."""
        layers = transformer_layers(self.backbone)
        return {index: layers[index].mlp for index in self.cfg.moe_layers}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def forward_with_pre_mlp(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits and each layer's normalised pre-MLP tokens (B, C, P, N), as the router sees them."""
        self._captured = {}
        try:
            logits = self(images)
            pre_mlp = {i: F.group_norm(x, 1, eps=1e-5) for i, x in self._captured.items()}
        finally:
            self._captured = None
        return logits, pre_mlp


@torch.no_grad()
def prune_head(model: GeoMoENet, classes: list[int]) -> GeoMoENet:
    """A model whose head keeps only `classes` plus one "other" output (in place of the dropped rows).

    "other" starts as the mean of the dropped rows, its bias raised by log(count), so its logit
    approximates the pooled evidence for any species this location has not seen.
    """
    keep = sorted(set(classes))
    source = model.head.class_ids.tolist()
    missing = sorted(set(keep) - set(source))
    if missing:
        raise KeyError(f"classes {missing} are not outputs of this head")
    pruned = GeoMoENet(ModelConfig.from_dict({**model.cfg.to_dict(), "head_classes": keep}))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.fc.") and k != "head.class_ids"}
    pruned.load_state_dict(state, strict=False)
    rows = torch.tensor([source.index(c) for c in keep])
    dropped = torch.tensor([i for i, c in enumerate(source) if c not in keep])
    weight, bias = model.head.fc.weight, model.head.fc.bias
    pruned.head.fc.weight[:-1] = weight[rows]
    pruned.head.fc.bias[:-1] = bias[rows]
    if len(dropped):
        pruned.head.fc.weight[-1] = weight[dropped].mean(dim=0)
        pruned.head.fc.bias[-1] = bias[dropped].mean() + torch.log(torch.tensor(float(len(dropped))))
    else:
        pruned.head.fc.bias[-1] = -1e4  # nothing was dropped: "other" never wins
    return pruned
