"""How a round's accepted updates move the global model: every tensor as rows (experts and head rows of their
stacked tensors, a shared tensor as one row), each row by the mean (or a robust or a noisy mean) over the nodes
that held it, through the server optimiser. Flower-free: parsed replies in, the model changed in place."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch

from geomoe.model.moe_layer import EXPERT_PARAMS
from geomoe.server.aggregation import RowUpdate, mean_row_delta, noisy_row_mean, robust_row_delta
from geomoe.server.privacy import RoundMechanism, next_clip, update_noise_multiplier
from geomoe.server.replies import QueryReply, TrainReply
from geomoe.server.server_optimizer import ServerOptimizer
from geomoe.server.slicing import HEAD_ROWS, Slicer
from geomoe.server.state import ServerState
from geomoe.wire import messages as msg

log = logging.getLogger("geomoe.server")

Accepted = list[tuple[QueryReply, TrainReply]]


class ModelUpdater:
    """Applies accepted updates to the slicer's model; keeps the optimiser's and the privacy state in `state`."""

    def __init__(self, slicer: Slicer, state: ServerState) -> None:
        self.slicer, self.model, self.state = slicer, slicer.model, state
        self.fed, self.privacy = slicer.cfg.federation, slicer.cfg.privacy
        self.optimizer = ServerOptimizer(self.fed.server_optimizer, self.fed.server_lr)
        self.optimizer.load_state_dict(state.optimizer)
        # DP noise must not be predictable from the run's seed.
        self.noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(6), "little"))
        self.thin_rows_told = False  # DP rows that expect under one holder a round: said once (tell_of_thin_rows)

    def row_groups(
        self, accepted: Accepted, population: list[QueryReply]
    ) -> Iterator[tuple[str, torch.Tensor, list[RowUpdate], torch.Tensor]]:
        """Every tensor a round may change, as rows: (name, target, the replies' row updates, how many nodes of
        the round's population hold each row). Update weights are the reader's bounded counts: routed tokens, or
        examples."""
        holders = self.slicer.row_holders(population)
        for layer, module in self.model.moe_layers().items():
            ids_key = f"moe.{layer}.ids"
            for param in EXPERT_PARAMS:
                updates = [
                    RowUpdate(r.update[ids_key], r.update[f"moe.{layer}.{param}"], self.expert_weight(r, layer))
                    for _, r in accepted
                    if ids_key in r.update
                ]
                yield f"moe.{layer}.{param}", getattr(module, param).data, updates, holders[f"moe.{layer}"]
        for name in HEAD_ROWS:
            updates = [
                RowUpdate(rows, r.update[name], torch.full((len(rows),), r.examples))
                for _, r in accepted
                if (rows := r.update.get(msg.HEAD_IDS)) is not None
            ]
            yield name, self.model.get_parameter(name).data, updates, holders["head"]
        state = self.model.state_dict()
        for name in self.slicer.shared_trainable():
            updates = [
                RowUpdate(torch.zeros(1, dtype=torch.long), r.update[name].unsqueeze(0), torch.tensor([r.examples]))
                for _, r in accepted
                if name in r.update
            ]
            yield name, state[name].unsqueeze(0), updates, torch.tensor([float(len(population))])

    def expert_weight(self, reply: TrainReply, layer: int) -> torch.Tensor:
        ids = reply.update[f"moe.{layer}.ids"]
        if self.fed.weighting == "tokens":
            return reply.token_counts[layer][ids].float()
        return torch.full((len(ids),), reply.examples)

    def apply(self, accepted: Accepted, population: list[QueryReply]) -> None:
        """Per-row weighted mean (or coordinate-wise median / trimmed mean) over each row's holders."""
        for name, target, updates, _ in self.row_groups(accepted, population):
            if self.fed.aggregator == "mean":
                delta, touched = mean_row_delta(target.shape[0], updates)
            else:
                delta, touched = robust_row_delta(
                    target.shape[0], updates, self.fed.aggregator, self.fed.trim_fraction, self.fed.robust_min_holders
                )
            if delta is not None:
                self.optimizer.apply(name, target, delta, touched)
        self.state.optimizer = self.optimizer.state_dict()

    def apply_private(self, accepted: Accepted, population: list[QueryReply], sampling_rate: float) -> None:
        """One DP round: noisy per-row sums of the clipped updates over fixed denominators, then the accounting
        and (with adaptive clipping) the next round's clip. Noise is released even when no node took part."""
        expected_nodes = sampling_rate * len(population)
        if not self.thin_rows_told:
            self.tell_of_thin_rows(population, sampling_rate)
        z = update_noise_multiplier(self.privacy, expected_nodes)
        std = z * self.state.clip_norm if self.privacy.noise == "central" else 0.0  # local: the devices added it
        for name, target, updates, holders in self.row_groups(accepted, population):
            delta, touched = noisy_row_mean(tuple(target.shape), updates, holders * sampling_rate, std, self.noise)
            self.optimizer.apply(name, target, delta, touched)
        self.state.optimizer = self.optimizer.state_dict()
        if self.privacy.accounted and self.privacy.noise == "central":
            self.state.mechanisms.append(vars(RoundMechanism(sampling_rate, self.privacy.noise_multiplier)))
        for node, _ in accepted:
            self.state.rounds_taken[node.name] = self.state.rounds_taken.get(node.name, 0) + 1
        if self.privacy.adaptive_clip:
            unclipped = sum(reply.unclipped for _, reply in accepted)
            self.state.clip_norm = next_clip(self.privacy, self.state.clip_norm, unclipped, expected_nodes, self.noise)

    def tell_of_thin_rows(self, population: list[QueryReply], sampling_rate: float) -> None:
        """Say, once a run, how many held rows expect fewer than one holder a round under DP. Their noise is not
        averaged down (its denominator is 1), and in many rounds no holder of theirs is sampled, so a few thinly
        held species rows can ruin the global model (docs: Privacy and robustness)."""
        self.thin_rows_told = True
        expected = {name: counts * sampling_rate for name, counts in self.slicer.row_holders(population).items()}
        head = expected.pop("head")
        experts = torch.cat(list(expected.values()))
        held_experts, held_rows = int((experts > 0).sum()), int((head > 0).sum())
        thin_experts, thin_rows = int(((experts > 0) & (experts < 1)).sum()), int(((head > 0) & (head < 1)).sum())
        if thin_experts or thin_rows:
            log.warning(
                "DP at q = %.2g: %d of %d held experts and %d of %d held species rows expect fewer than one holder a "
                "round: their noise is not averaged down, and in many rounds it is all that moves them; sample more "
                'nodes a round, or leave the head rows out of training (federation.trainable = "experts")',
                sampling_rate, thin_experts, held_experts, thin_rows, held_rows,
            )  # fmt: skip
