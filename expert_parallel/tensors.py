"""Tensors on the wire: bytes + dtype + shape, optionally fp16 or int8, checked on arrival.

Float tensors travel as float32; a float64 model (exactness checks) keeps float64 end to end.
"""

from __future__ import annotations

import numpy as np
import torch

from geomoe.protos import expert_pb2

DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "int8": np.int8}
CODECS = ("", "fp16", "int8")


def to_proto(tensor: torch.Tensor, codec: str = "") -> expert_pb2.Tensor:
    """Encode a float tensor; fp16 halves it, int8 quarters it (one scale for the whole tensor)."""
    if codec not in CODECS:
        raise ValueError(f"unknown tensor codec {codec!r}; use one of {CODECS}")
    tensor = tensor.detach().cpu()
    array = (tensor if tensor.dtype == torch.float64 and not codec else tensor.float()).numpy()
    scale = 1.0
    if codec == "fp16":
        array = array.astype(np.float16)
    elif codec == "int8":
        scale = float(np.abs(array).max() / 127.0) or 1.0
        array = np.clip(np.round(array / scale), -127, 127).astype(np.int8)
    return expert_pb2.Tensor(
        data=array.tobytes(), dtype=str(array.dtype), shape=list(array.shape), codec=codec, scale=scale
    )


def from_proto(message: expert_pb2.Tensor, dim: int | None = None, max_elements: int = 1 << 26) -> torch.Tensor:
    """Decode and check a tensor; ValueError says what is wrong (the server turns it into INVALID_ARGUMENT)."""
    if message.dtype not in DTYPES:
        raise ValueError(f"tensor dtype {message.dtype!r} is not one of {sorted(DTYPES)}")
    if message.codec not in CODECS:
        raise ValueError(f"tensor codec {message.codec!r} is not one of {CODECS}")
    shape = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in shape) or int(np.prod(shape)) > max_elements:
        raise ValueError(f"tensor shape {shape} is negative or larger than {max_elements} elements")
    expected = int(np.prod(shape)) * np.dtype(DTYPES[message.dtype]).itemsize
    if len(message.data) != expected:
        raise ValueError(
            f"tensor of shape {shape} and dtype {message.dtype} needs {expected} bytes, got {len(message.data)}"
        )
    if dim is not None and (len(shape) != 3 or shape[2] != dim):
        raise ValueError(f"tokens must be (T, P, {dim}), got {shape}")
    wide = np.float64 if message.dtype == "float64" else np.float32
    array = np.frombuffer(message.data, dtype=DTYPES[message.dtype]).reshape(shape).astype(wide)  # a writable copy
    if message.codec == "int8":
        array = np.asarray(array * message.scale, dtype=wide)  # stays an array for 0-d tensors too
    tensor = torch.from_numpy(array)
    if not torch.isfinite(tensor).all():
        raise ValueError("tensor contains NaN or Inf")
    return tensor
