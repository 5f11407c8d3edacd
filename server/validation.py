"""Checks on a client's reply before it may touch the global model.

A reply must carry deltas for exactly the tensors its node was sent to train, with the same
shapes, dtypes and row ids, all finite, and not be absurdly large. Anything else is rejected
with a reason; the round goes on with the other replies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SentSpec:
    """What a node was sent to train: tensor name -> (shape, dtype), ids arrays by name, bytes sent."""

    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    ids: dict[str, torch.Tensor]
    trainable_bytes: int


class RejectedReply(ValueError):
    """A reply that must not be aggregated; the message says why."""


def spec_of(tensors: dict[str, torch.Tensor]) -> SentSpec:
    ids = {k: v.clone() for k, v in tensors.items() if k.endswith(".ids")}
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return SentSpec(shapes, ids, sum(v.numel() * v.element_size() for v in tensors.values()))


REPLY_ALLOWANCE = 64 * 1024  # bytes a reply may carry besides its update (metrics, routing counts)


def check_size(reply_bytes: int, sent: SentSpec, max_ratio: float) -> None:
    """Reject a reply far larger than what its node was sent to train, before decoding it."""
    limit = max_ratio * sent.trainable_bytes + REPLY_ALLOWANCE
    if reply_bytes > limit:
        raise RejectedReply(
            f"reply of {reply_bytes} bytes exceeds {limit:.0f} (sent {sent.trainable_bytes} bytes to train)"
        )


def check_update(update: dict[str, torch.Tensor], sent: SentSpec) -> None:
    """Raise RejectedReply unless `update` matches what was sent."""
    unknown = sorted(set(update) - set(sent.shapes))
    if unknown:
        raise RejectedReply(f"unknown or unsent tensors: {unknown[:3]}")
    missing = sorted(set(sent.shapes) - set(update))
    if missing:
        raise RejectedReply(f"missing tensors: {missing[:3]}")
    for name, tensor in update.items():
        shape, dtype = sent.shapes[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RejectedReply(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, sent {shape} {dtype}")
        if name in sent.ids:
            if not torch.equal(tensor, sent.ids[name]):
                raise RejectedReply(f"{name}: reply names rows {tensor.tolist()[:5]} it was not given")
        elif tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RejectedReply(f"{name}: contains NaN or Inf")
