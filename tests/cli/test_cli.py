import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from geomoe.cli.main import app

runner = CliRunner()


def geomoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geomoe.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_subcommand():
    result = runner.invoke(app, ["--help"])
    for command in (
        "sim",
        "partition",
        "model",
        "experts",
        "prune",
        "comm",
        "expert-server",
        "device",
        "deploy",
        "bench",
        "data",
    ):
        assert command in result.output


def test_the_command_line_starts_without_the_training_stack():
    """`geomoe deploy status`, `geomoe --help` and a mistyped option answer at once: torch, timm and Flower load
    only in the commands that use them (importing torch alone takes seconds, on a Pi far longer)."""
    stack = "{'torch', 'timm', 'flwr'}"
    code = f"import sys, geomoe.cli.main; print(sorted({{m.split('.')[0] for m in sys.modules}} & {stack}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["server", "client", "sim", "model"])
def test_no_bare_top_level_modules_after_install(module, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what is installed counts (Ray sets it)
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, cwd=tmp_path, env=env)
    assert result.returncode != 0


def test_errors_are_one_line_without_traceback():
    result = geomoe("sim", "--set", "federation.bogus=1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "unknown config key 'federation.bogus'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback():
    result = geomoe("--debug", "sim", "--set", "federation.bogus=1")
    assert "Traceback" in result.stderr


def test_model_info_json():
    result = geomoe(
        "model", "info", "--experts", "16", "--layers", "1,3,5,7", "--expert-hidden", "2", "--classes", "182", "--json"
    )
    info = json.loads(result.stdout)
    assert info["moe"]["parameters"] < info["dense"]["parameters"]
    assert info["pruned_4"]["parameters"] < info["moe"]["parameters"]
    assert info["pruned_4"]["flops"] < info["moe"]["flops"] < info["dense"]["flops"]


def test_partition_writes_a_split_the_hsu_loader_reads_back(tmp_path):
    from geomoe.data.hsu import read_split, write_split

    out, plot = tmp_path / "p.csv", tmp_path / "p.png"
    result = geomoe("partition", "--dataset", "synthetic", "--nmax", "500", "--out", str(out), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    split = read_split(out)
    assert len(split.image_ids) == 6000 and plot.stat().st_size > 10_000
    again = tmp_path / "again.csv"
    write_split(again, split.user_ids, split.image_ids, split.labels, split.class_names)
    assert again.read_text() == out.read_text()


def test_print_config_round_trips(tmp_path):
    from geomoe.wire.run_config import load_run_config

    result = runner.invoke(app, ["sim", "--rounds", "7", "--print-config"])
    path = tmp_path / "run.toml"
    path.write_text(result.output)
    assert load_run_config(path).federation.rounds == 7


def test_bench_ep_writes_latencies_for_local_and_split_setups(tmp_path):
    """Tiny sizes: every setup timed; each split's peers are live server processes (a peer may serve no patch of
    so few images, but some must), and the split's ratio to local is a spread over rounds."""
    out = tmp_path / "ep.json"
    result = geomoe("bench", "ep", "--out", str(out), "--batch-size", "2", "--image-size", "32", "--repeats", "3")
    assert result.returncode == 0, result.stderr
    setups = json.loads(out.read_text())["setups"]
    assert set(setups) == {"local", "split_2", "split_3"}
    for servers in (2, 3):
        entry = setups[f"split_{servers}"]
        moved = entry["bytes_per_image_per_peer"].values()
        assert len(moved) == servers and min(moved) >= 0 and sum(moved) > 0
        assert entry["over_local"]["p10"] <= entry["over_local"]["median"] <= entry["over_local"]["p90"]


def test_bench_model_writes_step_times_and_images_per_second(tmp_path):
    out = tmp_path / "model.json"
    args = ["bench", "model", "--out", str(out), "--batch-size", "2", "--image-size", "64", "--pairs", "3"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    cpu = json.loads(out.read_text())["devices"]["cpu"]
    assert cpu["moe_images_per_s"] == pytest.approx(2 / cpu["moe_s"]) and cpu["ratio"]["min"] <= cpu["ratio"]["max"]
    assert runner.invoke(app, [*args, "--precision", "fp16"]).exit_code != 0
    unknown_mode = runner.invoke(app, [*args, "--compile", "fast"])
    assert unknown_mode.exit_code == 2 and "'fast' is not one of" in unknown_mode.output
    if not torch.cuda.is_available():
        assert "sees 0 CUDA device" in str(runner.invoke(app, [*args, "--device", "cuda"]).exception)


SMALL_WORLD = [
    "--set",
    "world.synthetic.num_observations=800",
    "--set",
    "world.n_max=80",
    "--set",
    "world.num_locations=2",
]


def test_data_export_then_prepare_on_the_exported_files(tmp_path):
    exported = geomoe("data", "export", "--format", "inat2017", "--out", str(tmp_path / "inat"), *SMALL_WORLD)
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["images"] == 800
    files = [
        "--set",
        f'world.files.root="{tmp_path / "inat"}"',
        "--set",
        f'world.files.annotations=["{tmp_path / "inat" / "train2017.json"}"]',
        "--set",
        f'world.files.locations=["{tmp_path / "inat" / "train2017_locations.json"}"]',
    ]
    prepared = geomoe(
        "data",
        "prepare",
        "--cache",
        str(tmp_path / "cache"),
        "--set",
        'world.dataset="inat2017"',
        *files,
        "--set",
        "world.n_max=80",
        "--set",
        "world.num_locations=2",
    )
    assert prepared.returncode == 0, prepared.stderr
    assert "2 clients (locations), 24 species" in prepared.stdout
    assert len(list((tmp_path / "cache").glob("world-*.npz"))) == 1


def test_data_export_of_one_device_folder(tmp_path):
    from geomoe.world.config import WorldConfig
    from geomoe.world.world import World

    cfg = WorldConfig()
    cfg.synthetic.num_observations, cfg.n_max, cfg.num_locations = 800, 80, 2
    second = World(cfg).locations[1]
    result = geomoe(
        "data",
        "export",
        "--format",
        "folders",
        "--out",
        str(tmp_path),
        "--at",
        f"{second.lat},{second.lon}",
        *SMALL_WORLD,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["devices"] == ["L2"] and (tmp_path / "L2").is_dir()
    bad = geomoe("data", "export", "--format", "folders", "--out", str(tmp_path), "--at", "north")
    assert bad.returncode == 2 and "expected LAT,LON" in bad.stderr  # a usage error


def test_bench_data_writes_its_figures(tmp_path):
    result = geomoe(
        "bench", "data", "--out", str(tmp_path / "b.json"), "--images", "12", "--size", "64", "--repeats", "1"
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "b.json").read_text())
    assert set(figures["images_per_s_per_core"]) == {"plain_decode", "reduced_decode", "cached"}
    assert figures["cached_over_plain"] > 0


def test_partition_of_a_registered_dataset_from_its_files(tmp_path):
    from geomoe.data.hsu import read_split

    fixtures = Path(__file__).parents[1] / "fixtures" / "wilds"
    out = tmp_path / "wilds.csv"
    result = geomoe(
        "partition", "--dataset", "iwildcam", "--out", str(out), "--plot", str(tmp_path / "wilds.png"),
        "--set", f'world.files.metadata="{fixtures / "metadata.csv"}"',
        "--set", f'world.files.gps="{fixtures / "gps_locations.json"}"',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    split = read_split(out)
    assert split.user_ids and all(u.startswith("cluster-") for u in split.user_ids)
    assert "left out while loading" in result.stdout  # a camera without coordinates is counted, not hidden
    assert (tmp_path / "wilds.png").stat().st_size > 10_000


def test_model_info_with_the_papers_head_reproduces_the_dense_count():
    result = geomoe("model", "info", "--classes", "5089", "--head", "bottleneck", "--experts", "64", "--json")
    info = json.loads(result.stdout)
    assert 2.94e6 <= info["dense"]["parameters"] < 2.95e6  # MobileViTV2, 5089 classes: 2.94 M in the paper's Table 3


def test_an_override_that_would_be_overwritten_is_refused_and_the_model_shape_is_set_once():
    result = geomoe("sim", "--set", "model.num_classes=8", "--print-config")
    assert result.returncode == 1
    assert "model.num_classes follows the dataset" in result.stderr
    honoured = geomoe("sim", "--set", "model.num_experts=8", "--print-config")
    assert "num_experts = 8" in honoured.stdout.split("[model]")[1].split("[conversion]")[0]
    assert "num_experts" not in honoured.stdout.split("[conversion]")[1].split("[train]")[0]


def test_device_export_writes_a_model_that_classifies_and_says_only_that(tmp_path):
    """The tracer's and torch's deprecation warnings are not the user's business: the console shows what was
    written and nothing else."""
    import numpy as np

    from geomoe.camera.inference import load_exported
    from geomoe.model.config import ModelConfig
    from geomoe.model.network import GeoMoENet
    from geomoe.server.checkpoint import save_model

    torch.manual_seed(0)
    names = [f"Testus species{k}" for k in range(8)]
    save_model(GeoMoENet(ModelConfig(num_classes=8, num_experts=6)), tmp_path / "old.pt")
    refused = geomoe("device", "export", "--model", str(tmp_path / "old.pt"), "--out", str(tmp_path / "m.ts"))
    assert refused.returncode != 0 and "carries no species names" in refused.stderr
    save_model(GeoMoENet(ModelConfig(num_classes=8, num_experts=6)), tmp_path / "m.pt", species=names)
    result = geomoe("device", "export", "--model", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m.ts"))
    assert result.returncode == 0, result.stderr
    console = (result.stdout + result.stderr).strip()
    assert console.startswith("wrote") and len(console.splitlines()) == 1, console
    exported = load_exported(tmp_path / "m.ts")
    assert exported.predict(np.zeros((2, 3, 64, 64), np.float32)).shape == (2, len(exported.class_ids))
    assert exported.labels.species == names


def test_device_export_fused_writes_geomoes_operator_and_refuses_it_for_torchscript(tmp_path):
    """`--fused` writes one ai.geomoe.FoldedMoE node per MoE layer, which the loader runs with the library that
    `device build-ops` builds (and copies where asked); TorchScript has no such node, so the flag is refused."""
    import numpy as np
    import onnx

    from geomoe.camera.inference import load_exported
    from geomoe.camera.native_ops import DOMAIN
    from geomoe.model.config import ModelConfig
    from geomoe.model.network import GeoMoENet
    from geomoe.server.checkpoint import save_model

    torch.manual_seed(0)
    save_model(GeoMoENet(ModelConfig(num_classes=8, num_experts=6)), tmp_path / "m.pt", species=list("abcdefgh"))
    built = geomoe("device", "build-ops", "--out", str(tmp_path / "lib" / "ops.so"))
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "lib" / "ops.so").stat().st_size > 0
    args = ("device", "export", "--model", str(tmp_path / "m.pt"), "--fused")
    refused = geomoe(*args, "--out", str(tmp_path / "m.ts"))
    assert refused.returncode != 0 and "--fused needs --format onnx" in refused.stderr
    result = geomoe(*args, "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr
    nodes = onnx.load(str(tmp_path / "m.onnx")).graph.node
    assert sum(node.domain == DOMAIN for node in nodes) == 4
    exported = load_exported(tmp_path / "m.onnx")
    assert exported.predict(np.zeros((2, 3, 64, 64), np.float32)).shape == (2, len(exported.class_ids))


def test_expert_placement_is_planned_from_the_deploy_fleet_file(tmp_path):
    from geomoe.model.network import GeoMoENet
    from geomoe.server.checkpoint import save_model
    from geomoe.wire.run_config import build_run_config
    from geomoe.world.world import World

    cfg = build_run_config(None, {"out": str(tmp_path / "run")}, ["world.num_locations=2", "model.num_experts=4"])
    torch.manual_seed(0)
    save_model(GeoMoENet(cfg.model), tmp_path / "run" / "checkpoint.pt", run_config=cfg.to_json())
    near = World(cfg.world).locations
    devices = "".join(
        f'[[device]]\nname = "cam-{k}"\nhost = "ssh://pi@cam-{k}"\nlat = {loc.lat}\nlon = {loc.lon}\n'
        f"expert_memory_kb = 4096\n"
        for k, loc in enumerate(near)
    )
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'image = "geomoe"\nsuperlink = "127.0.0.1:9092"\n{devices}[rtt_ms]\n"cam-0,cam-1" = 20\n')
    result = CliRunner().invoke(app, ["expert-server", "plan", "--fleet", str(fleet), "--run", str(tmp_path / "run"),
                                      "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert set(plan["holds"]) == {"cam-0", "cam-1"}
    fleet.write_text(fleet.read_text().replace("expert_memory_kb = 4096\n", "", 1))
    result = geomoe("expert-server", "plan", "--fleet", str(fleet), "--run", str(tmp_path / "run"))
    assert result.returncode != 0 and "device cam-0: expert_memory_kb is needed" in result.stderr
