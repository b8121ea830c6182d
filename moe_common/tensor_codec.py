"""Tensors on the wire: raw little-endian bytes plus dtype and shape.

Never repeated floats: a [1024, 768] fp32 tensor is 3 MB of bytes, decoded
without a Python loop. bf16 and fp16 halve the bytes at the cost of exactness
(the model computes in fp32; only fp32 on the wire reproduces it bit for bit).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from moe_common.errors import InvalidArgument
from moe_protos.moe.expert.v1 import expert_pb2

# wire name -> (proto enum, torch dtype, numpy dtype used to move the bytes)
WIRE_DTYPES = {
    "float32": (expert_pb2.DTYPE_FLOAT32, torch.float32, np.float32),
    "float16": (expert_pb2.DTYPE_FLOAT16, torch.float16, np.float16),
    # numpy has no bfloat16: move its bits as int16 and reinterpret in torch.
    "bfloat16": (expert_pb2.DTYPE_BFLOAT16, torch.bfloat16, np.int16),
}
_BY_ENUM = {enum: (name, tdt, ndt) for name, (enum, tdt, ndt) in WIRE_DTYPES.items()}


def wire_dtype_name(enum_value: int) -> str:
    return _BY_ENUM[enum_value][0]


def encode(tensor: torch.Tensor, wire_dtype: str = "float32") -> expert_pb2.Tensor:
    """Tensor of any float dtype -> proto Tensor in `wire_dtype` (a key of WIRE_DTYPES)."""
    enum, tdt, ndt = WIRE_DTYPES[wire_dtype]
    t = tensor.detach().to(device="cpu", dtype=tdt).contiguous()
    if tdt == torch.bfloat16:
        t = t.view(torch.int16)
    data = t.numpy().astype(np.dtype(ndt).newbyteorder("<"), copy=False).tobytes()
    return expert_pb2.Tensor(dtype=enum, shape=list(tensor.shape), data=data)


def decode(msg: expert_pb2.Tensor) -> torch.Tensor:
    """proto Tensor -> CPU torch tensor of the wire dtype. Raises InvalidArgument when malformed.

    The result shares memory with the message bytes and must be treated as read-only.
    """
    if msg.dtype not in _BY_ENUM:
        raise InvalidArgument(
            f"tensor dtype {msg.dtype} is not one of {sorted(WIRE_DTYPES)} (DTYPE_UNSPECIFIED is not allowed)"
        )
    _, tdt, ndt = _BY_ENUM[msg.dtype]
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor shape {list(shape)} has a negative dimension")
    itemsize = np.dtype(ndt).itemsize
    expected = math.prod(shape) * itemsize
    if len(msg.data) != expected:
        raise InvalidArgument(
            f"tensor of shape {list(shape)} and dtype {wire_dtype_name(msg.dtype)} needs {expected} bytes, got {len(msg.data)}"
        )
    array = np.frombuffer(msg.data, dtype=np.dtype(ndt).newbyteorder("<")).reshape(shape)
    with warnings.catch_warnings():
        # The bytes object is immutable; callers only read the tensor, so no copy is needed.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(array)
    if tdt == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t


def decode_header(msg: expert_pb2.Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
    """(torch dtype, shape) of a proto Tensor whose data lies elsewhere (a shared region)."""
    if msg.dtype not in _BY_ENUM:
        raise InvalidArgument(
            f"tensor dtype {msg.dtype} is not one of {sorted(WIRE_DTYPES)} (DTYPE_UNSPECIFIED is not allowed)"
        )
    if msg.data:
        raise InvalidArgument("a tensor in a shared region must not carry data bytes too")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor shape {list(shape)} has a negative dimension")
    return _BY_ENUM[msg.dtype][1], shape


def header(tensor: torch.Tensor, wire_dtype: str) -> expert_pb2.Tensor:
    """A proto Tensor with dtype and shape only: its data travels in shared memory."""
    return expert_pb2.Tensor(dtype=WIRE_DTYPES[wire_dtype][0], shape=list(tensor.shape))
