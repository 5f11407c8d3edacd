"""The experts a device serves to its peers, with the gradient bookkeeping of a distributed step.

Forward and backward run the same batched dispatch as a local MoE layer. Backward recomputes the
forward pass (the server keeps no activations between calls), returns the gradient with respect to
the tokens, and adds the parameter gradients to what that caller's earlier backward calls left;
`step` applies that caller's gradients only, so two peers training at once never mix their steps.
A training step split across devices therefore equals the same step on one device.

A caller holding the fleet token is still not trusted with the served experts: gradients must be finite (one
Backward with huge finite grad_outputs overflows them), a step's gradient norm is capped, and a step that would
leave any served parameter non-finite is reverted and refused. Gradients are kept per caller (its connection) and
per session: a caller's sessions evict only each other, so nobody can drop another caller's gradients by opening
sessions; a caller idle longer than CALLER_IDLE_S gives its slot up to a new one.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict

import torch

from geomoe.model.moe_layer import EXPERT_PARAMS, MoEMlp
from geomoe.model.network import GeoMoENet

MAX_SESSIONS_PER_CALLER = 4  # sessions of one caller whose gradients are kept; its longest idle one goes beyond
MAX_CALLERS = 32  # callers holding gradients at once; a new one beyond is refused unless one has gone idle
CALLER_IDLE_S = 600.0  # a caller without a call for this long may lose its gradients to a new caller
MAX_LR = 1.0  # the largest learning rate a caller may ask `step` for
MAX_STEP_NORM = 100.0  # a step's gradient (all its tensors together) is scaled down to this L2 norm at most
Gradients = dict[tuple[int, str], torch.Tensor]  # (layer, parameter) -> gradient of the served experts


class ExpertHost:
    """Thread-safe forward / backward / step over the MoE layers of `model`, gradients kept per caller session."""

    def __init__(self, model: GeoMoENet) -> None:
        self.model = model.eval()
        self.layers: dict[int, MoEMlp] = model.moe_layers()
        self.lock = threading.Lock()
        self.callers: dict[str, OrderedDict[str, Gradients]] = {}  # caller -> its sessions, least recent first
        self.last_call: dict[str, float] = {}  # caller -> monotonic time of its last backward or step
        for module in self.layers.values():
            for name in EXPERT_PARAMS:
                getattr(module, name).requires_grad_(True)

    def describe(self) -> dict[int, list[int]]:
        return {layer: module.expert_ids.tolist() for layer, module in self.layers.items()}

    def _local_choice(self, layer: int, expert_ids: torch.Tensor, tokens: torch.Tensor) -> tuple[MoEMlp, torch.Tensor]:
        """The layer and each token's local expert row; ValueError unless the request fits what is served."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not an MoE layer here (have {sorted(self.layers)})")
        module = self.layers[layer]
        if tokens.dim() != 3 or tokens.shape[-1] != module.dim:
            raise ValueError(f"layer {layer} takes (T, P, C) tokens of width {module.dim}, got {tuple(tokens.shape)}")
        if expert_ids.numel() != tokens.shape[0]:
            raise ValueError(f"{expert_ids.numel()} expert ids for {tokens.shape[0]} tokens")
        held = module.expert_ids.tolist()
        unknown = sorted(set(expert_ids.tolist()) - set(held))
        if unknown:
            raise ValueError(f"experts {unknown} of layer {layer} are not served here (serving {held})")
        position = {e: i for i, e in enumerate(held)}
        return module, torch.tensor([position[e] for e in expert_ids.tolist()], dtype=torch.long)

    def check(self, layer: int, expert_ids: torch.Tensor, tokens: torch.Tensor) -> None:
        """Raise ValueError unless a request fits: checked before it joins a batch, where ids and tokens of another
        length would shift every other caller's tokens onto the wrong experts."""
        self._local_choice(layer, expert_ids, tokens)

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
        caller: str = "",
    ) -> torch.Tensor:
        """Gradient w.r.t. tokens; parameter gradients accumulate in `caller`'s `session` until its `step`.
        Gradients that are not finite are refused, not kept."""
        module, choice = self._local_choice(layer, expert_ids, tokens)
        if grad_outputs.shape != tokens.shape:
            raise ValueError(f"grad_outputs {tuple(grad_outputs.shape)} must match tokens {tuple(tokens.shape)}")
        params = [getattr(module, name) for name in EXPERT_PARAMS]
        with self.lock:
            tokens = tokens.clone().requires_grad_(True)
            with torch.enable_grad():
                outputs = token_outputs(module, tokens, choice)
                grads = torch.autograd.grad(outputs, [tokens, *params], grad_outputs, allow_unused=True)
            if not all(torch.isfinite(g).all() for g in grads if g is not None):
                raise ValueError("these grad_outputs make gradients that are not finite: refused")
            kept = self._session(caller, session)
            for name, grad in zip(EXPERT_PARAMS, grads[1:], strict=True):
                if grad is not None:
                    key = (layer, name)
                    kept[key] = kept[key] + grad if key in kept else grad.clone()
            return grads[0]

    def _session(self, caller: str, session: str) -> Gradients:
        """`caller`'s gradients of `session` (made if new), under the caps on sessions and callers (lock held)."""
        now = time.monotonic()
        if caller not in self.callers and len(self.callers) >= MAX_CALLERS:
            idle = min(self.callers, key=lambda c: self.last_call[c])
            if now - self.last_call[idle] < CALLER_IDLE_S:
                raise ValueError(f"{MAX_CALLERS} callers already hold gradients here; try again later")
            del self.callers[idle], self.last_call[idle]
        sessions = self.callers.setdefault(caller, OrderedDict())
        self.last_call[caller] = now
        kept = sessions.setdefault(session, {})
        sessions.move_to_end(session)
        while len(sessions) > MAX_SESSIONS_PER_CALLER:
            sessions.popitem(last=False)
        return kept

    def gradients(self, layer: int) -> dict[str, torch.Tensor | None]:
        """The gradients all sessions keep for `layer`, summed (None: none)."""
        out: dict[str, torch.Tensor | None] = dict.fromkeys(EXPERT_PARAMS)
        with self.lock:
            for sessions in self.callers.values():
                for kept in sessions.values():
                    for (held_layer, name), grad in kept.items():
                        if held_layer == layer:
                            out[name] = grad.clone() if out[name] is None else out[name] + grad
        return out

    def step(self, lr: float, session: str = "", caller: str = "") -> int:
        """SGD on `caller`'s `session`'s kept gradients, their joint norm capped at MAX_STEP_NORM (lr 0 only clears
        them); the number of tensors updated. A step that would make a served parameter non-finite is undone and
        refused."""
        if not (math.isfinite(lr) and 0.0 <= lr <= MAX_LR):
            raise ValueError(f"learning rate {lr} must lie in [0, {MAX_LR}]")
        with self.lock, torch.no_grad():
            kept = self.callers.get(caller, OrderedDict()).pop(session, {})
            if caller in self.callers:
                self.last_call[caller] = time.monotonic()
            norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in kept.values()))
            scale = lr * min(1.0, MAX_STEP_NORM / norm) if norm > 0 else 0.0
            before = {key: getattr(self.layers[key[0]], key[1]).clone() for key in kept}
            for (layer, name), grad in kept.items():
                getattr(self.layers[layer], name).sub_(scale * grad)
            if not all(torch.isfinite(getattr(self.layers[layer], name)).all() for layer, name in kept):
                for (layer, name), value in before.items():
                    getattr(self.layers[layer], name).copy_(value)
                raise ValueError("this step would make served experts non-finite: refused and undone")
        return len(kept)


def token_outputs(module: MoEMlp, tokens: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """(T, P, C) tokens through their experts `choice` (T,), before the gate (peers return outputs ungated: the
    caller applies it), in the layer's channel-first layout: the T tokens are one image of T patches."""
    gate = torch.ones((1, len(choice)))
    outputs = module.expert_outputs(tokens.permute(2, 1, 0)[None], choice[None], gate)  # [1, C, P, T]
    return outputs[0].permute(2, 1, 0)  # [C, P, T] --> [T, P, C]
