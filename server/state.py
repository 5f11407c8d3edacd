"""What the server must carry across a crash besides the model (checkpointed after every round)."""

from __future__ import annotations

from dataclasses import dataclass, field

from geomoe.model.experts import KeepSet


@dataclass
class ServerState:
    """Everything that must survive a crash besides the model."""

    completed_round: int = 0
    keep: dict[int, KeepSet] = field(default_factory=dict)  # location -> keep set
    optimizer: dict = field(default_factory=lambda: {"moments": {}})
    rounds: list[dict] = field(default_factory=list)  # report rows, one per completed round
    evaluations: dict[int, dict] = field(default_factory=dict)  # rounds done -> accuracy of that model
    clip_norm: float = 0.0  # the clip of the next round (privacy.clip_norm, then moved by adaptive clipping)
    mechanisms: list[dict] = field(default_factory=list)  # per noised round: sampling rate q, noise multiplier z
    rounds_taken: dict[str, int] = field(default_factory=dict)  # node -> rounds it sent an update (local noise)
    clock_s: float = 0.0  # simulated runs: the field's time, seconds from the run's start
    buffered: dict = field(default_factory=dict)  # async: row versions, clock, messages out (server/buffered_run)
    stopped: str = ""  # why training stopped before federation.rounds (the privacy budget), if it did
