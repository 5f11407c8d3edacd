"""The experts a device serves to its peers, with the gradient bookkeeping of a distributed step.

Forward and backward run the same batched dispatch as a local MoE layer. Backward recomputes the
forward pass (the server keeps no activations between calls), returns the gradient with respect to
the tokens, and adds the parameter gradients to what earlier backward calls left; `step` applies
them. A training step split across devices therefore equals the same step on one device.
"""

from __future__ import annotations

import threading

import torch

from geomoe.model.moe_layer import EXPERT_PARAMS, MoEMlp
from geomoe.model.network import GeoMoENet


class ExpertHost:
    """Thread-safe forward / backward / step over the MoE layers of `model`."""

    def __init__(self, model: GeoMoENet) -> None:
        self.model = model.eval()
        self.layers: dict[int, MoEMlp] = model.moe_layers()
        self.lock = threading.Lock()
        for module in self.layers.values():
            for name in EXPERT_PARAMS:
                getattr(module, name).requires_grad_(True)

    def describe(self) -> dict[int, list[int]]:
        return {layer: module.expert_ids.tolist() for layer, module in self.layers.items()}

    def _local_choice(self, layer: int, expert_ids: torch.Tensor, tokens: torch.Tensor) -> tuple[MoEMlp, torch.Tensor]:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not an MoE layer here (have {sorted(self.layers)})")
        module = self.layers[layer]
        if tokens.shape[-1] != module.dim:
            raise ValueError(f"layer {layer} takes tokens of width {module.dim}, got {tokens.shape[-1]}")
        if expert_ids.numel() != tokens.shape[0]:
            raise ValueError(f"{expert_ids.numel()} expert ids for {tokens.shape[0]} tokens")
        held = module.expert_ids.tolist()
        unknown = sorted(set(expert_ids.tolist()) - set(held))
        if unknown:
            raise ValueError(f"experts {unknown} of layer {layer} are not served here (serving {held})")
        position = {e: i for i, e in enumerate(held)}
        return module, torch.tensor([position[e] for e in expert_ids.tolist()], dtype=torch.long)

    def forward(self, layer: int, expert_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(T, P, C) tokens -> (T, P, C) expert outputs with output correction, before the gate."""
        module, choice = self._local_choice(layer, expert_ids, tokens)
        with self.lock, torch.no_grad():
            return module.expert_outputs(tokens[None], choice[None])[0]  # [1, T, P, C] --> [T, P, C]

    def backward(
        self, layer: int, expert_ids: torch.Tensor, tokens: torch.Tensor, grad_outputs: torch.Tensor
    ) -> torch.Tensor:
        """Gradient w.r.t. tokens; parameter gradients accumulate until `step`."""
        module, choice = self._local_choice(layer, expert_ids, tokens)
        if grad_outputs.shape != tokens.shape:
            raise ValueError(f"grad_outputs {tuple(grad_outputs.shape)} must match tokens {tuple(tokens.shape)}")
        with self.lock:
            tokens = tokens.clone().requires_grad_(True)
            with torch.enable_grad():
                outputs = module.expert_outputs(tokens[None], choice[None])[0]
                outputs.backward(grad_outputs)
            return tokens.grad

    def gradients(self, layer: int) -> dict[str, torch.Tensor | None]:
        module = self.layers[layer]
        return {name: getattr(module, name).grad for name in EXPERT_PARAMS}

    def step(self, lr: float) -> int:
        """SGD on the kept gradients (lr 0 only clears them); returns the number of tensors updated."""
        updated = 0
        with self.lock, torch.no_grad():
            for module in self.layers.values():
                for name in EXPERT_PARAMS:
                    param = getattr(module, name)
                    if param.grad is not None:
                        param -= lr * param.grad
                        param.grad = None
                        updated += 1
        return updated
