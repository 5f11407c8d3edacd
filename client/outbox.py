"""A field node's store-and-forward state, in its state folder (node config `state`): each finished update is kept
on disk until the server says it has settled it, and the node remembers what it last trained on.

Links in the field drop: a reply may never reach the server, and a node may reboot mid-training. An update is
written whole (atomically) only when training has finished, so a reboot mid-training leaves nothing half-done: the
node trains again on the next message. A kept update goes out as the reply to the next message the node gets,
until a message says the server settled it (took it, or refused it). The server refuses a second delivery of one
update, so a resend after a lost acknowledgement is harmless. A node trains again only on a newer model version
or when its labelled images changed (`fresh`). What lossy compression left out of an update (its error feedback)
is kept beside it, so that a reboot loses no part of an update for good.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import torch
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from geomoe.data.atomic_file import atomic_write

KEPT = re.compile(r"update-(\d+)\.pb")
FEEDBACK = re.compile(r"feedback-(\d+)\.pt")
TRAINED = "trained.json"
DEVICE_ID = "device-id"


class Outbox:
    """The updates a node has finished and not yet seen settled, by the model version each was trained from."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "outbox"
        self.folder.mkdir(parents=True, exist_ok=True)

    def device_id(self) -> str:
        """This device's own id, made once and kept in the state folder: the server knows it again after a reboot
        (a restarted SuperNode gets a new node id). Random, so it tells nothing of the device or its place."""
        path = self.folder.parent / DEVICE_ID
        if not path.is_file():
            atomic_write(path, uuid.uuid4().hex.encode())
        return path.read_text().strip()

    def keep(
        self, version: int, reply: RecordDict, data_fingerprint: str, feedback: dict[str, torch.Tensor] | None = None
    ) -> None:
        """A finished update: on disk whole before it is sent, with what it was trained on and what compression left
        out of it (`feedback`, the error feedback after it). Written feedback first, the record of what was trained
        last: after a crash anywhere between, `feedback()` is the one that follows the last update kept whole."""
        if feedback:
            atomic_write(self.folder / f"feedback-{version}.pt", lambda out: torch.save(feedback, out))
        atomic_write(self.folder / f"update-{version}.pb", recorddict_to_proto(reply).SerializeToString())
        atomic_write(self.folder / TRAINED, json.dumps({"version": version, "data": data_fingerprint}).encode())
        for path in self.folder.iterdir():
            if (m := FEEDBACK.fullmatch(path.name)) and int(m.group(1)) != version:
                path.unlink(missing_ok=True)

    def feedback(self) -> dict[str, torch.Tensor]:
        """The error feedback after the last update kept whole ({} if none, or if it was packed losslessly)."""
        path = self.folder / TRAINED
        if not path.is_file():
            return {}
        kept = self.folder / f"feedback-{json.loads(path.read_text())['version']}.pt"
        return torch.load(kept, weights_only=True) if kept.is_file() else {}

    def versions(self) -> list[int]:
        return sorted(int(m.group(1)) for path in self.folder.iterdir() if (m := KEPT.fullmatch(path.name)))

    def kept(self) -> tuple[int, RecordDict] | None:
        """The oldest update not yet settled (version, reply content), or None."""
        versions = self.versions()
        if not versions:
            return None
        proto = ProtoRecordDict()
        proto.ParseFromString((self.folder / f"update-{versions[0]}.pb").read_bytes())
        return versions[0], recorddict_from_proto(proto)

    def settle(self, through: int) -> None:
        """The server has settled this node's updates up to version `through`: they need not be sent again."""
        for version in self.versions():
            if version <= through:
                (self.folder / f"update-{version}.pb").unlink(missing_ok=True)

    def fresh(self, version: int, data_fingerprint: str) -> bool:
        """Whether a message of `version` gives the node something new to train on: a newer model than its last
        training, or labelled images that changed since."""
        path = self.folder / TRAINED
        if not path.is_file():
            return True
        last = json.loads(path.read_text())
        return version > last["version"] or data_fingerprint != last["data"]
