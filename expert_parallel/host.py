"""The experts a device serves to its peers, with the gradient bookkeeping of a distributed step.

Forward and backward run the same batched dispatch as a local MoE layer. Backward recomputes the
forward pass (the server keeps no activations between calls), returns the gradient with respect to
the tokens, and adds the parameter gradients to what that caller's earlier backward calls left;
`step` applies that caller's gradients only, so two peers training at once never mix their steps.
A training step split across devices therefore equals the same step on one device.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch

from geomoe.model.moe_layer import EXPERT_PARAMS, MoEMlp
from geomoe.model.network import GeoMoENet

MAX_SESSIONS = 16  # callers whose gradients are kept at once; the longest idle one's are dropped beyond that
MAX_LR = 1.0  # the largest learning rate a caller may ask `step` for


class ExpertHost:
    """Thread-safe forward / backward / step over the MoE layers of `model`, gradients kept per caller session."""

    def __init__(self, model: GeoMoENet) -> None:
        self.model = model.eval()
        self.layers: dict[int, MoEMlp] = model.moe_layers()
        self.lock = threading.Lock()
        self.sessions: OrderedDict[str, dict[tuple[int, str], torch.Tensor]] = OrderedDict()
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
            return token_outputs(module, tokens, choice)

    def backward(
        self,
        layer: int,
        expert_ids: torch.Tensor,
        tokens: torch.Tensor,
        grad_outputs: torch.Tensor,
        session: str = "",
    ) -> torch.Tensor:
        """Gradient w.r.t. tokens; parameter gradients accumulate in `session` until its `step`."""
        module, choice = self._local_choice(layer, expert_ids, tokens)
        if grad_outputs.shape != tokens.shape:
            raise ValueError(f"grad_outputs {tuple(grad_outputs.shape)} must match tokens {tuple(tokens.shape)}")
        params = [getattr(module, name) for name in EXPERT_PARAMS]
        with self.lock:
            tokens = tokens.clone().requires_grad_(True)
            with torch.enable_grad():
                outputs = token_outputs(module, tokens, choice)
                grads = torch.autograd.grad(outputs, [tokens, *params], grad_outputs, allow_unused=True)
            kept = self.sessions.setdefault(session, {})
            self.sessions.move_to_end(session)
            for name, grad in zip(EXPERT_PARAMS, grads[1:], strict=True):
                if grad is not None:
                    key = (layer, name)
                    kept[key] = kept[key] + grad if key in kept else grad.clone()
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
            return grads[0]

    def gradients(self, layer: int) -> dict[str, torch.Tensor | None]:
        """The gradients all sessions keep for `layer`, summed (None: none)."""
        out: dict[str, torch.Tensor | None] = dict.fromkeys(EXPERT_PARAMS)
        with self.lock:
            for kept in self.sessions.values():
                for (held_layer, name), grad in kept.items():
                    if held_layer == layer:
                        out[name] = grad.clone() if out[name] is None else out[name] + grad
        return out

    def step(self, lr: float, session: str = "") -> int:
        """SGD on `session`'s kept gradients (lr 0 only clears them); the number of tensors updated."""
        if not (math.isfinite(lr) and 0.0 <= lr <= MAX_LR):
            raise ValueError(f"learning rate {lr} must lie in [0, {MAX_LR}]")
        with self.lock, torch.no_grad():
            kept = self.sessions.pop(session, {})
            for (layer, name), grad in kept.items():
                getattr(self.layers[layer], name).sub_(lr * grad)
        return len(kept)


def token_outputs(module: MoEMlp, tokens: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """(T, P, C) tokens through their experts `choice` (T,), before the gate (peers return outputs ungated: the
    caller applies it), in the layer's channel-first layout: the T tokens are one image of T patches."""
    gate = torch.ones((1, len(choice)))
    outputs = module.expert_outputs(tokens.permute(2, 1, 0)[None], choice[None], gate)  # [1, C, P, T]
    return outputs[0].permute(2, 1, 0)  # [C, P, T] --> [T, P, C]
