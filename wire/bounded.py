"""Bounded readers for untrusted bytes and text: JSON, `.npy` arrays, free text.

Python's own parsers do the work before they can be told to stop: `json.loads` recurses once per nesting level
(RecursionError at a few thousand `[`) and converts numbers of any length, and `np.load` allocates whatever element
count a 128-byte header claims before it reads a byte of data (MemoryError). Every reader here checks the cheap
facts first (length, depth, digits, declared shape and dtype against the bytes present) and only then parses, so
what it allocates is bounded by what the caller expected. Each raises ValueError naming what it read.
"""

from __future__ import annotations

import io
import json
import math
import re
import unicodedata
from typing import Any

import numpy as np

MAX_DEPTH = 8  # nesting of JSON arrays and objects; the project's own messages nest at most 3 deep
MAX_NUMBER_CHARS = 40  # characters of one JSON number (a float64 needs at most 24)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def bounded_json(text: str, what: str, max_chars: int, max_depth: int = MAX_DEPTH) -> Any:
    """`text` parsed as JSON, refused unless it has at most `max_chars` characters, `max_depth` levels of nesting,
    numbers of at most MAX_NUMBER_CHARS characters and no NaN or Infinity."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be JSON text, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ValueError(f"{what} is {len(text)} characters of JSON, more than {max_chars}")
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"{what} nests {depth} levels deep, more than {max_depth}")
    try:
        return json.loads(text, parse_int=_number(int, what), parse_float=_number(float, what),
                          parse_constant=_no_constant(what))  # fmt: skip
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not JSON: {error.msg} at character {error.pos}") from None


def json_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in `text`, brackets inside strings not counted (no recursion)."""
    outside = np.frombuffer(_STRING.sub('""', text).encode(), dtype=np.uint8)
    steps = np.isin(outside, (ord("["), ord("{"))).astype(np.int64) - np.isin(outside, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def _number(kind: type, what: str):
    def parse(token: str) -> int | float:
        if len(token) > MAX_NUMBER_CHARS:
            raise ValueError(f"{what} holds a number of {len(token)} characters, more than {MAX_NUMBER_CHARS}")
        return kind(token)

    return parse


def _no_constant(what: str):
    def parse(token: str) -> float:
        raise ValueError(f"{what} holds {token}, which strict JSON does not allow")

    return parse


def read_npy(
    data: bytes,
    what: str,
    dtype: np.dtype | None = None,
    shape: tuple[int, ...] | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """The array in `.npy` bytes, refused unless its header declares `dtype` (None: any numeric dtype), `shape`
    (None: any shape) and at most `max_bytes` of data, and the bytes after the header are exactly that data.
    Nothing is allocated before those checks; the result is a writable copy."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        declared_shape, fortran, declared_dtype = reader(stream, max_header_size=1024)
    except (ValueError, SyntaxError, TypeError) as error:
        raise ValueError(f"{what}: not an .npy array ({error})") from None
    if dtype is not None and declared_dtype != np.dtype(dtype):
        raise ValueError(f"{what}: dtype {declared_dtype}, expected {np.dtype(dtype)}")
    if declared_dtype.kind not in "biuf" or declared_dtype.hasobject:
        raise ValueError(f"{what}: dtype {declared_dtype} is not numeric")
    if shape is not None and tuple(declared_shape) != tuple(shape):
        raise ValueError(f"{what}: shape {tuple(declared_shape)}, expected {tuple(shape)}")
    size = math.prod(declared_shape) * declared_dtype.itemsize
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{what}: shape {tuple(declared_shape)} of {declared_dtype} is {size} bytes, "
                         f"more than {max_bytes}")  # fmt: skip
    offset = stream.tell()
    if len(data) - offset != size:
        raise ValueError(f"{what}: {len(data) - offset} bytes of data for shape {tuple(declared_shape)} of "
                         f"{declared_dtype}")  # fmt: skip
    flat = np.frombuffer(data, dtype=declared_dtype, count=math.prod(declared_shape), offset=offset)
    return flat.reshape(declared_shape, order="F" if fortran else "C").copy()


def check_text(value: object, what: str, max_chars: int) -> str:
    """`value` if it is a string of at most `max_chars` characters with no control or format characters (a newline
    or an ANSI escape would forge a log line or a report field); else ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise ValueError(f"{what} is {len(value)} characters long, more than {max_chars}")
    if any(unicodedata.category(c).startswith("C") for c in value):
        raise ValueError(f"{what} holds control characters: {printable(value, 60)}")
    return value


def printable(text: object, max_chars: int = 300) -> str:
    """`text` safe for one log line or a report field: control characters escaped, cut to `max_chars`."""
    text = str(text)
    cut = text[:max_chars]
    escaped = "".join(c if not unicodedata.category(c).startswith("C") else c.encode("unicode_escape").decode()
                      for c in cut)  # fmt: skip
    return escaped + (f"... ({len(text)} characters)" if len(text) > max_chars else "")


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, so that `json.dumps(..., allow_nan=False)` writes
    strict JSON (Infinity and NaN are not JSON, and a report must load anywhere)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value
