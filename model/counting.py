"""Parameters and FLOPs of dense, MoE and pruned models (torch.utils.flop_counter).

FLOPs are those the implementation executes: the MoE dispatch computes every held expert's
hidden units and masks, so a pruned model is cheaper as well as smaller.
"""

from __future__ import annotations

import torch

from geomoe.model.experts import is_expert_key, take_expert_state
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
