"""`geomoe device run|export|build-ops|install-model`: the camera-trap runtime and the model it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import typer

from geomoe.cli.options import console

app = typer.Typer(no_args_is_help=True, help="Camera-trap device runtime: classify, export, update the model.")
EXPORT_FORMATS = ("torchscript", "onnx")


@app.command("run")
def run(
    watch: Path = typer.Option(..., help="Folder the camera writes images to."),
    model: Path = typer.Option(..., help="Exported model (`geomoe device export`): TorchScript or .onnx."),
    results: Path = typer.Option(..., help="Append-only results file (JSON lines)."),
    max_watch_mb: float = typer.Option(512.0, help="Disk budget of the watched folder."),
    top_k: int = typer.Option(3, help="Species reported per image."),
    image_size: int | None = typer.Option(None, help="Image side (default: the export's own; must agree)."),
    once: bool = typer.Option(False, help="Classify what is there now, then exit."),
    settle_s: float = typer.Option(1.0, help="Wait this long after an image was last written."),
    threads: int = typer.Option(0, min=0, help="The model's threads (0: one per core); fewer leave cores free."),
) -> None:
    """Classify every new image of a folder with the location's model; resumes after power loss."""
    from geomoe.camera.runtime import DeviceConfig, DeviceRuntime

    if not watch.is_dir():
        raise click.BadParameter(f"{watch} is not a folder", param_hint="--watch")
    cfg = DeviceConfig(watch, model, results, max_watch_mb, top_k, image_size, settle_s=settle_s, threads=threads)
    runtime = DeviceRuntime(cfg)
    if once:
        console.print(f"classified {runtime.run_once()} images into {results}")
        if waiting := runtime.unsettled():
            console.print(f"{waiting} more were written less than --settle-s {settle_s:g} s ago (maybe still being "
                          "written) and are left for the next run")  # fmt: skip
        return
    console.print(f"watching {watch}; results in {results}")
    runtime.run_forever()


@app.command("export")
def export(
    model: Path = typer.Option(..., help="Model file (from `geomoe prune`)."),
    out: Path = typer.Option(..., help="File to write."),
    fmt: str = typer.Option("torchscript", "--format", help="torchscript or onnx."),
    image_size: int = typer.Option(64, help="Image side."),
    fused: bool = typer.Option(
        False,
        help="ONNX only: each MoE layer as one node of geomoe's operator (faster; the runtime needs its "
        "library: `geomoe device build-ops`, which the camera image carries).",
    ),
) -> None:
    """Export a model for inference without the training stack."""
    from geomoe.camera.export import export_onnx, export_torchscript, labels_for
    from geomoe.server.checkpoint import load_model

    if fmt not in EXPORT_FORMATS:
        raise click.BadParameter(f"{fmt!r} is not one of {', '.join(EXPORT_FORMATS)}", param_hint="--format")
    if fused and fmt != "onnx":
        raise click.BadParameter("--fused needs --format onnx: TorchScript runs the layer as torch does")
    loaded, extra = load_model(model)
    if "species" not in extra:
        raise click.BadParameter(f"{model} carries no species names (written before they were kept): run "
                                 "`geomoe prune` on the run again", param_hint="--model")  # fmt: skip
    labels = labels_for(loaded, extra["species"])
    if fmt == "onnx":
        export_onnx(loaded, out, image_size, labels, fused=fused)
    else:
        export_torchscript(loaded, out, image_size, labels)
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


@app.command("build-ops")
def build_ops(
    portable: bool = typer.Option(False, help="For any CPU of this architecture, not only this one (images)."),
    out: Path | None = typer.Option(None, help="Also copy the library here (set GEOMOE_OPS_LIBRARY to it)."),
) -> None:
    """Build geomoe's ONNX Runtime operator library (fused exports run on it) for this machine: needs a C++
    compiler, and fetches ONNX Runtime's headers once. The only step that builds it: loading a model never does."""
    import shutil

    from geomoe.camera.native_ops import OpsBuildError, build_ops

    try:
        library = build_ops(native=not portable)
    except OpsBuildError as error:
        raise click.ClickException(str(error)) from None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library, out)
        library = out
    console.print(f"geomoe's operator library: {library}")


@app.command("install-model")
def install(
    source: Path = typer.Argument(..., help="New TorchScript model (a downloaded file, or '-' for standard input)."),
    model: Path = typer.Option(..., help="The model file the runtime uses; replaced atomically."),
) -> None:
    """Swap in a model update atomically: a crash leaves the old model or the new one, never half."""
    from geomoe.camera.runtime import install_model

    if str(source) == "-":
        install_model(sys.stdin.buffer, model)
    else:
        with source.open("rb") as f:
            install_model(f, model)
    console.print(f"installed {model}")


if __name__ == "__main__":  # the runtime-only camera image runs these commands alone: it has no training stack
    from geomoe.cli.options import run_app

    run_app(app)
