import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fewbits import PerChannel, PerGroup, PerTensor, QuantSpec, Rounding


@pytest.mark.parametrize(
    "bits,signed,narrow,qmin,qmax",
    [
        (8, True, False, -128, 127),  # PyTorch / ONNX int8
        (8, True, True, -127, 127),  # TensorFlow / TensorRT restricted range
        (8, False, False, 0, 255),
        (8, False, True, 1, 255),
        (4, True, False, -8, 7),
        (4, True, True, -7, 7),
        (2, True, False, -2, 1),
        (1, False, False, 0, 1),
        (1, True, False, -1, 0),
        (16, True, False, -32768, 32767),
        (16, False, False, 0, 65535),
    ],
)
def test_integer_ranges(bits, signed, narrow, qmin, qmax):
    spec = QuantSpec(bits=bits, signed=signed, narrow_range=narrow)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)


@pytest.mark.parametrize("bits", [0, 17, -1])
def test_bits_out_of_range_names_field_and_allowed_values(bits):
    with pytest.raises(ValueError, match=r"bits must be in 1\.\.16"):
        QuantSpec(bits=bits)


def test_rejects_non_integer_bits_and_string_booleans():
    with pytest.raises(ValueError, match="bits must be an integer"):
        QuantSpec(bits=8.0)
    with pytest.raises(ValueError, match="signed must be True or False"):
        QuantSpec(signed="yes")


def test_unknown_rounding_lists_allowed_modes():
    with pytest.raises(ValueError, match="rounding must be one of nearest, floor, ceil, stochastic"):
        QuantSpec(rounding="banker")


def test_rounding_accepts_strings_and_stores_enum():
    assert QuantSpec(rounding="stochastic").rounding is Rounding.STOCHASTIC


def test_single_level_grid_rejected():
    with pytest.raises(ValueError, match="single level"):
        QuantSpec(bits=1, signed=True, narrow_range=True)


def test_bad_granularity():
    with pytest.raises(ValueError, match="PerGroup.size must be a positive integer"):
        PerGroup(0)
    with pytest.raises(ValueError, match="granularity must be"):
        QuantSpec(granularity="per_tensor")


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantSpec().bits = 4


def test_replace_validates_again():
    assert QuantSpec().replace(bits=4).qmax == 7
    with pytest.raises(ValueError, match="bits"):
        QuantSpec().replace(bits=0)


granularities = st.one_of(
    st.just(PerTensor()),
    st.builds(PerChannel, st.integers(-3, 3)),
    st.builds(PerGroup, st.integers(1, 256), st.integers(-3, 3)),
)
specs = st.builds(
    QuantSpec, bits=st.integers(2, 16), signed=st.booleans(), symmetric=st.booleans(),
    narrow_range=st.booleans(), granularity=granularities, rounding=st.sampled_from(list(Rounding)),
)


@given(specs)
def test_dict_and_json_round_trip(spec):
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert QuantSpec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json())["version"] == 1


def test_unknown_keys_and_versions_rejected():
    data = QuantSpec().to_dict()
    with pytest.raises(ValueError, match=r"unknown QuantSpec keys \['scale'\]"):
        QuantSpec.from_dict({**data, "scale": 1.0})
    with pytest.raises(ValueError, match="version must be 1"):
        QuantSpec.from_dict({**data, "version": 2})
    with pytest.raises(ValueError, match="version must be 1"):
        QuantSpec.from_dict({k: v for k, v in data.items() if k != "version"})
    with pytest.raises(ValueError, match="granularity kind must be one of"):
        QuantSpec.from_dict({**data, "granularity": {"kind": "per_block"}})
    with pytest.raises(ValueError, match=r"unknown keys \['axes'\]"):
        QuantSpec.from_dict({**data, "granularity": {"kind": "per_channel", "axes": 1}})
