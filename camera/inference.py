"""An exported model ready to classify: TorchScript (run by torch) or ONNX (run by ONNX Runtime), by suffix.

Neither runtime is imported until a model of its kind is loaded, so a camera that only classifies can carry an
ONNX export, onnxruntime, numpy and Pillow, and no torch at all (the runtime-only device image).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where a model is loaded: a TorchScript-only camera need not have it
    import onnxruntime

RUNTIMES = ("torchscript", "onnx")
CLASS_IDS = "class_ids"  # ONNX metadata key: JSON list, the global class id of each output
LABELS = "labels"  # ONNX metadata key (and TorchScript extra file labels.json): the run's species and the model
OTHER = -1  # the class id of a pruned head's last output
OTHER_MEANING = "a species this location's model does not hold (the pruned head's 'other' output)"


@dataclass
class Labels:
    """What an export's outputs mean: the run's species names by global class id, and which model it is."""

    species: list[str]  # scientific name of each global class id of the run
    model: str  # the model's name and version, as result lines (and Camtrap DP's classifiedBy) name it

    def name_of(self, class_id: int) -> str | None:
        """The scientific name of a class id; None for OTHER (see OTHER_MEANING)."""
        return None if class_id == OTHER else self.species[class_id]

    def to_json(self) -> str:
        return json.dumps({"species": self.species, "model": self.model})

    @classmethod
    def from_json(cls, text: str, path: Path) -> Labels:
        """The labels a model file carries; a clear error naming the file where they are missing or malformed."""
        try:
            data = json.loads(text)
            labels = cls([str(name) for name in data["species"]], str(data["model"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"{path} carries no readable species names: export it again with `geomoe device export`"
            ) from None
        return labels


@dataclass
class ExportedModel:
    """`predict` maps (B, 3, H, W) float32 images in [0, 1] to (B, K) logits; `class_ids` names the K outputs."""

    predict: Callable[[np.ndarray], np.ndarray]
    class_ids: list[int]
    runtime: str  # one of RUNTIMES
    image_size: int | None  # the side H = W it takes; None: the export does not say (older TorchScript)
    labels: Labels  # species names of the class ids, and the model's name and version


def runtime_of(path: Path) -> str:
    return "onnx" if path.suffix.lower() == ".onnx" else "torchscript"


def load_exported(path: Path, runtime: str | None = None, threads: int = 0) -> ExportedModel:
    """The model at `path`, run by `runtime` (default: by suffix, `.onnx` through ONNX Runtime, anything else as
    TorchScript). Both kinds carry the class id of each output inside the file. `threads` (0: one per core): ONNX
    Runtime's intra-op threads for this session; for TorchScript, torch's threads, which are the whole process's."""
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    runtime = runtime or runtime_of(path)
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    return _load_onnx(path, threads) if runtime == "onnx" else _load_torchscript(path, threads)


def onnx_session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the CPU with `threads` intra-op threads (0: one per core), with geomoe's operator
    library registered where it is built. A fused export (`export_onnx(..., fused=True)`) needs it; where it is not
    built, loading one is an error naming `geomoe device build-ops` (loading never compiles or fetches anything)."""
    import onnxruntime

    from geomoe.camera.native_ops import DOMAIN, check_runtime_version, ops_library

    try:
        library = ops_library()
    except FileNotFoundError as missing:
        library, why = None, str(missing)
    if library is not None:
        check_runtime_version(onnxruntime.__version__)
    try:
        return _session(path, threads, library)
    except onnxruntime.capi.onnxruntime_pybind11_state.Fail as error:
        if library is not None or DOMAIN not in str(error):
            raise
    raise RuntimeError(f"{path} is a fused export: it runs on geomoe's operator library ({DOMAIN}), and {why}")


def _session(path: Path, threads: int, library: Path | None) -> onnxruntime.InferenceSession:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.intra_op_num_threads = threads
    # Idle worker threads sleep instead of spinning: a camera classifies an image now and then and shares its
    # cores with capture and the uploader (spinning also starved any other runtime timed beside it).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library is not None:
        options.register_custom_ops_library(str(library))
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _load_onnx(path: Path, threads: int) -> ExportedModel:
    session = onnx_session(path, threads)
    metadata = session.get_modelmeta().custom_metadata_map
    if CLASS_IDS not in metadata:
        raise ValueError(f"{path} carries no '{CLASS_IDS}' metadata: export it with `geomoe device export`")
    labels = Labels.from_json(metadata.get(LABELS, ""), path)
    images = session.get_inputs()[0]
    height, width = images.shape[2:]
    image_size = height if isinstance(height, int) and height == width else None
    return ExportedModel(
        lambda batch: session.run(None, {images.name: batch})[0],
        json.loads(metadata[CLASS_IDS]),
        "onnx",
        image_size,
        labels,
    )


def _load_torchscript(path: Path, threads: int) -> ExportedModel:
    import torch

    from geomoe.camera.export import load_torchscript

    if threads:
        torch.set_num_threads(threads)

    module, class_ids, image_size, labels = load_torchscript(path)

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(images)).numpy()

    return ExportedModel(predict, class_ids, "torchscript", image_size, labels)
