"""`geomoe bench model|device|data|comm|ep|privacy|scale`: benchmarks that write JSON; speed and cost as ratios within
one run. Those that run whole federations live in `bench_runs`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import typer
from rich.table import Table

from geomoe.cli import bench_runs
from geomoe.cli.options import console

app = typer.Typer(no_args_is_help=True, help="Benchmarks that write JSON (speed and cost as ratios).")


@app.command("model")
def model(
    out: Path = typer.Option(Path("bench_model.json"), help="JSON file to write."),
    batch_size: int = typer.Option(32, help="Images per batch."),
    image_size: int = typer.Option(224, help="Image side."),
    pairs: int = typer.Option(30, help="Interleaved dense/MoE forward+backward pairs per device."),
    device: str = typer.Option("all", help="cpu, cuda, or all (the CPU and a GPU where there is one)."),
    compile_mode: str = typer.Option(
        "", "--compile", help="torch.compile both models in this mode (default, reduce-overhead, max-autotune, ...)."
    ),
    precision: str = typer.Option("fp32", help="fp32, or bf16 (autocast)."),
) -> None:
    """Forward+backward time of the MoE model over the dense one, on CPU and (if present) GPU: the median ratio
    over interleaved pairs, with its spread."""
    from geomoe.bench.model import COMPILE_MODES, bench_devices, bench_model
    from geomoe.model.compute import PRECISIONS

    if precision not in PRECISIONS:
        raise typer.BadParameter(f"{precision!r} is not one of {PRECISIONS}", param_hint="--precision")
    if compile_mode:
        if compile_mode not in COMPILE_MODES:
            raise typer.BadParameter(f"{compile_mode!r} is not one of {COMPILE_MODES}", param_hint="--compile")
        console.print(f"compiling both models ({compile_mode}): the first steps take minutes, more with a cold cache")
    result = bench_model(batch_size, image_size, pairs, bench_devices(device), compile_mode, precision)
    out.write_text(json.dumps(result, indent=2))
    for name, r in result["devices"].items():
        ratio = r["ratio"]
        console.print(
            f"{name}: dense {r['dense_s'] * 1e3:.1f} ms, moe {r['moe_s'] * 1e3:.1f} ms (medians); MoE/dense "
            f"{_spread(ratio)} over {pairs} pairs"
        )
    console.print(f"wrote {out}")


def _spread(ratio: dict[str, float]) -> str:
    """A ratio's median and its 10th-90th percentile range."""
    return f"median {ratio['median']:.3f} (p10 {ratio['p10']:.3f}, p90 {ratio['p90']:.3f})"


@app.command("device")
def device(
    out: Path = typer.Option(Path("bench_device.json"), help="JSON file to write."),
    image_size: int = typer.Option(224, help="Image side."),
    repeats: int = typer.Option(30, help="Rounds: each times every model and runtime on 5 single images in turn."),
    classes: int = typer.Option(5089, help="Classes of the bottleneck head (the papers' iNat: 5089)."),
    experts: int = typer.Option(64, help="Experts per MoE layer."),
    keep: int = typer.Option(8, help="Experts per layer the cell's pruned model keeps."),
    species: int = typer.Option(100, help="Species of the cell's pruned head."),
    threads: int = typer.Option(0, min=0, help="Threads of both runtimes (0: one per core); try your device's."),
) -> None:
    """Dense vs MoE vs a cell's pruned MoE on the device: parameters, and latency under TorchScript and ONNX
    Runtime, the MoE models also fused (geomoe's ONNX Runtime operator, built here: needs a C++ compiler)."""
    from geomoe.bench.device import bench_device

    with tempfile.TemporaryDirectory(prefix="geomoe-bench-device-") as folder:
        result = bench_device(Path(folder), image_size, repeats, classes, experts, keep, species, threads)
    out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"device models ({image_size} px, 1 image, {result['threads']} threads)")
    for column in ("model", "parameters", "TorchScript ms", "ONNX Runtime ms", "fused ms"):
        table.add_column(column, justify="right")
    for name, row in result["models"].items():
        fused = f"{row['onnx_fused_ms']:.1f}" if "onnx_fused_ms" in row else "-"
        table.add_row(name, f"{row['parameters']:,}", f"{row['torchscript_ms']:.1f}", f"{row['onnx_ms']:.1f}", fused)
    console.print(table)
    for name, ratio in result["over_dense"].items():
        fused = f", fused {_spread(ratio['onnx_fused_latency'])}" if "onnx_fused_latency" in ratio else ""
        console.print(
            f"{name}/dense: parameters {ratio['parameters']:.2f}; latency per round, TorchScript "
            f"{_spread(ratio['torchscript_latency'])}, ONNX Runtime {_spread(ratio['onnx_latency'])}{fused}"
        )
    console.print("mlp-free: the dense model with no transformer MLP, a latency floor for any expert layout")
    for layer, row in result["layers"].items():
        console.print(
            f"layer {layer} alone ({row['pixels']} pixels x {row['channels']} channels, ONNX Runtime): dense MLP "
            f"{row['dense_us']:.0f} us, MoE layer {row['moe_us']:.0f} us, MoE/dense {_spread(row['moe_over_dense'])}, "
            f"fused {row['fused_us']:.0f} us, fused/dense {_spread(row['fused_over_dense'])}"
        )
    console.print(f"wrote {out}")


@app.command("data")
def data(
    out: Path = typer.Option(Path("bench_data.json"), help="JSON file to write."),
    images: int = typer.Option(300, help="JPEGs to write and read."),
    size: int = typer.Option(224, help="Model input side."),
    source: str = typer.Option("640x480", help="Size of the written JPEGs, WxH (iNat images are up to 800 px)."),
    repeats: int = typer.Option(3, help="Interleaved timed passes of each pipeline."),
) -> None:
    """Images/s per core: plain JPEG decoding vs DCT-scaled decoding vs the decoded cache."""
    from geomoe.bench.data import bench_data

    try:
        width, height = (int(v) for v in source.split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WxH like 640x480, got {source!r}", param_hint="--source") from None
    with tempfile.TemporaryDirectory(prefix="geomoe-bench-data-") as folder:
        result = bench_data(images, size, width, height, repeats, Path(folder))
    out.write_text(json.dumps(result, indent=2))
    rates = result["images_per_s_per_core"]
    console.print(
        f"images/s per core: plain {rates['plain_decode']:.0f}, reduced decode {rates['reduced_decode']:.0f}, "
        f"cached {rates['cached']:.0f} ({result['cached_over_plain']:.1f}x plain); wrote {out}"
    )


@app.command("ep")
def ep(
    out: Path = typer.Option(Path("bench_ep.json"), help="JSON file to write."),
    batch_size: int = typer.Option(32, help="Images per batch."),
    image_size: int = typer.Option(64, help="Image side."),
    repeats: int = typer.Option(30, help="Interleaved rounds (one batch per setup each)."),
) -> None:
    """Latency per MoE layer and images/s: local vs experts split over 2 and 3 expert-server processes on
    127.0.0.1, timed in interleaved rounds."""
    from geomoe.bench.expert_parallel import bench_expert_parallel

    result = bench_expert_parallel(batch_size, image_size, repeats)
    out.write_text(json.dumps(result, indent=2))
    for name, entry in result["setups"].items():
        extra = f", split/local {_spread(entry['over_local'])}" if "over_local" in entry else ""
        layer_ms = ", ".join(f"{layer}: {ms:.1f}" for layer, ms in entry["layer_ms"].items())
        console.print(f"{name}: {entry['images_per_s']:.1f} images/s, layer ms {layer_ms}{extra}")
    console.print(f"wrote {out}")


app.command("comm")(bench_runs.comm)
app.command("privacy")(bench_runs.privacy)
app.command("scale")(bench_runs.scale)
app.command("links")(bench_runs.links)
