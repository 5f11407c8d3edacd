"""What a node is sent: its location's keep set of experts, the centroids of the experts it does not hold (so its
gates stay those of the full model), the head rows of its species and whatever shared tensors this run trains.
`strategy="fedavg"` sends every expert and head row to everyone. Flower-free: tensors in, tensors out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from geomoe.model.experts import KeepSet, global_centroids, shared_state, take_expert_state
from geomoe.model.network import GeoMoENet
from geomoe.server.replies import QueryReply
from geomoe.wire import messages as msg
from geomoe.wire.run_config import RunConfig

HEAD_ROWS = ("head.fc.weight", "head.fc.bias")


@dataclass
class NodeSlice:
    """One node's part of the global model, by message record."""

    experts: dict[str, torch.Tensor]  # its keep set, stacked per layer, with global ids
    router: dict[str, torch.Tensor]  # centroids of the experts it does not hold
    head: dict[str, torch.Tensor]  # its species' classifier rows and their ids (empty when the head is not trained)
    shared: dict[str, torch.Tensor]  # shared tensors trained this run

    def trained(self) -> dict[str, torch.Tensor]:
        """What the node trains and must send back deltas of, exactly."""
        return {**self.experts, **self.head, **self.shared}


class Slicer:
    """Cuts the global model into what each node holds; `keep` is the server's keep set per location."""

    def __init__(self, cfg: RunConfig, model: GeoMoENet, keep: dict[int, KeepSet]) -> None:
        self.cfg, self.model, self.keep = cfg, model, keep
        self.fed = cfg.federation

    @property
    def dense(self) -> bool:
        return self.fed.strategy == "fedavg"

    def all_experts(self) -> KeepSet:
        return {layer: list(range(self.cfg.model.num_experts)) for layer in self.cfg.model.moe_layers}

    def keep_known(self, node: QueryReply) -> bool:
        """Whether the node's location has a keep set (never-sampled cells, or a routing reply rejected or lost,
        have none)."""
        return self.dense or node.location in self.keep

    def keep_for(self, node: QueryReply) -> KeepSet:
        return self.all_experts() if self.dense else self.keep[node.location]

    def head_rows_for(self, node: QueryReply) -> list[int]:
        """Head rows a node trains: none under trainable="experts"; else every row (fedavg) or its species'."""
        if self.fed.trainable == "experts":
            return []
        return list(range(self.cfg.model.num_classes)) if self.dense else node.species

    def shared_trainable(self) -> list[str]:
        """Shared float tensors sent (and trained) every round: all of them under trainable="all", else none."""
        if self.fed.trainable != "all":
            return []
        return [k for k, v in shared_state(self.model).items() if v.is_floating_point() and k not in HEAD_ROWS]

    def slice_for(self, node: QueryReply) -> NodeSlice:
        keep = self.keep_for(node)
        router = {
            f"moe.{layer}.absent_centroids": global_centroids(module)[
                sorted(set(range(module.num_global_experts)) - set(keep[layer]))
            ]
            for layer, module in self.model.moe_layers().items()
        }
        state = self.model.state_dict()
        rows = torch.tensor(self.head_rows_for(node), dtype=torch.long)
        head = (
            {
                "head.fc.weight": state["head.fc.weight"][rows],
                "head.fc.bias": state["head.fc.bias"][rows],
                msg.HEAD_IDS: rows,
            }
            if len(rows)
            else {}
        )
        shared = {k: state[k].clone() for k in self.shared_trainable()}
        return NodeSlice(take_expert_state(self.model, keep), router, head, shared)

    def full_model(self) -> NodeSlice:
        """Every expert and no absent centroid: what a node routes its validation images with at set-up."""
        router = {
            f"moe.{layer}.absent_centroids": torch.zeros(0, m.dim) for layer, m in self.model.moe_layers().items()
        }
        return NodeSlice(take_expert_state(self.model, self.all_experts()), router, {}, {})

    def row_holders(self, population: list[QueryReply]) -> dict[str, torch.Tensor]:
        """How many of `population` hold each expert of each MoE layer (`moe.{layer}`) and each head row (`head`)."""
        holders = {}
        for layer, module in self.model.moe_layers().items():
            holders[f"moe.{layer}"] = torch.zeros(module.num_global_experts)
            for node in population:
                holders[f"moe.{layer}"][self.keep_for(node)[layer]] += 1
        holders["head"] = torch.zeros(self.cfg.model.num_classes)
        for node in population:
            holders["head"][self.head_rows_for(node)] += 1
        return holders
