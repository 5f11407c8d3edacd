"""Export a (pruned) model for inference without the training stack: TorchScript or ONNX.

The export carries the head's global class ids, so a device maps outputs to species with nothing
but torch (TorchScript) or onnxruntime (ONNX).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the camera runtime loads exports with torch alone: no timm, no training stack
    from geomoe.model.network import GeoMoENet

CLASS_IDS_FILE = "class_ids.json"  # extra file inside a TorchScript export


def export_torchscript(model: GeoMoENet, path: Path, image_size: int) -> Path:
    model = model.eval()
    example = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    extra = {CLASS_IDS_FILE: json.dumps(model.head.class_ids.tolist())}
    torch.jit.save(traced, str(path), _extra_files=extra)
    return path


def export_onnx(model: GeoMoENet, path: Path, image_size: int) -> Path:
    model = model.eval()
    example = torch.zeros(1, 3, image_size, image_size)
    # torch >= 2.9 defaults to the dynamo exporter; Debian's torch 1.13 (the device image) has only this one.
    exporter = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        **exporter,
    )
    path.with_suffix(".classes.json").write_text(json.dumps(model.head.class_ids.tolist()))
    return path


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, list[int]]:
    """The exported module and the global class id of each output."""
    extra = {CLASS_IDS_FILE: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), json.loads(extra[CLASS_IDS_FILE])
