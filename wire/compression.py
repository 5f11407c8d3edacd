"""Compression of the tensors inside Flower messages: fp16, int8 (per tensor or per row), top-k
sparsification, and lossless zstd on top, composable as a pipeline such as "topk0.1+int8+zstd".

The tensors of a record are packed, a group at a time (experts, router, head, shared), into one byte
array each: exact tensors (ids, anything not floating point), then the top-k positions as a bitmap,
then the int8 scales, then the kept values, and zstd over the whole. One array per group rather than
a few per tensor: Flower frames every array (and its content hash) separately, and at 43 tensors a
reply that framing outweighed the compressed values. Every section's size follows from the tensors'
shapes and the pipeline alone, so the description is only names, shapes and dtypes, and a receiver
knows how many bytes to expect before it decompresses anything. Lossy uploads use error feedback:
what compression lost this round is added to the next round's update (Seide et al. 2014;
Karimireddy et al. 2019).

Longer than 300 lines because the packing and its reading are one format: the writer and the bounded reader
stay side by side, so that a change to one is seen against the other.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from geomoe.wire.bounded import bounded_json

QUANTIZERS = ("fp16", "int8", "int8c")  # int8c: one scale per row (per expert / per channel)
VALUE_DTYPES = {
    None: np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "int8": np.dtype(np.int8),
    "int8c": np.dtype(np.int8),
}
SCALE_DTYPE = np.dtype(np.float32)
ZSTD_LEVEL = 10
ZSTD_CHUNK = 1 << 20  # bytes decompressed at a time
MAX_DIM = 1 << 40  # no axis of a described tensor is longer (a larger claim is refused, not multiplied out)
MAX_DESCRIPTION_CHARS = 1 << 20  # JSON describing a record's compressed tensors (a few hundred names)


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

    def __str__(self) -> str:
        """The pipeline as `parse` reads it."""
        stages = [f"topk{self.topk:g}"] if self.topk is not None else []
        stages += [self.quantizer] if self.quantizer else []
        return "+".join(stages + (["zstd"] if self.zstd else [])) or "none"

    def admits(self, other: Pipeline) -> bool:
        """Whether an update packed by `other` may stand for one packed by this (the run's) pipeline: the same
        quantizer and zstd, keeping at most as many values (a node on a budgeted link tightens its top-k)."""
        return other.quantizer == self.quantizer and other.zstd == self.zstd and (other.topk or 1) <= (self.topk or 1)

    @property
    def lossy(self) -> bool:
        return self.topk is not None or self.quantizer is not None

    @property
    def identity(self) -> bool:
        return not self.lossy and not self.zstd


@dataclass(frozen=True)
class Layout:
    """How one described tensor travels under a pipeline: every count derives from its shape and dtype."""

    shape: tuple[int, ...]
    dtype: np.dtype
    lossy: bool  # False: its bytes travel exactly
    kept: int  # values sent (top-k keeps this many, else all)
    scales: int  # int8 scales sent (one per tensor, or per row under int8c without top-k)

    @classmethod
    def of(cls, shape: tuple[int, ...], dtype: np.dtype, pipeline: Pipeline) -> Layout:
        numel = math.prod(shape)
        lossy = pipeline.lossy and dtype.kind == "f" and numel > 0
        if not lossy:
            return cls(shape, dtype, False, 0, 0)
        kept = min(numel, max(1, round(pipeline.topk * numel))) if pipeline.topk is not None else numel
        per_row = pipeline.quantizer == "int8c" and pipeline.topk is None and len(shape) >= 1
        scales = (shape[0] if per_row else 1) if pipeline.quantizer in ("int8", "int8c") else 0
        return cls(shape, dtype, True, kept, scales)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _quantize(values: np.ndarray, quantizer: str | None, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Values as sent, and their scales (none unless int8)."""
    if quantizer not in ("int8", "int8c"):
        return values.astype(VALUE_DTYPES[quantizer]), np.zeros(0, SCALE_DTYPE)
    grouped = values.reshape(groups, -1)
    scale = np.abs(grouped).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(grouped / scale), -127, 127).astype(np.int8)
    return q.reshape(-1), scale.reshape(-1).astype(SCALE_DTYPE)


def _encode_group(tensors: dict[str, torch.Tensor], pipeline: Pipeline) -> tuple[np.ndarray, dict[str, list]]:
    """One byte array holding `tensors`, and their description (name -> [shape, dtype])."""
    exact, masks, scales, values, described = [], [], [], [], {}
    for name, tensor in tensors.items():
        array = tensor.detach().cpu().numpy()
        described[name] = [list(array.shape), str(array.dtype)]
        layout = Layout.of(array.shape, array.dtype, pipeline)
        if not layout.lossy:
            exact.append(np.ascontiguousarray(array).tobytes())
            continue
        flat = array.reshape(-1).astype(np.float32)
        if pipeline.topk is not None:
            mask = np.zeros(flat.size, dtype=bool)
            mask[np.argpartition(np.abs(flat), -layout.kept)[-layout.kept :]] = True
            masks.append(mask)
            flat = flat[mask]  # kept values in position order
        sent, scale = _quantize(flat, pipeline.quantizer, max(layout.scales, 1))
        values.append(sent.tobytes())
        scales.append(scale.tobytes())
    bitmap = np.packbits(np.concatenate(masks)).tobytes() if masks else b""
    packed = b"".join(exact) + bitmap + b"".join(scales) + b"".join(values)
    if pipeline.zstd:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(packed)
    return np.frombuffer(packed, dtype=np.uint8), described


@dataclass(frozen=True)
class GroupLayout:
    """Where each section of one packed group lies, from its description alone."""

    layouts: dict[str, Layout]
    sections: list[int]  # bytes of exact tensors, top-k bitmap, int8 scales (the kept values follow)
    mask_bits: int
    packed_bytes: int  # the group's size before zstd

    @classmethod
    def of(cls, described: dict[str, list], pipeline: Pipeline) -> GroupLayout:
        layouts = {name: _layout(name, meta, pipeline) for name, meta in described.items()}
        lossy = [x for x in layouts.values() if x.lossy]
        exact_bytes = sum(x.numel * x.dtype.itemsize for x in layouts.values() if not x.lossy)
        mask_bits = sum(x.numel for x in lossy) if pipeline.topk is not None else 0
        sections = [exact_bytes, -(-mask_bits // 8), sum(x.scales for x in lossy) * SCALE_DTYPE.itemsize]
        kept_bytes = sum(x.kept for x in lossy) * VALUE_DTYPES[pipeline.quantizer].itemsize
        return cls(layouts, sections, mask_bits, sum(sections) + kept_bytes)

    @property
    def decoded_bytes(self) -> int:
        """What decoding allocates for the tensors themselves (lossy ones as float32 while they are rebuilt)."""
        return sum(x.numel * max(x.dtype.itemsize, 4) for x in self.layouts.values())


def group_layouts(description: str, pipeline: Pipeline) -> dict[str, GroupLayout]:
    """Each packed group's layout from a description (group -> name -> [shape, dtype]), parsed with bounds."""
    described = bounded_json(description, "the description of compressed tensors", MAX_DESCRIPTION_CHARS, 4)
    if not isinstance(described, dict) or not all(isinstance(v, dict) for v in described.values()):
        raise ValueError("the description of compressed tensors is not group -> name -> [shape, dtype]")
    return {group: GroupLayout.of(members, pipeline) for group, members in described.items()}


def packed_bound(layout: GroupLayout, pipeline: Pipeline) -> int:
    """The most bytes a group of this layout may take on the wire: its packed size, plus zstd's worst-case
    overhead on incompressible data (zstd's own ZSTD_COMPRESSBOUND, with room for the frame header)."""
    size = layout.packed_bytes
    return size + size // 128 + 1024 if pipeline.zstd else size


def _decode_group(packed: np.ndarray, group: GroupLayout, pipeline: Pipeline) -> dict[str, torch.Tensor]:
    """The tensors of one packed array. Its expected size follows from the description, and a zstd frame is
    read up to that size and no further, so a frame cannot make the receiver allocate more than described."""
    layouts, sections, mask_bits = group.layouts, group.sections, group.mask_bits
    exact = [x for x in layouts.values() if not x.lossy]
    lossy = [x for x in layouts.values() if x.lossy]
    exact_bytes = [x.numel * x.dtype.itemsize for x in exact]
    value_dtype = VALUE_DTYPES[pipeline.quantizer]
    expected = group.packed_bytes
    data = _unzstd(packed, expected) if pipeline.zstd else packed.tobytes()
    if len(data) != expected:
        raise ValueError(f"packed tensors of {len(data)} bytes, their description says {expected}")
    raw, bitmap, scale_bytes, value_bytes = np.split(np.frombuffer(data, np.uint8), np.cumsum(sections))
    bits = np.unpackbits(bitmap)
    if bits[mask_bits:].any():
        raise ValueError("top-k bitmap sets bits past its last tensor")
    exact_parts = _pieces(raw, exact_bytes)
    masks = _pieces(bits[:mask_bits].astype(bool), [x.numel for x in lossy]) if pipeline.topk is not None else None
    scales = _pieces(scale_bytes.view(SCALE_DTYPE), [x.scales for x in lossy])
    values = _pieces(value_bytes.view(value_dtype), [x.kept for x in lossy])
    out = {}
    for name, x in layouts.items():
        if not x.lossy:
            out[name] = torch.from_numpy(next(exact_parts).view(x.dtype).reshape(x.shape).copy())
            continue
        sent, scale = next(values).astype(np.float32), next(scales)
        if x.scales:
            sent = (sent.reshape(x.scales, -1) * scale[:, None]).reshape(-1)
        if masks is not None:
            mask = next(masks)
            if int(mask.sum()) != x.kept:
                raise ValueError(f"{name}: top-k bitmap keeps {int(mask.sum())} values, the pipeline keeps {x.kept}")
            flat = np.zeros(x.numel, dtype=np.float32)
            flat[mask] = sent
            sent = flat
        out[name] = torch.from_numpy(sent.reshape(x.shape).astype(x.dtype))
    return out


def _pieces(array: np.ndarray, counts: list[int]) -> Iterator[np.ndarray]:
    """`array` cut into consecutive pieces of `counts` elements, one per tensor in order."""
    return iter(np.split(array, np.cumsum(counts)[:-1]) if counts else [])


def _layout(name: str, meta: object, pipeline: Pipeline) -> Layout:
    """The layout of a described tensor, refusing descriptions that are not [shape, numeric dtype]."""
    try:
        shape, dtype = meta
        shape, dtype = tuple(int(n) for n in shape), np.dtype(str(dtype))
    except (TypeError, ValueError):
        raise ValueError(f"{name}: description {meta!r} is not [shape, dtype]") from None
    if dtype.kind not in "biuf" or any(n < 0 or n > MAX_DIM for n in shape):
        raise ValueError(f"{name}: cannot carry shape {list(shape)} of dtype {dtype}")
    return Layout.of(shape, dtype, pipeline)


def _unzstd(frame: np.ndarray, expected: int) -> bytes:
    """A zstd frame, decompressed to at most `expected` + 1 bytes (one more shows it was longer), in chunks: what
    is allocated follows what the frame really holds, not what its description claims."""
    parts, held = [], 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(frame.tobytes())) as reader:
            while held <= expected:
                chunk = reader.read(min(expected + 1 - held, ZSTD_CHUNK))
                if not chunk:
                    break
                parts.append(chunk)
                held += len(chunk)
    except zstandard.ZstdError as error:
        raise ValueError(f"bad zstd frame: {error}") from None
    return b"".join(parts)


def _one_group(name: str) -> str:
    return "tensors"


def encode_all(
    tensors: dict[str, torch.Tensor], pipeline: Pipeline, group_of: Callable[[str], str] = _one_group
) -> tuple[dict[str, np.ndarray], str]:
    """One byte array per group of tensors (`group_of` names a tensor's group: the byte accounting's
    categories), and a JSON description: group -> tensor name -> [shape, dtype]."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        groups.setdefault(group_of(name), {})[name] = tensor
    arrays, described = {}, {}
    for group, members in groups.items():
        arrays[group], described[group] = _encode_group(members, pipeline)
    return arrays, json.dumps(described, separators=(",", ":"))


def decode_all(
    arrays: dict[str, np.ndarray],
    groups: dict[str, GroupLayout],
    pipeline: Pipeline,
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    max_bytes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors from their packed groups (`groups`: `group_layouts` of their description). With `expected` (name ->
    shape, dtype: what the receiver sent), the description must name exactly those tensors with those shapes and
    dtypes; with `max_bytes`, the tensors it describes may take at most that much. Both are checked, and each
    packed array's size against its layout, before anything is decoded."""
    if set(groups) != set(arrays):
        raise ValueError(f"packed groups {sorted(arrays)} do not match their description {sorted(groups)}")
    if expected is not None:
        check_layouts({n: x for group in groups.values() for n, x in group.layouts.items()}, expected)
    described = sum(group.decoded_bytes for group in groups.values())
    if max_bytes is not None and described > max_bytes:
        raise ValueError(f"compressed tensors describe {described} bytes, more than the {max_bytes} expected")
    for name, group in groups.items():
        if arrays[name].nbytes > packed_bound(group, pipeline):
            raise ValueError(f"packed group {name} of {arrays[name].nbytes} bytes; its description allows "
                             f"{packed_bound(group, pipeline)}")  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for name, group in groups.items():
        out.update(_decode_group(arrays[name], group, pipeline))
    return out


def check_layouts(layouts: dict[str, Layout], expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """The described tensors must be exactly `expected`, with its shapes and dtypes."""
    if set(layouts) != set(expected):
        raise ValueError(f"compressed tensors {sorted(layouts)[:5]} are not the ones sent {sorted(expected)[:5]}")
    for name, (shape, dtype) in expected.items():
        layout = layouts[name]
        if layout.shape != tuple(shape):
            raise ValueError(f"{name}: described shape {list(layout.shape)}, sent {list(shape)}")
        if str(layout.dtype) != str(dtype).removeprefix("torch."):
            raise ValueError(f"{name}: described dtype {layout.dtype}, sent {dtype}")


class ErrorFeedback:
    """Residual memory of a lossy sender: adds last round's loss to this round's tensors."""

    def __init__(self, residuals: dict[str, torch.Tensor] | None = None) -> None:
        self.residuals = residuals or {}

    def compress(
        self, tensors: dict[str, torch.Tensor], pipeline: Pipeline, group_of: Callable[[str], str] = _one_group
    ) -> tuple[dict[str, np.ndarray], str]:
        corrected = {
            k: v + self.residuals[k] if k in self.residuals and self.residuals[k].shape == v.shape else v
            for k, v in tensors.items()
        }
        arrays, description = encode_all(corrected, pipeline, group_of)
        if pipeline.lossy:
            decoded = decode_all(arrays, group_layouts(description, pipeline), pipeline)
            self.residuals = {k: corrected[k] - decoded[k] for k in corrected if corrected[k].is_floating_point()}
        return arrays, description
