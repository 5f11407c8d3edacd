"""Configuration of the geographic MoE model (Mensah et al. 2024, 2025).

One dataclass describes a model completely, so a checkpoint that stores it can rebuild the
network without the code that trained it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

AbsentPolicy = Literal["best_present", "remove"]
Routing = Literal["patch", "image"]
Head = Literal["linear", "bottleneck"]
Clustering = Literal["ward", "kmeans"]
ABSENT_POLICIES, ROUTINGS, HEADS, CLUSTERINGS = (get_args(t) for t in (AbsentPolicy, Routing, Head, Clustering))


@dataclass
class ModelConfig:
    """Shape of a MobileViTV2-0.5 with per-patch MoE layers."""

    __pydantic_config__ = {"extra": "forbid"}  # unknown keys are refused when pydantic builds it from a file

    num_classes: int = 32  # output species (plus nothing: "other" is added by head pruning)
    backbone: str = "mobilevitv2_050"  # timm model name of the dense backbone
    pretrained: bool = False  # load timm's ImageNet weights (needs them cached locally)
    pretrained_file: str | None = None  # backbone weights from a local file in timm's format (.pth, .bin, .safetensors)
    moe_layers: tuple[int, ...] = (1, 3, 5, 7)  # transformer layers 0..8 whose MLP becomes experts
    num_experts: int = 16  # experts per MoE layer in the global model
    expert_hidden: int = 2  # hidden units d_e of one expert MLP
    routing: Routing = "patch"  # "patch": one expert per patch (Mensah et al.); "image": one per image (Mobile V-MoE)
    gate_rank: int | None = None  # None: cosine router in feature space; r: low-rank (r) cosine gate (2025 paper: 8)
    gate_temperature: float = 0.01  # softmax temperature of the cosine router (learned from here)
    gamma_init: float = 0.9  # weight of the output correction X_corr at init
    absent_policy: AbsentPolicy = "best_present"  # a patch whose best expert is absent: "best_present" or "remove"
    head: Head = "linear"  # "linear" or "bottleneck" (256 -> 1024 -> 256 -> classes)
    drop_rate: float = 0.1  # dropout before the classifier
    expert_ids: dict[int, list[int]] = field(default_factory=dict)  # layer -> held global ids; empty: all
    head_classes: list[int] = field(default_factory=list)  # classes a pruned head keeps (+ "other"); empty: all

    def __post_init__(self) -> None:
        self.moe_layers = tuple(sorted(int(layer) for layer in self.moe_layers))
        self.expert_ids = {int(k): sorted(int(i) for i in v) for k, v in self.expert_ids.items()}
        if any(not 0 <= layer <= 8 for layer in self.moe_layers):
            raise ValueError(f"moe_layers must lie in 0..8 (MobileViTV2 has 9 transformer layers): {self.moe_layers}")
        if self.absent_policy not in ABSENT_POLICIES:
            raise ValueError(f"absent_policy {self.absent_policy!r} is not one of {ABSENT_POLICIES}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing {self.routing!r} is not one of {ROUTINGS}")
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r} is not one of {HEADS}")
        if self.num_experts < 1 or self.expert_hidden < 1:
            raise ValueError("num_experts and expert_hidden must be positive")
        if self.gate_rank is not None and self.gate_rank < 1:
            raise ValueError(f"gate_rank must be None (full-width router) or positive: {self.gate_rank}")
        self.head_classes = sorted(int(c) for c in self.head_classes)
        if any(not 0 <= c < self.num_classes for c in self.head_classes):
            raise ValueError(f"head_classes must lie in 0..{self.num_classes - 1}")
        for layer, ids in self.expert_ids.items():
            if layer not in self.moe_layers:
                raise ValueError(f"expert_ids names layer {layer}, which is not an MoE layer {self.moe_layers}")
            if not ids or any(not 0 <= i < self.num_experts for i in ids):
                raise ValueError(f"expert_ids[{layer}] must be a non-empty subset of 0..{self.num_experts - 1}")

    def head_outputs(self) -> list[int]:
        """Global class id of each head output; -1 is the "other" output of a pruned head."""
        return [*self.head_classes, -1] if self.head_classes else list(range(self.num_classes))

    def held_ids(self, layer: int) -> list[int]:
        """Global ids of the experts this model holds in `layer`."""
        return self.expert_ids.get(layer, list(range(self.num_experts)))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["moe_layers"] = list(self.moe_layers)
        data["expert_ids"] = {str(k): v for k, v in self.expert_ids.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)
