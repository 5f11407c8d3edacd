"""Compression of the tensors inside Flower messages: fp16, int8 (per tensor or per row), top-k
sparsification, and lossless zstd on top, composable as a pipeline such as "topk0.1+int8+zstd".

A tensor becomes named parts (plain arrays the ArrayRecord carries, so Flower's own serialisation
measures the compressed bytes) plus a small JSON description. Integer tensors (expert and class
ids) always travel exactly. Lossy uploads use error feedback: what compression lost this round is
added to the next round's update (Seide et al. 2014; Karimireddy et al. 2019).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

QUANTIZERS = ("fp16", "int8", "int8c")  # int8c: one scale per row (per expert / per channel)


@dataclass(frozen=True)
class Pipeline:
    """Parsed pipeline: optional top-k fraction, optional quantizer, optional zstd."""

    topk: float | None = None
    quantizer: str | None = None
    zstd: bool = False

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        topk, quantizer, zstd = None, None, False
        for stage in [s.strip() for s in text.split("+") if s.strip() and s.strip() != "none"]:
            if stage == "zstd":
                zstd = True
            elif stage in QUANTIZERS:
                quantizer = stage
            elif stage.startswith("topk"):
                try:
                    topk = float(stage[4:])
                except ValueError:
                    raise ValueError(f"bad top-k stage {stage!r}: write e.g. topk0.1") from None
                if not 0 < topk <= 1:
                    raise ValueError(f"top-k fraction must lie in (0, 1], got {topk}")
            else:
                raise ValueError(f"unknown compression stage {stage!r}: use fp16, int8, int8c, topkF, zstd, none")
        return cls(topk, quantizer, zstd)

    @property
    def lossy(self) -> bool:
        return self.topk is not None or self.quantizer is not None

    @property
    def identity(self) -> bool:
        return not self.lossy and not self.zstd


def _quantize(values: np.ndarray, quantizer: str | None, rows: int) -> dict[str, np.ndarray]:
    if quantizer is None:
        return {"v": values.astype(np.float32)}
    if quantizer == "fp16":
        return {"v": values.astype(np.float16)}
    grouped = values.reshape(rows, -1) if quantizer == "int8c" else values.reshape(1, -1)
    scale = np.abs(grouped).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(grouped / scale), -127, 127).astype(np.int8)
    return {"q": q.reshape(-1), "s": scale.reshape(-1).astype(np.float32)}


def _dequantize(parts: dict[str, np.ndarray], quantizer: str | None, rows: int) -> np.ndarray:
    if quantizer in (None, "fp16"):
        return parts["v"].astype(np.float32)
    groups = rows if quantizer == "int8c" else 1
    return (parts["q"].astype(np.float32).reshape(groups, -1) * parts["s"].reshape(groups, 1)).reshape(-1)


def encode(tensor: torch.Tensor, pipeline: Pipeline) -> tuple[dict[str, np.ndarray], dict]:
    """Parts and description of one tensor."""
    array = tensor.detach().cpu().numpy()
    meta: dict = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if not np.issubdtype(array.dtype, np.floating) or not pipeline.lossy:
        parts = {"raw": np.ascontiguousarray(array)}
    else:
        flat = array.reshape(-1).astype(np.float32)
        rows = array.shape[0] if array.ndim >= 1 and pipeline.quantizer == "int8c" else 1
        if pipeline.topk is not None:
            k = max(1, int(round(pipeline.topk * flat.size)))
            index = np.sort(np.argpartition(np.abs(flat), -k)[-k:]).astype(np.int32)
            parts = {"i": index, **_quantize(flat[index], pipeline.quantizer, 1)}
            meta["rows"] = 1
        else:
            parts = _quantize(flat, pipeline.quantizer, rows)
            meta["rows"] = rows
        meta["lossy"] = True
    if pipeline.zstd:
        meta["parts"] = {name: [str(p.dtype), list(p.shape)] for name, p in parts.items()}
        compressor = zstandard.ZstdCompressor(level=10)
        parts = {name: np.frombuffer(compressor.compress(p.tobytes()), dtype=np.uint8) for name, p in parts.items()}
    return parts, meta


def decode(parts: dict[str, np.ndarray], meta: dict, pipeline: Pipeline) -> torch.Tensor:
    """The tensor back from its parts (exact unless the pipeline is lossy). Every size is checked against the
    tensor's described shape before anything is allocated, so a description from an untrusted sender cannot make
    it allocate more than the tensor (a zstd frame is read up to its expected size, no further)."""
    shape = tuple(int(n) for n in meta["shape"])
    numel = int(np.prod(shape))
    if pipeline.zstd:
        described = meta["parts"]
        if set(described) != set(parts):
            raise ValueError(f"compressed parts {sorted(parts)} do not match their description {sorted(described)}")
        parts = {name: _unzstd(p, np.dtype(described[name][0]), described[name][1], numel) for name, p in parts.items()}
    if "raw" in parts:
        raw = parts["raw"]
        if raw.size != numel:
            raise ValueError(f"raw part of {raw.size} values for a tensor of shape {shape}")
        return torch.from_numpy(np.array(raw, copy=True).reshape(shape))
    _check_sizes(parts, numel, pipeline.quantizer, int(meta.get("rows", 1)))
    if "i" in parts:
        index = parts["i"].astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= numel):
            raise ValueError(f"top-k index outside 0..{numel - 1}")
        flat = np.zeros(numel, dtype=np.float32)
        flat[index] = _dequantize(parts, pipeline.quantizer, 1)
    else:
        flat = _dequantize(parts, pipeline.quantizer, meta["rows"])
    return torch.from_numpy(flat.reshape(shape).astype(meta["dtype"]))


def _unzstd(frame: np.ndarray, dtype: np.dtype, shape: list[int], numel: int) -> np.ndarray:
    """A zstd part, decompressed to at most the bytes its (bounded) description says."""
    count = int(np.prod(shape)) if shape else 1
    if count > numel + 1:  # a part never holds more values than its tensor (+1: the scale of a scalar)
        raise ValueError(f"compressed part of {count} values for a tensor of {numel}")
    expected = count * dtype.itemsize
    try:
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(frame.tobytes())).read(expected + 1)
    except zstandard.ZstdError as error:
        raise ValueError(f"bad zstd part: {error}") from None
    if len(data) != expected:
        raise ValueError(f"zstd part decompresses to {len(data)}+ bytes, expected {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _check_sizes(parts: dict[str, np.ndarray], numel: int, quantizer: str | None, rows: int) -> None:
    """Parts whose sizes fit the tensor: values (and indices) no more than its elements, one scale per group."""
    values = parts.get("v", parts.get("q"))
    if values is None:
        raise ValueError(f"compressed tensor without values (parts {sorted(parts)})")
    count = parts["i"].size if "i" in parts else numel
    if values.size != count or count > numel:
        raise ValueError(f"{values.size} values for {count} positions of a tensor of {numel}")
    if quantizer in ("int8", "int8c"):
        groups = 1 if quantizer == "int8" or "i" in parts else rows
        if "s" not in parts or parts["s"].size != groups or (count and count % groups):
            raise ValueError(f"int8 scales do not match {groups} row(s)")


def encode_all(tensors: dict[str, torch.Tensor], pipeline: Pipeline) -> tuple[dict[str, np.ndarray], str]:
    """Arrays keyed `{name}/{part}` and a JSON description of all tensors."""
    arrays, metas = {}, {}
    for name, tensor in tensors.items():
        parts, metas[name] = encode(tensor, pipeline)
        arrays.update({f"{name}/{part}": array for part, array in parts.items()})
    return arrays, json.dumps(metas)


def decode_all(
    arrays: dict[str, np.ndarray],
    description: str,
    pipeline: Pipeline,
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors from their parts. With `expected` (name -> shape, dtype: what the receiver sent), the description
    must name exactly those tensors with those shapes and dtypes, checked before decoding any of them."""
    metas = json.loads(description)
    if expected is not None:
        _check_description(metas, expected)
    grouped: dict[str, dict[str, np.ndarray]] = {name: {} for name in metas}
    for key, array in arrays.items():
        name, _, part = key.rpartition("/")
        if name not in grouped:
            raise ValueError(f"compressed part {key!r} belongs to no described tensor")
        grouped[name][part] = array
    return {name: decode(grouped[name], metas[name], pipeline) for name in metas}


def _check_description(metas: object, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    if not isinstance(metas, dict) or set(metas) != set(expected):
        names = sorted(metas) if isinstance(metas, dict) else type(metas).__name__
        raise ValueError(f"compressed tensors {names} are not the ones sent {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        meta = metas[name]
        if not isinstance(meta, dict) or meta.get("shape") != list(shape):
            raise ValueError(
                f"{name}: described shape {meta.get('shape') if isinstance(meta, dict) else meta}, sent {list(shape)}"
            )
        if meta.get("dtype") != str(dtype).removeprefix("torch."):
            raise ValueError(f"{name}: described dtype {meta.get('dtype')}, sent {dtype}")


class ErrorFeedback:
    """Residual memory of a lossy sender: adds last round's loss to this round's tensors."""

    def __init__(self, residuals: dict[str, torch.Tensor] | None = None) -> None:
        self.residuals = residuals or {}

    def compress(self, tensors: dict[str, torch.Tensor], pipeline: Pipeline) -> tuple[dict[str, np.ndarray], str]:
        corrected = {
            k: v + self.residuals[k] if k in self.residuals and self.residuals[k].shape == v.shape else v
            for k, v in tensors.items()
        }
        arrays, description = encode_all(corrected, pipeline)
        if pipeline.lossy:
            decoded = decode_all(arrays, description, pipeline)
            self.residuals = {k: corrected[k] - decoded[k] for k in corrected if corrected[k].is_floating_point()}
        return arrays, description
