"""Export a (pruned) model for inference without the training stack: TorchScript or ONNX.

The export carries the head's global class ids and the run's species names with the model's name and version (a
TorchScript extra file, ONNX metadata), so a device names what it sees with nothing but torch (TorchScript) or
onnxruntime (ONNX).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the camera runtime loads exports with torch alone: no timm, no training stack
    from geomoe.model.network import GeoMoENet

from geomoe.camera.inference import CLASS_IDS, LABELS, Labels
from geomoe.model.folded_moe import fold_for_inference

CLASS_IDS_FILE = "class_ids.json"  # extra files inside a TorchScript export
IMAGE_SIZE_FILE = "image_size.json"  # the side it was traced at: a traced MobileViT runs only that
LABELS_FILE = "labels.json"


def labels_for(model: GeoMoENet, species: list[str]) -> Labels:
    """The labels of an export of `model` in a run of `species`: its version is a digest of its weights, so two
    exports of one model share it and any retrained model differs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if len(species) != model.cfg.num_classes:
        raise ValueError(f"{len(species)} species names for a model of {model.cfg.num_classes} classes")
    return Labels(list(species), f"geomoe {model.cfg.backbone}-moe {digest.hexdigest()[:12]}")


def export_torchscript(model: GeoMoENet, path: Path, image_size: int, labels: Labels) -> Path:
    """Frozen TorchScript of the model with its MoE layers folded (`fold_for_inference`), for `image_size` px
    images: Debian's torch on a Pi runs it without timm. The tracer's warnings are about what it bakes in as
    constants (the image size, the experts this model holds), which are fixed for this export; torch's deprecation
    of TorchScript does not concern the torch 1.13 that runs it."""
    example = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.freeze(torch.jit.trace(fold_for_inference(model), example, check_trace=False))
        extra = {
            CLASS_IDS_FILE: json.dumps(model.head.class_ids.tolist()),
            IMAGE_SIZE_FILE: json.dumps(image_size),
            LABELS_FILE: labels.to_json(),
        }
        torch.jit.save(traced, str(path), _extra_files=extra)
    return path


def write_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_name: str,
    metadata: dict[str, str] | None = None,
) -> Path:
    """`module` of one tensor as ONNX, with a dynamic batch axis, weights and `metadata` inside the one file (a camera
    gets one file to install). Torch's dynamo exporter (torch >= 2.9 with onnxscript) gives a graph ONNX Runtime
    runs, with the MoE layer's own lowerings; the legacy TorchScript-based one bakes a reshape of the MobileViT unfold
    wrongly (ORT refuses it), so it is used only where dynamo does not exist (Debian's torch 1.13)."""
    import onnx

    module = module.eval()
    names = {"input_names": [input_name], "output_names": [output_name]}
    dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters
    if dynamo:
        from geomoe.camera.onnx_lowering import LOWERINGS, fuse_unit_length

        batch = torch.export.Dim("batch", min=1, max=1024)
        # Its progress lines and its warnings (about the training layer's debug attributes, where a module still
        # has one) say nothing to the user.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},), verbose=False,
                              custom_translation_table=LOWERINGS, external_data=False, **names)  # fmt: skip
    else:
        torch.onnx.export(module, (example,), str(path), dynamic_axes={input_name: {0: "batch"},
                          output_name: {0: "batch"}}, **names)  # fmt: skip
    exported = onnx.load(str(path))
    if dynamo:
        fuse_unit_length(exported)
    for key, value in (metadata or {}).items():
        entry = exported.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(exported, str(path))
    return path


def export_onnx(model: GeoMoENet, path: Path, image_size: int, labels: Labels, fused: bool = False) -> Path:
    """ONNX of the model with its MoE layers folded, for `image_size` px images with a dynamic batch axis, carrying
    the head's class ids. `fused`: each MoE layer as one node of geomoe's own operator (`camera/fused_moe.py`),
    which ONNX Runtime runs with geomoe's operator library; otherwise standard operations only."""
    example = torch.zeros(1, 3, image_size, image_size)
    class_ids = {CLASS_IDS: json.dumps(model.head.class_ids.tolist()), LABELS: labels.to_json()}
    if fused:
        from geomoe.camera.fused_moe import fuse_for_export

        return write_onnx(fuse_for_export(model), example, path, "images", "logits", class_ids)
    return write_onnx(fold_for_inference(model), example, path, "images", "logits", class_ids)


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, list[int], int | None, Labels]:
    """The exported module, the global class id of each output, the image side it was traced at (None for an
    export from before geomoe recorded it) and its labels. Torch's TorchScript deprecation, as on export, is not the
    camera's concern."""
    extra = {CLASS_IDS_FILE: "", IMAGE_SIZE_FILE: "", LABELS_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    image_size = json.loads(extra[IMAGE_SIZE_FILE]) if extra[IMAGE_SIZE_FILE] else None
    return module.eval(), json.loads(extra[CLASS_IDS_FILE]), image_size, Labels.from_json(extra[LABELS_FILE], path)
