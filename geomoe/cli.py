"""The `geomoe` command line. Every command builds its config once and passes it down.

Errors print one line and exit non-zero; `geomoe --debug ...` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
model_app = typer.Typer(no_args_is_help=True, help="Inspect model shapes, parameters and FLOPs.")
experts_app = typer.Typer(no_args_is_help=True, help="Expert importance and keep sets for a location.")
expert_server_app = typer.Typer(no_args_is_help=True, help="Serve experts to nearby devices over gRPC; plan placement.")
device_app = typer.Typer(no_args_is_help=True, help="Camera-trap device runtime: classify, export, update the model.")
deploy_app = typer.Typer(no_args_is_help=True, help="Deploy to field devices with Docker: certificates and the fleet.")
comm_app = typer.Typer(no_args_is_help=True, help="Communication cost of runs: tables, CSV, plots, link times.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that write JSON (speed and cost as ratios).")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: export the synthetic world in published formats; prepare.")
app.add_typer(model_app, name="model")
app.add_typer(experts_app, name="experts")
app.add_typer(comm_app, name="comm")
app.add_typer(deploy_app, name="deploy")
app.add_typer(device_app, name="device")
app.add_typer(expert_server_app, name="expert-server")
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")
console = Console(width=None if sys.stdout.isatty() else 140)  # logs and pipes get whole tables
_debug = {"on": False}


@app.callback()
def root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    """geomoe: federated geographic mixture-of-experts species recognition for camera traps."""
    _debug["on"] = debug


# --- sim --------------------------------------------------------------------------------------
@app.command()
def sim(
    rounds: int = typer.Option(None, help="Federated rounds [default: 3]."),
    strategy: str = typer.Option(None, help="expert (per-expert averaging) or fedavg (dense baseline)."),
    out: Path = typer.Option(None, help="Output folder for report.json and checkpoint.pt [default: runs/sim]."),
    cells: int = typer.Option(None, help="Locations (S2 cells) that become clients [default: 6]."),
    local_epochs: int = typer.Option(None, help="Local epochs per round [default: 1]."),
    experts: int = typer.Option(None, help="Experts per MoE layer [default: 16]."),
    dataset: str = typer.Option(
        None, help="synthetic | inat2017 | inat2021 | iwildcam | hsu (files: --set world.files.*)."
    ),
    seed: int = typer.Option(None, help="Seed of everything [default: 0]."),
    config: Path = typer.Option(
        None, help="TOML file with [world], [model], [conversion], [train], [federation] tables."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override any field: --set federation.keep.percentile=80."),
    resume: bool = typer.Option(False, help="Continue a killed run from its last completed round."),
    ray_address: str = typer.Option(None, help="Address of an existing Ray cluster (e.g. 'auto')."),
    verbose: bool = typer.Option(False, help="Show Flower's and Ray's logs."),
    print_config: bool = typer.Option(False, help="Print the effective config as TOML (for --config) and exit."),
) -> None:
    """Simulate federated training on Flower's simulation engine, one virtual SuperNode per cell."""
    from geomoe.run_config import to_toml
    from geomoe.server.federation import summary_table
    from geomoe.simulation import simulate

    flags = {
        "federation.rounds": rounds,
        "federation.strategy": strategy,
        "out": out,
        "world.num_locations": cells,
        "train.epochs": local_epochs,
        "conversion.num_experts": experts,
        "world.dataset": dataset,
        "seed": seed,
    }
    cfg = _run_config(config, flags, set_)
    if print_config:
        print(to_toml(cfg), end="")
        return
    report = simulate(cfg, resume=resume, ray_address=ray_address, verbose=verbose)
    console.print(summary_table(report))
    console.print(f"final accuracy {report['final_accuracy']:.3f}; report: {Path(cfg.out) / 'report.json'}")


def _run_config(config: Path | None, flags: dict, overrides: list[str]):
    """RunConfig from a TOML file (or defaults), then flags, then `--set KEY=VALUE` overrides."""
    from geomoe.run_config import RunConfig, load_run_config, set_override

    cfg = load_run_config(config) if config is not None else RunConfig()
    for key, value in flags.items():
        if value is not None:
            set_override(cfg, key, json.dumps(str(value) if isinstance(value, Path) else value))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        set_override(cfg, key.strip(), value.strip())
    cfg.__post_init__()
    return cfg


CONFIG_OPTION = typer.Option(None, help="TOML file with [world], [model], [conversion], [train], [federation] tables.")
SET_OPTION = typer.Option([], "--set", help="Override any field: --set world.synthetic.num_observations=20000.")


# --- data -----------------------------------------------------------------------------------------
@data_app.command("export")
def data_export(
    fmt: str = typer.Option(..., "--format", help="inat2017 | inat2021 | hsu | iwildcam | folders."),
    out: Path = typer.Option(..., help="Folder to write."),
    at: str = typer.Option(None, help="folders: only the device folder of the location holding LAT,LON."),
    config: Path = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Write the synthetic world in a published format (JPEGs + annotations), to run the real-data path."""
    from geomoe.sim.export import export_world, location_at
    from geomoe.sim.world import World

    cfg = _run_config(config, {}, set_)
    locations = None
    if at is not None:
        try:
            lat, lon = (float(v) for v in at.split(","))
        except ValueError:
            raise click.BadParameter(f"expected LAT,LON, got {at!r}", param_hint="--at") from None
        locations = [location_at(World(cfg.world), lat, lon)]
    summary = export_world(cfg.world, fmt, out, locations, progress=sys.stderr.isatty())
    console.print_json(json.dumps(summary))


@data_app.command("prepare")
def data_prepare(
    cache: Path = typer.Option(Path("runs/sim/cache"), help="Folder for the world file (a run's cache folder)."),
    config: Path = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Load and partition the run's dataset once; write the world file clients load; a table of clients."""
    from geomoe.sim.world import World

    cfg = _run_config(config, {}, set_)
    with console.status(f"loading {cfg.world.dataset} and partitioning it"):
        world, path, sha = World.cached(cfg.world, cache)
    if world.data.skipped:
        console.print(f"left out while loading: {world.data.skipped}")
    table = Table(title=f"{len(world.locations)} clients ({cfg.world.clients}), {world.num_classes} species")
    for column in ("client", "cell", "lat", "lon", "train", "val", "test", "species"):
        table.add_column(column, justify="right")
    for k, loc in enumerate(world.locations[:50]):
        table.add_row(
            str(k),
            loc.cell,
            f"{loc.lat:.2f}",
            f"{loc.lon:.2f}",
            str(len(loc.train)),
            str(len(loc.val)),
            str(len(loc.test)),
            str(len(world.species(loc.train))),
        )
    console.print(table)
    if len(world.locations) > 50:
        console.print(f"... and {len(world.locations) - 50} more clients")
    console.print(f"world file: {path} (sha256 {sha[:16]}...), server keeps {len(world.server_indices)} images")


# --- partition --------------------------------------------------------------------------------
@app.command()
def partition(
    dataset: str = typer.Option("synthetic", help="synthetic | inat2017 | inat2021 | iwildcam | hsu | folder."),
    nmax: int = typer.Option(500, help="Hsu et al. N_max: split cells whose top species has more examples."),
    out: Path = typer.Option(Path("split.csv"), help="Hsu-format CSV to write (user_id = S2 cell)."),
    plot: Path = typer.Option(None, help="PNG map of the cells coloured by size."),
    config: Path = CONFIG_OPTION,
    set_: list[str] = typer.Option([], "--set", help="Files of the dataset: --set world.files.annotations='[...]'."),
) -> None:
    """Partition a dataset into adaptive S2 cells and write a Hsu et al. split CSV."""
    from geomoe.data.datasets import load_dataset
    from geomoe.data.hsu import write_split
    from geomoe.sim.partition import cells_of, summarise

    cfg = _run_config(config, {"world.dataset": dataset, "world.n_max": nmax}, set_)
    data = load_dataset(cfg.world.dataset, cfg.world.synthetic, cfg.world.files)
    if data.skipped:
        console.print(f"left out while loading: {data.skipped}")
    cells = cells_of(data, cfg.world.n_max)
    write_split(out, cells, data.image_ids, data.labels, [data.class_names[y] for y in data.labels])
    rows = summarise(cells, data.labels)
    table = Table(title=f"{len(rows)} cells, N_max={cfg.world.n_max}")
    for column in ("cell", "level", "examples", "species", "top species share"):
        table.add_column(column, justify="right")
    for row in rows:
        level = "-" if row.level is None else str(row.level)
        table.add_row(row.cell, level, str(row.examples), str(row.species), f"{row.top_share:.2f}")
    console.print(table)
    if plot is not None:
        from geomoe.sim.maps import plot_cells

        plot_cells(rows, data.lat, data.lon, plot)
        console.print(f"map: {plot}")
    console.print(f"split: {out}")


# --- model --------------------------------------------------------------------------------------
@model_app.command("info")
def model_info(
    experts: int = typer.Option(16, help="Experts per MoE layer."),
    layers: str = typer.Option("1,3,5,7", help="Transformer layers (0..8) with experts."),
    expert_hidden: int = typer.Option(2, help="Hidden units per expert."),
    classes: int = typer.Option(182, help="Output classes."),
    image_size: int = typer.Option(256, help="Image side for FLOP counting."),
    keep: int = typer.Option(4, help="Experts per layer kept in the pruned example."),
    head: str = typer.Option("linear", help="linear, or bottleneck (256-1024-256-classes, the papers' iNat head)."),
    gate_rank: int = typer.Option(0, help="Low-rank gate rank (8 in the geographic paper); 0: cosine router."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameters and FLOPs of the dense, MoE and a pruned model."""
    from geomoe.model.config import ModelConfig
    from geomoe.model.counting import model_summary
    from geomoe.model.experts import prune_model
    from geomoe.model.network import GeoMoENet

    moe_layers = tuple(int(x) for x in layers.split(",") if x.strip())
    if not 1 <= keep <= experts:
        raise click.BadParameter(f"--keep must lie in 1..{experts}, got {keep}", param_hint="--keep")
    dense = GeoMoENet(ModelConfig(num_classes=classes, moe_layers=(), head=head))
    moe = GeoMoENet(
        ModelConfig(
            num_classes=classes,
            moe_layers=moe_layers,
            num_experts=experts,
            expert_hidden=expert_hidden,
            head=head,
            gate_rank=gate_rank,
        )
    )
    pruned = prune_model(moe, {layer: list(range(keep)) for layer in moe_layers})
    result = {
        name: model_summary(m, image_size) for name, m in (("dense", dense), ("moe", moe), (f"pruned_{keep}", pruned))
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return
    shape = f"{experts} experts at layers {layers}, d_e={expert_hidden}, {head} head, {image_size} px"
    table = Table(title=f"MobileViTV2-0.5, {shape}")
    for column in ("model", "parameters", "expert params", "MFLOPs", "state MB"):
        table.add_column(column, justify="right")
    for name, s in result.items():
        table.add_row(
            name,
            f"{s['parameters']:,}",
            f"{s['expert_parameters']:,}",
            f"{s['flops'] / 1e6:.0f}",
            f"{s['state_bytes'] / 1e6:.2f}",
        )
    console.print(table)


# --- experts and prune ----------------------------------------------------------------------------
def _location_of(run_dir: Path, cell: str):
    from geomoe.run_config import RunConfig
    from geomoe.server.checkpoint import load_model
    from geomoe.sim.world import World

    model, extra = load_model(run_dir / "checkpoint.pt")
    cfg = RunConfig.from_json(extra["run_config"])
    world, _, _ = World.cached(cfg.world, Path(cfg.cache) if cfg.cache else Path(cfg.out) / "cache")
    matches = [loc for loc in world.locations if loc.cell == cell]
    if not matches:
        raise click.BadParameter(
            f"cell {cell!r} is not a location of this run ({', '.join(loc.cell for loc in world.locations)})",
            param_hint="--cell",
        )
    return model, world, matches[0]


@experts_app.command("importance")
def experts_importance(
    run: Path = typer.Option(..., help="Run folder holding checkpoint.pt."),
    cell: str = typer.Option(..., help="S2 cell of the location, e.g. '3/30'."),
    percentile: float = typer.Option(90.0, help="Edge-weight percentile threshold."),
    per_expert: bool = typer.Option(False, help="Also measure each expert's accuracy drop (slow)."),
) -> None:
    """Keep set of a location from routing its validation images through the global model."""
    from geomoe.model.importance import KeepPolicy, keep_set, per_expert_importance, routing_stats

    model, world, location = _location_of(run, cell)
    stats = routing_stats(model, world.loader(location.val, 128))
    keep = keep_set(stats, KeepPolicy(percentile=percentile))
    table = Table(title=f"keep set of {cell} at the {percentile:g}th percentile")
    table.add_column("layer", justify="right")
    table.add_column("experts kept")
    table.add_column("patches on kept", justify="right")
    for layer, ids in keep.items():
        counts = stats.expert_counts[layer]
        table.add_row(str(layer), ", ".join(map(str, ids)), f"{counts[ids].sum() / max(counts.sum(), 1):.0%}")
    console.print(table)
    if per_expert:
        drops = per_expert_importance(model, list(world.loader(location.val, 128)))
        console.print_json(json.dumps({str(k): v for k, v in drops.items()}))


@app.command()
def prune(
    run: Path = typer.Option(..., help="Run folder holding checkpoint.pt."),
    cell: str = typer.Option(..., help="S2 cell of the location, e.g. '3/30'."),
    out: Path = typer.Option(..., help="Compact model file to write."),
    percentile: float = typer.Option(90.0, help="Edge-weight percentile threshold."),
    policy: str = typer.Option("best_present", help="Patches whose expert was pruned: best_present or remove."),
    head: str = typer.Option("local", help="local: keep the head rows of the location's species (+ other); all."),
) -> None:
    """Write a compact per-location model (pruned experts and head) that loads on its own."""
    from geomoe.model.counting import parameter_count
    from geomoe.model.experts import prune_model
    from geomoe.model.importance import KeepPolicy, keep_set, routing_stats
    from geomoe.model.network import prune_head
    from geomoe.model.training import evaluate
    from geomoe.server.checkpoint import save_model

    model, world, location = _location_of(run, cell)
    keep = keep_set(routing_stats(model, world.loader(location.val, 128)), KeepPolicy(percentile=percentile))
    pruned = prune_model(model, keep, absent_policy=policy)
    if head == "local":
        pruned = prune_head(pruned, world.species(location.train))
    elif head != "all":
        raise click.BadParameter(f"{head!r} is not one of local, all", param_hint="--head")
    save_model(pruned, out, cell=cell, keep=keep)
    test = world.loader(location.test, 128)
    console.print(
        f"{out}: {parameter_count(pruned):,} parameters (full {parameter_count(model):,}); "
        f"test accuracy {evaluate(pruned, test)['accuracy']:.3f} (full {evaluate(model, test)['accuracy']:.3f})"
    )


# --- bench ----------------------------------------------------------------------------------------
@bench_app.command("model")
def bench_model(
    out: Path = typer.Option(Path("bench_model.json"), help="JSON file to write."),
    batch_size: int = typer.Option(32, help="Images per batch."),
    image_size: int = typer.Option(224, help="Image side."),
    repeats: int = typer.Option(5, help="Timed forward+backward passes per model and device."),
) -> None:
    """Forward+backward time of the MoE model over the dense one, on CPU and (if present) GPU."""
    from geomoe.bench import bench_model as run_bench

    result = run_bench(batch_size, image_size, repeats)
    out.write_text(json.dumps(result, indent=2))
    for device, r in result["devices"].items():
        console.print(
            f"{device}: dense {r['dense_s'] * 1e3:.1f} ms, moe {r['moe_s'] * 1e3:.1f} ms, ratio {r['ratio']:.2f}"
        )
    console.print(f"wrote {out}")


@bench_app.command("data")
def bench_data(
    out: Path = typer.Option(Path("bench_data.json"), help="JSON file to write."),
    images: int = typer.Option(300, help="JPEGs to write and read."),
    size: int = typer.Option(224, help="Model input side."),
    source: str = typer.Option("640x480", help="Size of the written JPEGs, WxH (iNat images are up to 800 px)."),
    repeats: int = typer.Option(3, help="Interleaved timed passes of each pipeline."),
) -> None:
    """Images/s per core: plain JPEG decoding vs DCT-scaled decoding vs the decoded cache."""
    import tempfile

    from geomoe.bench import bench_data as run_bench

    width, _, height = source.partition("x")
    with tempfile.TemporaryDirectory(prefix="geomoe-bench-data-") as folder:
        result = run_bench(images, size, int(width), int(height), repeats, Path(folder))
    out.write_text(json.dumps(result, indent=2))
    rates = result["images_per_s_per_core"]
    console.print(
        f"images/s per core: plain {rates['plain_decode']:.0f}, reduced decode {rates['reduced_decode']:.0f}, "
        f"cached {rates['cached']:.0f} ({result['cached_over_plain']:.1f}x plain); wrote {out}"
    )


@bench_app.command("comm")
def bench_comm(
    out: Path = typer.Option(Path("runs/bench-comm"), help="Folder for the runs and bench_comm.json."),
    rounds: int = typer.Option(5, help="Rounds of each run."),
    compressed: str = typer.Option("int8+zstd", help="Upload pipeline of the compressed per-expert run."),
    seed: int = typer.Option(0, help="Seed shared by all runs."),
) -> None:
    """Dense FedAvg, per-expert, and compressed per-expert on the same partitions, seed and initial model."""
    from geomoe.bench import compare_strategies
    from geomoe.run_config import RunConfig
    from geomoe.simulation import simulate

    variants = {"fedavg": ("fedavg", "none"), "expert": ("expert", "none"), "expert-compressed": ("expert", compressed)}
    reports = {}
    for name, (strategy, codec) in variants.items():
        cfg = RunConfig(out=str(out / name), cache=str(out / "cache"), seed=seed)
        cfg.federation.strategy, cfg.federation.rounds, cfg.federation.upload_compression = strategy, rounds, codec
        console.print(f"[bold]{name}[/bold]: {strategy}, upload {codec}, {rounds} rounds")
        reports[name] = simulate(cfg)
    result = {**compare_strategies(reports), "compressed_pipeline": compressed}
    (out / "bench_comm.json").write_text(json.dumps(result, indent=2))
    table = Table(title="per-expert vs dense FedAvg")
    for column in ("run", "upload kB/client/round", "ratio to fedavg", "final accuracy", "accuracy at equal upload"):
        table.add_column(column, justify="right")
    for name in variants:
        table.add_row(
            name,
            f"{result['upload_per_client_round'][name] / 1e3:.1f}",
            f"{result['upload_ratio_to_fedavg'][name]:.4f}",
            f"{result['final_accuracy'][name]:.3f}",
            f"{result['accuracy_at_equal_upload'][name]:.3f}",
        )
    console.print(table)
    console.print(f"wrote {out / 'bench_comm.json'}")


@comm_app.command("report")
def comm_report(
    runs: list[Path] = typer.Argument(..., help="Run folders holding report.json."),
    out: Path = typer.Option(Path("."), help="Folder for comm.csv and comm.png."),
    link: list[str] = typer.Option(
        ["lora", "iridium", "lte-m", "wifi"],
        help="Link profiles (lora, iridium, 3g, lte-m, wifi or name:bps:latency_s:overhead).",
    ),
) -> None:
    """Per run: MB up/down per client per round, totals, accuracy, accuracy per MB and link times."""
    from geomoe.comm_report import load_report, plot, run_label, summarise_run, write_csv
    from geomoe.links import parse_link

    links = [parse_link(text) for text in link]
    reports = {run: load_report(run) for run in runs}
    rows = [summarise_run(run, report, links) for run, report in reports.items()]
    table = Table(title="communication cost per client per round")
    columns = ["run", "up MB", "down MB", "total MB", "accuracy", "acc./upload MB", *[f"{k.name} s" for k in links]]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["run"],
            f"{row['up_mb_per_client_round']:.3f}",
            f"{row['down_mb_per_client_round']:.3f}",
            f"{row['total_mb']:.1f}",
            f"{row['accuracy']:.3f}",
            f"{row['accuracy_per_upload_mb']:.2f}",
            *[f"{row[f'{k.name}_s_per_round']:.0f}" for k in links],
        )
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "comm.csv")
    plot({run_label(run, report): report for run, report in reports.items()}, out / "comm.png")
    console.print(f"wrote {out / 'comm.csv'} and {out / 'comm.png'}")


@expert_server_app.command("serve")
def expert_server_serve(
    model: Path = typer.Option(..., help="Model file (from `geomoe prune` or a run's checkpoint.pt)."),
    address: str = typer.Option("127.0.0.1:50051", help="host:port to listen on (port 0: any free port)."),
    token_file: Path = typer.Option(None, help="File holding the shared token callers must send."),
    cert: Path = typer.Option(None, help="TLS certificate (PEM) of this server, e.g. from `geomoe deploy certs`."),
    key: Path = typer.Option(None, help="TLS private key (PEM)."),
    name: str = typer.Option("expert-server", help="Device name reported to peers."),
) -> None:
    """Serve the experts a model file holds until interrupted."""
    from geomoe.expert_parallel.host import ExpertHost
    from geomoe.expert_parallel.service import ExpertServer, TlsFiles
    from geomoe.server.checkpoint import load_model

    if (cert is None) != (key is None):
        raise click.BadParameter("give both --cert and --key, or neither", param_hint="--cert")
    loaded, _ = load_model(model)
    token = token_file.read_text().strip() if token_file else None
    tls = TlsFiles(certificate=cert.read_bytes(), private_key=key.read_bytes()) if cert else None
    server = ExpertServer(ExpertHost(loaded), address=address, token=token, tls=tls, device=name)
    bound = server.start()
    held = {layer: m.expert_ids.tolist() for layer, m in loaded.moe_layers().items()}
    console.print(
        f"serving experts {held} on {bound} ({'TLS' if tls else 'plaintext'}, {'token' if token else 'no token'})"
    )
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()


@expert_server_app.command("plan")
def expert_server_plan(
    fleet: Path = typer.Option(..., help="Fleet TOML: [[device]] name, lat, lon, memory_kb, address; [rtt_ms]."),
    run: Path = typer.Option(..., help="Run folder whose checkpoint.pt and locations give each device's needs."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Assign experts to devices (own needs first, nearest peers next) and show bytes per image."""
    from dataclasses import asdict

    import torch

    from geomoe.expert_parallel.placement import DeviceNeeds, plan_placement, read_fleet
    from geomoe.model.experts import take_expert_state
    from geomoe.model.importance import routing_stats
    from geomoe.run_config import RunConfig
    from geomoe.server.checkpoint import load_model
    from geomoe.sim.world import World

    devices, rtt = read_fleet(fleet)
    model, extra = load_model(run / "checkpoint.pt")
    run_cfg = RunConfig.from_json(extra["run_config"])
    world = World(run_cfg.world)
    needs = []
    for device in devices:
        location = min(world.locations, key=lambda loc: (loc.lat - device.lat) ** 2 + (loc.lon - device.lon) ** 2)
        stats = routing_stats(model, world.loader(location.val, 128))
        images = max(len(location.val), 1)
        per = {
            layer: {e: float(c) / images for e, c in enumerate(counts)} for layer, counts in stats.expert_counts.items()
        }
        needs.append(DeviceNeeds(device.name, device.lat, device.lon, device.memory_kb * 1024, per, device.address))
    state = take_expert_state(model, {layer: [0] for layer in model.cfg.moe_layers})
    expert_bytes = {
        layer: sum(v.numel() * 4 for k, v in state.items() if k.startswith(f"moe.{layer}.") and not k.endswith(".ids"))
        for layer in model.cfg.moe_layers
    }
    side = run_cfg.world.synthetic.image_size
    _, pre_mlp = model.forward_with_pre_mlp(torch.zeros(1, 3, side, side))
    tokens = {layer: int(pre_mlp[layer].shape[2]) for layer in model.cfg.moe_layers}
    widths = {layer: model.widths[layer] for layer in model.cfg.moe_layers}
    plan = plan_placement(needs, rtt, expert_bytes, tokens, widths)
    if as_json:
        print(json.dumps(asdict(plan), indent=2))
        return
    table = Table(title=f"expert placement for {len(devices)} devices")
    for column in ("device", "holds (layer: experts)", "asks", "unserved", "kB/image to peers"):
        table.add_column(column)
    for device in devices:
        holds = "; ".join(
            f"{layer}: {','.join(map(str, ids))}" for layer, ids in plan.holds[device.name].items() if ids
        )
        asks = "; ".join(f"{layer}.{e}->{p}" for layer, m in plan.asks[device.name].items() for e, p in m.items())
        unserved = "; ".join(f"{layer}: {ids}" for layer, ids in plan.unserved[device.name].items())
        cost = ", ".join(f"{p} {b / 1e3:.1f}" for p, b in plan.bytes_per_image[device.name].items())
        table.add_row(device.name, holds, asks or "-", unserved or "-", cost or "-")
    console.print(table)


@bench_app.command("ep")
def bench_ep(
    out: Path = typer.Option(Path("bench_ep.json"), help="JSON file to write."),
    batch_size: int = typer.Option(32, help="Images per batch."),
    image_size: int = typer.Option(64, help="Image side."),
    repeats: int = typer.Option(5, help="Timed batches per setup."),
) -> None:
    """Latency per MoE layer and images/s: local vs experts split over 2 and 3 servers on 127.0.0.1."""
    from geomoe.bench import bench_expert_parallel

    result = bench_expert_parallel(batch_size, image_size, repeats)
    out.write_text(json.dumps(result, indent=2))
    for name, entry in result["setups"].items():
        extra = f", overhead x{entry['overhead_over_local']:.2f}" if "overhead_over_local" in entry else ""
        console.print(f"{name}: {entry['images_per_s']:.1f} images/s, layer ms {entry['layer_ms']}{extra}")
    console.print(f"wrote {out}")


@device_app.command("run")
def device_run(
    watch: Path = typer.Option(..., help="Folder the camera writes images to."),
    model: Path = typer.Option(..., help="TorchScript model (from `geomoe device export`)."),
    results: Path = typer.Option(..., help="Append-only results file (JSON lines)."),
    max_watch_mb: float = typer.Option(512.0, help="Disk budget of the watched folder."),
    top_k: int = typer.Option(3, help="Species reported per image."),
    image_size: int = typer.Option(64, help="Image side the model expects."),
    once: bool = typer.Option(False, help="Classify what is there now, then exit."),
    settle_s: float = typer.Option(1.0, help="Wait this long after an image was last written."),
) -> None:
    """Classify every new image of a folder with the location's model; resumes after power loss."""
    from geomoe.client.device_runtime import DeviceConfig, DeviceRuntime

    if not watch.is_dir():
        raise click.BadParameter(f"{watch} is not a folder", param_hint="--watch")
    runtime = DeviceRuntime(DeviceConfig(watch, model, results, max_watch_mb, top_k, image_size, settle_s=settle_s))
    if once:
        console.print(f"classified {runtime.run_once()} images into {results}")
        return
    console.print(f"watching {watch}; results in {results}")
    runtime.run_forever()


@device_app.command("export")
def device_export(
    model: Path = typer.Option(..., help="Model file (from `geomoe prune`)."),
    out: Path = typer.Option(..., help="File to write."),
    fmt: str = typer.Option("torchscript", "--format", help="torchscript or onnx."),
    image_size: int = typer.Option(64, help="Image side."),
) -> None:
    """Export a model for inference without the training stack."""
    from geomoe.client.export import export_onnx, export_torchscript
    from geomoe.server.checkpoint import load_model

    loaded, _ = load_model(model)
    exporters = {"torchscript": export_torchscript, "onnx": export_onnx}
    if fmt not in exporters:
        raise click.BadParameter(f"{fmt!r} is not one of {', '.join(exporters)}", param_hint="--format")
    exporters[fmt](loaded, out, image_size)
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


@device_app.command("install-model")
def device_install_model(
    source: Path = typer.Argument(..., help="New TorchScript model (a downloaded file, or '-' for standard input)."),
    model: Path = typer.Option(..., help="The model file the runtime uses; replaced atomically."),
) -> None:
    """Swap in a model update atomically: a crash leaves the old model or the new one, never half."""
    from geomoe.client.device_runtime import install_model

    if str(source) == "-":
        install_model(sys.stdin.buffer, model)
    else:
        with source.open("rb") as f:
            install_model(f, model)
    console.print(f"installed {model}")


@deploy_app.command("certs")
def deploy_certs(
    out: Path = typer.Option(Path("certs"), help="Folder for ca.pem, server.pem/.key and devices/<name>.*"),
    server_host: list[str] = typer.Option(
        ["127.0.0.1", "localhost"], help="Names/IPs of the SuperLink and expert servers (first run only)."
    ),
    device: list[str] = typer.Option([], help="Device names to issue a certificate and SuperNode key for."),
) -> None:
    """A fleet CA and server certificate (once), and per device a TLS certificate and a SuperNode
    authentication key (devices/<name>.auth, .auth.pub). Rerun with new names to add devices."""
    from geomoe.deploy.certs import ensure_fleet_certs

    written = ensure_fleet_certs(out, list(server_host), list(device))
    for line in written or ["nothing new: every device named already has its keys"]:
        console.print(f"{out}: {line}")


def _fleet_action(fleet_file: Path, only: str | None, action_for, needs_docker: bool = True) -> None:
    import docker

    from geomoe.deploy.fleet import for_each, read_fleet_file

    fleet = read_fleet_file(fleet_file)
    devices = [d for d in fleet.devices if only in (None, d.name)]
    if not devices:
        raise click.BadParameter(f"no device {only!r} in {fleet_file}", param_hint="--device")
    connect = (lambda host: docker.DockerClient(base_url=host, timeout=20)) if needs_docker else (lambda host: None)
    outcomes = for_each(devices, action_for(fleet), connect)
    table = Table(title=str(fleet_file))
    for column in ("device", "ok", "detail"):
        table.add_column(column)
    for outcome in outcomes:
        table.add_row(outcome.device, "yes" if outcome.ok else "[red]no[/red]", outcome.detail)
    console.print(table)
    if not all(o.ok for o in outcomes):
        raise typer.Exit(1)


FLEET_OPTION = typer.Option(Path("fleet.toml"), "--fleet", help="Fleet file (TOML).")
DEVICE_OPTION = typer.Option(None, "--device", help="Act on this device only.")


@deploy_app.command("up")
def deploy_up(fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION) -> None:
    """Start each device's container (and its data volume) if it is not running."""
    from geomoe.deploy.fleet import up

    _fleet_action(fleet, device, up)


@deploy_app.command("down")
def deploy_down(fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION) -> None:
    """Remove each device's container; its data volume stays."""
    from geomoe.deploy.fleet import down

    _fleet_action(fleet, device, lambda _: down)


@deploy_app.command("status")
def deploy_status(fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION) -> None:
    """State, image and start time of each device's container."""
    from geomoe.deploy.fleet import status

    _fleet_action(fleet, device, lambda _: status)


@deploy_app.command("logs")
def deploy_logs(fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION, tail: int = typer.Option(20)) -> None:
    """Last lines of each device's container log."""
    from geomoe.deploy.fleet import logs

    _fleet_action(fleet, device, lambda _: logs(tail))


@deploy_app.command("update")
def deploy_update(fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION, image: str = typer.Option(None)) -> None:
    """Replace each device's container with the (new) image, keeping its data volume."""
    from geomoe.deploy.fleet import update

    _fleet_action(fleet, device, lambda f: update(f, image))


@deploy_app.command("register")
def deploy_register(fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION) -> None:
    """Register each SuperNode's public key (name, location) on the fleet's TLS SuperLink, which
    admits registered devices only. Run once the SuperLink is up; devices keep retrying until then."""
    from geomoe.deploy.fleet import register

    _fleet_action(fleet, device, lambda f: lambda _client, d: register(f, d), needs_docker=False)


@deploy_app.command("load")
def deploy_load(archive: Path, fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION) -> None:
    """Load a `docker save` archive onto devices: images move without a registry."""
    from geomoe.deploy.fleet import load_image

    if not archive.is_file():
        raise click.BadParameter(f"no archive at {archive}", param_hint="ARCHIVE")
    _fleet_action(fleet, device, lambda _: load_image(archive))


@deploy_app.command("save")
def deploy_save(image: str, archive: Path) -> None:
    """Write a local image to an archive for `geomoe deploy load`."""
    import docker

    from geomoe.deploy.fleet import save_image

    save_image(docker.from_env(), image, archive)
    console.print(f"wrote {archive} ({archive.stat().st_size / 1e6:.0f} MB)")


def main() -> None:
    """Console entry point: one-line errors unless --debug."""
    try:
        app(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except Exception as error:  # noqa: BLE001 - the one place that turns any failure into one line
        if _debug["on"]:
            raise
        Console(stderr=True).print(f"[red]error:[/red] {error}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
