import numpy as np
import pytest
import torch

from moe_common import tensor_codec
from moe_common.errors import InvalidArgument
from moe_protos.moe.expert.v1 import expert_pb2


@pytest.mark.parametrize("wire", sorted(tensor_codec.WIRE_DTYPES))
def test_round_trip_is_exact(wire):
    tdt = tensor_codec.WIRE_DTYPES[wire][1]
    x = torch.randn(7, 13, generator=torch.Generator().manual_seed(0)).to(tdt)
    x[0, 0] = float("inf")
    x[0, 1] = -0.0
    msg = tensor_codec.encode(x, wire)
    assert len(msg.data) == x.numel() * x.element_size()
    y = tensor_codec.decode(msg)
    assert y.dtype == tdt and y.shape == x.shape
    assert torch.equal(y.view(torch.int16 if tdt != torch.float32 else torch.int32),
                       x.view(torch.int16 if tdt != torch.float32 else torch.int32))


def test_fp32_to_bf16_rounds_like_torch():
    x = torch.randn(5, 3)
    assert torch.equal(tensor_codec.decode(tensor_codec.encode(x, "bfloat16")), x.to(torch.bfloat16))


def test_bytes_are_little_endian_row_major():
    msg = tensor_codec.encode(torch.tensor([[1.0, 2.0]]), "float32")
    assert msg.data == np.array([1.0, 2.0], dtype="<f4").tobytes()
    assert list(msg.shape) == [1, 2]


@pytest.mark.parametrize(
    "msg, words",
    [
        (expert_pb2.Tensor(dtype=expert_pb2.DTYPE_FLOAT32, shape=[2, 2], data=b"\0" * 15), "needs 16 bytes, got 15"),
        (expert_pb2.Tensor(dtype=expert_pb2.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "dtype"),
        (expert_pb2.Tensor(dtype=expert_pb2.DTYPE_FLOAT16, shape=[-1], data=b""), "negative"),
    ],
)
def test_malformed_tensors_are_rejected(msg, words):
    with pytest.raises(InvalidArgument, match=words):
        tensor_codec.decode(msg)
