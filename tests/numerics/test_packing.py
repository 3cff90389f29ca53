import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fewbits import pack, unpack


@given(bits=st.integers(1, 8), n=st.integers(0, 200), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_every_width(bits, n, signed, seed):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    q = torch.randint(lo, hi, (n,), generator=torch.Generator().manual_seed(seed))
    data = pack(q, bits, signed=signed)
    assert data.dtype == torch.uint8 and data.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack(data, bits, (n,), signed=signed).long(), q)


def test_layout_is_little_endian_bit_stream():
    # 1, 2, 3 at 2 bits: 0b11_10_01 = 57; 3-bit values straddle the byte boundary.
    assert pack(torch.tensor([1, 2, 3]), 2).tolist() == [57]
    assert pack(torch.tensor([7, 7, 4]), 3).tolist() == [0b0011_1111, 0b0000_0001]  # 4 = 0b100: its 1 is bit 8
    assert pack(torch.tensor([-1]), 4, signed=True).tolist() == [15]


def test_multidimensional_shape_and_extremes():
    q = torch.tensor([[-8, 7, 0], [-1, 1, -8]], dtype=torch.int8)
    assert torch.equal(unpack(pack(q, 4, signed=True), 4, (2, 3), signed=True), q)


def test_errors():
    with pytest.raises(ValueError, match="do not fit unsigned 2-bit range"):
        pack(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="do not fit signed 3-bit range"):
        pack(torch.tensor([-5]), 3, signed=True)
    with pytest.raises(ValueError, match="integer in 1..8"):
        pack(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="integer tensor"):
        pack(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="expected 2 bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, (4,))
