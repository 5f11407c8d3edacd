"""The configuration of one federated run, built once at the entry point and passed down.

Every concern has its own dataclass (world, model, conversion, local training, federation, privacy);
`RunConfig` composes them. It round-trips through JSON exactly (the server sends it to clients
in every message) and rejects unknown keys or wrong types with the dotted name of the field.

Longer than 300 lines because every setting of the federation, with its comment and its check, reads in one place
(the configuration reference is generated from these classes).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import TypeAdapter, ValidationError

from geomoe.model.config import ModelConfig
from geomoe.model.conversion import ConversionConfig
from geomoe.model.importance import KeepPolicy
from geomoe.model.training import TrainConfig
from geomoe.wire.compression import Pipeline
from geomoe.wire.privacy import PrivacyConfig
from geomoe.world.config import WorldConfig

Strategy = Literal["expert", "fedavg"]
Trainable = Literal["experts", "experts+head", "all"]
Weighting = Literal["tokens", "examples"]
ServerOptimizer = Literal["fedavg", "fedadam", "fedyogi"]
Aggregator = Literal["mean", "median", "trimmed_mean"]
Mode = Literal["sync", "async"]
STRATEGIES, TRAINABLE, WEIGHTINGS, SERVER_OPTIMIZERS, AGGREGATORS, MODES = (
    get_args(t) for t in (Strategy, Trainable, Weighting, ServerOptimizer, Aggregator, Mode)
)


@dataclass
class FederationConfig:
    """How the server runs rounds."""

    __pydantic_config__ = {"extra": "forbid"}  # unknown keys are refused when pydantic builds it from a file

    strategy: Strategy = "expert"  # "expert": per-expert averaging of keep sets; "fedavg": every expert to everyone
    mode: Mode = "sync"  # sync: rounds; async: buffered asynchronous aggregation (FedBuff) for sometimes-online nodes
    rounds: int = 3  # federated rounds (async: aggregations, each a new model version)
    buffer_size: int = 4  # async: aggregate every this many accepted updates
    staleness_exponent: float = 0.5  # async: a row's update weighs (1 + s)^-a, s = aggregations that changed the row
    max_staleness: int = 10  # async: an update with a row staler than this is refused
    eval_every: int = 5  # async: evaluate, checkpoint and report every this many aggregations
    message_ttl_s: float = 43200.0  # a train message is valid this long (Flower's default, 12 h); then sent again
    max_sim_hours: float | None = None  # simulation: stop once the simulated clock passes this; None: run all rounds
    trainable: Trainable = "experts+head"  # what clients train: experts | experts+head | all (whole model)
    weighting: Weighting = "tokens"  # weight of a client's expert update: routed tokens or examples
    server_optimizer: ServerOptimizer = "fedavg"  # fedavg (plain mean) | fedadam | fedyogi on the pseudo-gradient
    server_lr: float = 1.0  # step on the aggregated pseudo-gradient (use ~0.01 with fedadam/fedyogi)
    keep: KeepPolicy = field(default_factory=KeepPolicy)  # how each location's experts are chosen
    fraction_train: float = 1.0  # share of nodes sampled per round
    clients_per_round: int | None = None  # nodes sampled per round (Hsu et al.'s K); None: fraction_train of them
    min_nodes: int = 1  # wait for this many nodes before a round starts
    round_timeout_s: float = 600.0  # a round goes on without nodes that have not replied by then
    max_update_ratio: float = 1.5  # a reply larger than this times what was sent is rejected
    max_update_norm: float = 1.0  # an update whose L2 norm exceeds this times the norm of what was sent is rejected
    max_row_update_norm: float = 2.0  # ... and one moving any expert or head row by more than this times its norm
    max_examples_factor: float = 10.0  # a node's training examples weigh at most this times the other nodes' median
    upload_compression: str = "none"  # client -> server pipeline, e.g. "int8+zstd", "topk0.1+int8+zstd"
    download_compression: str = "none"  # server -> client pipeline for experts, head rows, shared tensors
    link_min_topk: float = 0.01  # a budgeted link: the tightest top-k a node packs to fit a window; beyond: deferred
    pretrain_epochs: int = 4  # server-side dense pretraining on its share before conversion
    pretrain_lr: float = 2e-3  # learning rate of that pretraining
    aggregator: Aggregator = "mean"  # per expert / head row over its holders: mean | median | trimmed_mean
    trim_fraction: float = 0.2  # trimmed_mean: share of holders dropped at each end, per coordinate
    robust_min_holders: int = 3  # median/trimmed_mean: rows with fewer holders take a norm-bounded mean
    outlier_factor: float | None = None  # leave out a reply whose update norm is over this times the round's median
    location_level: int | None = None  # S2 level of the cell a node reports (coarser for sensitive sites); None: as cut
    server_eval_images: int = 5000  # the server scores the global model each round on at most this many test images

    def __post_init__(self) -> None:
        for name, allowed in (
            ("strategy", STRATEGIES),
            ("trainable", TRAINABLE),
            ("weighting", WEIGHTINGS),
            ("server_optimizer", SERVER_OPTIMIZERS),
            ("aggregator", AGGREGATORS),
            ("mode", MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"federation.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ValueError(f"federation.clients_per_round must be >= 1, got {self.clients_per_round}")
        if self.server_eval_images < 0:
            raise ValueError(f"federation.server_eval_images must be >= 0 (0: all), got {self.server_eval_images}")
        if self.rounds < 1:
            raise ValueError(f"federation.rounds must be >= 1, got {self.rounds}")
        for name in ("buffer_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"federation.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_staleness < 0:
            raise ValueError(f"federation.max_staleness must be >= 0, got {self.max_staleness}")
        if not 0 <= self.staleness_exponent < float("inf"):
            raise ValueError(f"federation.staleness_exponent must be a finite number >= 0, got "
                             f"{self.staleness_exponent}")  # fmt: skip
        if not 0 < self.message_ttl_s < float("inf"):
            raise ValueError(f"federation.message_ttl_s must be a finite number > 0, got {self.message_ttl_s}")
        if self.max_sim_hours is not None and not 0 < self.max_sim_hours < float("inf"):
            raise ValueError(f"federation.max_sim_hours must be a finite number > 0, got {self.max_sim_hours}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"federation.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.robust_min_holders < 1:
            raise ValueError(f"federation.robust_min_holders must be >= 1, got {self.robust_min_holders}")
        if not 0 < self.max_row_update_norm < float("inf"):
            raise ValueError(f"federation.max_row_update_norm must be a finite number > 0, got "
                             f"{self.max_row_update_norm}")  # fmt: skip
        if not 1 <= self.max_examples_factor < float("inf"):
            raise ValueError(f"federation.max_examples_factor must be a finite number >= 1, got "
                             f"{self.max_examples_factor}")  # fmt: skip
        if self.outlier_factor is not None and not 0 < self.outlier_factor < float("inf"):
            raise ValueError(f"federation.outlier_factor must be a finite number > 0, got {self.outlier_factor}")
        if self.location_level is not None and not 0 <= self.location_level <= 30:
            raise ValueError(f"federation.location_level must be an S2 level 0..30, got {self.location_level}")
        if not 0 < self.link_min_topk <= 1:
            raise ValueError(f"federation.link_min_topk must lie in (0, 1], got {self.link_min_topk}")
        for name in ("upload_compression", "download_compression"):
            try:
                Pipeline.parse(getattr(self, name))
            except ValueError as error:
                raise ValueError(f"federation.{name}: {error}") from None
        self.keep.always_keep = {int(k): list(v) for k, v in self.keep.always_keep.items()}


@dataclass
class RunConfig:
    """Everything one run needs; `out` is where its report and checkpoint go."""

    __pydantic_config__ = {"extra": "forbid"}  # unknown keys are refused when pydantic builds it from a file

    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    conversion: ConversionConfig = field(default_factory=ConversionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    out: str = "runs/sim"  # output folder: report.json, checkpoint.pt
    cache: str | None = None  # folder for the world file and the initial model; None: {out}/cache
    seed: int = 0  # the run: model init, conversion, data order, dropout and sampling (every other seed of a run)

    def __post_init__(self) -> None:
        # The classifier follows the data: the synthetic world's species count is known from the config, so it is
        # set as the config is built (the one derived field; users cannot set it, see NOT_SETTABLE). A file-backed
        # dataset's count is known once it is loaded: the server makes a new config with it (`with_classes`).
        if self.world.dataset == "synthetic":
            self.model.num_classes = self.world.synthetic.num_species
        if self.privacy.enabled and self.federation.trainable == "all":
            raise ValueError(
                'privacy.clip_norm > 0 needs federation.trainable "experts" or "experts+head": with "all" the '
                "backbone's BatchNorm statistics would travel, and noise can make a variance negative"
            )
        if self.privacy.enabled and self.federation.mode == "async":
            raise ValueError(
                'privacy.clip_norm > 0 needs federation.mode = "sync": the accountant assumes each round samples '
                "nodes at random (Poisson); under async, who contributes depends on when devices are online, which "
                "no accountant here bounds (docs: Field links)"
            )
        if self.privacy.enabled and self.federation.aggregator != "mean":
            raise ValueError(
                f'privacy.clip_norm > 0 needs federation.aggregator = "mean" (the noise is calibrated to a sum), '
                f"got {self.federation.aggregator!r}"
            )

    @property
    def cache_dir(self) -> Path:
        """Where the world file and the pretrained, converted initial model are kept."""
        return Path(self.cache) if self.cache is not None else Path(self.out) / "cache"

    def with_classes(self, num_classes: int) -> RunConfig:
        """This config for a world of `num_classes` species (a new config; this one is left as it is)."""
        if self.world.dataset == "synthetic" and num_classes != self.model.num_classes:
            raise ValueError(f"the synthetic world has {self.model.num_classes} species, not {num_classes}")
        return dataclasses.replace(self, model=dataclasses.replace(self.model, num_classes=num_classes))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """The config as the server sent it, derived keys included (a file-backed dataset's class count)."""
        return _validated(json.loads(text), "run config")


_ADAPTER = TypeAdapter(RunConfig)

# Model fields a run does not take from the user: they follow other settings (RunConfig.__post_init__) or
# describe a pruned per-location model. The user-facing paths (config file, --set, Flower run config) refuse
# them, saying why, and --print-config leaves them out, so no setting is silently overwritten.
NOT_SETTABLE = {
    "model.num_classes": "follows the dataset (world.synthetic.num_species, or the classes of a file-backed dataset)",
    "model.expert_ids": "describes a pruned model; a run's global model holds every expert (`geomoe prune` prunes)",
    "model.head_classes": "describes a pruned head; a run's global head has every class (`geomoe prune` prunes)",
}


def from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """RunConfig from plain data (a TOML file, JSON, overrides), validated strictly by pydantic: unknown keys,
    wrong types (a string for a number, 1 for a bool, a list element of the wrong type) and values outside a
    field's choices are refused with the dotted name of the field; so are the keys in NOT_SETTABLE."""
    for dotted, why in NOT_SETTABLE.items():
        section, name = dotted.split(".")
        if isinstance(data.get(section), dict) and name in data[section]:
            raise ValueError(f"{source}: {dotted} {why}")
    return _validated(data, source)


def _validated(data: dict[str, Any], source: str) -> RunConfig:
    try:
        return _ADAPTER.validate_json(json.dumps(data), strict=True)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "config"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "unexpected_keyword_argument":
            message = "unknown config key"
        elif "input" in first and not isinstance(first["input"], dict):
            message += f", got {first['input']!r}"
        where = "" if message.startswith(key) or not first["loc"] else f"{key}: "
        raise ValueError(f"{source}: {where}{message}") from None


def set_override(cfg: RunConfig, dotted: str, raw: str) -> RunConfig:
    """`cfg` with one `section.field=value` override (value parsed as JSON, else taken as a string)."""
    if dotted in NOT_SETTABLE:
        raise ValueError(f"{dotted} {NOT_SETTABLE[dotted]}")
    data = user_dict(cfg)
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
    return from_dict(data, "--set")


def user_dict(cfg: RunConfig) -> dict[str, Any]:
    """The settings a user may set: the config as plain data without the keys in NOT_SETTABLE."""
    data = dataclasses.asdict(cfg)
    for dotted in NOT_SETTABLE:
        section, name = dotted.split(".")
        data[section].pop(name)
    return data


def load_run_config(path: Path) -> RunConfig:
    """RunConfig from a TOML file with [world], [model], [conversion], [train], [federation], [privacy] tables."""
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: {error}") from None
    return from_dict(data, str(path))


def build_run_config(path: Path | None, flags: dict[str, Any], overrides: list[str]) -> RunConfig:
    """The one way every entry point builds a run's config: a TOML file (or the defaults), then the command's
    own flags (None: not given), then `KEY=VALUE` overrides, each validated as it is applied."""
    cfg = load_run_config(path) if path is not None else RunConfig()
    for key, value in flags.items():
        if value is not None:
            cfg = set_override(cfg, key, json.dumps(str(value) if isinstance(value, Path) else value))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        cfg = set_override(cfg, key.strip(), value.strip())
    return cfg


def from_flat(values: dict[str, Any]) -> RunConfig:
    """RunConfig from Flower's flat run config: `config` (a TOML file) as the base, dotted keys on top."""
    values = dict(values)
    path = str(values.pop("config", ""))
    # A Flower run config cannot say None: an empty string there leaves the key at its default.
    flags = {key.replace("-", "_"): None if value == "" else value for key, value in values.items()}
    return build_run_config(Path(path) if path else None, flags, [])


def to_toml(cfg: RunConfig) -> str:
    """The settings of `cfg` as a TOML file that `load_run_config` reads back (empty tables and derived keys left
    out)."""
    lines: list[str] = []

    def table(name: str, data: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(
            f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}"
            for k, v in data.items()
            if not isinstance(v, dict) and v is not None  # TOML has no null: a key left out is None
        )
        for key, value in data.items():
            if isinstance(value, dict) and value and all(isinstance(k, str) and not k.isdigit() for k in value):
                table(f"{name}.{key}", value)
            elif isinstance(value, dict):
                entries = ", ".join(f"{json.dumps(str(k))} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {entries} }}")

    data = user_dict(cfg)
    lines.extend(f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None)
    for section in ("world", "model", "conversion", "train", "federation", "privacy"):
        lines.append("")
        table(section, data[section])
    return "\n".join(lines) + "\n"
