"""One source of truth for a run's config: every printed key takes effect or is refused; types are checked."""

import dataclasses
import json
import typing

import pytest

from geomoe.wire.run_config import (
    NOT_SETTABLE,
    RunConfig,
    build_run_config,
    from_flat,
    load_run_config,
    set_override,
    to_toml,
)

# Values that a field's type alone does not make valid (the codec parser, registry names) and fields whose
# change must stay consistent with another (splits sum to one).
VALID_CHANGES = {
    "federation.upload_compression": "int8+zstd",
    "federation.download_compression": "fp16",
    "world.dataset": "inat2017",
    "world.split": [0.5, 0.25, 0.25],
    "world.availability": "duty:0.5",
    "world.link": "lora",
    "world.images.mean": [0.485, 0.456, 0.406],
    "world.images.std": [0.229, 0.224, 0.225],
    "federation.keep.always_keep": {"1": [0, 2]},
    "world.files.annotations": ["train2017.json", "val2017.json"],
    "world.files.locations": ["train2017_locations.json", "val2017_locations.json"],
    # unset (None) by default
    "cache": "elsewhere",
    "model.pretrained_file": "weights.safetensors",
    "model.gate_rank": 8,
    "world.images.cache": "decoded",
    "federation.clients_per_round": 5,
    "federation.outlier_factor": 3.0,
    "federation.location_level": 4,
    "federation.keep.max_per_layer": 3,
    "privacy.clip_count_stddev": 0.5,
    "privacy.epsilon_budget": 3.0,
    "federation.max_sim_hours": 168.0,
}

# Settings that only make sense with another one set first: (key, value) applied before the change.
PREREQUISITES = {
    "privacy.adaptive_clip": ("privacy.clip_norm", 1.0),
    "privacy.noise_multiplier": ("privacy.clip_norm", 1.0),
}


def leaves(cfg: object, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every user setting of `cfg` (nested config tables walked, derived keys left out)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            out.update(leaves(value, key + "."))
        elif key not in NOT_SETTABLE:
            out[key] = json.loads(json.dumps(value))  # tuples as lists, int dict keys as strings: as printed
    return out


PRINTED = leaves(RunConfig())


def changed(key: str, value: object) -> object:
    """A valid value different from `value` for the printed `key`."""
    if key in VALID_CHANGES:
        return VALID_CHANGES[key]
    name = key.split(".")[-1]
    hints = typing.get_type_hints(type(_owner(key)))
    choices = typing.get_args(hints[name]) if typing.get_origin(hints[name]) is typing.Literal else ()
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return round(value / 2 + 0.05, 4)
    if isinstance(value, str):
        return f"{value}x" if value else "elsewhere"
    if isinstance(value, list):
        return [*value[:-1]] if len(value) > 1 else [1]
    raise AssertionError(f"no changed value for {key}={value!r}")


def _owner(key: str):
    node = RunConfig()
    for part in key.split(".")[:-1]:
        node = getattr(node, part)
    return node


def read(cfg: RunConfig, key: str) -> object:
    return leaves(cfg)[key]


def test_every_setting_is_printed_and_keys_a_run_does_not_take_are_not():
    printed = to_toml(RunConfig())
    for key, value in PRINTED.items():
        assert (f"{key.split('.')[-1]} = " in printed) == (value is not None)  # TOML has no null: None is left out
    assert "null" not in printed
    assert not set(NOT_SETTABLE) & set(PRINTED)
    assert len(PRINTED) > 60


@pytest.mark.parametrize("key", sorted(PRINTED))
def test_every_printed_key_can_be_overridden_and_is_honoured(key, tmp_path):
    """Through --set, the Flower run config, a config file and the JSON every node receives, the value set is
    the value the run uses: nothing derives it away afterwards."""
    value = changed(key, PRINTED[key])
    raw = json.dumps(value)
    base, before = RunConfig(), {}
    if key in PREREQUISITES:
        before = dict([PREREQUISITES[key]])
        base = set_override(base, *(str(part) for part in PREREQUISITES[key]))
    by_set = set_override(base, key, raw)
    assert read(by_set, key) == json.loads(raw)
    assert read(RunConfig.from_json(by_set.to_json()), key) == json.loads(raw)  # what clients parse
    assert read(from_flat({**before, key: value}), key) == json.loads(raw)  # Flower's flat run config
    file = tmp_path / "run.toml"
    file.write_text(to_toml(by_set))
    assert read(load_run_config(file), key) == json.loads(raw)


@pytest.mark.parametrize("key", sorted(NOT_SETTABLE))
def test_keys_a_run_does_not_take_are_refused_on_every_path(key, tmp_path):
    with pytest.raises(ValueError, match=f"{key} (follows|describes)"):
        set_override(RunConfig(), key, "8")
    with pytest.raises(ValueError, match=f"{key} (follows|describes)"):
        from_flat({key: 8})
    section, name = key.split(".")
    file = tmp_path / "run.toml"
    file.write_text(f"[{section}]\n{name} = 8\n")
    with pytest.raises(ValueError, match=f"run.toml: {key} (follows|describes)"):
        load_run_config(file)


@pytest.mark.parametrize("table", ["", "world.", "world.files.", "world.images.", "world.synthetic.", "model.",
                                   "conversion.", "train.", "federation.", "federation.keep.", "privacy."])  # fmt: skip
def test_an_unknown_key_in_any_table_is_refused(table, tmp_path):
    with pytest.raises(ValueError, match="unknown config key"):
        set_override(RunConfig(), f"{table}bogus", "1")
    file = tmp_path / "run.toml"
    file.write_text((f"[{table.rstrip('.')}]\n" if table else "") + "bogus = 1\n")
    with pytest.raises(ValueError, match=f"{table}bogus: unknown config key"):
        load_run_config(file)


@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        ("federation.rounds", '"3"', "federation.rounds: Input should be a valid integer, got '3'"),
        ("federation.rounds", "2.5", "valid integer"),
        ("model.pretrained", "1", "model.pretrained: Input should be a valid boolean, got 1"),
        ("model.pretrained", '"yes"', "valid boolean"),
        ("world.split", '[0.6, "a", 0.2]', "world.split.1: Input should be a valid number, got 'a'"),
        ("world.files.annotations", "[1]", "world.files.annotations.0: Input should be a valid string"),
        ("model.moe_layers", '["1"]', "model.moe_layers.0: Input should be a valid integer"),
        ("federation.keep.always_keep", '{"1": ["x"]}', "federation.keep.always_keep.1.0"),
        ("federation.strategy", '"fedprox"', "federation.strategy: Input should be 'expert' or 'fedavg'"),
        ("privacy.noise_multiplier", "1.0", "privacy.noise_multiplier needs privacy.clip_norm > 0"),
        ("privacy.adaptive_clip", "true", "privacy.adaptive_clip needs privacy.clip_norm > 0"),
        ("privacy.delta", "1.5", "privacy.delta must be in"),
        ("privacy.noise", '"both"', "privacy.noise: Input should be 'central' or 'local'"),
        ("federation.aggregator", '"krum"', "federation.aggregator: Input should be"),
        ("federation.trim_fraction", "0.5", "federation.trim_fraction must be in"),
        ("federation.location_level", "31", "federation.location_level must be an S2 level 0..30"),
        ("federation.clients_per_round", "0", "federation.clients_per_round must be >= 1"),
        ("model.gate_rank", "0", "gate_rank must be None"),
        ("model.head", '"mlp"', "model.head: Input should be 'linear' or 'bottleneck'"),
        ("world.images.augment", '"rotate"', "world.images.augment"),
        ("out", "3", "out: Input should be a valid string, got 3"),
        ("federation.rounds", "0", "federation.rounds must be >= 1"),
        ("federation.upload_compression", '"int9"', "unknown compression stage 'int9'"),
    ],
)
def test_wrong_types_and_values_are_refused_naming_the_field(key, raw, message):
    with pytest.raises(ValueError, match="^--set: ") as refused:
        set_override(RunConfig(), key, raw)
    assert message in str(refused.value)


def test_dp_refuses_settings_its_noise_cannot_serve():
    private = set_override(RunConfig(), "privacy.clip_norm", "1.0")
    with pytest.raises(ValueError, match='needs federation.aggregator = "mean"'):
        set_override(private, "federation.aggregator", '"median"')
    with pytest.raises(ValueError, match="BatchNorm statistics"):
        set_override(private, "federation.trainable", '"all"')


def test_a_float_field_takes_an_integer():
    assert set_override(RunConfig(), "train.lr_moe", "1").train.lr_moe == 1.0


def test_file_then_flags_then_overrides(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('[federation]\nrounds = 7\nstrategy = "fedavg"\n[train]\nepochs = 4\n')
    cfg = build_run_config(file, {"federation.rounds": 5, "seed": None}, ["train.epochs=2"])
    assert (cfg.federation.rounds, cfg.federation.strategy, cfg.train.epochs, cfg.seed) == (5, "fedavg", 2, 0)
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        build_run_config(None, {}, ["train.epochs"])


def test_derived_model_fields_follow_their_settings_and_travel_to_clients():
    cfg = build_run_config(None, {}, ["model.num_experts=8", "world.synthetic.num_species=10"])
    assert (cfg.model.num_experts, cfg.model.num_classes) == (8, 10)
    with pytest.raises(ValueError, match="the synthetic world has 10 species, not 5089"):
        cfg.with_classes(5089)
    files = set_override(cfg, "world.dataset", '"inat2017"')
    loaded = files.with_classes(5089)  # what the server makes once it has loaded a file-backed dataset
    assert files.model.num_classes != 5089 and RunConfig.from_json(loaded.to_json()).model.num_classes == 5089
