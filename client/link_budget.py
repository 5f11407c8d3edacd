"""Fitting an update to a link with a byte budget per online window (`world.link = "lora@10kB"`, or a device's own
node config `link`): a LoRa-class device may send only so much in one window under its duty-cycle limit.

The node packs its reply with the run's codec. If the reply is larger than the budget, it tightens the codec's top-k
to the largest fraction at which the reply fits, down to `federation.link_min_topk` (tighter, an update would lose
too much of itself). If the reply does not fit even then, it goes at that fraction and is deferred: its upload takes
the following windows too, a budget's worth each. Either way nothing is dropped for good: what top-k leaves out, the
error feedback adds to the next update. The node says which in its log and in its reply: the codec's pipeline names
the top-k it packed with, and metric `link-windows` the windows its upload takes (1: it fits this one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import RecordDict

from geomoe.wire import messages as msg
from geomoe.wire.compression import ErrorFeedback, Pipeline
from geomoe.world.links import parse_link

log = logging.getLogger("geomoe.client")
SEARCH_STEPS = 12  # bisection steps over the top-k fraction (log scale): a fraction within ~1% of the largest fit
FRACTION_DIGITS = 3  # significant digits of a searched fraction: it travels as text in the codec


def window_budget(node_config: Mapping[str, object], world_link: str) -> int | None:
    """This node's bytes per online window: of its node config `link` (a device knows its own radio), else of the
    run's `world.link` (every simulated node); None: its link has no budget."""
    source, text = ("node config link", node_config["link"]) if "link" in node_config else ("world.link", world_link)
    try:
        return parse_link(str(text)).budget_bytes
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


@dataclass(frozen=True)
class LinkFit:
    """How an update went out over a budgeted link."""

    pipeline: str  # the codec it was packed with
    reply_bytes: int  # the whole reply, as Flower serialises it
    budget_bytes: int | None
    windows: int  # online windows its upload takes (1: it fits this one)
    choice: str  # "fits" | "compressed" (a tighter top-k) | "deferred" (more than one window)


def pack_to_fit(
    reply: RecordDict,
    deltas: dict[str, torch.Tensor],
    run_pipeline: str,
    feedback: ErrorFeedback,
    budget_bytes: int | None,
    min_topk: float,
) -> LinkFit:
    """Put `deltas` into `reply` as the update, packed to fit `budget_bytes` (None: the run's codec as it is)."""
    reply[msg.METRICS]["link-windows"] = 1.0  # said at the end; a float's bytes do not depend on its value
    if budget_bytes is None or _trial(reply, deltas, run_pipeline, feedback) <= budget_bytes:
        return _packed(reply, deltas, run_pipeline, feedback, budget_bytes, "fits")  # no budget: packed once
    run = Pipeline.parse(run_pipeline)
    widest = run.topk or 1.0
    floor = str(Pipeline(min(min_topk, widest), run.quantizer, run.zstd))
    if _trial(reply, deltas, floor, feedback) > budget_bytes:
        return _packed(reply, deltas, floor, feedback, budget_bytes, "deferred")
    fitting, low, high = floor, math.log(min(min_topk, widest)), math.log(widest)
    for _ in range(SEARCH_STEPS):  # the reply's size grows with the fraction kept: the largest that fits
        middle = (low + high) / 2
        candidate = str(Pipeline(float(f"{math.exp(middle):.{FRACTION_DIGITS}g}"), run.quantizer, run.zstd))
        if _trial(reply, deltas, candidate, feedback) <= budget_bytes:
            fitting, low = candidate, middle
        else:
            high = middle
    return _packed(reply, deltas, fitting, feedback, budget_bytes, "compressed")


def _trial(reply: RecordDict, deltas: dict[str, torch.Tensor], pipeline: str, feedback: ErrorFeedback) -> int:
    """The reply's size with the update packed by `pipeline`, leaving `reply` and the error feedback as they were."""
    trial = RecordDict(dict(reply.items()))
    msg.pack(trial, msg.UPDATE, deltas, pipeline, ErrorFeedback(dict(feedback.residuals)))
    return msg.content_traffic(trial)["total"]


def _packed(
    reply: RecordDict,
    deltas: dict[str, torch.Tensor],
    pipeline: str,
    feedback: ErrorFeedback,
    budget_bytes: int | None,
    choice: str,
) -> LinkFit:
    """The update packed into `reply` for good (its error feedback kept), said in the reply and the log."""
    msg.pack(reply, msg.UPDATE, deltas, pipeline, feedback)
    size = msg.content_traffic(reply)["total"]
    windows = 1 if budget_bytes is None else max(1, math.ceil(size / budget_bytes))
    reply[msg.METRICS]["link-windows"] = float(windows)
    if budget_bytes is not None and choice != "fits":
        log.info("update of %d bytes over a %d-byte window budget: %s (%s, %d windows)", size, budget_bytes, choice,
                 pipeline, windows)  # fmt: skip
    return LinkFit(pipeline, size, budget_bytes, windows, choice)
