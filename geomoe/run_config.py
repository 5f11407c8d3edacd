"""The configuration of one federated run, built once at the entry point and passed down.

Every concern has its own dataclass (world, model, conversion, local training, federation);
`RunConfig` composes them. It round-trips through JSON exactly (the server sends it to clients
in every message) and rejects unknown keys or wrong types with the dotted name of the field.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geomoe.compression import Pipeline
from geomoe.data.world_config import WorldConfig
from geomoe.model.config import ModelConfig
from geomoe.model.conversion import ConversionConfig
from geomoe.model.importance import KeepPolicy
from geomoe.model.training import TrainConfig

STRATEGIES = ("expert", "fedavg")
TRAINABLE = ("experts", "experts+head", "all")
WEIGHTINGS = ("tokens", "examples")
SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedyogi")


@dataclass
class FederationConfig:
    """How the server runs rounds."""

    strategy: str = "expert"  # "expert": per-expert averaging of location keep sets; "fedavg": dense baseline
    rounds: int = 3  # federated rounds
    trainable: str = "experts+head"  # what clients train under "expert": experts | experts+head | all
    weighting: str = "tokens"  # weight of a client's expert update: routed tokens or examples
    server_optimizer: str = "fedavg"  # fedavg (plain mean) | fedadam | fedyogi on the pseudo-gradient
    server_lr: float = 1.0  # step on the aggregated pseudo-gradient (use ~0.01 with fedadam/fedyogi)
    keep: KeepPolicy = field(default_factory=KeepPolicy)  # how each location's experts are chosen
    fraction_train: float = 1.0  # share of nodes sampled per round
    clients_per_round: int = 0  # nodes sampled per round (Hsu et al.'s K); 0 = fraction_train of them
    min_nodes: int = 1  # wait for this many nodes before a round starts
    round_timeout_s: float = 600.0  # a round goes on without nodes that have not replied by then
    max_update_ratio: float = 1.5  # a reply larger than this times what was sent is rejected
    upload_compression: str = "none"  # client -> server pipeline, e.g. "int8+zstd", "topk0.1+int8+zstd"
    download_compression: str = "none"  # server -> client pipeline for experts, head rows, shared tensors
    pretrain_epochs: int = 4  # server-side dense pretraining on its share before conversion
    pretrain_lr: float = 2e-3  # learning rate of that pretraining

    def __post_init__(self) -> None:
        for name, allowed in (
            ("strategy", STRATEGIES),
            ("trainable", TRAINABLE),
            ("weighting", WEIGHTINGS),
            ("server_optimizer", SERVER_OPTIMIZERS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"federation.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.clients_per_round < 0:
            raise ValueError(f"federation.clients_per_round must be >= 0, got {self.clients_per_round}")
        if self.rounds < 1:
            raise ValueError(f"federation.rounds must be >= 1, got {self.rounds}")
        for name in ("upload_compression", "download_compression"):
            try:
                Pipeline.parse(getattr(self, name))
            except ValueError as error:
                raise ValueError(f"federation.{name}: {error}") from None
        self.keep.always_keep = {int(k): list(v) for k, v in self.keep.always_keep.items()}


@dataclass
class RunConfig:
    """Everything one run needs; `out` is where its report and checkpoint go."""

    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    conversion: ConversionConfig = field(default_factory=ConversionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    out: str = "runs/sim"  # output folder: report.json, checkpoint.pt
    cache: str = ""  # folder for the pretrained + converted initial model; "" = {out}/cache
    seed: int = 0  # seeds model init, data order and sampling

    def __post_init__(self) -> None:
        # The classifier and the MoE layout follow the data and the conversion settings. A file-backed
        # dataset's class count is known once it is loaded: the server sets it (`with_classes`).
        if self.world.dataset == "synthetic":
            self.model.num_classes = self.world.synthetic.num_species
        self.model.moe_layers = tuple(self.conversion.moe_layers)
        self.model.num_experts = self.conversion.num_experts
        self.model.expert_hidden = self.conversion.expert_hidden

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return from_dict(cls, json.loads(text))


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types by dotted name."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {path + unknown[0]!r} (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in data.items():
        values[name] = _coerce(hints[name], value, f"{path}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path + ".")
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path} must be a list, got {value!r}")
        return origin(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a table, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ValueError(f"{path} must be {hint.__name__}, got {value!r}")
    return value


# Model fields that follow other settings (RunConfig.__post_init__): an override of them would be overwritten.
DERIVED = {
    "model.num_experts": "conversion.num_experts",
    "model.moe_layers": "conversion.moe_layers",
    "model.expert_hidden": "conversion.expert_hidden",
    "model.num_classes": "the dataset (world.synthetic.num_species, or the classes a file-backed dataset has)",
}


def set_override(cfg: RunConfig, dotted: str, raw: str) -> None:
    """Apply one `section.field=value` override (value parsed as JSON, else taken as a string)."""
    if dotted in DERIVED:
        raise ValueError(f"{dotted} follows {DERIVED[dotted]}; set that instead")
    data = dataclasses.asdict(cfg)
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        if part not in node or not isinstance(node[part], dict):
            raise ValueError(f"unknown config key {dotted!r}")
        node = node[part]
    if leaf not in node:
        raise ValueError(f"unknown config key {dotted!r}")
    try:
        node[leaf] = json.loads(raw)
    except json.JSONDecodeError:
        node[leaf] = raw
    new = from_dict(RunConfig, data)
    for f in dataclasses.fields(RunConfig):
        setattr(cfg, f.name, getattr(new, f.name))


def load_run_config(path: Path) -> RunConfig:
    """RunConfig from a TOML file with [world], [model], [conversion], [train], [federation] tables."""
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        return from_dict(RunConfig, tomllib.loads(path.read_text()))
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{path}: {error}") from None


def from_flat(values: dict[str, Any]) -> RunConfig:
    """RunConfig from Flower's flat run config: `config` (a TOML file) as the base, dotted keys on top."""
    values = dict(values)
    path = str(values.pop("config", ""))
    cfg = load_run_config(Path(path)) if path else RunConfig()
    for key, value in values.items():
        set_override(cfg, key.replace("-", "_"), json.dumps(value))
    return cfg


def to_toml(cfg: RunConfig) -> str:
    """The config as a TOML file that `load_run_config` reads back (empty tables left out)."""
    lines: list[str] = []

    def table(name: str, data: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(
            f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}"
            for k, v in data.items()
            if not isinstance(v, dict)
        )
        for key, value in data.items():
            if isinstance(value, dict) and value and all(isinstance(k, str) and not k.isdigit() for k in value):
                table(f"{name}.{key}", value)
            elif isinstance(value, dict) and value:
                entries = ", ".join(f"{json.dumps(str(k))} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {entries} }}")

    data = dataclasses.asdict(cfg)
    lines.extend(f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict))
    for section in ("world", "model", "conversion", "train", "federation"):
        lines.append("")
        table(section, data[section])
    return "\n".join(lines) + "\n"
