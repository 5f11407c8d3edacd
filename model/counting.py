"""Parameters and FLOPs of dense, MoE and pruned models (torch.utils.flop_counter).

FLOPs are those the implementation executes: the MoE dispatch computes every held expert's
hidden units and masks, so a pruned model is cheaper as well as smaller.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from geomoe.model.config import ModelConfig
from geomoe.model.experts import is_expert_key, prune_model, take_expert_state
from geomoe.model.network import GeoMoENet


def parameter_count(model: GeoMoENet) -> int:
    return sum(p.numel() for p in model.parameters())


def expert_parameter_count(model: GeoMoENet) -> int:
    return sum(v.numel() for k, v in take_expert_state(model).items() if is_expert_key(k) and not k.endswith(".ids"))


@torch.no_grad()
def forward_flops(model: GeoMoENet, image_size: int) -> int:
    """FLOPs of one forward pass on one image."""
    # Imported here: torch 1.13 (Debian's, in the device image) has no flop counter; devices never count.
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError as missing:
        raise RuntimeError(
            f"counting FLOPs needs torch >= 2.1 (torch.utils.flop_counter); this is {torch.__version__}"
        ) from missing

    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return int(counter.get_total_flops())


def model_summary(model: GeoMoENet, image_size: int) -> dict[str, int]:
    return {
        "parameters": parameter_count(model),
        "expert_parameters": expert_parameter_count(model),
        "flops": forward_flops(model, image_size),
        "state_bytes": sum(v.numel() * v.element_size() for v in model.state_dict().values()),
    }


def size_comparison(cfg: ModelConfig, keep: int, image_size: int) -> dict[str, dict[str, int]]:
    """Summaries of the dense model, the MoE model of `cfg`, and that MoE pruned to its first `keep` experts per
    layer: the rows of the papers' size tables."""
    if not 1 <= keep <= cfg.num_experts:
        raise ValueError(f"keep must lie in 1..{cfg.num_experts}, got {keep}")
    dense = GeoMoENet(replace(cfg, moe_layers=(), expert_ids={}))
    moe = GeoMoENet(cfg)
    pruned = prune_model(moe, {layer: list(range(keep)) for layer in cfg.moe_layers})
    return {
        name: model_summary(m, image_size) for name, m in (("dense", dense), ("moe", moe), (f"pruned_{keep}", pruned))
    }


def expert_bytes(model: GeoMoENet) -> dict[int, int]:
    """Bytes of one expert's state in each MoE layer, at the dtype the model holds."""
    state = take_expert_state(model, {layer: [model.cfg.held_ids(layer)[0]] for layer in model.cfg.moe_layers})
    return {
        layer: sum(
            v.numel() * v.element_size()
            for k, v in state.items()
            if k.startswith(f"moe.{layer}.") and not k.endswith(".ids")
        )
        for layer in model.cfg.moe_layers
    }


@torch.no_grad()
def _patch_grid(model: GeoMoENet, image_size: int) -> dict[int, tuple[int, int]]:
    """(pixels per patch P, patches per image N) of each MoE layer for one image of `image_size` pixels."""
    model.eval()
    _, pre_mlp = model.forward_with_pre_mlp(torch.zeros(1, 3, image_size, image_size))
    return {layer: tuple(pre_mlp[layer].shape[2:]) for layer in model.cfg.moe_layers}  # [B, C, P, N]


def tokens_per_patch(model: GeoMoENet, image_size: int) -> dict[int, int]:
    """Pixel tokens in one patch of each MoE layer: what a patch routed to a peer's expert sends."""
    return {layer: p for layer, (p, _) in _patch_grid(model, image_size).items()}


def tokens_per_image(model: GeoMoENet, image_size: int) -> dict[int, int]:
    """Pixel tokens each MoE layer routes for one image: the most routing counts an image can add there."""
    return {layer: p * n for layer, (p, n) in _patch_grid(model, image_size).items()}
